//! Peak memory of walsweep while it drains one large transaction: flat in the transaction's
//! size, growing only with the transaction's distinct effects.
//!
//! The bench boots a private Postgres, commits ONE transaction of N row changes behind a fresh
//! pgoutput slot, then re-executes itself as a child process that runs the real pipeline
//! (touched-keys plan, null sink) on that slot until the sink applied all N changes and prints
//! its own peak RSS (`VmHWM` from /proc/self/status). So each figure is one fresh walsweep
//! process draining exactly one transaction, nothing of the bench or of Postgres.
//!
//! Workloads (each at N/10 and N rows, default N = 1 000 000):
//! - `distinct`: INSERT of N rows with distinct primary keys. The touched-keys plan holds every
//!   distinct key, so memory grows with N: that is the design ("memory proportional to the
//!   distinct effects of in-flight transactions"), not a leak.
//! - `100keys`: INSERT of N rows into a table without a primary key whose rows take 100
//!   distinct values. Without a key the replica identity is the whole row, so the plan
//!   deduplicates the N changes to 100 effects: this shows memory flat in transaction size.
//! - `update10k`: the same 10 000 rows of a keyed table updated over and over (N/10 000 UPDATE
//!   statements of 10 000 rows each) in one transaction: 10 000 effects, through UPDATE
//!   messages. (Not 100 rows x N/100 statements: every statement of a transaction re-reads
//!   every row version the transaction made so far, which costs Postgres O(N^2 / rows per
//!   statement): over ten minutes at N = 1M with 100 rows, almost three with 1000.)
//! - `savepoint-per-row`: the `100keys` rows, each INSERTed in its own subtransaction by a
//!   PL/pgSQL loop with a `BEGIN ... EXCEPTION` block per row: N subtransactions of one
//!   transaction, 100 effects; ratio ~1 = flat in the number of subtransactions.
//! - `truncate-prefix`: N keys `hit:<n>` in a private Redis, then `TRUNCATE hits` (one
//!   change), drained by the rules planner into the real Redis sink (rule `hit:{page}`): the
//!   table-wide fallback SCANs and UNLINKs all N keys; ratio ~1 = flat in the number of keys.
//!
//! And in two ways of delivery: `streamed` (logical_decoding_work_mem = 64kB, so Postgres
//! streams the transaction while it is in progress and walsweep holds it in flight) and
//! `at-commit` (logical_decoding_work_mem = 4GB, the whole transaction arrives after its
//! commit).
//!
//! Run: `cargo bench --bench rss`
//! Knobs: `WALSWEEP_BENCH_RSS_ROWS` (N, default 1000000), `WALSWEEP_BENCH_RSS_WORKLOADS`
//! (comma-separated subset of `distinct,100keys,update10k,savepoint-per-row,truncate-prefix`,
//! default all), `WALSWEEP_BENCH_PLAN` (`touched`, the default, or `mirror`: the daemon's
//! planner and Redis sink, as `walsweep run` builds them, with a JSON mirror of every table
//! written to a private Redis, so the figure includes holding the transaction's pending mirror
//! writes and writing them out after the commit; `distinct` then checks the first and last row
//! arrived; `truncate-prefix` always uses its rules).
//! `WALSWEEP_BENCH_PLAN=mirror WALSWEEP_BENCH_RSS_WORKLOADS=distinct` is the 1 000 000-row
//! transaction of distinct rows with a JSON mirror (issue 17: peak <= 64 MiB).

#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

#[path = "common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use walsweep::pg::Lsn;

use common::{drain_with_walsweep, env_usize, source, wait_for_flush};
use support::{Postgres, PostgresOptions, Redis};

const DB: &str = "bench";
const SLOT: &str = "rss";
const PUBLICATION: &str = "pub";

/// `WALSWEEP_BENCH_PLAN=mirror`: every row of both tables mirrored as JSON into Redis.
const MIRRORS: &str = r#"
[[table]]
name = "public.items"
[[table.mirror]]
key = "item:{id}"
[[table]]
name = "public.hits"
[[table.mirror]]
key = "hit:{page}"
"#;

fn mirror_plan() -> bool {
    std::env::var("WALSWEEP_BENCH_PLAN").as_deref() == Ok("mirror")
}

