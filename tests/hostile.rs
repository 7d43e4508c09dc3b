//! Issue 11, "hostile values": what a producer or the provider sends can neither panic meterflow
//! nor pin a partition, lose an event or steer a request (mock cluster; the billwerk emulator or
//! a tiny loopback stand-in that records every request and answers what the test scripts).
//!
//! - an aggregated sum that would overflow or round goes out as separate, exact records;
//! - a contract id carrying a path is dead-lettered, and no request goes anywhere else;
//! - an absurd `Retry-After` (and limit, reset, `expires_in`) pauses for about a window;
//! - a delivery task that panics dead-letters its events as `internal_error`, counted.
//! - a record larger than the consumer's `fetch.max.bytes` is read, and its partition goes on.

use meterflow_testkit as common;

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use rdkafka::mocking::MockCluster;
use rust_decimal::Decimal;
use serde_json::json;

use meterflow::config::builder::Bucket;
use meterflow::config::Config;
use meterflow::deliver::client::Turn;
use meterflow::deliver::{Attempt, Delivery, Reconciled, Sink};
use meterflow::emulator::billwerk::BillwerkOptions;
use meterflow::pipeline::{self, RunStats, SinkFactory};

const CONTRACT: &str = "5cd186af443e551fe8e4f5dd";
const OTHER_CONTRACT: &str = "5cd186af443e551fe8e4f5de";
const HOSTILE_CONTRACT: &str = "5cd186af443e551fe8e4f5d0/../../../../oauth/token/?x=";

fn event(id: &str, contract: &str, quantity: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id, "contract_id": contract, "metric": "api_calls", "quantity": quantity,
        "timestamp": "2026-11-20T10:15:00Z", "attributes": {"plan": "starter"},
    }))
    .unwrap()
}

fn cluster() -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
) {
    let (cluster, brokers) = common::mock_cluster(&[("usage", 1), ("usage-dlq", 1)]);
    (cluster, brokers)
}

/// Runs the pipeline until `done` holds (60 s at most), then stops it; says whether it held.
async fn run_until(
    config: Config,
    sink: Option<SinkFactory>,
    done: impl Fn(&RunStats) -> bool,
) -> (bool, Arc<RunStats>) {
    let stats = Arc::new(RunStats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline::run_with_sink(
        config,
        stats.clone(),
        async {
            let _ = stopped.await;
        },
        sink,
    ));
    let held = common::wait_until(Duration::from_secs(60), || done(&stats)).await;
    common::stop_pipeline(stop, run, Duration::from_millis(500)).await;
    (held, stats)
}

/// A SQLite ledger in a directory of its own, removed when the directory is dropped.
fn sqlite_ledger() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("l.db").display());
    (dir, ledger)
}

fn settled(stats: &RunStats) -> u64 {
    stats.delivered.load(Ordering::Relaxed)
        + stats.already_delivered.load(Ordering::Relaxed)
        + stats.dead_lettered.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// A billwerk stand-in on loopback that records every request.

#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: Option<String>,
    bearer: bool,
}

#[derive(Default)]
struct StandIn {
    seen: Mutex<Vec<Seen>>,
    /// The token answer's `expires_in` (JSON text).
    expires_in: String,
    /// Usage POSTs still to answer with a 429 carrying absurd rate-limit headers.
    throttle_next: AtomicUsize,
    /// 2xx answers carry `X-RateLimit-Limit: 1e20` (and such a `Remaining`).
    absurd_limit: bool,
    usage_created: AtomicUsize,
}

