//! `meterflow dlq replay` against librdkafka's mock cluster: dead letters written by the real
//! `DeadLetterWriter` are selected by reason, event id and time, and come back to the source
//! topic with their original key, payload and headers; a dry run produces nothing; and, with
//! the pipeline and the billwerk emulator, a replayed event is billed once — never twice, not
//! even when it had been billed before or is replayed again.

use meterflow_testkit as common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureRecord;
use rdkafka::ClientConfig;
use serde_json::json;

use meterflow::ack::deadletter::{DeadLetter, DeadLetterWriter};
use meterflow::config::{Config, RetryConfig};
use meterflow::dlq::replay::{replay, ReplayError, ReplayOptions, ReplayReport};
use meterflow::dlq::select::Filter;
use meterflow::emulator::billwerk::BillwerkOptions;
use meterflow::event::{DeliveryKey, RawMessage, RejectReason, Rejection, SourceRef};
use meterflow::pipeline::{self, RunStats};

const CONTRACT: &str = "5cd186af443e551fe8e4f5dd";
const OTHER_CONTRACT: &str = "5cd186af443e551fe8e4f5de";

/// A message as read back, key included.
#[derive(Debug, Clone)]
struct Read {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
}

impl Read {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every message of `topic` (all partitions, from the beginning, up to the current end).
fn read_all(brokers: &str, topic: &str) -> Vec<Read> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", rand::random::<u32>()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in metadata.topics()[0].partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .unwrap();
        if high > low {
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Offset(low))
                .unwrap();
            ends.insert(p.id(), high);
        }
    }
    if ends.is_empty() {
        return Vec::new();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ends.is_empty() && Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        if m.offset() + 1 >= ends[&m.partition()] {
            ends.remove(&m.partition());
        }
        out.push(Read {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers: m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    assert!(ends.is_empty(), "{topic} read to its end");
    out
}

fn raw(offset: i64, key: &str, payload: &[u8], headers: &[(&str, &str)]) -> RawMessage {
    RawMessage {
        source: SourceRef {
            topic: "usage".into(),
            partition: (offset % 2) as i32,
            offset,
        },
        key: Some(bytes::Bytes::copy_from_slice(key.as_bytes())),
        payload: bytes::Bytes::copy_from_slice(payload),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), bytes::Bytes::copy_from_slice(v.as_bytes())))
            .collect(),
        generation: 1,
    }
}

fn writer(brokers: &str) -> DeadLetterWriter {
    DeadLetterWriter::new(brokers, "usage-dlq", &[], RetryConfig::default()).unwrap()
}

async fn write(
    writer: &DeadLetterWriter,
    raw: &RawMessage,
    reason: RejectReason,
    event_id: Option<&str>,
) {
    let key = event_id.map(DeliveryKey::for_event);
    writer
        .write(DeadLetter {
            raw,
            rejection: &Rejection::new(reason, "test"),
            provider_answer: None,
            event_id,
            delivery_key: key.as_ref(),
            traced_event_id: event_id,
        })
        .await;
}

fn config(brokers: &str, base_url: &str, ledger: &str) -> Config {
    common::billwerk_config(
        brokers,
        "meterflow-replay-test",
        "usage",
        "usage-dlq",
        base_url,
        ledger,
    )
    .build()
    .unwrap()
}

fn options(filter: Filter) -> ReplayOptions {
    ReplayOptions {
        filter,
        to: None,
        dry_run: false,
        idle_timeout: Duration::from_secs(20),
    }
}

fn by_reason(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(r, n)| (r.to_string(), *n)).collect()
}

