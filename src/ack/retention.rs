//! Ledger retention: when entries may be pruned.
//!
//! An entry must outlive the chance that its event is read again: while the event's offset is
//! at or after its partition's committed offset, a restart re-reads it, and only the entry keeps
//! it from being billed twice. Pruning by age alone broke that for a partition pinned longer than
//! the retention (issue 11, problem 6). Entries carry no source offsets (an aggregate or a batch
//! spans many), so the rule is kept with the brokers' numbers instead:
//!
//! 1. At each pruning run, note every partition's high watermark (the *snapshot*, at time S).
//!    Any entry written before S is for an event that had been read before S, so its offset is
//!    below that snapshot's high watermark of its partition.
//! 2. At a later run, once the group's committed offset of **every** partition of the topics is
//!    at or past its snapshot high watermark, every event read before S is committed: entries
//!    older than `min(now - retention, S)` are pruned, and a new snapshot is taken.
//! 3. Until then nothing is pruned (one pinned partition holds pruning for all: entries do not
//!    say which partition they are for), and the old snapshot is kept.
//!
//! The decision ([`PruneGate`]) is pure; the numbers come from a [`GroupOffsets`] probe (the
//! Kafka one asks the brokers, for all partitions, assigned to this replica or not).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::ledger::LedgerStore;
use crate::config::KafkaConfig;

/// Per partition: the log start, the high watermark, and the group's committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub low: i64,
    pub high: i64,
    pub committed: Option<i64>,
}

pub type Offsets = BTreeMap<(String, i32), PartitionOffsets>;

/// Where the partitions' offsets come from.
pub trait GroupOffsets: Send + Sync + 'static {
    /// Every partition of the consumed topics. Blocking.
    fn offsets(&self) -> Result<Offsets, String>;
}

/// What a pruning run should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PruneDecision {
    /// Delete entries last updated before this time (ms since the epoch).
    Prune { before_ms: i64 },
    /// The first run: the snapshot is taken, pruning waits for the commits to pass it.
    Snapshot,
    /// Some partitions' committed offsets are still before the snapshot: (partition, committed
    /// or the log start, the snapshot's high watermark).
    Held {
        behind: Vec<((String, i32), i64, i64)>,
    },
}

/// The pruning rule (module comment). Pure: time and offsets are given.
#[derive(Debug, Default)]
pub struct PruneGate {
    snapshot: Option<Snapshot>,
}

/// When the snapshot was taken (ms since the epoch), and every partition's high watermark then.
type Snapshot = (i64, BTreeMap<(String, i32), i64>);

impl PruneGate {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn decide(&mut self, now_ms: i64, retention: Duration, offsets: &Offsets) -> PruneDecision {
        let highs = || offsets.iter().map(|(k, o)| (k.clone(), o.high)).collect();
        let Some((taken_ms, snapshot)) = &self.snapshot else {
            self.snapshot = Some((now_ms, highs()));
            return PruneDecision::Snapshot;
        };
        let behind: Vec<((String, i32), i64, i64)> = snapshot
            .iter()
            .filter_map(|(k, &high)| {
                // A partition gone since (topic deleted) cannot be read again.
                let o = offsets.get(k)?;
                // Below the log start nothing can be read again either.
                let position = o.committed.unwrap_or(o.low).max(o.low);
                (position < high).then(|| (k.clone(), position, high))
            })
            .collect();
        if !behind.is_empty() {
            return PruneDecision::Held { behind };
        }
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let before_ms = now_ms.saturating_sub(retention_ms).min(*taken_ms);
        self.snapshot = Some((now_ms, highs()));
        PruneDecision::Prune { before_ms }
    }
}

/// Prunes `store` every `every`, as [`PruneGate`] allows. Runs until aborted.
pub fn spawn_pruner(
    store: LedgerStore,
    retention: Duration,
    offsets: impl GroupOffsets,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let offsets = std::sync::Arc::new(offsets);
    tokio::spawn(async move {
        let mut gate = PruneGate::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            prune_once(&store, retention, offsets.clone(), &mut gate).await;
        }
    })
}

