//! The refill race, measured: readers fill the cache the way matroska-cache does (on a miss: SADD
//! the dependency, read the row, SETEX the value) while a writer updates the rows and walsweep
//! invalidates. A reader that read the old row before a commit and SETEXes after walsweep's
//! invalidation leaves a stale entry. After quiescence the checker compares every cached entry
//! with the database, once with `matroska.reinvalidate_after_ms` off and once on.
//!
//! CI runs a small workload (a few seconds). A longer measurement, figures on stderr:
//!
//! ```text
//! WALSWEEP_RACE_SECS=30 WALSWEEP_RACE_WRITES_PER_SEC=200 WALSWEEP_RACE_READERS=8 \
//!     cargo test --release --test refill_race -- --nocapture checker
//! ```
//!
//! Also `WALSWEEP_RACE_ROWS` (hot rows, default 50), `WALSWEEP_RACE_SEED`, and
//! `WALSWEEP_RACE_ROUNDS` (default 1): each round writes for `WALSWEEP_RACE_SECS`, quiesces and
//! checks. Only a row's last change before a check can leave an entry stale (an earlier stale
//! fill is removed by the next change: the kept set still names it), so more rounds, not a
//! longer round, give the "off" figure more chances to show.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;

use support::daemon::{self, exists, wait_gone, wait_streaming, Daemon};
use support::{Postgres, Redis};

/// The delay the "on" run uses: well above the readers' read-to-fill time (0-5 ms plus
/// scheduling), as the config docs advise.
const REINVALIDATE_MS: u64 = 500;
const DATA_TTL_SECS: u64 = 600;

const RULES: &str = r#"
[[table]]
name = "public.items"
deps = ["id:item:{id}"]
[[table]]
name = "public.markers"
keys = ["marker:{id}"]
"#;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number")),
        Err(_) => default,
    }
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    secs: f64,
    writes_per_sec: u32,
    readers: usize,
    rows: i32,
    rounds: u32,
    seed: u64,
}

impl Workload {
    fn from_env() -> Workload {
        let w = Workload {
            secs: env_or("WALSWEEP_RACE_SECS", 3.0),
            writes_per_sec: env_or("WALSWEEP_RACE_WRITES_PER_SEC", 200),
            readers: env_or("WALSWEEP_RACE_READERS", 4),
            rows: env_or("WALSWEEP_RACE_ROWS", 50),
            rounds: env_or("WALSWEEP_RACE_ROUNDS", 1),
            seed: env_or("WALSWEEP_RACE_SEED", 0x5eed),
        };
        assert!(
            w.secs > 0.0 && w.writes_per_sec > 0 && w.readers > 0 && w.rows > 0 && w.rounds > 0
        );
        w
    }
}

fn data_key(id: i32) -> String {
    format!("cache::data::item:{id}")
}

fn dep_set(id: i32) -> String {
    format!("cache::rdep::id:item:{id}")
}

fn start_walsweep(pg: &Postgres, redis: &Redis, db: &str, reinvalidate_ms: Option<u64>) -> Daemon {
    let matroska = match reinvalidate_ms {
        Some(ms) => format!("[matroska]\nreinvalidate_after_ms = {ms}\n"),
        None => String::new(),
    };
    // The slot is named after the database: slots are cluster-wide.
    daemon::start(daemon::config(
        pg,
        redis,
        db,
        db,
        &format!("{matroska}{RULES}"),
    ))
}

fn init_logs() {
    // Warnings (e.g. a failing second invalidation) show up; debug chatter does not.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("walsweep=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Creates `db` with the hot rows and the publication, and returns a client on it.
async fn prepare(pg: &Postgres, db: &str, rows: i32) -> tokio_postgres::Client {
    pg.create_database(db);
    pg.psql(
        db,
        &format!(
            "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
             ALTER TABLE items REPLICA IDENTITY FULL;
             INSERT INTO items SELECT g, 0 FROM generate_series(1, {rows}) g;
             CREATE TABLE markers (id int PRIMARY KEY);
             CREATE PUBLICATION pub FOR TABLE items, markers;"
        ),
    );
    pg.client(db).await
}

async fn reader(
    pg_url: String,
    redis_url: String,
    rows: i32,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> (u64, u64) {
    let (client, connection) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls)
        .await
        .expect("reader connects to Postgres");
    tokio::spawn(connection);
    let select = client
        .prepare("SELECT v FROM items WHERE id = $1")
        .await
        .expect("prepare");
    let mut conn = redis::Client::open(redis_url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("reader connects to Redis");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut fills, mut hits) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let id = rng.random_range(1..=rows);
        let key = data_key(id);
        let cached: Option<String> = conn.get(&key).await.expect("GET");
        if cached.is_some() {
            hits += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..=2))).await;
            continue;
        }
        let _: () = conn.sadd(dep_set(id), &key).await.expect("SADD");
        let v: i32 = client
            .query_one(&select, &[&id])
            .await
            .expect("SELECT")
            .get(0);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..=5))).await;
        let _: () = conn
            .set_ex(&key, v.to_string(), DATA_TTL_SECS)
            .await
            .expect("SETEX");
        fills += 1;
    }
    (fills, hits)
}

