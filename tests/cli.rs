//! The `walsweep` binary itself: exit codes, messages, and the commands that talk to a live
//! database (`check`, `setup`, `status`, `run` with SIGTERM).

mod support;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{Postgres, Redis};

const BIN: &str = env!("CARGO_BIN_EXE_walsweep");

fn write_config(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("walsweep.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn walsweep(args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("WALSWEEP_SOURCE_URL")
        .env_remove("WALSWEEP_REDIS_URL");
    for var in LIBPQ_ENV {
        command.env_remove(var);
    }
    command.output().expect("run walsweep")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const RULES: &str = r#"
[[table]]
name = "public.articles"
keys = ["article:{id}", "article:slug:{slug}"]
deps = ["id:article:{id}"]
[[table.scope]]
name = "Article"
columns = ["category"]
"#;

fn config_text(pg: &Postgres, redis_url: &str, rules: &str) -> String {
    format!(
        "[source]\nurl = \"{}\"\nslot = \"cli\"\npublication = \"pub\"\n[redis]\nurl = \"{redis_url}\"\n\
         timeout_ms = 500\n[metrics]\nlisten = \"127.0.0.1:0\"\n{rules}",
        pg.url("postgres")
    )
}

#[test]
fn config_errors_exit_78_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "[source]\nurl = \"postgres://u@h/db\"\nslott = \"x\"\n",
    );
    for cmd in ["run", "check", "status"] {
        let out = walsweep(&[cmd, "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(78), "{cmd}: {}", text(&out));
        let msg = text(&out);
        assert!(
            msg.contains("walsweep.toml:3: toml: unknown field `slott`"),
            "{cmd}: {msg}"
        );
    }
    let out = walsweep(&["check", "--config", "/nonexistent/walsweep.toml"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out).contains("cannot read config file /nonexistent/walsweep.toml"),
        "{}",
        text(&out)
    );
}

#[test]
fn check_reports_every_environment_problem_with_its_fix_then_passes_after_setup() {
    support::init_tracing();
    // Bounded slot WAL, as in production: unbounded is a warning of its own (below).
    let pg = Postgres::start_with(support::PostgresOptions {
        extra_settings: vec![("max_slot_wal_keep_size".into(), "1GB".into())],
        ..Default::default()
    });
    pg.psql(
        "postgres",
        "CREATE TABLE articles (id int PRIMARY KEY, slug text, title text);
         CREATE TABLE other (id int PRIMARY KEY);
         CREATE PUBLICATION pub FOR TABLE other;",
    );
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let dead_redis = format!("redis://127.0.0.1:{}/0", support::scratch::free_port());
    let path = write_config(&dir, &config_text(&pg, &dead_redis, RULES));
    let out = walsweep(&["check", "--config", path.to_str().unwrap()]);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(78), "{msg}");
    for expected in [
        "scope[0] \"Article\" names column \"category\", which the table does not have",
        "replica identity DEFAULT does not send the old value of slug (used by keys[1] \"article:slug:{slug}\")",
        "run: ALTER TABLE \"public\".\"articles\" REPLICA IDENTITY FULL;",
        "not in publication \"pub\"; run: ALTER PUBLICATION \"pub\" ADD TABLE \"public\".\"articles\";",
        "Redis does not answer PING",
        "note: slot \"cli\" does not exist; walsweep run will create it",
    ] {
        assert!(msg.contains(expected), "missing {expected:?} in:\n{msg}");
    }
    // The file alone is fine.
    let out = walsweep(&[
        "check",
        "--config",
        path.to_str().unwrap(),
        "--no-environment",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    pg.psql("postgres", "ALTER TABLE articles ADD COLUMN category text");
    let path = write_config(&dir, &config_text(&pg, &redis.url(), RULES));
    let out = walsweep(&["setup", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let msg = text(&out);
    assert!(
        msg.contains("ALTER PUBLICATION \"pub\" ADD TABLE \"public\".\"articles\";"),
        "{msg}"
    );
    assert!(
        msg.contains("ALTER TABLE \"public\".\"articles\" REPLICA IDENTITY FULL;"),
        "{msg}"
    );
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT relreplident FROM pg_class WHERE relname = 'articles'"
        ),
        "f"
    );
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT rolreplication AND rolcanlogin FROM pg_roles WHERE rolname = 'walsweep'"
        ),
        "t"
    );
    let out = walsweep(&[
        "check",
        "--config",
        path.to_str().unwrap(),
        "--deny-warnings",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("walsweep.toml: ok"));
}

/// `walsweep check` with `args` on `path`: exit code and output.
fn check(path: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["check", "--config", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = walsweep(&all);
    (out.status.code(), text(&out))
}

#[test]
fn check_warns_about_source_settings_that_bite_later() {
    support::init_tracing();
    let pg = Postgres::start_with(support::PostgresOptions {
        extra_settings: vec![("wal_sender_timeout".into(), "1s".into())],
        ..Default::default()
    });
    pg.psql(
        "postgres",
        "CREATE TABLE articles (id int PRIMARY KEY, slug text, title text, category text);
         ALTER TABLE articles REPLICA IDENTITY FULL;
         CREATE PUBLICATION pub FOR TABLE articles;",
    );
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&pg, &redis.url(), RULES).replace(
        "slot = \"cli\"\n",
        "slot = \"cli\"\nstatus_interval_ms = 1000\n",
    );
    let path = write_config(&dir, &text);

    // The server's defaults: unbounded slot WAL; and a timeout shorter than 3 status updates.
    let (code, msg) = check(&path, &[]);
    assert_eq!(code, Some(0), "warnings do not fail the check:\n{msg}");
    for expected in [
        "warning: max_slot_wal_keep_size = -1 (unlimited)",
        "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'",
        "source.on_slot_lost = \"fail\" (as configured)",
        "warning: wal_sender_timeout = 1s is shorter than 3 status updates at \
         source.status_interval_ms = 1000",
        "Lower source.status_interval_ms to 333 or less, or raise wal_sender_timeout to at least \
         3000ms",
    ] {
        assert!(msg.contains(expected), "missing {expected:?} in:\n{msg}");
    }
    assert!(!msg.contains("standbys"), "{msg}");
    let (code, msg) = check(&path, &["--deny-warnings"]);
    assert_eq!(code, Some(78), "{msg}");
    assert!(msg.contains("0 error(s), 2 warning(s)"), "{msg}");

    // A physical slot is a standby's: walsweep's slot must be a failover slot to be there after
    // a failover (17+); before 17 there is no such thing, which is worth a note.
    pg.psql(
        "postgres",
        "SELECT 1 FROM pg_create_physical_replication_slot('standby1', true);
         SELECT 1 FROM pg_create_logical_replication_slot('cli', 'pgoutput');",
    );
    let major = support::binaries::server_major();
    let (code, msg) = check(&path, &[]);
    assert_eq!(code, Some(0), "{msg}");
    if major >= 17 {
        for expected in [
            "warning: slot \"cli\" is not a failover slot (pg_replication_slots.failover = \
             false) and the server has standbys (physical slot standby1)",
            "Set [source] failover = true",
            "walsweep setup --print",
        ] {
            assert!(msg.contains(expected), "missing {expected:?} in:\n{msg}");
        }
        pg.psql(
            "postgres",
            "SELECT pg_drop_replication_slot('cli');
             SELECT 1 FROM pg_create_logical_replication_slot('cli', 'pgoutput', false, false, true);",
        );
        let (_, msg) = check(&path, &[]);
        assert!(
            !msg.contains("failover slot"),
            "a failover slot is fine:\n{msg}"
        );
    } else {
        assert!(
            msg.contains(&format!(
                "note: the server has standbys (physical slot standby1), and Postgres {major} \
                 has no failover slots"
            )),
            "{msg}"
        );
        assert!(!msg.contains("warning: slot"), "{msg}");
    }

    // Fixed: bounded slot WAL, a timeout that fits the status updates, no standby.
    pg.psql(
        "postgres",
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1GB';
         ALTER SYSTEM SET wal_sender_timeout = '10s';
         SELECT pg_reload_conf();
         SELECT pg_drop_replication_slot('standby1');",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg.psql("postgres", "SHOW max_slot_wal_keep_size") != "1GB"
        || pg.psql("postgres", "SHOW wal_sender_timeout") != "10s"
    {
        assert!(Instant::now() < deadline, "the reload did not take");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, msg) = check(&path, &["--deny-warnings"]);
    assert_eq!(code, Some(0), "{msg}");
    assert!(!msg.contains("standbys"), "{msg}");
    assert!(msg.contains("walsweep.toml: ok"), "{msg}");
}

#[test]
fn run_stops_cleanly_on_sigterm_and_status_shows_the_slot() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.psql(
        "postgres",
        "CREATE TABLE articles (id int PRIMARY KEY, slug text, category text);
         ALTER TABLE articles REPLICA IDENTITY FULL;
         CREATE PUBLICATION pub FOR TABLE articles;",
    );
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &config_text(&pg, &redis.url(), RULES));

    let out = walsweep(&["status", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("slot \"cli\" does not exist"),
        "{}",
        text(&out)
    );

    let mut child = Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cli' AND active",
    ) != "1"
    {
        assert!(
            Instant::now() < deadline,
            "walsweep never started streaming"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pg.psql("postgres", "INSERT INTO articles VALUES (1, 'a', 'x')");
    let out = walsweep(&["status", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let msg = text(&out);
    assert!(
        msg.contains("slot cli: active, wal_status reserved"),
        "{msg}"
    );
    assert!(msg.contains("lag "), "{msg}");

    support::scratch::signal(child.id(), "TERM").unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "walsweep did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "exit {status:?}\n{stderr}");
    assert!(
        stderr.contains("stopped after draining committed work"),
        "{stderr}"
    );
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'cli'"
        ),
        "f"
    );
}

#[test]
fn explain_prints_effects_and_rejects_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &format!("[source]\nurl = \"postgres://u@127.0.0.1:1/db\"\n{RULES}"),
    );
    let out = walsweep(&[
        "explain",
        "--config",
        path.to_str().unwrap(),
        "--table",
        "articles",
        "--op",
        "delete",
        "--old",
        r#"{"id": 7, "slug": "s", "category": "c"}"#,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains("UNLINK article:7"), "{msg}");
    assert!(
        msg.contains("invalidate cache::rdep::condition:Article:&category=c&"),
        "{msg}"
    );
    let out = walsweep(&[
        "explain",
        "--config",
        path.to_str().unwrap(),
        "--table",
        "articles",
        "--op",
        "insert",
        "--new",
        "{not json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("--new is not a JSON object"),
        "{}",
        text(&out)
    );
}

/// A password that needs every escape: `:` and `\` in a password file, percent-encoding in a
/// URL.
const SCRAM_PASSWORD: &str = "s3:cr\\et-pw";

/// The libpq environment variables walsweep honours; a test sets the ones it means and clears
/// the rest, so the machine's own never leak in.
const LIBPQ_ENV: &[&str] = &[
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGAPPNAME",
    "PGCONNECT_TIMEOUT",
    "PGTARGETSESSIONATTRS",
];

/// A server where `scram_user` must log in with SCRAM over TCP and may replicate.
fn scram_server(extra_settings: &[(&str, &str)]) -> Postgres {
    let pg = Postgres::start_with(support::PostgresOptions {
        hba_extra: vec!["host all scram_user 127.0.0.1/32 scram-sha-256".into()],
        password_encryption: Some("scram-sha-256".into()),
        extra_settings: extra_settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    });
    // psql runs each statement on its own, so the SET covers the CREATE even on a server
    // whose default is read-only.
    pg.psql(
        "postgres",
        &format!(
            "SET default_transaction_read_only = off;
             CREATE ROLE scram_user LOGIN REPLICATION PASSWORD '{}';",
            SCRAM_PASSWORD.replace('\'', "''")
        ),
    );
    pg
}

/// `walsweep <cmd> --config <path>` with exactly `env` of the libpq variables and `HOME`.
fn walsweep_with_env(
    cmd: &str,
    path: &std::path::Path,
    home: &std::path::Path,
    env: &[(&str, String)],
) -> Output {
    let mut command = Command::new(BIN);
    command
        .args([cmd, "--config", path.to_str().unwrap()])
        .env_remove("WALSWEEP_SOURCE_URL")
        .env_remove("WALSWEEP_REDIS_URL")
        .env("HOME", home);
    for var in LIBPQ_ENV {
        command.env_remove(var);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run walsweep")
}

fn source_only_config(dir: &tempfile::TempDir, url: Option<&str>) -> PathBuf {
    let url = url.map(|u| format!("url = \"{u}\"\n")).unwrap_or_default();
    write_config(
        dir,
        &format!(
            "[source]\n{url}slot = \"cli\"\npublication = \"pub\"\n[redis]\n\
             url = \"redis://127.0.0.1:{}/0\"\ntimeout_ms = 200\n",
            support::scratch::free_port()
        ),
    )
}

#[test]
fn status_and_check_connect_with_only_libpq_environment_variables() {
    support::init_tracing();
    let pg = scram_server(&[]);
    pg.psql(
        "postgres",
        "SELECT 1 FROM pg_create_logical_replication_slot('cli', 'pgoutput')",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = source_only_config(&dir, None);
    let env = [
        ("PGHOST", pg.host().to_string()),
        ("PGPORT", pg.port().to_string()),
        ("PGUSER", "scram_user".to_string()),
        ("PGDATABASE", "postgres".to_string()),
        ("PGPASSWORD", SCRAM_PASSWORD.to_string()),
        ("PGAPPNAME", "from-pgappname".to_string()),
    ];
    let out = walsweep_with_env("status", &path, dir.path(), &env);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(0), "{msg}");
    assert!(msg.contains("slot cli: inactive"), "{msg}");

    // check says where each setting came from (Redis is down on purpose: only the source
    // matters here), and never shows the password.
    let out = walsweep_with_env("check", &path, dir.path(), &env);
    let msg = text(&out);
    assert!(!msg.contains("cannot open a SQL connection"), "{msg}");
    for expected in [
        &format!("host {} (PGHOST)", pg.host()),
        &format!("port {} (PGPORT)", pg.port()),
        "user scram_user (PGUSER)",
        "database postgres (PGDATABASE)",
        "password (PGPASSWORD)",
        "application_name from-pgappname (PGAPPNAME)",
        "sslmode prefer (default)",
    ] {
        assert!(msg.contains(expected), "missing {expected:?} in:\n{msg}");
    }
    assert!(!msg.contains(SCRAM_PASSWORD), "{msg}");

    // Without a password anywhere, the error says where one could come from.
    let out = walsweep_with_env("status", &path, dir.path(), &env[..4]);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(msg.contains("PGPASSWORD"), "{msg}");
}

#[test]
fn status_reads_the_password_from_a_password_file_unless_others_can_read_it() {
    use std::os::unix::fs::PermissionsExt;
    support::init_tracing();
    let pg = scram_server(&[]);
    pg.psql(
        "postgres",
        "SELECT 1 FROM pg_create_logical_replication_slot('cli', 'pgoutput')",
    );
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://scram_user@{}:{}/postgres", pg.host(), pg.port());
    let path = source_only_config(&dir, Some(&url));
    let escaped = SCRAM_PASSWORD.replace('\\', "\\\\").replace(':', "\\:");
    let pgpass = dir.path().join(".pgpass");
    std::fs::write(
        &pgpass,
        format!(
            "# other servers first: the first matching line wins\n\
             {host}:1:*:scram_user:wrong-port\n\
             {host}:{port}:otherdb:scram_user:wrong-db\n\
             *:{port}:*:scram_user:{escaped}\n\
             *:*:*:*:too-late\n",
            host = pg.host(),
            port = pg.port()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();

    // ~/.pgpass by default.
    let out = walsweep_with_env("status", &path, dir.path(), &[]);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(0), "{msg}");
    assert!(msg.contains("slot cli: inactive"), "{msg}");

    // PGPASSFILE names another file.
    let elsewhere = tempfile::tempdir().unwrap();
    let moved = elsewhere.path().join("passwords");
    std::fs::rename(&pgpass, &moved).unwrap();
    let out = walsweep_with_env(
        "status",
        &path,
        dir.path(),
        &[("PGPASSFILE", moved.display().to_string())],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Readable by others: ignored with a warning, as libpq does.
    std::fs::set_permissions(&moved, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = walsweep_with_env(
        "status",
        &path,
        dir.path(),
        &[("PGPASSFILE", moved.display().to_string())],
    );
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(msg.contains("group or world access"), "{msg}");
    assert!(msg.contains(&moved.display().to_string()), "{msg}");
    assert!(
        !msg.contains(SCRAM_PASSWORD) && !msg.contains(&escaped),
        "{msg}"
    );
}

#[test]
fn the_source_url_beats_libpq_environment_variables() {
    support::init_tracing();
    let pg = scram_server(&[]);
    pg.psql(
        "postgres",
        "SELECT 1 FROM pg_create_logical_replication_slot('cli', 'pgoutput')",
    );
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "{}?sslmode=disable",
        pg.url_as("scram_user", SCRAM_PASSWORD, "postgres")
    );
    let path = source_only_config(&dir, Some(&url));
    // Every one of these would make the connection fail if it were used.
    let dead_port = support::scratch::free_port().to_string();
    let env = [
        ("PGHOST", "192.0.2.1".to_string()),
        ("PGPORT", dead_port),
        ("PGUSER", "nobody".to_string()),
        ("PGDATABASE", "nowhere".to_string()),
        ("PGPASSWORD", "wrong".to_string()),
        ("PGSSLMODE", "require".to_string()),
    ];
    let out = walsweep_with_env("status", &path, dir.path(), &env);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(0), "{msg}");
    assert!(msg.contains("slot cli: inactive"), "{msg}");

    // The environment fills in only what the URL leaves out.
    let partial = format!("postgres://{}:{}/postgres", pg.host(), pg.port());
    let path = source_only_config(&dir, Some(&partial));
    let env = [
        ("PGHOST", "192.0.2.1".to_string()),
        ("PGUSER", "scram_user".to_string()),
        ("PGPASSWORD", SCRAM_PASSWORD.to_string()),
    ];
    let out = walsweep_with_env("status", &path, dir.path(), &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn run_skips_a_read_only_first_host_and_streams_from_the_writable_one() {
    support::init_tracing();
    let read_only = scram_server(&[("default_transaction_read_only", "on")]);
    let primary = scram_server(&[]);
    primary.psql(
        "postgres",
        "CREATE TABLE articles (id int PRIMARY KEY, slug text, category text);
         ALTER TABLE articles REPLICA IDENTITY FULL;
         CREATE PUBLICATION pub FOR TABLE articles;",
    );
    let redis = Redis::start();
    let url = format!(
        "postgres://scram_user:{}@{host}:{},{host}:{}/postgres?target_session_attrs=read-write",
        pg_encode(SCRAM_PASSWORD),
        read_only.port(),
        primary.port(),
        host = primary.host(),
    );
    let config = format!(
        "[source]\nurl = \"{url}\"\nslot = \"cli\"\npublication = \"pub\"\n\
         create_publication = false\n[redis]\nurl = \"{}\"\n{RULES}",
        redis.url()
    );
    let daemon = support::daemon::Process::start(&config);
    let deadline = Instant::now() + Duration::from_secs(30);
    while primary.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walsweep' \
         AND state = 'streaming'",
    ) != "1"
    {
        assert!(
            Instant::now() < deadline,
            "walsweep never streamed from the writable server\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        read_only.psql("postgres", "SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
    let (status, log) = daemon.terminate_with_log();
    assert!(status.success(), "{log}");
    assert!(log.contains("read-only"), "{log}");
    assert!(!log.contains(SCRAM_PASSWORD), "{log}");
    assert!(!log.contains(&pg_encode(SCRAM_PASSWORD)), "{log}");
}

/// Percent-encoding for a URL's password.
fn pg_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
