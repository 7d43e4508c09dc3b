//! Wiring: Kafka source → decode → price → batch → deliver → acknowledge; and the drain on
//! shutdown. Each stage lives in its own module; this file only connects them.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::task::JoinSet;

use crate::ack::deadletter::{DeadLetter, DeadLetterWriter, Written};
use crate::ack::ledger::{
    AggregateClaim, Claim, EarlierAggregate, EventContent, EventOrigin, Ledger, LedgerStore,
};
use crate::admin::readiness::{ProviderProbe, Readiness};
use crate::batch::{self, Batcher, Bucket, Grouping};
use crate::config::{Config, SinkKind};
use crate::decode::EventDecoder;
use crate::deliver::billingrails::BillingrailsSink;
use crate::deliver::billwerk::BillwerkSink;
use crate::deliver::permits::Permits;
use crate::deliver::ratelimit::RateLimiter;
use crate::deliver::runner::{AttemptGuard, DeliveryRunner};
use crate::deliver::{Delivery, DeliveryItem, ItemOutcome, Sink};
use crate::event::{DeliveryKey, RawMessage, RejectReason, Rejection};
use crate::pricing::PriceBook;
use crate::source::{KafkaSource, SourceHandle, SourceOptions};

mod aggregate;

/// What a run did, for the demo's reconciliation table and for tests; and how it is doing now,
/// for `/readyz`.
#[derive(Debug, Default)]
pub struct RunStats {
    pub consumed: AtomicU64,
    pub delivered: AtomicU64,
    pub already_delivered: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub readiness: Arc<Readiness>,
}

impl RunStats {
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.consumed.load(Ordering::Relaxed),
            self.delivered.load(Ordering::Relaxed),
            self.already_delivered.load(Ordering::Relaxed),
            self.dead_lettered.load(Ordering::Relaxed),
        )
    }
}

/// Everything the delivery tasks share.
struct Stages {
    runner: DeliveryRunner,
    dead_letters: DeadLetterWriter,
    ledger: Option<Ledger>,
    source: SourceHandle,
    stats: Arc<RunStats>,
    per_contract_metrics: bool,
    /// Deliveries are pre-aggregated: the ledger maps each event to its aggregate.
    aggregating: bool,
}

/// What is checked right before every POST (after the pacer and the 429 gate let it go, which
/// can take longer than any lease): that this process may still send the delivery.
///
/// - Ownership: at least one of its events' partitions is still assigned to this process
///   under the generation it was read in. When none is, the new owners redeliver them.
/// - The ledger's lease (PostgreSQL, several replicas): the key's stamp is renewed
///   (compare-and-set) unless this process renewed it less than [`FRESH_STAMP`] ago. Another
///   replica takes a key over only after the lease (request timeout + 5 s) has run out past the
///   stamp, by the database's clock; so a send that starts within `FRESH_STAMP` of a stamp
///   ends before the lease can. A replica frozen (SIGSTOP, a long pause) past its lease finds
///   its stamp replaced when it wakes, and does not send.
struct SendFence<'a> {
    source: &'a SourceHandle,
    items: &'a [DeliveryItem],
    lease: Option<LedgerLease<'a>>,
}

/// See [`SendFence`]: how recent a stamp must be to send without renewing it.
const FRESH_STAMP: Duration = Duration::from_secs(1);

/// The lease on a claimed delivery key.
struct LedgerLease<'a> {
    ledger: &'a Ledger,
    key: &'a DeliveryKey,
    /// The stamp, and when (this process's monotonic clock) it was asked for: never later than
    /// the moment the ledger wrote it.
    stamp: std::sync::Mutex<(i64, Instant)>,
}

