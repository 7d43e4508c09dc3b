//! The ledger's record of dead letters, by source coordinates (topic, partition, offset):
//! "writing since T, into dead-letter partition P from offset F on" (the intent, durable before
//! the letter is produced) and "written" (after the broker acknowledged it). An intent found
//! after a crash means the outcome is unknown: the writer reads partition P from F for a letter
//! with those coordinates before it writes one (`src/ack/deadletter/`).

use sqlx::{AnyConnection, Row};

use super::DeadLetterRecord;
use crate::event::SourceRef;

pub(super) const SCHEMA: &[&str] = &[
    // Rows of `meterflow_dead_letters` (created with the delivery schema) mean "written".
    "CREATE TABLE IF NOT EXISTS meterflow_dead_letter_intents (
        topic TEXT NOT NULL,
        source_partition BIGINT NOT NULL,
        source_offset BIGINT NOT NULL,
        dlq_partition BIGINT NOT NULL,
        dlq_floor BIGINT NOT NULL,
        started_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (topic, source_partition, source_offset))",
];

/// What the ledger knows of a source offset's dead letter when a writer claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterClaim {
    /// Written and acknowledged earlier: nothing to do.
    Written,
    /// The intent is recorded: this caller writes the letter. `updated_at_ms` is its stamp.
    Claimed { updated_at_ms: i64 },
    /// Someone (a dead process, or another replica) was writing it: the outcome is unknown.
    /// A copy, if any, is in dead-letter partition `dlq_partition` at or after `floor`.
    Intended {
        dlq_partition: i32,
        floor: i64,
        updated_at_ms: i64,
    },
}

