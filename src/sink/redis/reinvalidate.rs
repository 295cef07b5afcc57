//! `matroska.reinvalidate_after_ms`: a second, delayed application of every confirmed batch.
//!
//! # Why
//! matroska-cache's `put()` does SADD (dependency) and then SETEX (data). A reader that read the
//! old row before a commit and SETEXes after walsweep's invalidation leaves a stale entry. The
//! dependency set is kept (`remove_dependency_sets = false`), so it still names that entry, and
//! invalidating it again a little later removes it. `tests/refill_race.rs` measures the effect.
//!
//! # How
//! After the main sink confirmed a batch (and only then), the batch's merged effects are queued
//! with a due time `now + delay`. The delay is constant, so the queue is in due order. A
//! background task with its own Redis connection applies due entries (merging those due
//! together) with the same code as the main path. It never blocks or delays the main stream:
//! queueing is a push under a short lock, and the slot is confirmed without waiting for it.
//!
//! # Best effort, never silent
//! - A failed application is retried `ATTEMPTS` times with backoff; every failed attempt counts
//!   in `walsweep_reinvalidation_errors_total` and is logged at warn, as is giving up.
//! - Memory is bounded by the effects confirmed within one delay window, capped at
//!   `MAX_PENDING_EFFECTS`: above it, the oldest entries are applied early (less protection,
//!   still an invalidation). Only if the queue reaches twice the cap, which needs this task's
//!   Redis calls to fail or stall while the main stream's succeed, are the oldest entries
//!   dropped: counted as errors and logged at warn.
//! - When the sink is dropped (walsweep stopping), what is still queued is applied at once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::plan::rules::EffectPlan;
use crate::plan::Plan;
use crate::telemetry::metrics as m;

use super::RedisSink;

/// Effects waiting for their second application before the oldest are applied early.
pub(crate) const MAX_PENDING_EFFECTS: usize = 100_000;
/// Multiple of the cap at which the oldest entries are dropped (loudly) instead.
const HARD_LIMIT_FACTOR: usize = 2;
/// Most effects merged into one application (one applies at least one whole batch).
const MAX_EFFECTS_PER_APPLICATION: usize = 10_000;
/// Tries per application before giving it up.
const ATTEMPTS: u32 = 3;
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
/// Shortest time between two "applied early" warnings.
const EARLY_WARNING_INTERVAL: Duration = Duration::from_secs(60);

struct Pending {
    due: Instant,
    plan: EffectPlan,
    effects: usize,
}

/// The pending second applications, oldest (earliest due) first.
pub(crate) struct Queue {
    entries: VecDeque<Pending>,
    effects: usize,
    cap: usize,
    closed: bool,
}

/// What the worker should do next.
#[derive(Debug)]
pub(crate) enum Next {
    /// Apply these merged effects now; `early` when some were not due yet (cap or shutdown).
    Apply {
        plan: EffectPlan,
        effects: usize,
        early: bool,
    },
    /// Nothing is due before this instant.
    WaitUntil(Instant),
    /// The queue is empty.
    WaitForWork,
    /// Closed and drained.
    Done,
}

/// Entries dropped by `push` because the queue was at twice its cap.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Dropped {
    pub(crate) batches: usize,
    pub(crate) effects: usize,
}

impl Queue {
    pub(crate) fn new(cap: usize) -> Queue {
        Queue {
            entries: VecDeque::new(),
            effects: 0,
            cap,
            closed: false,
        }
    }

    /// Queues `plan` for `due`, which must not be earlier than any queued due time.
    pub(crate) fn push(&mut self, due: Instant, plan: EffectPlan) -> Dropped {
        let effects = plan.effect_count();
        let mut dropped = Dropped::default();
        let hard_limit = self.cap.saturating_mul(HARD_LIMIT_FACTOR);
        while self.effects + effects > hard_limit {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.effects -= old.effects;
            dropped.batches += 1;
            dropped.effects += old.effects;
        }
        if effects > 0 {
            self.effects += effects;
            self.entries.push_back(Pending { due, plan, effects });
        }
        dropped
    }

    pub(crate) fn close(&mut self) {
        self.closed = true;
    }

