//! The only place that ties the hops together: stream -> plan -> sink -> confirmation.
//!
//! Two tasks, data flowing one way:
//! - the stream task (`stream_task`) reads the replication socket, assembles committed
//!   transactions and puts them on a bounded queue. When the queue is full it stops reading
//!   (backpressure: Postgres keeps the WAL) but keeps answering keepalives;
//! - the sink task (`sink_task`) takes whatever is queued as one batch, applies it (retrying
//!   retryable errors forever) and reports the sink's `Applied::commit_end_lsn` back.
//!
//! That report, on one watch channel, is the only thing flowing back, and the only thing that
//! moves the flush position, except when nothing at all is pending: then a keepalive's WAL
//! end is confirmed, so an idle slot never holds WAL.

pub(crate) mod backlog;
pub(crate) mod backoff;
pub mod daemon;
pub(crate) mod drift;
mod error;
pub mod inspect;
mod recovery;
pub(crate) mod rows;
mod shutdown;
mod sink_task;
pub(crate) mod slot_monitor;
mod source;
mod stream_task;
pub mod visibility;
pub(crate) mod warm_up;

pub use error::PipelineError;
pub use shutdown::{shutdown_channel, Shutdown, ShutdownHandle};
pub(crate) use sink_task::SinkReport;
use source::{prepare_source, Prepared};
pub(crate) use stream_task::SlotMode;

use tokio::sync::{mpsc, watch};

use crate::config::SourceConfig;
use crate::pg::replication::ConnectParams;
use crate::pg::Lsn;
use crate::plan::{Plan, Planner};
use crate::sink::Sink;
use crate::stream::assembler::Assembler;
use crate::stream::history::RecordedSource;
use crate::stream::types::TypeResolver;
use crate::telemetry::log::display_chain;

use backoff::Backoff;
use recovery::DirectControl;
use sink_task::sink_loop;
use stream_task::Streamer;
use warm_up::WarmUp;

/// How often the slot's lag and WAL status are polled over SQL.
const SLOT_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Stops a helper task when the run ends, whichever way it ends.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a finished run did (for tests and the final log line).
#[derive(Debug, Clone, Copy, Default)]
pub struct RunSummary {
    pub confirmed_lsn: Lsn,
    pub reconnects: u64,
}

/// Runs until shutdown or an error no retry can fix.
pub async fn run<PL, S>(
    source: &SourceConfig,
    tables: &[String],
    planner: PL,
    sink: S,
    shutdown: Shutdown,
) -> Result<RunSummary, PipelineError>
where
    PL: Planner,
    S: Sink<PL::Plan>,
{
    run_warming_up(source, tables, planner, sink, shutdown, None).await
}

/// `run`, loading the mirrors first when this run creates the slot (`source.warm_up`).
pub(crate) async fn run_warming_up<PL, S>(
    source: &SourceConfig,
    tables: &[String],
    planner: PL,
    sink: S,
    shutdown: Shutdown,
    warm_up: Option<WarmUp>,
) -> Result<RunSummary, PipelineError>
where
    PL: Planner,
    S: Sink<PL::Plan>,
{
    let params = source.connect_params()?;
    let mut sink = sink;
    let mut backoff = Backoff::new(source.reconnect_min(), source.reconnect_max());
    // Setup is retried like streaming: the database or Redis may simply not be up yet.
    let recorded = loop {
        let prepared = prepare(
            source,
            &params,
            tables,
            warm_up.as_ref(),
            &mut sink,
            shutdown.clone(),
        );
        match prepared.await {
            Ok(prepared) => break prepared.recorded,
            Err(PipelineError::Interrupted) => return Ok(RunSummary::default()),
            Err(e) if e.is_retryable() && shutdown.requests() == 0 => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %display_chain(&e), retry_in_ms = delay.as_millis() as u64, "source not ready");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    };

    let monitor = tokio::spawn(crate::pipeline::slot_monitor::watch_slot(
        params.clone(),
        source.slot.clone(),
        SLOT_POLL_INTERVAL,
    ));
    let _monitor = AbortOnDrop(monitor);
    drive(
        source,
        params,
        SlotMode::Owned,
        planner,
        sink,
        shutdown,
        warm_up,
        recorded,
    )
    .await
}

