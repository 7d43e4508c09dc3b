//! Wiring: Kafka source → decode → price → batch → deliver → acknowledge; and the drain on
//! shutdown. Each stage lives in its own module (the exactly-once delivery protocol in
//! `ack::delivery`); `build.rs` builds them from a config ([`build`]), and [`Parts::run`] here
//! connects them and runs them until shutdown.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::ack::delivery::LedgeredDelivery;
use crate::admin::readiness::ProviderProbe;
use crate::batch::{self, Batcher, Grouping};
use crate::config::Config;
use crate::decode::{EventDecoder, TimestampWindow};
use crate::deliver::permits::Permits;
use crate::deliver::DeliveryItem;
use crate::event::RawMessage;
use crate::pricing::PriceBook;
use crate::source::{Source, SourceControl};

pub use crate::ack::delivery::RunStats;
pub use build::{build, run, run_with_sink, SinkFactory};

mod build;
#[cfg(test)]
mod tests;

/// Everything a running pipeline is made of, built and connected by [`build`] from a config,
/// or by a test from parts of its own (a source in memory, a scripted sink).
pub struct Parts<S: Source> {
    pub source: S,
    /// Where `source`'s messages arrive; closed when it has shut down.
    pub messages: mpsc::Receiver<RawMessage>,
    pub stages: Stages,
    /// The exactly-once protocol, with the sink, the ledger and the dead-letter topic.
    pub delivery: Arc<LedgeredDelivery>,
    /// Deliveries under way, overall and per contract (the runner holds the request permits;
    /// see `deliver::permits`).
    pub delivery_window: Arc<Permits>,
    /// `/readyz`'s provider probe and stuck-partition threshold (none: not watched).
    pub readiness: Option<(ProviderProbe, Duration)>,
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
            decoder: EventDecoder::for_sink(config.input.clone(), config.sink.kind()),
            window: TimestampWindow::from_config(&config.input),
            prices,
            grouping: Grouping::for_config(config),
            batcher: Batcher::new(config.batch.max_events, config.batch.max_wait),
        })
    }
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
            delivery_window,
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
                                delivery.spawn(&delivery_window, &mut tasks, batch::group(vec![item], grouping));
                            } else if let Some(full) = batcher.push(item, now()) {
                                delivery.spawn(&delivery_window, &mut tasks, batch::group(full, grouping));
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
                        delivery.spawn(&delivery_window, &mut tasks, batch::group(due, grouping));
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
                        delivery.spawn(&delivery_window, &mut tasks, batch::group(flush, grouping));
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

/// The batcher's clock: Tokio's, so that a pipeline under `tokio::time::pause()` flushes when
/// its paused clock says so (the same as the wall clock's otherwise).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
