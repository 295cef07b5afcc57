//! Runs the real pipeline against a private Postgres with a recording planner and a sink the
//! test controls (hold confirmations, fail on demand), and reads slot state back.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use walsweep::config::SourceConfig;
use walsweep::pg::pgoutput::TupleValue;
use walsweep::pg::Lsn;
use walsweep::pipeline::{self, PipelineError, RunSummary, ShutdownHandle};
use walsweep::plan::{Op, Plan, Planner, RelationInfo, RowChange};
use walsweep::sink::{Applied, Sink, SinkError};
use walsweep::stream::assembler::CommittedTxn;

pub use crate::support::daemon::{wait_for, wait_streaming};
use crate::support::Postgres;

/// A column value as the test sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V {
    Null,
    Unchanged,
    Unknown,
    T(String),
}

pub fn t(s: &str) -> V {
    V::T(s.to_string())
}

#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: String,
    pub op: Op,
    pub columns: Vec<String>,
    pub old: Option<Vec<V>>,
    pub new: Option<Vec<V>>,
}

impl Change {
    pub fn new_value(&self, column: &str) -> Option<&V> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.new.as_ref()?.get(i)
    }
    pub fn old_value(&self, column: &str) -> Option<&V> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.old.as_ref()?.get(i)
    }
}

/// Keeps every change in order. Tests only: production plans deduplicate.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recorded {
    pub changes: Vec<Change>,
    pub messages: Vec<(String, String)>,
}

impl Plan for Recorded {
    fn merge(&mut self, later: Self) {
        self.changes.extend(later.changes);
        self.messages.extend(later.messages);
    }
    fn effect_count(&self) -> usize {
        self.changes.len() + self.messages.len()
    }
}

fn value(v: &TupleValue<'_>) -> V {
    match v {
        TupleValue::Null => V::Null,
        TupleValue::UnchangedToast => V::Unchanged,
        TupleValue::Text(b) | TupleValue::Binary(b) => V::T(String::from_utf8_lossy(b).into()),
    }
}

#[derive(Default)]
pub struct RecordingPlanner;

impl Planner for RecordingPlanner {
    type Plan = Recorded;

    fn plan_change(&mut self, change: &RowChange<'_>, plan: &mut Recorded) {
        let n = change.relation.columns.len();
        let has_old = change.op != Op::Insert;
        plan.changes.push(Change {
            table: change.relation.qualified_name.clone(),
            op: change.op,
            columns: change
                .relation
                .columns
                .iter()
                .map(|c| c.name.clone())
                .collect(),
            old: has_old.then(|| {
                (0..n)
                    .map(|i| change.old_value(i).map(value).unwrap_or(V::Unknown))
                    .collect()
            }),
            new: change.new.map(|row| row.iter().map(value).collect()),
        });
    }

    fn plan_truncate(&mut self, relations: &[&RelationInfo], plan: &mut Recorded) {
        for r in relations {
            plan.changes.push(Change {
                table: r.qualified_name.clone(),
                op: Op::Truncate,
                columns: vec![],
                old: None,
                new: None,
            });
        }
    }

    fn plan_message(&mut self, prefix: &str, content: &[u8], plan: &mut Recorded) {
        plan.messages
            .push((prefix.into(), String::from_utf8_lossy(content).into()));
    }
}

/// Forwards applied transactions to the test; can be held (apply blocks) or made to fail.
pub struct TestSink {
    applied: mpsc::UnboundedSender<CommittedTxn<Recorded>>,
    hold: watch::Receiver<bool>,
    failures_left: Arc<AtomicU32>,
    resets: Arc<AtomicU32>,
}

impl Sink<Recorded> for TestSink {
    async fn reset(&mut self) -> Result<(), SinkError> {
        self.resets.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn apply(&mut self, batch: &[CommittedTxn<Recorded>]) -> Result<Applied, SinkError> {
        let _ = self.hold.wait_for(|held| !*held).await;
        if self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SinkError {
                operation: "apply a test batch",
                retryable: true,
                source: "injected failure".into(),
            });
        }
        for txn in batch {
            let _ = self.applied.send(txn.clone());
        }
        Ok(Applied::whole(batch))
    }
}

pub struct Running {
    pub shutdown: ShutdownHandle,
    pub task: JoinHandle<Result<RunSummary, PipelineError>>,
    pub applied: mpsc::UnboundedReceiver<CommittedTxn<Recorded>>,
    pub hold: watch::Sender<bool>,
    pub failures: Arc<AtomicU32>,
    /// How many times the pipeline asked the sink to clear everything.
    pub resets: Arc<AtomicU32>,
}

pub fn source(pg: &Postgres, db: &str, slot: &str) -> SourceConfig {
    let mut s = SourceConfig::new(pg.url(db));
    s.slot = slot.into();
    s.publication = "pub".into();
    s.status_interval_ms = 200;
    s.reconnect_min_ms = 50;
    s.reconnect_max_ms = 500;
    s.release_slot_after_sink_outage_ms = 1_000;
    s
}

pub fn start(source: SourceConfig, tables: &[&str]) -> Running {
    let (applied_tx, applied) = mpsc::unbounded_channel();
    let (hold, hold_rx) = watch::channel(false);
    let failures = Arc::new(AtomicU32::new(0));
    let resets = Arc::new(AtomicU32::new(0));
    let sink = TestSink {
        applied: applied_tx,
        hold: hold_rx,
        failures_left: failures.clone(),
        resets: resets.clone(),
    };
    let (shutdown, signal) = pipeline::shutdown_channel();
    let tables: Vec<String> = tables.iter().map(|s| s.to_string()).collect();
    let task = tokio::spawn(async move {
        pipeline::run(&source, &tables, RecordingPlanner, sink, signal).await
    });
    Running {
        shutdown,
        task,
        applied,
        hold,
        failures,
        resets,
    }
}

impl Running {
    /// The next applied transaction, or a panic after `secs`.
    pub async fn next_txn(&mut self, secs: u64) -> CommittedTxn<Recorded> {
        match tokio::time::timeout(Duration::from_secs(secs), self.applied.recv()).await {
            Ok(Some(txn)) => txn,
            Ok(None) => panic!("pipeline stopped: {:?}", self.task.is_finished()),
            Err(_) => panic!("no transaction applied within {secs}s"),
        }
    }

    /// Applied transactions until one whose plan satisfies `done`, collected in order.
    pub async fn txns_until(
        &mut self,
        secs: u64,
        mut done: impl FnMut(&CommittedTxn<Recorded>) -> bool,
    ) -> Vec<CommittedTxn<Recorded>> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.applied.recv()).await {
                Ok(Some(txn)) => {
                    let stop = done(&txn);
                    out.push(txn);
                    if stop {
                        return out;
                    }
                }
                Ok(None) => panic!("pipeline stopped after {} transactions", out.len()),
                Err(_) => panic!("condition not met within {secs}s; got {out:#?}"),
            }
        }
    }

    /// Asks for a clean stop and waits for it.
    pub async fn stop(self) -> RunSummary {
        self.shutdown.request();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("pipeline did not stop within 30s")
            .expect("pipeline task panicked")
            .expect("pipeline returned an error")
    }
}

pub async fn slot_confirmed_flush(client: &tokio_postgres::Client, slot: &str) -> Lsn {
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot query");
    row.get::<_, Option<String>>(0)
        .map(|t| t.parse().expect("lsn"))
        .unwrap_or_default()
}

pub async fn current_wal_lsn(client: &tokio_postgres::Client) -> Lsn {
    let row = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("wal lsn");
    row.get::<_, String>(0).parse().expect("lsn")
}
