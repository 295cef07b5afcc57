//! A stored key, or an index key and member, evaluated at the current point: which rows render
//! it (their versions are what a recheck compares), what those rows want there, and whether
//! Redis holds exactly that.

use std::collections::BTreeSet;

use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

use super::compare::{self, Tolerance, Verdict};
use super::expect::{Planned, TableMirrors, Want};
use super::identity::{self, Unmatched, VERSION_WIDTH};
use super::{DriftError, DriftKind};
use crate::pg::pgoutput::TupleValue;
use crate::sink::redis::readback::Readback;

/// Row lookups sent in one round trip.
const LOOKUPS_PER_ROUND_TRIP: usize = 50;
const SAVEPOINT: &str = "walsweep_drift_lookup";

/// What is checked: a mirror's entry, or one member of one of its indexes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Subject {
    Entry {
        mirror: usize,
        key: String,
    },
    Member {
        mirror: usize,
        index: usize,
        key: String,
        member: String,
    },
}

impl Subject {
    pub(crate) fn finding(&self, kind: DriftKind, detail: String) -> super::Finding {
        match self {
            Subject::Entry { key, .. } => super::Finding {
                kind,
                key: key.clone(),
                member: None,
                detail,
            },
            Subject::Member { key, member, .. } => super::Finding {
                kind,
                key: key.clone(),
                member: Some(member.clone()),
                detail,
            },
        }
    }
}

/// A mismatch seen at one point, waiting for the next.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub(crate) table: usize,
    pub(crate) subject: Subject,
    /// Versions of the rows behind the subject at that point.
    pub(crate) versions: Vec<String>,
}

/// A row read over SQL: its version (`tableoid/ctid/xmin`) and its columns as text.
pub(crate) struct ScannedRow {
    pub(crate) version: String,
    values: Vec<Option<String>>,
}

impl ScannedRow {
    /// A row selected with `identity::VERSION_COLUMNS` first.
    pub(crate) fn read(row: &SimpleQueryRow) -> ScannedRow {
        let version = (0..VERSION_WIDTH.min(row.len()))
            .map(|i| row.get(i).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("/");
        ScannedRow {
            version,
            values: (VERSION_WIDTH..row.len())
                .map(|i| row.get(i).map(str::to_string))
                .collect(),
        }
    }

    pub(crate) fn tuple(&self) -> Vec<TupleValue<'_>> {
        self.values
            .iter()
            .map(|v| match v {
                Some(text) => TupleValue::Text(text.as_bytes()),
                None => TupleValue::Null,
            })
            .collect()
    }
}

/// The rows of each simple query's single SELECT.
pub(crate) fn rows_of(messages: &[SimpleQueryMessage]) -> Vec<ScannedRow> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(ScannedRow::read(row)),
            _ => None,
        })
        .collect()
}

/// What evaluating one subject found.
pub(crate) struct Evaluation {
    /// Sorted versions of the rows behind it.
    pub(crate) versions: Vec<String>,
    pub(crate) verdict: Verdict,
    /// Why it could not be looked up (the verdict then says nothing).
    pub(crate) unknown: Option<String>,
}

fn is_data_exception(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.code().code().starts_with("22"))
}

/// Runs each lookup (a SELECT) and returns its rows. A lookup whose literal is not a value of
/// the column's type fails (SQLSTATE class 22): that means no row, and a savepoint keeps the
/// transaction, and so the snapshot, usable.
pub(crate) async fn lookup_many(
    client: &Client,
    queries: &[String],
) -> Result<Vec<Vec<ScannedRow>>, DriftError> {
    let failed = |source| DriftError::Query {
        what: "look up the rows behind stored keys".into(),
        source,
    };
    let mut out = Vec::with_capacity(queries.len());
    for chunk in queries.chunks(LOOKUPS_PER_ROUND_TRIP) {
        let batch = format!(
            "SAVEPOINT {SAVEPOINT}; {}; RELEASE SAVEPOINT {SAVEPOINT}",
            chunk.join("; ")
        );
        match client.simple_query(&batch).await {
            Ok(messages) => out.extend(split_statements(&messages, chunk.len())),
            Err(e) if is_data_exception(&e) => {
                rollback(client).await.map_err(failed)?;
                // One by one, so the others still answer.
                for query in chunk {
                    let single =
                        format!("SAVEPOINT {SAVEPOINT}; {query}; RELEASE SAVEPOINT {SAVEPOINT}");
                    match client.simple_query(&single).await {
                        Ok(messages) => out.extend(split_statements(&messages, 1)),
                        Err(e) if is_data_exception(&e) => {
                            rollback(client).await.map_err(failed)?;
                            out.push(Vec::new());
                        }
                        Err(e) => return Err(failed(e)),
                    }
                }
            }
            Err(e) => return Err(failed(e)),
        }
    }
    Ok(out)
}

