//! `meterflow trace`: one event's state from the ledger (delivered, in flight, refused by the
//! provider, dead-lettered, voided, or unknown), or the events summed into one usage record.
//!
//! Exit codes as grep's: 0 found, 1 not found (unknown to the ledger), 2 error.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

use crate::ack::ledger::trace::{DeliveryEntry, EventRecord, UsageRecord, VoidEntry};
use crate::ack::ledger::LedgerStore;
use crate::config::{Config, SinkKind};
use crate::event::{is_billwerk_contract_id, DeliveryKey};

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The service's config (its `[ledger] url` is read).
    #[arg(long, short, env = "METERFLOW_CONFIG")]
    pub config: PathBuf,
    /// The event id to trace.
    #[arg(
        value_name = "EVENT_ID",
        required_unless_present = "usage_id",
        conflicts_with = "usage_id"
    )]
    pub event_id: Option<String>,
    /// List the ids of the events summed into this usage record (the provider's record id).
    #[arg(long, value_name = "ID")]
    pub usage_id: Option<String>,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Exit codes (grep's convention).
pub const FOUND: u8 = 0;
pub const NOT_FOUND: u8 = 1;
pub const ERROR: u8 = 2;

/// Longest text from the ledger (provider answers, dead-letter details) shown per field.
const SHOWN_CHARS: usize = 600;

pub async fn run(args: TraceArgs) -> u8 {
    match trace(&args).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ERROR
        }
    }
}

async fn trace(args: &TraceArgs) -> Result<u8, String> {
    let config = Config::load(&args.config).map_err(|e| e.to_string())?;
    let store = open_ledger(&config).await?;
    match (&args.event_id, &args.usage_id) {
        (Some(id), _) => {
            check_event_id(id)?;
            let record = store.trace_event(id).await.map_err(|e| e.to_string())?;
            let lease = crate::ack::ledger::lease_for(&config);
            let state = EventState::of(&record);
            let with = Shown {
                lease,
                dlq_topic: &config.kafka.dead_letter_topic,
            };
            if args.json {
                println!("{}", event_json(id, state, &record, &with));
            } else {
                print!("{}", event_text(id, state, &record, &with));
            }
            Ok(if state == EventState::Unknown {
                NOT_FOUND
            } else {
                FOUND
            })
        }
        (None, Some(usage_id)) => {
            check_usage_id(config.sink.kind(), usage_id)?;
            let record = store
                .usage_record(usage_id)
                .await
                .map_err(|e| e.to_string())?;
            match record {
                Some(record) => {
                    if args.json {
                        println!("{}", usage_json(usage_id, &record));
                    } else {
                        print!("{}", usage_text(usage_id, &record));
                    }
                    Ok(FOUND)
                }
                None => {
                    if args.json {
                        println!("{}", json!({"usage_id": usage_id, "state": "unknown"}));
                    } else {
                        println!(
                            "usage record {usage_id}: unknown to the ledger (not delivered by \
                             meterflow, or pruned after the retention period)"
                        );
                    }
                    Ok(NOT_FOUND)
                }
            }
        }
        (None, None) => Err("give an EVENT_ID or --usage-id ID".to_string()),
    }
}

/// The service's ledger, which must exist (a trace never creates one).
pub(crate) async fn open_ledger(config: &Config) -> Result<LedgerStore, String> {
    let url = config.ledger.url.trim();
    if url.is_empty() || url == "none" {
        return Err(
            "ledger.url is \"none\": without a ledger meterflow keeps no record of \
                    events to look up"
                .to_string(),
        );
    }
    LedgerStore::connect_existing(url).await
}

pub(crate) fn check_event_id(id: &str) -> Result<(), String> {
    let chars = id.chars().count();
    if id.is_empty() || chars > crate::decode::MAX_ID_CHARS {
        return Err(format!(
            "event id {:?} is {chars} characters long: meterflow accepts ids of 1 to {} characters",
            crate::decode::truncate_chars(id, 100),
            crate::decode::MAX_ID_CHARS
        ));
    }
    Ok(())
}

/// billwerk record ids are 24 hexadecimal characters, like contract ids (checked before they
/// go into a request path); Billingrails receipts are request ids of no fixed shape.
pub(crate) fn check_usage_id(sink: SinkKind, id: &str) -> Result<(), String> {
    let ok = match sink {
        SinkKind::Billwerk => is_billwerk_contract_id(id),
        SinkKind::Billingrails => {
            !id.is_empty() && id.len() <= 200 && id.chars().all(|c| c.is_ascii_graphic())
        }
    };
    if ok {
        return Ok(());
    }
    let expected = match sink {
        SinkKind::Billwerk => "a billwerk usage id: exactly 24 hexadecimal characters",
        SinkKind::Billingrails => "a Billingrails request id: 1 to 200 printable characters",
    };
    Err(format!(
        "usage id {:?} is not {expected}",
        crate::decode::truncate_chars(id, 100)
    ))
}

