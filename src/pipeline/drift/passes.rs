//! The first look at a table, at the first consistent point: rows (all of them, or a sample)
//! against their entries and index members, and stored entries and members (all under the
//! prefixes, or a sample) against the rows. Everything that differs becomes a `Pending`
//! mismatch for `check::settle`.

use std::collections::HashSet;

use tokio_postgres::{Client, SimpleQueryMessage};

use super::compare::{self, Verdict};
use super::evaluate::{self, Pending, ScannedRow, Subject};
use super::expect::{Planned, TableMirrors, Want};
use super::identity::{self, Unmatched, VERSION_COLUMNS};
use super::{DriftError, TableReport};
use crate::config::template::{glob_escape, Template};
use crate::sink::redis::readback::Readback;

/// Rows fetched, planned and compared per round when reading a whole table.
pub(crate) const ROWS_PER_FETCH: usize = 1_000;
/// Keys per SCAN page.
const SCAN_COUNT: usize = 1_000;
/// Pages the inspector scans per mirror and tick before it goes on with what it found.
const PAGES_PER_TICK: usize = 5;
/// Below this many rows (by the planner's estimate) a sample reads the whole table in random
/// order; above, a block sample of about four times the rows asked for.
const BLOCK_SAMPLE_ABOVE_ROWS: f64 = 100_000.0;

/// Keys and members the rows of a whole-table pass want, per mirror: what is not in here and
/// is stored under the prefixes is extra.
pub(crate) struct Seen {
    keys: Vec<HashSet<String>>,
    members: Vec<HashSet<(usize, String, String)>>,
}

impl Seen {
    pub(crate) fn new(mirrors: usize) -> Seen {
        Seen {
            keys: (0..mirrors).map(|_| HashSet::new()).collect(),
            members: (0..mirrors).map(|_| HashSet::new()).collect(),
        }
    }
}

/// Where each SCAN of the inspector stopped, by pattern, so successive ticks walk the whole
/// keyspace instead of the same first keys.
#[derive(Debug, Default)]
pub(crate) struct Cursors(std::collections::HashMap<String, u64>);

pub(crate) fn mismatch(
    t: usize,
    subject: Subject,
    versions: Vec<String>,
    verdict: Verdict,
) -> Option<Pending> {
    match verdict {
        Verdict::Same => None,
        Verdict::Drift(..) => Some(Pending {
            table: t,
            subject,
            versions,
        }),
    }
}

/// Compares `rows` with their entries and members; records what they want in `seen`.
pub(crate) async fn compare_rows(
    redis: &mut Readback,
    table: &mut TableMirrors,
    t: usize,
    rows: &[ScannedRow],
    mut seen: Option<&mut Seen>,
    report: &mut TableReport,
    now_unix_secs: i64,
) -> Result<Vec<Pending>, DriftError> {
    // (mirror, key, want, version) and (mirror, index, key, member, score, trimmed, version).
    let mut entries: Vec<(usize, String, Want, String)> = Vec::new();
    let mut members: Vec<(usize, usize, String, String, f64, bool, String)> = Vec::new();
    for row in rows {
        let tuple = row.tuple();
        for mirror in 0..table.mirrors.len() {
            match table.expect(mirror, &tuple, now_unix_secs) {
                Planned::NoKey => {}
                Planned::Unplannable => {
                    report.note(format!(
                        "mirror {:?} cannot be planned for its rows (a template names a column \
                         the table lacks?); `walsweep check` says what to fix",
                        table.mirrors[mirror].rule.key.source
                    ));
                }
                Planned::Row(expected) => {
                    if let Some(seen) = seen.as_deref_mut() {
                        seen.keys[mirror].insert(expected.key.clone());
                        for m in &expected.members {
                            seen.members[mirror].insert((m.index, m.key.clone(), m.member.clone()));
                        }
                    }
                    for m in expected.members {
                        members.push((
                            mirror,
                            m.index,
                            m.key,
                            m.member,
                            m.score,
                            m.may_be_trimmed,
                            row.version.clone(),
                        ));
                    }
                    entries.push((mirror, expected.key, expected.want, row.version.clone()));
                }
            }
        }
    }
    report.rows += rows.len() as u64;
    let keys: Vec<String> = entries.iter().map(|(_, k, _, _)| k.clone()).collect();
    let stored = redis.entries(&keys).await?;
    let pairs: Vec<(String, String)> = members
        .iter()
        .map(|(_, _, k, m, _, _, _)| (k.clone(), m.clone()))
        .collect();
    let scores = redis.scores(&pairs).await?;
    let mut pending = Vec::new();
    for ((mirror, key, want, version), held) in entries.into_iter().zip(stored) {
        let verdict = evaluate::entry_verdict(table, mirror, &want, &held);
        pending.extend(mismatch(
            t,
            Subject::Entry { mirror, key },
            vec![version],
            verdict,
        ));
    }
    for ((mirror, index, key, member, score, trimmed, version), held) in
        members.into_iter().zip(scores)
    {
        let tolerance = evaluate::member_tolerance(table, mirror, trimmed);
        let verdict = compare::score(Some(score), held, tolerance);
        pending.extend(mismatch(
            t,
            Subject::Member {
                mirror,
                index,
                key,
                member,
            },
            vec![version],
            verdict,
        ));
    }
    Ok(pending)
}

