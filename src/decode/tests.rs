use proptest::prelude::*;
use serde_json::json;

use super::*;

fn decoder() -> EventDecoder {
    EventDecoder::new(InputMapping::default())
}

fn base() -> Value {
    json!({
        "id": "evt_01JD3Q6W4F",
        "contract_id": "5cd186af443e551fe8e4f5dd",
        "metric": "api_calls",
        "quantity": "12.5",
        "timestamp": "2026-11-20T10:15:00Z",
        "attributes": { "plan": "enterprise", "region": "eu-west-1" }
    })
}

fn decode_value(v: &Value) -> Result<UsageEvent, Rejection> {
    decoder().decode(v.to_string().as_bytes())
}

/// The base event with `field` set to `value`.
fn with(field: &str, value: Value) -> Value {
    let mut v = base();
    v[field] = value;
    v
}

fn without(field: &str) -> Value {
    let mut v = base();
    v.as_object_mut().unwrap().remove(field);
    v
}

fn rejected(v: &Value) -> Rejection {
    decode_value(v).expect_err("expected a rejection")
}

fn assert_rejected(v: &Value, reason: RejectReason, contains: &[&str]) {
    let r = rejected(v);
    assert_eq!(r.reason, reason, "{r}");
    for c in contains {
        assert!(r.detail.contains(c), "{r} should contain {c:?}");
    }
}

#[test]
fn decodes_the_design_example() {
    let e = decode_value(&base()).unwrap();
    assert_eq!(e.id, "evt_01JD3Q6W4F");
    assert_eq!(
        e.customer,
        CustomerRef::ContractId("5cd186af443e551fe8e4f5dd".into())
    );
    assert_eq!(e.metric, "api_calls");
    assert_eq!(e.quantity.to_string(), "12.5");
    assert_eq!(e.timestamp.to_rfc3339(), "2026-11-20T10:15:00+00:00");
    assert_eq!(e.attributes["region"], "eu-west-1");
    assert_eq!(e.price_per_unit, None);
}

#[test]
fn invalid_json_and_non_objects() {
    for payload in [
        &b"{"[..],
        b"",
        b"not json",
        b"{\"id\": 1,}",
        b"\xff\xfe",
        b"{\"a\":\"\xff\"}",
    ] {
        let r = decoder().decode(payload).unwrap_err();
        assert_eq!(r.reason, RejectReason::InvalidJson, "{payload:?}: {r}");
        assert!(r.detail.starts_with("the payload is not UTF-8 JSON"), "{r}");
    }
    for (payload, kind) in [
        ("[1,2]", "an array"),
        ("\"x\"", "a string"),
        ("42", "a number"),
        ("null", "null"),
    ] {
        let r = decoder().decode(payload.as_bytes()).unwrap_err();
        assert_eq!(r.reason, RejectReason::InvalidJson);
        assert!(r.detail.contains(kind), "{r}");
        assert!(r.detail.contains("expected a JSON object"), "{r}");
    }
}

