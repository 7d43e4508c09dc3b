//! What Billingrails receives: one event per priced usage, the `{"events":[...]}` batch body, and
//! the request-level `Idempotency-Key`. Pure.
//!
//! Event shape (billing-apis.md §2): `{"event_name", "properties", "idempotency_key",
//! "timestamp"}`. The customer travels inside `properties` under the meter's account-mapping
//! property. The quantity is an exact JSON number (`12.5`, never `12.499999…`): a meter sums a
//! numeric property, and serde_json's `arbitrary_precision` writes the decimal's own digits.

use chrono::SecondsFormat;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::BillingrailsConfig;
use crate::deliver::billwerk::payload::decimal_number;
use crate::event::{BillableUsage, CustomerRef, DeliveryKey};
use crate::pricing::Template;

/// Prefix of the request-level key; the version lets a future body format change the key.
const REQUEST_KEY_PREFIX: &str = "mfr1-";

/// Billingrails keeps `Idempotency-Key` answers for keys of at most 180 characters.
pub const MAX_REQUEST_KEY_LEN: usize = 180;

/// Maps priced usage to Billingrails events, as configured in `[sink.billingrails]`.
#[derive(Debug, Clone)]
pub struct EventMapper {
    event_name: Template,
    account_property: String,
    quantity_property: String,
    price_property: Option<String>,
    description_property: Option<String>,
}

impl EventMapper {
    pub fn new(config: &BillingrailsConfig) -> Result<EventMapper, String> {
        let event_name = Template::parse(&config.event_name)
            .map_err(|e| format!("sink.billingrails.event_name: {e}"))?;
        let named = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        Ok(EventMapper {
            event_name,
            account_property: config.account_property.clone(),
            quantity_property: config.quantity_property.clone(),
            price_property: named(&config.price_property),
            description_property: named(&config.description_property),
        })
    }

    /// The event for one priced usage.
    ///
    /// `properties` are the event's attributes, then the properties meterflow owns: the account
    /// mapping, the quantity and (when configured) the override's price and description. An
    /// attribute with one of those names is dropped, not sent: a producer must not be able to
    /// move usage to another account or set a price through an attribute.
    pub fn event(&self, usage: &BillableUsage) -> Value {
        let mut properties = Map::new();
        for (key, value) in &usage.attributes {
            if !self.owns(key) {
                properties.insert(key.clone(), Value::String(value.clone()));
            }
        }
        let customer = match &usage.customer {
            CustomerRef::ContractId(id) | CustomerRef::ExternalId(id) => id.clone(),
        };
        properties.insert(self.account_property.clone(), Value::String(customer));
        properties.insert(
            self.quantity_property.clone(),
            decimal_number(usage.quantity),
        );
        let product_override = usage.product_override.as_ref();
        if let (Some(name), Some(price)) = (
            &self.price_property,
            product_override.and_then(|o| o.price_per_unit),
        ) {
            properties.insert(name.clone(), decimal_number(price));
        }
        if let (Some(name), Some(description)) = (
            &self.description_property,
            product_override.and_then(|o| o.description.as_ref()),
        ) {
            properties.insert(name.clone(), Value::String(description.clone()));
        }
        let mut event = Map::new();
        event.insert(
            "event_name".into(),
            Value::String(self.event_name.render_usage(usage)),
        );
        event.insert("properties".into(), Value::Object(properties));
        // The per-event key Billingrails deduplicates on: re-sending an event in any batch, after
        // any restart, stores it once.
        event.insert(
            "idempotency_key".into(),
            Value::String(DeliveryKey::for_event(&usage.event_id).0),
        );
        event.insert(
            "timestamp".into(),
            Value::String(usage.due_date.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        );
        Value::Object(event)
    }

    /// The event, serialized once: bisection sends the same event in several bodies.
    pub fn event_bytes(&self, usage: &BillableUsage) -> Vec<u8> {
        // A `Value` with string keys always serializes: serde_json fails only for non-string
        // map keys and failing `Serialize` impls, neither of which a `Value` has.
        #[allow(clippy::expect_used)]
        serde_json::to_vec(&self.event(usage)).expect("a JSON value always serializes")
    }

    fn owns(&self, property: &str) -> bool {
        property == self.account_property
            || property == self.quantity_property
            || self.price_property.as_deref() == Some(property)
            || self.description_property.as_deref() == Some(property)
    }
}

/// `{"events":[...]}` from serialized events.
pub fn batch_body<'a>(events: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut body = Vec::with_capacity(4096);
    body.extend_from_slice(br#"{"events":["#);
    for (i, event) in events.into_iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(event);
    }
    body.extend_from_slice(b"]}");
    body
}

