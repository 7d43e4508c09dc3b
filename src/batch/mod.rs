//! Grouping priced events into deliveries: one per event (billwerk), batches (Billingrails), or
//! exact sums of events that bill identically (billwerk pre-aggregation). Pure.

// The pure core: no unchecked arithmetic or indexing on data (checked forms, `get`, iterators).
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, Utc};
use rust_decimal::Decimal;

use crate::config::{Config, ProviderConfig};
use crate::deliver::{Delivery, DeliveryItem};
pub use crate::event::{exact_add, exact_sum};
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

impl Grouping {
    /// What the configured sink wants: Billingrails batches of `batch_size` (1..=100), billwerk
    /// aggregates when `[sink.aggregate]` is on, else one billwerk record per event.
    pub fn for_config(config: &Config) -> Grouping {
        match &config.sink.provider {
            ProviderConfig::Billingrails(b) => Grouping::Batches {
                size: b.billingrails.batch_size.clamp(1, 100),
            },
            ProviderConfig::Billwerk(b) if b.aggregate.enabled => Grouping::Aggregate {
                bucket: b.aggregate.bucket,
            },
            ProviderConfig::Billwerk(_) => Grouping::PerEvent,
        }
    }
}

pub use crate::config::Bucket;

impl Bucket {
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
            // Per billing key, one or more sums: an event whose addition would overflow or round
            // a sum starts another one (the first that takes it exactly), so every delivered
            // quantity is the exact sum of its events.
            let mut groups: BTreeMap<String, Vec<ExactGroup>> = BTreeMap::new();
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
                let sums = groups.entry(sort_key).or_default();
                let quantity = item.usage.quantity;
                match sums
                    .iter_mut()
                    .find_map(|g| exact_add(g.sum, quantity).map(|sum| (g, sum)))
                {
                    Some((group, sum)) => {
                        group.sum = sum;
                        group.items.push(item);
                    }
                    None => sums.push(ExactGroup {
                        sum: quantity,
                        items: vec![item],
                    }),
                }
            }
            groups
                .into_values()
                .flatten()
                .map(|group| Delivery {
                    key: DeliveryKey::for_events(
                        group.items.iter().map(|i| i.usage.event_id.as_str()),
                    ),
                    items: group.items,
                })
                .collect()
        }
    }
}

/// Events of one billing key whose quantities add up exactly to `sum`.
struct ExactGroup {
    sum: Decimal,
    items: Vec<DeliveryItem>,
}

