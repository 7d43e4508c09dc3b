//! Builds a pipeline's parts from its config: the sink, the rate limiter, the dead-letter
//! writer, the ledger, then the Kafka source (nothing is read before claims can be made).

use std::future::Future;
use std::sync::Arc;

use super::{Parts, Stages};
use crate::ack::deadletter::DeadLetterWriter;
use crate::ack::delivery::{LedgeredDelivery, RunStats};
use crate::admin::readiness::ProviderProbe;
use crate::batch::Grouping;
use crate::config::{Config, SinkKind};
use crate::deliver::billingrails::BillingrailsSink;
use crate::deliver::billwerk::BillwerkSink;
use crate::deliver::permits::Permits;
use crate::deliver::ratelimit::RateLimiter;
use crate::deliver::runner::DeliveryRunner;
use crate::deliver::Sink;
use crate::source::{KafkaSource, Source, SourceOptions};

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
    let ledger = crate::ack::ledger::open_for(config).await?;
    let (source, messages) = KafkaSource::start(SourceOptions {
        brokers: config.kafka.brokers.clone(),
        group_id: config.kafka.group_id.clone(),
        topics: config.kafka.topics.clone(),
        session_timeout: config.kafka.session_timeout,
        drain_timeout: config.kafka.drain_timeout,
        commit_interval: config.kafka.commit_interval,
        max_in_flight: config.batch.max_in_flight,
        pause_after: config.batch.pause_after,
        properties,
    })?;
    let delivery = Arc::new(LedgeredDelivery {
        runner: DeliveryRunner::new(
            sink,
            limiter,
            config.retry.clone(),
            Permits::new(config.sink.concurrency, config.sink.contract_concurrency()),
        ),
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
        delivery_window: Arc::new(Permits::window(
            config.sink.concurrency,
            config.sink.contract_concurrency(),
        )),
        readiness: Some((ProviderProbe::new(&config.sink)?, config.kafka.stuck_after)),
    })
}
