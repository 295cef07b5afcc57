//! Draining a slot backlog: walsweep against `pg_recvlogical` on the same backlog, same server,
//! same run, judged by what a user sees: the slot's confirmed position.
//!
//! Per transaction size (1 and 100 rows) and round: two pgoutput slots are created at the same
//! point and a backlog of row changes (INSERTs) is committed and flushed behind them; the end
//! of WAL after it is the end LSN. Then each consumer drains its own slot, one after the other,
//! the order alternating per round (odd rounds pg_recvlogical first, even rounds walsweep
//! first, so neither always gets the warmer caches):
//! - `pg_recvlogical --endpos=<end LSN> -f /dev/null`;
//! - walsweep as its own process: by default the real release binary, `walsweep run --config`,
//!   with a realistic rule set (2 key templates, 2 dependency templates, 1 scope on 2 columns)
//!   applied to a private Redis, every other setting at its default (status updates every
//!   second, visibility gate on).
//!
//! A consumer's clock starts before its process is spawned and stops when a poller (a plain SQL
//! connection, every 5 ms) first sees the slot's `confirmed_flush_lsn` in
//! `pg_replication_slots` at or past the end LSN: process start-up, connecting, applying to
//! Redis and the status update that reports it to Postgres are all inside. walsweep is then
//! stopped with SIGTERM (untimed).
//!
//! Printed per run: wall seconds, changes/s, and CPU seconds (user + system, clock-tick
//! resolution) of
//! - the consumer process itself: walsweep's from `/proc/<pid>/stat` (all its threads) at the
//!   moment completion was seen; pg_recvlogical's from the bench's reaped-children times around
//!   its run (it exits right after confirming);
//! - its walsender backend (the slot's `active_pid`, `/proc/<pid>/stat`, last sampled when
//!   completion was seen): decoding, which is most of the work for both;
//! - Redis, for walsweep's runs: the `INFO cpu` delta (`used_cpu_user` + `used_cpu_sys`) from
//!   before the spawn to completion.
//!
//! Also printed for walsweep with Redis: when its published applied position
//! (`walsweep:<db>/<slot>:applied`, polled with the slot) reached the end LSN. walsweep tells
//! Postgres its confirmed position every `status_interval_ms` (1 s by default), so its wall
//! time is that moment rounded up to the next status update. And the number of sink batches,
//! read from walsweep's metrics endpoint (on, as by default, on a free port) after the run.
//!
//! The bench's own work (polling, Redis INFO) runs in the bench process and is in none of them.
//! Summary per transaction size: medians of the rounds, the rate ratio (walsweep changes/s over
//! pg_recvlogical's, from the median times; target >= 0.90), and walsweep's client CPU over
//! pg_recvlogical's (target <= 1.00). The load average is printed: on a loaded machine the
//! figures are noise.
//!
//! pg_recvlogical asks pgoutput for proto_version 2 with streaming and messages on; walsweep
//! negotiates the newest version the server speaks (3 on Postgres 15, 4 from 16: streaming
//! `parallel`), also with messages on. For these backlogs of committed INSERTs, both receive the
//! same messages.
//!
//! Private Postgres and Redis from the test support code (never the machine's own servers).
//!
//! Run: `cargo bench --bench drain`
//! Knobs: `WALSWEEP_BENCH_CHANGES` (row changes per backlog, default 200000),
//! `WALSWEEP_BENCH_ROUNDS` (rounds per transaction size, median reported, default 3),
//! `WALSWEEP_BENCH_TXN_SIZES` (rows per transaction, comma-separated, default `1,100`),
//! `WALSWEEP_BENCH_PLAN`: `rules` (the default, above); `mirror` (the real binary with one JSON
//! mirror of every row and one sorted-set index on it, into Redis; checked complete after each
//! run); or `touched` (no Redis: the touched-keys planner into a sink that discards, run by
//! this bench re-executed as a child process, since the binary has no discarding sink),
//! `WALSWEEP_BENCH_RUNTIME` (`touched` only: `multi_thread`, the default and what `walsweep
//! run` uses, or `current_thread`), `WALSWEEP_BENCH_BIN` (the `walsweep` binary to run, e.g. a
//! copy of an earlier build to compare with; default the release build of this checkout).

