//! Which dead letters a replay picks, and what the replayed message looks like. Pure: no Kafka,
//! no clock reads (times are given).

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use crate::ack::deadletter::headers;
use crate::event::RejectReason;

/// The header a replayed message carries: `DLQ_TOPIC/PARTITION/OFFSET` of its dead letter.
pub const REPLAYED_FROM: &str = "meterflow.replayed_from";

/// What a dead letter says about itself, read from its headers (and, where a header is
/// missing, from the message: its timestamp, the event id at the configured pointer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LetterInfo {
    pub reason: Option<String>,
    pub event_id: Option<String>,
    pub delivery_key: Option<String>,
    pub source_topic: Option<String>,
    pub source_partition: Option<String>,
    pub source_offset: Option<String>,
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// The payload was cut to fit the topic (`meterflow.payload_truncated`): the original
    /// size and SHA-256, when the headers say.
    pub truncated: Option<(Option<String>, Option<String>)>,
}

impl LetterInfo {
    /// Reads the `meterflow.*` headers; `timestamp` (the Kafka message's, in ms) stands in for a
    /// missing or unreadable `meterflow.dead_lettered_at`.
    pub fn from_headers(hs: &[(String, Vec<u8>)], timestamp_ms: Option<i64>) -> LetterInfo {
        let text = |name: &str| {
            hs.iter()
                .rev()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
                .map(str::to_string)
        };
        let dead_lettered_at = text(headers::DEAD_LETTERED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc))
            .or_else(|| timestamp_ms.and_then(DateTime::from_timestamp_millis));
        LetterInfo {
            reason: text(headers::REASON),
            event_id: text(headers::EVENT_ID),
            delivery_key: text(headers::DELIVERY_KEY),
            source_topic: text(headers::SOURCE_TOPIC),
            source_partition: text(headers::SOURCE_PARTITION),
            source_offset: text(headers::SOURCE_OFFSET),
            dead_lettered_at,
            truncated: (text(headers::PAYLOAD_TRUNCATED).as_deref() == Some("true"))
                .then(|| (text(headers::PAYLOAD_SIZE), text(headers::PAYLOAD_SHA256))),
        }
    }
}

/// The source offsets of the letters seen so far in one scan. A second letter for the same
/// source offset (written again after a crash, by a version or a broker that could not
/// prevent it) is the same event: a replay skips it, and counts it.
#[derive(Debug, Default)]
pub struct SeenSources(HashSet<(String, String, String)>);

impl SeenSources {
    /// True when a letter for the same source topic, partition and offset was seen before.
    /// Letters without all three coordinates are never taken for copies.
    pub fn is_second_copy(&mut self, letter: &LetterInfo) -> bool {
        match (
            &letter.source_topic,
            &letter.source_partition,
            &letter.source_offset,
        ) {
            (Some(t), Some(p), Some(o)) => !self.0.insert((t.clone(), p.clone(), o.clone())),
            _ => false,
        }
    }
}

/// The replay's filters; every one given must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Empty: any reason.
    pub reasons: Vec<RejectReason>,
    /// Empty: any event.
    pub event_ids: HashSet<String>,
    /// Dead-lettered at or after.
    pub since: Option<DateTime<Utc>>,
    /// Dead-lettered before.
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    pub fn selects(&self, letter: &LetterInfo) -> bool {
        let reason_ok = self.reasons.is_empty()
            || letter
                .reason
                .as_deref()
                .and_then(RejectReason::parse)
                .is_some_and(|r| self.reasons.contains(&r));
        let event_ok = self.event_ids.is_empty()
            || letter
                .event_id
                .as_ref()
                .is_some_and(|id| self.event_ids.contains(id));
        // A letter with no time at all cannot be shown to be inside a window.
        let time_ok = match (self.since, self.until, letter.dead_lettered_at) {
            (None, None, _) => true,
            (_, _, None) => false,
            (since, until, Some(at)) => {
                since.is_none_or(|s| at >= s) && until.is_none_or(|u| at < u)
            }
        };
        reason_ok && event_ok && time_ok
    }
}

