//! Compatibility with the real matroska-cache (Python, from PyPI): the library writes the
//! entries and reads them back (tests/compat/matroska_compat.py), walsweep removes them from
//! SQL changes. Nothing here restates the library's layout: if walsweep's dependency strings
//! drifted from the library's, the entries would survive and this test fails.
//!
//! The interpreter is `$WALSWEEP_PYTHON`, else `<repo>/.venv/bin/python`; `scripts/ensure-venv`
//! creates that venv.

use std::collections::BTreeSet;
use std::path::Path;

use super::{config, exists, set_keys, start, wait_gone};
use crate::stream::harness;
use crate::support::binaries::{python, repo};
use crate::support::{self, Postgres, Redis};

const SCHEMA: &str = "
CREATE TABLE articles (id int PRIMARY KEY, title text, category text, published bool);
ALTER TABLE articles REPLICA IDENTITY FULL;
INSERT INTO articles VALUES (1, 't1', 'y', false), (2, 't2', 'y', false), (3, 't3', 'x', true);
CREATE TABLE pairs (a int, b text, v int, PRIMARY KEY (a, b));
INSERT INTO pairs VALUES (1, 'x', 0), (2, 'y', 0), (3, 'it''s', 0);
CREATE TABLE markers (id int PRIMARY KEY);
CREATE TYPE task_state AS ENUM ('open', 'done');
CREATE DOMAIN flag AS boolean;
CREATE DOMAIN flag2 AS flag;
CREATE TABLE tasks (id int PRIMARY KEY, state task_state, active flag2, note text);
ALTER TABLE tasks REPLICA IDENTITY FULL;
INSERT INTO tasks VALUES (1, 'open', true, ''), (2, 'done', false, '');
CREATE PUBLICATION pub FOR TABLE articles, pairs, markers, tasks;
";

const RULES: &str = r#"
[[table]]
name = "public.articles"
deps = ["id:article:{id}", "pk:Article:{id}"]
[[table.scope]]
name = "Article"
columns = ["category", "published"]
[[table]]
name = "public.pairs"
deps = ["pk:Pair:({a!r}, {b!r})"]
[[table]]
name = "public.markers"
keys = ["marker:{id}"]
[[table]]
name = "public.tasks"
[[table.scope]]
name = "Task"
columns = ["state", "active"]
"#;

/// Entries (cache keys, as `matroska_compat.py put` names them) the changes below invalidate:
/// article 1's by `dep.Id` and `dep.PrimaryKey`, the scoped lists article 3 leaves (x, True)
/// and enters (z, True), Pair (1, 'x') by its composite primary key, and the Task lists task 1
/// leaves (open, True) and enters (done, True): an enum column and a domain over a domain over
/// `boolean`, which the app's driver hands over as `'open'` and `True`.
const GONE: &[&str] = &[
    "a1",
    "a1pk",
    "list-x-true",
    "list-z-true",
    "pair-1-x",
    "pair-3-quote",
    "tasks-open-true",
    "tasks-done-true",
];

/// Entries that must survive: article 2's, the (y, False) list (article 1 is in it, but its
/// UPDATE changed no scope column), Pair (2, 'y'), the (done, False) Task list.
const KEPT: &[&str] = &["a2", "a2pk", "list-y-false", "pair-2-y", "tasks-done-false"];

