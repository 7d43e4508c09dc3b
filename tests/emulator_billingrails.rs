//! `meterflow emulate billingrails` through real HTTP on 127.0.0.1: auth, ingest, all-or-nothing
//! batches, per-event dedupe, the `Idempotency-Key` header, the documented bodies, faults.

use std::time::Duration;

use meterflow::emulator::billingrails::{self, BillingrailsEmulator, BillingrailsOptions};
use meterflow::emulator::{FaultSettings, RateLimitSettings};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn start(options: BillingrailsOptions) -> BillingrailsEmulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    billingrails::start(options, listener).await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn ingest_url(emulator: &BillingrailsEmulator) -> String {
    format!("{}/v1/events/ingest", emulator.base_url())
}

fn batch_url(emulator: &BillingrailsEmulator) -> String {
    format!("{}/v1/events/batch", emulator.base_url())
}

fn post(url: &str) -> reqwest::RequestBuilder {
    client()
        .post(url)
        .bearer_auth(billingrails::DEFAULT_API_KEY)
}

fn event(key: &str) -> Value {
    json!({
        "event_name": "api_call",
        "properties": { "billingrails_account_id": "acc_1", "value": 1 },
        "idempotency_key": key,
        "timestamp": "2026-01-01T10:00:00Z",
    })
}

/// `(status, error.code, error.details)` of an error answer.
async fn error_of(response: reqwest::Response) -> (StatusCode, String, Vec<Value>) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    let error = &body["error"];
    assert!(error["type"].is_string(), "{body}");
    assert!(error["message"].is_string(), "{body}");
    let details = error["details"].as_array().cloned().unwrap_or_default();
    (status, error["code"].as_str().unwrap().to_string(), details)
}

fn detail_fields(details: &[Value]) -> Vec<String> {
    details
        .iter()
        .map(|detail| {
            assert!(detail["message"].is_string());
            detail["field"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test]
async fn requests_without_the_api_key_answer_401_with_the_documented_body() {
    let emulator = start(BillingrailsOptions::default()).await;
    let missing = client()
        .post(ingest_url(&emulator))
        .json(&event("k"))
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(missing).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(code, "unauthorized");
    let wrong = client()
        .post(ingest_url(&emulator))
        .bearer_auth("br_test_wrong")
        .json(&event("k"))
        .send()
        .await
        .unwrap();
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    assert!(emulator.records().is_empty());
}

#[tokio::test]
async fn an_ingested_event_is_queued_and_stored_exactly() {
    let emulator = start(BillingrailsOptions::default()).await;
    let response = post(&ingest_url(&emulator))
        .header("content-type", "application/json")
        .body(r#"{"event_name":"api_call","properties":{"billingrails_account_id":"acc_1","value":0.10},"idempotency_key":"k1","timestamp":"2026-01-01T10:00:00+02:00"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({ "message": "Event queued for processing" }));
    let records = emulator.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].event_name, "api_call");
    assert_eq!(records[0].idempotency_key.as_deref(), Some("k1"));
    assert_eq!(
        records[0].properties["value"].to_string(),
        "0.10",
        "exact decimal text"
    );
    assert_eq!(
        records[0].timestamp.to_rfc3339(),
        "2026-01-01T08:00:00+00:00"
    );
}

#[tokio::test]
async fn a_batch_is_stored_whole_or_refused_whole_with_details() {
    let emulator = start(BillingrailsOptions::default()).await;
    let good = post(&batch_url(&emulator))
        .json(&json!({ "events": [event("a"), event("b"), event("c")] }))
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), StatusCode::ACCEPTED);
    assert_eq!(emulator.records().len(), 3);

    let mut late = event("e");
    late["timestamp"] = json!("not a time");
    let bad = post(&batch_url(&emulator))
        .json(&json!({ "events": [event("d"), late, event("f"), { "properties": {} }] }))
        .send()
        .await
        .unwrap();
    let (status, code, details) = error_of(bad).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(code, "validation_failed");
    assert_eq!(
        detail_fields(&details),
        ["events[1].timestamp", "events[3].event_name"]
    );
    assert_eq!(
        emulator.records().len(),
        3,
        "nothing of the refused batch was stored"
    );

    let too_many: Vec<Value> = (0..101).map(|i| event(&format!("many-{i}"))).collect();
    let oversized = post(&batch_url(&emulator))
        .json(&json!({ "events": too_many }))
        .send()
        .await
        .unwrap();
    let (status, _, details) = error_of(oversized).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(detail_fields(&details), ["events"]);

    let hundred: Vec<Value> = (0..100).map(|i| event(&format!("ok-{i}"))).collect();
    let full = post(&batch_url(&emulator))
        .json(&json!({ "events": hundred }))
        .send()
        .await
        .unwrap();
    assert_eq!(full.status(), StatusCode::ACCEPTED);
    assert_eq!(emulator.records().len(), 103);
}

