//! The transaction assembler: feeds pgoutput messages, in stream order, to a `Planner` and
//! hands out committed transactions, in commit order, each carrying its deduplicated plan.
//!
//! Nothing leaves here before its commit is decoded. A streamed (in-progress) transaction is
//! kept as plan segments per subtransaction (`streamed`), so a `StreamAbort` of a
//! subtransaction drops just its part. Rows are never kept: only what the planner folds them
//! into.

use std::collections::HashMap;

use crate::pg::pgoutput::{self, DecodeError, Decoder, PgOutput, TupleData, TupleValue};
use crate::pg::Lsn;
use crate::plan::{OldRow, Op, Plan, Planner, RelationInfo, RowChange};
use crate::stream::streamed::StreamedTxn;
use crate::telemetry::metrics::SKIP_UNDECODABLE_RELATION;

/// A transaction whose commit was decoded, ready for the sink.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedTxn<P> {
    pub(crate) xid: u32,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm once the plan is applied.
    pub end_lsn: Lsn,
    /// Commit time in Unix microseconds.
    pub(crate) commit_time_unix_micros: i64,
    /// Row changes that went into the plan (for metrics).
    pub change_count: u64,
    pub plan: P,
}

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("cannot decode pgoutput message")]
    Decode(#[from] DecodeError),
    #[error("{message} for relation oid {oid} arrived before its Relation message")]
    UnknownRelation { message: &'static str, oid: u32 },
    #[error("{message} arrived outside a transaction")]
    OutsideTransaction { message: &'static str },
    #[error("{message} for xid {xid}, which has no streamed transaction open")]
    UnknownStream { message: &'static str, xid: u32 },
    #[error("{message} for prepared transaction {gid:?}, which was never prepared on this stream")]
    UnknownPrepared { message: &'static str, gid: String },
    #[error(
        "relation {relation} (oid {oid}) is named in the config, but a name in its Relation \
         message is not valid UTF-8 (the database encoding lets names hold any bytes, e.g. \
         SQL_ASCII): rename the table or column to a UTF-8 name, or remove it from the config"
    )]
    UndecodableRelation {
        relation: String,
        oid: u32,
        /// Boxed: a rare error that should not grow every `Result` the assembler returns.
        #[source]
        source: Box<DecodeError>,
    },
    #[error("{message}: tuple has {got} columns, relation {relation} has {expected}")]
    ColumnCount {
        message: &'static str,
        relation: String,
        got: usize,
        expected: usize,
    },
}

/// A transaction between Begin and Commit.
struct OpenTxn<P> {
    xid: u32,
    plan: P,
    change_count: u64,
}

impl<P: Plan> OpenTxn<P> {
    fn begin(xid: u32) -> Self {
        OpenTxn {
            xid,
            plan: P::default(),
            change_count: 0,
        }
    }

    /// A streamed transaction's segments merged in order, as one transaction.
    fn streamed(xid: u32, txn: StreamedTxn<P>) -> Self {
        let (plan, change_count) = txn.into_plan();
        OpenTxn {
            xid,
            plan,
            change_count,
        }
    }

    /// The committed transaction; Commit, StreamCommit and CommitPrepared all end here.
    fn commit(self, commit_lsn: Lsn, end_lsn: Lsn, commit_time: i64) -> CommittedTxn<P> {
        CommittedTxn {
            xid: self.xid,
            commit_lsn,
            end_lsn,
            commit_time_unix_micros: pgoutput::pg_time_to_unix_micros(commit_time),
            change_count: self.change_count,
            plan: self.plan,
        }
    }
}

pub struct Assembler<PL: Planner> {
    planner: PL,
    decoder: Decoder,
    /// `walsweep_changes_decoded_total{table, op}` handles, made once per relation and op so
    /// counting a row is one atomic add.
    decoded: HashMap<(u32, Op), metrics::Counter>,
    relations: HashMap<u32, RelationInfo>,
    current: Option<OpenTxn<PL::Plan>>,
    /// Top-level xid of the stream block we are in (between StreamStart and StreamStop).
    stream_xid: Option<u32>,
    streamed: HashMap<u32, StreamedTxn<PL::Plan>>,
    prepared: HashMap<String, OpenTxn<PL::Plan>>,
    /// Type OIDs of the last Relation message's columns that are not built in: the caller
    /// looks them up (`take_new_type_oids`) before feeding the next message.
    new_type_oids: Vec<u32>,
}

/// Where a change's effects go.
enum Target {
    Current,
    Streamed { top_xid: u32, subxid: u32 },
}

impl<PL: Planner> Assembler<PL> {
    pub fn new(planner: PL) -> Self {
        Assembler {
            planner,
            decoder: Decoder::new(),
            decoded: HashMap::new(),
            relations: HashMap::new(),
            current: None,
            stream_xid: None,
            streamed: HashMap::new(),
            prepared: HashMap::new(),
            new_type_oids: Vec::new(),
        }
    }

    /// Non-built-in column types of the Relation message just fed, if it was one.
    pub(crate) fn take_new_type_oids(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.new_type_oids)
    }

    /// Hands looked-up types to the planner.
    pub(crate) fn register_types(&mut self, types: &crate::value::TypeRegistry) {
        self.planner.register_types(types);
    }

    /// Nothing is half-received: no open, streamed or prepared transaction. Only then may a
    /// keepalive's position be confirmed without a commit behind it.
    pub(crate) fn is_idle(&self) -> bool {
        self.current.is_none() && self.streamed.is_empty() && self.prepared.is_empty()
    }

    /// Forgets everything half-received; after a reconnect the server sends it again
    /// (including Relation messages).
    pub(crate) fn reset(&mut self) {
        self.decoder = Decoder::new();
        self.relations.clear();
        self.current = None;
        self.stream_xid = None;
        self.streamed.clear();
        self.prepared.clear();
    }

    /// Feeds one pgoutput message (the payload of one XLogData).
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<CommittedTxn<PL::Plan>>, AssembleError> {
        let message = self.decoder.decode(data)?;
        match message {
            PgOutput::Begin(begin) => {
                self.current = Some(OpenTxn::begin(begin.xid));
                Ok(None)
            }
            PgOutput::Commit(commit) => {
                let txn = self
                    .current
                    .take()
                    .ok_or(AssembleError::OutsideTransaction { message: "Commit" })?;
                Ok(Some(txn.commit(
                    commit.commit_lsn,
                    commit.end_lsn,
                    commit.commit_time,
                )))
            }
            PgOutput::Origin(_) | PgOutput::Type(_) => Ok(None),
            PgOutput::Relation(rel) => {
                let info = RelationInfo::from_message(&rel);
                // A renamed table gets fresh counter labels.
                self.decoded.retain(|(oid, _), _| *oid != info.oid);
                if let Some(error) = &info.undecodable {
                    return self.undecodable_relation(info.clone(), error.clone());
                }
                self.planner.relation_changed(&info);
                self.new_type_oids = info
                    .columns
                    .iter()
                    .map(|c| c.type_oid)
                    .filter(|oid| !crate::value::is_builtin(*oid))
                    .collect();
                self.relations.insert(info.oid, info);
                Ok(None)
            }
            PgOutput::Insert(insert) => {
                let target = self.target("Insert", insert.xid)?;
                self.change(
                    target,
                    "Insert",
                    insert.relation_oid,
                    Op::Insert,
                    None,
                    None,
                    Some(&insert.new),
                )
            }
            PgOutput::Update(update) => {
                let target = self.target("Update", update.xid)?;
                self.change(
                    target,
                    "Update",
                    update.relation_oid,
                    Op::Update,
                    update.key.as_ref(),
                    update.old.as_ref(),
                    Some(&update.new),
                )
            }
            PgOutput::Delete(delete) => {
                let target = self.target("Delete", delete.xid)?;
                self.change(
                    target,
                    "Delete",
                    delete.relation_oid,
                    Op::Delete,
                    delete.key.as_ref(),
                    delete.old.as_ref(),
                    None,
                )
            }
            PgOutput::Truncate(truncate) => {
                let target = self.target("Truncate", truncate.xid)?;
                let mut relations = Vec::with_capacity(truncate.relation_oids.len());
                for oid in &truncate.relation_oids {
                    let relation =
                        self.relations
                            .get(oid)
                            .ok_or(AssembleError::UnknownRelation {
                                message: "Truncate",
                                oid: *oid,
                            })?;
                    if relation.undecodable.is_some() {
                        crate::telemetry::metrics::change_skipped(SKIP_UNDECODABLE_RELATION);
                        continue;
                    }
                    self.decoded
                        .entry((*oid, Op::Truncate))
                        .or_insert_with(|| {
                            crate::telemetry::metrics::changes_decoded(
                                &relation.qualified_name,
                                Op::Truncate.as_str(),
                            )
                        })
                        .increment(1);
                    relations.push(relation);
                }
                if relations.is_empty() {
                    return Ok(None);
                }
                let (plan, count) =
                    plan_slot(&mut self.current, &mut self.streamed, target, "Truncate")?;
                *count += 1;
                self.planner.plan_truncate(&relations, plan);
                Ok(None)
            }
            PgOutput::Message(message) => {
                if !message.transactional {
                    // Non-transactional messages have no commit to wait for and carry no
                    // effects walsweep acts on; hints must be transactional.
                    tracing::debug!(
                        prefix = message.prefix,
                        "ignoring non-transactional logical message"
                    );
                    return Ok(None);
                }
                let target = self.target("Message", message.xid)?;
                let (plan, _) =
                    plan_slot(&mut self.current, &mut self.streamed, target, "Message")?;
                self.planner
                    .plan_message(message.prefix, message.content, plan);
                Ok(None)
            }
            PgOutput::StreamStart(start) => {
                self.stream_xid = Some(start.xid);
                self.streamed
                    .entry(start.xid)
                    .or_insert_with(|| StreamedTxn::new(start.xid));
                Ok(None)
            }
            PgOutput::StreamStop => {
                self.stream_xid = None;
                Ok(None)
            }
            PgOutput::StreamCommit(commit) => {
                let txn =
                    self.streamed
                        .remove(&commit.xid)
                        .ok_or(AssembleError::UnknownStream {
                            message: "StreamCommit",
                            xid: commit.xid,
                        })?;
                let txn = OpenTxn::streamed(commit.xid, txn);
                Ok(Some(txn.commit(
                    commit.commit_lsn,
                    commit.end_lsn,
                    commit.commit_time,
                )))
            }
            PgOutput::StreamAbort(abort) => {
                if abort.xid == abort.subxid {
                    self.streamed.remove(&abort.xid);
                } else if let Some(txn) = self.streamed.get_mut(&abort.xid) {
                    txn.abort(abort.subxid);
                }
                Ok(None)
            }
            PgOutput::BeginPrepare(begin) => {
                self.current = Some(OpenTxn::begin(begin.xid));
                Ok(None)
            }
            PgOutput::Prepare(prepare) => {
                let txn = self
                    .current
                    .take()
                    .ok_or(AssembleError::OutsideTransaction { message: "Prepare" })?;
                self.prepared.insert(prepare.gid.to_string(), txn);
                Ok(None)
            }
            PgOutput::StreamPrepare(prepare) => {
                let txn =
                    self.streamed
                        .remove(&prepare.xid)
                        .ok_or(AssembleError::UnknownStream {
                            message: "StreamPrepare",
                            xid: prepare.xid,
                        })?;
                self.prepared
                    .insert(prepare.gid.to_string(), OpenTxn::streamed(prepare.xid, txn));
                Ok(None)
            }
            PgOutput::CommitPrepared(commit) => {
                let txn = self.prepared.remove(commit.gid).ok_or_else(|| {
                    AssembleError::UnknownPrepared {
                        message: "CommitPrepared",
                        gid: commit.gid.to_string(),
                    }
                })?;
                Ok(Some(txn.commit(
                    commit.commit_lsn,
                    commit.end_lsn,
                    commit.commit_time,
                )))
            }
            PgOutput::RollbackPrepared(rollback) => {
                self.prepared.remove(rollback.gid);
                Ok(None)
            }
        }
    }

    /// A relation with a name that is not UTF-8: remembered so its changes are skipped, unless
    /// a planner needs it, since skipping would then miss invalidations.
    fn undecodable_relation(
        &mut self,
        info: RelationInfo,
        error: DecodeError,
    ) -> Result<Option<CommittedTxn<PL::Plan>>, AssembleError> {
        if self.planner.needs(&info) {
            return Err(AssembleError::UndecodableRelation {
                relation: info.qualified_name,
                oid: info.oid,
                source: Box::new(error),
            });
        }
        tracing::warn!(
            relation = %info.qualified_name,
            oid = info.oid,
            error = %error,
            "skipping changes to a relation whose name is not valid UTF-8; no rule names it"
        );
        self.relations.insert(info.oid, info);
        Ok(None)
    }

    fn target(&self, message: &'static str, xid: Option<u32>) -> Result<Target, AssembleError> {
        match (self.stream_xid, xid) {
            (Some(top_xid), Some(subxid)) => Ok(Target::Streamed { top_xid, subxid }),
            (Some(top_xid), None) => Ok(Target::Streamed {
                top_xid,
                subxid: top_xid,
            }),
            (None, _) if self.current.is_some() => Ok(Target::Current),
            (None, _) => Err(AssembleError::OutsideTransaction { message }),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn change(
        &mut self,
        target: Target,
        message: &'static str,
        oid: u32,
        op: Op,
        key: Option<&TupleData<'_>>,
        old: Option<&TupleData<'_>>,
        new: Option<&TupleData<'_>>,
    ) -> Result<Option<CommittedTxn<PL::Plan>>, AssembleError> {
        let relation = self
            .relations
            .get(&oid)
            .ok_or(AssembleError::UnknownRelation { message, oid })?;
        if relation.undecodable.is_some() {
            crate::telemetry::metrics::change_skipped(SKIP_UNDECODABLE_RELATION);
            return Ok(None);
        }
        self.decoded
            .entry((oid, op))
            .or_insert_with(|| {
                crate::telemetry::metrics::changes_decoded(&relation.qualified_name, op.as_str())
            })
            .increment(1);
        let expected = relation.columns.len();
        for tuple in [key, old, new].into_iter().flatten() {
            if tuple.columns.len() != expected {
                return Err(AssembleError::ColumnCount {
                    message,
                    relation: relation.qualified_name.clone(),
                    got: tuple.columns.len(),
                    expected,
                });
            }
        }
        let old_row = match (old, key) {
            (Some(full), _) => OldRow::Full(&full.columns),
            (None, Some(key)) => OldRow::Key(&key.columns),
            (None, None) => OldRow::Absent,
        };
        // Unchanged TOAST in the new row: the full old row has the value, so use it.
        let merged_new: Option<Vec<TupleValue<'_>>> = match (new, old) {
            (Some(new), Some(old))
                if new
                    .columns
                    .iter()
                    .any(|v| matches!(v, TupleValue::UnchangedToast)) =>
            {
                Some(
                    new.columns
                        .iter()
                        .zip(&old.columns)
                        .map(|(n, o)| match n {
                            TupleValue::UnchangedToast => o.clone(),
                            other => other.clone(),
                        })
                        .collect(),
                )
            }
            _ => None,
        };
        let new_values = merged_new.as_deref().or(new.map(|n| n.columns.as_slice()));
        let change = RowChange {
            relation,
            op,
            old: old_row,
            new: new_values,
        };
        let (plan, count) = plan_slot(&mut self.current, &mut self.streamed, target, message)?;
        *count += 1;
        self.planner.plan_change(&change, plan);
        Ok(None)
    }
}

/// The plan (and change counter) a change folds into. A free function so the borrow of the
/// relation cache and of the planner can coexist with it.
fn plan_slot<'s, P: Plan>(
    current: &'s mut Option<OpenTxn<P>>,
    streamed: &'s mut HashMap<u32, StreamedTxn<P>>,
    target: Target,
    message: &'static str,
) -> Result<(&'s mut P, &'s mut u64), AssembleError> {
    match target {
        Target::Current => {
            let txn = current
                .as_mut()
                .ok_or(AssembleError::OutsideTransaction { message })?;
            Ok((&mut txn.plan, &mut txn.change_count))
        }
        Target::Streamed { top_xid, subxid } => {
            let txn = streamed
                .get_mut(&top_xid)
                .ok_or(AssembleError::UnknownStream {
                    message,
                    xid: top_xid,
                })?;
            Ok(txn.plan_for(subxid))
        }
    }
}
