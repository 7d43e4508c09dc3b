//! The body of `POST /api/v1/contracts/{contractId}/usage`, read the way billwerk reads it:
//! property names case-insensitive (billwerk's own client relies on that), decimals exact.
//! Pure: bytes in, a validated request or the error billwerk would answer out.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::timestamp;

/// A validated usage request.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRequest {
    pub component_id: String,
    pub quantity: Decimal,
    /// `None` when the request left it out; the record then falls due when it is transferred.
    pub due_date: Option<DateTime<Utc>>,
    pub memo: Option<String>,
    pub product_override: Option<ProductOverride>,
}

/// billwerk's `ProductOverride`: price (currency units, not cents) and texts per usage record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductOverride {
    /// Exact decimal; shown as a decimal string by the inspection API.
    pub price_per_unit: Option<Decimal>,
    pub name: Option<String>,
    pub description: Option<String>,
}

/// Why billwerk refuses a usage body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageBodyError {
    /// 400: the body cannot be bound at all (not JSON, or not a JSON object).
    Unreadable(String),
    /// 422: a field is missing or invalid; the message names it.
    InvalidField { field: String, message: String },
}

impl UsageBodyError {
    fn invalid(field: &str, message: impl Into<String>) -> Self {
        UsageBodyError::InvalidField {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

pub fn parse(body: &[u8]) -> Result<UsageRequest, UsageBodyError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|error| UsageBodyError::Unreadable(format!("The request is invalid: {error}")))?;
    let Value::Object(object) = value else {
        return Err(UsageBodyError::Unreadable(
            "The request is invalid: the body must be a JSON object".to_string(),
        ));
    };

    let component_id = match property(&object, "ComponentId") {
        None | Some(Value::Null) => {
            return Err(UsageBodyError::invalid(
                "ComponentId",
                "ComponentId is required",
            ))
        }
        Some(Value::String(id)) if id.trim().is_empty() => {
            return Err(UsageBodyError::invalid(
                "ComponentId",
                "ComponentId is required",
            ))
        }
        Some(Value::String(id)) => id.clone(),
        Some(_) => {
            return Err(UsageBodyError::invalid(
                "ComponentId",
                "ComponentId must be a string",
            ))
        }
    };

    let quantity = match property(&object, "Quantity") {
        None | Some(Value::Null) => {
            return Err(UsageBodyError::invalid("Quantity", "Quantity is required"))
        }
        Some(value) => exact_decimal(value).map_err(|problem| {
            UsageBodyError::invalid("Quantity", format!("Quantity {problem}"))
        })?,
    };

    let due_date = match property(&object, "DueDate") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(timestamp::parse(text).ok_or_else(|| {
            UsageBodyError::invalid(
                "DueDate",
                format!("DueDate '{text}' is not a valid ISO 8601 date"),
            )
        })?),
        Some(_) => {
            return Err(UsageBodyError::invalid(
                "DueDate",
                "DueDate must be an ISO 8601 date string",
            ))
        }
    };

    let memo = optional_string(&object, "Memo", "Memo")?;

    let product_override = match property(&object, "ProductOverride") {
        None | Some(Value::Null) => None,
        Some(Value::Object(inner)) => Some(ProductOverride {
            price_per_unit: match property(inner, "PricePerUnit") {
                None | Some(Value::Null) => None,
                Some(value) => Some(exact_decimal(value).map_err(|problem| {
                    UsageBodyError::invalid(
                        "ProductOverride.PricePerUnit",
                        format!("ProductOverride.PricePerUnit {problem}"),
                    )
                })?),
            },
            name: optional_string(inner, "Name", "ProductOverride.Name")?,
            description: optional_string(inner, "Description", "ProductOverride.Description")?,
        }),
        Some(_) => {
            return Err(UsageBodyError::invalid(
                "ProductOverride",
                "ProductOverride must be an object",
            ))
        }
    };

    Ok(UsageRequest {
        component_id,
        quantity,
        due_date,
        memo,
        product_override,
    })
}

/// A property by case-insensitive name; with several spellings present the last one wins.
fn property<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value)
        .next_back()
}

fn optional_string(
    object: &Map<String, Value>,
    name: &str,
    field: &str,
) -> Result<Option<String>, UsageBodyError> {
    match property(object, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(UsageBodyError::invalid(
            field,
            format!("{field} must be a string"),
        )),
    }
}