    pub(crate) fn pending_effects(&self) -> usize {
        self.effects
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    pub(crate) fn next(&mut self, now: Instant) -> Next {
        let Some(front) = self.entries.front() else {
            return if self.closed {
                Next::Done
            } else {
                Next::WaitForWork
            };
        };
        let front_due = front.due;
        let mut plan = EffectPlan::default();
        let mut taken = 0usize;
        let mut early = false;
        while let Some(front) = self.entries.front() {
            let due = front.due <= now;
            let forced = self.closed || self.effects > self.cap;
            if !(due || forced)
                || (taken > 0 && taken + front.effects > MAX_EFFECTS_PER_APPLICATION)
            {
                break;
            }
            let entry = self.entries.pop_front().expect("front exists");
            self.effects -= entry.effects;
            taken += entry.effects;
            early |= !due;
            plan.merge(entry.plan);
        }
        if taken == 0 {
            Next::WaitUntil(front_due)
        } else {
            Next::Apply {
                effects: plan.effect_count(),
                plan,
                early,
            }
        }
    }
}

struct Shared {
    queue: Mutex<Queue>,
    notify: Notify,
}

/// The main sink's handle: queues confirmed batches; the worker starts with the first one.
pub(crate) struct Scheduler {
    delay: Duration,
    shared: Arc<Shared>,
    /// The worker's own sink (own connection, no health reporting) until it is spawned.
    worker: Option<Box<RedisSink>>,
}

impl Scheduler {
    pub(crate) fn new(delay: Duration, worker: RedisSink) -> Scheduler {
        Scheduler {
            delay,
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::new(MAX_PENDING_EFFECTS)),
                notify: Notify::new(),
            }),
            worker: Some(Box::new(worker)),
        }
    }

    /// Queues a confirmed batch's merged effects for a second application after the delay.
    /// Never waits for Redis; must be called from within a tokio runtime.
    pub(crate) fn schedule(&mut self, plan: EffectPlan) {
        if plan.is_empty() {
            return;
        }
        if let Some(sink) = self.worker.take() {
            tokio::spawn(run(self.shared.clone(), *sink, self.delay));
        }
        let dropped = lock(&self.shared.queue).push(Instant::now() + self.delay, plan);
        self.shared.notify.notify_one();
        if dropped.batches > 0 {
            m::reinvalidation_error();
            tracing::warn!(
                batches = dropped.batches,
                effects = dropped.effects,
                limit = MAX_PENDING_EFFECTS * HARD_LIMIT_FACTOR,
                "reinvalidation queue full (its Redis calls are failing or stalled): dropped the \
                 oldest second applications; their first application was confirmed"
            );
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        lock(&self.shared.queue).close();
        self.shared.notify.notify_one();
    }
}