fn cluster() -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
) {
    let (cluster, brokers) = common::mock_cluster(&[("usage", 2), ("usage-dlq", 2)]);
    (cluster, brokers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_selected_letters_with_their_original_key_payload_and_headers() {
    let (_cluster, brokers) = cluster();
    let w = writer(&brokers);
    let metric = raw(
        10,
        "k-metric",
        br#"{"id":"evt_metric","metric":"teleportations"}"#,
        &[("traceparent", "00-abc-01"), ("tenant", "acme")],
    );
    let metric2 = raw(11, "k-metric2", br#"{"id":"evt_metric2"}"#, &[]);
    let junk = raw(12, "k-junk", b"{not json", &[("tenant", "acme")]);
    let refused = raw(
        13,
        "k-refused",
        br#"{"id":"evt_refused"}"#,
        &[("tenant", "globex")],
    );
    write(&w, &metric, RejectReason::UnknownMetric, None).await;
    write(&w, &metric2, RejectReason::UnknownMetric, None).await;
    write(&w, &junk, RejectReason::InvalidJson, None).await;
    write(
        &w,
        &refused,
        RejectReason::ProviderRejected,
        Some("evt_refused"),
    )
    .await;
    let letters = read_all(&brokers, "usage-dlq");
    assert_eq!(letters.len(), 4);

    let config = config(&brokers, "http://127.0.0.1:1", "none");
    let mut lines = Vec::new();
    let report = replay(
        &config,
        &options(Filter {
            reasons: vec![RejectReason::UnknownMetric, RejectReason::ProviderRejected],
            ..Filter::default()
        }),
        |l| lines.push(l.to_string()),
    )
    .await
    .unwrap();
    assert_eq!(report.scanned, 4);
    let want = by_reason(&[("provider_rejected", 1), ("unknown_metric", 2)]);
    assert_eq!(report.selected, want);
    assert_eq!(report.replayed, want);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines
        .iter()
        .any(|l| l.contains("reason=unknown_metric event_id=evt_metric ")));

    let replayed = read_all(&brokers, "usage");
    assert_eq!(replayed.len(), 3);
    for original in [&metric, &metric2, &refused] {
        let r = replayed
            .iter()
            .find(|r| r.payload == original.payload.as_ref())
            .expect("original payload replayed byte for byte");
        assert_eq!(r.key.as_deref(), original.key.as_deref());
        let own: Vec<(String, String)> = original
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8(v.to_vec()).unwrap()))
            .collect();
        assert_eq!(
            r.headers[..r.headers.len() - 1],
            own[..],
            "the event's own headers, in order"
        );
        let from = r.header("meterflow.replayed_from").expect("replayed_from");
        assert!(from.starts_with("usage-dlq/"), "{from}");
        assert!(
            !r.headers
                .iter()
                .any(|(k, _)| k.starts_with("meterflow.") && k != "meterflow.replayed_from"),
            "no dead-letter headers follow the event: {:?}",
            r.headers
        );
    }
    // replayed_from names the letter: partition and offset of a real dead letter.
    let froms: Vec<&str> = replayed
        .iter()
        .map(|r| r.header("meterflow.replayed_from").unwrap())
        .collect();
    let mut unique = froms.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 3, "{froms:?}");
}

/// Issue 16: the topic may hold two letters for one source offset (written by an older
/// version, or by a broker that lost an acknowledgement); the event is replayed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_letter_for_a_source_offset_is_skipped_and_counted() {
    let (_cluster, brokers) = cluster();
    let w = writer(&brokers);
    let twice = raw(20, "k-twice", br#"{"id":"evt_twice","metric":"x"}"#, &[]);
    let once = raw(21, "k-once", br#"{"id":"evt_once","metric":"x"}"#, &[]);
    // Without a ledger nothing stops a second write: two letters for offset 20.
    write(&w, &twice, RejectReason::UnknownMetric, None).await;
    write(&w, &once, RejectReason::UnknownMetric, None).await;
    write(&w, &twice, RejectReason::UnknownMetric, None).await;
    assert_eq!(read_all(&brokers, "usage-dlq").len(), 3);

    let config = config(&brokers, "http://127.0.0.1:1", "none");
    let mut lines = Vec::new();
    let report = replay(
        &config,
        &options(Filter {
            reasons: vec![RejectReason::UnknownMetric],
            ..Filter::default()
        }),
        |l| lines.push(l.to_string()),
    )
    .await
    .unwrap();
    assert_eq!(report.scanned, 3);
    assert_eq!(report.second_copies, 1, "the second letter for offset 20");
    assert_eq!(report.replayed, by_reason(&[("unknown_metric", 2)]));
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        meterflow::dlq::summary(&report, false).contains("second copies skipped 1"),
        "the summary says how many"
    );
    let replayed = read_all(&brokers, "usage");
    assert_eq!(replayed.len(), 2, "each event once");
}

