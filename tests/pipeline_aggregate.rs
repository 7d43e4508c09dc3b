//! billwerk pre-aggregation end to end (mock cluster + billwerk emulator):
//! - the records' quantities, summed per contract, component, price override and hour, equal the
//!   produced events' sums exactly — and equal what the same stream delivers without
//!   aggregation — with far fewer requests than events;
//! - the same holds when `meterflow run` is killed (-9) mid-run, again and again, and restarted
//!   with batches cut differently each time, with dropped connections, slow answers and 5xx on:
//!   the ledger's event → aggregate map keeps every event in exactly one delivered sum.

use meterflow_testkit as common;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::json;

use meterflow::config::builder::{Bucket, ConfigBuilder};
use meterflow::config::Config;
use meterflow::emulator::billwerk::{self, BillwerkEmulator, BillwerkOptions};
use meterflow::emulator::FaultSettings;
use meterflow::pipeline::{self, RunStats};

const CONTRACTS: [(&str, &str); 3] = [
    ("acme-prod", "5cd186af443e551fe8e4f5d0"),
    ("globex", "5cd186af443e551fe8e4f5d1"),
    ("initech", "5cd186af443e551fe8e4f5d2"),
];
const API_CALLS: &str = "5ce53069443e551b9caccc64";
const STORAGE: &str = "5ce53069443e551b9caccc65";

/// (contract id, component id, bucket start, override price): what one usage record bills.
type BillingKey = (String, String, DateTime<Utc>, Option<Decimal>);

struct Stream {
    payloads: Vec<Vec<u8>>,
    sums: BTreeMap<BillingKey, Decimal>,
}

/// A random stream: contracts by id or external id, two metrics, prices by plan, timestamps over
/// five hours (across a day boundary), quantities with 0 to 6 decimal places.
fn stream(seed: u64, n: usize) -> Stream {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Utc.with_ymd_and_hms(2026, 11, 20, 21, 30, 0).unwrap();
    let mut payloads = Vec::with_capacity(n);
    let mut sums: BTreeMap<BillingKey, Decimal> = BTreeMap::new();
    for i in 0..n {
        let (external, contract) = CONTRACTS[rng.random_range(0..CONTRACTS.len())];
        let api = rng.random_bool(0.6);
        let enterprise = rng.random_bool(0.5);
        let quantity = Decimal::new(rng.random_range(1..5_000_000), rng.random_range(0..=6u32));
        let at = start + chrono::Duration::milliseconds(rng.random_range(0..5 * 3_600_000));
        let mut event = json!({
            "id": format!("evt_{seed:x}_{i:06}"),
            "metric": if api { "api_calls" } else { "storage_gb" },
            "quantity": quantity.to_string(),
            "timestamp": at.to_rfc3339(),
            "attributes": { "plan": if enterprise { "enterprise" } else { "starter" }, "region": "eu-west-1" },
        });
        if rng.random_bool(0.5) {
            event["contract_id"] = json!(contract);
        } else {
            event["contract_external_id"] = json!(external);
        }
        let price = (api && enterprise).then(|| Decimal::from_str("0.0015").unwrap());
        let key = (
            contract.to_string(),
            if api { API_CALLS } else { STORAGE }.to_string(),
            at.duration_trunc(chrono::Duration::hours(1)).unwrap(),
            price,
        );
        *sums.entry(key).or_default() += quantity;
        payloads.push(serde_json::to_vec(&event).unwrap());
    }
    Stream { payloads, sums }
}

/// Sums of the stored records per billing key (DueDate truncated to the hour, so records of
/// the run without aggregation compare too).
fn record_sums(emulator: &BillwerkEmulator) -> BTreeMap<BillingKey, Decimal> {
    let mut sums: BTreeMap<BillingKey, Decimal> = BTreeMap::new();
    for r in emulator.records() {
        let key = (
            r.contract_id.clone(),
            r.component_id.clone(),
            r.due_date
                .duration_trunc(chrono::Duration::hours(1))
                .unwrap(),
            r.product_override.as_ref().and_then(|o| o.price_per_unit),
        );
        *sums.entry(key).or_default() += r.quantity;
    }
    sums
}

