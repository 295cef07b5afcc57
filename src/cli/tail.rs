//! `walsweep tail`: prints committed transactions as walsweep decodes them, with every column
//! value typed (see [`crate::value`] for the JSON forms). A debugging and verification tool: it
//! never touches Redis.
//!
//! - **Slot.** By default a `TEMPORARY` pgoutput slot is created on tail's own replication
//!   connection: it sees transactions that commit after it was created, Postgres drops it when
//!   the connection ends (also on a crash), and tail confirms what it printed so the slot holds
//!   no WAL while tail runs. The production slot is neither read nor moved. `--slot S` reads an
//!   existing pgoutput slot instead (it must not be in use, e.g. by `walsweep run`) and never
//!   confirms anything on it: the slot stays where it was, and its next reader gets the same
//!   changes again.
//! - **Publication.** Changes are read through the configured `[source] publication`, which must
//!   exist (`walsweep setup` creates it); tables outside it are not seen. `--table` narrows the
//!   output further (`schema.table`, or `table` for `public.table`).
//! - **Start.** `--from-lsn L` skips transactions that commit before `L`. No slot goes back
//!   before its confirmed position: a new temporary slot starts where it was created.
//! - **Stop.** Ctrl-C or SIGTERM stop cleanly (the stream is ended politely and the temporary
//!   slot is gone before tail returns); `--limit N` stops after N printed transactions; a closed
//!   output (`| head`) stops too.
//! - **Output.** `json`: one JSON object per transaction per line,
//!   `{"xid", "commit_lsn", "end_lsn", "commit_time", "changes": [...], "messages": [...]}`; each
//!   change has `table`, `op` (`insert`, `update`, `delete`, `truncate`), `identity` (the replica
//!   identity: `default`, `index`, `full`, `nothing`), `old` (update/delete: the columns the
//!   replica identity sends, as an object in column order), `new` (insert/update) and
//!   `unchanged_toast` (columns of `new` Postgres did not send because they are stored out of
//!   line and did not change; they are absent from `new`). `messages` are transactional
//!   `pg_logical_emit_message` calls (`prefix`, `content` as text, or `\x` hex when not UTF-8).
//!   Transactions with nothing to show (nothing published, or nothing matching `--table`) are
//!   neither printed nor counted. `pretty` prints the same, one line per change.
//!
//! Unlike the daemon, tail keeps each transaction's rows in memory until its commit (a
//! debugging tool; the daemon keeps only deduplicated effects): watching a transaction of
//! millions of rows costs memory in proportion.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::config::{Config, ConfigError, SourceConfig};
use crate::telemetry::log::display_chain;

use super::config_failure;
use crate::pg::catalog::{self, CatalogError};
use crate::pg::pgoutput::{ReplicaIdentity, TupleValue};
use crate::pg::replication::ReplicationError;
use crate::pg::Lsn;
use crate::pipeline::{self, shutdown_channel, PipelineError, ShutdownHandle, SlotMode};
use crate::plan::{Op, Plan, Planner, RelationInfo, RowChange};
use crate::sink::{Applied, Sink, SinkError};
use crate::stream::assembler::{AssembleError, CommittedTxn};
use crate::value::{decode_text, iso_utc, TypeRegistry, Value, ValueError};

