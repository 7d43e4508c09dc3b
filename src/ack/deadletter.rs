//! The dead-letter topic. A dead letter carries the original key, payload and headers, plus
//! `meterflow.*` headers with the reason, the provider's answer and the source coordinates. The
//! offset moves only after the broker acknowledged the write; if the topic is unavailable, the
//! write is retried (the partition waits, it never skips).

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use crate::config::RetryConfig;
use crate::deliver::retry::Backoff;
use crate::event::{DeliveryKey, RawMessage, Rejection};

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
}

/// One dead letter to write.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    pub raw: &'a RawMessage,
    pub rejection: &'a Rejection,
    pub provider_answer: Option<&'a str>,
    pub event_id: Option<&'a str>,
    pub delivery_key: Option<&'a DeliveryKey>,
}

pub struct DeadLetterWriter {
    producer: FutureProducer,
    topic: String,
    retry: RetryConfig,
}

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
            .set("message.timeout.ms", "30000");
        for (k, v) in properties {
            // Consumer-only properties would make the producer refuse to start.
            if !is_consumer_only(k) {
                config.set(k, v);
            }
        }
        let producer: FutureProducer = config.create()?;
        Ok(DeadLetterWriter {
            producer,
            topic: topic.to_string(),
            retry,
        })
    }

    /// Writes one dead letter and returns once the broker acknowledged it; retries forever.
    pub async fn write(&self, letter: DeadLetter<'_>) {
        let raw = letter.raw;
        let mut hs = OwnedHeaders::new_with_capacity(raw.headers.len() + 9);
        for (k, v) in &raw.headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(v.as_ref()),
            });
        }
        let partition = raw.source.partition.to_string();
        let offset = raw.source.offset.to_string();
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let detail = letter.rejection.detail.as_str();
        let mut add = |k: &str, v: &str| {
            let h = std::mem::replace(&mut hs, OwnedHeaders::new());
            hs = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        };
        add(headers::REASON, letter.rejection.reason.as_str());
        add(headers::DETAIL, detail);
        if let Some(a) = letter.provider_answer {
            add(headers::PROVIDER_ANSWER, a);
        }
        add(headers::SOURCE_TOPIC, &raw.source.topic);
        add(headers::SOURCE_PARTITION, &partition);
        add(headers::SOURCE_OFFSET, &offset);
        if let Some(id) = letter.event_id {
            add(headers::EVENT_ID, id);
        }
        if let Some(k) = letter.delivery_key {
            add(headers::DELIVERY_KEY, k.as_str());
        }
        add(headers::DEAD_LETTERED_AT, &at);
        let mut backoff = Backoff::new(&self.retry);
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
                .payload(raw.payload.as_ref())
                .headers(hs.clone());
            if let Some(k) = &raw.key {
                record = record.key(k.as_ref());
            }
            match self.producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => {
                    metrics::counter!("meterflow_events_dead_lettered_total", "reason" => letter.rejection.reason.as_str())
                        .increment(1);
                    tracing::info!(
                        event_id = letter.event_id.unwrap_or(""),
                        partition = raw.source.partition,
                        offset = raw.source.offset,
                        delivery_key = letter.delivery_key.map(|k| k.as_str()).unwrap_or(""),
                        reason = letter.rejection.reason.as_str(),
                        detail,
                        "event dead-lettered"
                    );
                    return;
                }
                Err((e, _)) => {
                    metrics::counter!("meterflow_dead_letter_write_errors_total").increment(1);
                    let wait = backoff.next_delay().max(Duration::from_millis(50));
                    tracing::error!(
                        topic = %self.topic,
                        partition = raw.source.partition,
                        offset = raw.source.offset,
                        error = %e,
                        retry_in_ms = wait.as_millis() as u64,
                        "dead-letter write failed; the partition waits"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Waits for outstanding writes (shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
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
