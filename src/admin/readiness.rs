//! `/readyz`: is this process doing its job right now? Four checks — partitions assigned, the
//! broker answered recently, the provider answered recently, no partition pinned for longer than
//! `kafka.stuck_after` — plus "not shutting down".
//!
//! [`Readiness`] is a handful of atomics, so the hot path (every provider answer) pays one clock
//! read and one store. [`watch`] keeps it fresh when traffic alone does not: it copies the
//! assigned-partition count from the source, asks a broker for metadata, and sends one
//! unauthenticated `GET` to the provider's base URL when no answer was seen for a while.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::SinkConfig;
use crate::deliver::client::ProviderHealth;

/// An answer older than this no longer counts as "reachable". Several probe intervals, so one
/// slow or lost probe does not flap readiness; short enough that a real outage shows within
/// the orchestrator's own failure threshold.
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// How often [`watch`] asks the broker, and how old the provider's last answer may get before
/// it asks the provider itself.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
/// How long a broker probe may block: it also bounds how long a probe in progress holds the
/// consumer (and the runtime's exit) after the pipeline stopped.
const BROKER_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/readyz` reports; updated by the source, the sink and [`watch`].
#[derive(Debug)]
pub struct Readiness {
    epoch: Instant,
    assigned_partitions: AtomicUsize,
    /// Milliseconds after `epoch` of the last answer, plus one; 0 = never.
    broker_answered: AtomicU64,
    provider_answered: AtomicU64,
    stopping: AtomicBool,
    /// Partitions whose committed offset is held, as last copied from the source.
    pinned: Mutex<Vec<Pinned>>,
    /// `kafka.stuck_after`, in milliseconds.
    stuck_after_ms: AtomicU64,
}

pub use crate::config::DEFAULT_STUCK_AFTER;
/// A partition whose committed offset is held by something unsettled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    pub topic: String,
    pub partition: i32,
    /// Where its committed offset stands (`None`: its start is not known yet).
    pub position: Option<i64>,
    /// Since when the oldest unsettled event (or unverified offset gap) has held it.
    pub since: Instant,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::new()
    }
}

/// What the provider client reports: every HTTP answer from the provider.
impl ProviderHealth for Readiness {
    fn provider_answered(&self) {
        Readiness::provider_answered(self);
    }
}

impl Readiness {
    pub fn new() -> Self {
        Readiness {
            epoch: Instant::now(),
            assigned_partitions: AtomicUsize::new(0),
            broker_answered: AtomicU64::new(0),
            provider_answered: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            pinned: Mutex::new(Vec::new()),
            stuck_after_ms: AtomicU64::new(DEFAULT_STUCK_AFTER.as_millis() as u64),
        }
    }

    /// How long a partition may be pinned before `/readyz` reports it (`kafka.stuck_after`).
    pub fn set_stuck_after(&self, after: Duration) {
        self.stuck_after_ms.store(
            u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The partitions held right now (see [`PartitionView::pinned`]).
    pub fn set_pinned(&self, pinned: Vec<Pinned>) {
        *crate::sync::lock(&self.pinned) = pinned;
    }

    pub fn set_assigned_partitions(&self, n: usize) {
        self.assigned_partitions.store(n, Ordering::Relaxed);
    }

    /// A broker answered a request (metadata, watermarks, a fetch).
    pub fn broker_answered(&self) {
        self.broker_answered
            .store(self.stamp(Instant::now()), Ordering::Relaxed);
    }

    /// The provider answered with any HTTP status: even a 4xx or a 429 proves it is reachable.
    /// Connection errors and timeouts must not call this (the provider client calls it, through
    /// [`ProviderHealth`]).
    pub fn provider_answered(&self) {
        self.provider_answered
            .store(self.stamp(Instant::now()), Ordering::Relaxed);
    }

    /// The process is draining: a replacement should take the traffic (and the partitions).
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// How long ago the provider last answered, if ever.
    pub fn provider_answer_age(&self, now: Instant) -> Option<Duration> {
        self.age(&self.provider_answered, now)
    }

    pub fn report(&self) -> ReadinessReport {
        self.report_at(Instant::now())
    }

    /// The checks as of `now` (a parameter, so tests need no clock).
    pub fn report_at(&self, now: Instant) -> ReadinessReport {
        let partitions = self.assigned_partitions.load(Ordering::Relaxed);
        let answered = |what: &str, age: Option<Duration>, fix: &str| match age {
            Some(age) if age <= STALE_AFTER => Check {
                ok: true,
                detail: format!("{what} answered {} ms ago", age.as_millis()),
            },
            Some(age) => Check {
                ok: false,
                detail: format!(
                    "{what} has not answered for {} s (limit {} s): {fix}",
                    age.as_secs(),
                    STALE_AFTER.as_secs()
                ),
            },
            None => Check {
                ok: false,
                detail: format!("{what} has not answered yet: {fix}"),
            },
        };
        let checks = Checks {
            running: if self.stopping.load(Ordering::Relaxed) {
                Check {
                    ok: false,
                    detail: "shutting down: draining in-flight work".into(),
                }
            } else {
                Check {
                    ok: true,
                    detail: "running".into(),
                }
            },
            partitions: if partitions > 0 {
                Check {
                    ok: true,
                    detail: format!("{partitions} partitions assigned"),
                }
            } else {
                Check {
                    ok: false,
                    detail: "no partitions assigned: the consumer group has not assigned any yet, \
                             or there are more replicas than partitions"
                        .into(),
                }
            },
            broker: answered(
                "the Kafka broker",
                self.age(&self.broker_answered, now),
                "check kafka.brokers, network and TLS/SASL settings",
            ),
            provider: answered(
                "the provider",
                self.age(&self.provider_answered, now),
                "check sink.base_url, DNS and egress",
            ),
            progress: self.progress(now),
        };
        ReadinessReport {
            ready: checks.running.ok
                && checks.partitions.ok
                && checks.broker.ok
                && checks.provider.ok
                && checks.progress.ok,
            checks,
        }
    }

    /// Fails when a partition's committed offset has been held for longer than
    /// `kafka.stuck_after`, naming each such partition.
    fn progress(&self, now: Instant) -> Check {
        let limit = Duration::from_millis(self.stuck_after_ms.load(Ordering::Relaxed));
        let mut stuck: Vec<String> = crate::sync::lock(&self.pinned)
            .iter()
            .filter_map(|p| {
                let held = now.saturating_duration_since(p.since);
                (held > limit).then(|| {
                    let at = p
                        .position
                        .map_or_else(|| "its start".to_string(), |o| format!("offset {o}"));
                    format!(
                        "{}/{} pinned at {at} for {} s",
                        p.topic,
                        p.partition,
                        held.as_secs()
                    )
                })
            })
            .collect();
        if stuck.is_empty() {
            return Check {
                ok: true,
                detail: format!("no partition pinned for longer than {} s", limit.as_secs()),
            };
        }
        stuck.sort();
        Check {
            ok: false,
            detail: format!(
                "{} (limit kafka.stuck_after = {} s): an event there is neither delivered nor \
                 dead-lettered, or an offset gap is not verified; see the logs for that \
                 partition and docs/operations.md#meterflowpartitionstuck",
                stuck.join(", "),
                limit.as_secs()
            ),
        }
    }

    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    fn age(&self, stamp: &AtomicU64, now: Instant) -> Option<Duration> {
        match stamp.load(Ordering::Relaxed) {
            0 => None,
            s => Some(
                now.saturating_duration_since(self.epoch)
                    .saturating_sub(Duration::from_millis(s - 1)),
            ),
        }
    }
}

/// The body of `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct ReadinessReport {
    pub ready: bool,
    pub checks: Checks,
}