// Not every re-export of the support code is used here.
#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use walsweep::pg::Lsn;

use common::{cpu_time, env_usize, median, proc_cpu, source, wait_for_flush};
use support::{binaries::pg_tool, Postgres, PostgresOptions, Redis};

/// The default plan: the realistic rule set of issue 17.
const RULES: &str = r#"
[[table]]
name = "public.items"
keys = ["item:{id}", "item:name:{name}"]
deps = ["id:item:{id}", "name:item:{name}"]
[[table.scope]]
name = "Item"
columns = ["name", "n"]
"#;

/// `WALSWEEP_BENCH_PLAN=mirror`: every row as JSON plus one index.
const MIRROR: &str = r#"
[[table]]
name = "public.items"
[[table.mirror]]
key = "item:{id}"
[[table.mirror.index]]
key = "items:by_n"
member = "{id}"
score = "n"
"#;

/// Set in the environment of the `touched` child: the source URL it drains.
const CHILD_URL_ENV: &str = "WALSWEEP_BENCH_DRAIN_CHILD_URL";

/// How often the poller reads the slot's confirmed position.
const POLL: Duration = Duration::from_millis(5);
/// A drain that has not confirmed by then is broken, not slow.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, PartialEq)]
enum PlanKind {
    Rules,
    Mirror,
    Touched,
}

impl PlanKind {
    fn from_env() -> PlanKind {
        match std::env::var("WALSWEEP_BENCH_PLAN").as_deref() {
            Err(_) | Ok("") | Ok("rules") => PlanKind::Rules,
            Ok("mirror") => PlanKind::Mirror,
            Ok("touched") => PlanKind::Touched,
            Ok(other) => panic!("WALSWEEP_BENCH_PLAN={other:?}: use rules, mirror or touched"),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            PlanKind::Rules => {
                "rules (2 key templates, 2 dependency templates, 1 scope) into a private Redis, \
                 `walsweep run` (release binary)"
            }
            PlanKind::Mirror => {
                "mirror (JSON of every row + a sorted-set index) into a private Redis, \
                 `walsweep run` (release binary)"
            }
            PlanKind::Touched => {
                "touched-keys planner into a discarding sink (the pipeline in a child process)"
            }
        }
    }
}

const DB: &str = "bench";
const PUBLICATION: &str = "pub";
/// Transaction sizes benched unless `WALSWEEP_BENCH_TXN_SIZES` (comma-separated) says others.
const TXN_SIZES: &str = "1,100";

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text, n int);
CREATE PUBLICATION pub FOR TABLE items;
-- One transaction per txn_size rows: COMMIT inside a procedure (PG11+).
CREATE PROCEDURE fill(total int, txn_size int) LANGUAGE plpgsql AS $$
DECLARE
    i int := 0;
BEGIN
    WHILE i < total LOOP
        INSERT INTO items (id, name, n)
            SELECT g, 'item-' || g, g FROM generate_series(i + 1, least(i + txn_size, total)) g;
        i := i + txn_size;
        COMMIT;
    END LOOP;
END $$;
";

/// One consumer's drain of one backlog.
#[derive(Clone, Copy, Default)]
struct Run {
    wall: f64,
    /// The consumer process's own CPU seconds.
    cpu: f64,
    /// Its walsender's CPU seconds.
    walsender: f64,
    /// Redis' CPU seconds during the run (walsweep with a Redis plan only).
    redis: Option<f64>,
    /// Seconds until walsweep's published applied position (`walsweep:<db>/<slot>:applied`,
    /// what `walsweep wait` reads) reached the end LSN: the work without the wait for the next
    /// status update (walsweep with a Redis plan only).
    applied: Option<f64>,
    /// Sink batches walsweep applied (from its metrics endpoint): fewer, larger batches cost
    /// fewer Redis round trips.
    batches: Option<u64>,
}

