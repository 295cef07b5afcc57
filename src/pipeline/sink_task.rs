//! The sink task: applies queued transactions in batches and reports back, on one channel,
//! what the sink confirmed. Nothing else flows from the sink side to the stream side.

use std::sync::Arc;

use crate::pg::wal_layout::WalLayout;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use crate::pg::Lsn;
use crate::plan::Plan;
use crate::sink::{Applied, Recovery, Sink, SinkError};
use crate::stream::assembler::CommittedTxn;
use crate::stream::history::RecordedSource;
use crate::telemetry::log::display_chain;
use crate::telemetry::metrics as m;

use super::backlog::{SendLag, FILL_WAIT};
use super::backoff::Backoff;

/// What the stream task asks of the sink task, in stream order.
pub(crate) enum SinkCommand<P> {
    /// Apply a committed transaction.
    Apply(CommittedTxn<P>),
    /// Run a step of slot recovery after everything queued before it; completion shows in
    /// `SinkReport::controls_done`.
    Control(Control),
    /// Nothing was pending when the stream acknowledged this keepalive position: every commit
    /// before it is applied, so it is the applied position too (`Sink::publish_position`).
    /// Without it, a reader waiting for a commit that touched no followed table would wait
    /// for the next change that does.
    Idle(Lsn),
}

/// The slot-recovery steps the sink takes part in (see `super::recovery`).
#[derive(Debug, Clone)]
pub(crate) enum Control {
    /// `Sink::begin_recovery`.
    BeginRecovery(Recovery),
    /// The stream has a gap (the slot was lost and recreated, or the database's history
    /// changed): clear everything the sink maintains. A new history starts.
    Reset { reason: String },
    /// The slot was created with no history to continue: `Sink::slot_created`. A new history
    /// starts.
    SlotCreated,
    /// `Sink::end_recovery`.
    EndRecovery,
    /// `Sink::record_source`.
    RecordSource(RecordedSource),
}

impl Control {
    /// Runs this step on `sink` once (the caller retries).
    pub(crate) async fn run_on<P: Plan, S: Sink<P>>(&self, sink: &mut S) -> Result<(), SinkError> {
        match self {
            Control::BeginRecovery(steps) => sink.begin_recovery(*steps).await,
            Control::Reset { reason } => {
                tracing::warn!(%reason, "clearing everything the sink maintains");
                sink.reset().await
            }
            Control::SlotCreated => sink.slot_created().await,
            Control::EndRecovery => sink.end_recovery().await,
            Control::RecordSource(source) => sink.record_source(source.clone()).await,
        }
    }

    /// After it, positions of the old history mean nothing.
    fn starts_new_history(&self) -> bool {
        matches!(self, Control::Reset { .. } | Control::SlotCreated)
    }
}

/// The sink side's state as the stream side sees it; the latest value is all that matters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SinkReport {
    /// End of the last commit the sink confirmed (`Applied::commit_end_lsn`). Moves back to zero
    /// only when a new history starts (a reset): the new slot's LSNs may be lower.
    pub(crate) applied_lsn: Lsn,
    /// Since when the sink has been failing, if it is (an outage that lasts releases the slot).
    pub(crate) failing_since: Option<Instant>,
    /// `Control` commands completed so far.
    pub(crate) controls_done: u64,
}