#[derive(Debug, Clone, Serialize)]
pub struct Checks {
    pub running: Check,
    pub partitions: Check,
    pub broker: Check,
    pub provider: Check,
    /// No partition pinned for longer than `kafka.stuck_after`.
    pub progress: Check,
}

impl Checks {
    /// Each check with its name in `/readyz`'s JSON.
    pub fn named(&self) -> [(&'static str, &Check); 5] {
        [
            ("running", &self.running),
            ("partitions", &self.partitions),
            ("broker", &self.broker),
            ("provider", &self.provider),
            ("progress", &self.progress),
        ]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub ok: bool,
    pub detail: String,
}

/// An unauthenticated `GET` of the provider's base URL. Any HTTP answer counts: the question is
/// "can we reach it", and sending credentials on a probe would only add ways to leak them.
pub struct ProviderProbe {
    client: reqwest::Client,
    url: String,
}

impl ProviderProbe {
    pub fn new(config: &SinkConfig) -> anyhow::Result<ProviderProbe> {
        let timeout = config.request_timeout.min(Duration::from_secs(5));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect is already an answer; following it would probe someone else.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!(
                "meterflow/",
                env!("CARGO_PKG_VERSION"),
                " readiness"
            ))
            .build()?;
        Ok(ProviderProbe {
            client,
            url: config.base_url.clone(),
        })
    }

    /// True when the provider answered with any status.
    pub async fn answers(&self) -> bool {
        match self.client.get(&self.url).send().await {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e.without_url(), "provider readiness probe got no answer");
                false
            }
        }
    }
}

/// What readiness reads off the source (the Kafka consumer implements it).
pub trait PartitionView: Clone + Send + Sync + 'static {
    /// Partitions this process owns now.
    fn assigned_partitions(&self) -> usize;
    /// Partitions whose committed offset is held by something unsettled.
    fn pinned(&self) -> Vec<Pinned>;
    /// Asks a broker for metadata; true when one answered within `timeout`. Blocks.
    fn probe_broker(&self, timeout: Duration) -> bool;
}

