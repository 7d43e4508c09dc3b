//! The stored usage records of every contract, in creation order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::usage_body::{ProductOverride, UsageRequest};
use crate::stats::{PerKey, RecordStats};

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
    /// Billed by a (simulated) billing run: billwerk then refuses to delete it.
    #[serde(default)]
    pub billed: bool,
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

/// A usage record as kept in memory: ids are derived from the sequence, repeated strings
/// (contract, component) are shared, and the memo is shared with the per-key count. About 200
/// bytes a record, so a long benchmark does not make the emulator swap.
struct StoredUsage {
    sequence: u64,
    contract_id: Arc<str>,
    component_id: Arc<str>,
    quantity: Decimal,
    due_date: DateTime<Utc>,
    created_at: DateTime<Utc>,
    memo: Option<Arc<str>>,
    product_override: Option<Box<ProductOverride>>,
    billed: bool,
}

/// A record id: 8 hex characters of the run's prefix, then 16 of the sequence. As a number it
/// orders like the creation order, which the `from` cursor relies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UsageId(u128);

impl UsageId {
    fn new(prefix: u32, sequence: u64) -> Self {
        UsageId((u128::from(prefix) << 64) | u128::from(sequence))
    }

    /// `None` unless 24 hex characters.
    pub fn parse(text: &str) -> Option<UsageId> {
        if text.len() != 24 || !text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return None;
        }
        u128::from_str_radix(text, 16).ok().map(UsageId)
    }

    fn prefix(self) -> u32 {
        (self.0 >> 64) as u32
    }

    fn sequence(self) -> u64 {
        self.0 as u64
    }
}

impl std::fmt::Display for UsageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:024x}", self.0)
    }
}

#[derive(Default)]
pub struct UsageLedger {
    /// Creation order, indexed by `sequence - first_sequence`; `None` once deleted.
    records: Vec<Option<StoredUsage>>,
    first_sequence: u64,
    live_records: u64,
    indexes_by_contract: HashMap<Arc<str>, Vec<u32>>,
    component_ids: HashSet<Arc<str>>,
    records_per_memo: HashMap<Arc<str>, u64>,
    /// Memos on more than one live record.
    duplicate_memos: u64,
    /// Never reset, so ids stay unique and ordered across `clear`.
    next_sequence: u64,
    id_prefix: u32,
}

impl UsageLedger {
    /// `id_prefix` makes ids of different emulator runs distinct.
    pub fn new(id_prefix: u32) -> Self {
        UsageLedger {
            id_prefix,
            ..UsageLedger::default()
        }
    }

    pub fn insert(
        &mut self,
        contract_id: &str,
        request: UsageRequest,
        now: DateTime<Utc>,
    ) -> BillwerkRecord {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let index = u32::try_from(self.records.len()).expect("fewer than 4 billion records");
        let contract_id = match self.indexes_by_contract.get_key_value(contract_id) {
            Some((shared, _)) => shared.clone(),
            None => Arc::from(contract_id),
        };
        self.indexes_by_contract
            .entry(contract_id.clone())
            .or_default()
            .push(index);
        let component_id = match self.component_ids.get(request.component_id.as_str()) {
            Some(shared) => shared.clone(),
            None => {
                let shared: Arc<str> = Arc::from(request.component_id);
                self.component_ids.insert(shared.clone());
                shared
            }
        };
        let memo: Option<Arc<str>> = request.memo.map(Arc::from);
        if let Some(memo) = &memo {
            let count = self.records_per_memo.entry(memo.clone()).or_default();
            *count += 1;
            if *count == 2 {
                self.duplicate_memos += 1;
            }
        }
        let stored = StoredUsage {
            sequence,
            contract_id,
            component_id,
            quantity: request.quantity,
            due_date: request.due_date.unwrap_or(now),
            created_at: now,
            memo,
            product_override: request.product_override.map(Box::new),
            billed: false,
        };
        let record = self.view(&stored);
        self.records.push(Some(stored));
        self.live_records += 1;
        record
    }

    fn view(&self, stored: &StoredUsage) -> BillwerkRecord {
        BillwerkRecord {
            id: UsageId::new(self.id_prefix, stored.sequence).to_string(),
            contract_id: stored.contract_id.to_string(),
            component_id: stored.component_id.to_string(),
            quantity: stored.quantity,
            due_date: stored.due_date,
            memo: stored.memo.as_deref().map(str::to_string),
            product_override: stored.product_override.as_deref().cloned(),
            created_at: stored.created_at,
            billed: stored.billed,
        }
    }

    fn position(&self, usage_id: &str) -> Option<usize> {
        let id = UsageId::parse(usage_id)?;
        if id.prefix() != self.id_prefix {
            return None;
        }
        let position = usize::try_from(id.sequence().checked_sub(self.first_sequence)?).ok()?;
        (position < self.records.len()).then_some(position)
    }