async fn rollback(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "ROLLBACK TO SAVEPOINT {SAVEPOINT}; RELEASE SAVEPOINT {SAVEPOINT}"
        ))
        .await
}

/// The rows of each of `n` SELECTs between a SAVEPOINT and a RELEASE: statement boundaries are
/// the CommandComplete messages.
fn split_statements(messages: &[SimpleQueryMessage], n: usize) -> Vec<Vec<ScannedRow>> {
    let mut out: Vec<Vec<ScannedRow>> = (0..n).map(|_| Vec::new()).collect();
    let mut completed = 0usize;
    for message in messages {
        match message {
            SimpleQueryMessage::CommandComplete(_) => completed += 1,
            SimpleQueryMessage::Row(row) => {
                // Statement 0 is the SAVEPOINT.
                if let Some(rows) = completed.checked_sub(1).and_then(|i| out.get_mut(i)) {
                    rows.push(ScannedRow::read(row));
                }
            }
            _ => {}
        }
    }
    out
}

/// Tolerance of a mirror's entries.
fn entry_tolerance(table: &TableMirrors, mirror: usize) -> Tolerance {
    let mode = table.mirrors[mirror].rule.mode;
    Tolerance {
        absent: mode.only_if_present || mode.ttl_seconds > 0,
    }
}

/// Tolerance of a mirror's index members (`may_be_trimmed`: retention).
pub(crate) fn member_tolerance(
    table: &TableMirrors,
    mirror: usize,
    may_be_trimmed: bool,
) -> Tolerance {
    Tolerance {
        absent: table.mirrors[mirror].rule.mode.only_if_present || may_be_trimmed,
    }
}

pub(crate) fn entry_verdict(
    table: &TableMirrors,
    mirror: usize,
    want: &Want,
    stored: &crate::sink::redis::readback::Stored,
) -> Verdict {
    compare::entry(want, stored, entry_tolerance(table, mirror))
}

/// The templates that name the rows a subject is about, with the subject's texts: the entry
/// key, or the index member (usually the primary key) without the index key, so a row that
/// only moved between index keys is still found, and its new version seen. A member template
/// naming no column identifies nothing alone: the index key is added then.
fn identity<'a>(
    table: &'a TableMirrors,
    subject: &'a Subject,
) -> Vec<(&'a crate::config::template::Template, &'a str)> {
    match subject {
        Subject::Entry { mirror, key } => vec![(&table.mirrors[*mirror].rule.key, key.as_str())],
        Subject::Member {
            mirror,
            index,
            key,
            member,
        } => match table.mirrors[*mirror].rule.indexes.get(*index) {
            Some(rule) if rule.member.columns().next().is_some() => {
                vec![(&rule.member, member.as_str())]
            }
            Some(rule) => vec![(&rule.key, key.as_str()), (&rule.member, member.as_str())],
            None => Vec::new(),
        },
    }
}

