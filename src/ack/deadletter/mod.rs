//! The dead-letter topic. A dead letter carries the original key, payload and headers, plus
//! `meterflow.*` headers with the reason, the provider's answer and the source coordinates. The
//! offset moves only after the broker acknowledged the write.
//!
//! Each source offset gets one letter, also across crashes (docs/delivery-semantics.md §2):
//! with a ledger, the intent ("writing into dead-letter partition P, whose end was F") is
//! durable before the write, and "written" after the acknowledgement. An intent without
//! "written" — a crash between the two, a timeout, a lost connection — is an unknown outcome:
//! partition P is read from F for a letter with those coordinates before anything is written
//! again. Permanent errors do not spin: a letter too large is cut to fit (with a digest of the
//! original), a missing or forbidden topic stops the start-up and is named in every retry's
//! error, a fatal producer is replaced.

pub mod letter;
pub mod lookup;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use crate::ack::ledger::{DeadLetterClaim, DeadLetterRecord, Ledger};
use crate::config::RetryConfig;
use crate::deliver::retry::Backoff;
use crate::event::{DeliveryKey, RawMessage, Rejection, SourceRef};
use letter::{Failure, LetterRecord};
use lookup::Lookup;

/// Header names on dead letters (documented in docs/delivery-semantics.md, section 2).
pub mod headers {
    pub const REASON: &str = "meterflow.reason";
    pub const DETAIL: &str = "meterflow.detail";
    pub const PROVIDER_ANSWER: &str = "meterflow.provider_answer";
    pub const SOURCE_TOPIC: &str = "meterflow.source.topic";
    pub const SOURCE_PARTITION: &str = "meterflow.source.partition";
    pub const SOURCE_OFFSET: &str = "meterflow.source.offset";
    pub const EVENT_ID: &str = "meterflow.event_id";
    pub const DELIVERY_KEY: &str = "meterflow.delivery_key";
    pub const DEAD_LETTERED_AT: &str = "meterflow.dead_lettered_at";
    /// `true` when the payload was cut to fit the producer's or the topic's size limit.
    pub const PAYLOAD_TRUNCATED: &str = "meterflow.payload_truncated";
    /// The original payload's length in bytes (on truncated letters).
    pub const PAYLOAD_SIZE: &str = "meterflow.payload_size";
    /// Hex SHA-256 of the original payload (on truncated letters).
    pub const PAYLOAD_SHA256: &str = "meterflow.payload_sha256";
    /// How many of the event's own headers were dropped to fit (on truncated letters).
    pub const HEADERS_DROPPED: &str = "meterflow.headers_dropped";
}

/// One dead letter to write.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    pub raw: &'a RawMessage,
    pub rejection: &'a Rejection,
    pub provider_answer: Option<&'a str>,
    pub event_id: Option<&'a str>,
    pub delivery_key: Option<&'a DeliveryKey>,
    /// The id the ledger records for `meterflow trace` (also for events that failed decoding,
    /// whose letters carry no id).
    pub traced_event_id: Option<&'a str>,
}

/// How a [`DeadLetterWriter::write_once`] ended; in every case the letter is in the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Written now.
    Now,
    /// Found in the topic (written by a process that died before the ledger recorded it, or
    /// by an attempt whose acknowledgement was lost), and recorded now.
    Found,
    /// The ledger had it as written: an earlier process or copy wrote and counted it.
    Before,
}

/// Why the service cannot start with this dead-letter topic.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(
        "kafka.dead_letter_topic: topic {topic:?} does not exist on kafka.brokers ({brokers}): \
         create it (meterflow does not create topics), or fix the name; `meterflow validate \
         --connect` checks it"
    )]
    TopicMissing { topic: String, brokers: String },
    #[error(
        "kafka.dead_letter_topic: the brokers refuse meterflow access to topic {topic:?} ({why}): \
         grant its principal WRITE and DESCRIBE on the topic (and READ, for `dlq replay` and the \
         look-ups after a crash), or fix the credentials in kafka.properties"
    )]
    Unauthorized { topic: String, why: String },
    #[error("kafka.properties: librdkafka refused the dead-letter producer's configuration: {0}")]
    Client(KafkaError),
}