async fn stand_in(
    State(state): State<Arc<StandIn>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    _body: Bytes,
) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer "));
    let path = uri.path().to_string();
    state.seen.lock().unwrap().push(Seen {
        method: method.clone(),
        path: path.clone(),
        query: uri.query().map(str::to_string),
        bearer,
    });
    if method == Method::POST && path == "/oauth/token/" && !bearer {
        let body = format!(
            r#"{{"access_token":"tok","expires_in":{}}}"#,
            state.expires_in
        );
        return (StatusCode::OK, body).into_response();
    }
    if method == Method::POST && path.starts_with("/api/v1/contracts/") && path.ends_with("/usage")
    {
        let absurd = state
            .throttle_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if absurd {
            let epoch_ms = (Utc::now().timestamp_millis() + 30_000).to_string();
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [
                    ("Retry-After", "100000000000000000000".to_string()),
                    ("X-RateLimit-Limit", "100000000000000000000".to_string()),
                    ("X-RateLimit-Remaining", "0".to_string()),
                    ("X-RateLimit-Reset", epoch_ms),
                ],
                "{}",
            )
                .into_response();
        }
        let n = state.usage_created.fetch_add(1, Ordering::SeqCst);
        let (limit, remaining) = if state.absurd_limit {
            ("100000000000000000000", "99999999999999999999")
        } else {
            ("10000", "9000")
        };
        return (
            StatusCode::CREATED,
            [
                ("X-RateLimit-Limit", limit),
                ("X-RateLimit-Remaining", remaining),
            ],
            format!(r#"{{"Id":"u{n}"}}"#),
        )
            .into_response();
    }
    // Like the nginx of the issue: anything else answers 200.
    (StatusCode::OK, "{}").into_response()
}

async fn start_stand_in(state: Arc<StandIn>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(stand_in).with_state(state);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn stand_in_config(brokers: &str, group: &str, base_url: &str, ledger: &str) -> Config {
    // The default max_pause (1 h): the cut pause ends through a probe, once a window (1 s).
    common::billwerk_config(brokers, group, "usage", "usage-dlq", base_url, ledger)
        .build()
        .unwrap()
}

/// Issue 11, problem 2: the contract id `…/../../../../oauth/token/?x=` was sent, with the bearer
/// token, as `POST /oauth/token/?x=/usage`; that answered 200 and the event counted as delivered:
/// neither billed nor dead-lettered. Now it is dead-lettered (`invalid_contract_id`) and the
/// only requests are the token request and the good event's usage POST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_id_carrying_a_path_is_dead_lettered_and_steers_no_request() {
    let (_cluster, brokers) = cluster();
    let hostile = event("evt_hostile", HOSTILE_CONTRACT, "1");
    common::produce(
        &brokers,
        "usage",
        1,
        &[hostile.clone(), event("evt_good", CONTRACT, "2")],
    )
    .await;
    let state = Arc::new(StandIn {
        expires_in: "3600".into(),
        ..StandIn::default()
    });
    let base = start_stand_in(state.clone()).await;
    let (_dir, ledger) = sqlite_ledger();
    let config = stand_in_config(&brokers, "hostile-path", &base, &ledger);
    let (held, stats) = run_until(config, None, |s| settled(s) >= 2).await;
    let seen = state.seen.lock().unwrap().clone();
    assert!(held, "both events settled; requests: {seen:#?}");
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 1);

    let letters = common::read_topic(&brokers, "usage-dlq", 1, Duration::from_secs(10));
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason(), "invalid_contract_id");
    assert_eq!(letters[0].payload, hostile);

    for request in &seen {
        if request.bearer {
            assert_eq!(
                (
                    request.method.clone(),
                    request.path.as_str(),
                    request.query.as_deref()
                ),
                (
                    Method::POST,
                    format!("/api/v1/contracts/{CONTRACT}/usage").as_str(),
                    None
                ),
                "an authenticated request went elsewhere: {seen:#?}"
            );
        } else if request.method == Method::POST {
            assert_eq!(request.path, "/oauth/token/", "{seen:#?}");
        } else {
            // /readyz's reachability probe: a GET of the base URL, without credentials.
            assert_eq!(
                (&request.method, request.path.as_str()),
                (&Method::GET, "/")
            );
        }
    }
    assert_eq!(seen.iter().filter(|r| r.bearer).count(), 1, "{seen:#?}");
    assert_eq!(
        common::committed_total(&brokers, "hostile-path", "usage", 1),
        2
    );
}

