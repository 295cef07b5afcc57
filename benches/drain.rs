//! Draining a slot backlog: walsweep against `pg_recvlogical` on the same backlog, same server,
//! same run, judged by what a user sees: the slot's confirmed position.
//!
//! Per transaction size (1 and 100 rows) and round: one pgoutput slot per consumer is created
//! at the same point and a backlog of row changes (INSERTs) is committed and flushed behind
//! them; the end of WAL after it is the end LSN. Then each consumer drains its own slot, one
//! after the other, the order rotating per round (round 1 starts with pg_recvlogical, round 2
//! with the next consumer, and so on), so none always gets the warmer caches:
//! - `pg_recvlogical --endpos=<end LSN> -f /dev/null`;
//! - walsweep as its own process: by default the real release binary, `walsweep run --config`,
//!   with a realistic rule set (2 key templates, 2 dependency templates, 1 scope on 2 columns)
//!   applied to a private Redis, every other setting at its default (status updates every
//!   second, visibility gate on). `WALSWEEP_BENCH_REDIS` says which Redis: one node (`[redis]
//!   url`), a Redis Cluster of 3 primaries with one replica each (`[redis] cluster_nodes`, all
//!   six nodes listed), or both, each walsweep on a slot of its own (three slots per round).
//!   Each Redis is booted once per bench run and emptied (`FLUSHALL`, on every primary of the
//!   cluster) before each walsweep run.
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
//!   before the spawn to completion; for the cluster, summed over all six nodes (replicas and
//!   the cluster bus included).
//!
//! Also printed for walsweep with Redis: when its published applied position
//! (`walsweep:<db>/<slot>:applied`, polled with the slot, on the node that serves its hash
//! slot) reached the end LSN. walsweep tells Postgres its confirmed position every
//! `status_interval_ms` (1 s by default), and at once (at most every 20 ms) when everything it
//! received is applied, so wall - applied is that status update plus the poll. And, read from
//! walsweep's metrics endpoint (on, as by default, on a free port) after the run, the number of
//! sink batches and of sink errors: failed batch applies (a Redis timeout, say) after which
//! walsweep applied the batch again, their time inside the wall.
//!
//! After each walsweep run the bench checks, with plain connections to the node or to each
//! primary (no cluster client), that the work was done: with `rules`, two cached entries the
//! backlog invalidates (set before the run, each on the node serving its slot) are gone; with
//! `mirror`, every row's key exists (SCAN count), the index holds every row and the last row
//! is mirrored.
//!
//! The bench's own work (polling, Redis INFO) runs in the bench process and is in none of them.
//! Summary per transaction size, one row per consumer: medians of the rounds (for batches and
//! sink errors, their range over the rounds), and for each walsweep the rate ratio (its
//! changes/s over pg_recvlogical's, from the median times; per-round range in brackets;
//! target >= 0.90) and its client CPU over pg_recvlogical's (target <= 1.00). With both Redis
//! targets, also the cluster's time over the node's (median wall times, per-round range;
//! target <= 1.30) and the same for the applied times. The load average is printed: on a
//! loaded machine the figures are noise.
//!
//! pg_recvlogical asks pgoutput for proto_version 2 with streaming and messages on; walsweep
//! negotiates the newest version the server speaks (3 on Postgres 15, 4 from 16: streaming
//! `parallel`), also with messages on. For these backlogs of committed INSERTs, both receive the
//! same messages.
//!
//! Private Postgres, Redis and Redis Cluster from the test support code (never the machine's
//! own servers).
//!
//! Run: `cargo bench --bench drain`
//! Knobs: `WALSWEEP_BENCH_CHANGES` (row changes per backlog, default 200000),
//! `WALSWEEP_BENCH_ROUNDS` (rounds per transaction size, median reported, default 3),
//! `WALSWEEP_BENCH_TXN_SIZES` (rows per transaction, comma-separated, default `1,100`),
//! `WALSWEEP_BENCH_PLAN`: `rules` (the default, above); `mirror` (the real binary with one JSON
//! mirror of every row and one sorted-set index on it, into Redis; checked complete after each
//! run); or `touched` (no Redis: the touched-keys planner into a sink that discards, run by
//! this bench re-executed as a child process, since the binary has no discarding sink),
//! `WALSWEEP_BENCH_REDIS` (`rules` and `mirror` only): `node` (the default: one Redis),
//! `cluster` (the Redis Cluster instead) or `both` (a walsweep into each, in the same rounds),
//! `WALSWEEP_BENCH_RUNTIME` (`touched` only: `multi_thread`, the default and what `walsweep
//! run` uses, or `current_thread`), `WALSWEEP_BENCH_BIN` (the `walsweep` binary to run, e.g. a
//! copy of an earlier build to compare with; default the release build of this checkout),
//! `WALSWEEP_BENCH_SOURCE_EXTRA` (lines added to walsweep's `[source]`, e.g.
//! `batch_max_txns = 64`, to compare settings).

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
use support::redis_cluster::ClusterNode;
use support::{binaries::pg_tool, Postgres, PostgresOptions, Redis, RedisCluster};

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

