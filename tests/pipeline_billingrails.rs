//! The whole pipeline against librdkafka's in-process mock cluster and the Billingrails emulator:
//! valid events are stored exactly once each (batches of up to 100); events only Billingrails
//! refuses — which refuses their whole batch — are found (from `details`, or by bisecting when the
//! answer names none) and dead-lettered with the reason, while the good events of the same batch
//! still get through; it holds with dropped connections, 5xx and slow answers injected.

use meterflow_testkit as common;

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::json;

use meterflow::emulator::billingrails::BillingrailsOptions;
use meterflow::emulator::FaultSettings;
use meterflow::event::DeliveryKey;
use meterflow::pipeline::{self, RunStats};

const CONTRACT: &str = "5cd186af443e551fe8e4f5dd";

/// Valid events; every `refuse_every`-th lacks the `region` attribute, which only Billingrails
/// (told to require the property) refuses. Returns (payload, Some(reason) when it must be
/// dead-lettered).
fn events(n: usize, refuse_every: usize) -> Vec<(serde_json::Value, Option<&'static str>)> {
    (0..n)
        .map(|i| {
            let mut attributes = json!({
                "plan": if i % 2 == 0 { "enterprise" } else { "starter" },
                "region": "eu-west-1",
            });
            let refused = i % refuse_every == refuse_every / 2;
            if refused {
                attributes.as_object_mut().unwrap().remove("region");
            }
            let mut event = json!({
                "id": format!("evt_{i:05}"),
                "metric": if i % 3 == 0 { "storage_gb" } else { "api_calls" },
                "quantity": format!("{i}.125"),
                "timestamp": "2026-11-20T10:15:00.250+01:00",
                "attributes": attributes,
            });
            if i % 2 == 0 {
                event["contract_id"] = json!(CONTRACT);
            } else {
                event["contract_external_id"] = json!("acme-prod");
            }
            (event, refused.then_some("provider_rejected"))
        })
        .collect()
}

/// Invalid before any request, with their reasons.
fn invalid_events() -> Vec<(Vec<u8>, &'static str)> {
    let base = json!({"id": "bad", "contract_id": CONTRACT, "metric": "api_calls",
                      "quantity": "1", "timestamp": "2026-11-20T10:15:00Z"});
    let with = |k: &str, v: serde_json::Value, id: &str| {
        let mut e = base.clone();
        e[k] = v;
        e["id"] = json!(id);
        serde_json::to_vec(&e).unwrap()
    };
    vec![
        (b"{not json".to_vec(), "invalid_json"),
        (
            with("metric", json!("teleportations"), "bad_1"),
            "unknown_metric",
        ),
        (with("quantity", json!("0"), "bad_2"), "invalid_quantity"),
    ]
}

struct Case {
    valid: usize,
    refuse_every: usize,
    error_details: bool,
    faults: FaultSettings,
}

