//! A reused event id: a second, different event under an id already billed is dead-lettered
//! with reason `id_conflict` (it is not settled as "already delivered", which would lose it),
//! while an identical copy (a producer's retry) is deduplicated. On every path: billwerk one
//! record per event, billwerk pre-aggregated, and Billingrails batches; the SQLite ledger; the
//! mock cluster.

use meterflow_testkit as common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use meterflow::config::builder::Bucket;
use meterflow::emulator::billingrails::{self, BillingrailsOptions};
use meterflow::emulator::billwerk::{self, BillwerkOptions};
use meterflow::event::DeliveryKey;
use meterflow::pipeline::{self, RunStats};

const CONTRACT: &str = "5cd186af443e551fe8e4f5dd";

#[derive(Clone, Copy, Debug)]
enum Path {
    Billwerk,
    BillwerkAggregated,
    Billingrails,
}

fn event(id: &str, quantity: &str, timestamp: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id, "contract_id": CONTRACT, "metric": "api_calls", "quantity": quantity,
        "timestamp": timestamp, "attributes": { "billingrails_account_id": "acct_1", "region": "eu" }
    }))
    .unwrap()
}

async fn run_case(path: Path) {
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 1), ("usage-dlq", 1)]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());

    // Quantities, per event id, as billed; read from whichever emulator runs.
    let (billwerk, billingrails, config) = match path {
        Path::Billwerk | Path::BillwerkAggregated => {
            let emulator = billwerk::start(BillwerkOptions::default(), listener)
                .await
                .unwrap();
            let mut config = common::billwerk_config(
                &brokers,
                "ids",
                "usage",
                "usage-dlq",
                &emulator.base_url(),
                &ledger,
            );
            if matches!(path, Path::BillwerkAggregated) {
                config = config.aggregate(Bucket::Hour);
            }
            (Some(emulator), None, config)
        }
        Path::Billingrails => {
            let emulator = billingrails::start(BillingrailsOptions::default(), listener)
                .await
                .unwrap();
            let config = common::billingrails_config(
                &brokers,
                "ids",
                "usage",
                "usage-dlq",
                &format!("{}/v1", emulator.base_url()),
                &ledger,
            );
            (None, Some(emulator), config)
        }
    };
    let delivered = || {
        billwerk.as_ref().map_or_else(
            || billingrails.as_ref().map_or(0, |e| e.records().len()),
            |e| e.records().len(),
        )
    };
    let config = config.build().unwrap();
    let stats = Arc::new(RunStats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));

    // First the original events, billed; then an event reusing an id with another quantity,
    // one reusing an id with another timestamp, and an identical copy.
    let first = [
        event("evt_a", "1", "2026-11-20T10:15:00Z"),
        event("evt_b", "5", "2026-11-20T10:16:00Z"),
    ];
    common::produce(&brokers, "usage", 1, &first).await;
    assert!(
        common::wait_until(Duration::from_secs(30), || delivered() >= 1
            && stats.delivered.load(Ordering::Relaxed) >= 2)
        .await,
        "{path:?}: the originals are delivered"
    );
    let later = [
        event("evt_a", "2", "2026-11-20T10:15:00Z"),
        event("evt_b", "5", "2026-11-20T11:16:00Z"),
        event("evt_a", "1", "2026-11-20T10:15:00Z"),
        event("evt_c", "7", "2026-11-20T10:17:00Z"),
    ];
    common::produce(&brokers, "usage", 1, &later).await;
    assert!(
        common::wait_until(Duration::from_secs(30), || {
            // The identical copy is settled as already delivered by the ledger (billwerk), or
            // sent in a new batch and deduplicated by its idempotency key (Billingrails).
            stats.dead_lettered.load(Ordering::Relaxed) >= 2
                && stats.delivered.load(Ordering::Relaxed)
                    + stats.already_delivered.load(Ordering::Relaxed)
                    >= 4
        })
        .await,
        "{path:?}: settled: {:?}",
        stats.snapshot()
    );
    common::stop_pipeline(stop, run, Duration::from_millis(500)).await;

    let letters = common::read_topic(&brokers, "usage-dlq", 2, Duration::from_secs(10));
    let reasons: Vec<&str> = letters.iter().map(|l| l.reason()).collect();
    assert_eq!(reasons, ["id_conflict", "id_conflict"], "{path:?}");
    for original in &later[..2] {
        assert!(
            letters.iter().any(|l| &l.payload == original),
            "{path:?}: the conflicting event's own bytes"
        );
    }
    // What the provider holds: the originals and evt_c, each once, never the conflicting ones.
    match (&billwerk, &billingrails) {
        (Some(e), _) => {
            let total: rust_decimal::Decimal = e.records().iter().map(|r| r.quantity).sum();
            assert_eq!(
                total,
                rust_decimal::Decimal::from(13),
                "{path:?}: 1 + 5 + 7"
            );
            assert_eq!(e.stats().duplicate_keys, 0, "{path:?}");
            if matches!(path, Path::Billwerk) {
                let memos: Vec<String> =
                    e.records().iter().filter_map(|r| r.memo.clone()).collect();
                for id in ["evt_a", "evt_b", "evt_c"] {
                    let key = DeliveryKey::for_event(id);
                    assert_eq!(
                        memos.iter().filter(|m| m.contains(key.as_str())).count(),
                        1,
                        "{id} billed once"
                    );
                }
            }
        }
        (_, Some(e)) => {
            let records = e.records();
            assert_eq!(records.len(), 3, "{path:?}: {records:?}");
            let quantities: Vec<String> = records
                .iter()
                .map(|r| r.properties["quantity"].to_string())
                .collect();
            assert!(
                !quantities.iter().any(|q| q.contains('2')),
                "{path:?}: the conflicting quantity never sent: {quantities:?}"
            );
        }
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billwerk_dead_letters_a_reused_id_with_other_contents() {
    run_case(Path::Billwerk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billwerk_aggregated_dead_letters_a_reused_id_with_other_contents() {
    run_case(Path::BillwerkAggregated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billingrails_dead_letters_a_reused_id_with_other_contents() {
    run_case(Path::Billingrails).await;
}