/// Set in the child's environment: run the pipeline and report memory instead of benching.
const CHILD_ENV: &str = "WALSWEEP_BENCH_RSS_CHILD";
const CHILD_URL_ENV: &str = "WALSWEEP_BENCH_RSS_URL";
const CHILD_EXPECT_ENV: &str = "WALSWEEP_BENCH_RSS_EXPECT";
/// Set for `truncate-prefix` and the mirror plan: the Redis the child's sink writes to.
const CHILD_REDIS_ENV: &str = "WALSWEEP_BENCH_RSS_REDIS";
/// Set for `truncate-prefix`: its rules, not the mirrors.
const CHILD_PREFIX_ENV: &str = "WALSWEEP_BENCH_RSS_PREFIX";

/// `truncate-prefix`: the rule whose table-wide fallback unlinks every `hit:*` key.
const PREFIX_RULES: &str = r#"
[[table]]
name = "public.hits"
keys = ["hit:{page}"]
"#;

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text, n int);
-- No key: the replica identity (and so the touched-rows key) is the whole row.
CREATE TABLE hits (page int, name text, n int);
CREATE PUBLICATION pub FOR TABLE items, hits;
";

/// Rows the `update10k` workload updates over and over.
const UPDATE_KEYS: usize = 10_000;

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Distinct,
    HundredKeys,
    Update10k,
    SavepointPerRow,
    TruncatePrefix,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Distinct => "distinct",
            Workload::HundredKeys => "100keys",
            Workload::Update10k => "update10k",
            Workload::SavepointPerRow => "savepoint-per-row",
            Workload::TruncatePrefix => "truncate-prefix",
        }
    }

    /// For `update10k`: (rows updated per statement, statements) making up about `rows`.
    fn update_shape(rows: usize) -> (usize, usize) {
        let keys = UPDATE_KEYS.min(rows).max(1);
        (keys, (rows / keys).max(1))
    }

    /// Row changes the transaction of about `rows` rows really makes.
    fn changes(self, rows: usize) -> usize {
        match self {
            Workload::Update10k => {
                let (keys, statements) = Self::update_shape(rows);
                keys * statements
            }
            Workload::TruncatePrefix => 1,
            _ => rows,
        }
    }

    /// Untimed set-up before the slot is created.
    fn prepare(self, pg: &Postgres, redis: Option<&Redis>, rows: usize) {
        pg.psql(DB, "TRUNCATE items, hits");
        if self == Workload::TruncatePrefix {
            fill_redis(redis.expect("truncate-prefix starts Redis"), rows);
        }
        if self == Workload::Update10k {
            let (keys, _) = Self::update_shape(rows);
            pg.psql(
                DB,
                &format!(
                    "INSERT INTO items SELECT g, 'item-' || g, 0 \
                     FROM generate_series(1, {keys}) g; VACUUM ANALYZE items"
                ),
            );
        }
    }

    /// The one transaction of `rows` row changes.
    fn sql(self, rows: usize) -> String {
        match self {
            Workload::Distinct => format!(
                "INSERT INTO items SELECT g, 'item-' || g, g FROM generate_series(1, {rows}) g"
            ),
            Workload::HundredKeys => format!(
                "INSERT INTO hits SELECT g % 100, 'page-' || (g % 100), 0 \
                 FROM generate_series(1, {rows}) g"
            ),
            // Each BEGIN ... EXCEPTION block is a subtransaction with its own xid.
            Workload::SavepointPerRow => format!(
                "DO $$ BEGIN FOR g IN 1..{rows} LOOP \
                   BEGIN \
                     INSERT INTO hits VALUES (g % 100, 'page-' || (g % 100), 0); \
                   EXCEPTION WHEN unique_violation THEN NULL; \
                   END; \
                 END LOOP; END $$"
            ),
            Workload::TruncatePrefix => "TRUNCATE hits".into(),
            // One DO block is one transaction.
            Workload::Update10k => {
                let (keys, statements) = Self::update_shape(rows);
                format!(
                    "DO $$ BEGIN FOR i IN 1..{statements} LOOP \
                       UPDATE items SET n = n + 1 WHERE id <= {keys}; \
                     END LOOP; END $$"
                )
            }
        }
    }
}

struct Delivery {
    name: &'static str,
    work_mem: &'static str,
}

