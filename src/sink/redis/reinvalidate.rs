//! `matroska.reinvalidate_after_ms`: a second, delayed application of every applied batch.
//!
//! # Why
//! matroska-cache's `put()` does SADD (dependency) and then SETEX (data). A reader that read the
//! old row before a commit and SETEXes after walsweep's invalidation leaves a stale entry. The
//! dependency set is kept (`remove_dependency_sets = false`), so it still names that entry, and
//! invalidating it again a little later removes it. `tests/refill_race.rs` measures the effect.
//!
//! # How
//! Once the main sink applied a whole batch (invalidations, mirrors, broadcasts), and before
//! its `apply` returns, the batch's merged invalidations are kept in Redis (`entry`: one ZADD
//! to `walsweep:<database>/<slot>:reinvalidate`, scored by the due time `now + delay`) and
//! queued in memory. The slot is confirmed right after `apply` returns, so the ZADD must come
//! first: what a crash interrupts, the next start finds in Redis. A failed batch, or a failed
//! ZADD, keeps nothing (the batch is retried); a retried batch is kept once, when it applied.
//!
//! A background task with its own Redis connection starts with the sink (`Sink::start`), loads
//! what an earlier run left in the set (past due: applied at once; the rest at their due
//! time), then applies due entries (merging those due together) with the same code as the
//! main path, and removes them from the set (ZREM) only once applied. It never blocks or
//! delays the main stream: queueing is a push under a short lock.
//!
//! On a clean stop (`Sink::finish`) no new entries come and the task applies what is queued
//! at its due time, so walsweep exits at most the delay (plus `FINISH_GRACE`) later. What it
//! could not apply by then, or what a kill or crash interrupted, stays in the set for the next
//! start.
//!
//! # Best effort, never silent
//! - A failed application is retried `ATTEMPTS` times with backoff; every failed attempt counts
//!   in `walsweep_reinvalidation_errors_total` and is logged at warn, as is giving up (the
//!   entries stay in Redis: the next start applies them).
//! - Memory is bounded by the effects applied within one delay window, capped at
//!   `MAX_PENDING_EFFECTS`: above it, the oldest entries are applied early (less protection,
//!   still an invalidation). Only if the queue reaches twice the cap, which needs this task's
//!   Redis calls to fail or stall while the main stream's succeed, are the oldest entries
//!   dropped from memory: counted as errors and logged at warn (they stay in Redis too).

mod entry;

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::RedisConn;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::pg::Lsn;
use crate::plan::rules::EffectPlan;
use crate::plan::Plan;
use crate::sink::SinkError;
use crate::telemetry::log::display_chain;
use crate::telemetry::metrics as m;

use super::{round_trip, RedisSink};

/// Effects waiting for their second application before the oldest are applied early.
pub(crate) const MAX_PENDING_EFFECTS: usize = 100_000;
/// Multiple of the cap at which the oldest entries are dropped (loudly) instead.
const HARD_LIMIT_FACTOR: usize = 2;
/// Most effects merged into one application (one applies at least one whole batch).
const MAX_EFFECTS_PER_APPLICATION: usize = 10_000;
/// Tries per application before giving it up.
const ATTEMPTS: u32 = 3;
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
/// Longest wait between two tries at loading the set at start.
const MAX_LOAD_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Shortest time between two "applied early" warnings.
const EARLY_WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// How much longer than the delay a clean stop waits for the last applications (their retries).
const FINISH_GRACE: Duration = Duration::from_secs(5);

struct Pending {
    due: Instant,
    plan: EffectPlan,
    effects: usize,
    /// The entry's member in the Redis set.
    member: String,
}

/// The pending second applications, earliest due first.
pub(crate) struct Queue {
    entries: VecDeque<Pending>,
    effects: usize,
    cap: usize,
    closed: bool,
}

/// What the worker should do next.
#[derive(Debug)]
pub(crate) enum Next {
    /// Apply these merged effects now, then remove `members` from the set; `early` when some
    /// were not due yet (above the cap).
    Apply {
        plan: EffectPlan,
        effects: usize,
        early: bool,
        members: Vec<String>,
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

    /// Queues `plan` (kept in the set as `member`) for `due`. Entries loaded at start may be
    /// due before queued ones; new batches, with the constant delay, come in due order.
    pub(crate) fn push(&mut self, due: Instant, plan: EffectPlan, member: String) -> Dropped {
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
            let at = self
                .entries
                .iter()
                .rposition(|e| e.due <= due)
                .map_or(0, |i| i + 1);
            self.entries.insert(
                at,
                Pending {
                    due,
                    plan,
                    effects,
                    member,
                },
            );
        }
        dropped
    }

