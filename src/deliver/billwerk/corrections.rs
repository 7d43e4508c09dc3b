//! Taking usage back at billwerk (`meterflow void`): `DELETE /api/v1/contracts/{id}/usage/{usageId}`,
//! which billwerk allows only while the usage is unbilled. Through the sink's one door (token,
//! legal entity, the provider client's pacing), like a delivery.

use std::time::Duration;

use reqwest::StatusCode;

use super::{api_url, error_message, BillwerkSink, Contract};
use crate::deliver::http::truncate;
use crate::event::{is_billwerk_contract_id, CustomerRef};

/// How many answers that may succeed later (429, 5xx, no answer) a deletion sits through.
const DELETE_ATTEMPTS: u32 = 6;

/// What billwerk did with a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    /// Deleted (2xx).
    Deleted,
    /// Not there (404): never there under this contract, or deleted earlier. `after_unknown`:
    /// an earlier attempt of this deletion got no answer, so it may have deleted it.
    NotFound {
        after_unknown: bool,
        message: String,
    },
    /// Refused for good (another 4xx): billwerk deletes only unbilled usage. `billed`: the
    /// answer says the usage is billed (billwerk documents no shape for this answer).
    Refused {
        status: u16,
        message: String,
        billed: bool,
    },
}

impl BillwerkSink {
    /// billwerk's contract id for `customer` (looked up by external id when needed).
    pub async fn contract_id(&self, customer: &CustomerRef) -> Result<String, String> {
        match self.resolve(customer).await {
            Ok(Contract::Id(id)) => Ok(id),
            Ok(Contract::Unknown(rejection)) => Err(rejection.detail),
            Err(attempt) => Err(format!("contract lookup failed: {attempt:?}")),
        }
    }

    /// Deletes usage record `usage_id` of `contract_id` (both checked to be 24 hexadecimal
    /// characters before they go into the path).
    pub async fn delete_usage(
        &self,
        contract_id: &str,
        usage_id: &str,
    ) -> Result<Deletion, String> {
        if !is_billwerk_contract_id(contract_id) || !is_billwerk_contract_id(usage_id) {
            return Err(format!(
                "not deleting: contract id {:?} and usage id {:?} must both be 24 hexadecimal \
                 characters",
                crate::decode::truncate_chars(contract_id, 100),
                crate::decode::truncate_chars(usage_id, 100)
            ));
        }
        let mut unknown = false;
        let mut last_failure = String::new();
        for attempt in 0..DELETE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200u64 << attempt.min(5))).await;
            }
            let answer = self
                .call("usage_delete", None, |c, api| {
                    c.delete(api_url(api, &["contracts", contract_id, "usage", usage_id]))
                })
                .await;
            let (status, body) = match answer {
                Ok(answer) => (answer.status, answer.body),
                Err(e) => {
                    // No answer (or a status without its body): the deletion may have happened.
                    unknown = true;
                    last_failure = format!("{:?}", e.into_attempt());
                    continue;
                }
            };
            let message = error_message(&body);
            match status.as_u16() {
                200..=299 => return Ok(Deletion::Deleted),
                404 => {
                    return Ok(Deletion::NotFound {
                        after_unknown: unknown,
                        message,
                    })
                }
                401 | 403 => {
                    return Err(format!(
                        "billwerk answered {status}: check sink.client_id / sink.client_secret \
                         (and sink.legal_entity_id): {}",
                        truncate(&message, 300)
                    ))
                }
                429 => last_failure = format!("billwerk answered {status} (rate limit)"),
                500..=599 => {
                    unknown = true;
                    last_failure = format!("billwerk answered {status}: {}", truncate(&body, 300));
                }
                code => {
                    let lower = message.to_ascii_lowercase();
                    let billed = lower.contains("billed") || lower.contains("invoiced");
                    return Ok(Deletion::Refused {
                        status: code,
                        message: truncate(&message, 500).to_string(),
                        billed,
                    });
                }
            }
        }
        Err(format!(
            "no answer to the deletion after {DELETE_ATTEMPTS} attempts ({last_failure}); \
             run the command again (it is safe: a second deletion of the same record answers 404)"
        ))
    }
}

/// One usage record of billwerk's listing, bounded: what `meterflow audit` compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedUsage {
    pub id: String,
    pub component_id: String,
    /// Exact: read from the number's own digits (never through `f64`).
    pub quantity: Option<rust_decimal::Decimal>,
    pub memo: Option<String>,
    /// billwerk's `TransferredAt` (creation time), when readable.
    pub transferred_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Most records one audit reads (a bound on memory: 2 000 pages of 500).
