//! Dead letters that used to be retried forever (issue 11, problem 7), and the look-up that
//! keeps a letter from being written twice (issue 16), against librdkafka's mock cluster:
//! - a ~999 KB event: too large with meterflow's headers, written cut to fit with a digest;
//! - a missing or forbidden dead-letter topic: the start fails with an error naming the key;
//! - a fatal producer error: the producer is replaced and the letter written;
//! - an intent in the ledger and the letter already in the topic (a kill between the broker's
//!   acknowledgement and the ledger's record): found, recorded, not written again.

use meterflow_testkit as common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::RDKafkaRespErr;
use serde_json::json;
use sha2::{Digest, Sha256};

use meterflow::ack::deadletter::{headers, DeadLetter, DeadLetterWriter, Written};
use meterflow::ack::ledger::{DeadLetterClaim, Ledger};
use meterflow::config::{Config, RetryConfig};
use meterflow::emulator::billwerk::BillwerkOptions;
use meterflow::event::{RawMessage, RejectReason, Rejection, SourceRef};
use meterflow::pipeline::{self, RunStats};

type Cluster = MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

fn cluster(dlq: Option<&str>) -> (Cluster, String) {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("usage", 1, 1).unwrap();
    if let Some(dlq) = dlq {
        cluster.create_topic(dlq, 2, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    (cluster, brokers)
}

fn config(brokers: &str, base_url: &str, ledger: &str) -> Config {
    common::billwerk_config(
        brokers,
        "meterflow-dead-letters",
        "usage",
        "usage-dlq",
        base_url,
        ledger,
    )
    .build()
    .unwrap()
}

fn raw(offset: i64, payload: &[u8]) -> RawMessage {
    RawMessage {
        source: SourceRef {
            topic: "usage".into(),
            partition: 0,
            offset,
        },
        key: Some(bytes::Bytes::from_static(b"k")),
        payload: bytes::Bytes::copy_from_slice(payload),
        headers: vec![("traceparent".into(), bytes::Bytes::from_static(b"00-abc"))],
        generation: 1,
    }
}

fn retry() -> RetryConfig {
    RetryConfig {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_999_kb_event_is_dead_lettered_cut_to_fit_with_its_digest() {
    let (_cluster, brokers) = cluster(Some("usage-dlq"));
    let emulator = common::billwerk_emulator(BillwerkOptions::default()).await;
    // Not JSON, 999 000 bytes: fits the source topic, but not with meterflow's headers.
    let huge = vec![b'x'; 999_000];
    let good = serde_json::to_vec(&json!({
        "id": "after_the_big_one", "contract_id": "5cd186af443e551fe8e4f5dd",
        "metric": "api_calls", "quantity": "1", "timestamp": "2026-11-20T10:15:00Z"
    }))
    .unwrap();
    common::produce(&brokers, "usage", 1, &[huge.clone(), good]).await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let stats = Arc::new(RunStats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline::run(
        config(&brokers, &emulator.base_url(), &ledger),
        stats.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    let settled = common::wait_until(Duration::from_secs(30), || {
        stats.dead_lettered.load(Ordering::Relaxed) == 1 && emulator.records().len() == 1
    })
    .await;
    common::stop_pipeline(stop, run, Duration::from_millis(500)).await;
    assert!(
        settled,
        "the big event dead-lettered and the next one billed"
    );
    assert_eq!(
        common::committed_total(&brokers, "meterflow-dead-letters", "usage", 1),
        2,
        "both offsets committed: nothing waits behind the big event"
    );
    let letters = common::read_topic(&brokers, "usage-dlq", 1, Duration::from_secs(10));
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(l.reason(), "invalid_json");
    assert_eq!(l.headers[headers::PAYLOAD_TRUNCATED], "true");
    assert_eq!(l.headers[headers::PAYLOAD_SIZE], "999000");
    assert_eq!(
        l.headers[headers::PAYLOAD_SHA256],
        hex::encode(Sha256::digest(&huge))
    );
    assert_eq!(l.headers[headers::SOURCE_TOPIC], "usage");
    assert_eq!(l.headers[headers::SOURCE_OFFSET], "0");
    assert!(l.payload.len() > 990_000 && l.payload.len() < huge.len());
    assert!(
        huge.starts_with(&l.payload),
        "the payload's beginning, as it was"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_topic_stops_the_start_naming_the_key() {
    let (_cluster, brokers) = cluster(None);
    let emulator = common::billwerk_emulator(BillwerkOptions::default()).await;
    let run = pipeline::run(
        config(&brokers, &emulator.base_url(), "none"),
        Arc::new(RunStats::default()),
        std::future::pending(),
    );
    let error = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the start fails instead of running without a dead-letter topic")
        .expect_err("no dead-letter topic, no start");
    let text = format!("{error:#}");
    assert!(
        text.contains("kafka.dead_letter_topic")
            && text.contains("\"usage-dlq\" does not exist")
            && text.contains("create it"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_dead_letter_topic_stops_the_start_naming_the_grant() {
    let (cluster, brokers) = cluster(Some("usage-dlq"));
    cluster
        .topic_error(
            "usage-dlq",
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    let writer = DeadLetterWriter::new(&brokers, "usage-dlq", &[], retry()).unwrap();
    let error = tokio::time::timeout(Duration::from_secs(20), writer.check_topic())
        .await
        .expect("answers")
        .expect_err("refused");
    let text = error.to_string();
    assert!(
        text.contains("kafka.dead_letter_topic") && text.contains("grant"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_replaces_the_producer_instead_of_spinning() {
    let (_cluster, brokers) = cluster(Some("usage-dlq"));
    let writer = DeadLetterWriter::new(&brokers, "usage-dlq", &[], retry()).unwrap();
    writer.check_topic().await.unwrap();
    // librdkafka's idempotent producer after e.g. an out-of-order sequence: every send fails.
    writer.inject_fatal_error_for_tests();
    let m = raw(7, b"{not json");
    let rejection = Rejection::new(RejectReason::InvalidJson, "test");
    let written = tokio::time::timeout(
        Duration::from_secs(20),
        writer.write_once(
            DeadLetter {
                raw: &m,
                rejection: &rejection,
                provider_answer: None,
                event_id: None,
                delivery_key: None,
                traced_event_id: None,
            },
            None,
        ),
    )
    .await
    .expect("written through a new producer, not retried forever on the dead one");
    assert_eq!(written, Written::Now);
    let letters = common::read_topic(&brokers, "usage-dlq", 2, Duration::from_secs(5));
    assert_eq!(letters.len(), 1, "one letter");
    assert_eq!(letters[0].headers[headers::SOURCE_OFFSET], "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_acknowledged_before_a_crash_is_found_not_written_again() {
    let (_cluster, brokers) = cluster(Some("usage-dlq"));
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let writer = DeadLetterWriter::new(&brokers, "usage-dlq", &[], retry()).unwrap();
    writer.check_topic().await.unwrap();
    let m = raw(4, b"{not json");
    let rejection = Rejection::new(RejectReason::InvalidJson, "test");
    let letter = || DeadLetter {
        raw: &m,
        rejection: &rejection,
        provider_answer: None,
        event_id: None,
        delivery_key: None,
        traced_event_id: None,
    };
    {
        // A process that recorded its intent (partition 0 of the topic, then empty), wrote the
        // letter, had it acknowledged, and died before the ledger recorded it.
        let ledger = Ledger::open(&url, Duration::ZERO).await.unwrap();
        assert!(matches!(
            ledger.claim_dead_letter(&m.source, 0, 0).await.unwrap(),
            DeadLetterClaim::Claimed { .. }
        ));
        writer.write(letter()).await;
    }
    let ledger = Ledger::open(&url, Duration::ZERO).await.unwrap();
    let written = tokio::time::timeout(
        Duration::from_secs(20),
        writer.write_once(letter(), Some(&ledger)),
    )
    .await
    .unwrap();
    assert_eq!(written, Written::Found, "looked for, found");
    assert!(ledger.is_dead_lettered(&m.source).await.unwrap());
    assert_eq!(
        writer.write_once(letter(), Some(&ledger)).await,
        Written::Before,
        "recorded as written"
    );
    let letters = common::read_topic(&brokers, "usage-dlq", 3, Duration::from_secs(5));
    assert_eq!(letters.len(), 1, "one letter for the source offset");

    // The same, but the dead process's letter never reached the topic: written now, once.
    let other = raw(5, b"{not json either");
    assert!(matches!(
        ledger.claim_dead_letter(&other.source, 0, 1).await.unwrap(),
        DeadLetterClaim::Claimed { .. }
    ));
    let written = writer
        .write_once(
            DeadLetter {
                raw: &other,
                ..letter()
            },
            Some(&ledger),
        )
        .await;
    assert_eq!(written, Written::Now, "looked for, absent, written");
    let letters = common::read_topic(&brokers, "usage-dlq", 3, Duration::from_secs(5));
    assert_eq!(letters.len(), 2);
}
