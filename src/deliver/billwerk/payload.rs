//! The usage record billwerk receives: exact decimals, 7-fractional-digit UTC timestamps, the
//! delivery key in `Memo`. Pure.

use std::str::FromStr;

use chrono::{DateTime, Timelike, Utc};
use rust_decimal::Decimal;
use serde_json::{Map, Number, Value};

use crate::deliver::Delivery;

/// billwerk's timestamp form: `2020-02-26T09:32:36.1230000Z`.
pub fn billwerk_timestamp(t: DateTime<Utc>) -> String {
    format!(
        "{}.{:07}Z",
        t.format("%Y-%m-%dT%H:%M:%S"),
        t.nanosecond() % 1_000_000_000 / 100
    )
}

/// A decimal as an exact JSON number (serde_json keeps the digits: `arbitrary_precision`).
pub fn decimal_number(d: Decimal) -> Value {
    let text = d.normalize().to_string();
    Number::from_str(&text)
        .map(Value::Number)
        .unwrap_or(Value::String(text))
}

/// The body of `POST /contracts/{id}/usage` for a delivery: one record whose quantity is the
/// exact sum of its items (one item unless pre-aggregated). `None` for a delivery without items
/// or whose sum cannot be represented exactly (aggregation never builds one).
pub fn usage_body(delivery: &Delivery) -> Option<Value> {
    let first = &delivery.items.first()?.usage;
    let quantity: Decimal =
        crate::event::exact_sum(delivery.items.iter().map(|i| i.usage.quantity))?;
    let mut body = Map::new();
    body.insert(
        "ComponentId".into(),
        Value::String(first.component_id.clone()),
    );
    body.insert("Quantity".into(), decimal_number(quantity));
    body.insert(
        "DueDate".into(),
        Value::String(billwerk_timestamp(first.due_date)),
    );
    body.insert("Memo".into(), Value::String(delivery.key.to_string()));
    if let Some(o) = first.product_override.as_ref().filter(|o| !o.is_empty()) {
        let mut po = Map::new();
        if let Some(p) = o.price_per_unit {
            po.insert("PricePerUnit".into(), decimal_number(p));
        }
        if let Some(n) = &o.name {
            po.insert("Name".into(), Value::String(n.clone()));
        }
        if let Some(d) = &o.description {
            po.insert("Description".into(), Value::String(d.clone()));
        }
        body.insert("ProductOverride".into(), Value::Object(po));
    }
    Some(Value::Object(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn timestamps_have_seven_fractional_digits() {
        let t = Utc.with_ymd_and_hms(2026, 11, 20, 10, 15, 0).unwrap()
            + chrono::Duration::nanoseconds(123_456_789);
        assert_eq!(billwerk_timestamp(t), "2026-11-20T10:15:00.1234567Z");
        let t0 = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(billwerk_timestamp(t0), "2026-01-02T03:04:05.0000000Z");
    }

    #[test]
    fn decimals_stay_exact_in_json() {
        let d = Decimal::from_str("12345678901234567.000000001").unwrap();
        assert_eq!(
            serde_json::to_string(&decimal_number(d)).unwrap(),
            "12345678901234567.000000001"
        );
        assert_eq!(
            serde_json::to_string(&decimal_number(Decimal::from_str("2.50").unwrap())).unwrap(),
            "2.5"
        );
    }
}
