//! The protocol's hard cases without Kafka or HTTP: a source in memory (ownership, settled
//! offsets, revocations), dead letters kept in memory, a scripted sink, and the real ledger
//! (SQLite in a temporary directory; PostgreSQL for leases between replicas). Each case takes
//! well under a second of real time except the lease case (a 300 ms lease run out).

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;

use super::LedgeredDelivery;
use super::RunStats;
use crate::ack::ledger::scratch::ScratchDatabase;
use crate::ack::ledger::{Claim, Ledger, LedgerClock, LedgerStore};
use crate::config::{RateLimitConfig, RetryConfig};
use crate::deliver::ratelimit::RateLimiter;
use crate::deliver::runner::DeliveryRunner;
use crate::deliver::{Attempt, Delivery, DeliveryItem, Reconciled};
use crate::event::{
    BillableUsage, CustomerRef, DeliveryKey, RawMessage, RejectReason, Rejection, SourceRef,
};
use crate::testing::{Letters, MemorySource, ScriptedSink};

const TOPIC: &str = "usage";

fn item(id: &str, partition: i32, offset: i64) -> DeliveryItem {
    DeliveryItem {
        usage: BillableUsage {
            event_id: id.to_string(),
            customer: CustomerRef::ContractId("5cd186af443e551fe8e4f5dd".into()),
            metric: "api_calls".into(),
            component_id: "5ce53069443e551b9caccc64".into(),
            quantity: Decimal::from_str("2").unwrap(),
            due_date: Utc.with_ymd_and_hms(2026, 11, 20, 10, 0, 0).unwrap(),
            product_override: None,
            attributes: Default::default(),
        },
        raw: RawMessage {
            source: SourceRef {
                topic: TOPIC.into(),
                partition,
                offset,
            },
            key: None,
            payload: Default::default(),
            headers: vec![],
            generation: 1,
        },
    }
}

fn delivery(items: Vec<DeliveryItem>) -> Delivery {
    Delivery {
        key: DeliveryKey::for_events(items.iter().map(|i| i.usage.event_id.as_str())),
        items,
    }
}

struct Protocol {
    delivery: Arc<LedgeredDelivery>,
    source: MemorySource,
    letters: Arc<Letters>,
    sink: Arc<ScriptedSink>,
}

impl Protocol {
    fn new(sink: ScriptedSink, ledger: Option<Ledger>, aggregating: bool) -> Protocol {
        let (source, _messages) = MemorySource::owning(&[0, 1]);
        let letters = Arc::new(Letters::default());
        let sink = Arc::new(sink);
        let limiter = Arc::new(RateLimiter::new(&RateLimitConfig {
            initial_rate: 1000,
            ..RateLimitConfig::default()
        }));
        let retry = RetryConfig {
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(10),
        };
        let delivery = Arc::new(LedgeredDelivery {
            runner: DeliveryRunner::new(
                sink.clone(),
                limiter,
                retry,
                crate::deliver::permits::Permits::new(64, 64),
            ),
            dead_letters: letters.clone(),
            ledger,
            source: Arc::new(source.clone()),
            stats: Arc::new(RunStats::default()),
            per_contract_metrics: false,
            aggregating,
        });
        Protocol {
            delivery,
            source,
            letters,
            sink,
        }
    }

    fn stats(&self) -> (u64, u64, u64, u64) {
        self.delivery.stats.snapshot()
    }
}

/// The real SQLite ledger with its lease stamps on Tokio's clock; then the clock is paused.
/// (Opened first: a pool connecting under a paused clock could see its acquire timeout jump.)
async fn sqlite() -> (Ledger, LedgerStore, tempfile::TempDir) {
    let (store, dir) = sqlite_store().await;
    (Ledger::start(store.clone(), Duration::ZERO), store, dir)
}

async fn sqlite_store() -> (LedgerStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let store = LedgerStore::connect(&url).await.unwrap();
    tokio::time::pause();
    (store.with_clock(LedgerClock::tokio()), dir)
}

#[tokio::test]
async fn an_unknown_outcome_found_at_the_provider_is_settled_without_a_send() {
    let (ledger, _store, _dir) = sqlite().await;
    let d = delivery(vec![item("evt_1", 0, 0)]);
    // A process claimed it and died: sending, outcome unknown.
    assert!(matches!(
        ledger.claim(&d.key, 1).await.unwrap(),
        Claim::Claimed { .. }
    ));
    let sink = ScriptedSink::default();
    sink.reconciles
        .lock()
        .unwrap()
        .push_back(Reconciled::Found {
            receipt: "usage-earlier".into(),
        });
    let p = Protocol::new(sink, Some(ledger.clone()), false);
    p.delivery.deliver(&d).await;
    assert_eq!(p.sink.reconciled.load(Ordering::Relaxed), 1);
    assert!(p.sink.sent().is_empty(), "found: not sent again");
    assert_eq!(p.stats(), (0, 0, 1, 0));
    assert_eq!(p.source.settled(), vec![0]);
    assert_eq!(
        ledger.claim(&d.key, 1).await.unwrap(),
        Claim::Delivered {
            receipt: "usage-earlier".into()
        }
    );
}

