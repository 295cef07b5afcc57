//! The visibility gate: no batch is applied before its transactions are visible to other
//! sessions.
//!
//! Postgres flushes a commit record, and a walsender may decode and send it, before the
//! transaction becomes visible: `ProcArrayEndTransaction` runs after the flush and after the
//! synchronous-replication wait. An invalidation applied in that window is followed by readers
//! that still see the old row and fill the cache with it. Microseconds without a synchronous
//! standby; as long as the standby takes with one (a stalled standby: indefinitely).
//!
//! So before a batch with effects is applied, one query on an ordinary SQL connection asks
//! whether each of its transactions is visible to a new snapshot, and repeats while one is
//! not. A gate that cannot reach Postgres fails the batch as retryable, like Redis being down:
//! the batch waits, it is never applied unchecked.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, Statement};

use crate::pg::catalog;
use crate::pg::replication::ConnectParams;
use crate::pg::Lsn;
use crate::plan::Plan;
use crate::sink::{Applied, Recovery, Sink, SinkError};
use crate::stream::assembler::CommittedTxn;
use crate::stream::history::RecordedSource;
use crate::telemetry::metrics as m;

/// How many of the given 32-bit xids a new snapshot does not see yet. The full (epoch) xid is
/// rebuilt from the snapshot's `xmax`: a committed transaction's xid is at most 2^31 before
/// it, so one above `xmax`'s low half belongs to the previous epoch.
const INVISIBLE_SQL: &str = "\
    SELECT count(*) FILTER (WHERE NOT pg_visible_in_snapshot(\
               (((e.epoch - (x > e.xmax_low)::int) << 32) | x)::text::xid8, s.snap))::int \
    FROM (SELECT pg_current_snapshot() AS snap) s \
    CROSS JOIN LATERAL (SELECT pg_snapshot_xmax(s.snap)::text::bigint AS xmax8) m \
    CROSS JOIN LATERAL (SELECT m.xmax8 >> 32 AS epoch, m.xmax8 & 4294967295 AS xmax_low) e \
    CROSS JOIN unnest($1::bigint[]) AS x";

/// Checks made back to back before pausing between them: without a synchronous standby a
/// transaction not visible at the first check is visible microseconds later, well within the
/// next round trip, while the runtime's timers cannot sleep less than a millisecond.
const IMMEDIATE_RECHECKS: u64 = 20;
/// Pause between later checks (a synchronous standby that takes its time).
const RECHECK_AFTER: Duration = Duration::from_millis(1);
/// A transaction still invisible after this long is logged (then every such interval): a
/// stalled synchronous standby holds invalidations back, which an operator should know.
const REPORT_AFTER: Duration = Duration::from_secs(5);

/// An SQL connection that answers "is it visible yet", opened on first use and again after
/// it fails.
pub struct VisibilityGate {
    params: ConnectParams,
    /// The connection and the check, prepared once per connection (one round trip a check).
    client: Option<(Client, Statement)>,
}

impl VisibilityGate {
    pub fn new(params: ConnectParams) -> Self {
        VisibilityGate {
            params,
            client: None,
        }
    }

    /// Returns once every one of `xids` is visible to a new snapshot.
    async fn wait_visible(&mut self, xids: &[i64], last_commit: Lsn) -> Result<(), SinkError> {
        let started = Instant::now();
        let mut next_report = REPORT_AFTER;
        let mut checks = 0u64;
        loop {
            checks += 1;
            let invisible = self.count_invisible(xids).await?;
            if invisible == 0 {
                m::visibility_waited(started.elapsed(), checks);
                return Ok(());
            }
            let waited = started.elapsed();
            if waited >= next_report {
                next_report += REPORT_AFTER;
                tracing::warn!(
                    invisible,
                    waited_ms = waited.as_millis() as u64,
                    %last_commit,
                    "committed transactions are not visible to other sessions yet (a \
                     synchronous standby that does not answer?); their invalidations wait"
                );
            }
            if checks >= IMMEDIATE_RECHECKS {
                tokio::time::sleep(RECHECK_AFTER).await;
            }
        }
    }

    async fn count_invisible(&mut self, xids: &[i64]) -> Result<i32, SinkError> {
        let (client, check) = match &self.client {
            Some((client, check)) if !client.is_closed() => (client, check),
            _ => {
                let client = catalog::connect(&self.params)
                    .await
                    .map_err(|e| gate_error("connect for the visibility check", e))?;
                let check = client
                    .prepare(INVISIBLE_SQL)
                    .await
                    .map_err(|e| gate_error("prepare the visibility check", e))?;
                let (client, check) = self.client.insert((client, check));
                (&*client, &*check)
            }
        };
        match client.query_one(check, &[&xids]).await {
            Ok(row) => Ok(row.get(0)),
            Err(e) => {
                self.client = None;
                Err(gate_error(
                    "check that the batch's transactions are visible",
                    e,
                ))
            }
        }
    }
}

fn gate_error(
    operation: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> SinkError {
    SinkError {
        operation,
        // Postgres down or restarting: the batch waits for it, as for Redis.
        retryable: true,
        source: Box::new(e),
    }
}

/// A sink behind the visibility gate: `apply` waits until the batch's transactions with effects
/// are visible, then applies; everything else goes straight through. Without a gate
/// (`source.visibility_gate = false`) it is the sink alone.
pub struct GatedSink<S> {
    inner: S,
    gate: Option<VisibilityGate>,
}

impl<S> GatedSink<S> {
    pub fn new(inner: S, gate: Option<VisibilityGate>) -> Self {
        GatedSink { inner, gate }
    }
}

impl<P: Plan, S: Sink<P>> Sink<P> for GatedSink<S> {
    async fn apply(&mut self, batch: &[CommittedTxn<P>]) -> Result<Applied, SinkError> {
        // A transaction without effects changes nothing a reader could refill.
        let xids: Vec<i64> = batch
            .iter()
            .filter(|t| t.plan.effect_count() > 0)
            .map(|t| i64::from(t.xid))
            .collect();
        if let (Some(gate), false, Some(last)) = (&mut self.gate, xids.is_empty(), batch.last()) {
            gate.wait_visible(&xids, last.commit_lsn).await?;
        }
        self.inner.apply(batch).await
    }

    async fn reset(&mut self) -> Result<(), SinkError> {
        self.inner.reset().await
    }

    async fn slot_created(&mut self) -> Result<(), SinkError> {
        self.inner.slot_created().await
    }

    fn start(&mut self) {
        self.inner.start()
    }

    async fn finish(&mut self) {
        self.inner.finish().await
    }

    async fn publish_position(&mut self, lsn: Lsn) -> Result<(), SinkError> {
        self.inner.publish_position(lsn).await
    }

    async fn pending_recovery(&mut self) -> Result<Recovery, SinkError> {
        self.inner.pending_recovery().await
    }

    async fn begin_recovery(&mut self, steps: Recovery) -> Result<(), SinkError> {
        self.inner.begin_recovery(steps).await
    }

    async fn end_recovery(&mut self) -> Result<(), SinkError> {
        self.inner.end_recovery().await
    }

    async fn recorded_source(&mut self) -> Result<Option<RecordedSource>, SinkError> {
        self.inner.recorded_source().await
    }

    async fn record_source(&mut self, source: RecordedSource) -> Result<(), SinkError> {
        self.inner.record_source(source).await
    }
}