struct Round {
    recvlogical: Run,
    walsweep: Run,
}

/// What a run needs besides the backlog.
struct Bench<'a> {
    pg: &'a Postgres,
    redis: Option<&'a Redis>,
    plan: PlanKind,
    recvlogical: PathBuf,
    /// Config files and logs of walsweep's runs.
    dir: &'a Path,
    /// The bench's own SQL connection, for polling: the bench's work stays off the clients.
    poller: tokio_postgres::Client,
    rt: &'a tokio::runtime::Runtime,
}

fn main() {
    if let Ok(url) = std::env::var(CHILD_URL_ENV) {
        touched_child(&url);
        return;
    }
    let changes = env_usize("WALSWEEP_BENCH_CHANGES", 200_000);
    let rounds = env_usize("WALSWEEP_BENCH_ROUNDS", 3).max(1);
    let txn_sizes: Vec<usize> = std::env::var("WALSWEEP_BENCH_TXN_SIZES")
        .unwrap_or_else(|_| TXN_SIZES.into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("WALSWEEP_BENCH_TXN_SIZES: {s:?} is not a number"))
        })
        .collect();
    let plan = PlanKind::from_env();

    let pg = Postgres::start_with(PostgresOptions {
        extra_settings: vec![
            // Production defaults instead of the test support's tiny values.
            ("logical_decoding_work_mem".into(), "64MB".into()),
            ("wal_sender_timeout".into(), "60s".into()),
            // No background vacuum/analyze of the freshly filled table while a clock runs.
            ("autovacuum".into(), "off".into()),
        ],
        ..Default::default()
    });
    pg.create_database(DB);
    pg.psql(DB, SCHEMA);
    let version = pg.psql(DB, "SHOW server_version");
    let redis = (plan != PlanKind::Touched).then(Redis::start);
    let dir = tempfile::tempdir().expect("a temp dir for walsweep's configs");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the bench's runtime");
    let poller = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&pg.url(DB), tokio_postgres::NoTls)
            .await
            .expect("the bench's polling connection");
        tokio::spawn(conn);
        client
    });
    let bench = Bench {
        pg: &pg,
        redis: redis.as_ref(),
        plan,
        recvlogical: pg_tool("pg_recvlogical"),
        dir: dir.path(),
        poller,
        rt: &rt,
    };

    println!(
        "drain: Postgres {version} (private, port {}), {} cores, load average {}, {changes} \
         row changes per backlog, {rounds} round(s) per transaction size",
        pg.port(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        common::loadavg(),
    );
    println!("  walsweep: {}", plan.describe());
    if plan != PlanKind::Touched {
        println!("  binary: {}", walsweep_binary().display());
    }
    println!(
        "  clocks: spawn until the slot's confirmed_flush_lsn reaches the end LSN (polled every \
         {} ms); pg_recvlogical writes to /dev/null",
        POLL.as_millis()
    );

    let mut summary = Vec::new();
    for &txn_size in &txn_sizes {
        let mut results = Vec::new();
        for round in 1..=rounds {
            results.push(run_round(&bench, changes, txn_size, round));
        }
        summary.push((txn_size, results));
    }

    println!();
    println!(
        "drain results ({}; median of {rounds} round(s); load average now {}):",
        match plan {
            PlanKind::Rules => "rules into Redis",
            PlanKind::Mirror => "mirror into Redis",
            PlanKind::Touched => "touched-keys, discarding sink",
        },
        common::loadavg()
    );
    println!(
        "  txn  | pg_recvlogical: wall  changes/s  cpu   walsender | walsweep: wall  changes/s  \
         cpu   walsender  redis  applied | rate ratio (rounds)   cpu ratio"
    );
    for (txn_size, results) in summary {
        let med = |f: &dyn Fn(&Round) -> f64| median(&results.iter().map(f).collect::<Vec<_>>());
        let (rl, ws) = (med(&|r| r.recvlogical.wall), med(&|r| r.walsweep.wall));
        let (rl_cpu, ws_cpu) = (med(&|r| r.recvlogical.cpu), med(&|r| r.walsweep.cpu));
        let (redis, applied) = match plan {
            PlanKind::Touched => ("    -".to_string(), "      -".to_string()),
            _ => (
                format!("{:5.2}", med(&|r| r.walsweep.redis.unwrap_or(0.0))),
                format!("{:6.2}s", med(&|r| r.walsweep.applied.unwrap_or(0.0))),
            ),
        };
        let ratios: Vec<f64> = results
            .iter()
            .map(|r| r.recvlogical.wall / r.walsweep.wall)
            .collect();
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        println!(
            "  {txn_size:<4} |                 {rl:5.2}s {:9.0}  {rl_cpu:5.2}  {:5.2}     |           \
             {ws:5.2}s {:9.0}  {ws_cpu:5.2}  {:5.2}      {redis}  {applied} |  {:.2} ({lo:.2}-{hi:.2})        \
             {:.2}",
            changes as f64 / rl,
            med(&|r| r.recvlogical.walsender),
            changes as f64 / ws,
            med(&|r| r.walsweep.walsender),
            rl / ws,
            ws_cpu / rl_cpu,
        );
    }
    println!(
        "  rate ratio = walsweep changes/s / pg_recvlogical changes/s (median times; per-round \
         range in brackets), target >= 0.90"
    );
    println!(
        "  cpu ratio = walsweep process CPU / pg_recvlogical process CPU, target <= 1.00; CPU in \
         seconds (user+system) per {changes} changes"
    );
    if plan != PlanKind::Touched {
        println!(
            "  applied = when walsweep's published applied position (what `walsweep wait` reads) \
             reached the end LSN; walsweep reports its confirmed position to Postgres every \
             source.status_interval_ms (1 s), so wall - applied is mostly that wait"
        );
    }
}

