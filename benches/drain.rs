//! Draining a slot backlog: walsweep (real pipeline, touched-keys plan, null sink) against
//! `pg_recvlogical` on the same backlog, same server, same run.
//!
//! Per transaction size (1 and 100 rows) and round: two pgoutput slots are created at the same
//! point, a backlog of row changes (INSERTs) is committed behind them, then `pg_recvlogical`
//! drains one slot (`--endpos` = end of WAL after the backlog, output to /dev/null) and
//! walsweep drains the other, in that order. Both timings start before the client connects
//! (pg_recvlogical: process spawn until exit; walsweep: `pipeline::run` until the sink applied
//! the last expected change) and include setting up replication; the backlog is committed and
//! flushed before either clock starts. Target: walsweep within 1.1x of pg_recvlogical.
//!
//! Both ask pgoutput for the same stream: proto_version 2, streaming on, messages on.
//!
//! Usually the walsender (decoding, and one send() per message) is the bottleneck of both, so
//! the wall times are close as long as a core is free for the client; the per-round client
//! CPU figures show what each client itself costs, which is what decides the ratio on a busy
//! machine. The load average is printed: figures from a loaded machine are noise.
//!
//! Private Postgres from the test support code (never the machine's own server).
//!
//! Run: `cargo bench --bench drain`
//! Knobs: `WALSWEEP_BENCH_CHANGES` (row changes per backlog, default 200000),
//! `WALSWEEP_BENCH_ROUNDS` (rounds per transaction size, median reported, default 3),
//! `WALSWEEP_BENCH_TXN_SIZES` (rows per transaction, comma-separated, default `1,100`),
//! `WALSWEEP_BENCH_RUNTIME` (`multi_thread`, the default and what `walsweep run` uses, or
//! `current_thread` for comparison), `WALSWEEP_BENCH_PLAN` (`touched`, the default: the
//! touched-keys plan into a null sink; or `rules`: a realistic rule set, 2 key templates, 1
//! dependency and 1 scope on 2 columns, applied to a private Redis; target 1.25x; or `mirror`:
//! one JSON mirror of every row and one sorted-set index on it, written to a private Redis;
//! target 1.5x).

// Not every re-export of the support code is used here.
#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

#[path = "common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use walsweep::pg::Lsn;

use common::{
    cpu_time, drain_with, drain_with_walsweep, env_usize, median, source, wait_for_flush,
};
use support::{binaries::pg_tool, Postgres, PostgresOptions, Redis};

/// The rule set of `WALSWEEP_BENCH_PLAN=rules`.
const RULES: &str = r#"
[[table]]
name = "public.items"
keys = ["item:{id}", "item:name:{name}"]
deps = ["id:item:{id}"]
[[table.scope]]
name = "Item"
columns = ["name", "n"]
"#;

/// The mirror set of `WALSWEEP_BENCH_PLAN=mirror`: every row as JSON plus one index.
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

