//! The id-conflict check: an event id keeps the content digest it was first claimed with, kept
//! in its origin row (`meterflow_event_origins.digest`); another event reusing the id with
//! another digest is a conflict.
//!
//! Ledgers written before the digest moved into the origin row kept it in a table of its own,
//! `meterflow_event_contents`, keyed by the event key. Their rows stay authoritative until
//! retention prunes them: an origin row without a digest is looked up there, and while that
//! table holds any row at all (see [`super::LedgerStore::legacy_contents`]) so is every id.

use std::collections::{HashMap, HashSet};

use sqlx::{AnyConnection, Row};

use super::{for_backend, placeholders};
use crate::ack::ledger::{EventContent, EventOrigin};
use crate::event::DeliveryKey;

/// Ids per look-up statement (one parameter each).
const CHUNK: usize = 300;

/// The first copy of each event id among `items` (whose origin `origin` gives), in order.
/// Later copies of an id are the same event when their digest matches and a conflict when
/// not; [`conflicts`] tells which.
pub(super) fn firsts<T>(
    items: &[T],
    origin: impl Fn(&T) -> &EventOrigin,
) -> impl Iterator<Item = &T> {
    let mut seen = HashSet::with_capacity(items.len());
    items
        .iter()
        .filter(move |item| seen.insert(origin(item).event_id.as_str()))
}

/// The digests recorded for `ids`: from their origin rows, and from the legacy table for rows
/// without one (and, while `legacy` holds, for ids without a row). An id whose origin this
/// transaction has just inserted is not one of `ids`: its row holds its own digest.
pub(super) async fn recorded(
    conn: &mut AnyConnection,
    ids: &[&str],
    legacy: bool,
) -> Result<HashMap<String, String>, sqlx::Error> {
    let mut found: HashMap<String, String> = HashMap::new();
    let mut unknown: Vec<&str> = Vec::new();
    for chunk in ids.chunks(CHUNK) {
        let sql = format!(
            "SELECT event_id, digest FROM meterflow_event_origins WHERE event_id IN ({})",
            placeholders(1, chunk.len())
        );
        let sql = for_backend(conn, sql);
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(*id);
        }
        let mut rows: HashSet<String> = HashSet::new();
        for row in query.fetch_all(&mut *conn).await? {
            let id: String = row.try_get(0)?;
            match row.try_get::<Option<String>, _>(1)? {
                Some(digest) => {
                    found.insert(id, digest);
                }
                None => {
                    rows.insert(id);
                }
            }
        }
        unknown.extend(
            chunk
                .iter()
                .copied()
                .filter(|id| rows.contains(*id) || (legacy && !found.contains_key(*id))),
        );
    }
    found.extend(legacy_digests(conn, &unknown).await?);
    Ok(found)
}

/// The digests the legacy table holds for `ids`.
pub(super) async fn legacy_digests(
    conn: &mut AnyConnection,
    ids: &[&str],
) -> Result<HashMap<String, String>, sqlx::Error> {
    let mut found = HashMap::new();
    for chunk in ids.chunks(CHUNK) {
        let by_key: HashMap<String, &str> = chunk
            .iter()
            .map(|id| (DeliveryKey::for_event(id).0, *id))
            .collect();
        let sql = format!(
            "SELECT event_key, digest FROM meterflow_event_contents WHERE event_key IN ({})",
            placeholders(1, by_key.len())
        );
        let sql = for_backend(conn, sql);
        let mut query = sqlx::query(&sql);
        for key in by_key.keys() {
            query = query.bind(key.as_str());
        }
        for row in query.fetch_all(&mut *conn).await? {
            let key: String = row.try_get(0)?;
            if let Some(id) = by_key.get(&key) {
                found.insert(id.to_string(), row.try_get(1)?);
            }
        }
    }
    Ok(found)
}

/// The events of `origins` that lose their id: one whose digest differs from the one recorded
/// before (`recorded`), or, for an id not recorded before, from its first copy here.
pub(super) fn conflicts(
    origins: &[&EventOrigin],
    recorded: &HashMap<String, String>,
) -> Vec<EventContent> {
    let mut winners: HashMap<&str, &str> = HashMap::with_capacity(origins.len());
    for o in origins {
        let recorded = recorded.get(&o.event_id).map(String::as_str);
        winners
            .entry(o.event_id.as_str())
            .or_insert(recorded.unwrap_or(o.digest.as_str()));
    }
    origins
        .iter()
        .filter(|o| winners.get(o.event_id.as_str()) != Some(&o.digest.as_str()))
        .map(|o| EventContent {
            event_key: DeliveryKey::for_event(&o.event_id),
            digest: o.digest.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::conflicts;
    use crate::ack::ledger::EventOrigin;
    use crate::event::{DeliveryKey, SourceRef};

    fn origin(id: &str, digest: &str) -> EventOrigin {
        EventOrigin {
            event_id: id.into(),
            source: SourceRef {
                topic: "usage".into(),
                partition: 0,
                offset: 0,
            },
            customer: "contract:c".into(),
            component_id: "api_calls".into(),
            quantity: rust_decimal::Decimal::ONE,
            digest: digest.into(),
        }
    }

    #[test]
    fn the_recorded_digest_wins_then_the_first_copy() {
        let given = [
            origin("a", "d1"),
            origin("a", "d2"),
            origin("b", "d1"),
            origin("b", "d1"),
            origin("c", "d2"),
        ];
        let refs: Vec<&EventOrigin> = given.iter().collect();
        let recorded = HashMap::from([("c".to_string(), "d1".to_string())]);
        let lost: Vec<(DeliveryKey, String)> = conflicts(&refs, &recorded)
            .into_iter()
            .map(|c| (c.event_key, c.digest))
            .collect();
        assert_eq!(
            lost,
            [
                (DeliveryKey::for_event("a"), "d2".to_string()),
                (DeliveryKey::for_event("c"), "d2".to_string()),
            ]
        );
    }
}