/// What `meterflow trace` answers for an event, most final first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventState {
    Delivered,
    Voided,
    Refused,
    DeadLettered,
    InFlight,
    Unknown,
}

impl EventState {
    pub fn of(record: &EventRecord) -> EventState {
        let state = record.delivery.as_ref().map(|d| d.state.as_str());
        match state {
            Some("delivered") => EventState::Delivered,
            Some("voided") => EventState::Voided,
            Some("rejected") => EventState::Refused,
            _ if !record.dead_letters.is_empty() => EventState::DeadLettered,
            // A void with --rebill removed the entry: voided until the event comes back.
            None if !record.voids.is_empty() => EventState::Voided,
            Some(_) => EventState::InFlight,
            None if record.dead_letter_intent.is_some() || record.origin.is_some() => {
                EventState::InFlight
            }
            None => EventState::Unknown,
        }
    }

    fn label(self) -> &'static str {
        match self {
            EventState::Delivered => "delivered",
            EventState::Voided => "voided",
            EventState::Refused => "refused by the provider",
            EventState::DeadLettered => "dead-lettered",
            EventState::InFlight => "in flight",
            EventState::Unknown => "unknown to the ledger",
        }
    }

    fn json_name(self) -> &'static str {
        match self {
            EventState::Delivered => "delivered",
            EventState::Voided => "voided",
            EventState::Refused => "refused",
            EventState::DeadLettered => "dead_lettered",
            EventState::InFlight => "in_flight",
            EventState::Unknown => "unknown",
        }
    }
}

