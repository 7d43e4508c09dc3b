//! The exactly-once delivery protocol: claim a delivery's key in the ledger, send it only while
//! this process owns its partitions and holds the key's lease, settle what the ledger already
//! knows without a request, reconcile an unknown outcome at the provider before re-sending, and
//! dead-letter each refused event once. docs/delivery-semantics.md describes it with its races.
//!
//! - [`LedgeredDelivery::spawn`] runs each delivery as a task of its own (a panic in it
//!   dead-letters its events as `internal_error` instead of pinning the partition);
//! - `per_event.rs`: one key per delivery (billwerk one record per event, Billingrails batches);
//! - `aggregate.rs`: pre-aggregated billwerk records, whose events the ledger maps to them;
//! - `fence.rs`: what is checked right before every send.
//!
//! Without a ledger (`[ledger] url = "none"`) the same paths run without claims.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures::FutureExt;
use tokio::task::JoinSet;

use crate::ack::deadletter::{DeadLetter, DeadLetterWriter, Written};
use crate::ack::ledger::{Claim, EventContent, EventOrigin, Ledger, LedgerError};
use crate::admin::readiness::Readiness;
use crate::admin::{AdminState, StatusBoard};
use crate::deliver::permits::Permits;
use crate::deliver::runner::DeliveryRunner;
use crate::deliver::{Delivery, DeliveryItem, ItemOutcome};
use crate::event::SourceRef;
use crate::event::{DeliveryKey, RawMessage, RejectReason, Rejection};

use fence::{LedgerLease, SendFence};

mod aggregate;
mod fence;
mod per_event;
#[cfg(test)]
mod tests;

/// How long a delivery waits before asking a ledger that did not answer again.
const LEDGER_RETRY: Duration = Duration::from_secs(1);
/// The longest single wait for another owner's lease: then the claim is asked again.
const LEASE_POLL: Duration = Duration::from_secs(1);
/// Another replica took a key over while some of its events are still ours: ask again after.
const TAKEN_OVER_POLL: Duration = Duration::from_millis(200);

/// What a run did, for the demo's reconciliation table and for tests; and how it is doing now,
/// for `/readyz`.
#[derive(Debug, Default)]
pub struct RunStats {
    pub consumed: AtomicU64,
    pub delivered: AtomicU64,
    pub already_delivered: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub readiness: Arc<Readiness>,
    /// What the admin server's status page shows.
    pub status: Arc<StatusBoard>,
}

impl RunStats {
    /// What the admin server's routes read for this run.
    pub fn admin_state(&self) -> AdminState {
        AdminState::new(self.readiness.clone(), self.status.clone())
    }

    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.consumed.load(Ordering::Relaxed),
            self.delivered.load(Ordering::Relaxed),
            self.already_delivered.load(Ordering::Relaxed),
            self.dead_lettered.load(Ordering::Relaxed),
        )
    }
}

/// What the protocol needs of the source: whether this process still owns an event's
/// partition (under the generation it was read in), settling an event, and a signal after each
/// revocation. The Kafka source is one; the protocol's tests use one in memory.
pub trait Ownership: Send + Sync + 'static {
    fn owns(&self, source: &SourceRef, generation: u64) -> bool;
    /// The event is delivered or dead-lettered: its offset may be committed once the ones
    /// before it are.
    fn settle(&self, source: &SourceRef, generation: u64);
    /// Changes after every revocation.
    fn revocations(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// Where refused events go, once per source offset (see `ack::deadletter`): returns when the
/// letter is durable. The dead-letter topic's writer is one; the protocol's tests keep letters
/// in memory.
pub trait DeadLetters: Send + Sync + 'static {
    fn write_once<'a>(
        &'a self,
        letter: DeadLetter<'a>,
        ledger: Option<&'a Ledger>,
    ) -> futures::future::BoxFuture<'a, Written>;

    /// Waits (at most `timeout`) for letters still buffered to be written: at the end of a run.
    fn flush(&self, _timeout: Duration) {}
}

impl DeadLetters for DeadLetterWriter {
    fn write_once<'a>(
        &'a self,
        letter: DeadLetter<'a>,
        ledger: Option<&'a Ledger>,
    ) -> futures::future::BoxFuture<'a, Written> {
        Box::pin(DeadLetterWriter::write_once(self, letter, ledger))
    }

    fn flush(&self, timeout: Duration) {
        DeadLetterWriter::flush(self, timeout)
    }
}