async fn run_case(case: Case) {
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 4), ("usage-dlq", 1)]);

    let emulator = common::billingrails_emulator(BillingrailsOptions {
        required_properties: vec!["billingrails_account_id".into(), "region".into()],
        error_details: case.error_details,
        faults: case.faults.clone(),
        ..BillingrailsOptions::default()
    })
    .await;

    let produced = events(case.valid, case.refuse_every);
    let invalid = invalid_events();
    let mut payloads: Vec<Vec<u8>> = produced
        .iter()
        .map(|(v, _)| serde_json::to_vec(v).unwrap())
        .collect();
    for (i, (bytes, _)) in invalid.iter().enumerate() {
        payloads.insert(i * 40 + 11, bytes.clone());
    }
    common::produce(&brokers, "usage", 4, &payloads).await;
    let refused: Vec<&serde_json::Value> = produced
        .iter()
        .filter(|(_, r)| r.is_some())
        .map(|(v, _)| v)
        .collect();
    let stored_expected: Vec<&serde_json::Value> = produced
        .iter()
        .filter(|(_, r)| r.is_none())
        .map(|(v, _)| v)
        .collect();
    let dead_expected = refused.len() + invalid.len();

    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let config = common::billingrails_config(
        &brokers,
        "meterflow-br",
        "usage",
        "usage-dlq",
        &format!("{}/v1", emulator.base_url()),
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
        emulator.records().len() >= stored_expected.len()
            && stats.dead_lettered.load(Ordering::Relaxed) >= dead_expected as u64
    })
    .await;
    common::stop_pipeline(stop, run, Duration::from_millis(500)).await;

    // Every valid event stored exactly once, with its exact quantity and the account mapping.
    let records = emulator.records();
    let by_key: HashMap<String, _> = records
        .iter()
        .map(|r| (r.idempotency_key.clone().unwrap_or_default(), r))
        .collect();
    assert_eq!(
        by_key.len(),
        records.len(),
        "no idempotency key stored twice"
    );
    assert_eq!(
        records.len(),
        stored_expected.len(),
        "one stored event per valid event"
    );
    for event in &stored_expected {
        let id = event["id"].as_str().unwrap();
        let r = by_key
            .get(DeliveryKey::for_event(id).as_str())
            .unwrap_or_else(|| panic!("{id} stored"));
        assert_eq!(r.event_name, event["metric"].as_str().unwrap());
        let quantity = r.properties["quantity"].to_string();
        assert_eq!(
            Decimal::from_str(&quantity).unwrap(),
            Decimal::from_str(event["quantity"].as_str().unwrap()).unwrap(),
            "{id}: exact quantity"
        );
        let account = event
            .get("contract_id")
            .or_else(|| event.get("contract_external_id"))
            .unwrap();
        assert_eq!(&r.properties["billingrails_account_id"], account);
        assert_eq!(r.properties["region"], "eu-west-1");
        assert_eq!(r.timestamp.to_rfc3339(), "2026-11-20T09:15:00.250+00:00");
        if event["metric"] == "api_calls" && event["attributes"]["plan"] == "enterprise" {
            assert_eq!(r.properties["unit_price"].to_string(), "0.0015");
            assert!(r.properties["description"]
                .as_str()
                .unwrap()
                .ends_with("API calls in eu-west-1"));
        } else {
            assert!(!r.properties.contains_key("unit_price"));
        }
    }
    let stats_now = emulator.stats();
    assert_eq!(stats_now.duplicate_keys, 0);

    // Every refused or invalid event dead-lettered once, with its reason.
    let letters = common::read_topic(
        &brokers,
        "usage-dlq",
        dead_expected,
        Duration::from_secs(20),
    );
    assert_eq!(
        letters.len(),
        dead_expected,
        "one dead letter per bad event"
    );
    let refused_payloads: HashSet<Vec<u8>> = refused
        .iter()
        .map(|v| serde_json::to_vec(v).unwrap())
        .collect();
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for letter in &letters {
        *reasons.entry(letter.reason().to_string()).or_default() += 1;
        if refused_payloads.contains(&letter.payload) {
            assert_eq!(letter.reason(), "provider_rejected");
            let detail = letter.headers.get("meterflow.detail").unwrap();
            // Without details the provider's answer is all there is to tell.
            let named = if case.error_details { "region" } else { "422" };
            assert!(detail.contains(named), "the reason says why: {detail}");
        }
    }
    assert_eq!(reasons.get("provider_rejected"), Some(&refused.len()));
    for (_, reason) in &invalid {
        assert_eq!(reasons.get(*reason), Some(&1), "{reason}");
    }
    assert_eq!(
        common::committed_total(&brokers, "meterflow-br", "usage", 4),
        payloads.len() as i64,
        "offsets committed to the end"
    );
    eprintln!(
        "answers {:?}, faults {:?}, duplicates ignored by Billingrails {}",
        stats_now.answers_by_status, stats_now.faults_injected, stats_now.duplicate_events_ignored
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_events_named_in_details_are_dead_lettered_the_rest_stored_once() {
    run_case(Case {
        valid: 450,
        refuse_every: 97,
        error_details: true,
        faults: FaultSettings::default(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_events_are_found_by_bisection_when_no_details_name_them() {
    run_case(Case {
        valid: 450,
        refuse_every: 61,
        error_details: false,
        faults: FaultSettings::default(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_with_dropped_connections_5xx_and_slow_answers() {
    run_case(Case {
        valid: 600,
        refuse_every: 83,
        error_details: false,
        faults: FaultSettings {
            fail_rate: 0.1,
            drop_rate: 0.1,
            slow_rate: 0.03,
            slow_duration: Duration::from_millis(2500),
            ..FaultSettings::default()
        },
    })
    .await;
}

/// The exactly-once failure test against this sink: `meterflow run` killed with SIGKILL at
/// random moments and restarted with batches cut differently, with dropped connections, slow
/// answers and 5xx, and batches refused without details (bisection interrupted by kills): every
/// valid event is stored once, every bad one is in the dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restarts_store_each_event_once() {
    let seed = rand::random::<u64>();
    eprintln!("seed {seed}");
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 4), ("usage-dlq", 1)]);
    let emulator = common::billingrails_emulator(BillingrailsOptions {
        required_properties: vec!["billingrails_account_id".into(), "region".into()],
        error_details: false,
        faults: FaultSettings {
            fail_rate: 0.05,
            drop_rate: 0.05,
            slow_rate: 0.02,
            slow_duration: Duration::from_millis(2500),
            latency: Duration::from_millis(30),
            ..FaultSettings::default()
        },
        ..BillingrailsOptions::default()
    })
    .await;

    let produced = events(3000, 149);
    let invalid = invalid_events();
    let mut payloads: Vec<Vec<u8>> = produced
        .iter()
        .map(|(v, _)| serde_json::to_vec(v).unwrap())
        .collect();
    for (i, (bytes, _)) in invalid.iter().enumerate() {
        payloads.insert(i * 700 + 11, bytes.clone());
    }
    common::produce(&brokers, "usage", 4, &payloads).await;
    let valid_keys: HashSet<String> = produced
        .iter()
        .filter(|(_, r)| r.is_none())
        .map(|(v, _)| DeliveryKey::for_event(v["id"].as_str().unwrap()).0)
        .collect();
    let mut bad_payloads: HashSet<Vec<u8>> = produced
        .iter()
        .filter(|(_, r)| r.is_some())
        .map(|(v, _)| serde_json::to_vec(v).unwrap())
        .collect();
    bad_payloads.extend(invalid.iter().map(|(b, _)| b.clone()));

    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let base_url = format!("{}/v1", emulator.base_url());
    let kills = common::kill_and_restart(
        env!("CARGO_BIN_EXE_meterflow"),
        &brokers,
        "br-killed",
        payloads.len(),
        &[150, 1000, 250, 600, 300],
        seed,
        dir.path(),
        |max_events| {
            common::billingrails_config(
                &brokers,
                "br-killed",
                "usage",
                "usage-dlq",
                &base_url,
                &ledger,
            )
            .max_events(max_events)
        },
    )
    .await;
    assert_eq!(
        common::committed_total(&brokers, "br-killed", "usage", 4),
        payloads.len() as i64,
        "every event settled (log: {})",
        dir.path().join("meterflow.log").display()
    );

    let records = emulator.records();
    let stored: HashSet<String> = records
        .iter()
        .map(|r| r.idempotency_key.clone().unwrap_or_default())
        .collect();
    assert_eq!(stored.len(), records.len(), "no event stored twice");
    assert_eq!(stored, valid_keys, "every valid event stored, nothing else");

    let letters = common::read_topic(
        &brokers,
        "usage-dlq",
        bad_payloads.len(),
        Duration::from_secs(20),
    );
    let lettered: HashSet<Vec<u8>> = letters.iter().map(|l| l.payload.clone()).collect();
    assert_eq!(lettered, bad_payloads, "every bad event dead-lettered");
    let s = emulator.stats();
    eprintln!(
        "{} events, {kills} kills: {} stored, {} dead letters for {} bad events, faults {:?}, \
         {} re-sent events ignored by Billingrails",
        payloads.len(),
        records.len(),
        letters.len(),
        bad_payloads.len(),
        s.faults_injected,
        s.duplicate_events_ignored
    );
}
