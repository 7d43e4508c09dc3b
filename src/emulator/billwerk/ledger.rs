//! The stored usage records of every contract, in creation order.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::usage_body::{ProductOverride, UsageRequest};
use crate::emulator::stats::RecordStats;

/// One stored usage record, as `GET /_emulator/records` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillwerkRecord {
    /// 24 hex characters; ids sort in creation order (the `from` cursor relies on it).
    pub id: String,
    pub contract_id: String,
    pub component_id: String,
    /// Exact decimal, shown as a decimal string.
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
    pub due_date: DateTime<Utc>,
    /// The delivery key lives here (billwerk has no idempotency; clients stamp the Memo).
    pub memo: Option<String>,
    pub product_override: Option<ProductOverride>,
    /// billwerk's `TransferredAt`: when the record was created.
    pub created_at: DateTime<Utc>,
}

/// `GET /api/v1/contracts/{id}/usage` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// Cursor: only records created after the record with this id.
    pub after_id: Option<String>,
    pub skip: usize,
    pub take: usize,
    /// Creation time, inclusive.
    pub from_date_time: Option<DateTime<Utc>>,
    /// Creation time, exclusive.
    pub until_date_time: Option<DateTime<Utc>>,
}

#[derive(Default)]
pub struct UsageLedger {
    /// Creation order; `None` once deleted.
    records: Vec<Option<BillwerkRecord>>,
    index_by_id: HashMap<String, usize>,
    indexes_by_contract: HashMap<String, Vec<usize>>,
    records_per_memo: HashMap<String, u64>,
    /// Never reset, so ids stay unique and ordered across `clear`.
    next_sequence: u64,
    id_prefix: String,
}

impl UsageLedger {
    /// `id_prefix` makes ids of different emulator runs distinct: 8 hex characters.
    pub fn new(id_prefix: u32) -> Self {
        UsageLedger {
            id_prefix: format!("{id_prefix:08x}"),
            ..UsageLedger::default()
        }
    }

    pub fn insert(
        &mut self,
        contract_id: &str,
        request: UsageRequest,
        now: DateTime<Utc>,
    ) -> BillwerkRecord {
        let id = format!("{}{:016x}", self.id_prefix, self.next_sequence);
        self.next_sequence += 1;
        let record = BillwerkRecord {
            id: id.clone(),
            contract_id: contract_id.to_string(),
            component_id: request.component_id,
            quantity: request.quantity,
            due_date: request.due_date.unwrap_or(now),
            memo: request.memo,
            product_override: request.product_override,
            created_at: now,
        };
        let index = self.records.len();
        if let Some(memo) = &record.memo {
            *self.records_per_memo.entry(memo.clone()).or_default() += 1;
        }
        self.index_by_id.insert(id, index);
        self.indexes_by_contract
            .entry(record.contract_id.clone())
            .or_default()
            .push(index);
        self.records.push(Some(record.clone()));
        record
    }

    /// `false` when the contract has no record with that id.
    pub fn delete(&mut self, contract_id: &str, usage_id: &str) -> bool {
        let Some(&index) = self.index_by_id.get(usage_id) else {
            return false;
        };
        let belongs =
            matches!(&self.records[index], Some(record) if record.contract_id == contract_id);
        if !belongs {
            return false;
        }
        self.index_by_id.remove(usage_id);
        if let Some(record) = self.records[index].take() {
            if let Some(memo) = record.memo {
                if let Some(count) = self.records_per_memo.get_mut(&memo) {
                    *count -= 1;
                    if *count == 0 {
                        self.records_per_memo.remove(&memo);
                    }
                }
            }
        }
        true
    }

    pub fn list(&self, contract_id: &str, query: &UsageQuery) -> Vec<BillwerkRecord> {
        let Some(indexes) = self.indexes_by_contract.get(contract_id) else {
            return Vec::new();
        };
        indexes
            .iter()
            .filter_map(|&index| self.records[index].as_ref())
            .filter(|record| match &query.after_id {
                Some(after) => record.id.as_str() > after.as_str(),
                None => true,
            })
            .filter(|record| {
                query
                    .from_date_time
                    .is_none_or(|from| record.created_at >= from)
            })
            .filter(|record| {
                query
                    .until_date_time
                    .is_none_or(|until| record.created_at < until)
            })
            .skip(query.skip)
            .take(query.take)
            .cloned()
            .collect()
    }

