//! The whole pipeline against librdkafka's in-process mock cluster and the billwerk emulator:
//! valid events become exactly one usage record each, priced by the rules; every kind of
//! invalid event lands in the dead-letter topic with its reason; offsets are committed to the end.

use meterflow_testkit as common;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::json;

use meterflow::emulator::billwerk::BillwerkOptions;
use meterflow::pipeline::{self, RunStats};

const CONTRACT: &str = "5cd186af443e551fe8e4f5dd";
const OTHER_CONTRACT: &str = "5cd186af443e551fe8e4f5de";
const API_CALLS: &str = "5ce53069443e551b9caccc64";
const STORAGE: &str = "5ce53069443e551b9caccc65";

fn valid_events(n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            if i % 3 == 0 {
                json!({
                    "id": format!("evt_{i:05}"),
                    "contract_external_id": "acme-prod",
                    "metric": "storage_gb",
                    "quantity": format!("{}.25", i),
                    "timestamp": "2026-11-20T10:15:00+02:00",
                })
            } else {
                json!({
                    "id": format!("evt_{i:05}"),
                    "contract_id": CONTRACT,
                    "metric": "api_calls",
                    "quantity": i + 1,
                    "timestamp": "2026-11-20T10:15:00.123Z",
                    "attributes": { "plan": if i % 2 == 0 { "enterprise" } else { "starter" }, "region": "eu-west-1" }
                })
            }
        })
        .collect()
}

/// One invalid event of every kind, with the reason it must be dead-lettered for.
fn invalid_events() -> Vec<(Vec<u8>, &'static str)> {
    let ok = |mut v: serde_json::Value, k: &str, val: serde_json::Value| {
        v[k] = val;
        serde_json::to_vec(&v).unwrap()
    };
    let base = json!({"id": "bad", "contract_id": CONTRACT, "metric": "api_calls",
                      "quantity": "1", "timestamp": "2026-11-20T10:15:00Z"});
    let mut missing_id = base.clone();
    missing_id.as_object_mut().unwrap().remove("id");
    vec![
        (b"{not json".to_vec(), "invalid_json"),
        (serde_json::to_vec(&missing_id).unwrap(), "missing_field"),
        (
            ok(base.clone(), "metric", json!("teleportations")),
            "unknown_metric",
        ),
        (ok(base.clone(), "quantity", json!("0")), "invalid_quantity"),
        (ok(base.clone(), "quantity", json!(-3)), "invalid_quantity"),
        (
            ok(base.clone(), "quantity", json!("NaN")),
            "invalid_quantity",
        ),
        (
            ok(base.clone(), "timestamp", json!("yesterday")),
            "invalid_timestamp",
        ),
        (
            {
                let mut v = base.clone();
                v.as_object_mut().unwrap().remove("contract_id");
                v["contract_external_id"] = json!("nobody-knows-me");
                serde_json::to_vec(&v).unwrap()
            },
            "unknown_contract",
        ),
        (
            ok(base.clone(), "contract_id", json!(OTHER_CONTRACT)),
            "unknown_contract",
        ),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (bytes, reason))| {
        // Give each a distinct id where it has one.
        let text = String::from_utf8(bytes)
            .unwrap()
            .replace("\"bad\"", &format!("\"bad_{i}\""));
        (text.into_bytes(), reason)
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_events_billed_once_invalid_ones_dead_lettered() {
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 4), ("usage-dlq", 1)]);

    let emulator = common::billwerk_emulator(
        BillwerkOptions::default()
            .with_contract("acme-prod", CONTRACT)
            .with_contract("globex", "5cd186af443e551fe8e4f5df"),
    )
    .await;

    let n = 300;
    let valid = valid_events(n);
    let invalid = invalid_events();
    let mut payloads: Vec<Vec<u8>> = valid
        .iter()
        .map(|v| serde_json::to_vec(v).unwrap())
        .collect();
    // Invalid events sit between valid ones: the offsets behind them must still be committed.
    for (i, (bytes, _)) in invalid.iter().enumerate() {
        payloads.insert(i * 30 + 7, bytes.clone());
    }
    common::produce(&brokers, "usage", 4, &payloads).await;

    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let config = common::billwerk_config(
        &brokers,
        "meterflow-test",
        "usage",
        "usage-dlq",
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

    common::wait_until(Duration::from_secs(60), || {
        emulator.records().len() >= n
            && stats
                .dead_lettered
                .load(std::sync::atomic::Ordering::Relaxed)
                >= invalid.len() as u64
    })
    .await;
    common::stop_pipeline(stop, run, Duration::from_millis(500)).await;

    // Exactly one record per valid event, with the right fields.
    let records = emulator.records();
    assert_eq!(records.len(), n, "one usage record per valid event");
    let by_memo: HashMap<String, _> = records
        .iter()
        .map(|r| (r.memo.clone().unwrap_or_default(), r))
        .collect();
    assert_eq!(by_memo.len(), n, "no delivery key twice");
    for (i, event) in valid.iter().enumerate() {
        let key = meterflow::event::DeliveryKey::for_event(event["id"].as_str().unwrap());
        let r = by_memo
            .get(key.as_str())
            .unwrap_or_else(|| panic!("event {i} delivered"));
        assert_eq!(r.contract_id, CONTRACT);
        if i % 3 == 0 {
            assert_eq!(r.component_id, STORAGE);
            assert_eq!(r.quantity, Decimal::from_str(&format!("{i}.25")).unwrap());
            // +02:00 becomes UTC.
            assert_eq!(r.due_date.to_rfc3339(), "2026-11-20T08:15:00+00:00");
            assert!(r.product_override.is_none());
        } else {
            assert_eq!(r.component_id, API_CALLS);
            assert_eq!(r.quantity, Decimal::from(i as u64 + 1));
            assert_eq!(r.due_date.timestamp_subsec_millis(), 123);
            if i % 2 == 0 {
                let o = r.product_override.as_ref().expect("enterprise override");
                assert_eq!(o.price_per_unit, Some(Decimal::from_str("0.0015").unwrap()));
                assert_eq!(o.name.as_deref(), Some("API calls (enterprise)"));
                assert_eq!(
                    o.description.as_deref(),
                    Some(format!("{} API calls in eu-west-1", i + 1).as_str())
                );
            } else {
                assert!(r.product_override.is_none(), "starter plan has no override");
            }
        }
    }

    // Every invalid event dead-lettered once, with its reason and source coordinates.
    let letters = common::read_topic(
        &brokers,
        "usage-dlq",
        invalid.len(),
        Duration::from_secs(20),
    );
    assert_eq!(letters.len(), invalid.len());
    let mut want: Vec<&str> = invalid.iter().map(|(_, r)| *r).collect();
    let mut got: Vec<&str> = letters.iter().map(|l| l.reason()).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    for l in &letters {
        assert!(
            invalid.iter().any(|(bytes, _)| *bytes == l.payload),
            "original bytes kept"
        );
        assert_eq!(
            l.headers.get("meterflow.source.topic").map(String::as_str),
            Some("usage")
        );
        assert!(l.headers.contains_key("meterflow.source.offset"));
        assert!(l.headers.contains_key("meterflow.detail"));
    }
    // Nothing billed twice; everything consumed is committed.
    assert_eq!(emulator.stats().duplicate_keys, 0);
    let committed = common::committed_total(&brokers, "meterflow-test", "usage", 4);
    assert_eq!(
        committed,
        payloads.len() as i64,
        "offsets committed to the end"
    );
}