/// Where a walsweep run applies its effects.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    /// The private single Redis (`[redis] url`).
    Node,
    /// The private Redis Cluster, 3 primaries + 3 replicas (`[redis] cluster_nodes`).
    Cluster,
    /// No Redis: the `touched` plan's discarding sink.
    Discard,
}

impl Target {
    /// `WALSWEEP_BENCH_REDIS` for `plan`, in the order the summary lists them.
    fn from_env(plan: PlanKind) -> Vec<Target> {
        let value = std::env::var("WALSWEEP_BENCH_REDIS").unwrap_or_default();
        if plan == PlanKind::Touched {
            assert!(
                matches!(value.as_str(), "" | "node"),
                "WALSWEEP_BENCH_REDIS={value:?} with WALSWEEP_BENCH_PLAN=touched: that plan \
                 discards its writes and uses no Redis; unset WALSWEEP_BENCH_REDIS or pick the \
                 rules or mirror plan"
            );
            return vec![Target::Discard];
        }
        match value.as_str() {
            "" | "node" => vec![Target::Node],
            "cluster" => vec![Target::Cluster],
            "both" => vec![Target::Node, Target::Cluster],
            other => panic!("WALSWEEP_BENCH_REDIS={other:?}: use node, cluster or both"),
        }
    }

    /// The slot this walsweep drains; `touched_child` knows `ws` too.
    fn slot(self) -> &'static str {
        match self {
            Target::Node | Target::Discard => "ws",
            Target::Cluster => "wc",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Target::Node => "walsweep/node",
            Target::Cluster => "walsweep/cluster",
            Target::Discard => "walsweep",
        }
    }
}

/// One consumer's drain of one backlog.
#[derive(Clone, Copy, Default)]
struct Run {
    wall: f64,
    /// The consumer process's own CPU seconds.
    cpu: f64,
    /// Its walsender's CPU seconds.
    walsender: f64,
    /// Redis' CPU seconds during the run (walsweep with a Redis plan only; all six nodes of
    /// the cluster).
    redis: Option<f64>,
    /// Seconds until walsweep's published applied position (`walsweep:<db>/<slot>:applied`,
    /// what `walsweep wait` reads) reached the end LSN: the work without the wait for the
    /// status update (walsweep with a Redis plan only).
    applied: Option<f64>,
    /// Sink batches walsweep applied (from its metrics endpoint): fewer, larger batches cost
    /// fewer Redis round trips.
    batches: Option<u64>,
    /// Failed batch applies walsweep retried (from its metrics endpoint).
    sink_errors: Option<u64>,
}

struct Round {
    recvlogical: Run,
    /// One per `Bench::targets`, in that order.
    walsweep: Vec<Run>,
}

/// A consumer of one round's backlog; `Walsweep` indexes `Bench::targets`.
#[derive(Clone, Copy)]
enum Consumer {
    Recvlogical,
    Walsweep(usize),
}

/// What a run needs besides the backlog.
struct Bench<'a> {
    pg: &'a Postgres,
    redis: Option<&'a Redis>,
    cluster: Option<&'a RedisCluster>,
    plan: PlanKind,
    /// The walsweep runs of each round.
    targets: Vec<Target>,
    recvlogical: PathBuf,
    /// Config files and logs of walsweep's runs.
    dir: &'a Path,
    /// The bench's own SQL connection, for polling: the bench's work stays off the clients.
    poller: tokio_postgres::Client,
    rt: &'a tokio::runtime::Runtime,
}

