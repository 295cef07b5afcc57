//! (Re)creating walsweep's own slot so that nothing is lost, even when walsweep dies halfway.
//!
//! The one safe order: record the steps (`Sink::begin_recovery`), drop the old slot, create the
//! new one, then clear what the sink maintains (or restart its chains), then load the mirrors
//! from the new slot's exported snapshot, then remove the record. Clearing after the creation
//! matters: a cache entry refilled before the clear is removed by it, and every change after the
//! creation streams from the new slot. A crash anywhere leaves the record, and the next start
//! (`super::source::prepare_source`) sees it and does the whole sequence again instead of
//! streaming into half-cleared caches or half-loaded mirrors.

use std::marker::PhantomData;

use tokio::sync::{mpsc, watch};

use crate::config::SourceConfig;
use crate::pg::catalog;
use crate::pg::replication::{ConnectParams, ReplicationConnection};
use crate::pg::Lsn;
use crate::plan::Plan;
use crate::sink::{Recovery, Sink};
use crate::telemetry::log::display_chain;
use crate::telemetry::metrics as m;

use super::backoff::Backoff;
use super::shutdown::Shutdown;
use super::sink_task::{Control, SinkCommand, SinkReport};
use super::warm_up::{WarmUp, WarmUpSummary};
use super::PipelineError;

/// Runs recovery steps on the sink, whether it is still in hand (before streaming) or already
/// behind the sink task's queue.
pub(crate) trait SinkControl {
    /// Runs `control` after everything queued before it and waits until it is done, retrying
    /// outages; `PipelineError::Interrupted` when shutdown is requested meanwhile.
    async fn run(&mut self, control: Control) -> Result<(), PipelineError>;
}

/// The sink before the sink task takes it.
pub(crate) struct DirectControl<'a, P, S> {
    pub(crate) sink: &'a mut S,
    pub(crate) backoff: Backoff,
    pub(crate) shutdown: Shutdown,
    pub(crate) plan: PhantomData<P>,
}

impl<P: Plan, S: Sink<P>> SinkControl for DirectControl<'_, P, S> {
    async fn run(&mut self, control: Control) -> Result<(), PipelineError> {
        loop {
            match control.run_on(&mut *self.sink).await {
                Ok(()) => {
                    self.backoff.reset();
                    return Ok(());
                }
                Err(e) if e.is_retryable() => {
                    m::error(m::ERROR_SINK);
                    let delay = self.backoff.next_delay();
                    tracing::warn!(error = %display_chain(&e), retry_in_ms = delay.as_millis() as u64, "sink unavailable during slot recovery; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.at_least(1) => return Err(PipelineError::Interrupted),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The sink behind the sink task: steps go through the queue, in stream order.
pub(crate) struct QueuedControl<'a, P> {
    pub(crate) queue: &'a mpsc::Sender<SinkCommand<P>>,
    pub(crate) report: &'a mut watch::Receiver<SinkReport>,
    /// Controls sent so far (the sink task reports how many it completed).
    pub(crate) requested: &'a mut u64,
    pub(crate) shutdown: Shutdown,
}

impl<P: Plan> SinkControl for QueuedControl<'_, P> {
    async fn run(&mut self, control: Control) -> Result<(), PipelineError> {
        self.queue
            .send(SinkCommand::Control(control))
            .await
            .map_err(|_| PipelineError::SinkStopped)?;
        *self.requested += 1;
        let target = *self.requested;
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            done = self.report.wait_for(|r| r.controls_done >= target) => {
                done.map(|_| ()).map_err(|_| PipelineError::SinkStopped)
            }
            _ = shutdown.at_least(1) => Err(PipelineError::Interrupted),
        }
    }
}

/// Drops walsweep's slot if it exists, creates it again and does `steps` in the safe order
/// (module docs). Returns the new slot's consistent point and what the warm-up loaded.
pub(crate) async fn recreate_slot(
    control: &mut impl SinkControl,
    source: &SourceConfig,
    params: &ConnectParams,
    steps: Recovery,
    warm_up: Option<&WarmUp>,
    reason: &str,
) -> Result<(Lsn, Option<WarmUpSummary>), PipelineError> {
    let warm_up = warm_up.filter(|_| steps.load);
    let steps = Recovery {
        load: warm_up.is_some(),
        ..steps
    };
    control.run(Control::BeginRecovery(steps)).await?;
    let client = catalog::connect(params).await?;
    if catalog::slot_state(&client, &source.slot).await?.is_some() {
        catalog::drop_slot(&client, &source.slot).await?;
    }
    let mut conn = ReplicationConnection::connect(params).await?;
    let (lsn, snapshot) = match warm_up {
        Some(_) => {
            let (lsn, snapshot) = conn
                .create_slot_exporting_snapshot(&source.slot, source.failover)
                .await?;
            (lsn, Some(snapshot))
        }
        None => (conn.create_slot(&source.slot, source.failover).await?, None),
    };
    tracing::info!(slot = %source.slot, consistent_point = %lsn, clear = steps.clear, warm_up = steps.load, "created replication slot");
    // The exported snapshot stays valid while `conn` sits idle, through the clear and the load.
    if steps.clear {
        control
            .run(Control::Reset {
                reason: reason.to_string(),
            })
            .await?;
    } else if steps.restart_chain {
        control.run(Control::SlotCreated).await?;
    }
    let mut summary = None;
    if let (Some(warm_up), Some(snapshot)) = (warm_up, snapshot) {
        match warm_up.load(params, Some(&snapshot)).await {
            Ok(loaded) => summary = Some(loaded),
            Err(e) => {
                // The record stays, and without the slot the next attempt cannot mistake the
                // half-loaded mirrors for loaded ones, whoever makes it.
                if let Err(drop_error) = catalog::drop_slot(&client, &source.slot).await {
                    tracing::error!(error = %display_chain(&drop_error), slot = %source.slot, "cannot drop the slot after a failed warm-up; the next start loads again anyway (the recovery record is kept)");
                }
                return Err(e.into());
            }
        }
    }
    drop(conn);
    control.run(Control::EndRecovery).await?;
    Ok((lsn, summary))
}
