//! The whole pipeline (decode → window → price → batch → protocol → settle, and the drain)
//! built from parts in memory: the source and the dead letters in `crate::testing`, a scripted
//! sink, the real SQLite ledger, under the paused clock. What is Kafka's own (rebalances, the
//! commit, gaps) stays in the mock-cluster and Tansu tests under `tests/`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{Parts, Stages};
use crate::ack::delivery::{LedgeredDelivery, RunStats};
use crate::ack::ledger::{Ledger, LedgerClock, LedgerStore};
use crate::batch::Grouping;
use crate::config::builder::{Bucket, ConfigBuilder};
use crate::config::Config;
use crate::deliver::permits::Permits;
use crate::deliver::ratelimit::RateLimiter;
use crate::deliver::runner::DeliveryRunner;
use crate::deliver::{Attempt, RateSignals, RetryCause};
use crate::event::{RawMessage, RejectReason, SourceRef};
use crate::testing::{Letters, MemorySource, ScriptedSink};

const CONTRACT: &str = "5cd186af443e551fe8e4f5dd";

fn config() -> ConfigBuilder {
    ConfigBuilder::new()
        .brokers("memory")
        .group_id("g")
        .topic("usage")
        .dead_letter_topic("usage-dlq")
        .billwerk("http://127.0.0.1:9", "id", "secret")
        .max_age(Duration::ZERO)
        .component("api_calls", "5ce53069443e551b9caccc64")
}

fn event(id: &str, quantity: u32) -> Vec<u8> {
    json!({
        "id": id,
        "contract_id": CONTRACT,
        "metric": "api_calls",
        "quantity": quantity,
        "timestamp": "2026-11-20T10:15:00Z",
    })
    .to_string()
    .into_bytes()
}

fn message(offset: i64, payload: Vec<u8>) -> RawMessage {
    RawMessage {
        source: SourceRef {
            topic: "usage".into(),
            partition: 0,
            offset,
        },
        key: None,
        payload: payload.into(),
        headers: vec![],
        generation: 1,
    }
}

/// What a test looks at after a run.
struct Run {
    source: MemorySource,
    sink: Arc<ScriptedSink>,
    letters: Arc<Letters>,
    stats: Arc<RunStats>,
}

fn build(
    config: &Config,
    mut sink: ScriptedSink,
    ledger: Option<Ledger>,
) -> (Run, Parts<MemorySource>) {
    let (source, messages) = MemorySource::owning(&[0]);
    // The sink reports its scripted rate-limit signals here, as the provider client does.
    let limiter = Arc::new(RateLimiter::new(&config.rate_limit));
    sink.limiter = Some(limiter.clone());
    let sink = Arc::new(sink);
    let letters = Arc::new(Letters::default());
    let stats = Arc::new(RunStats::default());
    let stages = Stages::from_config(config).unwrap();
    let delivery = Arc::new(LedgeredDelivery {
        runner: DeliveryRunner::new(
            sink.clone(),
            limiter,
            config.retry.clone(),
            Permits::new(8, 4),
        ),
        dead_letters: letters.clone(),
        ledger,
        source: Arc::new(source.clone()),
        stats: stats.clone(),
        per_contract_metrics: false,
        aggregating: matches!(stages.grouping, Grouping::Aggregate { .. }),
    });
    let parts = Parts {
        source: source.clone(),
        messages,
        stages,
        delivery,
        delivery_window: Arc::new(Permits::window(8, 4)),
        readiness: None,
    };
    let run = Run {
        source,
        sink,
        letters,
        stats,
    };
    (run, parts)
}

/// The real SQLite ledger, stamps on Tokio's clock; the clock paused once it is open.
async fn sqlite() -> (LedgerStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let store = LedgerStore::connect(&url).await.unwrap();
    tokio::time::pause();
    (store.with_clock(LedgerClock::tokio()), dir)
}

/// Feeds `messages`, asks for shutdown at once and runs the pipeline through its drain (which
/// ends when everything fed is settled).
async fn run_through(run: &Run, parts: Parts<MemorySource>, messages: Vec<RawMessage>) {
    for m in messages {
        run.source.feed(m);
    }
    tokio::time::timeout(Duration::from_secs(3600), parts.run(async {}))
        .await
        .expect("the drain ends")
        .unwrap();
}

#[tokio::test]
async fn each_event_is_sent_once_bad_ones_are_dead_lettered_and_a_restart_sends_nothing() {
    let (store, _dir) = sqlite().await;
    let config = config().build().unwrap();
    let messages = vec![
        message(0, event("evt_1", 1)),
        message(1, b"{not json".to_vec()),
        message(2, event("evt_2", 2)),
        message(3, {
            let mut e: serde_json::Value = serde_json::from_slice(&event("evt_3", 3)).unwrap();
            e["metric"] = json!("teleportations");
            e.to_string().into_bytes()
        }),
        message(4, event("evt_4", 4)),
    ];
    let ledger = Ledger::start(store.clone(), Duration::ZERO);
    let (run, parts) = build(&config, ScriptedSink::default(), Some(ledger));
    run_through(&run, parts, messages.clone()).await;
    let mut sent: Vec<Vec<String>> = run.sink.sent().into_iter().map(|(_, ids)| ids).collect();
    sent.sort();
    assert_eq!(sent, vec![vec!["evt_1"], vec!["evt_2"], vec!["evt_4"]]);
    assert_eq!(
        run.letters.all(),
        vec![
            (1, RejectReason::InvalidJson),
            (3, RejectReason::UnknownMetric)
        ]
    );
    assert_eq!(run.source.settled(), vec![0, 1, 2, 3, 4]);
    assert_eq!(run.stats.snapshot(), (5, 3, 0, 2));

    // A restart before the commit reads them all again: the ledger settles the three.
    let ledger = Ledger::start(store, Duration::ZERO);
    let (again, parts) = build(&config, ScriptedSink::default(), Some(ledger));
    run_through(&again, parts, messages).await;
    assert!(again.sink.sent().is_empty(), "{:?}", again.sink.sent());
    assert_eq!(again.source.settled(), vec![0, 1, 2, 3, 4]);
    assert_eq!(again.stats.snapshot().2, 3, "already delivered");
}