impl Bench<'_> {
    fn label(&self, consumer: Consumer) -> &'static str {
        match consumer {
            Consumer::Recvlogical => "pg_recvlogical",
            Consumer::Walsweep(i) => self.targets[i].label(),
        }
    }

    /// Indexes of the node's and the cluster's runs when both are benched.
    fn node_and_cluster(&self) -> Option<(usize, usize)> {
        let find = |t| self.targets.iter().position(|&x| x == t);
        find(Target::Node).zip(find(Target::Cluster))
    }
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
    let targets = Target::from_env(plan);

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
    let redis = targets.contains(&Target::Node).then(Redis::start);
    let cluster = targets.contains(&Target::Cluster).then(RedisCluster::start);
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
        cluster: cluster.as_ref(),
        plan,
        targets,
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
    if let Some(redis) = &redis {
        println!("  redis node: port {}", redis.port());
    }
    if let Some(cluster) = &cluster {
        println!(
            "  redis cluster: 3 primaries + 3 replicas, ports {:?}, all six given as \
             cluster_nodes",
            cluster.ports()
        );
    }
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
        "  txn  | consumer          wall   changes/s   cpu   walsender  redis  applied  batches    \
         sink errors | rate ratio (rounds)  cpu ratio"
    );
    for (txn_size, results) in summary {
        let med = |f: &dyn Fn(&Round) -> f64| median(&results.iter().map(f).collect::<Vec<_>>());
        let range = |f: &dyn Fn(&Round) -> f64| {
            let values: Vec<f64> = results.iter().map(f).collect();
            let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = values.iter().copied().fold(0.0, f64::max);
            format!("{lo:.2}-{hi:.2}")
        };
        let (rl, rl_cpu) = (med(&|r| r.recvlogical.wall), med(&|r| r.recvlogical.cpu));
        println!(
            "  {txn_size:<4} | {:<16} {rl:5.2}s {:9.0}  {rl_cpu:5.2}  {:5.2}          -        -  \
             -          -           |",
            "pg_recvlogical",
            changes as f64 / rl,
            med(&|r| r.recvlogical.walsender),
        );
        for (i, target) in bench.targets.iter().enumerate() {
            let ws = med(&|r| r.walsweep[i].wall);
            let cpu = med(&|r| r.walsweep[i].cpu);
            let (redis, applied) = match target {
                Target::Discard => ("    -".to_string(), "      -".to_string()),
                _ => (
                    format!("{:5.2}", med(&|r| r.walsweep[i].redis.unwrap_or(0.0))),
                    format!("{:6.2}s", med(&|r| r.walsweep[i].applied.unwrap_or(0.0))),
                ),
            };
            let count_range = |f: &dyn Fn(&Run) -> Option<u64>| {
                let counts: Vec<u64> = results.iter().filter_map(|r| f(&r.walsweep[i])).collect();
                match (counts.iter().min(), counts.iter().max()) {
                    (Some(lo), Some(hi)) => format!("{lo}-{hi}"),
                    _ => "-".to_string(),
                }
            };
            let batches = count_range(&|r| r.batches);
            let sink_errors = count_range(&|r| r.sink_errors);
            println!(
                "  {txn_size:<4} | {:<16} {ws:5.2}s {:9.0}  {cpu:5.2}  {:5.2}      {redis}  \
                 {applied}  {batches:<10} {sink_errors:<11} | {:5.2} {:<13}    {:5.2}",
                target.label(),
                changes as f64 / ws,
                med(&|r| r.walsweep[i].walsender),
                rl / ws,
                format!("({})", range(&|r| r.recvlogical.wall / r.walsweep[i].wall)),
                cpu / rl_cpu,
            );
        }
        if let Some((n, c)) = bench.node_and_cluster() {
            let applied = |r: &Run| r.applied.unwrap_or(r.wall);
            println!(
                "  {txn_size:<4} | cluster time / node time: {:.2} ({}), target <= 1.30; applied: \
                 {:.2} ({})",
                med(&|r| r.walsweep[c].wall) / med(&|r| r.walsweep[n].wall),
                range(&|r| r.walsweep[c].wall / r.walsweep[n].wall),
                med(&|r| applied(&r.walsweep[c])) / med(&|r| applied(&r.walsweep[n])),
                range(&|r| applied(&r.walsweep[c]) / applied(&r.walsweep[n])),
            );
        }
    }
    println!(
        "  rate ratio = walsweep changes/s / pg_recvlogical changes/s (median times; per-round \
         range in brackets), target >= 0.90"
    );
    println!(
        "  cpu ratio = walsweep process CPU / pg_recvlogical process CPU, target <= 1.00; CPU in \
         seconds (user+system) per {changes} changes"
    );
    if bench.node_and_cluster().is_some() {
        println!(
            "  cluster time / node time = walsweep/cluster wall / walsweep/node wall (median \
             times; per-round range in brackets); redis CPU of the cluster is summed over its six \
             nodes"
        );
    }
    if plan != PlanKind::Touched {
        println!(
            "  batches, sink errors = per-round range, from walsweep's /metrics \
             (walsweep_batch_size_transactions_count, walsweep_errors_total{{kind=\"sink\"}}: \
             failed batch applies, e.g. Redis timeouts, each applied again inside the wall)"
        );
        println!(
            "  applied = when walsweep's published applied position (what `walsweep wait` reads) \
             reached the end LSN; wall - applied is the status update that tells Postgres (at \
             once when walsweep has caught up, else at the next source.status_interval_ms) and \
             the poll"
        );
    }
}

