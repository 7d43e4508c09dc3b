//! Fencing: a replica that lost its partitions while it was frozen must not send for them when
//! it wakes up. Two `meterflow run` processes share one consumer group (librdkafka's mock
//! cluster, reached over loopback) and one PostgreSQL ledger (a database of this test's own).
//!
//! Replica A claims a first run of events and is then held by the provider's budget (5 requests
//! per 8 s window: its remaining events wait in the pacer, claimed, not yet sent). A is frozen
//! with SIGSTOP. Replica B joins, takes the partitions over once A's session times out, waits out
//! A's leases, reconciles (nothing there) and delivers every event under a raised limit. Then A
//! is woken with SIGCONT: its pacer wait is long over, so it goes straight for the POST. It must
//! find that the deliveries are no longer its own, and send none of them.

use meterflow_testkit as common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use meterflow::ack::ledger::scratch::ScratchDatabase;
use meterflow::emulator::billwerk::{BillwerkEmulator, BillwerkOptions};
use meterflow::emulator::ratelimit::RateLimitSettings;
use meterflow::event::DeliveryKey;

const CONTRACT: &str = "5cd186af443e551fe8e4f5dd";

fn spawn(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info,librdkafka=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("meterflow starts")
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal}");
}

fn stop(child: &mut Child) {
    signal(child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

async fn wait_records(emulator: &BillwerkEmulator, n: usize, limit: Duration) -> bool {
    common::wait_until(limit, || emulator.records().len() >= n).await
}

fn count(log: &Path, needle: &str) -> usize {
    String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default())
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

fn tail(log: &Path) -> String {
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_frozen_past_its_lease_sends_nothing_when_it_wakes() {
    let Some(database) = ScratchDatabase::for_test().await else {
        return;
    };
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 2), ("usage-dlq", 1)]);

    let window = Duration::from_secs(8);
    let emulator = common::billwerk_emulator(
        BillwerkOptions::default().with_limit(RateLimitSettings::per_window(5, window)),
    )
    .await;

    let events = 120;
    let ids: Vec<String> = (0..events)
        .map(|i| format!("fence_{}_{i}", rand::random::<u32>()))
        .collect();
    let payloads: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| {
            serde_json::to_vec(&json!({
                "id": id, "contract_id": CONTRACT, "metric": "api_calls",
                "quantity": "1", "timestamp": "2026-11-20T10:15:00Z"
            }))
            .unwrap()
        })
        .collect();
    common::produce(&brokers, "usage", 2, &payloads).await;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("meterflow.toml");
    let text = common::billwerk_config(
        &brokers,
        "fencing",
        "usage",
        "usage-dlq",
        &emulator.base_url(),
        &database.url,
    )
    .request_timeout(Duration::from_secs(1))
    .rate_window(Duration::from_secs(8))
    .to_toml();
    std::fs::write(&config, text).unwrap();
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));

    // A delivers the window's budget, then waits in the pacer with claimed deliveries.
    let mut a = spawn(&config, &log_a);
    assert!(
        wait_records(&emulator, 5, Duration::from_secs(30)).await,
        "replica A delivered its first window; log:\n{}",
        tail(&log_a)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&a, "STOP");
    let frozen_at = Instant::now();
    emulator
        .set_limit(RateLimitSettings::per_window(
            100_000,
            Duration::from_secs(1),
        ))
        .unwrap();

    // B takes every partition over once A's session (6 s) times out, and delivers everything.
    let mut b = spawn(&config, &log_b);
    let delivered = wait_records(&emulator, events, Duration::from_secs(90)).await;
    if !delivered {
        signal(&a, "CONT");
        stop(&mut a);
        stop(&mut b);
        panic!(
            "replica B delivered {} of {events}; log:\n{}",
            emulator.records().len(),
            tail(&log_b)
        );
    }
    // A stays frozen well past its lease (request timeout 1 s + 5 s) and its pacer's wait.
    let frozen_for = Duration::from_secs(14).saturating_sub(frozen_at.elapsed());
    tokio::time::sleep(frozen_for).await;

    signal(&a, "CONT");
    // Long enough for any send A still had in it (its pacer wait is long over).
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop(&mut a);
    stop(&mut b);

    let mut per_key: HashMap<String, usize> = HashMap::new();
    for r in emulator.records() {
        *per_key
            .entry(r.memo.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let (mut lost, mut twice) = (0, 0);
    for id in &ids {
        match per_key.get(DeliveryKey::for_event(id).as_str()).copied() {
            None | Some(0) => lost += 1,
            Some(1) => {}
            Some(n) => twice += n - 1,
        }
    }
    let taken_over = count(&log_b, "reconciling before re-sending");
    let fenced = count(&log_a, "no longer owns the delivery");
    println!(
        "fencing: events={events}, records={}, lost={lost}, billed twice={twice}, \
         B took over {taken_over} deliveries A had claimed, A refused {fenced} sends after waking",
        emulator.records().len()
    );
    assert!(
        taken_over > 0,
        "the scenario happened: B took over deliveries A had claimed; B's log:\n{}",
        tail(&log_b)
    );
    assert_eq!(lost, 0);
    assert_eq!(twice, 0, "A's log:\n{}", tail(&log_a));
}
