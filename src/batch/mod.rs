//! Grouping priced events into deliveries: one per event (billwerk), batches (Billingrails), or
//! exact sums of events that bill identically (billwerk pre-aggregation). Pure.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, Utc};
use rust_decimal::Decimal;

use crate::deliver::{Delivery, DeliveryItem};
use crate::event::{CustomerRef, DeliveryKey, ProductOverride};

/// How a sink wants its deliveries cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// One delivery per event, sent as soon as it is priced.
    PerEvent,
    /// Up to `size` events per delivery.
    Batches { size: usize },
    /// Events with the same contract, component, override and due-date bucket become one
    /// delivery whose quantity is their exact sum.
    Aggregate { bucket: Bucket },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Hour,
    Day,
}

impl Bucket {
    pub fn parse(s: &str) -> Option<Bucket> {
        match s {
            "hour" => Some(Bucket::Hour),
            "day" => Some(Bucket::Day),
            _ => None,
        }
    }

    /// The start of the bucket `t` falls in.
    pub fn truncate(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let step = match self {
            Bucket::Hour => chrono::Duration::hours(1),
            Bucket::Day => chrono::Duration::days(1),
        };
        t.duration_trunc(step).unwrap_or(t)
    }
}

/// Cuts a flushed batch into deliveries.
pub fn group(items: Vec<DeliveryItem>, grouping: Grouping) -> Vec<Delivery> {
    match grouping {
        Grouping::PerEvent => items
            .into_iter()
            .map(|item| Delivery {
                key: DeliveryKey::for_event(&item.usage.event_id),
                items: vec![item],
            })
            .collect(),
        Grouping::Batches { size } => {
            let size = size.max(1);
            let mut out = Vec::with_capacity(items.len().div_ceil(size));
            let mut rest = items.into_iter().peekable();
            while rest.peek().is_some() {
                let chunk: Vec<DeliveryItem> = rest.by_ref().take(size).collect();
                out.push(Delivery {
                    key: DeliveryKey::for_events(chunk.iter().map(|i| i.usage.event_id.as_str())),
                    items: chunk,
                });
            }
            out
        }
        Grouping::Aggregate { bucket } => {
            type GroupKey = (CustomerRef, String, Option<ProductOverride>, DateTime<Utc>);
            let mut groups: BTreeMap<String, (GroupKey, Vec<DeliveryItem>)> = BTreeMap::new();
            for mut item in items {
                let bucket_start = bucket.truncate(item.usage.due_date);
                item.usage.due_date = bucket_start;
                let key: GroupKey = (
                    item.usage.customer.clone(),
                    item.usage.component_id.clone(),
                    item.usage.product_override.clone(),
                    bucket_start,
                );
                // A stable textual form keeps the output order deterministic.
                let sort_key = format!("{key:?}");
                groups
                    .entry(sort_key)
                    .or_insert_with(|| (key, Vec::new()))
                    .1
                    .push(item);
            }
            groups
                .into_values()
                .map(|(_, items)| Delivery {
                    key: DeliveryKey::for_events(items.iter().map(|i| i.usage.event_id.as_str())),
                    items,
                })
                .collect()
        }
    }
}

/// The total quantity a delivery bills.
pub fn delivered_quantity(delivery: &Delivery) -> Decimal {
    delivery.items.iter().map(|i| i.usage.quantity).sum()
}

/// Accumulates items until `max_events` or until the oldest has waited `max_wait`.
#[derive(Debug)]
pub struct Batcher {
    max_events: usize,
    max_wait: Duration,
    items: Vec<DeliveryItem>,
    oldest: Option<Instant>,
}

impl Batcher {
    pub fn new(max_events: usize, max_wait: Duration) -> Self {
        Batcher {
            max_events: max_events.max(1),
            max_wait,
            items: Vec::new(),
            oldest: None,
        }
    }

    /// Adds an item; returns a full batch when `max_events` is reached.
    pub fn push(&mut self, item: DeliveryItem, now: Instant) -> Option<Vec<DeliveryItem>> {
        if self.items.is_empty() {
            self.oldest = Some(now);
        }
        self.items.push(item);
        (self.items.len() >= self.max_events).then(|| self.take())
    }