#[tokio::test]
async fn invalid_json_and_invalid_events_are_refused() {
    let emulator = start(BillingrailsOptions {
        required_properties: vec!["billingrails_account_id".into()],
        ..BillingrailsOptions::default()
    })
    .await;
    let not_json = post(&ingest_url(&emulator))
        .header("content-type", "application/json")
        .body("{\"event_name\":")
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(not_json).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(code, "invalid_json");

    let unmapped = post(&ingest_url(&emulator))
        .json(&json!({ "event_name": "api_call", "properties": { "value": 1 } }))
        .send()
        .await
        .unwrap();
    let (status, _, details) = error_of(unmapped).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        detail_fields(&details),
        ["properties.billingrails_account_id"]
    );
    assert!(emulator.records().is_empty());
}

#[tokio::test]
async fn a_repeated_event_idempotency_key_is_accepted_but_stored_once() {
    let emulator = start(BillingrailsOptions::default()).await;
    for _ in 0..2 {
        let response = post(&ingest_url(&emulator))
            .json(&event("same"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let batch = post(&batch_url(&emulator))
        .json(&json!({ "events": [event("same"), event("new"), event("new")] }))
        .send()
        .await
        .unwrap();
    assert_eq!(batch.status(), StatusCode::ACCEPTED);
    let stats = emulator.stats();
    assert_eq!(stats.records, 2);
    assert_eq!(stats.duplicate_events_ignored, 3);
    assert_eq!(stats.duplicate_keys, 0, "the server deduplicated");
    assert_eq!(stats.records_per_delivery_key["same"], 1);
}

#[tokio::test]
async fn the_idempotency_key_header_replays_and_refuses_another_body() {
    let emulator = start(BillingrailsOptions::default()).await;
    // Events without their own key: only the header protects them.
    let body = json!({ "events": [{ "event_name": "api_call" }, { "event_name": "api_call" }] });
    let first = post(&batch_url(&emulator))
        .header("Idempotency-Key", "req-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert_eq!(first.headers().get("idempotent-replayed"), None);
    let first_body = first.text().await.unwrap();

    let replay = post(&batch_url(&emulator))
        .header("Idempotency-Key", "req-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::ACCEPTED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.text().await.unwrap(), first_body);
    assert_eq!(emulator.records().len(), 2, "the replay stored nothing");

    let other_body = post(&batch_url(&emulator))
        .header("Idempotency-Key", "req-1")
        .json(&json!({ "events": [{ "event_name": "other" }] }))
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(other_body).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(code, "idempotency_key_reused");

    let too_long = post(&ingest_url(&emulator))
        .header("Idempotency-Key", "k".repeat(181))
        .json(&event("x"))
        .send()
        .await
        .unwrap();
    let (status, _, details) = error_of(too_long).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(detail_fields(&details), ["Idempotency-Key"]);
    let longest = post(&ingest_url(&emulator))
        .header("Idempotency-Key", "k".repeat(180))
        .json(&event("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(longest.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_duplicate_while_the_first_is_in_flight_answers_409() {
    let emulator = start(BillingrailsOptions::default().with_faults(FaultSettings {
        slow_rate: 1.0,
        slow_duration: Duration::from_secs(2),
        ..FaultSettings::default()
    }))
    .await;
    let body = json!({ "event_name": "api_call" });
    let first = tokio::spawn(
        post(&ingest_url(&emulator))
            .header("Idempotency-Key", "req-slow")
            .json(&body)
            .send(),
    );
    // Stored before the slow answer: wait until the first request got that far.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while emulator.records().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let concurrent = post(&ingest_url(&emulator))
        .header("Idempotency-Key", "req-slow")
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(concurrent).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(code, "idempotency_key_in_use");

    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    emulator.set_faults(FaultSettings::default()).unwrap();
    let after = post(&ingest_url(&emulator))
        .header("Idempotency-Key", "req-slow")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), StatusCode::ACCEPTED);
    assert_eq!(after.headers()["idempotent-replayed"], "true");
    assert_eq!(emulator.records().len(), 1);
}

#[tokio::test]
async fn a_dropped_connection_stores_the_events_and_a_keyed_retry_is_replayed() {
    let emulator = start(BillingrailsOptions::default().with_faults(FaultSettings {
        drop_rate: 1.0,
        ..FaultSettings::default()
    }))
    .await;
    let body = json!({ "event_name": "api_call" });
    let error = post(&ingest_url(&emulator))
        .header("Idempotency-Key", "req-drop")
        .json(&body)
        .send()
        .await
        .unwrap_err();
    assert!(!error.is_timeout(), "{error:?}");
    assert!(error.status().is_none(), "{error:?}");
    assert_eq!(emulator.records().len(), 1);

    emulator.set_faults(FaultSettings::default()).unwrap();
    let retry = post(&ingest_url(&emulator))
        .header("Idempotency-Key", "req-drop")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::ACCEPTED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(emulator.records().len(), 1, "the retry did not store again");
    assert_eq!(emulator.stats().faults_injected.drop, 1);
}

#[tokio::test]
async fn failures_answer_5xx_store_nothing_and_keep_the_key_free() {
    let emulator = start(BillingrailsOptions::default().with_faults(FaultSettings {
        fail_rate: 1.0,
        ..FaultSettings::default()
    }))
    .await;
    for _ in 0..4 {
        let response = post(&ingest_url(&emulator))
            .header("Idempotency-Key", "req-fail")
            .json(&event("k"))
            .send()
            .await
            .unwrap();
        assert!([500, 502, 503].contains(&response.status().as_u16()));
    }
    assert!(emulator.records().is_empty());
    emulator.set_faults(FaultSettings::default()).unwrap();
    let retry = post(&ingest_url(&emulator))
        .header("Idempotency-Key", "req-fail")
        .json(&event("k"))
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::ACCEPTED);
    assert_eq!(retry.headers().get("idempotent-replayed"), None);
}

#[tokio::test]
async fn rate_limited_requests_get_the_documented_429_body() {
    let emulator = start(
        BillingrailsOptions::default().with_limit(RateLimitSettings {
            retry_after: true,
            ..RateLimitSettings::per_window(1, Duration::from_secs(60))
        }),
    )
    .await;
    let admitted = post(&ingest_url(&emulator))
        .json(&event("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(admitted.status(), StatusCode::ACCEPTED);
    assert_eq!(admitted.headers()["x-ratelimit-remaining"], "0");
    let refused = post(&ingest_url(&emulator))
        .json(&event("b"))
        .send()
        .await
        .unwrap();
    assert!(refused.headers().get("retry-after").is_some());
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "request_error");
    assert_eq!(body["error"]["code"], "too_many_requests");
    assert!(body["error"]["message"].is_string());
    assert_eq!(emulator.stats().rate_limited, 1);
    assert_eq!(emulator.records().len(), 1);
}

#[tokio::test]
async fn without_error_details_a_refused_batch_names_no_event() {
    let emulator = start(BillingrailsOptions {
        required_properties: vec!["region".into()],
        error_details: false,
        ..BillingrailsOptions::default()
    })
    .await;
    let response = post(&batch_url(&emulator))
        .json(&json!({ "events": [event("a"), event("b")] }))
        .send()
        .await
        .unwrap();
    let (status, code, details) = error_of(response).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(code, "validation_failed");
    assert!(details.is_empty(), "{details:?}");
    assert!(emulator.records().is_empty());
}

#[tokio::test]
async fn the_path_prefix_is_configurable_and_legacy_paths_are_served() {
    let emulator = start(BillingrailsOptions {
        path_prefix: "/api/v2/".into(),
        ..BillingrailsOptions::default()
    })
    .await;
    let base = emulator.base_url();
    for path in ["/api/v2/events/ingest", "/api/v2/biller/events/ingest"] {
        let response = post(&format!("{base}{path}"))
            .json(&event(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{path}");
    }
    let legacy_batch = post(&format!("{base}/api/v2/biller/events/batch"))
        .json(&json!({ "events": [event("b")] }))
        .send()
        .await
        .unwrap();
    assert_eq!(legacy_batch.status(), StatusCode::ACCEPTED);
    let default_path = post(&format!("{base}/v1/events/ingest"))
        .json(&event("x"))
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(default_path).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(code, "not_found");
    assert_eq!(emulator.records().len(), 3);
}

#[tokio::test]
async fn inspection_and_reset() {
    let emulator = start(BillingrailsOptions::default()).await;
    post(&ingest_url(&emulator))
        .header("Idempotency-Key", "req-1")
        .json(&event("k1"))
        .send()
        .await
        .unwrap();
    post(&ingest_url(&emulator))
        .json(&event("k1"))
        .send()
        .await
        .unwrap();
    let base = emulator.base_url();
    let records: Value = client()
        .get(format!("{base}/_emulator/records"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(records.as_array().unwrap().len(), 1);
    assert_eq!(records[0]["idempotency_key"], "k1");
    assert_eq!(records[0]["properties"]["billingrails_account_id"], "acc_1");
    assert!(records[0]["created_at"].is_string());
    let stats: Value = client()
        .get(format!("{base}/_emulator/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["answers_by_status"]["202"], 2);
    assert_eq!(stats["duplicate_events_ignored"], 1);
    assert_eq!(stats["records"], 1);

    let reset = client()
        .post(format!("{base}/_emulator/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), StatusCode::NO_CONTENT);
    assert!(emulator.records().is_empty());
    assert_eq!(emulator.stats().duplicate_events_ignored, 0);
    // The Idempotency-Key cache was cleared too: the same request is processed afresh.
    let again = post(&ingest_url(&emulator))
        .header("Idempotency-Key", "req-1")
        .json(&event("k1"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers().get("idempotent-replayed"), None);
    assert_eq!(emulator.records().len(), 1);
}