async fn emulator(faults: FaultSettings) -> BillwerkEmulator {
    let mut options = BillwerkOptions::default();
    for (external, id) in CONTRACTS {
        options = options.with_contract(external, id);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    billwerk::start(options.with_faults(faults), listener)
        .await
        .unwrap()
}

/// The shared billwerk test config, with or without `[sink.aggregate]`, and an override
/// description that does not repeat the event's quantity (it would make every record differ).
fn test_config(
    brokers: &str,
    group: &str,
    base_url: &str,
    ledger: &str,
    aggregate: bool,
    max_events: usize,
) -> ConfigBuilder {
    let config = common::billwerk_config(brokers, group, "usage", "usage-dlq", base_url, ledger)
        .clear_rules()
        .rule(
            common::enterprise_api_calls()
                .name("API calls (enterprise)")
                .description("API calls in {attributes.region}"),
        )
        .max_events(max_events)
        // The emulator sends no rate-limit headers when unlimited: skip the slow probing.
        .rate_limit(Some(20000));
    if aggregate {
        config.aggregate(Bucket::Hour)
    } else {
        config
    }
}

async fn run_until_settled(config: Config, expected: u64) -> Arc<RunStats> {
    let stats = Arc::new(RunStats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));
    common::wait_until(Duration::from_secs(90), || {
        stats.delivered.load(Ordering::Relaxed) + stats.already_delivered.load(Ordering::Relaxed)
            >= expected
    })
    .await;
    common::stop_pipeline(stop, run, Duration::from_millis(300)).await;
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_sums_equal_the_events_sums_and_the_unaggregated_run() {
    let seed = rand::random::<u64>();
    eprintln!("stream seed {seed}");
    let n = 3000;
    let events = stream(seed, n);
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 4), ("usage-dlq", 1)]);
    common::produce(&brokers, "usage", 4, &events.payloads).await;
    let dir = tempfile::tempdir().unwrap();

    let faults = FaultSettings {
        drop_rate: 0.05,
        fail_rate: 0.05,
        ..FaultSettings::default()
    };
    let aggregated = emulator(faults).await;
    let config = test_config(
        &brokers,
        "aggregated",
        &aggregated.base_url(),
        &format!("sqlite://{}", dir.path().join("a.db").display()),
        true,
        500,
    );
    let stats = run_until_settled(config.build().unwrap(), n as u64).await;
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);

    let plain = emulator(FaultSettings::default()).await;
    let config = test_config(
        &brokers,
        "plain",
        &plain.base_url(),
        &format!("sqlite://{}", dir.path().join("p.db").display()),
        false,
        500,
    );
    run_until_settled(config.build().unwrap(), n as u64).await;

    let with = record_sums(&aggregated);
    assert_eq!(
        with, events.sums,
        "aggregated sums equal the events' sums exactly"
    );
    assert_eq!(
        record_sums(&plain),
        with,
        "the same sums with and without aggregation"
    );
    let s = aggregated.stats();
    assert_eq!(s.duplicate_keys, 0, "no aggregate stored twice");
    let requests = s.answers(201);
    assert!(
        (requests as usize) < n / 3,
        "{requests} usage records for {n} events"
    );
    // Every record's DueDate is its bucket's start.
    assert!(aggregated.records().iter().all(|r| r.due_date
        == r.due_date
            .duration_trunc(chrono::Duration::hours(1))
            .unwrap()));
    eprintln!(
        "{n} events → {} records aggregated ({} faults: {:?}), {} without",
        s.records,
        s.faults_injected.drop + s.faults_injected.fail,
        s.faults_injected,
        plain.stats().records
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restarts_with_other_batch_cuts_neither_lose_nor_double_count() {
    let seed = rand::random::<u64>();
    eprintln!("stream seed {seed}");
    let n = 4000;
    let events = stream(seed, n);
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 4), ("usage-dlq", 1)]);
    common::produce(&brokers, "usage", 4, &events.payloads).await;

    // Slow enough that kills land mid-run; answers lost after recording, late past the
    // client's timeout, and 5xx.
    let emulator = emulator(FaultSettings {
        drop_rate: 0.05,
        slow_rate: 0.02,
        slow_duration: Duration::from_millis(2500),
        fail_rate: 0.03,
        latency: Duration::from_millis(40),
        ..FaultSettings::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let log = dir.path().join("meterflow.log");
    // Each run cuts batches differently, so a restarted run builds other aggregates over the
    // events the killed run left unsettled.
    let kills = common::kill_and_restart(
        env!("CARGO_BIN_EXE_meterflow"),
        &brokers,
        "killed",
        n,
        &[37, 400, 113, 1000, 61],
        seed,
        dir.path(),
        |max_events| {
            test_config(
                &brokers,
                "killed",
                &emulator.base_url(),
                &ledger,
                true,
                max_events,
            )
            .concurrency(8)
        },
    )
    .await;
    assert_eq!(
        common::committed_total(&brokers, "killed", "usage", 4),
        n as i64,
        "every event settled (log: {})",
        log.display()
    );
    let sums = record_sums(&emulator);
    let s = emulator.stats();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let count = |needle: &str| log_text.lines().filter(|l| l.contains(needle)).count();
    eprintln!(
        "{n} events, {kills} kills, {} records, faults {:?}; earlier aggregates: {} found delivered \
         by reconciliation, {} abandoned (never received), {} delivered per the ledger",
        s.records,
        s.faults_injected,
        count("the earlier aggregate was delivered"),
        count("aggregated anew"),
        count("already delivered in an earlier aggregate"),
    );
    if sums != events.sums {
        let tail: Vec<&str> = log_text.lines().rev().take(40).collect();
        for (key, want) in &events.sums {
            let got = sums.get(key).copied().unwrap_or_default();
            if got != *want {
                eprintln!("{key:?}: delivered {got}, produced {want}");
            }
        }
        panic!("sums differ; log tail:\n{}", tail.join("\n"));
    }
    assert_eq!(s.duplicate_keys, 0, "no aggregate stored twice");
}