/// How long tail waits for Postgres to drop its temporary slot after the connection ended.
const SLOT_GONE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which slot tail reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailSlot {
    /// A new temporary slot, dropped by Postgres when tail's connection ends (the default).
    Temporary,
    /// An existing pgoutput slot, read without confirming anything.
    Existing(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TailFormat {
    /// One JSON object per transaction per line.
    Json,
    /// Human-readable, one line per change.
    Pretty,
}

#[derive(Debug, Clone)]
pub struct TailOptions {
    /// Connection, publication, application name and status interval.
    pub source: SourceConfig,
    pub slot: TailSlot,
    /// Only changes of these tables (`schema.table` or `table` for `public.table`); empty: all.
    pub tables: Vec<String>,
    pub format: TailFormat,
    /// Skip transactions committing before this position.
    pub from_lsn: Option<Lsn>,
    /// Stop after this many printed transactions.
    pub limit: Option<u64>,
}

impl TailOptions {
    /// A temporary slot, every table, JSON, no limit.
    pub fn new(source: SourceConfig) -> Self {
        TailOptions {
            source,
            slot: TailSlot::Temporary,
            tables: Vec::new(),
            format: TailFormat::Json,
            from_lsn: None,
            limit: None,
        }
    }
}

/// Why tail stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailStop {
    Limit,
    /// Ctrl-C, SIGTERM, or the caller's stop future.
    Interrupted,
    /// The output was closed (e.g. `walsweep tail | head`).
    OutputClosed,
}

#[derive(Debug, Clone)]
pub struct TailSummary {
    pub slot: String,
    pub temporary: bool,
    /// Transactions printed.
    pub transactions: u64,
    /// Changes printed.
    pub changes: u64,
    /// End of the last printed transaction.
    pub last_end_lsn: Lsn,
    pub stop: TailStop,
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// Something to fix before tail can run; the message says what.
    #[error("{0}")]
    Setup(String),
    #[error("cannot decode the replication stream at {lsn}")]
    Assemble {
        lsn: Lsn,
        #[source]
        source: AssembleError,
    },
    #[error("column {column} of {table} (transaction {xid}, commit {commit_lsn})")]
    Value {
        table: String,
        column: String,
        xid: u32,
        commit_lsn: Lsn,
        #[source]
        source: Box<ValueError>,
    },
    #[error(transparent)]
    Pipeline(PipelineError),
    #[error("cannot write the output")]
    Output(#[source] io::Error),
}

/// Runs until `--limit`, Ctrl-C/SIGTERM or a closed output.
pub(crate) async fn run_tail(
    options: TailOptions,
    out: impl Write + Send + 'static,
) -> Result<TailSummary, TailError> {
    run_tail_until(options, out, interrupted()).await
}

/// Like `run_tail`, but stops when `stop` resolves instead of on signals.
pub async fn run_tail_until(
    options: TailOptions,
    out: impl Write + Send + 'static,
    stop: impl Future<Output = ()>,
) -> Result<TailSummary, TailError> {
    if options.limit == Some(0) {
        return Err(TailError::Setup("--limit must be at least 1".into()));
    }
    let params = options.source.connect_params()?;
    let client = catalog::connect(&params).await?;
    preflight(&client, &options).await?;

    let start_lsn = options.from_lsn.unwrap_or(Lsn::ZERO);
    let (slot, temporary) = match &options.slot {
        TailSlot::Temporary => {
            let name = temporary_slot_name();
            (SlotMode::Temporary { name, start_lsn }, true)
        }
        TailSlot::Existing(name) => (
            SlotMode::Borrowed {
                name: name.clone(),
                start_lsn,
            },
            false,
        ),
    };
    let slot_name = slot.name(&options.source).to_string();
    tracing::info!(slot = %slot_name, temporary, publication = %options.source.publication, start = %start_lsn, "tailing");
    let (handle, shutdown) = shutdown_channel();
    let printed = Arc::new(Mutex::new(Printed::default()));
    let sink = TailSink {
        out,
        format: options.format,
        limit: options.limit,
        filtered: !options.tables.is_empty(),
        printed: printed.clone(),
        shutdown: handle.clone(),
    };
    let planner = TailPlanner::new(&options.tables);
    let run = pipeline::run_on_slot(&options.source, slot, planner, sink, shutdown);
    tokio::pin!(run, stop);
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            result = &mut run => break result,
            () = &mut stop, if !stopping => {
                stopping = true;
                lock(&printed).stop.get_or_insert(TailStop::Interrupted);
                handle.request();
            }
        }
    };
    // The walsender exits a moment after the stream ends: wait for it, so the slot is gone
    // (temporary) or free for its next reader (--slot) when tail returns.
    wait_slot_released(&client, &slot_name, temporary).await;
    result.map_err(TailError::from)?;
    let printed = lock(&printed).clone();
    Ok(TailSummary {
        slot: slot_name,
        temporary,
        transactions: printed.transactions,
        changes: printed.changes,
        last_end_lsn: printed.last_end_lsn,
        stop: printed.stop.unwrap_or(TailStop::Interrupted),
    })
}

/// What tail printed so far, and why it is stopping; shared by the sink and the caller.
#[derive(Debug, Clone, Default)]
struct Printed {
    transactions: u64,
    changes: u64,
    last_end_lsn: Lsn,
    stop: Option<TailStop>,
}