/// The request's `Idempotency-Key`: a hash of the path and the exact body. The same batch sent
/// again (a retry, or the same batch rebuilt after a restart) carries the same key and gets the
/// cached answer instead of being processed twice; a batch with other content — e.g. what is
/// left after refused events were taken out, or a body changed by a config change — gets another
/// key, so it can never meet "same key, different body" (409). 69 characters, under the 180 limit.
pub fn request_key(path: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(path.as_bytes());
    hasher.update(b"\n");
    hasher.update(body);
    format!("{REQUEST_KEY_PREFIX}{}", hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ProductOverride;
    use chrono::{TimeZone, Utc};
    use rust_decimal::Decimal;
    use std::collections::BTreeMap;
    use std::str::FromStr;

    fn config() -> BillingrailsConfig {
        BillingrailsConfig {
            price_property: Some("unit_price".into()),
            description_property: Some("description".into()),
            event_name: "{metric}.v1".into(),
            ..BillingrailsConfig::default()
        }
    }

    fn usage(id: &str, quantity: &str, priced: bool) -> BillableUsage {
        BillableUsage {
            event_id: id.into(),
            customer: if priced {
                CustomerRef::ExternalId("acme-prod".into())
            } else {
                CustomerRef::ContractId("5cd186af443e551fe8e4f5dd".into())
            },
            metric: "api_calls".into(),
            component_id: "api_calls".into(),
            quantity: Decimal::from_str(quantity).unwrap(),
            due_date: Utc.with_ymd_and_hms(2026, 11, 20, 10, 15, 0).unwrap()
                + chrono::Duration::milliseconds(123),
            product_override: priced.then(|| ProductOverride {
                price_per_unit: Some(Decimal::from_str("0.00150").unwrap()),
                name: Some("API calls (enterprise)".into()),
                description: Some(format!("{quantity} API calls in eu-west-1")),
            }),
            attributes: BTreeMap::from([
                ("plan".to_string(), "enterprise".to_string()),
                ("region".to_string(), "eu-west-1".to_string()),
                // Owned by meterflow: must not reach Billingrails from an attribute.
                ("unit_price".to_string(), "0".to_string()),
                (
                    "billingrails_account_id".to_string(),
                    "someone-else".to_string(),
                ),
            ]),
        }
    }

    #[test]
    fn batch_body_snapshot() {
        let mapper = EventMapper::new(&config()).unwrap();
        let events: Vec<Vec<u8>> = [
            usage("evt_1", "12.50", true),
            usage("evt_2", "0.000000000000000000000000001", false),
        ]
        .iter()
        .map(|u| mapper.event_bytes(u))
        .collect();
        let body = batch_body(events.iter().map(Vec::as_slice));
        let text = String::from_utf8(body.clone()).unwrap();
        // Exact decimals on the wire: the digits, not a binary float's approximation.
        assert!(text.contains(r#""quantity":12.5,"#), "{text}");
        assert!(text.contains(r#""quantity":0.000000000000000000000000001,"#));
        assert!(text.contains(r#""unit_price":0.0015}"#));
        let value: Value = serde_json::from_slice(&body).unwrap();
        // Pretty-printed by serde_json itself: insta's JSON serializer would show the exact
        // numbers in serde_json's private arbitrary-precision form.
        insta::assert_snapshot!(serde_json::to_string_pretty(&value).unwrap());
    }

    #[test]
    fn unconfigured_override_properties_are_not_sent() {
        let mapper = EventMapper::new(&BillingrailsConfig::default()).unwrap();
        let event = mapper.event(&usage("evt_1", "3", true));
        let properties = event["properties"].as_object().unwrap();
        assert!(!properties.contains_key("description"));
        // Not owned without price_property: an ordinary attribute.
        assert_eq!(properties["unit_price"], "0");
        assert_eq!(properties["billingrails_account_id"], "acme-prod");
        assert_eq!(event["event_name"], "api_calls");
    }

    #[test]
    fn request_key_follows_the_content() {
        let a = request_key("/events/batch", b"{\"events\":[1]}");
        assert_eq!(a, request_key("/events/batch", b"{\"events\":[1]}"));
        assert_ne!(a, request_key("/events/batch", b"{\"events\":[2]}"));
        assert_ne!(a, request_key("/events/ingest", b"{\"events\":[1]}"));
        assert!(a.len() <= MAX_REQUEST_KEY_LEN);
        assert!(a.starts_with("mfr1-"));
    }

    #[test]
    fn event_keys_are_the_per_event_delivery_keys() {
        let mapper = EventMapper::new(&config()).unwrap();
        let event = mapper.event(&usage("evt_9", "1", false));
        assert_eq!(
            event["idempotency_key"],
            DeliveryKey::for_event("evt_9").as_str()
        );
        assert_eq!(event["timestamp"], "2026-11-20T10:15:00.123Z");
    }
}
