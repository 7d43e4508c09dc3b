//! `meterflow run`: load the config, set up logs and metrics, run the pipeline until SIGTERM or
//! SIGINT, drain, exit 0.

use std::path::Path;
use std::sync::Arc;

use crate::admin::AdminServer;
use crate::config::Config;
use crate::pipeline::{self, RunStats};
use crate::signals::ShutdownSignals;

pub async fn run(config_path: &Path, signals: ShutdownSignals) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    crate::telemetry::init_logging(&config.log);
    let _metrics = crate::telemetry::metrics_handle();
    tracing::info!(
        config = %config_path.display(),
        sink = ?config.sink.kind(),
        topics = ?config.kafka.topics,
        group = %config.kafka.group_id,
        "meterflow starting"
    );
    let stats = Arc::new(RunStats::default());
    // Bound before the pipeline starts: a taken port fails the start, not the first scrape.
    let admin = match config.admin.listen.as_str() {
        "" => None,
        listen => Some(AdminServer::start(listen, stats.admin_state()).await?),
    };
    let readiness = stats.readiness.clone();
    let shutdown = async move {
        signals.recv().await;
        readiness.set_stopping();
    };
    // The admin server outlives the drain: liveness keeps answering while in-flight work ends.
    let result = pipeline::run(config, stats, shutdown).await;
    if let Some(admin) = admin {
        admin.stop().await;
    }
    result
}