/// `prepare_source` with the sink still in hand: finishes what an earlier run's recovery record
/// says, creates what is missing. `walsweep run` and `walsweep snapshot` both start with it.
pub(crate) async fn prepare<P: Plan, S: Sink<P>>(
    source: &SourceConfig,
    params: &ConnectParams,
    tables: &[String],
    warm_up: Option<&WarmUp>,
    sink: &mut S,
    shutdown: Shutdown,
) -> Result<Prepared, PipelineError> {
    let pending = sink.pending_recovery().await?;
    let recorded = sink.recorded_source().await?;
    let mut control = DirectControl {
        sink,
        backoff: Backoff::new(source.reconnect_min(), source.reconnect_max()),
        shutdown,
        plan: std::marker::PhantomData,
    };
    prepare_source(
        source,
        params,
        tables,
        warm_up,
        &mut control,
        pending,
        recorded,
    )
    .await
}

/// Streams from a slot this run does not own (a temporary one, or another reader's, never
/// confirmed): no source preparation, no slot monitor, no reconnect. `walsweep tail` runs on it.
pub(crate) async fn run_on_slot<PL, S>(
    source: &SourceConfig,
    slot: SlotMode,
    planner: PL,
    sink: S,
    shutdown: Shutdown,
) -> Result<RunSummary, PipelineError>
where
    PL: Planner,
    S: Sink<PL::Plan>,
{
    let params = source.connect_params()?;
    drive(source, params, slot, planner, sink, shutdown, None, None).await
}

/// The stream task and the sink task of one run, until shutdown or an error no retry fixes.
#[allow(clippy::too_many_arguments)]
async fn drive<PL, S>(
    source: &SourceConfig,
    params: ConnectParams,
    slot: SlotMode,
    planner: PL,
    sink: S,
    shutdown: Shutdown,
    warm_up: Option<WarmUp>,
    recorded: Option<RecordedSource>,
) -> Result<RunSummary, PipelineError>
where
    PL: Planner,
    S: Sink<PL::Plan>,
{
    let (txn_tx, txn_rx) = mpsc::channel(source.queue_capacity);
    let (report_tx, report_rx) = watch::channel(SinkReport::default());
    let wal = std::sync::Arc::new(crate::pg::wal_layout::WalLayout::default());
    let send_lag = std::sync::Arc::new(backlog::SendLag::default());
    let mut sink_task = tokio::spawn(sink_loop(
        sink,
        txn_rx,
        report_tx,
        sink_task::BatchLimits {
            txns: source.batch_max_txns,
            changes: source.batch_max_changes,
        },
        Backoff::new(source.reconnect_min(), source.reconnect_max()),
        wal.clone(),
        send_lag.clone(),
    ));
    let mut second_request = shutdown.clone();
    let mut streamer = Streamer {
        source,
        params,
        assembler: Assembler::new(planner),
        queue: txn_tx,
        sink: report_rx,
        controls_requested: 0,
        unfinished_recovery: None,
        history: recorded.as_ref().map(RecordedSource::identity),
        recorded_position: recorded.map(|r| r.confirmed_lsn).unwrap_or_default(),
        enqueued_lsn: Lsn::ZERO,
        keepalive_lsn: Lsn::ZERO,
        idle_published_lsn: Lsn::ZERO,
        caught_up_sent: (Lsn::ZERO, tokio::time::Instant::now()),
        caught_up_retry: None,
        send_lag,
        txns_committed: crate::telemetry::metrics::txns_committed(),
        wal,
        shutdown,
        backoff: Backoff::new(source.reconnect_min(), source.reconnect_max()),
        reconnects: 0,
        warm_up,
        types: TypeResolver::new(),
        slot,
    };
    let stream_result = tokio::select! {
        result = streamer.run() => result,
        sink_result = &mut sink_task => {
            return match sink_result {
                Ok(Err(e)) => Err(e.into()),
                Ok(Ok(())) => Err(PipelineError::SinkStopped),
                Err(join) => Err(PipelineError::SinkPanicked(join)),
            };
        }
    };
    let summary = RunSummary {
        confirmed_lsn: streamer.sink.borrow().applied_lsn,
        reconnects: streamer.reconnects,
    };
    // Closes the queue: after a clean end the sink task finishes its own work (bounded, see
    // `Sink::finish`), unless a second request asks to stop at once. After an error it stops.
    drop(streamer);
    if stream_result.is_ok() {
        tokio::select! {
            sink_result = &mut sink_task => match sink_result {
                Ok(result) => result?,
                Err(join) => return Err(PipelineError::SinkPanicked(join)),
            },
            _ = second_request.at_least(2) => sink_task.abort(),
        }
    } else {
        sink_task.abort();
    }
    stream_result.map(|()| summary)
}
