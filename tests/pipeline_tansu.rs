//! End to end against a real Kafka-compatible broker process (Tansu): topics created through the
//! admin API, a consumer group with cooperative-sticky assignment, committed offsets, the billwerk
//! emulator behind. Skipped locally without Tansu; required in CI.

use meterflow_testkit as common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use meterflow::emulator::billwerk::BillwerkOptions;
use meterflow::pipeline::{self, RunStats};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_through_a_real_broker_and_commits() {
    let dir = tempfile::tempdir().unwrap();
    // The broker .ci/run started, or one of our own.
    let (_own_broker, brokers) = match std::env::var("METERFLOW_TEST_TANSU") {
        Ok(b) => (None, b),
        Err(_) => match common::require_tansu(dir.path()) {
            Some(t) => {
                let b = t.brokers();
                (Some(t), b)
            }
            None => return,
        },
    };
    let run_id = rand::random::<u32>();
    let (topic, dlq, group) = (
        format!("usage-{run_id}"),
        format!("usage-dlq-{run_id}"),
        format!("meterflow-tansu-{run_id}"),
    );
    common::create_topics(&brokers, &[(&topic, 3), (&dlq, 1)]).await;

    let emulator = common::billwerk_emulator(BillwerkOptions::default()).await;

    let n = 500;
    let mut payloads: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            serde_json::to_vec(&json!({
                "id": format!("tansu_{i}"),
                "contract_id": "5cd186af443e551fe8e4f5dd",
                "metric": "api_calls",
                "quantity": format!("{}.5", i),
                "timestamp": "2026-11-20T10:15:00Z",
            }))
            .unwrap()
        })
        .collect();
    payloads.push(b"not json at all".to_vec());
    common::produce(&brokers, &topic, 3, &payloads).await;

    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let config = common::billwerk_config(
        &brokers,
        &group,
        &topic,
        &dlq,
        &emulator.base_url(),
        &ledger,
    )
    .build()
    .unwrap();
    let stats = Arc::new(RunStats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));
    common::wait_until(Duration::from_secs(90), || {
        emulator.records().len() >= n && stats.dead_lettered.load(Ordering::Relaxed) >= 1
    })
    .await;
    common::stop_pipeline(stop, run, Duration::from_millis(500)).await;

    assert_eq!(emulator.records().len(), n, "one record per valid event");
    assert_eq!(emulator.stats().duplicate_keys, 0);
    let letters = common::read_topic(&brokers, &dlq, 1, Duration::from_secs(20));
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason(), "invalid_json");
    assert_eq!(letters[0].payload, b"not json at all");
    assert_eq!(
        common::committed_total(&brokers, &group, &topic, 3),
        payloads.len() as i64,
        "every offset committed after the drain"
    );
}
