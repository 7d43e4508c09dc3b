//! What the emulator counted: answers by status, rate-limit refusals, injected faults, and what
//! the stored records say about duplicates.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::faults::FaultCounts;

/// Lock-free counts of answers by HTTP status (100..=599).
pub struct AnswerCounters {
    by_status: Box<[AtomicU64]>,
    rate_limited: AtomicU64,
}

const FIRST_STATUS: u16 = 100;
const LAST_STATUS: u16 = 599;

impl Default for AnswerCounters {
    fn default() -> Self {
        let slots = (LAST_STATUS - FIRST_STATUS + 1) as usize;
        AnswerCounters {
            by_status: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            rate_limited: AtomicU64::new(0),
        }
    }
}

impl AnswerCounters {
    pub fn count(&self, status: u16) {
        if (FIRST_STATUS..=LAST_STATUS).contains(&status) {
            self.by_status[(status - FIRST_STATUS) as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn count_rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    pub fn by_status(&self) -> BTreeMap<u16, u64> {
        self.by_status
            .iter()
            .enumerate()
            .filter_map(|(slot, count)| {
                let count = count.load(Ordering::Relaxed);
                (count > 0).then_some((FIRST_STATUS + slot as u16, count))
            })
            .collect()
    }

    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    pub fn clear(&self) {
        for count in self.by_status.iter() {
            count.store(0, Ordering::Relaxed);
        }
        self.rate_limited.store(0, Ordering::Relaxed);
    }
}

/// What a provider's stored records say: totals and duplicates by delivery key (billwerk: the
/// `Memo`; Billingrails: the event's `idempotency_key`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordStats {
    /// Stored records (deleted ones excluded).
    pub records: u64,
    /// Distinct delivery keys among the stored records.
    pub delivery_keys: u64,
    /// Delivery keys on more than one stored record.
    pub duplicate_keys: u64,
    /// Stored records per delivery key; records without a key are not listed. Empty unless
    /// asked for (see [`PerKey`]).
    pub records_per_delivery_key: BTreeMap<String, u64>,
    /// Events accepted but not stored again because their `idempotency_key` was already stored
    /// (Billingrails only; always 0 for billwerk, which has no idempotency).
    pub duplicate_events_ignored: u64,
}

/// Whether a stats answer lists every delivery key. The list is as long as the records are
/// many, and is built under the lock that stored usage takes: a benchmark that polls the record
/// count of a million-record emulator must not pay for it (`GET /_emulator/stats?per_key=false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerKey {
    Listed,
    Counted,
}

/// `GET /_emulator/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmulatorStats {
    /// Answers given, by HTTP status (inspection answers excluded; dropped connections excluded).
    pub answers_by_status: BTreeMap<u16, u64>,
    /// 429 answers from the rate limit.
    pub rate_limited: u64,
    pub faults_injected: FaultCounts,
    pub records: u64,
    /// Distinct delivery keys among the stored records.
    pub delivery_keys: u64,
    /// Delivery keys found on more than one stored record: each one is a double billing.
    pub duplicate_keys: u64,
    pub records_per_delivery_key: BTreeMap<String, u64>,
    pub duplicate_events_ignored: u64,
}

impl EmulatorStats {
    pub fn new(
        answers: &AnswerCounters,
        faults_injected: FaultCounts,
        records: RecordStats,
    ) -> EmulatorStats {
        EmulatorStats {
            answers_by_status: answers.by_status(),
            rate_limited: answers.rate_limited(),
            faults_injected,
            records: records.records,
            delivery_keys: records.delivery_keys,
            duplicate_keys: records.duplicate_keys,
            records_per_delivery_key: records.records_per_delivery_key,
            duplicate_events_ignored: records.duplicate_events_ignored,
        }
    }

    /// Answers with this status.
    pub fn answers(&self, status: u16) -> u64 {
        self.answers_by_status.get(&status).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_answers_and_derives_duplicates() {
        let answers = AnswerCounters::default();
        answers.count(201);
        answers.count(201);
        answers.count(429);
        answers.count(42); // not an HTTP status: ignored rather than panicking
        answers.count_rate_limited();
        let records = RecordStats {
            records: 3,
            delivery_keys: 2,
            duplicate_keys: 1,
            records_per_delivery_key: [("a".to_string(), 2), ("b".to_string(), 1)].into(),
            duplicate_events_ignored: 0,
        };
        let stats = EmulatorStats::new(&answers, FaultCounts::default(), records);
        assert_eq!(stats.answers(201), 2);
        assert_eq!(stats.answers(429), 1);
        assert_eq!(stats.answers(500), 0);
        assert_eq!(stats.rate_limited, 1);
        assert_eq!(stats.delivery_keys, 2);
        assert_eq!(stats.duplicate_keys, 1);
        answers.clear();
        assert!(answers.by_status().is_empty());
    }
}