const MAX_LISTED: usize = 1_000_000;

impl BillwerkSink {
    /// Every usage record of `contract_id` created from `from` until `until` (billwerk's
    /// creation-time filters), page after page, each paced by the provider client.
    pub async fn list_usage(
        &self,
        contract_id: &str,
        from: chrono::DateTime<chrono::Utc>,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<ListedUsage>, String> {
        if !is_billwerk_contract_id(contract_id) {
            return Err(format!(
                "contract id {:?} is not 24 hexadecimal characters",
                crate::decode::truncate_chars(contract_id, 100)
            ));
        }
        let mut out = Vec::new();
        let listed = self
            .page_usage(
                contract_id,
                Some(super::payload::billwerk_timestamp(from)),
                Some(super::payload::billwerk_timestamp(until)),
                |page| {
                    out.extend(page.iter().map(listed_usage));
                    if out.len() >= MAX_LISTED {
                        super::Visit::Stop
                    } else {
                        super::Visit::More
                    }
                },
            )
            .await?;
        match listed {
            super::Listed::Complete => Ok(out),
            super::Listed::NoSuchContract => Err(format!(
                "billwerk knows no contract {contract_id} (the listing answered 404)"
            )),
            super::Listed::Stopped => Err(format!(
                "more than {MAX_LISTED} usage records in the period: audit a shorter one"
            )),
        }
    }

    /// The contract's `ExternalId` (`GET /api/v1/contracts/{id}`), if it has one: events may
    /// name it by that.
    pub async fn external_id_of(&self, contract_id: &str) -> Result<Option<String>, String> {
        if !is_billwerk_contract_id(contract_id) {
            return Err(format!(
                "contract id {:?} is not 24 hexadecimal characters",
                crate::decode::truncate_chars(contract_id, 100)
            ));
        }
        let answer = self
            .call("contracts", None, |c, api| {
                c.get(api_url(api, &["contracts", contract_id]))
            })
            .await
            .map_err(|e| format!("{:?}", e.into_attempt()))?;
        let status = answer.status;
        if status == StatusCode::NOT_FOUND {
            return Err(format!("billwerk knows no contract {contract_id} (404)"));
        }
        if !status.is_success() {
            return Err(format!("reading contract {contract_id} answered {status}"));
        }
        let text = answer.body;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("unreadable contract answer: {e}"))?;
        Ok(super::field(&value, "ExternalId")
            .filter(|e| !e.is_empty())
            .map(|e| crate::decode::truncate_chars(e, crate::decode::MAX_ID_CHARS)))
    }
}

fn listed_usage(record: &serde_json::Value) -> ListedUsage {
    let text = |name: &str| super::field(record, name).map(|s| truncate(s, 1000).to_string());
    let quantity = record
        .as_object()
        .and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case("Quantity")))
        .and_then(|(_, v)| match v {
            serde_json::Value::Number(n) => exact_decimal(&n.to_string()),
            serde_json::Value::String(s) => exact_decimal(s),
            _ => None,
        });
    ListedUsage {
        id: text("Id").unwrap_or_default(),
        component_id: text("ComponentId").unwrap_or_default(),
        quantity,
        memo: text("Memo"),
        transferred_at: text("TransferredAt")
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&chrono::Utc)),
    }
}

/// A decimal from its digits, plain or with an exponent; `None` beyond `Decimal`'s range.
fn exact_decimal(text: &str) -> Option<rust_decimal::Decimal> {
    use std::str::FromStr;
    let text = text.trim();
    if text.len() > 100 {
        return None;
    }
    rust_decimal::Decimal::from_str(text)
        .or_else(|_| rust_decimal::Decimal::from_scientific(text))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_quantities_stay_exact() {
        let record: serde_json::Value = serde_json::from_str(
            r#"{"Id":"6b0e00000000000000000001","ComponentId":"c","Quantity":12345678901234567.123456789,"Memo":"mf1-x","TransferredAt":"2026-11-20T10:00:00.1230000Z"}"#,
        )
        .unwrap();
        let listed = listed_usage(&record);
        assert_eq!(
            listed.quantity.unwrap().to_string(),
            "12345678901234567.123456789"
        );
        assert!(listed.transferred_at.is_some());
        assert_eq!(
            exact_decimal("1e3").unwrap(),
            rust_decimal::Decimal::from(1000)
        );
        assert_eq!(exact_decimal("x"), None);
    }
}
