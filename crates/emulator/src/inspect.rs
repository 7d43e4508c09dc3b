//! `/_emulator/...`: the test-only inspection and control API. No authentication, no rate limit,
//! no faults: it is for the test, demo or operator driving the emulator, never for the client
//! under test.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::control::Control;
use super::faults::FaultSettings;
use super::handle::{self, EmulatedProvider};
use super::ratelimit::RateLimitSettings;
use super::stats::PerKey;

struct Inspect<P> {
    control: Arc<Control>,
    provider: Arc<P>,
}

impl<P> Clone for Inspect<P> {
    fn clone(&self) -> Self {
        Inspect {
            control: self.control.clone(),
            provider: self.provider.clone(),
        }
    }
}

pub fn routes<P: EmulatedProvider>(control: Arc<Control>, provider: Arc<P>) -> Router {
    Router::new()
        .route("/_emulator/records", get(records::<P>))
        .route("/_emulator/stats", get(stats::<P>))
        .route("/_emulator/limit", get(limit::<P>).put(set_limit::<P>))
        .route("/_emulator/faults", get(faults::<P>).put(set_faults::<P>))
        .route("/_emulator/reset", post(reset::<P>))
        .with_state(Inspect { control, provider })
}

async fn records<P: EmulatedProvider>(State(inspect): State<Inspect<P>>) -> Response {
    Json(inspect.provider.records()).into_response()
}

#[derive(Deserialize)]
struct StatsQuery {
    /// `per_key=false` leaves out the (possibly huge) per-key map after a benchmark.
    per_key: Option<bool>,
}

async fn stats<P: EmulatedProvider>(
    State(inspect): State<Inspect<P>>,
    Query(query): Query<StatsQuery>,
) -> Response {
    let per_key = match query.per_key {
        Some(false) => PerKey::Counted,
        _ => PerKey::Listed,
    };
    Json(handle::stats(
        &inspect.control,
        inspect.provider.as_ref(),
        per_key,
    ))
    .into_response()
}

async fn limit<P: EmulatedProvider>(State(inspect): State<Inspect<P>>) -> Response {
    Json(handle::limit_status(&inspect.control)).into_response()
}

/// `PUT /_emulator/limit`: fields left out keep their current value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitUpdate {
    limit: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    window: Option<Duration>,
    headers: Option<bool>,
    retry_after: Option<bool>,
    reset_header: Option<bool>,
}

async fn set_limit<P: EmulatedProvider>(
    State(inspect): State<Inspect<P>>,
    body: axum::body::Bytes,
) -> Response {
    let update: LimitUpdate = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(error) => return bad_request(format!("limit update: {error}")),
    };
    let current = inspect.control.limiter.settings();
    let settings = RateLimitSettings {
        limit: update.limit.unwrap_or(current.limit),
        window: update.window.unwrap_or(current.window),
        headers: update.headers.unwrap_or(current.headers),
        retry_after: update.retry_after.unwrap_or(current.retry_after),
        reset_header: update.reset_header.unwrap_or(current.reset_header),
    };
    if let Err(problem) = settings.validate() {
        return bad_request(problem);
    }
    inspect.control.set_limit(settings);
    Json(handle::limit_status(&inspect.control)).into_response()
}

async fn faults<P: EmulatedProvider>(State(inspect): State<Inspect<P>>) -> Response {
    Json(inspect.control.faults().as_ref().clone()).into_response()
}

/// `PUT /_emulator/faults`: fields left out keep their current value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultUpdate {
    fail_rate: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    latency: Option<Duration>,
    latency_rate: Option<f64>,
    slow_rate: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    slow_duration: Option<Duration>,
    drop_rate: Option<f64>,
}

async fn set_faults<P: EmulatedProvider>(
    State(inspect): State<Inspect<P>>,
    body: axum::body::Bytes,
) -> Response {
    let update: FaultUpdate = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(error) => return bad_request(format!("faults update: {error}")),
    };
    let current = inspect.control.faults();
    let faults = FaultSettings {
        fail_rate: update.fail_rate.unwrap_or(current.fail_rate),
        latency: update.latency.unwrap_or(current.latency),
        latency_rate: update.latency_rate.unwrap_or(current.latency_rate),
        slow_rate: update.slow_rate.unwrap_or(current.slow_rate),
        slow_duration: update.slow_duration.unwrap_or(current.slow_duration),
        drop_rate: update.drop_rate.unwrap_or(current.drop_rate),
    };
    if let Err(problem) = faults.validate() {
        return bad_request(problem);
    }
    inspect.control.set_faults(faults.clone());
    Json(faults).into_response()
}

async fn reset<P: EmulatedProvider>(State(inspect): State<Inspect<P>>) -> StatusCode {
    handle::reset(&inspect.control, inspect.provider.as_ref());
    StatusCode::NO_CONTENT
}

fn bad_request(problem: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": problem })),
    )
        .into_response()
}
