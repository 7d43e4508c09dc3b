//! Wiring: Kafka source → decode → price → batch → deliver → acknowledge; and the drain on
//! shutdown. Each stage lives in its own module (the exactly-once delivery protocol in
//! `ack::delivery`); this file only builds them and connects them.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::ack::deadletter::DeadLetterWriter;
use crate::ack::delivery::LedgeredDelivery;
use crate::ack::ledger::{Ledger, LedgerStore};
use crate::admin::readiness::ProviderProbe;
use crate::batch::{self, Batcher, Bucket, Grouping};
use crate::config::{Config, ProviderConfig, SinkKind};
use crate::decode::{EventDecoder, TimestampWindow};
use crate::deliver::billingrails::BillingrailsSink;
use crate::deliver::billwerk::BillwerkSink;
use crate::deliver::permits::Permits;
use crate::deliver::ratelimit::RateLimiter;
use crate::deliver::runner::DeliveryRunner;
use crate::deliver::{DeliveryItem, Sink};
use crate::pricing::PriceBook;
use crate::source::{KafkaSource, SourceOptions};

pub use crate::ack::delivery::RunStats;

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
    let decoder = EventDecoder::for_sink(config.input.clone(), config.sink.kind());
    let window = TimestampWindow::from_config(&config.input);
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
    let limiter =
        Arc::new(RateLimiter::new(&config.rate_limit).for_sink(config.sink.kind().name()));
    stats.status.set_pacer(limiter.clone());
    let sink: Arc<dyn Sink> = match (custom_sink, config.sink.kind()) {
        (Some(make), _) => make(limiter.clone()),
        (None, SinkKind::Billwerk) => Arc::new(
            BillwerkSink::new(&config.sink, limiter.clone())?.with_health(stats.readiness.clone()),
        ),
        (None, SinkKind::Billingrails) => Arc::new(
            BillingrailsSink::new(&config.sink, limiter.clone())?
                .with_health(stats.readiness.clone()),
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

    let status_watch = crate::admin::status::watch(stats.status.clone(), source_handle.clone());

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

    let dead_letters = Arc::new(dead_letters);
    let stages = Arc::new(LedgeredDelivery {
        runner: DeliveryRunner::new(sink, limiter.clone(), config.retry.clone()),
        dead_letters: dead_letters.clone(),
        ledger,
        source: Arc::new(source_handle.clone()),
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
                let decoded = decoder.decode(&raw.payload).and_then(|event| {
                    window.check(event.timestamp, chrono::Utc::now())?;
                    Ok(event)
                });
                match decoded.and_then(|event| prices.price(event)) {
                    Ok(usage) => {
                        let item = DeliveryItem { usage, raw };
                        if grouping == Grouping::PerEvent {
                            stages.spawn(&concurrency, &mut tasks, batch::group(vec![item], grouping));
                        } else if let Some(full) = batcher.push(item, Instant::now()) {
                            stages.spawn(&concurrency, &mut tasks, batch::group(full, grouping));
                        }
                    }
                    Err(rejection) => {
                        let stages = stages.clone();
                        // For `meterflow trace`: the id, if the event has a usable one.
                        let traced_id = decoder.event_id(&raw.payload);
                        tasks.spawn(async move { stages.reject(&raw, &rejection, traced_id).await });
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
                    stages.spawn(&concurrency, &mut tasks, batch::group(due, grouping));
                }
            }
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined {
                    if e.is_panic() {
                        // Only a dead-letter write itself can get here (a delivery's panic is
                        // caught in `LedgeredDelivery::spawn`). Its events stay unsettled: the partition holds
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
                    stages.spawn(&concurrency, &mut tasks, batch::group(flush, grouping));
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
    status_watch.abort();
    dead_letters.flush(Duration::from_secs(5));
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
    match &config.sink.provider {
        ProviderConfig::Billingrails(b) => Grouping::Batches {
            size: b.billingrails.batch_size.clamp(1, 100),
        },
        ProviderConfig::Billwerk(b) if b.aggregate.enabled => Grouping::Aggregate {
            bucket: Bucket::parse(&b.aggregate.bucket).unwrap_or(Bucket::Hour),
        },
        ProviderConfig::Billwerk(_) => Grouping::PerEvent,
    }
}
