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
    Command::new(BIN)
        .args(args)
        .env_remove("WALSWEEP_SOURCE_URL")
        .env_remove("WALSWEEP_REDIS_URL")
        .output()
        .expect("run walsweep")
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
    let pg = Postgres::start();
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