/// A JSON number or numeric string as an exact decimal. `serde_json`'s `arbitrary_precision`
/// keeps the number's text, so nothing passes through binary floating point.
pub fn exact_decimal(value: &Value) -> Result<Decimal, &'static str> {
    let text = match value {
        Value::Number(number) => number.to_string(),
        Value::String(text) => text.trim().to_string(),
        _ => return Err("must be a decimal number"),
    };
    let parsed = if text.contains(['e', 'E']) {
        Decimal::from_scientific(&text)
    } else {
        Decimal::from_str_exact(&text)
    };
    parsed.map_err(|_| "must be a decimal number (at most 28 significant digits)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(error: UsageBodyError) -> String {
        match error {
            UsageBodyError::InvalidField { field, .. } => field,
            UsageBodyError::Unreadable(message) => panic!("expected a field error, got {message}"),
        }
    }

    #[test]
    fn reads_the_documented_example() {
        let body = br#"{ "ComponentId": "5ce53069443e551b9caccc64", "Quantity": 1,
            "DueDate": "2019-05-21T06:11:34.0000000Z", "Memo": "mf1-abc",
            "ProductOverride": { "PricePerUnit": 100, "Name": "MeteredUsage2.0",
                                 "Description": "Hey, I'm an overridden metered usage" } }"#;
        let request = parse(body).unwrap();
        assert_eq!(request.component_id, "5ce53069443e551b9caccc64");
        assert_eq!(request.quantity, Decimal::ONE);
        assert_eq!(
            timestamp::format(request.due_date.unwrap()),
            "2019-05-21T06:11:34.0000000Z"
        );
        assert_eq!(request.memo.as_deref(), Some("mf1-abc"));
        let product_override = request.product_override.unwrap();
        assert_eq!(product_override.price_per_unit, Some(Decimal::from(100)));
        assert_eq!(product_override.name.as_deref(), Some("MeteredUsage2.0"));
    }

    #[test]
    fn property_names_are_case_insensitive() {
        let body = br#"{"componentid":"c1","QUANTITY":"2.50","productOverride":{"priceperunit":"0.0001"}}"#;
        let request = parse(body).unwrap();
        assert_eq!(request.component_id, "c1");
        assert_eq!(request.quantity.to_string(), "2.50");
        assert_eq!(
            request
                .product_override
                .unwrap()
                .price_per_unit
                .unwrap()
                .to_string(),
            "0.0001"
        );
    }

    #[test]
    fn decimals_stay_exact() {
        let body = br#"{"ComponentId":"c","Quantity":0.1}"#;
        assert_eq!(parse(body).unwrap().quantity, Decimal::new(1, 1));
        let body = br#"{"ComponentId":"c","Quantity":12345678901234567890.12345678}"#;
        assert_eq!(
            parse(body).unwrap().quantity.to_string(),
            "12345678901234567890.12345678"
        );
        // More digits than a decimal holds is refused rather than silently rounded.
        let body = br#"{"ComponentId":"c","Quantity":0.1000000000000000055511151231257827}"#;
        assert_eq!(field_of(parse(body).unwrap_err()), "Quantity");
        let body = br#"{"ComponentId":"c","Quantity":1e3}"#;
        assert_eq!(parse(body).unwrap().quantity, Decimal::from(1000));
    }

    #[test]
    fn names_the_bad_field() {
        let cases: [(&[u8], &str); 8] = [
            (br#"{"Quantity":1}"#, "ComponentId"),
            (br#"{"ComponentId":"","Quantity":1}"#, "ComponentId"),
            (br#"{"ComponentId":5,"Quantity":1}"#, "ComponentId"),
            (br#"{"ComponentId":"c"}"#, "Quantity"),
            (br#"{"ComponentId":"c","Quantity":"lots"}"#, "Quantity"),
            (
                br#"{"ComponentId":"c","Quantity":1,"DueDate":"soon"}"#,
                "DueDate",
            ),
            (
                br#"{"ComponentId":"c","Quantity":1,"ProductOverride":{"PricePerUnit":"free"}}"#,
                "ProductOverride.PricePerUnit",
            ),
            (br#"{"ComponentId":"c","Quantity":1,"Memo":7}"#, "Memo"),
        ];
        for (body, field) in cases {
            assert_eq!(
                field_of(parse(body).unwrap_err()),
                field,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn unreadable_bodies_are_not_field_errors() {
        assert!(matches!(
            parse(b"{not json"),
            Err(UsageBodyError::Unreadable(_))
        ));
        assert!(matches!(parse(b"[1]"), Err(UsageBodyError::Unreadable(_))));
    }
}
