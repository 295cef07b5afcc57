//! Drift checks against the real servers: `walsweep verify` (the binary) reports each kind of
//! corruption with its key and exits 1, a clean state exits 0, `--table` and `--sample` narrow
//! it; the inspector (in-process daemon, `[inspect]`) counts the same corruption in
//! `walsweep_drift_rows_total`; and neither reports drift while writers change rows as fast
//! as they can. Its own test binary: the metrics recorder is process-wide.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::Value as Json;

use support::daemon::{config, config_text, start, wait_for, wait_streaming};
use support::rng::Lcg;
use support::{Postgres, Redis};

const BIN: &str = env!("CARGO_BIN_EXE_walsweep");

/// The libpq variables the binary must not pick up from the machine.
const LIBPQ_ENV: [&str; 6] = [
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGSSLMODE",
];

fn walsweep(args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove(walsweep::config::SOURCE_URL_ENV)
        .env_remove(walsweep::config::REDIS_URL_ENV);
    for var in LIBPQ_ENV {
        command.env_remove(var);
    }
    command.output().expect("run walsweep")
}

/// `walsweep verify --config <path> <args>` off the async workers (writers keep writing), with
/// its output, its exit code and how long it took.
async fn verify(path: &Path, args: &[&str]) -> (Option<i32>, String, Duration) {
    let mut all = vec![
        "verify".to_string(),
        "--config".to_string(),
        path.display().to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        walsweep(&refs)
    })
    .await
    .expect("verify ran");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text, started.elapsed())
}

fn write_config(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, format!("[metrics]\nlisten = \"\"\n{text}")).unwrap();
    path
}

/// The line of `output` reporting `kind` at `at` (a key, or `key member m`).
fn line<'a>(output: &'a str, kind: &str, at: &str) -> Option<&'a str> {
    output.lines().find(|l| {
        let l = l.trim_start();
        l.starts_with(kind) && l[kind.len()..].trim_start().starts_with(&format!("{at}: "))
    })
}

fn assert_reported(output: &str, kind: &str, at: &str, detail: &str) {
    let found =
        line(output, kind, at).unwrap_or_else(|| panic!("no `{kind} {at}` line in:\n{output}"));
    assert!(
        found.contains(detail),
        "`{found}` lacks {detail:?}:\n{output}"
    );
}

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text, qty int NOT NULL, price numeric(10,2));
CREATE TABLE readings (device_id smallint, seq int, ts timestamptz NOT NULL, value float8,
    PRIMARY KEY (device_id, seq));
CREATE PUBLICATION pub FOR TABLE items, readings;
";

const MIRRORS: &str = r#"
[[table]]
name = "public.items"
[[table.mirror]]
key = "item:{id}"
[[table.mirror.index]]
key = "items:by_qty"
member = "{id}"
score = "qty"
[[table.mirror]]
key = "itemh:{id}"
format = "hash"
columns = ["id", "name", "qty"]
[[table]]
name = "public.readings"
[[table.mirror]]
key = "reading:{device_id}:{seq}"
[[table.mirror.index]]
key = "readings:{device_id}"
member = "{seq}"
score = "epoch(ts)"
"#;

