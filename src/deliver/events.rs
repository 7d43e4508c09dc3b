//! Every observable event of delivery is one struct whose [`emit`](RequestSent::emit) writes the
//! log line and the metric together, so the two cannot drift apart: a metric without its log
//! line (or a log line under another name) cannot be written by accident. Metric names and
//! labels are the catalogue's (docs/metrics.md; the deploy checks read them).

use std::time::Duration;

use crate::deliver::RetryCause;
use crate::event::DeliveryKey;

/// One HTTP request to the provider got an answer (any status) or none (`status_class`
/// `error`). `meterflow_requests_total` and `meterflow_request_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestSent {
    pub sink: &'static str,
    pub endpoint: &'static str,
    /// `2xx` .. `5xx`, or `error` (no answer: timeout, connection).
    pub status_class: &'static str,
    /// From send to the answer's status line (or the error).
    pub elapsed: Duration,
}

impl RequestSent {
    /// The `status_class` label of an HTTP status.
    pub fn status_class(status: u16) -> &'static str {
        match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        }
    }

    pub fn emit(self) {
        let RequestSent {
            sink,
            endpoint,
            status_class,
            elapsed,
        } = self;
        tracing::debug!(
            sink,
            endpoint,
            status_class,
            elapsed_ms = elapsed.as_millis() as u64,
            "request to the provider"
        );
        metrics::counter!("meterflow_requests_total", "sink" => sink, "endpoint" => endpoint, "status_class" => status_class)
            .increment(1);
        metrics::histogram!("meterflow_request_duration_seconds", "sink" => sink, "endpoint" => endpoint)
            .record(elapsed.as_secs_f64());
    }
}

/// The provider answered 429. `meterflow_throttled_responses_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub sink: &'static str,
    /// The answer speaks of an earlier window (its request left before the current one began):
    /// it pauses no one.
    pub stale: bool,
}

impl Throttled {
    pub fn emit(self) {
        if self.stale {
            tracing::debug!(
                sink = self.sink,
                "429 for a request sent in an earlier window: no pause"
            );
        } else {
            tracing::debug!(sink = self.sink, "the provider refused a request with 429");
        }
        metrics::counter!("meterflow_throttled_responses_total", "sink" => self.sink).increment(1);
    }
}

/// An attempt failed in a way that may succeed later; it is tried again. `meterflow_retries_total`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryScheduled<'a> {
    pub sink: &'static str,
    pub cause: RetryCause,
    pub delivery_key: &'a DeliveryKey,
    /// The first few event ids of the delivery.
    pub event_ids: Vec<&'a str>,
    pub outcome_unknown: bool,
    /// Attempts of this delivery so far (its backoff's count).
    pub attempt: u32,
    /// How the retry waits.
    pub wait: RetryWait,
    pub detail: &'a str,
}

/// What a retry waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryWait {
    /// The sink-wide gate a 429 closed.
    Gate,
    /// Every sender pauses this long: the provider refused our credentials.
    AllSendersPause(Duration),
    /// This delivery's own backoff.
    Backoff(Duration),
}

impl RetryScheduled<'_> {
    pub fn emit(self) {
        let cause = self.cause.as_str();
        let key = self.delivery_key;
        let event_ids = &self.event_ids;
        let detail = self.detail;
        match self.wait {
            RetryWait::Gate => {
                tracing::debug!(delivery_key = %key, ?event_ids, "throttled; retrying after the sink-wide pause");
            }
            RetryWait::AllSendersPause(pause) => {
                tracing::error!(delivery_key = %key, %detail, pause_s = pause.as_secs(), "provider refused our credentials; all senders pause");
            }
            RetryWait::Backoff(wait) => {
                tracing::warn!(
                    delivery_key = %key,
                    ?event_ids,
                    cause,
                    outcome_unknown = self.outcome_unknown,
                    attempt = self.attempt,
                    retry_in_ms = wait.as_millis() as u64,
                    %detail,
                    "delivery failed; will retry"
                );
            }
        }
        metrics::counter!("meterflow_retries_total", "sink" => self.sink, "cause" => cause)
            .increment(1);
    }
}

/// How a billwerk token request ended. `meterflow_token_refreshes_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefreshed {
    /// A token, kept this long (`None`: until a call answers 401).
    Ok { expires_in: Option<Duration> },
    /// The provider refused the credentials (HTTP status).
    Refused { status: u16 },
    /// No token: the endpoint was unreachable or answered something else.
    Error { detail: String },
}