    /// No entries follow; the queue ends (`Done`) once the last one was applied when due.
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
        let mut members = Vec::new();
        let mut taken = 0usize;
        let mut early = false;
        while let Some(front) = self.entries.front() {
            let due = front.due <= now;
            let forced = self.effects > self.cap;
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
            members.push(entry.member);
        }
        if taken == 0 {
            Next::WaitUntil(front_due)
        } else {
            Next::Apply {
                effects: plan.effect_count(),
                plan,
                early,
                members,
            }
        }
    }
}

struct Shared {
    queue: Mutex<Queue>,
    notify: Notify,
}

/// The main sink's handle: keeps applied batches for their second application, and runs the
/// worker that applies them.
pub(crate) struct Scheduler {
    delay: Duration,
    /// The sorted set of pending entries (`RedisSink::state_key("reinvalidate")`).
    key: String,
    shared: Arc<Shared>,
    /// The worker's own sink (own connection, no health reporting) until it is spawned.
    worker: Option<Box<RedisSink>>,
    running: Option<JoinHandle<()>>,
}

impl Scheduler {
    pub(crate) fn new(delay: Duration, worker: RedisSink, key: String) -> Scheduler {
        Scheduler {
            delay,
            key,
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::new(MAX_PENDING_EFFECTS)),
                notify: Notify::new(),
            }),
            worker: Some(Box::new(worker)),
            running: None,
        }
    }

    /// Where the pending entries are kept; only before the worker started.
    pub(crate) fn set_key(&mut self, key: String) {
        debug_assert!(self.running.is_none(), "the worker already uses the key");
        self.key = key;
    }

    /// Starts the worker (once), which first loads what an earlier run left pending. Must be
    /// called from within a tokio runtime.
    pub(crate) fn start(&mut self) {
        if let Some(sink) = self.worker.take() {
            self.running = Some(tokio::spawn(run(
                self.shared.clone(),
                *sink,
                self.delay,
                self.key.clone(),
            )));
        }
    }

    /// Keeps an applied batch's merged invalidations for a second application after the
    /// delay: in Redis (one round trip on `conn`, the main sink's connection), then queued.
    /// An error keeps nothing; the caller fails the batch, which is then retried.
    pub(crate) async fn schedule(
        &mut self,
        conn: &mut RedisConn,
        end_lsn: Lsn,
        plan: EffectPlan,
    ) -> Result<(), SinkError> {
        if plan.is_empty() {
            return Ok(());
        }
        self.start();
        let member = entry::encode(end_lsn, &plan);
        let due_unix_ms = unix_ms(SystemTime::now() + self.delay);
        let mut zadd = ::redis::cmd("ZADD");
        zadd.arg(&self.key).arg(due_unix_ms).arg(&member);
        let _: i64 = round_trip(
            "keep the batch's second invalidation pending in Redis",
            zadd.query_async(conn),
        )
        .await?;
        let dropped = lock(&self.shared.queue).push(Instant::now() + self.delay, plan, member);
        self.shared.notify.notify_one();
        if dropped.batches > 0 {
            m::reinvalidation_error();
            tracing::warn!(
                batches = dropped.batches,
                effects = dropped.effects,
                limit = MAX_PENDING_EFFECTS * HARD_LIMIT_FACTOR,
                key = %self.key,
                "reinvalidation queue full (its Redis calls are failing or stalled): dropped the \
                 oldest second applications from memory; they stay in Redis for the next start"
            );
        }
        Ok(())
    }

    /// Clean stop: no entries follow; waits for the worker to apply what is queued when it is
    /// due (bounded by the delay plus `FINISH_GRACE`). What is left stays in Redis.
    pub(crate) async fn finish(&mut self) {
        let pending = {
            let mut q = lock(&self.shared.queue);
            q.close();
            q.pending_effects()
        };
        self.shared.notify.notify_one();
        let Some(mut worker) = self.running.take() else {
            return;
        };
        let bound = self.delay + FINISH_GRACE;
        if pending > 0 {
            tracing::info!(
                effects = pending,
                up_to_ms = bound.as_millis() as u64,
                "walsweep stopping: applying the pending second invalidations when they are due"
            );
        }
        if tokio::time::timeout(bound, &mut worker).await.is_err() {
            worker.abort();
            tracing::warn!(
                effects = lock(&self.shared.queue).pending_effects(),
                key = %self.key,
                "walsweep stopping: second invalidations still pending; kept in Redis, the \
                 next start applies them"
            );
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // Not a clean stop (`finish` was not reached): the set keeps what is pending.
        if let Some(worker) = self.running.take() {
            worker.abort();
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The queue's lock is never held across a call that can panic, but the main path must not
/// panic because of the worker in any case.
fn lock(queue: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn run(shared: Arc<Shared>, mut sink: RedisSink, delay: Duration, key: String) {
    load(&shared, &mut sink, &key).await;
    let mut last_early_warning: Option<Instant> = None;
    loop {
        let (next, left) = {
            let mut q = lock(&shared.queue);
            let next = q.next(Instant::now());
            (next, q.pending_effects())
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
                members,
            } => {
                if early && last_early_warning.is_none_or(|t| t.elapsed() >= EARLY_WARNING_INTERVAL)
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
                if apply_with_retries(&mut sink, &plan, effects).await {
                    forget(&mut sink, &key, &members).await;
                }
            }
        }
    }
}

/// Queues what the set holds: entries an earlier run kept and did not apply (past due ones
/// are applied at once). Retried until it succeeds or the sink stops.
async fn load(shared: &Shared, sink: &mut RedisSink, key: &str) {
    let mut retry_delay = FIRST_RETRY_DELAY;
    let stored: Vec<(String, f64)> = loop {
        let result = async {
            let mut conn = sink.connection().await?;
            let mut zrange = ::redis::cmd("ZRANGE");
            zrange.arg(key).arg(0).arg(-1).arg("WITHSCORES");
            round_trip(
                "load the pending second invalidations",
                zrange.query_async(&mut conn),
            )
            .await
        }
        .await;
        sink.observe(&result);
        match result {
            Ok(stored) => break stored,
            Err(e) => {
                m::reinvalidation_error();
                let closed = lock(&shared.queue).is_closed();
                tracing::warn!(
                    error = %display_chain(&e),
                    %key,
                    gave_up = closed,
                    "cannot load the second invalidations an earlier run left pending{}",
                    if closed { "; walsweep is stopping, they stay for the next start" } else { "; retrying" }
                );
                if closed {
                    return;
                }
                tokio::time::sleep(retry_delay).await;
                retry_delay = (retry_delay * 4).min(MAX_LOAD_RETRY_DELAY);
            }
        }
    };
    if stored.is_empty() {
        return;
    }
    let now_ms = unix_ms(SystemTime::now());
    let now = Instant::now();
    let mut unusable = Vec::new();
    let mut loaded = 0usize;
    let mut dropped = Dropped::default();
    {
        let mut q = lock(&shared.queue);
        // What this run kept since it started is in the set too, and already queued.
        let fresh: Vec<&(String, f64)> = {
            let queued: HashSet<&str> = q.entries.iter().map(|e| e.member.as_str()).collect();
            stored
                .iter()
                .filter(|(member, _)| !queued.contains(member.as_str()))
                .collect()
        };
        for (member, due_ms) in fresh {
            match entry::decode(member) {
                Ok(plan) => {
                    let wait = Duration::from_millis((*due_ms as u64).saturating_sub(now_ms));
                    loaded += 1;
                    let d = q.push(now + wait, plan, member.clone());
                    dropped.batches += d.batches;
                    dropped.effects += d.effects;
                }
                Err(e) => unusable.push((member.clone(), e)),
            }
        }
    }
    if dropped.batches > 0 {
        m::reinvalidation_error();
        tracing::warn!(
            batches = dropped.batches,
            effects = dropped.effects,
            limit = MAX_PENDING_EFFECTS * HARD_LIMIT_FACTOR,
            %key,
            "more second invalidations pending in Redis than fit in memory: the oldest wait \
             there for the next start"
        );
    }
    shared.notify.notify_one();
    if loaded > 0 {
        tracing::info!(
            batches = loaded,
            %key,
            "an earlier run left second invalidations pending: applying them when due"
        );
    }
    for (member, e) in &unusable {
        m::reinvalidation_error();
        tracing::warn!(
            error = %display_chain(e),
            %key,
            member = %member.chars().take(200).collect::<String>(),
            "not a pending second invalidation this walsweep can read (another version or \
             another program wrote it); removing it"
        );
    }
    let unusable: Vec<String> = unusable.into_iter().map(|(m, _)| m).collect();
    forget(sink, key, &unusable).await;
}

/// Removes applied (or unusable) entries from the set. A failure only means they are applied
/// once more at the next start, which is harmless.
async fn forget(sink: &mut RedisSink, key: &str, members: &[String]) {
    if members.is_empty() {
        return;
    }
    let result = async {
        let mut conn = sink.connection().await?;
        let mut zrem = ::redis::cmd("ZREM");
        zrem.arg(key).arg(members);
        round_trip(
            "remove applied second invalidations",
            zrem.query_async::<i64>(&mut conn),
        )
        .await
    }
    .await;
    sink.observe(&result);
    if let Err(e) = result {
        m::reinvalidation_error();
        tracing::warn!(
            error = %display_chain(&e),
            %key,
            batches = members.len(),
            "cannot remove applied second invalidations from Redis; the next start applies \
             them again"
        );
    }
}

/// Whether the application succeeded (within `ATTEMPTS`).
async fn apply_with_retries(sink: &mut RedisSink, plan: &EffectPlan, effects: usize) -> bool {
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
                return true;
            }
            Err(e) => {
                m::reinvalidation_error();
                let last = attempt == ATTEMPTS || !e.is_retryable();
                tracing::warn!(
                    error = %display_chain(&e),
                    attempt,
                    effects,
                    gave_up = last,
                    "second invalidation failed{}",
                    if last { "; giving it up until the next start (it stays in Redis)" } else { "; retrying" }
                );
                if last {
                    return false;
                }
                tokio::time::sleep(retry_delay).await;
                retry_delay *= 4;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(keys: &[&str]) -> EffectPlan {
        let mut p = EffectPlan::default();
        p.keys.extend(keys);
        p
    }

    /// A distinct set member per entry, as the LSN prefix makes them.
    fn member() -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        format!("0/{:X}|{{}}", NEXT.fetch_add(1, Ordering::Relaxed))
    }

    fn keys(next: Next) -> (Vec<String>, bool) {
        match next {
            Next::Apply { plan, early, .. } => {
                let mut k: Vec<String> = plan.keys.iter().map(str::to_string).collect();
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
        q.push(t0 + Duration::from_millis(10), plan(&["a"]), member());
        q.push(t0 + Duration::from_millis(20), plan(&["b", "a"]), member());
        q.push(t0 + Duration::from_millis(30), plan(&["c"]), member());
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
            assert_eq!(q.push(later, plan(&[k]), member()), Dropped::default());
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
            assert_eq!(q.push(t0, plan(&[k]), member()), Dropped::default());
        }
        assert_eq!(
            q.push(t0, plan(&["e", "f"]), member()),
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
    fn closing_keeps_due_times_and_ends_once_drained() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(60);
        let mut q = Queue::new(100);
        q.push(later, plan(&["a"]), member());
        q.close();
        // A clean stop applies what is pending when it is due, not before: a refill between
        // now and then is what the second application exists to remove.
        assert!(matches!(q.next(t0), Next::WaitUntil(t) if t == later));
        assert_eq!(keys(q.next(later)), (vec!["a".into()], false));
        assert!(matches!(q.next(later), Next::Done));
    }

    #[test]
    fn entries_loaded_at_start_take_their_place_by_due_time_and_name_their_members() {
        let t0 = Instant::now();
        let mut q = Queue::new(100);
        q.push(
            t0 + Duration::from_millis(30),
            plan(&["new"]),
            "0/3|new".into(),
        );
        // Loaded after the first new batch was queued, though due before it.
        q.push(t0, plan(&["old"]), "0/1|old".into());
        q.push(
            t0 + Duration::from_millis(10),
            plan(&["older"]),
            "0/2|older".into(),
        );
        match q.next(t0 + Duration::from_millis(10)) {
            Next::Apply { members, early, .. } => {
                assert_eq!(members, ["0/1|old", "0/2|older"]);
                assert!(!early);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(q.next(t0), Next::WaitUntil(t) if t == t0 + Duration::from_millis(30)));
    }

    #[test]
    fn one_application_holds_at_most_the_per_application_limit_but_at_least_one_batch() {
        let t0 = Instant::now();
        let mut q = Queue::new(usize::MAX / 4);
        let big: Vec<String> = (0..MAX_EFFECTS_PER_APPLICATION + 5)
            .map(|i| format!("k{i}"))
            .collect();
        let big_refs: Vec<&str> = big.iter().map(String::as_str).collect();
        q.push(t0, plan(&big_refs), member());
        q.push(t0, plan(&["x"]), member());
        match q.next(t0) {
            Next::Apply { effects, .. } => assert_eq!(effects, MAX_EFFECTS_PER_APPLICATION + 5),
            other => panic!("{other:?}"),
        }
        assert_eq!(keys(q.next(t0)), (vec!["x".into()], false));
    }
}
