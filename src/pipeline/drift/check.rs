//! The checker both `walsweep verify` and the inspector drive: a first pass at one consistent
//! point, then rechecks at newer points until every mismatch is confirmed, cleared, or known to
//! keep changing (`settle`).

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use super::evaluate::{self, Pending, Subject};
use super::expect::TableMirrors;
use super::passes::{self, Cursors, Seen};
use super::{point, DriftError, TableReport};
use crate::config::Config;
use crate::pg::catalog;
use crate::plan::mirror::MirrorRule;
use crate::sink::redis::readback::Readback;
use crate::sink::redis::{state_prefix, APPLIED_POSITION};

/// Rechecks of a mismatch before it counts as changing too often to tell.
const RECHECK_ROUNDS: usize = 4;

/// Connections to both sides and every mirrored table of the config.
pub(crate) struct Checker {
    client: Client,
    redis: Readback,
    /// `walsweep:<database>/<slot>:applied`.
    position_key: String,
    wait_timeout: Duration,
    tables: Vec<TableMirrors>,
}

fn now_unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Checker {
    /// Connects to Postgres and Redis and reads the shape of every mirrored table.
    /// `wait_timeout`: how long each point waits for walsweep's applied position.
    pub(crate) async fn connect(
        config: &Config,
        wait_timeout: Duration,
    ) -> Result<Checker, DriftError> {
        let params = config.source.connect_params()?;
        let rules =
            crate::plan::mirror::compile_all(&config.tables).map_err(DriftError::Compile)?;
        let client = catalog::connect(&params).await?;
        let redis = Readback::connect(&config.redis).await?;
        let position_key = format!(
            "{}{}",
            state_prefix(&params.dbname(), &config.source.slot),
            APPLIED_POSITION
        );
        let mut names: Vec<String> = Vec::new();
        for rule in &rules {
            if !names.contains(&rule.table_name) {
                names.push(rule.table_name.clone());
            }
        }
        let mut tables = Vec::with_capacity(names.len());
        for name in names {
            let of_table: Vec<Arc<MirrorRule>> = rules
                .iter()
                .filter(|r| r.table_name == name)
                .cloned()
                .collect();
            tables.push(TableMirrors::load(&client, &name, of_table).await?);
        }
        Ok(Checker {
            client,
            redis,
            position_key,
            wait_timeout,
            tables,
        })
    }

    /// `schema.table` of each mirrored table, in config order (what `verify` and `inspect`
    /// take indexes into).
    pub(crate) fn table_names(&self) -> Vec<String> {
        self.tables.iter().map(|t| t.name.clone()).collect()
    }

    /// `walsweep verify`: every row and every stored entry of the `selected` tables, or with
    /// `sample`, that many of each per table (and per mirror and index).
    pub(crate) async fn verify(
        &mut self,
        selected: &[usize],
        sample: Option<u64>,
    ) -> Result<Vec<TableReport>, DriftError> {
        self.check(selected, sample, None).await
    }

    /// One inspector tick on table `t`: `n` sampled rows and about as many stored entries,
    /// continuing each prefix's scan where the last tick stopped.
    pub(crate) async fn inspect(
        &mut self,
        t: usize,
        n: u64,
        cursors: &mut Cursors,
    ) -> Result<TableReport, DriftError> {
        let mut reports = self.check(&[t], Some(n), Some(cursors)).await?;
        Ok(reports.pop().unwrap_or_default())
    }

    async fn check(
        &mut self,
        selected: &[usize],
        sample: Option<u64>,
        mut cursors: Option<&mut Cursors>,
    ) -> Result<Vec<TableReport>, DriftError> {
        let mut reports: Vec<TableReport> = selected
            .iter()
            .map(|&t| TableReport {
                table: self
                    .tables
                    .get(t)
                    .map(|t| t.name.clone())
                    .unwrap_or_default(),
                ..TableReport::default()
            })
            .collect();
        point::open(
            &self.client,
            &mut self.redis,
            &self.position_key,
            self.wait_timeout,
            false,
        )
        .await?;
        let now = now_unix_secs();
        let mut pending = Vec::new();
        for (r, &t) in selected.iter().enumerate() {
            let found = self
                .first_pass(t, sample, cursors.as_deref_mut(), &mut reports[r], now)
                .await;
            match found {
                Ok(found) => pending.extend(found),
                Err(e) => {
                    // The error says more than a failed ROLLBACK would.
                    let _ = point::close(&self.client).await;
                    return Err(e);
                }
            }
        }
        point::close(&self.client).await?;
        // A sampled pass reaches some entries from their row and from the key scan alike.
        let mut once = std::collections::HashSet::new();
        pending.retain(|p| once.insert((p.table, p.subject.clone())));
        self.settle(pending, selected, &mut reports).await?;
        Ok(reports)
    }

    async fn first_pass(
        &mut self,
        t: usize,
        sample: Option<u64>,
        cursors: Option<&mut Cursors>,
        report: &mut TableReport,
        now: i64,
    ) -> Result<Vec<Pending>, DriftError> {
        if t >= self.tables.len() {
            return Ok(Vec::new());
        }
        match sample {
            None => {
                let table = &mut self.tables[t];
                let mut seen = Seen::new(table.mirrors.len());
                let mut pending = passes::whole_table(
                    &self.client,
                    &mut self.redis,
                    table,
                    t,
                    &mut seen,
                    report,
                    now,
                )
                .await?;
                pending
                    .extend(passes::unexplained(&mut self.redis, table, t, &seen, report).await?);
                Ok(pending)
            }
            Some(n) => {
                let rows = passes::sample_rows(&self.client, &self.tables[t], n).await?;
                let mut pending = passes::compare_rows(
                    &mut self.redis,
                    &mut self.tables[t],
                    t,
                    &rows,
                    None,
                    report,
                    now,
                )
                .await?;
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                let subjects =
                    passes::sampled_subjects(&mut self.redis, &self.tables[t], n, cursors).await?;
                report.entries += subjects.len() as u64;
                let evaluations = evaluate::evaluate(
                    &self.client,
                    &mut self.redis,
                    &mut self.tables,
                    t,
                    &subjects,
                    now,
                )
                .await?;
                for (subject, evaluation) in subjects.into_iter().zip(evaluations) {
                    if let Some(why) = evaluation.unknown {
                        report.note(unknown_note(&subject, &why));
                        continue;
                    }
                    pending.extend(passes::mismatch(
                        t,
                        subject,
                        evaluation.versions,
                        evaluation.verdict,
                    ));
                }
                Ok(pending)
            }
        }
    }

    /// Rechecks every mismatch at newer points. One is drift when the rows behind it (found by
    /// the entry's key or the member, whatever they render now) are the same versions at two
    /// consecutive points and Redis still differs at the second. Then whatever Redis held at
    /// the first read was in the first snapshot's rows already: a commit Redis held beyond them
    /// ended before the next point (`point::open` waits for running transactions to end) and
    /// changed a version, or left that point `in_gap`, which confirms nothing. Only a row whose
    /// key columns change away and back between two points could pass unnoticed. Cleared
    /// mismatches are dropped; those that change at every round are counted as unsettled.
    async fn settle(
        &mut self,
        mut pending: Vec<Pending>,
        selected: &[usize],
        reports: &mut [TableReport],
    ) -> Result<(), DriftError> {
        let report_of = |t: usize| selected.iter().position(|&s| s == t);
        for _ in 0..RECHECK_ROUNDS {
            if pending.is_empty() {
                return Ok(());
            }
            let at = point::open(
                &self.client,
                &mut self.redis,
                &self.position_key,
                self.wait_timeout,
                true,
            )
            .await?;
            let now = now_unix_secs();
            let mut still = Vec::new();
            let mut tables: Vec<usize> = pending.iter().map(|p| p.table).collect();
            tables.sort_unstable();
            tables.dedup();
            for t in tables {
                let (mine, others): (Vec<Pending>, Vec<Pending>) =
                    pending.into_iter().partition(|p| p.table == t);
                pending = others;
                let subjects: Vec<Subject> = mine.iter().map(|p| p.subject.clone()).collect();
                let evaluations = match evaluate::evaluate(
                    &self.client,
                    &mut self.redis,
                    &mut self.tables,
                    t,
                    &subjects,
                    now,
                )
                .await
                {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = point::close(&self.client).await;
                        return Err(e);
                    }
                };
                for (before, evaluation) in mine.into_iter().zip(evaluations) {
                    let Some(r) = report_of(t) else { continue };
                    if let Some(why) = evaluation.unknown {
                        reports[r].note(unknown_note(&before.subject, &why));
                        reports[r].unsettled += 1;
                        continue;
                    }
                    let super::compare::Verdict::Drift(kind, detail) = evaluation.verdict else {
                        continue;
                    };
                    if !at.in_gap && evaluation.versions == before.versions {
                        reports[r]
                            .findings
                            .push(before.subject.finding(kind, detail));
                        continue;
                    }
                    still.push(Pending {
                        versions: evaluation.versions,
                        ..before
                    });
                }
            }
            point::close(&self.client).await?;
            pending = still;
        }
        for left in pending {
            if let Some(r) = report_of(left.table) {
                reports[r].unsettled += 1;
            }
        }
        Ok(())
    }
}

fn unknown_note(subject: &Subject, why: &str) -> String {
    match subject {
        Subject::Entry { key, .. } => format!("entries such as {key} cannot be checked: {why}"),
        Subject::Member { key, .. } => {
            format!("members of index {key} cannot be checked: {why}")
        }
    }
}