/// Walsweep's side of a round: the plan and sink being measured.
enum Plan {
    Touched,
    /// The config's rules (`RULES` or `MIRROR`) through the daemon's planner into Redis.
    Redis {
        redis_url: String,
        rules: &'static str,
        target: &'static str,
    },
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

struct Round {
    recvlogical: Duration,
    walsweep: Duration,
    /// CPU time of the client processes (not of their walsenders).
    recvlogical_cpu: Duration,
    walsweep_cpu: Duration,
}

/// Delta of `cpu_time()`: (this process, its children).
fn cpu_since(before: (Duration, Duration)) -> (Duration, Duration) {
    let now = cpu_time();
    (
        now.0.saturating_sub(before.0),
        now.1.saturating_sub(before.1),
    )
}

fn main() {
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
    let recvlogical = pg_tool("pg_recvlogical");

    let runtime = common::runtime();
    let which = std::env::var("WALSWEEP_BENCH_PLAN").unwrap_or_default();
    let redis = matches!(which.as_str(), "rules" | "mirror").then(Redis::start);
    let plan = match (&redis, which.as_str()) {
        (Some(r), "mirror") => Plan::Redis {
            redis_url: r.url(),
            rules: MIRROR,
            target: "1.50 (JSON mirror + index into Redis)",
        },
        (Some(r), _) => Plan::Redis {
            redis_url: r.url(),
            rules: RULES,
            target: "1.25 (rules into Redis)",
        },
        _ => Plan::Touched,
    };

    println!(
        "drain: Postgres {version} (private, port {}), {} cores, load average {}, {changes} \
         row changes per backlog, {rounds} round(s) per transaction size",
        pg.port(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        common::loadavg(),
    );
    println!(
        "  both timings include process/connection start-up and START_REPLICATION; \
         pg_recvlogical writes to /dev/null; walsweep on a {} tokio runtime",
        std::env::var("WALSWEEP_BENCH_RUNTIME")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "multi_thread".into())
    );

    let mut summary = Vec::new();
    for &txn_size in &txn_sizes {
        let mut results = Vec::new();
        for round in 1..=rounds {
            let r = run_round(&pg, &runtime, &recvlogical, &plan, changes, txn_size, round);
            results.push(r);
        }
        let rl: Vec<f64> = results
            .iter()
            .map(|r| r.recvlogical.as_secs_f64())
            .collect();
        let ws: Vec<f64> = results.iter().map(|r| r.walsweep.as_secs_f64()).collect();
        let rl_cpu: Vec<f64> = results
            .iter()
            .map(|r| r.recvlogical_cpu.as_secs_f64())
            .collect();
        let ws_cpu: Vec<f64> = results
            .iter()
            .map(|r| r.walsweep_cpu.as_secs_f64())
            .collect();
        summary.push((
            txn_size,
            median(&rl),
            median(&ws),
            median(&rl_cpu),
            median(&ws_cpu),
        ));
    }

    println!();
    println!(
        "drain results (median of {rounds} round(s); load average now {}):",
        common::loadavg()
    );
    for (txn_size, rl, ws, rl_cpu, ws_cpu) in summary {
        println!(
            "drain txn_size={txn_size:<4} changes={changes}  pg_recvlogical={rl:.2}s  \
             walsweep={ws:.2}s  ratio={:.2}",
            ws / rl,
        );
        println!(
            "      changes/s: pg_recvlogical={:.0} walsweep={:.0}   client cpu: \
             pg_recvlogical={rl_cpu:.2}s walsweep={ws_cpu:.2}s",
            changes as f64 / rl,
            changes as f64 / ws,
        );
    }
    println!(
        "  ratio = walsweep / pg_recvlogical wall time; target <= {}",
        match &plan {
            Plan::Redis { target, .. } => target,
            Plan::Touched => "1.10 (touched-keys plan, null sink)",
        }
    );
    println!(
        "  client cpu = user+system time of the pg_recvlogical / walsweep process itself; \
         the walsender decoding for it runs in Postgres and is not included"
    );
}

fn run_round(
    pg: &Postgres,
    runtime: &tokio::runtime::Runtime,
    recvlogical: &std::path::Path,
    plan: &Plan,
    changes: usize,
    txn_size: usize,
    round: usize,
) -> Round {
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
    let target: Lsn = pg
        .psql(DB, "SELECT pg_current_wal_lsn()")
        .parse()
        .expect("lsn");
    wait_for_flush(|sql| pg.psql(DB, sql), target);

    // (a) pg_recvlogical
    let cpu_before = cpu_time();
    let started = Instant::now();
    let out = Command::new(recvlogical)
        .args(["-d", &pg.url(DB), "--slot", "rl", "--start", "--no-loop"])
        .args(["--endpos", &target.to_string(), "-f", "/dev/null"])
        .args(["-o", "proto_version=2", "-o", "publication_names=pub"])
        .args(["-o", "messages=true", "-o", "streaming=on"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", recvlogical.display()));
    let rl_time = started.elapsed();
    let rl_cpu = cpu_since(cpu_before).1;
    assert!(
        out.status.success(),
        "pg_recvlogical failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // (b) walsweep
    let redis_cpu_before = redis_cpu_seconds(plan);
    let cpu_before = cpu_time();
    let ws_source = source(&pg.url(DB), "ws", PUBLICATION);
    let drained = match plan {
        Plan::Touched => runtime.block_on(drain_with_walsweep(
            ws_source,
            changes as u64,
            Duration::from_secs(600),
        )),
        Plan::Redis {
            redis_url, rules, ..
        } => {
            let config = walsweep::config::Config::parse(&format!(
                "[source]\nurl = \"{}\"\n[redis]\nurl = \"{redis_url}\"\n{rules}",
                pg.url(DB)
            ))
            .expect("bench rules");
            // Exactly the planner and sink `walsweep run` builds from this config.
            let (planner, sink) =
                walsweep::pipeline::daemon::build(&config).expect("planner and sink");
            runtime.block_on(drain_with(
                ws_source,
                planner,
                sink,
                changes as u64,
                Duration::from_secs(600),
            ))
        }
    };
    let ws_time = drained.elapsed;
    let redis_note = match (redis_cpu_before, redis_cpu_seconds(plan)) {
        (Some(before), Some(after)) => format!(" (redis cpu {:.2}s)", after - before),
        _ => String::new(),
    };
    // Includes the few ms of the clean shutdown after the clock stopped.
    let ws_cpu = cpu_since(cpu_before).0;
    assert_eq!(
        drained.changes, changes as u64,
        "walsweep saw other changes"
    );

    if let Plan::Redis {
        redis_url,
        rules: MIRROR,
        ..
    } = plan
    {
        // The clock measured real work: every row is mirrored and indexed.
        let mut conn = ::redis::Client::open(redis_url.as_str())
            .and_then(|c| c.get_connection())
            .expect("bench redis connection");
        let indexed: usize = ::redis::cmd("ZCARD")
            .arg("items:by_n")
            .query(&mut conn)
            .expect("ZCARD");
        let row: Option<String> = ::redis::cmd("GET")
            .arg(format!("item:{changes}"))
            .query(&mut conn)
            .expect("GET");
        assert_eq!(indexed, changes, "every row indexed");
        assert!(row.is_some(), "the last row is mirrored");
        let _: () = ::redis::cmd("FLUSHALL").query(&mut conn).expect("FLUSHALL");
    }

    // pg_recvlogical must have read as far: its slot is confirmed up to where it stopped.
    let rl_confirmed: Lsn = pg
        .psql(
            DB,
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'rl'",
        )
        .parse()
        .expect("lsn");
    let rl_note = if rl_confirmed >= drained.last_end {
        String::new()
    } else {
        format!(
            "  WARNING: pg_recvlogical's slot confirmed only {rl_confirmed}, last commit ends at {}",
            drained.last_end
        )
    };

    println!(
        "  round {round} txn_size={txn_size:<4} commits={:<6} batches={:<6} wal={:.1}MB (filled in {:.1}s)  \
         pg_recvlogical={:.3}s (cpu {:.2}s)  walsweep={:.3}s (cpu {:.2}s){redis_note}  ratio={:.2}{rl_note}",
        drained.txns,
        drained.batches,
        target.bytes_since(start) as f64 / 1e6,
        fill_time.as_secs_f64(),
        rl_time.as_secs_f64(),
        rl_cpu.as_secs_f64(),
        ws_time.as_secs_f64(),
        ws_cpu.as_secs_f64(),
        ws_time.as_secs_f64() / rl_time.as_secs_f64(),
    );

    drop_slots(pg, &["ws", "rl"]);
    pg.psql(DB, "CHECKPOINT");
    Round {
        recvlogical: rl_time,
        walsweep: ws_time,
        recvlogical_cpu: rl_cpu,
        walsweep_cpu: ws_cpu,
    }
}

/// Redis' own CPU time (user + system, from INFO cpu), to see where a Redis plan's time goes.
fn redis_cpu_seconds(plan: &Plan) -> Option<f64> {
    let Plan::Redis { redis_url, .. } = plan else {
        return None;
    };
    let mut conn = ::redis::Client::open(redis_url.as_str())
        .and_then(|c| c.get_connection())
        .ok()?;
    let info: String = ::redis::cmd("INFO").arg("cpu").query(&mut conn).ok()?;
    let field = |name: &str| {
        info.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(':')?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    Some(field("used_cpu_user")? + field("used_cpu_sys")?)
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
