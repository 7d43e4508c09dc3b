//! What the ledger knows of one event or one usage record, for `meterflow trace` and
//! `meterflow void`. Reads only, except [`LedgerStore::record_void`].

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{now_ms, LedgerError, LedgerStore};
use crate::event::DeliveryKey;

/// A row of `meterflow_deliveries`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryEntry {
    pub delivery_key: String,
    /// `sending`, `delivered`, `rejected`, `voided` or `abandoned`.
    pub state: String,
    /// The provider's record id (delivered, voided) or its answer (rejected).
    pub receipt: Option<String>,
    pub event_count: i64,
    pub first_sent_at_ms: i64,
    /// The lease stamp while sending; the last write otherwise.
    pub updated_at_ms: i64,
    /// When the provider accepted it (empty for entries written before this was recorded).
    pub delivered_at_ms: Option<i64>,
}

/// Where an event came from, as recorded with its claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OriginEntry {
    pub delivery_key: String,
    pub topic: String,
    pub partition: i64,
    pub offset: i64,
    /// `contract:<id>` or `external:<id>`.
    pub customer: String,
    /// Host and process id of the process that claimed it.
    pub claimed_by: String,
    pub claimed_at_ms: i64,
}

/// A written dead letter (its detail columns are empty for letters written before they
/// existed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterEntry {
    pub topic: String,
    pub partition: i64,
    pub offset: i64,
    pub written_at_ms: i64,
    pub event_id: Option<String>,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub dlq_partition: Option<i64>,
    pub dlq_offset: Option<i64>,
}

/// A dead letter being written (or whose writer died before recording it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterIntentEntry {
    pub dlq_partition: i64,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A void recorded by `meterflow void`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VoidEntry {
    pub delivery_key: String,
    pub usage_id: String,
    pub contract_id: String,
    pub event_count: i64,
    /// The events may be billed again (the delivery's entry was removed).
    pub rebill: bool,
    pub voided_at_ms: i64,
}

/// Everything the ledger holds about one event id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventRecord {
    pub origin: Option<OriginEntry>,
    pub delivery: Option<DeliveryEntry>,
    pub dead_letters: Vec<DeadLetterEntry>,
    pub dead_letter_intent: Option<DeadLetterIntentEntry>,
    pub voids: Vec<VoidEntry>,
}

impl EventRecord {
    pub fn is_empty(&self) -> bool {
        self.origin.is_none()
            && self.delivery.is_none()
            && self.dead_letters.is_empty()
            && self.dead_letter_intent.is_none()
            && self.voids.is_empty()
    }
}

/// A usage record at the provider and the events it sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// `None` when only a void (with `--rebill`) remembers the record.
    pub delivery: Option<DeliveryEntry>,
    pub delivery_key: String,
    /// The ids the ledger recorded (entries from before ids were recorded have none).
    pub event_ids: Vec<String>,
    pub customer: Option<String>,
    pub voids: Vec<VoidEntry>,
}

/// A delivered record to one contract, with the exact quantities its events carried per
/// component (`meterflow audit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerDelivery {
    pub delivery_key: String,
    pub receipt: String,
    pub quantities: Vec<(String, rust_decimal::Decimal)>,
}

const DELIVERY_COLUMNS: &str =
    "delivery_key, state, receipt, event_count, first_sent_at, updated_at, delivered_at";

fn delivery_entry(row: &AnyRow) -> Result<DeliveryEntry, sqlx::Error> {
    Ok(DeliveryEntry {
        delivery_key: row.try_get(0)?,
        state: row.try_get(1)?,
        receipt: row.try_get(2)?,
        event_count: row.try_get(3)?,
        first_sent_at_ms: row.try_get(4)?,
        updated_at_ms: row.try_get(5)?,
        delivered_at_ms: row.try_get(6)?,
    })
}

fn void_entry(row: &AnyRow) -> Result<VoidEntry, sqlx::Error> {
    Ok(VoidEntry {
        delivery_key: row.try_get(0)?,
        usage_id: row.try_get(1)?,
        contract_id: row.try_get(2)?,
        event_count: row.try_get(3)?,
        rebill: row.try_get::<i64, _>(4)? != 0,
        voided_at_ms: row.try_get(5)?,
    })
}

const VOID_COLUMNS: &str = "delivery_key, usage_id, contract_id, event_count, rebill, voided_at";

const DEAD_LETTER_COLUMNS: &str = "topic, source_partition, source_offset, written_at, event_id, \
     reason, detail, dlq_partition, dlq_offset";

fn dead_letter_entry(row: &AnyRow) -> Result<DeadLetterEntry, sqlx::Error> {
    Ok(DeadLetterEntry {
        topic: row.try_get(0)?,
        partition: row.try_get(1)?,
        offset: row.try_get(2)?,
        written_at_ms: row.try_get(3)?,
        event_id: row.try_get(4)?,
        reason: row.try_get(5)?,
        detail: row.try_get(6)?,
        dlq_partition: row.try_get(7)?,
        dlq_offset: row.try_get(8)?,
    })
}

