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
mod open;
pub mod scratch;
mod store;
pub mod trace;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::{mpsc, oneshot};

use crate::event::{DeliveryKey, SourceRef};
pub use dead_letters::DeadLetterClaim;
pub use open::{lease_for, open_for};
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
    /// Delivered, then deleted at the provider by `meterflow void`: settled without sending,
    /// never billed again (a void with `--rebill` removes the entry instead).
    Voided {
        receipt: String,
    },
    /// Someone (a dead process, or another replica) was sending it; the outcome is unknown.
    Sending {
        first_sent_at: DateTime<Utc>,
        updated_at_ms: i64,
        /// The ledger's own clock when it answered (the database's on PostgreSQL), against
        /// which `updated_at_ms` is compared: replicas' clocks never are.
        ledger_now_ms: i64,
    },
}

impl Claim {
    /// For a `Sending` answer: how long the lease of whoever stamped it still runs, by the
    /// ledger's clock (`None` once it has run out, or for any other answer).
    pub fn lease_left(&self, lease: Duration) -> Option<Duration> {
        let Claim::Sending {
            updated_at_ms,
            ledger_now_ms,
            ..
        } = self
        else {
            return None;
        };
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let left = updated_at_ms
            .saturating_add(lease_ms)
            .saturating_sub(*ledger_now_ms);
        (left > 0).then(|| Duration::from_millis(u64::try_from(left).unwrap_or(0)))
    }
}

/// A claim's answer, or the contents that reuse an id recorded with other contents.
pub type Checked<T> = Result<T, Vec<EventContent>>;

/// Where an event came from and whom it bills, recorded with its claim for `meterflow trace`
/// and `meterflow void` (the ledger otherwise keeps only digests of event ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventOrigin {
    pub event_id: String,
    pub source: SourceRef,
    /// `contract:<id>` or `external:<id>`: the contract reference the event carried.
    pub customer: String,
    /// What it bills (for `meterflow audit`'s totals per component; exact decimal).
    pub component_id: String,
    pub quantity: rust_decimal::Decimal,
    /// A digest of its billable content ([`crate::event::BillableUsage::content_digest`]): an
    /// event id keeps the digest it was first claimed with, and a later event reusing the id
    /// with another digest is an id conflict.
    pub digest: String,
}

/// What the ledger records of a written dead letter besides its source coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRecord {
    /// The event's id when it has one (read from the payload for events that failed decoding).
    pub event_id: Option<String>,
    pub reason: String,
    pub detail: String,
    pub dlq_partition: i32,
    pub dlq_offset: i64,
}