#[tokio::test]
async fn an_unknown_outcome_not_at_the_provider_is_sent_once() {
    let (ledger, _store, _dir) = sqlite().await;
    let d = delivery(vec![item("evt_1", 0, 0)]);
    ledger.claim(&d.key, 1).await.unwrap();
    let p = Protocol::new(ScriptedSink::default(), Some(ledger.clone()), false);
    p.delivery.deliver(&d).await;
    assert_eq!(p.sink.reconciled.load(Ordering::Relaxed), 1);
    assert_eq!(p.sink.sent().len(), 1);
    assert_eq!(p.stats(), (0, 1, 0, 0));
    assert_eq!(p.source.settled(), vec![0]);
    // Read again (a restart before the commit): settled from the ledger, not sent.
    let again = Protocol::new(ScriptedSink::default(), Some(ledger), false);
    again.delivery.deliver(&d).await;
    assert!(again.sink.sent().is_empty());
    assert_eq!(again.stats(), (0, 0, 1, 0));
}

#[tokio::test]
async fn a_revoke_mid_flight_cancels_the_delivery_and_leaves_its_events_unsettled() {
    let (ledger, _store, _dir) = sqlite().await;
    let hold = Arc::new(tokio::sync::Notify::new());
    let sink = ScriptedSink {
        hold: Some(hold.clone()),
        ..ScriptedSink::default()
    };
    let p = Protocol::new(sink, Some(ledger.clone()), false);
    let d = delivery(vec![item("evt_1", 0, 7)]);
    let running = {
        let delivery = p.delivery.clone();
        let d = d.clone();
        tokio::spawn(async move { delivery.deliver(&d).await })
    };
    // The request is out (and never answers) when the partition goes.
    tokio::time::timeout(Duration::from_secs(5), p.sink.started.notified())
        .await
        .unwrap();
    p.source.revoke(0);
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the delivery stops at the revoke")
        .unwrap();
    assert!(p.source.settled().is_empty(), "the new owner redelivers it");
    assert!(p.letters.all().is_empty());
    assert_eq!(p.stats(), (0, 0, 0, 0));
    // The request may have reached the provider: the new owner finds "sending" and reconciles.
    assert!(matches!(
        ledger.claim(&d.key, 1).await.unwrap(),
        Claim::Sending { .. }
    ));
}

#[tokio::test]
async fn overlapping_aggregates_settle_the_shared_event_through_the_earlier_one() {
    let (ledger, _store, _dir) = sqlite().await;
    let p = Protocol::new(ScriptedSink::default(), Some(ledger), true);
    let first = delivery(vec![item("evt_a", 0, 0), item("evt_b", 0, 1)]);
    p.delivery.deliver(&first).await;
    // After a restart the batches are cut differently: evt_b comes again beside evt_c.
    let second = delivery(vec![item("evt_b", 1, 2), item("evt_c", 1, 3)]);
    p.delivery.deliver(&second).await;
    let sent = p.sink.sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].0, first.key);
    assert_eq!(
        sent[1],
        (
            DeliveryKey::for_events(["evt_c"]),
            vec!["evt_c".to_string()]
        ),
        "evt_b is not summed twice"
    );
    assert_eq!(p.stats(), (0, 3, 1, 0));
    assert_eq!(p.source.settled(), vec![0, 1, 2, 3]);
}

#[tokio::test]
async fn a_partial_rejection_dead_letters_the_named_events_and_delivers_the_rest() {
    let (ledger, _store, _dir) = sqlite().await;
    // An all-or-nothing batch (Billingrails) refused for its second event.
    let sink = ScriptedSink::answering(vec![Attempt::Rejected {
        items: vec![(
            1,
            Rejection::new(RejectReason::ProviderRejected, "unknown account"),
        )],
        provider_answer: "422 {\"details\":[...]}".into(),
    }]);
    let p = Protocol::new(sink, Some(ledger.clone()), false);
    let batch = delivery(vec![
        item("evt_1", 0, 10),
        item("evt_2", 0, 11),
        item("evt_3", 0, 12),
    ]);
    p.delivery.deliver(&batch).await;
    let sent = p.sink.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].1, vec!["evt_1".to_string(), "evt_3".to_string()]);
    assert_eq!(p.letters.all(), vec![(11, RejectReason::ProviderRejected)]);
    assert_eq!(p.stats(), (0, 2, 0, 1));
    assert_eq!(p.source.settled(), vec![10, 11, 12]);
    assert!(matches!(
        ledger.claim(&batch.key, 3).await.unwrap(),
        Claim::Delivered { .. }
    ));
}

