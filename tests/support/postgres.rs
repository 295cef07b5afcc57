//! A private Postgres server (wal_level=logical) per test.
//!
//! initdb is the slow part of booting a cluster (~0.5s), so it runs once per test process
//! into a template data dir; every [`Postgres`] gets a `cp -a` copy of it with its own port,
//! settings and pg_hba.conf. The server is run through `pg_ctl` (as the `postgres` OS user
//! when we are root, since Postgres refuses to run as root), so it is daemonized: `Drop` stops
//! it, also when a test panics, and a test process killed outright leaves it to the next
//! run's stale sweep (see [`super::scratch`]).

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::binaries::{pg_bindir, pg_lib_dir, pg_tool};
use super::scratch::{self, run, server_command};

/// The superuser initdb creates; trusted over TCP and the unix socket by default.
pub const SUPERUSER: &str = "postgres";

const HOST: &str = "127.0.0.1";

/// How long start-up or shutdown may take before we give up (normally milliseconds).
const START_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings every test server gets, before [`PostgresOptions::extra_settings`] (which may
/// override them, since later lines in postgresql.conf win).
const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("wal_level", "logical"),
    // Tiny, so that modest test transactions exceed it and get streamed/spilled.
    ("logical_decoding_work_mem", "64kB"),
    ("max_replication_slots", "20"),
    ("max_wal_senders", "20"),
    // Short, so tests about dead/silent replication connections finish quickly.
    ("wal_sender_timeout", "10s"),
    ("listen_addresses", HOST),
    // Durability is pointless for throw-away servers; these make writes and restarts fast.
    ("fsync", "off"),
    ("full_page_writes", "off"),
    // Deliberately *on*: with fsync=off a commit flush is just a write(), and with it off a
    // committed transaction is neither decodable (walsenders only send flushed WAL) until the
    // WAL writer's next round (up to ~600ms later), nor survives ShutdownMode::Immediate.
    ("synchronous_commit", "on"),
    ("shared_buffers", "32MB"),
    ("max_connections", "60"),
    ("TimeZone", "UTC"),
    ("log_timezone", "UTC"),
    // pg_ctl -l writes the server's stderr to server.log in the instance dir.
    ("logging_collector", "off"),
    ("log_line_prefix", "%m [%p] %q%u@%d "),
];

/// How [`Postgres::stop`] shuts the server down (`pg_ctl stop -m ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Clean shutdown: disconnects clients, runs a shutdown checkpoint.
    Fast,
    /// Crash-like: everything is killed at once, the next start runs crash recovery.
    Immediate,
}

impl ShutdownMode {
    fn as_arg(self) -> &'static str {
        match self {
            ShutdownMode::Fast => "fast",
            ShutdownMode::Immediate => "immediate",
        }
    }
}

/// Per-test deviations from the default server set-up.
#[derive(Debug, Clone, Default)]
pub struct PostgresOptions {
    /// Extra postgresql.conf settings, e.g. `("max_slot_wal_keep_size", "1MB")`. Applied after
    /// the defaults, so they override them.
    pub extra_settings: Vec<(String, String)>,
    /// Extra pg_hba.conf lines, placed before the default trust lines so they take precedence,
    /// e.g. `host all scram_user 127.0.0.1/32 scram-sha-256`.
    pub hba_extra: Vec<String>,
    /// `password_encryption` (`"md5"` or `"scram-sha-256"`), for tests that create users whose
    /// stored password must use a given method.
    pub password_encryption: Option<String>,
}

/// A running (or deliberately stopped) private Postgres server. Stopped with
/// `pg_ctl stop -m immediate` and deleted on drop.
pub struct Postgres {
    /// Instance dir (owned by the server user): `data/` and `server.log`. Removed on drop.
    dir: tempfile::TempDir,
    port: u16,
    /// Postmaster pid of the current (or, once stopped, the last) run.
    pid: u32,
    running: bool,
}

impl Postgres {
    /// Boots a server with the default options. Panics (with the server log's tail) if it
    /// can't.
    pub fn start() -> Postgres {
        Self::start_with(PostgresOptions::default())
    }

