//! The `walsweep` command line: parses arguments and hands each subcommand to its handler in
//! `walsweep::cli`, which owns everything from loading the config to the exit code (explain's
//! handler is still here until `cli/explain.rs` is split).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use walsweep::cli;
use walsweep::cli::{init_tracing, LogFormat};
use walsweep::plan::Op;

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
enum OpArg {
    Insert,
    Update,
    Delete,
    Truncate,
}

#[derive(Subcommand)]
enum Command {
    /// Follow the slot and apply committed changes to Redis until SIGINT/SIGTERM.
    Run {
        /// Path to the TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the config, then (unless --no-environment) the database and Redis.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Only check the file.
        #[arg(long)]
        no_environment: bool,
        /// Fail on warnings too.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Print the effects one row change would produce, and which rule produces each.
    Explain {
        #[arg(long, short)]
        config: PathBuf,
        /// Table, `schema.table` or `table` (public).
        #[arg(long)]
        table: String,
        #[arg(long, value_enum)]
        op: OpArg,
        /// Old row as a JSON object, e.g. '{"id": 1, "slug": "a"}'.
        #[arg(long)]
        old: Option<String>,
        /// New row as a JSON object.
        #[arg(long)]
        new: Option<String>,
    },
    /// Load every [[table.mirror]] into Redis from a consistent snapshot (creating the slot
    /// when missing, so streaming continues exactly where the load ends). Stop walsweep first.
    Snapshot {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Wait until walsweep has applied everything up to an LSN (read-your-writes): exit 0
    /// when its published position reaches it, 3 on timeout.
    Wait {
        #[arg(long, short)]
        config: PathBuf,
        /// The LSN right after your commit: `SELECT pg_current_wal_insert_lsn()` (0/16B3748)
        /// or `SELECT pg_current_wal_insert_lsn() - '0/0'` (a decimal number).
        #[arg(long)]
        lsn: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Compare every mirror and index with the database at a consistent point (walsweep must
    /// be running): exit 0 when they agree, 1 on drift (printed per table with examples), 2
    /// when the check could not run, 3 when walsweep did not apply up to the point in time.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (`schema.table` or `table`); repeatable.
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Check this many random rows per table (and as many stored entries per mirror and
        /// index) instead of all of them.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        sample: Option<u64>,
        /// How long to wait for walsweep to apply up to each snapshot.
        #[arg(long, default_value_t = 30000)]
        timeout_ms: u64,
    },
    /// Print the slot's state and lag, then exit.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create (or with --print, print) the publication, replica identities and a role.
    Setup {
        #[arg(long, short)]
        config: PathBuf,
        /// Print the SQL instead of running it.
        #[arg(long)]
        print: bool,
        /// Name of the least-privilege role walsweep should connect as.
        #[arg(long, default_value = "walsweep")]
        role: String,
    },
    /// Print committed transactions as they are decoded, with typed values (never touches
    /// Redis). Reads through [source] publication; uses a temporary slot unless --slot.
    Tail {
        #[arg(long, short)]
        config: PathBuf,
        /// Read this existing pgoutput slot (never confirmed, so it does not move).
        #[arg(long, conflicts_with = "temporary")]
        slot: Option<String>,
        /// Use a temporary slot, dropped when tail exits (the default).
        #[arg(long)]
        temporary: bool,
        /// Only this table (`schema.table` or `table`); repeatable.
        #[arg(long = "table")]
        tables: Vec<String>,
        #[arg(long, value_enum, default_value_t = walsweep::cli::tail::TailFormat::Json)]
        format: walsweep::cli::tail::TailFormat,
        /// Skip transactions committing before this LSN (e.g. 0/16B3748).
        #[arg(long)]
        from_lsn: Option<walsweep::pg::Lsn>,
        /// Exit after this many transactions.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
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
        // On a worker thread rather than this one: a task in `block_on` is woken through this
        // thread's own park, so every socket read of the replication stream cost a second
        // thread wake-up (the worker that saw the socket ready, then this thread); draining
        // one-row transactions, those wake-ups were much of walsweep's CPU.
        Command::Run { config } => runtime.block_on(async move {
            match tokio::spawn(async move { cli::run::command(&config).await }).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("walsweep: the daemon task failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::Check {
            config,
            no_environment,
            deny_warnings,
        } => runtime.block_on(cli::check::command(&config, no_environment, deny_warnings)),
        Command::Explain {
            config,
            table,
            op,
            old,
            new,
        } => walsweep::cli::explain::command(
            &config,
            &table,
            op_of(op),
            old.as_deref(),
            new.as_deref(),
        ),
        Command::Status { config } => runtime.block_on(cli::status::command(&config)),
        Command::Verify {
            config,
            tables,
            sample,
            timeout_ms,
        } => runtime.block_on(cli::verify::command(
            &config,
            cli::verify::Options {
                tables,
                sample,
                timeout: std::time::Duration::from_millis(timeout_ms),
            },
        )),
        Command::Wait {
            config,
            lsn,
            timeout_ms,
        } => runtime.block_on(cli::wait::command(
            &config,
            &lsn,
            std::time::Duration::from_millis(timeout_ms),
        )),
        Command::Snapshot { config } => runtime.block_on(cli::snapshot::command(&config)),
        Command::Setup {
            config,
            print,
            role,
        } => runtime.block_on(cli::setup::command(&config, print, &role)),
        Command::Tail {
            config,
            slot,
            temporary: _,
            tables,
            format,
            from_lsn,
            limit,
        } => runtime.block_on(cli::tail::command(
            &config, slot, tables, format, from_lsn, limit,
        )),
    }
}

/// Clap's spelling of the operation, as the planner names it.
fn op_of(op: OpArg) -> Op {
    match op {
        OpArg::Insert => Op::Insert,
        OpArg::Update => Op::Update,
        OpArg::Delete => Op::Delete,
        OpArg::Truncate => Op::Truncate,
    }
}
