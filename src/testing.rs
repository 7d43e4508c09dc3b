//! Test equipment for the crate's own unit tests (compiled only under `cfg(test)`): a source in
//! memory, dead letters kept in memory and a scripted sink. With them the protocol
//! (`ack::delivery::tests`) and the whole pipeline (`pipeline::tests`) run without Kafka or
//! HTTP, under `tokio::time::pause()`, against the real ledger. The integration tests in
//! `tests/` use the real components instead (mock cluster, Tansu, the emulators).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::ack::deadletter::{DeadLetter, Written};
use crate::ack::delivery::{DeadLetters, Ownership};
use crate::ack::ledger::Ledger;
use crate::admin::readiness::{PartitionView, Pinned};
use crate::admin::status::{PartitionFigures, PartitionStatus};
use crate::deliver::client::Turn;
use crate::deliver::ratelimit::RateLimiter;
use crate::deliver::{Attempt, Delivery, RateSignals, Reconciled, RetryCause, Sink};
use crate::event::{DeliveryKey, RawMessage, RejectReason, SourceRef};
use crate::source::{Source, SourceControl};

/// A source in memory, like a consumer-group member that owns `partitions`: messages go in
/// with [`MemorySource::feed`], settled offsets are recorded, a partition can be revoked. Its
/// shutdown closes the message channel once everything fed is settled (or after
/// `drain_timeout`), as the Kafka source's drain does.
#[derive(Clone)]
pub(crate) struct MemorySource {
    shared: Arc<Shared>,
}

struct Shared {
    owned: Mutex<HashSet<i32>>,
    settled: Mutex<Vec<(i32, i64)>>,
    fed: AtomicUsize,
    settled_now: tokio::sync::Notify,
    revocations: tokio::sync::watch::Sender<u64>,
    held: Mutex<Vec<bool>>,
    feed: Mutex<Option<mpsc::Sender<RawMessage>>>,
    drain_timeout: Duration,
}

impl MemorySource {
    pub(crate) const CAPACITY: usize = 4096;

    /// A source owning `partitions`, and the channel its messages arrive on (room for
    /// [`MemorySource::CAPACITY`] unread messages).
    pub(crate) fn owning(partitions: &[i32]) -> (MemorySource, mpsc::Receiver<RawMessage>) {
        let (tx, rx) = mpsc::channel(Self::CAPACITY);
        let source = MemorySource {
            shared: Arc::new(Shared {
                owned: Mutex::new(partitions.iter().copied().collect()),
                settled: Mutex::new(Vec::new()),
                fed: AtomicUsize::new(0),
                settled_now: tokio::sync::Notify::new(),
                revocations: tokio::sync::watch::channel(0).0,
                held: Mutex::new(Vec::new()),
                feed: Mutex::new(Some(tx)),
                // Long: a test's drain should end because everything settled.
                drain_timeout: Duration::from_secs(3600),
            }),
        };
        (source, rx)
    }

    /// Reads `message` (as if fetched from its partition).
    pub(crate) fn feed(&self, message: RawMessage) {
        self.shared.fed.fetch_add(1, Ordering::SeqCst);
        if let Some(tx) = self.shared.feed.lock().unwrap().as_ref() {
            tx.try_send(message)
                .expect("a test feeds at most CAPACITY unread messages");
        }
    }

    pub(crate) fn revoke(&self, partition: i32) {
        self.shared.owned.lock().unwrap().remove(&partition);
        self.shared.revocations.send_modify(|n| *n += 1);
    }

    /// Settled offsets, sorted.
    pub(crate) fn settled(&self) -> Vec<i64> {
        let mut offsets: Vec<i64> = self
            .shared
            .settled
            .lock()
            .unwrap()
            .iter()
            .map(|(_, offset)| *offset)
            .collect();
        offsets.sort_unstable();
        offsets
    }

    /// Every `hold` the pipeline asked for, in order (true: the 429 gate closed).
    pub(crate) fn holds(&self) -> Vec<bool> {
        self.shared.held.lock().unwrap().clone()
    }
}

impl Ownership for MemorySource {
    fn owns(&self, source: &SourceRef, _generation: u64) -> bool {
        self.shared
            .owned
            .lock()
            .unwrap()
            .contains(&source.partition)
    }
    fn settle(&self, source: &SourceRef, _generation: u64) {
        self.shared
            .settled
            .lock()
            .unwrap()
            .push((source.partition, source.offset));
        self.shared.settled_now.notify_waiters();
    }
    fn revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.revocations.subscribe()
    }
}

impl PartitionView for MemorySource {
    fn assigned_partitions(&self) -> usize {
        self.shared.owned.lock().unwrap().len()
    }
    fn pinned(&self) -> Vec<Pinned> {
        Vec::new()
    }
    fn probe_broker(&self, _timeout: Duration) -> bool {
        true
    }
}

