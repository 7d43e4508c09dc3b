//! billwerk's HTTP surface: `/oauth/token/` and `/api/v1/contracts/...`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{middleware, Router};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::auth::{self, TokenRefusal};
use super::contracts::is_contract_id;
use super::ledger::{BillwerkRecord, UsageQuery};
use super::timestamp;
use super::usage_body::{self, UsageBodyError};
use super::Billwerk;
use crate::control::{self, Control};
use crate::faults::{self, Fault};
use crate::{inspect, server};

#[derive(Clone)]
struct App {
    billwerk: Arc<Billwerk>,
    control: Arc<Control>,
}

pub fn router(billwerk: Arc<Billwerk>, control: Arc<Control>) -> Router {
    let app = App {
        billwerk: billwerk.clone(),
        control: control.clone(),
    };
    let provider = Router::new()
        // The token endpoint is not under /api/v1; billwerk documents it with a trailing slash.
        .route("/oauth/token/", post(issue_token))
        .route("/oauth/token", post(issue_token))
        .route("/api/v1/contracts", get(find_contracts))
        .route("/api/v1/contracts/{contract_id}", get(get_contract))
        .route(
            "/api/v1/contracts/{contract_id}/usage",
            post(create_usage).get(list_usage),
        )
        .route(
            "/api/v1/contracts/{contract_id}/usage/{usage_id}",
            delete(delete_usage),
        )
        .fallback(not_found)
        .with_state(app)
        .layer(middleware::from_fn_with_state(
            control.clone(),
            control::gate,
        ));
    let billwerk_only_inspection = Router::new()
        .route("/_emulator/tokens", delete(revoke_tokens))
        .route("/_emulator/billing-run", post(billing_run))
        .route("/_emulator/usage/{usage_id}/billed", post(mark_billed))
        .with_state(billwerk.clone());
    provider
        .merge(inspect::routes(control, billwerk))
        .merge(billwerk_only_inspection)
}

// ---- answers ----

/// billwerk's error bodies carry a `Message` (the shape is undocumented; ASP.NET's is likely).
fn message(status: StatusCode, text: impl Into<String>) -> Response {
    #[derive(Serialize)]
    struct ErrorBody {
        #[serde(rename = "Message")]
        message: String,
    }
    json(
        status,
        &ErrorBody {
            message: text.into(),
        },
    )
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).expect("answers always serialize");
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        )],
        bytes,
    )
        .into_response()
}

pub fn too_many_requests() -> Response {
    message(
        StatusCode::TOO_MANY_REQUESTS,
        "API calls quota exceeded. Please retry later.",
    )
}