/// Everything the delivery tasks share.
pub struct LedgeredDelivery {
    pub runner: DeliveryRunner,
    pub dead_letters: Arc<dyn DeadLetters>,
    pub ledger: Option<Ledger>,
    pub source: Arc<dyn Ownership>,
    pub stats: Arc<RunStats>,
    pub per_contract_metrics: bool,
    /// Deliveries are pre-aggregated: the ledger maps each event to its aggregate.
    pub aggregating: bool,
}

/// What a claim's answer leads to.
enum AfterClaim {
    /// Another owner holds the key, or a takeover lost a race: claim again.
    Again,
    /// One outcome per item; `None` when another owner took the delivery over (or the fence
    /// stopped the send).
    Outcomes(Option<Vec<ItemOutcome>>),
}

/// Runs `op` until the ledger answers. A delivery never goes on without the ledger's word: a
/// ledger that does not answer holds it (logged at each try, [`LEDGER_RETRY`] apart).
pub(super) async fn until_ledger_answers<T, F, Fut>(
    key: &DeliveryKey,
    holding: &str,
    mut op: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, LedgerError>>,
{
    loop {
        match op().await {
            Ok(answer) => return answer,
            Err(e) => {
                tracing::error!(error = %e, delivery_key = %key, "ledger unavailable; {holding}");
                tokio::time::sleep(LEDGER_RETRY).await;
            }
        }
    }
}

/// Waits (at most [`LEASE_POLL`]) when another owner's lease on `claim` still runs; true when
/// it waited, and the caller should ask the ledger again.
async fn waited_for_lease(claim: &Claim, ledger: &Ledger) -> bool {
    match claim.lease_left(ledger.lease()) {
        Some(left) => {
            tokio::time::sleep(left.min(LEASE_POLL)).await;
            true
        }
        None => false,
    }
}

impl LedgeredDelivery {
    /// Starts one task per delivery in `tasks`. Each waits for its place in `window` first,
    /// then claims, and waits for a request permit before its first request (both first come,
    /// first served: sends start in about the order the partition gave its events).
    pub fn spawn(
        self: &Arc<Self>,
        window: &Arc<Permits>,
        tasks: &mut JoinSet<()>,
        deliveries: Vec<Delivery>,
    ) {
        for delivery in deliveries {
            metrics::histogram!("meterflow_batch_events").record(delivery.items.len() as f64);
            let this = self.clone();
            let window = window.clone();
            tasks.spawn(async move {
                let _place = window.acquire(&delivery).await;
                // Boxed, so that a task waiting for its place holds its delivery and no more:
                // the send's own state is about 1.8 KiB, and up to `batch.max_in_flight`
                // deliveries wait (36 MiB of 20 000 P1 tasks before, at the old default budget).
                Box::pin(this.deliver_guarded(delivery)).await;
            });
        }
    }

    /// Delivers; a panic (a bug) dead-letters the delivery's events instead of pinning their
    /// partition.
    async fn deliver_guarded(&self, delivery: Delivery) {
        let delivered = std::panic::AssertUnwindSafe(self.deliver(&delivery)).catch_unwind();
        if let Err(panic) = delivered.await {
            self.delivery_died(&delivery, panic_text(&*panic)).await;
        }
    }

    /// An event refused before delivery (decode, validation, pricing): dead-letter it, then
    /// settle its offset.
    /// Dead-letters an event that failed decoding or pricing. Its letter carries no ids (the
    /// event has none meterflow accepted); the ledger records `traced_id`, the id read from
    /// the payload if it had a usable one, for `meterflow trace`.
    pub async fn reject(&self, raw: &RawMessage, rejection: &Rejection, traced_id: Option<String>) {
        let letter = DeadLetter {
            raw,
            rejection,
            provider_answer: None,
            event_id: None,
            delivery_key: None,
            traced_event_id: traced_id.as_deref(),
        };
        self.write_dead_letter(letter).await;
        self.source.settle(&raw.source, raw.generation);
    }

    async fn deliver(&self, delivery: &Delivery) {
        match &self.ledger {
            Some(ledger) if self.aggregating => self.deliver_aggregate(ledger, delivery).await,
            _ => self.deliver_per_event(delivery).await,
        }
    }

    /// A delivery task panicked (a bug): count it, and dead-letter its events with
    /// `internal_error` so that their partition does not stall. Whether the provider got them is
    /// unknown; a replay goes through the ledger, which skips what was delivered.
    async fn delivery_died(&self, delivery: &Delivery, panic: String) {
        let key = &delivery.key;
        metrics::counter!("meterflow_delivery_task_failures_total", "stage" => "delivery")
            .increment(1);
        tracing::error!(delivery_key = %key, events = delivery.items.len(), %panic, "a delivery task panicked (a bug, please report it); its events are dead-lettered as internal_error");
        let rejection = Rejection::new(
            RejectReason::InternalError,
            format!(
                "meterflow's delivery task failed ({panic}); the event may or may not have \
                 reached the provider: replay it after the fix (the ledger skips what was \
                 delivered)"
            ),
        );
        for item in &delivery.items {
            let raw = &item.raw;
            self.dead_letter(raw, &rejection, None, Some((&item.usage.event_id, key)))
                .await;
            self.source.settle(&raw.source, raw.generation);
        }
    }

    /// Resolves once none of the items' partitions is owned by this process any more.
    async fn revoked(&self, items: &[DeliveryItem]) {
        let mut revocations = self.source.revocations();
        while self.owns_any(items) {
            if revocations.changed().await.is_err() {
                // The source is gone: shutdown ends this task.
                std::future::pending::<()>().await;
            }
        }
    }

    fn owns_any(&self, items: &[DeliveryItem]) -> bool {
        items
            .iter()
            .any(|i| self.source.owns(&i.raw.source, i.raw.generation))
    }

    /// What a claim's answer leads to: delivered → settle; rejected → dead-letter; another
    /// owner's live lease → wait and ask again; sending with the lease run out (unknown
    /// outcome) → take it over and reconcile before re-sending; claimed → send.
    async fn act_on_claim(
        &self,
        ledger: &Ledger,
        delivery: &Delivery,
        claim: Claim,
        asked: Instant,
    ) -> AfterClaim {
        let n = delivery.items.len();
        if waited_for_lease(&claim, ledger).await {
            return AfterClaim::Again;
        }
        let (updated_at_ms, unknown_since, asked) = match claim {
            Claim::Claimed { updated_at_ms } => (updated_at_ms, None, asked),
            Claim::Delivered { receipt } => {
                metrics::counter!("meterflow_events_deduplicated_total", "source" => "ledger")
                    .increment(n as u64);
                return AfterClaim::Outcomes(Some(vec![
                    ItemOutcome::AlreadyDelivered { receipt };
                    n
                ]));
            }
            Claim::Voided { receipt } => {
                tracing::info!(delivery_key = %delivery.key, %receipt, events = n, "voided by `meterflow void`: settled without billing it again (a void with --rebill lets it be billed again)");
                return AfterClaim::Outcomes(Some(vec![
                    ItemOutcome::AlreadyDelivered { receipt };
                    n
                ]));
            }
            Claim::Rejected { answer } => {
                let rejection = Rejection::new(
                    RejectReason::ProviderRejected,
                    format!("refused earlier by the provider: {answer}"),
                );
                return AfterClaim::Outcomes(Some(vec![
                    ItemOutcome::DeadLetter {
                        rejection,
                        provider_answer: Some(answer),
                    };
                    n
                ]));
            }
            Claim::Sending {
                first_sent_at,
                updated_at_ms,
                ..
            } => {
                let asked = Instant::now();
                match ledger.touch(&delivery.key, updated_at_ms).await {
                    Ok(Some(next)) => {
                        tracing::info!(delivery_key = %delivery.key, %first_sent_at, "outcome of an earlier send unknown; reconciling before re-sending");
                        (next, Some(first_sent_at), asked)
                    }
                    // Another owner renewed it first, or the ledger did not answer.
                    Ok(None) | Err(_) => return AfterClaim::Again,
                }
            }
        };
        let fence = SendFence {
            source: &*self.source,
            items: &delivery.items,
            lease: Some(LedgerLease::new(
                ledger,
                &delivery.key,
                updated_at_ms,
                asked,
            )),
        };
        AfterClaim::Outcomes(self.runner.deliver(delivery, unknown_since, &fence).await)
    }

    /// Counts, logs and dead-letters each item by its outcome (not settling it yet); returns the
    /// final state for the delivery's ledger entry.
    async fn report<'i>(
        &self,
        key: &DeliveryKey,
        outcomes: impl Iterator<Item = (&'i DeliveryItem, ItemOutcome)>,
    ) -> Option<(bool, String)> {
        let mut final_state: Option<(bool, String)> = None;
        for (item, outcome) in outcomes {
            match outcome {
                ItemOutcome::Delivered { receipt } => {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("meterflow_events_delivered_total", "sink" => self.runner.sink_name())
                        .increment(1);
                    if self.per_contract_metrics {
                        contract_quantity(item);
                    }
                    tracing::debug!(
                        event_id = %item.usage.event_id,
                        partition = item.raw.source.partition,
                        offset = item.raw.source.offset,
                        delivery_key = %key,
                        %receipt,
                        "delivered"
                    );
                    final_state = Some((true, receipt));
                }
                ItemOutcome::AlreadyDelivered { receipt } => {
                    self.stats.already_delivered.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        event_id = %item.usage.event_id,
                        partition = item.raw.source.partition,
                        offset = item.raw.source.offset,
                        delivery_key = %key,
                        %receipt,
                        "already delivered; settled without re-sending"
                    );
                    final_state = Some((true, receipt));
                }
                ItemOutcome::DeadLetter {
                    rejection,
                    provider_answer,
                } => {
                    if final_state.is_none() {
                        final_state = Some((false, provider_answer.clone().unwrap_or_default()));
                    }
                    self.dead_letter(
                        &item.raw,
                        &rejection,
                        provider_answer.as_deref(),
                        Some((&item.usage.event_id, key)),
                    )
                    .await;
                }
            }
        }
        final_state
    }

    /// Writes the dead letter, once per source offset (see `ack::deadletter`); returns when it
    /// is in the topic, so the caller may settle the event.
    async fn dead_letter(
        &self,
        raw: &RawMessage,
        rejection: &Rejection,
        provider_answer: Option<&str>,
        ids: Option<(&String, &DeliveryKey)>,
    ) {
        let letter = DeadLetter {
            raw,
            rejection,
            provider_answer,
            event_id: ids.map(|(id, _)| id.as_str()),
            delivery_key: ids.map(|(_, k)| k),
            traced_event_id: ids.map(|(id, _)| id.as_str()),
        };
        self.write_dead_letter(letter).await;
    }

    async fn write_dead_letter(&self, letter: DeadLetter<'_>) {
        let reason = letter.rejection.reason;
        match self
            .dead_letters
            .write_once(letter, self.ledger.as_ref())
            .await
        {
            Written::Now | Written::Found => {
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                self.stats.status.dead_lettered(reason.as_str());
            }
            Written::Before => {}
        }
    }
}

