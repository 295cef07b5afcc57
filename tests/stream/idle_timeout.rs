//! Postgres 18's `idle_replication_slot_timeout`: a checkpoint invalidates a slot no one read
//! from for longer than that, e.g. while walsweep was stopped. walsweep reports it like a slot
//! lost to `max_slot_wal_keep_size`, naming this cause and its fixes, and `on_slot_lost`
//! decides. On an older server these tests say they are skipped and pass.

use std::time::{Duration, Instant};

use redis::AsyncCommands;

use crate::support::binaries::server_major;
use crate::support::daemon::{self, wait_gone, wait_streaming};
use crate::support::{self, Postgres, PostgresOptions, Redis};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text);
CREATE PUBLICATION pub FOR TABLE items;
";

const RULES: &str = r#"
[[table]]
name = "public.items"
keys = ["itemkey:{id}"]
"#;

/// `None` (after saying so) when the server predates the setting.
fn postgres_with_idle_timeout(test: &str) -> Option<Postgres> {
    let major = server_major();
    if major < 18 {
        eprintln!(
            "{test}: skipped: idle_replication_slot_timeout needs Postgres 18, the tests boot \
             {major} (WALSWEEP_TEST_PG=18 runs it)"
        );
        return None;
    }
    // In seconds on 18 (without a unit). The slot is in use, so never idle, while walsweep
    // streams; only the stopped stretches below count.
    let pg = Postgres::start_with(PostgresOptions {
        extra_settings: vec![("idle_replication_slot_timeout".into(), "1s".into())],
        ..Default::default()
    });
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    Some(pg)
}

/// Streams once (so walsweep recorded the slot), then, with walsweep stopped: the app caches row
/// 1 and changes it, the slot sits idle past the timeout, and a checkpoint invalidates it.
async fn stream_then_idle_past_the_timeout(
    pg: &Postgres,
    redis: &Redis,
    conn: &mut redis::aio::MultiplexedConnection,
    slot: &str,
) {
    let client = pg.client("app").await;
    let running = daemon::start(daemon::config(pg, redis, "app", slot, RULES));
    wait_streaming(&client, slot).await;
    let _: () = conn.set("itemkey:1", "cached").await.expect("SET");
    pg.psql("app", "INSERT INTO items VALUES (1, 'seen')");
    wait_gone(conn, "itemkey:1", 30).await;
    running.stop().await;

    let _: () = conn.set("itemkey:1", "cached").await.expect("SET");
    pg.psql(
        "app",
        "UPDATE items SET name = 'changed while stopped' WHERE id = 1",
    );
    // Invalidation happens at checkpoints only, once inactive_since is older than the timeout.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let reason = pg.psql(
            "app",
            &format!(
                "CHECKPOINT; SELECT coalesce(invalidation_reason, 'none') || ' ' || wal_status \
                 FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ),
        );
        if reason == "idle_timeout lost" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot} not invalidated by idle_replication_slot_timeout: {reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_idle_past_the_timeout_stops_walsweep_with_the_cause_and_the_fix() {
    support::init_tracing();
    let Some(pg) = postgres_with_idle_timeout("idle_timeout fail") else {
        return;
    };
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    stream_then_idle_past_the_timeout(&pg, &redis, &mut conn, "idle").await;

    // on_slot_lost = "fail" (the default).
    let failing = daemon::start(daemon::config(&pg, &redis, "app", "idle", RULES));
    let outcome = tokio::time::timeout(Duration::from_secs(30), failing.task)
        .await
        .expect("walsweep stops by itself")
        .expect("no panic");
    let message = match outcome {
        Ok(summary) => panic!("walsweep streamed from an invalidated slot: {summary:?}"),
        Err(e) => walsweep::telemetry::log::display_chain(&e),
    };
    eprintln!("{message}");
    for expected in [
        "replication slot \"idle\" was invalidated by Postgres: it was idle past \
         idle_replication_slot_timeout (1s)",
        "caches may be stale",
        "on_slot_lost = \"recreate\"",
        "at its next checkpoint",
        "Raise idle_replication_slot_timeout above the longest time walsweep may be stopped",
        "keep walsweep running",
    ] {
        assert!(
            message.contains(expected),
            "{expected:?} missing from: {message}"
        );
    }
    assert!(
        !message.contains("removed WAL"),
        "another cause named: {message}"
    );
    assert!(
        daemon::exists(&mut conn, "itemkey:1").await,
        "nothing is cleared when walsweep stops instead"
    );
    assert_eq!(
        pg.psql(
            "app",
            "SELECT invalidation_reason FROM pg_replication_slots WHERE slot_name = 'idle'"
        ),
        "idle_timeout",
        "the fail policy leaves the slot alone"
    );

    // `walsweep check` names the same cause.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walsweep.toml");
    std::fs::write(
        &path,
        daemon::config_text(&pg, &redis.url(), "app", "idle", RULES),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walsweep"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove(walsweep::config::SOURCE_URL_ENV)
        .env_remove(walsweep::config::REDIS_URL_ENV)
        .output()
        .expect("run walsweep check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains(
            "error: slot \"idle\" was invalidated by Postgres: it was idle past \
             idle_replication_slot_timeout (1s); caches may have missed changes"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_idle_past_the_timeout_is_recreated_and_the_caches_cleared() {
    support::init_tracing();
    let Some(pg) = postgres_with_idle_timeout("idle_timeout recreate") else {
        return;
    };
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    stream_then_idle_past_the_timeout(&pg, &redis, &mut conn, "idle").await;

    let mut cfg = daemon::config(&pg, &redis, "app", "idle", RULES);
    cfg.source.on_slot_lost = walsweep::config::SlotLostPolicy::Recreate;
    let recreated = daemon::start(cfg);
    let client = pg.client("app").await;
    wait_streaming(&client, "idle").await;
    // Row 1's change was never seen: only the clear behind the new slot removes its entry.
    wait_gone(&mut conn, "itemkey:1", 30).await;
    assert_eq!(
        pg.psql(
            "app",
            "SELECT coalesce(invalidation_reason, 'valid') || ' ' || wal_status \
             FROM pg_replication_slots WHERE slot_name = 'idle'"
        ),
        "valid reserved"
    );

    // The new slot streams: writes after the restart invalidate.
    let _: () = conn.set("itemkey:1", "cached").await.expect("SET");
    let _: () = conn.set("itemkey:2", "cached").await.expect("SET");
    pg.psql(
        "app",
        "UPDATE items SET name = 'after' WHERE id = 1; INSERT INTO items VALUES (2, 'new')",
    );
    wait_gone(&mut conn, "itemkey:1", 30).await;
    wait_gone(&mut conn, "itemkey:2", 30).await;
    recreated.stop().await;
}