/// Keeps `readiness` fresh while the pipeline runs; abort the task when the pipeline stops.
pub fn watch(
    readiness: Arc<Readiness>,
    source: impl PartitionView,
    provider: ProviderProbe,
    stuck_after: Duration,
) -> tokio::task::JoinHandle<()> {
    readiness.set_stuck_after(stuck_after);
    tokio::spawn(async move {
        let partitions = async {
            let mut every = tokio::time::interval(Duration::from_millis(250));
            let mut ticks = 0u32;
            loop {
                every.tick().await;
                readiness.set_assigned_partitions(source.assigned_partitions());
                ticks = ticks.wrapping_add(1);
                if ticks % 4 == 0 {
                    readiness.set_pinned(source.pinned());
                }
            }
        };
        let broker = async {
            let mut every = tokio::time::interval(PROBE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let source = source.clone();
                // librdkafka's metadata call blocks; keep it off the async workers.
                let answered =
                    tokio::task::spawn_blocking(move || source.probe_broker(BROKER_PROBE_TIMEOUT))
                        .await
                        .unwrap_or(false);
                if answered {
                    readiness.broker_answered();
                }
            }
        };
        let provider = async {
            let mut every = tokio::time::interval(PROBE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                // Under load the sink's own requests keep the stamp fresh: no extra request.
                let fresh = readiness
                    .provider_answer_age(Instant::now())
                    .is_some_and(|age| age < PROBE_EVERY);
                if !fresh && provider.answers().await {
                    readiness.provider_answered();
                }
            }
        };
        tokio::join!(partitions, broker, provider);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passes() {
        let r = Readiness::new();
        let now = Instant::now();
        let report = r.report_at(now);
        assert!(!report.ready);
        assert!(!report.checks.partitions.ok);
        assert!(!report.checks.broker.ok);
        assert!(report.checks.broker.detail.contains("not answered yet"));
        assert!(!report.checks.provider.ok);
        assert!(report.checks.running.ok);

        r.set_assigned_partitions(3);
        r.broker_answered();
        assert!(!r.report().ready, "provider still unknown");
        r.provider_answered();
        let report = r.report();
        assert!(report.ready, "{report:?}");
        assert_eq!(report.checks.partitions.detail, "3 partitions assigned");

        r.set_assigned_partitions(0);
        assert!(
            !r.report().ready,
            "a revoke of every partition makes it unready"
        );
        r.set_assigned_partitions(1);
        r.set_stopping();
        let report = r.report();
        assert!(!report.ready);
        assert!(report.checks.running.detail.contains("shutting down"));
    }

    #[test]
    fn answers_go_stale() {
        let r = Readiness::new();
        r.set_assigned_partitions(1);
        r.broker_answered();
        r.provider_answered();
        let now = Instant::now();
        assert!(r.report_at(now).ready);
        let later = now + STALE_AFTER + Duration::from_secs(1);
        let report = r.report_at(later);
        assert!(!report.ready);
        assert!(report.checks.broker.detail.contains("has not answered for"));
        assert!(report.checks.provider.detail.contains("sink.base_url"));
        // A fresh answer from only one of them is not enough.
        assert_eq!(
            r.provider_answer_age(later).map(|a| a > STALE_AFTER),
            Some(true)
        );
    }

    #[test]
    fn report_serializes_as_json_with_every_check() {
        let body = serde_json::to_value(Readiness::new().report()).unwrap();
        assert_eq!(body["ready"], false);
        for check in ["running", "partitions", "broker", "provider", "progress"] {
            assert!(body["checks"][check]["ok"].is_boolean(), "{check}");
            assert!(body["checks"][check]["detail"].is_string(), "{check}");
        }
    }

    #[test]
    fn a_partition_pinned_longer_than_stuck_after_is_reported() {
        let r = Readiness::new();
        r.set_assigned_partitions(2);
        r.broker_answered();
        r.provider_answered();
        r.set_stuck_after(Duration::from_secs(10));
        let now = Instant::now();
        r.set_pinned(vec![
            Pinned {
                topic: "usage".into(),
                partition: 1,
                position: Some(1885),
                since: now,
            },
            Pinned {
                topic: "usage".into(),
                partition: 0,
                position: None,
                since: now,
            },
        ]);
        let report = r.report_at(now + Duration::from_secs(5));
        assert!(report.ready, "pinned for 5 s of 10: {report:?}");
        assert!(report.checks.progress.ok);
        let report = r.report_at(now + Duration::from_secs(11));
        assert!(!report.ready);
        assert!(!report.checks.progress.ok);
        assert!(report.checks.broker.ok && report.checks.provider.ok);
        let detail = &report.checks.progress.detail;
        assert!(
            detail.contains("usage/1 pinned at offset 1885 for 11 s"),
            "{detail}"
        );
        assert!(detail.contains("usage/0 pinned at its start"), "{detail}");
        assert!(detail.contains("kafka.stuck_after = 10 s"), "{detail}");
        r.set_pinned(Vec::new());
        assert!(r.report_at(now + Duration::from_secs(11)).ready);
    }
}
