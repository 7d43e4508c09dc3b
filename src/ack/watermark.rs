//! The contiguous per-partition offset watermark.
//!
//! An offset may be committed only when every earlier offset of its partition is settled
//! (accepted by the provider or durably dead-lettered) — across batch boundaries. Vector stores the
//! offset of any acknowledged event and Lago only looks within one batch; both skip an earlier
//! failure for good. Here the committable position is the smallest offset still pending.
//!
//! Offsets the reads jumped over are not trusted either: a broker may skip records (Tansu 0.6's
//! memory storage answers a fetch that starts inside a record batch with the *next* batch), so a
//! jump leaves a [`Gap`] that holds the position like a pending event until the source has
//! re-read the range (`src/source/gaps.rs`) and either found the missing records or had the
//! broker confirm that it holds nothing there (compaction, transaction markers).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::time::Instant;

/// Offsets `start..end` that the reads jumped over and nobody has verified yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub start: i64,
    /// Exclusive: the offset that was read after the jump.
    pub end: i64,
    /// When the jump was seen: the position has been held here since.
    pub since: Instant,
}

/// What [`ContiguousWatermark::track`] made of a read offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracked {
    /// The next offset, or the first one read (pending now).
    InOrder,
    /// Read after a jump: `missing` were not read, and the position holds at `missing.start`
    /// until they are verified (pending now).
    AfterGap { missing: Range<i64> },
    /// A record of a gap, re-read by the verification (pending now).
    Filled,
    /// Read already under this assignment: drop it, or it would be processed twice.
    Duplicate,
}

/// One partition's read-but-unsettled offsets, and the offsets skipped but not verified.
#[derive(Debug, Clone, Default)]
pub struct ContiguousWatermark {
    /// Pending offset → since when it holds the position (when it was read, or when the gap it
    /// filled was seen).
    pending: BTreeMap<i64, Instant>,
    /// Gap start → gap.
    gaps: BTreeMap<i64, Gap>,
    /// One past the highest offset tracked so far.
    next_unread: Option<i64>,
    /// Where this assignment's reads started (the committed offset), once known.
    start: Option<i64>,
    /// The first offset read, while the start is still unknown (and since when): nothing may be
    /// committed until the start is known, or a jump at the start would go unseen.
    awaiting_start: Option<(i64, Instant)>,
    /// The position last handed out by [`ContiguousWatermark::advance`].
    stored: Option<i64>,
    /// When a new offset was last tracked.
    last_read: Option<Instant>,
}

impl ContiguousWatermark {
    pub fn new() -> Self {
        Self::default()
    }

    /// A watermark whose reads start at `start` (the committed offset), so that a first record
    /// after it is a jump.
    pub fn starting_at(start: i64) -> Self {
        ContiguousWatermark {
            start: Some(start),
            ..Self::default()
        }
    }

    /// Records that `offset` was read at `now`. Offsets normally arrive in increasing order; an
    /// offset past the next one leaves a gap, an earlier one fills a gap or is a duplicate.
    pub fn track(&mut self, offset: i64, now: Instant) -> Tracked {
        let tracked = self.track_inner(offset, now);
        if tracked != Tracked::Duplicate {
            self.last_read = Some(now);
        }
        tracked
    }

    fn track_inner(&mut self, offset: i64, now: Instant) -> Tracked {
        let Some(next) = self.next_unread else {
            self.next_unread = Some(offset.saturating_add(1));
            self.pending.insert(offset, now);
            return match self.start {
                Some(start) if offset > start => {
                    self.add_gap(start..offset, now);
                    Tracked::AfterGap {
                        missing: start..offset,
                    }
                }
                Some(_) => Tracked::InOrder,
                None => {
                    self.awaiting_start = Some((offset, now));
                    Tracked::InOrder
                }
            };
        };
        if offset >= next {
            self.next_unread = Some(offset.saturating_add(1));
            self.pending.insert(offset, now);
            if offset > next {
                self.add_gap(next..offset, now);
                return Tracked::AfterGap {
                    missing: next..offset,
                };
            }
            return Tracked::InOrder;
        }
        let Some(gap) = self.gap_containing(offset) else {
            return Tracked::Duplicate;
        };
        self.gaps.remove(&gap.start);
        if gap.start < offset {
            self.gaps.insert(gap.start, Gap { end: offset, ..gap });
        }
        if offset + 1 < gap.end {
            self.gaps.insert(
                offset + 1,
                Gap {
                    start: offset + 1,
                    ..gap
                },
            );
        }
        self.pending.insert(offset, gap.since);
        Tracked::Filled
    }

