//! Description templates over event fields, compiled once at startup into segments so that
//! rendering on the hot path never re-parses.
//!
//! Fields: `{id}`, `{metric}`, `{quantity}`, `{timestamp}`, `{contract}`, `{attributes.KEY}`.
//! `{{` and `}}` are literal braces. Rendering rules:
//! - `{quantity}` prints the exact decimal, normalised (trailing fractional zeros dropped, never
//!   an exponent): `"12.50"` and `1.25e1` both print `12.5`.
//! - `{timestamp}` prints the UTC time as RFC 3339 with `Z` (`2026-11-20T10:15:00Z`).
//! - `{contract}` prints the contract id or the external id, whichever the event carried.
//! - `{attributes.KEY}` prints the attribute; a missing attribute prints as empty text.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;

use crate::event::{BillableUsage, CustomerRef, UsageEvent};

/// The fields a template may print, borrowed from a decoded or a priced event.
struct Fields<'a> {
    id: &'a str,
    metric: &'a str,
    quantity: Decimal,
    timestamp: DateTime<Utc>,
    customer: &'a CustomerRef,
    attributes: &'a BTreeMap<String, String>,
}

/// A compiled template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segments: Box<[Segment]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Id,
    Metric,
    Quantity,
    Timestamp,
    Contract,
    Attribute(Box<str>),
}

/// The names a template may use, for error messages.
pub const TEMPLATE_FIELDS: &str =
    "{id}, {metric}, {quantity}, {timestamp}, {contract} or {attributes.KEY}";

impl Template {
    /// Compiles a template; the error says what is wrong and what is accepted.
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((pos, c)) = chars.next() {
            match c {
                '{' if matches!(chars.peek(), Some((_, '{'))) => {
                    chars.next();
                    literal.push('{');
                }
                '}' if matches!(chars.peek(), Some((_, '}'))) => {
                    chars.next();
                    literal.push('}');
                }
                '}' => {
                    return Err(format!(
                        "unmatched `}}` at character {}: write `}}}}` for a literal `}}`",
                        char_pos(source, pos)
                    ));
                }
                '{' => {
                    let rest = &source[pos + 1..];
                    let Some(end) = rest
                        .find(['}', '{'])
                        .filter(|&e| rest[e..].starts_with('}'))
                    else {
                        return Err(format!(
                            "unclosed `{{` at character {}: expected {TEMPLATE_FIELDS}; write \
                             `{{{{` for a literal `{{`",
                            char_pos(source, pos)
                        ));
                    };
                    let name = &rest[..end];
                    let segment = field(name).ok_or_else(|| {
                        format!(
                            "unknown field `{{{name}}}`: expected {TEMPLATE_FIELDS}; write `{{{{` \
                             and `}}}}` for literal braces"
                        )
                    })?;
                    if !literal.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut literal).into()));
                    }
                    segments.push(segment);
                    // Skip the field name and the closing brace.
                    for _ in 0..name.chars().count() + 1 {
                        chars.next();
                    }
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal.into()));
        }
        Ok(Template {
            segments: segments.into(),
        })
    }

    /// Renders the template for one event.
    pub fn render(&self, event: &UsageEvent) -> String {
        self.render_fields(&Fields {
            id: &event.id,
            metric: &event.metric,
            quantity: event.quantity,
            timestamp: event.timestamp,
            customer: &event.customer,
            attributes: &event.attributes,
        })
    }

    /// Renders the template for a priced event (the Billingrails `event_name`); `{timestamp}`
    /// is its due date, which is the event's timestamp unless pre-aggregated.
    pub fn render_usage(&self, usage: &BillableUsage) -> String {
        self.render_fields(&Fields {
            id: &usage.event_id,
            metric: &usage.metric,
            quantity: usage.quantity,
            timestamp: usage.due_date,
            customer: &usage.customer,
            attributes: &usage.attributes,
        })
    }

    fn render_fields(&self, event: &Fields<'_>) -> String {
        let mut out = String::with_capacity(64);
        for segment in self.segments.iter() {
            match segment {
                Segment::Literal(s) => out.push_str(s),
                Segment::Id => out.push_str(event.id),
                Segment::Metric => out.push_str(event.metric),
                Segment::Quantity => {
                    let _ = write!(out, "{}", event.quantity.normalize());
                }
                Segment::Timestamp => {
                    out.push_str(&event.timestamp.to_rfc3339_opts(SecondsFormat::AutoSi, true))
                }
                Segment::Contract => match event.customer {
                    CustomerRef::ContractId(s) | CustomerRef::ExternalId(s) => out.push_str(s),
                },
                Segment::Attribute(key) => {
                    if let Some(v) = event.attributes.get(&**key) {
                        out.push_str(v);
                    }
                }
            }
        }
        out
    }

    /// True when the template has no field and no text.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }
}

