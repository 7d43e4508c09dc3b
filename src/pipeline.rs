//! Wiring: Kafka source → decode → price → batch → deliver → acknowledge; and the drain on
//! shutdown. Each stage lives in its own module (the exactly-once delivery protocol in
//! `ack::delivery`); this file only builds them and connects them.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::ack::deadletter::DeadLetterWriter;
use crate::ack::delivery::LedgeredDelivery;
use crate::ack::ledger::{Ledger, LedgerStore};
use crate::admin::readiness::ProviderProbe;
use crate::batch::{self, Batcher, Bucket, Grouping};
use crate::config::{Config, SinkKind};
use crate::decode::{EventDecoder, TimestampWindow};
use crate::deliver::billingrails::BillingrailsSink;
use crate::deliver::billwerk::BillwerkSink;
use crate::deliver::permits::Permits;
use crate::deliver::ratelimit::RateLimiter;
use crate::deliver::runner::DeliveryRunner;
use crate::deliver::{DeliveryItem, Sink};
use crate::event::RawMessage;
use crate::pricing::PriceBook;
use crate::source::{KafkaSource, Source, SourceControl, SourceOptions};

pub use crate::ack::delivery::RunStats;

/// Builds the sink a pipeline delivers through, given the shared rate limiter.
pub type SinkFactory = Box<dyn FnOnce(Arc<RateLimiter>) -> Arc<dyn Sink> + Send>;

/// Runs the pipeline `config` describes until `shutdown` resolves, then drains and returns:
/// [`build`], then [`Parts::run`].
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
    // A SIGTERM while the start waits (a dead-letter topic check, a ledger that does not answer
    // yet) ends the run cleanly, before anything was read.
    let parts = tokio::select! {
        parts = build_with_sink(&config, stats, custom_sink) => parts?,
        _ = &mut shutdown => {
            tracing::info!("stopped during start-up, before anything was read");
            return Ok(());
        }
    };
    parts.run(shutdown).await
}

/// The pure stages between the source and the protocol: decode, the timestamp window, pricing,
/// and how priced events are grouped into deliveries.
pub struct Stages {
    pub decoder: EventDecoder,
    pub window: TimestampWindow,
    pub prices: PriceBook,
    pub grouping: Grouping,
    pub batcher: Batcher,
}

impl Stages {
    pub fn from_config(config: &Config) -> anyhow::Result<Stages> {
        let prices = PriceBook::new(config).map_err(|problems| {
            let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            anyhow::anyhow!("{}", lines.join("\n"))
        })?;
        Ok(Stages {
            decoder: EventDecoder::for_sink(config.input.clone(), config.sink.kind),
            window: TimestampWindow::from_config(&config.input),
            prices,
            grouping: grouping_for(config),
            batcher: Batcher::new(config.batch.max_events, config.batch.max_wait),
        })
    }
}

/// Everything a running pipeline is made of, built and connected by [`build`] from a config,
/// or by a test from parts of its own (a source in memory, a scripted sink).
pub struct Parts<S: Source> {
    pub source: S,
    /// Where `source`'s messages arrive; closed when it has shut down.
    pub messages: mpsc::Receiver<RawMessage>,
    pub stages: Stages,
    /// The exactly-once protocol, with the sink, the ledger and the dead-letter topic.
    pub delivery: Arc<LedgeredDelivery>,
    /// Requests in flight, overall and per contract.
    pub concurrency: Arc<Permits>,
    /// `/readyz`'s provider probe and stuck-partition threshold (none: not watched).
    pub readiness: Option<(ProviderProbe, Duration)>,
}

/// Builds the pipeline `config` describes. Waits until the dead-letter topic is checked and the
/// ledger answers: nothing is read before claims can be made.
pub async fn build(config: &Config, stats: Arc<RunStats>) -> anyhow::Result<Parts<KafkaSource>> {
    build_with_sink(config, stats, None).await
}

async fn build_with_sink(
    config: &Config,
    stats: Arc<RunStats>,
    custom_sink: Option<SinkFactory>,
) -> anyhow::Result<Parts<KafkaSource>> {
    let stages = Stages::from_config(config)?;
    let limiter = Arc::new(RateLimiter::new(&config.rate_limit).for_sink(config.sink.kind.name()));
    stats.status.set_pacer(limiter.clone());
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
    // A missing or forbidden dead-letter topic stops the start, before anything is consumed.
    dead_letters.check_topic().await?;
    // The ledger before the source: nothing is read before claims can be made.
    let ledger = open_ledger(config).await?;
    let (source, messages) = KafkaSource::start(SourceOptions {
        brokers: config.kafka.brokers.clone(),
        group_id: config.kafka.group_id.clone(),
        topics: config.kafka.topics.clone(),
        session_timeout: config.kafka.session_timeout,
        drain_timeout: config.kafka.drain_timeout,
        commit_interval: config.kafka.commit_interval,
        max_in_flight: config.batch.max_in_flight,
        properties,
    })?;
    let delivery = Arc::new(LedgeredDelivery {
        runner: DeliveryRunner::new(sink, limiter, config.retry.clone()),
        dead_letters: Arc::new(dead_letters),
        ledger,
        source: Arc::new(source.control()),
        stats,
        per_contract_metrics: config.admin.per_contract_metrics,
        aggregating: matches!(stages.grouping, Grouping::Aggregate { .. }),
    });
    Ok(Parts {
        source,
        messages,
        stages,
        delivery,
        concurrency: Arc::new(Permits::new(
            config.sink.concurrency,
            config.sink.contract_concurrency(),
        )),
        readiness: Some((ProviderProbe::new(&config.sink)?, config.kafka.stuck_after)),
    })
}

