//! Shared by the benches that drive the real pipeline against a private Postgres: a sink that
//! only counts, a timed drain until a known number of row changes was applied, and env knobs.
//!
//! Each bench includes this with `#[path = "common/mod.rs"] mod common;`; not every bench uses
//! every helper.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use walsweep::config::SourceConfig;
use walsweep::pg::Lsn;
use walsweep::pipeline::{self, RunSummary};
use walsweep::plan::touched::TouchedRowsPlanner;
use walsweep::plan::Plan;
use walsweep::sink::{Applied, Sink, SinkError};
use walsweep::stream::assembler::CommittedTxn;

/// A `usize` from the environment (underscores allowed: `200_000`), else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        _ => default,
    }
}

/// What the null sink saw, shared with the bench.
#[derive(Default)]
pub struct Seen {
    /// Sum of `change_count` over applied transactions.
    pub changes: AtomicU64,
    pub txns: AtomicU64,
    /// Calls of `apply` (sink batches).
    pub batches: AtomicU64,
    /// `end_lsn` of the last applied transaction.
    pub last_end: AtomicU64,
    /// Largest `effect_count` of one applied transaction's plan.
    pub max_effects: AtomicUsize,
}

/// Applies nothing: counts, remembers the last `end_lsn`, and reports the moment the change
/// count reaches `target`, once. (Signalling every batch instead would wake the bench's own
/// thread per transaction and bill that to walsweep.)
/// `inner` applies first (a real sink, or `Discard`); counting happens after it confirmed.
pub struct NullSink<S = Discard> {
    inner: S,
    seen: Arc<Seen>,
    target: u64,
    reached: Option<oneshot::Sender<Instant>>,
}

/// A sink that applies nothing.
pub struct Discard;

impl<P: Plan> Sink<P> for Discard {
    async fn apply(&mut self, batch: &[CommittedTxn<P>]) -> Result<Applied, SinkError> {
        Ok(Applied::whole(batch))
    }