#[test]
fn id_rules() {
    assert_rejected(
        &without("id"),
        RejectReason::MissingField,
        &["id is missing"],
    );
    assert_rejected(
        &with("id", json!(null)),
        RejectReason::MissingField,
        &["id is missing"],
    );
    assert_rejected(
        &with("id", json!("")),
        RejectReason::MissingField,
        &["id is empty"],
    );
    assert_rejected(
        &with("id", json!({"a": 1})),
        RejectReason::InvalidField,
        &["id {\"a\":1}: is an object, expected a string or a number"],
    );
    assert_rejected(
        &with("id", json!(true)),
        RejectReason::InvalidField,
        &["a boolean"],
    );
    let long = "x".repeat(201);
    let r = rejected(&with("id", json!(long)));
    assert_eq!(r.reason, RejectReason::InvalidField);
    assert!(
        r.detail
            .contains("201 characters long, expected at most 200"),
        "{r}"
    );
    assert!(r.detail.len() < 250, "the value is truncated: {r}");
    assert_eq!(
        decode_value(&with("id", json!("x".repeat(200))))
            .unwrap()
            .id
            .len(),
        200
    );
    // A number is kept as its exact text.
    let e = decoder()
        .decode(br#"{"id": 123456789012345678901234567890, "contract_id":"c","metric":"m","quantity":1,"timestamp":"2026-01-01T00:00:00Z"}"#)
        .unwrap();
    assert_eq!(e.id, "123456789012345678901234567890");
}

#[test]
fn contract_rules() {
    let mut both = base();
    both["contract_external_id"] = json!("acme-prod");
    assert_rejected(
        &both,
        RejectReason::InvalidField,
        &[
            "both contract_id",
            "and contract_external_id \"acme-prod\"",
            "exactly one",
        ],
    );
    assert_rejected(
        &without("contract_id"),
        RejectReason::MissingField,
        &["neither contract_id nor contract_external_id"],
    );
    assert_rejected(
        &with("contract_id", json!(5)),
        RejectReason::InvalidField,
        &["contract_id 5: is a number"],
    );
    assert_rejected(
        &with("contract_id", json!("")),
        RejectReason::MissingField,
        &["is empty"],
    );
    let mut ext = without("contract_id");
    ext["contract_external_id"] = json!("acme-prod");
    assert_eq!(
        decode_value(&ext).unwrap().customer,
        CustomerRef::ExternalId("acme-prod".into())
    );
    // null counts as absent, so a producer may send both keys with one null.
    ext["contract_id"] = json!(null);
    assert!(decode_value(&ext).is_ok());
    // Integer product ids are accepted as their text; other shapes are not.
    ext["contract_external_id"] = json!(4711);
    assert_eq!(
        decode_value(&ext).unwrap().customer,
        CustomerRef::ExternalId("4711".into())
    );
    ext["contract_external_id"] = json!(47.5);
    assert_rejected(
        &ext,
        RejectReason::InvalidField,
        &["contract_external_id 47.5"],
    );
    ext["contract_external_id"] = json!(["a"]);
    assert_rejected(&ext, RejectReason::InvalidField, &["an array"]);
}

/// Issue 11, problem 2: `5cd186af443e551fe8e4f5d0/../../../../oauth/token/?x=` was pasted into
/// the usage URL and sent, with the bearer token, as `POST /oauth/token/?x=/usage`. For billwerk
/// a contract id is exactly 24 hex characters; anything else is dead-lettered at decode.
#[test]
fn billwerk_contract_ids_are_24_hex_characters() {
    let billwerk = EventDecoder::for_sink(InputMapping::default(), SinkKind::Billwerk);
    let decode = |id: &str| billwerk.decode(with("contract_id", json!(id)).to_string().as_bytes());
    for bad in [
        "5cd186af443e551fe8e4f5d0/../../../../oauth/token/?x=",
        "5cd186af443e551fe8e4f5d",
        "5cd186af443e551fe8e4f5dd0",
        "5cd186af443e551fe8e4f5dg",
        "5cd186af443e551fe8e4f5d%",
        "../../../../../../../../",
        " 5cd186af443e551fe8e4f5d",
        "５cd186af443e551fe8e4f5d",
    ] {
        let r = decode(bad).expect_err(bad);
        assert_eq!(r.reason, RejectReason::InvalidContractId, "{bad}: {r}");
        assert!(r.detail.contains("24 hexadecimal characters"), "{r}");
    }
    for good in ["5cd186af443e551fe8e4f5dd", "5CD186AF443E551FE8E4F5DD"] {
        assert_eq!(
            decode(good).unwrap().customer,
            CustomerRef::ContractId(good.into())
        );
    }
    // External ids have no fixed shape: they travel as an encoded query value.
    let mut ext = without("contract_id");
    ext["contract_external_id"] = json!("acme/../x?y=1&z#");
    assert!(billwerk.decode(ext.to_string().as_bytes()).is_ok());
    // Billingrails account ids have no fixed shape either; they only travel in the body.
    let billingrails = EventDecoder::for_sink(InputMapping::default(), SinkKind::Billingrails);
    let any = with("contract_id", json!("acct_42"));
    assert!(billingrails.decode(any.to_string().as_bytes()).is_ok());
}

#[test]
fn metric_rules() {
    assert_rejected(
        &without("metric"),
        RejectReason::MissingField,
        &["metric is missing"],
    );
    assert_rejected(
        &with("metric", json!("")),
        RejectReason::MissingField,
        &["metric is empty"],
    );
    assert_rejected(
        &with("metric", json!(7)),
        RejectReason::InvalidField,
        &["metric 7"],
    );
}

#[test]
fn quantity_rules() {
    assert_rejected(
        &without("quantity"),
        RejectReason::MissingField,
        &["quantity is missing"],
    );
    for (q, contains) in [
        (json!(0), "quantity 0: is not > 0"),
        (json!("0.000"), "is not > 0"),
        (json!(-1), "quantity -1: is not > 0"),
        (json!("-0.5"), "is not > 0"),
        (json!("NaN"), "quantity \"NaN\": is not a decimal number"),
        (json!("inf"), "is not a decimal number"),
        (json!("Infinity"), "is not a decimal number"),
        (
            json!("abc"),
            "quantity \"abc\": is not a decimal number, expected a decimal > 0",
        ),
        (json!("1_000"), "is not a decimal number"),
        (json!(" 5"), "is not a decimal number"),
        (json!(true), "is a boolean"),
        (json!({"v": 1}), "is an object"),
        (json!("1e-40"), "more than 28 decimal places"),
        (json!(1e40), "too large"),
    ] {
        assert_rejected(
            &with("quantity", q),
            RejectReason::InvalidQuantity,
            &[contains],
        );
    }
}

#[test]
fn quantities_are_exact() {
    let q = |raw: &str| {
        let payload = format!(
            r#"{{"id":"e","contract_id":"c","metric":"m","timestamp":"2026-01-01T00:00:00Z","quantity":{raw}}}"#
        );
        decoder().decode(payload.as_bytes()).unwrap().quantity
    };
    assert_eq!(q(r#""0.1""#) + q(r#""0.2""#), q(r#""0.3""#));
    assert_eq!(q("0.1") + q("0.2"), q("0.3"));
    // 20+ significant digits survive, from a JSON number or a string.
    assert_eq!(
        q("12345678901234567890.123456789").to_string(),
        "12345678901234567890.123456789"
    );
    assert_eq!(
        q(r#""1234567890.1234567890123456""#).to_string(),
        "1234567890.1234567890123456"
    );
    assert_eq!(q("1e3").to_string(), "1000");
    assert_eq!(q("2.5E-3").to_string(), "0.0025");
    assert_eq!(q(r#""12.50""#).to_string(), "12.50");
}

#[test]
fn timestamp_rules() {
    let e = decode_value(&with("timestamp", json!("2026-11-20T12:15:00+02:00"))).unwrap();
    assert_eq!(e.timestamp.to_rfc3339(), "2026-11-20T10:15:00+00:00");
    let e = decode_value(&with(
        "timestamp",
        json!("2026-11-20T10:15:00.123456789-05:30"),
    ))
    .unwrap();
    assert_eq!(
        e.timestamp.to_rfc3339(),
        "2026-11-20T15:45:00.123456789+00:00"
    );
    assert_rejected(
        &without("timestamp"),
        RejectReason::MissingField,
        &["timestamp is missing"],
    );
    for t in [
        json!("2026-11-20"),
        json!("2026-11-20T10:15:00"),
        json!("20/11/2026 10:15"),
        json!("2026-13-01T00:00:00Z"),
        json!(1763633700),
        json!(""),
    ] {
        assert_rejected(
            &with("timestamp", t),
            RejectReason::InvalidTimestamp,
            &["is not an RFC 3339 time"],
        );
    }
}

#[test]
fn attributes_are_flattened_to_strings() {
    // Raw text: the json! macro would turn 1.50 into an f64.
    let e = decoder()
        .decode(
            br#"{"id":"e","contract_id":"c","metric":"m","quantity":1,
                 "timestamp":"2026-01-01T00:00:00Z",
                 "attributes":{"s":"x","n":1.50,"b":false,"o":{"k":[1,"two"]},"a":[],"z":null}}"#,
        )
        .unwrap();
    let got: Vec<(&str, &str)> = e
        .attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a", "[]"),
            ("b", "false"),
            ("n", "1.50"),
            ("o", "{\"k\":[1,\"two\"]}"),
            ("s", "x"),
        ]
    );
    assert!(decode_value(&without("attributes"))
        .unwrap()
        .attributes
        .is_empty());
    assert_rejected(
        &with("attributes", json!(["a"])),
        RejectReason::InvalidField,
        &["attributes [\"a\"]: is an array, expected a JSON object"],
    );
}

#[test]
fn price_per_unit_is_decoded_exactly() {
    let e = decode_value(&with("price_per_unit", json!("0.0008"))).unwrap();
    assert_eq!(e.price_per_unit, Some("0.0008".parse().unwrap()));
    let e = decode_value(&with("price_per_unit", json!(0))).unwrap();
    assert_eq!(e.price_per_unit, Some(Decimal::ZERO));
    assert_rejected(
        &with("price_per_unit", json!("cheap")),
        RejectReason::InvalidField,
        &["price_per_unit \"cheap\": is not a decimal number"],
    );
}

#[test]
fn custom_pointer_mapping() {
    let mapping = InputMapping {
        id: "/meta/event_id".into(),
        contract_id: "".into(),
        contract_external_id: "/customer/ids/0".into(),
        metric: "/usage/kind".into(),
        quantity: "/usage/amount".into(),
        timestamp: "/meta/at".into(),
        attributes: "/labels".into(),
        price_per_unit: "".into(),
        ..InputMapping::default()
    };
    let d = EventDecoder::new(mapping);
    let payload = json!({
        "meta": {"event_id": "p-1", "at": "2026-11-20T10:15:00Z"},
        "customer": {"ids": ["acme", "other"]},
        "usage": {"kind": "api_calls", "amount": 3},
        "labels": {"region": "eu"},
        "contract_id": "ignored: not mapped",
        "price_per_unit": "ignored: not mapped"
    });
    let e = d.decode(payload.to_string().as_bytes()).unwrap();
    assert_eq!(e.id, "p-1");
    assert_eq!(e.customer, CustomerRef::ExternalId("acme".into()));
    assert_eq!(e.metric, "api_calls");
    assert_eq!(e.quantity, Decimal::new(3, 0));
    assert_eq!(e.attributes["region"], "eu");
    assert_eq!(e.price_per_unit, None);

    // Rejections name the pointer of a mapped field.
    let mut bad = payload.clone();
    bad["usage"]["amount"] = json!("lots");
    let r = d.decode(bad.to_string().as_bytes()).unwrap_err();
    assert_eq!(r.reason, RejectReason::InvalidQuantity);
    assert!(
        r.detail.starts_with("quantity (at /usage/amount) \"lots\""),
        "{r}"
    );
    let mut bad = payload;
    bad["meta"] = json!("flat");
    let r = d.decode(bad.to_string().as_bytes()).unwrap_err();
    assert_eq!(
        r.detail,
        "id (at /meta/event_id) is missing: expected the event's unique id (a non-empty string)"
    );
}

#[test]
fn pointer_escapes() {
    let mapping = InputMapping {
        metric: "/a~1b/c~0d".into(),
        ..InputMapping::default()
    };
    let mut v = without("metric");
    v["a/b"] = json!({"c~d": "escaped"});
    let e = EventDecoder::new(mapping)
        .decode(v.to_string().as_bytes())
        .unwrap();
    assert_eq!(e.metric, "escaped");
}

#[test]
fn long_values_are_truncated_in_details() {
    let r = rejected(&with("quantity", json!("9".repeat(500))));
    assert!(r.detail.contains('…'), "{r}");
    assert!(r.detail.chars().count() < 250, "{r}");
}

#[test]
fn check_mapping_accepts_the_default() {
    assert!(check_mapping(&InputMapping::default()).is_empty());
}

fn arb_decimal_text() -> impl Strategy<Value = String> {
    // Up to 28 significant digits with up to 10 decimal places: always representable.
    (1u64..u64::MAX, 0u32..=10, any::<bool>()).prop_map(|(mantissa, scale, trailing_zero)| {
        let d = Decimal::from_i128_with_scale(mantissa as i128, scale);
        let mut s = d.to_string();
        if trailing_zero && scale > 0 {
            s.push('0');
        }
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decoder().decode(&bytes);
    }

    #[test]
    fn decode_never_panics_on_arbitrary_json(v in arb_json()) {
        let _ = decoder().decode(v.to_string().as_bytes());
        let mut event = base();
        event["quantity"] = v.clone();
        let _ = decode_value(&event);
        event["id"] = v;
        let _ = decode_value(&event);
    }

    #[test]
    fn valid_events_round_trip_quantity_exactly(
        q in arb_decimal_text(),
        as_string in any::<bool>(),
        id in "[a-zA-Z0-9_-]{1,40}",
        offset_minutes in -720i32..=840,
    ) {
        let expected: Decimal = q.parse().unwrap();
        let sign = if offset_minutes < 0 { '-' } else { '+' };
        let off = offset_minutes.abs();
        let ts = format!("2026-11-20T10:15:00{sign}{:02}:{:02}", off / 60, off % 60);
        let quantity = if as_string { format!("\"{q}\"") } else { q.clone() };
        let payload = format!(
            r#"{{"id":"{id}","contract_external_id":"acme","metric":"api_calls","quantity":{quantity},"timestamp":"{ts}"}}"#
        );
        let e = decoder().decode(payload.as_bytes()).unwrap();
        prop_assert_eq!(e.quantity, expected);
        prop_assert_eq!(e.quantity.to_string(), q);
        prop_assert_eq!(e.id, id);
        let utc = chrono::DateTime::parse_from_rfc3339(&ts).unwrap().with_timezone(&Utc);
        prop_assert_eq!(e.timestamp, utc);
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[-+0-9.eE]{0,12}".prop_map(|s| serde_json::from_str(&s).unwrap_or(Value::String(s))),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

// ---- the timestamp window ----

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn window(max_future: u64, max_age: u64) -> TimestampWindow {
    TimestampWindow {
        max_future: std::time::Duration::from_secs(max_future),
        max_age: std::time::Duration::from_secs(max_age),
    }
}

const DAY: u64 = 86_400;

#[test]
fn the_window_defaults_come_from_the_input_section() {
    let w = TimestampWindow::from_config(&InputMapping::default());
    assert_eq!(w, window(300, 35 * DAY));
}

#[test]
fn an_event_older_than_max_age_is_out_of_window_naming_the_bound() {
    let w = window(300, 35 * DAY);
    let now = at("2026-12-01T12:00:00Z");
    let r = w.check(at("2026-01-01T00:00:00Z"), now).unwrap_err();
    assert_eq!(r.reason, RejectReason::TimestampOutOfWindow);
    assert_eq!(r.reason.as_str(), "timestamp_out_of_window");
    assert!(
        r.detail.starts_with(
            "timestamp 2026-01-01T00:00:00Z is older than input.max_age (35d): it was 334d 12h \
             old when read at 2026-12-01T12:00:00Z"
        ),
        "{}",
        r.detail
    );
    // Exactly at the bound is inside; a second past it is outside.
    assert!(w.check(at("2026-10-27T12:00:00Z"), now).is_ok());
    let r = w.check(at("2026-10-27T11:59:59Z"), now).unwrap_err();
    assert!(r.detail.contains("it was 35d 1s old"), "{}", r.detail);
}

#[test]
fn an_event_further_ahead_than_max_future_is_out_of_window_naming_the_bound() {
    let w = window(300, 35 * DAY);
    let now = at("2026-12-01T12:00:00Z");
    assert!(w.check(at("2026-12-01T12:05:00Z"), now).is_ok());
    let r = w.check(at("2026-12-01T12:05:00.001Z"), now).unwrap_err();
    assert_eq!(r.reason, RejectReason::TimestampOutOfWindow);
    assert!(
        r.detail.starts_with(
            "timestamp 2026-12-01T12:05:00.001Z is more than input.max_future (5m) ahead"
        ),
        "{}",
        r.detail
    );
    let r = w.check(at("2027-01-02T13:00:00Z"), now).unwrap_err();
    assert!(r.detail.contains("it was 32d 1h ahead"), "{}", r.detail);
}

#[test]
fn zero_disables_each_bound() {
    let now = at("2026-12-01T12:00:00Z");
    let ancient = at("1970-01-01T00:00:00Z");
    let far = at("9999-12-31T23:59:59Z");
    assert!(window(0, 0).check(ancient, now).is_ok());
    assert!(window(0, 0).check(far, now).is_ok());
    assert!(TimestampWindow::unbounded().check(far, now).is_ok());
    // max_age off, max_future on: the old event passes, the future one does not.
    assert!(window(300, 0).check(ancient, now).is_ok());
    assert!(window(300, 0).check(far, now).is_err());
    // max_future off, max_age on.
    assert!(window(0, 35 * DAY).check(far, now).is_ok());
    assert!(window(0, 35 * DAY).check(ancient, now).is_err());
}

#[test]
fn bounds_beyond_the_calendar_bound_nothing_instead_of_panicking() {
    let now = at("2026-12-01T12:00:00Z");
    let huge = window(u64::MAX, u64::MAX);
    assert!(huge.check(at("1970-01-01T00:00:00Z"), now).is_ok());
    assert!(huge.check(at("9999-12-31T23:59:59Z"), now).is_ok());
    let now = DateTime::<Utc>::MAX_UTC;
    assert!(window(300, 35 * DAY)
        .check(at("2026-01-01T00:00:00Z"), now)
        .is_err());
    let now = DateTime::<Utc>::MIN_UTC;
    assert!(window(300, 35 * DAY)
        .check(at("2026-01-01T00:00:00Z"), now)
        .is_err());
}

proptest! {
    /// Inside the window ⇔ now − max_age ≤ t ≤ now + max_future, for any times and bounds.
    #[test]
    fn the_window_is_exactly_the_interval(
        t in -62_000_000_000i64..250_000_000_000i64,
        now in -62_000_000_000i64..250_000_000_000i64,
        future in 0u64..(400 * DAY),
        age in 0u64..(400 * DAY),
    ) {
        let t = DateTime::<Utc>::from_timestamp(t, 0).unwrap();
        let now = DateTime::<Utc>::from_timestamp(now, 0).unwrap();
        let w = window(future, age);
        let too_old = age > 0 && now.signed_duration_since(t).num_seconds() > age as i64;
        let too_new = future > 0 && t.signed_duration_since(now).num_seconds() > future as i64;
        let r = w.check(t, now);
        prop_assert_eq!(r.is_ok(), !too_old && !too_new, "{:?}", r);
        if let Err(r) = r {
            prop_assert_eq!(r.reason, RejectReason::TimestampOutOfWindow);
            let bound = if too_old { "input.max_age" } else { "input.max_future" };
            prop_assert!(r.detail.contains(bound), "{}", r.detail);
        }
    }
}
