//! Fenced fills (README, "Fenced fills"): with `[matroska] fences = true` walsweep raises a
//! fence (`walsweep:fence:<key>` = the commit's LSN) before each invalidation, and an app that
//! stores through the `walsweep_fill` Redis Function with a token taken before it read the
//! database (`walsweep_client.FencedRedisBackend` for matroska-cache) never leaves a stale
//! entry behind.
//!
//! The refill race with the real matroska-cache (`clients/python/tests/refill_race_fenced.py`):
//! readers get → miss → read the row → put(), a writer updates the rows, and after each
//! round's quiescence every cached entry is compared with the database. Fenced
//! (`FencedRedisBackend`): at least 100 000 fills, some refused, nothing stale. Plain
//! `RedisBackend`: the race provoked on purpose is stale, and the readers' own stale entries
//! are reported (chance). Both against walsweep with fences on. CI scale; longer, with the
//! figures on stderr:
//!
//! ```text
//! WALSWEEP_FENCED_FILLS=500000 WALSWEEP_PLAIN_FILLS=100000 WALSWEEP_FENCED_ROUNDS=50 \
//!     WALSWEEP_FENCED_MAX_SECS=1500 \
//!     cargo test --release --test fenced_fills -- --nocapture refill_race
//! ```
//!
//! `WALSWEEP_FENCED_FILLS` / `WALSWEEP_PLAIN_FILLS` (default 100000 / 10000) are the fills
//! each run makes at least; also `WALSWEEP_FENCED_ROUNDS` (10; per run), `_PROCS` / `_THREADS`
//! (reader processes, threads each: 2 / 4), `_ROWS` (hot rows, 50), `_VIEWS` (entries per row,
//! 64), `_WRITES_PER_SEC` (200; 0: as fast as the writer can), `_SLOW_SHARE` / `_SLOW_MS`
//! (share of fills that work between the read and the put, and for up to how long: 0.2, 3 ms),
//! `_MAX_SECS` (a run's cap, 120).
//!
//! Fences survive a walsweep restart and a redelivered batch: the last test.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;

use support::binaries::{python, repo};
use support::daemon::{self, wait_streaming, Daemon};
use support::{Postgres, Redis};

const RULES: &str = r#"
[[table]]
name = "public.items"
deps = ["id:item:{id}"]
"#;

const FENCED: &str = "[matroska]\nfences = true\n";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number")),
        Err(_) => default,
    }
}

