//! `meterflow trace` and `meterflow void` as a user runs them: the meterflow binary, after a
//! real pipeline (mock cluster, billwerk emulator, SQLite or PostgreSQL ledger) did its work.
//! Every answer is checked against what the emulator and the dead-letter topic hold.

use meterflow_testkit as common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use meterflow::ack::ledger::scratch::ScratchDatabase;
use meterflow::ack::ledger::{EventOrigin, Ledger, LedgerStore};
use meterflow::config::builder::{Bucket, ConfigBuilder};
use meterflow::emulator::billwerk::{self, BillwerkEmulator, BillwerkOptions};
use meterflow::event::{DeliveryKey, SourceRef};
use meterflow::pipeline::{self, RunStats};

const CONTRACT: &str = "5cd186af443e551fe8e4f5e1";
const API_CALLS: &str = "5ce53069443e551b9caccc64";
const SECRET: &str = "meterflow-emulator-secret";

/// `meterflow ARGS`: exit code, stdout, stderr.
fn meterflow(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .args(args)
        .env_remove("METERFLOW_CONFIG")
        .output()
        .expect("meterflow runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "a secret in the output of {args:?}"
    );
    eprintln!("$ meterflow {}\n{stdout}{stderr}", args.join(" "));
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn event(id: &str, metric: &str, quantity: &str, contract: Value) -> Vec<u8> {
    let mut e = json!({
        "id": id,
        "metric": metric,
        "quantity": quantity,
        "timestamp": "2026-11-20T10:15:00Z",
        "attributes": { "plan": "starter", "region": "eu-west-1" },
    });
    match contract {
        Value::String(s) if s.len() == 24 => e["contract_id"] = json!(s),
        other => e["contract_external_id"] = other,
    }
    serde_json::to_vec(&e).unwrap()
}

async fn emulator() -> BillwerkEmulator {
    let options = BillwerkOptions {
        // storage_gb's component is not in the catalogue: billwerk answers 422.
        components: vec![API_CALLS.to_string()],
        ..BillwerkOptions::default()
    }
    .with_contract("acme-prod", CONTRACT);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    billwerk::start(options, listener).await.unwrap()
}

fn test_config(
    brokers: &str,
    group: &str,
    base_url: &str,
    ledger: &str,
    aggregate: bool,
) -> ConfigBuilder {
    let config = common::billwerk_config(brokers, group, "usage", "usage-dlq", base_url, ledger)
        .rate_limit(Some(20000));
    if aggregate {
        config.aggregate(Bucket::Hour)
    } else {
        config
    }
}

/// Runs the pipeline in this process until `settled` more events are delivered, found
/// delivered, or dead-lettered; then drains it.
async fn run_pipeline(config: &ConfigBuilder, settled: u64) -> Arc<RunStats> {
    let config = config.build().unwrap();
    let stats = Arc::new(RunStats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));
    let done = common::wait_until(Duration::from_secs(60), || {
        stats.delivered.load(Ordering::Relaxed)
            + stats.already_delivered.load(Ordering::Relaxed)
            + stats.dead_lettered.load(Ordering::Relaxed)
            >= settled
    })
    .await;
    assert!(
        done,
        "pipeline settled {settled} events: {:?}",
        stats.snapshot()
    );
    common::stop_pipeline(stop, run, Duration::from_millis(500)).await;
    stats
}

/// Every dead letter: (partition, offset, reason, source offset).
fn dead_letters(brokers: &str, expected: usize) -> Vec<(i32, i64, String, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", rand::random::<u32>()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&["usage-dlq"]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < expected && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let header = |name: &str| {
                m.headers()
                    .and_then(|hs| {
                        hs.iter().find(|h| h.key == name).map(|h| {
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()
                        })
                    })
                    .unwrap_or_default()
            };
            out.push((
                m.partition(),
                m.offset(),
                header("meterflow.reason"),
                header("meterflow.source.offset"),
            ));
        }
    }
    assert_eq!(out.len(), expected, "dead letters read: {out:?}");
    out
}