const FILL: &str = "
INSERT INTO items SELECT i, 'item ' || i, i % 50, (i || '.25')::numeric FROM generate_series(1, 300) i;
INSERT INTO readings
SELECT i % 4, i, '2024-01-01T00:00:00Z'::timestamptz + i * interval '1 minute', i * 0.5
FROM generate_series(1, 200) i;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_each_kind_of_drift_with_its_key_and_exits_1() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let daemon = start(config(&pg, &redis, "app", "verify", MIRRORS));
    let client = pg.client("app").await;
    wait_streaming(&client, "verify").await;
    pg.psql("app", FILL);

    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "walsweep.toml",
        &config_text(&pg, &redis.url(), "app", "verify", MIRRORS),
    );
    // verify waits for walsweep to apply the fill: no marker, no sleep.
    let (code, out, took) = verify(&path, &[]).await;
    assert_eq!(code, Some(0), "clean state:\n{out}");
    assert!(
        out.contains("public.items: 300 rows and ")
            && out.contains("public.readings: 200 rows and ")
            && out.contains("no drift in 2 table(s)"),
        "{out}"
    );
    eprintln!("verify of 500 rows, 2 tables, 3 mirrors, 2 indexes: {took:?}");

    // Corruption of every kind, by hand.
    let item5: String = conn.get("item:5").await.unwrap();
    let mut doc: Json = serde_json::from_str(&item5).unwrap();
    doc["name"] = Json::from("tampered");
    let _: () = conn.set("item:5", doc.to_string()).await.unwrap();
    let _: () = conn.hset("itemh:6", "qty", "999").await.unwrap();
    let _: () = conn.del("item:7").await.unwrap();
    let _: () = conn.set("item:100000", "{\"id\":100000}").await.unwrap();
    let _: () = conn.set("item:abc", "{}").await.unwrap();
    let _: () = conn.del("item:11").await.unwrap();
    let _: () = conn.hset("item:11", "id", "11").await.unwrap();
    let _: () = conn.zadd("items:by_qty", "8", 12345).await.unwrap();
    let _: () = conn.zadd("items:by_qty", "99999", 1).await.unwrap();
    let _: () = conn.zrem("readings:1", "5").await.unwrap();

    let (code, out, _) = verify(&path, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("public.items: 300 rows and ")
            && out.contains("checked: 1 missing, 3 extra, 4 different"),
        "{out}"
    );
    assert!(
        out.contains("public.readings: 200 rows and ") && out.contains("checked: 1 missing\n"),
        "{out}"
    );
    assert_reported(&out, "missing", "item:7", "no entry, but the row exists");
    assert_reported(&out, "extra", "item:100000", "no row has this key");
    assert_reported(&out, "extra", "item:abc", "no row has this key");
    assert_reported(
        &out,
        "extra",
        "items:by_qty member 99999",
        "no row has this member",
    );
    assert_reported(
        &out,
        "different",
        "item:5",
        r#"name: "tampered" in Redis, "item 5" in the row"#,
    );
    assert_reported(
        &out,
        "different",
        "itemh:6",
        "qty: 999 in Redis, 6 in the row",
    );
    assert_reported(
        &out,
        "different",
        "item:11",
        "holds a hash, but a json mirror stores a string",
    );
    assert_reported(
        &out,
        "different",
        "items:by_qty member 8",
        "score 12345 in Redis, 8 from the row",
    );
    assert_reported(
        &out,
        "missing",
        "readings:1 member 5",
        "not in the index, but the row exists",
    );
    assert!(out.contains("drift in 2 of 2 table(s)"), "{out}");

    // --table: only that table.
    let (code, out, _) = verify(&path, &["--table", "readings"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(!out.contains("public.items"), "{out}");
    assert_reported(&out, "missing", "readings:1 member 5", "the row exists");

    // --sample as large as the table: every row and entry, through the sampled path (random
    // rows, reservoir-sampled keys, random index members).
    let (code, out, _) = verify(&path, &["--table", "public.items", "--sample", "1000"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("checked: 1 missing, 3 extra, 4 different"),
        "{out}"
    );
    assert_reported(&out, "extra", "item:abc", "no row has this key");
    assert_reported(&out, "different", "items:by_qty member 8", "score 12345");
    // A small sample reads that many rows.
    let (code, out, _) = verify(&path, &["--sample", "3"]).await;
    assert!(matches!(code, Some(0 | 1)), "{out}");
    assert!(
        out.contains("public.items: 3 rows and ") && out.contains("public.readings: 3 rows and "),
        "{out}"
    );

    // Repaired, it is clean again.
    let _: () = conn.set("item:5", item5).await.unwrap();
    pg.psql(
        "app",
        "UPDATE items SET name = name WHERE id IN (6, 7, 8, 11); \
         UPDATE readings SET value = value WHERE seq = 5;",
    );
    let _: () = conn.del(&["item:100000", "item:abc"]).await.unwrap();
    let _: () = conn.zrem("items:by_qty", "99999").await.unwrap();
    let (code, out, _) = verify(&path, &[]).await;
    assert_eq!(code, Some(0), "after the repair:\n{out}");

    // A table that is not mirrored, and a slot no walsweep streams from.
    let (code, out, _) = verify(&path, &["--table", "public.nothing"]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains(
            "--table public.nothing: no [[table.mirror]] mirrors public.nothing; \
                      mirrored tables: public.items, public.readings"
        ),
        "{out}"
    );
    let idle = write_config(
        &dir,
        "idle.toml",
        &config_text(&pg, &redis.url(), "app", "nobody_streams", MIRRORS),
    );
    let (code, out, _) = verify(&idle, &["--timeout-ms", "300"]).await;
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("walsweep:app/nobody_streams:applied is absent")
            && out.contains("is walsweep running and streaming from this slot?"),
        "{out}"
    );
    let no_mirrors = write_config(
        &dir,
        "bare.toml",
        &config_text(
            &pg,
            &redis.url(),
            "app",
            "verify",
            "[[table]]\nname = \"items\"\nkeys = [\"k:{id}\"]\n",
        ),
    );
    let (code, out, _) = verify(&no_mirrors, &[]).await;
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("has no [[table.mirror]]"), "{out}");
    daemon.stop().await;
}

