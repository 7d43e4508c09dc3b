use std::collections::BTreeMap;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;

use super::*;
use crate::event::CustomerRef;

const BASE: &str = r#"
[kafka]
brokers = "localhost:9092"
group_id = "g"
topics = ["usage-events"]
dead_letter_topic = "usage-events-dlq"

[sink]
kind = "billwerk"
base_url = "https://sandbox.billwerk.com"
client_id = "id"
client_secret = "secret"

[components]
api_calls = "5ce53069443e551b9caccc64"
storage = "5ce53069443e551b9caccc65"
"#;

fn book(extra: &str) -> PriceBook {
    let text = format!("{BASE}\n{extra}");
    let config = Config::from_toml_str_with_env(&text, &|_| None)
        .unwrap_or_else(|e| panic!("config does not validate:\n{e}"));
    PriceBook::new(&config).unwrap()
}

fn problems(extra: &str) -> Vec<String> {
    let text = format!("{BASE}\n{extra}");
    let config: Config = toml::from_str(&text).unwrap();
    PriceBook::new(&config)
        .unwrap_err()
        .into_iter()
        .map(|p| p.to_string())
        .collect()
}

fn event(metric: &str, attributes: &[(&str, &str)]) -> UsageEvent {
    UsageEvent {
        id: "evt_1".into(),
        customer: CustomerRef::ContractId("5cd186af443e551fe8e4f5dd".into()),
        metric: metric.into(),
        quantity: "12.50".parse().unwrap(),
        timestamp: Utc.with_ymd_and_hms(2026, 11, 20, 10, 15, 0).unwrap(),
        attributes: attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        price_per_unit: None,
    }
}

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

const RULES: &str = r#"
[[overrides]]
metric = "api_calls"
attributes = { plan = "enterprise", region = "eu-west-1" }
price_per_unit = "0.0008"
name = "API calls (enterprise EU)"
description = "{quantity} API calls in {attributes.region}"

[[overrides]]
metric = "api_calls"
attributes = { plan = "enterprise" }
price_per_unit = "0.001"
description = "{quantity} API calls, {{plan}}: {attributes.plan}"

[[overrides]]
attributes = { plan = "free" }
price_per_unit = "0"

[[overrides]]
metric = "storage"
description = "{quantity} GB on {contract} [{attributes.region}]"
"#;

#[test]
fn maps_metric_to_component_without_override() {
    let u = book("").price(event("api_calls", &[])).unwrap();
    assert_eq!(u.component_id, "5ce53069443e551b9caccc64");
    assert_eq!(u.product_override, None);
    assert_eq!(u.event_id, "evt_1");
    assert_eq!(u.quantity, d("12.50"));
    assert_eq!(
        u.due_date,
        Utc.with_ymd_and_hms(2026, 11, 20, 10, 15, 0).unwrap()
    );
    assert_eq!(
        u.customer,
        CustomerRef::ContractId("5cd186af443e551fe8e4f5dd".into())
    );
}

#[test]
fn unknown_metric_is_rejected() {
    let r = book("").price(event("api_cals", &[])).unwrap_err();
    assert_eq!(r.reason, RejectReason::UnknownMetric);
    assert_eq!(
        r.detail,
        "metric \"api_cals\" has no component in [components]"
    );
}

#[test]
fn first_matching_rule_wins() {
    let b = book(RULES);
    let o = b
        .price(event(
            "api_calls",
            &[("plan", "enterprise"), ("region", "eu-west-1")],
        ))
        .unwrap()
        .product_override
        .unwrap();
    assert_eq!(o.price_per_unit, Some(d("0.0008")));
    assert_eq!(o.name.as_deref(), Some("API calls (enterprise EU)"));
    assert_eq!(
        o.description.as_deref(),
        Some("12.5 API calls in eu-west-1")
    );

    // Region differs: the second rule.
    let o = b
        .price(event(
            "api_calls",
            &[("plan", "enterprise"), ("region", "us-east-1")],
        ))
        .unwrap()
        .product_override
        .unwrap();
    assert_eq!(o.price_per_unit, Some(d("0.001")));
    assert_eq!(o.name, None);
    assert_eq!(
        o.description.as_deref(),
        Some("12.5 API calls, {plan}: enterprise")
    );

    // A rule without metric matches any metric.
    for metric in ["api_calls", "storage"] {
        let o = b
            .price(event(metric, &[("plan", "free")]))
            .unwrap()
            .product_override
            .unwrap();
        assert_eq!(o.price_per_unit, Some(Decimal::ZERO), "{metric}");
        assert_eq!(o.description, None);
    }

    // Missing attribute renders empty.
    let o = b
        .price(event("storage", &[]))
        .unwrap()
        .product_override
        .unwrap();
    assert_eq!(
        o.description.as_deref(),
        Some("12.5 GB on 5cd186af443e551fe8e4f5dd []")
    );

    // Nothing matches: no override.
    let u = b.price(event("api_calls", &[("plan", "startup")])).unwrap();
    assert_eq!(u.product_override, None);
}

