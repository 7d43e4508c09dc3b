//! Reading Billingrails' answers: what each status means for the events sent, and which events a
//! refusal names. Pure.
//!
//! Errors are `{"error":{"type","code","message","details":[{"field","message"}]}}`
//! (billing-apis.md §2). A batch is all-or-nothing: one invalid event refuses the whole batch,
//! and `details` fields like `events[3].timestamp` say which event — when they are there.

use std::collections::BTreeMap;

use reqwest::StatusCode;
use serde::Deserialize;

use crate::deliver::http::truncate;
use crate::deliver::{Attempt, RetryCause};

/// What one answer means.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// 2xx: every event of the request is queued.
    Accepted { receipt: Option<String> },
    /// A permanent refusal of the request (400, 422 and other client errors).
    Refused(Refusal),
    /// Worth sending again.
    Retry(Attempt),
}

/// A refused request: the status, the parsed error and the raw body for the dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub code: Option<String>,
    pub message: Option<String>,
    pub details: Vec<FieldProblem>,
    /// `"422 {...}"`: what the dead letter keeps as the provider's answer.
    pub provider_answer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FieldProblem {
    #[serde(default)]
    pub field: String,
    #[serde(default)]
    pub message: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    details: Vec<FieldProblem>,
}

#[derive(Deserialize)]
struct Queued {
    #[serde(default)]
    meta: Option<Meta>,
}

#[derive(Deserialize)]
struct Meta {
    #[serde(default)]
    request_id: Option<String>,
}

/// Classifies one HTTP answer.
pub fn classify(status: StatusCode, body: &str) -> Answer {
    if status.is_success() {
        // Ingestion is asynchronous: the answer carries no event ids. Keep a request id if any.
        let receipt = serde_json::from_str::<Queued>(body)
            .ok()
            .and_then(|q| q.meta)
            .and_then(|m| m.request_id);
        return Answer::Accepted { receipt };
    }
    let detail = format!("HTTP {status}: {}", truncate(body, 300));
    let retry = |cause, outcome_unknown| {
        Answer::Retry(Attempt::Retry {
            cause,
            outcome_unknown,
            detail: detail.clone(),
        })
    };
    match status.as_u16() {
        // API keys cannot be refreshed: every sender pauses (the runner's answer to
        // Unauthorized) until the key is fixed.
        401 => retry(RetryCause::Unauthorized, false),
        403 => retry(RetryCause::Forbidden, false),
        // A 404 cannot be about an event: the base URL or a path is wrong. Dead-lettering every
        // event for it would empty the topic into the DLQ; waiting keeps them in order.
        404 => Answer::Retry(Attempt::Retry {
            cause: RetryCause::ServerError,
            outcome_unknown: false,
            detail: format!(
                "{detail} (check sink.base_url, sink.billingrails.ingest_path and batch_path)"
            ),
        }),
        408 => retry(RetryCause::Timeout, true),
        // The key is derived from the body, so a 409 is "a request with this key is still being
        // processed" (our own earlier attempt): wait and ask again to get its answer replayed.
        409 => retry(RetryCause::Conflict, true),
        429 => retry(RetryCause::Throttled, false),
        // Billingrails' own clients retry 500/502/503/504. The events may have been queued;
        // re-sending is safe because every event carries its idempotency_key.
        500..=599 => retry(RetryCause::ServerError, true),
        _ => {
            let parsed = serde_json::from_str::<ErrorBody>(body)
                .ok()
                .map(|b| b.error);
            let (code, message, details) = match parsed {
                Some(e) => (e.code, e.message, e.details),
                None => (None, None, Vec::new()),
            };
            Answer::Refused(Refusal {
                status: status.as_u16(),
                code,
                message,
                details,
                provider_answer: format!("{} {}", status.as_u16(), truncate(body, 2000)),
            })
        }
    }
}

impl Refusal {
    /// The events of a batch of `len` that the details name, with what they say about each
    /// (`events[3].timestamp` → 3: "timestamp: ..."). Empty when no detail names an event: the
    /// refused ones must then be found by bisection.
    pub fn named_events(&self, len: usize) -> BTreeMap<usize, Vec<String>> {
        let mut named: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for problem in &self.details {
            if let Some((index, field)) = event_index(&problem.field) {
                if index < len {
                    named
                        .entry(index)
                        .or_default()
                        .push(describe(field, &problem.message));
                }
            }
        }
        named
    }

    /// Why a single event (sent alone) was refused, every detail included.
    pub fn reason(&self) -> String {
        let mut text = format!(
            "Billingrails answered {}{}",
            self.status,
            self.code
                .as_deref()
                .map(|c| format!(" {c}"))
                .unwrap_or_default()
        );
        if let Some(m) = &self.message {
            text.push_str(": ");
            text.push_str(m);
        }
        let details: Vec<String> = self
            .details
            .iter()
            .map(|p| {
                let field = event_index(&p.field).map_or(p.field.as_str(), |(_, f)| f);
                describe(field, &p.message)
            })
            .collect();
        if !details.is_empty() {
            text.push_str(" (");
            text.push_str(&details.join("; "));
            text.push(')');
        }
        text
    }

