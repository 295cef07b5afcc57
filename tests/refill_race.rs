//! The refill race, measured: readers fill the cache the way matroska-cache does (on a miss: SADD
//! the dependency, read the row, SETEX the value) while a writer updates the rows and walsweep
//! invalidates. A reader that read the old row before a commit and SETEXes after walsweep's
//! invalidation leaves a stale entry. After quiescence the checker compares every cached entry
//! with the database, once with `matroska.reinvalidate_after_ms` off and once on.
//!
//! Whether the readers' own fills race a commit is chance, so each round also plays the race on
//! purpose on a row no reader or writer touches (see `provoke`), retrying a bounded number of
//! times until it lands before a second application could be due. Off, every provoked race
//! must leave its stale entry; on, the second application must remove it, and nothing may be
//! stale. The readers' stale entries are reported, and with reinvalidation on must be none too.
//!
//! CI runs a small workload (a few seconds). A longer measurement, figures on stderr:
//!
//! ```text
//! WALSWEEP_RACE_SECS=30 WALSWEEP_RACE_WRITES_PER_SEC=200 WALSWEEP_RACE_READERS=8 \
//!     cargo test --release --test refill_race -- --nocapture checker
//! ```
//!
//! Also `WALSWEEP_RACE_ROWS` (hot rows, default 50), `WALSWEEP_RACE_SEED`, and
//! `WALSWEEP_RACE_ROUNDS` (default 3): each round writes for `WALSWEEP_RACE_SECS` (default 1),
//! quiesces, provokes the race once and checks. Only a row's last change before a check can
//! leave an entry stale (an earlier stale fill is removed by the next change: the kept set
//! still names it), so more rounds, not a longer round, give the readers' "off" figure more
//! chances to show.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;

use support::daemon::{self, exists, wait_for, wait_gone, wait_streaming, Daemon, Process};
use support::{Postgres, Redis};