/// Pre-aggregation waits `batch.max_wait` for more events of the same hour: under the paused
/// clock a ten-minute wait takes no time, and the three events go out as one record.
#[tokio::test]
async fn an_aggregate_is_flushed_when_its_wait_runs_out() {
    let (store, _dir) = sqlite().await;
    let config = config()
        .max_events(1000)
        .max_wait(Duration::from_secs(600))
        .aggregate(Bucket::Hour)
        .build()
        .unwrap();
    let (run, parts) = build(
        &config,
        ScriptedSink::default(),
        Some(Ledger::start(store, Duration::ZERO)),
    );
    let started = tokio::time::Instant::now();
    run.source.feed(message(0, event("evt_a", 1)));
    run.source.feed(message(1, event("evt_b", 2)));
    run.source.feed(message(2, event("evt_c", 3)));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(parts.run(async {
        let _ = stopped.await;
    }));
    // Nothing goes before the wait is up.
    tokio::time::sleep(Duration::from_secs(9 * 60)).await;
    assert!(run.sink.sent().is_empty());
    while run.source.settled().len() < 3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(started.elapsed() >= Duration::from_secs(600));
    let sent = run.sink.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].1, vec!["evt_a", "evt_b", "evt_c"]);
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    assert_eq!(run.stats.snapshot(), (3, 3, 0, 0));
}

/// A 429 with `Retry-After: 60` closes the sink-wide gate: the source is held (its partitions
/// paused instead of buffering) until the gate opens a minute later, then the event goes once.
#[tokio::test]
async fn a_429_holds_the_source_while_the_gate_is_closed() {
    let (store, _dir) = sqlite().await;
    let config = config().build().unwrap();
    let sink = ScriptedSink::answering(vec![Attempt::Retry {
        cause: RetryCause::Throttled,
        outcome_unknown: false,
        detail: "429".into(),
    }]);
    sink.signals.lock().unwrap().push_back(RateSignals {
        retry_after: Some(Duration::from_secs(60)),
        ..RateSignals::default()
    });
    let (run, parts) = build(&config, sink, Some(Ledger::start(store, Duration::ZERO)));
    let started = tokio::time::Instant::now();
    run_through(&run, parts, vec![message(0, event("evt_1", 1))]).await;
    assert!(
        started.elapsed() >= Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(run.sink.sent().len(), 2, "the 429, then the delivery");
    assert_eq!(run.stats.snapshot(), (1, 1, 0, 0));
    let holds = run.source.holds();
    assert_eq!(holds.first(), Some(&false), "open at the start: {holds:?}");
    assert!(
        holds.windows(2).any(|w| w == [true, false]),
        "held, then let go: {holds:?}"
    );
}

/// `sink.concurrency` bounds the requests in flight, not the claims: while the requests are
/// held, the deliveries behind them in the window have their claims written (so a claim's
/// group commit no longer waits in a request's place), and no delivery past the window does.
/// One contract here: its share of `Permits::new(8, 4)` is 4 requests, and of the window
/// 4 × [`DELIVERIES_PER_REQUEST`](crate::deliver::permits::DELIVERIES_PER_REQUEST) places.
#[tokio::test]
async fn claims_run_ahead_of_the_requests_in_flight_by_the_window_and_no_further() {
    // On the wall clock: the test reads the ledger's rows through the store's one connection,
    // which a paused clock would time out while the writer holds it.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let store = LedgerStore::connect(&url).await.unwrap();
    let config = config().build().unwrap();
    let hold = Arc::new(tokio::sync::Notify::new());
    let sink = ScriptedSink {
        hold: Some(hold.clone()),
        ..ScriptedSink::default()
    };
    let ledger = Ledger::start(store.clone(), Duration::ZERO);
    let (run, parts) = build(&config, sink, Some(ledger));
    for i in 0..40 {
        run.source.feed(message(i, event(&format!("evt_{i}"), 1)));
    }
    let running = tokio::spawn(parts.run(async {}));
    let window = 4 * crate::deliver::permits::DELIVERIES_PER_REQUEST;
    let mut claimed = 0;
    for _ in 0..500 {
        claimed = store.deliveries().await.unwrap().len();
        if claimed >= window && run.sink.sent().len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Settled: more time changes nothing while the four requests are out.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows = store.deliveries().await.unwrap();
    assert_eq!(
        (run.sink.sent().len(), rows.len()),
        (4, window),
        "requests out, claims written (after {claimed} seen)"
    );
    assert!(
        rows.iter().all(|(_, state, _)| state == "sending"),
        "{rows:?}"
    );

    // Let every request go: all 40 are delivered once, and the drain ends.
    for _ in 0..10_000 {
        if running.is_finished() {
            break;
        }
        hold.notify_waiters();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    running.await.unwrap().unwrap();
    assert_eq!(run.sink.sent().len(), 40);
    assert_eq!(run.source.settled(), (0..40).collect::<Vec<i64>>());
    let rows = store.deliveries().await.unwrap();
    assert_eq!(rows.len(), 40);
    assert!(
        rows.iter().all(|(_, state, _)| state == "delivered"),
        "{rows:?}"
    );
}
