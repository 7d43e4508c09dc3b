//! Finding the events an all-or-nothing batch was refused for when the answer does not name
//! them: send halves, then halves of the refused halves, down to single events — each event
//! refused on its own is one to dead-letter. Pure: the sink does the sending and reports back.
//!
//! With `k` bad events in a batch of `n` this costs about `2·k·log2(n)` requests (a batch of 100
//! with one bad event: 14), and every good event ends up accepted in some part. An event is only
//! ever declared refused after it was sent alone and refused alone.

/// The state of one bisection: parts still to send, and what was learnt.
#[derive(Debug, Clone, Default)]
pub struct Bisection {
    /// Parts (indexes into the delivery) waiting to be sent; the last one goes first, so the
    /// search goes depth-first and finds the first bad event with few requests in flight.
    pending: Vec<Vec<usize>>,
    accepted: Vec<usize>,
    refused: Vec<(usize, String)>,
}

impl Bisection {
    /// Starts from a refused batch (the indexes it carried), which is split at once.
    pub fn new(refused_batch: Vec<usize>) -> Bisection {
        let mut b = Bisection::default();
        b.split(refused_batch);
        b
    }

    /// The next part to send, if any.
    pub fn next_part(&mut self) -> Option<Vec<usize>> {
        self.pending.pop()
    }

    /// The provider queued every event of `part`.
    pub fn accepted(&mut self, part: Vec<usize>) {
        self.accepted.extend(part);
    }

    /// The provider refused `part` as a whole without naming events: a single event is refused
    /// for `reason`; a larger part is split and both halves are sent.
    pub fn refused(&mut self, part: Vec<usize>, reason: impl FnOnce() -> String) {
        if part.len() == 1 {
            self.refused.push((part[0], reason()));
        } else {
            self.split(part);
        }
    }

    /// The provider refused `part` and named some of its events (positions within `part`, with
    /// reasons): those are refused; the rest is sent again as one part.
    pub fn refused_named(&mut self, part: Vec<usize>, named: Vec<(usize, String)>) {
        let mut rest = part.clone();
        for (position, reason) in named {
            if let Some(&index) = part.get(position) {
                self.refused.push((index, reason));
                rest.retain(|&i| i != index);
            }
        }
        if !rest.is_empty() {
            self.pending.push(rest);
        }
    }

    /// Refused events found so far, with reasons.
    pub fn refused_so_far(&self) -> &[(usize, String)] {
        &self.refused
    }

    #[cfg(test)]
    pub fn accepted_so_far(&self) -> &[usize] {
        &self.accepted
    }

    /// The result: refused events with reasons, in index order.
    pub fn into_refused(mut self) -> Vec<(usize, String)> {
        self.refused.sort_by_key(|(i, _)| *i);
        self.refused
    }

    fn split(&mut self, mut part: Vec<usize>) {
        if part.len() <= 1 {
            if !part.is_empty() {
                // A single event refused as part of a batch: confirm it alone.
                self.pending.push(part);
            }
            return;
        }
        let second = part.split_off(part.len().div_ceil(2));
        // Pushed second-half first, so the first half is sent first.
        self.pending.push(second);
        self.pending.push(part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// Runs a bisection against a provider that refuses every part containing a bad event;
    /// returns (refused, accepted, requests).
    fn run(n: usize, bad: &BTreeSet<usize>) -> (Vec<usize>, BTreeSet<usize>, usize) {
        let mut b = Bisection::new((0..n).collect());
        let mut requests = 0;
        while let Some(part) = b.next_part() {
            requests += 1;
            if part.iter().any(|i| bad.contains(i)) {
                b.refused(part, || "bad".into());
            } else {
                b.accepted(part);
            }
        }
        let accepted: BTreeSet<usize> = b.accepted_so_far().iter().copied().collect();
        let refused = b.into_refused().into_iter().map(|(i, _)| i).collect();
        (refused, accepted, requests)
    }

    #[test]
    fn one_bad_event_in_a_hundred_takes_fourteen_requests() {
        let (refused, accepted, requests) = run(100, &BTreeSet::from([57]));
        assert_eq!(refused, vec![57]);
        assert_eq!(accepted.len(), 99);
        assert_eq!(requests, 14);
    }

    #[test]
    fn a_batch_of_one_refused_is_confirmed_alone() {
        let (refused, _, requests) = run(1, &BTreeSet::from([0]));
        assert_eq!(refused, vec![0]);
        assert_eq!(requests, 1);
    }

    #[test]
    fn a_refusal_that_was_not_about_one_event_delivers_everything() {
        // E.g. a 413 for the whole body: every half is accepted.
        let (refused, accepted, requests) = run(100, &BTreeSet::new());
        assert!(refused.is_empty());
        assert_eq!(accepted.len(), 100);
        assert_eq!(requests, 2);
    }

    #[test]
    fn named_events_are_taken_out_and_the_rest_sent_again() {
        let mut b = Bisection::new(vec![10, 11, 12, 13]);
        let part = b.next_part().unwrap();
        assert_eq!(part, vec![10, 11]);
        b.refused_named(
            part,
            vec![(1, "11 is bad".into()), (7, "out of range".into())],
        );
        assert_eq!(b.next_part().unwrap(), vec![10]);
        assert_eq!(b.next_part().unwrap(), vec![12, 13]);
        assert!(b.next_part().is_none());
        assert_eq!(b.into_refused(), vec![(11, "11 is bad".to_string())]);
    }

    proptest! {
        /// Every bad event is found, every good one accepted exactly once, within the bound.
        #[test]
        fn finds_exactly_the_bad_events(n in 1usize..=100, bad in proptest::collection::btree_set(0usize..100, 0..6)) {
            let bad: BTreeSet<usize> = bad.into_iter().filter(|&i| i < n).collect();
            let (refused, accepted, requests) = run(n, &bad);
            prop_assert_eq!(refused.iter().copied().collect::<BTreeSet<_>>(), bad.clone());
            prop_assert_eq!(refused.len(), bad.len());
            prop_assert_eq!(accepted.len() + bad.len(), n);
            prop_assert!(accepted.is_disjoint(&bad));
            let log2 = (n as f64).log2().ceil() as usize;
            prop_assert!(requests <= 2 + 2 * bad.len().max(1) * log2.max(1), "{} requests", requests);
        }
    }
}
