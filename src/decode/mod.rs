//! Raw message bytes → [`UsageEvent`], through the configured field mapping (JSON Pointers).
//! Pure: no I/O, no clock.
//!
//! Rules (each broken rule is a [`Rejection`] whose detail names the field, the pointer when it
//! is not the default one, the bad value truncated to 100 characters, and what was expected):
//! - the payload is a UTF-8 JSON object (`invalid_json`); fields not mapped are ignored;
//! - JSON `null` counts as absent, for every field;
//! - `id`: non-empty string or JSON number (kept as its text), at most 200 characters;
//! - exactly one of `contract_id` (string) and `contract_external_id` (string, or an integer kept
//!   as its text, since product ids often are numbers); for billwerk a `contract_id` is exactly
//!   24 hexadecimal characters (`invalid_contract_id`: it becomes part of the request path);
//! - `metric`: non-empty string;
//! - `quantity`: JSON number or decimal string, parsed exactly (no binary floating point), > 0,
//!   scientific notation accepted when the value fits a decimal with at most 28 decimal places;
//! - `timestamp`: RFC 3339 with any offset, normalised to UTC;
//! - `attributes`: optional object; strings as they are, numbers and booleans as their JSON
//!   text, arrays and objects as compact JSON, `null` values dropped;
//! - `price_per_unit`: optional, a JSON number or decimal string (policy is pricing's job).

// The pure core: no unchecked arithmetic or indexing on data (checked forms, `get`, iterators).
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;

use crate::config::{ConfigProblem, InputMapping, SinkKind};
use crate::event::{is_billwerk_contract_id, CustomerRef, RejectReason, Rejection, UsageEvent};

mod decimal;
mod window;
pub use crate::text::{compact_duration, truncate_chars};
pub use decimal::{parse_decimal, DecimalError};
pub use window::TimestampWindow;

#[cfg(test)]
mod tests;

/// The longest event id accepted (it becomes part of delivery keys and billwerk's `Memo`).
pub const MAX_ID_CHARS: usize = 200;

/// How much of a bad value a rejection detail quotes.
const SHOWN_VALUE_CHARS: usize = 100;

/// Decodes events with one field mapping; built once at startup.
#[derive(Debug, Clone)]
pub struct EventDecoder {
    mapping: InputMapping,
    fields: Fields,
    /// `contract_id` must be a billwerk contract id (24 hex characters).
    billwerk_contract_ids: bool,
}

/// The mapping's pointers, split into reference tokens once.
#[derive(Debug, Clone)]
struct Fields {
    id: Field,
    contract_id: Field,
    contract_external_id: Field,
    metric: Field,
    quantity: Field,
    timestamp: Field,
    attributes: Field,
    price_per_unit: Field,
}

/// One canonical field and where it is found.
#[derive(Debug, Clone)]
struct Field {
    name: &'static str,
    /// The pointer as configured, shown in details when it is not the default `/name`.
    pointer: String,
    /// `None`: not mapped (empty pointer), the field is always absent.
    tokens: Option<Box<[String]>>,
}

impl Field {
    fn new(name: &'static str, pointer: &str) -> Field {
        Field {
            name,
            pointer: pointer.to_string(),
            tokens: compile_pointer(pointer),
        }
    }

    /// The field's value; JSON `null` counts as absent.
    fn get<'v>(&self, root: &'v Value) -> Option<&'v Value> {
        let mut v = root;
        for token in self.tokens.as_deref()? {
            v = match v {
                Value::Object(map) => map.get(token.as_str())?,
                Value::Array(items) => items.get(array_index(token)?)?,
                _ => return None,
            };
        }
        (!v.is_null()).then_some(v)
    }

    /// `quantity` or `quantity (at /usage/qty)`.
    fn label(&self) -> String {
        if self.pointer.strip_prefix('/') == Some(self.name) {
            self.name.to_string()
        } else {
            format!("{} (at {})", self.name, self.pointer)
        }
    }

    fn missing(&self, expected: &str) -> Rejection {
        Rejection::new(
            RejectReason::MissingField,
            format!("{} is missing: expected {expected}", self.label()),
        )
    }

    fn invalid(&self, reason: RejectReason, value: &Value, problem: &str) -> Rejection {
        Rejection::new(
            reason,
            format!("{} {}: {problem}", self.label(), show(value)),
        )
    }
}