/// An event that reuses an id recorded with another digest, as a claim's `Err` names it: its
/// event key ([`DeliveryKey::for_event`] of the id) and the digest it carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventContent {
    pub event_key: DeliveryKey,
    pub digest: String,
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
    /// These events reuse an id recorded earlier with other contents. Nothing was claimed:
    /// dead-letter them (`id_conflict`) and claim the rest.
    IdConflict(Vec<EventContent>),
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
        origins: Vec<EventOrigin>,
        reply: oneshot::Sender<Result<Checked<Claim>, LedgerError>>,
    },
    /// Claims an aggregate's key and maps each of its events to it, in one transaction.
    ClaimAggregate {
        key: DeliveryKey,
        event_keys: Vec<DeliveryKey>,
        origins: Vec<EventOrigin>,
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
        record: Option<DeadLetterRecord>,
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

/// The clock a SQLite ledger writes and compares lease stamps with. PostgreSQL always uses the
/// database's own clock (shared by every replica), whatever this says.
#[derive(Clone, Copy, Debug, Default)]
pub enum LedgerClock {
    /// This process's wall clock: what the service uses.
    #[default]
    Wall,
    /// Tokio's clock, started at the wall clock's reading when it was made: under
    /// `tokio::time::pause()` a test runs a lease out by advancing time, not by waiting. A
    /// paused clock jumps to the next timer whenever the runtime has nothing to do, which
    /// includes waiting for SQLite's own thread; so with this clock each ledger transaction
    /// holds the clock still while it runs ([`LedgerClock::hold`]).
    Tokio {
        epoch_ms: i64,
        started: tokio::time::Instant,
    },
}

impl LedgerClock {
    /// A clock that follows Tokio's (paused or not) from now on.
    pub fn tokio() -> LedgerClock {
        LedgerClock::Tokio {
            epoch_ms: now_ms(),
            started: tokio::time::Instant::now(),
        }
    }

    /// While the returned guard lives, a paused Tokio clock does not advance by itself (Tokio
    /// never advances it while a blocking task runs); `None` for the wall clock.
    pub(crate) fn hold(&self) -> Option<ClockHold> {
        match self {
            LedgerClock::Wall => None,
            LedgerClock::Tokio { .. } => {
                let (release, released) = std::sync::mpsc::channel::<()>();
                tokio::task::spawn_blocking(move || {
                    let _ = released.recv();
                });
                Some(ClockHold { _release: release })
            }
        }
    }

    pub fn now_ms(&self) -> i64 {
        match self {
            LedgerClock::Wall => now_ms(),
            LedgerClock::Tokio { epoch_ms, started } => {
                let elapsed = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
                epoch_ms.saturating_add(elapsed)
            }
        }
    }
}

/// See [`LedgerClock::hold`]: dropping it ends the blocking task that holds the clock.
pub(crate) struct ClockHold {
    _release: std::sync::mpsc::Sender<()>,
}

/// The ledger as the pipeline uses it.
#[derive(Clone)]
pub struct Ledger {
    ops: mpsc::UnboundedSender<Op>,
    /// How long a "sending" claim by someone else must be left alone before taking it over.
    lease: Duration,
    /// Keys being delivered by this process right now, and a wake-up when one is let go.
    local: Arc<Mutex<HashSet<DeliveryKey>>>,
    local_released: Arc<tokio::sync::Notify>,
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `url` and starts its writer task.
    pub async fn open(url: &str, lease: Duration) -> Result<Ledger, LedgerError> {
        let store = LedgerStore::connect(url).await?;
        Ok(Self::start(store, lease))
    }

    pub fn start(store: LedgerStore, lease: Duration) -> Ledger {
        let (tx, rx) = mpsc::unbounded_channel();
        spawn_writer(store, rx);
        Ledger {
            ops: tx,
            lease,
            local: Arc::new(Mutex::new(HashSet::new())),
            local_released: Arc::new(tokio::sync::Notify::new()),
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
        match self.claim_checked(key, events, Vec::new()).await? {
            Ok(claim) => Ok(claim),
            // No origins were given, so no content can conflict.
            Err(_) => Err(LedgerError::Stopped),
        }
    }

    /// [`Ledger::claim`], checking what each event carried (its origin's digest): an event id
    /// already recorded with another digest is a different event reusing the id. Then nothing
    /// is claimed and the answer names those events (`Err`), for the caller to dead-letter with
    /// `id_conflict` and claim the rest under their own key. `origins` are recorded with a
    /// successful claim (for `meterflow trace`, and the next claim's check).
    pub async fn claim_checked(
        &self,
        key: &DeliveryKey,
        events: usize,
        origins: Vec<EventOrigin>,
    ) -> Result<Checked<Claim>, LedgerError> {
        self.call(|reply| Op::Claim {
            key: key.clone(),
            events,
            origins,
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
        self.claim_aggregate_checked(key, event_keys, Vec::new())
            .await
    }

    /// [`Ledger::claim_aggregate`], checking the origins' digests first as
    /// [`Ledger::claim_checked`] does (`AggregateClaim::IdConflict`), and recording `origins`
    /// when the events are now the aggregate's.
    pub async fn claim_aggregate_checked(
        &self,
        key: &DeliveryKey,
        event_keys: Vec<DeliveryKey>,
        origins: Vec<EventOrigin>,
    ) -> Result<AggregateClaim, LedgerError> {
        self.call(|reply| Op::ClaimAggregate {
            key: key.clone(),
            event_keys,
            origins,
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

    /// Records the letter of `source` as written (with what `meterflow trace` shows of it).
    pub async fn dead_lettered(
        &self,
        source: &SourceRef,
        record: Option<DeadLetterRecord>,
    ) -> Result<(), LedgerError> {
        self.call(|reply| Op::DeadLettered {
            source: source.clone(),
            record,
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

    /// Marks a key as being delivered by this process until the guard drops (an early return,
    /// a cancelled task or a panic included); `None` when another task of this process has it.
    pub fn try_local(&self, key: &DeliveryKey) -> Option<LocalTurn<'_>> {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let inserted = local.insert(key.clone());
        metrics::gauge!("meterflow_ledger_in_flight").set(local.len() as f64);
        inserted.then(|| LocalTurn {
            ledger: self,
            key: key.clone(),
        })
    }

    /// [`Ledger::try_local`], waiting for the other task to finish with the key.
    pub async fn local(&self, key: &DeliveryKey) -> LocalTurn<'_> {
        loop {
            // Registered before the try, so a release between the two is not missed.
            let released = self.local_released.notified();
            if let Some(turn) = self.try_local(key) {
                return turn;
            }
            released.await;
        }
    }
}

impl Ledger {
    /// Waits until no task of this process holds `key` (without taking it).
    pub async fn until_local_free(&self, key: &DeliveryKey) {
        loop {
            let released = self.local_released.notified();
            if !self
                .local
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(key)
            {
                return;
            }
            released.await;
        }
    }
}

/// Starts the group-commit writer. A SQLite ledger on the wall clock gets a thread (and a
/// one-thread runtime) of its own: each of a transaction's statements is a round trip to
/// SQLite's thread, and a writer task on the pipeline's runtime waited behind every ready
/// delivery task for each answer (a transaction took about as long as 60 task polls per
/// statement), which every claim then waited for. So does PostgreSQL's, with a pool of its own
/// (a connection belongs to the runtime that opened it). A Tokio clock (tests under
/// `tokio::time::pause()`) is the caller's runtime's: that writer stays a task of it.
fn spawn_writer(store: LedgerStore, ops: mpsc::UnboundedReceiver<Op>) {
    if !matches!(store.clock, LedgerClock::Wall) {
        tokio::spawn(store::writer(store, ops));
        return;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::warn!(error = %e, "no runtime for the ledger writer's thread; it runs as a task");
            tokio::spawn(store::writer(store, ops));
            return;
        }
    };
    // The store and the channel come back if the thread cannot start.
    let handoff = Arc::new(Mutex::new(Some((store, ops))));
    let theirs = handoff.clone();
    let started = std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || {
            let taken = theirs.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some((store, ops)) = taken {
                runtime.block_on(async move {
                    let store = store.for_writer_thread();
                    store::writer(store, ops).await;
                });
            }
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "no thread for the ledger writer; it runs as a task");
        let taken = handoff.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((store, ops)) = taken {
            tokio::spawn(store::writer(store, ops));
        }
    }
}

/// This process's one task delivering a key (see [`Ledger::try_local`]).
pub struct LocalTurn<'a> {
    ledger: &'a Ledger,
    key: DeliveryKey,
}

impl Drop for LocalTurn<'_> {
    fn drop(&mut self) {
        let mut local = self.ledger.local.lock().unwrap_or_else(|e| e.into_inner());
        local.remove(&self.key);
        metrics::gauge!("meterflow_ledger_in_flight").set(local.len() as f64);
        drop(local);
        self.ledger.local_released.notify_waiters();
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
