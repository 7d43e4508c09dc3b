//! The contiguous per-partition offset watermark.
//!
//! An offset may be committed only when every earlier offset of its partition is settled
//! (accepted by the provider or durably dead-lettered) — across batch boundaries. Vector stores the
//! offset of any acknowledged event and Lago only looks within one batch; both skip an earlier
//! failure for good. Here the committable position is the smallest offset still pending.

// The pure core: no unchecked arithmetic or indexing on data (checked forms, `get`, iterators).
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

use std::collections::{BTreeSet, HashMap};

/// One partition's read-but-unsettled offsets.
#[derive(Debug, Clone, Default)]
pub struct ContiguousWatermark {
    pending: BTreeSet<i64>,
    /// One past the highest offset tracked so far.
    next_unread: Option<i64>,
    /// The position last handed out by [`ContiguousWatermark::advance`].
    stored: Option<i64>,
}

impl ContiguousWatermark {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was read and is now pending. Offsets arrive in increasing order;
    /// gaps (compaction, transaction markers) are fine.
    pub fn track(&mut self, offset: i64) {
        self.pending.insert(offset);
        self.next_unread = Some(self.next_unread.map_or(offset.saturating_add(1), |n| {
            n.max(offset.saturating_add(1))
        }));
    }

    /// Marks `offset` settled. Returns false when it was not pending (already settled, or never
    /// tracked under this watermark).
    pub fn settle(&mut self, offset: i64) -> bool {
        self.pending.remove(&offset)
    }

    /// The position to commit: the next offset a restarted consumer must read. `None` until
    /// anything was tracked.
    pub fn committable(&self) -> Option<i64> {
        match self.pending.first() {
            Some(&lowest_pending) => Some(lowest_pending),
            None => self.next_unread,
        }
    }

    /// The committable position if it moved since the last call.
    pub fn advance(&mut self) -> Option<i64> {
        let position = self.committable()?;
        if self.stored.is_some_and(|s| s >= position) {
            return None;
        }
        self.stored = Some(position);
        Some(position)
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }
}

/// Watermarks of every assigned partition, each tagged with the generation it was assigned
/// under so that late settlements for a revoked partition are recognised and dropped.
#[derive(Debug, Default)]
pub struct Watermarks {
    partitions: HashMap<(String, i32), (u64, ContiguousWatermark)>,
}

impl Watermarks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a fresh watermark for a newly assigned partition.
    pub fn assign(&mut self, topic: &str, partition: i32, generation: u64) {
        self.partitions.insert(
            (topic.to_string(), partition),
            (generation, ContiguousWatermark::new()),
        );
    }

    /// Forgets a revoked partition, returning its final watermark.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> Option<ContiguousWatermark> {
        self.partitions
            .remove(&(topic.to_string(), partition))
            .map(|(_, w)| w)
    }

    fn current(
        &mut self,
        topic: &str,
        partition: i32,
        generation: u64,
    ) -> Option<&mut ContiguousWatermark> {
        match self.partitions.get_mut(&(topic.to_string(), partition)) {
            Some((g, w)) if *g == generation => Some(w),
            _ => None,
        }
    }

    /// Tracks a read offset; false when the partition is not assigned under that generation.
    pub fn track(&mut self, topic: &str, partition: i32, generation: u64, offset: i64) -> bool {
        match self.current(topic, partition, generation) {
            Some(w) => {
                w.track(offset);
                true
            }
            None => false,
        }
    }

    /// Settles an offset. `None` when it was not pending under that generation (a late
    /// settlement for a revoked partition, or a second settlement); otherwise the new committable
    /// position when it moved.
    pub fn settle(
        &mut self,
        topic: &str,
        partition: i32,
        generation: u64,
        offset: i64,
    ) -> Option<Option<i64>> {
        let w = self.current(topic, partition, generation)?;
        if !w.settle(offset) {
            return None;
        }
        Some(w.advance())
    }

    pub fn get(&self, topic: &str, partition: i32) -> Option<&ContiguousWatermark> {
        self.partitions
            .get(&(topic.to_string(), partition))
            .map(|(_, w)| w)
    }

    pub fn pending_in(&self, topic: &str, partition: i32) -> usize {
        self.get(topic, partition).map_or(0, |w| w.pending_count())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&(String, i32), &ContiguousWatermark)> {
        self.partitions.iter().map(|(k, (_, w))| (k, w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn never_moves_past_an_unsettled_offset_across_batches() {
        let mut w = ContiguousWatermark::new();
        for o in 0..10 {
            w.track(o);
        }
        // Batch 1 (0..5): offset 2 fails; batch 2 (5..10) succeeds entirely.
        for o in [0, 1, 3, 4, 5, 6, 7, 8, 9] {
            w.settle(o);
        }
        assert_eq!(w.committable(), Some(2));
        assert_eq!(w.advance(), Some(2));
        assert_eq!(w.advance(), None, "no movement, nothing new to store");
        w.settle(2);
        assert_eq!(w.advance(), Some(10));
    }

    #[test]
    fn gaps_in_offsets_are_not_waited_for() {
        let mut w = ContiguousWatermark::new();
        w.track(5);
        w.track(9);
        w.settle(9);
        assert_eq!(w.committable(), Some(5));
        w.settle(5);
        assert_eq!(w.committable(), Some(10));
    }

    #[test]
    fn stale_generation_settlements_are_ignored() {
        let mut ws = Watermarks::new();
        ws.assign("t", 0, 1);
        assert!(ws.track("t", 0, 1, 0));
        ws.revoke("t", 0);
        ws.assign("t", 0, 2);
        assert!(ws.track("t", 0, 2, 0));
        assert_eq!(
            ws.settle("t", 0, 1, 0),
            None,
            "old generation must not settle"
        );
        assert_eq!(ws.pending_in("t", 0), 1);
        assert_eq!(ws.settle("t", 0, 2, 0), Some(Some(1)));
        assert_eq!(
            ws.settle("t", 0, 2, 0),
            None,
            "a second settlement is not counted"
        );
    }

    proptest! {
        /// Whatever order settlements arrive in, the committed position never passes an
        /// unsettled offset, and reaches the end once everything is settled.
        #[test]
        fn committed_position_is_contiguous(
            offsets in proptest::collection::btree_set(0i64..500, 1..100),
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..100),
        ) {
            let offsets: Vec<i64> = offsets.into_iter().collect();
            let mut w = ContiguousWatermark::new();
            for &o in &offsets { w.track(o); }
            let mut unsettled: Vec<i64> = offsets.clone();
            let mut last_stored = None;
            for idx in order {
                if unsettled.is_empty() { break; }
                let o = unsettled.remove(idx.index(unsettled.len()));
                w.settle(o);
                if let Some(p) = w.advance() {
                    prop_assert!(last_stored.is_none_or(|l| p > l));
                    last_stored = Some(p);
                }
                let lowest_unsettled = unsettled.iter().min().copied();
                let c = w.committable().unwrap();
                match lowest_unsettled {
                    Some(l) => prop_assert!(c <= l),
                    None => prop_assert_eq!(c, offsets.last().unwrap() + 1),
                }
            }
        }
    }
}
