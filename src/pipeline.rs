//! Wiring: Kafka source → decode → price → batch → deliver → acknowledge; and the drain on
//! shutdown. Each stage lives in its own module; this file only connects them.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::ack::deadletter::{DeadLetter, DeadLetterWriter, Written};
use crate::ack::ledger::{AggregateClaim, Claim, EarlierAggregate, Ledger, LedgerStore};
use crate::admin::readiness::{ProviderProbe, Readiness};
use crate::batch::{self, Batcher, Bucket, Grouping};
use crate::config::{Config, SinkKind};
use crate::decode::EventDecoder;
use crate::deliver::billingrails::BillingrailsSink;
use crate::deliver::billwerk::BillwerkSink;
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

/// The lease on a claimed delivery key, renewed (compare-and-set) before every re-send.
struct LedgerLease<'a> {
    ledger: &'a Ledger,
    key: &'a DeliveryKey,
    updated_at_ms: std::sync::Mutex<i64>,
}

impl AttemptGuard for LedgerLease<'_> {
    fn may_send(&self) -> futures::future::BoxFuture<'_, bool> {
        Box::pin(async move {
            let expected = *self.updated_at_ms.lock().unwrap();
            loop {
                match self.ledger.touch(self.key, expected).await {
                    Ok(Some(next)) => {
                        *self.updated_at_ms.lock().unwrap() = next;
                        return true;
                    }
                    Ok(None) => return false,
                    Err(e) => {
                        tracing::error!(error = %e, delivery_key = %self.key, "ledger unavailable; not sending until it answers");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
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
}

/// Runs the pipeline until `shutdown` resolves, then drains and returns.
pub async fn run(
    config: Config,
    stats: Arc<RunStats>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let decoder = EventDecoder::new(config.input.clone());
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
    let sink: Arc<dyn Sink> = match config.sink.kind {
        SinkKind::Billwerk => Arc::new(
            BillwerkSink::new(&config.sink, limiter.clone())?
                .with_readiness(stats.readiness.clone()),
        ),
        SinkKind::Billingrails => Arc::new(
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
    tokio::pin!(shutdown);
    tokio::select! {
        checked = dead_letters.check_topic() => checked?,
        _ = &mut shutdown => return Ok(()),
    }
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
    let ledger = open_ledger(&config).await?;
    let readiness_watch = crate::admin::readiness::watch(
        stats.readiness.clone(),
        source_handle.clone(),
        ProviderProbe::new(&config.sink)?,
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
    let concurrency = Arc::new(Semaphore::new(config.sink.concurrency.max(1)));
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
                        tasks.spawn(async move {
                            stages.dead_letter(&raw, &rejection, None, None).await;
                            stages.source.settle(&raw.source, raw.generation);
                        });
                    }
                }
            }
            _ = async { tokio::time::sleep_until(flush_at.unwrap()).await }, if flush_at.is_some() => {
                if let Some(due) = batcher.poll(Instant::now()) {
                    dispatch(&stages, &concurrency, &mut tasks, batch::group(due, grouping));
                }
            }
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined {
                    if e.is_panic() {
                        // Its events stay unsettled: the partition holds there (lag alerts fire)
                        // and a restart redelivers them. Never skipped.
                        tracing::error!(error = %e, "a delivery task panicked; its partition cannot advance until a restart");
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
                let s = source.take().expect("source present until shutdown");
                source_stopped = Some(tokio::task::spawn_blocking(move || s.shutdown()));
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

/// `[ledger] url`: SQLite (single replica: no lease needed, a "sending" entry can only be a
/// dead process's), PostgreSQL (several replicas: leave another owner's claim alone for one
/// request timeout plus a margin), or `none`.
async fn open_ledger(config: &Config) -> anyhow::Result<Option<Ledger>> {
    let url = config.ledger.url.trim();
    if url.is_empty() || url == "none" {
        tracing::warn!("delivery ledger disabled: a crash after a delivery may bill it twice");
        return Ok(None);
    }
    let lease = if url.starts_with("sqlite:") {
        Duration::ZERO
    } else {
        config.sink.request_timeout + Duration::from_secs(5)
    };
    let store = LedgerStore::connect(url)
        .await
        .map_err(|e| anyhow::anyhow!("ledger.url: cannot open the delivery ledger: {e}"))?;
    let retention = config.ledger.retention;
    let pruner = store.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(3600));
        loop {
            every.tick().await;
            match pruner.prune(retention).await {
                Ok(n) if n > 0 => {
                    tracing::info!(pruned = n, "ledger entries past retention removed")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "ledger pruning failed"),
            }
        }
    });
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
    concurrency: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    deliveries: Vec<Delivery>,
) {
    for delivery in deliveries {
        metrics::histogram!("meterflow_batch_events").record(delivery.items.len() as f64);
        let stages = stages.clone();
        let concurrency = concurrency.clone();
        tasks.spawn(async move {
            // Permits are handed out first come, first served: sends keep partition order.
            let _permit = concurrency.acquire_owned().await.expect("semaphore open");
            stages.deliver(delivery).await;
        });
    }
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
        let outcomes = match &self.ledger {
            None => self.runner.deliver(delivery, None, None).await,
            Some(ledger) => {
                // One task per key in this process (a partition revoked and re-assigned can
                // bring the same events back while the first task still runs).
                while !ledger.enter_local(&key) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let outcomes = match self.deliver_with_ledger(ledger, delivery, false).await {
                    Ledgered::Outcomes(outcomes) => outcomes,
                    Ledgered::Earlier(_) => unreachable!("only aggregate claims name earlier ones"),
                };
                ledger.leave_local(&key);
                outcomes
            }
        };
        // Another owner took the delivery over: its events are theirs to settle.
        let Some(outcomes) = outcomes else { return };
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
            let claimed = if aggregate {
                let event_keys = delivery
                    .items
                    .iter()
                    .map(|i| DeliveryKey::for_event(&i.usage.event_id))
                    .collect();
                match ledger.claim_aggregate(&delivery.key, event_keys).await {
                    Ok(AggregateClaim::Own(c)) => Ok(c),
                    Ok(AggregateClaim::Earlier(earlier)) => return Ledgered::Earlier(earlier),
                    Ok(AggregateClaim::Contended) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Err(e) => Err(e),
                }
            } else {
                ledger.claim(&delivery.key, n).await
            };
            let claim = match claimed {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, delivery_key = %delivery.key, "ledger unavailable; not sending until it answers");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
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
                } => {
                    let lease_end = updated_at_ms + ledger.lease().as_millis() as i64;
                    let now = crate::ack::ledger::now_ms();
                    if now < lease_end {
                        // Another replica may still be sending it: wait out its lease.
                        let wait = Duration::from_millis((lease_end - now).min(1000) as u64);
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    match ledger.touch(&delivery.key, updated_at_ms).await {
                        Ok(Some(next)) => {
                            tracing::info!(delivery_key = %delivery.key, %first_sent_at, "outcome of an earlier send unknown; reconciling before re-sending");
                            (next, Some(first_sent_at))
                        }
                        Ok(None) | Err(_) => continue,
                    }
                }
            };
            let lease = LedgerLease {
                ledger,
                key: &delivery.key,
                updated_at_ms: std::sync::Mutex::new(updated_at_ms),
            };
            return Ledgered::Outcomes(
                self.runner
                    .deliver(delivery.clone(), unknown_since, Some(&lease))
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
        };
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