fn lock(printed: &Mutex<Printed>) -> std::sync::MutexGuard<'_, Printed> {
    // A panic while holding it leaves plain counters behind: still worth reporting.
    printed
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl From<PipelineError> for TailError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Config(e) => TailError::Config(e),
            PipelineError::Replication(e) => TailError::Replication(e),
            PipelineError::Catalog(e) => TailError::Catalog(e),
            PipelineError::Assemble { lsn, source } => TailError::Assemble { lsn, source },
            // The sink's own failures are tail's errors, carried through the pipeline.
            PipelineError::Sink(sink) => match sink.source.downcast::<TailError>() {
                Ok(tail) => *tail,
                Err(source) => {
                    TailError::Pipeline(PipelineError::Sink(SinkError { source, ..sink }))
                }
            },
            other => TailError::Pipeline(other),
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM; never when the handlers cannot be installed.
pub(crate) async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                r = tokio::signal::ctrl_c() => if r.is_err() { std::future::pending::<()>().await },
                _ = term.recv() => {}
            }
            return;
        }
    }
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn temporary_slot_name() -> String {
    format!(
        "walsweep_tail_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// `table` means `public.table`.
pub(crate) fn qualify_table(name: &str) -> String {
    if name.contains('.') {
        name.to_string()
    } else {
        format!("public.{name}")
    }
}

/// What only a human can fix, said before any slot exists.
async fn preflight(client: &Client, options: &TailOptions) -> Result<(), TailError> {
    let wal_level = catalog::wal_level(client).await?;
    if wal_level != "logical" {
        return Err(TailError::Setup(format!(
            "wal_level is {wal_level:?}; logical decoding needs \
             ALTER SYSTEM SET wal_level = logical and a server restart"
        )));
    }
    let publication = &options.source.publication;
    if !catalog::publication_exists(client, publication).await? {
        return Err(TailError::Setup(format!(
            "publication {publication:?} (source.publication) does not exist; tail reads \
             changes through it: create it with `walsweep setup` or point source.publication \
             at an existing one"
        )));
    }
    if let TailSlot::Existing(slot) = &options.slot {
        match catalog::slot_state(client, slot).await? {
            None => {
                return Err(TailError::Setup(format!(
                    "replication slot {slot:?} does not exist; without --slot tail uses a \
                     temporary slot of its own"
                )))
            }
            Some(state) if state.plugin.as_deref() != Some("pgoutput") => {
                return Err(TailError::Setup(format!(
                    "replication slot {slot:?} uses plugin {:?}, not pgoutput",
                    state.plugin.unwrap_or_default()
                )))
            }
            Some(state) if state.active => {
                return Err(TailError::Setup(format!(
                    "replication slot {slot:?} is in use by process {} (walsweep run?); stop \
                     its reader or tail without --slot (a temporary slot)",
                    state
                        .active_pid
                        .map_or_else(|| "?".to_string(), |p| p.to_string())
                )))
            }
            Some(_) => {}
        }
    }
    if !options.tables.is_empty() {
        let rows = client
            .query(
                "SELECT schemaname || '.' || tablename FROM pg_publication_tables \
                 WHERE pubname = $1",
                &[publication],
            )
            .await
            .map_err(|source| CatalogError::Query {
                what: "reading pg_publication_tables",
                source,
            })?;
        let published: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        for table in &options.tables {
            let table = qualify_table(table);
            if !published.contains(&table) {
                tracing::warn!(%table, %publication, "--table is not in the publication; its changes will not show");
            }
        }
    }
    Ok(())
}

/// Polls until Postgres dropped the temporary slot, or no longer shows a borrowed one as
/// active (it does both when the walsender exits).
async fn wait_slot_released(client: &Client, slot: &str, temporary: bool) {
    let started = Instant::now();
    while started.elapsed() < SLOT_GONE_TIMEOUT {
        match catalog::slot_state(client, slot).await {
            Ok(None) => return,
            Ok(Some(state)) if !temporary && !state.active => return,
            Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => {
                tracing::debug!(error = %display_chain(&e), "cannot check the slot");
                return;
            }
        }
    }
    tracing::warn!(%slot, temporary, "the slot is still in use; Postgres releases it when the walsender exits");
}

/// A column value as the planner saw it, owned until the commit.
#[derive(Debug, Clone)]
enum Cell {
    Null,
    UnchangedToast,
    Text(Vec<u8>),
    /// Binary send format: never requested, so never expected.
    Binary,
}

impl Cell {
    fn from_tuple(v: &TupleValue<'_>) -> Cell {
        match v {
            TupleValue::Null => Cell::Null,
            TupleValue::UnchangedToast => Cell::UnchangedToast,
            TupleValue::Text(t) => Cell::Text(t.to_vec()),
            TupleValue::Binary(_) => Cell::Binary,
        }
    }
}

#[derive(Debug)]
struct RecordedChange {
    relation: Arc<RelationInfo>,
    op: Op,
    /// Per column: what is known of the old value (`None`: not sent).
    old: Option<Vec<Option<Cell>>>,
    new: Option<Vec<Cell>>,
}

#[derive(Debug)]
struct RecordedMessage {
    prefix: String,
    content: Vec<u8>,
}

/// Every change and message of a transaction, in order (tail shows rows, so it keeps them).
#[derive(Debug, Default)]
pub(crate) struct TailPlan {
    changes: Vec<RecordedChange>,
    messages: Vec<RecordedMessage>,
    /// The types the stream had resolved when these changes were planned (enums, domains).
    types: Arc<TypeRegistry>,
}

impl Plan for TailPlan {
    fn merge(&mut self, later: Self) {
        self.changes.extend(later.changes);
        self.messages.extend(later.messages);
        // Registries only grow: the later one knows every type the earlier one did.
        self.types = later.types;
    }

    fn effect_count(&self) -> usize {
        self.changes.len() + self.messages.len()
    }
}

/// Records the changes of the tables asked for.
pub(crate) struct TailPlanner {
    /// Qualified names; `None`: every table.
    tables: Option<HashSet<String>>,
    relations: HashMap<u32, Arc<RelationInfo>>,
    types: Arc<TypeRegistry>,
}

impl TailPlanner {
    pub(crate) fn new(tables: &[String]) -> Self {
        TailPlanner {
            tables: (!tables.is_empty()).then(|| tables.iter().map(|t| qualify_table(t)).collect()),
            relations: HashMap::new(),
            types: Arc::default(),
        }
    }

    fn wants(&self, relation: &RelationInfo) -> bool {
        self.tables
            .as_ref()
            .is_none_or(|t| t.contains(&relation.qualified_name))
    }

    fn shared(&mut self, relation: &RelationInfo) -> Arc<RelationInfo> {
        match self.relations.get(&relation.oid) {
            Some(r) if **r == *relation => r.clone(),
            _ => {
                let shared = Arc::new(relation.clone());
                self.relations.insert(relation.oid, shared.clone());
                shared
            }
        }
    }
}

impl Planner for TailPlanner {
    type Plan = TailPlan;

    fn plan_change(&mut self, change: &RowChange<'_>, plan: &mut TailPlan) {
        if !self.wants(change.relation) {
            return;
        }
        let relation = self.shared(change.relation);
        plan.types = self.types.clone();
        let columns = relation.columns.len();
        let old = (change.op != Op::Insert).then(|| {
            (0..columns)
                .map(|i| change.old_value(i).map(Cell::from_tuple))
                .collect()
        });
        let new = change
            .new
            .map(|row| row.iter().map(Cell::from_tuple).collect());
        plan.changes.push(RecordedChange {
            relation,
            op: change.op,
            old,
            new,
        });
    }

    fn plan_truncate(&mut self, relations: &[&RelationInfo], plan: &mut TailPlan) {
        for relation in relations {
            if self.wants(relation) {
                let relation = self.shared(relation);
                plan.changes.push(RecordedChange {
                    relation,
                    op: Op::Truncate,
                    old: None,
                    new: None,
                });
            }
        }
    }

    fn plan_message(&mut self, prefix: &str, content: &[u8], plan: &mut TailPlan) {
        plan.messages.push(RecordedMessage {
            prefix: prefix.to_string(),
            content: content.to_vec(),
        });
    }

    fn relation_changed(&mut self, relation: &RelationInfo) {
        self.relations
            .insert(relation.oid, Arc::new(relation.clone()));
    }

    fn register_types(&mut self, types: &TypeRegistry) {
        self.types = Arc::new(types.clone());
    }
}

/// A change with typed values, ready to print.
struct TypedChange<'a> {
    relation: &'a RelationInfo,
    op: Op,
    old: Option<Vec<(&'a str, Value)>>,
    new: Option<Vec<(&'a str, Value)>>,
    unchanged_toast: Vec<&'a str>,
}

fn identity_name(identity: ReplicaIdentity) -> &'static str {
    match identity {
        ReplicaIdentity::Default => "default",
        ReplicaIdentity::Nothing => "nothing",
        ReplicaIdentity::Full => "full",
        ReplicaIdentity::Index => "index",
    }
}

/// Where tail's transactions leave: typed, formatted and written to the output.
struct TailSink<W> {
    out: W,
    format: TailFormat,
    limit: Option<u64>,
    filtered: bool,
    printed: Arc<Mutex<Printed>>,
    /// Asked once the limit is reached or the output closed: the run drains and ends.
    shutdown: ShutdownHandle,
}

impl<W: Write + Send + 'static> Sink<TailPlan> for TailSink<W> {
    async fn apply(&mut self, batch: &[CommittedTxn<TailPlan>]) -> Result<Applied, SinkError> {
        for txn in batch {
            if lock(&self.printed).stop.is_some() {
                // Queued before the stop was asked for: handled, not shown.
                break;
            }
            match self.emit(txn) {
                Ok(()) => {}
                Err(TailError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                    self.stop(TailStop::OutputClosed);
                }
                Err(e) => {
                    return Err(SinkError {
                        operation: "print a transaction",
                        retryable: false,
                        source: Box::new(e),
                    })
                }
            }
            let printed = lock(&self.printed).transactions;
            if self.limit.is_some_and(|limit| printed >= limit) {
                self.stop(TailStop::Limit);
            }
        }
        Ok(Applied::whole(batch))
    }

    async fn reset(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

impl<W: Write> TailSink<W> {
    fn stop(&mut self, why: TailStop) {
        lock(&self.printed).stop.get_or_insert(why);
        self.shutdown.request();
    }

    /// Types the transaction's values and prints it, unless it has nothing to show.
    fn emit(&mut self, txn: &CommittedTxn<TailPlan>) -> Result<(), TailError> {
        let plan = &txn.plan;
        let nothing_to_show =
            plan.changes.is_empty() && (self.filtered || plan.messages.is_empty());
        if nothing_to_show {
            return Ok(());
        }
        let changes = plan
            .changes
            .iter()
            .map(|c| type_change(c, txn))
            .collect::<Result<Vec<_>, _>>()?;
        let text = match self.format {
            TailFormat::Json => json_txn(txn, &changes),
            TailFormat::Pretty => pretty_txn(txn, &changes),
        };
        self.out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(TailError::Output)?;
        let mut printed = lock(&self.printed);
        printed.transactions += 1;
        printed.changes += changes.len() as u64;
        printed.last_end_lsn = txn.end_lsn;
        Ok(())
    }
}

fn type_change<'c>(
    change: &'c RecordedChange,
    txn: &CommittedTxn<TailPlan>,
) -> Result<TypedChange<'c>, TailError> {
    let relation = &*change.relation;
    let value = |i: usize, cell: &Cell| -> Result<Value, TailError> {
        let column = &relation.columns[i];
        let fail = |source: ValueError| TailError::Value {
            table: relation.qualified_name.clone(),
            column: column.name.clone(),
            xid: txn.xid,
            commit_lsn: txn.commit_lsn,
            source: Box::new(source),
        };
        match cell {
            Cell::Null => Ok(Value::Null),
            Cell::Text(text) => decode_text(column.type_oid, text, &txn.plan.types).map_err(fail),
            Cell::Binary => Err(fail(ValueError {
                type_name: txn.plan.types.type_name(column.type_oid),
                text: "(binary)".into(),
                reason: "binary-format values are not read (tail asks for text)".into(),
            })),
            // Callers filter these out.
            Cell::UnchangedToast => Ok(Value::Null),
        }
    };
    let mut unchanged_toast = Vec::new();
    let old = match &change.old {
        None => None,
        Some(cells) => {
            let mut row = Vec::new();
            for (i, cell) in cells.iter().enumerate() {
                match cell {
                    None | Some(Cell::UnchangedToast) => {}
                    Some(cell) => row.push((relation.columns[i].name.as_str(), value(i, cell)?)),
                }
            }
            Some(row)
        }
    };
    let new = match &change.new {
        None => None,
        Some(cells) => {
            let mut row = Vec::with_capacity(cells.len());
            for (i, cell) in cells.iter().enumerate() {
                let name = relation.columns[i].name.as_str();
                match cell {
                    Cell::UnchangedToast => unchanged_toast.push(name),
                    cell => row.push((name, value(i, cell)?)),
                }
            }
            Some(row)
        }
    };
    Ok(TypedChange {
        relation,
        op: change.op,
        old,
        new,
        unchanged_toast,
    })
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn message_content(content: &[u8]) -> String {
    match std::str::from_utf8(content) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let mut hex = String::from("\\x");
            for b in content {
                let _ = write!(hex, "{b:02x}");
            }
            hex
        }
    }
}