const DELIVERIES: [Delivery; 2] = [
    Delivery {
        name: "streamed",
        work_mem: "64kB",
    },
    Delivery {
        name: "at-commit",
        work_mem: "4GB",
    },
];

/// What a child reported.
struct Measured {
    peak_kib: u64,
    startup_kib: u64,
    secs: f64,
    effects: usize,
    /// From pg_stat_replication_slots: how Postgres delivered the transaction.
    delivery: String,
    /// How long Postgres took to run the transaction (untimed set-up, for orientation).
    written_secs: f64,
}

fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    let big = env_usize("WALSWEEP_BENCH_RSS_ROWS", 1_000_000).max(100);
    let all = [
        Workload::Distinct,
        Workload::HundredKeys,
        Workload::Update10k,
        Workload::SavepointPerRow,
        Workload::TruncatePrefix,
    ];
    let workloads: Vec<Workload> = match std::env::var("WALSWEEP_BENCH_RSS_WORKLOADS") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|name| {
                *all.iter()
                    .find(|w| w.name() == name.trim())
                    .unwrap_or_else(|| panic!("WALSWEEP_BENCH_RSS_WORKLOADS: unknown {name:?}"))
            })
            .collect(),
        _ => all.to_vec(),
    };
    let small = (big / 10).max(1);

    let pg = Postgres::start_with(PostgresOptions {
        extra_settings: vec![
            ("wal_sender_timeout".into(), "60s".into()),
            ("autovacuum".into(), "off".into()),
            ("max_wal_size".into(), "4GB".into()),
        ],
        ..Default::default()
    });
    pg.create_database(DB);
    pg.psql(DB, SCHEMA);
    let redis = (mirror_plan() || workloads.contains(&Workload::TruncatePrefix)).then(Redis::start);
    let version = pg.psql(DB, "SHOW server_version");
    println!(
        "rss: Postgres {version} (private, port {}); each figure is the peak RSS (VmHWM) of a \
         fresh walsweep child process that drained ONE transaction of txn_rows row changes \
         ({})",
        pg.port(),
        if mirror_plan() {
            "mirror plan into a private Redis"
        } else {
            "touched-keys plan, null sink"
        }
    );

    let mut results = Vec::new();
    // The floor: a process that drained a 1-row transaction.
    let floor = measure(&pg, redis.as_ref(), &DELIVERIES[0], Workload::Distinct, 1);
    report(&DELIVERIES[0], Workload::Distinct, 1, &floor);
    for delivery in &DELIVERIES {
        pg.psql(
            DB,
            &format!(
                "ALTER SYSTEM SET logical_decoding_work_mem = '{}'; SELECT pg_reload_conf()",
                delivery.work_mem
            ),
        );
        for &workload in &workloads {
            let mut pair = Vec::new();
            for rows in [small, big] {
                let m = measure(&pg, redis.as_ref(), delivery, workload, rows);
                report(delivery, workload, rows, &m);
                pair.push(m.peak_kib);
            }
            results.push((delivery.name, workload, pair[0], pair[1]));
        }
    }

    println!();
    println!(
        "rss results: peak RSS of one walsweep process per transaction; process floor (1-row \
         transaction) = {:.1} MiB",
        mib(floor.peak_kib)
    );
    for (delivery, workload, s, b) in results {
        println!(
            "rss {delivery:<9} {:<10} txn_rows={small:<8} peak={:>6.1} MiB   txn_rows={big:<8} \
             peak={:>6.1} MiB   ratio={:.2}  (above floor: {:.1} -> {:.1} MiB)",
            workload.name(),
            mib(s),
            mib(b),
            b as f64 / s as f64,
            mib(s.saturating_sub(floor.peak_kib)),
            mib(b.saturating_sub(floor.peak_kib)),
        );
    }
    for workload in &workloads {
        match workload {
            Workload::Distinct => println!(
                "  distinct  : every row has its own key; the plan keeps every distinct key, so \
                 memory grows with distinct effects (allowed by design)."
            ),
            Workload::HundredKeys => println!(
                "  100keys   : INSERTs with only 100 distinct identities (no primary key: the \
                 whole row is the identity); ratio ~1 = flat in transaction size."
            ),
            Workload::Update10k => println!(
                "  update10k : the same 10000 keyed rows UPDATEd txn_rows/10000 times in one \
                 transaction (10000 effects); ratio ~1 = flat in transaction size."
            ),
            Workload::SavepointPerRow => println!(
                "  savepoint-per-row: the 100keys rows, each in its own subtransaction (PL/pgSQL \
                 EXCEPTION block); ratio ~1 = flat in the number of subtransactions."
            ),
            Workload::TruncatePrefix => println!(
                "  truncate-prefix: txn_rows = keys `hit:<n>` in Redis; TRUNCATE makes the rules \
                 sink SCAN+UNLINK them all; ratio ~1 = flat in the number of keys."
            ),
        }
    }
    println!(
        "  streamed  : Postgres streams the open transaction (protocol 2); at-commit: it \
         arrives whole after its commit."
    );
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn report(delivery: &Delivery, workload: Workload, rows: usize, m: &Measured) {
    println!(
        "  {:<9} {:<10} txn_rows={rows:<8} peak={:.1} MiB (at start-up {:.1} MiB)  \
         drained in {:.2}s  plan effects={}  [{}; written in {:.1}s]",
        delivery.name,
        workload.name(),
        mib(m.peak_kib),
        mib(m.startup_kib),
        m.secs,
        m.effects,
        m.delivery,
        m.written_secs
    );
}

