//! The stored events, deduplicated by their `idempotency_key`: a repeated key is accepted but not
//! stored again, as Billingrails documents ("the server dedupes").

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::events::IncomingEvent;
use crate::stats::{PerKey, RecordStats};

/// One stored event, as `GET /_emulator/records` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BillingrailsEvent {
    /// `evt_` and 24 hex characters, in creation order.
    pub id: String,
    pub event_name: String,
    /// As sent; numbers keep their exact decimal text.
    pub properties: Map<String, Value>,
    /// The delivery key.
    pub idempotency_key: Option<String>,
    /// The event's own time (the receipt time when it carried none).
    pub timestamp: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored,
    /// Its `idempotency_key` was already stored: accepted, not stored.
    Duplicate,
}

/// An event as kept in memory: properties as compact JSON text (a parsed map costs ~1 KB),
/// the event name and key shared. The id derives from the sequence.
struct StoredEvent {
    sequence: u64,
    event_name: Arc<str>,
    properties_json: Box<str>,
    idempotency_key: Option<Arc<str>>,
    timestamp: DateTime<Utc>,
    created_at: DateTime<Utc>,
}

#[derive(Default)]
pub struct EventLog {
    events: Vec<StoredEvent>,
    event_names: HashSet<Arc<str>>,
    stored_keys: HashSet<Arc<str>>,
    duplicates_ignored: u64,
    /// Never reset, so ids stay unique across `clear`.
    next_sequence: u64,
}

impl EventLog {
    pub fn append(&mut self, event: IncomingEvent, now: DateTime<Utc>) -> Appended {
        let idempotency_key: Option<Arc<str>> = event.idempotency_key.map(Arc::from);
        if let Some(key) = &idempotency_key {
            if !self.stored_keys.insert(key.clone()) {
                self.duplicates_ignored += 1;
                return Appended::Duplicate;
            }
        }
        let event_name = match self.event_names.get(event.event_name.as_str()) {
            Some(shared) => shared.clone(),
            None => {
                let shared: Arc<str> = Arc::from(event.event_name);
                self.event_names.insert(shared.clone());
                shared
            }
        };
        let properties_json = serde_json::to_string(&event.properties)
            .expect("a JSON map always serializes")
            .into_boxed_str();
        self.events.push(StoredEvent {
            sequence: self.next_sequence,
            event_name,
            properties_json,
            idempotency_key,
            timestamp: event.timestamp.unwrap_or(now),
            created_at: now,
        });
        self.next_sequence += 1;
        Appended::Stored
    }

    pub fn events(&self) -> Vec<BillingrailsEvent> {
        self.events
            .iter()
            .map(|stored| BillingrailsEvent {
                id: format!("evt_{:024x}", stored.sequence),
                event_name: stored.event_name.to_string(),
                properties: serde_json::from_str(&stored.properties_json)
                    .expect("stored properties are JSON written by append"),
                idempotency_key: stored.idempotency_key.as_deref().map(str::to_string),
                timestamp: stored.timestamp,
                created_at: stored.created_at,
            })
            .collect()
    }

    pub fn stats(&self, per_key: PerKey) -> RecordStats {
        RecordStats {
            records: self.events.len() as u64,
            delivery_keys: self.stored_keys.len() as u64,
            // An idempotency key is stored once: a second event with it is ignored.
            duplicate_keys: 0,
            records_per_delivery_key: match per_key {
                PerKey::Listed => self
                    .stored_keys
                    .iter()
                    .map(|key| (key.to_string(), 1))
                    .collect(),
                PerKey::Counted => Default::default(),
            },
            duplicate_events_ignored: self.duplicates_ignored,
        }
    }

    pub fn clear(&mut self) {
        self.events.clear();
        self.event_names.clear();
        self.stored_keys.clear();
        self.duplicates_ignored = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: Option<&str>) -> IncomingEvent {
        IncomingEvent {
            event_name: "e".into(),
            properties: Map::new(),
            idempotency_key: key.map(str::to_string),
            timestamp: None,
        }
    }

    #[test]
    fn repeated_keys_are_accepted_once_and_counted() {
        let mut log = EventLog::default();
        let now = Utc::now();
        assert_eq!(log.append(event(Some("k")), now), Appended::Stored);
        assert_eq!(log.append(event(Some("k")), now), Appended::Duplicate);
        assert_eq!(log.append(event(None), now), Appended::Stored);
        assert_eq!(
            log.append(event(None), now),
            Appended::Stored,
            "no key, no dedupe"
        );
        let stats = log.stats(PerKey::Listed);
        assert_eq!(stats.records, 3);
        assert_eq!(stats.duplicate_events_ignored, 1);
        assert_eq!(stats.records_per_delivery_key["k"], 1);
        assert_eq!((stats.delivery_keys, stats.duplicate_keys), (1, 0));
        let counted = log.stats(PerKey::Counted);
        assert!(counted.records_per_delivery_key.is_empty());
        assert_eq!((counted.records, counted.delivery_keys), (3, 1));
        assert_eq!(
            log.events()[0].timestamp,
            now,
            "no timestamp: the receipt time"
        );
        log.clear();
        assert_eq!(log.append(event(Some("k")), now), Appended::Stored);
    }
}