impl<S: Source> Parts<S> {
    /// Connects the parts and runs them until `shutdown` resolves; then stops the source,
    /// delivers what was read until the source's drain ends, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Parts {
            source,
            mut messages,
            stages,
            delivery,
            concurrency,
            readiness,
        } = self;
        let Stages {
            decoder,
            window,
            prices,
            grouping,
            mut batcher,
        } = stages;
        tokio::pin!(shutdown);
        let control = source.control();
        let stats = delivery.stats.clone();
        let readiness_watch = readiness.map(|(probe, stuck_after)| {
            crate::admin::readiness::watch(
                stats.readiness.clone(),
                control.clone(),
                probe,
                stuck_after,
            )
        });
        let status_watch = crate::admin::status::watch(stats.status.clone(), control.clone());

        // A closed 429 gate pauses the partitions instead of buffering.
        let mut gate = delivery.runner.limiter().gate().subscribe();
        let gate_source = control.clone();
        let gate_watch = tokio::spawn(async move {
            loop {
                let closed = gate.borrow_and_update().is_some();
                gate_source.hold(closed);
                if gate.changed().await.is_err() {
                    break;
                }
            }
        });

        let mut tasks = JoinSet::new();
        let mut stopping = false;
        let mut source = Some(source);
        let mut source_stopped: Option<tokio::task::JoinHandle<()>> = None;

        loop {
            let flush_at = batcher.deadline().map(tokio::time::Instant::from_std);
            tokio::select! {
                message = messages.recv() => {
                    let Some(raw) = message else { break };
                    stats.consumed.fetch_add(1, Ordering::Relaxed);
                    let decoded = decoder.decode(&raw.payload).and_then(|event| {
                        window.check(event.timestamp, chrono::Utc::now())?;
                        Ok(event)
                    });
                    match decoded.and_then(|event| prices.price(event)) {
                        Ok(usage) => {
                            let item = DeliveryItem { usage, raw };
                            if grouping == Grouping::PerEvent {
                                delivery.spawn(&concurrency, &mut tasks, batch::group(vec![item], grouping));
                            } else if let Some(full) = batcher.push(item, now()) {
                                delivery.spawn(&concurrency, &mut tasks, batch::group(full, grouping));
                            }
                        }
                        Err(rejection) => {
                            let delivery = delivery.clone();
                            // For `meterflow trace`: the id, if the event has a usable one.
                            let traced_id = decoder.event_id(&raw.payload);
                            tasks.spawn(async move { delivery.reject(&raw, &rejection, traced_id).await });
                        }
                    }
                }
                _ = async {
                    match flush_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if flush_at.is_some() => {
                    if let Some(due) = batcher.poll(now()) {
                        delivery.spawn(&concurrency, &mut tasks, batch::group(due, grouping));
                    }
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = joined {
                        if e.is_panic() {
                            // Only a dead-letter write itself can get here (a delivery's panic
                            // is caught in `LedgeredDelivery::spawn`). Its events stay
                            // unsettled: the partition holds there (lag alerts fire) and a
                            // restart redelivers them. Never skipped.
                            metrics::counter!("meterflow_delivery_task_failures_total", "stage" => "dead_letter")
                                .increment(1);
                            tracing::error!(error = %e, "a dead-letter task panicked; its partition cannot advance until a restart");
                        }
                    }
                }
                _ = &mut shutdown, if !stopping => {
                    stopping = true;
                    tracing::info!("shutting down: no new fetches; draining in-flight work");
                    // The source drains (bounded by kafka.drain_timeout), commits and leaves
                    // the group; meanwhile this loop keeps delivering what was read.
                    let flush = batcher.take();
                    if !flush.is_empty() {
                        delivery.spawn(&concurrency, &mut tasks, batch::group(flush, grouping));
                    }
                    // The source is present until shutdown, which happens once.
                    if let Some(s) = source.take() {
                        source_stopped = Some(tokio::task::spawn_blocking(move || s.shutdown()));
                    }
                }
            }
        }
        // The source has ended (its channel closed): it settled and committed what it could.
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
        if let Some(watch) = readiness_watch {
            watch.abort();
        }
        status_watch.abort();
        delivery.dead_letters.flush(Duration::from_secs(5));
        tracing::info!("stopped");
        Ok(())
    }
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

/// The batcher's clock: Tokio's, so that a pipeline under `tokio::time::pause()` flushes when
/// its paused clock says so (the same as the wall clock's otherwise).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
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

#[cfg(test)]
mod tests;