/// The delay the "on" run uses: well above the readers' read-to-fill time (0-5 ms plus
/// scheduling), as the config docs advise.
const REINVALIDATE_MS: u64 = 500;
const DATA_TTL_SECS: u64 = 600;
/// Tries at provoking the race before a round fails: a try fails only when the test itself was
/// so slow that the second application may have come first.
const PROVOKE_ATTEMPTS: i32 = 5;

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
    /// Rows beyond the hot ones, one per try at provoking the race.
    fn provoke_rows(&self) -> i32 {
        self.rounds as i32 * PROVOKE_ATTEMPTS
    }

    fn from_env() -> Workload {
        let w = Workload {
            secs: env_or("WALSWEEP_RACE_SECS", 1.0),
            writes_per_sec: env_or("WALSWEEP_RACE_WRITES_PER_SEC", 200),
            readers: env_or("WALSWEEP_RACE_READERS", 4),
            rows: env_or("WALSWEEP_RACE_ROWS", 50),
            rounds: env_or("WALSWEEP_RACE_ROUNDS", 3),
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

/// Creates `db` with `rows` rows and the publication, and returns a client on it.
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

/// The refill race on row `id`, played by the test instead of left to chance: a reader cached
/// the row (SADD, then SETEX), read it again just before an UPDATE committed, and fills its
/// entry with that old value after walsweep's first invalidation removed it (its SADD came
/// before the commit, so no new SADD). Returns an instant the first invalidation came after,
/// and whether the race was provoked: the stale fill was seen in place before any second
/// application could be due. That one is due `delay` after the first, which came after the
/// UPDATE was sent, so a fill seen within `delay` of sending counts; with reinvalidation off
/// (`None`) every fill does.
async fn provoke(
    client: &tokio_postgres::Client,
    conn: &mut MultiplexedConnection,
    id: i32,
    delay: Option<Duration>,
) -> (Instant, bool) {
    let key = data_key(id);
    let old: i32 = client
        .query_one("SELECT v FROM items WHERE id = $1", &[&id])
        .await
        .expect("SELECT")
        .get(0);
    let _: () = conn.sadd(dep_set(id), &key).await.expect("SADD");
    let _: () = conn
        .set_ex(&key, old.to_string(), DATA_TTL_SECS)
        .await
        .expect("SETEX");
    let sent = Instant::now();
    client
        .execute("UPDATE items SET v = v + 1 WHERE id = $1", &[&id])
        .await
        .expect("UPDATE");
    // Polled here rather than with wait_gone: the last sighting of the key bounds the first
    // application from below, which makes the delay check below sound however slow the test.
    let deadline = sent + Duration::from_secs(30);
    let mut first_after = sent;
    loop {
        let asked = Instant::now();
        if !exists(conn, &key).await {
            break;
        }
        first_after = asked;
        assert!(
            Instant::now() < deadline,
            "{key} still present 30s after its UPDATE"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _: () = conn
        .set_ex(&key, old.to_string(), DATA_TTL_SECS)
        .await
        .expect("SETEX");
    let present = exists(conn, &key).await;
    let provoked = delay.is_none_or(|delay| sent.elapsed() < delay);
    if provoked {
        assert!(
            present,
            "item {id}'s stale fill vanished at once: a second application must wait for the \
             delay, and none may run with reinvalidation off"
        );
    }
    (first_after, provoked)
}

#[derive(Debug, Default)]
struct Figures {
    writes: u64,
    fills: u64,
    hits: u64,
    /// Cached entries compared with the database, summed over rounds.
    checked: usize,
    /// Tries at provoking the race, and how many provoked it.
    attempts: u32,
    provoked: u32,
    /// (round, item) of each provoked race.
    provoked_items: Vec<(u32, i32)>,
    /// (round, item) of each entry stale after a round's quiescence: the readers' (hot rows)
    /// and the provoked races' (the rows after them).
    stale_items: Vec<(u32, i32)>,
    hot_rows: i32,
}

impl Figures {
    /// Stale entries the readers left (races that happened by chance).
    fn readers_stale(&self) -> usize {
        self.stale_items
            .iter()
            .filter(|(_, id)| *id <= self.hot_rows)
            .count()
    }

    /// Stale entries on provoked rows.
    fn provoked_stale(&self) -> Vec<(u32, i32)> {
        self.stale_items
            .iter()
            .filter(|(_, id)| *id > self.hot_rows)
            .copied()
            .collect()
    }
}

/// One run of the workload against a fresh database and Redis; returns the checker's figures.
/// Readers run throughout; each round writes for `secs`, waits until every write's first
/// invalidation is applied, provokes the race, waits for quiescence (when on, every second
/// application done) and checks every cached entry. Stale entries are counted, then deleted so
/// a later round does not count them again.
async fn race(pg: &Postgres, db: &str, w: Workload, reinvalidate_ms: Option<u64>) -> Figures {
    let client = prepare(pg, db, w.rows + w.provoke_rows()).await;
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
    let reinvalidate = reinvalidate_ms.map(Duration::from_millis);
    // Off waits as long as on would, so both runs' readers fill for the same time.
    let quiesce = reinvalidate.unwrap_or(Duration::from_millis(REINVALIDATE_MS));
    let mut figures = Figures {
        hot_rows: w.rows,
        ..Figures::default()
    };
    let mut next_row = w.rows;

    for round in 1..=w.rounds {
        figures.writes += writer(&writer_client, w, round).await;

        // Barrier: walsweep applies in commit order, so once the marker's key is gone every
        // write has had its (first) invalidation, and the race below is not slowed by a backlog.
        let marker = format!("marker:{round}");
        let _: () = conn.set(&marker, "x").await.expect("SET");
        client
            .execute("INSERT INTO markers VALUES ($1)", &[&(round as i32)])
            .await
            .expect("INSERT marker");
        wait_gone(&mut conn, &marker, 30).await;

        let mut provoked = None;
        for _ in 0..PROVOKE_ATTEMPTS {
            next_row += 1;
            let id = next_row;
            let key = data_key(id);
            figures.attempts += 1;
            let (first_after, landed) = provoke(&client, &mut conn, id, reinvalidate).await;
            match reinvalidate {
                None => {
                    tokio::time::sleep(quiesce + Duration::from_secs(1)).await;
                    assert!(
                        exists(&mut conn, &key).await,
                        "item {id}'s stale fill was removed though reinvalidation is off"
                    );
                }
                Some(delay) if landed => {
                    // Second applications run in due order, so this one (the last batch) being
                    // done means every write's is done.
                    let gone = wait_gone(&mut conn, &key, delay.as_secs() + 11).await;
                    assert!(
                        gone.duration_since(first_after) >= delay,
                        "second application came at most {:?} after the first, before the \
                         {delay:?} delay",
                        gone.duration_since(first_after)
                    );
                }
                Some(delay) => {
                    eprintln!(
                        "round {round}: try on item {id} too slow to tell whether its fill beat \
                         the second application; trying again"
                    );
                    // Let every second application run, then take the fill away by hand.
                    tokio::time::sleep(delay + Duration::from_secs(1)).await;
                    let _: () = conn.del(&key).await.expect("DEL");
                }
            }
            if landed {
                provoked = Some(id);
                break;
            }
        }
        let Some(provoked) = provoked else {
            panic!(
                "round {round}: the refill race was not provoked in {PROVOKE_ATTEMPTS} tries \
                 (the stale fill never came within the {quiesce:?} delay of its UPDATE)"
            );
        };
        figures.provoked += 1;
        figures.provoked_items.push((round, provoked));

        // Readers keep filling misses, with current values now; a stale entry is a hit, so
        // they never overwrite one.
        let (checked, stale) = check(&client, &mut conn, next_row).await;
        figures.checked += checked;
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
                check(&client, &mut conn, next_row).await.1,
                expected,
                "the checker missed an injected stale entry"
            );
            let _: () = conn.del(data_key(victim)).await.expect("DEL");
            assert_eq!(check(&client, &mut conn, next_row).await.1, stale);
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
    let readers_stale = f.readers_stale();
    eprintln!(
        "refill race, reinvalidate_after_ms {label}: race provoked {} time(s) in {} tries, \
         {} left stale after quiescence; {} round(s) of {:.1}s, {} hot rows, {} writes \
         ({:.0}/s), {} readers: {} fills, {} hits; after quiescence {} entries checked, {} \
         stale from the readers' own races ({:.3}% of fills); stale (round, item): {:?}",
        f.provoked,
        f.attempts,
        f.provoked_stale().len(),
        w.rounds,
        w.secs,
        w.rows,
        f.writes,
        f.writes as f64 / secs,
        w.readers,
        f.fills,
        f.hits,
        f.checked,
        readers_stale,
        100.0 * readers_stale as f64 / f.fills.max(1) as f64,
        f.stale_items
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
        assert_eq!(f.provoked, w.rounds, "one provoked race per round: {f:?}");
    }
    // Off: every provoked race is still stale after quiescence, so the checker sees the race.
    // Whether the readers' own races land is chance: reported, not asserted.
    assert_eq!(
        off.provoked_stale(),
        off.provoked_items,
        "with reinvalidation off, each provoked race must leave exactly its stale entry: {off:?}"
    );
    // On: the second application removed every raced fill, provoked or not.
    assert!(
        on.stale_items.is_empty(),
        "stale entries with reinvalidate_after_ms = {REINVALIDATE_MS}: {on:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinvalidation_removes_an_entry_filled_after_the_first_invalidation() {
    init_logs();
    const DELAY: Duration = Duration::from_millis(1_000);
    // Rows 1..=PROVOKE_ATTEMPTS are raced, one per try; the next one no change touches.
    const UNTOUCHED: i32 = PROVOKE_ATTEMPTS + 1;
    let pg = Postgres::start();
    let client = prepare(&pg, "app", UNTOUCHED).await;
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let daemon = start_walsweep(&pg, &redis, "app", Some(DELAY.as_millis() as u64));
    wait_streaming(&client, "app").await;

    // An entry no change touches: neither application may remove it.
    let _: () = conn
        .sadd(dep_set(UNTOUCHED), data_key(UNTOUCHED))
        .await
        .expect("SADD");
    let _: () = conn
        .set_ex(data_key(UNTOUCHED), "0", DATA_TTL_SECS)
        .await
        .expect("SETEX");

    let mut raced = None;
    for id in 1..=PROVOKE_ATTEMPTS {
        let (first_after, provoked) = provoke(&client, &mut conn, id, Some(DELAY)).await;
        if !provoked {
            eprintln!(
                "try {id}: too slow to tell whether its fill beat the second application; \
                 trying again"
            );
            tokio::time::sleep(DELAY + Duration::from_secs(1)).await;
            let _: () = conn.del(data_key(id)).await.expect("DEL");
            continue;
        }
        let second = wait_gone(&mut conn, &data_key(id), DELAY.as_secs() + 11).await;
        assert!(
            second.duration_since(first_after) >= DELAY,
            "second application at most {:?} after the first, before the {DELAY:?} delay",
            second.duration_since(first_after)
        );
        raced = Some(id);
        break;
    }
    let raced = raced
        .unwrap_or_else(|| panic!("the refill race was not provoked in {PROVOKE_ATTEMPTS} tries"));
    eprintln!("refill race provoked on try {raced} of {PROVOKE_ATTEMPTS}");
    // The kept dependency set made that possible; untouched entries stay.
    assert!(
        exists(&mut conn, &dep_set(raced)).await,
        "dependency set was removed"
    );
    assert!(
        exists(&mut conn, &data_key(UNTOUCHED)).await,
        "an unrelated entry was removed"
    );
    daemon.stop().await;
}

/// The delay of the stop, crash and retry tests: long enough that the test surely acts between
/// the first application and the due second one.
const SLOW_DELAY: Duration = Duration::from_millis(3_000);

/// Where walsweep keeps the pending second applications of database `db` (slot `db`).
fn pending_key(db: &str) -> String {
    format!("walsweep:{db}/{db}:reinvalidate")
}

async fn pending(conn: &mut MultiplexedConnection, db: &str) -> u64 {
    conn.zcard(pending_key(db)).await.expect("ZCARD")
}

/// Waits until the slot confirmed everything written so far: a walsweep killed after that has
/// nothing redelivered, so only a kept second application can remove a refill.
async fn wait_confirmed(client: &tokio_postgres::Client, slot: &str) {
    let lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("pg_current_wal_lsn")
        .get(0);
    wait_for(30, || async {
        client
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot, &lsn],
            )
            .await
            .map(|row| row.get::<_, Option<bool>>(0) == Some(true))
            .unwrap_or(false)
    })
    .await;
}

/// Provokes the refill race on row 1 under the `walsweep` process of `db`, and returns an
/// instant the second application cannot be due before (`SLOW_DELAY` after it), once the slot
/// confirmed the change.
async fn provoke_before_due(
    client: &tokio_postgres::Client,
    conn: &mut MultiplexedConnection,
    db: &str,
) -> Instant {
    let before = Instant::now();
    let (_, provoked) = provoke(client, conn, 1, Some(SLOW_DELAY)).await;
    assert!(
        provoked,
        "the refill race was not provoked within {SLOW_DELAY:?}"
    );
    wait_confirmed(client, db).await;
    assert!(
        before.elapsed() < SLOW_DELAY,
        "too slow: the second application may already be due"
    );
    assert_eq!(pending(conn, db).await, 1, "one pending second application");
    before
}

fn process_config(pg: &Postgres, redis: &Redis, db: &str) -> String {
    daemon::config_text(
        pg,
        &redis.url(),
        db,
        db,
        &format!(
            "[matroska]\nreinvalidate_after_ms = {}\n{RULES}",
            SLOW_DELAY.as_millis()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_applies_the_pending_second_application_before_walsweep_exits() {
    init_logs();
    let pg = Postgres::start();
    let client = prepare(&pg, "stopping", 1).await;
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let walsweep = Process::start(&process_config(&pg, &redis, "stopping"));
    wait_streaming(&client, "stopping").await;

    let before = provoke_before_due(&client, &mut conn, "stopping").await;
    let status = walsweep.terminate();
    assert!(status.success(), "walsweep exited with {status}");
    assert!(
        !exists(&mut conn, &data_key(1)).await,
        "the entry filled after the first application survived the stop: the pending second \
         application was dropped"
    );
    assert!(
        before.elapsed() >= SLOW_DELAY,
        "walsweep exited before the second application was due: it applied it early, so a \
         refill after that is not removed"
    );
    assert_eq!(
        pending(&mut conn, "stopping").await,
        0,
        "applied, so no longer pending"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_application_pending_when_walsweep_is_killed_is_applied_after_a_restart() {
    init_logs();
    let pg = Postgres::start();
    let client = prepare(&pg, "crashing", 1).await;
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let config = process_config(&pg, &redis, "crashing");
    let walsweep = Process::start(&config);
    wait_streaming(&client, "crashing").await;

    let before = provoke_before_due(&client, &mut conn, "crashing").await;
    walsweep.kill();
    assert!(
        exists(&mut conn, &data_key(1)).await,
        "the refill vanished before the second application was due"
    );
    let walsweep = Process::start(&config);
    let gone = wait_gone(&mut conn, &data_key(1), SLOW_DELAY.as_secs() + 30).await;
    assert!(
        gone.duration_since(before) >= SLOW_DELAY,
        "the restarted walsweep applied the second application {:?} after the change, before \
         its {SLOW_DELAY:?} delay",
        gone.duration_since(before)
    );
    wait_for(10, || async {
        pending(&mut redis.connection().await, "crashing").await == 0
    })
    .await;
    assert!(walsweep.terminate().success());
}

/// A batch whose invalidations applied but whose mirror write keeps failing is retried (each
/// try applies its invalidations again): its second application must be kept only once the
/// whole batch applied, and once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_keeps_its_second_application_once_after_it_applied() {
    init_logs();
    const DB: &str = "retried";
    let pg = Postgres::start();
    let client = prepare(&pg, DB, 1).await;
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let url = redis.url();
    // RULES ends with the markers table: the mirror is its, and its write is what fails.
    let rules = format!(
        "[matroska]\nreinvalidate_after_ms = {}\n{RULES}[[table.mirror]]\nkey = \"mirror:{{id}}\"\n",
        SLOW_DELAY.as_millis()
    );
    let text = daemon::config_text(&pg, &url, DB, DB, &rules);
    let config = walsweep::config::Config::parse(&text).expect("config");
    let daemon = daemon::start(config);
    wait_streaming(&client, DB).await;

    let _: () = conn.sadd(dep_set(1), data_key(1)).await.expect("SADD");
    let _: () = conn.set(data_key(1), "0").await.expect("SET");
    // Redis at its memory limit: deletions pass, writes fail with OOM (retried, like an
    // outage), so the batch's invalidations apply and its mirror write keeps failing until
    // the test lifts the limit.
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory-policy", "noeviction"])
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET maxmemory-policy");
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "1"])
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET maxmemory");
    client
        .batch_execute(
            "BEGIN; UPDATE items SET v = v + 1 WHERE id = 1; INSERT INTO markers VALUES (1); \
             COMMIT",
        )
        .await
        .expect("write");
    wait_gone(&mut conn, &data_key(1), 30).await;
    // Long enough for many tries, and for a second application kept by the first one to run.
    tokio::time::sleep(SLOW_DELAY + Duration::from_secs(1)).await;
    assert!(
        !exists(&mut conn, "mirror:1").await,
        "the mirror write was expected to fail"
    );
    assert_eq!(
        pending(&mut conn, DB).await,
        0,
        "a second application was kept for a batch that has not applied"
    );

    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "0"])
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET maxmemory");
    let granted = Instant::now();
    wait_for(30, || async {
        exists(&mut redis.connection().await, "mirror:1").await
    })
    .await;
    // The refill, once the batch applied: only the second application can remove it.
    let _: () = conn.set(data_key(1), "0").await.expect("SET");
    wait_for(10, || async {
        pending(&mut redis.connection().await, DB).await > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pending(&mut conn, DB).await,
        1,
        "one second application per batch, however often it was tried"
    );
    let gone = wait_gone(&mut conn, &data_key(1), SLOW_DELAY.as_secs() + 30).await;
    assert!(
        gone.duration_since(granted) >= SLOW_DELAY,
        "second application {:?} after the batch applied, before the {SLOW_DELAY:?} delay",
        gone.duration_since(granted)
    );
    wait_for(10, || async {
        pending(&mut redis.connection().await, DB).await == 0
    })
    .await;
    daemon.stop().await;
}
