//! [`UsageEvent`] → [`BillableUsage`]: metric → ComponentId, then the first matching override
//! rule sets price, name and a templated description. Pure: no I/O, no clock.
//!
//! Event-supplied prices are refused unless `pricing.allow_event_price` is set, and then only
//! within `[event_price_min, event_price_max]`: a compromised producer must not be able to set
//! prices. An allowed event price replaces the rule's price.

use std::collections::HashMap;

use rust_decimal::Decimal;

use crate::config::{did_you_mean, push_key, Config, ConfigProblem, SinkKind};
use crate::event::{BillableUsage, ProductOverride, RejectReason, Rejection, UsageEvent};

mod template;
pub use template::{Template, TEMPLATE_FIELDS};

#[cfg(test)]
mod tests;

/// Compiled pricing rules; built once at startup, checked then.
#[derive(Debug, Clone)]
pub struct PriceBook {
    /// metric → ComponentId.
    components: HashMap<String, String>,
    rules: Vec<Rule>,
    event_price: EventPricePolicy,
}

/// One compiled `[[overrides]]` rule.
#[derive(Debug, Clone)]
struct Rule {
    metric: Option<String>,
    attributes: Vec<(String, String)>,
    price_per_unit: Option<Decimal>,
    name: Option<String>,
    description: Option<Template>,
}

impl Rule {
    fn matches(&self, event: &UsageEvent) -> bool {
        self.metric.as_deref().is_none_or(|m| m == event.metric)
            && self
                .attributes
                .iter()
                .all(|(k, v)| event.attributes.get(k) == Some(v))
    }

    /// True when every event `later` matches is matched by `self` first.
    fn shadows(&self, later: &Rule) -> bool {
        let metric_covers = match (&self.metric, &later.metric) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
        };
        metric_covers
            && self
                .attributes
                .iter()
                .all(|(k, v)| later.attributes.iter().any(|(lk, lv)| lk == k && lv == v))
    }
}

/// Whether events may carry their own `price_per_unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventPricePolicy {
    Refused,
    Allowed { min: Decimal, max: Decimal },
}

impl PriceBook {
    /// Compiles `[components]`, `[pricing]` and `[[overrides]]`; every problem at once, keyed
    /// like `overrides[2].description`.
    pub fn new(config: &Config) -> Result<PriceBook, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let mut problem =
            |key: String, message: String| problems.push(ConfigProblem { key, message });

        if config.components.is_empty() {
            problem(
                "components".into(),
                "no metric is mapped to a component: add lines like \
                 `api_calls = \"5ce53069443e551b9caccc64\"` under [components]"
                    .into(),
            );
        }
        for (metric, component) in &config.components {
            let mut key = "components".to_string();
            push_key(&mut key, metric);
            if metric.trim().is_empty() {
                problem(key.clone(), "the metric name is empty".into());
            }
            if component.trim().is_empty() {
                problem(
                    key,
                    "the component id is empty: expected the provider's id for this metric".into(),
                );
            } else if config.sink.kind() == SinkKind::Billwerk && !is_billwerk_id(component) {
                problem(
                    key,
                    format!(
                        "{component:?} is not a billwerk ComponentId: expected 24 hexadecimal \
                         characters like \"5ce53069443e551b9caccc64\""
                    ),
                );
            }
        }

        let event_price = compile_event_price(config, &mut problem);