/// Runs `matroska_compat.py <args>`; `Err` carries its exit status, stdout and stderr.
async fn run_script(python: &Path, args: &[String]) -> Result<String, String> {
    let script = repo().join("tests/compat/matroska_compat.py");
    let out = tokio::process::Command::new(python)
        .arg(&script)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {} {}: {e}", python.display(), script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "`matroska_compat.py {}` failed ({}):\n--- stdout\n{stdout}--- stderr\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_written_by_matroska_cache_are_invalidated_exactly() {
    let python = python("the matroska-cache compatibility test needs a Python with matroska-cache");
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let daemon = start(config(&pg, &redis, "app", "compat", RULES));
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "compat").await;

    // The app caches its entries with the library, which also reads them back.
    let port = redis.port().to_string();
    let written = run_script(&python, &["put".into(), port.clone()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("matroska-cache wrote (key, dependencies...):\n{written}");
    let keys: BTreeSet<&str> = written
        .lines()
        .filter_map(|l| l.split('\t').next())
        .collect();
    let expected: BTreeSet<&str> = GONE.iter().chain(KEPT).copied().collect();
    assert_eq!(keys, expected, "entries the script wrote");
    for key in &expected {
        let data_key = format!("cache::data::{key}");
        assert!(
            exists(&mut conn, &data_key).await,
            "{data_key} missing after put (not the layout walsweep expects?)\n{written}"
        );
    }

    pg.psql("app", "UPDATE articles SET title = 't2' WHERE id = 1");
    pg.psql("app", "UPDATE articles SET category = 'z' WHERE id = 3");
    pg.psql("app", "UPDATE pairs SET v = v + 1 WHERE a = 1 AND b = 'x'");
    // repr() switches to double quotes for a value with a single quote: pk:Pair:(3, "it's").
    pg.psql("app", "UPDATE pairs SET v = v + 1 WHERE a = 3");
    pg.psql("app", "UPDATE tasks SET state = 'done' WHERE id = 1");
    // Barrier: once the marker's key is gone, every earlier commit has been applied.
    set_keys(&mut conn, &["marker:1"]).await;
    pg.psql("app", "INSERT INTO markers VALUES (1)");
    wait_gone(&mut conn, "marker:1", 20).await;

    let mut present = Vec::new();
    for key in GONE.iter().chain(KEPT) {
        if exists(&mut conn, &format!("cache::data::{key}")).await {
            present.push(key.to_string());
        }
    }
    // The library's own view, run before asserting so a failure shows both.
    let mut args = vec!["check".to_string(), port, "--gone".into()];
    args.extend(strings(GONE));
    args.push("--kept".into());
    args.extend(strings(KEPT));
    let checked = run_script(&python, &args).await;
    let check_report = checked.clone().unwrap_or_else(|e| e);

    assert_eq!(
        present,
        strings(KEPT),
        "cache::data::<key> present after the changes (expected exactly the kept ones); \
         the library wrote:\n{written}\nits check: {check_report}"
    );
    if let Err(e) = checked {
        panic!("{e}\nthe library wrote:\n{written}");
    }
    daemon.stop().await;
}

const EVENTS_SCHEMA: &str = "
CREATE TABLE events (id int PRIMARY KEY, starts_at timestamptz);
ALTER TABLE events REPLICA IDENTITY FULL;
INSERT INTO events VALUES
    (1, '2024-03-10 01:30:00-05'),  -- New York standard time, just before clocks go forward
    (2, '2024-03-10 03:30:00-04'),  -- daylight time, just after
    (3, '2024-11-03 01:30:00-04'),  -- clocks go back: 01:30 happens twice, EDT first ...
    (4, '2024-11-03 01:30:00-05'),  -- ... then EST
    (5, '2024-07-01 12:00:00-04');
CREATE TABLE markers (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE events, markers;
";

const EVENTS_RULES: &str = r#"
[matroska]
timezone = "America/New_York"
[[table]]
name = "public.events"
[[table.scope]]
name = "Event"
columns = ["starts_at"]
[[table]]
name = "public.markers"
keys = ["marker:{id}"]
"#;

/// An app whose connections run with `TimeZone = 'America/New_York'` gets timestamptz values
/// with New York's offset at that instant, so its scope strings differ from UTC ones; with
/// `matroska.timezone` set alike, walsweep's invalidations reach its entries on both sides of
/// both DST changes, and the untouched event's listing stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamptz_scopes_follow_the_apps_time_zone_across_dst_changes() {
    let python = python("the matroska-cache compatibility test needs a Python with matroska-cache");
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", EVENTS_SCHEMA);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let daemon = start(config(&pg, &redis, "app", "compat_tz", EVENTS_RULES));
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "compat_tz").await;

    let port = redis.port().to_string();
    let written = run_script(
        &python,
        &[
            "put-events".into(),
            port.clone(),
            pg.url("app"),
            "America/New_York".into(),
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("matroska-cache wrote (key, dependencies...):\n{written}");
    assert!(
        written.contains("-05:00") && written.contains("-04:00"),
        "the app should see New York offsets:\n{written}"
    );

    pg.psql(
        "app",
        "UPDATE events SET starts_at = starts_at + interval '48 hours' WHERE id <= 4",
    );
    set_keys(&mut conn, &["marker:1"]).await;
    pg.psql("app", "INSERT INTO markers VALUES (1)");
    wait_gone(&mut conn, "marker:1", 20).await;

    let gone = ["events-at-1", "events-at-2", "events-at-3", "events-at-4"];
    let mut args = vec!["check".to_string(), port, "--gone".into()];
    args.extend(strings(&gone));
    args.push("--kept".into());
    args.push("events-at-5".into());
    if let Err(e) = run_script(&python, &args).await {
        panic!("{e}\nthe library wrote:\n{written}");
    }
    daemon.stop().await;
}
