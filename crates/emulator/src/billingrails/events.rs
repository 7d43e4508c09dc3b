//! Billingrails events as sent to `/events/ingest` (one) and `/events/batch` (at most 100,
//! all-or-nothing). Pure: JSON in, valid events or every problem, each naming its field.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A valid incoming event.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingEvent {
    pub event_name: String,
    /// Numbers keep their exact text (`serde_json`'s `arbitrary_precision`).
    pub properties: Map<String, Value>,
    pub idempotency_key: Option<String>,
    /// `None` when left out: the event then happened when it was received.
    pub timestamp: Option<DateTime<Utc>>,
}

/// One entry of the error body's `details`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

impl FieldProblem {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldProblem {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The longest per-event idempotency key accepted (Billingrails documents none; 255 is common).
const MAX_EVENT_KEY_LEN: usize = 255;

/// What the events must carry beyond the documented shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventRules {
    /// Properties every event must have (the meter's account mapping, e.g.
    /// `billingrails_account_id`).
    pub required_properties: Vec<String>,
    pub max_batch: usize,
}

/// One event; `field_prefix` is `""` for `/ingest` and `"events[3]."` inside a batch.
pub fn validate_event(
    value: &Value,
    field_prefix: &str,
    rules: &EventRules,
) -> Result<IncomingEvent, Vec<FieldProblem>> {
    let field = |name: &str| format!("{field_prefix}{name}");
    let Value::Object(object) = value else {
        let whole = field_prefix.trim_end_matches('.');
        let whole = if whole.is_empty() { "body" } else { whole };
        return Err(vec![FieldProblem::new(whole, "must be an object")]);
    };
    let mut problems = Vec::new();

    let event_name = match object.get("event_name") {
        Some(Value::String(name)) if !name.trim().is_empty() => Some(name.clone()),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            problems.push(FieldProblem::new(field("event_name"), "is required"));
            None
        }
        Some(_) => {
            problems.push(FieldProblem::new(field("event_name"), "must be a string"));
            None
        }
    };

    let properties = match object.get("properties") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(properties)) => properties.clone(),
        Some(_) => {
            problems.push(FieldProblem::new(field("properties"), "must be an object"));
            Map::new()
        }
    };
    if matches!(
        object.get("properties"),
        None | Some(Value::Null) | Some(Value::Object(_))
    ) {
        for required in &rules.required_properties {
            if properties.get(required).is_none_or(Value::is_null) {
                problems.push(FieldProblem::new(
                    field(&format!("properties.{required}")),
                    "is required (the meter's account mapping)",
                ));
            }
        }
    }

    let idempotency_key = match object.get("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(key)) if !key.is_empty() && key.len() <= MAX_EVENT_KEY_LEN => {
            Some(key.clone())
        }
        Some(_) => {
            problems.push(FieldProblem::new(
                field("idempotency_key"),
                format!("must be a non-empty string of at most {MAX_EVENT_KEY_LEN} characters"),
            ));
            None
        }
    };

    let timestamp = match object.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => match DateTime::parse_from_rfc3339(text.trim()) {
            Ok(at) => Some(at.with_timezone(&Utc)),
            Err(_) => {
                problems.push(FieldProblem::new(
                    field("timestamp"),
                    format!("'{text}' is not an ISO 8601 timestamp with a time zone"),
                ));
                None
            }
        },
        Some(_) => {
            problems.push(FieldProblem::new(
                field("timestamp"),
                "must be an ISO 8601 timestamp string",
            ));
            None
        }
    };

    match event_name {
        Some(event_name) if problems.is_empty() => Ok(IncomingEvent {
            event_name,
            properties,
            idempotency_key,
            timestamp,
        }),
        _ => Err(problems),
    }
}