fn field(name: &str) -> Option<Segment> {
    Some(match name {
        "id" => Segment::Id,
        "metric" => Segment::Metric,
        "quantity" => Segment::Quantity,
        "timestamp" => Segment::Timestamp,
        "contract" => Segment::Contract,
        _ => {
            let key = name.strip_prefix("attributes.")?;
            if key.is_empty() {
                return None;
            }
            Segment::Attribute(key.into())
        }
    })
}

/// 1-based character position for messages.
fn char_pos(source: &str, byte: usize) -> usize {
    source[..byte].chars().count() + 1
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{TimeZone, Utc};
    use rust_decimal::Decimal;

    use super::*;

    fn event() -> UsageEvent {
        UsageEvent {
            id: "evt_1".into(),
            customer: CustomerRef::ExternalId("acme-prod".into()),
            metric: "api_calls".into(),
            quantity: "12.50".parse::<Decimal>().unwrap(),
            timestamp: Utc.with_ymd_and_hms(2026, 11, 20, 10, 15, 0).unwrap(),
            attributes: BTreeMap::from([("region".to_string(), "eu-west-1".to_string())]),
            price_per_unit: None,
        }
    }

    fn render(t: &str) -> String {
        Template::parse(t).unwrap().render(&event())
    }

    #[test]
    fn renders_every_field() {
        assert_eq!(
            render("{quantity} API calls in {attributes.region}"),
            "12.5 API calls in eu-west-1"
        );
        assert_eq!(
            render("{id}|{metric}|{timestamp}|{contract}"),
            "evt_1|api_calls|2026-11-20T10:15:00Z|acme-prod"
        );
        assert_eq!(render("plain text"), "plain text");
        assert_eq!(render(""), "");
        assert_eq!(render("héllo {metric}ü"), "héllo api_callsü");
    }

    #[test]
    fn missing_attribute_renders_empty() {
        assert_eq!(render("[{attributes.plan}]"), "[]");
    }

    #[test]
    fn doubled_braces_are_literal() {
        assert_eq!(render("{{quantity}} = {quantity}"), "{quantity} = 12.5");
        assert_eq!(render("}}{{"), "}{");
        assert_eq!(render("{{{metric}}}"), "{api_calls}");
    }

    #[test]
    fn rejects_unknown_fields_and_unbalanced_braces() {
        let err = |t: &str| Template::parse(t).unwrap_err();
        assert!(
            err("{qty}").starts_with("unknown field `{qty}`"),
            "{}",
            err("{qty}")
        );
        assert!(err("{attributes.}").starts_with("unknown field"));
        assert!(err("{attributes}").starts_with("unknown field"));
        assert!(err("{ quantity }").starts_with("unknown field"));
        assert!(err("abc {quantity").starts_with("unclosed `{` at character 5"));
        assert!(err("{a{quantity}").starts_with("unclosed `{` at character 1"));
        assert!(err("a } b").starts_with("unmatched `}` at character 3"));
    }

    #[test]
    fn quantity_prints_the_exact_decimal() {
        let mut e = event();
        e.quantity = "0.000000000000000000000000001".parse().unwrap();
        assert_eq!(
            Template::parse("{quantity}").unwrap().render(&e),
            "0.000000000000000000000000001"
        );
        e.quantity = Decimal::new(1500, 0);
        assert_eq!(Template::parse("{quantity}").unwrap().render(&e), "1500");
    }

    #[test]
    fn renders_a_priced_event_like_the_event() {
        let e = event();
        let usage = BillableUsage {
            event_id: e.id.clone(),
            customer: e.customer.clone(),
            metric: e.metric.clone(),
            component_id: "c".into(),
            quantity: e.quantity,
            due_date: e.timestamp,
            product_override: None,
            attributes: e.attributes.clone(),
        };
        let t =
            Template::parse("{id}|{metric}|{quantity}|{timestamp}|{contract}|{attributes.region}")
                .unwrap();
        assert_eq!(t.render_usage(&usage), t.render(&e));
    }
}
