//! Is the letter for a source offset already in the dead-letter topic? Asked when a write's
//! outcome is unknown (a crash after the intent was recorded, a timeout, a lost connection, a
//! fatal producer error): the dead-letter partition is read from the offset its end had before
//! the write (the floor the ledger kept) to its end now. Blocking: run it off the runtime.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::letter::is_letter_for;
use crate::event::SourceRef;

/// What the look-up found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A letter with those coordinates, at this offset of the dead-letter partition.
    Found { offset: i64 },
    /// Nothing with those coordinates between the floor and the partition's end.
    Absent,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot read the dead-letter topic: {0}")]
    Kafka(#[from] KafkaError),
    #[error(
        "no message from dead-letter partition {partition} for {idle:?} before offset {end} \
         (read up to {at}); the look-up is retried"
    )]
    Stalled {
        partition: i32,
        idle: Duration,
        at: i64,
        end: i64,
    },
}

/// Requests to the broker (watermarks) and the longest wait for the next message.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Reads `topic`/`partition` from `floor` to its end for the letter of `source`.
pub fn find(
    client: &ClientConfig,
    topic: &str,
    partition: i32,
    floor: i64,
    source: &SourceRef,
) -> Result<Lookup, LookupError> {
    let consumer: BaseConsumer = client.create()?;
    let (low, high) = consumer.fetch_watermarks(topic, partition, TIMEOUT)?;
    // Below `low` retention has deleted everything, letters included.
    let start = floor.max(low);
    if start >= high {
        return Ok(Lookup::Absent);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
    consumer.assign(&tpl)?;
    let mut at = start;
    let mut last_message = Instant::now();
    while at < high {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last_message = Instant::now();
                at = m.offset().saturating_add(1);
                let headers: Vec<(&str, &[u8])> = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key, h.value.unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default();
                if is_letter_for(&headers, source) {
                    return Ok(Lookup::Found { offset: m.offset() });
                }
            }
            // The end (a gap before the watermark, e.g. a control record, ends it too).
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(Lookup::Absent),
            Some(Err(e)) => tracing::debug!(error = %e, "reading the dead-letter topic"),
            None => {}
        }
        if last_message.elapsed() > TIMEOUT {
            return Err(LookupError::Stalled {
                partition,
                idle: TIMEOUT,
                at,
                end: high,
            });
        }
    }
    Ok(Lookup::Absent)
}

/// The consumer settings of a look-up: the service's `kafka.properties` (TLS, SASL), no group
/// membership, no commits.
pub fn client_config(brokers: &str, properties: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        if !is_producer_only(k) {
            c.set(k, v);
        }
    }
    c.set("group.id", "meterflow-dead-letter-lookup")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
    c
}

/// Producer-only properties a consumer would warn about.
fn is_producer_only(key: &str) -> bool {
    matches!(
        key,
        "acks" | "enable.idempotence" | "linger.ms" | "message.timeout.ms" | "compression.type"
    ) || key.starts_with("batch.")
        || key.starts_with("queue.buffering")
}