/// The queue's lock is never held across a call that can panic, but the main path must not
/// panic because of the worker in any case.
fn lock(queue: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn run(shared: Arc<Shared>, mut sink: RedisSink, delay: Duration) {
    let mut last_early_warning: Option<Instant> = None;
    loop {
        let (next, left, closing) = {
            let mut q = lock(&shared.queue);
            let next = q.next(Instant::now());
            (next, q.pending_effects(), q.is_closed())
        };
        match next {
            Next::Done => return,
            Next::WaitForWork => shared.notify.notified().await,
            Next::WaitUntil(due) => {
                tokio::select! {
                    _ = shared.notify.notified() => {}
                    _ = tokio::time::sleep_until(due.into()) => {}
                }
            }
            Next::Apply {
                plan,
                effects,
                early,
            } => {
                if early && closing {
                    tracing::info!(
                        effects,
                        still_pending = left,
                        "walsweep stopping: applying pending second invalidations now"
                    );
                } else if early
                    && last_early_warning.is_none_or(|t| t.elapsed() >= EARLY_WARNING_INTERVAL)
                {
                    last_early_warning = Some(Instant::now());
                    tracing::warn!(
                        effects,
                        still_pending = left,
                        cap = MAX_PENDING_EFFECTS,
                        delay_ms = delay.as_millis() as u64,
                        "reinvalidation queue above its cap: applying the oldest second \
                         invalidations before their delay"
                    );
                }
                apply_with_retries(&mut sink, &plan, effects).await;
            }
        }
    }
}

async fn apply_with_retries(sink: &mut RedisSink, plan: &EffectPlan, effects: usize) {
    let mut retry_delay = FIRST_RETRY_DELAY;
    for attempt in 1..=ATTEMPTS {
        match sink.apply_plans(std::iter::once(plan)).await {
            Ok(applied) => {
                m::reinvalidated(effects as u64);
                tracing::debug!(
                    effects,
                    keys_unlinked = applied.keys_unlinked,
                    "second invalidation applied"
                );
                return;
            }
            Err(e) => {
                m::reinvalidation_error();
                let last = attempt == ATTEMPTS || !e.is_retryable();
                tracing::warn!(
                    error = %crate::telemetry::log::display_chain(&e),
                    attempt,
                    effects,
                    gave_up = last,
                    "second invalidation failed{}",
                    if last { "; giving it up (the first application was confirmed)" } else { "; retrying" }
                );
                if last {
                    return;
                }
                tokio::time::sleep(retry_delay).await;
                retry_delay *= 4;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(keys: &[&str]) -> EffectPlan {
        let mut p = EffectPlan::default();
        p.keys.extend(keys.iter().map(|k| k.to_string()));
        p
    }

    fn keys(next: Next) -> (Vec<String>, bool) {
        match next {
            Next::Apply { plan, early, .. } => {
                let mut k: Vec<String> = plan.keys.into_iter().collect();
                k.sort();
                (k, early)
            }
            other => panic!("expected Apply, got {other:?}"),
        }
    }

    #[test]
    fn applies_in_due_order_merging_what_is_due_together() {
        let t0 = Instant::now();
        let mut q = Queue::new(100);
        assert!(matches!(q.next(t0), Next::WaitForWork));
        q.push(t0 + Duration::from_millis(10), plan(&["a"]));
        q.push(t0 + Duration::from_millis(20), plan(&["b", "a"]));
        q.push(t0 + Duration::from_millis(30), plan(&["c"]));
        match q.next(t0) {
            Next::WaitUntil(t) => assert_eq!(t, t0 + Duration::from_millis(10)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            keys(q.next(t0 + Duration::from_millis(25))),
            (vec!["a".into(), "b".into()], false)
        );
        assert_eq!(q.pending_effects(), 1);
        assert_eq!(
            keys(q.next(t0 + Duration::from_millis(30))),
            (vec!["c".into()], false)
        );
        assert!(matches!(q.next(t0), Next::WaitForWork));
    }

    #[test]
    fn above_the_cap_the_oldest_are_applied_early_not_dropped() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(60);
        let mut q = Queue::new(3);
        for k in ["a", "b", "c", "d", "e"] {
            assert_eq!(q.push(later, plan(&[k])), Dropped::default());
        }
        // 5 pending, cap 3: the two oldest go now, early; the rest wait for their due time.
        assert_eq!(keys(q.next(t0)), (vec!["a".into(), "b".into()], true));
        assert!(matches!(q.next(t0), Next::WaitUntil(t) if t == later));
        assert_eq!(q.pending_effects(), 3);
    }

    #[test]
    fn only_at_twice_the_cap_are_the_oldest_dropped_and_reported() {
        let t0 = Instant::now();
        let mut q = Queue::new(2);
        for k in ["a", "b", "c", "d"] {
            assert_eq!(q.push(t0, plan(&[k])), Dropped::default());
        }
        assert_eq!(
            q.push(t0, plan(&["e", "f"])),
            Dropped {
                batches: 2,
                effects: 2
            }
        );
        assert_eq!(q.pending_effects(), 4);
        assert_eq!(
            keys(q.next(t0)),
            (vec!["c".into(), "d".into(), "e".into(), "f".into()], false)
        );
    }

    #[test]
    fn closing_applies_everything_left_at_once_then_ends() {
        let t0 = Instant::now();
        let mut q = Queue::new(100);
        q.push(t0 + Duration::from_secs(60), plan(&["a"]));
        q.close();
        assert_eq!(keys(q.next(t0)), (vec!["a".into()], true));
        assert!(matches!(q.next(t0), Next::Done));
    }

    #[test]
    fn one_application_holds_at_most_the_per_application_limit_but_at_least_one_batch() {
        let t0 = Instant::now();
        let mut q = Queue::new(usize::MAX / 4);
        let big: Vec<String> = (0..MAX_EFFECTS_PER_APPLICATION + 5)
            .map(|i| format!("k{i}"))
            .collect();
        let big_refs: Vec<&str> = big.iter().map(String::as_str).collect();
        q.push(t0, plan(&big_refs));
        q.push(t0, plan(&["x"]));
        match q.next(t0) {
            Next::Apply { effects, .. } => assert_eq!(effects, MAX_EFFECTS_PER_APPLICATION + 5),
            other => panic!("{other:?}"),
        }
        assert_eq!(keys(q.next(t0)), (vec!["x".into()], false));
    }
}