fn write_config(dir: &Path, config: &ConfigBuilder) -> String {
    let path = dir.join("meterflow.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    path.display().to_string()
}

/// Delivered, refused by the provider, dead-lettered by meterflow, unknown: each event's
/// answer names what the emulator and the dead-letter topic really hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_tells_delivered_refused_dead_lettered_and_unknown_events_apart() {
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 1), ("usage-dlq", 1)]);
    let billwerk = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let config = test_config(&brokers, "trace", &billwerk.base_url(), &ledger, false);
    let config_path = write_config(dir.path(), &config);

    common::produce(
        &brokers,
        "usage",
        1,
        &[
            event("evt_ok", "api_calls", "2.5", json!(CONTRACT)),
            event("evt_refused", "storage_gb", "1", json!(CONTRACT)),
            event("evt_badmetric", "teleportations", "1", json!(CONTRACT)),
            b"{not json".to_vec(),
        ],
    )
    .await;
    run_pipeline(&config, 4).await;
    let records = billwerk.records();
    assert_eq!(records.len(), 1);
    let letters = dead_letters(&brokers, 3);

    // Delivered: key, the emulator's record id, when, where it came from.
    let (code, text, _) = meterflow(&["trace", "--config", &config_path, "evt_ok"]);
    assert_eq!(code, 0);
    assert!(text.starts_with("event evt_ok: delivered\n"), "{text}");
    assert!(text.contains(&records[0].id), "the record id: {text}");
    assert!(text.contains(DeliveryKey::for_event("evt_ok").as_str()));
    assert!(text.contains("usage partition 0 offset 0"), "{text}");
    assert!(!text.contains("aggregate"), "one event, one record: {text}");
    let (code, out, _) = meterflow(&["trace", "--config", &config_path, "evt_ok", "--json"]);
    assert_eq!(code, 0);
    let v = json_of(&out);
    assert_eq!(v["state"], "delivered");
    assert_eq!(v["delivery"]["receipt"], json!(records[0].id));
    assert_eq!(v["delivery"]["event_count"], 1);
    assert_eq!(v["aggregate"], false);
    assert_eq!(
        v["origin"]["contract"],
        json!(format!("contract:{CONTRACT}"))
    );
    assert!(v["delivery"]["delivered_at"].is_string());

    // Refused by billwerk (422): its answer, and the letter that carries the event.
    let (code, text, _) = meterflow(&["trace", "--config", &config_path, "evt_refused"]);
    assert_eq!(code, 0);
    assert!(
        text.starts_with("event evt_refused: refused by the provider\n"),
        "{text}"
    );
    assert!(text.contains("422"), "billwerk's answer: {text}");
    let refused = letters.iter().find(|l| l.3 == "1").unwrap();
    assert_eq!(refused.2, "provider_rejected");
    let (_, out, _) = meterflow(&["trace", "--config", &config_path, "evt_refused", "--json"]);
    let v = json_of(&out);
    assert_eq!(v["state"], "refused");
    assert_eq!(v["dead_letters"][0]["reason"], "provider_rejected");
    assert_eq!(v["dead_letters"][0]["dead_letter_topic"], "usage-dlq");
    assert_eq!(v["dead_letters"][0]["dead_letter_partition"], refused.0);
    assert_eq!(v["dead_letters"][0]["dead_letter_offset"], refused.1);

    // Dead-lettered by meterflow before any request: reason and the letter's coordinates.
    let bad = letters.iter().find(|l| l.3 == "2").unwrap();
    assert_eq!(bad.2, "unknown_metric");
    let (code, text, _) = meterflow(&["trace", "--config", &config_path, "evt_badmetric"]);
    assert_eq!(code, 0);
    assert!(
        text.starts_with("event evt_badmetric: dead-lettered\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "unknown_metric: usage-dlq partition {} offset {}",
            bad.0, bad.1
        )),
        "{text}"
    );
    assert!(
        text.contains("teleportations"),
        "the reason's detail: {text}"
    );
    assert!(text.contains("usage partition 0 offset 2"), "{text}");

    // Unknown: exit 1, as grep's "no match".
    let (code, text, _) = meterflow(&["trace", "--config", &config_path, "evt_never_sent"]);
    assert_eq!(code, 1);
    assert!(text.contains("unknown to the ledger"), "{text}");
    let (code, out, _) = meterflow(&["trace", "--config", &config_path, "nope", "--json"]);
    assert_eq!(
        (code, json_of(&out)["state"].clone()),
        (1, json!("unknown"))
    );

    // Errors: exit 2.
    let (code, _, err) = meterflow(&["trace", "--config", "/nonexistent.toml", "evt_ok"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = meterflow(&["trace", "--config", &config_path, "--usage-id", "../x"]);
    assert_eq!(code, 2);
    assert!(err.contains("24 hexadecimal"), "{err}");
    let missing = config.clone().ledger_url("sqlite:///nonexistent/ledger.db");
    let missing_path = dir.path().join("missing.toml");
    std::fs::write(&missing_path, missing.to_toml()).unwrap();
    let (code, _, err) = meterflow(&[
        "trace",
        "--config",
        missing_path.to_str().unwrap(),
        "evt_ok",
    ]);
    assert_eq!(code, 2, "a missing ledger is an error, not an empty one");
    assert!(err.contains("no ledger"), "{err}");
}

/// Aggregation: `--usage-id` lists exactly the events summed into each record; voiding one
/// needs `--yes`, deletes the whole record, and a redelivery of its events bills nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_ids_list_the_events_of_each_aggregate_and_voiding_one_sticks() {
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 1), ("usage-dlq", 1)]);
    let billwerk = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let config = test_config(&brokers, "aggregate", &billwerk.base_url(), &ledger, true);
    let config_path = write_config(dir.path(), &config);
    let n = 60;
    let ids: Vec<String> = (0..n).map(|i| format!("evt_agg_{i:03}")).collect();
    let payloads: Vec<Vec<u8>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let contract = if i % 2 == 0 {
                json!(CONTRACT)
            } else {
                json!("acme-prod")
            };
            event(id, "api_calls", "1", contract)
        })
        .collect();
    common::produce(&brokers, "usage", 1, &payloads).await;
    run_pipeline(&config, n as u64).await;
    let records = billwerk.records();
    assert!(records.len() < n, "aggregated: {} records", records.len());

    let mut seen = BTreeSet::new();
    let mut sizes = BTreeMap::new();
    for r in &records {
        let (code, out, _) = meterflow(&[
            "trace",
            "--config",
            &config_path,
            "--usage-id",
            &r.id,
            "--json",
        ]);
        assert_eq!(code, 0);
        let v = json_of(&out);
        assert_eq!(v["state"], "delivered");
        let listed: Vec<String> = serde_json::from_value(v["event_ids"].clone()).unwrap();
        assert_eq!(
            Decimal::from(listed.len()),
            r.quantity,
            "record {} sums one unit per listed event",
            r.id
        );
        for id in &listed {
            assert!(seen.insert(id.clone()), "{id} listed under two records");
        }
        sizes.insert(r.id.clone(), listed);
    }
    assert_eq!(seen, ids.iter().cloned().collect::<BTreeSet<_>>());
    let (big, events) = sizes.iter().max_by_key(|(_, e)| e.len()).unwrap();
    assert!(events.len() > 1);
    let (code, text, _) = meterflow(&["trace", "--config", &config_path, "--usage-id", big]);
    assert_eq!(code, 0);
    assert!(
        text.starts_with(&format!(
            "usage record {big}: delivered, {} events",
            events.len()
        )),
        "{text}"
    );
    let (code, text, _) = meterflow(&["trace", "--config", &config_path, &events[0]]);
    assert_eq!(code, 0);
    assert!(
        text.contains(&format!("one usage record summing {} events", events.len())),
        "{text}"
    );
    assert!(text.contains(big.as_str()));

    // Void: the whole record or nothing, only with --yes.
    let (code, text, _) = meterflow(&["void", "--config", &config_path, "--event-id", &events[0]]);
    assert_eq!(code, 1);
    assert!(
        text.contains(&format!("all {} events", events.len())) && text.contains("--yes"),
        "{text}"
    );
    assert_eq!(
        billwerk.records().len(),
        records.len(),
        "nothing deleted without --yes"
    );
    let (code, text, _) =
        meterflow(&["void", "--config", &config_path, "--usage-id", big, "--yes"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("voided"), "{text}");
    assert!(billwerk.records().iter().all(|r| &r.id != big));
    let (code, out, _) = meterflow(&[
        "trace",
        "--config",
        &config_path,
        "--usage-id",
        big,
        "--json",
    ]);
    assert_eq!(code, 0);
    assert_eq!(json_of(&out)["state"], "voided");
    let (_, out, _) = meterflow(&["trace", "--config", &config_path, &events[1], "--json"]);
    assert_eq!(json_of(&out)["state"], "voided");

    // Every event comes back (a producer replays them all): nothing is billed again.
    let left = billwerk.records();
    common::produce(&brokers, "usage", 1, &payloads).await;
    let stats = run_pipeline(&config, n as u64).await;
    assert_eq!(stats.already_delivered.load(Ordering::Relaxed), n as u64);
    assert_eq!(
        billwerk.records(),
        left,
        "the voided events were not billed again"
    );
}