/// One pruning run; returns the entries removed.
pub async fn prune_once<G: GroupOffsets>(
    store: &LedgerStore,
    retention: Duration,
    offsets: std::sync::Arc<G>,
    gate: &mut PruneGate,
) -> u64 {
    let read = tokio::task::spawn_blocking(move || offsets.offsets()).await;
    let offsets = match read {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "ledger pruning skipped: cannot read the partitions' committed offsets");
            return 0;
        }
        Err(e) => {
            tracing::warn!(error = %e, "ledger pruning skipped");
            return 0;
        }
    };
    match gate.decide(super::ledger::now_ms(), retention, &offsets) {
        PruneDecision::Prune { before_ms } => match store.prune_before(before_ms).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(pruned = n, "ledger entries past retention removed");
                }
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, "ledger pruning failed");
                0
            }
        },
        PruneDecision::Snapshot => 0,
        PruneDecision::Held { behind } => {
            let shown: Vec<String> = behind
                .iter()
                .take(5)
                .map(|((t, p), at, high)| format!("{t}/{p} committed at {at}, needs {high}"))
                .collect();
            tracing::info!(
                partitions = behind.len(),
                behind = %shown.join(", "),
                "ledger pruning held: a partition's committed offset has not passed what was \
                 read before the last pruning run (entries of uncommitted events must stay)"
            );
            0
        }
    }
}

/// The brokers' numbers for every partition of `kafka.topics` (regex subscriptions resolved
/// through the cluster's metadata), through a client of the group that never joins it.
pub struct KafkaGroupOffsets {
    consumer: BaseConsumer,
    topics: Vec<String>,
    timeout: Duration,
}

impl KafkaGroupOffsets {
    pub fn new(kafka: &KafkaConfig) -> anyhow::Result<KafkaGroupOffsets> {
        let mut config = ClientConfig::new();
        for (k, v) in &kafka.properties {
            config.set(k, v);
        }
        config
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", &kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        config.remove("group.instance.id");
        Ok(KafkaGroupOffsets {
            consumer: config.create()?,
            topics: kafka.topics.clone(),
            timeout: Duration::from_secs(10),
        })
    }
}

