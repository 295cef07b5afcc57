//! Failover, on real physical standbys: a failover slot (Postgres 17+) that walsweep resumes
//! from on the promoted standby, and decoding from a hot standby (16+) through its promotion.
//! On older servers each test says it is skipped; CI runs this binary on a newer major too.

mod support;

use std::time::{Duration, Instant};

use redis::AsyncCommands;

use support::binaries::server_major;
use support::daemon::{self, Daemon};
use support::{Postgres, PostgresOptions, Redis, ShutdownMode};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text);
INSERT INTO items SELECT g, 'v0' FROM generate_series(1, 200) g;
CREATE PUBLICATION pub FOR TABLE items;
";

const RULES: &str = r#"
[[table]]
name = "public.items"
keys = ["itemkey:{id}"]
[[table.mirror]]
key = "item:{id}"
"#;

const ROWS: i32 = 200;

fn settings(pairs: &[(&str, &str)]) -> PostgresOptions {
    PostgresOptions {
        extra_settings: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// walsweep's config with `url` as the source (a multi-host URL, or one node).
fn config(url: &str, redis: &Redis, slot: &str, source_extra: &str) -> walsweep::config::Config {
    let text = format!(
        "[source]\nurl = \"{url}\"\nslot = \"{slot}\"\npublication = \"pub\"\n\
         status_interval_ms = 200\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n{source_extra}\n\
         [redis]\nurl = \"{}\"\ntimeout_ms = 2000\n{RULES}",
        redis.url()
    );
    walsweep::config::Config::parse(&text).unwrap_or_else(|e| panic!("config: {e}\n{text}"))
}

/// `postgres://postgres@a,b/db?target_session_attrs=read-write`: finds whichever is primary.
fn multi_host_url(nodes: &[&Postgres], db: &str) -> String {
    let hosts: Vec<String> = nodes
        .iter()
        .map(|pg| format!("{}:{}", pg.host(), pg.port()))
        .collect();
    format!(
        "postgres://postgres@{}/{db}?target_session_attrs=read-write&connect_timeout=2",
        hosts.join(",")
    )
}

/// The app's write path: caches the row's key, then updates the row. walsweep must remove the
/// key after the commit; a key left behind for a row whose value changed is a missed
/// invalidation.
async fn cache_then_update(
    client: &tokio_postgres::Client,
    redis: &mut redis::aio::MultiplexedConnection,
    id: i32,
    value: &str,
) -> Result<(), tokio_postgres::Error> {
    let _: () = redis
        .set(format!("itemkey:{id}"), "cached")
        .await
        .expect("SET");
    client
        .execute("UPDATE items SET name = $2 WHERE id = $1", &[&id, &value])
        .await
        .map(|_| ())
}

/// Waits until walsweep confirmed everything `client`'s server has written (its slot's
/// confirmed position reaches the server's WAL position at the time of the call).
async fn wait_confirmed(client: &tokio_postgres::Client, slot: &str, secs: u64) {
    let target: String = client
        .query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                     ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
        .await
        .expect("wal position")
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let done: Option<bool> = client
            .query_opt(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot, &target],
            )
            .await
            .expect("slot query")
            .and_then(|row| row.get(0));
        if done == Some(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot} did not confirm {target} within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every row whose value changed from `v0` has no cached key left, and the mirror equals the
/// table (rows never written since walsweep started are not mirrored). Returns how many rows changed.
async fn assert_invalidated_and_mirrored(
    client: &tokio_postgres::Client,
    redis: &mut redis::aio::MultiplexedConnection,
) -> usize {
    let rows = client
        .query("SELECT id, name FROM items ORDER BY id", &[])
        .await
        .expect("select items");
    let mut changed = 0;
    let mut missed = Vec::new();
    for row in &rows {
        let id: i32 = row.get(0);
        let name: String = row.get(1);
        if name != "v0" {
            changed += 1;
            if daemon::exists(redis, &format!("itemkey:{id}")).await {
                missed.push(id);
            }
        }
        let stored: Option<String> = redis.get(format!("item:{id}")).await.expect("GET");
        // No warm-up: a row never written since walsweep started has no mirror entry.
        let Some(stored) = stored else {
            assert_eq!(name, "v0", "row {id} changed but is not mirrored");
            continue;
        };
        let json: serde_json::Value = serde_json::from_str(&stored).expect("mirror JSON");
        assert_eq!(
            json["name"].as_str(),
            Some(name.as_str()),
            "row {id} mirror"
        );
    }
    assert!(
        missed.is_empty(),
        "missed invalidations for rows {missed:?}"
    );
    changed
}

async fn wait_slot_synced(standby: &tokio_postgres::Client, slot: &str) {
    daemon::wait_for(60, || async {
        standby
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND synced \
                 AND confirmed_flush_lsn IS NOT NULL",
                &[&slot],
            )
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
}

/// A primary with a physical standby that synchronizes failover slots (Postgres 17+), the
/// multi-host URL of both, and clients on each. `None` (after saying so) on older servers.
struct FailoverPair {
    primary: Postgres,
    standby: Postgres,
    url: String,
    primary_client: tokio_postgres::Client,
    standby_client: tokio_postgres::Client,
}

async fn failover_pair() -> Option<FailoverPair> {
    let major = server_major();
    if major < 17 {
        eprintln!("skipped: failover slots need Postgres 17+, the tests boot {major}");
        return None;
    }
    // The primary holds logical walsenders back until the standby has the WAL, so the
    // promoted standby never lacks a change walsweep already applied.
    let mut primary = Postgres::start_with(settings(&[("synchronized_standby_slots", "sb1")]));
    primary.create_database("app");
    primary.psql("app", SCHEMA);
    let standby = primary.start_standby(
        "app",
        Some("sb1"),
        &settings(&[
            ("sync_replication_slots", "on"),
            // Only the primary's list matters; once promoted there is no sb1 to wait for.
            ("synchronized_standby_slots", ""),
        ]),
    );
    let url = multi_host_url(&[&primary, &standby], "app");
    let primary_client = primary.client("app").await;
    let standby_client = standby.client("app").await;
    Some(FailoverPair {
        primary,
        standby,
        url,
        primary_client,
        standby_client,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walsweep_resumes_from_the_synchronized_failover_slot_on_the_promoted_standby() {
    support::init_tracing();
    let Some(FailoverPair {
        mut primary,
        standby,
        url,
        primary_client,
        standby_client,
    }) = failover_pair().await
    else {
        return;
    };
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let walsweep = daemon::start(config(&url, &redis, "ws_failover", "failover = true"));
    daemon::wait_streaming(&primary_client, "ws_failover").await;
    let failover: bool = primary_client
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = 'ws_failover'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failover, "source.failover must create a failover slot");
    wait_slot_synced(&standby_client, "ws_failover").await;

    // Phase 1 on the primary; the standby has all of it, walsweep maybe not yet when the
    // primary dies.
    for id in 1..=ROWS / 2 {
        cache_then_update(&primary_client, &mut conn, id, "v1")
            .await
            .expect("update on the primary");
    }
    standby.wait_replayed(&primary);
    let left_at_crash = {
        let mut left = 0;
        for id in 1..=ROWS / 2 {
            if daemon::exists(&mut conn, &format!("itemkey:{id}")).await {
                left += 1;
            }
        }
        left
    };
    primary.stop(ShutdownMode::Immediate);
    standby.promote();
    eprintln!("invalidations still to apply when the primary died: {left_at_crash}");

    // Phase 2 on the promoted standby: walsweep follows the URL to it.
    for id in ROWS / 2 + 1..=ROWS {
        cache_then_update(&standby_client, &mut conn, id, "v2")
            .await
            .expect("update on the promoted standby");
    }
    wait_confirmed(&standby_client, "ws_failover", 60).await;
    let changed = assert_invalidated_and_mirrored(&standby_client, &mut conn).await;
    assert_eq!(changed, ROWS as usize, "every row was updated once");
    let active: bool = standby_client
        .query_one(
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'ws_failover'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        active,
        "walsweep streams from the synchronized slot on the new primary"
    );
    walsweep.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_walsweep_was_stopped_are_applied_from_the_synchronized_slot() {
    support::init_tracing();
    let Some(FailoverPair {
        mut primary,
        standby,
        url,
        primary_client,
        standby_client,
    }) = failover_pair().await
    else {
        return;
    };
    let redis = Redis::start();
    let mut conn = redis.connection().await;

    let walsweep = daemon::start(config(&url, &redis, "ws_resume", "failover = true"));
    daemon::wait_streaming(&primary_client, "ws_resume").await;
    wait_slot_synced(&standby_client, "ws_resume").await;
    walsweep.stop().await;

    // Written while walsweep is away; only the WAL (and the synchronized slot's position
    // before it) carries them to the standby.
    for id in 1..=ROWS / 2 {
        cache_then_update(&primary_client, &mut conn, id, "v1")
            .await
            .expect("update on the primary");
    }
    standby.wait_replayed(&primary);
    primary.stop(ShutdownMode::Immediate);
    standby.promote();
    let mut pending = 0;
    for id in 1..=ROWS / 2 {
        if daemon::exists(&mut conn, &format!("itemkey:{id}")).await {
            pending += 1;
        }
    }
    assert_eq!(
        pending,
        ROWS / 2,
        "nothing was applied while walsweep was stopped"
    );

    let walsweep = daemon::start(config(&url, &redis, "ws_resume", "failover = true"));
    for id in ROWS / 2 + 1..=ROWS {
        cache_then_update(&standby_client, &mut conn, id, "v2")
            .await
            .expect("update on the promoted standby");
    }
    wait_confirmed(&standby_client, "ws_resume", 60).await;
    assert_eq!(
        assert_invalidated_and_mirrored(&standby_client, &mut conn).await,
        ROWS as usize
    );
    walsweep.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoding_from_a_hot_standby_streams_confirms_and_survives_its_promotion() {
    support::init_tracing();
    let major = server_major();
    if major < 16 {
        eprintln!(
            "skipped: logical decoding on a standby needs Postgres 16+, the tests boot {major}"
        );
        return;
    }
    let mut primary = Postgres::start();
    primary.create_database("app");
    primary.psql("app", SCHEMA);
    let standby = primary.start_standby("app", Some("sb1"), &PostgresOptions::default());
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let primary_client = primary.client("app").await;
    let standby_client = standby.client("app").await;

    let walsweep: Daemon = daemon::start(config(&standby.url("app"), &redis, "ws_standby", ""));
    // Creating a slot on a standby waits for the primary to log the running transactions.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        primary_client
            .execute("SELECT pg_log_standby_snapshot()", &[])
            .await
            .expect("pg_log_standby_snapshot");
        let streaming = standby_client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'ws_standby' AND active",
                &[],
            )
            .await
            .unwrap()
            .is_some();
        if streaming {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "walsweep never streamed from the standby"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Written on the primary, decoded on the standby.
    for id in 1..=ROWS / 2 {
        cache_then_update(&primary_client, &mut conn, id, "v1")
            .await
            .expect("update on the primary");
    }
    standby.wait_replayed(&primary);
    wait_confirmed(&standby_client, "ws_standby", 60).await;
    assert_eq!(
        assert_invalidated_and_mirrored(&standby_client, &mut conn).await,
        (ROWS / 2) as usize
    );

    // Promoted: walsweep keeps following the same address, now a primary.
    primary.stop(ShutdownMode::Fast);
    standby.promote();
    for id in ROWS / 2 + 1..=ROWS {
        cache_then_update(&standby_client, &mut conn, id, "v2")
            .await
            .expect("update on the promoted standby");
    }
    wait_confirmed(&standby_client, "ws_standby", 60).await;
    assert_eq!(
        assert_invalidated_and_mirrored(&standby_client, &mut conn).await,
        ROWS as usize
    );
    walsweep.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_slot_becomes_a_failover_slot_when_the_config_asks_for_it() {
    support::init_tracing();
    let major = server_major();
    if major < 17 {
        eprintln!("skipped: failover slots need Postgres 17+, the tests boot {major}");
        return;
    }
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let client = pg.client("app").await;
    let is_failover = || async {
        let row = client
            .query_one(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = 'ws_alter'",
                &[],
            )
            .await
            .expect("slot");
        row.get::<_, bool>(0)
    };
    let walsweep = daemon::start(config(&pg.url("app"), &redis, "ws_alter", ""));
    daemon::wait_streaming(&client, "ws_alter").await;
    assert!(!is_failover().await, "failover is off by default");
    walsweep.stop().await;

    let walsweep = daemon::start(config(
        &pg.url("app"),
        &redis,
        "ws_alter",
        "failover = true",
    ));
    daemon::wait_streaming(&client, "ws_alter").await;
    assert!(
        is_failover().await,
        "the existing slot was made a failover slot"
    );
    walsweep.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_on_a_server_without_failover_slots_stops_with_the_fix() {
    support::init_tracing();
    let major = server_major();
    if major >= 17 {
        eprintln!("skipped: Postgres {major} has failover slots");
        return;
    }
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let walsweep = daemon::start(config(&pg.url("app"), &redis, "ws_old", "failover = true"));
    let result = tokio::time::timeout(Duration::from_secs(30), walsweep.task)
        .await
        .expect("walsweep stops")
        .expect("no panic");
    let message = result.expect_err("must not start").to_string();
    assert!(message.contains("needs Postgres 17 or newer"), "{message}");
    assert!(message.contains("remove it"), "{message}");
    let slots = pg.psql("app", "SELECT count(*) FROM pg_replication_slots");
    assert_eq!(slots, "0", "no slot is created");
}