/// Applies queued commands until the queue closes (then lets the sink finish) or the sink
/// fails for good.
pub(crate) async fn sink_loop<P: Plan, S: Sink<P>>(
    mut sink: S,
    mut queue: mpsc::Receiver<SinkCommand<P>>,
    report: watch::Sender<SinkReport>,
    limits: BatchLimits,
    backoff: Backoff,
    wal: Arc<WalLayout>,
    send_lag: Arc<SendLag>,
) -> Result<(), SinkError> {
    let mut retry = Retry { backoff, report };
    let mut commands = Vec::with_capacity(limits.txns);
    let mut batch = Vec::with_capacity(limits.txns);
    let mut batch_changes = 0;
    sink.start();
    while queue.recv_many(&mut commands, limits.txns).await > 0 {
        fill_while_behind(&mut queue, &mut commands, limits, &send_lag).await;
        for command in commands.drain(..) {
            match command {
                SinkCommand::Apply(txn) => {
                    batch_changes += txn.change_count;
                    batch.push(txn);
                    if batch_changes >= limits.changes {
                        apply_batch(&mut sink, &mut batch, &mut retry, &wal).await?;
                        batch_changes = 0;
                    }
                }
                SinkCommand::Idle(lsn) => {
                    apply_batch(&mut sink, &mut batch, &mut retry, &wal).await?;
                    batch_changes = 0;
                    publish_position(&mut sink, wal.insert_position_after(lsn), &mut retry).await?;
                }
                SinkCommand::Control(control) => {
                    apply_batch(&mut sink, &mut batch, &mut retry, &wal).await?;
                    batch_changes = 0;
                    loop {
                        match control.run_on(&mut sink).await {
                            Ok(()) => break retry.succeeded(),
                            Err(e) => retry.failed(e).await?,
                        }
                    }
                    retry.report.send_modify(|r| {
                        if control.starts_new_history() {
                            r.applied_lsn = Lsn::ZERO;
                        }
                        r.controls_done += 1;
                    });
                }
            }
        }
        apply_batch(&mut sink, &mut batch, &mut retry, &wal).await?;
        batch_changes = 0;
    }
    sink.finish().await;
    Ok(())
}

/// How large a sink batch may grow: whichever limit is reached first ends it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    /// `source.batch_max_txns`.
    pub(crate) txns: usize,
    /// `source.batch_max_changes`: row changes, summed over the batch's transactions; the
    /// transaction that reaches it ends the batch (transactions are never split).
    pub(crate) changes: u64,
}