impl TokenRefreshed {
    pub fn emit(&self) {
        let result = match self {
            TokenRefreshed::Ok { expires_in } => {
                tracing::info!(expires_in_s = ?expires_in.map(|l| l.as_secs()), "billwerk access token obtained");
                "ok"
            }
            TokenRefreshed::Refused { status } => {
                tracing::error!(
                    status,
                    "billwerk refused the client credentials; check sink.client_id and sink.client_secret"
                );
                "refused"
            }
            TokenRefreshed::Error { detail } => {
                tracing::warn!(%detail, "no billwerk access token; will ask again");
                "error"
            }
        };
        metrics::counter!("meterflow_token_refreshes_total", "result" => result).increment(1);
    }
}

/// A look-up of a delivery whose earlier outcome is unknown. `meterflow_reconciliations_total`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconciled<'a> {
    pub delivery_key: &'a DeliveryKey,
    pub result: Reconciliation<'a>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Reconciliation<'a> {
    /// The provider has it, as this record.
    Found { receipt: &'a str },
    /// Not at the provider: sent now.
    NotFound,
    /// The look-up failed; looked up again after `retry_in`.
    Error { detail: &'a str, retry_in: Duration },
}

impl Reconciled<'_> {
    pub fn emit(&self) {
        let key = self.delivery_key;
        let result = match &self.result {
            Reconciliation::Found { receipt } => {
                tracing::info!(delivery_key = %key, %receipt, "reconciled: the provider already has this delivery; not re-sending");
                "found"
            }
            Reconciliation::NotFound => {
                tracing::info!(delivery_key = %key, "reconciled: not at the provider; sending");
                "not_found"
            }
            Reconciliation::Error { detail, retry_in } => {
                tracing::warn!(delivery_key = %key, %detail, retry_in_ms = retry_in.as_millis() as u64, "reconciliation failed; will look again before re-sending");
                "error"
            }
        };
        metrics::counter!("meterflow_reconciliations_total", "result" => result).increment(1);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log lines written while a [`Captured`] guard lives on this thread.
    #[derive(Clone, Default)]
    pub(crate) struct LogBuffer(Arc<Mutex<Vec<u8>>>);

    impl LogBuffer {
        pub(crate) fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl Write for LogBuffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Logs (every level) and metrics of this thread, while it lives.
    pub(crate) struct Captured {
        pub(crate) logs: LogBuffer,
        pub(crate) metrics: metrics_exporter_prometheus::PrometheusHandle,
        _log_guard: tracing::subscriber::DefaultGuard,
        _metrics_guard: metrics::LocalRecorderGuard<'static>,
    }

    impl Captured {
        pub(crate) fn start() -> Captured {
            let logs = LogBuffer::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            let recorder: &'static _ = Box::leak(Box::new(
                metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder(),
            ));
            let metrics = recorder.handle();
            Captured {
                logs,
                metrics,
                _log_guard: tracing::subscriber::set_default(subscriber),
                _metrics_guard: metrics::set_default_local_recorder(recorder),
            }
        }
    }

    /// The log line and the metric of an event come from its one `emit`.
    #[test]
    fn one_emit_writes_the_log_line_and_the_metric() {
        let captured = Captured::start();
        RequestSent {
            sink: "billwerk",
            endpoint: "usage",
            status_class: "4xx",
            elapsed: Duration::from_millis(12),
        }
        .emit();
        let key = DeliveryKey::for_events(["evt_1"]);
        RetryScheduled {
            sink: "billwerk",
            cause: RetryCause::ServerError,
            delivery_key: &key,
            event_ids: vec!["evt_1"],
            outcome_unknown: true,
            attempt: 1,
            wait: RetryWait::Backoff(Duration::from_millis(40)),
            detail: "HTTP 503",
        }
        .emit();
        Reconciled {
            delivery_key: &key,
            result: Reconciliation::Found { receipt: "u-1" },
        }
        .emit();
        TokenRefreshed::Refused { status: 401 }.emit();
        let metrics = captured.metrics.render();
        let logs = captured.logs.text();
        for (metric, line) in [
            (
                "meterflow_requests_total{sink=\"billwerk\",endpoint=\"usage\",status_class=\"4xx\"} 1",
                "request to the provider sink=\"billwerk\" endpoint=\"usage\" status_class=\"4xx\" elapsed_ms=12",
            ),
            (
                "meterflow_request_duration_seconds_count{sink=\"billwerk\",endpoint=\"usage\"} 1",
                "request to the provider",
            ),
            (
                "meterflow_retries_total{sink=\"billwerk\",cause=\"server_error\"} 1",
                "delivery failed; will retry",
            ),
            (
                "meterflow_reconciliations_total{result=\"found\"} 1",
                "reconciled: the provider already has this delivery",
            ),
            (
                "meterflow_token_refreshes_total{result=\"refused\"} 1",
                "billwerk refused the client credentials",
            ),
        ] {
            assert!(metrics.contains(metric), "{metric}\n{metrics}");
            assert!(logs.contains(line), "{line}\n{logs}");
        }
    }
}