fn time(ms: i64) -> String {
    crate::ack::ledger::from_ms(ms).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Text from the ledger (which holds provider answers and producers' bytes) made safe for a
/// terminal: control characters escaped, length bounded.
pub(crate) fn shown(text: &str) -> String {
    let escaped: String = text
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    crate::decode::truncate_chars(&escaped, SHOWN_CHARS)
}

fn is_aggregate(event_id: &str, delivery: &DeliveryEntry) -> bool {
    delivery.event_count > 1 || delivery.delivery_key != DeliveryKey::for_event(event_id).0
}

/// What the config adds to the ledger's answer.
struct Shown<'a> {
    /// The ledger's lease (none on SQLite).
    lease: Duration,
    /// Where dead letters go (the ledger records partition and offset, not the topic).
    dlq_topic: &'a str,
}

fn event_text(id: &str, state: EventState, record: &EventRecord, with: &Shown<'_>) -> String {
    let lease = with.lease;
    use std::fmt::Write;
    let mut out = String::new();
    if state == EventState::Unknown {
        let _ = writeln!(
            out,
            "event {}: {} (never consumed by meterflow with this ledger, or pruned after the \
             retention period)",
            shown(id),
            state.label()
        );
        return out;
    }
    let _ = writeln!(out, "event {}: {}", shown(id), state.label());
    let mut line = |name: &str, value: String| {
        let _ = writeln!(out, "  {name:<16}{value}");
    };
    if let Some(d) = &record.delivery {
        line("delivery key", d.delivery_key.clone());
        match d.state.as_str() {
            "delivered" | "voided" => {
                line(
                    "usage record",
                    d.receipt.as_deref().map(shown).unwrap_or_default(),
                );
                let at = d.delivered_at_ms.unwrap_or(d.updated_at_ms);
                line("delivered at", time(at));
            }
            "rejected" => {
                line(
                    "provider answer",
                    shown(d.receipt.as_deref().unwrap_or("(none recorded)")),
                );
                line("refused at", time(d.updated_at_ms));
            }
            "abandoned" => {
                line(
                    "sending",
                    format!(
                        "an aggregate first sent at {} never reached the provider; its events \
                         are being aggregated anew",
                        time(d.first_sent_at_ms)
                    ),
                );
            }
            _ => {
                line("sending since", time(d.first_sent_at_ms));
                line("lease", lease_text(d, lease));
            }
        }
        if is_aggregate(id, d) {
            line(
                "aggregate",
                match (&d.receipt, d.state.as_str()) {
                    (Some(r), "delivered" | "voided") => format!(
                        "one usage record summing {} events (meterflow trace --usage-id {} \
                         lists them)",
                        d.event_count,
                        shown(r)
                    ),
                    _ => format!("one delivery summing {} events", d.event_count),
                },
            );
        }
    }
    for v in &record.voids {
        line("voided", void_text(v));
    }
    if let Some(o) = &record.origin {
        line(
            "source",
            format!(
                "{} partition {} offset {}",
                shown(&o.topic),
                o.partition,
                o.offset
            ),
        );
        line("contract", shown(&o.customer));
        line(
            "claimed",
            format!("at {} by {}", time(o.claimed_at_ms), shown(&o.claimed_by)),
        );
    }
    for l in &record.dead_letters {
        let reason = l.reason.as_deref().unwrap_or("(reason not recorded)");
        line(
            "dead letter",
            match (l.dlq_partition, l.dlq_offset) {
                (Some(p), Some(o)) => format!(
                    "{reason}: {} partition {p} offset {o}, written at {}",
                    shown(with.dlq_topic),
                    time(l.written_at_ms)
                ),
                _ => format!("{reason}: written at {}", time(l.written_at_ms)),
            },
        );
        if let Some(detail) = &l.detail {
            line("reason detail", shown(detail));
        }
        if record.origin.is_none() {
            line(
                "source",
                format!(
                    "{} partition {} offset {}",
                    shown(&l.topic),
                    l.partition,
                    l.offset
                ),
            );
        }
    }
    if let Some(i) = &record.dead_letter_intent {
        line(
            "dead letter",
            format!(
                "being written into {} partition {} since {} (stamped {})",
                shown(with.dlq_topic),
                i.dlq_partition,
                time(i.started_at_ms),
                time(i.updated_at_ms)
            ),
        );
    }
    out
}

fn lease_text(d: &DeliveryEntry, lease: Duration) -> String {
    if lease.is_zero() {
        return format!(
            "stamped at {}; SQLite ledger (one replica): the process running the partition \
             owns it, and after a restart it is reconciled with the provider before any re-send",
            time(d.updated_at_ms)
        );
    }
    let until = d
        .updated_at_ms
        .saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
    format!(
        "stamped at {}, runs until {} (then another replica may take it over and reconcile)",
        time(d.updated_at_ms),
        time(until)
    )
}

fn void_text(v: &VoidEntry) -> String {
    format!(
        "usage record {} of contract {} deleted by meterflow void at {} ({} event{}); {}",
        shown(&v.usage_id),
        shown(&v.contract_id),
        time(v.voided_at_ms),
        v.event_count,
        if v.event_count == 1 { "" } else { "s" },
        if v.rebill {
            "--rebill: billed again if redelivered"
        } else {
            "never billed again"
        }
    )
}

fn delivery_json(d: &DeliveryEntry) -> Value {
    json!({
        "delivery_key": d.delivery_key,
        "state": d.state,
        "receipt": d.receipt,
        "event_count": d.event_count,
        "first_sent_at": time(d.first_sent_at_ms),
        "updated_at": time(d.updated_at_ms),
        "delivered_at": d.delivered_at_ms.map(time),
    })
}

fn void_json(v: &VoidEntry) -> Value {
    json!({
        "usage_id": v.usage_id,
        "contract_id": v.contract_id,
        "delivery_key": v.delivery_key,
        "event_count": v.event_count,
        "rebill": v.rebill,
        "voided_at": time(v.voided_at_ms),
    })
}

fn event_json(id: &str, state: EventState, record: &EventRecord, with: &Shown<'_>) -> Value {
    let lease = with.lease;
    let delivery = record.delivery.as_ref();
    json!({
        "event_id": id,
        "state": state.json_name(),
        "delivery": delivery.map(delivery_json),
        "aggregate": delivery.map(|d| is_aggregate(id, d)),
        "lease_ms": delivery
            .filter(|d| d.state == "sending")
            .map(|_| u64::try_from(lease.as_millis()).unwrap_or(u64::MAX)),
        "origin": record.origin.as_ref().map(|o| json!({
            "topic": o.topic,
            "partition": o.partition,
            "offset": o.offset,
            "contract": o.customer,
            "claimed_by": o.claimed_by,
            "claimed_at": time(o.claimed_at_ms),
        })),
        "dead_letters": record.dead_letters.iter().map(|l| json!({
            "reason": l.reason,
            "detail": l.detail,
            "dead_letter_topic": with.dlq_topic,
            "dead_letter_partition": l.dlq_partition,
            "dead_letter_offset": l.dlq_offset,
            "written_at": time(l.written_at_ms),
            "source": {"topic": l.topic, "partition": l.partition, "offset": l.offset},
        })).collect::<Vec<_>>(),
        "dead_letter_in_progress": record.dead_letter_intent.as_ref().map(|i| json!({
            "dead_letter_topic": with.dlq_topic,
            "dead_letter_partition": i.dlq_partition,
            "started_at": time(i.started_at_ms),
            "updated_at": time(i.updated_at_ms),
        })),
        "voids": record.voids.iter().map(void_json).collect::<Vec<_>>(),
    })
}

fn usage_state(record: &UsageRecord) -> &str {
    match &record.delivery {
        Some(d) => d.state.as_str(),
        None => "voided",
    }
}

fn usage_text(usage_id: &str, record: &UsageRecord) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let count = record
        .delivery
        .as_ref()
        .map(|d| d.event_count)
        .or_else(|| record.voids.first().map(|v| v.event_count))
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "usage record {}: {}, {count} event{} (delivery key {})",
        shown(usage_id),
        usage_state(record),
        if count == 1 { "" } else { "s" },
        record.delivery_key
    );
    if let Some(customer) = &record.customer {
        let _ = writeln!(out, "  contract {}", shown(customer));
    }
    for v in &record.voids {
        let _ = writeln!(out, "  voided: {}", void_text(v));
    }
    let known = i64::try_from(record.event_ids.len()).unwrap_or(i64::MAX);
    if known < count {
        let _ = writeln!(
            out,
            "  {} of the {count} event ids are not in the ledger (recorded before it kept ids, \
             or pruned)",
            count.saturating_sub(known)
        );
    }
    for id in &record.event_ids {
        let _ = writeln!(out, "{}", shown(id));
    }
    out
}