/// The replayed message's headers: the original event's own headers (every `meterflow.*` one
/// removed: they describe the dead letter, and a stale reason must not follow the event), plus
/// [`REPLAYED_FROM`].
pub fn replay_headers(hs: &[(String, Vec<u8>)], replayed_from: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = hs
        .iter()
        .filter(|(k, _)| !k.starts_with("meterflow."))
        .cloned()
        .collect();
    out.push((REPLAYED_FROM.to_string(), replayed_from.as_bytes().to_vec()));
    out
}

/// The event id at `pointer` in a JSON payload (a string, or a number as its text).
pub fn event_id_in_payload(payload: &[u8], pointer: &str) -> Option<String> {
    if pointer.is_empty() {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    match value.pointer(pointer)? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `--since` / `--until`: an RFC 3339 time, or a duration meaning "that long before `now`".
pub fn parse_time(flag: &str, text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(ago) = humantime::parse_duration(text.trim()) {
        if let Ok(ago) = chrono::Duration::from_std(ago) {
            if let Some(t) = now.checked_sub_signed(ago) {
                return Ok(t);
            }
        }
    }
    Err(format!(
        "{flag} {text:?}: expected an RFC 3339 time like 2026-11-20T00:00:00Z, or a duration \
         before now like 36h or 7d"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn letter(reason: &str, id: Option<&str>, when: &str) -> LetterInfo {
        let mut pairs = vec![
            ("meterflow.reason", reason),
            ("meterflow.dead_lettered_at", when),
        ];
        if let Some(id) = id {
            pairs.push(("meterflow.event_id", id));
        }
        LetterInfo::from_headers(&hs(&pairs), None)
    }

    #[test]
    fn reads_the_dead_letter_headers() {
        let info = LetterInfo::from_headers(
            &hs(&[
                ("traceparent", "00-abc"),
                ("meterflow.reason", "provider_rejected"),
                ("meterflow.source.topic", "usage"),
                ("meterflow.source.partition", "3"),
                ("meterflow.source.offset", "17"),
                ("meterflow.event_id", "evt_1"),
                ("meterflow.delivery_key", "mf1-00"),
                ("meterflow.dead_lettered_at", "2026-11-20T10:00:00.123Z"),
            ]),
            Some(0),
        );
        assert_eq!(info.reason.as_deref(), Some("provider_rejected"));
        assert_eq!(info.source_topic.as_deref(), Some("usage"));
        assert_eq!(info.source_partition.as_deref(), Some("3"));
        assert_eq!(info.source_offset.as_deref(), Some("17"));
        assert_eq!(info.event_id.as_deref(), Some("evt_1"));
        assert_eq!(info.delivery_key.as_deref(), Some("mf1-00"));
        assert_eq!(info.dead_lettered_at, Some(at("2026-11-20T10:00:00.123Z")));
        // The message timestamp stands in for a missing header.
        let info = LetterInfo::from_headers(&[], Some(1_700_000_000_000));
        assert_eq!(
            info.dead_lettered_at,
            DateTime::from_timestamp_millis(1_700_000_000_000)
        );
    }

    #[test]
    fn filters_by_reason_event_id_and_time_window() {
        let a = letter("unknown_metric", None, "2026-11-20T10:00:00Z");
        let b = letter("provider_rejected", Some("evt_2"), "2026-11-21T00:00:00Z");
        assert!(Filter::default().selects(&a));

        let by_reason = Filter {
            reasons: vec![RejectReason::UnknownMetric],
            ..Filter::default()
        };
        assert!(by_reason.selects(&a));
        assert!(!by_reason.selects(&b));

        let by_id = Filter {
            event_ids: ["evt_2".to_string()].into(),
            ..Filter::default()
        };
        assert!(!by_id.selects(&a), "no event id: not that event");
        assert!(by_id.selects(&b));

        // since inclusive, until exclusive: consecutive windows never replay a letter twice.
        let day = Filter {
            since: Some(at("2026-11-20T00:00:00Z")),
            until: Some(at("2026-11-21T00:00:00Z")),
            ..Filter::default()
        };
        assert!(day.selects(&a));
        assert!(!day.selects(&b));
        let next_day = Filter {
            since: Some(at("2026-11-21T00:00:00Z")),
            ..Filter::default()
        };
        assert!(next_day.selects(&b));
        assert!(
            !day.selects(&LetterInfo::default()),
            "no time: outside any window"
        );
        assert!(!by_reason.selects(&letter("no_such_reason", None, "2026-11-20T10:00:00Z")));
    }

    #[test]
    fn a_second_letter_for_the_same_source_offset_is_a_copy() {
        let at = |o: &str| {
            LetterInfo::from_headers(
                &hs(&[
                    ("meterflow.source.topic", "usage"),
                    ("meterflow.source.partition", "1"),
                    ("meterflow.source.offset", o),
                ]),
                None,
            )
        };
        let mut seen = SeenSources::default();
        assert!(!seen.is_second_copy(&at("5")));
        assert!(!seen.is_second_copy(&at("6")));
        assert!(seen.is_second_copy(&at("5")));
        let no_coordinates = LetterInfo::default();
        assert!(!seen.is_second_copy(&no_coordinates));
        assert!(
            !seen.is_second_copy(&no_coordinates),
            "never a copy without coordinates"
        );
    }

    #[test]
    fn a_truncated_letter_says_so() {
        let info = LetterInfo::from_headers(
            &hs(&[
                ("meterflow.payload_truncated", "true"),
                ("meterflow.payload_size", "999000"),
                ("meterflow.payload_sha256", "ab12"),
            ]),
            None,
        );
        assert_eq!(
            info.truncated,
            Some((Some("999000".into()), Some("ab12".into())))
        );
        assert_eq!(LetterInfo::default().truncated, None);
    }

    #[test]
    fn replayed_headers_keep_the_events_own_and_say_where_from() {
        let out = replay_headers(
            &hs(&[
                ("traceparent", "00-abc"),
                ("meterflow.reason", "unknown_metric"),
                ("meterflow.replayed_from", "older/0/1"),
                ("tenant", "acme"),
            ]),
            "usage-dlq/0/42",
        );
        assert_eq!(
            out,
            hs(&[
                ("traceparent", "00-abc"),
                ("tenant", "acme"),
                ("meterflow.replayed_from", "usage-dlq/0/42"),
            ])
        );
    }

    #[test]
    fn finds_the_event_id_at_the_configured_pointer() {
        assert_eq!(
            event_id_in_payload(br#"{"id":"evt_1"}"#, "/id").as_deref(),
            Some("evt_1")
        );
        assert_eq!(
            event_id_in_payload(br#"{"meta":{"uuid":42}}"#, "/meta/uuid").as_deref(),
            Some("42")
        );
        assert_eq!(event_id_in_payload(b"{not json", "/id"), None);
        assert_eq!(event_id_in_payload(br#"{"id":""}"#, "/id"), None);
        assert_eq!(event_id_in_payload(br#"{"id":"x"}"#, ""), None);
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let now = at("2026-11-21T12:00:00Z");
        assert_eq!(
            parse_time("--since", "2026-11-20T00:00:00+01:00", now),
            Ok(at("2026-11-19T23:00:00Z"))
        );
        assert_eq!(
            parse_time("--since", "36h", now),
            Ok(at("2026-11-20T00:00:00Z"))
        );
        let e = parse_time("--until", "yesterday", now).unwrap_err();
        assert!(
            e.contains("--until \"yesterday\"") && e.contains("RFC 3339"),
            "{e}"
        );
    }
}
