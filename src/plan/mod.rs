//! The planning step between the transaction assembler and the sink.
//!
//! A `Planner` turns each decoded row change into effects folded into a per-transaction `Plan`.
//! Plans deduplicate, so what a transaction keeps in memory grows with its distinct effects,
//! never with its rows. Rules (templates, scopes, ...) are one planner; `touched` is a small
//! one that records touched primary keys, used by tests and benchmarks.

pub(crate) mod broadcast;
pub(crate) mod mirror;
pub(crate) mod relation;
pub mod rules;
pub mod touched;
pub mod txn;

pub use relation::{ColumnInfo, RelationInfo};

use crate::pg::pgoutput::TupleValue;
use crate::value::TypeRegistry;

/// Which kind of row change this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    /// Lowercase name, used as a metric label and in config (`ops = ["update"]`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// The before image of a changed row, as far as the replica identity lets Postgres send it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum OldRow<'a> {
    /// Nothing was sent: an INSERT, or an UPDATE that kept the identity columns unchanged.
    Absent,
    /// Only identity (key) columns are meaningful; other positions are placeholders.
    Key(&'a [TupleValue<'a>]),
    /// REPLICA IDENTITY FULL: every column.
    Full(&'a [TupleValue<'a>]),
}

/// One committed-to-be row change, borrowed from the message it was decoded from.
#[derive(Debug)]
pub struct RowChange<'a> {
    pub relation: &'a RelationInfo,
    pub op: Op,
    pub(crate) old: OldRow<'a>,
    /// The after image for INSERT and UPDATE. Unchanged TOAST columns were filled in from a
    /// full old row when there is one; otherwise they stay `TupleValue::UnchangedToast`.
    pub new: Option<&'a [TupleValue<'a>]>,
}

impl<'a> RowChange<'a> {
    /// The old value of column `index` when it is known: from a full old row, from the key
    /// tuple for identity columns, or, for an UPDATE that sent no old tuple, from the new row
    /// for identity columns (Postgres omits the old key exactly when it did not change).
    pub fn old_value(&self, index: usize) -> Option<&'a TupleValue<'a>> {
        let is_key = self.relation.columns.get(index).is_some_and(|c| c.is_key);
        match self.old {
            OldRow::Full(values) => values.get(index),
            OldRow::Key(values) if is_key => values.get(index),
            OldRow::Absent if is_key && self.op == Op::Update => {
                self.new.and_then(|n| n.get(index))
            }
            _ => None,
        }
    }

    pub(crate) fn new_value(&self, index: usize) -> Option<&'a TupleValue<'a>> {
        self.new.and_then(|n| n.get(index))
    }

    /// Whether column `index` may have changed in this UPDATE. Unknown old values count as
    /// changed, unchanged TOAST counts as unchanged.
    pub(crate) fn column_changed(&self, index: usize) -> bool {
        match self.new_value(index) {
            Some(TupleValue::UnchangedToast) => false,
            new => match self.old_value(index) {
                Some(old) => Some(old) != new,
                None => true,
            },
        }
    }
}

/// Effects of (part of) a transaction, deduplicated.
pub trait Plan: Default + Send + Sync + 'static {
    /// Folds a later plan into this one (a later subtransaction segment, or a later transaction
    /// of the same sink batch). Order matters for planners whose effects are not idempotent
    /// sets: `later` wins.
    fn merge(&mut self, later: Self);

    /// How many distinct effects the plan holds (memory and batch-size accounting).
    fn effect_count(&self) -> usize;

    /// Whether merging `later` into this plan would leave it unchanged: every effect of
    /// `later` is here already. A streamed transaction then drops `later`'s subtransaction
    /// segment, which keeps a savepoint per row from holding a plan per row.
    ///
    /// Say yes only for parts that are sets (order and repetition mean nothing): the answer is
    /// also asked of a plan holding just some earlier segments' `absorbing_part`s. `false` is
    /// always safe.
    fn absorbs(&self, _later: &Self) -> bool {
        false
    }

    /// A copy of the parts `absorbs` looks at (the rest left empty).
    fn absorbing_part(&self) -> Self {
        Self::default()
    }
}

/// Turns row changes into effects.
pub trait Planner: Send + 'static {
    type Plan: Plan;

    fn plan_change(&mut self, change: &RowChange<'_>, plan: &mut Self::Plan);

    fn plan_truncate(&mut self, relations: &[&RelationInfo], plan: &mut Self::Plan);

    /// A transactional `pg_logical_emit_message` inside the transaction.
    fn plan_message(&mut self, _prefix: &str, _content: &[u8], _plan: &mut Self::Plan) {}

    /// A Relation message arrived (new table, or a new shape after ALTER TABLE): planners that
    /// cache per-relation lookups rebuild them here, once per relation, not once per row.
    fn relation_changed(&mut self, _relation: &RelationInfo) {}

    /// Whether this planner could draw any effect from the relation. Only asked about a
    /// relation whose names cannot be decoded: one nobody needs is skipped, one somebody needs
    /// stops the stream. Planners that take every table keep the default.
    fn needs(&self, _relation: &RelationInfo) -> bool {
        true
    }

    /// What the non-built-in types (enums, domains, arrays of them) of the relations seen so
    /// far are, looked up in `pg_type` after each Relation message that names new ones, before
    /// any row of it is planned. Planners that type values (mirrors, broadcasts) keep a copy.
    fn register_types(&mut self, _types: &TypeRegistry) {}
}
