//! The loop that ties stream -> assembler -> sink -> acknowledgement.
//!
//! Two tasks and two channels, data flowing one way:
//! - the stream task reads the replication socket, assembles committed transactions and puts
//!   them on a bounded queue. When the queue is full it stops reading (backpressure: Postgres
//!   keeps the WAL) but keeps answering keepalives;
//! - the sink task takes whatever is queued as one batch, applies it (retrying retryable errors
//!   forever), and publishes the batch's last commit end on a watch channel.
//!
//! Only that watch channel moves the flush position, except when nothing at all is pending:
//! then a keepalive's WAL end is confirmed, so an idle slot never holds WAL.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::assembler::{AssembleError, Assembler, CommittedTxn};
use crate::backoff::Backoff;
use crate::config::{SlotLostPolicy, SourceConfig};
use crate::metrics as m;
use crate::pg::catalog::{self, CatalogError};
use crate::pg::replication::{
    ConnectParams, ReplicationConnection, ReplicationError, ReplicationStream,
};
use crate::pg::wire::WireMessage;
use crate::pg::Lsn;
use crate::plan::Planner;
use crate::progress::{Progress, StatusReason};
use crate::sink::{Sink, SinkError};

/// How often the slot's lag and WAL status are polled over SQL.
const SLOT_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Stops a helper task when the run ends, whichever way it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often a standby checks whether the slot's consumer went away.
const STANDBY_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// The server's answer to START_REPLICATION on a slot whose WAL is gone.
fn is_slot_invalidated(e: &crate::pg::replication::ServerError) -> bool {
    e.sqlstate == "55000"
        && (e.message.contains("can no longer get changes")
            || e.message.contains("invalidated")
            || e.detail
                .as_deref()
                .is_some_and(|d| d.contains("invalidated")))
}

/// Server versions from which pgoutput speaks protocol 2 (streaming of large transactions).
const STREAMING_MIN_SERVER_VERSION: u32 = 140_000;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("cannot decode the replication stream at {lsn}")]
    Assemble {
        lsn: Lsn,
        #[source]
        source: AssembleError,
    },
    #[error("the sink failed and cannot be retried")]
    Sink(#[from] SinkError),
    #[error("warm-up failed (the new slot was dropped again, so the next start retries it)")]
    WarmUp(#[from] crate::snapshot::SnapshotError),
    /// Something only a human can fix; the message says what to do.
    #[error("{0}")]
    Setup(String),
}

impl PipelineError {
    fn is_retryable(&self) -> bool {
        match self {
            PipelineError::Replication(e) => e.is_retryable(),
            PipelineError::Catalog(e) => e.is_retryable(),
            PipelineError::WarmUp(e) => e.is_retryable(),
            _ => false,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            PipelineError::Config(_) => "config",
            PipelineError::Replication(e) => e.kind(),
            PipelineError::Catalog(_) => "catalog",
            PipelineError::Assemble { .. } => "decode",
            PipelineError::Sink(_) => "sink",
            PipelineError::Setup(_) => "setup",
            PipelineError::WarmUp(_) => "setup",
        }
    }
}

/// Asks the pipeline to stop: the first request drains committed work and confirms it, a
/// second one stops at once (nothing is lost either way: unconfirmed work is redelivered).
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<u32>,
}

#[derive(Clone)]
pub struct ShutdownHandle {
    tx: std::sync::Arc<watch::Sender<u32>>,
}

impl ShutdownHandle {
    pub fn request(&self) {
        self.tx.send_modify(|n| *n += 1);
    }
}

pub fn shutdown_channel() -> (ShutdownHandle, Shutdown) {
    let (tx, rx) = watch::channel(0);
    (
        ShutdownHandle {
            tx: std::sync::Arc::new(tx),
        },
        Shutdown { rx },
    )
}

impl Shutdown {
    fn requests(&self) -> u32 {
        *self.rx.borrow()
    }

