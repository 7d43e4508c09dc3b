//! The one door to the provider. Every request a sink makes passes [`ProviderClient`], which
//! paces it through the rate limiter, sends it, times it and records it
//! ([`RequestSent`](crate::deliver::events::RequestSent)), feeds the answer's rate-limit headers
//! to the limiter (a 429 closes the sink-wide gate), tells [`ProviderHealth`] that the provider
//! answered, and reads the body. Sinks only build requests and classify answers; a rule kept at
//! one door cannot drift at the sixth request site.

use std::sync::Arc;

use reqwest::StatusCode;

use crate::deliver::events::RequestSent;
use crate::deliver::http::{rate_signals, transport_failure, without_url};
use crate::deliver::ratelimit::RateLimiter;
use crate::deliver::{Attempt, RateSignals};

/// Who hears that the provider answered (any HTTP status: even a 4xx or a 429 proves it is
/// reachable). `admin::Readiness` implements it for `/readyz`; `deliver` owns the seam so that
/// it needs nothing of `admin`.
pub trait ProviderHealth: Send + Sync + 'static {
    fn provider_answered(&self);
}

/// Nobody listens (the `void` and `audit` commands, tests).
struct Unobserved;

impl ProviderHealth for Unobserved {
    fn provider_answered(&self) {}
}

/// A request's turn: the 429 gate was open and the pacer gave it its slot. One turn pays for one
/// request; [`ProviderClient::send`] takes its own, [`ProviderClient::send_in_turn`] spends one
/// taken earlier (the runner takes the delivery request's turn, then checks right before the
/// send that the delivery is still its own).
#[derive(Debug)]
pub struct Turn(());

impl Turn {
    /// Waits for the gate and then for a slot in the pace.
    pub async fn wait(limiter: &RateLimiter) -> Turn {
        limiter.until_ready().await;
        Turn(())
    }
}

/// An HTTP answer, read to its end.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: String,
    /// What its headers said of the rate limit (already fed to the limiter).
    pub signals: RateSignals,
}

/// A request without a whole answer.
#[derive(Debug)]
pub enum Failure {
    /// No HTTP answer: connection refused, timeout, reset.
    NoAnswer(reqwest::Error),
    /// The status line arrived, the body did not: the request reached the provider, which may
    /// have recorded it.
    BodyLost {
        status: StatusCode,
        error: reqwest::Error,
    },
}

impl Failure {
    /// What the attempt should do. Only a failed connect proves nothing was sent; a lost body
    /// means the request was there: retry, outcome unknown, for every sink.
    pub fn attempt(&self) -> Attempt {
        match self {
            Failure::NoAnswer(e) => transport_failure(e),
            Failure::BodyLost { .. } => match transport_failure(self.error()) {
                Attempt::Retry { cause, .. } => Attempt::Retry {
                    cause,
                    outcome_unknown: true,
                    detail: self.detail(),
                },
                other => other,
            },
        }
    }

    /// A short text without URLs.
    pub fn detail(&self) -> String {
        match self {
            Failure::NoAnswer(e) => without_url(e),
            Failure::BodyLost { status, error } => format!(
                "HTTP {status} arrived but its body did not: {}",
                without_url(error)
            ),
        }
    }

    fn error(&self) -> &reqwest::Error {
        match self {
            Failure::NoAnswer(e) | Failure::BodyLost { error: e, .. } => e,
        }
    }
}

/// The client of one sink: its pooled HTTP client, its rate limiter, and who hears of answers.
/// Cheap to clone (all shared).
#[derive(Clone)]
pub struct ProviderClient {
    sink: &'static str,
    http: reqwest::Client,
    limiter: Arc<RateLimiter>,
    health: Arc<dyn ProviderHealth>,
}

impl ProviderClient {
    /// `sink` is the `sink` label of the request metrics.
    pub fn new(sink: &'static str, http: reqwest::Client, limiter: Arc<RateLimiter>) -> Self {
        ProviderClient {
            sink,
            http,
            limiter,
            health: Arc::new(Unobserved),
        }
    }

    /// Every HTTP answer (any status) is reported to `health`.
    pub fn with_health(mut self, health: Arc<dyn ProviderHealth>) -> Self {
        self.health = health;
        self
    }

    /// For building requests.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.limiter
    }

    /// Waits for a turn of the pace.
    pub async fn turn(&self) -> Turn {
        Turn::wait(&self.limiter).await
    }

    /// Waits for its turn, then [`send_in_turn`](Self::send_in_turn).
    pub async fn send(
        &self,
        endpoint: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<Answer, Failure> {
        let turn = self.turn().await;
        self.send_in_turn(turn, endpoint, request).await
    }

    /// Sends in a turn taken earlier: records the request, feeds the answer's rate-limit headers
    /// to the limiter (dated by when the request left, so a late answer is not taken for news of
    /// the current window; a 429 closes the gate), reports the answer to health, reads the body.
    pub async fn send_in_turn(
        &self,
        _turn: Turn,
        endpoint: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<Answer, Failure> {
        self.exchange(endpoint, request, true).await
    }

    /// Outside the pace and the usage API's budget: billwerk's OAuth token endpoint. Recorded
    /// and reported like any request; its headers are not the API's rate limit.
    pub async fn send_unpaced(
        &self,
        endpoint: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<Answer, Failure> {
        self.exchange(endpoint, request, false).await
    }

    async fn exchange(
        &self,
        endpoint: &'static str,
        request: reqwest::RequestBuilder,
        metered: bool,
    ) -> Result<Answer, Failure> {
        let sent_at = tokio::time::Instant::now();
        let result = request.send().await;
        let elapsed = sent_at.elapsed();
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                RequestSent {
                    sink: self.sink,
                    endpoint,
                    status_class: "error",
                    elapsed,
                }
                .emit();
                return Err(Failure::NoAnswer(e));
            }
        };
        let status = response.status();
        RequestSent {
            sink: self.sink,
            endpoint,
            status_class: RequestSent::status_class(status.as_u16()),
            elapsed,
        }
        .emit();
        self.health.provider_answered();
        let signals = rate_signals(response.headers());
        if metered {
            self.limiter
                .observe_sent(&signals, status == StatusCode::TOO_MANY_REQUESTS, sent_at);
        }
        match response.text().await {
            Ok(body) => Ok(Answer {
                status,
                body,
                signals,
            }),
            Err(error) => Err(Failure::BodyLost { status, error }),
        }
    }
}

#[cfg(test)]
mod tests;
