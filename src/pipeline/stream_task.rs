//! The stream task: reads the replication socket, assembles committed transactions and puts
//! them on the sink queue in commit order. It moves the flush position only to what the sink
//! reports applied, or, when nothing is pending, to a keepalive's WAL end.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::config::{SlotLostPolicy, SourceConfig};
use crate::pg::catalog;
use crate::pg::replication::{
    ConnectParams, ReplicationConnection, ReplicationError, ReplicationStream,
};
use crate::pg::slot_invalidation::Invalidation;
use crate::pg::wire::WireMessage;
use crate::pg::Lsn;
use crate::plan::Planner;
use crate::sink::Recovery;
use crate::stream::assembler::{Assembler, CommittedTxn};
use crate::stream::history::{self, HistoryCheck, RecordedSource, SourceIdentity};
use crate::stream::progress::{Progress, StatusReason};
use crate::stream::types::TypeResolver;
use crate::telemetry::log::display_chain;
use crate::telemetry::metrics as m;

use super::backoff::Backoff;
use super::recovery::{recreate_slot, QueuedControl, SinkControl};
use super::shutdown::Shutdown;
use super::sink_task::Control;
use super::sink_task::{SinkCommand, SinkReport};
use super::warm_up::WarmUp;
use super::PipelineError;

/// How often a standby checks whether the slot's consumer went away.
const STANDBY_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The server's answer to START_REPLICATION on a slot whose WAL is gone.
fn is_slot_invalidated(e: &crate::pg::replication::ServerError) -> bool {
    e.sqlstate == "55000"
        && (e.message.contains("can no longer get changes")
            || e.message.contains("invalidated")
            || e.detail
                .as_deref()
                .is_some_and(|d| d.contains("invalidated")))
}

pub(crate) struct Streamer<'a, PL: Planner> {
    pub(crate) source: &'a SourceConfig,
    pub(crate) params: ConnectParams,
    pub(crate) assembler: Assembler<PL>,
    pub(crate) queue: mpsc::Sender<SinkCommand<PL::Plan>>,
    /// Everything the sink side reports back.
    pub(crate) sink: watch::Receiver<SinkReport>,
    /// `Control` commands sent so far; each recovery step waits for its own.
    pub(crate) controls_requested: u64,
    /// A slot recreation that failed halfway (e.g. its warm-up): redone before streaming.
    pub(crate) unfinished_recovery: Option<Recovery>,
    /// The server's system and timeline when walsweep last streamed, to tell a database that
    /// was replaced behind the same URL (`crate::stream::history`).
    pub(crate) history: Option<SourceIdentity>,
    /// The slot's confirmed position an earlier run recorded: what walsweep applied then counts
    /// as received when checking the server's history.
    pub(crate) recorded_position: Lsn,
    /// End of the last transaction handed to the sink queue. A reconnect resumes after it, so
    /// nothing reaches the sink twice or out of order while the sink task lives.
    pub(crate) enqueued_lsn: Lsn,
    /// WAL end of the latest keepalive: confirmable once nothing is pending.
    pub(crate) keepalive_lsn: Lsn,
    /// The last keepalive position handed to the sink as applied (`SinkCommand::Idle`).
    pub(crate) idle_published_lsn: Lsn,
    /// The flush position and time of the last status update sent because walsweep caught up
    /// (`StatusReason::CaughtUp`).
    pub(crate) caught_up_sent: (Lsn, tokio::time::Instant),
    /// When to ask `tell_caught_up` again, after it found the last update too recent.
    pub(crate) caught_up_retry: Option<tokio::time::Instant>,
    /// How late the walsender sends commits, for the sink task to tell a backlog (`backlog`).
    pub(crate) send_lag: std::sync::Arc<super::backlog::SendLag>,
    /// `walsweep_transactions_committed_total`.
    pub(crate) txns_committed: metrics::Counter,
    /// The server's WAL page and segment sizes, read each session, for the sink's published
    /// position (`WalLayout`).
    pub(crate) wal: std::sync::Arc<crate::pg::wal_layout::WalLayout>,
    pub(crate) shutdown: Shutdown,
    pub(crate) backoff: Backoff,
    pub(crate) reconnects: u64,
    /// `source.warm_up`: a recreated slot's mirrors are loaded again from its snapshot.
    pub(crate) warm_up: Option<WarmUp>,
    /// Enums, domains and arrays the planners need to know (see `Planner::register_types`).
    pub(crate) types: TypeResolver,
    pub(crate) slot: SlotMode,
}