fn run_round(bench: &Bench, changes: usize, txn_size: usize, round: usize) -> Round {
    let pg = bench.pg;
    let mut slots = vec!["rl"];
    slots.extend(bench.targets.iter().map(|t| t.slot()));
    // Fresh table, then every slot at the same point, then the backlog behind them.
    pg.psql(DB, "TRUNCATE items");
    pg.psql(
        DB,
        &format!(
            "SELECT {}",
            slots
                .iter()
                .map(|s| format!("pg_create_logical_replication_slot('{s}', 'pgoutput')"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
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

    let mut order = vec![Consumer::Recvlogical];
    order.extend((0..bench.targets.len()).map(Consumer::Walsweep));
    let first = (round - 1) % order.len();
    order.rotate_left(first);
    let mut recvlogical = Run::default();
    let mut walsweep = vec![Run::default(); bench.targets.len()];
    for &consumer in &order {
        match consumer {
            Consumer::Recvlogical => recvlogical = run_recvlogical(bench, end),
            Consumer::Walsweep(i) => {
                walsweep[i] = run_walsweep(bench, bench.targets[i], end, changes, round)
            }
        }
    }

    println!(
        "  round {round} txn_size={txn_size:<4} wal={:.1}MB (filled in {:.1}s) order: {}  load {}",
        end.bytes_since(start) as f64 / 1e6,
        fill_time.as_secs_f64(),
        order
            .iter()
            .map(|&c| bench.label(c))
            .collect::<Vec<_>>()
            .join(", "),
        common::loadavg(),
    );
    println!(
        "    {:<16} {:.3}s {:.0}/s (cpu {:.2}s, walsender {:.2}s)",
        "pg_recvlogical",
        recvlogical.wall,
        changes as f64 / recvlogical.wall,
        recvlogical.cpu,
        recvlogical.walsender,
    );
    for (target, run) in bench.targets.iter().zip(&walsweep) {
        let redis_note = run
            .redis
            .map(|s| format!(", redis {s:.2}s"))
            .unwrap_or_default();
        let applied_note = run
            .applied
            .map(|s| format!(", applied at {s:.3}s"))
            .unwrap_or_default();
        let batches_note = run
            .batches
            .map(|n| format!(", {n} batches"))
            .unwrap_or_default();
        let errors_note = run
            .sink_errors
            .map(|n| format!(", {n} sink errors"))
            .unwrap_or_default();
        println!(
            "    {:<16} {:.3}s {:.0}/s (cpu {:.2}s, walsender {:.2}s{redis_note}{applied_note}\
             {batches_note}{errors_note})  rate ratio={:.2}",
            target.label(),
            run.wall,
            changes as f64 / run.wall,
            run.cpu,
            run.walsender,
            recvlogical.wall / run.wall,
        );
    }
    if let Some((n, c)) = bench.node_and_cluster() {
        println!(
            "    cluster time / node time={:.2}",
            walsweep[c].wall / walsweep[n].wall
        );
    }

    drop_slots(pg, &slots);
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
        sink_errors: None,
    }
}

fn run_walsweep(bench: &Bench, target: Target, end: Lsn, changes: usize, round: usize) -> Run {
    let mut store = Store::open(bench, target);
    if let Some(store) = store.as_mut() {
        // A fresh deployment per round: nothing left from the last round's slot.
        store.flush();
        if bench.plan == PlanKind::Rules {
            // Cached entries the backlog must invalidate: checked gone below.
            for key in ["item:1".to_string(), format!("item:name:item-{changes}")] {
                let _: () = ::redis::cmd("SET")
                    .arg(&key)
                    .arg("cached")
                    .query(store.conn_for(&key))
                    .unwrap_or_else(|e| panic!("SET {key}: {e}"));
            }
        }
    }
    let redis_before = store.as_mut().map(Store::cpu_seconds);
    let slot = target.slot();
    let log_path = bench
        .dir
        .join(format!("{}-{round}.log", target.label().replace('/', "-")));
    let log = std::fs::File::create(&log_path).expect("walsweep's log file");

    let metrics_port = support::scratch::free_port();
    let started = Instant::now();
    let mut command = match (bench.plan, target) {
        (PlanKind::Touched, _) | (_, Target::Discard) => {
            let mut c = Command::new(std::env::current_exe().expect("current_exe"));
            c.env(CHILD_URL_ENV, bench.pg.url(DB));
            c
        }
        (PlanKind::Rules | PlanKind::Mirror, Target::Node | Target::Cluster) => {
            let rules = if bench.plan == PlanKind::Rules {
                RULES
            } else {
                MIRROR
            };
            let redis = match target {
                Target::Cluster => {
                    let nodes: Vec<String> = bench
                        .cluster
                        .expect("the cluster runs for this target")
                        .seed_urls()
                        .iter()
                        .map(|u| format!("{u:?}"))
                        .collect();
                    format!("cluster_nodes = [{}]", nodes.join(", "))
                }
                _ => format!(
                    "url = \"{}\"",
                    bench.redis.expect("Redis runs for this target").url()
                ),
            };
            // Defaults everywhere but what the bench set up itself (slot, publication) and
            // the metrics port (on, as by default, on a free port: scraped after the run).
            let config = format!(
                "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[source]\nurl = \"{}\"\n\
                 slot = \"{slot}\"\npublication = \"{PUBLICATION}\"\ncreate_slot = false\n\
                 create_publication = false\n{source_extra}\n[redis]\n{redis}\n{rules}",
                bench.pg.url(DB),
                source_extra = std::env::var("WALSWEEP_BENCH_SOURCE_EXTRA").unwrap_or_default(),
            );
            let path = bench.dir.join(format!("walsweep-{slot}.toml"));
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
    let applied_key = format!("walsweep:{DB}/{slot}:applied");
    let mut applied_at = None;
    let confirmed = wait_confirmed(bench, slot, end, || {
        if let (None, Some(store)) = (applied_at, store.as_mut()) {
            let position: Option<u64> = ::redis::cmd("GET")
                .arg(&applied_key)
                .query(store.conn_for(&applied_key))
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
    let redis_after = store.as_mut().map(Store::cpu_seconds);
    let wall = confirmed.at.duration_since(started).as_secs_f64();
    let scraped = match target {
        Target::Discard => Scraped::default(),
        Target::Node | Target::Cluster => scrape_metrics(metrics_port),
    };
    stop(&mut child, &log_path);

    if let Some(store) = store.as_mut() {
        let into = target.label();
        match bench.plan {
            PlanKind::Rules => {
                for key in ["item:1".to_string(), format!("item:name:item-{changes}")] {
                    let left: bool = ::redis::cmd("EXISTS")
                        .arg(&key)
                        .query(store.conn_for(&key))
                        .unwrap_or_else(|e| panic!("EXISTS {key}: {e}"));
                    assert!(!left, "{into} confirmed without invalidating {key}");
                }
            }
            PlanKind::Mirror => {
                // The clock measured real work: every row is mirrored and indexed.
                let rows = store.count("item:*");
                let indexed: usize = ::redis::cmd("ZCARD")
                    .arg("items:by_n")
                    .query(store.conn_for("items:by_n"))
                    .expect("ZCARD");
                let last = format!("item:{changes}");
                let row: Option<String> = ::redis::cmd("GET")
                    .arg(&last)
                    .query(store.conn_for(&last))
                    .expect("GET");
                assert_eq!(rows, changes, "{into}: every row mirrored");
                assert_eq!(indexed, changes, "{into}: every row indexed");
                assert!(row.is_some(), "{into}: the last row is mirrored");
            }
            PlanKind::Touched => {}
        }
    }
    Run {
        wall,
        cpu: cpu.as_secs_f64(),
        walsender: confirmed.walsender.as_secs_f64(),
        redis: redis_before.zip(redis_after).map(|(b, a)| a - b),
        batches: scraped.batches,
        sink_errors: scraped.sink_errors,
        // Seen together with the confirmation when both happened within one poll.
        applied: redis_before.map(|_| {
            applied_at
                .unwrap_or(confirmed.at)
                .duration_since(started)
                .as_secs_f64()
        }),
    }
}

/// The bench's own plain connections to the Redis a walsweep run writes to. No cluster client:
/// each key is read on the node that serves its slot, so a check sees what the nodes hold.
struct Store<'a> {
    cluster: Option<&'a RedisCluster>,
    /// Every node (one, or the cluster's six), by port.
    nodes: Vec<(u16, ::redis::Connection)>,
    /// The cluster's primaries with their slots, read once: nothing moves slots in the bench.
    primaries: Vec<ClusterNode>,
}

impl<'a> Store<'a> {
    /// `None` for the discarding sink.
    fn open(bench: &Bench<'a>, target: Target) -> Option<Store<'a>> {
        match target {
            Target::Discard => None,
            Target::Node => {
                let redis = bench.redis.expect("Redis runs for this target");
                let conn = ::redis::Client::open(redis.url())
                    .and_then(|c| c.get_connection())
                    .expect("the bench's Redis connection");
                Some(Store {
                    cluster: None,
                    nodes: vec![(redis.port(), conn)],
                    primaries: Vec::new(),
                })
            }
            Target::Cluster => {
                let cluster = bench.cluster.expect("the cluster runs for this target");
                Some(Store {
                    cluster: Some(cluster),
                    nodes: cluster
                        .ports()
                        .into_iter()
                        .map(|p| (p, cluster.node_connection(p)))
                        .collect(),
                    primaries: cluster.primaries(),
                })
            }
        }
    }

    /// `FLUSHALL` on the node, or on every primary of the cluster.
    fn flush(&mut self) {
        match self.cluster {
            Some(cluster) => cluster.flushall(),
            None => {
                let _: () = ::redis::cmd("FLUSHALL")
                    .query(&mut self.nodes[0].1)
                    .expect("FLUSHALL");
            }
        }
    }

    /// The connection to the node that serves `key`.
    fn conn_for(&mut self, key: &str) -> &mut ::redis::Connection {
        let port = match self.cluster {
            None => return &mut self.nodes[0].1,
            Some(cluster) => {
                let slot = cluster.slot_of(key);
                self.primaries
                    .iter()
                    .find(|p| p.serves(slot))
                    .unwrap_or_else(|| panic!("no primary serves slot {slot} (key {key})"))
                    .port
            }
        };
        self.node(port)
    }

    fn node(&mut self, port: u16) -> &mut ::redis::Connection {
        &mut self
            .nodes
            .iter_mut()
            .find(|(p, _)| *p == port)
            .unwrap_or_else(|| panic!("no connection to Redis node {port}"))
            .1
    }

    /// Redis' CPU seconds so far, summed over every node (replicas too).
    fn cpu_seconds(&mut self) -> f64 {
        self.nodes
            .iter_mut()
            .map(|(_, conn)| redis_cpu_seconds(conn))
            .sum()
    }

    /// Keys matching `pattern`, over the node or every primary (SCAN).
    fn count(&mut self, pattern: &str) -> usize {
        let ports: Vec<u16> = match self.cluster {
            None => vec![self.nodes[0].0],
            Some(_) => self.primaries.iter().map(|p| p.port).collect(),
        };
        let mut count = 0;
        for port in ports {
            let conn = self.node(port);
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(conn)
                    .unwrap_or_else(|e| panic!("SCAN {pattern} on Redis node {port}: {e}"));
                count += keys.len();
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        count
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

/// What the bench reads from walsweep's `/metrics` after a run: diagnostics, not the
/// measurement, so `None` when they cannot be read.
#[derive(Default)]
struct Scraped {
    /// `walsweep_batch_size_transactions_count`.
    batches: Option<u64>,
    /// `walsweep_errors_total{kind="sink"}`: batches that failed (a Redis timeout, say) and were
    /// applied again, their time inside the wall.
    sink_errors: Option<u64>,
}

fn scrape_metrics(port: u16) -> Scraped {
    use std::io::{Read, Write};
    let body = (|| {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        conn.read_to_string(&mut body).ok()?;
        Some(body)
    })();
    let Some(body) = body else {
        return Scraped::default();
    };
    let value = |name: &str| {
        body.lines().find_map(|l| {
            l.strip_prefix(name)?
                .trim()
                .parse::<f64>()
                .ok()
                .map(|n| n as u64)
        })
    };
    Scraped {
        batches: value("walsweep_batch_size_transactions_count"),
        sink_errors: value("walsweep_errors_total{kind=\"sink\"}"),
    }
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
