//! The test process's Prometheus recorder, for tests that read meterflow's metrics in-process.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The recorder of this test process, installed on first use (one per process: nextest runs
/// each test in a process of its own).
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().unwrap())
}

/// The value on the rendered line that starts with `series` (a name with its labels, e.g.
/// `meterflow_in_flight_events` or `name{reason="x"}`); 0 when there is none.
pub fn metric_value(rendered: &str, series: &str) -> f64 {
    rendered
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}