#[test]
fn event_prices_are_refused_by_default() {
    let mut e = event("api_calls", &[]);
    e.price_per_unit = Some(d("0.5"));
    let r = book("").price(e).unwrap_err();
    assert_eq!(r.reason, RejectReason::PriceNotAllowed);
    assert!(r.detail.contains("price_per_unit 0.5"), "{r}");
    assert!(
        r.detail.contains("pricing.allow_event_price = false"),
        "{r}"
    );
}

#[test]
fn event_prices_within_bounds_override_the_rule() {
    let b = book(&format!(
        "{RULES}\n[pricing]\nallow_event_price = true\nevent_price_min = \"0.0001\"\nevent_price_max = \"1\"\n"
    ));
    assert_eq!(
        b.event_price_policy(),
        EventPricePolicy::Allowed {
            min: d("0.0001"),
            max: d("1")
        }
    );
    let mut e = event("api_calls", &[("plan", "enterprise")]);
    e.price_per_unit = Some(d("0.25"));
    let o = b.price(e.clone()).unwrap().product_override.unwrap();
    assert_eq!(o.price_per_unit, Some(d("0.25")));
    assert!(o.description.is_some(), "the rule's description stays");

    // Bounds are inclusive.
    for ok in ["0.0001", "1"] {
        e.price_per_unit = Some(d(ok));
        assert!(b.price(e.clone()).is_ok(), "{ok}");
    }
    for bad in ["0.00009", "1.0000001", "-1"] {
        e.price_per_unit = Some(d(bad));
        let r = b.price(e.clone()).unwrap_err();
        assert_eq!(r.reason, RejectReason::PriceNotAllowed, "{bad}");
        assert!(
            r.detail.contains("outside the allowed range [0.0001, 1]"),
            "{r}"
        );
    }

    // An event price alone makes an override.
    let mut e = event("storage", &[("region", "x")]);
    e.attributes.clear();
    e.metric = "api_calls".into();
    e.price_per_unit = Some(d("0.5"));
    let o = b.price(e).unwrap().product_override.unwrap();
    assert_eq!(
        o,
        ProductOverride {
            price_per_unit: Some(d("0.5")),
            ..Default::default()
        }
    );
}

#[test]
fn rule_problems_are_keyed_by_index() {
    let p = problems(
        r#"
[[overrides]]
metric = "api_calls"
description = "{quantity} {attributes.region"

[[overrides]]
metric = "apicalls"
price_per_unit = "-0.5"

[[overrides]]
description = "total } {qty}"
"#,
    );
    insta::assert_snapshot!(p.join("\n"));
}

#[test]
fn billingrails_components_are_free_text() {
    let text = BASE
        .replace("kind = \"billwerk\"", "kind = \"billingrails\"")
        .replace(
            "api_calls = \"5ce53069443e551b9caccc64\"",
            "api_calls = \"api-calls\"",
        );
    let config: Config = toml::from_str(&text).unwrap();
    let b = PriceBook::new(&config).unwrap();
    assert_eq!(b.component("api_calls"), Some("api-calls"));
}

proptest! {
    #[test]
    fn description_quantity_is_the_exact_normalised_decimal(
        mantissa in 1i64..i64::MAX, scale in 0u32..=12
    ) {
        let b = book("[[overrides]]\ndescription = \"{quantity}\"\n");
        let mut e = event("api_calls", &[]);
        e.quantity = Decimal::new(mantissa, scale);
        let text = b.price(e.clone()).unwrap().product_override.unwrap().description.unwrap();
        prop_assert_eq!(text.parse::<Decimal>().unwrap(), e.quantity);
        prop_assert!(!text.contains('e'));
    }
}
