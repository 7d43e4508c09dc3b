//! The provider client against a real HTTP server on 127.0.0.1:0 (hand-written HTTP/1.1, so
//! that an answer can break off in the middle of its body).

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::config::{Config, RateLimitConfig};
use crate::deliver::billingrails::BillingrailsSink;
use crate::deliver::billwerk::BillwerkSink;
use crate::deliver::events::tests::Captured;
use crate::deliver::{Delivery, DeliveryItem, RetryCause, Sink};
use crate::event::{BillableUsage, CustomerRef, DeliveryKey, RawMessage, SourceRef};

/// What the server answers a request line (`POST /path HTTP/1.1`) with: raw bytes, written
/// before the connection is closed.
type Script = dyn Fn(&str) -> Vec<u8> + Send + Sync;

/// A loopback server: every request's line and arrival time.
struct Server {
    base: String,
    seen: Arc<Mutex<Vec<(String, tokio::time::Instant)>>>,
}

impl Server {
    async fn start(script: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let script = script.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let Some(line) = read_request(&mut socket).await else {
                        return;
                    };
                    log.lock()
                        .unwrap()
                        .push((line.clone(), tokio::time::Instant::now()));
                    let _ = socket.write_all(&script(&line)).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Server { base, seen }
    }

    fn requests(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(l, _)| l.clone())
            .collect()
    }
}

/// Reads one request (headers and a `Content-Length` body); its request line.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<String> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while data.len() < head_end + length {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
    }
    head.lines().next().map(str::to_string)
}