/// Reads every row of the table (inside the point's transaction) a fetch at a time.
pub(crate) async fn whole_table(
    client: &Client,
    redis: &mut Readback,
    table: &mut TableMirrors,
    t: usize,
    seen: &mut Seen,
    report: &mut TableReport,
    now_unix_secs: i64,
) -> Result<Vec<Pending>, DriftError> {
    let failed = |source| DriftError::Query {
        what: format!("read {}", table.name),
        source,
    };
    let cursor = "walsweep_drift";
    client
        .batch_execute(&format!(
            "DECLARE {cursor} NO SCROLL CURSOR FOR SELECT {VERSION_COLUMNS}, t.* FROM {} t",
            table.qualified
        ))
        .await
        .map_err(failed)?;
    let mut pending = Vec::new();
    loop {
        // simple_query: rows in text form, exactly what pgoutput sends.
        let messages = client
            .simple_query(&format!("FETCH {ROWS_PER_FETCH} FROM {cursor}"))
            .await
            .map_err(|source| DriftError::Query {
                what: format!("read {}", table.name),
                source,
            })?;
        let rows = evaluate::rows_of(&messages);
        if rows.is_empty() {
            break;
        }
        pending
            .extend(compare_rows(redis, table, t, &rows, Some(seen), report, now_unix_secs).await?);
    }
    client
        .batch_execute(&format!("CLOSE {cursor}"))
        .await
        .map_err(|source| DriftError::Query {
            what: format!("read {}", table.name),
            source,
        })?;
    Ok(pending)
}

/// About `n` random rows of the table.
pub(crate) async fn sample_rows(
    client: &Client,
    table: &TableMirrors,
    n: u64,
) -> Result<Vec<ScannedRow>, DriftError> {
    let failed = |source| DriftError::Query {
        what: format!("sample {}", table.name),
        source,
    };
    let estimate = client
        .simple_query(&format!(
            "SELECT reltuples::float8::text FROM pg_class WHERE oid = {}",
            table.relation.oid
        ))
        .await
        .map_err(failed)?
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse::<f64>().ok()),
            _ => None,
        })
        .unwrap_or(-1.0);
    // ORDER BY random() reads the whole table; a block sample reads a few pages.
    let sample = if estimate > BLOCK_SAMPLE_ABOVE_ROWS {
        let percent = (400.0 * n as f64 / estimate).clamp(0.0001, 100.0);
        format!(" TABLESAMPLE SYSTEM ({percent})")
    } else {
        String::new()
    };
    let messages = client
        .simple_query(&format!(
            "SELECT {VERSION_COLUMNS}, t.* FROM {} t{sample} ORDER BY random() LIMIT {n}",
            table.qualified
        ))
        .await
        .map_err(failed)?;
    Ok(evaluate::rows_of(&messages))
}

/// Whether `key` is one a template renders (the prefix alone does not say: another mirror
/// may share it).
fn renders(template: &Template, key: &str) -> bool {
    !matches!(
        identity::unrender(template, key),
        Err(Unmatched::NotRendered)
    )
}

