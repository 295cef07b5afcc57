//! Where committed plans leave walsweep.
//!
//! # The sink contract
//! - `apply` receives committed transactions in commit order, in batches. It returns
//!   `Ok(Applied)` only once every effect of every transaction in the batch is confirmed by the
//!   destination, and `Applied::commit_end_lsn` says up to where: the pipeline confirms exactly
//!   that position to Postgres, never more. Confirmation is cumulative.
//! - Delivery is at-least-once: after a crash or reconnect a batch may be applied again, so
//!   effects must be idempotent.
//! - On error nothing of the batch counts as applied. A retryable error makes the pipeline retry
//!   the same batch with backoff, forever (nothing is dropped); a non-retryable one stops the
//!   daemon with its message, without confirming the batch.
//! - Work a sink does in the background (e.g. delayed second applications) starts in `start`;
//!   a clean stop waits for `finish`, which must end in a bounded time. A crash or a second
//!   shutdown request skips `finish`, so work that must not be lost is made durable before
//!   `apply` returns.

pub mod redis;

use std::future::Future;

use crate::pg::Lsn;
use crate::plan::Plan;
use crate::stream::assembler::CommittedTxn;

/// What the destination confirmed of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// End of the last commit whose effects are all in the destination: the position the
    /// pipeline confirms to Postgres.
    pub(crate) commit_end_lsn: Lsn,
    /// Commit time of each applied transaction, in commit order (commit-to-applied latency).
    pub(crate) commit_times_unix_micros: Vec<i64>,
}

impl Applied {
    /// Every transaction of `batch` applied.
    pub fn whole<P>(batch: &[CommittedTxn<P>]) -> Applied {
        Applied {
            commit_end_lsn: batch.last().map(|t| t.end_lsn).unwrap_or_default(),
            commit_times_unix_micros: batch.iter().map(|t| t.commit_time_unix_micros).collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("sink failed to {operation}")]
pub struct SinkError {
    /// What the sink was doing, e.g. "unlink keys".
    pub operation: &'static str,
    /// Whether retrying the same batch can succeed (destination down vs. broken config).
    pub retryable: bool,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl SinkError {
    pub(crate) fn is_retryable(&self) -> bool {
        self.retryable
    }
}

pub trait Sink<P: Plan>: Send + 'static {
    /// Applies `batch` (non-empty, commit order). See the module docs for the contract.
    fn apply(
        &mut self,
        batch: &[CommittedTxn<P>],
    ) -> impl Future<Output = Result<Applied, SinkError>> + Send;

    /// The stream had a gap (the slot was lost and recreated), so anything the destination
    /// holds may be stale: remove all of it. Called in stream order, before any transaction
    /// that follows the gap; retried like `apply`.
    fn reset(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// walsweep just created the slot, so this stream starts with no history: a first start,
    /// or a slot dropped while walsweep was stopped, or a restored or moved database. Nothing is
    /// cleared (that is what `on_slot_lost` decides), but a sink whose output chains across
    /// transactions (broadcasts) restarts the chain. Called before the slot's first
    /// transaction; retried like `apply`.
    fn slot_created(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send {
        async { Ok(()) }
    }

    /// Called once by the sink task before any other method, within the runtime: a sink with
    /// background work (e.g. delayed second applications an earlier run left) starts it here.
    fn start(&mut self) {}

    /// The stream ended cleanly (shutdown) and everything given to `apply` was applied: a sink
    /// with background work finishes it here, in a bounded time. Not called when the run ends
    /// on an error or a second shutdown request; such work must then survive on its own.
    fn finish(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}