fn run_round(bench: &Bench, changes: usize, txn_size: usize, round: usize) -> Round {
    let pg = bench.pg;
    // Fresh table, then both slots at the same point, then the backlog behind them.
    pg.psql(DB, "TRUNCATE items");
    pg.psql(
        DB,
        "SELECT pg_create_logical_replication_slot('ws', 'pgoutput'), \
                pg_create_logical_replication_slot('rl', 'pgoutput')",
    );
    let start: Lsn = pg
        .psql(DB, "SELECT pg_current_wal_lsn()")
        .parse()
        .expect("lsn");
    let filled = Instant::now();
    // No commit waits for its WAL flush; wait_for_flush below makes the backlog complete.
    pg.psql(
        DB,
        &format!("SET synchronous_commit = off; CALL fill({changes}, {txn_size});"),
    );
    let fill_time = filled.elapsed();
    // Dirty buffers written now, not by a checkpoint while a clock runs.
    pg.psql(DB, "CHECKPOINT");
    let end: Lsn = pg
        .psql(DB, "SELECT pg_current_wal_lsn()")
        .parse()
        .expect("lsn");
    wait_for_flush(|sql| pg.psql(DB, sql), end);

    let walsweep_first = round.is_multiple_of(2);
    let (recvlogical, walsweep) = if walsweep_first {
        let ws = run_walsweep(bench, end, changes, round);
        (run_recvlogical(bench, end), ws)
    } else {
        let rl = run_recvlogical(bench, end);
        (rl, run_walsweep(bench, end, changes, round))
    };

    let redis_note = walsweep
        .redis
        .map(|s| format!(" redis {s:.2}s"))
        .unwrap_or_default();
    let applied_note = walsweep
        .applied
        .map(|s| format!(", applied at {s:.3}s"))
        .unwrap_or_default();
    let batches_note = walsweep
        .batches
        .map(|n| format!(", {n} batches"))
        .unwrap_or_default();
    println!(
        "  round {round} txn_size={txn_size:<4} wal={:.1}MB (filled in {:.1}s) first={:<14} \
         pg_recvlogical={:.3}s {:.0}/s (cpu {:.2}s, walsender {:.2}s)  walsweep={:.3}s {:.0}/s \
         (cpu {:.2}s, walsender {:.2}s{redis_note}{applied_note}{batches_note})  rate ratio={:.2}  load {}",
        end.bytes_since(start) as f64 / 1e6,
        fill_time.as_secs_f64(),
        if walsweep_first {
            "walsweep"
        } else {
            "pg_recvlogical"
        },
        recvlogical.wall,
        changes as f64 / recvlogical.wall,
        recvlogical.cpu,
        recvlogical.walsender,
        walsweep.wall,
        changes as f64 / walsweep.wall,
        walsweep.cpu,
        walsweep.walsender,
        recvlogical.wall / walsweep.wall,
        common::loadavg(),
    );

    drop_slots(pg, &["ws", "rl"]);
    pg.psql(DB, "CHECKPOINT");
    Round {
        recvlogical,
        walsweep,
    }
}

