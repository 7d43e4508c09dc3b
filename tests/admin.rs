//! The admin server over real HTTP on 127.0.0.1 port 0: `/healthz`, `/readyz` (from its pieces,
//! and following a real pipeline against librdkafka's mock cluster and the billwerk emulator),
//! `/metrics` (the catalogue's metrics after traffic; never a secret).

use meterflow_testkit as common;

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

use serde_json::json;

use meterflow::admin::readiness::ProviderProbe;
use meterflow::admin::{self, Readiness};
use meterflow::emulator::billwerk::BillwerkOptions;
use meterflow::pipeline::{self, RunStats};

const CONTRACT: &str = "5cd186af443e551fe8e4f5dd";
/// The client secret in `common::billwerk_config`.
const SECRET: &str = "meterflow-emulator-secret";

/// Serves the admin routes on a fresh port; the server stops when the returned sender drops.
async fn serve(readiness: Arc<Readiness>) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let state = admin::AdminState::new(readiness, Arc::new(admin::StatusBoard::new()));
    tokio::spawn(admin::serve(listener, state, async {
        let _ = stopped.await;
    }));
    (base, stop)
}

async fn get(url: &str) -> (u16, String, String) {
    let response = reqwest::get(url).await.expect("admin server answers");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

#[tokio::test]
async fn healthz_is_ok_and_readyz_names_the_failing_checks() {
    let readiness = Arc::new(Readiness::new());
    let (base, _stop) = serve(readiness.clone()).await;

    let (status, _, body) = get(&format!("{base}/healthz")).await;
    assert_eq!((status, body.trim()), (200, "ok"));

    let (status, content_type, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 503);
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["ready"], false);
    assert_eq!(report["checks"]["partitions"]["ok"], false);
    assert_eq!(report["checks"]["broker"]["ok"], false);
    assert_eq!(report["checks"]["provider"]["ok"], false);
    assert_eq!(report["checks"]["running"]["ok"], true);

    readiness.set_assigned_partitions(2);
    readiness.broker_answered();
    let (status, _, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 503, "the provider has not answered yet: {body}");
    readiness.provider_answered();
    let (status, _, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{body}");

    readiness.set_stopping();
    let (status, _, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 503);
    assert!(body.contains("shutting down"), "{body}");
    // Alive while draining: a liveness restart now would only cut the drain short.
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);

    let (status, content_type, _) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert_eq!(get(&format!("{base}/nothing-here")).await.0, 404);
}