/// Commits the workload's transaction behind a fresh slot and has a child drain it.
fn measure(
    pg: &Postgres,
    redis: Option<&Redis>,
    delivery: &Delivery,
    workload: Workload,
    rows: usize,
) -> Measured {
    workload.prepare(pg, redis, rows);
    pg.psql(
        DB,
        &format!("SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')"),
    );
    let writing = Instant::now();
    pg.psql(
        DB,
        &format!("SET synchronous_commit = off; {}", workload.sql(rows)),
    );
    let written_secs = writing.elapsed().as_secs_f64();
    pg.psql(DB, "CHECKPOINT");
    let target: Lsn = pg
        .psql(DB, "SELECT pg_current_wal_lsn()")
        .parse()
        .expect("lsn");
    wait_for_flush(|sql| pg.psql(DB, sql), target);

    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(&exe);
    if workload == Workload::TruncatePrefix || mirror_plan() {
        child.env(CHILD_REDIS_ENV, redis.expect("Redis").url());
    }
    if workload == Workload::TruncatePrefix {
        child.env(CHILD_PREFIX_ENV, "1");
    }
    let out = child
        .env(CHILD_ENV, "1")
        .env(CHILD_URL_ENV, pg.url(DB))
        .env(CHILD_EXPECT_ENV, workload.changes(rows).to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rss child failed for {} {} rows={rows} ({}):\n{stdout}",
        delivery.name,
        workload.name(),
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("rss-child "))
        .unwrap_or_else(|| panic!("no report from the rss child:\n{stdout}"));
    let field = |name: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    let measured = Measured {
        peak_kib: field("peak_kib") as u64,
        startup_kib: field("startup_kib") as u64,
        secs: field("secs"),
        effects: field("effects") as usize,
        delivery: String::new(),
        written_secs,
    };
    if workload == Workload::TruncatePrefix {
        let client = ::redis::Client::open(redis.expect("Redis").url()).expect("Redis client");
        let mut conn = client.get_connection().expect("Redis connection");
        let left: u64 = ::redis::cmd("DBSIZE").query(&mut conn).expect("DBSIZE");
        assert_eq!(left, 0, "TRUNCATE left {left} of {rows} hit:* keys");
    } else if mirror_plan() {
        let client = ::redis::Client::open(redis.expect("Redis").url()).expect("Redis client");
        let mut conn = client.get_connection().expect("Redis connection");
        if workload == Workload::Distinct {
            // The figure is for a transaction that was written out, first row to last.
            for id in [1, rows] {
                let row: Option<String> = ::redis::cmd("GET")
                    .arg(format!("item:{id}"))
                    .query(&mut conn)
                    .expect("GET");
                let row = row.unwrap_or_else(|| panic!("item:{id} is not mirrored"));
                assert!(row.contains(&format!("\"id\":{id},")), "item:{id} = {row}");
            }
        }
        let _: () = ::redis::cmd("FLUSHALL").query(&mut conn).expect("FLUSHALL");
    }
    let measured = Measured {
        delivery: drop_slot(pg),
        ..measured
    };
    pg.psql(DB, "CHECKPOINT");
    measured
}

