//! Never skip, never half-load: the paths where a replaced database, a crash during warm-up or a
//! crash around the slot's creation used to lose invalidations, mirror rows or broadcasts.
//! Real servers, the real binary where the test kills it.

mod support;

use std::time::{Duration, Instant};

use redis::AsyncCommands;

use support::daemon::{self, wait_for, wait_gone, wait_streaming, Process};
use support::{Postgres, PostgresOptions, Redis};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text, body text);
CREATE PUBLICATION pub FOR TABLE items;
";

const RULES: &str = r#"
[[table]]
name = "public.items"
keys = ["itemkey:{id}"]
[[table.mirror]]
key = "item:{id}"
"#;

/// Every row of `items` is mirrored with its name, and no mirror entry is left for a row that
/// is gone. Returns the row count.
async fn assert_mirror_equals_table(
    client: &tokio_postgres::Client,
    conn: &mut redis::aio::MultiplexedConnection,
) -> usize {
    let rows = client
        .query("SELECT id, name FROM items ORDER BY id", &[])
        .await
        .expect("select items");
    for row in &rows {
        let id: i32 = row.get(0);
        let name: Option<String> = row.get(1);
        let stored: Option<String> = conn.get(format!("item:{id}")).await.expect("GET");
        let stored = stored.unwrap_or_else(|| panic!("row {id} is not mirrored"));
        let json: serde_json::Value = serde_json::from_str(&stored).expect("mirror JSON");
        assert_eq!(
            json["name"].as_str(),
            name.as_deref(),
            "row {id} is mirrored with another name"
        );
    }
    let keys: Vec<String> = conn.keys("item:*").await.expect("KEYS");
    assert_eq!(
        keys.len(),
        rows.len(),
        "mirror entries without a row remain"
    );
    rows.len()
}