    /// Resolves once at least `n` requests were made (or every handle is gone).
    async fn at_least(&mut self, n: u32) {
        let _ = self.rx.wait_for(|count| *count >= n).await;
    }
}

/// What `prepare_source` did.
#[derive(Debug, Default)]
pub struct Prepared {
    /// This run created the slot.
    pub slot_created: bool,
    /// What the warm-up loaded, when it ran.
    pub warm_up: Option<crate::snapshot::WarmUpSummary>,
}

/// Checks what only a human can fix and creates the publication and slot when allowed to.
///
/// With `warm_up`, a slot created here exports its snapshot and the mirrors are loaded from it
/// before anything streams; if loading fails the slot is dropped again, so the next attempt
/// creates it and loads anew instead of streaming into half-loaded mirrors.
pub async fn prepare_source(
    source: &SourceConfig,
    params: &ConnectParams,
    tables: &[String],
    warm_up: Option<&crate::snapshot::WarmUp>,
) -> Result<Prepared, PipelineError> {
    let client = catalog::connect(params).await?;
    let wal_level = catalog::wal_level(&client).await?;
    if wal_level != "logical" {
        return Err(PipelineError::Setup(format!(
            "wal_level is {wal_level:?} on {}; logical replication needs \
             ALTER SYSTEM SET wal_level = logical and a server restart",
            params.target()
        )));
    }
    if !catalog::publication_exists(&client, &source.publication).await? {
        if !source.create_publication {
            return Err(PipelineError::Setup(format!(
                "publication {:?} does not exist and source.create_publication is false; \
                 create it with: {}",
                source.publication,
                catalog::create_publication_sql(&source.publication, tables)
            )));
        }
        if tables.is_empty() {
            return Err(PipelineError::Setup(format!(
                "publication {:?} does not exist and no [[table]] is configured to create it \
                 for; add [[table]] entries or create the publication yourself",
                source.publication
            )));
        }
        catalog::create_publication(&client, &source.publication, tables).await?;
        tracing::info!(publication = %source.publication, ?tables, "created publication");
    }
    match catalog::slot_state(&client, &source.slot).await? {
        Some(slot) if slot.plugin.as_deref() != Some("pgoutput") => {
            return Err(PipelineError::Setup(format!(
                "replication slot {:?} exists but uses plugin {:?}, not pgoutput; drop it \
                 (SELECT pg_drop_replication_slot('{}')) or configure another source.slot",
                source.slot, slot.plugin, source.slot
            )));
        }
        Some(_) => {}
        None if source.create_slot => {
            let mut conn = ReplicationConnection::connect(params).await?;
            match warm_up {
                None => {
                    let lsn = conn.create_slot(&source.slot).await?;
                    tracing::info!(slot = %source.slot, consistent_point = %lsn, "created replication slot");
                    return Ok(Prepared {
                        slot_created: true,
                        warm_up: None,
                    });
                }
                Some(warm_up) => {
                    let (lsn, snapshot) = conn.create_slot_exporting_snapshot(&source.slot).await?;
                    tracing::info!(slot = %source.slot, consistent_point = %lsn, %snapshot, "created replication slot; warming up the mirrors from its snapshot");
                    let loaded = warm_up.load(params, Some(&snapshot)).await;
                    // The exported snapshot lives as long as this connection stays idle.
                    drop(conn);
                    match loaded {
                        Ok(summary) => {
                            return Ok(Prepared {
                                slot_created: true,
                                warm_up: Some(summary),
                            })
                        }
                        Err(e) => {
                            if let Err(drop_error) = catalog::drop_slot(&client, &source.slot).await
                            {
                                tracing::error!(error = %display_chain(&drop_error), slot = %source.slot, "cannot drop the slot after a failed warm-up; drop it by hand before the next start");
                            }
                            return Err(e.into());
                        }
                    }
                }
            }
        }
        None => {
            return Err(PipelineError::Setup(format!(
                "replication slot {:?} does not exist and source.create_slot is false; create \
                 it with: SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
                source.slot, source.slot
            )));
        }
    }
    Ok(Prepared::default())
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
pub async fn run_warming_up<PL, S>(
    source: &SourceConfig,
    tables: &[String],
    planner: PL,
    sink: S,
    shutdown: Shutdown,
    warm_up: Option<crate::snapshot::WarmUp>,
) -> Result<RunSummary, PipelineError>
where
    PL: Planner,
    S: Sink<PL::Plan>,
{
    let params = source.connect_params()?;
    let mut backoff = Backoff::new(source.reconnect_min(), source.reconnect_max());
    // Setup is retried like streaming: the database may simply not be up yet.
    let prepared = loop {
        match prepare_source(source, &params, tables, warm_up.as_ref()).await {
            Ok(prepared) => break prepared,
            Err(e) if e.is_retryable() && shutdown.requests() == 0 => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %display_chain(&e), retry_in_ms = delay.as_millis() as u64, "source not reachable");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    };

    let monitor = tokio::spawn(crate::monitor::watch_slot(
        params.clone(),
        source.slot.clone(),
        SLOT_POLL_INTERVAL,
    ));
    let _monitor = AbortOnDrop(monitor);
    let (txn_tx, txn_rx) = mpsc::channel(source.queue_capacity);
    let (confirmed_tx, confirmed_rx) = watch::channel(Lsn::ZERO);
    let (failing_tx, failing_rx) = watch::channel(None);
    let sink_retry = SinkRetry {
        backoff: Backoff::new(source.reconnect_min(), source.reconnect_max()),
        failing_since: failing_tx,
    };
    let mut sink_task = tokio::spawn(sink_loop(
        sink,
        txn_rx,
        confirmed_tx,
        source.batch_max_txns,
        sink_retry,
    ));
    if prepared.slot_created {
        // Ahead of everything the new slot delivers.
        txn_tx
            .send(SinkCommand::SlotCreated)
            .await
            .map_err(|_| PipelineError::Setup("sink stopped".into()))?;
    }
    let mut streamer = Streamer {
        source,
        params,
        assembler: Assembler::new(planner),
        queue: txn_tx,
        confirmed: confirmed_rx,
        sink_failing_since: failing_rx,
        enqueued_lsn: Lsn::ZERO,
        keepalive_lsn: Lsn::ZERO,
        shutdown,
        backoff,
        reconnects: 0,
        warm_up,
        types: crate::value::TypeRegistry::new(),
    };
    let stream_result = tokio::select! {
        result = streamer.run() => result,
        sink_result = &mut sink_task => {
            return match sink_result {
                Ok(Err(e)) => Err(e.into()),
                Ok(Ok(())) => Err(PipelineError::Setup("sink stopped unexpectedly".into())),
                Err(join) => Err(PipelineError::Setup(format!("sink task panicked: {join}"))),
            };
        }
    };
    let summary = RunSummary {
        confirmed_lsn: *streamer.confirmed.borrow(),
        reconnects: streamer.reconnects,
    };
    drop(streamer);
    sink_task.abort();
    stream_result.map(|()| summary)
}

/// What the stream task asks of the sink task, in stream order.
pub enum SinkCommand<P> {
    /// Apply a committed transaction.
    Apply(CommittedTxn<P>),
    /// The stream has a gap (the slot was lost and recreated): clear everything the sink
    /// maintains before applying anything that follows. `applied` hears when it is done.
    Reset {
        reason: String,
        applied: Option<tokio::sync::oneshot::Sender<()>>,
    },
    /// The slot was created by this run: see `Sink::slot_created`.
    SlotCreated,
}

/// Applies queued transactions in batches; confirms each batch only after the sink did.
async fn sink_loop<P: crate::plan::Plan, S: Sink<P>>(
    mut sink: S,
    mut queue: mpsc::Receiver<SinkCommand<P>>,
    confirmed: watch::Sender<Lsn>,
    batch_max: usize,
    mut backoff: SinkRetry,
) -> Result<(), SinkError> {
    let mut commands = Vec::with_capacity(batch_max);
    let mut batch = Vec::with_capacity(batch_max);
    while queue.recv_many(&mut commands, batch_max).await > 0 {
        for command in commands.drain(..) {
            match command {
                SinkCommand::Apply(txn) => batch.push(txn),
                SinkCommand::Reset { reason, applied } => {
                    apply_batch(&mut sink, &mut batch, &confirmed, &mut backoff).await?;
                    tracing::warn!(%reason, "clearing everything the sink maintains");
                    retry(&mut sink, SinkOp::Reset, &mut backoff).await?;
                    if let Some(applied) = applied {
                        let _ = applied.send(());
                    }
                }
                SinkCommand::SlotCreated => {
                    apply_batch(&mut sink, &mut batch, &confirmed, &mut backoff).await?;
                    retry(&mut sink, SinkOp::SlotCreated, &mut backoff).await?;
                }
            }
        }
        apply_batch(&mut sink, &mut batch, &confirmed, &mut backoff).await?;
    }
    Ok(())
}

/// Applies `batch` (retrying retryable errors forever), then confirms its last commit.
async fn apply_batch<P: crate::plan::Plan, S: Sink<P>>(
    sink: &mut S,
    batch: &mut Vec<CommittedTxn<P>>,
    confirmed: &watch::Sender<Lsn>,
    backoff: &mut SinkRetry,
) -> Result<(), SinkError> {
    if batch.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    retry(sink, SinkOp::Apply(batch), backoff).await?;
    let last_end = batch.last().map(|t| t.end_lsn).unwrap_or_default();
    m::batch_applied(batch, started.elapsed());
    confirmed.send_modify(|lsn| *lsn = (*lsn).max(last_end));
    batch.clear();
    Ok(())
}

/// One sink operation, retried as a whole.
#[derive(Clone, Copy)]
enum SinkOp<'a, P> {
    Apply(&'a [CommittedTxn<P>]),
    Reset,
    SlotCreated,
}

/// Retry state of the sink task, and since when the sink has been failing (the stream task
/// releases the slot when an outage lasts).
struct SinkRetry {
    backoff: Backoff,
    failing_since: watch::Sender<Option<Instant>>,
}

/// Runs `op` until it succeeds or fails for good; nothing is ever skipped.
async fn retry<P: crate::plan::Plan, S: Sink<P>>(
    sink: &mut S,
    op: SinkOp<'_, P>,
    state: &mut SinkRetry,
) -> Result<(), SinkError> {
    let backoff = &mut state.backoff;
    loop {
        let result = match op {
            SinkOp::Apply(batch) => sink.apply(batch).await,
            SinkOp::Reset => sink.reset().await,
            SinkOp::SlotCreated => sink.slot_created().await,
        };
        match result {
            Ok(()) => {
                backoff.reset();
                state
                    .failing_since
                    .send_if_modified(|since| since.take().is_some());
                return Ok(());
            }
            Err(e) if e.is_retryable() => {
                state.failing_since.send_if_modified(|since| {
                    let first = since.is_none();
                    since.get_or_insert_with(Instant::now);
                    first
                });
                let delay = backoff.next_delay();
                m::error(m::ERROR_SINK);
                tracing::warn!(
                    error = %display_chain(&e),
                    attempt = backoff.attempts(),
                    retry_in_ms = delay.as_millis() as u64,
                    "sink unavailable; holding the slot position and retrying"
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

struct Streamer<'a, PL: Planner> {
    source: &'a SourceConfig,
    params: ConnectParams,
    assembler: Assembler<PL>,
    queue: mpsc::Sender<SinkCommand<PL::Plan>>,
    confirmed: watch::Receiver<Lsn>,
    /// Since when the sink has been failing, if it is.
    sink_failing_since: watch::Receiver<Option<Instant>>,
    /// End of the last transaction handed to the sink queue. A reconnect resumes after it, so
    /// nothing reaches the sink twice or out of order while the sink task lives.
    enqueued_lsn: Lsn,
    /// WAL end of the latest keepalive: confirmable once nothing is pending.
    keepalive_lsn: Lsn,
    shutdown: Shutdown,
    backoff: Backoff,
    reconnects: u64,
    /// `source.warm_up`: a recreated slot's mirrors are loaded again from its snapshot.
    warm_up: Option<crate::snapshot::WarmUp>,
    /// Non-built-in types looked up so far (see `Planner::register_types`).
    types: crate::value::TypeRegistry,
}

enum SessionEnd {
    Shutdown,
    /// Start a new session at once (the slot was just recreated).
    Restart,
    /// The sink has been down for `release_slot_after_sink_outage_ms`: let go of the slot
    /// until it recovers.
    SinkDown,
}

impl<PL: Planner> Streamer<'_, PL> {
    async fn run(&mut self) -> Result<(), PipelineError> {
        loop {
            match self.session().await {
                // session() waits for the sink to recover before it returns this.
                Ok(SessionEnd::SinkDown) => {}
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Ok(SessionEnd::Restart) => {}
                Err(e) if e.is_retryable() && self.shutdown.requests() == 0 => {
                    self.reconnects += 1;
                    m::reconnected();
                    m::error(e.kind());
                    let delay = self.backoff.next_delay();
                    tracing::warn!(
                        error = %display_chain(&e),
                        attempt = self.backoff.attempts(),
                        retry_in_ms = delay.as_millis() as u64,
                        "replication connection lost; reconnecting"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.at_least(1) => return Ok(()),
                    }
                }
                Err(e) => {
                    m::error(e.kind());
                    return Err(e);
                }
            }
        }
    }

    async fn session(&mut self) -> Result<SessionEnd, PipelineError> {
        let source = self.source;
        let client = catalog::connect(&self.params).await?;
        let mut standing_by = false;
        let slot = loop {
            match catalog::slot_state(&client, &source.slot).await? {
                None => self.slot_lost("was dropped").await?,
                Some(s) if s.wal_status.as_deref() == Some("lost") => {
                    self.slot_lost("is lost (Postgres removed WAL it still needed)")
                        .await?
                }
                Some(s) if s.active => {
                    // Postgres allows one consumer per slot: another instance streams, this
                    // one is the standby and takes over as soon as the slot is free.
                    if !standing_by {
                        standing_by = true;
                        tracing::info!(
                            slot = %source.slot,
                            active_pid = ?s.active_pid,
                            "slot in use by another consumer; standing by"
                        );
                    }
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(STANDBY_POLL_INTERVAL) => {}
                        _ = shutdown.at_least(1) => return Ok(SessionEnd::Shutdown),
                    }
                }
                Some(s) => break s,
            }
        };
        if standing_by {
            tracing::info!(slot = %source.slot, "slot is free; taking over");
        }
        let slot_confirmed = slot.confirmed_flush_lsn.unwrap_or_default();
        let wal_end = catalog::current_wal_lsn(&client).await.unwrap_or_default();
        drop(client);

        let conn = ReplicationConnection::connect(&self.params).await?;
        let version = conn.server_version_num().unwrap_or(0);
        let confirmed_here = *self.confirmed.borrow();
        let start_lsn = self.enqueued_lsn.max(confirmed_here);
        let mut options = vec![
            (
                "proto_version",
                if version >= STREAMING_MIN_SERVER_VERSION {
                    "2"
                } else {
                    "1"
                }
                .to_string(),
            ),
            ("publication_names", quote_publication(&source.publication)),
            ("messages", "true".to_string()),
        ];
        if version >= STREAMING_MIN_SERVER_VERSION {
            options.push(("streaming", "on".to_string()));
        }
        let mut stream = match conn
            .start_replication(&source.slot, start_lsn, &options)
            .await
        {
            Ok(stream) => stream,
            Err(ReplicationError::Server(e)) if is_slot_invalidated(&e) => {
                self.slot_lost("was invalidated").await?;
                return Ok(SessionEnd::Restart);
            }
            Err(e) => return Err(e.into()),
        };
        self.assembler.reset();
        self.keepalive_lsn = Lsn::ZERO;
        self.backoff.reset();
        let mut progress = Progress::new(slot_confirmed.max(confirmed_here));
        // Transactions queued by an earlier session may still be confirmed by the sink during
        // this one: they were received, and the server resumes after them.
        progress.receive(start_lsn);
        m::set_flushed_lsn(progress.flushed_lsn());
        tracing::info!(
            slot = %source.slot,
            start_lsn = %slot_confirmed.max(start_lsn),
            lag_bytes = wal_end.bytes_since(slot_confirmed),
            server_version = version,
            "streaming"
        );
        crate::health::set_streaming(true);
        let result = self.stream(&mut stream, &mut progress).await;
        crate::health::set_streaming(false);
        match result {
            Ok(SessionEnd::Shutdown) => {
                send_status(&mut stream, &progress, StatusReason::Shutdown).await?;
                stream.close().await;
                tracing::info!(flushed_lsn = %progress.flushed_lsn(), "stopped after draining committed work");
                Ok(SessionEnd::Shutdown)
            }
            Ok(SessionEnd::SinkDown) => {
                send_status(&mut stream, &progress, StatusReason::Interval).await?;
                stream.close().await;
                tracing::warn!(
                    after_ms = self.source.release_slot_after_sink_outage_ms,
                    "sink still down; releasing the replication slot until it recovers \
                     (Postgres keeps the WAL; a held walsender would also block its shutdown)"
                );
                let mut shutdown = self.shutdown.clone();
                tokio::select! {
                    _ = self.sink_failing_since.wait_for(Option::is_none) => {
                        tracing::info!("sink recovered; resuming replication");
                        Ok(SessionEnd::Restart)
                    }
                    _ = shutdown.at_least(1) => Ok(SessionEnd::Shutdown),
                }
            }
            other => other,
        }
    }

    fn sink_outage_exceeded(&self) -> bool {
        outage_exceeded(&self.sink_failing_since, self.source)
    }

    async fn stream(
        &mut self,
        stream: &mut ReplicationStream,
        progress: &mut Progress,
    ) -> Result<SessionEnd, PipelineError> {
        let mut ticker = tokio::time::interval(self.source.status_interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.at_least(1) => {
                    self.drain(stream, progress).await?;
                    return Ok(SessionEnd::Shutdown);
                }
                Ok(()) = self.confirmed.changed() => {
                    self.observe_confirmation(progress);
                }
                _ = ticker.tick() => {
                    send_status(stream, progress, StatusReason::Interval).await?;
                    if self.sink_outage_exceeded() {
                        return Ok(SessionEnd::SinkDown);
                    }
                }
                message = stream.next() => {
                    match message? {
                        None => return Err(ReplicationError::Closed.into()),
                        Some(WireMessage::XLogData(x)) => {
                            progress.receive(x.wal_start_lsn);
                            let committed = self.assembler.feed(&x.data).map_err(|source| {
                                PipelineError::Assemble { lsn: x.wal_start_lsn, source }
                            })?;
                            let new_types = self.assembler.take_new_type_oids();
                            if !new_types.is_empty() {
                                self.resolve_types(new_types).await?;
                            }
                            if let Some(txn) = committed {
                                // What the sink will confirm is the commit's end, so that is
                                // what must count as received, wherever the server put the
                                // message's start.
                                progress.receive(txn.end_lsn);
                                if !self.enqueue(txn, stream, progress, &mut ticker).await? {
                                    return Ok(SessionEnd::SinkDown);
                                }
                            }
                        }
                        Some(WireMessage::PrimaryKeepalive(k)) => {
                            progress.receive(k.wal_end_lsn);
                            self.keepalive_lsn = self.keepalive_lsn.max(k.wal_end_lsn);
                            self.observe_confirmation(progress);
                            if k.reply_requested {
                                send_status(stream, progress, StatusReason::KeepaliveReply).await?;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Applies `source.on_slot_lost`. `Ok` means a new slot exists and a sink reset is queued
    /// ahead of everything the new slot will deliver.
    async fn slot_lost(&mut self, what: &str) -> Result<(), PipelineError> {
        let source = self.source;
        m::error("slot_lost");
        if source.on_slot_lost == SlotLostPolicy::Fail {
            return Err(PipelineError::Setup(format!(
                "replication slot {:?} {what}: changes made since walsweep last confirmed were \
                 never seen, so caches may be stale. Either set source.on_slot_lost = \
                 \"recreate\" (walsweep creates a new slot and clears every key and dependency \
                 set its rules maintain), or drop the slot, clear the caches yourself and restart",
                source.slot
            )));
        }
        tracing::error!(slot = %source.slot, "replication slot {what}; recreating it and clearing the caches");
        let client = catalog::connect(&self.params).await?;
        if catalog::slot_state(&client, &source.slot).await?.is_some() {
            catalog::drop_slot(&client, &source.slot).await?;
        }
        drop(client);
        let reason = format!(
            "replication slot {:?} {what} and was recreated",
            source.slot
        );
        let sink_stopped = || PipelineError::Setup("sink stopped".into());
        let Some(warm_up) = &self.warm_up else {
            let mut conn = ReplicationConnection::connect(&self.params).await?;
            let lsn = conn.create_slot(&source.slot).await?;
            tracing::warn!(slot = %source.slot, consistent_point = %lsn, "recreated replication slot");
            // The reset goes through the queue, so it runs after everything received before the
            // gap and before anything the new slot delivers.
            self.queue
                .send(SinkCommand::Reset {
                    reason,
                    applied: None,
                })
                .await
                .map_err(|_| sink_stopped())?;
            m::slot_recreated();
            return Ok(());
        };
        // With warm-up: clear first, then create the slot and load the mirrors from its snapshot.
        // Changes made in between are in the snapshot; everything after it comes from the slot.
        let (applied, reset_done) = tokio::sync::oneshot::channel();
        self.queue
            .send(SinkCommand::Reset {
                reason,
                applied: Some(applied),
            })
            .await
            .map_err(|_| sink_stopped())?;
        reset_done.await.map_err(|_| sink_stopped())?;
        let mut conn = ReplicationConnection::connect(&self.params).await?;
        let (lsn, snapshot) = conn.create_slot_exporting_snapshot(&source.slot).await?;
        tracing::warn!(slot = %source.slot, consistent_point = %lsn, "recreated replication slot; warming up the mirrors from its snapshot");
        let loaded = warm_up.load(&self.params, Some(&snapshot)).await;
        drop(conn);
        if let Err(e) = loaded {
            // Next session finds no slot and comes back here: clear, create, load again.
            let client = catalog::connect(&self.params).await?;
            catalog::drop_slot(&client, &source.slot).await?;
            return Err(e.into());
        }
        m::slot_recreated();
        Ok(())
    }

    /// Looks up types a Relation message named that are not built in (rare: once per table
    /// and shape), before any of its rows is planned.
    async fn resolve_types(&mut self, oids: Vec<u32>) -> Result<(), PipelineError> {
        let unresolved = self.types.unresolved(oids);
        if unresolved.is_empty() {
            return Ok(());
        }
        let client = catalog::connect(&self.params).await?;
        catalog::resolve_types(&client, &mut self.types, unresolved).await?;
        self.assembler.register_types(&self.types);
        Ok(())
    }

    /// No half-received transaction and every queued one confirmed by the sink.
    fn nothing_pending(&self) -> bool {
        self.assembler.is_idle() && *self.confirmed.borrow() >= self.enqueued_lsn
    }

    /// Moves the flush position to what the sink confirmed, and, when nothing is pending, to the
    /// latest keepalive's WAL end: every commit before it was received before that keepalive,
    /// so it is confirmed already. Checking again on each confirmation matters: the server
    /// stops sending keepalives once our write position reaches its end of WAL, so a keepalive
    /// that arrived while a batch was in flight may be the last one for a while.
    fn observe_confirmation(&mut self, progress: &mut Progress) {
        progress.confirm(*self.confirmed.borrow_and_update());
        if self.nothing_pending() {
            progress.confirm(self.keepalive_lsn);
        }
        m::set_flushed_lsn(progress.flushed_lsn());
    }

    /// Puts a committed transaction on the queue, waiting while it is full. The socket is not
    /// read meanwhile (that is the backpressure), but status updates keep flowing so the server
    /// does not time the connection out.
    async fn enqueue(
        &mut self,
        txn: CommittedTxn<PL::Plan>,
        stream: &mut ReplicationStream,
        progress: &mut Progress,
        ticker: &mut tokio::time::Interval,
    ) -> Result<bool, PipelineError> {
        let end_lsn = txn.end_lsn;
        loop {
            tokio::select! {
                biased;
                permit = self.queue.reserve() => {
                    match permit {
                        Ok(permit) => {
                            m::txn_committed(&txn);
                            permit.send(SinkCommand::Apply(txn));
                        }
                        Err(_) => return Err(PipelineError::Setup("sink stopped".into())),
                    }
                    self.enqueued_lsn = end_lsn;
                    return Ok(true);
                }
                Ok(()) = self.confirmed.changed() => {
                    progress.confirm(*self.confirmed.borrow_and_update());
                    m::set_flushed_lsn(progress.flushed_lsn());
                }
                _ = ticker.tick() => {
                    send_status(stream, progress, StatusReason::Interval).await?;
                    // Not enqueued, so not lost: the slot delivers it again after resuming.
                    if outage_exceeded(&self.sink_failing_since, self.source) {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// After a shutdown request: wait until the sink confirmed everything queued, still sending
    /// status updates, unless a second request asks to stop now.
    async fn drain(
        &mut self,
        stream: &mut ReplicationStream,
        progress: &mut Progress,
    ) -> Result<(), PipelineError> {
        let target = self.enqueued_lsn;
        tracing::info!(pending_until = %target, "shutdown requested; draining committed work");
        let mut ticker = tokio::time::interval(self.source.status_interval());
        let mut shutdown = self.shutdown.clone();
        while *self.confirmed.borrow() < target {
            tokio::select! {
                _ = shutdown.at_least(2) => {
                    tracing::warn!("second shutdown request; stopping without draining (unconfirmed work will be redelivered)");
                    break;
                }
                changed = self.confirmed.changed() => {
                    if changed.is_err() { break; }
                }
                _ = ticker.tick() => {
                    progress.confirm(*self.confirmed.borrow());
                    send_status(stream, progress, StatusReason::Interval).await?;
                }
            }
        }
        progress.confirm(*self.confirmed.borrow());
        Ok(())
    }
}

/// The sink has been failing for longer than `release_slot_after_sink_outage_ms`.
fn outage_exceeded(
    failing_since: &watch::Receiver<Option<Instant>>,
    source: &SourceConfig,
) -> bool {
    let limit = Duration::from_millis(source.release_slot_after_sink_outage_ms);
    failing_since
        .borrow()
        .is_some_and(|since| since.elapsed() >= limit)
}

async fn send_status(
    stream: &mut ReplicationStream,
    progress: &Progress,
    reason: StatusReason,
) -> Result<(), PipelineError> {
    let update = progress.status_update();
    m::set_received_lsn(update.write_lsn);
    tracing::trace!(write = %update.write_lsn, flush = %update.flush_lsn, reason = reason.as_str(), "status update");
    stream.send_status(&update).await?;
    m::status_sent(reason);
    Ok(())
}

/// `publication_names` takes a comma-separated list of (possibly quoted) identifiers.
fn quote_publication(name: &str) -> String {
    crate::pg::replication::quote_ident(name)
}

/// `error: cause: cause`, for log lines (errors keep their sources separate).
pub fn display_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