    /// Why one event of a batch was refused, from what the details say of it.
    pub fn reason_for(&self, said: &[String]) -> String {
        format!(
            "Billingrails refused the batch for this event ({} {}): {}",
            self.status,
            self.code.as_deref().unwrap_or("refused"),
            said.join("; ")
        )
    }
}

/// `events[12].properties.x` → (12, `properties.x`); `events[3]` → (3, ``).
fn event_index(field: &str) -> Option<(usize, &str)> {
    let rest = field.strip_prefix("events[")?;
    let close = rest.find(']')?;
    let index = rest[..close].parse().ok()?;
    let after = &rest[close + 1..];
    Some((index, after.strip_prefix('.').unwrap_or(after)))
}

fn describe(field: &str, message: &str) -> String {
    match (field.is_empty(), message.is_empty()) {
        (true, _) => message.to_string(),
        (false, true) => field.to_string(),
        (false, false) => format!("{field} {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(body: &str) -> Refusal {
        match classify(StatusCode::UNPROCESSABLE_ENTITY, body) {
            Answer::Refused(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn details_name_the_refused_events() {
        let r = refusal(
            r#"{"error":{"type":"request_error","code":"validation_failed","message":"The batch was rejected: no event was stored.",
                "details":[{"field":"events[3].timestamp","message":"'noon' is not an ISO 8601 timestamp"},
                           {"field":"events[3].properties.region","message":"is required"},
                           {"field":"events[0]","message":"must be an object"},
                           {"field":"events[250].event_name","message":"out of range, ignored"},
                           {"field":"events","message":"batch-level, names no event"}]}}"#,
        );
        let named = r.named_events(100);
        assert_eq!(named.keys().copied().collect::<Vec<_>>(), vec![0, 3]);
        assert_eq!(
            named[&3],
            vec![
                "timestamp 'noon' is not an ISO 8601 timestamp".to_string(),
                "properties.region is required".to_string()
            ]
        );
        assert_eq!(named[&0], vec!["must be an object".to_string()]);
        assert!(r
            .reason_for(&named[&3])
            .starts_with("Billingrails refused the batch for this event (422 validation_failed)"));
        assert!(r.provider_answer.starts_with("422 {"));
    }

    #[test]
    fn a_refusal_without_details_names_nothing() {
        for body in [
            r#"{"error":{"type":"request_error","code":"validation_failed","message":"invalid"}}"#,
            r#"{"error":{"code":"x","details":[{"field":"events","message":"too many"}]}}"#,
            "Bad Request",
            "",
        ] {
            assert!(refusal(body).named_events(10).is_empty(), "{body}");
        }
    }

    #[test]
    fn a_single_event_reason_keeps_every_detail() {
        let r = refusal(
            r#"{"error":{"code":"validation_failed","message":"The event is invalid.","details":[{"field":"properties.region","message":"is required"}]}}"#,
        );
        assert_eq!(
            r.reason(),
            "Billingrails answered 422 validation_failed: The event is invalid. (properties.region is required)"
        );
    }

    #[test]
    fn statuses_map_to_what_to_do() {
        let kind = |status: u16| match classify(StatusCode::from_u16(status).unwrap(), "{}") {
            Answer::Accepted { .. } => "accepted".to_string(),
            Answer::Refused(_) => "refused".to_string(),
            Answer::Retry(Attempt::Retry {
                cause,
                outcome_unknown,
                ..
            }) => format!(
                "{}{}",
                cause.as_str(),
                if outcome_unknown { "?" } else { "" }
            ),
            Answer::Retry(other) => panic!("{other:?}"),
        };
        assert_eq!(kind(202), "accepted");
        assert_eq!(kind(200), "accepted");
        assert_eq!(kind(400), "refused");
        assert_eq!(kind(422), "refused");
        assert_eq!(kind(413), "refused");
        assert_eq!(kind(401), "unauthorized");
        assert_eq!(kind(403), "forbidden");
        assert_eq!(kind(404), "server_error");
        assert_eq!(kind(409), "conflict?");
        assert_eq!(kind(429), "throttled");
        assert_eq!(kind(500), "server_error?");
        assert_eq!(kind(503), "server_error?");
    }

    #[test]
    fn receipt_is_the_request_id_when_given() {
        assert_eq!(
            classify(
                StatusCode::ACCEPTED,
                r#"{"message":"Event queued for processing","meta":{"request_id":"req_1"}}"#
            ),
            Answer::Accepted {
                receipt: Some("req_1".into())
            }
        );
        assert_eq!(
            classify(
                StatusCode::ACCEPTED,
                r#"{"message":"Event queued for processing"}"#
            ),
            Answer::Accepted { receipt: None }
        );
    }
}
