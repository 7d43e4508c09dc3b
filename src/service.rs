//! `meterflow run`: load the config, set up logs and metrics, run the pipeline until SIGTERM or
//! SIGINT, drain, exit 0.

use std::path::Path;
use std::sync::Arc;

use crate::config::Config;
use crate::pipeline::{self, RunStats};

pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    crate::telemetry::init_logging(&config.log);
    let _metrics = crate::telemetry::metrics_handle();
    tracing::info!(
        config = %config_path.display(),
        sink = ?config.sink.kind,
        topics = ?config.kafka.topics,
        group = %config.kafka.group_id,
        "meterflow starting"
    );
    let stats = Arc::new(RunStats::default());
    pipeline::run(config, stats, shutdown_signal()).await
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