        let mut rules = Vec::with_capacity(config.overrides.len());
        for (i, rule) in config.overrides.iter().enumerate() {
            let key = |field: &str| format!("overrides[{i}].{field}");
            if let Some(metric) = &rule.metric {
                if !config.components.contains_key(metric) {
                    let known: Vec<String> = config.components.keys().cloned().collect();
                    let hint = did_you_mean(metric, &known)
                        .map(|m| format!(" (did you mean `{m}`?)"))
                        .unwrap_or_default();
                    problem(
                        key("metric"),
                        format!(
                            "{metric:?} is not a metric in [components]{hint}; known metrics: {}",
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                }
            }
            if let Some(price) = rule.price_per_unit {
                if price.is_sign_negative() && !price.is_zero() {
                    problem(
                        key("price_per_unit"),
                        format!("{price} is negative: expected a price ≥ 0"),
                    );
                }
            }
            if let Some(name) = &rule.name {
                if name.trim().is_empty() {
                    problem(
                        key("name"),
                        "is empty: expected the product name to show, or remove the key".into(),
                    );
                }
            }
            let description = match rule.description.as_deref().map(Template::parse) {
                None => None,
                Some(Ok(t)) => Some(t),
                Some(Err(message)) => {
                    problem(key("description"), message);
                    None
                }
            };
            for k in rule.attributes.keys() {
                if k.is_empty() {
                    problem(key("attributes"), "an attribute name is empty".into());
                }
            }
            rules.push(Rule {
                metric: rule.metric.clone(),
                attributes: rule
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                price_per_unit: rule.price_per_unit,
                name: rule.name.clone(),
                description,
            });
        }
        for (i, later) in rules.iter().enumerate() {
            if let Some(j) = rules[..i].iter().position(|earlier| earlier.shadows(later)) {
                problem(
                    format!("overrides[{i}]"),
                    format!(
                        "this rule never matches: overrides[{j}] comes first and matches every \
                         event it would (first match wins); reorder or narrow the rules"
                    ),
                );
            }
        }

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(PriceBook {
            components: config
                .components
                .iter()
                .map(|(m, c)| (m.clone(), c.clone()))
                .collect(),
            rules,
            event_price,
        })
    }

    /// Prices one event. `product_override` is `None` when nothing is overridden; `due_date` is
    /// the event's timestamp.
    pub fn price(&self, event: UsageEvent) -> Result<BillableUsage, Rejection> {
        let Some(component_id) = self.components.get(&event.metric) else {
            return Err(Rejection::new(
                RejectReason::UnknownMetric,
                format!(
                    "metric {:?} has no component in [components]",
                    crate::decode::truncate_chars(&event.metric, 100)
                ),
            ));
        };

        let mut product_override = ProductOverride::default();
        if let Some(rule) = self.rules.iter().find(|r| r.matches(&event)) {
            product_override.price_per_unit = rule.price_per_unit;
            product_override.name = rule.name.clone();
            product_override.description = rule.description.as_ref().map(|t| t.render(&event));
        }

        if let Some(price) = event.price_per_unit {
            match self.event_price {
                EventPricePolicy::Refused => {
                    return Err(Rejection::new(
                        RejectReason::PriceNotAllowed,
                        format!(
                            "the event carries price_per_unit {price}, but this pipeline does \
                             not accept prices from events (pricing.allow_event_price = false)"
                        ),
                    ))
                }
                EventPricePolicy::Allowed { min, max } if price < min || price > max => {
                    return Err(Rejection::new(
                        RejectReason::PriceNotAllowed,
                        format!(
                            "the event's price_per_unit {price} is outside the allowed range \
                             [{min}, {max}] (pricing.event_price_min/max)"
                        ),
                    ))
                }
                EventPricePolicy::Allowed { .. } => product_override.price_per_unit = Some(price),
            }
        }

        Ok(BillableUsage {
            component_id: component_id.clone(),
            product_override: (!product_override.is_empty()).then_some(product_override),
            due_date: event.timestamp,
            event_id: event.id,
            customer: event.customer,
            metric: event.metric,
            quantity: event.quantity,
            attributes: event.attributes,
        })
    }

    /// The component a metric maps to.
    pub fn component(&self, metric: &str) -> Option<&str> {
        self.components.get(metric).map(String::as_str)
    }

    pub fn event_price_policy(&self) -> EventPricePolicy {
        self.event_price
    }
}

fn compile_event_price(
    config: &Config,
    problem: &mut impl FnMut(String, String),
) -> EventPricePolicy {
    let p = &config.pricing;
    for (key, bound) in [
        ("pricing.event_price_min", p.event_price_min),
        ("pricing.event_price_max", p.event_price_max),
    ] {
        match bound {
            None if p.allow_event_price => problem(
                key.into(),
                "is required when pricing.allow_event_price = true: event prices are accepted \
                 only within [event_price_min, event_price_max]"
                    .into(),
            ),
            Some(b) if b.is_sign_negative() && !b.is_zero() => {
                problem(key.into(), format!("{b} is negative: expected a price ≥ 0"))
            }
            _ => {}
        }
    }
    if let (Some(min), Some(max)) = (p.event_price_min, p.event_price_max) {
        if min > max {
            problem(
                "pricing.event_price_min".into(),
                format!(
                    "{min} is greater than pricing.event_price_max ({max}): expected min ≤ max"
                ),
            );
        }
    }
    match (p.allow_event_price, p.event_price_min, p.event_price_max) {
        (true, Some(min), Some(max)) => EventPricePolicy::Allowed { min, max },
        _ => EventPricePolicy::Refused,
    }
}

/// billwerk ids (contracts, components) are 24 hexadecimal characters.
pub fn is_billwerk_id(s: &str) -> bool {
    s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit())
}
