//! The in-flight budget (`batch.max_in_flight`): at the budget the consumer stops taking
//! messages, and pauses its partitions only if the budget stays full for `batch.pause_after`.
//! A pause drops librdkafka's prefetch, which the resume fetches again, so a short hold must not
//! pause; either way every event is delivered once and no more than the budget is in flight
//! (mock cluster, a sink that takes a few milliseconds per request).

use meterflow_testkit as common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::json;

use meterflow::deliver::client::Turn;
use meterflow::deliver::{Attempt, Delivery, Reconciled, Sink};
use meterflow::pipeline::{self, RunStats, SinkFactory};

const EVENTS: usize = 600;
const BUDGET: usize = 40;

/// Accepts every delivery after a short wait, and counts the copies of each event it saw.
#[derive(Default)]
struct SlowSink {
    seen: Mutex<HashMap<String, usize>>,
    sending: AtomicUsize,
    most_sending: AtomicUsize,
}

impl Sink for SlowSink {
    fn name(&self) -> &'static str {
        "billwerk"
    }

    fn send<'a>(&'a self, delivery: &'a Delivery, _turn: Turn) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            let now = self
                .sending
                .fetch_add(delivery.items.len(), Ordering::AcqRel)
                + delivery.items.len();
            self.most_sending.fetch_max(now, Ordering::AcqRel);
            tokio::time::sleep(Duration::from_millis(3)).await;
            {
                let mut seen = self.seen.lock().unwrap();
                for item in &delivery.items {
                    *seen.entry(item.usage.event_id.clone()).or_default() += 1;
                }
            }
            self.sending
                .fetch_sub(delivery.items.len(), Ordering::AcqRel);
            Attempt::Accepted {
                receipt: "r".to_string(),
            }
        })
    }

    fn reconcile<'a>(
        &'a self,
        _delivery: &'a Delivery,
        _sent_since: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Reconciled, String>> {
        Box::pin(async { Ok(Reconciled::NotFound) })
    }
}

struct Run {
    took: Duration,
    pauses: f64,
    most_in_flight: f64,
    sink: Arc<SlowSink>,
    committed: i64,
}

/// Delivers `EVENTS` events on a topic of their own through a `SlowSink`, the budget `BUDGET`,
/// and reports the pauses the run added.
async fn run(name: &str, pause_after: Duration) -> Run {
    let metrics = common::metrics_handle();
    let pauses_line = "meterflow_consumer_pauses_total{reason=\"in_flight_budget\"}";
    let pauses_before = common::metric_value(&metrics.render(), pauses_line);
    let (topic, dlq, group) = (
        format!("usage-{name}"),
        format!("dlq-{name}"),
        format!("group-{name}"),
    );
    let (_cluster, brokers) = common::mock_cluster(&[(&topic, 1), (&dlq, 1)]);
    let payloads: Vec<Vec<u8>> = (0..EVENTS)
        .map(|i| {
            serde_json::to_vec(&json!({
                "id": format!("{name}_{i}"), "contract_id": "5cd186af443e551fe8e4f5dd",
                "metric": "api_calls", "quantity": "1",
                "timestamp": "2026-11-20T10:15:00Z", "attributes": {"plan": "starter"},
            }))
            .unwrap()
        })
        .collect();
    common::produce(&brokers, &topic, 1, &payloads).await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("l.db").display());
    let config = common::billwerk_config(
        &brokers,
        &group,
        &topic,
        &dlq,
        "http://127.0.0.1:9",
        &ledger,
    )
    .max_events(1)
    .max_in_flight(BUDGET)
    .pause_after(pause_after)
    // The sink sends no rate-limit headers: a budget far above what it takes.
    .rate_limit(Some(1_000_000))
    .build()
    .unwrap();
    let sink = Arc::new(SlowSink::default());
    let factory: SinkFactory = {
        let sink = sink.clone();
        Box::new(move |_| sink.clone())
    };
    let stats = Arc::new(RunStats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(pipeline::run_with_sink(
        config,
        stats.clone(),
        async {
            let _ = stopped.await;
        },
        Some(factory),
    ));
    let started = std::time::Instant::now();
    let mut most_in_flight: f64 = 0.0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline
        && stats.delivered.load(Ordering::Relaxed) < EVENTS as u64
    {
        most_in_flight = most_in_flight.max(common::metric_value(
            &metrics.render(),
            "meterflow_in_flight_events",
        ));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    common::wait_until(Duration::from_secs(10), || {
        common::committed_total(&brokers, &group, &topic, 1) >= EVENTS as i64
    })
    .await;
    let committed = common::committed_total(&brokers, &group, &topic, 1);
    let took = started.elapsed();
    common::stop_pipeline(stop, task, Duration::from_millis(500)).await;
    Run {
        took,
        pauses: common::metric_value(&metrics.render(), pauses_line) - pauses_before,
        most_in_flight,
        sink,
        committed,
    }
}

fn assert_each_delivered_once(name: &str, r: &Run) {
    let seen = r.sink.seen.lock().unwrap();
    let missing = (0..EVENTS)
        .filter(|i| !seen.contains_key(&format!("{name}_{i}")))
        .count();
    assert_eq!(
        missing, 0,
        "{name}: {missing} of {EVENTS} events never delivered"
    );
    assert!(
        seen.values().all(|c| *c == 1),
        "{name}: an event sent twice"
    );
    assert_eq!(r.committed, EVENTS as i64, "{name}: every offset committed");
    assert!(
        r.most_in_flight <= BUDGET as f64,
        "{name}: {} events in flight, over the budget of {BUDGET}",
        r.most_in_flight
    );
    assert!(
        r.sink.most_sending.load(Ordering::Acquire) <= BUDGET,
        "{name}: more events at the sink at once than the budget"
    );
}

/// Before `pause_after`, every full budget paused the partitions and dropped the prefetch
/// (P2 without a ledger at a budget of 5 000: a fifth of the speed). A budget that empties
/// within a few milliseconds must now be held without a single pause; with `pause_after = 0s`
/// (the old behaviour) the same run pauses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_budget_holds_the_read_and_pauses_only_when_it_lasts() {
    let held = run("held", Duration::from_secs(10)).await;
    assert_each_delivered_once("held", &held);
    assert!(
        held.most_in_flight >= (BUDGET / 2) as f64,
        "the budget was never near full ({} in flight): the test shows nothing",
        held.most_in_flight
    );
    assert_eq!(
        held.pauses, 0.0,
        "a hold of milliseconds paused the partitions"
    );

    let paused = run("paused", Duration::ZERO).await;
    assert_each_delivered_once("paused", &paused);
    eprintln!(
        "{EVENTS} events, budget {BUDGET}: held in {:?} with {} pauses; paused at once in {:?} \
         with {} pauses",
        held.took, held.pauses, paused.took, paused.pauses
    );
    assert!(
        paused.pauses >= 1.0,
        "with pause_after = 0s a full budget pauses at once"
    );
}