/// Which slot a run reads, and what it may do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SlotMode {
    /// `source.slot`, walsweep's own: checked before each session, recreated when lost
    /// (`on_slot_lost`), shared with standbys, confirmed as the sink applies.
    Owned,
    /// A temporary slot created on each replication connection and dropped by Postgres with
    /// it; confirmed as the sink applies. A lost connection cannot resume it, so errors end the
    /// run.
    Temporary { name: String, start_lsn: Lsn },
    /// Someone else's slot, read from `start_lsn` and never confirmed.
    Borrowed { name: String, start_lsn: Lsn },
}

impl SlotMode {
    pub(crate) fn name<'a>(&'a self, source: &'a SourceConfig) -> &'a str {
        match self {
            SlotMode::Owned => &source.slot,
            SlotMode::Temporary { name, .. } | SlotMode::Borrowed { name, .. } => name,
        }
    }

    fn start_lsn(&self) -> Lsn {
        match self {
            SlotMode::Owned => Lsn::ZERO,
            SlotMode::Temporary { start_lsn, .. } | SlotMode::Borrowed { start_lsn, .. } => {
                *start_lsn
            }
        }
    }

    fn confirms(&self) -> bool {
        !matches!(self, SlotMode::Borrowed { .. })
    }

    fn resumable(&self) -> bool {
        matches!(self, SlotMode::Owned)
    }
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
    pub(crate) async fn run(&mut self) -> Result<(), PipelineError> {
        loop {
            match self.session().await {
                // session() waits for the sink to recover before it returns this.
                Ok(SessionEnd::SinkDown) => {}
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Ok(SessionEnd::Restart) => {}
                Err(PipelineError::Interrupted) => return Ok(()),
                Err(e)
                    if e.is_retryable()
                        && self.slot.resumable()
                        && self.shutdown.requests() == 0 =>
                {
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
        if let Some(steps) = self.unfinished_recovery {
            self.recover(
                steps,
                "an earlier attempt to recreate the slot did not finish",
            )
            .await?;
        }
        let client = catalog::connect(&self.params).await?;
        let slot_confirmed = match &self.slot {
            SlotMode::Owned => match self.owned_slot_confirmed(&client).await? {
                Some(lsn) => lsn,
                None => return Ok(SessionEnd::Shutdown),
            },
            SlotMode::Temporary { .. } | SlotMode::Borrowed { .. } => Lsn::ZERO,
        };
        let wal_end = catalog::current_wal_lsn(&client).await.unwrap_or_default();
        if self
            .types
            .resolve_publication(&client, &source.publication)
            .await?
        {
            self.assembler.register_types(self.types.registry());
        }
        self.types.keep_connection(client);

        let mut conn = ReplicationConnection::connect(&self.params).await?;
        if let SlotMode::Temporary { name, .. } = &self.slot {
            // The slot lives as long as this connection: Postgres drops it when it ends.
            conn.simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                crate::pg::replication::quote_ident(name)
            ))
            .await?;
        }
        if self.slot == SlotMode::Owned {
            if let Some(why) = self.history_changed(&mut conn).await? {
                drop(conn);
                self.slot_lost(&format!("belongs to another WAL history: {why}"), None)
                    .await?;
                return Ok(SessionEnd::Restart);
            }
            self.record_source(slot_confirmed).await?;
        }
        self.read_wal_layout(&mut conn).await?;
        let version = conn.server_version_num().unwrap_or(0);
        let confirmed_here = self.sink.borrow().applied_lsn;
        let start_lsn = self
            .enqueued_lsn
            .max(confirmed_here)
            .max(self.slot.start_lsn());
        let protocol = crate::pg::pgoutput_options::negotiate(version, source.protocol_version)
            .map_err(PipelineError::Setup)?;
        let options = protocol.start_options(quote_publication(&source.publication));
        let mut stream = match conn
            .start_replication(self.slot.name(source), start_lsn, &options)
            .await
        {
            Ok(stream) => stream,
            // Only walsweep's own slot is recreated; a slot it merely reads is reported.
            Err(ReplicationError::Server(e))
                if self.slot == SlotMode::Owned && is_slot_invalidated(&e) =>
            {
                // Invalidated since the check above (e.g. by a checkpoint in between).
                let (what, prevention) = match read_invalidation(&self.params, &source.slot).await {
                    Some(invalidation) => (invalidation.what(), invalidation.prevention()),
                    None => (
                        format!(
                            "was invalidated ({}{})",
                            e.message,
                            e.detail
                                .as_deref()
                                .map(|d| format!(": {d}"))
                                .unwrap_or_default()
                        ),
                        None,
                    ),
                };
                self.slot_lost(&what, prevention.as_deref()).await?;
                return Ok(SessionEnd::Restart);
            }
            Err(e) => return Err(e.into()),
        };
        self.assembler.reset();
        self.keepalive_lsn = Lsn::ZERO;
        self.idle_published_lsn = Lsn::ZERO;
        self.backoff.reset();
        let mut progress = Progress::new(slot_confirmed.max(confirmed_here));
        // Transactions queued by an earlier session may still be confirmed by the sink during
        // this one: they were received, and the server resumes after them.
        progress.receive(start_lsn);
        m::set_flushed_lsn(progress.flushed_lsn().as_u64());
        tracing::info!(
            slot = %self.slot.name(source),
            start_lsn = %slot_confirmed.max(start_lsn),
            lag_bytes = wal_end.bytes_since(slot_confirmed),
            server_version = version,
            protocol_version = protocol.version,
            "streaming"
        );
        crate::telemetry::health::set_streaming(true);
        let result = self.stream(&mut stream, &mut progress).await;
        crate::telemetry::health::set_streaming(false);
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
                    _ = self.sink.wait_for(|r| r.failing_since.is_none()) => {
                        tracing::info!("sink recovered; resuming replication");
                        Ok(SessionEnd::Restart)
                    }
                    _ = shutdown.at_least(1) => Ok(SessionEnd::Shutdown),
                }
            }
            other => other,
        }
    }

    /// Waits until walsweep's own slot exists and is free (recreating it when lost, standing by
    /// while another instance reads it) and returns its confirmed position; `None` on shutdown.
    async fn owned_slot_confirmed(
        &mut self,
        client: &tokio_postgres::Client,
    ) -> Result<Option<Lsn>, PipelineError> {
        let source = self.source;
        let mut standing_by = false;
        let slot = loop {
            match catalog::slot_state(client, &source.slot).await? {
                None => self.slot_lost("was dropped", None).await?,
                Some(s) if s.wal_status.as_deref() == Some("lost") => {
                    let invalidation = Invalidation::read(client, &source.slot)
                        .await?
                        .unwrap_or_default();
                    self.slot_lost(&invalidation.what(), invalidation.prevention().as_deref())
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
                        _ = shutdown.at_least(1) => return Ok(None),
                    }
                }
                Some(s) => break s,
            }
        };
        if standing_by {
            tracing::info!(slot = %source.slot, "slot is free; taking over");
        }
        Ok(Some(slot.confirmed_flush_lsn.unwrap_or_default()))
    }

    /// The sink has been failing for longer than `release_slot_after_sink_outage_ms`.
    fn sink_outage_exceeded(&self) -> bool {
        let limit = Duration::from_millis(self.source.release_slot_after_sink_outage_ms);
        self.sink
            .borrow()
            .failing_since
            .is_some_and(|since| since.elapsed() >= limit)
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
                Ok(()) = self.sink.changed() => {
                    self.observe_confirmation(progress);
                    if self.tell_caught_up(progress) {
                        send_status(stream, progress, StatusReason::CaughtUp).await?;
                    }
                }
                _ = ticker.tick() => {
                    send_status(stream, progress, StatusReason::Interval).await?;
                    if self.sink_outage_exceeded() {
                        return Ok(SessionEnd::SinkDown);
                    }
                }
                _ = tokio::time::sleep_until(self.caught_up_retry.unwrap_or_else(tokio::time::Instant::now)),
                    if self.caught_up_retry.is_some() =>
                {
                    self.caught_up_retry = None;
                    if self.tell_caught_up(progress) {
                        send_status(stream, progress, StatusReason::CaughtUp).await?;
                    }
                }
                message = stream.next() => {
                    let mut message = message?;
                    loop {
                        if let Some(end) = self.handle(message, stream, progress, &mut ticker).await? {
                            return Ok(end);
                        }
                        // The messages already read go without a select! each; the branches
                        // above get their turn when the buffer runs dry.
                        match stream.next_buffered()? {
                            Some(next) => message = next,
                            None => break,
                        }
                    }
                }
            }
        }
    }

    /// One message of the stream (`None`: the server ended it). `Some` ends the session.
    async fn handle(
        &mut self,
        message: Option<WireMessage>,
        stream: &mut ReplicationStream,
        progress: &mut Progress,
        ticker: &mut tokio::time::Interval,
    ) -> Result<Option<SessionEnd>, PipelineError> {
        match message {
            None => return Err(ReplicationError::Closed.into()),
            Some(WireMessage::XLogData(x)) => {
                progress.receive(x.wal_start_lsn);
                let committed =
                    self.assembler
                        .feed(&x.data)
                        .map_err(|source| PipelineError::Assemble {
                            lsn: x.wal_start_lsn,
                            source,
                        })?;
                let new_types = self.assembler.take_new_type_oids();
                if !new_types.is_empty() {
                    // A type created after the session started: rare.
                    self.resolve_types(new_types).await?;
                }
                if let Some(txn) = committed {
                    self.send_lag.observe(
                        txn.commit_time_unix_micros,
                        crate::pg::pgoutput::pg_time_to_unix_micros(x.send_time),
                    );
                    // What the sink will confirm is the commit's end, so that is what must
                    // count as received, wherever the server put the message's start.
                    progress.receive(txn.end_lsn);
                    if !self.enqueue(txn, stream, progress, ticker).await? {
                        return Ok(Some(SessionEnd::SinkDown));
                    }
                }
            }
            Some(WireMessage::PrimaryKeepalive(k)) => {
                progress.receive(k.wal_end_lsn);
                self.keepalive_lsn = self.keepalive_lsn.max(k.wal_end_lsn);
                // This may be where a batch's confirmation is first seen (the walsender sends
                // a keepalive as soon as it waits for WAL).
                self.observe_confirmation(progress);
                if k.reply_requested {
                    send_status(stream, progress, StatusReason::KeepaliveReply).await?;
                } else if self.tell_caught_up(progress) {
                    send_status(stream, progress, StatusReason::CaughtUp).await?;
                }
            }
        }
        Ok(None)
    }

    /// Applies `source.on_slot_lost`. `Ok` means a new slot exists, the sink was cleared behind
    /// it (and the mirrors loaded, with warm-up), and positions start over from the new slot.
    /// `prevention` says what keeps it from happening again, when the cause tells.
    async fn slot_lost(
        &mut self,
        what: &str,
        prevention: Option<&str>,
    ) -> Result<(), PipelineError> {
        let source = self.source;
        m::error("slot_lost");
        let prevention = prevention.map(|p| format!(" {p}.")).unwrap_or_default();
        if source.on_slot_lost == SlotLostPolicy::Fail {
            return Err(PipelineError::Setup(format!(
                "replication slot {:?} {what}: changes made since walsweep last confirmed were \
                 never seen, so caches may be stale. Either set source.on_slot_lost = \
                 \"recreate\" (walsweep creates a new slot and clears every key and dependency \
                 set its rules maintain), or drop the slot, clear the caches yourself and \
                 restart.{prevention}",
                source.slot
            )));
        }
        tracing::error!(slot = %source.slot, "replication slot {what}; recreating it and clearing the caches.{prevention}");
        let steps = Recovery {
            clear: true,
            restart_chain: true,
            load: self.warm_up.is_some(),
        };
        let reason = format!(
            "replication slot {:?} {what} and was recreated",
            source.slot
        );
        self.recover(steps, &reason).await?;
        m::slot_recreated();
        Ok(())
    }

    /// Recreates the slot with `steps` (`super::recovery`). Until it succeeds, every new session
    /// starts by trying again.
    async fn recover(&mut self, steps: Recovery, reason: &str) -> Result<(), PipelineError> {
        self.unfinished_recovery = Some(steps);
        let mut control = QueuedControl {
            queue: &self.queue,
            report: &mut self.sink,
            requested: &mut self.controls_requested,
            shutdown: self.shutdown.clone(),
        };
        recreate_slot(
            &mut control,
            self.source,
            &self.params,
            steps,
            self.warm_up.as_ref(),
            reason,
        )
        .await?;
        self.unfinished_recovery = None;
        // A new history: the sink's reset moved its applied position back to zero, and the new
        // slot's LSNs may be lower than anything queued before. Resuming past them would skip
        // every new commit.
        self.enqueued_lsn = Lsn::ZERO;
        self.keepalive_lsn = Lsn::ZERO;
        self.idle_published_lsn = Lsn::ZERO;
        self.history = None;
        self.recorded_position = Lsn::ZERO;
        Ok(())
    }

    /// Keeps, next to the data, which source and slot walsweep streams from, so that a later
    /// start tells a slot dropped meanwhile from a first start.
    async fn record_source(&mut self, confirmed_lsn: Lsn) -> Result<(), PipelineError> {
        let Some(identity) = &self.history else {
            return Ok(());
        };
        let record = RecordedSource {
            system_id: identity.system_id.clone(),
            timeline: identity.timeline,
            confirmed_lsn,
        };
        let mut control = QueuedControl {
            queue: &self.queue,
            report: &mut self.sink,
            requested: &mut self.controls_requested,
            shutdown: self.shutdown.clone(),
        };
        control.run(Control::RecordSource(record)).await
    }

    /// Compares the server behind the URL with the one walsweep streamed from before; `Some`
    /// (why) when its positions do not belong to this server's history.
    async fn history_changed(
        &mut self,
        conn: &mut ReplicationConnection,
    ) -> Result<Option<String>, PipelineError> {
        let system = conn.identify_system().await?;
        let now = SourceIdentity {
            system_id: system.system_id,
            timeline: system.timeline,
            wal_position: system.xlogpos,
        };
        let position = self
            .enqueued_lsn
            .max(self.sink.borrow().applied_lsn)
            .max(self.recorded_position);
        let verdict = match &self.history {
            None => None,
            Some(known) => match history::check(known, &now, position) {
                HistoryCheck::Continues => None,
                HistoryCheck::Replaced(why) => Some(why),
                HistoryCheck::NewTimeline { from, to } => {
                    let file = conn.timeline_history(to).await?;
                    let verdict =
                        history::fork_check(history::switch_point(&file, from), from, to, position);
                    if verdict.is_none() {
                        tracing::info!(from, to, "the database switched timelines (a failover); everything walsweep received is in the new history");
                    }
                    verdict
                }
            },
        };
        if verdict.is_none() {
            self.history = Some(now);
        }
        Ok(verdict)
    }

    /// Looks up types a Relation message named that are not built in (rare: once per table
    /// and shape), before any of its rows is planned.
    async fn resolve_types(&mut self, oids: Vec<u32>) -> Result<(), PipelineError> {
        if self.types.resolve(&self.params, oids).await? {
            self.assembler.register_types(self.types.registry());
        }
        Ok(())
    }

    /// Moves the flush position, unless the slot is only borrowed: then the status updates keep
    /// flush at zero, which moves nothing, and the slot's next reader gets the same changes.
    fn confirm(&self, progress: &mut Progress, lsn: Lsn) {
        if self.slot.confirms() {
            progress.confirm(lsn);
        }
    }

    /// `SHOW wal_block_size` and `wal_segment_size` on the replication connection.
    async fn read_wal_layout(
        &mut self,
        conn: &mut ReplicationConnection,
    ) -> Result<(), PipelineError> {
        let mut sizes = [0u64; 2];
        for (size, name) in sizes.iter_mut().zip(["wal_block_size", "wal_segment_size"]) {
            let rows = conn.simple_query(&format!("SHOW {name}")).await?;
            *size = rows
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .and_then(|text| crate::pg::wal_layout::parse_size(&text))
                .unwrap_or(0);
        }
        self.wal.set(sizes[0], sizes[1]);
        Ok(())
    }

    /// No half-received transaction and every queued one confirmed by the sink.
    fn nothing_pending(&self) -> bool {
        self.assembler.is_idle() && self.sink.borrow().applied_lsn >= self.enqueued_lsn
    }

    /// Moves the flush position to what the sink confirmed, and, when nothing is pending, to the
    /// latest keepalive's WAL end: every commit before it was received before that keepalive,
    /// so it is confirmed already. Checking again on each confirmation matters: the server
    /// stops sending keepalives once our write position reaches its end of WAL, so a keepalive
    /// that arrived while a batch was in flight may be the last one for a while.
    fn observe_confirmation(&mut self, progress: &mut Progress) {
        let applied = self.sink.borrow_and_update().applied_lsn;
        self.confirm(progress, applied);
        if self.nothing_pending() {
            self.confirm(progress, self.keepalive_lsn);
            self.publish_idle_position(applied);
        }
        m::set_flushed_lsn(progress.flushed_lsn().as_u64());
    }

    /// Whether to tell the server the flush position now rather than at the next tick: when
    /// everything received is applied and the position moved since the last such update. At
    /// most one per `CAUGHT_UP_MIN_GAP`, so a busy live stream that catches up after every
    /// batch does not send a status update per batch; one that comes too soon is asked again
    /// when the gap is over (`caught_up_retry`), so the last batch of a burst is told too.
    fn tell_caught_up(&mut self, progress: &Progress) -> bool {
        const CAUGHT_UP_MIN_GAP: Duration = Duration::from_millis(20);
        let (sent_lsn, sent_at) = self.caught_up_sent;
        if !self.nothing_pending() || progress.flushed_lsn() <= sent_lsn {
            return false;
        }
        let due_at = sent_at + CAUGHT_UP_MIN_GAP;
        if tokio::time::Instant::now() < due_at {
            self.caught_up_retry = Some(due_at);
            return false;
        }
        self.caught_up_sent = (progress.flushed_lsn(), tokio::time::Instant::now());
        self.caught_up_retry = None;
        true
    }

    /// With nothing pending, the keepalive position is applied too: the sink publishes it for
    /// readers waiting on a commit no rule follows. Best effort: a full queue means work is
    /// pending, and its batch publishes a position of its own.
    fn publish_idle_position(&mut self, applied: Lsn) {
        let lsn = self.keepalive_lsn;
        if lsn <= applied.max(self.idle_published_lsn) {
            return;
        }
        if self.queue.try_send(SinkCommand::Idle(lsn)).is_ok() {
            self.idle_published_lsn = lsn;
        }
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
        // Room in the queue is the common case: no select! to set up per transaction.
        if let Ok(permit) = self.queue.try_reserve() {
            self.txns_committed.increment(1);
            permit.send(SinkCommand::Apply(txn));
            self.enqueued_lsn = end_lsn;
            return Ok(true);
        }
        loop {
            tokio::select! {
                biased;
                permit = self.queue.reserve() => {
                    match permit {
                        Ok(permit) => {
                            self.txns_committed.increment(1);
                            permit.send(SinkCommand::Apply(txn));
                        }
                        Err(_) => return Err(PipelineError::SinkStopped),
                    }
                    self.enqueued_lsn = end_lsn;
                    return Ok(true);
                }
                Ok(()) = self.sink.changed() => {
                    let applied = self.sink.borrow_and_update().applied_lsn;
                    self.confirm(progress, applied);
                    m::set_flushed_lsn(progress.flushed_lsn().as_u64());
                }
                _ = ticker.tick() => {
                    send_status(stream, progress, StatusReason::Interval).await?;
                    // Not enqueued, so not lost: the slot delivers it again after resuming.
                    if self.sink_outage_exceeded() {
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
        while self.sink.borrow().applied_lsn < target {
            tokio::select! {
                _ = shutdown.at_least(2) => {
                    tracing::warn!("second shutdown request; stopping without draining (unconfirmed work will be redelivered)");
                    break;
                }
                changed = self.sink.changed() => {
                    if changed.is_err() { break; }
                }
                _ = ticker.tick() => {
                    self.confirm(progress, self.sink.borrow().applied_lsn);
                    send_status(stream, progress, StatusReason::Interval).await?;
                }
            }
        }
        self.confirm(progress, self.sink.borrow().applied_lsn);
        Ok(())
    }
}

/// Why Postgres invalidated `slot`; `None` when that cannot be read (the caller then says what
/// the server said). Not a method: holding `&Streamer` across an await would require the
/// planner to be `Sync`.
async fn read_invalidation(params: &ConnectParams, slot: &str) -> Option<Invalidation> {
    let read = async {
        let client = catalog::connect(params).await?;
        Invalidation::read(&client, slot).await
    };
    match read.await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %display_chain(&e), "cannot read why the slot was invalidated");
            None
        }
    }
}

async fn send_status(
    stream: &mut ReplicationStream,
    progress: &Progress,
    reason: StatusReason,
) -> Result<(), PipelineError> {
    let update = progress.status_update();
    m::set_received_lsn(update.write_lsn.as_u64());
    tracing::trace!(write = %update.write_lsn, flush = %update.flush_lsn, reason = reason.as_str(), "status update");
    stream.send_status(&update).await?;
    m::status_sent(reason.as_str());
    Ok(())
}

/// `publication_names` takes a comma-separated list of (possibly quoted) identifiers.
fn quote_publication(name: &str) -> String {
    crate::pg::replication::quote_ident(name)
}