/// While the walsender sends commits long after they happened (a backlog drains), waits up to
/// `FILL_WAIT` for more, until the batch is full (`limits`): one larger batch instead of
/// several small ones (`backlog`). Only transactions: a control step or an idle position goes as
/// soon as it came.
async fn fill_while_behind<P>(
    queue: &mut mpsc::Receiver<SinkCommand<P>>,
    commands: &mut Vec<SinkCommand<P>>,
    limits: BatchLimits,
    send_lag: &SendLag,
) {
    let deadline = tokio::time::Instant::now() + FILL_WAIT;
    while commands.len() < limits.txns {
        if !matches!(commands.last(), Some(SinkCommand::Apply(_))) || !send_lag.behind() {
            return;
        }
        let changes: u64 = commands
            .iter()
            .map(|c| match c {
                SinkCommand::Apply(txn) => txn.change_count,
                _ => 0,
            })
            .sum();
        if changes >= limits.changes {
            return;
        }
        let more = limits.txns - commands.len();
        match tokio::time::timeout_at(deadline, queue.recv_many(commands, more)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Applies `batch` (retrying retryable errors forever), then reports what the sink applied.
async fn apply_batch<P: Plan, S: Sink<P>>(
    sink: &mut S,
    batch: &mut Vec<CommittedTxn<P>>,
    retry: &mut Retry,
    wal: &WalLayout,
) -> Result<(), SinkError> {
    let Some(last) = batch.last() else {
        return Ok(());
    };
    let batch_end_lsn = last.end_lsn;
    let started = Instant::now();
    let applied: Applied = loop {
        match sink.apply(batch).await {
            Ok(applied) => {
                retry.succeeded();
                break applied;
            }
            Err(e) => retry.failed(e).await?,
        }
    };
    // A sink cannot have applied what it was never given; confirming past the batch would
    // skip commits still on their way.
    debug_assert!(applied.commit_end_lsn <= batch_end_lsn);
    let applied_lsn = applied.commit_end_lsn.min(batch_end_lsn);
    m::batch_applied(&applied.commit_times_unix_micros, started.elapsed());
    // As an app's pg_current_wal_insert_lsn() after that commit reads it (`WalLayout`).
    publish_position(sink, wal.insert_position_after(applied_lsn), retry).await?;
    retry
        .report
        .send_if_modified(|r| advance(&mut r.applied_lsn, applied_lsn));
    batch.clear();
    Ok(())
}

/// `Sink::publish_position`, retried like a batch; before the stream may confirm `lsn`.
async fn publish_position<P: Plan, S: Sink<P>>(
    sink: &mut S,
    lsn: Lsn,
    retry: &mut Retry,
) -> Result<(), SinkError> {
    loop {
        match sink.publish_position(lsn).await {
            Ok(()) => {
                retry.succeeded();
                return Ok(());
            }
            Err(e) => retry.failed(e).await?,
        }
    }
}

fn advance(lsn: &mut Lsn, to: Lsn) -> bool {
    let moved = to > *lsn;
    *lsn = (*lsn).max(to);
    moved
}

/// Retry state of the sink task; failures and recoveries show in the report.
struct Retry {
    backoff: Backoff,
    report: watch::Sender<SinkReport>,
}

impl Retry {
    fn succeeded(&mut self) {
        self.backoff.reset();
        self.report
            .send_if_modified(|r| r.failing_since.take().is_some());
    }

    /// Waits out the backoff after a retryable failure; hands back one no retry can fix.
    /// Nothing is ever skipped: the caller tries the same operation again.
    async fn failed(&mut self, e: SinkError) -> Result<(), SinkError> {
        if !e.is_retryable() {
            return Err(e);
        }
        self.report.send_if_modified(|r| {
            let first = r.failing_since.is_none();
            r.failing_since.get_or_insert_with(Instant::now);
            first
        });
        let delay = self.backoff.next_delay();
        m::error(m::ERROR_SINK);
        tracing::warn!(
            error = %display_chain(&e),
            attempt = self.backoff.attempts(),
            retry_in_ms = delay.as_millis() as u64,
            "sink unavailable; holding the slot position and retrying"
        );
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::rules::EffectPlan;
    use std::time::Duration;

    /// Records the size of each batch it is given (no destination: this tests how the sink
    /// task cuts the queue into batches, nothing about Redis).
    struct BatchSizes(Arc<std::sync::Mutex<Vec<usize>>>);

    impl Sink<EffectPlan> for BatchSizes {
        async fn apply(
            &mut self,
            batch: &[CommittedTxn<EffectPlan>],
        ) -> Result<Applied, SinkError> {
            self.0.lock().expect("lock").push(batch.len());
            Ok(Applied::whole(batch))
        }

        async fn reset(&mut self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    fn txn(n: u64, changes: u64) -> SinkCommand<EffectPlan> {
        SinkCommand::Apply(CommittedTxn {
            xid: n as u32,
            commit_lsn: Lsn(n * 100),
            end_lsn: Lsn(n * 100 + 50),
            commit_time_unix_micros: 0,
            change_count: changes,
            plan: EffectPlan::default(),
        })
    }

    async fn batches(limits: BatchLimits, queued: Vec<SinkCommand<EffectPlan>>) -> Vec<usize> {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel(queued.len());
        for command in queued {
            tx.send(command).await.expect("queue");
        }
        drop(tx);
        let (report, _) = watch::channel(SinkReport::default());
        sink_loop(
            BatchSizes(sizes.clone()),
            rx,
            report,
            limits,
            Backoff::new(Duration::from_millis(1), Duration::from_millis(1)),
            Arc::new(WalLayout::default()),
            Arc::new(SendLag::default()),
        )
        .await
        .expect("sink loop");
        let sizes = sizes.lock().expect("lock").clone();
        sizes
    }

    #[tokio::test]
    async fn a_batch_ends_at_whichever_limit_comes_first() {
        let by_changes = BatchLimits {
            txns: 512,
            changes: 10,
        };
        // 4 changes each: the third transaction takes the batch to 12 >= 10.
        let queued = (1..=7).map(|n| txn(n, 4)).collect();
        assert_eq!(batches(by_changes, queued).await, vec![3, 3, 1]);

        // The transaction that reaches the limit ends the batch, however large; none is split.
        let queued = vec![txn(1, 1), txn(2, 50), txn(3, 1), txn(4, 1)];
        assert_eq!(batches(by_changes, queued).await, vec![2, 2]);

        let by_txns = BatchLimits {
            txns: 2,
            changes: 1_000,
        };
        let queued = (1..=5).map(|n| txn(n, 4)).collect();
        assert_eq!(batches(by_txns, queued).await, vec![2, 2, 1]);
    }
}
