//! Delivery to the provider: the [`Sink`] trait (billwerk, Billingrails), the one door every
//! request passes ([`client::ProviderClient`]: pace, send, time, record, observe the rate-limit
//! headers, report readiness), the events it records ([`events`]), and the loop that paces every
//! attempt, retries what may succeed later, reconciles unknown outcomes and hands back one
//! [`ItemOutcome`] per event.

use std::time::Duration;

use futures::future::BoxFuture;

use crate::event::{BillableUsage, DeliveryKey, RawMessage, Rejection};

/// One event inside a delivery.
#[derive(Debug, Clone)]
pub struct DeliveryItem {
    pub usage: BillableUsage,
    pub raw: RawMessage,
}

/// What one request carries: one usage record (billwerk; several events when pre-aggregated)
/// or a batch (Billingrails).
#[derive(Debug, Clone)]
pub struct Delivery {
    pub key: DeliveryKey,
    pub items: Vec<DeliveryItem>,
}

/// How one event of a delivery ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemOutcome {
    /// Accepted by the provider; `receipt` is its record id (or request id).
    Delivered { receipt: String },
    /// Found already delivered (ledger or reconciliation): settled without a new request.
    AlreadyDelivered { receipt: String },
    /// Can never succeed: to the dead-letter topic.
    DeadLetter {
        rejection: Rejection,
        /// The provider's status and raw body, when the provider refused it.
        provider_answer: Option<String>,
    },
}

/// Rate-limit facts read off one answer; every field is optional because providers differ.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateSignals {
    pub limit: Option<u32>,
    pub remaining: Option<u32>,
    /// Time until the window resets (`X-RateLimit-Reset`).
    pub reset_after: Option<Duration>,
    /// `Retry-After`.
    pub retry_after: Option<Duration>,
}

/// Why an attempt is retried: the `cause` label of `meterflow_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryCause {
    Throttled,
    ServerError,
    Timeout,
    Connection,
    Unauthorized,
    /// 403 with credentials that work elsewhere: about this request (a contract our account
    /// may not touch), so only this delivery backs off.
    Forbidden,
    Conflict,
}

impl RetryCause {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryCause::Throttled => "throttled",
            RetryCause::ServerError => "server_error",
            RetryCause::Timeout => "timeout",
            RetryCause::Connection => "connection",
            RetryCause::Unauthorized => "unauthorized",
            RetryCause::Forbidden => "forbidden",
            RetryCause::Conflict => "conflict",
        }
    }
}

/// The result of one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// 2xx: every item delivered.
    Accepted { receipt: String },
    /// A permanent refusal. `items` holds the indexes of the refused items with their reasons;
    /// items not named may be re-sent (Billingrails' all-or-nothing batches).
    Rejected {
        items: Vec<(usize, Rejection)>,
        provider_answer: String,
    },
    /// Worth trying again. `outcome_unknown` is true when the request may have reached the
    /// provider and been recorded (timeout or reset after the body was written).
    Retry {
        cause: RetryCause,
        outcome_unknown: bool,
        detail: String,
    },
}

/// What the provider knows about a delivery whose outcome was unknown.
#[derive(Debug, Clone, PartialEq)]
pub enum Reconciled {
    /// The provider has it: settle without re-sending.
    Found { receipt: String },
    /// The provider has no trace of it: safe to send.
    NotFound,
}

/// A billing provider's usage endpoint.
pub trait Sink: Send + Sync + 'static {
    /// `billwerk` or `billingrails`: the `sink` label on metrics.
    fn name(&self) -> &'static str;

    /// One attempt at the delivery, under its delivery key. `turn` is the delivery request's
    /// turn in the pace, taken by the runner (which checked right after it that the delivery is
    /// still this process's to send); any other request the sink needs (a look-up, a token, a
    /// bisection's parts) takes its own turn through the sink's
    /// [`ProviderClient`](client::ProviderClient), which also feeds every answer to the limiter.
    fn send<'a>(&'a self, delivery: &'a Delivery, turn: client::Turn) -> BoxFuture<'a, Attempt>;

    /// Looks for a delivery whose earlier outcome is unknown. Providers that deduplicate by key
    /// (Billingrails) answer `NotFound`: re-sending under the same key is the reconciliation.
    fn reconcile<'a>(
        &'a self,
        delivery: &'a Delivery,
        sent_since: chrono::DateTime<chrono::Utc>,
    ) -> BoxFuture<'a, Result<Reconciled, String>>;
}

pub mod billingrails;
pub mod billwerk;
pub mod client;
pub mod events;
pub(crate) mod http;
pub mod permits;
pub mod ratelimit;
pub mod retry;
pub mod runner;
