//! `walsweep check`: offline lint of the config, then checks against the live database and
//! Redis. Collects every finding instead of stopping at the first, like a compiler.

use std::path::Path;
use std::process::ExitCode;

mod database;
mod redis;
mod settings;

use crate::cli::{load, EXIT_CONFIG};
use crate::config::Config;
use crate::pg::catalog;
use crate::plan::rules::Rules;
use crate::telemetry::log::display_chain;

#[derive(Debug, Default, Clone)]
pub(crate) struct Report {
    pub(crate) errors: Vec<String>,
    pub(crate) warnings: Vec<String>,
    pub(crate) notes: Vec<String>,
    /// Tables whose rules need REPLICA IDENTITY FULL (for `setup`).
    pub(crate) needs_full_identity: Vec<String>,
    /// Tables not yet in the publication (for `setup`).
    pub(crate) missing_from_publication: Vec<String>,
}

pub(super) fn push_once(list: &mut Vec<String>, item: &str) {
    if !list.iter().any(|i| i == item) {
        list.push(item.to_string());
    }
}

/// Warnings about the file alone (no database), see `Config::warnings`. Already-present
/// warnings are not repeated, so calling this both before and inside `check_environment` is
/// harmless.
pub(crate) fn check_config(config: &Config, report: &mut Report) {
    for warning in config.warnings() {
        push_once(&mut report.warnings, &warning);
    }
}

/// Checks against the live database and Redis.
pub(crate) async fn check_environment(config: &Config, rules: &Rules, report: &mut Report) {
    check_config(config, report);
    let resolved = match config
        .source
        .resolve_connection(&|name| std::env::var(name).ok())
    {
        Ok(r) => r,
        Err(e) => {
            report.errors.push(display_chain(&e));
            return;
        }
    };
    // The URL, the libpq variables and the password file all feed the connection: say which
    // one each setting came from, so a surprise from the environment is visible.
    report.notes.push(resolved.describe());
    let params = resolved.params;
    match catalog::connect(&params).await {
        Err(e) => report.errors.push(format!(
            "{}; check source.url (or WALSWEEP_SOURCE_URL, or the PG* variables) and that \
             Postgres is up",
            display_chain(&e)
        )),
        Ok(client) => database::check_database(config, rules, &client, report).await,
    }
    redis::check_redis(config, report).await;
    if let Some((dir, _)) = crate::plan::mirror::spill::settings(config) {
        if let Err(e) = crate::plan::mirror::spill::Spill::check_dir(&dir) {
            report.errors.push(e);
        }
    }
}

/// Exits EX_CONFIG when anything is wrong (warnings too with `deny_warnings`): whatever check
/// finds is fixed in the config or the environment, never by retrying.
pub async fn command(path: &Path, no_environment: bool, deny_warnings: bool) -> ExitCode {
    let (config, rules) = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut report = Report::default();
    if no_environment {
        check_config(&config, &mut report);
    } else {
        check_environment(&config, &rules, &mut report).await;
    }
    print_report(&report);
    let failed = !report.errors.is_empty() || (deny_warnings && !report.warnings.is_empty());
    if failed {
        println!(
            "{}: {} error(s), {} warning(s)",
            path.display(),
            report.errors.len(),
            report.warnings.len()
        );
        ExitCode::from(EXIT_CONFIG)
    } else {
        println!("{}: ok", path.display());
        ExitCode::SUCCESS
    }
}

fn print_report(report: &Report) {
    for note in &report.notes {
        println!("note: {note}");
    }
    for warning in &report.warnings {
        println!("warning: {warning}");
    }
    for error in &report.errors {
        println!("error: {error}");
    }
}
