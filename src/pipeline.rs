//! Wiring: Kafka source → decode → price → batch → deliver → acknowledge; and the drain on
//! shutdown. Each stage lives in its own module; this file only connects them.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::ack::deadletter::{DeadLetter, DeadLetterWriter};
use crate::batch::{self, Batcher, Bucket, Grouping};
use crate::config::{Config, SinkKind};
use crate::decode::EventDecoder;
use crate::deliver::billwerk::BillwerkSink;
use crate::deliver::ratelimit::RateLimiter;
use crate::deliver::runner::DeliveryRunner;
use crate::deliver::{Delivery, DeliveryItem, ItemOutcome, Sink};
use crate::event::{RawMessage, Rejection};
use crate::pricing::PriceBook;
use crate::source::{KafkaSource, SourceHandle, SourceOptions};

/// What a run did, for the demo's reconciliation table and for tests.
#[derive(Debug, Default)]
pub struct RunStats {
    pub consumed: AtomicU64,
    pub delivered: AtomicU64,
    pub already_delivered: AtomicU64,
    pub dead_lettered: AtomicU64,
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
    source: SourceHandle,
    stats: Arc<RunStats>,
    per_contract_metrics: bool,
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
    let limiter = Arc::new(RateLimiter::new(&config.rate_limit));
    let sink: Arc<dyn Sink> = match config.sink.kind {
        SinkKind::Billwerk => Arc::new(BillwerkSink::new(&config.sink, limiter.clone())?),
        SinkKind::Billingrails => anyhow::bail!("the billingrails sink is not available yet"),
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
        source: source_handle.clone(),
        stats: stats.clone(),
        per_contract_metrics: config.admin.per_contract_metrics,
    });
    let concurrency = Arc::new(Semaphore::new(config.sink.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let mut batcher = Batcher::new(config.batch.max_events, config.batch.max_wait);
    tokio::pin!(shutdown);
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
                        tasks.spawn(async move { stages.dead_letter(&raw, &rejection, None, None).await });
                    }
                }
            }
            _ = async { tokio::time::sleep_until(flush_at.unwrap()).await }, if flush_at.is_some() => {
                if let Some(due) = batcher.poll(Instant::now()) {
                    dispatch(&stages, &concurrency, &mut tasks, batch::group(due, grouping));
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
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
    stages.dead_letters.flush(Duration::from_secs(5));
    tracing::info!("stopped");
    Ok(())
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
        let key = delivery.key.clone();
        let items = delivery.items.clone();
        let outcomes = self.runner.deliver(delivery, None).await;
        for (item, outcome) in items.iter().zip(outcomes) {
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
                }
                ItemOutcome::AlreadyDelivered { receipt } => {
                    self.stats.already_delivered.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("meterflow_events_deduplicated_total", "source" => "reconciliation")
                        .increment(1);
                    tracing::info!(
                        event_id = %item.usage.event_id,
                        partition = item.raw.source.partition,
                        offset = item.raw.source.offset,
                        delivery_key = %key,
                        %receipt,
                        "already delivered; settled without re-sending"
                    );
                }
                ItemOutcome::DeadLetter {
                    rejection,
                    provider_answer,
                } => {
                    self.dead_letter(
                        &item.raw,
                        &rejection,
                        provider_answer.as_deref(),
                        Some((&item.usage.event_id, &key)),
                    )
                    .await;
                    continue;
                }
            }
            self.source.settle(&item.raw.source, item.raw.generation);
        }
    }

    async fn dead_letter(
        &self,
        raw: &RawMessage,
        rejection: &Rejection,
        provider_answer: Option<&str>,
        ids: Option<(&String, &crate::event::DeliveryKey)>,
    ) {
        self.dead_letters
            .write(DeadLetter {
                raw,
                rejection,
                provider_answer,
                event_id: ids.map(|(id, _)| id.as_str()),
                delivery_key: ids.map(|(_, k)| k),
            })
            .await;
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        self.source.settle(&raw.source, raw.generation);
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