/// What the poller saw when the slot's confirmed position reached the end LSN.
struct Confirmed {
    at: Instant,
    /// CPU of the slot's walsender, last sampled then.
    walsender: Duration,
}

/// Polls `slot` until its confirmed position reaches `end`, sampling its walsender's CPU on
/// the way. `exited` is asked each time: a consumer that stops first has failed.
fn wait_confirmed(
    bench: &Bench,
    slot: &str,
    end: Lsn,
    mut exited: impl FnMut() -> Option<String>,
) -> Confirmed {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut walsender = Duration::ZERO;
    let sql = "SELECT active_pid, confirmed_flush_lsn::text FROM pg_replication_slots \
               WHERE slot_name = $1";
    let statement = bench
        .rt
        .block_on(bench.poller.prepare(sql))
        .expect("preparing the poll");
    loop {
        let row = bench
            .rt
            .block_on(bench.poller.query_one(&statement, &[&slot]))
            .unwrap_or_else(|e| panic!("polling slot {slot}: {e}"));
        let pid: Option<i32> = row.get(0);
        if let Some(cpu) = pid.and_then(|p| proc_cpu(p as u32)) {
            walsender = cpu;
        }
        let confirmed: Option<String> = row.get(1);
        let confirmed: Lsn = confirmed
            .as_deref()
            .unwrap_or("0/0")
            .parse()
            .expect("an LSN");
        if confirmed >= end {
            return Confirmed {
                at: Instant::now(),
                walsender,
            };
        }
        if let Some(why) = exited() {
            panic!("the consumer of slot {slot} stopped at {confirmed}, before {end}: {why}");
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot} confirmed only {confirmed} of {end} after {DRAIN_TIMEOUT:?}"
        );
        std::thread::sleep(POLL);
    }
}