/// Issue 11, problem 3: a 429 with `Retry-After: 100000000000000000000` made the delivery task
/// panic (Duration overflow) and pinned the partition; so did a token `expires_in` near u64::MAX
/// (Instant overflow). With those, a limit of 1e20 and an epoch-millisecond reset, the pipeline
/// now pauses at most `max_pause` (1 h), and less: the next answer (to a request in flight or to
/// the probe sent after a window, 1 s here) shows the provider taking requests and reopens the
/// gate. Every event is delivered, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_provider_headers_neither_panic_nor_pin_the_partition() {
    let (_cluster, brokers) = cluster();
    let payloads: Vec<Vec<u8>> = (0..5)
        .map(|i| event(&format!("evt_{i}"), CONTRACT, "1"))
        .collect();
    common::produce(&brokers, "usage", 1, &payloads).await;
    let state = Arc::new(StandIn {
        expires_in: "18446744073709551615".into(),
        throttle_next: AtomicUsize::new(1),
        absurd_limit: true,
        ..StandIn::default()
    });
    let base = start_stand_in(state.clone()).await;
    let (_dir, ledger) = sqlite_ledger();
    let config = stand_in_config(&brokers, "hostile-headers", &base, &ledger);
    let (held, stats) = run_until(config, None, |s| settled(s) >= 5).await;
    assert!(held, "every event settled after the absurd 429");
    assert_eq!(
        state.throttle_next.load(Ordering::SeqCst),
        0,
        "the 429 was sent"
    );
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 5);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    assert_eq!(
        state.usage_created.load(Ordering::SeqCst),
        5,
        "each billed once"
    );
    assert_eq!(
        common::committed_total(&brokers, "hostile-headers", "usage", 1),
        5
    );
}

/// Issue 11, problem 1: two quantities of 5e28 for one contract, component and hour panicked the
/// aggregating delivery task 13 times in 25 s with nothing settled; `8 + 0.12345…678` (28
/// places) was billed rounded. Now each goes out in a record of its own, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_sums_that_cannot_be_exact_go_out_as_separate_exact_records() {
    let (_cluster, brokers) = cluster();
    let huge = "50000000000000000000000000000";
    let tiny = "0.1234567890123456789012345678";
    let payloads = vec![
        event("evt_huge_1", CONTRACT, huge),
        event("evt_huge_2", CONTRACT, huge),
        event("evt_8", OTHER_CONTRACT, "8"),
        event("evt_tiny", OTHER_CONTRACT, tiny),
        event("evt_2", OTHER_CONTRACT, "2"),
    ];
    common::produce(&brokers, "usage", 1, &payloads).await;
    let options = BillwerkOptions::default()
        .with_contract("a", CONTRACT)
        .with_contract("b", OTHER_CONTRACT);
    let emulator = common::billwerk_emulator(options).await;
    let (_dir, ledger) = sqlite_ledger();
    let config = common::billwerk_config(
        &brokers,
        "hostile-sums",
        "usage",
        "usage-dlq",
        &emulator.base_url(),
        &ledger,
    )
    .aggregate(Bucket::Hour)
    .rate_limit(Some(20000))
    .build()
    .unwrap();
    let (held, stats) = run_until(config, None, |s| settled(s) >= 5).await;
    assert!(held, "every event settled");
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);

    let records = emulator.records();
    let huge_d = Decimal::from_str(huge).unwrap();
    let tiny_d = Decimal::from_str(tiny).unwrap();
    let of = |c: &str| -> Vec<Decimal> {
        records
            .iter()
            .filter(|r| r.contract_id == c)
            .map(|r| r.quantity)
            .collect()
    };
    assert_eq!(
        of(CONTRACT),
        vec![huge_d, huge_d],
        "one record per huge event"
    );
    let other = of(OTHER_CONTRACT);
    assert_eq!(
        other.iter().filter(|q| **q == tiny_d).count(),
        1,
        "the 28-place quantity is billed as sent, alone: {other:?}"
    );
    let rest: Decimal = other.iter().filter(|q| **q != tiny_d).sum();
    assert_eq!(rest, Decimal::from(10), "{other:?}");
    assert_eq!(emulator.stats().duplicate_keys, 0);
    assert_eq!(
        common::committed_total(&brokers, "hostile-sums", "usage", 1),
        5
    );
}

// ---------------------------------------------------------------------------------------------
// A sink that panics (a stand-in for any bug in a delivery task).

struct PanickingSink;