/// A letter whose payload was cut to fit the topic cannot be replayed from the letter: the
/// replay says so, with the original's size and digest, and where the original was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_letter_is_not_replayed_and_says_where_the_original_was() {
    let (_cluster, brokers) = cluster();
    // A producer limit of 20 000 bytes: a 30 000-byte event is cut.
    let w = DeadLetterWriter::new(
        &brokers,
        "usage-dlq",
        &[("message.max.bytes".into(), "20000".into())],
        RetryConfig::default(),
    )
    .unwrap();
    let big = raw(30, "k-big", &vec![b'x'; 30_000], &[]);
    write(&w, &big, RejectReason::InvalidJson, None).await;
    let letters = read_all(&brokers, "usage-dlq");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].header("meterflow.payload_size"), Some("30000"));
    assert!(letters[0].payload.len() < 20_000);

    let config = config(&brokers, "http://127.0.0.1:1", "none");
    let report = replay(
        &config,
        &options(Filter {
            reasons: vec![RejectReason::InvalidJson],
            ..Filter::default()
        }),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(report.replayed_total(), 0, "a cut payload is not an event");
    assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
    let failure = &report.failures[0];
    assert!(
        failure.contains("cut to fit")
            && failure.contains("30000 bytes")
            && failure.contains("usage/0/30"),
        "{failure}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_by_event_id_and_dead_letter_time() {
    let (_cluster, brokers) = cluster();
    // Letters from three days, as an older meterflow wrote them: the time is the header's.
    let producer = common::producer(&brokers);
    let now = Utc::now();
    for (i, days_ago) in [3i64, 2, 1].into_iter().enumerate() {
        let at = now - chrono::Duration::days(days_ago);
        let at_text = at.to_rfc3339();
        let payload = format!(r#"{{"id":"evt_day{days_ago}"}}"#);
        let hs = OwnedHeaders::new()
            .insert(Header {
                key: "meterflow.reason",
                value: Some("unknown_metric"),
            })
            .insert(Header {
                key: "meterflow.source.topic",
                value: Some("usage"),
            })
            .insert(Header {
                key: "meterflow.dead_lettered_at",
                value: Some(at_text.as_str()),
            });
        producer
            .send(
                FutureRecord::to("usage-dlq")
                    .payload(&payload)
                    .key(&format!("k{i}"))
                    .partition(i as i32 % 2)
                    .timestamp(at.timestamp_millis())
                    .headers(hs),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let config = config(&brokers, "http://127.0.0.1:1", "none");

    // since inclusive, until exclusive: only the middle day.
    let report = replay(
        &config,
        &options(Filter {
            reasons: vec![RejectReason::UnknownMetric],
            since: Some(now - chrono::Duration::hours(60)),
            until: Some(now - chrono::Duration::hours(36)),
            ..Filter::default()
        }),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(report.selected, by_reason(&[("unknown_metric", 1)]));
    assert_eq!(report.scanned, 3);
    let replayed = read_all(&brokers, "usage");
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].payload, br#"{"id":"evt_day2"}"#);

    // The event id comes from the payload (at the configured pointer) when no header has it.
    let report = replay(
        &config,
        &options(Filter {
            event_ids: ["evt_day1".to_string()].into(),
            ..Filter::default()
        }),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(report.scanned, 3);
    assert_eq!(report.replayed, by_reason(&[("unknown_metric", 1)]));
    let replayed = read_all(&brokers, "usage");
    assert_eq!(replayed.len(), 2);
    assert!(replayed
        .iter()
        .any(|r| r.payload == br#"{"id":"evt_day1"}"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letters_that_cannot_go_back_are_reported_and_the_rest_still_replayed() {
    let (_cluster, brokers) = cluster();
    let w = writer(&brokers);
    let mut elsewhere = raw(1, "k1", br#"{"id":"evt_elsewhere"}"#, &[]);
    elsewhere.source.topic = "retired-topic".into();
    let home = raw(2, "k2", br#"{"id":"evt_home"}"#, &[]);
    write(&w, &elsewhere, RejectReason::UnknownMetric, None).await;
    write(&w, &home, RejectReason::UnknownMetric, None).await;
    let config = config(&brokers, "http://127.0.0.1:1", "none");
    let only_metric = Filter {
        reasons: vec![RejectReason::UnknownMetric],
        ..Filter::default()
    };

    let report = replay(&config, &options(only_metric.clone()), |_| {})
        .await
        .unwrap();
    assert_eq!(report.selected, by_reason(&[("unknown_metric", 2)]));
    assert_eq!(report.replayed, by_reason(&[("unknown_metric", 1)]));
    assert_eq!(report.failures.len(), 1);
    assert!(
        report.failures[0].contains("\"retired-topic\" is not in kafka.topics")
            && report.failures[0].contains("--to TOPIC"),
        "{:?}",
        report.failures
    );

    // --to sends everything selected to one topic.
    let mut to = options(only_metric);
    to.to = Some("usage".into());
    let report = replay(&config, &to, |_| {}).await.unwrap();
    assert_eq!(report.replayed, by_reason(&[("unknown_metric", 2)]));
    assert_eq!(read_all(&brokers, "usage").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_missing_dead_letter_topic_ends_at_once() {
    let (cluster, brokers) = cluster();
    let config = config(&brokers, "http://127.0.0.1:1", "none");
    let started = Instant::now();
    let report = replay(
        &config,
        &options(Filter {
            reasons: vec![RejectReason::UnknownMetric],
            ..Filter::default()
        }),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(report.scanned, 0);
    assert!(started.elapsed() < Duration::from_secs(10));

    let mut missing = config.clone();
    missing.kafka.dead_letter_topic = "no-such-dlq".into();
    cluster
        .topic_error(
            "no-such-dlq",
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        )
        .unwrap();
    let err = replay(&missing, &options(Filter::default()), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, ReplayError::TopicMissing(_)), "{err}");
    assert!(err.to_string().contains("kafka.dead_letter_topic"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_lists_what_would_be_replayed_and_produces_nothing() {
    let (_cluster, brokers) = cluster();
    let w = writer(&brokers);
    write(
        &w,
        &raw(5, "k5", br#"{"id":"evt_five"}"#, &[]),
        RejectReason::ProviderRejected,
        Some("evt_five"),
    )
    .await;
    write(
        &w,
        &raw(6, "k6", b"{not json", &[]),
        RejectReason::InvalidJson,
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meterflow.toml");
    std::fs::write(
        &path,
        common::billwerk_config(
            &brokers,
            "g",
            "usage",
            "usage-dlq",
            "http://127.0.0.1:1",
            "none",
        )
        .to_toml(),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"));
        cmd.args(["dlq", "replay", "--config"])
            .arg(&path)
            .args(extra)
            .env("RUST_LOG", "error");
        cmd.output().unwrap()
    };

    let out = run(&["--reason", "provider_rejected", "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("would replay"))
        .collect();
    assert_eq!(listed.len(), 1, "{stdout}");
    assert!(
        listed[0].contains("usage-dlq/")
            && listed[0].contains("reason=provider_rejected")
            && listed[0].contains("event_id=evt_five")
            && listed[0].contains("to=usage"),
        "{stdout}"
    );
    assert!(
        stdout
            .contains("scanned 2, second copies skipped 0, selected 1, would replay 1, problems 0"),
        "{stdout}"
    );
    assert!(stdout.contains("dry run: nothing was produced"), "{stdout}");
    assert!(
        read_all(&brokers, "usage").is_empty(),
        "a dry run produces nothing"
    );

    // Flags are checked before anything is read.
    let out = run(&["--reason", "no_such_reason"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_metric"));
    let out = run(&[]);
    assert!(!out.status.success(), "a reason or an event id is required");
    let out = run(&["--reason", "invalid_json", "--since", "yesterday"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("RFC 3339"));

    // The real thing: exit 0, counts by reason.
    let out = run(&["--reason", "invalid_json", "--reason", "provider_rejected"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("scanned 2, second copies skipped 0, selected 2, replayed 2, problems 0"),
        "{stdout}"
    );
    assert!(stdout.contains("invalid_json"), "{stdout}");
    assert_eq!(read_all(&brokers, "usage").len(), 2);
}

/// Runs the pipeline until `done` holds (or 60 s), then drains.
async fn run_pipeline_until(
    config: Config,
    stats: Arc<RunStats>,
    done: impl Fn(&RunStats) -> bool,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));
    common::wait_until(Duration::from_secs(60), || done(&stats)).await;
    common::stop_pipeline(stop, run, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_events_are_billed_once_even_if_billed_before_or_replayed_twice() {
    let (_cluster, brokers) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let event = |id: &str, contract: &str, metric: &str| {
        serde_json::to_vec(&json!({"id": id, "contract_id": contract, "metric": metric,
                                   "quantity": "2", "timestamp": "2026-11-20T10:15:00Z"}))
        .unwrap()
    };
    let billed = event("evt_billed", CONTRACT, "api_calls");
    let no_metric = event("evt_no_metric", CONTRACT, "teleportations");
    let no_contract = event("evt_no_contract", OTHER_CONTRACT, "api_calls");

    // Before the fix: the provider knows one contract, the config no "teleportations".
    let before =
        common::billwerk_emulator(BillwerkOptions::default().with_contract("acme", CONTRACT)).await;
    common::produce(
        &brokers,
        "usage",
        2,
        &[billed.clone(), no_metric.clone(), no_contract.clone()],
    )
    .await;
    let stats = Arc::new(RunStats::default());
    run_pipeline_until(
        config(&brokers, &before.base_url(), &ledger),
        stats.clone(),
        |s| {
            s.delivered.load(Ordering::Relaxed) == 1 && s.dead_lettered.load(Ordering::Relaxed) == 2
        },
    )
    .await;
    assert_eq!(before.records().len(), 1);
    let reasons: Vec<String> = read_all(&brokers, "usage-dlq")
        .iter()
        .map(|l| l.header("meterflow.reason").unwrap().to_string())
        .collect();
    assert_eq!(reasons.len(), 2);
    assert!(reasons.contains(&"unknown_metric".to_string()));
    assert!(reasons.contains(&"unknown_contract".to_string()));
    // An event that was billed, yet sits in the dead-letter topic too.
    write(
        &writer(&brokers),
        &raw(0, "k0", &billed, &[]),
        RejectReason::ProviderRejected,
        Some("evt_billed"),
    )
    .await;

    // The fix: the contract exists now, the metric is mapped.
    let after = common::billwerk_emulator(
        BillwerkOptions::default()
            .with_contract("acme", CONTRACT)
            .with_contract("other", OTHER_CONTRACT),
    )
    .await;
    let mut fixed = config(&brokers, &after.base_url(), &ledger);
    fixed
        .components
        .insert("teleportations".into(), "5ce53069443e551b9caccc66".into());

    let everything = Filter {
        reasons: vec![
            RejectReason::UnknownMetric,
            RejectReason::UnknownContract,
            RejectReason::ProviderRejected,
        ],
        ..Filter::default()
    };
    let report: ReplayReport = replay(&fixed, &options(everything.clone()), |_| {})
        .await
        .unwrap();
    assert_eq!(report.replayed_total(), 3, "{report:?}");
    assert_eq!(
        report.rejections_forgotten, 1,
        "the provider's 404 for evt_no_contract is forgotten; the billed event's key is kept"
    );

    let stats = Arc::new(RunStats::default());
    run_pipeline_until(fixed.clone(), stats.clone(), |s| {
        s.delivered.load(Ordering::Relaxed) == 2 && s.already_delivered.load(Ordering::Relaxed) == 1
    })
    .await;
    let (consumed, delivered, already, dead) = stats.snapshot();
    assert_eq!((consumed, delivered, already, dead), (3, 2, 1, 0));
    let memos: Vec<String> = after
        .records()
        .iter()
        .map(|r| r.memo.clone().unwrap_or_default())
        .collect();
    assert_eq!(memos.len(), 2);
    for id in ["evt_no_metric", "evt_no_contract"] {
        assert!(memos.contains(&DeliveryKey::for_event(id).as_str().to_string()));
    }
    assert_eq!(
        before.records().len() + after.records().len(),
        3,
        "each event billed exactly once across both"
    );

    // The same replay again: everything is in the ledger as delivered; nothing is sent.
    let report = replay(&fixed, &options(everything), |_| {}).await.unwrap();
    assert_eq!(report.replayed_total(), 3);
    assert_eq!(report.rejections_forgotten, 0);
    let stats = Arc::new(RunStats::default());
    run_pipeline_until(fixed, stats.clone(), |s| {
        s.already_delivered.load(Ordering::Relaxed) == 3
    })
    .await;
    assert_eq!(stats.snapshot(), (3, 0, 3, 0));
    assert_eq!(after.records().len(), 2);
    assert_eq!(after.stats().duplicate_keys, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_within_seconds_and_names_the_fix() {
    // Nothing listens on port 1.
    let config = config("127.0.0.1:1", "http://127.0.0.1:1", "none");
    let started = Instant::now();
    let err = replay(&config, &options(Filter::default()), |_| {})
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(20), "bounded");
    assert!(matches!(err, ReplayError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("kafka.brokers"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_read_ends_with_a_problem_not_a_hang() {
    let (cluster, brokers) = common::mock_cluster(&[("usage", 1), ("usage-dlq", 1)]);
    write(
        &writer(&brokers),
        &raw(1, "k1", br#"{"id":"evt_1"}"#, &[]),
        RejectReason::UnknownMetric,
        None,
    )
    .await;
    // Every answer now takes 3 s: metadata still fits its 10 s, the fetch outlasts --idle-timeout.
    cluster
        .broker_round_trip_time(1, Duration::from_secs(3))
        .unwrap();
    let config = config(&brokers, "http://127.0.0.1:1", "none");
    let mut short = options(Filter::default());
    short.idle_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let report = replay(&config, &short, |_| {}).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(40), "bounded");
    assert_eq!(report.replayed_total(), 0);
    assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
    assert!(
        report.failures[0].contains("--idle-timeout") && report.failures[0].contains("[0]"),
        "{:?}",
        report.failures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_refused_through_an_earlier_aggregate_comes_back_with_a_replay() {
    let (_cluster, brokers) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let event = |id: &str| {
        serde_json::to_vec(
            &json!({"id": id, "contract_id": OTHER_CONTRACT, "metric": "api_calls",
                                   "quantity": "2", "timestamp": "2026-11-20T10:15:00Z"}),
        )
        .unwrap()
    };
    let aggregating = |base_url: &str| {
        let mut config = config(&brokers, base_url, &ledger);
        config
            .sink
            .billwerk_mut()
            .expect("a billwerk sink")
            .aggregate
            .enabled = true;
        config
    };

    // The provider does not know the contract yet: the aggregate of three events is refused.
    let before =
        common::billwerk_emulator(BillwerkOptions::default().with_contract("acme", CONTRACT)).await;
    common::produce(
        &brokers,
        "usage",
        2,
        &[event("evt_a"), event("evt_b"), event("evt_c")],
    )
    .await;
    let stats = Arc::new(RunStats::default());
    run_pipeline_until(aggregating(&before.base_url()), stats.clone(), |s| {
        s.dead_lettered.load(Ordering::Relaxed) == 3
    })
    .await;
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 3);
    let first_letters_done = Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;

    // The producer sends evt_b again. The ledger knows it was refused in that aggregate, so it
    // is dead-lettered without a request, under the key of its new (one-event) delivery.
    common::produce(&brokers, "usage", 2, &[event("evt_b")]).await;
    let stats = Arc::new(RunStats::default());
    run_pipeline_until(aggregating(&before.base_url()), stats.clone(), |s| {
        s.dead_lettered.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(stats.snapshot(), (1, 0, 0, 1));
    assert!(before.records().is_empty());
    let letters = read_all(&brokers, "usage-dlq");
    assert_eq!(letters.len(), 4);

    // The fix, then a replay of that last letter only.
    let after = common::billwerk_emulator(
        BillwerkOptions::default()
            .with_contract("acme", CONTRACT)
            .with_contract("other", OTHER_CONTRACT),
    )
    .await;
    let fixed = aggregating(&after.base_url());
    let last = Filter {
        since: Some(first_letters_done),
        ..Filter::default()
    };
    let report = replay(&fixed, &options(last), |_| {}).await.unwrap();
    assert_eq!(report.replayed_total(), 1, "{report:?}");
    assert_eq!(
        report.rejections_forgotten, 1,
        "the refused aggregate is forgotten through evt_b's mapping: {report:?}"
    );

    // Billed now, once, instead of refused again on the ledger's word.
    let stats = Arc::new(RunStats::default());
    run_pipeline_until(fixed, stats.clone(), |s| {
        s.delivered.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(stats.snapshot(), (1, 1, 0, 0));
    let records = after.records();
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0].memo.as_deref(),
        Some(DeliveryKey::for_events(["evt_b"]).as_str())
    );
}