impl PartitionFigures for MemorySource {
    fn partition_status(&self) -> Vec<PartitionStatus> {
        Vec::new()
    }
}

impl SourceControl for MemorySource {
    fn hold(&self, closed: bool) {
        self.shared.held.lock().unwrap().push(closed);
    }
}

impl Source for MemorySource {
    type Control = MemorySource;
    fn control(&self) -> MemorySource {
        self.clone()
    }

    /// Returns at once; a task closes the channel when the drain ends (waiting here would hold
    /// a paused clock still: Tokio does not advance it while a blocking task runs).
    fn shutdown(self) {
        let shared = self.shared.clone();
        tokio::runtime::Handle::current().spawn(async move {
            let drained = async {
                loop {
                    let settled = shared.settled_now.notified();
                    if shared.settled.lock().unwrap().len() >= shared.fed.load(Ordering::SeqCst) {
                        return;
                    }
                    settled.await;
                }
            };
            let _ = tokio::time::timeout(shared.drain_timeout, drained).await;
            shared.feed.lock().unwrap().take();
        });
    }
}

/// Letters by source offset, with their reasons.
#[derive(Default)]
pub(crate) struct Letters(Mutex<Vec<(i64, RejectReason)>>);

impl Letters {
    pub(crate) fn all(&self) -> Vec<(i64, RejectReason)> {
        let mut letters = self.0.lock().unwrap().clone();
        letters.sort_by_key(|(offset, _)| *offset);
        letters
    }
}

impl DeadLetters for Letters {
    fn write_once<'a>(
        &'a self,
        letter: DeadLetter<'a>,
        _ledger: Option<&'a Ledger>,
    ) -> BoxFuture<'a, Written> {
        self.0
            .lock()
            .unwrap()
            .push((letter.raw.source.offset, letter.rejection.reason));
        Box::pin(async { Written::Now })
    }
}

/// Answers from a script (then `Accepted`), records what was sent, and can hold every send
/// until the test lets it go (`hold`).
#[derive(Default)]
pub(crate) struct ScriptedSink {
    pub(crate) answers: Mutex<VecDeque<Attempt>>,
    /// The rate-limit signals each answer carries (then none), reported to `limiter` as the
    /// provider client reports an HTTP answer's headers.
    pub(crate) signals: Mutex<VecDeque<RateSignals>>,
    pub(crate) limiter: Option<Arc<RateLimiter>>,
    pub(crate) reconciles: Mutex<VecDeque<Reconciled>>,
    pub(crate) sent: Mutex<Vec<(DeliveryKey, Vec<String>)>>,
    pub(crate) reconciled: AtomicUsize,
    pub(crate) hold: Option<Arc<tokio::sync::Notify>>,
    pub(crate) started: tokio::sync::Notify,
}

impl ScriptedSink {
    pub(crate) fn answering(answers: Vec<Attempt>) -> ScriptedSink {
        ScriptedSink {
            answers: Mutex::new(answers.into()),
            ..ScriptedSink::default()
        }
    }

    /// Every send: the delivery's key and its event ids.
    pub(crate) fn sent(&self) -> Vec<(DeliveryKey, Vec<String>)> {
        self.sent.lock().unwrap().clone()
    }
}

impl Sink for ScriptedSink {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn send<'a>(&'a self, delivery: &'a Delivery, _turn: Turn) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            let sent_at = tokio::time::Instant::now();
            let ids = delivery
                .items
                .iter()
                .map(|i| i.usage.event_id.clone())
                .collect();
            let n = {
                let mut sent = self.sent.lock().unwrap();
                sent.push((delivery.key.clone(), ids));
                sent.len()
            };
            self.started.notify_one();
            if let Some(hold) = &self.hold {
                hold.notified().await;
            }
            let answer = self.answers.lock().unwrap().pop_front();
            let answer = answer.unwrap_or_else(|| Attempt::Accepted {
                receipt: format!("usage-{n}"),
            });
            let signals = self.signals.lock().unwrap().pop_front();
            if let Some(limiter) = &self.limiter {
                let throttled = matches!(
                    answer,
                    Attempt::Retry {
                        cause: RetryCause::Throttled,
                        ..
                    }
                );
                limiter.observe_sent(&signals.unwrap_or_default(), throttled, sent_at);
            }
            answer
        })
    }

    fn reconcile<'a>(
        &'a self,
        _delivery: &'a Delivery,
        _sent_since: chrono::DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Reconciled, String>> {
        self.reconciled.fetch_add(1, Ordering::Relaxed);
        let answer = self.reconciles.lock().unwrap().pop_front();
        Box::pin(async move { Ok(answer.unwrap_or(Reconciled::NotFound)) })
    }
}