    async fn reset(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

impl NullSink {
    pub fn new(target: u64) -> (NullSink, Arc<Seen>, oneshot::Receiver<Instant>) {
        NullSink::wrapping(Discard, target)
    }
}

impl<S> NullSink<S> {
    /// Counts what `inner` applied.
    pub fn wrapping(inner: S, target: u64) -> (NullSink<S>, Arc<Seen>, oneshot::Receiver<Instant>) {
        let seen = Arc::new(Seen::default());
        let (reached_tx, reached_rx) = oneshot::channel();
        (
            NullSink {
                inner,
                seen: seen.clone(),
                target,
                reached: Some(reached_tx),
            },
            seen,
            reached_rx,
        )
    }
}

impl<P: Plan + Sync, S: Sink<P>> Sink<P> for NullSink<S> {
    async fn apply(&mut self, batch: &[CommittedTxn<P>]) -> Result<Applied, SinkError> {
        let applied = self.inner.apply(batch).await?;
        let mut changes = 0;
        let mut max_effects = 0;
        for txn in batch {
            changes += txn.change_count;
            max_effects = max_effects.max(txn.plan.effect_count());
        }
        let s = &self.seen;
        s.txns.fetch_add(batch.len() as u64, Ordering::Relaxed);
        s.batches.fetch_add(1, Ordering::Relaxed);
        s.max_effects.fetch_max(max_effects, Ordering::Relaxed);
        if let Some(last) = batch.last() {
            s.last_end
                .fetch_max(last.end_lsn.as_u64(), Ordering::Relaxed);
        }
        let total = s.changes.fetch_add(changes, Ordering::Relaxed) + changes;
        if total >= self.target {
            if let Some(reached) = self.reached.take() {
                let _ = reached.send(Instant::now());
            }
        }
        Ok(applied)
    }

    async fn reset(&mut self) -> Result<(), SinkError> {
        self.inner.reset().await
    }
}

/// The runtime walsweep's `main` builds (multi-threaded, one worker per core), or a
/// current-thread one when `WALSWEEP_BENCH_RUNTIME=current_thread` (for comparison only).
pub fn runtime() -> tokio::runtime::Runtime {
    let kind = std::env::var("WALSWEEP_BENCH_RUNTIME").unwrap_or_default();
    let mut builder = match kind.as_str() {
        "" | "multi_thread" => tokio::runtime::Builder::new_multi_thread(),
        "current_thread" => tokio::runtime::Builder::new_current_thread(),
        other => panic!("WALSWEEP_BENCH_RUNTIME={other:?}: use multi_thread or current_thread"),
    };
    builder.enable_all().build().expect("tokio runtime")
}

/// A source with walsweep's production defaults, on `slot` and `publication`.
pub fn source(url: &str, slot: &str, publication: &str) -> SourceConfig {
    let mut s = SourceConfig::new(url);
    s.slot = slot.into();
    s.publication = publication.into();
    // The slots and publication exist already: never create anything while timed.
    s.create_slot = false;
    s.create_publication = false;
    s
}

/// One timed drain by walsweep.
#[derive(Debug, Clone, Copy)]
pub struct Drained {
    /// From calling `pipeline::run` (before it connects) to the sink applying the
    /// transaction that brought the change count to the expected total.
    pub elapsed: Duration,
    pub changes: u64,
    pub txns: u64,
    pub batches: u64,
    pub last_end: Lsn,
    pub max_effects: usize,
    /// What the pipeline confirmed by the time it stopped after the measurement.
    pub summary: RunSummary,
}

/// Runs the real pipeline (`TouchedRowsPlanner` plan, null sink) on `source` until the sink has
/// applied `expected_changes` row changes, then asks it to stop and waits for it. Only the part
/// up to the last apply is timed. Panics after `timeout` or if the pipeline fails.
pub async fn drain_with_walsweep(
    source: SourceConfig,
    expected_changes: u64,
    timeout: Duration,
) -> Drained {
    drain_with(
        source,
        TouchedRowsPlanner::default(),
        Discard,
        expected_changes,
        timeout,
    )
    .await
}

/// `drain_with_walsweep` with any planner and a real sink (e.g. rules into Redis).
pub async fn drain_with<PL, S>(
    source: SourceConfig,
    planner: PL,
    inner: S,
    expected_changes: u64,
    timeout: Duration,
) -> Drained
where
    PL: walsweep::plan::Planner,
    PL::Plan: Sync,
    S: Sink<PL::Plan>,
{
    let (sink, seen, reached) = NullSink::wrapping(inner, expected_changes);
    let (shutdown, signal) = pipeline::shutdown_channel();
    let started = Instant::now();
    let mut task =
        tokio::spawn(async move { pipeline::run(&source, &[], planner, sink, signal).await });
    let reached_at = tokio::select! {
        reached = tokio::time::timeout(timeout, reached) => match reached {
            Ok(Ok(at)) => at,
            Ok(Err(_)) => panic!("the null sink was dropped: the pipeline stopped"),
            Err(_) => panic!(
                "walsweep applied {} of {expected_changes} changes within {timeout:?}",
                seen.changes.load(Ordering::Relaxed)
            ),
        },
        ended = &mut task => panic!("the pipeline stopped before draining: {ended:?}"),
    };
    let elapsed = reached_at.duration_since(started);
    shutdown.request();
    let summary = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the pipeline did not stop within 60s of the shutdown request")
        .expect("the pipeline task panicked")
        .unwrap_or_else(|e| {
            panic!(
                "the pipeline failed: {}",
                walsweep::telemetry::log::display_chain(&e)
            )
        });
    Drained {
        elapsed,
        changes: seen.changes.load(Ordering::Relaxed),
        txns: seen.txns.load(Ordering::Relaxed),
        batches: seen.batches.load(Ordering::Relaxed),
        last_end: Lsn(seen.last_end.load(Ordering::Relaxed)),
        max_effects: seen.max_effects.load(Ordering::Relaxed),
        summary,
    }
}

/// Median of a non-empty list (the lower middle for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() - 1) / 2]
}

/// Polls `pg_current_wal_flush_lsn()` until it reaches `target`: walsenders only decode
/// flushed WAL, so a backlog written with `synchronous_commit = off` is only complete then.
pub fn wait_for_flush(psql: impl Fn(&str) -> String, target: Lsn) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let flushed: Lsn = psql("SELECT pg_current_wal_flush_lsn()")
            .parse()
            .expect("an LSN");
        if flushed >= target {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "WAL flushed only up to {flushed}, not {target}, after 30s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU time (user + system) used so far by this process (all threads) and by its waited-for
/// children, from /proc/self/stat, at clock-tick resolution (usually 10ms).
pub fn cpu_time() -> (Duration, Duration) {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    stat_times(&stat)
}

/// CPU time (user + system) used so far by process `pid`, all its threads, or `None` once it
/// is gone.
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat_times(&stat).0)
}

/// (utime + stime, cutime + cstime) of a /proc/<pid>/stat line.
fn stat_times(stat: &str) -> (Duration, Duration) {
    // Fields after the parenthesised command name start at field 3 (state).
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime, stime, cutime, cstime are fields 14..=17.
    let tick = |i: usize| fields.get(i - 4).copied().unwrap_or(0);
    let hz = 100.0; // USER_HZ; 100 on every Linux build this runs on.
    let secs = |ticks: u64| Duration::from_secs_f64(ticks as f64 / hz);
    (secs(tick(14) + tick(15)), secs(tick(16) + tick(17)))
}

/// The 1/5/15-minute load averages, printed so a noisy run can be recognised as one.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