/// Answers "written", or records the intent (partition, floor) if there is none, or returns
/// the intent someone else recorded.
pub(super) async fn claim(
    conn: &mut AnyConnection,
    source: &SourceRef,
    dlq_partition: i32,
    floor: i64,
    now: i64,
) -> Result<DeadLetterClaim, sqlx::Error> {
    let written = sqlx::query(
        "SELECT 1 FROM meterflow_dead_letters
         WHERE topic = $1 AND source_partition = $2 AND source_offset = $3",
    )
    .bind(source.topic.as_str())
    .bind(i64::from(source.partition))
    .bind(source.offset)
    .fetch_optional(&mut *conn)
    .await?
    .is_some();
    if written {
        return Ok(DeadLetterClaim::Written);
    }
    let inserted = sqlx::query(
        "INSERT INTO meterflow_dead_letter_intents
         (topic, source_partition, source_offset, dlq_partition, dlq_floor, started_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT DO NOTHING",
    )
    .bind(source.topic.as_str())
    .bind(i64::from(source.partition))
    .bind(source.offset)
    .bind(i64::from(dlq_partition))
    .bind(floor)
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if inserted {
        return Ok(DeadLetterClaim::Claimed { updated_at_ms: now });
    }
    let row = sqlx::query(
        "SELECT dlq_partition, dlq_floor, updated_at FROM meterflow_dead_letter_intents
         WHERE topic = $1 AND source_partition = $2 AND source_offset = $3",
    )
    .bind(source.topic.as_str())
    .bind(i64::from(source.partition))
    .bind(source.offset)
    .fetch_one(&mut *conn)
    .await?;
    let partition: i64 = row.get(0);
    Ok(DeadLetterClaim::Intended {
        // Written by `claim` from an i32; anything else is a corrupted row: partition 0 is
        // then read, and a miss only means a second copy, never a lost letter.
        dlq_partition: i32::try_from(partition).unwrap_or(0),
        floor: row.get(1),
        updated_at_ms: row.get(2),
    })
}

/// Compare-and-set on the intent's `updated_at`: renews our intent before a re-send, or takes
/// over one whose lease ran out. `None` when someone else moved it (or it was written).
pub(super) async fn touch(
    conn: &mut AnyConnection,
    source: &SourceRef,
    expected_updated_at_ms: i64,
    now: i64,
) -> Result<Option<i64>, sqlx::Error> {
    let next = now.max(expected_updated_at_ms.saturating_add(1));
    let moved = sqlx::query(
        "UPDATE meterflow_dead_letter_intents SET updated_at = $1
         WHERE topic = $2 AND source_partition = $3 AND source_offset = $4 AND updated_at = $5",
    )
    .bind(next)
    .bind(source.topic.as_str())
    .bind(i64::from(source.partition))
    .bind(source.offset)
    .bind(expected_updated_at_ms)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok((moved == 1).then_some(next))
}

/// Longest reason detail kept in the ledger (the letter in the topic has all of it).
const MAX_DETAIL_CHARS: usize = 1000;

/// "Written": the intent gives way to the record, in one transaction. `record` (what `meterflow
/// trace` shows: event id, reason, where the letter sits) fills the columns added for it; rows
/// written before them, or without it, leave them empty.
pub(super) async fn written(
    conn: &mut AnyConnection,
    source: &SourceRef,
    record: Option<&DeadLetterRecord>,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO meterflow_dead_letters
         (topic, source_partition, source_offset, written_at,
          event_id, reason, detail, dlq_partition, dlq_offset)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
    )
    .bind(source.topic.as_str())
    .bind(i64::from(source.partition))
    .bind(source.offset)
    .bind(now)
    .bind(record.and_then(|r| r.event_id.clone()))
    .bind(record.map(|r| r.reason.clone()))
    .bind(record.map(|r| crate::decode::truncate_chars(&r.detail, MAX_DETAIL_CHARS)))
    .bind(record.map(|r| i64::from(r.dlq_partition)))
    .bind(record.map(|r| r.dlq_offset))
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "DELETE FROM meterflow_dead_letter_intents
         WHERE topic = $1 AND source_partition = $2 AND source_offset = $3",
    )
    .bind(source.topic.as_str())
    .bind(i64::from(source.partition))
    .bind(source.offset)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::DeadLetterClaim;
    use crate::ack::ledger::Ledger;
    use crate::event::SourceRef;

    fn source(offset: i64) -> SourceRef {
        SourceRef {
            topic: "usage".into(),
            partition: 3,
            offset,
        }
    }

    #[tokio::test]
    async fn an_intent_is_recorded_once_and_gives_way_to_written() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("l.db").display());
        let ledger = Ledger::open(&url, Duration::ZERO).await.unwrap();
        let s = source(42);
        let DeadLetterClaim::Claimed { updated_at_ms } =
            ledger.claim_dead_letter(&s, 1, 100).await.unwrap()
        else {
            panic!("a new intent is ours")
        };
        // A second claim (a restart) sees the first intent, with its partition and floor.
        assert_eq!(
            ledger.claim_dead_letter(&s, 0, 250).await.unwrap(),
            DeadLetterClaim::Intended {
                dlq_partition: 1,
                floor: 100,
                updated_at_ms
            }
        );
        // Taking it over is a compare-and-set: one winner.
        let next = ledger
            .touch_dead_letter(&s, updated_at_ms)
            .await
            .unwrap()
            .expect("first touch wins");
        assert!(next > updated_at_ms);
        assert_eq!(
            ledger.touch_dead_letter(&s, updated_at_ms).await.unwrap(),
            None,
            "a stale touch loses"
        );
        ledger.dead_lettered(&s, None).await.unwrap();
        assert_eq!(
            ledger.claim_dead_letter(&s, 1, 300).await.unwrap(),
            DeadLetterClaim::Written
        );
        assert_eq!(
            ledger.touch_dead_letter(&s, next).await.unwrap(),
            None,
            "a written letter's intent is gone"
        );
        assert!(ledger.is_dead_lettered(&s).await.unwrap());
        drop(ledger);
        // Durable: a restarted process sees the same.
        let ledger = Ledger::open(&url, Duration::ZERO).await.unwrap();
        assert_eq!(
            ledger.claim_dead_letter(&s, 1, 300).await.unwrap(),
            DeadLetterClaim::Written
        );
        assert!(matches!(
            ledger.claim_dead_letter(&source(43), 1, 300).await.unwrap(),
            DeadLetterClaim::Claimed { .. }
        ));
    }

    #[tokio::test]
    async fn pruning_removes_intents_older_than_the_cutoff_and_keeps_newer_ones() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("l.db").display());
        let ledger = Ledger::open(&url, Duration::ZERO).await.unwrap();
        let DeadLetterClaim::Claimed { updated_at_ms } =
            ledger.claim_dead_letter(&source(7), 0, 10).await.unwrap()
        else {
            panic!("a new intent is ours")
        };
        let store = crate::ack::ledger::LedgerStore::connect(&url)
            .await
            .unwrap();
        assert_eq!(store.prune_before(updated_at_ms).await.unwrap(), 0);
        assert!(matches!(
            ledger.claim_dead_letter(&source(7), 0, 10).await.unwrap(),
            DeadLetterClaim::Intended { .. }
        ));
        assert_eq!(store.prune_before(updated_at_ms + 1).await.unwrap(), 1);
        assert!(matches!(
            ledger.claim_dead_letter(&source(7), 0, 10).await.unwrap(),
            DeadLetterClaim::Claimed { .. }
        ));
    }
}
