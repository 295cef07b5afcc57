//! `walsweep run`: the daemon's process around `pipeline::daemon::run`: config and rules
//! checked before anything listens, the metrics endpoint, the Redis probe, SIGINT/SIGTERM as
//! shutdown requests, and the exit code the run ends with.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{config_failure, load, EXIT_CONFIG};
use crate::pipeline::{self, daemon, PipelineError, ShutdownHandle};
use crate::sink::redis::probe::probe_redis;
use crate::telemetry::http;
use crate::telemetry::log::display_chain;

/// Readiness must notice a Redis outage even while no change flows to the sink.
const REDIS_PROBE_INTERVAL: Duration = Duration::from_secs(2);

pub async fn command(path: &Path) -> ExitCode {
    let (config, _) = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    // Build once up front so a broken rule or Redis URL fails before anything listens.
    if let Err(e) = daemon::build(&config) {
        eprintln!("walsweep: {}", display_chain(&e));
        return ExitCode::from(EXIT_CONFIG);
    }
    if !config.metrics.listen.is_empty() {
        let recorder = http::install_recorder();
        match http::serve(&config.metrics.listen, recorder).await {
            Ok(addr) => tracing::info!(%addr, "serving /metrics, /healthz and /readyz"),
            Err(e) => {
                eprintln!("walsweep: {}", display_chain(&e));
                return ExitCode::FAILURE;
            }
        }
    }
    tokio::spawn(probe_redis(config.redis.clone(), REDIS_PROBE_INTERVAL));
    let (handle, shutdown) = pipeline::shutdown_channel();
    tokio::spawn(forward_signals(handle));
    match daemon::run(&config, shutdown).await {
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

/// Every signal is forwarded, not just the first: a second request stops at once instead of
/// draining.
async fn forward_signals(handle: ShutdownHandle) {
    let Ok(mut term) = signal(SignalKind::terminate()) else {
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
}
