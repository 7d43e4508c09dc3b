//! Exponential backoff with full jitter and a cap. Pure: the caller supplies the randomness.

use std::time::Duration;

use crate::config::RetryConfig;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(config: &RetryConfig) -> Self {
        Backoff {
            initial: config.initial_backoff.max(Duration::from_millis(1)),
            max: config.max_backoff.max(config.initial_backoff),
            attempt: 0,
        }
    }

    /// The ceiling of the next wait: initial · 2^attempt, capped.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u64 << self.attempt.min(30);
        let nanos = (self.initial.as_nanos() as u64).saturating_mul(factor);
        Duration::from_nanos(nanos).min(self.max)
    }

    /// The next wait: uniform in [0, ceiling] ("full jitter"), given `unit` in [0, 1).
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The next wait with thread-local randomness.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(initial_ms: u64, max_ms: u64) -> RetryConfig {
        RetryConfig {
            initial_backoff: Duration::from_millis(initial_ms),
            max_backoff: Duration::from_millis(max_ms),
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut b = Backoff::new(&cfg(100, 1000));
        let ceilings: Vec<u128> = (0..6)
            .map(|_| {
                let c = b.ceiling().as_millis();
                b.next_with(0.5);
                c
            })
            .collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling() {
        let mut b = Backoff::new(&cfg(100, 1000));
        assert_eq!(b.next_with(0.0), Duration::ZERO);
        assert_eq!(b.next_with(0.999_999).as_millis(), 199);
        // Never overflows, however long the outage.
        for _ in 0..200 {
            assert!(b.next_with(1.0) <= Duration::from_millis(1000));
        }
    }
}