/// Evaluates `subjects` of table `t` at the current point.
pub(crate) async fn evaluate(
    client: &Client,
    redis: &mut Readback,
    tables: &mut [TableMirrors],
    t: usize,
    subjects: &[Subject],
    now_unix_secs: i64,
) -> Result<Vec<Evaluation>, DriftError> {
    // 1. The queries that find each subject's rows.
    let mut queries: Vec<String> = Vec::new();
    let mut ranges = Vec::with_capacity(subjects.len());
    let mut unknown: Vec<Option<String>> = Vec::with_capacity(subjects.len());
    for subject in subjects {
        let start = queries.len();
        let table = &tables[t];
        match identity::unrender_all(&self::identity(table, subject)) {
            Ok(assignments) => {
                queries.extend(
                    assignments
                        .iter()
                        .map(|a| identity::lookup_sql(&table.qualified, a)),
                );
                unknown.push(None);
            }
            Err(Unmatched::NotRendered) => unknown.push(None),
            Err(Unmatched::Repr) => unknown.push(Some(
                "its template uses {column!r}, which cannot be read back into a value".into(),
            )),
            Err(Unmatched::Ambiguous) => unknown.push(Some(format!(
                "it splits into more than {} sets of column values",
                identity::MAX_SPLITS
            ))),
        }
        ranges.push(start..queries.len());
    }
    let found = lookup_many(client, &queries).await?;

    // 2. What those rows want at the subject. Every row found counts for the versions, also
    //    one that renders something else now: if it rendered the subject in between, its
    //    version tells.
    let mut versions: Vec<BTreeSet<String>> = Vec::with_capacity(subjects.len());
    let mut wants: Vec<(Want, Option<(f64, bool)>)> = Vec::with_capacity(subjects.len());
    for (subject, range) in subjects.iter().zip(&ranges) {
        let mut seen = BTreeSet::new();
        let mut want = Want::NoRow;
        let mut score = None;
        for row in found[range.clone()].iter().flatten() {
            seen.insert(row.version.clone());
            let mirror = match subject {
                Subject::Entry { mirror, .. } | Subject::Member { mirror, .. } => *mirror,
            };
            let Planned::Row(expected) = tables[t].expect(mirror, &row.tuple(), now_unix_secs)
            else {
                continue;
            };
            match subject {
                Subject::Entry { key, .. } if expected.key == *key => want = expected.want,
                Subject::Member {
                    index, key, member, ..
                } => {
                    if let Some(m) = expected
                        .members
                        .iter()
                        .find(|m| m.index == *index && m.key == *key && m.member == *member)
                    {
                        score = Some((m.score, m.may_be_trimmed));
                    }
                }
                Subject::Entry { .. } => {}
            }
        }
        versions.push(seen);
        wants.push((want, score));
    }

    // 3. What Redis holds.
    let entry_keys: Vec<String> = subjects
        .iter()
        .filter_map(|s| match s {
            Subject::Entry { key, .. } => Some(key.clone()),
            Subject::Member { .. } => None,
        })
        .collect();
    let member_pairs: Vec<(String, String)> = subjects
        .iter()
        .filter_map(|s| match s {
            Subject::Member { key, member, .. } => Some((key.clone(), member.clone())),
            Subject::Entry { .. } => None,
        })
        .collect();
    let mut stored = redis.entries(&entry_keys).await?.into_iter();
    let mut scores = redis.scores(&member_pairs).await?.into_iter();

    let mut out = Vec::with_capacity(subjects.len());
    for (i, subject) in subjects.iter().enumerate() {
        let (want, score) = &wants[i];
        let verdict = match subject {
            Subject::Entry { mirror, .. } => {
                let held = stored
                    .next()
                    .unwrap_or(crate::sink::redis::readback::Stored::Absent);
                entry_verdict(&tables[t], *mirror, want, &held)
            }
            Subject::Member { mirror, .. } => {
                let held = scores.next().flatten();
                let (want_score, trimmed) = match score {
                    Some((s, trimmed)) => (Some(*s), *trimmed),
                    None => (None, false),
                };
                compare::score(
                    want_score,
                    held,
                    member_tolerance(&tables[t], *mirror, trimmed),
                )
            }
        };
        out.push(Evaluation {
            versions: versions[i].iter().cloned().collect(),
            verdict,
            unknown: unknown[i].clone(),
        });
    }

    // 4. An entry no row of this mirror explains may be another mirror's (overlapping
    //    prefixes): it is extra only when no other mirror's row renders it either.
    claimed_elsewhere(client, tables, t, subjects, &mut out, now_unix_secs).await?;
    Ok(out)
}

async fn claimed_elsewhere(
    client: &Client,
    tables: &mut [TableMirrors],
    t: usize,
    subjects: &[Subject],
    evaluations: &mut [Evaluation],
    now_unix_secs: i64,
) -> Result<(), DriftError> {
    // (evaluation, table, mirror, query) for every other mirror whose template renders the key.
    let mut asks: Vec<(usize, usize, usize, String)> = Vec::new();
    for (i, (subject, evaluation)) in subjects.iter().zip(evaluations.iter()).enumerate() {
        let (Subject::Entry { mirror, key }, Verdict::Drift(DriftKind::Extra, _)) =
            (subject, &evaluation.verdict)
        else {
            continue;
        };
        for (t2, table) in tables.iter().enumerate() {
            for (m2, check) in table.mirrors.iter().enumerate() {
                if (t2, m2) == (t, *mirror) {
                    continue;
                }
                if let Ok(assignments) = identity::unrender(&check.rule.key, key) {
                    for a in &assignments {
                        asks.push((i, t2, m2, identity::lookup_sql(&table.qualified, a)));
                    }
                }
            }
        }
    }
    if asks.is_empty() {
        return Ok(());
    }
    let queries: Vec<String> = asks.iter().map(|(_, _, _, q)| q.clone()).collect();
    let found = lookup_many(client, &queries).await?;
    for ((i, t2, m2, _), rows) in asks.iter().zip(found) {
        let Subject::Entry { key, .. } = &subjects[*i] else {
            continue;
        };
        for row in rows {
            if let Planned::Row(expected) = tables[*t2].expect(*m2, &row.tuple(), now_unix_secs) {
                if expected.key == *key {
                    let evaluation = &mut evaluations[*i];
                    evaluation.verdict = Verdict::Same;
                    evaluation.versions.push(row.version.clone());
                    evaluation.versions.sort();
                }
            }
        }
    }
    Ok(())
}
