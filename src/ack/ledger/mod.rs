//! The delivery ledger: what was sent under which delivery key, so that a restart or a
//! rebalance neither loses nor double-bills an event.
//!
//! Before a request: claim the key ("sending since T"). After a 2xx: "delivered as usage U".
//! A redelivered event finds its key: delivered → settle without sending; sending → the outcome
//! is unknown → reconcile with the provider before anything is re-sent; absent → send.
//!
//! One SQL dialect for both stores (sqlx `Any`): an SQLite file by default, PostgreSQL when
//! several replicas share the consumer group. Writes are group-committed by one task so a busy
//! pipeline pays one transaction per group, not per event.

mod dead_letters;
mod store;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::{mpsc, oneshot};

use crate::event::{DeliveryKey, SourceRef};
pub use dead_letters::DeadLetterClaim;
pub use store::LedgerStore;

/// What the ledger knows of a delivery key at claim time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// New: this caller sends it. `updated_at_ms` is the claim's lease stamp.
    Claimed {
        updated_at_ms: i64,
    },
    Delivered {
        receipt: String,
    },
    /// The provider refused it for good; the answer is kept.
    Rejected {
        answer: String,
    },
    /// Someone (a dead process, or another replica) was sending it; the outcome is unknown.
    Sending {
        first_sent_at: DateTime<Utc>,
        updated_at_ms: i64,
    },
}

/// What the ledger knows of an aggregate (several events summed into one usage record) at
/// claim time. See docs/delivery-semantics.md, "Aggregation and the ledger".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AggregateClaim {
    /// Every event is mapped to this aggregate's key (just now, or by an earlier claim of the
    /// same aggregate): the key's own state, as for a single delivery.
    Own(Claim),
    /// Some events were already sent in other aggregates. Nothing was written: settle these
    /// through their aggregates first, then claim what is left.
    Earlier(Vec<EarlierAggregate>),
    /// Another writer mapped some of these events while this claim ran (several replicas on
    /// PostgreSQL). Nothing was written: claim again.
    Contended,
}

/// An aggregate that earlier carried some of the events now being claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlierAggregate {
    pub key: DeliveryKey,
    /// `Delivered`, `Rejected` or `Sending` (never `Claimed`).
    pub state: Claim,
    /// The claimed events it carried (their per-event keys).
    pub event_keys: Vec<DeliveryKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("ledger writer stopped")]
    Stopped,
}

pub(crate) enum Op {
    Claim {
        key: DeliveryKey,
        events: usize,
        reply: oneshot::Sender<Result<Claim, LedgerError>>,
    },
    /// Claims an aggregate's key and maps each of its events to it, in one transaction.
    ClaimAggregate {
        key: DeliveryKey,
        event_keys: Vec<DeliveryKey>,
        reply: oneshot::Sender<Result<AggregateClaim, LedgerError>>,
    },
    /// Marks a "sending" aggregate that the provider never received as abandoned and frees its
    /// events (compare-and-set on `updated_at`). False when someone else moved it meanwhile.
    Abandon {
        key: DeliveryKey,
        expected_updated_at_ms: i64,
        reply: oneshot::Sender<Result<bool, LedgerError>>,
    },
    /// Compare-and-set on `updated_at`: refreshes our claim before an attempt, or takes over a
    /// claim whose lease ran out. False when someone else moved it meanwhile.
    Touch {
        key: DeliveryKey,
        expected_updated_at_ms: i64,
        reply: oneshot::Sender<Result<Option<i64>, LedgerError>>,
    },
    Finish {
        key: DeliveryKey,
        delivered: bool,
        receipt: String,
    },
    /// The letter is written: its intent gives way to the record.
    DeadLettered {
        source: SourceRef,
        reply: oneshot::Sender<Result<(), LedgerError>>,
    },
    /// Records the intent to write a source offset's dead letter, unless written or intended.
    ClaimDeadLetter {
        source: SourceRef,
        dlq_partition: i32,
        floor: i64,
        reply: oneshot::Sender<Result<DeadLetterClaim, LedgerError>>,
    },
    /// Compare-and-set on a dead-letter intent's `updated_at`.
    TouchDeadLetter {
        source: SourceRef,
        expected_updated_at_ms: i64,
        reply: oneshot::Sender<Result<Option<i64>, LedgerError>>,
    },
    IsDeadLettered {
        source: SourceRef,
        reply: oneshot::Sender<Result<bool, LedgerError>>,
    },
}

/// The ledger as the pipeline uses it.
#[derive(Clone)]
pub struct Ledger {
    ops: mpsc::UnboundedSender<Op>,
    /// How long a "sending" claim by someone else must be left alone before taking it over.
    lease: Duration,
    /// Keys being delivered by this process right now.
    local: Arc<Mutex<HashSet<DeliveryKey>>>,
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `url` and starts its writer task.
    pub async fn open(url: &str, lease: Duration) -> Result<Ledger, LedgerError> {
        let store = LedgerStore::connect(url).await?;
        Ok(Self::start(store, lease))
    }