    /// The start position (committed offset) learned after the first read: a first read past
    /// it becomes a gap. Returns the gap, if any. Ignored when the start is known already.
    pub fn learn_start(&mut self, start: i64) -> Option<Range<i64>> {
        if self.start.is_some() {
            return None;
        }
        self.start = Some(start);
        let (first, since) = self.awaiting_start.take()?;
        if first > start {
            self.add_gap(start..first, since);
            return Some(start..first);
        }
        None
    }

    /// The first offset read, while the start position is still needed (something was read
    /// before it was known).
    pub fn awaits_start(&self) -> Option<i64> {
        self.awaiting_start.map(|(first, _)| first)
    }

    /// The broker confirmed that it holds nothing at `range` (or the offsets are gone): they no
    /// longer hold the position. Returns how many offsets of a gap that covered.
    pub fn confirm_absent(&mut self, range: Range<i64>) -> u64 {
        let mut confirmed = 0u64;
        let touched: Vec<Gap> = self
            .gaps
            .values()
            .filter(|g| g.start < range.end && range.start < g.end)
            .copied()
            .collect();
        for gap in touched {
            self.gaps.remove(&gap.start);
            let from = gap.start.max(range.start);
            let to = gap.end.min(range.end);
            confirmed = confirmed.saturating_add(to.saturating_sub(from).max(0) as u64);
            if gap.start < from {
                self.gaps.insert(gap.start, Gap { end: from, ..gap });
            }
            if to < gap.end {
                self.gaps.insert(to, Gap { start: to, ..gap });
            }
        }
        confirmed
    }

    /// The lowest gap still unverified.
    pub fn first_gap(&self) -> Option<Gap> {
        self.gaps.values().next().copied()
    }

    /// Offsets held by unverified gaps.
    pub fn gap_offsets(&self) -> u64 {
        self.gaps
            .values()
            .map(|g| g.end.saturating_sub(g.start).max(0) as u64)
            .sum()
    }

    fn add_gap(&mut self, range: Range<i64>, since: Instant) {
        self.gaps.insert(
            range.start,
            Gap {
                start: range.start,
                end: range.end,
                since,
            },
        );
    }

    fn gap_containing(&self, offset: i64) -> Option<Gap> {
        self.gaps
            .range(..=offset)
            .next_back()
            .map(|(_, g)| *g)
            .filter(|g| offset < g.end)
    }

    /// Marks `offset` settled. Returns false when it was not pending (already settled, or never
    /// tracked under this watermark).
    pub fn settle(&mut self, offset: i64) -> bool {
        self.pending.remove(&offset).is_some()
    }