fn unauthorized() -> Response {
    let mut response = message(
        StatusCode::UNAUTHORIZED,
        "Authorization has been denied for this request.",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// A 500 from the application, or a 502/503 from the proxy in front of it (plain text).
fn server_error() -> Response {
    let status = faults::server_error_status(rand::random::<f64>());
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        message(status, "An error has occurred.")
    } else {
        (status, status.canonical_reason().unwrap_or("error")).into_response()
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    message(
        StatusCode::NOT_FOUND,
        format!("No HTTP resource was found that matches the request URI '{uri}'."),
    )
}

/// The documented echo of a stored usage record, with billwerk's 7-digit timestamps.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct UsageAnswer<'a> {
    id: &'a str,
    contract_id: &'a str,
    transferred_at: String,
    component_id: &'a str,
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    quantity: Decimal,
    /// Always empty: billwerk documents the key but not its use.
    key: &'static str,
    due_date: String,
    memo: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    product_override: Option<OverrideAnswer<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct OverrideAnswer<'a> {
    #[serde(with = "rust_decimal::serde::arbitrary_precision_option")]
    price_per_unit: Option<Decimal>,
    name: Option<&'a str>,
    description: Option<&'a str>,
}

impl<'a> UsageAnswer<'a> {
    fn of(record: &'a BillwerkRecord) -> Self {
        UsageAnswer {
            id: &record.id,
            contract_id: &record.contract_id,
            transferred_at: timestamp::format(record.created_at),
            component_id: &record.component_id,
            quantity: record.quantity,
            key: "",
            due_date: timestamp::format(record.due_date),
            memo: record.memo.as_deref(),
            product_override: record.product_override.as_ref().map(|o| OverrideAnswer {
                price_per_unit: o.price_per_unit,
                name: o.name.as_deref(),
                description: o.description.as_deref(),
            }),
        }
    }
}

// ---- checks shared by the /api/v1 endpoints ----

/// Why an `/api/v1` call is refused before its own work starts.
enum Refusal {
    /// 401: no token, an unknown one, or an expired one.
    Unauthorized,
    /// 403: the account has legal entities and the call did not name the right one.
    LegalEntityRequired,
    /// 422: the path's contract id is not 24 hex characters.
    MalformedContractId(String),
    /// 404: well-formed, but not a contract the emulator accepts.
    UnknownContract(String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Unauthorized => unauthorized(),
            // The token is fine; it is the entity scope that is missing: 403, not 401, so a
            // client does not refresh its token in a loop.
            Refusal::LegalEntityRequired => message(
                StatusCode::FORBIDDEN,
                "This account has legal entities: send X-SELECTED-LEGAL-ENTITY-ID with a valid legal entity id.",
            ),
            Refusal::MalformedContractId(id) => message(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("ContractId '{id}' is not a valid id: expected 24 hex characters."),
            ),
            Refusal::UnknownContract(id) => message(
                StatusCode::NOT_FOUND,
                format!("Contract '{id}' was not found."),
            ),
        }
    }
}

impl App {
    /// Bearer token, then the legal-entity header when the account has an entity hierarchy.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(auth::bearer_token);
        if !token.is_some_and(|token| self.billwerk.tokens.is_valid(token, Instant::now())) {
            return Err(Refusal::Unauthorized);
        }
        if let Some(required) = &self.billwerk.require_legal_entity {
            let sent = headers
                .get("x-selected-legal-entity-id")
                .and_then(|value| value.to_str().ok());
            if sent != Some(required.as_str()) {
                return Err(Refusal::LegalEntityRequired);
            }
        }
        Ok(())
    }

    /// Authorizes, then checks the path's contract id: lower-cased, if well-formed and known.
    fn authorize_contract(
        &self,
        headers: &HeaderMap,
        contract_id: &str,
    ) -> Result<String, Refusal> {
        self.authorize(headers)?;
        if !is_contract_id(contract_id) {
            return Err(Refusal::MalformedContractId(contract_id.to_string()));
        }
        if !self.billwerk.accepts_contract(contract_id) {
            return Err(Refusal::UnknownContract(contract_id.to_string()));
        }
        Ok(contract_id.to_ascii_lowercase())
    }
}

// ---- endpoints ----

async fn issue_token(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    match auth::check_token_request(&app.billwerk.credentials, authorization, &body) {
        Ok(()) => {
            let token = app.billwerk.tokens.issue(Instant::now());
            let lifetime = app.billwerk.tokens.lifetime();
            let expires_in = lifetime.as_secs() + u64::from(lifetime.subsec_nanos() > 0);
            let mut response = json(
                StatusCode::OK,
                &serde_json::json!({
                    "access_token": token,
                    "token_type": "bearer",
                    "expires_in": expires_in,
                }),
            );
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(refusal) => {
            let status = match refusal {
                TokenRefusal::UnsupportedGrantType => StatusCode::BAD_REQUEST,
                TokenRefusal::InvalidClient => StatusCode::UNAUTHORIZED,
            };
            let mut response = json(status, &serde_json::json!({ "error": refusal.code() }));
            if refusal == TokenRefusal::InvalidClient {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"billwerk\""),
                );
            }
            response
        }
    }
}

