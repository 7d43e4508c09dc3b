//! The timestamp window (`[input] max_future`, `max_age`) through the real pipeline on
//! librdkafka's mock cluster and the billwerk emulator: events outside it are dead-lettered with
//! reason `timestamp_out_of_window` and a detail naming the bound, the others are billed.

use meterflow_testkit as common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde_json::json;

use meterflow::ack::deadletter::headers;
use meterflow::emulator::billwerk::BillwerkOptions;
use meterflow::pipeline::{self, RunStats};

fn event(id: &str, timestamp: chrono::DateTime<Utc>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id, "contract_id": "5cd186af443e551fe8e4f5dd", "metric": "api_calls",
        "quantity": "1",
        "timestamp": timestamp.to_rfc3339_opts(SecondsFormat::Secs, true),
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_outside_the_window_are_dead_lettered_and_the_others_billed() {
    let (_cluster, brokers) = common::mock_cluster(&[("usage", 1), ("usage-dlq", 1)]);
    let emulator = common::billwerk_emulator(BillwerkOptions::default()).await;

    let now = Utc::now();
    let days = |n: i64| chrono::Duration::days(n);
    let minutes = |n: i64| chrono::Duration::minutes(n);
    // (id, timestamp, billed?)
    let cases = [
        ("an_hour_ago", now - minutes(60), true),
        ("too_old", now - days(40), false),
        ("thirty_days_ago", now - days(30), true),
        ("a_minute_ahead", now + minutes(1), true),
        ("an_hour_ahead", now + minutes(60), false),
    ];
    let payloads: Vec<Vec<u8>> = cases.iter().map(|(id, t, _)| event(id, *t)).collect();
    common::produce(&brokers, "usage", 1, &payloads).await;

    // The shared test config turns the age bound off (its events carry fixed dates): this test
    // runs with the defaults, set explicitly.
    let config = common::billwerk_config(
        &brokers,
        "meterflow-window",
        "usage",
        "usage-dlq",
        &emulator.base_url(),
        "none",
    );
    assert_eq!(config.build().unwrap().input.max_age, Duration::ZERO);
    let config = config
        .max_age(Duration::from_secs(35 * 86_400))
        .max_future(Duration::from_secs(5 * 60))
        .build()
        .unwrap();
    assert_eq!(config.input.max_age, Duration::from_secs(35 * 86_400));

    let stats = Arc::new(RunStats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));
    let settled = common::wait_until(Duration::from_secs(30), || {
        stats.dead_lettered.load(Ordering::Relaxed) == 2 && emulator.records().len() == 3
    })
    .await;
    common::stop_pipeline(stop, run, Duration::from_millis(300)).await;
    assert!(
        settled,
        "dead-lettered {}, billed {}",
        stats.dead_lettered.load(Ordering::Relaxed),
        emulator.records().len()
    );

    let billed: Vec<String> = {
        let mut due_dates: Vec<String> = emulator
            .records()
            .iter()
            .map(|r| r.due_date.to_rfc3339_opts(SecondsFormat::Secs, true))
            .collect();
        due_dates.sort();
        due_dates
    };
    let mut expected: Vec<String> = cases
        .iter()
        .filter(|(_, _, billed)| *billed)
        .map(|(_, t, _)| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .collect();
    expected.sort();
    assert_eq!(billed, expected, "the events inside the window, billed");

    let letters = common::read_topic(&brokers, "usage-dlq", 2, Duration::from_secs(10));
    assert_eq!(letters.len(), 2);
    let by_offset: BTreeMap<String, &common::ReadDeadLetter> = letters
        .iter()
        .map(|l| (l.headers[headers::SOURCE_OFFSET].clone(), l))
        .collect();
    let old = by_offset["1"];
    assert_eq!(old.reason(), "timestamp_out_of_window");
    assert_eq!(old.payload, payloads[1], "the original bytes");
    let detail = &old.headers[headers::DETAIL];
    assert!(
        detail.contains("is older than input.max_age (35d)") && detail.contains("it was 40d"),
        "{detail}"
    );
    let ahead = by_offset["4"];
    assert_eq!(ahead.reason(), "timestamp_out_of_window");
    let detail = &ahead.headers[headers::DETAIL];
    assert!(
        detail.contains("is more than input.max_future (5m) ahead"),
        "{detail}"
    );
    assert_eq!(
        common::committed_total(&brokers, "meterflow-window", "usage", 1),
        5,
        "every offset settled"
    );
}