/// Voiding one event's record: dry run, void, a second void, billed usage refused (with what
/// to do instead), `--rebill` (billed again when redelivered), bad ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn void_deletes_unbilled_usage_once_and_refuses_billed_usage() {
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 1), ("usage-dlq", 1)]);
    let billwerk = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let config = test_config(&brokers, "void", &billwerk.base_url(), &ledger, false);
    let config_path = write_config(dir.path(), &config);
    let a = event("evt_a", "api_calls", "3", json!("acme-prod"));
    let b = event("evt_b", "api_calls", "4", json!(CONTRACT));
    let c = event("evt_c", "api_calls", "5", json!(CONTRACT));
    common::produce(&brokers, "usage", 1, &[a.clone(), b, c.clone()]).await;
    run_pipeline(&config, 3).await;
    let record_of = |id: &str| {
        let key = DeliveryKey::for_event(id);
        billwerk
            .records()
            .into_iter()
            .find(|r| r.memo.as_deref().is_some_and(|m| m.contains(key.as_str())))
    };
    let record_a = record_of("evt_a").expect("evt_a billed");

    let (code, text, _) = meterflow(&[
        "void",
        "--config",
        &config_path,
        "--event-id",
        "evt_a",
        "--dry-run",
    ]);
    assert_eq!(code, 0);
    assert!(
        text.contains("dry run") && text.contains(&record_a.id),
        "{text}"
    );
    assert!(text.contains("ExternalId \"acme-prod\""), "{text}");
    assert!(record_of("evt_a").is_some(), "a dry run deletes nothing");

    let (code, text, _) = meterflow(&["void", "--config", &config_path, "--event-id", "evt_a"]);
    assert_eq!(code, 0, "{text}");
    assert!(record_of("evt_a").is_none(), "deleted at billwerk");
    let (code, text, _) = meterflow(&["trace", "--config", &config_path, "evt_a"]);
    assert_eq!(code, 0);
    assert!(text.starts_with("event evt_a: voided\n"), "{text}");
    assert!(
        text.contains(&format!("of contract {CONTRACT}")),
        "the resolved contract: {text}"
    );
    let (code, text, _) = meterflow(&["void", "--config", &config_path, "--event-id", "evt_a"]);
    assert_eq!(code, 1);
    assert!(text.contains("already voided"), "{text}");

    // Billed (a billing run in the emulator): billwerk refuses; the ledger is unchanged.
    let record_b = record_of("evt_b").unwrap();
    let marked = reqwest::Client::new()
        .post(format!(
            "{}/_emulator/usage/{}/billed",
            billwerk.base_url(),
            record_b.id
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(marked.status(), 204);
    let (code, text, _) =
        meterflow(&["void", "--config", &config_path, "--usage-id", &record_b.id]);
    assert_eq!(code, 1);
    assert!(
        text.contains("already billed") && text.contains("credit in billwerk"),
        "{text}"
    );
    assert!(record_of("evt_b").is_some());
    let (_, out, _) = meterflow(&["trace", "--config", &config_path, "evt_b", "--json"]);
    assert_eq!(json_of(&out)["state"], "delivered");

    // --rebill: deleted, and billed again once the event comes back.
    let (code, text, _) = meterflow(&[
        "void",
        "--config",
        &config_path,
        "--event-id",
        "evt_c",
        "--rebill",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(record_of("evt_c").is_none());

    common::produce(&brokers, "usage", 1, &[a, c]).await;
    run_pipeline(&config, 2).await;
    assert!(record_of("evt_a").is_none(), "voided: not billed again");
    let again = record_of("evt_c").expect("voided with --rebill: billed again");
    assert_eq!(again.quantity, Decimal::from(5));
    let (_, out, _) = meterflow(&["trace", "--config", &config_path, "evt_c", "--json"]);
    let v = json_of(&out);
    assert_eq!(v["state"], "delivered");
    assert_eq!(v["delivery"]["receipt"], json!(again.id));
    assert_eq!(v["voids"][0]["rebill"], true);

    // Ids from the user are checked before they reach a path.
    let (code, _, err) = meterflow(&["void", "--config", &config_path, "--usage-id", "../../x"]);
    assert_eq!(code, 2);
    assert!(err.contains("24 hexadecimal"), "{err}");
    let (code, _, err) = meterflow(&[
        "void",
        "--config",
        &config_path,
        "--event-id",
        "evt_b",
        "--contract",
        "x/y",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("24 hexadecimal"), "{err}");
    let (code, _, err) = meterflow(&[
        "void",
        "--config",
        &config_path,
        "--event-id",
        "evt_b",
        "--contract",
        "5cd186af443e551fe8e4f5ff",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("differs"), "{err}");
    assert!(record_of("evt_b").is_some());
    let (code, text, _) = meterflow(&["void", "--config", &config_path, "--event-id", "evt_never"]);
    assert_eq!(code, 1, "{text}");
}

/// The schema of an earlier release (no origins, no dead-letter details): opened by
/// `meterflow trace`, the ledger gains the new columns in place and its old entries still
/// answer. Then a claim whose request is in flight shows its since, source and claimant.
async fn old_ledger_is_migrated_and_shows_in_flight_claims(url: &str, dir: &Path) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    for statement in [
        "CREATE TABLE meterflow_deliveries (delivery_key TEXT PRIMARY KEY, state TEXT NOT NULL,
            receipt TEXT, event_count BIGINT NOT NULL, first_sent_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL)",
        "CREATE TABLE meterflow_dead_letters (topic TEXT NOT NULL, source_partition BIGINT NOT NULL,
            source_offset BIGINT NOT NULL, written_at BIGINT NOT NULL,
            PRIMARY KEY (topic, source_partition, source_offset))",
        "CREATE TABLE meterflow_event_deliveries (event_key TEXT PRIMARY KEY,
            delivery_key TEXT NOT NULL, updated_at BIGINT NOT NULL)",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let old_key = DeliveryKey::for_event("evt_old");
    sqlx::query(
        "INSERT INTO meterflow_deliveries VALUES ($1, 'delivered', '6b0e000000000000000000aa', 1, 1000, 2000)",
    )
    .bind(old_key.as_str())
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let config = test_config("127.0.0.1:9", "g", "http://127.0.0.1:9", url, false);
    let config_path = write_config(dir, &config);
    let (code, text, _) = meterflow(&["trace", "--config", &config_path, "evt_old"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("event evt_old: delivered\n"), "{text}");
    assert!(text.contains("6b0e000000000000000000aa"), "{text}");
    // Opening it again (a second process) leaves it as it is.
    let (code, _, _) = meterflow(&["trace", "--config", &config_path, "evt_old"]);
    assert_eq!(code, 0);

    let store = LedgerStore::connect(url).await.unwrap();
    let ledger = Ledger::start(store, Duration::from_secs(30));
    let key = DeliveryKey::for_event("evt_flying");
    let origin = EventOrigin {
        event_id: "evt_flying".into(),
        source: SourceRef {
            topic: "usage".into(),
            partition: 3,
            offset: 77,
        },
        customer: format!("contract:{CONTRACT}"),
        component_id: API_CALLS.into(),
        quantity: Decimal::new(15, 1),
        digest: "d".into(),
    };
    ledger
        .claim_checked(&key, 1, vec![origin])
        .await
        .unwrap()
        .unwrap();
    let (code, text, _) = meterflow(&["trace", "--config", &config_path, "evt_flying"]);
    assert_eq!(code, 0);
    assert!(text.starts_with("event evt_flying: in flight\n"), "{text}");
    assert!(text.contains("sending since"), "{text}");
    assert!(text.contains("usage partition 3 offset 77"), "{text}");
    assert!(
        text.contains(&format!("pid {}", std::process::id())),
        "the claimant: {text}"
    );
    let (_, out, _) = meterflow(&["trace", "--config", &config_path, "evt_flying", "--json"]);
    let v = json_of(&out);
    assert_eq!(v["state"], "in_flight");
    assert_eq!(v["origin"]["partition"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sqlite_ledger_of_an_earlier_release_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    std::fs::File::create(&path).unwrap();
    let url = format!("sqlite://{}", path.display());
    old_ledger_is_migrated_and_shows_in_flight_claims(&url, dir.path()).await;

    // Processes opening an old ledger at once (the service and a trace): every one migrates
    // or finds it migrated.
    let again = dir.path().join("old2.db");
    std::fs::File::create(&again).unwrap();
    let url = format!("sqlite://{}", again.display());
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    sqlx::query(
        "CREATE TABLE meterflow_dead_letters (topic TEXT NOT NULL, source_partition BIGINT NOT NULL,
            source_offset BIGINT NOT NULL, written_at BIGINT NOT NULL,
            PRIMARY KEY (topic, source_partition, source_offset))",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let opens = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { LedgerStore::connect(&url).await.map(|_| ()) })
    });
    for open in futures::future::join_all(opens).await {
        open.unwrap().expect("every process opens the old ledger");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_ledger_of_an_earlier_release_is_migrated_in_place() {
    let Some(db) = ScratchDatabase::for_test().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    old_ledger_is_migrated_and_shows_in_flight_claims(&db.url, dir.path()).await;
}

/// `meterflow audit` against the emulator: agreement first; then a record billed twice, one
/// with a key the ledger never wrote, and one deleted behind meterflow's back are each named,
/// the totals differ exactly, and the exit code says so. The listing pages (2 records a page)
/// under a 4-requests-a-second limit without giving up: its calls go through the limiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_names_what_is_missing_unknown_or_double_and_compares_exact_totals() {
    use meterflow::emulator::ratelimit::RateLimitSettings;
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 1), ("usage-dlq", 1)]);
    let billwerk = common::billwerk_emulator(
        BillwerkOptions::default()
            .with_contract("acme-prod", CONTRACT)
            .with_list_page_cap(2),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let config =
        test_config(&brokers, "audit", &billwerk.base_url(), &ledger, false).rate_limit(None);
    let config_path = write_config(dir.path(), &config);
    let quantities = ["0.1", "0.2", "1.000001", "7", "12345678901234567.1234567"];
    let mut payloads = Vec::new();
    let mut expected = Decimal::ZERO;
    for (i, q) in quantities.iter().enumerate() {
        let contract = if i % 2 == 0 {
            json!(CONTRACT)
        } else {
            json!("acme-prod")
        };
        payloads.push(event(&format!("evt_audit_{i}"), "api_calls", q, contract));
        expected += q.parse::<Decimal>().unwrap();
    }
    common::produce(&brokers, "usage", 1, &payloads).await;
    run_pipeline(&config, quantities.len() as u64).await;
    assert_eq!(billwerk.records().len(), quantities.len());

    let from = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let until = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let audit = |json: bool| {
        let mut args = vec![
            "audit",
            "--config",
            &config_path,
            "--contract",
            CONTRACT,
            "--from",
            &from,
            "--until",
            &until,
        ];
        if json {
            args.push("--json");
        }
        meterflow(&args)
    };
    // A delivery from before the ledger kept contracts: told, not counted, not a difference.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&ledger).await.unwrap();
    sqlx::query(
        "INSERT INTO meterflow_deliveries (delivery_key, state, receipt, event_count, first_sent_at, updated_at)
         VALUES ('mf1-legacy', 'delivered', '6b0e000000000000000000ff', 1, $1, $1)",
    )
    .bind(chrono::Utc::now().timestamp_millis())
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    billwerk
        .set_limit(RateLimitSettings::per_window(4, Duration::from_secs(1)))
        .unwrap();
    let started = std::time::Instant::now();
    let (code, text, _) = audit(false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("note: 1 deliveries in the period"), "{text}");
    assert!(text.contains("OK: billwerk and the ledger agree"), "{text}");
    assert!(
        text.contains(&expected.to_string()),
        "the exact total {expected}: {text}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "4 pages and a contract read at 4 requests a second are paced"
    );
    billwerk.set_limit(RateLimitSettings::default()).unwrap();

    // Break it three ways behind meterflow's back.
    let http = reqwest::Client::new();
    let token = billwerk.provider().issue_token();
    let usage_url = format!("{}/api/v1/contracts/{CONTRACT}/usage", billwerk.base_url());
    let key_0 = DeliveryKey::for_event("evt_audit_0");
    let stranger = "mf1-00000000000000000000000000000abc";
    for (memo, q) in [(key_0.as_str(), "0.1"), (stranger, "2")] {
        let created = http
            .post(&usage_url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"ComponentId":"{API_CALLS}","Quantity":{q},"Memo":"{memo}"}}"#
            ))
            .send()
            .await
            .unwrap();
        assert!(created.status().is_success());
    }
    let key_1 = DeliveryKey::for_event("evt_audit_1");
    let record_1 = billwerk
        .records()
        .into_iter()
        .find(|r| r.memo.as_deref() == Some(key_1.as_str()))
        .unwrap();
    let deleted = http
        .delete(format!("{usage_url}/{}", record_1.id))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);

    let (code, out, _) = audit(true);
    assert_eq!(code, 1, "{out}");
    let v = json_of(&out);
    assert_eq!(v["agree"], false);
    assert_eq!(
        v["billed_more_than_once"][0]["delivery_key"],
        key_0.as_str()
    );
    assert_eq!(
        v["billed_more_than_once"][0]["usage_ids"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let unknown: Vec<&str> = v["unknown_to_ledger"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["delivery_key"].as_str().unwrap())
        .collect();
    assert_eq!(
        unknown.len(),
        2,
        "the stranger and the second record of evt_audit_0: {unknown:?}"
    );
    assert!(unknown.contains(&stranger) && unknown.contains(&key_0.as_str()));
    assert_eq!(v["missing_at_billwerk"][0]["delivery_key"], key_1.as_str());
    assert_eq!(v["missing_at_billwerk"][0]["usage_id"], json!(record_1.id));
    let totals = &v["totals"][0];
    assert_eq!(totals["component_id"], API_CALLS);
    assert_eq!(totals["ledger"], json!(expected.to_string()));
    let billwerk_total = expected - Decimal::new(2, 1) + Decimal::new(1, 1) + Decimal::from(2);
    assert_eq!(totals["billwerk"], json!(billwerk_total.to_string()));

    let (code, text, _) = audit(false);
    assert_eq!(code, 1);
    assert!(
        text.contains("DIFFERS") && text.contains("DIFFERENT"),
        "{text}"
    );

    // Not billwerk: said clearly, exit 2.
    let rails = common::billingrails_config(
        &brokers,
        "g",
        "usage",
        "usage-dlq",
        "http://127.0.0.1:9/v1",
        &ledger,
    );
    let rails_path = dir.path().join("rails.toml");
    std::fs::write(&rails_path, rails.to_toml()).unwrap();
    let (code, _, err) = meterflow(&[
        "audit",
        "--config",
        rails_path.to_str().unwrap(),
        "--contract",
        CONTRACT,
        "--from",
        &from,
        "--until",
        &until,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("Billingrails has no endpoint"), "{err}");
    let (code, _, err) = meterflow(&[
        "void",
        "--config",
        rails_path.to_str().unwrap(),
        "--event-id",
        "evt_audit_0",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("billwerk only"), "{err}");
    let (code, _, err) = meterflow(&[
        "audit",
        "--config",
        &config_path,
        "--contract",
        "acme-prod",
        "--from",
        &from,
        "--until",
        &until,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("24 hexadecimal"), "{err}");
}

/// The same commands on a PostgreSQL ledger (the SQL is one dialect for both; this runs each
/// read and write of trace, void and audit against PostgreSQL once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_void_and_audit_work_on_a_postgres_ledger() {
    let Some(db) = ScratchDatabase::for_test().await else {
        return;
    };
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 1), ("usage-dlq", 1)]);
    let billwerk = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(&brokers, "pg", &billwerk.base_url(), &db.url, false);
    let config_path = write_config(dir.path(), &config);
    common::produce(
        &brokers,
        "usage",
        1,
        &[
            event("evt_pg_1", "api_calls", "1.25", json!(CONTRACT)),
            event("evt_pg_2", "api_calls", "2", json!("acme-prod")),
            event("evt_pg_bad", "storage_gb", "1", json!(CONTRACT)),
        ],
    )
    .await;
    run_pipeline(&config, 3).await;
    let records = billwerk.records();
    assert_eq!(records.len(), 2);

    let (code, out, _) = meterflow(&["trace", "--config", &config_path, "evt_pg_bad", "--json"]);
    assert_eq!(code, 0);
    let v = json_of(&out);
    assert_eq!(v["state"], "refused");
    assert_eq!(v["dead_letters"][0]["reason"], "provider_rejected");

    let from = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let until = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let audit = || {
        meterflow(&[
            "audit",
            "--config",
            &config_path,
            "--contract",
            CONTRACT,
            "--from",
            &from,
            "--until",
            &until,
            "--json",
        ])
    };
    let (code, out, _) = audit();
    assert_eq!(code, 0, "{out}");
    assert_eq!(json_of(&out)["totals"][0]["ledger"], "3.25");
    assert_eq!(json_of(&out)["unattributed_deliveries"], 0);

    let first = &records[0];
    let (code, out, _) = meterflow(&[
        "trace",
        "--config",
        &config_path,
        "--usage-id",
        &first.id,
        "--json",
    ]);
    assert_eq!(code, 0);
    let listed = json_of(&out)["event_ids"].clone();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let (code, text, _) = meterflow(&["void", "--config", &config_path, "--usage-id", &first.id]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(billwerk.records().len(), 1);
    let (_, out, _) = meterflow(&[
        "trace",
        "--config",
        &config_path,
        listed[0].as_str().unwrap(),
        "--json",
    ]);
    assert_eq!(json_of(&out)["state"], "voided");
    // The voided delivery is no longer the ledger's to count: both sides agree again.
    let (code, out, _) = audit();
    assert_eq!(code, 0, "{out}");
}
