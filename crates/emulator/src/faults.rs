//! Fault injection: the failures a real provider shows, by probability.
//!
//! The one that matters most is [`Fault::Drop`]: the usage is recorded, then the connection is
//! closed without an answer. billwerk has no idempotency, so a client that simply re-sends after
//! that bills twice; the emulator exists to make that visible.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Probabilities (0..=1) and durations of the injected faults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FaultSettings {
    /// Share of usage requests answered 500/502/503 without recording anything.
    pub fail_rate: f64,
    /// Added before every provider answer (all endpoints), for `latency_rate` of them.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Share of answers that get `latency`.
    pub latency_rate: f64,
    /// Share of usage requests that are recorded and answered only after `slow_duration`.
    pub slow_rate: f64,
    #[serde(with = "humantime_serde")]
    pub slow_duration: Duration,
    /// Share of usage requests that are recorded, then answered by closing the connection.
    pub drop_rate: f64,
}

impl Default for FaultSettings {
    fn default() -> Self {
        FaultSettings {
            fail_rate: 0.0,
            latency: Duration::ZERO,
            latency_rate: 1.0,
            slow_rate: 0.0,
            slow_duration: Duration::from_secs(30),
            drop_rate: 0.0,
        }
    }
}

impl FaultSettings {
    /// Every rate must be a probability.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("fail_rate", self.fail_rate),
            ("latency_rate", self.latency_rate),
            ("slow_rate", self.slow_rate),
            ("drop_rate", self.drop_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        Ok(())
    }

    /// What happens to one usage request, drawn from `draw()` (uniform in [0, 1)) once per kind,
    /// checked in the order fail, drop, slow.
    pub fn plan_usage_request(&self, mut draw: impl FnMut() -> f64) -> Option<Fault> {
        if self.fail_rate > 0.0 && draw() < self.fail_rate {
            return Some(Fault::Fail);
        }
        if self.drop_rate > 0.0 && draw() < self.drop_rate {
            return Some(Fault::Drop);
        }
        if self.slow_rate > 0.0 && draw() < self.slow_rate {
            return Some(Fault::Slow(self.slow_duration));
        }
        None
    }

    /// The latency to add before one answer, if any.
    pub fn plan_latency(&self, draw: impl FnOnce() -> f64) -> Option<Duration> {
        if self.latency.is_zero() || self.latency_rate <= 0.0 {
            return None;
        }
        if self.latency_rate >= 1.0 || draw() < self.latency_rate {
            Some(self.latency)
        } else {
            None
        }
    }
}

/// One injected fault on a usage request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer 500, 502 or 503 without recording.
    Fail,
    /// Record, then close the connection without an answer.
    Drop,
    /// Record, then answer after this long.
    Slow(Duration),
}

/// Picks one of the 5xx statuses a real deployment shows (application error, proxy errors).
pub fn server_error_status(draw: f64) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    match (draw * 3.0) as u32 {
        0 => StatusCode::INTERNAL_SERVER_ERROR,
        1 => StatusCode::BAD_GATEWAY,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// How many faults of each kind were injected.
#[derive(Debug, Default)]
pub struct FaultCounters {
    fail: AtomicU64,
    drop: AtomicU64,
    slow: AtomicU64,
    latency: AtomicU64,
}

/// A snapshot of [`FaultCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounts {
    pub fail: u64,
    pub drop: u64,
    pub slow: u64,
    pub latency: u64,
}

impl FaultCounters {
    pub fn count(&self, fault: Fault) {
        let counter = match fault {
            Fault::Fail => &self.fail,
            Fault::Drop => &self.drop,
            Fault::Slow(_) => &self.slow,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_latency(&self) {
        self.latency.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> FaultCounts {
        FaultCounts {
            fail: self.fail.load(Ordering::Relaxed),
            drop: self.drop.load(Ordering::Relaxed),
            slow: self.slow.load(Ordering::Relaxed),
            latency: self.latency.load(Ordering::Relaxed),
        }
    }

    pub fn clear(&self) {
        for counter in [&self.fail, &self.drop, &self.slow, &self.latency] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_rates_no_faults_and_no_draws() {
        let settings = FaultSettings::default();
        let plan = settings.plan_usage_request(|| panic!("nothing to draw for"));
        assert_eq!(plan, None);
        assert_eq!(settings.plan_latency(|| panic!("no latency set")), None);
    }

    #[test]
    fn faults_are_checked_in_order_fail_drop_slow() {
        let settings = FaultSettings {
            fail_rate: 0.5,
            drop_rate: 0.5,
            slow_rate: 0.5,
            slow_duration: Duration::from_secs(3),
            ..FaultSettings::default()
        };
        let mut draws = [0.9, 0.9, 0.1].into_iter();
        assert_eq!(
            settings.plan_usage_request(|| draws.next().unwrap()),
            Some(Fault::Slow(Duration::from_secs(3)))
        );
        let mut draws = [0.9, 0.1].into_iter();
        assert_eq!(
            settings.plan_usage_request(|| draws.next().unwrap()),
            Some(Fault::Drop)
        );
        assert_eq!(settings.plan_usage_request(|| 0.1), Some(Fault::Fail));
        assert_eq!(settings.plan_usage_request(|| 0.9), None);
    }

    #[test]
    fn latency_applies_to_its_share() {
        let settings = FaultSettings {
            latency: Duration::from_millis(5),
            latency_rate: 0.25,
            ..FaultSettings::default()
        };
        assert_eq!(
            settings.plan_latency(|| 0.2),
            Some(Duration::from_millis(5))
        );
        assert_eq!(settings.plan_latency(|| 0.3), None);
    }

    #[test]
    fn rates_outside_zero_to_one_are_rejected() {
        let settings = FaultSettings {
            drop_rate: 1.5,
            ..FaultSettings::default()
        };
        assert!(settings.validate().unwrap_err().contains("drop_rate"));
        assert!(FaultSettings::default().validate().is_ok());
    }

    #[test]
    fn server_errors_cover_the_three_statuses() {
        assert_eq!(server_error_status(0.0).as_u16(), 500);
        assert_eq!(server_error_status(0.5).as_u16(), 502);
        assert_eq!(server_error_status(0.99).as_u16(), 503);
    }
}