impl Sink for PanickingSink {
    fn name(&self) -> &'static str {
        "billwerk"
    }

    fn send<'a>(&'a self, delivery: &'a Delivery, _turn: Turn) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            if delivery
                .items
                .iter()
                .any(|i| i.usage.event_id == "evt_boom")
            {
                panic!("a bug in a delivery task");
            }
            let receipt = "r".to_string();
            Attempt::Accepted { receipt }
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

/// Issue 11, "no panic reachable from data": if a delivery task still dies, the JoinSet handler
/// only logged it and the partition stayed pinned until a restart. Now its events are
/// dead-lettered with `internal_error`, counted in `meterflow_delivery_task_failures_total`,
/// and the partition moves on; a second copy of the same event (same delivery key) is not held
/// up by the dead task's in-process claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_task_that_panics_dead_letters_its_events_as_internal_error() {
    let metrics = common::metrics_handle();
    let (_cluster, brokers) = cluster();
    let boom = event("evt_boom", CONTRACT, "1");
    let payloads = vec![
        event("evt_a", CONTRACT, "1"),
        boom.clone(),
        event("evt_b", CONTRACT, "1"),
        boom.clone(),
    ];
    common::produce(&brokers, "usage", 1, &payloads).await;
    let (_dir, ledger) = sqlite_ledger();
    let config = common::billwerk_config(
        &brokers,
        "hostile-panic",
        "usage",
        "usage-dlq",
        "http://127.0.0.1:9",
        &ledger,
    )
    .build()
    .unwrap();
    let sink: SinkFactory = Box::new(|_| Arc::new(PanickingSink));
    let (held, stats) = run_until(config, Some(sink), |s| settled(s) >= 4).await;
    assert!(held, "every event settled despite the panics");
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 2);
    let letters = common::read_topic(&brokers, "usage-dlq", 2, Duration::from_secs(10));
    assert_eq!(letters.len(), 2, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter.reason(), "internal_error");
        assert_eq!(letter.payload, boom);
    }
    assert_eq!(
        common::committed_total(&brokers, "hostile-panic", "usage", 1),
        4
    );
    let text = metrics.render();
    assert!(
        text.contains("meterflow_delivery_task_failures_total{stage=\"delivery\"} 2"),
        "{text}"
    );
}

/// The consumer asks for at most 4 MiB a fetch (`fetch.max.bytes`, which bounds librdkafka's
/// prefetch under a backlog); a user's `[kafka.properties]` may ask for less. A record larger
/// than that must still be read (a broker answers a fetch with its first batch whatever the
/// limit), or its partition would stop there: with the limit at 1 MiB, the events on both sides
/// of a 1.5 MiB record all settle and the committed offset passes all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_larger_than_a_fetch_is_read_and_the_partition_goes_on() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let (_cluster, brokers) = cluster();
    let mut big: serde_json::Value =
        serde_json::from_slice(&event("evt_big", CONTRACT, "3")).unwrap();
    big["attributes"]["pad"] = json!("x".repeat(1_500_000));
    let payloads = [
        event("evt_before", CONTRACT, "1"),
        serde_json::to_vec(&big).unwrap(),
        event("evt_after_1", CONTRACT, "2"),
        event("evt_after_2", CONTRACT, "4"),
    ];
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("message.max.bytes", "4000000")
        .create()
        .unwrap();
    for payload in &payloads {
        producer
            .send(
                FutureRecord::<(), _>::to("usage")
                    .payload(payload)
                    .partition(0),
                Duration::from_secs(10),
            )
            .await
            .expect("produced");
    }
    let state = Arc::new(StandIn {
        expires_in: "3600".into(),
        ..StandIn::default()
    });
    let base = start_stand_in(state.clone()).await;
    let (_dir, ledger) = sqlite_ledger();
    let config =
        common::billwerk_config(&brokers, "big-record", "usage", "usage-dlq", &base, &ledger)
            .kafka_property("fetch.max.bytes", "1048576")
            .build()
            .unwrap();
    let (held, stats) = run_until(config, None, |s| settled(s) >= 4).await;
    assert!(held, "all four settled: {stats:?}");
    assert!(
        stats.delivered.load(Ordering::Relaxed) >= 3,
        "the records around the big one were billed: {stats:?}"
    );
    assert_eq!(
        common::committed_total(&brokers, "big-record", "usage", 1),
        4
    );
}