    /// When the current batch must be flushed, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.oldest.map(|o| o + self.max_wait)
    }

    /// The batch if its deadline has passed.
    pub fn poll(&mut self, now: Instant) -> Option<Vec<DeliveryItem>> {
        match self.deadline() {
            Some(d) if now >= d => Some(self.take()),
            _ => None,
        }
    }

    pub fn take(&mut self) -> Vec<DeliveryItem> {
        self.oldest = None;
        std::mem::take(&mut self.items)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{BillableUsage, RawMessage, SourceRef};
    use chrono::TimeZone;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::str::FromStr;

    fn item(id: &str, contract: &str, component: &str, qty: &str, minute: i64) -> DeliveryItem {
        DeliveryItem {
            usage: BillableUsage {
                event_id: id.to_string(),
                customer: CustomerRef::ContractId(contract.to_string()),
                metric: "m".into(),
                component_id: component.to_string(),
                quantity: Decimal::from_str(qty).unwrap(),
                due_date: Utc.with_ymd_and_hms(2026, 11, 20, 10, 0, 0).unwrap()
                    + chrono::Duration::minutes(minute),
                product_override: None,
                attributes: Default::default(),
            },
            raw: RawMessage {
                source: SourceRef {
                    topic: "t".into(),
                    partition: 0,
                    offset: 0,
                },
                key: None,
                payload: Default::default(),
                headers: vec![],
                generation: 1,
            },
        }
    }

    #[test]
    fn per_event_keys_follow_event_ids() {
        let d = group(vec![item("a", "c", "x", "1", 0)], Grouping::PerEvent);
        assert_eq!(d[0].key, DeliveryKey::for_event("a"));
    }

    #[test]
    fn batches_respect_size() {
        let items: Vec<_> = (0..250)
            .map(|i| item(&i.to_string(), "c", "x", "1", 0))
            .collect();
        let d = group(items, Grouping::Batches { size: 100 });
        assert_eq!(
            d.iter().map(|d| d.items.len()).collect::<Vec<_>>(),
            vec![100, 100, 50]
        );
    }

    #[test]
    fn aggregation_sums_within_bucket_only() {
        let items = vec![
            item("a", "c1", "x", "1.1", 0),
            item("b", "c1", "x", "2.2", 59),
            item("c", "c1", "x", "5", 61),
            item("d", "c2", "x", "1", 0),
        ];
        let d = group(
            items,
            Grouping::Aggregate {
                bucket: Bucket::Hour,
            },
        );
        let mut sums: Vec<String> = d
            .iter()
            .map(|d| delivered_quantity(d).to_string())
            .collect();
        sums.sort();
        assert_eq!(sums, vec!["1", "3.3", "5"]);
    }

    #[test]
    fn batcher_flushes_on_size_and_on_time() {
        let t0 = Instant::now();
        let mut b = Batcher::new(2, Duration::from_millis(100));
        assert!(b.push(item("a", "c", "x", "1", 0), t0).is_none());
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(100)));
        assert_eq!(b.push(item("b", "c", "x", "1", 0), t0).unwrap().len(), 2);
        assert!(b.is_empty());
        b.push(item("c", "c", "x", "1", 0), t0);
        assert!(b.poll(t0 + Duration::from_millis(99)).is_none());
        assert_eq!(b.poll(t0 + Duration::from_millis(100)).unwrap().len(), 1);
    }

    proptest! {
        /// Aggregation is exact: per contract, component and bucket, the delivered sums equal the
        /// sums of the events, and every event is in exactly one delivery.
        #[test]
        fn aggregation_preserves_sums(
            events in proptest::collection::vec((0usize..3, 0usize..2, 1u32..100_000, 0u32..4, 0i64..180), 0..200)
        ) {
            let items: Vec<DeliveryItem> = events.iter().enumerate().map(|(i, (c, k, q, scale, m))| {
                let qty = Decimal::new(i64::from(*q), *scale);
                item(&format!("e{i}"), &format!("c{c}"), &format!("k{k}"), &qty.to_string(), *m)
            }).collect();
            let mut expected: HashMap<(String, String, i64), Decimal> = HashMap::new();
            for it in &items {
                let CustomerRef::ContractId(c) = &it.usage.customer else { unreachable!() };
                let bucket = Bucket::Hour.truncate(it.usage.due_date).timestamp();
                *expected.entry((c.clone(), it.usage.component_id.clone(), bucket)).or_default() += it.usage.quantity;
            }
            let deliveries = group(items.clone(), Grouping::Aggregate { bucket: Bucket::Hour });
            let mut got: HashMap<(String, String, i64), Decimal> = HashMap::new();
            let mut seen = 0;
            for d in &deliveries {
                let first = &d.items[0].usage;
                let CustomerRef::ContractId(c) = &first.customer else { unreachable!() };
                *got.entry((c.clone(), first.component_id.clone(), first.due_date.timestamp())).or_default() += delivered_quantity(d);
                seen += d.items.len();
            }
            prop_assert_eq!(seen, items.len());
            prop_assert_eq!(got, expected);
        }
    }
}