impl LedgerStore {
    /// What the ledger holds about `event_id`: its origin and delivery (its own, or the
    /// aggregate it was summed into), its dead letters, and voids of its delivery.
    pub async fn trace_event(&self, event_id: &str) -> Result<EventRecord, LedgerError> {
        let mut record = EventRecord::default();
        let origin = sqlx::query(
            "SELECT delivery_key, topic, source_partition, source_offset, customer, claimed_by,
                    updated_at
             FROM meterflow_event_origins WHERE event_id = $1",
        )
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = origin {
            record.origin = Some(OriginEntry {
                delivery_key: row.try_get(0)?,
                topic: row.try_get(1)?,
                partition: row.try_get(2)?,
                offset: row.try_get(3)?,
                customer: row.try_get(4)?,
                claimed_by: row.try_get(5)?,
                claimed_at_ms: row.try_get(6)?,
            });
        }
        // Entries written before origins were recorded: the event's own key, or the aggregate
        // its key is mapped to.
        let own = DeliveryKey::for_event(event_id);
        let key = match &record.origin {
            Some(origin) => origin.delivery_key.clone(),
            None => sqlx::query(
                "SELECT delivery_key FROM meterflow_event_deliveries WHERE event_key = $1",
            )
            .bind(own.as_str())
            .fetch_optional(&self.pool)
            .await?
            .map(|row| row.try_get::<String, _>(0))
            .transpose()?
            .unwrap_or_else(|| own.0.clone()),
        };
        record.delivery = self.delivery(&key).await?;
        record.voids = sqlx::query(&format!(
            "SELECT {VOID_COLUMNS} FROM meterflow_voids WHERE delivery_key = $1 ORDER BY voided_at"
        ))
        .bind(key.as_str())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(void_entry)
        .collect::<Result<_, _>>()?;

        let mut letters: Vec<DeadLetterEntry> = sqlx::query(&format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM meterflow_dead_letters WHERE event_id = $1"
        ))
        .bind(event_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(dead_letter_entry)
        .collect::<Result<_, _>>()?;
        if let Some(origin) = &record.origin {
            let at_source = sqlx::query(&format!(
                "SELECT {DEAD_LETTER_COLUMNS} FROM meterflow_dead_letters
                 WHERE topic = $1 AND source_partition = $2 AND source_offset = $3"
            ))
            .bind(origin.topic.as_str())
            .bind(origin.partition)
            .bind(origin.offset)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = at_source {
                let letter = dead_letter_entry(&row)?;
                if !letters.iter().any(|l| {
                    (&l.topic, l.partition, l.offset)
                        == (&letter.topic, letter.partition, letter.offset)
                }) {
                    letters.push(letter);
                }
            }
            let intent = sqlx::query(
                "SELECT dlq_partition, started_at, updated_at FROM meterflow_dead_letter_intents
                 WHERE topic = $1 AND source_partition = $2 AND source_offset = $3",
            )
            .bind(origin.topic.as_str())
            .bind(origin.partition)
            .bind(origin.offset)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = intent {
                record.dead_letter_intent = Some(DeadLetterIntentEntry {
                    dlq_partition: row.try_get(0)?,
                    started_at_ms: row.try_get(1)?,
                    updated_at_ms: row.try_get(2)?,
                });
            }
        }
        letters.sort_by_key(|l| l.written_at_ms);
        record.dead_letters = letters;
        Ok(record)
    }