/// `{"events": [...]}`: every event valid, or every problem of every event.
pub fn validate_batch(
    value: &Value,
    rules: &EventRules,
) -> Result<Vec<IncomingEvent>, Vec<FieldProblem>> {
    let events = match value.get("events") {
        Some(Value::Array(events)) => events,
        Some(_) => return Err(vec![FieldProblem::new("events", "must be an array")]),
        None => return Err(vec![FieldProblem::new("events", "is required")]),
    };
    if events.is_empty() {
        return Err(vec![FieldProblem::new(
            "events",
            "must contain at least one event",
        )]);
    }
    if events.len() > rules.max_batch {
        return Err(vec![FieldProblem::new(
            "events",
            format!(
                "must contain at most {} events, got {}",
                rules.max_batch,
                events.len()
            ),
        )]);
    }
    let mut valid = Vec::with_capacity(events.len());
    let mut problems = Vec::new();
    for (position, event) in events.iter().enumerate() {
        match validate_event(event, &format!("events[{position}]."), rules) {
            Ok(event) => valid.push(event),
            Err(event_problems) => problems.extend(event_problems),
        }
    }
    if problems.is_empty() {
        Ok(valid)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> EventRules {
        EventRules {
            required_properties: vec![],
            max_batch: 100,
        }
    }

    fn fields(problems: Vec<FieldProblem>) -> Vec<String> {
        problems.into_iter().map(|problem| problem.field).collect()
    }

    #[test]
    fn reads_a_documented_event() {
        let event = json!({"event_name": "api_call", "properties": {"billingrails_account_id": "acc_1", "value": 2.5},
                           "idempotency_key": "k1", "timestamp": "2026-01-01T10:00:00+01:00"});
        let event = validate_event(&event, "", &rules()).unwrap();
        assert_eq!(event.event_name, "api_call");
        assert_eq!(event.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(
            event.timestamp.unwrap().to_rfc3339(),
            "2026-01-01T09:00:00+00:00"
        );
        assert_eq!(event.properties["value"].to_string(), "2.5");
    }

    #[test]
    fn names_every_bad_field() {
        let event =
            json!({"event_name": "", "properties": [], "idempotency_key": 5, "timestamp": "noon"});
        let problems = validate_event(&event, "", &rules()).unwrap_err();
        assert_eq!(
            fields(problems),
            ["event_name", "properties", "idempotency_key", "timestamp"]
        );
        let not_an_object = validate_event(&json!(3), "events[2].", &rules()).unwrap_err();
        assert_eq!(fields(not_an_object), ["events[2]"]);
    }

    #[test]
    fn required_properties_are_enforced() {
        let rules = EventRules {
            required_properties: vec!["billingrails_account_id".into()],
            max_batch: 100,
        };
        let event = json!({"event_name": "e", "properties": {"other": 1}});
        let problems = validate_event(&event, "", &rules).unwrap_err();
        assert_eq!(fields(problems), ["properties.billingrails_account_id"]);
    }

    #[test]
    fn a_batch_is_all_or_nothing_and_names_each_bad_event() {
        let good = json!({"event_name": "e"});
        let batch = json!({"events": [good, {"event_name": "e", "timestamp": "x"}, good, {}]});
        let problems = validate_batch(&batch, &rules()).unwrap_err();
        assert_eq!(
            fields(problems),
            ["events[1].timestamp", "events[3].event_name"]
        );
        let batch = json!({"events": [good, good]});
        assert_eq!(validate_batch(&batch, &rules()).unwrap().len(), 2);
    }

    #[test]
    fn a_batch_has_one_to_max_events() {
        let small = EventRules {
            required_properties: vec![],
            max_batch: 2,
        };
        let good = json!({"event_name": "e"});
        assert_eq!(
            fields(validate_batch(&json!({"events": []}), &small).unwrap_err()),
            ["events"]
        );
        let three = json!({"events": [good, good, good]});
        assert_eq!(
            fields(validate_batch(&three, &small).unwrap_err()),
            ["events"]
        );
        assert_eq!(
            fields(validate_batch(&json!({}), &small).unwrap_err()),
            ["events"]
        );
    }
}