#[tokio::test]
async fn an_id_reused_with_other_contents_is_dead_lettered_and_the_rest_delivered() {
    let (ledger, _store, _dir) = sqlite().await;
    let p = Protocol::new(ScriptedSink::default(), Some(ledger), false);
    p.delivery
        .deliver(&delivery(vec![item("evt_1", 0, 0)]))
        .await;
    let mut other = item("evt_1", 0, 1);
    other.usage.quantity = Decimal::from_str("5").unwrap();
    p.delivery
        .deliver(&delivery(vec![other, item("evt_2", 0, 2)]))
        .await;
    assert_eq!(p.letters.all(), vec![(1, RejectReason::IdConflict)]);
    let sent = p.sink.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].1, vec!["evt_2".to_string()]);
    assert_eq!(p.source.settled(), vec![0, 1, 2]);
}

/// Replica A claims a key, and its 429 gate holds the send past the lease. Replica B takes the
/// key over, reconciles (not there) and sends. When A's gate opens, its fence finds the stamp
/// replaced: A does not send, and settles the event from B's outcome. One send in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_runs_out_behind_a_closed_gate_is_taken_over_and_sent_once() {
    let Some(db) = ScratchDatabase::for_test().await else {
        return;
    };
    let store = LedgerStore::connect(&db.url).await.unwrap();
    let lease = Duration::from_millis(300);
    let a = Protocol::new(
        ScriptedSink::default(),
        Some(Ledger::start(store.clone(), lease)),
        false,
    );
    let b = Protocol::new(
        ScriptedSink::default(),
        Some(Ledger::start(store, lease)),
        false,
    );
    let d = delivery(vec![item("evt_1", 0, 0)]);
    a.delivery
        .runner
        .limiter()
        .gate()
        .close_until(tokio::time::Instant::now() + Duration::from_secs(2));
    let a_running = {
        let delivery = a.delivery.clone();
        let d = d.clone();
        tokio::spawn(async move { delivery.deliver(&d).await })
    };
    // A has claimed it and waits at its gate.
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::timeout(Duration::from_secs(10), b.delivery.deliver(&d))
        .await
        .expect("B takes over once the lease ran out");
    assert_eq!(b.sink.reconciled.load(Ordering::Relaxed), 1);
    assert_eq!(b.sink.sent().len(), 1);
    tokio::time::timeout(Duration::from_secs(10), a_running)
        .await
        .expect("A ends after its gate opens")
        .unwrap();
    assert!(a.sink.sent().is_empty(), "A's fence stopped its send");
    assert_eq!(a.stats(), (0, 0, 1, 0));
    assert_eq!(a.source.settled(), vec![0]);
}

/// The same race on one SQLite ledger shared by two "replicas", under the paused clock with the
/// service's own lease (request timeout 30 s + 5 s) and a 429 gate closed for a minute: no
/// real time passes. B waits out A's lease, takes the key over, finds nothing at the provider
/// and sends; A's gate opens, its fence finds its stamp replaced, and it settles from B's
/// outcome without sending.
#[tokio::test]
async fn a_lease_run_out_behind_a_minute_long_gate_is_taken_over_under_the_paused_clock() {
    let (store, _dir) = sqlite_store().await;
    let lease = Duration::from_secs(35);
    let a = Protocol::new(
        ScriptedSink::default(),
        Some(Ledger::start(store.clone(), lease)),
        false,
    );
    let b = Protocol::new(
        ScriptedSink::default(),
        Some(Ledger::start(store, lease)),
        false,
    );
    let d = delivery(vec![item("evt_1", 0, 0)]);
    let started = tokio::time::Instant::now();
    a.delivery
        .runner
        .limiter()
        .gate()
        .close_until(started + Duration::from_secs(60));
    let a_running = {
        let delivery = a.delivery.clone();
        let d = d.clone();
        tokio::spawn(async move { delivery.deliver(&d).await })
    };
    // A claims the key, then waits at its gate.
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.delivery.deliver(&d).await;
    let taken_over_after = started.elapsed();
    assert!(
        taken_over_after >= lease && taken_over_after < Duration::from_secs(60),
        "B takes over once A's lease ran out, before A's gate opens: {taken_over_after:?}"
    );
    assert_eq!(b.sink.reconciled.load(Ordering::Relaxed), 1);
    assert_eq!(b.sink.sent().len(), 1);
    assert_eq!(b.stats(), (0, 1, 0, 0));
    a_running.await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(60));
    assert!(a.sink.sent().is_empty(), "A's fence stopped its send");
    assert_eq!(a.stats(), (0, 0, 1, 0));
    assert_eq!(a.source.settled(), vec![0]);
}