/// The total quantity a delivery bills; `None` when its events cannot be summed exactly
/// ([`group`] never builds such a delivery).
pub fn delivered_quantity(delivery: &Delivery) -> Option<Decimal> {
    exact_sum(delivery.items.iter().map(|i| i.usage.quantity))
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
        // A wait too long to represent flushes at once rather than never.
        self.oldest
            .map(|o| o.checked_add(self.max_wait).unwrap_or(o))
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
            .map(|d| delivered_quantity(d).unwrap().to_string())
            .collect();
        sums.sort();
        assert_eq!(sums, vec!["1", "3.3", "5"]);
    }

    fn aggregate(items: Vec<DeliveryItem>) -> Vec<Delivery> {
        group(
            items,
            Grouping::Aggregate {
                bucket: Bucket::Hour,
            },
        )
    }

    /// Issue 11, problem 1: two quantities of 5e28 for one contract, component and hour made
    /// the delivery task panic ("Addition overflowed") again and again, pinning the partition.
    #[test]
    fn aggregation_never_sums_past_the_decimal_range() {
        let huge = "50000000000000000000000000000";
        let d = aggregate(vec![
            item("a", "c", "x", huge, 0),
            item("b", "c", "x", huge, 1),
        ]);
        assert_eq!(d.len(), 2, "two records, each with one event");
        for delivery in &d {
            assert_eq!(delivery.items.len(), 1);
            assert_eq!(
                delivered_quantity(delivery).map(|q| q.to_string()),
                Some(huge.to_string())
            );
        }
    }

    /// Issue 11, problem 1: `8 + 0.1234567890123456789012345678` was billed as
    /// `8.123456789012345678901234568` (rounded to fit 96 bits).
    #[test]
    fn aggregation_never_rounds_a_sum() {
        let tiny = "0.1234567890123456789012345678";
        let d = aggregate(vec![
            item("a", "c", "x", "8", 0),
            item("b", "c", "x", tiny, 1),
            item("c", "c", "x", "2", 2),
        ]);
        let mut sums: Vec<String> = d
            .iter()
            .map(|d| delivered_quantity(d).unwrap().to_string())
            .collect();
        sums.sort();
        // The 2 joins the first sum that takes it exactly.
        assert_eq!(sums, vec![tiny.to_string(), "10".to_string()]);
    }

    #[test]
    fn exact_add_refuses_overflow_and_rounding_only() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        assert_eq!(exact_add(d("1.5"), d("2.25")), Some(d("3.75")));
        assert_eq!(exact_add(d("0.000"), d("5")), Some(d("5")));
        assert_eq!(exact_add(Decimal::MAX, d("1")), None);
        assert_eq!(exact_add(d("8"), d("0.1234567890123456789012345678")), None);
        // 28 decimal places fit when the integer part is small enough.
        assert_eq!(
            exact_add(d("1"), d("0.1234567890123456789012345678")),
            Some(d("1.1234567890123456789012345678"))
        );
        assert_eq!(exact_sum([d("1"), d("2"), d("3")]), Some(d("6")));
        assert_eq!(exact_sum([Decimal::MAX, Decimal::MAX]), None);
    }

    /// The exact decimal text of a sum, by schoolbook addition over digit strings: the reference
    /// the aggregation is checked against (it has no 96-bit limit).
    fn reference_sum(values: &[Decimal]) -> String {
        const SCALE: usize = 28;
        let mut acc: Vec<u8> = Vec::new(); // little-endian decimal digits at scale 28
        for v in values {
            let text = format!("{}{}", v.mantissa(), "0".repeat(SCALE - v.scale() as usize));
            let digits: Vec<u8> = text.bytes().rev().map(|b| b - b'0').collect();
            let mut carry = 0;
            for i in 0..digits.len().max(acc.len()) {
                if i == acc.len() {
                    acc.push(0);
                }
                let sum = acc[i] + digits.get(i).copied().unwrap_or(0) + carry;
                acc[i] = sum % 10;
                carry = sum / 10;
            }
            if carry > 0 {
                acc.push(carry);
            }
        }
        while acc.len() <= SCALE {
            acc.push(0);
        }
        let text: String = acc.iter().rev().map(|d| char::from(b'0' + d)).collect();
        let (int, frac) = text.split_at(text.len() - SCALE);
        let int = int.trim_start_matches('0');
        let int = if int.is_empty() { "0" } else { int };
        let frac = frac.trim_end_matches('0');
        if frac.is_empty() {
            int.to_string()
        } else {
            format!("{int}.{frac}")
        }
    }

    /// Quantities across the whole decimal range: tiny ones with 28 places, huge ones near the
    /// limit, and everyday ones.
    fn any_quantity() -> impl Strategy<Value = Decimal> {
        prop_oneof![
            (1i64..1_000_000, 0u32..7).prop_map(|(m, s)| Decimal::new(m, s)),
            (1u128..(1u128 << 96), 0u32..=28)
                .prop_map(|(m, s)| Decimal::from_i128_with_scale(m as i128, s)),
            (1u128..(1u128 << 96)).prop_map(|m| Decimal::from_i128_with_scale(m as i128, 0)),
        ]
    }

    #[test]
    fn reference_sum_is_right() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        assert_eq!(
            reference_sum(&[d("8"), d("0.1234567890123456789012345678")]),
            "8.1234567890123456789012345678"
        );
        assert_eq!(reference_sum(&[d("0.5"), d("0.5")]), "1");
        assert_eq!(
            reference_sum(&[Decimal::MAX, d("1")]),
            "79228162514264337593543950336"
        );
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
                *got.entry((c.clone(), first.component_id.clone(), first.due_date.timestamp())).or_default() += delivered_quantity(d).unwrap();
                seen += d.items.len();
            }
            prop_assert_eq!(seen, items.len());
            prop_assert_eq!(got, expected);
        }

        /// However large or precise the quantities, aggregation never panics, never rounds and
        /// loses no event: each delivery's quantity is the exact sum of its events (checked
        /// against schoolbook addition), and only sums that cannot be represented are split.
        #[test]
        fn aggregation_is_exact_across_the_decimal_range(
            events in proptest::collection::vec((0usize..2, any_quantity(), 0i64..120), 1..60)
        ) {
            let items: Vec<DeliveryItem> = events.iter().enumerate().map(|(i, (c, q, m))| {
                item(&format!("e{i}"), &format!("c{c}"), "k", &q.to_string(), *m)
            }).collect();
            let deliveries = aggregate(items.clone());
            let mut seen: Vec<String> = Vec::new();
            for d in &deliveries {
                let quantities: Vec<Decimal> = d.items.iter().map(|i| i.usage.quantity).collect();
                let sum = delivered_quantity(d);
                prop_assert!(sum.is_some(), "a delivery whose sum cannot be made: {:?}", quantities);
                prop_assert_eq!(sum.unwrap().normalize().to_string(), reference_sum(&quantities));
                seen.extend(d.items.iter().map(|i| i.usage.event_id.clone()));
            }
            seen.sort();
            let mut want: Vec<String> = items.iter().map(|i| i.usage.event_id.clone()).collect();
            want.sort();
            prop_assert_eq!(seen, want, "every event in exactly one delivery");
            // Everyday quantities still go out as one record per billing key.
            if events.iter().all(|(_, q, _)| *q < Decimal::from(1_000_000)  && q.scale() < 7) {
                let keys: std::collections::HashSet<String> = deliveries.iter().map(|d| {
                    format!("{:?}{}", d.items[0].usage.customer, d.items[0].usage.due_date)
                }).collect();
                prop_assert_eq!(keys.len(), deliveries.len());
            }
        }
    }
}