impl LedgerLease<'_> {
    /// True while the stamp is ours: fresh, or renewed just now.
    async fn renew_if_stale(&self) -> bool {
        if self.ledger.lease().is_zero() {
            // SQLite: one replica, and one task per key in it (`Ledger::local`).
            return true;
        }
        let (expected, asked) = *self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if asked.elapsed() < FRESH_STAMP {
            return true;
        }
        loop {
            let asked = Instant::now();
            match self.ledger.touch(self.key, expected).await {
                Ok(Some(next)) => {
                    *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = (next, asked);
                    return true;
                }
                Ok(None) => return false,
                Err(e) => {
                    tracing::error!(error = %e, delivery_key = %self.key, "ledger unavailable; not sending until it answers");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

impl SendFence<'_> {
    fn owned(&self) -> bool {
        self.items
            .iter()
            .any(|i| self.source.owns(&i.raw.source, i.raw.generation))
    }
}

impl AttemptGuard for SendFence<'_> {
    fn may_send(&self) -> futures::future::BoxFuture<'_, bool> {
        Box::pin(async move {
            if !self.owned() {
                return false;
            }
            match &self.lease {
                Some(lease) => lease.renew_if_stale().await,
                None => true,
            }
        })
    }
}

/// How a delivery through the ledger ended.
enum Ledgered {
    /// One outcome per item; `None` when another owner took the delivery over.
    Outcomes(Option<Vec<ItemOutcome>>),
    /// An aggregate some of whose events were sent earlier in these aggregates; nothing sent.
    Earlier(Vec<EarlierAggregate>),
    /// These events (their per-event keys) reuse an id recorded earlier with other contents;
    /// nothing was claimed or sent.
    IdConflict(Vec<EventContent>),
}

/// Builds the sink a pipeline delivers through, given the shared rate limiter.
pub type SinkFactory = Box<dyn FnOnce(Arc<RateLimiter>) -> Arc<dyn Sink> + Send>;

/// Runs the pipeline until `shutdown` resolves, then drains and returns.
pub async fn run(
    config: Config,
    stats: Arc<RunStats>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with_sink(config, stats, shutdown, None).await
}

/// [`run`], delivering through the sink `custom_sink` builds instead of the configured one: for
/// tests that need a provider misbehaving in ways no emulator can (a sink that panics).
pub async fn run_with_sink(
    config: Config,
    stats: Arc<RunStats>,
    shutdown: impl Future<Output = ()>,
    custom_sink: Option<SinkFactory>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let decoder = EventDecoder::for_sink(config.input.clone(), config.sink.kind);
    let prices = PriceBook::new(&config).map_err(|problems| {
        anyhow::anyhow!(
            "{}",
            problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    let limiter = Arc::new(RateLimiter::new(&config.rate_limit).for_sink(config.sink.kind.name()));
    let sink: Arc<dyn Sink> = match (custom_sink, config.sink.kind) {
        (Some(make), _) => make(limiter.clone()),
        (None, SinkKind::Billwerk) => Arc::new(
            BillwerkSink::new(&config.sink, limiter.clone())?
                .with_readiness(stats.readiness.clone()),
        ),
        (None, SinkKind::Billingrails) => Arc::new(
            BillingrailsSink::new(&config.sink, limiter.clone())?
                .with_readiness(stats.readiness.clone()),
        ),
    };
    let grouping = grouping_for(&config);
    let properties: Vec<(String, String)> = config
        .kafka
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let dead_letters = DeadLetterWriter::new(
        &config.kafka.brokers,
        &config.kafka.dead_letter_topic,
        &properties,
        config.retry.clone(),
    )?;
    // A missing or forbidden dead-letter topic stops the start, before anything is consumed
    // (while a SIGTERM during the check still ends the run cleanly).
    tokio::select! {
        checked = dead_letters.check_topic() => checked?,
        _ = &mut shutdown => {
            tracing::info!("stopped during start-up, before anything was read");
            return Ok(());
        }
    }
    // The ledger before the source: nothing is read before claims can be made. A ledger that
    // does not answer yet holds the start, and a SIGTERM meanwhile stops it cleanly.
    let ledger = tokio::select! {
        ledger = open_ledger(&config) => ledger?,
        _ = &mut shutdown => {
            tracing::info!("stopped during start-up, before anything was read");
            return Ok(());
        }
    };
    let (source, mut messages) = KafkaSource::start(SourceOptions {
        brokers: config.kafka.brokers.clone(),
        group_id: config.kafka.group_id.clone(),
        topics: config.kafka.topics.clone(),
        session_timeout: config.kafka.session_timeout,
        drain_timeout: config.kafka.drain_timeout,
        commit_interval: config.kafka.commit_interval,
        max_in_flight: config.batch.max_in_flight,
        properties,
    })?;
    let source_handle = source.handle();
    let readiness_watch = crate::admin::readiness::watch(
        stats.readiness.clone(),
        source_handle.clone(),
        ProviderProbe::new(&config.sink)?,
        config.kafka.stuck_after,
    );

    // A closed 429 gate pauses the partitions instead of buffering.
    let mut gate = limiter.gate().subscribe();
    let gate_source = source_handle.clone();
    let gate_watch = tokio::spawn(async move {
        loop {
            let closed = gate.borrow_and_update().is_some();
            gate_source.hold(closed);
            if gate.changed().await.is_err() {
                break;
            }
        }
    });

    let stages = Arc::new(Stages {
        runner: DeliveryRunner::new(sink, limiter.clone(), config.retry.clone()),
        dead_letters,
        ledger,
        source: source_handle.clone(),
        stats: stats.clone(),
        per_contract_metrics: config.admin.per_contract_metrics,
        aggregating: matches!(grouping, Grouping::Aggregate { .. }),
    });
    let concurrency = Arc::new(Permits::new(
        config.sink.concurrency,
        config.sink.contract_concurrency(),
    ));
    let mut tasks = JoinSet::new();
    let mut batcher = Batcher::new(config.batch.max_events, config.batch.max_wait);
    let mut stopping = false;
    let mut source = Some(source);
    let mut source_stopped: Option<tokio::task::JoinHandle<()>> = None;

    loop {
        let flush_at = batcher.deadline().map(tokio::time::Instant::from_std);
        tokio::select! {
            message = messages.recv() => {
                let Some(raw) = message else { break };
                stats.consumed.fetch_add(1, Ordering::Relaxed);
                match decoder.decode(&raw.payload).and_then(|event| prices.price(event)) {
                    Ok(usage) => {
                        let item = DeliveryItem { usage, raw };
                        if grouping == Grouping::PerEvent {
                            dispatch(&stages, &concurrency, &mut tasks, batch::group(vec![item], grouping));
                        } else if let Some(full) = batcher.push(item, Instant::now()) {
                            dispatch(&stages, &concurrency, &mut tasks, batch::group(full, grouping));
                        }
                    }
                    Err(rejection) => {
                        let stages = stages.clone();
                        // For `meterflow trace`: the id, if the event has a usable one.
                        let traced_id = decoder.event_id(&raw.payload);
                        tasks.spawn(async move {
                            stages.dead_letter_traced(&raw, &rejection, traced_id.as_deref()).await;
                            stages.source.settle(&raw.source, raw.generation);
                        });
                    }
                }
            }
            _ = async {
                match flush_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            }, if flush_at.is_some() => {
                if let Some(due) = batcher.poll(Instant::now()) {
                    dispatch(&stages, &concurrency, &mut tasks, batch::group(due, grouping));
                }
            }
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined {
                    if e.is_panic() {
                        // Only a dead-letter write itself can get here (a delivery's panic is
                        // caught in `dispatch`). Its events stay unsettled: the partition holds
                        // there (lag alerts fire) and a restart redelivers them. Never skipped.
                        metrics::counter!("meterflow_delivery_task_failures_total", "stage" => "dead_letter")
                            .increment(1);
                        tracing::error!(error = %e, "a dead-letter task panicked; its partition cannot advance until a restart");
                    }
                }
            }
            _ = &mut shutdown, if !stopping => {
                stopping = true;
                tracing::info!("shutting down: no new fetches; draining in-flight work");
                // The source thread drains (bounded by kafka.drain_timeout), commits and leaves
                // the group; meanwhile this loop keeps delivering what was read.
                let flush = batcher.take();
                if !flush.is_empty() {
                    dispatch(&stages, &concurrency, &mut tasks, batch::group(flush, grouping));
                }
                // The source is present until shutdown, which happens once.
                if let Some(s) = source.take() {
                    source_stopped = Some(tokio::task::spawn_blocking(move || s.shutdown()));
                }
            }
        }
    }
    // The source thread has ended (its channel closed): it settled and committed what it could.
    if let Some(handle) = source_stopped {
        let _ = handle.await;
    } else if let Some(s) = source.take() {
        let _ = tokio::task::spawn_blocking(move || s.shutdown()).await;
    }
    let unfinished = tasks.len();
    tasks.abort_all();
    if unfinished > 0 {
        tracing::warn!(
            unfinished,
            "deliveries still running at the drain deadline were abandoned; their events will be redelivered"
        );
    }
    gate_watch.abort();
    readiness_watch.abort();
    stages.dead_letters.flush(Duration::from_secs(5));
    tracing::info!("stopped");
    Ok(())
}

/// How long a replica leaves another's "sending" claim alone: no time on SQLite (one replica,
/// so a "sending" entry can only be a dead process's), one request timeout plus a margin on
/// PostgreSQL.
pub fn ledger_lease(config: &Config) -> Duration {
    if config.ledger.url.trim().starts_with("sqlite:") {
        Duration::ZERO
    } else {
        config.sink.request_timeout + Duration::from_secs(5)
    }
}

/// `[ledger] url`: SQLite (single replica: no lease needed, a "sending" entry can only be a
/// dead process's), PostgreSQL (several replicas: leave another owner's claim alone for one
/// request timeout plus a margin), or `none`.
async fn open_ledger(config: &Config) -> anyhow::Result<Option<Ledger>> {
    let url = config.ledger.url.trim();
    if url.is_empty() || url == "none" {
        tracing::warn!("delivery ledger disabled: a crash after a delivery may bill it twice");
        return Ok(None);
    }
    let lease = ledger_lease(config);
    let store = LedgerStore::connect(url)
        .await
        .map_err(|e| anyhow::anyhow!("ledger.url: cannot open the delivery ledger: {e}"))?;
    // Pruned hourly, never past what the group has committed (`ack/retention.rs`).
    crate::ack::retention::spawn_pruner(
        store.clone(),
        config.ledger.retention,
        crate::ack::retention::KafkaGroupOffsets::new(&config.kafka)?,
        Duration::from_secs(3600),
    );
    Ok(Some(Ledger::start(store, lease)))
}

fn grouping_for(config: &Config) -> Grouping {
    match config.sink.kind {
        SinkKind::Billingrails => Grouping::Batches {
            size: config.sink.billingrails.batch_size.clamp(1, 100),
        },
        SinkKind::Billwerk if config.sink.aggregate.enabled => Grouping::Aggregate {
            bucket: Bucket::parse(&config.sink.aggregate.bucket).unwrap_or(Bucket::Hour),
        },
        SinkKind::Billwerk => Grouping::PerEvent,
    }
}

fn dispatch(
    stages: &Arc<Stages>,
    concurrency: &Arc<Permits>,
    tasks: &mut JoinSet<()>,
    deliveries: Vec<Delivery>,
) {
    for delivery in deliveries {
        metrics::histogram!("meterflow_batch_events").record(delivery.items.len() as f64);
        let stages = stages.clone();
        let concurrency = concurrency.clone();
        tasks.spawn(async move {
            // Permits are handed out first come, first served: sends keep partition order.
            let _permit = concurrency.acquire(&delivery).await;
            // What a dead letter needs if the delivery dies: a bug must not pin the partition.
            let key = delivery.key.clone();
            let carried: Vec<(RawMessage, String)> = delivery
                .items
                .iter()
                .map(|i| (i.raw.clone(), i.usage.event_id.clone()))
                .collect();
            let delivered = std::panic::AssertUnwindSafe(stages.deliver(delivery)).catch_unwind();
            if let Err(panic) = delivered.await {
                stages
                    .delivery_died(&key, &carried, panic_text(&*panic))
                    .await;
            }
        });
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

impl Stages {
    async fn deliver(&self, delivery: Delivery) {
        if self.aggregating {
            if let Some(ledger) = &self.ledger {
                return self.deliver_aggregate(ledger, delivery).await;
            }
        }
        let key = delivery.key.clone();
        let items = delivery.items.clone();
        let delivering = async {
            loop {
                let outcomes = match &self.ledger {
                    None => {
                        let fence = SendFence {
                            source: &self.source,
                            items: &delivery.items,
                            lease: None,
                        };
                        self.runner.deliver(delivery.clone(), None, &fence).await
                    }
                    Some(ledger) => {
                        // One task per key in this process (a partition revoked and re-assigned can
                        // bring the same events back while the first task still runs).
                        let _turn = ledger.local(&key).await;
                        match self
                            .deliver_with_ledger(ledger, delivery.clone(), false)
                            .await
                        {
                            Ledgered::Outcomes(outcomes) => outcomes,
                            Ledgered::IdConflict(keys) => break Err(keys),
                            // Only aggregate claims name earlier aggregates.
                            Ledgered::Earlier(_) => None,
                        }
                    }
                };
                match outcomes {
                    Some(outcomes) => break Ok(Some(outcomes)),
                    // Revoked: the new owners redeliver these events.
                    None if !self.owns_any(&items) => break Ok(None),
                    // Another replica took the key over while some of its events are still ours:
                    // claim again; the ledger answers with that replica's outcome (or its lease).
                    None => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        };
        // A revoked partition's work stops where it is (waiting for the pacer, the gate, a
        // backoff, or a request); its events stay unsettled and the new owner redelivers them.
        let outcomes = tokio::select! {
            outcomes = delivering => match outcomes {
                Ok(Some(outcomes)) => outcomes,
                Ok(None) => return,
                Err(conflicts) => return self.deliver_without_conflicts(delivery, &conflicts).await,
            },
            () = self.revoked(&items) => {
                metrics::counter!("meterflow_deliveries_cancelled_total", "reason" => "revoked").increment(1);
                tracing::info!(delivery_key = %key, events = items.len(), "partition revoked: delivery cancelled; the new owner redelivers its events");
                return;
            }
        };
        let final_state = self
            .report(&key, items.iter().zip(outcomes.iter().cloned()))
            .await;
        // Written after every dead letter of the delivery is durable: a "delivered" entry must
        // never hide an item that still owed its dead letter.
        if let (Some(ledger), Some((delivered, receipt))) = (&self.ledger, final_state) {
            ledger.finish(&key, delivered, receipt);
        }
        for item in &items {
            self.source.settle(&item.raw.source, item.raw.generation);
        }
    }

    /// A delivery task panicked (a bug): count it, and dead-letter its events with
    /// `internal_error` so that their partition does not stall. Whether the provider got them is
    /// unknown; a replay goes through the ledger, which skips what was delivered.
    async fn delivery_died(
        &self,
        key: &DeliveryKey,
        carried: &[(RawMessage, String)],
        panic: String,
    ) {
        metrics::counter!("meterflow_delivery_task_failures_total", "stage" => "delivery")
            .increment(1);
        tracing::error!(delivery_key = %key, events = carried.len(), %panic, "a delivery task panicked (a bug, please report it); its events are dead-lettered as internal_error");
        let rejection = Rejection::new(
            RejectReason::InternalError,
            format!(
                "meterflow's delivery task failed ({panic}); the event may or may not have \
                 reached the provider: replay it after the fix (the ledger skips what was \
                 delivered)"
            ),
        );
        for (raw, event_id) in carried {
            self.dead_letter(raw, &rejection, None, Some((event_id, key)))
                .await;
            self.source.settle(&raw.source, raw.generation);
        }
    }

    /// Dead-letters (`id_conflict`) the items that reuse an earlier event's id with other
    /// contents, and delivers the rest under the key of what is left.
    async fn deliver_without_conflicts(&self, delivery: Delivery, conflicts: &[EventContent]) {
        let (bad, good): (Vec<DeliveryItem>, Vec<DeliveryItem>) = delivery
            .items
            .into_iter()
            .partition(|i| conflicts.contains(&content(i)));
        let rejection = id_conflict();
        self.report(
            &delivery.key,
            bad.iter().map(|i| {
                (
                    i,
                    ItemOutcome::DeadLetter {
                        rejection: rejection.clone(),
                        provider_answer: None,
                    },
                )
            }),
        )
        .await;
        for item in &bad {
            self.source.settle(&item.raw.source, item.raw.generation);
        }
        if !good.is_empty() {
            let rest = Delivery {
                key: DeliveryKey::for_events(good.iter().map(|i| i.usage.event_id.as_str())),
                items: good,
            };
            Box::pin(self.deliver(rest)).await;
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

    /// Claim the key, then: delivered → settle; rejected → dead-letter; sending (unknown
    /// outcome) → wait out the other owner's lease, take over, reconcile before re-sending.
    ///
    /// An aggregate's claim also maps its events to its key; when some were sent earlier in
    /// other aggregates it answers `Earlier` without sending (see `aggregate.rs`).
    async fn deliver_with_ledger(
        &self,
        ledger: &Ledger,
        delivery: Delivery,
        aggregate: bool,
    ) -> Ledgered {
        let n = delivery.items.len();
        loop {
            let mut asked = Instant::now();
            let claimed = if aggregate {
                let event_keys = delivery
                    .items
                    .iter()
                    .map(|i| DeliveryKey::for_event(&i.usage.event_id))
                    .collect();
                match ledger
                    .claim_aggregate_checked(
                        &delivery.key,
                        event_keys,
                        contents(&delivery.items),
                        origins(&delivery.items),
                    )
                    .await
                {
                    Ok(AggregateClaim::Own(c)) => Ok(c),
                    Ok(AggregateClaim::IdConflict(keys)) => return Ledgered::IdConflict(keys),
                    Ok(AggregateClaim::Earlier(earlier)) => return Ledgered::Earlier(earlier),
                    Ok(AggregateClaim::Contended) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Err(e) => Err(e),
                }
            } else {
                match ledger
                    .claim_checked(
                        &delivery.key,
                        n,
                        contents(&delivery.items),
                        origins(&delivery.items),
                    )
                    .await
                {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(keys)) => return Ledgered::IdConflict(keys),
                    Err(e) => Err(e),
                }
            };
            let claim = match claimed {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, delivery_key = %delivery.key, "ledger unavailable; not sending until it answers");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Some(left) = claim.lease_left(ledger.lease()) {
                // Another replica may still be sending it: wait out its lease.
                tokio::time::sleep(left.min(Duration::from_secs(1))).await;
                continue;
            }
            let (updated_at_ms, unknown_since) = match claim {
                Claim::Claimed { updated_at_ms } => (updated_at_ms, None),
                Claim::Delivered { receipt } => {
                    metrics::counter!("meterflow_events_deduplicated_total", "source" => "ledger")
                        .increment(n as u64);
                    return Ledgered::Outcomes(Some(vec![
                        ItemOutcome::AlreadyDelivered { receipt };
                        n
                    ]));
                }
                Claim::Voided { receipt } => {
                    tracing::info!(delivery_key = %delivery.key, %receipt, events = n, "voided by `meterflow void`: settled without billing it again (a void with --rebill lets it be billed again)");
                    return Ledgered::Outcomes(Some(vec![
                        ItemOutcome::AlreadyDelivered { receipt };
                        n
                    ]));
                }
                Claim::Rejected { answer } => {
                    let rejection = Rejection::new(
                        RejectReason::ProviderRejected,
                        format!("refused earlier by the provider: {answer}"),
                    );
                    return Ledgered::Outcomes(Some(vec![
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
                    asked = Instant::now();
                    match ledger.touch(&delivery.key, updated_at_ms).await {
                        Ok(Some(next)) => {
                            tracing::info!(delivery_key = %delivery.key, %first_sent_at, "outcome of an earlier send unknown; reconciling before re-sending");
                            (next, Some(first_sent_at))
                        }
                        Ok(None) | Err(_) => continue,
                    }
                }
            };
            let fence = SendFence {
                source: &self.source,
                items: &delivery.items,
                lease: Some(LedgerLease {
                    ledger,
                    key: &delivery.key,
                    stamp: std::sync::Mutex::new((updated_at_ms, asked)),
                }),
            };
            return Ledgered::Outcomes(
                self.runner
                    .deliver(delivery.clone(), unknown_since, &fence)
                    .await,
            );
        }
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

    /// [`Stages::dead_letter`] for an event that failed decoding: the letter carries no ids
    /// (the event has none meterflow accepted), the ledger records `traced_id` for `meterflow
    /// trace`.
    async fn dead_letter_traced(
        &self,
        raw: &RawMessage,
        rejection: &Rejection,
        traced_id: Option<&str>,
    ) {
        let letter = DeadLetter {
            raw,
            rejection,
            provider_answer: None,
            event_id: None,
            delivery_key: None,
            traced_event_id: traced_id,
        };
        self.write_dead_letter(letter).await;
    }

    async fn write_dead_letter(&self, letter: DeadLetter<'_>) {
        match self
            .dead_letters
            .write_once(letter, self.ledger.as_ref())
            .await
        {
            Written::Now | Written::Found => {
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
            Written::Before => {}
        }
    }
}

/// Where each item came from and whom it bills, recorded with the claim (`meterflow trace`).
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
        })
        .collect()
}

/// What each item carried, for the ledger's id-conflict check.
fn contents(items: &[DeliveryItem]) -> Vec<EventContent> {
    items.iter().map(content).collect()
}

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