    pub fn start(store: LedgerStore, lease: Duration) -> Ledger {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(store::writer(store, rx));
        Ledger {
            ops: tx,
            lease,
            local: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, LedgerError>>) -> Op,
    ) -> Result<T, LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.ops.send(make(tx)).map_err(|_| LedgerError::Stopped)?;
        rx.await.map_err(|_| LedgerError::Stopped)?
    }

    pub async fn claim(&self, key: &DeliveryKey, events: usize) -> Result<Claim, LedgerError> {
        self.call(|reply| Op::Claim {
            key: key.clone(),
            events,
            reply,
        })
        .await
    }

    /// Claims the key of an aggregate of `event_keys` (the per-event delivery keys) and maps
    /// every event to it, atomically: either all events now belong to `key`, or nothing was
    /// written and the answer says which earlier aggregates hold some of them.
    pub async fn claim_aggregate(
        &self,
        key: &DeliveryKey,
        event_keys: Vec<DeliveryKey>,
    ) -> Result<AggregateClaim, LedgerError> {
        self.call(|reply| Op::ClaimAggregate {
            key: key.clone(),
            event_keys,
            reply,
        })
        .await
    }

    /// Marks `key` (still "sending", last touched at `expected_updated_at_ms`) as abandoned —
    /// the provider was asked and does not have it — and frees its events for a new aggregate.
    /// False when the row moved meanwhile (someone else touched or finished it).
    pub async fn abandon(
        &self,
        key: &DeliveryKey,
        expected_updated_at_ms: i64,
    ) -> Result<bool, LedgerError> {
        self.call(|reply| Op::Abandon {
            key: key.clone(),
            expected_updated_at_ms,
            reply,
        })
        .await
    }

    /// Moves `updated_at` from `expected` to now; `None` when the row moved meanwhile.
    pub async fn touch(
        &self,
        key: &DeliveryKey,
        expected_updated_at_ms: i64,
    ) -> Result<Option<i64>, LedgerError> {
        self.call(|reply| Op::Touch {
            key: key.clone(),
            expected_updated_at_ms,
            reply,
        })
        .await
    }

    /// Records the final outcome (not awaited: the offset protects the event until then, and a
    /// lost "delivered" only costs a reconciliation after a crash).
    pub fn finish(&self, key: &DeliveryKey, delivered: bool, receipt: String) {
        let _ = self.ops.send(Op::Finish {
            key: key.clone(),
            delivered,
            receipt,
        });
    }

    pub async fn dead_lettered(&self, source: &SourceRef) -> Result<(), LedgerError> {
        self.call(|reply| Op::DeadLettered {
            source: source.clone(),
            reply,
        })
        .await
    }

    /// Before writing a dead letter: records "writing it into dead-letter partition
    /// `dlq_partition`, whose end is now `floor`" — or answers that it is written, or that
    /// someone else recorded that intent (see [`DeadLetterClaim`]).
    pub async fn claim_dead_letter(
        &self,
        source: &SourceRef,
        dlq_partition: i32,
        floor: i64,
    ) -> Result<DeadLetterClaim, LedgerError> {
        self.call(|reply| Op::ClaimDeadLetter {
            source: source.clone(),
            dlq_partition,
            floor,
            reply,
        })
        .await
    }

    /// Moves a dead-letter intent's `updated_at` from `expected` to now; `None` when it moved
    /// meanwhile (someone else took it over, or wrote the letter).
    pub async fn touch_dead_letter(
        &self,
        source: &SourceRef,
        expected_updated_at_ms: i64,
    ) -> Result<Option<i64>, LedgerError> {
        self.call(|reply| Op::TouchDeadLetter {
            source: source.clone(),
            expected_updated_at_ms,
            reply,
        })
        .await
    }

    pub async fn is_dead_lettered(&self, source: &SourceRef) -> Result<bool, LedgerError> {
        self.call(|reply| Op::IsDeadLettered {
            source: source.clone(),
            reply,
        })
        .await
    }

    /// Marks a key as being delivered by this process; false when it already is.
    pub fn enter_local(&self, key: &DeliveryKey) -> bool {
        let inserted = self.local.lock().unwrap().insert(key.clone());
        metrics::gauge!("meterflow_ledger_in_flight").set(self.local.lock().unwrap().len() as f64);
        inserted
    }

    pub fn leave_local(&self, key: &DeliveryKey) {
        self.local.lock().unwrap().remove(key);
        metrics::gauge!("meterflow_ledger_in_flight").set(self.local.lock().unwrap().len() as f64);
    }
}

pub(crate) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

pub(crate) fn from_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(Utc::now)
}