fn run_recvlogical(bench: &Bench, end: Lsn) -> Run {
    let children_before = cpu_time().1;
    let started = Instant::now();
    let mut child = Command::new(&bench.recvlogical)
        .args([
            "-d",
            &bench.pg.url(DB),
            "--slot",
            "rl",
            "--start",
            "--no-loop",
        ])
        .args(["--endpos", &end.to_string(), "-f", "/dev/null"])
        .args(["-o", "proto_version=2", "-o", "publication_names=pub"])
        .args(["-o", "messages=true", "-o", "streaming=on"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", bench.recvlogical.display()));
    let confirmed = wait_confirmed(bench, "rl", end, || {
        child
            .try_wait()
            .ok()
            .flatten()
            .filter(|s| !s.success())
            .map(|s| format!("pg_recvlogical exited with {s}"))
    });
    let out = child
        .wait_with_output()
        .expect("waiting for pg_recvlogical");
    assert!(
        out.status.success(),
        "pg_recvlogical failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Run {
        wall: confirmed.at.duration_since(started).as_secs_f64(),
        // Reaped just now: the only child that ended since `children_before`.
        cpu: cpu_time().1.saturating_sub(children_before).as_secs_f64(),
        walsender: confirmed.walsender.as_secs_f64(),
        redis: None,
        applied: None,
        batches: None,
    }
}

fn run_walsweep(bench: &Bench, end: Lsn, changes: usize, round: usize) -> Run {
    let redis_url = bench.redis.map(|r| r.url());
    let mut redis_conn = redis_url.as_ref().map(|url| {
        ::redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .expect("the bench's Redis connection")
    });
    if let Some(conn) = redis_conn.as_mut() {
        // A fresh deployment per round: nothing left from the last round's slot.
        let _: () = ::redis::cmd("FLUSHALL").query(conn).expect("FLUSHALL");
        if bench.plan == PlanKind::Rules {
            // Cached entries the backlog must invalidate: checked gone below.
            let _: () = ::redis::cmd("MSET")
                .arg("item:1")
                .arg("cached")
                .arg(format!("item:name:item-{changes}"))
                .arg("cached")
                .query(conn)
                .expect("MSET");
        }
    }
    let redis_before = redis_conn.as_mut().map(redis_cpu_seconds);
    let log_path = bench.dir.join(format!("walsweep-{round}.log"));
    let log = std::fs::File::create(&log_path).expect("walsweep's log file");

    let metrics_port = support::scratch::free_port();
    let started = Instant::now();
    let mut command = match bench.plan {
        PlanKind::Touched => {
            let mut c = Command::new(std::env::current_exe().expect("current_exe"));
            c.env(CHILD_URL_ENV, bench.pg.url(DB));
            c
        }
        PlanKind::Rules | PlanKind::Mirror => {
            let rules = if bench.plan == PlanKind::Rules {
                RULES
            } else {
                MIRROR
            };
            // Defaults everywhere but what the bench set up itself (slot, publication) and
            // the metrics port (on, as by default, on a free port: scraped after the run).
            let config = format!(
                "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[source]\nurl = \"{}\"\n\
                 slot = \"ws\"\npublication = \"{PUBLICATION}\"\ncreate_slot = false\n\
                 create_publication = false\n[redis]\nurl = \"{}\"\n{rules}",
                bench.pg.url(DB),
                redis_url.as_deref().expect("Redis runs for this plan")
            );
            let path = bench.dir.join("walsweep.toml");
            std::fs::write(&path, config).expect("writing walsweep.toml");
            let mut c = Command::new(walsweep_binary());
            c.args(["run", "--config"]).arg(path);
            c
        }
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawning walsweep");
    let pid = child.id();
    let applied_key = format!("walsweep:{DB}/ws:applied");
    let mut applied_at = None;
    let confirmed = wait_confirmed(bench, "ws", end, || {
        if let (None, Some(conn)) = (applied_at, redis_conn.as_mut()) {
            let position: Option<u64> = ::redis::cmd("GET")
                .arg(&applied_key)
                .query(conn)
                .ok()
                .flatten();
            if position.is_some_and(|p| p >= end.as_u64()) {
                applied_at = Some(Instant::now());
            }
        }
        child
            .try_wait()
            .ok()
            .flatten()
            .map(|s| format!("walsweep exited with {s}; log:\n{}", tail(&log_path)))
    });
    let cpu = proc_cpu(pid).unwrap_or_else(|| panic!("no /proc/{pid}/stat for walsweep"));
    let redis_after = redis_conn.as_mut().map(redis_cpu_seconds);
    let wall = confirmed.at.duration_since(started).as_secs_f64();
    let batches = (bench.plan != PlanKind::Touched)
        .then(|| scrape_batches(metrics_port))
        .flatten();
    stop(&mut child, &log_path);

    if let Some(conn) = redis_conn.as_mut() {
        match bench.plan {
            PlanKind::Rules => {
                let left: usize = ::redis::cmd("EXISTS")
                    .arg("item:1")
                    .arg(format!("item:name:item-{changes}"))
                    .query(conn)
                    .expect("EXISTS");
                assert_eq!(left, 0, "walsweep confirmed without invalidating");
            }
            PlanKind::Mirror => {
                // The clock measured real work: every row is mirrored and indexed.
                let indexed: usize = ::redis::cmd("ZCARD")
                    .arg("items:by_n")
                    .query(conn)
                    .expect("ZCARD");
                let row: Option<String> = ::redis::cmd("GET")
                    .arg(format!("item:{changes}"))
                    .query(conn)
                    .expect("GET");
                assert_eq!(indexed, changes, "every row indexed");
                assert!(row.is_some(), "the last row is mirrored");
            }
            PlanKind::Touched => {}
        }
    }
    Run {
        wall,
        cpu: cpu.as_secs_f64(),
        walsender: confirmed.walsender.as_secs_f64(),
        redis: redis_before.zip(redis_after).map(|(b, a)| a - b),
        batches,
        // Seen together with the confirmation when both happened within one poll.
        applied: redis_before.map(|_| {
            applied_at
                .unwrap_or(confirmed.at)
                .duration_since(started)
                .as_secs_f64()
        }),
    }
}

/// `WALSWEEP_BENCH_BIN`, else the binary cargo built with this bench.
fn walsweep_binary() -> PathBuf {
    std::env::var_os("WALSWEEP_BENCH_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_walsweep")))
}

/// SIGTERM, then the exit, which must be clean.
fn stop(child: &mut Child, log: &Path) {
    support::scratch::signal(child.id(), "TERM").expect("kill -TERM walsweep");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("waiting for walsweep") {
            assert!(
                status.success(),
                "walsweep exited with {status}:\n{}",
                tail(log)
            );
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "walsweep did not stop within 60s of SIGTERM:\n{}",
                tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `walsweep_batch_size_transactions_count` from walsweep's `/metrics`, `None` when it cannot
/// be read (the figure is a diagnostic, not the measurement).
fn scrape_batches(port: u16) -> Option<u64> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    conn.read_to_string(&mut body).ok()?;
    body.lines().find_map(|l| {
        l.strip_prefix("walsweep_batch_size_transactions_count")?
            .trim()
            .parse::<f64>()
            .ok()
            .map(|n| n as u64)
    })
}

fn tail(log: &Path) -> String {
    support::scratch::log_tail(log, 40)
}

/// Redis' own CPU time (user + system, from INFO cpu).
fn redis_cpu_seconds(conn: &mut ::redis::Connection) -> f64 {
    let info: String = ::redis::cmd("INFO")
        .arg("cpu")
        .query(conn)
        .expect("INFO cpu");
    let field = |name: &str| {
        info.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(':')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {name} in INFO cpu"))
    };
    field("used_cpu_user") + field("used_cpu_sys")
}

/// `WALSWEEP_BENCH_PLAN=touched`: the real pipeline (touched-keys planner, discarding sink) on
/// slot `ws` until SIGTERM, in a process of its own so its CPU is walsweep's alone.
fn touched_child(url: &str) {
    let runtime = common::runtime();
    let source = source(url, "ws", PUBLICATION);
    runtime.block_on(async {
        let (shutdown, signal) = walsweep::pipeline::shutdown_channel();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        let task = tokio::spawn(async move {
            walsweep::pipeline::run(
                &source,
                &[],
                walsweep::plan::touched::TouchedRowsPlanner::default(),
                common::Discard,
                signal,
            )
            .await
        });
        term.recv().await;
        shutdown.request();
        task.await
            .expect("the pipeline task panicked")
            .unwrap_or_else(|e| {
                panic!(
                    "the pipeline failed: {}",
                    walsweep::telemetry::log::display_chain(&e)
                )
            });
    });
}

/// Drops the slots once their walsenders are gone (that can lag the client's exit a little).
fn drop_slots(pg: &Postgres, slots: &[&str]) {
    let list = slots
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let deadline = Instant::now() + Duration::from_secs(30);
    while pg.psql(
        DB,
        &format!(
            "SELECT count(*) FROM pg_replication_slots WHERE active AND slot_name IN ({list})"
        ),
    ) != "0"
    {
        assert!(
            Instant::now() < deadline,
            "slots {list} still active after 30s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    pg.psql(
        DB,
        &format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name IN ({list})"),
    );
}
