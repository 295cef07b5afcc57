//! Read your own writes: walsweep publishes its applied position
//! (`walsweep:<database>/<slot>:applied`, a decimal LSN, and a Pub/Sub message per advance),
//! and an app that waits for its commit's LSN then reads through the cache sees its commit.
//! The app side is `clients/python` (walsweep_client) with the real matroska-cache.
//!
//! `WALSWEEP_RYW_ITERATIONS` (default 10000) sets the writer's iterations.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::AsyncCommands;

use support::binaries::{python, repo};
use support::daemon::{self, wait_streaming};
use support::{Postgres, Redis};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
INSERT INTO items SELECT g, 0 FROM generate_series(1, 101) g;
CREATE TABLE audit (id serial PRIMARY KEY, note text);
CREATE PUBLICATION pub FOR TABLE items;
";

const RULES: &str = r#"
[[table]]
name = "public.items"
deps = ["id:item:{id}"]
"#;

const POSITION_KEY: &str = "walsweep:app/ryw:applied";

async fn published(conn: &mut redis::aio::MultiplexedConnection) -> Option<u64> {
    let value: Option<String> = conn.get(POSITION_KEY).await.expect("GET position");
    value.map(|v| v.parse().expect("the position is a decimal number"))
}

fn run_python(python: &Path, args: &[&str], env: &[(&str, String)]) -> (bool, String, String) {
    let out = Command::new(python)
        .args(args)
        .current_dir(repo())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", python.display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_applied_position_is_published_with_each_batch_and_announced() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let walsweep = daemon::start(daemon::config(&pg, &redis, "app", "ryw", RULES));
    let client = pg.client("app").await;
    wait_streaming(&client, "ryw").await;

    let redis_client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = redis_client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(POSITION_KEY).await.unwrap();
    let mut messages = pubsub.into_on_message();

    let _: () = conn
        .sadd("cache::rdep::id:item:1", "cache::data::x")
        .await
        .unwrap();
    let _: () = conn.set("cache::data::x", "old").await.unwrap();
    client
        .execute("UPDATE items SET v = 1 WHERE id = 1", &[])
        .await
        .unwrap();
    let lsn = daemon::insert_lsn(&client).await;
    // The announcement that reaches the commit comes after its effect is in Redis.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, messages.next())
            .await
            .expect("no announcement reached the commit within 10 s")
            .expect("subscription ended");
        let value: u64 = message.get_payload::<String>().unwrap().parse().unwrap();
        if value >= lsn {
            assert!(
                !daemon::exists(&mut conn, "cache::data::x").await,
                "position {value} announced before the commit's invalidation was applied"
            );
            break;
        }
    }
    let position = published(&mut conn).await.expect("position key");
    assert!(position >= lsn, "key {position} behind the announced {lsn}");

    // It never moves back: a restart redelivers from the slot's confirmed position.
    let before_restart = published(&mut conn).await.unwrap();
    walsweep.stop().await;
    let walsweep = daemon::start(daemon::config(&pg, &redis, "app", "ryw", RULES));
    wait_streaming(&client, "ryw").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(published(&mut conn).await.unwrap() >= before_restart);
    walsweep.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walsweep_wait_returns_for_a_commit_no_rule_follows_and_times_out_with_exit_3() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let walsweep = daemon::start(daemon::config(&pg, &redis, "app", "ryw", RULES));
    let client = pg.client("app").await;
    wait_streaming(&client, "ryw").await;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walsweep.toml");
    std::fs::write(
        &path,
        daemon::config_text(&pg, &redis.url(), "app", "ryw", RULES),
    )
    .unwrap();
    let wait = |lsn: String, timeout_ms: u64| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_walsweep"))
                .args(["wait", "--config"])
                .arg(&path)
                .args(["--lsn", &lsn, "--timeout-ms", &timeout_ms.to_string()])
                .output()
                .expect("run walsweep wait")
        })
    };

    // `audit` is in no publication and no rule: only the keepalive position covers it.
    client
        .execute("INSERT INTO audit (note) VALUES ('unfollowed')", &[])
        .await
        .unwrap();
    let lsn = daemon::insert_lsn(&client).await;
    let started = Instant::now();
    let out = wait(lsn.to_string(), 20_000).await.unwrap();
    assert!(
        out.status.success(),
        "wait for an unfollowed commit: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let reached: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(reached >= lsn);
    eprintln!("unfollowed commit waited {:?}", started.elapsed());

    // The text form works too; far in the future, it times out with exit 3 and says why.
    let out = wait("FF/0".to_string(), 300).await.unwrap();
    assert_eq!(out.status.code(), Some(3), "timeout exit code");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(POSITION_KEY) && stderr.contains("FF/0"),
        "{stderr}"
    );

    let out = wait("soon".to_string(), 300).await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed --lsn is a usage error"
    );
    walsweep.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_reads_its_own_commit_through_matroska_cache_every_time() {
    let python = python("the read-your-writes test needs the venv with matroska-cache");
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let walsweep = daemon::start(daemon::config(&pg, &redis, "app", "ryw", RULES));
    let client = pg.client("app").await;
    wait_streaming(&client, "ryw").await;

    // The package's own tests, against this Redis.
    let (ok, _, stderr) = run_python(
        &python,
        &[
            "-m",
            "unittest",
            "discover",
            "-s",
            "clients/python/tests",
            "-p",
            "test_*.py",
        ],
        &[("WALSWEEP_TEST_REDIS_PORT", redis.port().to_string())],
    );
    assert!(ok, "clients/python unit tests failed:\n{stderr}");
    assert!(
        !stderr.contains("skipped"),
        "Redis tests were skipped:\n{stderr}"
    );

    let iterations: u32 = std::env::var("WALSWEEP_RYW_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let script = "clients/python/tests/read_your_writes.py";
    let dsn = pg.url("app");
    let port = redis.port().to_string();
    let python2 = python.clone();
    let (port2, dsn2) = (port.clone(), dsn.clone());
    let run = move |iterations: u32, extra: Option<&'static str>| {
        let python = python2.clone();
        let (port, dsn) = (port2.clone(), dsn2.clone());
        tokio::task::spawn_blocking(move || {
            let iterations = iterations.to_string();
            let mut args = vec![script, &port, &dsn, "app", "ryw", &iterations];
            args.extend(extra);
            run_python(&python, &args, &[])
        })
    };
    // Without waiting, the writer does read its old value back: the check is sensitive.
    let (_, stdout, stderr) = run(500, Some("--no-wait")).await.unwrap();
    eprintln!("without the wait: {stdout}");
    let stale: u32 = field(&stdout, "stale").unwrap_or_else(|| panic!("{stdout}\n{stderr}"));
    assert!(stale > 0, "no stale read without waiting: {stdout}");

    let (ok, stdout, stderr) = run(iterations, None).await.unwrap();
    eprintln!("with the wait: {stdout}");
    assert!(
        ok,
        "a read returned a value from before the writer's commit:\n{stdout}\n{stderr}"
    );
    assert_eq!(field(&stdout, "stale"), Some(0), "{stdout}");
    assert_eq!(field(&stdout, "iterations"), Some(iterations), "{stdout}");
    assert!(
        field(&stdout, "load_writes").unwrap_or(0) > 0,
        "no concurrent load: {stdout}"
    );
    walsweep.stop().await;
}

/// `name=<u32>` from the script's summary line.
fn field(line: &str, name: &str) -> Option<u32> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
}
