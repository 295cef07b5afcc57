//! The inspector (`[inspect] rows_per_minute`): while the daemon runs, it samples mirrored rows
//! and stored entries table by table, paced evenly over each minute, with the checks of
//! `walsweep verify --sample` (`pipeline::drift`), rechecks included, so a row that changed
//! while it looked is never counted. It exports what it compared and the drift it confirmed.
//!
//! It runs beside the stream on connections of its own and only reads: a slow check delays the
//! next check, never the stream. Failures (Postgres or Redis away, walsweep behind) skip a
//! check and reconnect at the next one.

use std::collections::HashSet;
use std::time::Duration;

use crate::config::Config;
use crate::pipeline::drift::{Checker, Cursors, DriftKind, TableReport};
use crate::pipeline::Shutdown;
use crate::telemetry::log::display_chain;
use crate::telemetry::metrics as m;

/// How long a check waits for walsweep to apply up to its snapshot before it is skipped.
const WAIT_FOR_APPLIED: Duration = Duration::from_secs(30);
/// Drifted keys remembered so each is logged as a warning once, not at every sample.
const REMEMBERED_KEYS: usize = 10_000;

/// Runs until the first shutdown request. Does nothing without `[inspect]` or mirrors.
pub async fn run(config: Config, mut shutdown: Shutdown) {
    let Some(inspect) = config.inspect.clone() else {
        return;
    };
    let tables: Vec<String> = match crate::plan::mirror::compile_all(&config.tables) {
        Ok(rules) => {
            let mut names: Vec<String> = Vec::new();
            for rule in rules {
                if !names.contains(&rule.table_name) {
                    names.push(rule.table_name.clone());
                }
            }
            names
        }
        // The stream fails on the same config with the full message.
        Err(_) => return,
    };
    if tables.is_empty() {
        tracing::warn!("[inspect] is set, but there is no [[table.mirror]] to inspect");
        return;
    }
    m::inspector_started(&tables);
    let (checks_per_minute, rows_per_check) = inspect.pace();
    let mut ticks = tokio::time::interval(Duration::from_secs(60) / checks_per_minute as u32);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(
        rows_per_minute = inspect.rows_per_minute,
        tables = tables.len(),
        "inspector started"
    );
    let mut inspector = Inspector {
        checker: None,
        cursors: tables.iter().map(|_| Cursors::default()).collect(),
        failing: false,
        logged: HashSet::new(),
    };
    let mut next = 0usize;
    loop {
        tokio::select! {
            _ = shutdown.at_least(1) => return,
            _ = ticks.tick() => {}
        }
        let t = next % tables.len();
        next = next.wrapping_add(1);
        tokio::select! {
            _ = shutdown.at_least(1) => return,
            () = inspector.check(&config, t, rows_per_check) => {}
        }
    }
}

struct Inspector {
    checker: Option<Checker>,
    /// Per table, where each prefix scan stopped.
    cursors: Vec<Cursors>,
    /// The last check failed: further failures log at debug until one succeeds.
    failing: bool,
    logged: HashSet<(String, Option<String>)>,
}

impl Inspector {
    async fn check(&mut self, config: &Config, t: usize, rows: u64) {
        if self.checker.is_none() {
            match Checker::connect(config, WAIT_FOR_APPLIED).await {
                Ok(checker) => self.checker = Some(checker),
                Err(e) => return self.failed(&display_chain(&e)),
            }
        }
        let (Some(checker), Some(cursors)) = (self.checker.as_mut(), self.cursors.get_mut(t))
        else {
            return;
        };
        match checker.inspect(t, rows, cursors).await {
            Ok(report) => {
                self.failing = false;
                self.record(&report);
            }
            Err(e) => {
                // A fresh connection next time: this one may be mid-transaction or broken.
                self.checker = None;
                self.failed(&display_chain(&e));
            }
        }
    }

    fn failed(&mut self, error: &str) {
        if self.failing {
            tracing::debug!(error, "inspector: check skipped");
        } else {
            tracing::warn!(error, "inspector: check skipped; retrying at the next one");
        }
        self.failing = true;
    }

    fn record(&mut self, report: &TableReport) {
        let drift = DriftKind::ALL.map(|k| report.count(k) as u64);
        m::inspected(&report.table, report.rows + report.entries, drift);
        for finding in &report.findings {
            let key = (finding.key.clone(), finding.member.clone());
            if self.logged.len() >= REMEMBERED_KEYS {
                self.logged.clear();
            }
            if self.logged.insert(key) {
                tracing::warn!(
                    table = %report.table,
                    kind = finding.kind.as_str(),
                    key = %finding.key,
                    member = finding.member.as_deref().unwrap_or(""),
                    detail = %finding.detail,
                    "inspector: mirror drift (`walsweep verify --table` lists all of it)"
                );
            }
        }
        if report.unsettled > 0 {
            tracing::debug!(
                table = %report.table,
                unsettled = report.unsettled,
                "inspector: rows kept changing during the rechecks; not judged"
            );
        }
        for note in &report.notes {
            tracing::debug!(table = %report.table, "inspector: {note}");
        }
    }
}
