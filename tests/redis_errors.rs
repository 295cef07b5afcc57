//! Redis error replies end to end: an error raised inside one of walsweep's scripts stops
//! walsweep with a message naming the script, the commit and what to do, and confirms nothing
//! from that commit on; a reply saying Redis cannot serve for now (here BUSY) is retried until
//! Redis serves again.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use support::daemon::{config, start, wait_for, wait_streaming};
use support::{Postgres, Redis};

const BIN: &str = env!("CARGO_BIN_EXE_walsweep");

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, grp int);
CREATE PUBLICATION pub FOR TABLE items;
";

const RULES: &str = r#"
[[table]]
name = "public.items"
[[table.mirror]]
key = "item:{id}"
[[table.mirror.index]]
key = "items_by_grp:{grp}"
member = "{id}"
score = "id"
"#;

fn write_config(dir: &Path, pg: &Postgres, redis_url: &str) -> PathBuf {
    let path = dir.join("walsweep.toml");
    let text = format!(
        "[source]\nurl = \"{}\"\nslot = \"scripts\"\npublication = \"pub\"\nstatus_interval_ms = 200\n\
         reconnect_min_ms = 50\nreconnect_max_ms = 500\n[redis]\nurl = \"{redis_url}\"\n\
         timeout_ms = 2000\n[metrics]\nlisten = \"\"\n{RULES}",
        pg.url("app")
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn run(config: &Path) -> Child {
    Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for walsweep to exit on its own; returns its status and stderr.
fn wait_exit(child: &mut Child, secs: u64) -> (ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            panic!("walsweep still running after {secs}s (retrying forever?):\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

async fn index_members(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<String> {
    conn.zrange(key, 0, -1).await.expect("ZRANGE")
}

/// The commit LSN of the last transaction still waiting in the slot, as walsweep prints LSNs.
fn last_pending_commit_lsn(pg: &Postgres) -> String {
    // pgoutput's Commit message: 'C', flags (1 byte), then the commit LSN (8 bytes).
    let hex = pg.psql(
        "app",
        "SELECT encode(substr(data, 3, 8), 'hex') FROM pg_logical_slot_peek_binary_changes(\
         'scripts', NULL, NULL, 'proto_version', '1', 'publication_names', 'pub') \
         WHERE get_byte(data, 0) = ascii('C') ORDER BY lsn DESC LIMIT 1",
    );
    let lsn = u64::from_str_radix(&hex, 16).unwrap_or_else(|e| panic!("commit LSN {hex:?}: {e}"));
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// A realistic way for a script to fail: the operator gives walsweep a least-privilege Redis
/// user and later takes away a command only the mirror script calls (ZADD, for the index).
/// EVALSHA itself is still allowed, so the script runs, writes the row and then raises at ZADD:
/// Redis keeps the row without its index entry, and every retry would fail the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_raised_by_a_script_stops_walsweep_naming_the_script_commit_and_fix() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "walsweep", "on", ">secret", "~*", "&*", "+@all"])
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER");
    let url = redis
        .url()
        .replacen("redis://", "redis://walsweep:secret@", 1);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &pg, &url);

    let mut child = run(&path);
    let client = pg.client("app").await;
    wait_streaming(&client, "scripts").await;
    pg.psql("app", "INSERT INTO items VALUES (1, 7)");
    wait_for(30, || {
        let mut c = conn.clone();
        async move { index_members(&mut c, "items_by_grp:7").await == ["1"] }
    })
    .await;

    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "walsweep", "-zadd"])
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER");
    pg.psql("app", "INSERT INTO items VALUES (2, 7)");
    let (status, stderr) = wait_exit(&mut child, 30);
    assert!(!status.success(), "exit {status:?}\n{stderr}");

    // The failing transaction is the last one committed.
    let commit = last_pending_commit_lsn(&pg);
    for needle in [
        "mirror_rows.lua",
        &format!("commit {commit}:"),
        "ACL",
        "restart walsweep",
    ] {
        assert!(
            stderr.contains(needle),
            "{needle:?} missing from:\n{stderr}"
        );
    }
    // The failing transaction is still in the slot: nothing from it on was confirmed.
    assert_eq!(
        pg.psql(
            "app",
            &format!(
                "SELECT confirmed_flush_lsn < '{commit}' FROM pg_replication_slots \
                 WHERE slot_name = 'scripts'"
            ),
        ),
        "t"
    );
    // What the script wrote before the error stays: why retrying in silence is no option.
    assert!(support::daemon::exists(&mut conn, "item:2").await);
    assert_eq!(index_members(&mut conn, "items_by_grp:7").await, ["1"]);

    // Doing what the message says repairs it.
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "walsweep", "+zadd"])
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER");
    let mut child = run(&path);
    wait_for(30, || {
        let mut c = conn.clone();
        async move { index_members(&mut c, "items_by_grp:7").await == ["1", "2"] }
    })
    .await;
    support::scratch::signal(child.id(), "TERM").unwrap();
    let (status, stderr) = wait_exit(&mut child, 30);
    assert!(status.success(), "exit {status:?}\n{stderr}");
}

/// Another client's long script makes Redis answer BUSY to everything else until it ends: an
/// outage as far as walsweep is concerned, retried (nothing confirmed meanwhile) until Redis
/// serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_redis_is_retried_until_it_serves_again() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "busy-reply-threshold", "50"])
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
    let daemon = start(config(&pg, &redis, "app", "busy", RULES));
    let client = pg.client("app").await;
    wait_streaming(&client, "busy").await;
    pg.psql("app", "INSERT INTO items VALUES (1, 7)");
    wait_for(30, || {
        let mut c = conn.clone();
        async move { support::daemon::exists(&mut c, "item:1").await }
    })
    .await;

    let url = redis.url();
    let runaway = tokio::task::spawn_blocking(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query::<()>(&mut c)
            .expect_err("killed")
    });
    let mut probe = redis.connection().await;
    wait_for(10, || {
        let mut c = probe.clone();
        async move {
            let reply: redis::RedisResult<()> = redis::cmd("PING").query_async(&mut c).await;
            reply.is_err_and(|e| e.code() == Some("BUSY"))
        }
    })
    .await;
    pg.psql("app", "INSERT INTO items VALUES (2, 7)");
    let during = pg.psql("app", "SELECT pg_current_wal_lsn()");
    // Long enough for several attempts (reconnect_max_ms = 500).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !daemon.task.is_finished(),
        "walsweep gave up on a busy Redis"
    );
    assert_eq!(
        pg.psql(
            "app",
            &format!(
                "SELECT confirmed_flush_lsn < '{during}' FROM pg_replication_slots \
                 WHERE slot_name = 'busy'"
            ),
        ),
        "t",
        "confirmed while Redis refused the writes"
    );

    let _: () = redis::cmd("SCRIPT")
        .arg("KILL")
        .query_async(&mut probe)
        .await
        .expect("SCRIPT KILL");
    let killed = runaway.await.unwrap();
    assert!(killed.to_string().contains("killed"), "{killed}");
    wait_for(30, || {
        let mut c = conn.clone();
        async move { index_members(&mut c, "items_by_grp:7").await == ["1", "2"] }
    })
    .await;
    daemon.stop().await;
}
