//! Drift: mirrors and indexes compared with the database at consistent points, shared by
//! `walsweep verify` (every row, or a sample) and the inspector the daemon runs
//! (`[inspect] rows_per_minute`).
//!
//! A check runs in two steps:
//!
//! 1. At one consistent point (`point`: a snapshot, and walsweep's applied position past every
//!    commit it sees), rows are read and planned by the stream's own mirror planner
//!    (`expect`), and compared with their entries and index members (`compare`); stored
//!    entries and members no row explains are found by scanning the mirror's and index's key
//!    prefixes (`identity` maps a key back to the rows that could have written it).
//! 2. Redis may already hold commits made after the snapshot, so nothing found in step 1 is
//!    reported yet. Each mismatch is checked again at a newer point (`check::settle`): it is
//!    drift only when the rows behind it are the very same row versions at two consecutive
//!    points and Redis still differs after the second. A commit Redis applied before it was
//!    read is visible at the next point and changes those versions (an UPDATE gives a row a
//!    new xmin), so a row that changed is never reported; one that keeps changing is skipped
//!    and counted.

mod check;
mod compare;
mod evaluate;
mod expect;
mod identity;
mod passes;
mod point;

pub(crate) use check::Checker;
pub(crate) use passes::Cursors;

use std::time::Duration;

use crate::config::ConfigError;
use crate::pg::catalog::CatalogError;
use crate::pg::Lsn;
use crate::plan::mirror::MirrorRuleError;
use crate::sink::SinkError;

/// How an entry or index member differs from the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DriftKind {
    /// A row exists, its entry or index member does not.
    Missing,
    /// An entry or member exists that no row explains.
    Extra,
    /// Both exist and differ (fields, type, score).
    Different,
}

impl DriftKind {
    pub const ALL: [DriftKind; 3] = [DriftKind::Missing, DriftKind::Extra, DriftKind::Different];

    /// The `kind` label of `walsweep_drift_rows_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Missing => "missing",
            DriftKind::Extra => "extra",
            DriftKind::Different => "different",
        }
    }
}

/// One confirmed difference.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub kind: DriftKind,
    /// The entry's key, or the index's key.
    pub key: String,
    /// For index drift: the member.
    pub member: Option<String>,
    /// What differs, e.g. `name: "b" in Redis, "a" in the row`.
    pub detail: String,
}

/// What a check of one table found.
#[derive(Debug, Clone, Default)]
pub struct TableReport {
    /// `schema.table`.
    pub table: String,
    /// Rows compared with their entries and index members.
    pub rows: u64,
    /// Stored entries and index members checked for a row that explains them.
    pub entries: u64,
    /// Confirmed drift, in the order found.
    pub findings: Vec<Finding>,
    /// Mismatches whose rows changed at every recheck: neither confirmed nor cleared.
    pub unsettled: u64,
    /// What could not be checked, and why.
    pub notes: Vec<String>,
}

impl TableReport {
    pub fn count(&self, kind: DriftKind) -> usize {
        self.findings.iter().filter(|f| f.kind == kind).count()
    }

    /// Adds a note once, however many rows run into it.
    pub(crate) fn note(&mut self, note: String) {
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot compile the mirrors (`walsweep check` says where)")]
    Compile(#[source] MirrorRuleError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("query failed: {what}")]
    Query {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot read what walsweep wrote to Redis")]
    Redis(#[from] SinkError),
    #[error(
        "table {table} is mirrored in the config but does not exist in the source database; fix \
         the name or create the table"
    )]
    NoTable { table: String },
    #[error(
        "walsweep has not applied up to the snapshot within {} ms: {key} is {}, the snapshot \
         needs {} ({lsn}); is walsweep running and streaming from this slot? Start it (walsweep \
         run), or give it longer while it catches up", waited.as_millis(),
        published.map_or("absent".to_string(), |p| p.to_string()), Lsn::from(*lsn)
    )]
    NotApplied {
        key: String,
        lsn: u64,
        published: Option<u64>,
        waited: Duration,
    },
    #[error("{0}")]
    Unexpected(String),
}

#[cfg(test)]
mod tests {
    use super::DriftKind;

    #[test]
    fn kinds_are_the_metric_labels_in_order() {
        assert_eq!(
            DriftKind::ALL.map(DriftKind::as_str),
            crate::telemetry::metrics::DRIFT_KINDS
        );
    }
}