    async fn delivery(&self, key: &str) -> Result<Option<DeliveryEntry>, LedgerError> {
        let row = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM meterflow_deliveries WHERE delivery_key = $1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(delivery_entry).transpose()?)
    }

    /// The usage record the provider created as `usage_id` and the events it sums; `None` when
    /// the ledger has no delivery (nor void) with that record id.
    pub async fn usage_record(&self, usage_id: &str) -> Result<Option<UsageRecord>, LedgerError> {
        let row = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM meterflow_deliveries
             WHERE receipt = $1 AND state IN ('delivered', 'voided')"
        ))
        .bind(usage_id)
        .fetch_optional(&self.pool)
        .await?;
        let delivery = row.as_ref().map(delivery_entry).transpose()?;
        let voids: Vec<VoidEntry> = sqlx::query(&format!(
            "SELECT {VOID_COLUMNS} FROM meterflow_voids WHERE usage_id = $1 ORDER BY voided_at"
        ))
        .bind(usage_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(void_entry)
        .collect::<Result<_, _>>()?;
        let key = match (&delivery, voids.first()) {
            (Some(d), _) => d.delivery_key.clone(),
            (None, Some(v)) => v.delivery_key.clone(),
            (None, None) => return Ok(None),
        };
        let rows = sqlx::query(
            "SELECT event_id, customer FROM meterflow_event_origins
             WHERE delivery_key = $1 ORDER BY event_id",
        )
        .bind(key.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut event_ids = Vec::with_capacity(rows.len());
        let mut customer = None;
        for row in &rows {
            event_ids.push(row.try_get::<String, _>(0)?);
            if customer.is_none() {
                customer = Some(row.try_get::<String, _>(1)?);
            }
        }
        Ok(Some(UsageRecord {
            delivery,
            delivery_key: key,
            event_ids,
            customer,
            voids,
        }))
    }

    /// After the provider deleted the record of delivery `key` (`meterflow void`): records the
    /// void and marks the entry voided, so that no redelivery bills it again — or, with
    /// `rebill`, removes the entry and its event mappings, so that a redelivery bills the
    /// events anew. False when the entry was no longer "delivered" (nothing but the void
    /// record was written).
    pub async fn record_void(
        &self,
        key: &str,
        usage_id: &str,
        contract_id: &str,
        event_count: i64,
        rebill: bool,
    ) -> Result<bool, LedgerError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let changed = if rebill {
            let removed = sqlx::query(
                "DELETE FROM meterflow_deliveries WHERE delivery_key = $1 AND state = 'delivered'",
            )
            .bind(key)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query("DELETE FROM meterflow_event_deliveries WHERE delivery_key = $1")
                .bind(key)
                .execute(&mut *tx)
                .await?;
            removed == 1
        } else {
            sqlx::query(
                "UPDATE meterflow_deliveries SET state = 'voided', updated_at = $1
                 WHERE delivery_key = $2 AND state = 'delivered'",
            )
            .bind(now)
            .bind(key)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1
        };
        sqlx::query(
            "INSERT INTO meterflow_voids
             (delivery_key, usage_id, contract_id, event_count, rebill, voided_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(key)
        .bind(usage_id)
        .bind(contract_id)
        .bind(event_count)
        .bind(i64::from(rebill))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(changed)
    }

    /// Deliveries accepted from `from_ms` until `until_ms` for events naming one of
    /// `customers` (`contract:<id>`, `external:<id>`), with their events' quantities.
    pub async fn deliveries_to(
        &self,
        customers: &[String],
        from_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<LedgerDelivery>, LedgerError> {
        use std::str::FromStr;
        let mut by_key: std::collections::BTreeMap<String, LedgerDelivery> = Default::default();
        for customer in customers {
            let rows = sqlx::query(
                "SELECT d.delivery_key, d.receipt, o.component_id, o.quantity
                 FROM meterflow_deliveries d
                 JOIN meterflow_event_origins o ON o.delivery_key = d.delivery_key
                 WHERE d.state = 'delivered' AND o.customer = $1
                   AND COALESCE(d.delivered_at, d.updated_at) >= $2
                   AND COALESCE(d.delivered_at, d.updated_at) < $3",
            )
            .bind(customer.as_str())
            .bind(from_ms)
            .bind(until_ms)
            .fetch_all(&self.pool)
            .await?;
            for row in &rows {
                let key: String = row.try_get(0)?;
                let receipt: Option<String> = row.try_get(1)?;
                let component: String = row.try_get(2)?;
                let quantity: String = row.try_get(3)?;
                let entry = by_key.entry(key.clone()).or_insert_with(|| LedgerDelivery {
                    delivery_key: key,
                    receipt: receipt.unwrap_or_default(),
                    quantities: Vec::new(),
                });
                // Written from a Decimal by the claim; anything else is a corrupted row.
                let quantity = rust_decimal::Decimal::from_str(&quantity).map_err(|e| {
                    LedgerError::Database(sqlx::Error::Protocol(format!(
                        "ledger row for {}: quantity {quantity:?} unreadable: {e}",
                        entry.delivery_key
                    )))
                })?;
                match entry.quantities.iter_mut().find(|(c, _)| *c == component) {
                    Some((_, total)) => *total = total.checked_add(quantity).unwrap_or(*total),
                    None => entry.quantities.push((component, quantity)),
                }
            }
        }
        Ok(by_key.into_values().collect())
    }

    /// State and record id of each of `keys` the ledger knows.
    pub async fn delivery_states(
        &self,
        keys: &[String],
    ) -> Result<std::collections::BTreeMap<String, (String, Option<String>)>, LedgerError> {
        let mut out = std::collections::BTreeMap::new();
        let mut unique: Vec<&String> = keys.iter().collect();
        unique.sort_unstable();
        unique.dedup();
        for chunk in unique.chunks(300) {
            let placeholders = (1..=chunk.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT delivery_key, state, receipt FROM meterflow_deliveries
                 WHERE delivery_key IN ({placeholders})"
            );
            let mut query = sqlx::query(&sql);
            for k in chunk {
                query = query.bind(k.as_str());
            }
            for row in query.fetch_all(&self.pool).await? {
                out.insert(row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?));
            }
        }
        Ok(out)
    }

    /// Deliveries accepted from `from_ms` until `until_ms` without any recorded origin
    /// (written before origins were recorded): their contract and quantities are unknown.
    pub async fn unattributed_deliveries(
        &self,
        from_ms: i64,
        until_ms: i64,
    ) -> Result<i64, LedgerError> {
        let row = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM meterflow_deliveries d
             WHERE d.state = 'delivered'
               AND COALESCE(d.delivered_at, d.updated_at) >= $1
               AND COALESCE(d.delivered_at, d.updated_at) < $2
               AND NOT EXISTS (SELECT 1 FROM meterflow_event_origins o
                               WHERE o.delivery_key = d.delivery_key)",
        )
        .bind(from_ms)
        .bind(until_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }
}