/// The writer: `UPDATE items SET v = v + 1` on random hot rows at a fixed rate for `secs`.
/// Returns how many it did (fewer than asked when Postgres cannot keep up).
async fn writer(client: &tokio_postgres::Client, w: Workload, round: u32) -> u64 {
    let update = client
        .prepare("UPDATE items SET v = v + 1 WHERE id = $1")
        .await
        .expect("prepare");
    let mut rng = StdRng::seed_from_u64(w.seed ^ ((round as u64) << 32));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / w.writes_per_sec as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let deadline = Instant::now() + Duration::from_secs_f64(w.secs);
    let mut writes = 0;
    while Instant::now() < deadline {
        tick.tick().await;
        let id = rng.random_range(1..=w.rows);
        client.execute(&update, &[&id]).await.expect("UPDATE");
        writes += 1;
    }
    writes
}

/// Every cached entry compared with the database: (entries checked, ids whose entry is stale).
async fn check(
    client: &tokio_postgres::Client,
    conn: &mut MultiplexedConnection,
    rows: i32,
) -> (usize, Vec<i32>) {
    let db: std::collections::HashMap<i32, i32> = client
        .query("SELECT id, v FROM items", &[])
        .await
        .expect("SELECT")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut checked = 0;
    let mut stale = Vec::new();
    for id in 1..=rows {
        let cached: Option<String> = conn.get(data_key(id)).await.expect("GET");
        let Some(cached) = cached else { continue };
        checked += 1;
        let cached: i32 = cached.parse().expect("cached value is a number");
        if cached != db[&id] {
            stale.push(id);
        }
    }
    (checked, stale)
}

#[derive(Debug, Default)]
struct Figures {
    writes: u64,
    fills: u64,
    hits: u64,
    /// Cached entries compared with the database, summed over rounds.
    checked: usize,
    /// Stale entries found after each round's quiescence, summed over rounds.
    stale: usize,
    /// (round, item) of each stale entry.
    stale_items: Vec<(u32, i32)>,
}

/// One run of the workload against a fresh database and Redis; returns the checker's figures.
/// Readers run throughout; each round writes for `secs`, waits for quiescence (every first
/// and, when on, second invalidation applied) and checks every cached entry. Stale entries are
/// counted, then deleted so a later round does not count them again.
async fn race(pg: &Postgres, db: &str, w: Workload, reinvalidate_ms: Option<u64>) -> Figures {
    let client = prepare(pg, db, w.rows).await;
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let daemon = start_walsweep(pg, &redis, db, reinvalidate_ms);
    wait_streaming(&client, db).await;

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..w.readers)
        .map(|i| {
            tokio::spawn(reader(
                pg.url(db),
                redis.url(),
                w.rows,
                w.seed + 1 + i as u64,
                stop.clone(),
            ))
        })
        .collect();
    let writer_client = pg.client(db).await;
    let delay = Duration::from_millis(reinvalidate_ms.unwrap_or(REINVALIDATE_MS));
    let mut figures = Figures::default();

    for round in 1..=w.rounds {
        figures.writes += writer(&writer_client, w, round).await;

        // Barrier: walsweep applies in commit order, so once the marker's key is gone every
        // write has had its (first) invalidation.
        let marker = format!("marker:{round}");
        let _: () = conn.set(&marker, "x").await.expect("SET");
        client
            .execute("INSERT INTO markers VALUES ($1)", &[&(round as i32)])
            .await
            .expect("INSERT marker");
        let first_gone = wait_gone(&mut conn, &marker, 30).await;
        // Refill the marker like a racing reader would: only a second application removes it.
        let _: () = conn.set(&marker, "x").await.expect("SET");
        let refilled_in = first_gone.elapsed();

        if reinvalidate_ms.is_some() && refilled_in < delay / 2 {
            // Second applications run in due order, so the marker's (the last batch) being
            // done means every write's is done.
            let gone = wait_gone(&mut conn, &marker, delay.as_secs() + 11).await;
            assert!(
                gone.duration_since(first_gone) + Duration::from_millis(50) >= delay,
                "second application came {:?} after the first, before the {delay:?} delay",
                gone.duration_since(first_gone)
            );
        } else {
            // Off (same wait, for the same conditions), or the test itself stalled.
            tokio::time::sleep(delay + Duration::from_secs(1)).await;
            if reinvalidate_ms.is_none() {
                // Control: without reinvalidation a refill after the invalidation stays.
                assert!(
                    exists(&mut conn, &marker).await,
                    "the marker's refill was removed though reinvalidation is off"
                );
            }
        }

        // Readers keep filling misses, with current values now; a stale entry is a hit, so
        // they never overwrite one.
        let (checked, stale) = check(&client, &mut conn, w.rows).await;
        figures.checked += checked;
        figures.stale += stale.len();
        figures
            .stale_items
            .extend(stale.iter().map(|id| (round, *id)));

        if round == w.rounds {
            // The checker checks: a wrong value for a quiescent row is counted, exactly it.
            let victim = (1..=w.rows)
                .find(|id| !stale.contains(id))
                .expect("a row that is not stale");
            let _: () = conn
                .set_ex(data_key(victim), "-1", DATA_TTL_SECS)
                .await
                .expect("SETEX");
            let mut expected = stale.clone();
            expected.push(victim);
            expected.sort_unstable();
            assert_eq!(
                check(&client, &mut conn, w.rows).await.1,
                expected,
                "the checker missed an injected stale entry"
            );
            let _: () = conn.del(data_key(victim)).await.expect("DEL");
            assert_eq!(check(&client, &mut conn, w.rows).await.1, stale);
        }
        for id in stale {
            let _: () = conn.del(data_key(id)).await.expect("DEL");
        }
    }

    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let (f, h) = r.await.expect("reader");
        figures.fills += f;
        figures.hits += h;
    }
    daemon.stop().await;
    figures
}