    pub fn records(&self) -> Vec<BillwerkRecord> {
        self.records.iter().flatten().cloned().collect()
    }

    pub fn stats(&self) -> RecordStats {
        RecordStats {
            records: self.index_by_id.len() as u64,
            records_per_delivery_key: self
                .records_per_memo
                .iter()
                .map(|(memo, count)| (memo.clone(), *count))
                .collect(),
            duplicate_events_ignored: 0,
        }
    }

    pub fn clear(&mut self) {
        self.records.clear();
        self.index_by_id.clear();
        self.indexes_by_contract.clear();
        self.records_per_memo.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn usage(memo: &str) -> UsageRequest {
        UsageRequest {
            component_id: "c".into(),
            quantity: Decimal::ONE,
            due_date: None,
            memo: Some(memo.into()),
            product_override: None,
        }
    }

    fn at(second: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, second).unwrap()
    }

    fn all() -> UsageQuery {
        UsageQuery {
            after_id: None,
            skip: 0,
            take: 500,
            from_date_time: None,
            until_date_time: None,
        }
    }

    #[test]
    fn ids_are_24_hex_and_sort_in_creation_order() {
        let mut ledger = UsageLedger::new(0x6543_21ff);
        let ids: Vec<String> = (0..20)
            .map(|i| ledger.insert("k", usage(&i.to_string()), at(0)).id)
            .collect();
        assert!(ids
            .iter()
            .all(|id| id.len() == 24 && id.chars().all(|c| c.is_ascii_hexdigit())));
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn lists_per_contract_with_cursor_paging_and_creation_time_filters() {
        let mut ledger = UsageLedger::new(1);
        let a1 = ledger.insert("a", usage("1"), at(1));
        ledger.insert("b", usage("x"), at(2));
        let a2 = ledger.insert("a", usage("2"), at(3));
        let a3 = ledger.insert("a", usage("3"), at(5));
        let ids = |records: Vec<BillwerkRecord>| -> Vec<String> {
            records.into_iter().map(|record| record.id).collect()
        };
        assert_eq!(
            ids(ledger.list("a", &all())),
            [a1.id.as_str(), a2.id.as_str(), a3.id.as_str()]
        );
        let after_first = UsageQuery {
            after_id: Some(a1.id.clone()),
            take: 1,
            ..all()
        };
        assert_eq!(ids(ledger.list("a", &after_first)), [a2.id.as_str()]);
        let window = UsageQuery {
            from_date_time: Some(at(3)),
            until_date_time: Some(at(5)),
            ..all()
        };
        assert_eq!(ids(ledger.list("a", &window)), [a2.id.as_str()]);
        let skipped = UsageQuery { skip: 2, ..all() };
        assert_eq!(ids(ledger.list("a", &skipped)), [a3.id.as_str()]);
        assert!(ledger.list("nobody", &all()).is_empty());
    }

    #[test]
    fn delete_removes_only_the_contracts_own_record_and_fixes_the_key_counts() {
        let mut ledger = UsageLedger::new(1);
        let first = ledger.insert("a", usage("key"), at(1));
        ledger.insert("a", usage("key"), at(2));
        assert_eq!(ledger.stats().records_per_delivery_key["key"], 2);
        assert!(!ledger.delete("b", &first.id), "another contract's record");
        assert!(ledger.delete("a", &first.id));
        assert!(!ledger.delete("a", &first.id), "already gone");
        let stats = ledger.stats();
        assert_eq!(stats.records, 1);
        assert_eq!(stats.records_per_delivery_key["key"], 1);
        assert_eq!(ledger.records().len(), 1);
    }

    #[test]
    fn clear_keeps_ids_unique() {
        let mut ledger = UsageLedger::new(1);
        let before = ledger.insert("a", usage("k"), at(1));
        ledger.clear();
        assert!(ledger.records().is_empty());
        let after = ledger.insert("a", usage("k"), at(1));
        assert!(after.id > before.id);
    }
}