    /// Marks the record billed (as a billing run would); `false` when there is no such record.
    pub fn mark_billed(&mut self, usage_id: &str) -> bool {
        let Some(position) = self.position(usage_id) else {
            return false;
        };
        match self.records.get_mut(position) {
            Some(Some(stored)) => {
                stored.billed = true;
                true
            }
            _ => false,
        }
    }

    /// A billing run: every record billed; how many were not yet.
    pub fn bill_all(&mut self) -> usize {
        let mut billed = 0;
        for stored in self.records.iter_mut().flatten() {
            if !stored.billed {
                stored.billed = true;
                billed += 1;
            }
        }
        billed
    }

    /// Whether the contract's record with that id is billed.
    pub fn is_billed(&self, contract_id: &str, usage_id: &str) -> bool {
        self.position(usage_id)
            .and_then(|position| self.records[position].as_ref())
            .is_some_and(|stored| &*stored.contract_id == contract_id && stored.billed)
    }

    /// `false` when the contract has no record with that id.
    pub fn delete(&mut self, contract_id: &str, usage_id: &str) -> bool {
        let Some(position) = self.position(usage_id) else {
            return false;
        };
        let belongs =
            matches!(&self.records[position], Some(stored) if &*stored.contract_id == contract_id);
        if !belongs {
            return false;
        }
        let Some(stored) = self.records[position].take() else {
            return false;
        };
        self.live_records -= 1;
        if let Some(memo) = stored.memo {
            if let Some(count) = self.records_per_memo.get_mut(&memo) {
                *count -= 1;
                if *count == 1 {
                    self.duplicate_memos -= 1;
                }
                if *count == 0 {
                    self.records_per_memo.remove(&memo);
                }
            }
        }
        true
    }

    pub fn list(&self, contract_id: &str, query: &UsageQuery) -> Vec<BillwerkRecord> {
        let Some(indexes) = self.indexes_by_contract.get(contract_id) else {
            return Vec::new();
        };
        let after = query.after_id.as_deref().and_then(UsageId::parse);
        indexes
            .iter()
            .filter_map(|&index| self.records[index as usize].as_ref())
            .filter(|stored| {
                after.is_none_or(|after| UsageId::new(self.id_prefix, stored.sequence) > after)
            })
            .filter(|stored| {
                query
                    .from_date_time
                    .is_none_or(|from| stored.created_at >= from)
            })
            .filter(|stored| {
                query
                    .until_date_time
                    .is_none_or(|until| stored.created_at < until)
            })
            .skip(query.skip)
            .take(query.take)
            .map(|stored| self.view(stored))
            .collect()
    }

    pub fn records(&self) -> Vec<BillwerkRecord> {
        self.records
            .iter()
            .flatten()
            .map(|stored| self.view(stored))
            .collect()
    }

    pub fn stats(&self, per_key: PerKey) -> RecordStats {
        RecordStats {
            records: self.live_records,
            delivery_keys: self.records_per_memo.len() as u64,
            duplicate_keys: self.duplicate_memos,
            records_per_delivery_key: match per_key {
                PerKey::Listed => self
                    .records_per_memo
                    .iter()
                    .map(|(memo, count)| (memo.to_string(), *count))
                    .collect(),
                PerKey::Counted => Default::default(),
            },
            duplicate_events_ignored: 0,
        }
    }

    pub fn clear(&mut self) {
        self.records.clear();
        self.first_sequence = self.next_sequence;
        self.live_records = 0;
        self.indexes_by_contract.clear();
        self.component_ids.clear();
        self.records_per_memo.clear();
        self.duplicate_memos = 0;
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
        let stats = ledger.stats(PerKey::Listed);
        assert_eq!(stats.records_per_delivery_key["key"], 2);
        assert_eq!((stats.delivery_keys, stats.duplicate_keys), (1, 1));
        let counted = ledger.stats(PerKey::Counted);
        assert!(counted.records_per_delivery_key.is_empty());
        assert_eq!(
            (
                counted.records,
                counted.delivery_keys,
                counted.duplicate_keys
            ),
            (2, 1, 1)
        );
        assert!(!ledger.delete("b", &first.id), "another contract's record");
        assert!(ledger.delete("a", &first.id));
        assert!(!ledger.delete("a", &first.id), "already gone");
        let stats = ledger.stats(PerKey::Listed);
        assert_eq!(stats.records, 1);
        assert_eq!(stats.records_per_delivery_key["key"], 1);
        assert_eq!((stats.delivery_keys, stats.duplicate_keys), (1, 0));
        let other = ledger.insert("a", usage("other"), at(3));
        assert!(ledger.delete("a", &other.id));
        let counted = ledger.stats(PerKey::Counted);
        assert_eq!(
            (
                counted.records,
                counted.delivery_keys,
                counted.duplicate_keys
            ),
            (1, 1, 0)
        );
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
        assert!(!ledger.delete("a", &before.id), "cleared records are gone");
        assert!(!ledger.delete("a", "not-an-id"));
        assert!(
            !ledger.delete("a", "ffffffff0000000000000001"),
            "another run's id"
        );
        assert!(ledger.delete("a", &after.id.to_uppercase()));
    }
}