fn usage_json(usage_id: &str, record: &UsageRecord) -> Value {
    json!({
        "usage_id": usage_id,
        "state": usage_state(record),
        "delivery_key": record.delivery_key,
        "delivery": record.delivery.as_ref().map(delivery_json),
        "contract": record.customer,
        "event_ids": record.event_ids,
        "voids": record.voids.iter().map(void_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::ledger::trace::DeadLetterEntry;

    fn delivery(state: &str) -> DeliveryEntry {
        DeliveryEntry {
            delivery_key: DeliveryKey::for_event("e").0,
            state: state.into(),
            receipt: Some("6b0e00000000000000000001".into()),
            event_count: 1,
            first_sent_at_ms: 0,
            updated_at_ms: 0,
            delivered_at_ms: None,
        }
    }

    #[test]
    fn the_most_final_state_wins() {
        let letter = DeadLetterEntry {
            topic: "usage".into(),
            partition: 0,
            offset: 1,
            written_at_ms: 0,
            event_id: Some("e".into()),
            reason: Some("id_conflict".into()),
            detail: None,
            dlq_partition: Some(0),
            dlq_offset: Some(0),
        };
        let mut record = EventRecord::default();
        assert_eq!(EventState::of(&record), EventState::Unknown);
        record.delivery = Some(delivery("sending"));
        assert_eq!(EventState::of(&record), EventState::InFlight);
        record.dead_letters.push(letter);
        assert_eq!(EventState::of(&record), EventState::DeadLettered);
        record.delivery = Some(delivery("delivered"));
        assert_eq!(
            EventState::of(&record),
            EventState::Delivered,
            "a later copy reusing the id was dead-lettered; the event itself is delivered"
        );
        record.delivery = Some(delivery("rejected"));
        assert_eq!(EventState::of(&record), EventState::Refused);
    }

    #[test]
    fn ledger_text_cannot_drive_the_terminal() {
        let s = shown("ok\u{1b}[2J\nnext");
        assert!(!s.chars().any(char::is_control), "{s:?}");
        assert!(shown(&"x".repeat(10_000)).chars().count() <= SHOWN_CHARS + 1);
    }

    #[test]
    fn usage_ids_are_checked_like_path_segments() {
        assert!(check_usage_id(SinkKind::Billwerk, "6b0e00000000000000000001").is_ok());
        assert!(check_usage_id(SinkKind::Billwerk, "../../contracts/x").is_err());
        assert!(check_usage_id(SinkKind::Billwerk, "6b0e0000000000000000000").is_err());
        assert!(check_usage_id(SinkKind::Billingrails, "req_1").is_ok());
        assert!(check_usage_id(SinkKind::Billingrails, "a b").is_err());
    }
}