impl GroupOffsets for KafkaGroupOffsets {
    fn offsets(&self) -> Result<Offsets, String> {
        let metadata = self
            .consumer
            .fetch_metadata(None, self.timeout)
            .map_err(|e| format!("metadata: {e}"))?;
        let patterns: Vec<regex::Regex> = self
            .topics
            .iter()
            .filter(|t| t.starts_with('^'))
            .filter_map(|t| regex::Regex::new(t).ok())
            .collect();
        let wanted = |name: &str| {
            self.topics.iter().any(|t| t == name) || patterns.iter().any(|p| p.is_match(name))
        };
        let mut tpl = TopicPartitionList::new();
        let mut out = Offsets::new();
        for topic in metadata.topics().iter().filter(|t| wanted(t.name())) {
            if let Some(e) = topic.error() {
                return Err(format!("topic {}: {e:?}", topic.name()));
            }
            for p in topic.partitions() {
                let (low, high) = self
                    .consumer
                    .fetch_watermarks(topic.name(), p.id(), self.timeout)
                    .map_err(|e| format!("watermarks of {}/{}: {e}", topic.name(), p.id()))?;
                tpl.add_partition(topic.name(), p.id());
                out.insert(
                    (topic.name().to_string(), p.id()),
                    PartitionOffsets {
                        low,
                        high,
                        committed: None,
                    },
                );
            }
        }
        // Every configured (non-pattern) topic must be there, or its partitions would be
        // missed: an error, not a reason to prune.
        for t in self.topics.iter().filter(|t| !t.starts_with('^')) {
            if !out.keys().any(|(name, _)| name == t) {
                return Err(format!("topic {t} not in the cluster's metadata"));
            }
        }
        if tpl.count() == 0 {
            return Ok(out);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, self.timeout)
            .map_err(|e| format!("committed offsets: {e}"))?;
        for e in committed.elements() {
            if let Some(o) = out.get_mut(&(e.topic().to_string(), e.partition())) {
                o.committed = match e.offset() {
                    Offset::Offset(c) if c >= 0 => Some(c),
                    _ => None,
                };
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::ledger::{Claim, Ledger};
    use crate::event::DeliveryKey;

    const DAY_MS: i64 = 24 * 3600 * 1000;

    fn offsets(parts: &[(i32, i64, i64, Option<i64>)]) -> Offsets {
        parts
            .iter()
            .map(|&(p, low, high, committed)| {
                (
                    ("usage".to_string(), p),
                    PartitionOffsets {
                        low,
                        high,
                        committed,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn prunes_only_once_every_partition_committed_past_the_snapshot() {
        let retention = Duration::from_secs(35 * 24 * 3600);
        let mut gate = PruneGate::new();
        let t0 = 100 * DAY_MS;
        assert_eq!(
            gate.decide(
                t0,
                retention,
                &offsets(&[(0, 0, 500, Some(400)), (1, 0, 90, None)])
            ),
            PruneDecision::Snapshot
        );
        // An hour later partition 1 is pinned at 40 (its events 40..90 were read before t0).
        let t1 = t0 + 3_600_000;
        assert_eq!(
            gate.decide(
                t1,
                retention,
                &offsets(&[(0, 0, 900, Some(800)), (1, 0, 95, Some(40))])
            ),
            PruneDecision::Held {
                behind: vec![(("usage".into(), 1), 40, 90)]
            }
        );
        // Forty days later, still pinned: still nothing pruned, whatever the age.
        let t2 = t0 + 40 * DAY_MS;
        assert!(matches!(
            gate.decide(
                t2,
                retention,
                &offsets(&[(0, 0, 900, Some(900)), (1, 0, 95, Some(89))])
            ),
            PruneDecision::Held { .. }
        ));
        // Unpinned: entries older than the retention go; a new snapshot is taken.
        assert_eq!(
            gate.decide(
                t2,
                retention,
                &offsets(&[(0, 0, 950, Some(900)), (1, 0, 95, Some(90))])
            ),
            PruneDecision::Prune { before_ms: t0 },
            "entries written before the snapshot the commits passed"
        );
        assert!(
            matches!(
                gate.decide(
                    t2 + 1,
                    retention,
                    &offsets(&[(0, 0, 950, Some(900)), (1, 0, 95, Some(95))])
                ),
                PruneDecision::Held { .. }
            ),
            "the new snapshot's 950 on partition 0 is not committed yet"
        );
    }

    #[test]
    fn the_cutoff_never_passes_the_snapshot_and_deleted_offsets_do_not_hold() {
        // A retention shorter than the pruning interval: entries written after the snapshot may
        // be for events not committed yet, so the cutoff is the snapshot's time.
        let mut gate = PruneGate::new();
        let t0 = 10 * DAY_MS;
        gate.decide(t0, Duration::from_secs(60), &offsets(&[(0, 0, 100, None)]));
        // Never committed, but the topic's retention deleted everything before 100: nothing
        // before it can be read again. A partition deleted since does not hold either.
        assert_eq!(
            gate.decide(
                t0 + 3_600_000,
                Duration::from_secs(60),
                &offsets(&[(7, 0, 5, None)])
                    .into_iter()
                    .chain(offsets(&[(0, 100, 120, None)]))
                    .collect()
            ),
            PruneDecision::Prune { before_ms: t0 }
        );
    }

    /// A probe with fixed offsets.
    struct Fixed(std::sync::Mutex<Offsets>);
    impl GroupOffsets for Fixed {
        fn offsets(&self) -> Result<Offsets, String> {
            Ok(crate::sync::lock(&self.0).clone())
        }
    }

    /// Issue 11, problem 6: pruning by age alone removed the entries of delivered events whose
    /// offsets a pinned partition had not committed; a restart then billed them again. Here the
    /// entries are older than the retention, and stay until the partition's committed offset
    /// has passed them.
    #[tokio::test]
    async fn entries_of_uncommitted_events_outlive_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        let store = LedgerStore::connect(&url).await.unwrap();
        let ledger = Ledger::start(store.clone(), Duration::ZERO);
        let key = DeliveryKey::for_event("evt_pinned");
        ledger.claim(&key, 1).await.unwrap();
        ledger.finish(&key, true, "usage-1".into());
        ledger.claim(&key, 1).await.unwrap();
        // A retention of 1 ms: by age, the entry is long past it.
        let retention = Duration::from_millis(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The event was read at offset 40 of partition 1; the partition is pinned at 40.
        let probe = std::sync::Arc::new(Fixed(std::sync::Mutex::new(offsets(&[
            (0, 0, 500, Some(500)),
            (1, 0, 90, Some(40)),
        ]))));
        let mut gate = PruneGate::new();
        for _ in 0..3 {
            assert_eq!(
                prune_once(&store, retention, probe.clone(), &mut gate).await,
                0
            );
        }
        assert_eq!(
            ledger.claim(&key, 1).await.unwrap(),
            Claim::Delivered {
                receipt: "usage-1".into()
            },
            "a re-read of the event finds it delivered"
        );
        // The partition moves on past everything read before the snapshot: now it goes.
        *crate::sync::lock(&probe.0) = offsets(&[(0, 0, 500, Some(500)), (1, 0, 90, Some(90))]);
        assert_eq!(
            prune_once(&store, retention, probe.clone(), &mut gate).await,
            1
        );
        assert!(matches!(
            ledger.claim(&key, 1).await.unwrap(),
            Claim::Claimed { .. }
        ));
    }
}
