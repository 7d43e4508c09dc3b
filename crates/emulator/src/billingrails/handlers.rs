//! Billingrails' HTTP surface: `PREFIX/events/ingest` and `PREFIX/events/batch`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{middleware, Router};
use chrono::Utc;
use serde::Serialize;
use serde_json::Value;

use super::events::{self, FieldProblem};
use super::idempotency::{self, CachedAnswer, Claim, Fingerprint};
use super::Billingrails;
use crate::control::{self, Control};
use crate::faults::{self, Fault};
use crate::{inspect, server};

#[derive(Clone)]
struct App {
    billingrails: Arc<Billingrails>,
    control: Arc<Control>,
}

pub fn router(prefix: &str, billingrails: Arc<Billingrails>, control: Arc<Control>) -> Router {
    let app = App {
        billingrails: billingrails.clone(),
        control: control.clone(),
    };
    Router::new()
        .route(&format!("{prefix}/events/ingest"), post(ingest))
        .route(&format!("{prefix}/events/batch"), post(batch))
        // Older clients used the /biller paths; Billingrails' docs still show them in places.
        .route(&format!("{prefix}/biller/events/ingest"), post(ingest))
        .route(&format!("{prefix}/biller/events/batch"), post(batch))
        .fallback(not_found)
        .with_state(app)
        .layer(middleware::from_fn_with_state(
            control.clone(),
            control::gate,
        ))
        .merge(inspect::routes(control, billingrails))
}

// ---- answers: {"error":{"type","code","message","details":[{"field","message"}]}} ----

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "<[FieldProblem]>::is_empty")]
    details: &'a [FieldProblem],
}

fn error_bytes(
    kind: &'static str,
    code: &'static str,
    message: &str,
    details: &[FieldProblem],
) -> Bytes {
    let body = ErrorBody {
        error: ErrorDetail {
            kind,
            code,
            message,
            details,
        },
    };
    Bytes::from(serde_json::to_vec(&body).expect("error bodies always serialize"))
}

fn json(status: StatusCode, body: Bytes) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn error(status: StatusCode, kind: &'static str, code: &'static str, message: &str) -> Response {
    json(status, error_bytes(kind, code, message, &[]))
}

/// The documented 429 body.
pub fn too_many_requests() -> Response {
    error(
        StatusCode::TOO_MANY_REQUESTS,
        "request_error",
        "too_many_requests",
        "Too many requests. Please retry later.",
    )
}

/// A 500 from the API, or a 502/503 from the proxy in front of it (plain text).
fn server_error() -> Response {
    let status = faults::server_error_status(rand::random::<f64>());
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        error(
            status,
            "api_error",
            "internal_error",
            "An internal error occurred.",
        )
    } else {
        (status, status.canonical_reason().unwrap_or("error")).into_response()
    }
}

async fn not_found(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "request_error",
        "not_found",
        &format!("No route for {}", uri.path()),
    )
}

/// Ingestion is asynchronous: Billingrails answers before processing. 202 is the status that
/// says so (the reference shows only the body; clients accept any 2xx).
const QUEUED: StatusCode = StatusCode::ACCEPTED;
const QUEUED_ONE: &[u8] = br#"{"message":"Event queued for processing"}"#;
const QUEUED_MANY: &[u8] = br#"{"message":"Events queued for processing"}"#;

// ---- endpoints ----

#[derive(Clone, Copy)]
enum Endpoint {
    Ingest,
    Batch,
}

async fn ingest(State(app): State<App>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    accept_events(app, Endpoint::Ingest, uri.path(), &headers, body).await
}

async fn batch(State(app): State<App>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    accept_events(app, Endpoint::Batch, uri.path(), &headers, body).await
}

