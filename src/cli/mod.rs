//! The subcommands behind the `walsweep` binary, one file each, and what they share: logging
//! setup, config loading and the exit codes that tell a wrong config from a failed run.

pub mod check;
pub mod explain;
pub mod run;
pub mod setup;
pub mod snapshot;
pub mod status;
pub mod tail;
pub mod verify;
pub mod wait;

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Config, ConfigError};
use crate::plan::rules::Rules;
use crate::telemetry::log::display_chain;

/// sysexits' EX_CONFIG: the configuration is wrong, retrying will not help.
pub(crate) const EXIT_CONFIG: u8 = 78;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Logs go to stderr so that stdout carries only a subcommand's output.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Exits EX_CONFIG so that a supervisor does not restart walsweep into the same error.
pub(crate) fn config_failure(err: &ConfigError) -> ExitCode {
    eprintln!("walsweep: {}", display_chain(err));
    ExitCode::from(EXIT_CONFIG)
}

/// The config and its compiled rules; a rule that does not compile is a config error too.
pub(crate) fn load(path: &Path) -> Result<(Config, Rules), ExitCode> {
    let config = Config::load(path).map_err(|e| config_failure(&e))?;
    let rules = Rules::from_config(&config).map_err(|e| {
        eprintln!("walsweep: {}: {e}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })?;
    Ok((config, rules))
}
