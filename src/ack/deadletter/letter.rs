//! What a dead letter looks like on the wire, and what to do when writing one fails. Pure: no
//! Kafka client, no clock (the time stamp is given).

use bytes::Bytes;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use sha2::{Digest, Sha256};

use super::headers;
use crate::event::SourceRef;

/// A dead letter ready to produce: the original key, payload and headers, then the
/// `meterflow.*` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LetterRecord {
    pub key: Option<Bytes>,
    pub payload: Bytes,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// librdkafka's default `message.max.bytes`, the producer's limit on one record.
pub const DEFAULT_MAX_BYTES: usize = 1_000_000;
/// Kept free below the limit for the record's and the batch's framing (librdkafka counts a
/// record's key, value and headers plus its own overhead of some 60 bytes).
const FRAMING: usize = 1024;
/// A header value of the letter's own (detail, provider answer) is clipped to this when the
/// letter does not fit otherwise.
const CLIPPED_HEADER: usize = 1024;
/// A letter this small that the broker calls too large was refused for the batch it rode in
/// with (another, larger letter): it is sent again unchanged.
pub const SMALL_LETTER: usize = 16 * 1024;

impl LetterRecord {
    /// The bytes librdkafka checks against `message.max.bytes` (key, value, headers), plus the
    /// framing of each header.
    pub fn size(&self) -> usize {
        let headers = self.headers.iter().fold(0usize, |sum, (k, v)| {
            sum.saturating_add(k.len())
                .saturating_add(v.len())
                .saturating_add(10)
        });
        self.key
            .as_ref()
            .map_or(0, Bytes::len)
            .saturating_add(self.payload.len())
            .saturating_add(headers)
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// The largest letter to produce under a producer limit of `max_bytes`.
pub fn budget(max_bytes: usize) -> usize {
    max_bytes.saturating_sub(FRAMING).max(FRAMING)
}

/// The letter as it can be written within `budget` bytes. One that fits is unchanged. One that
/// does not has its detail and provider answer clipped first; if that is not enough, it keeps
/// its source coordinates and reason and says what was cut — `meterflow.payload_truncated`,
/// the original's `meterflow.payload_size` and `meterflow.payload_sha256` — and its payload is
/// cut to what fits. If even the headers do not fit, the event's own headers are dropped
/// (`meterflow.headers_dropped` says how many).
pub fn fit(record: LetterRecord, budget: usize) -> LetterRecord {
    if record.size() <= budget {
        return record;
    }
    let mut fitted = record;
    for (k, v) in &mut fitted.headers {
        if k == headers::DETAIL || k == headers::PROVIDER_ANSWER {
            clip(v, CLIPPED_HEADER);
        }
    }
    if fitted.size() <= budget {
        return fitted;
    }
    let original = std::mem::take(&mut fitted.payload);
    fitted
        .headers
        .push((headers::PAYLOAD_TRUNCATED.into(), b"true".to_vec()));
    fitted.headers.push((
        headers::PAYLOAD_SIZE.into(),
        original.len().to_string().into_bytes(),
    ));
    fitted.headers.push((
        headers::PAYLOAD_SHA256.into(),
        hex::encode(Sha256::digest(&original)).into_bytes(),
    ));
    if fitted.size() > budget {
        let own = |k: &str| k.starts_with("meterflow.");
        let dropped = fitted.headers.iter().filter(|(k, _)| !own(k)).count();
        fitted.headers.retain(|(k, _)| own(k));
        if dropped > 0 {
            fitted.headers.push((
                headers::HEADERS_DROPPED.into(),
                dropped.to_string().into_bytes(),
            ));
        }
        if let Some(key) = &fitted.key {
            if key.len() > CLIPPED_HEADER {
                fitted.key = Some(key.slice(..CLIPPED_HEADER));
            }
        }
    }
    let room = budget.saturating_sub(fitted.size());
    fitted.payload = original.slice(..room.min(original.len()));
    fitted
}

/// Cuts UTF-8 text to at most `max` bytes, on a character boundary.
fn clip(value: &mut Vec<u8>, max: usize) {
    if value.len() <= max {
        return;
    }
    let mut end = max;
    while end > 0
        && value
            .get(end)
            .is_some_and(|b| (b & 0b1100_0000) == 0b1000_0000)
    {
        end -= 1;
    }
    value.truncate(end);
}

/// The dead-letter partition for a source offset: the source partition modulo the topic's
/// partitions, so one source partition's letters keep their order, and a writer knows where to
/// look for a letter whose acknowledgement it never saw.
pub fn partition_for(source: &SourceRef, partitions: i32) -> i32 {
    source.partition.rem_euclid(partitions.max(1))
}

/// Whether a letter read back is the one for `source`.
pub fn is_letter_for(hs: &[(&str, &[u8])], source: &SourceRef) -> bool {
    let text = |name: &str| {
        hs.iter()
            .rev()
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    };
    text(headers::SOURCE_TOPIC) == Some(source.topic.as_str())
        && text(headers::SOURCE_PARTITION) == Some(source.partition.to_string().as_str())
        && text(headers::SOURCE_OFFSET) == Some(source.offset.to_string().as_str())
}

/// What a failed write means, and so what the writer does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Over the producer's or the topic's size limit: write it smaller.
    TooLarge,
    /// The topic is missing or meterflow may not write to it: an operator has to act; the
    /// letter waits (nothing was written).
    Topic,
    /// The producer is unusable for good (librdkafka's fatal error, from the idempotent
    /// producer): make a new one. The letter may or may not have been written.
    Fatal,
    /// Refused before anything reached the topic (a full local queue, say): send again.
    NotWritten,
    /// Timed out, connection lost, broker errors: it may have been written. Look before
    /// sending again.
    Unknown,
}

impl Failure {
    pub fn of(e: &KafkaError) -> Failure {
        let code = match e {
            KafkaError::MessageProduction(code) => *code,
            _ => return Failure::Unknown,
        };
        match code {
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidMessageSize => Failure::TooLarge,
            RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed => Failure::Topic,
            RDKafkaErrorCode::Fatal => Failure::Fatal,
            RDKafkaErrorCode::QueueFull => Failure::NotWritten,
            _ => Failure::Unknown,
        }
    }

