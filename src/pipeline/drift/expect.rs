//! What a mirror must hold for a row: the row is planned as an INSERT by the stream's own mirror
//! planner (one planner per mirror, so each op is known to be that mirror's), and the write it
//! plans is read as the entry and index members Redis must have.

use std::sync::Arc;

use crate::config::MirrorFormat;
use crate::pg::pgoutput::TupleValue;
use crate::pipeline::rows;
use crate::plan::mirror::plan::{json_document, Field};
use crate::plan::mirror::{MirrorOp, MirrorPlan, MirrorPlanner, MirrorRule, RowWrite};
use crate::plan::{OldRow, Op, RelationInfo, RowChange};

use super::DriftError;

/// Clock difference between walsweep's host and Postgres that retention tolerates: a member
/// this close to the retention edge may already be trimmed.
const RETENTION_SLACK_SECONDS: i64 = 300;

/// A stored entry as walsweep writes it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Entry {
    /// The whole JSON document.
    Json(String),
    /// Field-value pairs (NULL columns have no field).
    Hash(Vec<(String, String)>),
}

/// What a key must hold.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Want {
    /// No row renders the key: nothing.
    NoRow,
    /// A row renders it, but a hash mirror of a row whose stored columns are all NULL keeps
    /// no entry.
    NoEntry,
    Entry(Entry),
}

/// An index member a row must have.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Member {
    /// Which `[[table.mirror.index]]`.
    pub(crate) index: usize,
    pub(crate) key: String,
    pub(crate) member: String,
    pub(crate) score: f64,
    /// Retention may have trimmed it: its absence is no drift.
    pub(crate) may_be_trimmed: bool,
}

/// A row's entry and members under one mirror.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Expected {
    pub(crate) key: String,
    pub(crate) want: Want,
    pub(crate) members: Vec<Member>,
}

/// What planning one row for one mirror gave.
pub(crate) enum Planned {
    /// A NULL in a key column: the row has no entry and no member.
    NoKey,
    Row(Expected),
    /// The planner could not plan it (a template names a column the table lacks): this mirror
    /// cannot be checked.
    Unplannable,
}

/// One mirror of a table, with its own planner.
pub(crate) struct MirrorCheck {
    pub(crate) rule: Arc<MirrorRule>,
    planner: MirrorPlanner,
}

/// A mirrored table: its shape (read at the first consistent point) and its mirrors.
pub(crate) struct TableMirrors {
    /// `schema.table`, as the config and the metrics name it.
    pub(crate) name: String,
    pub(crate) relation: RelationInfo,
    /// Quoted, for SQL.
    pub(crate) qualified: String,
    pub(crate) mirrors: Vec<MirrorCheck>,
}

impl TableMirrors {
    pub(crate) async fn load(
        client: &tokio_postgres::Client,
        name: &str,
        rules: Vec<Arc<MirrorRule>>,
    ) -> Result<TableMirrors, DriftError> {
        let relation = rows::relation_info(client, name)
            .await
            .map_err(|source| DriftError::Query {
                what: format!("describe {name}"),
                source,
            })?
            .ok_or_else(|| DriftError::NoTable {
                table: name.to_string(),
            })?;
        let mut mirrors = Vec::with_capacity(rules.len());
        for rule in rules {
            let planner = rows::planner_for(client, &relation, vec![rule.clone()])
                .await?
                .unobserved();
            mirrors.push(MirrorCheck { rule, planner });
        }
        Ok(TableMirrors {
            name: name.to_string(),
            qualified: rows::qualified(&relation),
            relation,
            mirrors,
        })
    }

    /// What mirror `mirror` must hold for a row read over SQL (`values` in column order).
    pub(crate) fn expect(
        &mut self,
        mirror: usize,
        values: &[TupleValue<'_>],
        now_unix_secs: i64,
    ) -> Planned {
        let Some(check) = self.mirrors.get_mut(mirror) else {
            return Planned::Unplannable;
        };
        let mut plan = MirrorPlan::default();
        check.planner.plan_change(
            &RowChange {
                relation: &self.relation,
                op: Op::Insert,
                old: OldRow::Absent,
                new: Some(values),
            },
            &mut plan,
        );
        match plan.ops() {
            [] => Planned::NoKey,
            [MirrorOp::Write(write)] => Planned::Row(expected(write, now_unix_secs)),
            _ => Planned::Unplannable,
        }
    }
}

fn expected(write: &RowWrite, now_unix_secs: i64) -> Expected {
    let want = match write.mode.format {
        MirrorFormat::Json => Want::Entry(Entry::Json(
            write
                .document
                .clone()
                .unwrap_or_else(|| json_document(&write.fields)),
        )),
        MirrorFormat::Hash => {
            let fields: Vec<(String, String)> = write
                .fields
                .iter()
                .filter_map(|(name, field)| match field {
                    Field::Value(v) => Some((name.to_string(), v.clone())),
                    Field::Null | Field::Keep => None,
                })
                .collect();
            if fields.is_empty() {
                Want::NoEntry
            } else {
                Want::Entry(Entry::Hash(fields))
            }
        }
    };
    let members = write
        .index_adds
        .iter()
        .map(|add| {
            // The sink trims [base, base + cutoff * units) with cutoff = the newest commit's
            // time minus the window, never later than now (give or take the slack).
            let may_be_trimmed = add.retention.is_some_and(|r| {
                let base = if r.base.is_finite() { r.base } else { 0.0 };
                let cutoff = now_unix_secs + RETENTION_SLACK_SECONDS - r.window_seconds as i64;
                add.score < base + cutoff as f64 * r.units_per_second
            });
            Member {
                index: add.index,
                key: add.key.clone(),
                member: add.member.clone(),
                score: add.score,
                may_be_trimmed,
            }
        })
        .collect();
    Expected {
        key: write.key.clone(),
        want,
        members,
    }
}