#[tokio::test]
async fn provider_probe_counts_any_answer_and_no_connection_as_unreachable() {
    let emulator = common::billwerk_emulator(BillwerkOptions::default()).await;
    let sink_config = |base_url: &str| {
        common::billwerk_config("127.0.0.1:1", "g", "t", "d", base_url, "none")
            .build()
            .unwrap()
            .sink
    };
    // The emulator answers the bare base URL with a 404: an answer all the same.
    let probe = ProviderProbe::new(&sink_config(&emulator.base_url())).unwrap();
    assert!(probe.answers().await);

    let closed = format!("http://127.0.0.1:{}", common::free_port());
    let probe = ProviderProbe::new(&sink_config(&closed)).unwrap();
    assert!(!probe.answers().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_a_pipeline_and_metrics_show_its_traffic_without_secrets() {
    // Install the recorder before any traffic, as `meterflow run` does.
    let _ = meterflow::telemetry::metrics_handle();
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 2), ("usage-dlq", 1)]);
    let emulator =
        common::billwerk_emulator(BillwerkOptions::default().with_contract("acme-prod", CONTRACT))
            .await;

    let stats = Arc::new(RunStats::default());
    let (base, _stop) = serve(stats.readiness.clone()).await;
    assert_eq!(
        get(&format!("{base}/readyz")).await.0,
        503,
        "not ready before the pipeline runs"
    );

    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let config = common::billwerk_config(
        &brokers,
        "meterflow-admin-test",
        "usage",
        "usage-dlq",
        &emulator.base_url(),
        &ledger,
    )
    .build()
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));

    // Ready once the group assigned the partitions and both probes got answers; no events yet.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, body) = get(&format!("{base}/readyz")).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let events: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            let event = if i == 7 {
                json!({"id": "evt_bad", "contract_id": CONTRACT, "metric": "teleportations",
                       "quantity": 1, "timestamp": "2026-11-20T10:15:00Z"})
            } else {
                json!({"id": format!("evt_{i}"), "contract_id": CONTRACT, "metric": "api_calls",
                       "quantity": i + 1, "timestamp": "2026-11-20T10:15:00Z",
                       "attributes": {"plan": "enterprise", "region": "eu-west-1"}})
            };
            serde_json::to_vec(&event).unwrap()
        })
        .collect();
    common::produce(&brokers, "usage", 2, &events).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while emulator.records().len() < 19 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(emulator.records().len(), 19);

    let (status, content_type, metrics) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain; version=0.0.4"));
    for expected in [
        "meterflow_build_info{version=",
        "meterflow_events_consumed_total{topic=\"usage\"}",
        "meterflow_events_delivered_total{sink=\"billwerk\"}",
        "meterflow_events_dead_lettered_total{reason=\"unknown_metric\"} 1",
        "meterflow_requests_total{sink=\"billwerk\",endpoint=\"usage\",status_class=\"2xx\"}",
        "meterflow_request_duration_seconds_bucket{sink=\"billwerk\",endpoint=\"usage\",le=\"0.005\"}",
        "meterflow_token_refreshes_total{result=\"ok\"}",
        "meterflow_contract_delivered_quantity_total{contract=\"5cd186af443e551fe8e4f5dd\"}",
        // Owned against existing: what MeterflowPartitionsUnowned compares.
        "meterflow_topic_partitions{topic=\"usage\"} 2",
        "meterflow_assigned_partitions 2",
    ] {
        assert!(metrics.contains(expected), "{expected} missing in:\n{metrics}");
    }
    assert!(!metrics.contains(SECRET), "a secret in /metrics");
    let (_, _, ready) = get(&format!("{base}/readyz")).await;
    assert!(!ready.contains(SECRET), "a secret in /readyz");

    common::stop_pipeline(stop, run, Duration::ZERO).await;
    // The source left the group: no partitions, so no longer ready.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_an_unreachable_broker() {
    let metrics = meterflow::telemetry::metrics_handle();
    let (cluster, brokers) = common::mock_cluster(&[("usage", 1), ("usage-dlq", 1)]);
    let emulator = common::billwerk_emulator(BillwerkOptions::default()).await;
    let stats = Arc::new(RunStats::default());
    let config = common::billwerk_config(
        &brokers,
        "meterflow-admin-broker-test",
        "usage",
        "usage-dlq",
        &emulator.base_url(),
        "none",
    )
    .build()
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stats.readiness.report().ready {
        assert!(
            Instant::now() < deadline,
            "never ready: {:?}",
            stats.readiness.report()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // With the broker down, metadata probes time out: its last answer only gets older (past
    // STALE_AFTER that check fails; the unit tests cover that arithmetic).
    cluster.broker_down(1).unwrap();
    let down_at = Instant::now();
    tokio::time::sleep(admin::readiness::PROBE_EVERY * 2 + Duration::from_secs(1)).await;
    let report = stats.readiness.report();
    let outage = down_at.elapsed();
    let reported_ms: u128 = report
        .checks
        .broker
        .detail
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("an age in the detail");
    // One probe may have been answered just before the broker went down.
    assert!(
        reported_ms + 1000 >= outage.as_millis(),
        "a broker answer during the outage? {reported_ms} ms after {outage:?}: {report:?}"
    );
    // The consumer's errors during the outage are counted, by librdkafka's code (issue 11:
    // they were only logged).
    let rendered = metrics.render();
    assert!(
        rendered.contains("meterflow_consumer_errors_total{code="),
        "no consumer error counted:\n{rendered}"
    );
    cluster.broker_up(1).unwrap();

    stop.send(()).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(30), run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meterflow_run_serves_the_admin_endpoints_and_stops_on_sigterm() {
    let emulator = common::billwerk_emulator(BillwerkOptions::default()).await;
    // No broker listens on port 1: the service runs, alive but never ready.
    let config = common::billwerk_config(
        "127.0.0.1:1",
        "meterflow-admin-cli",
        "usage",
        "usage-dlq",
        &emulator.base_url(),
        "none",
    )
    // Port 0, learnt from the log: a port picked in advance could be taken by a parallel test.
    .admin_listen("127.0.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meterflow.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "error,meterflow::admin=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("admin server listening") {
                // Text (`addr=…`) or JSON (`"addr":"…"`) logs.
                let (_, rest) = line
                    .split_once("addr=")
                    .or_else(|| line.split_once("\"addr\":\""))
                    .unwrap_or_else(|| panic!("no addr in {line}"));
                let end = rest.find(|c: char| c == '"' || c.is_whitespace());
                return rest[..end.unwrap_or(rest.len())].to_string();
            }
        }
        panic!("meterflow exited before the admin server listened");
    })
    .await
    .expect("admin server never said where it listens");
    // Keep reading the log so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let base = format!("http://{addr}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/healthz")).await {
            assert_eq!(r.status().as_u16(), 200);
            break;
        }
        assert!(Instant::now() < deadline, "admin server never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 503);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["checks"]["partitions"]["ok"], false, "{body}");
    assert_eq!(report["checks"]["broker"]["ok"], false, "{body}");
    let (_, _, metrics) = get(&format!("{base}/metrics")).await;
    assert!(metrics.contains("meterflow_build_info"), "{metrics}");
    assert!(!metrics.contains(SECRET));

    let pid = child.id().unwrap().to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stops within 20 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        reqwest::get(format!("{base}/healthz")).await.is_err(),
        "the admin server stops with the process"
    );
}