/// The message of a caught panic, if it has one.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// Where each item came from and what it bills, recorded with the claim (`meterflow trace`,
/// `void`, `audit`).
fn origins(items: &[DeliveryItem]) -> Vec<EventOrigin> {
    items
        .iter()
        .map(|i| EventOrigin {
            event_id: i.usage.event_id.clone(),
            source: i.raw.source.clone(),
            customer: match &i.usage.customer {
                crate::event::CustomerRef::ContractId(c) => format!("contract:{c}"),
                crate::event::CustomerRef::ExternalId(e) => format!("external:{e}"),
            },
            component_id: i.usage.component_id.clone(),
            quantity: i.usage.quantity,
            digest: i.usage.content_digest(),
        })
        .collect()
}

/// How the ledger names an item in its id-conflict answer.
fn content(item: &DeliveryItem) -> EventContent {
    EventContent {
        event_key: DeliveryKey::for_event(&item.usage.event_id),
        digest: item.usage.content_digest(),
    }
}

fn id_conflict() -> Rejection {
    Rejection::new(
        RejectReason::IdConflict,
        "an earlier event with this id had other contents (customer, metric, quantity, \
         timestamp or attributes); the earlier event keeps the id. Give every event an id of \
         its own, then replay this one under a new id",
    )
}

fn contract_quantity(item: &DeliveryItem) {
    let contract = match &item.usage.customer {
        crate::event::CustomerRef::ContractId(c) | crate::event::CustomerRef::ExternalId(c) => c,
    };
    let q: f64 = item.usage.quantity.try_into().unwrap_or(0.0);
    let label = crate::telemetry::bounded_contract_label(contract);
    // A metric, not money: f64 is fine here; the ledger and the provider hold exact decimals.
    metrics::gauge!("meterflow_contract_delivered_quantity_total", "contract" => label)
        .increment(q);
}