/// The producer in use, and how many were made before it (a fatal error replaces it).
struct ProducerSlot {
    producer: FutureProducer,
    generation: u64,
}

struct Inner {
    producer_config: ClientConfig,
    lookup_config: ClientConfig,
    producer: Mutex<Arc<ProducerSlot>>,
    topic: String,
    brokers: String,
    retry: RetryConfig,
    /// The producer's `message.max.bytes`.
    max_bytes: usize,
    /// The dead-letter topic's partition count, once the brokers said it.
    partitions: tokio::sync::OnceCell<i32>,
    /// Source offsets whose letter this process is writing now: one writer per offset.
    writing: Mutex<HashSet<SourceRef>>,
}

#[derive(Clone)]
pub struct DeadLetterWriter {
    inner: Arc<Inner>,
}

/// librdkafka gives up on a message after this (`message.timeout.ms`).
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Metadata and watermark requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The start-up check of the topic (as long as `validate --connect` gives the brokers).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

impl DeadLetterWriter {
    pub fn new(
        brokers: &str,
        topic: &str,
        properties: &[(String, String)],
        retry: RetryConfig,
    ) -> anyhow::Result<Self> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            // Durable before the offset moves: all in-sync replicas, no duplicates on retry.
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                MESSAGE_TIMEOUT.as_millis().to_string(),
            )
            // meterflow does not create topics: a missing one is an error to report, not a
            // topic to make with the broker's defaults.
            .set("allow.auto.create.topics", "false");
        for (k, v) in properties {
            // Consumer-only properties would make the producer refuse to start.
            if !is_consumer_only(k) {
                config.set(k, v);
            }
        }
        let max_bytes = properties
            .iter()
            .find(|(k, _)| k == "message.max.bytes")
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(letter::DEFAULT_MAX_BYTES);
        let producer: FutureProducer = config.create()?;
        Ok(DeadLetterWriter {
            inner: Arc::new(Inner {
                producer_config: config,
                lookup_config: lookup::client_config(brokers, properties),
                producer: Mutex::new(Arc::new(ProducerSlot {
                    producer,
                    generation: 0,
                })),
                topic: topic.to_string(),
                brokers: brokers.to_string(),
                retry,
                max_bytes,
                partitions: tokio::sync::OnceCell::new(),
                writing: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// At start-up: the dead-letter topic must exist and be ours to write. An unreachable
    /// broker is not an error here (the service starts unready and waits, as for the source);
    /// a broker that answers "no such topic" or "not authorised" is.
    pub async fn check_topic(&self) -> Result<(), DeadLetterError> {
        match self.fetch_partitions(CHECK_TIMEOUT).await {
            Ok(n) => {
                let _ = self.inner.partitions.set(n);
                Ok(())
            }
            Err(TopicState::Missing) => Err(DeadLetterError::TopicMissing {
                topic: self.inner.topic.clone(),
                brokers: self.inner.brokers.clone(),
            }),
            Err(TopicState::Unauthorized(why)) => Err(DeadLetterError::Unauthorized {
                topic: self.inner.topic.clone(),
                why,
            }),
            Err(TopicState::Unknown(why)) => {
                tracing::warn!(
                    topic = %self.inner.topic,
                    error = %why,
                    "cannot check the dead-letter topic now (brokers unreachable?); checked again before the first letter"
                );
                Ok(())
            }
        }
    }

    /// Writes one dead letter and returns once the broker acknowledged it; retries until then.
    /// No ledger: a crash before the offset is committed writes it again (at least once).
    pub async fn write(&self, letter: DeadLetter<'_>) {
        let pending = Pending::new(&letter);
        let _ = self.clone().write_detached(pending, None).await;
    }

    /// Writes the letter for a source offset once: with a ledger, also across crashes, copies
    /// of the message in flight and unknown outcomes (see the module's comment). Returns when
    /// the letter is in the topic. The write runs in a task of its own: cancelling the caller
    /// (a revoke, a shutdown) cannot leave a letter in the producer's queue that nobody
    /// records, and another copy of the message waits for it.
    pub async fn write_once(&self, letter: DeadLetter<'_>, ledger: Option<&Ledger>) -> Written {
        let pending = Pending::new(&letter);
        self.clone().write_detached(pending, ledger.cloned()).await
    }

    async fn write_detached(self, pending: Pending, ledger: Option<Ledger>) -> Written {
        let mut backoff = Backoff::new(&self.inner.retry);
        loop {
            let writer = self.clone();
            let p = pending.clone();
            let l = ledger.clone();
            let task = tokio::spawn(async move { writer.write_here(p, l).await });
            match task.await {
                Ok(written) => return written,
                Err(e) => {
                    // Never settle on a write that did not end: hold the event and try again.
                    metrics::counter!("meterflow_dead_letter_write_errors_total", "kind" => "internal")
                        .increment(1);
                    tracing::error!(
                        error = %e,
                        partition = pending.source.partition,
                        offset = pending.source.offset,
                        "the dead-letter write task died; writing the letter again"
                    );
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    async fn write_here(&self, p: Pending, ledger: Option<Ledger>) -> Written {
        // One writer per source offset in this process: a second copy of the message (the
        // group took the partition away and gave it back) waits, then finds it written.
        let _writing = Writing::enter(&self.inner.writing, &p.source).await;
        let written = match &ledger {
            None => {
                let partition = self.partitions().await;
                let partition = letter::partition_for(&p.source, partition);
                self.attempts(&p, partition, None).await;
                Written::Now
            }
            Some(ledger) => match self.with_ledger(ledger, &p).await {
                Written::Before => return Written::Before,
                other => other,
            },
        };
        metrics::counter!("meterflow_events_dead_lettered_total", "reason" => p.reason)
            .increment(1);
        written
    }

    /// Claim the source offset's letter in the ledger, then write it (or find it), then record
    /// it as written.
    async fn with_ledger(&self, ledger: &Ledger, p: &Pending) -> Written {
        let mut backoff = Backoff::new(&self.inner.retry);
        let lease = self.intent_lease(ledger);
        loop {
            let partitions = self.partitions().await;
            let partition = letter::partition_for(&p.source, partitions);
            let floor = match self.end_of(partition).await {
                Ok(end) => end,
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::error!(
                        topic = %self.inner.topic,
                        partition,
                        error = %e,
                        retry_in_ms = wait.as_millis() as u64,
                        "cannot read the dead-letter partition's end before writing; the partition waits"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            let claim = match ledger.claim_dead_letter(&p.source, partition, floor).await {
                Ok(claim) => claim,
                Err(e) => {
                    tracing::error!(error = %e, "ledger unavailable; not writing the dead letter until it answers");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let (partition, stamp, floor, unknown) = match claim {
                DeadLetterClaim::Written => {
                    tracing::info!(
                        partition = p.source.partition,
                        offset = p.source.offset,
                        "dead letter already written (before a restart, or for an earlier copy of \
                         this message); not writing it twice"
                    );
                    return Written::Before;
                }
                DeadLetterClaim::Claimed { updated_at_ms } => {
                    (partition, updated_at_ms, floor, false)
                }
                DeadLetterClaim::Intended {
                    dlq_partition,
                    floor,
                    updated_at_ms,
                } => {
                    let lease_end = updated_at_ms.saturating_add(lease.as_millis() as i64);
                    let now = crate::ack::ledger::now_ms();
                    if now < lease_end {
                        // Another replica may be writing it now: wait out its lease.
                        let wait = lease_end.saturating_sub(now).clamp(1, 1000) as u64;
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                        continue;
                    }
                    match ledger.touch_dead_letter(&p.source, updated_at_ms).await {
                        Ok(Some(next)) => (dlq_partition, next, floor, true),
                        Ok(None) | Err(_) => continue,
                    }
                }
            };
            let intent = Intent {
                ledger,
                floor,
                stamp: Mutex::new(stamp),
                unknown,
            };
            let Some((written, offset)) = self.attempts(p, partition, Some(intent)).await else {
                // Someone else took the intent over: they write it; we wait for "written".
                continue;
            };
            test_hook_after_acknowledgement().await;
            let record = DeadLetterRecord {
                event_id: p.traced_event_id.clone(),
                reason: p.reason.to_string(),
                detail: p.detail.clone(),
                dlq_partition: partition,
                dlq_offset: offset,
            };
            while let Err(e) = ledger.dead_lettered(&p.source, Some(record.clone())).await {
                tracing::error!(error = %e, "ledger unavailable; retrying the dead-letter record");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            return written;
        }
    }

    /// Sends until the letter is acknowledged (`Written::Now`) or, after an unknown outcome,
    /// found in the topic (`Written::Found`), with the letter's offset. `None`: the intent was
    /// taken over by another
    /// writer (several replicas), which now owns the letter.
    async fn attempts(
        &self,
        p: &Pending,
        partition: i32,
        intent: Option<Intent<'_>>,
    ) -> Option<(Written, i64)> {
        let mut backoff = Backoff::new(&self.inner.retry);
        let mut budget = letter::budget(self.inner.max_bytes);
        let mut unknown = intent.as_ref().is_some_and(|i| i.unknown);
        let mut first = true;
        loop {
            if let Some(intent) = &intent {
                if unknown {
                    match self.look_up(partition, intent.floor, &p.source).await {
                        Ok(Lookup::Found { offset }) => {
                            metrics::counter!("meterflow_dead_letter_lookups_total", "result" => "found")
                                .increment(1);
                            tracing::info!(
                                partition = p.source.partition,
                                offset = p.source.offset,
                                dead_letter_partition = partition,
                                dead_letter_offset = offset,
                                reason = p.reason,
                                "dead letter found in the topic (its acknowledgement was lost, or \
                                 the process died before recording it); not writing it again"
                            );
                            return Some((Written::Found, offset));
                        }
                        Ok(Lookup::Absent) => {
                            metrics::counter!("meterflow_dead_letter_lookups_total", "result" => "absent")
                                .increment(1);
                            tracing::info!(
                                partition = p.source.partition,
                                offset = p.source.offset,
                                dead_letter_partition = partition,
                                from_offset = intent.floor,
                                "dead letter not in the topic; writing it"
                            );
                            unknown = false;
                        }
                        Err(e) => {
                            let wait = backoff.next_delay();
                            tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot look for the dead letter; not writing it before the look-up answers");
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                    }
                }
                if !first {
                    // Renew the intent before each re-send; lost means another writer owns it.
                    let expected = *lock(&intent.stamp);
                    match intent.ledger.touch_dead_letter(&p.source, expected).await {
                        Ok(Some(next)) => *lock(&intent.stamp) = next,
                        Ok(None) => return None,
                        Err(e) => {
                            tracing::error!(error = %e, "ledger unavailable; not writing the dead letter until it answers");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    }
                }
            }
            first = false;
            let record = letter::fit(p.record.clone(), budget);
            let size = record.size();
            let truncated = record.payload.len() < p.record.payload.len();
            let slot = lock(&self.inner.producer).clone();
            match send(&slot.producer, &self.inner.topic, partition, &record).await {
                Ok(offset) => {
                    if truncated {
                        metrics::counter!("meterflow_dead_letters_truncated_total").increment(1);
                        tracing::warn!(
                            partition = p.source.partition,
                            offset = p.source.offset,
                            original_bytes = p.record.payload.len(),
                            kept_bytes = record.payload.len(),
                            "dead letter too large for the topic: written with its payload cut \
                             (headers meterflow.payload_size and meterflow.payload_sha256 describe \
                             the original)"
                        );
                    }
                    tracing::info!(
                        event_id = p.event_id.as_deref().unwrap_or(""),
                        partition = p.source.partition,
                        offset = p.source.offset,
                        delivery_key = p.delivery_key.as_deref().unwrap_or(""),
                        reason = p.reason,
                        detail = p.detail.as_str(),
                        dead_letter_partition = partition,
                        dead_letter_offset = offset,
                        "event dead-lettered"
                    );
                    return Some((Written::Now, offset));
                }
                Err(e) => {
                    let failure = Failure::of(&e);
                    metrics::counter!("meterflow_dead_letter_write_errors_total", "kind" => failure.label())
                        .increment(1);
                    unknown = unknown || failure.maybe_written();
                    let mut wait = backoff.next_delay().max(Duration::from_millis(50));
                    match failure {
                        Failure::TooLarge => match letter::smaller_budget(size, budget) {
                            Some(smaller) => {
                                tracing::warn!(
                                    partition = p.source.partition,
                                    offset = p.source.offset,
                                    bytes = size,
                                    next_bytes = smaller,
                                    error = %e,
                                    "the broker refused the dead letter as too large (the topic's \
                                     max.message.bytes?); writing it smaller"
                                );
                                budget = smaller;
                                wait = Duration::ZERO;
                            }
                            None => {
                                tracing::warn!(error = %e, "dead letter refused with a too-large batch; sending it again")
                            }
                        },
                        Failure::Topic => tracing::error!(
                            topic = %self.inner.topic,
                            error = %e,
                            retry_in_ms = wait.as_millis() as u64,
                            "the dead-letter topic (kafka.dead_letter_topic) is missing or meterflow \
                             may not write to it: create it, or grant WRITE and DESCRIBE on it; the \
                             partition waits"
                        ),
                        Failure::Fatal => self.replace_producer(&slot),
                        Failure::NotWritten | Failure::Unknown => tracing::error!(
                            topic = %self.inner.topic,
                            partition = p.source.partition,
                            offset = p.source.offset,
                            error = %e,
                            retry_in_ms = wait.as_millis() as u64,
                            "dead-letter write failed; the partition waits"
                        ),
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// librdkafka's fatal error leaves the producer unusable (every send fails at once): make a
    /// new one, once per failed producer however many letters saw the error.
    fn replace_producer(&self, failed: &ProducerSlot) {
        let mut slot = lock(&self.inner.producer);
        if slot.generation != failed.generation {
            return; // another letter replaced it already
        }
        let why = failed
            .producer
            .client()
            .fatal_error()
            .map(|(code, text)| format!("{code:?}: {text}"))
            .unwrap_or_else(|| "unknown".into());
        match self.inner.producer_config.create::<FutureProducer>() {
            Ok(producer) => {
                metrics::counter!("meterflow_dead_letter_producer_restarts_total").increment(1);
                tracing::error!(
                    fatal_error = %why,
                    "the dead-letter producer hit a fatal error; replaced it with a new one (the \
                     letters in flight are looked for in the topic before they are written again)"
                );
                *slot = Arc::new(ProducerSlot {
                    producer,
                    generation: failed.generation.wrapping_add(1),
                });
            }
            Err(e) => tracing::error!(
                fatal_error = %why,
                error = %e,
                "the dead-letter producer hit a fatal error and a new one cannot be made; retrying"
            ),
        }
    }

    /// How long someone else's intent is left alone: with SQLite (one replica) an intent not
    /// ours is a dead process's; with PostgreSQL it may be another replica's, which renews it
    /// before every attempt (an attempt takes at most the message timeout, a look-up and a
    /// backoff).
    fn intent_lease(&self, ledger: &Ledger) -> Duration {
        if ledger.lease().is_zero() {
            Duration::ZERO
        } else {
            MESSAGE_TIMEOUT
                + REQUEST_TIMEOUT
                + self.inner.retry.max_backoff
                + Duration::from_secs(5)
        }
    }

    /// The dead-letter topic's partition count; asks the brokers until they answer.
    async fn partitions(&self) -> i32 {
        let mut backoff = Backoff::new(&self.inner.retry);
        loop {
            let result = self
                .inner
                .partitions
                .get_or_try_init(|| async { self.fetch_partitions(REQUEST_TIMEOUT).await })
                .await;
            match result {
                Ok(n) => return *n,
                Err(state) => {
                    let wait = backoff.next_delay().max(Duration::from_millis(100));
                    tracing::error!(
                        topic = %self.inner.topic,
                        problem = %state,
                        retry_in_ms = wait.as_millis() as u64,
                        "cannot describe the dead-letter topic (kafka.dead_letter_topic); the partition waits"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn fetch_partitions(&self, timeout: Duration) -> Result<i32, TopicState> {
        let slot = lock(&self.inner.producer).clone();
        let topic = self.inner.topic.clone();
        let answer = tokio::task::spawn_blocking(move || {
            slot.producer
                .client()
                .fetch_metadata(Some(&topic), timeout)
                .map(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic)
                        .map(|t| (t.error(), t.partitions().len()))
                })
        })
        .await
        .map_err(|e| TopicState::Unknown(e.to_string()))?;
        use rdkafka::types::RDKafkaRespErr as E;
        match answer {
            Ok(Some((None, n))) if n > 0 => Ok(i32::try_from(n).unwrap_or(i32::MAX)),
            Ok(Some((Some(E::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED), _)))
            | Ok(Some((Some(E::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED), _))) => Err(
                TopicState::Unauthorized("topic authorization failed".into()),
            ),
            Ok(Some((Some(E::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART), _)))
            | Ok(Some((None, _)))
            | Ok(None) => Err(TopicState::Missing),
            Ok(Some((Some(e), _))) => Err(TopicState::Unknown(format!("{e:?}"))),
            Err(e) => Err(TopicState::Unknown(e.to_string())),
        }
    }

    /// The dead-letter partition's end now: a letter written after this is at or after it.
    async fn end_of(&self, partition: i32) -> Result<i64, KafkaError> {
        let slot = lock(&self.inner.producer).clone();
        let topic = self.inner.topic.clone();
        tokio::task::spawn_blocking(move || {
            slot.producer
                .client()
                .fetch_watermarks(&topic, partition, REQUEST_TIMEOUT)
                .map(|(_, high)| high)
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled))
    }

    async fn look_up(
        &self,
        partition: i32,
        floor: i64,
        source: &SourceRef,
    ) -> Result<Lookup, lookup::LookupError> {
        let config = self.inner.lookup_config.clone();
        let topic = self.inner.topic.clone();
        let source = source.clone();
        tokio::task::spawn_blocking(move || {
            lookup::find(&config, &topic, partition, floor, &source)
        })
        .await
        .unwrap_or(Err(lookup::LookupError::Kafka(KafkaError::Canceled)))
    }

    /// Waits for outstanding writes (shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = lock(&self.inner.producer).producer.flush(timeout);
    }

    /// Makes the producer fail as librdkafka's idempotent producer does after a fatal error
    /// (every later send fails at once with `Fatal`), for tests.
    #[doc(hidden)]
    pub fn inject_fatal_error_for_tests(&self) {
        let slot = lock(&self.inner.producer).clone();
        let reason = std::ffi::CString::new("injected by a test").unwrap_or_default();
        // SAFETY: the handle is alive (the slot holds the producer); librdkafka copies the
        // reason before it returns.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                slot.producer.client().native_ptr(),
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
    }
}

/// What the brokers said of the dead-letter topic.
#[derive(Debug, thiserror::Error)]
enum TopicState {
    #[error("the topic does not exist")]
    Missing,
    #[error("not authorised: {0}")]
    Unauthorized(String),
    #[error("{0}")]
    Unknown(String),
}

/// An intent recorded in the ledger for the letter being written.
struct Intent<'a> {
    ledger: &'a Ledger,
    /// The dead-letter partition's end before the first write: a copy is at or after it.
    floor: i64,
    /// The intent's `updated_at`, renewed before every re-send.
    stamp: Mutex<i64>,
    /// The outcome of an earlier attempt (a dead process's) is unknown: look first.
    unknown: bool,
}

/// The letter, owned, so the write can outlive its caller; the record is built (and its time
/// stamped) once, so every attempt sends the same letter.
#[derive(Clone)]
struct Pending {
    source: SourceRef,
    record: LetterRecord,
    reason: &'static str,
    detail: String,
    event_id: Option<String>,
    delivery_key: Option<String>,
    traced_event_id: Option<String>,
}

impl Pending {
    fn new(letter: &DeadLetter<'_>) -> Pending {
        let raw = letter.raw;
        let mut hs: Vec<(String, Vec<u8>)> = raw
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.to_vec()))
            .collect();
        let mut add = |k: &str, v: &str| hs.push((k.to_string(), v.as_bytes().to_vec()));
        add(headers::REASON, letter.rejection.reason.as_str());
        add(headers::DETAIL, &letter.rejection.detail);
        if let Some(a) = letter.provider_answer {
            add(headers::PROVIDER_ANSWER, a);
        }
        add(headers::SOURCE_TOPIC, &raw.source.topic);
        add(headers::SOURCE_PARTITION, &raw.source.partition.to_string());
        add(headers::SOURCE_OFFSET, &raw.source.offset.to_string());
        if let Some(id) = letter.event_id {
            add(headers::EVENT_ID, id);
        }
        if let Some(k) = letter.delivery_key {
            add(headers::DELIVERY_KEY, k.as_str());
        }
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        add(headers::DEAD_LETTERED_AT, &at);
        Pending {
            source: raw.source.clone(),
            record: LetterRecord {
                key: raw.key.clone(),
                payload: raw.payload.clone(),
                headers: hs,
            },
            reason: letter.rejection.reason.as_str(),
            detail: letter.rejection.detail.clone(),
            event_id: letter.event_id.map(str::to_string),
            delivery_key: letter.delivery_key.map(|k| k.as_str().to_string()),
            traced_event_id: letter.traced_event_id.map(str::to_string),
        }
    }
}

/// Produces one record to `partition`; its offset once the broker acknowledged it.
async fn send(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    record: &LetterRecord,
) -> Result<i64, KafkaError> {
    let mut hs = OwnedHeaders::new_with_capacity(record.headers.len());
    for (k, v) in &record.headers {
        hs = hs.insert(Header {
            key: k,
            value: Some(v.as_slice()),
        });
    }
    let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
        .partition(partition)
        .payload(record.payload.as_ref())
        .headers(hs);
    if let Some(k) = &record.key {
        r = r.key(k.as_ref());
    }
    match producer.send(r, Duration::from_secs(5)).await {
        Ok(delivery) => Ok(delivery.offset),
        Err((e, _)) => Err(e),
    }
}

/// A source offset this process is writing the letter of (see `Inner::writing`).
struct Writing<'a> {
    set: &'a Mutex<HashSet<SourceRef>>,
    source: SourceRef,
}

impl<'a> Writing<'a> {
    async fn enter(set: &'a Mutex<HashSet<SourceRef>>, source: &SourceRef) -> Writing<'a> {
        while !lock(set).insert(source.clone()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Writing {
            set,
            source: source.clone(),
        }
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.source);
    }
}

/// A poisoned lock only means another task panicked while holding it; the data (a set, a
/// slot) is still consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Test hook for tests/dead_letters_once.rs: with `METERFLOW_TEST_STALL_AFTER_DEAD_LETTER=N`,
/// the N-th letter this process writes stalls forever after the broker acknowledged it and
/// before the ledger records it — the window a kill -9 must not turn into a second letter.
async fn test_hook_after_acknowledgement() {
    static STALL_AT: OnceLock<Option<u64>> = OnceLock::new();
    static WRITTEN: AtomicU64 = AtomicU64::new(0);
    let Some(at) = *STALL_AT.get_or_init(|| {
        std::env::var("METERFLOW_TEST_STALL_AFTER_DEAD_LETTER")
            .ok()
            .and_then(|v| v.parse().ok())
    }) else {
        return;
    };
    if WRITTEN.fetch_add(1, Ordering::Relaxed) + 1 == at {
        tracing::warn!("test hook: stalling after a dead letter's acknowledgement, before the ledger records it");
        std::future::pending::<()>().await;
    }
}

/// librdkafka refuses to create a producer with these (shared by the dead-letter replay).
pub(crate) fn is_consumer_only(key: &str) -> bool {
    key.starts_with("fetch.")
        || key.starts_with("group.")
        || key.starts_with("session.")
        || key.starts_with("heartbeat.")
        || key.starts_with("max.poll")
        || key.starts_with("auto.")
        || key.starts_with("enable.auto")
        || key.starts_with("partition.assignment")
        || key.starts_with("queued.")
        || key == "isolation.level"
        || key == "check.crcs"
}
