//! walsweep itself, in-process, with rules into Redis, and the waits tests need around it:
//! shared by every test binary that runs the daemon against the private servers.

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use tokio::task::JoinHandle;

use walsweep::config::Config;
use walsweep::pipeline::{self, PipelineError, RunSummary, ShutdownHandle};

use super::{Postgres, Redis};

pub struct Daemon {
    pub shutdown: ShutdownHandle,
    pub task: JoinHandle<Result<RunSummary, PipelineError>>,
}

/// Parses a config whose `[source]`/`[redis]` point at the test servers (publication `pub`,
/// fast status updates and reconnects); `rest` is the `[matroska]`/`[[table]]` part.
pub fn config(pg: &Postgres, redis: &Redis, db: &str, slot: &str, rest: &str) -> Config {
    let text = format!(
        "[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"pub\"\nstatus_interval_ms = 200\n\
         reconnect_min_ms = 50\nreconnect_max_ms = 500\n[redis]\nurl = \"{}\"\ntimeout_ms = 2000\n{rest}",
        pg.url(db),
        redis.url()
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// Runs walsweep with the config, exactly as `walsweep run` does (`walsweep::pipeline::daemon::run`).
pub fn start(config: Config) -> Daemon {
    let (shutdown, signal) = pipeline::shutdown_channel();
    let task = tokio::spawn(async move { walsweep::pipeline::daemon::run(&config, signal).await });
    Daemon { shutdown, task }
}

impl Daemon {
    /// Asks for a clean stop and waits for it.
    pub async fn stop(self) -> RunSummary {
        self.shutdown.request();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("walsweep stops within 30s")
            .expect("no panic")
            .expect("no error")
    }
}

/// Polls `cond` every 10 ms until true, panicking after `secs`.
pub async fn wait_for<F, Fut>(secs: u64, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "condition not met within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until a walsender streams from `slot` (so later writes are seen by this run).
pub async fn wait_streaming(client: &tokio_postgres::Client, slot: &str) {
    wait_for(30, || async {
        client
            .query_opt(
                "SELECT 1 FROM pg_stat_replication r JOIN pg_replication_slots s \
                 ON s.active_pid = r.pid WHERE s.slot_name = $1 AND r.state = 'streaming'",
                &[&slot],
            )
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
}

pub async fn exists(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    conn.exists(key).await.expect("EXISTS")
}

/// Waits until `key` is gone (walsweep applied the change that removes it); returns when.
pub async fn wait_gone(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    secs: u64,
) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if !exists(conn, key).await {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{key} still present after {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