    /// The `kind` label of `meterflow_dead_letter_write_errors_total`.
    pub fn label(self) -> &'static str {
        match self {
            Failure::TooLarge => "too_large",
            Failure::Topic => "topic",
            Failure::Fatal => "fatal",
            Failure::NotWritten | Failure::Unknown => "transient",
        }
    }

    /// Whether the letter may be in the topic despite the error.
    pub fn maybe_written(self) -> bool {
        matches!(self, Failure::Fatal | Failure::Unknown)
    }
}

/// After the broker called a letter of `size` bytes too large: the budget to try next, or
/// `None` when the letter is small and was only refused with the batch it rode in.
pub fn smaller_budget(size: usize, budget: usize) -> Option<usize> {
    (size > SMALL_LETTER).then(|| budget.min(size / 2).max(SMALL_LETTER / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: usize, detail: usize, own_headers: usize) -> LetterRecord {
        let mut hs: Vec<(String, Vec<u8>)> = (0..own_headers)
            .map(|i| (format!("h{i}"), vec![b'v'; 100]))
            .collect();
        hs.push((headers::REASON.into(), b"invalid_json".to_vec()));
        hs.push((headers::DETAIL.into(), "é".repeat(detail).into_bytes()));
        hs.push((headers::SOURCE_TOPIC.into(), b"usage".to_vec()));
        hs.push((headers::SOURCE_PARTITION.into(), b"3".to_vec()));
        hs.push((headers::SOURCE_OFFSET.into(), b"17".to_vec()));
        LetterRecord {
            key: Some(Bytes::from_static(b"k1")),
            payload: Bytes::from(vec![b'x'; payload]),
            headers: hs,
        }
    }

    #[test]
    fn a_letter_that_fits_is_unchanged() {
        let r = record(1000, 10, 2);
        assert_eq!(fit(r.clone(), budget(DEFAULT_MAX_BYTES)), r);
    }

    #[test]
    fn a_999_kb_event_is_cut_to_fit_with_its_digest_and_coordinates() {
        let r = record(999_000, 200, 3);
        assert!(
            r.size() > budget(DEFAULT_MAX_BYTES),
            "the event plus meterflow's headers is over the limit"
        );
        let f = fit(r.clone(), budget(DEFAULT_MAX_BYTES));
        assert!(f.size() <= budget(DEFAULT_MAX_BYTES));
        assert!(f.payload.len() > 990_000, "as much as fits is kept");
        assert_eq!(&f.payload[..], &r.payload[..f.payload.len()]);
        assert_eq!(f.header(headers::PAYLOAD_TRUNCATED), Some(&b"true"[..]));
        assert_eq!(f.header(headers::PAYLOAD_SIZE), Some(&b"999000"[..]));
        assert_eq!(
            f.header(headers::PAYLOAD_SHA256),
            Some(hex::encode(Sha256::digest(&r.payload)).as_bytes())
        );
        assert_eq!(f.header(headers::SOURCE_OFFSET), Some(&b"17"[..]));
        assert_eq!(
            f.header("h0"),
            Some(&[b'v'; 100][..]),
            "the event's headers stay"
        );
        assert_eq!(f.key, r.key);
    }

    #[test]
    fn a_long_provider_answer_is_clipped_before_the_payload_is_cut() {
        let mut r = record(10_000, 1, 0);
        r.headers
            .push((headers::PROVIDER_ANSWER.into(), vec![b'a'; 2_000_000]));
        let f = fit(r.clone(), budget(DEFAULT_MAX_BYTES));
        assert_eq!(f.payload, r.payload, "the payload is whole");
        assert_eq!(f.header(headers::PAYLOAD_TRUNCATED), None);
        assert_eq!(
            f.header(headers::PROVIDER_ANSWER).unwrap().len(),
            CLIPPED_HEADER
        );
    }

    #[test]
    fn when_even_the_headers_do_not_fit_they_are_cut_too() {
        // A small budget (a topic's max.message.bytes) and a long detail.
        let r = record(50_000, 5_000, 40);
        let f = fit(r, 3000);
        assert!(f.size() <= 3000, "{}", f.size());
        assert_eq!(f.header("h0"), None);
        assert_eq!(f.header(headers::HEADERS_DROPPED), Some(&b"40"[..]));
        let detail = f.header(headers::DETAIL).unwrap();
        assert!(detail.len() <= CLIPPED_HEADER);
        assert!(
            std::str::from_utf8(detail).is_ok(),
            "cut on a character boundary"
        );
        assert_eq!(f.header(headers::SOURCE_PARTITION), Some(&b"3"[..]));
        assert_eq!(f.header(headers::PAYLOAD_SIZE), Some(&b"50000"[..]));
    }

    #[test]
    fn letters_go_to_the_source_partition_modulo_the_topic() {
        let s = |p| SourceRef {
            topic: "usage".into(),
            partition: p,
            offset: 0,
        };
        assert_eq!(partition_for(&s(5), 2), 1);
        assert_eq!(partition_for(&s(5), 1), 0);
        assert_eq!(
            partition_for(&s(5), 0),
            0,
            "an unknown count is one partition"
        );
        assert_eq!(partition_for(&s(-1), 4), 3, "never negative");
    }

    #[test]
    fn a_letter_read_back_is_matched_by_its_source_coordinates() {
        let s = SourceRef {
            topic: "usage".into(),
            partition: 3,
            offset: 17,
        };
        let hs: Vec<(&str, &[u8])> = vec![
            (headers::SOURCE_TOPIC, b"usage"),
            (headers::SOURCE_PARTITION, b"3"),
            (headers::SOURCE_OFFSET, b"17"),
        ];
        assert!(is_letter_for(&hs, &s));
        let other = SourceRef {
            offset: 170,
            ..s.clone()
        };
        assert!(!is_letter_for(&hs, &other));
        assert!(!is_letter_for(&hs[..2], &s));
    }

    #[test]
    fn failures_are_told_apart() {
        let f = |code| Failure::of(&KafkaError::MessageProduction(code));
        assert_eq!(f(RDKafkaErrorCode::MessageSizeTooLarge), Failure::TooLarge);
        assert_eq!(f(RDKafkaErrorCode::UnknownTopicOrPartition), Failure::Topic);
        assert_eq!(
            f(RDKafkaErrorCode::TopicAuthorizationFailed),
            Failure::Topic
        );
        assert_eq!(f(RDKafkaErrorCode::Fatal), Failure::Fatal);
        assert_eq!(f(RDKafkaErrorCode::MessageTimedOut), Failure::Unknown);
        assert_eq!(f(RDKafkaErrorCode::QueueFull), Failure::NotWritten);
        assert!(f(RDKafkaErrorCode::MessageTimedOut).maybe_written());
        assert!(!f(RDKafkaErrorCode::UnknownTopic).maybe_written());
    }

    #[test]
    fn a_big_letter_refused_as_too_large_halves_a_small_one_is_resent() {
        assert_eq!(smaller_budget(900_000, 998_976), Some(450_000));
        assert_eq!(smaller_budget(900_000, 100_000), Some(100_000));
        assert_eq!(smaller_budget(20_000, 998_976), Some(10_000));
        assert_eq!(smaller_budget(2_000, 998_976), None);
    }
}