/// `{"a":1,"b":"x"}` in column order (a JSON map would sort the keys).
fn json_row(out: &mut String, row: &[(&str, Value)]) {
    out.push('{');
    for (i, (name, value)) in row.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{}:{}", json_string(name), value.to_json());
    }
    out.push('}');
}

fn json_txn(txn: &CommittedTxn<TailPlan>, changes: &[TypedChange<'_>]) -> String {
    let mut out = String::with_capacity(256);
    let _ = write!(
        out,
        "{{\"xid\":{},\"commit_lsn\":\"{}\",\"end_lsn\":\"{}\",\"commit_time\":\"{}\",\"changes\":[",
        txn.xid,
        txn.commit_lsn,
        txn.end_lsn,
        iso_utc(txn.commit_time_unix_micros)
    );
    for (i, change) in changes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"table\":{},\"op\":\"{}\",\"identity\":\"{}\"",
            json_string(&change.relation.qualified_name),
            change.op.as_str(),
            identity_name(change.relation.replica_identity)
        );
        if let Some(old) = &change.old {
            out.push_str(",\"old\":");
            json_row(&mut out, old);
        }
        if let Some(new) = &change.new {
            out.push_str(",\"new\":");
            json_row(&mut out, new);
            out.push_str(",\"unchanged_toast\":[");
            for (j, name) in change.unchanged_toast.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                out.push_str(&json_string(name));
            }
            out.push(']');
        }
        out.push('}');
    }
    out.push_str("],\"messages\":[");
    for (i, message) in txn.plan.messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"prefix\":{},\"content\":{}}}",
            json_string(&message.prefix),
            json_string(&message_content(&message.content))
        );
    }
    out.push_str("]}\n");
    out
}

