//! walsweep itself, in-process, with rules into Redis, and the waits tests need around it:
//! shared by every test binary that runs the daemon against the private servers.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use walsweep::config::Config;
use walsweep::pipeline::{self, PipelineError, RunSummary, ShutdownHandle};

use super::{scratch, Postgres, Redis};

pub struct Daemon {
    pub shutdown: ShutdownHandle,
    pub task: JoinHandle<Result<RunSummary, PipelineError>>,
}

/// Parses a config whose `[source]`/`[redis]` point at the test servers (publication `pub`,
/// fast status updates and reconnects); `rest` is the `[matroska]`/`[[table]]` part.
pub fn config(pg: &Postgres, redis: &Redis, db: &str, slot: &str, rest: &str) -> Config {
    let text = config_text(pg, &redis.url(), db, slot, rest);
    Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// The text `config` parses, with Redis at `redis_url` (e.g. with an ACL user in it).
pub fn config_text(pg: &Postgres, redis_url: &str, db: &str, slot: &str, rest: &str) -> String {
    format!(
        "[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"pub\"\nstatus_interval_ms = 200\n\
         reconnect_min_ms = 50\nreconnect_max_ms = 500\n[redis]\nurl = \"{redis_url}\"\ntimeout_ms = 2000\n{rest}",
        pg.url(db),
    )
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

/// The real `walsweep run` process, for what only a process shows: its exit after SIGTERM,
/// and SIGKILL (no destructor, no drain). Its log is printed when a test panics.
pub struct Process {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Process {
    /// Starts `walsweep run` on `config` (text as `config_text` makes it; the metrics endpoint
    /// is turned off so parallel tests never compete for its port).
    pub fn start(config: &str) -> Process {
        let dir = scratch::instance_dir("walsweep-run", false);
        let path = dir.path().join("walsweep.toml");
        std::fs::write(&path, format!("[metrics]\nlisten = \"\"\n{config}"))
            .expect("write walsweep.toml");
        let log = std::fs::File::create(dir.path().join("walsweep.log")).expect("walsweep.log");
        let child = Command::new(env!("CARGO_BIN_EXE_walsweep"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "walsweep=debug")
            .env_remove(walsweep::config::SOURCE_URL_ENV)
            .env_remove(walsweep::config::REDIS_URL_ENV)
            // The config says everything; the machine's libpq settings must not leak in.
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGUSER")
            .env_remove("PGDATABASE")
            .env_remove("PGPASSWORD")
            .env_remove("PGPASSFILE")
            .env_remove("PGSSLMODE")
            .env_remove("PGSSLROOTCERT")
            .env_remove("PGAPPNAME")
            .env_remove("PGCONNECT_TIMEOUT")
            .env_remove("PGTARGETSESSIONATTRS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn walsweep");
        Process {
            child: Some(child),
            dir,
        }
    }

    /// SIGTERM, then waits (up to 30 s) for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        self.stop()
    }

    /// `terminate`, and the whole log (for what the daemon must never print).
    pub fn terminate_with_log(mut self) -> (ExitStatus, String) {
        let status = self.stop();
        (status, self.log())
    }

    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("walsweep runs");
        scratch::signal(child.id(), "TERM").expect("kill -TERM walsweep");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait walsweep") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "walsweep did not exit within 30s of SIGTERM\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: no drain, nothing run on the way out (a crash).
    pub fn kill(mut self) {
        let mut child = self.child.take().expect("walsweep runs");
        scratch::signal(child.id(), "KILL").expect("kill -KILL walsweep");
        let _ = child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("walsweep.log")).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        scratch::log_tail(&self.dir.path().join("walsweep.log"), 60)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
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

/// `EXISTS key`. Right after a restart Redis answers `LOADING` while it reads its dump (it
/// already answers the `INFO` that start-up waits for): that is retried for up to 10s.
pub async fn exists<C: redis::AsyncCommands>(conn: &mut C, key: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match conn.exists(key).await {
            Ok(found) => return found,
            Err(e) if e.code() == Some("LOADING") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("EXISTS {key}: {e}"),
        }
    }
}

/// Waits until `key` is gone (walsweep applied the change that removes it); returns when.
pub async fn wait_gone<C: redis::AsyncCommands>(conn: &mut C, key: &str, secs: u64) -> Instant {
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

/// `pg_current_wal_insert_lsn() - '0/0'` on `client`, right after its commit: what an app waits
/// for walsweep's applied position to reach.
pub async fn insert_lsn(client: &tokio_postgres::Client) -> u64 {
    client
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::text",
            &[],
        )
        .await
        .expect("pg_current_wal_insert_lsn()")
        .get::<_, String>(0)
        .parse()
        .expect("a decimal LSN")
}