fn run_python(python: &Path, args: &[String], env: &[(&str, String)]) -> (bool, String, String) {
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

/// The package's unit tests (fenced ones included) against a Redis 7 of their own: they load
/// the function library from `src/sink/redis/functions/walsweep.lua` and raise fences by hand.
#[test]
fn the_python_client_unit_tests_pass_against_redis() {
    let python = python("the fenced-fill client tests need the venv with matroska-cache");
    let redis = Redis::start();
    let (ok, _, stderr) = run_python(
        &python,
        &[
            "-m".into(),
            "unittest".into(),
            "discover".into(),
            "-v".into(),
            "-s".into(),
            "clients/python/tests".into(),
            "-p".into(),
            "test_fenced.py".into(),
        ],
        &[("WALSWEEP_TEST_REDIS_PORT", redis.port().to_string())],
    );
    assert!(ok, "clients/python fenced tests failed:\n{stderr}");
    assert!(
        !stderr.contains("skipped"),
        "Redis tests were skipped:\n{stderr}"
    );
    assert!(
        stderr.contains("test_tokens_are_per_thread") && stderr.contains("test_refused_when"),
        "the fenced tests did not run:\n{stderr}"
    );
}

fn init_logs() {
    // Warnings show up; the per-batch debug lines (thousands a second here) do not.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("walsweep=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// `name=value` pairs of the checker's summary line.
struct Figures(HashMap<String, String>);

impl Figures {
    fn parse(stdout: &str) -> Figures {
        let line = stdout.lines().last().unwrap_or_default();
        Figures(
            line.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn text(&self, name: &str) -> &str {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("no {name}= in the checker's figures {:?}", self.0))
    }

    fn num(&self, name: &str) -> u64 {
        self.text(name)
            .parse()
            .unwrap_or_else(|_| panic!("{name}={} is not a number", self.text(name)))
    }
}

/// One run of the checker, `mode` = `fenced` or `plain`, on a fresh database (slot named after
/// it), Redis and walsweep with fences on (so both modes pay the same invalidation cost).
async fn race(pg: &Postgres, python: &Path, db: &str, mode: &str, fills: u64) -> Figures {
    let rows: u32 = env_or("WALSWEEP_FENCED_ROWS", 50);
    pg.create_database(db);
    // Row rows + 1 is the checker's own: it provokes the race there.
    pg.psql(
        db,
        &format!(
            "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO items SELECT g, 0 FROM generate_series(1, {}) g;
             CREATE PUBLICATION pub FOR TABLE items;",
            rows + 1
        ),
    );
    let redis = Redis::start();
    let walsweep = daemon::start(daemon::config(
        pg,
        &redis,
        db,
        db,
        &format!("{FENCED}{RULES}"),
    ));
    let client = pg.client(db).await;
    wait_streaming(&client, db).await;

    let opt = |name: &str, default: &str| {
        std::env::var(format!("WALSWEEP_FENCED_{name}")).unwrap_or_else(|_| default.to_string())
    };
    let args: Vec<String> = vec![
        "clients/python/tests/refill_race_fenced.py".into(),
        redis.port().to_string(),
        pg.url(db),
        db.into(),
        db.into(),
        mode.into(),
        "--fills".into(),
        fills.to_string(),
        "--rows".into(),
        rows.to_string(),
        "--procs".into(),
        opt("PROCS", "2"),
        "--threads".into(),
        opt("THREADS", "4"),
        "--views".into(),
        opt("VIEWS", "64"),
        "--writes-per-sec".into(),
        opt("WRITES_PER_SEC", "200"),
        "--rounds".into(),
        opt("ROUNDS", "10"),
        "--slow-share".into(),
        opt("SLOW_SHARE", "0.2"),
        "--slow-ms".into(),
        opt("SLOW_MS", "3"),
        "--max-secs".into(),
        opt("MAX_SECS", "120"),
    ];
    let python = python.to_path_buf();
    let started = Instant::now();
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || run_python(&python, &args, &[]))
        .await
        .expect("checker");
    assert!(
        ok,
        "refill_race_fenced.py {mode} failed:\n{stdout}\n{stderr}"
    );
    eprintln!(
        "refill race, {mode} backend ({:.1}s): {}{}",
        started.elapsed().as_secs_f64(),
        stdout.trim(),
        if stderr.trim().is_empty() {
            String::new()
        } else {
            format!("\n{}", stderr.trim())
        }
    );
    walsweep.stop().await;
    Figures::parse(&stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refill_race_fenced_fills_leave_nothing_stale_where_plain_ones_do() {
    let python = python("the refill-race checker needs the venv with matroska-cache");
    init_logs();
    let pg = Postgres::start();
    let fenced_fills: u64 = env_or("WALSWEEP_FENCED_FILLS", 100_000);
    let plain_fills: u64 = env_or("WALSWEEP_PLAIN_FILLS", 10_000);

    let plain = race(&pg, &python, "race_plain", "plain", plain_fills).await;
    let fenced = race(&pg, &python, "race_fenced", "fenced", fenced_fills).await;

    // Plain: the race provoked on purpose is stored and stays stale; nothing is refused.
    assert_eq!(plain.text("provoked_stored"), "true", "{:?}", plain.0);
    assert_eq!(plain.text("provoked_stale"), "true", "{:?}", plain.0);
    assert_eq!(plain.num("refused"), 0);
    assert!(plain.num("fills") >= plain_fills, "{:?}", plain.0);

    // Fenced: walsweep fenced the provoked commit and the fill that read before it was
    // refused; the readers' races were refused too, so nothing is stale.
    assert_eq!(fenced.text("provoked_stored"), "false", "{:?}", fenced.0);
    assert_eq!(fenced.text("provoked_stale"), "false", "{:?}", fenced.0);
    assert!(
        fenced.text("provoked_fence").parse::<u64>().is_ok(),
        "no fence on the provoked row's set: {:?}",
        fenced.0
    );
    assert!(fenced.num("fills") >= fenced_fills, "{:?}", fenced.0);
    assert!(
        fenced.num("refused") > 0,
        "no fill was refused: the readers never raced a commit: {:?}",
        fenced.0
    );
    assert_eq!(fenced.num("stale"), 0, "stale entries: {:?}", fenced.0);
    assert!(fenced.num("checked") > 0, "nothing cached: {:?}", fenced.0);
    // The function's own counters agree: the readers' fills, the provoked one refused, the
    // provoked row's sibling entry stored.
    assert_eq!(
        fenced.num("function_refused"),
        fenced.num("refused") + 1,
        "{:?}",
        fenced.0
    );
    assert_eq!(
        fenced.num("function_stored"),
        fenced.num("stored") + 1,
        "{:?}",
        fenced.0
    );
}

// ---------------------------------------------------------------------------------------------
// Fences survive a restart and a redelivered batch.

const POSITION_KEY: &str = "walsweep:app/fences:applied";
const ROW_SET: &str = "cache::rdep::id:item:1";
const ROW_KEY: &str = "cache::data::item:1";
const FENCE_OF_SET: &str = "walsweep:fence:cache::rdep::id:item:1";

async fn insert_lsn(client: &tokio_postgres::Client) -> u64 {
    client
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::text",
            &[],
        )
        .await
        .expect("insert lsn")
        .get::<_, String>(0)
        .parse()
        .expect("decimal lsn")
}

/// Waits until walsweep's applied position under `key` reaches `lsn`.
async fn wait_applied(conn: &mut MultiplexedConnection, key: &str, lsn: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let position: Option<String> = conn.get(key).await.expect("GET position");
        if position.is_some_and(|p| p.parse::<u64>().expect("decimal position") >= lsn) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{key} did not reach {lsn} in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether slot `slot` confirmed everything up to `lsn`.
async fn confirmed(client: &tokio_postgres::Client, slot: &str, lsn: u64) -> bool {
    client
        .query_one(
            "SELECT confirmed_flush_lsn - '0/0'::pg_lsn >= $2::text::numeric \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &lsn.to_string()],
        )
        .await
        .expect("pg_replication_slots")
        .get::<_, Option<bool>>(0)
        .unwrap_or(false)
}

async fn fence(conn: &mut MultiplexedConnection) -> Option<u64> {
    let value: Option<String> = conn.get(FENCE_OF_SET).await.expect("GET fence");
    value.map(|v| v.parse().expect("a fence is a decimal LSN"))
}

async fn fill_begin(conn: &mut MultiplexedConnection, position_key: &str) -> String {
    redis::cmd("FCALL")
        .arg("walsweep_fill_begin")
        .arg(1)
        .arg(position_key)
        .query_async(conn)
        .await
        .expect("FCALL walsweep_fill_begin")
}

/// `walsweep_fill` of row 1's entry (dependency set `ROW_SET`) with `token`: stored?
async fn fill(conn: &mut MultiplexedConnection, token: &str, value: &str) -> bool {
    let stored: i64 = redis::cmd("FCALL")
        .arg("walsweep_fill")
        .arg(6)
        .arg(ROW_KEY)
        .arg(format!("walsweep:fence:{ROW_KEY}"))
        .arg("walsweep:fence-all")
        .arg("walsweep:fills")
        .arg(ROW_SET)
        .arg(FENCE_OF_SET)
        .arg(token)
        .arg(value)
        .arg(600)
        .query_async(conn)
        .await
        .expect("FCALL walsweep_fill");
    stored == 1
}

/// walsweep on slot `slot` of database `app`, following publication `publication`.
fn start(pg: &Postgres, redis: &Redis, slot: &str, publication: &str, rules: &str) -> Daemon {
    let text = daemon::config_text(pg, &redis.url(), "app", slot, &format!("{FENCED}{rules}"))
        .replace(
            "publication = \"pub\"",
            &format!("publication = \"{publication}\""),
        );
    daemon::start(walsweep::config::Config::parse(&text).expect("config"))
}

/// Run A follows items and notes: a note's change invalidates its item's entries too.
const RULES_WITH_NOTES: &str = r#"
[[table]]
name = "public.items"
deps = ["id:item:{id}"]
[[table]]
name = "public.notes"
deps = ["id:item:{item_id}"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_survive_a_restart_and_a_redelivered_batch_never_lowers_them() {
    init_logs();
    let pg = Postgres::start();
    pg.create_database("app");
    // Slot `replay` exists before the commits, so a walsweep started on it later is sent them
    // again: a deterministic redelivery. It follows publication `pub` (items only), so of the
    // two commits below it is sent only the first: Postgres 15+ sends no empty transaction.
    pg.psql(
        "app",
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO items VALUES (1, 0);
         CREATE TABLE notes (id int PRIMARY KEY, item_id int NOT NULL, note text);
         INSERT INTO notes VALUES (1, 1, '');
         CREATE PUBLICATION pub FOR TABLE items;
         CREATE PUBLICATION pub_all FOR TABLE items, notes;
         SELECT pg_create_logical_replication_slot('replay', 'pgoutput');",
    );
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let walsweep = start(&pg, &redis, "fences", "pub_all", RULES_WITH_NOTES);
    let client = pg.client("app").await;
    wait_streaming(&client, "fences").await;

    // A fill begins (token), and reads row 1 ...
    let token = fill_begin(&mut conn, POSITION_KEY).await;
    let old: i32 = client
        .query_one("SELECT v FROM items WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    // ... while two commits invalidate its entry: the item's, then its note's.
    client
        .execute("UPDATE items SET v = v + 1 WHERE id = 1", &[])
        .await
        .unwrap();
    let first = insert_lsn(&client).await;
    wait_applied(&mut conn, POSITION_KEY, first).await;
    let after_first = fence(&mut conn)
        .await
        .expect("no fence after the first commit");
    client
        .execute("UPDATE notes SET note = 'x' WHERE id = 1", &[])
        .await
        .unwrap();
    let second = insert_lsn(&client).await;
    wait_applied(&mut conn, POSITION_KEY, second).await;
    let fenced_at = fence(&mut conn)
        .await
        .expect("no fence after the second commit");
    let token_at: u64 = token.parse().expect("decimal token");
    assert!(
        token_at < after_first && after_first < fenced_at && fenced_at <= second,
        "token {token_at}, fence after the first commit {after_first}, after the second \
         {fenced_at} (its insert position {second})"
    );
    assert!(
        !fill(&mut conn, &token, &old.to_string()).await,
        "a fill that read before both commits was stored"
    );

    // A hard stop (no drain, no last status update), then a restart on the same slot: it is
    // sent again what the slot had not confirmed. No new commit: a redelivered batch with a
    // newer commit in it would raise its fences to that commit's LSN.
    walsweep.task.abort();
    let _ = walsweep.task.await;
    let unconfirmed = !confirmed(&client, "fences", second).await;
    let walsweep = start(&pg, &redis, "fences", "pub_all", RULES_WITH_NOTES);
    wait_streaming(&client, "fences").await;
    daemon::wait_for(30, || confirmed(&client, "fences", second)).await;
    eprintln!(
        "restart: {}",
        if unconfirmed {
            "the slot had not confirmed both commits: sent again"
        } else {
            "the slot had confirmed both commits: nothing sent again"
        }
    );
    assert_eq!(fence(&mut conn).await, Some(fenced_at), "after the restart");
    assert!(
        !fill(&mut conn, &token, &old.to_string()).await,
        "after the restart, a fill older than the fence was stored"
    );
    walsweep.stop().await;

    // Slot `replay` is sent the first commit again, not the second: delivered again, the
    // first must not lower the fence to its own, older LSN.
    // An entry of the item: the redelivered commit's invalidation removes it.
    let _: () = conn.sadd(ROW_SET, "cache::data::other").await.unwrap();
    let _: () = conn.set("cache::data::other", "x").await.unwrap();
    let walsweep = start(&pg, &redis, "replay", "pub", RULES);
    wait_applied(&mut conn, "walsweep:app/replay:applied", second).await;
    assert!(
        !daemon::exists(&mut conn, "cache::data::other").await,
        "slot replay was not sent the first commit again"
    );
    assert_eq!(
        fence(&mut conn).await,
        Some(fenced_at),
        "the redelivered first commit ({after_first}) changed the fence"
    );
    assert!(
        !fill(&mut conn, &token, &old.to_string()).await,
        "after the redelivery, a fill older than the fence was stored"
    );
    // Fences refuse only older fills: one that began now is stored.
    let now = fill_begin(&mut conn, POSITION_KEY).await;
    let current: i32 = client
        .query_one("SELECT v FROM items WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        fill(&mut conn, &now, &current.to_string()).await,
        "a fill that began after every commit was refused"
    );
    let cached: String = conn.get(ROW_KEY).await.expect("GET");
    assert_eq!(cached, current.to_string());
    walsweep.stop().await;
}