/// Every entry and index member stored under the table's mirrors' prefixes that no row of the
/// whole-table pass wants.
pub(crate) async fn unexplained(
    redis: &mut Readback,
    table: &TableMirrors,
    t: usize,
    seen: &Seen,
    report: &mut TableReport,
) -> Result<Vec<Pending>, DriftError> {
    let mut pending = Vec::new();
    for (mirror, check) in table.mirrors.iter().enumerate() {
        let rule = &check.rule;
        let pattern = format!("{}*", glob_escape(rule.key.literal_prefix()));
        let mut cursor = 0;
        loop {
            let (next, keys) = redis.scan(&pattern, cursor, SCAN_COUNT).await?;
            for key in keys {
                if !renders(&rule.key, &key) {
                    continue;
                }
                report.entries += 1;
                if !seen.keys[mirror].contains(&key) {
                    pending.extend(mismatch(
                        t,
                        Subject::Entry { mirror, key },
                        Vec::new(),
                        compare::unexplained_entry(),
                    ));
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        for index in &rule.indexes {
            let pattern = format!("{}*", glob_escape(index.key.literal_prefix()));
            let mut cursor = 0;
            loop {
                let (next, keys) = redis.scan(&pattern, cursor, SCAN_COUNT).await?;
                for key in keys {
                    if !renders(&index.key, &key) || !redis.is_sorted_set(&key).await? {
                        continue;
                    }
                    let mut at = 0;
                    loop {
                        let (after, page) = redis.members(&key, at, SCAN_COUNT).await?;
                        for (member, _) in page {
                            report.entries += 1;
                            let wanted = (index.index, key.clone(), member.clone());
                            if !seen.members[mirror].contains(&wanted) {
                                pending.extend(mismatch(
                                    t,
                                    Subject::Member {
                                        mirror,
                                        index: index.index,
                                        key: key.clone(),
                                        member,
                                    },
                                    Vec::new(),
                                    compare::unexplained_member(),
                                ));
                            }
                        }
                        if after == 0 {
                            break;
                        }
                        at = after;
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }
    Ok(pending)
}

/// Up to `n` keys under `template`'s prefix that it renders: a uniform sample of all of them
/// (`cursor` none: `walsweep verify --sample`), or the next ones from where the last tick
/// stopped (the inspector).
async fn sample_keys(
    redis: &mut Readback,
    template: &Template,
    n: usize,
    cursors: Option<&mut Cursors>,
) -> Result<Vec<String>, DriftError> {
    let pattern = format!("{}*", glob_escape(template.literal_prefix()));
    let mut out: Vec<String> = Vec::new();
    match cursors {
        None => {
            // Reservoir sampling: memory stays at n keys however many match.
            let mut matched = 0usize;
            let mut cursor = 0;
            loop {
                let (next, keys) = redis.scan(&pattern, cursor, SCAN_COUNT).await?;
                for key in keys.into_iter().filter(|k| renders(template, k)) {
                    matched += 1;
                    if out.len() < n {
                        out.push(key);
                    } else {
                        let slot = rand::random_range(0..matched);
                        if slot < n {
                            out[slot] = key;
                        }
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Some(cursors) => {
            let cursor = cursors.0.entry(pattern.clone()).or_insert(0);
            for _ in 0..PAGES_PER_TICK {
                let (next, keys) = redis.scan(&pattern, *cursor, SCAN_COUNT).await?;
                *cursor = next;
                out.extend(keys.into_iter().filter(|k| renders(template, k)));
                if out.len() >= n || next == 0 {
                    break;
                }
            }
            out.truncate(n);
        }
    }
    Ok(out)
}

/// Stored entries and index members to evaluate in a sampled pass: about `n` of each per
/// mirror and index.
pub(crate) async fn sampled_subjects(
    redis: &mut Readback,
    table: &TableMirrors,
    n: usize,
    mut cursors: Option<&mut Cursors>,
) -> Result<Vec<Subject>, DriftError> {
    let mut subjects = Vec::new();
    for (mirror, check) in table.mirrors.iter().enumerate() {
        let rule = &check.rule;
        for key in sample_keys(redis, &rule.key, n, cursors.as_deref_mut()).await? {
            subjects.push(Subject::Entry { mirror, key });
        }
        for index in &rule.indexes {
            let mut sets = Vec::new();
            for key in sample_keys(redis, &index.key, n, cursors.as_deref_mut()).await? {
                if redis.is_sorted_set(&key).await? {
                    sets.push(key);
                }
            }
            let per_set = n.div_ceil(sets.len().max(1));
            for key in sets {
                for (member, _) in redis.random_members(&key, per_set).await? {
                    subjects.push(Subject::Member {
                        mirror,
                        index: index.index,
                        key: key.clone(),
                        member,
                    });
                }
            }
        }
    }
    Ok(subjects)
}