/// Drops the slot once its walsender is gone, returning the slot's streaming/spill counters.
fn drop_slot(pg: &Postgres) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pg.psql(
        DB,
        &format!("SELECT count(*) FROM pg_replication_slots WHERE active AND slot_name = '{SLOT}'"),
    ) != "0"
    {
        assert!(
            Instant::now() < deadline,
            "slot {SLOT} still active after 30s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The walsender flushes its slot statistics when it exits, just before the slot shows
    // inactive; they can lag a moment behind.
    let stats_sql = format!(
        "SELECT 'stream_txns=' || stream_txns || ' spill_txns=' || spill_txns \
         FROM pg_stat_replication_slots WHERE slot_name = '{SLOT}'"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut stats = pg.psql(DB, &stats_sql);
    while stats.starts_with("stream_txns=0 spill_txns=0") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        stats = pg.psql(DB, &stats_sql);
    }
    pg.psql(DB, &format!("SELECT pg_drop_replication_slot('{SLOT}')"));
    stats
}

/// `VmHWM` (peak resident set) or another `Vm*` field of /proc/self/status, in KiB.
fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// The child: walsweep's pipeline, as `walsweep run` would start it, on the prepared slot.
fn child() {
    let url = std::env::var(CHILD_URL_ENV).expect("child URL");
    let expect: u64 = std::env::var(CHILD_EXPECT_ENV)
        .expect("child expected changes")
        .parse()
        .expect("a number");
    let runtime = common::runtime();
    let startup_kib = proc_status_kib("VmHWM");
    let source = source(&url, SLOT, PUBLICATION);
    let prefix = std::env::var_os(CHILD_PREFIX_ENV).is_some();
    let redis_url = std::env::var(CHILD_REDIS_ENV);
    let drained = if let (false, Ok(redis_url)) = (prefix, &redis_url) {
        let config = walsweep::config::Config::parse(&format!(
            "[source]\nurl = \"{url}\"\n[redis]\nurl = \"{redis_url}\"\n{MIRRORS}"
        ))
        .expect("bench mirrors");
        // Exactly the planner and sink `walsweep run` builds from this config.
        let (planner, sink) = walsweep::pipeline::daemon::build(&config).expect("planner and sink");
        runtime.block_on(common::drain_with(
            source,
            planner,
            sink,
            expect,
            Duration::from_secs(600),
        ))
    } else if let Ok(redis_url) = redis_url {
        let config = walsweep::config::Config::parse(&format!(
            "[source]\nurl = \"{url}\"\n[redis]\nurl = \"{redis_url}\"\n{PREFIX_RULES}"
        ))
        .expect("bench rules");
        let rules = walsweep::plan::rules::Rules::from_config(&config).expect("rules");
        let sink = walsweep::sink::redis::RedisSink::new(&config.redis, &config.matroska)
            .expect("Redis sink");
        runtime.block_on(common::drain_with(
            source,
            walsweep::plan::rules::RulesPlanner::new(rules),
            sink,
            expect,
            Duration::from_secs(600),
        ))
    } else {
        runtime.block_on(drain_with_walsweep(
            source,
            expect,
            Duration::from_secs(600),
        ))
    };
    assert_eq!(drained.txns, 1, "expected exactly one transaction");
    let peak_kib = proc_status_kib("VmHWM");
    println!(
        "rss-child peak_kib={peak_kib} startup_kib={startup_kib} secs={:.3} effects={}",
        drained.elapsed.as_secs_f64(),
        drained.max_effects
    );
}

/// `keys` keys `hit:<n>` (what `TRUNCATE hits` must remove), written in pipelined batches.
fn fill_redis(redis: &Redis, keys: usize) {
    let client = ::redis::Client::open(redis.url()).expect("Redis client");
    let mut conn = client.get_connection().expect("Redis connection");
    let _: () = ::redis::cmd("FLUSHALL").query(&mut conn).expect("FLUSHALL");
    for start in (0..keys).step_by(10_000) {
        let mut pipe = ::redis::pipe();
        for n in start..(start + 10_000).min(keys) {
            pipe.cmd("SET")
                .arg(format!("hit:{n}"))
                .arg("cached")
                .ignore();
        }
        let _: () = pipe.query(&mut conn).expect("filling Redis");
    }
}
