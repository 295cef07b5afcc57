//! A streamed (in-progress) transaction: its plan kept as segments per subtransaction, so a
//! StreamAbort of a subtransaction can drop its part.
//!
//! Postgres sends neither the start nor the release of a subtransaction, only the (sub)xid of
//! each change and a StreamAbort when one rolls back. What it does guarantee: subtransactions
//! nest, and a subtransaction's xid is assigned after its parent's. So while subtransaction S
//! makes a change, every xid above S's in this transaction belongs to a descendant of S that
//! is finished; and when S rolls back, everything from S's first change on is S's or its
//! descendants' (Postgres's own apply worker truncates its spool file at that point too).
//! Hence the segments, kept in stream order with strictly increasing xids:
//! - a change by an xid below the last segment's folds every later segment into one owned by
//!   that xid (its finished descendants can only be rolled back together with it);
//! - a StreamAbort of xid X drops every segment from X's on;
//! - a segment that adds nothing to what earlier segments hold (`Plan::absorbs`) is dropped
//!   when the next subtransaction starts: rolling back to before it leaves the same plan.
//!
//! The last rule is what keeps a savepoint per row (a PL/pgSQL `EXCEPTION` block in a loop,
//! each iteration its own subtransaction and nothing else on the stream) from holding one plan
//! per row: memory follows the distinct effects, as for any other transaction.

use crate::plan::Plan;

pub(crate) struct StreamedTxn<P> {
    top_xid: u32,
    segments: Vec<Segment<P>>,
    /// The set-like effects (`Plan::absorbing_part`) of some of `segments[..covered]`, to tell
    /// whether a closing segment adds anything. Holding less than all of them only means fewer
    /// segments are dropped.
    seen: P,
    covered: usize,
    change_count: u64,
}

struct Segment<P> {
    /// The owning xid's distance from the top-level xid: xids wrap around, distances within
    /// one transaction do not.
    age: u32,
    plan: P,
}

impl<P: Plan> StreamedTxn<P> {
    pub(crate) fn new(top_xid: u32) -> Self {
        StreamedTxn {
            top_xid,
            segments: Vec::new(),
            seen: P::default(),
            covered: 0,
            change_count: 0,
        }
    }

    /// The plan a change of `xid` (the top-level xid or one of its subtransactions) folds
    /// into, and the transaction's change counter.
    pub(crate) fn plan_for(&mut self, xid: u32) -> (&mut P, &mut u64) {
        let age = xid.wrapping_sub(self.top_xid);
        match self.segments.last() {
            Some(last) if last.age == age => {}
            Some(last) if last.age > age => self.resume(age),
            _ => {
                self.close_last();
                self.segments.push(Segment {
                    age,
                    plan: P::default(),
                });
            }
        }
        let last = self.segments.len() - 1;
        (&mut self.segments[last].plan, &mut self.change_count)
    }

    /// `xid` rolled back (a subtransaction: StreamAbort with `subxid != xid`).
    pub(crate) fn abort(&mut self, xid: u32) {
        let age = xid.wrapping_sub(self.top_xid);
        let from = self.segments.partition_point(|s| s.age < age);
        self.segments.truncate(from);
        self.forget_seen_from(from);
    }

    /// Its segments merged in order: the plan of the whole transaction, and its change count.
    pub(crate) fn into_plan(self) -> (P, u64) {
        let mut plan = P::default();
        for segment in self.segments {
            plan.merge(segment.plan);
        }
        (plan, self.change_count)
    }

    /// Segments held (for tests of the memory bound).
    #[cfg(test)]
    fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// An earlier subtransaction makes changes again: the segments after its own (or after
    /// where its own would be) are its finished descendants, folded into one segment it owns.
    fn resume(&mut self, age: u32) {
        let from = self.segments.partition_point(|s| s.age < age);
        let mut plan = P::default();
        for segment in self.segments.drain(from..) {
            plan.merge(segment.plan);
        }
        self.segments.push(Segment { age, plan });
        // `seen` must only hold what comes before the segment it judges.
        self.forget_seen_from(from);
    }

    /// Another subtransaction starts: drop the last segment if it adds nothing, else let
    /// `seen` take in the segment before it.
    fn close_last(&mut self) {
        let Some(last) = self.segments.len().checked_sub(1) else {
            return;
        };
        let plan = &self.segments[last].plan;
        let absorbed = self.seen.absorbs(plan)
            || last
                .checked_sub(1)
                .is_some_and(|before| self.segments[before].plan.absorbs(plan));
        if absorbed {
            self.segments.pop();
            return;
        }
        // The segment just before the closing one stays out of `seen` until the next close, so
        // a transaction alternating between its top level and subtransactions never copies
        // its (growing) top-level segment.
        while self.covered + 1 < last {
            let part = self.segments[self.covered].plan.absorbing_part();
            self.seen.merge(part);
            self.covered += 1;
        }
    }