    /// The position to commit: the next offset a restarted consumer must read — the lowest
    /// pending offset or unverified gap, else one past the last read. `None` until anything was
    /// tracked, and while the start of the reads is unknown.
    pub fn committable(&self) -> Option<i64> {
        if self.awaiting_start.is_some() {
            return None;
        }
        let next = self.next_unread?;
        let pending = self.pending.keys().next().copied().unwrap_or(next);
        let gap = self.gaps.keys().next().copied().unwrap_or(next);
        Some(pending.min(gap).min(next))
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

    /// One past the highest offset read, and when an offset was last read (`None` before the
    /// first read).
    pub fn read_up_to(&self) -> Option<(i64, Instant)> {
        self.next_unread.zip(self.last_read)
    }

    /// Since when the oldest unsettled thing — a pending event, an unverified gap, an unknown
    /// start — has been holding the position; `None` when nothing does.
    pub fn oldest_unsettled(&self) -> Option<Instant> {
        let pending = self.pending.values().min().copied();
        let gap = self.gaps.values().map(|g| g.since).min();
        let start = self.awaiting_start.map(|(_, since)| since);
        [pending, gap, start].into_iter().flatten().min()
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

    /// The partition's watermark, if it is assigned under `generation`.
    pub fn current(
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

    /// Tracks a read offset; `None` when the partition is not assigned under that generation.
    pub fn track(
        &mut self,
        topic: &str,
        partition: i32,
        generation: u64,
        offset: i64,
        now: Instant,
    ) -> Option<Tracked> {
        self.current(topic, partition, generation)
            .map(|w| w.track(offset, now))
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

    /// Every assigned partition with its generation.
    pub fn iter_generations(
        &self,
    ) -> impl Iterator<Item = (&(String, i32), u64, &ContiguousWatermark)> {
        self.partitions.iter().map(|(k, (g, w))| (k, *g, w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn never_moves_past_an_unsettled_offset_across_batches() {
        let now = t0();
        let mut w = ContiguousWatermark::starting_at(0);
        for o in 0..10 {
            assert_eq!(w.track(o, now), Tracked::InOrder);
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

    /// Issue 11, problem 4: Tansu's memory storage answered a fetch from inside a batch with the
    /// next batch (1885 → 4384); the old watermark committed past 1885..4384 unseen.
    #[test]
    fn a_jump_holds_the_position_until_verified() {
        let now = t0();
        let mut w = ContiguousWatermark::starting_at(1880);
        for o in 1880..1885 {
            w.track(o, now);
        }
        assert_eq!(
            w.track(4384, now),
            Tracked::AfterGap {
                missing: 1885..4384
            }
        );
        for o in (1880..1885).chain([4384]) {
            w.settle(o);
        }
        assert_eq!(w.committable(), Some(1885), "never past unseen offsets");
        assert_eq!(w.first_gap().map(|g| g.start..g.end), Some(1885..4384));
        assert_eq!(w.gap_offsets(), 4384 - 1885);
        // The re-read brings the missing records back: each is pending, once.
        for o in 1885..4384 {
            assert_eq!(w.track(o, now), Tracked::Filled, "{o}");
        }
        assert_eq!(w.track(2000, now), Tracked::Duplicate, "read twice");
        assert_eq!(w.track(4384, now), Tracked::Duplicate);
        assert_eq!(w.first_gap(), None);
        assert_eq!(w.committable(), Some(1885));
        for o in 1885..4384 {
            assert!(w.settle(o));
        }
        assert_eq!(w.committable(), Some(4385));
    }

    #[test]
    fn a_confirmed_gap_is_passed() {
        let now = t0();
        let mut w = ContiguousWatermark::starting_at(0);
        w.track(5, now);
        w.track(9, now);
        assert_eq!(w.committable(), Some(0), "0..5 not verified yet");
        w.settle(9);
        w.settle(5);
        assert_eq!(w.committable(), Some(0));
        assert_eq!(w.confirm_absent(0..5), 5);
        assert_eq!(w.committable(), Some(6), "6..9 not verified yet");
        // Part of a gap: a record found in the middle, the rest confirmed absent.
        assert_eq!(w.track(7, now), Tracked::Filled);
        assert_eq!(w.confirm_absent(6..7), 1);
        assert_eq!(w.committable(), Some(7));
        assert_eq!(w.confirm_absent(8..9), 1);
        w.settle(7);
        assert_eq!(w.committable(), Some(10));
        assert_eq!(w.confirm_absent(0..100), 0, "nothing left to confirm");
    }

    #[test]
    fn nothing_is_committed_while_the_start_is_unknown() {
        let now = t0();
        let mut w = ContiguousWatermark::new();
        w.track(4384, now);
        w.settle(4384);
        assert_eq!(w.awaits_start(), Some(4384));
        assert_eq!(w.committable(), None);
        assert_eq!(w.oldest_unsettled(), Some(now), "held since the first read");
        assert_eq!(w.learn_start(1885), Some(1885..4384));
        assert_eq!(w.committable(), Some(1885));
        assert_eq!(w.learn_start(0), None, "learned once");

        let mut w = ContiguousWatermark::new();
        w.track(7, now);
        assert_eq!(w.learn_start(7), None, "no jump at the start");
        w.settle(7);
        assert_eq!(w.committable(), Some(8));
    }

    #[test]
    fn oldest_unsettled_is_what_holds_the_position_longest() {
        let t = t0();
        let later = t + Duration::from_secs(60);
        let mut w = ContiguousWatermark::starting_at(0);
        assert_eq!(w.oldest_unsettled(), None);
        w.track(0, t);
        w.track(1, later);
        assert_eq!(w.oldest_unsettled(), Some(t));
        w.settle(0);
        assert_eq!(w.oldest_unsettled(), Some(later));
        w.settle(1);
        assert_eq!(w.oldest_unsettled(), None);
        // A gap seen at `t` holds since `t`; a record filling it later keeps that age.
        w.track(5, t);
        w.settle(5);
        assert_eq!(w.oldest_unsettled(), Some(t));
        w.track(3, later);
        w.confirm_absent(2..3);
        w.confirm_absent(4..5);
        assert_eq!(w.oldest_unsettled(), Some(t));
        w.settle(3);
        assert_eq!(w.oldest_unsettled(), None);
    }

    #[test]
    fn stale_generation_settlements_are_ignored() {
        let now = t0();
        let mut ws = Watermarks::new();
        ws.assign("t", 0, 1);
        assert!(ws.track("t", 0, 1, 0, now).is_some());
        ws.revoke("t", 0);
        ws.assign("t", 0, 2);
        assert!(ws.track("t", 0, 1, 0, now).is_none(), "old generation");
        assert!(ws.track("t", 0, 2, 0, now).is_some());
        ws.current("t", 0, 2).unwrap().learn_start(0);
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
            let now = Instant::now();
            let offsets: Vec<i64> = offsets.into_iter().collect();
            let mut w = ContiguousWatermark::starting_at(offsets[0]);
            for &o in &offsets { w.track(o, now); }
            // Every jump is confirmed by the broker, as for a compacted topic.
            w.confirm_absent(offsets[0]..offsets[offsets.len() - 1]);
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

        /// Reads that skip records (a broker answering from a later batch), re-reads that bring
        /// some of them back, and confirmations of the rest: the position never passes an offset
        /// that was neither settled nor confirmed absent, and every read offset is pending once.
        #[test]
        fn position_never_passes_an_unverified_offset(
            present in proptest::collection::btree_set(0i64..300, 1..120),
            skipped in proptest::collection::btree_set(0i64..300, 0..60),
            confirm in proptest::collection::vec((0i64..300, 1i64..20), 0..10),
        ) {
            let now = Instant::now();
            let present: Vec<i64> = present.into_iter().collect();
            let mut w = ContiguousWatermark::starting_at(0);
            let mut pending = std::collections::BTreeSet::new();
            let mut confirmed = std::collections::BTreeSet::new();
            // First read: everything present except the skipped ones.
            for &o in present.iter().filter(|o| !skipped.contains(o)) {
                if w.track(o, now) != Tracked::Duplicate { pending.insert(o); }
            }
            // The re-read: every present offset again (duplicates must be refused).
            for &o in &present {
                let t = w.track(o, now);
                prop_assert_eq!(t == Tracked::Duplicate, pending.contains(&o), "{} {:?}", o, t);
                pending.insert(o);
            }
            for (start, len) in confirm {
                // Only offsets the broker does not hold may be confirmed absent.
                let range: Vec<i64> = (start..start + len).collect();
                if range.iter().any(|o| present.binary_search(o).is_ok()) { continue; }
                w.confirm_absent(start..start + len);
                confirmed.extend(range);
            }
            for &o in &present { w.settle(o); }
            let c = w.committable().unwrap();
            for o in 0..c {
                prop_assert!(present.binary_search(&o).is_ok() || confirmed.contains(&o),
                    "committable {} passes {} (neither read nor confirmed absent)", c, o);
            }
        }
    }
}