impl EventDecoder {
    /// Compiles the mapping's pointers once. The mapping is expected to have passed
    /// [`check_mapping`] (part of `Config::validate`); a malformed pointer finds nothing.
    pub fn new(mapping: InputMapping) -> Self {
        let fields = Fields {
            id: Field::new("id", &mapping.id),
            contract_id: Field::new("contract_id", &mapping.contract_id),
            contract_external_id: Field::new("contract_external_id", &mapping.contract_external_id),
            metric: Field::new("metric", &mapping.metric),
            quantity: Field::new("quantity", &mapping.quantity),
            timestamp: Field::new("timestamp", &mapping.timestamp),
            attributes: Field::new("attributes", &mapping.attributes),
            price_per_unit: Field::new("price_per_unit", &mapping.price_per_unit),
        };
        EventDecoder {
            mapping,
            fields,
            billwerk_contract_ids: false,
        }
    }

    /// A decoder with the sink's rules: for billwerk, a `contract_id` must be 24 hexadecimal
    /// characters (Billingrails account ids have no fixed shape and only travel in the body).
    pub fn for_sink(mapping: InputMapping, sink: SinkKind) -> Self {
        EventDecoder {
            billwerk_contract_ids: sink == SinkKind::Billwerk,
            ..Self::new(mapping)
        }
    }

    pub fn mapping(&self) -> &InputMapping {
        &self.mapping
    }