    /// Boots a server with `opts`. Panics (with the server log's tail) if it can't.
    pub fn start_with(opts: PostgresOptions) -> Postgres {
        let template = template_data_dir();
        // The free port can be taken by someone else before the postmaster binds it; only
        // that case is worth another try.
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let dir = scratch::instance_dir("pg-", true);
            let mut pg = Postgres {
                dir,
                port: scratch::free_port(),
                pid: 0,
                running: false,
            };
            run(Command::new("cp")
                .arg("-a")
                .arg(template)
                .arg(pg.data_dir()))
            .unwrap_or_else(|e| panic!("copying the initdb template: {e}"));
            pg.write_config(&opts);
            match pg.pg_ctl_start() {
                Ok(()) => return pg,
                Err(e) if attempt < ATTEMPTS && pg.log_mentions_port_in_use() => {
                    eprintln!(
                        "walsweep test support: port {} taken, retrying: {e}",
                        pg.port
                    );
                }
                Err(e) => {
                    // Dropped first so its Drop does not print the log tail a second time.
                    drop(pg);
                    panic!("{e}");
                }
            }
        }
        unreachable!("the last attempt returns or panics");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &str {
        HOST
    }

    /// `postgres://postgres@127.0.0.1:PORT/db` (the trusted superuser).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@{HOST}:{}/{}", self.port, encode(db))
    }

    /// Connection URL for another user, percent-encoding user, password and database.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@{HOST}:{}/{}",
            encode(user),
            encode(password),
            self.port,
            encode(db)
        )
    }

    /// `CREATE DATABASE "name"`. Blocking (psql), which is fine in tests.
    pub fn create_database(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        );
    }

    /// A superuser client on `db`; its connection task is spawned on the current tokio runtime
    /// and ends when the client is dropped or the server goes away.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let url = self.url(db);
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // Expected when a test stops the server under a live client.
                tracing::debug!("test client connection to {url} ended: {e}");
            }
        });
        client
    }

    /// Runs `sql` (may hold several statements and psql meta-commands) through
    /// Writes and recycles WAL in `db` until `slot` is `lost` (the server must run with a small
    /// `max_slot_wal_keep_size`), as when a consumer stays away too long. Panics after 60 s.
    pub fn lose_slot(&self, db: &str, slot: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            self.psql(
                db,
                "CREATE TABLE IF NOT EXISTS wal_filler (id int, payload text); \
                 INSERT INTO wal_filler SELECT g, repeat('x', 500) FROM generate_series(1, 5000) g; \
                 SELECT pg_switch_wal(); CHECKPOINT;",
            );
            let status = self.psql(
                db,
                &format!("SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'"),
            );
            if status == "lost" {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "slot {slot} never got lost (wal_status {status})"
            );
        }
    }

    /// `psql -XAtq -v ON_ERROR_STOP=1` as the superuser on `db` and returns its stdout with
    /// trailing newlines trimmed: unaligned, tuples only, so `SHOW wal_level` gives `logical`.
    /// Panics with psql's stderr on any error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let psql = pg_tool("psql");
        let mut cmd = Command::new(&psql);
        if pg_lib_dir().is_some() {
            // The machine's psql (a `scripts/ensure-pg` package has none) with its own libpq,
            // not the package's, should someone have exported the package's lib dir.
            cmd.env_remove("LD_LIBRARY_PATH");
        }
        let mut child = cmd
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                db,
                "-f",
                "-",
            ])
            .env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS")
            .env_remove("PGSSLMODE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", psql.display()));
        // Feed stdin from another thread: a large script and a large result could otherwise
        // deadlock on full pipes.
        let mut stdin = child.stdin.take().expect("piped stdin");
        let script = sql.to_owned();
        let feeder = std::thread::spawn(move || {
            // psql exiting early (ON_ERROR_STOP) closes the pipe; its stderr says why.
            let _ = stdin.write_all(script.as_bytes());
        });
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for psql: {e}"));
        let _ = feeder.join();
        if !out.status.success() {
            panic!(
                "psql on port {} db {db} failed ({}):\n{}\nSQL:\n{sql}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        stdout.truncate(stdout.trim_end_matches('\n').len());
        stdout
    }

    /// Stops the server and waits until it is down. A no-op when already stopped, including
    /// when the test killed the postmaster itself.
    pub fn stop(&mut self, mode: ShutdownMode) {
        if !self.is_running() {
            self.running = false;
            return;
        }
        self.pg_ctl_stop(mode).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts the server again on the same port and data dir (stopping it with
    /// [`ShutdownMode::Fast`] first if it is still running). Panics if the port has been
    /// taken meanwhile or the server does not come up.
    pub fn restart(&mut self) {
        self.stop(ShutdownMode::Fast);
        self.pg_ctl_start().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Replaces the database behind this server's port with a brand-new cluster (fresh from
    /// the template: same system identifier, timeline 1, WAL from the start, no slots, nothing
    /// but the default databases), as after a restore or a move to another machine under the
    /// same address. `opts` as for `start_with`.
    pub fn replace_with_new_cluster(&mut self, opts: &PostgresOptions) {
        self.stop(ShutdownMode::Fast);
        let data = self.data_dir();
        run(Command::new("rm").arg("-rf").arg(&data))
            .unwrap_or_else(|e| panic!("removing {}: {e}", data.display()));
        run(Command::new("cp")
            .arg("-a")
            .arg(template_data_dir())
            .arg(&data))
        .unwrap_or_else(|e| panic!("copying the initdb template: {e}"));
        self.write_config(opts);
        self.pg_ctl_start().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Boots a hot standby that streams this server's WAL (physical replication), from a
    /// copy of its data dir made while it is briefly stopped (no `pg_basebackup` needed: the
    /// `scripts/ensure-pg` packages have none). The standby gets `opts` on top of this server's
    /// settings, its own port, `standby.signal`, and a `primary_conninfo` naming `dbname` (slot
    /// synchronization needs one); with `physical_slot`, that slot is created here first and
    /// the standby streams through it. Replication slots are not copied. Panics if it can't.
    pub fn start_standby(
        &mut self,
        dbname: &str,
        physical_slot: Option<&str>,
        opts: &PostgresOptions,
    ) -> Postgres {
        if let Some(slot) = physical_slot {
            self.psql(
                "postgres",
                &format!("SELECT pg_create_physical_replication_slot('{slot}', true)"),
            );
        }
        self.stop(ShutdownMode::Fast);
        let mut standby = Postgres {
            dir: scratch::instance_dir("pg-standby-", true),
            port: scratch::free_port(),
            pid: 0,
            running: false,
        };
        let data = standby.data_dir();
        run(Command::new("cp").arg("-a").arg(self.data_dir()).arg(&data))
            .unwrap_or_else(|e| panic!("copying the primary's data dir: {e}"));
        self.pg_ctl_start().unwrap_or_else(|e| panic!("{e}"));
        // A copied slot would hold WAL on the standby and pass for one of its own.
        for entry in fs::read_dir(data.join("pg_replslot")).into_iter().flatten() {
            let path = entry.expect("pg_replslot entry").path();
            let _ = fs::remove_dir_all(&path);
        }
        let mut settings = vec![
            (
                "primary_conninfo".to_string(),
                format!(
                    "host={HOST} port={} user={SUPERUSER} dbname={dbname} application_name=standby",
                    self.port
                ),
            ),
            ("hot_standby".to_string(), "on".to_string()),
            ("hot_standby_feedback".to_string(), "on".to_string()),
        ];
        if let Some(slot) = physical_slot {
            settings.push(("primary_slot_name".to_string(), slot.to_string()));
        }
        settings.extend(opts.extra_settings.iter().cloned());
        standby.write_config(&PostgresOptions {
            extra_settings: settings,
            ..opts.clone()
        });
        let signal = data.join("standby.signal");
        fs::write(&signal, "").unwrap_or_else(|e| panic!("writing {}: {e}", signal.display()));
        scratch::give_to_server_user(&signal);
        standby.pg_ctl_start().unwrap_or_else(|e| panic!("{e}"));
        standby
    }

    /// Promotes this standby to a primary (`pg_ctl promote`) and waits until it accepts writes.
    pub fn promote(&self) {
        run(pg_server_command("pg_ctl")
            .args(["promote", "-w", "-s", "-t", "30", "-D"])
            .arg(self.data_dir()))
        .unwrap_or_else(|e| {
            panic!(
                "promoting the standby on port {}: {e}\n{}",
                self.port,
                scratch::log_tail(&self.log_path(), 30)
            )
        });
    }

    /// Waits until this standby has replayed everything `primary` has written so far.
    pub fn wait_replayed(&self, primary: &Postgres) {
        let target = primary.psql("postgres", "SELECT pg_current_wal_lsn()");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let caught_up = self.psql(
                "postgres",
                &format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"),
            );
            if caught_up == "t" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the standby on port {} did not replay up to {target} within 60 s\n{}",
                self.port,
                scratch::log_tail(&self.log_path(), 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Postmaster pid of the current run (of the last run, once stopped).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the postmaster started last is still alive.
    pub fn is_running(&self) -> bool {
        self.running && scratch::process_alive(self.pid)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log file (everything the postmaster and backends write to stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn write_config(&self, opts: &PostgresOptions) {
        let data = self.data_dir();
        let mut conf = String::from("\n# walsweep test support\n");
        let mut set = |key: &str, value: &str| {
            let value = value.replace('\\', "\\\\").replace('\'', "''");
            let _ = writeln!(conf, "{key} = '{value}'");
        };
        for (key, value) in DEFAULT_SETTINGS {
            set(key, value);
        }
        set("port", &self.port.to_string());
        // Keep the socket private to this instance; if the path would exceed the unix socket
        // path limit (~107 bytes), go TCP-only rather than fail.
        let socket_dir = self.dir.path().to_string_lossy().into_owned();
        let socket_path_len = socket_dir.len() + "/.s.PGSQL.65535".len();
        set(
            "unix_socket_directories",
            if socket_path_len < 100 {
                &socket_dir
            } else {
                ""
            },
        );
        if let Some(method) = &opts.password_encryption {
            set("password_encryption", method);
        }
        for (key, value) in &opts.extra_settings {
            set(key, value);
        }
        // Appending (not recreating) keeps the file owned by the server user.
        fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .unwrap_or_else(|e| panic!("writing {}/postgresql.conf: {e}", data.display()));

        // "all" in the database column does not match physical replication connections, hence
        // the explicit replication lines.
        let mut hba = String::from("# walsweep test support: hba_extra first, then trust\n");
        for line in &opts.hba_extra {
            hba.push_str(line);
            hba.push('\n');
        }
        hba.push_str(
            "local all all trust\n\
             host all all 127.0.0.1/32 trust\n\
             local replication all trust\n\
             host replication all 127.0.0.1/32 trust\n",
        );
        // Truncating the existing file keeps its owner (the server user).
        fs::write(data.join("pg_hba.conf"), hba)
            .unwrap_or_else(|e| panic!("writing {}/pg_hba.conf: {e}", data.display()));
    }

    /// `pg_ctl start` without its own wait (`-W`), then polls `postmaster.pid` every few ms:
    /// pg_ctl's built-in wait polls only every 100ms, which was a third of a boot.
    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let data = self.data_dir();
        let log = self.log_path();
        let fail = |what: String| {
            format!(
                "starting Postgres on port {} in {}: {what}\n{}",
                self.port,
                data.display(),
                scratch::log_tail(&log, 40)
            )
        };
        // A postmaster killed outright (e.g. by a test simulating a crash) leaves its pid file
        // (saying "ready", which must not pass for the new server below) and socket lock
        // file behind. Postgres would take them over itself, except that it probes the old
        // pid with kill(0), which succeeds while the dead postmaster is an unreaped zombie, and
        // that it refuses to start while the old children still hold shared memory.
        let pid_file = data.join("postmaster.pid");
        if pid_file.exists() {
            let deadline = Instant::now() + START_STOP_TIMEOUT;
            loop {
                let left = scratch::processes_in(&data);
                if left.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(fail(format!(
                        "processes {left:?} of an earlier server still run in the data dir"
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let socket = format!(".s.PGSQL.{}", self.port);
            for stale in [
                pid_file.clone(),
                self.dir.path().join(format!("{socket}.lock")),
                self.dir.path().join(socket),
            ] {
                match fs::remove_file(&stale) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(fail(format!("removing stale {}: {e}", stale.display()))),
                }
            }
        }
        // Only log lines of this start count (restart appends to the same log).
        let log_start = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        run(pg_server_command("pg_ctl")
            .args(["start", "-W", "-s", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(&log))
        .map_err(&fail)?;

        let deadline = Instant::now() + START_STOP_TIMEOUT;
        let mut postmaster = None;
        loop {
            // postmaster.pid: line 1 is the pid, line 8 the status, "ready" once it accepts
            // connections. It is written before the sockets are opened.
            if let Ok(text) = fs::read_to_string(&pid_file) {
                let mut lines = text.lines();
                if let Some(pid) = lines.next().and_then(|l| l.trim().parse::<u32>().ok()) {
                    postmaster = Some(pid);
                    if lines.nth(6).map(str::trim) == Some("ready") {
                        self.pid = pid;
                        self.running = true;
                        return Ok(());
                    }
                }
            }
            match postmaster {
                Some(pid) if !scratch::process_alive(pid) => {
                    return Err(fail(format!("postmaster {pid} exited during start-up")));
                }
                Some(_) => {}
                // Died before even writing its pid file (bad setting, unusable data dir). Only
                // checked until the pid file shows up: later, clients connecting too early
                // (e.g. walsweep retrying during a restart) log harmless FATALs.
                None => {
                    if log_since(&log, log_start).contains("FATAL:") {
                        return Err(fail("postmaster failed before it was ready".into()));
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(fail(format!("not ready after {START_STOP_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `pg_ctl stop` without its own wait (`-W`, see [`Self::pg_ctl_start`]), then waits for
    /// the postmaster process itself to be gone, so callers can rely on that.
    fn pg_ctl_stop(&mut self, mode: ShutdownMode) -> Result<(), String> {
        let fail = |what: String| {
            format!(
                "stopping Postgres (-m {}) on port {}: {what}\n{}",
                mode.as_arg(),
                self.port,
                scratch::log_tail(&self.log_path(), 40)
            )
        };
        let pid = scratch::read_pid_file(&self.data_dir().join("postmaster.pid"))
            .map_err(|e| fail(format!("reading postmaster.pid: {e}")))?;
        run(pg_server_command("pg_ctl")
            .args(["stop", "-W", "-s", "-m", mode.as_arg(), "-D"])
            .arg(self.data_dir()))
        .map_err(&fail)?;
        if !scratch::wait_gone(pid, START_STOP_TIMEOUT) {
            return Err(fail(format!(
                "postmaster {pid} still running after {START_STOP_TIMEOUT:?}"
            )));
        }
        self.running = false;
        Ok(())
    }

    fn log_mentions_port_in_use(&self) -> bool {
        fs::read_to_string(self.log_path())
            .map(|log| log.contains("Address already in use"))
            .unwrap_or(false)
    }
}

impl Drop for Postgres {
    /// Never panics: a panic while unwinding would abort the whole test binary. The instance
    /// dir goes with the `TempDir` field afterwards.
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: the server's view is often the explanation.
            eprintln!(
                "Postgres on port {}:\n{}",
                self.port,
                scratch::log_tail(&self.log_path(), 30)
            );
        }
        // Go by the pid file rather than `running`: it also catches a server whose start
        // timed out but came up anyway, and skips one the test killed itself.
        let data = self.data_dir();
        let Ok(pid) = scratch::read_pid_file(&data.join("postmaster.pid")) else {
            return;
        };
        if !scratch::process_runs_in(pid, &data) {
            return;
        }
        if let Err(e) = self.pg_ctl_stop(ShutdownMode::Immediate) {
            eprintln!("walsweep test support: {e}");
            let _ = scratch::signal(pid, "KILL");
            let _ = scratch::wait_gone(pid, Duration::from_secs(5));
        }
    }
}

/// A server tool (`initdb`, `pg_ctl`) of [`pg_bindir`] as the server user. A
/// `scripts/ensure-pg` package gets its `LD_LIBRARY_PATH` through `env`, after `runuser`,
/// so that it reaches the tool (and the `postgres` pg_ctl starts) but nothing else.
fn pg_server_command(tool: &str) -> Command {
    let program = pg_bindir().join(tool);
    match pg_lib_dir() {
        None => server_command(&program),
        Some(lib) => {
            let mut cmd = server_command(Path::new("/usr/bin/env"));
            let mut assignment = std::ffi::OsString::from("LD_LIBRARY_PATH=");
            assignment.push(lib);
            cmd.arg(assignment).arg(program);
            cmd
        }
    }
}

/// The initdb'ed template data dir, created on first use (once per test process, so per
/// Postgres major: a process uses one).
fn template_data_dir() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = scratch::scratch_root().join("template-pg");
        let data = dir.join("data");
        // A previous attempt in this process may have panicked half-way.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        scratch::give_to_server_user(&dir);
        run(pg_server_command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C"])
            // No fsync: a crash of the machine makes the template irrelevant anyway.
            .args(["--no-sync", "--no-instructions"])
            // 1MB instead of 16MB WAL segments: a smaller dir to copy per server (cp is most
            // of a boot), and slot/WAL-retention tests (max_slot_wal_keep_size) need to write
            // far less WAL to cross segment boundaries.
            .arg("--wal-segsize=1"))
        .unwrap_or_else(|e| panic!("initdb of the test template cluster: {e}"));
        data
    })
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for URL user/password/db.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// What was appended to a log file since it was `offset` bytes long.
fn log_since(path: &Path, offset: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
