//! The `walsweep` command line: parses arguments, loads config, starts telemetry and hands over
//! to `pipeline::run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use walsweep::config::{Config, ConfigError};
use walsweep::pipeline::{self, display_chain, PipelineError};
use walsweep::plan::touched::TouchedRowsPlanner;
use walsweep::sink::log::LogSink;

/// sysexits' EX_CONFIG: the configuration is wrong, retrying will not help.
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "walsweep",
    version,
    about = "Keeps Redis caches honest by following a Postgres logical replication slot"
)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Follow the slot and apply committed changes until SIGINT/SIGTERM.
    Run {
        /// Path to the TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walsweep: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run { config } => runtime.block_on(run(config)),
    }
}

async fn run(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    let (handle, shutdown) = pipeline::shutdown_channel();
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            tracing::error!("cannot install the SIGTERM handler");
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            handle.request();
        }
    });
    let tables = config.qualified_tables();
    let result = pipeline::run(
        &config.source,
        &tables,
        TouchedRowsPlanner::default(),
        LogSink,
        shutdown,
    )
    .await;
    match result {
        Ok(summary) => {
            tracing::info!(confirmed_lsn = %summary.confirmed_lsn, "walsweep stopped");
            ExitCode::SUCCESS
        }
        Err(PipelineError::Config(e)) => config_failure(&e),
        Err(e) => {
            tracing::error!(error = %display_chain(&e), "walsweep stopped");
            eprintln!("walsweep: {}", display_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn config_failure(err: &ConfigError) -> ExitCode {
    eprintln!("walsweep: {}", display_chain(err));
    ExitCode::from(EXIT_CONFIG)
}
