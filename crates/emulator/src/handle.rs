//! The in-process face of a running emulator, for meterflow's own tests, demo and benchmarks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::control::Control;
use super::error::EmulatorError;
use super::faults::FaultSettings;
use super::ratelimit::{RateLimitSettings, WindowTally};
use super::server::RunningServer;
use super::stats::{EmulatorStats, PerKey, RecordStats};

/// What differs between the emulated providers, as far as inspection and reset are concerned.
pub trait EmulatedProvider: Send + Sync + 'static {
    /// One stored record, as `GET /_emulator/records` shows it.
    type Record: Serialize + Clone + Send + 'static;

    /// Every stored record, in creation order.
    fn records(&self) -> Vec<Self::Record>;
    fn record_stats(&self, per_key: PerKey) -> RecordStats;
    /// Forgets every stored record and cached answer (credentials and seeded data stay).
    fn clear(&self);
}

/// The current rate-limit state: `GET /_emulator/limit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitStatus {
    #[serde(flatten)]
    pub settings: RateLimitSettings,
    /// Answers left in the current window (`None` when unlimited).
    pub remaining: Option<u32>,
    /// Milliseconds until the current window ends (`None` when unlimited).
    pub resets_in_ms: Option<u64>,
    pub window_ends_at: Option<DateTime<Utc>>,
}

/// A running emulator. Dropping it stops the server; [`EmulatorHandle::shutdown`] stops it
/// gracefully.
pub struct EmulatorHandle<P: EmulatedProvider> {
    server: RunningServer,
    control: Arc<Control>,
    provider: Arc<P>,
}

impl<P: EmulatedProvider> EmulatorHandle<P> {
    pub(crate) fn new(server: RunningServer, control: Arc<Control>, provider: Arc<P>) -> Self {
        EmulatorHandle {
            server,
            control,
            provider,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://ADDR`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The provider's own state, for provider-specific calls.
    pub fn provider(&self) -> &P {
        &self.provider
    }

    pub fn records(&self) -> Vec<P::Record> {
        self.provider.records()
    }

    /// Counts, and the records of every delivery key.
    pub fn stats(&self) -> EmulatorStats {
        stats(&self.control, self.provider.as_ref(), PerKey::Listed)
    }

    pub fn limit(&self) -> LimitStatus {
        limit_status(&self.control)
    }

    /// Admitted and refused answers of every rate-limit window that saw any, oldest first (the
    /// current window last). Cheap: for benchmarks that sample while a client runs.
    pub fn windows(&self) -> Vec<WindowTally> {
        self.control.limiter.tallies()
    }

    /// Replaces the rate limit and starts a fresh window now.
    pub fn set_limit(&self, settings: RateLimitSettings) -> Result<(), EmulatorError> {
        settings
            .validate()
            .map_err(|problem| EmulatorError::invalid("limit", problem))?;
        self.control.set_limit(settings);
        Ok(())
    }

    pub fn faults(&self) -> FaultSettings {
        self.control.faults().as_ref().clone()
    }

    pub fn set_faults(&self, faults: FaultSettings) -> Result<(), EmulatorError> {
        faults
            .validate()
            .map_err(|problem| EmulatorError::invalid("faults", problem))?;
        self.control.set_faults(faults);
        Ok(())
    }

    /// Forgets records and counts; limit and faults go back to their start-up settings.
    pub fn reset(&self) {
        reset(&self.control, self.provider.as_ref());
    }

    /// Stops accepting, gives in-flight answers up to a second, then closes every connection.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

pub(crate) fn stats<P: EmulatedProvider>(
    control: &Control,
    provider: &P,
    per_key: PerKey,
) -> EmulatorStats {
    EmulatorStats::new(
        &control.answers,
        control.fault_counts.snapshot(),
        provider.record_stats(per_key),
    )
}

pub(crate) fn reset<P: EmulatedProvider>(control: &Control, provider: &P) {
    provider.clear();
    control.reset();
}

pub(crate) fn limit_status(control: &Control) -> LimitStatus {
    let settings = control.limiter.settings().as_ref().clone();
    match control.limiter.peek(Instant::now()) {
        None => LimitStatus {
            settings,
            remaining: None,
            resets_in_ms: None,
            window_ends_at: None,
        },
        Some(admission) => LimitStatus {
            settings,
            remaining: Some(admission.remaining),
            resets_in_ms: Some(u64::try_from(admission.resets_in.as_millis()).unwrap_or(u64::MAX)),
            window_ends_at: chrono::Duration::from_std(admission.resets_in)
                .ok()
                .map(|left| Utc::now() + left),
        },
    }
}

/// Checks the settings both providers share.
pub(crate) fn validate_common(
    limit: &RateLimitSettings,
    faults: &FaultSettings,
) -> Result<(), EmulatorError> {
    limit
        .validate()
        .map_err(|problem| EmulatorError::invalid("limit", problem))?;
    faults
        .validate()
        .map_err(|problem| EmulatorError::invalid("faults", problem))?;
    if faults.slow_rate > 0.0 && faults.slow_duration == Duration::ZERO {
        return Err(EmulatorError::invalid(
            "slow_duration",
            "must be longer than 0 when slow_rate is set (e.g. \"30s\")",
        ));
    }
    Ok(())
}
