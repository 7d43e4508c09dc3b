//! The delivery loop shared by every sink: pace each attempt through the rate limiter, retry
//! what may succeed later (forever: back-pressure, never loss), reconcile an unknown outcome
//! before re-sending, and return one [`ItemOutcome`] per event.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use futures::future::BoxFuture;

use crate::config::RetryConfig;
use crate::deliver::client::Turn;
use crate::deliver::events::{self, Reconciliation, RetryScheduled, RetryWait};
use crate::deliver::permits::Permits;
use crate::deliver::ratelimit::RateLimiter;
use crate::deliver::retry::Backoff;
use crate::deliver::{Attempt, Delivery, ItemOutcome, Reconciled, RetryCause, Sink};

/// Asked right before every request: may this process still send? (Its partitions may have
/// been revoked, or another replica may have taken the delivery over through the ledger.)
pub trait AttemptGuard: Send + Sync {
    fn may_send(&self) -> BoxFuture<'_, bool>;
}

pub struct DeliveryRunner {
    sink: Arc<dyn Sink>,
    limiter: Arc<RateLimiter>,
    retry: RetryConfig,
    /// `sink.concurrency`: requests in flight, overall and per contract.
    requests: Permits,
}

impl DeliveryRunner {
    pub fn new(
        sink: Arc<dyn Sink>,
        limiter: Arc<RateLimiter>,
        retry: RetryConfig,
        requests: Permits,
    ) -> Self {
        DeliveryRunner {
            sink,
            limiter,
            retry,
            requests,
        }
    }

