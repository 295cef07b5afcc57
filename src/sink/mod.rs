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
//!   daemon with its message, without confirming the batch. An error is retryable only when
//!   waiting can fix it (the destination down, busy, failing over): one that would fail the same
//!   way forever (a bug, a rejected argument, a permission) is not, and its message says where
//!   the stream stopped and what to do.
//! - Crash recovery: before the pipeline drops or creates its slot it records, through
//!   `begin_recovery`, what must follow the new slot's creation (`Recovery`); `end_recovery`
//!   removes the record once done. A sink whose record survives a crash (the Redis sink keeps it
//!   in Redis) lets the next start finish the job instead of streaming into a half-cleared or
//!   half-loaded destination. The default keeps nothing, so a crash in between is not recovered.
//! - Work a sink does in the background (e.g. delayed second applications) starts in `start`;
//!   a clean stop waits for `finish`, which must end in a bounded time. A crash or a second
//!   shutdown request skips `finish`, so work that must not be lost is made durable before
//!   `apply` returns.

pub mod redis;

use std::future::Future;

use crate::pg::Lsn;
use crate::plan::Plan;
use crate::stream::assembler::CommittedTxn;
use crate::stream::history::RecordedSource;

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

/// What must happen after walsweep's slot is (re)created, before anything streams from it:
/// recorded before the slot is dropped or created, so that a crash in between is finished by
/// the next start. The order of the steps is fixed: create the slot, `clear` (or restart the
/// chain), `load`, then remove the record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Clear everything the sink maintains (`Sink::reset`): changes were missed.
    pub clear: bool,
    /// Restart cross-transaction chains (`Sink::slot_created`): the stream has a new history.
    /// Implied by `clear`.
    pub restart_chain: bool,
    /// Load the mirrors from the new slot's exported snapshot (`source.warm_up`).
    pub load: bool,
}

impl Recovery {
    pub fn is_empty(&self) -> bool {
        *self == Recovery::default()
    }

    /// The stored form: the set steps' names, comma-separated (`clear,chain,load`).
    pub fn encode(&self) -> String {
        [
            (self.clear, "clear"),
            (self.restart_chain, "chain"),
            (self.load, "load"),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(",")
    }

    /// Reads `encode`'s form. An unknown step (a newer walsweep wrote it) is taken as `clear`:
    /// doing more than needed is safe, doing less is not.
    pub fn decode(stored: &str) -> Recovery {
        let mut steps = Recovery::default();
        for step in stored.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match step {
                "clear" => steps.clear = true,
                "chain" => steps.restart_chain = true,
                "load" => steps.load = true,
                _ => steps.clear = true,
            }
        }
        steps
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

impl From<crate::plan::mirror::spill::SpillError> for SinkError {
    /// Not retryable: an unreadable spill file stays unreadable. The transaction is not
    /// confirmed, so a restart decodes it again from the slot.
    fn from(e: crate::plan::mirror::spill::SpillError) -> Self {
        SinkError {
            operation: "read spilled mirror writes",
            retryable: false,
            source: Box::new(e),
        }
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

    /// Every effect of every commit before `lsn` is in the destination (a batch was applied,
    /// or nothing was pending at a keepalive): a sink that publishes its applied position for
    /// readers waiting on their own writes advances it here, never back. Called in stream
    /// order after `apply` returned, before the position is confirmed to Postgres; retried
    /// like `apply`. After `reset` or `slot_created`, positions start over.
    fn publish_position(&mut self, lsn: Lsn) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = lsn;
        async { Ok(()) }
    }

    /// The recovery a previous run recorded and did not finish (empty when none).
    fn pending_recovery(&mut self) -> impl Future<Output = Result<Recovery, SinkError>> + Send {
        async { Ok(Recovery::default()) }
    }

    /// Records `steps` durably before the slot is dropped or created (see the module docs).
    fn begin_recovery(
        &mut self,
        steps: Recovery,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = steps;
        async { Ok(()) }
    }

    /// Removes the record once every step is done.
    fn end_recovery(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send {
        async { Ok(()) }
    }

    /// The source walsweep streamed from before (`record_source`), if the sink keeps it.
    fn recorded_source(
        &mut self,
    ) -> impl Future<Output = Result<Option<RecordedSource>, SinkError>> + Send {
        async { Ok(None) }
    }

    /// Keeps `source` durably: from now on a missing slot is a lost slot, never a first start,
    /// and another database behind the URL is another history.
    fn record_source(
        &mut self,
        source: RecordedSource,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = source;
        async { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::Recovery;

    #[test]
    fn recovery_steps_round_trip_and_unknown_steps_mean_clear() {
        let all = Recovery {
            clear: true,
            restart_chain: true,
            load: true,
        };
        assert_eq!(all.encode(), "clear,chain,load");
        assert_eq!(Recovery::decode(&all.encode()), all);
        let chain = Recovery {
            restart_chain: true,
            ..Recovery::default()
        };
        assert_eq!(Recovery::decode("chain"), chain);
        assert!(Recovery::decode("").is_empty());
        assert!(Recovery::decode("chain,rebuild").clear);
    }
}