/// `walsweep_drift_rows_total{table,kind}` and `walsweep_inspected_rows_total` as the
/// daemon's recorder renders them.
struct Scrape(String);

impl Scrape {
    fn now() -> Scrape {
        Scrape(walsweep::telemetry::http::install_recorder().render())
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.lines().find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let matches = series.starts_with(name)
                && series[name.len()..].chars().next().is_none_or(|c| c == '{')
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse().ok()).flatten()
        })
    }

    fn drift(&self, table: &str, kind: &str) -> f64 {
        self.value(
            "walsweep_drift_rows_total",
            &[("table", table), ("kind", kind)],
        )
        .unwrap_or_else(|| panic!("no drift series for {table} {kind}:\n{}", self.0))
    }

    fn inspected(&self, table: &str) -> f64 {
        // Absent until the inspector starts.
        self.value("walsweep_inspected_rows_total", &[("table", table)])
            .unwrap_or(0.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inspector_counts_corrupted_entries_in_its_metric() {
    support::init_tracing();
    walsweep::telemetry::http::install_recorder();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql(
        "app",
        "CREATE TABLE gadgets (id int PRIMARY KEY, name text, qty int NOT NULL);
         CREATE PUBLICATION pub FOR TABLE gadgets;",
    );
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let rules = r#"
[[table]]
name = "public.gadgets"
[[table.mirror]]
key = "gadget:{id}"
[[table.mirror.index]]
key = "gadgets:by_qty"
member = "{id}"
score = "qty"
[inspect]
rows_per_minute = 6000
"#;
    let daemon = start(config(&pg, &redis, "app", "inspect_corrupt", rules));
    let client = pg.client("app").await;
    wait_streaming(&client, "inspect_corrupt").await;
    pg.psql(
        "app",
        "INSERT INTO gadgets SELECT i, 'gadget ' || i, i FROM generate_series(1, 20) i",
    );
    const T: &str = "public.gadgets";
    // Healthy first: checks run (every row, each second) and find nothing.
    wait_for(60, || async { Scrape::now().inspected(T) >= 200.0 }).await;
    let healthy = Scrape::now();
    for kind in ["missing", "extra", "different"] {
        assert_eq!(healthy.drift(T, kind), 0.0, "{kind} before any corruption");
    }

    let _: () = conn.set("gadget:3", "{\"id\":3}").await.unwrap();
    let _: () = conn.del("gadget:4").await.unwrap();
    let _: () = conn.set("gadget:500", "{\"id\":500}").await.unwrap();
    let _: () = conn.zadd("gadgets:by_qty", "9", 90).await.unwrap();
    let started = Instant::now();
    wait_for(60, || async {
        let s = Scrape::now();
        s.drift(T, "missing") >= 1.0 && s.drift(T, "extra") >= 1.0 && s.drift(T, "different") >= 2.0
    })
    .await;
    eprintln!(
        "the inspector counted missing, extra and different drift {:?} after the corruption",
        started.elapsed()
    );
    daemon.stop().await;
}

const WIDGETS: &str = r#"
[[table]]
name = "public.widgets"
[[table.mirror]]
key = "widget:{id}"
[[table.mirror.index]]
key = "widgets:by_qty"
member = "{id}"
score = "qty"
[[table.mirror.index]]
key = "widgets:grp:{grp}"
member = "{id}"
score = "qty"
[[table.mirror]]
key = "widgeth:{id}"
format = "hash"
[inspect]
rows_per_minute = 6000
"#;

/// One writer: random transactions on its own ids (id % writers == w) until `stop`.
fn spawn_writer(
    client: tokio_postgres::Client,
    w: i32,
    writers: i32,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = Lcg(0xd1f7 + w as u64);
        let mut ids: BTreeSet<i32> = (1..=600).filter(|i| i % writers == w).collect();
        let mut next_id = 600 + w;
        while !stop.load(Ordering::Relaxed) {
            let mut txn = String::from("BEGIN;");
            for _ in 0..1 + rng.below(4) {
                let value = rng.below(1_000);
                let Some(id) = rng.pick(ids.iter().copied()) else {
                    break;
                };
                match rng.below(10) {
                    // The score moves.
                    0..=3 => txn.push_str(&format!(
                        "UPDATE widgets SET qty = {value}, name = 'w{value}' WHERE id = {id};"
                    )),
                    // The index key moves.
                    4 => txn.push_str(&format!(
                        "UPDATE widgets SET grp = {} WHERE id = {id};",
                        value % 5
                    )),
                    // The entry's key moves.
                    5 => {
                        next_id += writers;
                        ids.remove(&id);
                        ids.insert(next_id);
                        txn.push_str(&format!(
                            "UPDATE widgets SET id = {next_id} WHERE id = {id};"
                        ));
                    }
                    6..=7 => {
                        next_id += writers;
                        ids.insert(next_id);
                        txn.push_str(&format!(
                            "INSERT INTO widgets VALUES ({next_id}, 'new{value}', {value}, {});",
                            value % 5
                        ));
                    }
                    _ => {
                        ids.remove(&id);
                        txn.push_str(&format!("DELETE FROM widgets WHERE id = {id};"));
                    }
                }
            }
            txn.push_str("COMMIT;");
            client
                .batch_execute(&txn)
                .await
                .unwrap_or_else(|e| panic!("writer {w}: {e}\n{txn}"));
            committed.fetch_add(1, Ordering::Relaxed);
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_verify_nor_the_inspector_report_drift_under_heavy_writes() {
    support::init_tracing();
    walsweep::telemetry::http::install_recorder();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql(
        "app",
        "CREATE TABLE widgets (id int PRIMARY KEY, name text, qty int NOT NULL, grp int NOT NULL);
         -- The index key names grp: an UPDATE must send its old value (as `check` demands).
         ALTER TABLE widgets REPLICA IDENTITY FULL;
         CREATE PUBLICATION pub FOR TABLE widgets;",
    );
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let slot = "verify_load";
    let path = write_config(
        &dir,
        "walsweep.toml",
        &config_text(&pg, &redis.url(), "app", slot, WIDGETS),
    );
    let daemon = start(config(&pg, &redis, "app", slot, WIDGETS));
    let client = pg.client("app").await;
    wait_streaming(&client, slot).await;
    pg.psql(
        "app",
        "INSERT INTO widgets SELECT i, 'w' || i, i % 97, i % 5 FROM generate_series(1, 600) i",
    );
    let (code, out, _) = verify(&path, &[]).await;
    assert_eq!(code, Some(0), "before the load:\n{out}");
    let inspected_before = Scrape::now().inspected("public.widgets");

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writers = 3;
    let mut tasks = Vec::new();
    for w in 0..writers {
        tasks.push(spawn_writer(
            pg.client("app").await,
            w,
            writers,
            stop.clone(),
            committed.clone(),
        ));
    }
    let started = Instant::now();
    let mut runs = Vec::new();
    for args in [
        &[][..],
        &["--sample", "50"][..],
        &[][..],
        &["--sample", "200"][..],
        &[][..],
        &[][..],
    ] {
        let (code, out, took) = verify(&path, args).await;
        assert_eq!(code, Some(0), "verify {args:?} during the load:\n{out}");
        runs.push((args.to_vec(), took, out));
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("writer");
    }
    let seconds = started.elapsed().as_secs_f64();
    let transactions = committed.load(Ordering::Relaxed);
    eprintln!(
        "{transactions} transactions in {seconds:.1} s ({:.0}/s) while verify ran {} times:",
        transactions as f64 / seconds,
        runs.len()
    );
    for (args, took, out) in &runs {
        let summary = out
            .lines()
            .find(|l| l.starts_with("public.widgets"))
            .unwrap_or("");
        let unsettled = out
            .lines()
            .find(|l| l.contains("kept changing"))
            .unwrap_or("");
        eprintln!("  verify {args:?}: {took:?}: {summary} {unsettled}");
    }
    assert!(
        transactions as f64 / seconds > 50.0,
        "the load was too light to mean anything: {transactions} in {seconds:.1} s"
    );
    let scrape = Scrape::now();
    let inspected = scrape.inspected("public.widgets") - inspected_before;
    assert!(inspected > 100.0, "the inspector compared only {inspected}");
    for kind in ["missing", "extra", "different"] {
        assert_eq!(
            scrape.drift("public.widgets", kind),
            0.0,
            "inspector {kind} drift during the load"
        );
    }
    // And it is still all exact once the writers stop.
    let (code, out, _) = verify(&path, &[]).await;
    assert_eq!(code, Some(0), "after the load:\n{out}");
    daemon.stop().await;
}