fn pretty_row(out: &mut String, label: &str, row: &[(&str, Value)], unchanged: &[&str]) {
    let _ = write!(out, "    {label}:");
    for (name, value) in row {
        let _ = write!(out, " {name}={}", value.to_json());
    }
    for name in unchanged {
        let _ = write!(out, " {name}=<unchanged TOAST>");
    }
    out.push('\n');
}

fn pretty_txn(txn: &CommittedTxn<TailPlan>, changes: &[TypedChange<'_>]) -> String {
    let mut out = String::with_capacity(256);
    let _ = writeln!(
        out,
        "xid {} committed {} at {} (end {}), {} change{}",
        txn.xid,
        iso_utc(txn.commit_time_unix_micros),
        txn.commit_lsn,
        txn.end_lsn,
        changes.len(),
        if changes.len() == 1 { "" } else { "s" }
    );
    for change in changes {
        let _ = writeln!(
            out,
            "  {} {} (replica identity {})",
            change.op.as_str(),
            change.relation.qualified_name,
            identity_name(change.relation.replica_identity)
        );
        if let Some(old) = &change.old {
            pretty_row(&mut out, "old", old, &[]);
        }
        if let Some(new) = &change.new {
            pretty_row(&mut out, "new", new, &change.unchanged_toast);
        }
    }
    for message in &txn.plan.messages {
        let _ = writeln!(
            out,
            "  message {}: {}",
            message.prefix,
            message_content(&message.content)
        );
    }
    out.push('\n');
    out
}

/// `walsweep tail`. Only `[source]` is read: tail needs no valid rules.
pub async fn command(
    path: &Path,
    slot: Option<String>,
    tables: Vec<String>,
    format: TailFormat,
    from_lsn: Option<Lsn>,
    limit: Option<u64>,
) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    let options = TailOptions {
        source: config.source,
        slot: slot.map_or(TailSlot::Temporary, TailSlot::Existing),
        tables,
        format,
        from_lsn,
        limit,
    };
    match run_tail(options, std::io::stdout()).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(TailError::Config(e)) => config_failure(&e),
        Err(e) => {
            eprintln!("walsweep tail: {}", display_chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_default_to_public() {
        assert_eq!(qualify_table("items"), "public.items");
        assert_eq!(qualify_table("app.items"), "app.items");
    }

    #[test]
    fn message_content_is_text_or_hex() {
        assert_eq!(message_content(b"{\"keys\":[]}"), "{\"keys\":[]}");
        assert_eq!(message_content(&[0xff, 0x00]), "\\xff00");
    }
}
