//! The knobs every emulated provider shares (rate limit, faults, counters) and the gate every
//! provider answer passes through: latency, the rate limit, its headers, the answer counts.
//! Inspection answers (`/_emulator/...`) bypass the gate.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use super::faults::{Fault, FaultCounters, FaultSettings};
use super::ratelimit::{Admission, RateLimitSettings, RateLimiter};
use super::server::DropConnection;
use super::stats::AnswerCounters;

/// Builds a provider's own 429 answer (billwerk and Billingrails word it differently).
pub type TooManyRequests = fn() -> Response;

pub struct Control {
    pub limiter: RateLimiter,
    faults: ArcSwap<FaultSettings>,
    pub answers: AnswerCounters,
    pub fault_counts: FaultCounters,
    startup_limit: RateLimitSettings,
    startup_faults: FaultSettings,
    too_many_requests: TooManyRequests,
}

impl Control {
    pub fn new(
        limit: RateLimitSettings,
        faults: FaultSettings,
        too_many_requests: TooManyRequests,
    ) -> Control {
        Control {
            limiter: RateLimiter::new(limit.clone(), Instant::now()),
            faults: ArcSwap::from_pointee(faults.clone()),
            answers: AnswerCounters::default(),
            fault_counts: FaultCounters::default(),
            startup_limit: limit,
            startup_faults: faults,
            too_many_requests,
        }
    }

    pub fn faults(&self) -> Arc<FaultSettings> {
        self.faults.load_full()
    }

    pub fn set_faults(&self, faults: FaultSettings) {
        self.faults.store(Arc::new(faults));
    }

    pub fn set_limit(&self, limit: RateLimitSettings) {
        self.limiter.replace(limit, Instant::now());
    }

    /// Draws the fault (if any) for one usage request and counts it.
    pub fn plan_usage_fault(&self) -> Option<Fault> {
        let fault = self.faults.load().plan_usage_request(rand::random::<f64>);
        if let Some(fault) = fault {
            self.fault_counts.count(fault);
        }
        fault
    }

    /// Back to the startup settings, with every counter at zero and a fresh window.
    pub fn reset(&self) {
        self.set_limit(self.startup_limit.clone());
        self.set_faults(self.startup_faults.clone());
        self.answers.clear();
        self.fault_counts.clear();
    }
}

const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// The middleware in front of every provider endpoint (and the 404 fallback).
pub async fn gate(State(control): State<Arc<Control>>, request: Request, next: Next) -> Response {
    if let Some(delay) = control.faults.load().plan_latency(rand::random::<f64>) {
        control.fault_counts.count_latency();
        tokio::time::sleep(delay).await;
    }
    let admission = control.limiter.admit(Instant::now());
    let mut response = match admission {
        Some(refused) if !refused.admitted => {
            control.answers.count_rate_limited();
            (control.too_many_requests)()
        }
        _ => next.run(request).await,
    };
    if response.extensions().get::<DropConnection>().is_some() {
        return response; // no answer will be written: nothing to count or decorate
    }
    control.answers.count(response.status().as_u16());
    if let Some(admission) = admission {
        add_rate_limit_headers(&mut response, &admission, &control.limiter.settings());
    }
    response
}

fn add_rate_limit_headers(
    response: &mut Response,
    admission: &Admission,
    settings: &RateLimitSettings,
) {
    let headers = response.headers_mut();
    if settings.headers {
        headers.insert(LIMIT, HeaderValue::from(admission.limit));
        headers.insert(REMAINING, HeaderValue::from(admission.remaining));
    }
    let resets_in = admission.resets_in_whole_seconds();
    if settings.reset_header {
        headers.insert(RESET, HeaderValue::from(resets_in));
    }
    if settings.retry_after && !admission.admitted {
        headers.insert(
            axum::http::header::RETRY_AFTER,
            HeaderValue::from(resets_in),
        );
    }
}