    /// The event id of a payload that may fail [`EventDecoder::decode`], when it has one that
    /// decoding would accept (a non-empty string or a number of at most [`MAX_ID_CHARS`]).
    pub fn event_id(&self, payload: &[u8]) -> Option<String> {
        let root: Value = serde_json::from_slice(payload).ok()?;
        let id = match self.fields.id.get(&root)? {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        (!id.is_empty() && id.chars().count() <= MAX_ID_CHARS).then_some(id)
    }

    /// Decodes and validates one message payload.
    pub fn decode(&self, payload: &[u8]) -> Result<UsageEvent, Rejection> {
        let root: Value = serde_json::from_slice(payload).map_err(|e| {
            Rejection::new(
                RejectReason::InvalidJson,
                format!("the payload is not UTF-8 JSON: {e}"),
            )
        })?;
        if !root.is_object() {
            return Err(Rejection::new(
                RejectReason::InvalidJson,
                format!(
                    "the payload is {} {}, expected a JSON object",
                    json_kind(&root),
                    show(&root)
                ),
            ));
        }
        let f = &self.fields;

        let id = match f.id.get(&root) {
            None => return Err(f.id.missing("the event's unique id (a non-empty string)")),
            Some(Value::String(s)) if s.is_empty() => {
                return Err(Rejection::new(
                    RejectReason::MissingField,
                    format!("{} is empty: expected the event's unique id", f.id.label()),
                ))
            }
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(v) => {
                return Err(f.id.invalid(
                    RejectReason::InvalidField,
                    v,
                    &format!("is {}, expected a string or a number", json_kind(v)),
                ))
            }
        };
        let id_chars = id.chars().count();
        if id_chars > MAX_ID_CHARS {
            return Err(Rejection::new(
                RejectReason::InvalidField,
                format!(
                    "{} {:?} is {id_chars} characters long, expected at most {MAX_ID_CHARS}",
                    f.id.label(),
                    truncate_chars(&id, SHOWN_VALUE_CHARS)
                ),
            ));
        }

        let customer = match (f.contract_id.get(&root), f.contract_external_id.get(&root)) {
            (Some(a), Some(b)) => {
                return Err(Rejection::new(
                    RejectReason::InvalidField,
                    format!(
                        "both {} {} and {} {} are set, expected exactly one",
                        f.contract_id.label(),
                        show(a),
                        f.contract_external_id.label(),
                        show(b)
                    ),
                ))
            }
            (None, None) => {
                return Err(Rejection::new(
                    RejectReason::MissingField,
                    format!(
                        "neither {} nor {} is set, expected exactly one",
                        f.contract_id.label(),
                        f.contract_external_id.label()
                    ),
                ))
            }
            (Some(v), None) => {
                let id = required_string(&f.contract_id, v, "billwerk's contract id (a string)")?;
                if self.billwerk_contract_ids && !is_billwerk_contract_id(&id) {
                    return Err(f.contract_id.invalid(
                        RejectReason::InvalidContractId,
                        v,
                        "is not a billwerk contract id, expected exactly 24 hexadecimal \
                         characters like \"5cd186af443e551fe8e4f5dd\" (use contract_external_id \
                         for the product's own ids)",
                    ));
                }
                CustomerRef::ContractId(id)
            }
            (None, Some(Value::Number(n))) if n.is_u64() || n.is_i64() => {
                CustomerRef::ExternalId(n.to_string())
            }
            (None, Some(v)) => CustomerRef::ExternalId(required_string(
                &f.contract_external_id,
                v,
                "the product's own contract id (a string)",
            )?),
        };

        let metric = match f.metric.get(&root) {
            None => return Err(f.metric.missing("the metric name (a non-empty string)")),
            Some(v) => required_string(&f.metric, v, "the metric name (a non-empty string)")?,
        };

        let quantity = match f.quantity.get(&root) {
            None => return Err(f.quantity.missing("a decimal quantity > 0")),
            Some(v) => {
                let q = decimal_value(v).map_err(|why| {
                    f.quantity.invalid(
                        RejectReason::InvalidQuantity,
                        v,
                        &format!(
                            "{why}, expected a decimal > 0 as a JSON number or string \
                             (like 12.5 or \"12.5\")"
                        ),
                    )
                })?;
                if q <= Decimal::ZERO {
                    return Err(f.quantity.invalid(
                        RejectReason::InvalidQuantity,
                        v,
                        "is not > 0, expected a positive quantity",
                    ));
                }
                q
            }
        };

        let timestamp = match f.timestamp.get(&root) {
            None => {
                return Err(f
                    .timestamp
                    .missing("an RFC 3339 time like 2026-11-20T10:15:00Z"))
            }
            Some(v) => parse_timestamp(v).ok_or_else(|| {
                f.timestamp.invalid(
                    RejectReason::InvalidTimestamp,
                    v,
                    "is not an RFC 3339 time, expected e.g. \"2026-11-20T10:15:00Z\" or \
                     \"2026-11-20T11:15:00+01:00\"",
                )
            })?,
        };

        let attributes = match f.attributes.get(&root) {
            None => BTreeMap::new(),
            Some(Value::Object(map)) => flatten_attributes(map),
            Some(v) => {
                return Err(f.attributes.invalid(
                    RejectReason::InvalidField,
                    v,
                    &format!("is {}, expected a JSON object", json_kind(v)),
                ))
            }
        };

        let price_per_unit = match f.price_per_unit.get(&root) {
            None => None,
            Some(v) => Some(decimal_value(v).map_err(|why| {
                f.price_per_unit.invalid(
                    RejectReason::InvalidField,
                    v,
                    &format!("{why}, expected a decimal price as a JSON number or string"),
                )
            })?),
        };

        Ok(UsageEvent {
            id,
            customer,
            metric,
            quantity,
            timestamp,
            attributes,
            price_per_unit,
        })
    }
}

fn required_string(field: &Field, v: &Value, expected: &str) -> Result<String, Rejection> {
    match v {
        Value::String(s) if s.is_empty() => Err(Rejection::new(
            RejectReason::MissingField,
            format!("{} is empty: expected {expected}", field.label()),
        )),
        Value::String(s) => Ok(s.clone()),
        v => Err(field.invalid(
            RejectReason::InvalidField,
            v,
            &format!("is {}, expected {expected}", json_kind(v)),
        )),
    }
}

/// A decimal from a JSON number (its exact text, thanks to `arbitrary_precision`) or string.
fn decimal_value(v: &Value) -> Result<Decimal, String> {
    let text = match v {
        Value::Number(n) => n.as_str(),
        Value::String(s) => s.as_str(),
        v => return Err(format!("is {}", json_kind(v))),
    };
    parse_decimal(text).map_err(|e| match e {
        DecimalError::Syntax => "is not a decimal number".to_string(),
        e => e.to_string(),
    })
}

fn parse_timestamp(v: &Value) -> Option<DateTime<Utc>> {
    let s = v.as_str()?;
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn flatten_attributes(map: &serde_json::Map<String, Value>) -> BTreeMap<String, String> {
    map.iter()
        .filter_map(|(k, v)| {
            let text = match v {
                Value::Null => return None,
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Array(_) | Value::Object(_) => v.to_string(),
            };
            Some((k.clone(), text))
        })
        .collect()
}

/// Splits an RFC 6901 pointer into unescaped reference tokens; `None` for the empty pointer
/// (the field is not mapped) and for a malformed one ([`check_mapping`] reports those).
fn compile_pointer(pointer: &str) -> Option<Box<[String]>> {
    if pointer_problem(pointer).is_some() || pointer.is_empty() {
        return None;
    }
    Some(
        pointer
            .strip_prefix('/')?
            .split('/')
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect(),
    )
}

/// RFC 6901 array index: `0` or digits without a leading zero.
fn array_index(token: &str) -> Option<usize> {
    if token.is_empty() || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    if !token.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    token.parse().ok()
}

/// What is wrong with a JSON Pointer, if anything.
fn pointer_problem(pointer: &str) -> Option<String> {
    if pointer.is_empty() {
        return None;
    }
    if !pointer.starts_with('/') {
        return Some(format!(
            "{pointer:?} is not a JSON Pointer: expected \"\" (not mapped) or a path starting \
             with `/`, like \"/meta/event_id\""
        ));
    }
    let bytes = pointer.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'~' && !matches!(bytes.get(i.saturating_add(1)), Some(b'0') | Some(b'1')) {
            return Some(format!(
                "{pointer:?} is not a JSON Pointer: `~` must be followed by 0 (for `~`) or 1 \
                 (for `/`)"
            ));
        }
    }
    None
}

/// Every problem with an `[input]` mapping, keyed `input.FIELD`. The decoder's own rules, so
/// `Config::validate` and the decoder never disagree.
pub fn check_mapping(mapping: &InputMapping) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    let fields: [(&str, &str, bool); 8] = [
        ("id", &mapping.id, true),
        ("contract_id", &mapping.contract_id, false),
        ("contract_external_id", &mapping.contract_external_id, false),
        ("metric", &mapping.metric, true),
        ("quantity", &mapping.quantity, true),
        ("timestamp", &mapping.timestamp, true),
        ("attributes", &mapping.attributes, false),
        ("price_per_unit", &mapping.price_per_unit, false),
    ];
    for (name, pointer, required) in fields {
        let key = format!("input.{name}");
        if let Some(message) = pointer_problem(pointer) {
            problems.push(ConfigProblem { key, message });
        } else if required && pointer.is_empty() {
            problems.push(ConfigProblem {
                key,
                message: format!(
                    "is empty, but every event needs a {name}: expected a JSON Pointer like \
                     \"/{name}\""
                ),
            });
        }
    }
    if mapping.contract_id.is_empty() && mapping.contract_external_id.is_empty() {
        problems.push(ConfigProblem {
            key: "input.contract_id".into(),
            message: "input.contract_id and input.contract_external_id are both empty: map at \
                      least one, or no event can name its contract"
                .into(),
        });
    }
    problems
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value as compact JSON, cut at [`SHOWN_VALUE_CHARS`] characters.
fn show(v: &Value) -> String {
    truncate_chars(&v.to_string(), SHOWN_VALUE_CHARS)
}