fn answer(status: &str, headers: &[&str], body: &str) -> Vec<u8> {
    let mut text = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for h in headers {
        text.push_str(h);
        text.push_str("\r\n");
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    text.into_bytes()
}

/// A status line and headers announcing 500 bytes, then 10 of them and the end of the
/// connection: the body read fails after the status arrived.
fn broken_off(status: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{{\"Id\":\"6b0")
        .into_bytes()
}

#[derive(Default)]
struct CountingHealth(AtomicUsize);

impl ProviderHealth for CountingHealth {
    fn provider_answered(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn limiter() -> Arc<RateLimiter> {
    Arc::new(
        RateLimiter::new(&RateLimitConfig {
            initial_rate: 1000,
            ..RateLimitConfig::default()
        })
        .for_sink("billwerk"),
    )
}

fn client(limiter: Arc<RateLimiter>) -> ProviderClient {
    ProviderClient::new("billwerk", reqwest::Client::new(), limiter)
}

/// `send` waits for the gate and the pace before the request leaves; `send_in_turn` spends a
/// turn taken earlier and does not wait again.
#[tokio::test]
async fn requests_leave_only_when_the_pacer_lets_them() {
    let server = Server::start(|_| answer("200 OK", &[], "{}")).await;
    let limiter = limiter();
    let client = client(limiter.clone());
    let start = tokio::time::Instant::now();
    limiter
        .gate()
        .close_until(start + Duration::from_millis(300));
    let url = format!("{}/api/v1/contracts", server.base);
    let answer = client
        .send("contracts", client.http().get(&url))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let arrived = server.seen.lock().unwrap()[0].1;
    assert!(
        arrived >= start + Duration::from_millis(300),
        "the request left before the gate opened: {:?}",
        arrived - start
    );

    // A turn taken while the gate was open is spent without waiting, even once it is closed.
    let turn = client.turn().await;
    let closed_at = tokio::time::Instant::now();
    limiter
        .gate()
        .close_until(closed_at + Duration::from_secs(30));
    client
        .send_in_turn(turn, "usage", client.http().get(&url))
        .await
        .unwrap();
    assert!(closed_at.elapsed() < Duration::from_secs(5));
}

/// Every answer is fed to the limiter (a 429 closes the sink-wide gate), reported to health,
/// and recorded as one `RequestSent` — the metric and the log line together. No answer reports
/// no health.
#[tokio::test]
async fn answers_are_observed_recorded_and_reported() {
    let captured = Captured::start();
    let server = Server::start(|_| {
        answer(
            "429 Too Many Requests",
            &[
                "Retry-After: 30",
                "X-RateLimit-Limit: 100",
                "X-RateLimit-Remaining: 0",
            ],
            "slow down",
        )
    })
    .await;
    let limiter = limiter();
    let health = Arc::new(CountingHealth::default());
    let client = client(limiter.clone()).with_health(health.clone());
    let answer = client
        .send("usage", client.http().post(format!("{}/x", server.base)))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.body, "slow down");
    assert_eq!(answer.signals.retry_after, Some(Duration::from_secs(30)));
    assert!(limiter.gate().is_closed(), "a 429 closes the gate");
    assert_eq!(health.0.load(Ordering::Relaxed), 1);

    // Nobody listens on a port just released: no answer, no health.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = format!("http://{}/x", closed.local_addr().unwrap());
    drop(closed);
    let turn = Turn(());
    let failure = client
        .send_in_turn(turn, "usage", client.http().post(&nowhere))
        .await
        .unwrap_err();
    assert!(matches!(failure, Failure::NoAnswer(_)), "{failure:?}");
    assert!(
        matches!(
            failure.attempt(),
            Attempt::Retry {
                cause: RetryCause::Connection,
                outcome_unknown: false,
                ..
            }
        ),
        "a refused connect sent nothing"
    );
    assert_eq!(health.0.load(Ordering::Relaxed), 1);

    let metrics = captured.metrics.render();
    let logs = captured.logs.text();
    for (metric, line) in [
        (
            "meterflow_requests_total{sink=\"billwerk\",endpoint=\"usage\",status_class=\"4xx\"} 1",
            "request to the provider sink=\"billwerk\" endpoint=\"usage\" status_class=\"4xx\"",
        ),
        (
            "meterflow_requests_total{sink=\"billwerk\",endpoint=\"usage\",status_class=\"error\"} 1",
            "request to the provider sink=\"billwerk\" endpoint=\"usage\" status_class=\"error\"",
        ),
        (
            "meterflow_request_duration_seconds_count{sink=\"billwerk\",endpoint=\"usage\"} 2",
            "request to the provider",
        ),
        (
            "meterflow_throttled_responses_total{sink=\"billwerk\"} 1",
            "the provider refused a request with 429 sink=\"billwerk\"",
        ),
    ] {
        assert!(metrics.contains(metric), "{metric}\n{metrics}");
        assert!(logs.contains(line), "{line}\n{logs}");
    }
}

fn delivery() -> Delivery {
    let usage = BillableUsage {
        event_id: "evt_1".into(),
        customer: CustomerRef::ContractId("5cd186af443e551fe8e4f5dd".into()),
        metric: "api_calls".into(),
        component_id: "5ce53069443e551b9caccc64".into(),
        quantity: Decimal::from_str("2").unwrap(),
        due_date: Utc.with_ymd_and_hms(2026, 11, 20, 10, 0, 0).unwrap(),
        product_override: None,
        attributes: Default::default(),
    };
    let raw = RawMessage {
        source: SourceRef {
            topic: "usage".into(),
            partition: 0,
            offset: 0,
        },
        key: None,
        payload: Default::default(),
        headers: vec![],
        generation: 1,
    };
    Delivery {
        key: DeliveryKey::for_events(["evt_1"]),
        items: vec![DeliveryItem { usage, raw }],
    }
}

fn config(sink: &str) -> Config {
    let text = format!(
        r#"
[kafka]
brokers = "localhost:9092"
group_id = "g"
topics = ["usage"]
dead_letter_topic = "usage-dlq"

{sink}

[components]
api_calls = "5ce53069443e551b9caccc64"
"#
    );
    Config::from_toml_str_with_env(&text, &|_| None).unwrap()
}

/// A usage POST whose answer's status arrived but whose body broke off may have been recorded:
/// both sinks say "retry, outcome unknown" (so the runner reconciles before re-sending), and
/// billwerk no longer takes it for an acceptance with an empty receipt.
#[tokio::test]
async fn a_broken_off_answer_is_retry_with_unknown_outcome_for_both_sinks() {
    let server = Server::start(|line| {
        if line.contains("/oauth/token") {
            answer(
                "200 OK",
                &["Content-Type: application/json"],
                r#"{"access_token":"t","expires_in":3600}"#,
            )
        } else {
            broken_off("201 Created")
        }
    })
    .await;
    let billwerk = BillwerkSink::new(
        &config(&format!(
            "[sink]\nkind = \"billwerk\"\nbase_url = \"{}\"\nclient_id = \"id\"\nclient_secret = \"secret\"",
            server.base
        ))
        .sink,
        limiter(),
    )
    .unwrap();
    let billingrails = BillingrailsSink::new(
        &config(&format!(
            "[sink]\nkind = \"billingrails\"\nbase_url = \"{}\"\napi_key = \"key\"",
            server.base
        ))
        .sink,
        limiter(),
    )
    .unwrap();
    let sinks: [&dyn Sink; 2] = [&billwerk, &billingrails];
    for sink in sinks {
        let attempt = sink.send(&delivery(), Turn(())).await;
        match attempt {
            Attempt::Retry {
                outcome_unknown: true,
                ref detail,
                ..
            } => assert!(detail.contains("201 Created"), "{}: {detail}", sink.name()),
            other => panic!("{}: {other:?}", sink.name()),
        }
    }
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|l| l.starts_with("POST /api/v1/contracts/5cd186af443e551fe8e4f5dd/usage")),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|l| l.starts_with("POST /events/ingest")),
        "{requests:?}"
    );
}