async fn create_usage(
    State(app): State<App>,
    Path(contract_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let contract_id = match app.authorize_contract(&headers, &contract_id) {
        Ok(contract_id) => contract_id,
        Err(refused) => return refused.into_response(),
    };
    let fault = app.control.plan_usage_fault();
    if fault == Some(Fault::Fail) {
        return server_error();
    }
    let answer = match usage_body::parse(&body) {
        Err(UsageBodyError::Unreadable(problem)) => message(StatusCode::BAD_REQUEST, problem),
        Err(UsageBodyError::InvalidField {
            message: problem, ..
        }) => message(StatusCode::UNPROCESSABLE_ENTITY, problem),
        Ok(request) => match &app.billwerk.components {
            Some(catalogue) if !catalogue.contains(&request.component_id) => message(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("ComponentId '{}' does not exist.", request.component_id),
            ),
            _ => {
                let record = app
                    .billwerk
                    .ledger()
                    .insert(&contract_id, request, Utc::now());
                json(StatusCode::CREATED, &UsageAnswer::of(&record))
            }
        },
    };
    match fault {
        // Recorded (if valid), then no answer: the client cannot know whether it was billed.
        Some(Fault::Drop) => server::drop_connection(),
        // Recorded, but the answer comes after the client's timeout.
        Some(Fault::Slow(delay)) => {
            tokio::time::sleep(delay).await;
            answer
        }
        Some(Fault::Fail) | None => answer,
    }
}

async fn list_usage(
    State(app): State<App>,
    Path(contract_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let contract_id = match app.authorize_contract(&headers, &contract_id) {
        Ok(contract_id) => contract_id,
        Err(refused) => return refused.into_response(),
    };
    let mut query = match usage_query(query.as_deref().unwrap_or("")) {
        Ok(query) => query,
        Err(problem) => return message(StatusCode::BAD_REQUEST, problem),
    };
    if let Some(cap) = app.billwerk.list_page_cap {
        query.take = query.take.min(cap);
    }
    let records = app.billwerk.ledger().list(&contract_id, &query);
    let answers: Vec<UsageAnswer<'_>> = records.iter().map(UsageAnswer::of).collect();
    json(StatusCode::OK, &answers)
}

/// billwerk's paging limits: `take` ≤ 500, `skip` ≤ 1000. The default `take` is
/// undocumented; the emulator uses 100.
const DEFAULT_TAKE: usize = 100;
const MAX_TAKE: usize = 500;
const MAX_SKIP: usize = 1000;

fn usage_query(query: &str) -> Result<UsageQuery, String> {
    let mut parsed = UsageQuery {
        after_id: None,
        skip: 0,
        take: DEFAULT_TAKE,
        from_date_time: None,
        until_date_time: None,
    };
    let date = |name: &str, value: &str| -> Result<DateTime<Utc>, String> {
        timestamp::parse(value)
            .ok_or_else(|| format!("{name} '{value}' is not a valid ISO 8601 date."))
    };
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        // ASP.NET binds query parameters case-insensitively.
        match name.to_ascii_lowercase().as_str() {
            "from" => {
                if !is_contract_id(&value) {
                    return Err(format!(
                        "from '{value}' is not a valid id: expected 24 hex characters."
                    ));
                }
                parsed.after_id = Some(value.to_ascii_lowercase());
            }
            "take" => {
                parsed.take = value
                    .parse()
                    .ok()
                    .filter(|take| *take <= MAX_TAKE)
                    .ok_or_else(|| {
                        format!("take '{value}' must be a number from 0 to {MAX_TAKE}.")
                    })?;
            }
            "skip" => {
                parsed.skip = value
                    .parse()
                    .ok()
                    .filter(|skip| *skip <= MAX_SKIP)
                    .ok_or_else(|| {
                        format!("skip '{value}' must be a number from 0 to {MAX_SKIP}.")
                    })?;
            }
            "fromdatetime" => parsed.from_date_time = Some(date("fromDateTime", &value)?),
            "untildatetime" => parsed.until_date_time = Some(date("untilDateTime", &value)?),
            _ => {}
        }
    }
    Ok(parsed)
}

async fn delete_usage(
    State(app): State<App>,
    Path((contract_id, usage_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let contract_id = match app.authorize_contract(&headers, &contract_id) {
        Ok(contract_id) => contract_id,
        Err(refused) => return refused.into_response(),
    };
    // billwerk deletes only unbilled usage; its answer for billed usage is undocumented: the
    // emulator's status is configurable (`--billed-delete-status`), with a `Message`.
    if app
        .billwerk
        .ledger()
        .is_billed(&contract_id, &usage_id.to_ascii_lowercase())
    {
        let status = StatusCode::from_u16(app.billwerk.billed_delete_status)
            .unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
        return message(
            status,
            format!("Usage '{usage_id}' is already billed and cannot be deleted."),
        );
    }
    if app
        .billwerk
        .ledger()
        .delete(&contract_id, &usage_id.to_ascii_lowercase())
    {
        StatusCode::NO_CONTENT.into_response()
    } else {
        message(
            StatusCode::NOT_FOUND,
            format!("Usage '{usage_id}' was not found on contract '{contract_id}'."),
        )
    }
}

async fn find_contracts(
    State(app): State<App>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = app.authorize(&headers) {
        return refused.into_response();
    }
    let external_id = url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(name, _)| name.eq_ignore_ascii_case("externalId"))
        .map(|(_, value)| value.into_owned());
    json(
        StatusCode::OK,
        &app.billwerk.contracts.find(external_id.as_deref()),
    )
}

async fn get_contract(
    State(app): State<App>,
    Path(contract_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = app.authorize(&headers) {
        return refused.into_response();
    }
    match app.billwerk.contracts.get(&contract_id) {
        Some(contract) => json(StatusCode::OK, &contract),
        None => message(
            StatusCode::NOT_FOUND,
            format!("Contract '{contract_id}' was not found."),
        ),
    }
}

/// `POST /_emulator/billing-run`: every record is billed from now on (deletes are refused).
async fn billing_run(State(billwerk): State<Arc<Billwerk>>) -> Response {
    let billed = billwerk.ledger().bill_all();
    json(StatusCode::OK, &serde_json::json!({ "billed": billed }))
}

/// `POST /_emulator/usage/{usage_id}/billed`: this record is billed from now on.
async fn mark_billed(
    State(billwerk): State<Arc<Billwerk>>,
    Path(usage_id): Path<String>,
) -> Response {
    if billwerk
        .ledger()
        .mark_billed(&usage_id.to_ascii_lowercase())
    {
        StatusCode::NO_CONTENT.into_response()
    } else {
        message(
            StatusCode::NOT_FOUND,
            format!("Usage '{usage_id}' was not found."),
        )
    }
}

async fn revoke_tokens(State(billwerk): State<Arc<Billwerk>>) -> StatusCode {
    billwerk.revoke_tokens();
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_query_defaults_and_limits() {
        let query = usage_query("").unwrap();
        assert_eq!(query.take, DEFAULT_TAKE);
        assert_eq!(query.skip, 0);
        let query =
            usage_query("Take=500&FROM=5CE53069443E551B9CACCC64&fromDateTime=2026-01-01T00:00:00Z")
                .unwrap();
        assert_eq!(query.take, 500);
        assert_eq!(query.after_id.as_deref(), Some("5ce53069443e551b9caccc64"));
        assert!(query.from_date_time.is_some());
        assert!(usage_query("take=501").unwrap_err().contains("take"));
        assert!(usage_query("skip=1001").unwrap_err().contains("skip"));
        assert!(usage_query("from=abc").unwrap_err().contains("from"));
        assert!(usage_query("untilDateTime=tomorrow")
            .unwrap_err()
            .contains("untilDateTime"));
    }
}