    /// Segments from `from` on were dropped or changed: `seen` may no longer count them.
    fn forget_seen_from(&mut self, from: usize) {
        if self.covered > from {
            self.seen = P::default();
            self.covered = from;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::plan::touched::{TouchedRow, TouchedRows};

    const TOP: u32 = 1000;

    fn row(key: u32) -> TouchedRows {
        let mut plan = TouchedRows::default();
        plan.rows.insert(TouchedRow {
            table: Arc::from("public.t"),
            key: vec![Some(key.to_string())],
        });
        plan
    }

    fn change(txn: &mut StreamedTxn<TouchedRows>, xid: u32, key: u32) {
        let (plan, count) = txn.plan_for(xid);
        plan.merge(row(key));
        *count += 1;
    }

    fn keys(txn: StreamedTxn<TouchedRows>) -> Vec<u32> {
        let (plan, _) = txn.into_plan();
        let mut keys: Vec<u32> = plan
            .rows
            .iter()
            .map(|r| r.key[0].as_deref().unwrap().parse().unwrap())
            .collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn a_savepoint_per_row_holds_segments_per_distinct_effect_not_per_row() {
        // A PL/pgSQL loop with an EXCEPTION block: each row its own subtransaction, rows with
        // 100 distinct identities, every 7th subtransaction rolled back after its change.
        let mut txn = StreamedTxn::new(TOP);
        let mut most = 0;
        for i in 1..=100_000u32 {
            let xid = TOP + i;
            change(&mut txn, xid, i % 100);
            if i % 7 == 0 {
                txn.abort(xid);
            }
            most = most.max(txn.segment_count());
        }
        assert!(most <= 201, "{most} segments held for 100 distinct rows");
        assert_eq!(txn.change_count, 100_000);
        assert_eq!(keys(txn), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_rolled_back_subtransaction_drops_exactly_its_changes() {
        let mut txn = StreamedTxn::new(TOP);
        change(&mut txn, TOP, 1);
        change(&mut txn, TOP + 1, 2); // released
        change(&mut txn, TOP + 2, 3); // rolled back below
        change(&mut txn, TOP + 2, 1); // already in the plan: rolling back keeps it
        txn.abort(TOP + 2);
        change(&mut txn, TOP + 3, 4);
        assert_eq!(keys(txn), vec![1, 2, 4]);
    }

    #[test]
    fn a_segment_absorbed_earlier_still_rolls_back_to_the_same_plan() {
        let mut txn = StreamedTxn::new(TOP);
        change(&mut txn, TOP + 1, 1);
        change(&mut txn, TOP + 2, 2);
        change(&mut txn, TOP + 3, 1); // adds nothing: dropped when TOP + 4 starts
        change(&mut txn, TOP + 4, 3); // a child of TOP + 3, as it turns out
        txn.abort(TOP + 4);
        txn.abort(TOP + 3);
        assert_eq!(keys(txn), vec![1, 2]);
    }

    #[test]
    fn rolling_back_a_savepoint_drops_its_finished_descendants() {
        // SAVEPOINT a; SAVEPOINT b; (b writes) RELEASE b; (a writes) ROLLBACK TO a: Postgres
        // sends StreamAbort for b and then a, but either alone must drop both.
        for aborts in [&[TOP + 2, TOP + 1][..], &[TOP + 1]] {
            let mut txn = StreamedTxn::new(TOP);
            change(&mut txn, TOP, 1);
            change(&mut txn, TOP + 2, 2);
            change(&mut txn, TOP + 1, 3);
            change(&mut txn, TOP + 2 + 1, 4); // a child of a after b's release
            for &xid in aborts {
                txn.abort(xid);
            }
            change(&mut txn, TOP, 5);
            assert_eq!(keys(txn), vec![1, 5], "aborts {aborts:?}");
        }
    }

    #[test]
    fn top_level_changes_between_subtransactions_fold_them_in() {
        let mut txn = StreamedTxn::new(TOP);
        for i in 1..=1000u32 {
            change(&mut txn, TOP + i, i);
            change(&mut txn, TOP, 0);
            assert_eq!(txn.segment_count(), 1);
        }
        assert_eq!(keys(txn).len(), 1001);
    }

    #[test]
    fn xids_that_wrap_around_keep_their_order() {
        let top = u32::MAX - 1;
        let mut txn = StreamedTxn::new(top);
        change(&mut txn, top, 1);
        change(&mut txn, top.wrapping_add(3), 2); // xid 1 after the wrap
        change(&mut txn, top.wrapping_add(2), 3);
        txn.abort(top.wrapping_add(2));
        assert_eq!(keys(txn), vec![1]);
    }
}