async fn wait_present(conn: &mut redis::aio::MultiplexedConnection, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon::exists(conn, key).await {
        assert!(Instant::now() < deadline, "{key} never appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fills WAL so that LSNs are far ahead of a fresh cluster's.
fn advance_wal(pg: &Postgres, db: &str) {
    pg.psql(
        db,
        "CREATE TABLE filler (payload text); \
         INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 20000); \
         DROP TABLE filler; SELECT pg_switch_wal();",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_the_database_is_replaced_behind_the_same_url_are_all_seen() {
    support::init_tracing();
    let opts = PostgresOptions::default();
    let mut pg = Postgres::start_with(opts.clone());
    // The `postgres` database exists in the replacement from its first moment, so the daemon's
    // reconnects never find the database missing (which needs a human, and stops it).
    let db = "postgres";
    pg.psql(db, SCHEMA);
    advance_wal(&pg, db);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let slot = "moved";
    let mut cfg = daemon::config(&pg, &redis, db, slot, RULES);
    cfg.source.on_slot_lost = walsweep::config::SlotLostPolicy::Recreate;
    let running = daemon::start(cfg);
    {
        let client = pg.client(db).await;
        wait_streaming(&client, slot).await;
        client
            .batch_execute("INSERT INTO items VALUES (1, 'before the move', '')")
            .await
            .expect("insert");
        wait_for(30, || {
            let mut conn = conn.clone();
            async move { daemon::exists(&mut conn, "item:1").await }
        })
        .await;
    }
    let before: String = pg.psql(db, "SELECT pg_current_wal_lsn()");

    // A restore or a move: another cluster, WAL far behind, behind the same address.
    pg.replace_with_new_cluster(&opts);
    pg.psql(db, SCHEMA);
    let after: String = pg.psql(db, "SELECT pg_current_wal_lsn()");
    eprintln!("WAL at {before} before the move, {after} after it");
    let client = pg.client(db).await;
    wait_streaming(&client, slot).await;
    // Caches the app filled from the new database, then every kind of write on it.
    for id in 1..=50 {
        let _: () = conn
            .set(format!("itemkey:{id}"), "cached")
            .await
            .expect("SET");
    }
    client
        .batch_execute(
            "INSERT INTO items SELECT g, 'after the move ' || g, '' FROM generate_series(1, 50) g; \
             UPDATE items SET name = 'updated after the move' WHERE id <= 10; \
             DELETE FROM items WHERE id BETWEEN 41 AND 50;",
        )
        .await
        .expect("writes after the move");
    for id in 1..=50 {
        wait_gone(&mut conn, &format!("itemkey:{id}"), 30).await;
    }
    wait_for(30, || {
        let mut conn = conn.clone();
        async move {
            let name: Option<String> = conn.get("item:10").await.unwrap_or(None);
            name.is_some_and(|n| n.contains("updated after the move"))
                && !daemon::exists(&mut conn, "item:50").await
        }
    })
    .await;
    assert_eq!(assert_mirror_equals_table(&client, &mut conn).await, 40);
    running.stop().await;
}

fn config_file(
    pg: &Postgres,
    redis: &Redis,
    db: &str,
    slot: &str,
    source: &str,
    rest: &str,
) -> String {
    format!(
        "[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"pub\"\nstatus_interval_ms = 200\n\
         reconnect_min_ms = 50\nreconnect_max_ms = 500\n{source}\n[redis]\nurl = \"{}\"\ntimeout_ms = 1000\n{rest}",
        pg.url(db),
        redis.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_up_killed_halfway_is_loaded_again_at_the_next_start() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    // Wide rows, so the load takes long enough to be caught halfway.
    pg.psql(
        "app",
        "INSERT INTO items SELECT g, 'row ' || g, repeat(md5(g::text), 64) \
         FROM generate_series(1, 20000) g",
    );
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let slot = "halfway";
    let text = config_file(&pg, &redis, "app", slot, "warm_up = true", RULES);
    let walsweep = Process::start(&text);
    // Kill it as soon as some rows, not all, are in Redis.
    let deadline = Instant::now() + Duration::from_secs(60);
    let loaded = loop {
        let keys: Vec<String> = conn.keys("item:*").await.expect("KEYS");
        if !keys.is_empty() {
            walsweep.kill();
            break keys.len();
        }
        if Instant::now() > deadline {
            panic!("the warm-up never started\n{}", walsweep.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let after_kill: Vec<String> = conn.keys("item:*").await.expect("KEYS");
    eprintln!(
        "killed with {loaded} rows loaded ({} once it was dead)",
        after_kill.len()
    );
    assert!(
        after_kill.len() < 20_000,
        "the load finished before the kill; the test cannot show anything"
    );
    // While walsweep is dead, the table changes: only a new load or the stream can bring that.
    pg.psql(
        "app",
        "UPDATE items SET name = 'changed while down' WHERE id % 100 = 0; \
         DELETE FROM items WHERE id > 19900;",
    );

    let walsweep = Process::start(&text);
    let client = pg.client("app").await;
    wait_streaming(&client, slot).await;
    pg.psql(
        "app",
        "UPDATE items SET name = 'changed after the restart' WHERE id = 7",
    );
    wait_for(60, || {
        let mut conn = conn.clone();
        async move {
            let name: Option<String> = conn.get("item:7").await.unwrap_or(None);
            name.is_some_and(|n| n.contains("changed after the restart"))
        }
    })
    .await;
    assert_eq!(assert_mirror_equals_table(&client, &mut conn).await, 19_900);
    assert!(walsweep.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_chain_restart_still_restarts_it_on_a_restored_database() {
    support::init_tracing();
    let opts = PostgresOptions::default();
    let mut pg = Postgres::start_with(opts.clone());
    let db = "postgres";
    pg.psql(db, SCHEMA);
    advance_wal(&pg, db);
    let mut redis = Redis::start_persistent();
    let mut conn = redis.connection().await;
    let slot = "chained";
    let broadcast = "[broadcast]\nstream = \"changes\"\n";
    let text = config_file(
        &pg,
        &redis,
        db,
        slot,
        "on_slot_lost = \"recreate\"",
        &format!("{broadcast}{RULES}"),
    );
    let walsweep = Process::start(&text);
    let client = pg.client(db).await;
    wait_streaming(&client, slot).await;
    client
        .batch_execute("INSERT INTO items VALUES (1, 'old history', '')")
        .await
        .expect("insert");
    wait_present(&mut conn, "changes:last_lsn").await;
    assert!(walsweep.terminate().success());
    drop(client);

    // The database is restored from an old copy: LSNs start over, far below the chain's.
    pg.replace_with_new_cluster(&opts);
    pg.psql(db, SCHEMA);
    // walsweep starts while Redis is down and is killed before it could restart the chain
    // (the reset message is the first thing it writes after creating the slot). Redis keeps
    // its data across the outage, the chain's last LSN included.
    redis.stop();
    let walsweep = Process::start(&text);
    tokio::time::sleep(Duration::from_secs(3)).await;
    walsweep.kill();
    redis.restart();
    let mut conn = redis.connection().await;
    let last: Option<String> = conn.get("changes:last_lsn").await.expect("GET");
    assert!(
        last.is_some(),
        "the outage lost the chain's state; the test shows nothing"
    );

    let walsweep = Process::start(&text);
    let client = pg.client(db).await;
    wait_streaming(&client, slot).await;
    client
        .batch_execute("INSERT INTO items VALUES (777, 'new history', '')")
        .await
        .expect("insert");
    wait_for(30, || {
        let mut conn = conn.clone();
        async move {
            let entries: redis::streams::StreamRangeReply =
                conn.xrange_all("changes").await.expect("XRANGE");
            entries.ids.iter().any(|e| {
                e.get::<String>("message")
                    .is_some_and(|m| m.contains("\"id\":777"))
            })
        }
    })
    .await;
    assert!(walsweep.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_walsweep_is_stopped_is_a_lost_slot_not_a_first_start() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let slot = "dropped";
    let client = pg.client("app").await;
    let running = daemon::start(daemon::config(&pg, &redis, "app", slot, RULES));
    wait_streaming(&client, slot).await;
    client
        .batch_execute("INSERT INTO items VALUES (1, 'seen', '')")
        .await
        .expect("insert");
    wait_present(&mut conn, "item:1").await;
    running.stop().await;

    // While walsweep is stopped: the slot goes, the app caches a row, and the row changes.
    pg.psql("app", &format!("SELECT pg_drop_replication_slot('{slot}')"));
    let _: () = conn.set("itemkey:1", "cached").await.expect("SET");
    client
        .batch_execute("UPDATE items SET name = 'changed while the slot was gone' WHERE id = 1")
        .await
        .expect("update");

    // on_slot_lost = "fail" (the default): stop, saying what happened and how to recover.
    let failing = daemon::start(daemon::config(&pg, &redis, "app", slot, RULES));
    let outcome = tokio::time::timeout(Duration::from_secs(30), failing.task)
        .await
        .expect("walsweep stops by itself")
        .expect("no panic");
    let message = match outcome {
        Ok(summary) => panic!("walsweep took the dropped slot for a first start: {summary:?}"),
        Err(e) => walsweep::telemetry::log::display_chain(&e),
    };
    for expected in [
        "dropped while walsweep was stopped",
        "on_slot_lost = \"recreate\"",
        "redis-cli DEL walsweep:app/dropped:source",
    ] {
        assert!(
            message.contains(expected),
            "{expected:?} missing from: {message}"
        );
    }
    assert!(
        daemon::exists(&mut conn, "itemkey:1").await,
        "nothing is cleared when walsweep stops instead"
    );
    assert_eq!(
        pg.psql(
            "app",
            &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'")
        ),
        "0",
        "the fail policy creates no slot"
    );

    // on_slot_lost = "recreate": the new slot, then everything the rules maintain cleared.
    let mut cfg = daemon::config(&pg, &redis, "app", slot, RULES);
    cfg.source.on_slot_lost = walsweep::config::SlotLostPolicy::Recreate;
    let recreated = daemon::start(cfg);
    wait_streaming(&client, slot).await;
    wait_gone(&mut conn, "itemkey:1", 30).await;
    client
        .batch_execute("INSERT INTO items VALUES (2, 'after the recreation', '')")
        .await
        .expect("insert");
    wait_present(&mut conn, "item:2").await;
    recreated.stop().await;
}
