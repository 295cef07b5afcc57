//! `walsweep status`: one look at the slot from outside (active or not, how much WAL it holds,
//! whether Postgres still reserves that WAL), printed for an operator; never touches Redis.

use std::path::Path;
use std::process::ExitCode;

use crate::cli::config_failure;
use crate::config::Config;
use crate::pg::catalog;
use crate::pipeline::slot_monitor;
use crate::telemetry::log::display_chain;

pub async fn command(path: &Path) -> ExitCode {
    // Only the source is read, so a broken rule should not hide the slot's state.
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    let params = match config.source.connect_params() {
        Ok(p) => p,
        Err(e) => return config_failure(&e),
    };
    let sample = match catalog::connect(&params).await {
        Ok(client) => slot_monitor::sample(&client, &config.source.slot).await,
        Err(e) => Err(e),
    };
    match sample {
        Ok(Some(s)) => {
            println!(
                "slot {}: {}, wal_status {}, safe_wal_size {}",
                config.source.slot,
                if s.active { "active" } else { "inactive" },
                s.wal_status.as_deref().unwrap_or("unknown"),
                s.safe_wal_size
                    .map_or("unlimited".to_string(), |b| format!("{b} bytes"))
            );
            println!(
                "confirmed_flush_lsn {}, current WAL {}, lag {} bytes",
                s.confirmed_flush_lsn
                    .map_or("none".to_string(), |l| l.to_string()),
                s.current_wal_lsn,
                s.lag_bytes()
            );
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!(
                "walsweep status: slot {:?} does not exist on {} (walsweep run creates it)",
                config.source.slot,
                params.target()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("walsweep status: {}", display_chain(&e));
            ExitCode::FAILURE
        }
    }
}
