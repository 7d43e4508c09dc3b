//! Logs (`tracing`: readable text on a terminal, JSON in production) and the Prometheus
//! recorder behind `/metrics`.

pub mod recent_errors;

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global tracing subscriber: log lines to stderr, and meterflow's own warnings
/// and errors into the status page's ring (`recent_errors`, whatever the log level).
/// `RUST_LOG` overrides the configured level.
pub fn init_logging(config: &LogConfig) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into journald or a log collector.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        );
    let lines = match config.format {
        LogFormat::Json => lines
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
        LogFormat::Text => lines.boxed(),
    };
    let recent = recent_errors::layer().with_filter(
        tracing_subscriber::filter::filter_fn(|meta| {
            *meta.level() <= tracing::Level::WARN && meta.target().starts_with("meterflow")
        })
        .with_max_level_hint(tracing::level_filters::LevelFilter::WARN),
    );
    let _ = tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(recent)
        .try_init();
}

/// The process-wide Prometheus recorder (installed once).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Fails only for an empty bucket list: these are constant and non-empty (were one
            // empty, the default buckets would do).
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("meterflow_request_duration_seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("meterflow_batch_events".into()),
                        &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .build_recorder();
            let handle = recorder.handle();
            // Histogram samples are held until upkeep folds them in: without it, a process that
            // is never scraped grows by two samples per request.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                });
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::debug!("a metrics recorder was already installed");
            }
            metrics::gauge!("meterflow_build_info", "version" => env!("CARGO_PKG_VERSION"))
                .set(1.0);
            handle
        })
        .clone()
}

/// At most this many distinct contracts get their own label; the rest share `other`.
const MAX_CONTRACT_LABELS: usize = 1000;

/// Bounds the cardinality of the per-contract metric.
pub fn bounded_contract_label(contract: &str) -> String {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let mut seen = crate::sync::lock(SEEN.get_or_init(Default::default));
    if seen.contains(contract) {
        return contract.to_string();
    }
    if seen.len() < MAX_CONTRACT_LABELS {
        seen.insert(contract.to_string());
        return contract.to_string();
    }
    "other".to_string()
}