    pub fn sink_name(&self) -> &'static str {
        self.sink.name()
    }

    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.limiter
    }

    pub fn sink(&self) -> &Arc<dyn Sink> {
        &self.sink
    }

    /// Looks `delivery` up at the provider (after an unknown outcome), under a request permit.
    pub async fn reconcile(
        &self,
        delivery: &Delivery,
        since: DateTime<Utc>,
    ) -> Result<Reconciled, String> {
        let _permit = self.requests.acquire(delivery).await;
        self.sink.reconcile(delivery, since).await
    }

    pub fn retry(&self) -> &RetryConfig {
        &self.retry
    }

    /// Delivers until every item has an outcome. `unknown_since` is set when an earlier attempt
    /// (in this process or, through the ledger, a previous one) may have reached the provider.
    /// `None` when the guard said another owner took the delivery over.
    pub async fn deliver(
        &self,
        delivery: &Delivery,
        mut unknown_since: Option<DateTime<Utc>>,
        guard: &dyn AttemptGuard,
    ) -> Option<Vec<ItemOutcome>> {
        // Held until every item has an outcome: a contract whose requests keep failing
        // retries within its share (see `permits`).
        let _permit = self.requests.acquire(delivery).await;
        let sink_name = self.sink.name();
        let mut outcomes: Vec<Option<ItemOutcome>> = vec![None; delivery.items.len()];
        // Items still to deliver, as indexes into `delivery.items`.
        let mut open: Vec<usize> = (0..delivery.items.len()).collect();
        // What is still to send: the whole delivery until a partial refusal leaves a subset.
        let mut current = Cow::Borrowed(delivery);
        let mut backoff = Backoff::new(&self.retry);
        while !open.is_empty() {
            if let Some(since) = unknown_since {
                match self.sink.reconcile(&current, since).await {
                    Ok(Reconciled::Found { receipt }) => {
                        events::Reconciled {
                            delivery_key: &current.key,
                            result: Reconciliation::Found { receipt: &receipt },
                        }
                        .emit();
                        for &i in &open {
                            outcomes[i] = Some(ItemOutcome::AlreadyDelivered {
                                receipt: receipt.clone(),
                            });
                        }
                        break;
                    }
                    Ok(Reconciled::NotFound) => {
                        events::Reconciled {
                            delivery_key: &current.key,
                            result: Reconciliation::NotFound,
                        }
                        .emit();
                        unknown_since = None;
                    }
                    Err(detail) => {
                        let wait = backoff.next_delay();
                        events::Reconciled {
                            delivery_key: &current.key,
                            result: Reconciliation::Error {
                                detail: &detail,
                                retry_in: wait,
                            },
                        }
                        .emit();
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
            let turn = Turn::wait(&self.limiter).await;
            // Right before the request, after the pacer and the gate let it go (which can take
            // longer than any lease): is it still ours to send?
            if !guard.may_send().await {
                tracing::warn!(delivery_key = %current.key, "this process no longer owns the delivery (partition revoked, or another replica took it over); leaving it to the new owner");
                return None;
            }
            let sent_at = Utc::now();
            // The sink's client feeds every answer to the limiter (a 429 closes the gate).
            let attempt = self.sink.send(&current, turn).await;
            match attempt {
                Attempt::Accepted { receipt } => {
                    for &i in &open {
                        outcomes[i] = Some(ItemOutcome::Delivered {
                            receipt: receipt.clone(),
                        });
                    }
                    open.clear();
                }
                Attempt::Rejected {
                    items,
                    provider_answer,
                } => {
                    if items.is_empty() {
                        // A refusal that names nothing applies to every item.
                        for &i in &open {
                            outcomes[i] = Some(ItemOutcome::DeadLetter {
                                rejection: crate::event::Rejection::new(
                                    crate::event::RejectReason::ProviderRejected,
                                    provider_answer.clone(),
                                ),
                                provider_answer: Some(provider_answer.clone()),
                            });
                        }
                        open.clear();
                        continue;
                    }
                    for (local, rejection) in items {
                        if let Some(&i) = open.get(local) {
                            outcomes[i] = Some(ItemOutcome::DeadLetter {
                                rejection,
                                provider_answer: Some(provider_answer.clone()),
                            });
                        }
                    }
                    // Re-send the rest (all-or-nothing batches refuse good events with bad ones).
                    open.retain(|&i| outcomes[i].is_none());
                    current = Cow::Owned(Delivery {
                        key: current.key.clone(),
                        items: open.iter().map(|&i| delivery.items[i].clone()).collect(),
                    });
                }
                Attempt::Retry {
                    cause,
                    outcome_unknown,
                    detail,
                } => {
                    if outcome_unknown && unknown_since.is_none() {
                        unknown_since = Some(sent_at);
                    }
                    let wait = match cause {
                        // The gate (closed by the client on the 429) is the wait: no
                        // per-request backoff.
                        RetryCause::Throttled => RetryWait::Gate,
                        // Never a loop on bad credentials: pause every sender for the longest
                        // backoff.
                        RetryCause::Unauthorized => {
                            RetryWait::AllSendersPause(self.retry.max_backoff)
                        }
                        _ => RetryWait::Backoff(backoff.next_delay()),
                    };
                    RetryScheduled {
                        sink: sink_name,
                        cause,
                        delivery_key: &current.key,
                        event_ids: current
                            .items
                            .iter()
                            .take(5)
                            .map(|i| i.usage.event_id.as_str())
                            .collect(),
                        outcome_unknown,
                        attempt: backoff.attempts(),
                        wait,
                        detail: &detail,
                    }
                    .emit();
                    match wait {
                        RetryWait::Gate => {}
                        RetryWait::AllSendersPause(pause) => {
                            self.limiter
                                .gate()
                                .close_until(tokio::time::Instant::now() + pause);
                        }
                        RetryWait::Backoff(wait) => tokio::time::sleep(wait).await,
                    }
                }
            }
        }
        Some(
            outcomes
                .into_iter()
                // Every item has an outcome when the loop ends; were one missing (a bug), it is
                // dead-lettered rather than left unsettled.
                .map(|o| {
                    o.unwrap_or_else(|| ItemOutcome::DeadLetter {
                        rejection: crate::event::Rejection::new(
                            crate::event::RejectReason::InternalError,
                            "the delivery ended without an outcome for this event (a bug)",
                        ),
                        provider_answer: None,
                    })
                })
                .collect(),
        )
    }
}