fn report(label: &str, w: &Workload, f: &Figures) {
    let secs = w.secs * w.rounds as f64;
    eprintln!(
        "refill race, reinvalidate_after_ms {label}: {} round(s) of {:.1}s, {} hot rows, {} \
         writes ({:.0}/s), {} readers: {} fills, {} hits; after quiescence {} entries checked, \
         {} stale ({:.3}% of fills){}",
        w.rounds,
        w.secs,
        w.rows,
        f.writes,
        f.writes as f64 / secs,
        w.readers,
        f.fills,
        f.hits,
        f.checked,
        f.stale,
        100.0 * f.stale as f64 / f.fills.max(1) as f64,
        if f.stale_items.is_empty() {
            String::new()
        } else {
            format!(" (round, item): {:?}", f.stale_items)
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_counts_stale_entries_with_reinvalidation_off_and_on() {
    init_logs();
    let w = Workload::from_env();
    let pg = Postgres::start();

    let off = race(&pg, "race_off", w, None).await;
    report("off", &w, &off);
    let on = race(&pg, "race_on", w, Some(REINVALIDATE_MS)).await;
    report(&format!("= {REINVALIDATE_MS}"), &w, &on);

    for f in [&off, &on] {
        assert!(f.writes > 0, "no writes: {f:?}");
        assert!(f.fills > 0, "no fills: {f:?}");
        assert!(f.checked > 0, "nothing cached to check: {f:?}");
    }
    // With the second application every raced fill is removed (design.md measured 0). With it
    // off the figure is reported, not asserted: whether a race lands is a matter of chance.
    assert!(
        on.stale == 0,
        "stale entries with reinvalidate_after_ms = {REINVALIDATE_MS}: {on:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinvalidation_removes_an_entry_filled_after_the_first_invalidation() {
    init_logs();
    const DELAY: Duration = Duration::from_millis(1_000);
    let pg = Postgres::start();
    let client = prepare(&pg, "app", 2).await;
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let daemon = start_walsweep(&pg, &redis, "app", Some(DELAY.as_millis() as u64));
    wait_streaming(&client, "app").await;

    // The app cached item 1 (SADD, then SETEX), and item 2 which no change touches.
    for id in [1, 2] {
        let _: () = conn.sadd(dep_set(id), data_key(id)).await.expect("SADD");
        let _: () = conn
            .set_ex(data_key(id), "0", DATA_TTL_SECS)
            .await
            .expect("SETEX");
    }
    client
        .execute("UPDATE items SET v = v + 1 WHERE id = 1", &[])
        .await
        .expect("UPDATE");
    let first = wait_gone(&mut conn, &data_key(1), 20).await;
    // A reader that read v = 0 before the commit fills after the invalidation (its SADD came
    // before the commit, so no new SADD).
    let _: () = conn
        .set_ex(data_key(1), "0", DATA_TTL_SECS)
        .await
        .expect("SETEX");
    if first.elapsed() < DELAY / 2 {
        assert!(
            exists(&mut conn, &data_key(1)).await,
            "the refill vanished at once: the second application must wait for the delay"
        );
    }
    let second = wait_gone(&mut conn, &data_key(1), DELAY.as_secs() + 11).await;
    // The first application happened at most one poll (5 ms) before `first` was seen.
    assert!(
        second.duration_since(first) + Duration::from_millis(50) >= DELAY,
        "second application {:?} after the first, before the {DELAY:?} delay",
        second.duration_since(first)
    );
    // The kept dependency set made that possible; untouched entries stay.
    assert!(
        exists(&mut conn, &dep_set(1)).await,
        "dependency set was removed"
    );
    assert!(
        exists(&mut conn, &data_key(2)).await,
        "an unrelated entry was removed"
    );
    daemon.stop().await;
}
