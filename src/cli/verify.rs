//! `walsweep verify`: compares every mirror and index with the database at a consistent point
//! (or a sample of rows and entries per table), rechecks whatever differs at newer points so a
//! row changed meanwhile is never reported, and prints the drift per table with examples.
//! The checking itself is `pipeline::drift`, which the daemon's inspector shares.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::cli::wait::EXIT_TIMEOUT;
use crate::cli::{config_failure, EXIT_CONFIG};
use crate::config::Config;
use crate::pipeline::drift::{Checker, DriftError, DriftKind, TableReport};
use crate::telemetry::log::display_chain;

/// Drift was found (0: none).
pub(crate) const EXIT_DRIFT: u8 = 1;
/// The check could not run: Postgres or Redis unreachable, a query failed, a bad --table.
pub(crate) const EXIT_UNCHECKED: u8 = 2;
/// Examples printed per table and kind.
const EXAMPLES: usize = 5;

/// What to check.
pub struct Options {
    /// `schema.table` or `table` (public); empty: every mirrored table.
    pub tables: Vec<String>,
    /// Rows (and stored entries) per table; `None`: all of them.
    pub sample: Option<u64>,
    /// How long each consistent point waits for walsweep's applied position.
    pub timeout: Duration,
}

pub async fn command(path: &Path, options: Options) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    if !config.tables.iter().any(|t| !t.mirror.is_empty()) {
        eprintln!(
            "walsweep verify: {} has no [[table.mirror]]: there is nothing to compare",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let started = Instant::now();
    let mut checker = match Checker::connect(&config, options.timeout).await {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    let names = checker.table_names();
    let selected = match select(&names, &options.tables) {
        Ok(s) => s,
        Err(message) => {
            eprintln!("walsweep verify: {message}");
            return ExitCode::from(EXIT_UNCHECKED);
        }
    };
    let reports = match checker.verify(&selected, options.sample).await {
        Ok(r) => r,
        Err(e) => return failed(&e),
    };
    let drifted = reports.iter().filter(|r| !r.findings.is_empty()).count();
    for report in &reports {
        print_report(report);
    }
    let unsettled: u64 = reports.iter().map(|r| r.unsettled).sum();
    let seconds = started.elapsed().as_secs_f64();
    match drifted {
        0 => println!(
            "no drift in {} table(s){} ({seconds:.2} s)",
            reports.len(),
            if unsettled > 0 {
                format!(", {unsettled} mismatch(es) kept changing and were not judged")
            } else {
                String::new()
            }
        ),
        n => println!(
            "drift in {n} of {} table(s) ({seconds:.2} s)",
            reports.len()
        ),
    }
    if drifted > 0 {
        ExitCode::from(EXIT_DRIFT)
    } else {
        ExitCode::SUCCESS
    }
}

fn failed(e: &DriftError) -> ExitCode {
    match e {
        DriftError::Config(e) => config_failure(e),
        DriftError::Compile(_) | DriftError::NoTable { .. } => {
            eprintln!("walsweep verify: {}", display_chain(e));
            ExitCode::from(EXIT_CONFIG)
        }
        DriftError::NotApplied { .. } => {
            eprintln!("walsweep verify: {}", display_chain(e));
            ExitCode::from(EXIT_TIMEOUT)
        }
        _ => {
            eprintln!("walsweep verify: {}", display_chain(e));
            ExitCode::from(EXIT_UNCHECKED)
        }
    }
}

/// Indexes into `names` of the tables `--table` names (all when none is named).
fn select(names: &[String], wanted: &[String]) -> Result<Vec<usize>, String> {
    if wanted.is_empty() {
        return Ok((0..names.len()).collect());
    }
    let mut out = Vec::new();
    for table in wanted {
        let qualified = if table.contains('.') {
            table.clone()
        } else {
            format!("public.{table}")
        };
        match names.iter().position(|n| *n == qualified) {
            Some(i) if !out.contains(&i) => out.push(i),
            Some(_) => {}
            None => {
                return Err(format!(
                    "--table {table}: no [[table.mirror]] mirrors {qualified}; mirrored tables: {}",
                    names.join(", ")
                ))
            }
        }
    }
    Ok(out)
}

fn print_report(report: &TableReport) {
    let counts: Vec<String> = DriftKind::ALL
        .iter()
        .filter_map(|&k| {
            let n = report.count(k);
            (n > 0).then(|| format!("{n} {}", k.as_str()))
        })
        .collect();
    println!(
        "{}: {} rows and {} stored entries and index members checked: {}",
        report.table,
        report.rows,
        report.entries,
        if counts.is_empty() {
            "no drift".to_string()
        } else {
            counts.join(", ")
        }
    );
    for kind in DriftKind::ALL {
        let of_kind: Vec<_> = report.findings.iter().filter(|f| f.kind == kind).collect();
        for finding in of_kind.iter().take(EXAMPLES) {
            let at = match &finding.member {
                Some(member) => format!("{} member {member}", finding.key),
                None => finding.key.clone(),
            };
            println!("  {:<9} {at}: {}", kind.as_str(), finding.detail);
        }
        if of_kind.len() > EXAMPLES {
            println!(
                "  ... and {} more {}",
                of_kind.len() - EXAMPLES,
                kind.as_str()
            );
        }
    }
    if report.unsettled > 0 {
        println!(
            "  {} mismatch(es) kept changing at every recheck and were not judged; run verify \
             again when the rows are quieter",
            report.unsettled
        );
    }
    for note in &report.notes {
        println!("  note: {note}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_selected_by_qualified_or_bare_name() {
        let names = vec!["public.items".to_string(), "app.orders".to_string()];
        assert_eq!(select(&names, &[]), Ok(vec![0, 1]));
        assert_eq!(
            select(&names, &["items".into(), "app.orders".into()]),
            Ok(vec![0, 1])
        );
        let e = select(&names, &["orders".into()]).unwrap_err();
        assert!(
            e.contains("no [[table.mirror]] mirrors public.orders")
                && e.contains("public.items, app.orders"),
            "{e}"
        );
    }
}
