//! Never skip, never half-load: the paths where a replaced database, a crash during warm-up or a
//! crash around the slot's creation used to lose invalidations, mirror rows or broadcasts.
//! Real servers, the real binary where the test kills it.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use support::daemon::{self, wait_for, wait_streaming};
use support::{scratch, Postgres, PostgresOptions, Redis};

const BIN: &str = env!("CARGO_BIN_EXE_walsweep");

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
        let key = format!("itemkey:{id}");
        wait_for(30, || {
            let mut conn = conn.clone();
            let key = key.clone();
            async move { !daemon::exists(&mut conn, &key).await }
        })
        .await;
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

/// The real binary with a config file, killed or stopped by the test.
struct Binary {
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Binary {
    fn new(config_text: &str) -> Binary {
        let dir = scratch::instance_dir("recovery-", false);
        let config = dir.path().join("walsweep.toml");
        std::fs::write(&config, config_text).expect("write config");
        Binary {
            config,
            log: dir.path().join("walsweep.log"),
            child: None,
            _dir: dir,
        }
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "walsweep=info")
            .env_remove(walsweep::config::SOURCE_URL_ENV)
            .env_remove(walsweep::config::REDIS_URL_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn walsweep");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        let mut child = self.child.take().expect("walsweep runs");
        scratch::signal(child.id(), "KILL").expect("kill -KILL walsweep");
        let _ = child.wait();
    }

    fn terminate(&mut self) {
        let mut child = self.child.take().expect("walsweep runs");
        scratch::signal(child.id(), "TERM").expect("kill -TERM walsweep");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < deadline, "walsweep ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        scratch::log_tail(&self.log, 40)
    }
}

impl Drop for Binary {
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
    let mut walsweep = Binary::new(&config_file(
        &pg,
        &redis,
        "app",
        slot,
        "warm_up = true",
        RULES,
    ));
    walsweep.start();
    // Kill it as soon as some rows, not all, are in Redis.
    let deadline = Instant::now() + Duration::from_secs(60);
    let loaded = loop {
        let keys: Vec<String> = conn.keys("item:*").await.expect("KEYS");
        if !keys.is_empty() {
            walsweep.kill();
            break keys.len();
        }
        assert!(
            Instant::now() < deadline,
            "the warm-up never started\n{}",
            walsweep.log_tail()
        );
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

    walsweep.start();
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
    walsweep.terminate();
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
    let conn = redis.connection().await;
    let slot = "chained";
    let broadcast = "[broadcast]\nstream = \"changes\"\n";
    let text = config_file(&pg, &redis, db, slot, "", &format!("{broadcast}{RULES}"));
    let mut walsweep = Binary::new(&text);
    walsweep.start();
    let client = pg.client(db).await;
    wait_streaming(&client, slot).await;
    client
        .batch_execute("INSERT INTO items VALUES (1, 'old history', '')")
        .await
        .expect("insert");
    wait_for(30, || {
        let mut conn = conn.clone();
        async move { daemon::exists(&mut conn, "changes:last_lsn").await }
    })
    .await;
    walsweep.terminate();
    drop(client);

    // The database is restored from an old copy: LSNs start over, far below the chain's.
    pg.replace_with_new_cluster(&opts);
    pg.psql(db, SCHEMA);
    // walsweep starts while Redis is down and is killed before it could restart the chain
    // (the reset message is the first thing it writes after creating the slot). Redis keeps
    // its data across the outage, the chain's last LSN included.
    redis.stop();
    walsweep.start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    walsweep.kill();
    redis.restart();
    let mut conn = redis.connection().await;
    let last: Option<String> = conn.get("changes:last_lsn").await.expect("GET");
    assert!(
        last.is_some(),
        "the outage lost the chain's state; the test shows nothing"
    );

    walsweep.start();
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
    walsweep.terminate();
}