async fn accept_events(
    app: App,
    endpoint: Endpoint,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    if !app.authorized(headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "unauthorized",
            "Invalid or missing API key. Send Authorization: Bearer <API key>.",
        );
    }
    let idempotency_key = match idempotency_key(headers) {
        Ok(key) => key,
        Err(refused) => return refused.into_response(),
    };
    let fault = app.control.plan_usage_fault();
    if fault == Some(Fault::Fail) {
        return server_error();
    }
    let mut claim = None;
    if let Some(key) = idempotency_key {
        let fingerprint = Fingerprint::of(path, &body);
        let verdict = app
            .billingrails
            .idempotency()
            .claim(&key, fingerprint, Instant::now());
        match verdict {
            Claim::Proceed => claim = Some(ClaimedKey::new(app.billingrails.clone(), key)),
            Claim::Replay(answer) => return replay(answer),
            Claim::DifferentRequest => {
                return error(
                    StatusCode::CONFLICT,
                    "request_error",
                    "idempotency_key_reused",
                    "This Idempotency-Key was already used with a different request.",
                )
            }
            Claim::InFlight => {
                return error(
                    StatusCode::CONFLICT,
                    "request_error",
                    "idempotency_key_in_use",
                    "A request with this Idempotency-Key is still being processed.",
                )
            }
        }
    }
    let (status, answer_body) = app.process(endpoint, &body);
    if let Some(claim) = &mut claim {
        claim.answer = Some(CachedAnswer {
            status: status.as_u16(),
            body: answer_body.clone(),
        });
    }
    let response = json(status, answer_body);
    match fault {
        // Stored and cached, then no answer: a retry with the same key gets the replay.
        Some(Fault::Drop) => server::drop_connection(),
        // Stored; the key stays in flight (409 for duplicates) until the late answer.
        Some(Fault::Slow(delay)) => {
            tokio::time::sleep(delay).await;
            drop(claim);
            response
        }
        Some(Fault::Fail) | None => response,
    }
}

impl App {
    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().split_once(' '))
            .is_some_and(|(scheme, key)| {
                scheme.eq_ignore_ascii_case("bearer")
                    && key.trim() == self.billingrails.api_key.expose()
            })
    }

    /// Validates and stores; the answer is what the `Idempotency-Key` cache keeps.
    fn process(&self, endpoint: Endpoint, body: &[u8]) -> (StatusCode, Bytes) {
        let value: Value = match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(problem) => {
                let message = format!("The request body is not valid JSON: {problem}");
                return (
                    StatusCode::BAD_REQUEST,
                    error_bytes("request_error", "invalid_json", &message, &[]),
                );
            }
        };
        let rules = &self.billingrails.rules;
        let validated = match endpoint {
            Endpoint::Ingest => events::validate_event(&value, "", rules).map(|event| vec![event]),
            Endpoint::Batch => events::validate_batch(&value, rules),
        };
        match validated {
            Ok(valid) => {
                let now = Utc::now();
                let mut log = self.billingrails.log();
                for event in valid {
                    log.append(event, now);
                }
                let queued = match endpoint {
                    Endpoint::Ingest => QUEUED_ONE,
                    Endpoint::Batch => QUEUED_MANY,
                };
                (QUEUED, Bytes::from_static(queued))
            }
            Err(problems) => {
                let message = match endpoint {
                    Endpoint::Ingest => "The event is invalid.",
                    // All-or-nothing: nothing of the batch was stored.
                    Endpoint::Batch => "The batch was rejected: no event was stored.",
                };
                let details: &[FieldProblem] = if self.billingrails.error_details {
                    &problems
                } else {
                    &[]
                };
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    error_bytes("request_error", "validation_failed", message, details),
                )
            }
        }
    }
}

/// The `Idempotency-Key` header, if sent: at most 180 characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, InvalidIdempotencyKey> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= idempotency::MAX_KEY_LEN => {
            Ok(Some(key.to_string()))
        }
        _ => Err(InvalidIdempotencyKey),
    }
}

struct InvalidIdempotencyKey;

impl IntoResponse for InvalidIdempotencyKey {
    fn into_response(self) -> Response {
        let problem = FieldProblem {
            field: "Idempotency-Key".to_string(),
            message: format!(
                "must be 1 to {} visible ASCII characters",
                idempotency::MAX_KEY_LEN
            ),
        };
        json(
            StatusCode::BAD_REQUEST,
            error_bytes(
                "request_error",
                "invalid_idempotency_key",
                "The Idempotency-Key header is invalid.",
                &[problem],
            ),
        )
    }
}

fn replay(answer: CachedAnswer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let mut response = json(status, answer.body);
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

/// A claimed `Idempotency-Key`: when dropped — answered, dropped by a fault, or abandoned by a
/// client that hung up — it keeps the answer for replay if there is one, else frees the key.
struct ClaimedKey {
    billingrails: Arc<Billingrails>,
    key: String,
    answer: Option<CachedAnswer>,
}

impl ClaimedKey {
    fn new(billingrails: Arc<Billingrails>, key: String) -> Self {
        ClaimedKey {
            billingrails,
            key,
            answer: None,
        }
    }
}

impl Drop for ClaimedKey {
    fn drop(&mut self) {
        let mut cache = self.billingrails.idempotency();
        match self.answer.take() {
            Some(answer) => cache.complete(&self.key, answer, Instant::now()),
            None => cache.release(&self.key),
        }
    }
}