/// SIGTERM while start-up is still blocked: the broker is unreachable and the ledger's
/// PostgreSQL accepts connections but never answers. The signal must be caught (not the
/// default action, which kills the process: exit 143 under Kubernetes) and the start abandoned
/// cleanly: exit 0, well before the ledger's 30 s connect timeout.
#[tokio::test]
async fn sigterm_during_a_blocked_start_up_exits_0() {
    // A "database" that accepts and then says nothing: sqlx waits for its greeting.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let config = common::billwerk_config(
        "127.0.0.1:1",
        "meterflow-blocked-start",
        "usage",
        "usage-dlq",
        "http://127.0.0.1:1",
        &format!("postgres://meterflow@{silent_addr}/ledger"),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meterflow.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("meterflow starting") {
                return;
            }
        }
        panic!("meterflow exited before it started");
    })
    .await
    .expect("meterflow never logged its start");
    let lines = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Ok(Some(line)) = log.next_line().await {
            lines.push(line);
        }
        lines
    });
    // Start-up is now waiting on the silent ledger.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = child.id().unwrap().to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("stops within 10 s of SIGTERM, not at the ledger's connect timeout")
        .unwrap();
    let lines = lines.await.unwrap();
    assert!(
        status.success(),
        "SIGTERM during start-up exits 0, got {status}; log:\n{}",
        lines.join("\n")
    );
    assert!(
        lines.iter().any(|l| l.contains("stopped during start-up")),
        "{}",
        lines.join("\n")
    );
    held.abort();
}

/// Issue 11, problem 6 ("a stalled partition is invisible"): every delivery fails (5xx,
/// retried forever), so the partition's committed offset stays at 0 while all its events were
/// read. The lag of the committed offset shows the whole backlog (the fetch position's lag was
/// 0), the oldest unsettled event ages, and `/readyz` names the partition after
/// `kafka.stuck_after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_partition_shows_in_lag_age_and_readyz() {
    let _ = meterflow::telemetry::metrics_handle();
    let (_cluster, brokers) = common::mock_cluster(&[("pinned", 1), ("pinned-dlq", 1)]);
    let emulator = common::billwerk_emulator(BillwerkOptions::default().with_faults(
        meterflow::emulator::faults::FaultSettings {
            fail_rate: 1.0,
            ..Default::default()
        },
    ))
    .await;
    let stats = Arc::new(RunStats::default());
    let (base, _stop) = serve(stats.readiness.clone()).await;
    let config = common::billwerk_config(
        &brokers,
        "meterflow-admin-pinned-test",
        "pinned",
        "pinned-dlq",
        &emulator.base_url(),
        "none",
    )
    .stuck_after(Duration::from_secs(3))
    .build()
    .unwrap();
    let events: Vec<Vec<u8>> = (0..10)
        .map(|i| {
            serde_json::to_vec(&json!({"id": format!("pin_{i}"), "contract_id": CONTRACT,
                "metric": "api_calls", "quantity": 1, "timestamp": "2026-11-20T10:15:00Z"}))
            .unwrap()
        })
        .collect();
    common::produce(&brokers, "pinned", 1, &events).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));

    // Every event read, none settled.
    let read = common::wait_until(Duration::from_secs(30), || {
        stats.consumed.load(std::sync::atomic::Ordering::Relaxed) >= 10
    })
    .await;
    assert!(read, "events read");
    let metric = |body: &str, name: &str| -> Option<f64> {
        body.lines()
            .find(|l| l.starts_with(name) && l.contains("topic=\"pinned\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    // The gauges are refreshed every 5 s; /readyz's check after 3 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (lag, age, ready) = loop {
        let (_, _, body) = get(&format!("{base}/metrics")).await;
        let lag = metric(&body, "meterflow_consumer_lag{");
        let age = metric(&body, "meterflow_oldest_unsettled_seconds{");
        let (status, _, ready) = get(&format!("{base}/readyz")).await;
        if lag == Some(10.0) && age.is_some_and(|a| a >= 3.0) && status == 503 {
            break (lag, age, ready);
        }
        assert!(
            Instant::now() < deadline,
            "lag {lag:?}, age {age:?}, readyz {status} {ready}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("lag {lag:?}, oldest unsettled {age:?} s, {ready}");
    assert!(
        ready.contains("pinned/0 pinned at offset 0 for"),
        "/readyz names the partition: {ready}"
    );
    assert!(ready.contains("kafka.stuck_after = 3 s"), "{ready}");
    assert!(emulator.records().is_empty());

    stop.send(()).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(30), run).await;
}
