//! Mirrors end to end: after any workload, each mirror equals `SELECT` of its table, typed,
//! row by row; `only_if_present` refreshes only cached rows.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use redis::AsyncCommands;
use serde_json::Value as Json;

use support::daemon::{config, start, wait_for, wait_streaming};
use support::rng::Lcg;
use support::{Postgres, Redis};

const SCHEMA: &str = "
CREATE TABLE items (
    id int PRIMARY KEY, grp smallint, name text, price numeric(10,2), qty int, active bool,
    seen timestamptz, tags text[], body text, meta jsonb);
CREATE TABLE markers (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE items, markers;
";

const MIRRORS: &str = r#"
[[table]]
name = "public.items"
[[table.mirror]]
key = "item:{id}"
[[table.mirror]]
key = "itemh:{id}"
format = "hash"
columns = ["id", "name", "price", "active", "seen", "tags", "body", "meta"]
[[table]]
name = "public.markers"
[[table.mirror]]
key = "marker:{id}"
"#;

/// Every row as the JSON mirror must hold it: `to_json` of each column in a UTC session,
/// except numeric, which walsweep keeps as an exact string.
const EXPECTED_ROWS: &str = "
SELECT id, json_build_object('id', id, 'grp', grp, 'name', name, 'price', price::text,
    'qty', qty, 'active', active, 'seen', seen, 'tags', tags, 'body', body, 'meta', meta)::text
FROM items";

/// One random statement against `items`; `ids` tracks which ids exist.
fn statement(rng: &mut Lcg, ids: &mut BTreeSet<i32>, next_id: &mut i32) -> String {
    let roll = rng.below(100);
    let value = rng.below(1_000);
    match (roll, rng.pick(ids.iter().copied())) {
        (0..=44, _) | (_, None) => {
            *next_id += 1;
            let id = *next_id;
            ids.insert(id);
            // Every fifth row gets a body large and random enough to be TOASTed out of line.
            let body = if id % 5 == 0 {
                "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 300))"
                    .to_string()
            } else {
                format!("'short body {value} with \"quotes\" and \\\\ backslash'")
            };
            format!(
                "INSERT INTO items VALUES ({id}, {grp}, {name}, {value}.5, {value}, {active}, \
                 '2024-01-02 03:04:05.{value}+00'::timestamptz + interval '{value} minutes', \
                 ARRAY['a{value}', NULL, 'c'], {body}, '{{\"n\": {value}, \"big\": 12345678901234567890, \"f\": 0.1}}')",
                grp = value % 7,
                name = if value.is_multiple_of(9) { "NULL".to_string() } else { format!("'name {value}'") },
                active = value.is_multiple_of(2),
            )
        }
        // Updates that leave `body` alone: TOASTed bodies arrive as "unchanged".
        (45..=69, Some(id)) => format!(
            "UPDATE items SET qty = qty + 1, price = {value}.25, active = NOT active, \
             name = 'renamed {value}', seen = now() WHERE id = {id}"
        ),
        (70..=77, Some(id)) => {
            // The key changes: the mirror must move, body included.
            *next_id += 1;
            let new = *next_id;
            ids.remove(&id);
            ids.insert(new);
            format!("UPDATE items SET id = {new}, qty = {value} WHERE id = {id}")
        }
        (78..=81, Some(id)) => {
            format!("UPDATE items SET body = 'rewritten {value}', meta = NULL WHERE id = {id}")
        }
        (82..=98, Some(id)) => {
            ids.remove(&id);
            format!("DELETE FROM items WHERE id = {id}")
        }
        _ => {
            ids.clear();
            "TRUNCATE items".to_string()
        }
    }
}

async fn keys(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> BTreeSet<String> {
    let mut iter: redis::AsyncIter<String> = conn.scan_match(pattern).await.expect("SCAN");
    let mut out = BTreeSet::new();
    while let Some(k) = iter.next_item().await {
        out.insert(k.expect("SCAN item"));
    }
    out
}

/// Waits until walsweep applied everything committed so far (a marker row is mirrored).
async fn caught_up(
    pg: &tokio_postgres::Client,
    conn: &mut redis::aio::MultiplexedConnection,
    marker: i32,
) {
    pg.execute("INSERT INTO markers VALUES ($1)", &[&marker])
        .await
        .expect("marker");
    let key = format!("marker:{marker}");
    wait_for(60, || {
        let key = key.clone();
        let mut c = conn.clone();
        async move { c.exists::<_, bool>(&key).await.expect("EXISTS") }
    })
    .await;
}

/// What a hash mirror field holds for a JSON value: strings as they are, other values as JSON
/// text, NULL as no field.
fn hash_form(value: &Json) -> Option<String> {
    match value {
        Json::Null => None,
        Json::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Returns how many rows were compared.
async fn assert_mirrors_equal_table(
    pg: &tokio_postgres::Client,
    conn: &mut redis::aio::MultiplexedConnection,
) -> usize {
    let rows = pg.query(EXPECTED_ROWS, &[]).await.expect("select rows");
    let mut expected: BTreeMap<i32, Json> = BTreeMap::new();
    for row in rows {
        let text: String = row.get(1);
        expected.insert(row.get(0), serde_json::from_str(&text).expect("row json"));
    }
    let want_keys: BTreeSet<String> = expected.keys().map(|id| format!("item:{id}")).collect();
    assert_eq!(keys(conn, "item:*").await, want_keys, "JSON mirror keys");
    let want_hash_keys: BTreeSet<String> =
        expected.keys().map(|id| format!("itemh:{id}")).collect();
    assert_eq!(
        keys(conn, "itemh:*").await,
        want_hash_keys,
        "hash mirror keys"
    );
    for (id, want) in &expected {
        let stored: String = conn.get(format!("item:{id}")).await.expect("GET");
        let got: Json = serde_json::from_str(&stored).expect("mirror holds JSON");
        assert_eq!(&got, want, "JSON mirror of row {id}");
        let hash: BTreeMap<String, String> =
            conn.hgetall(format!("itemh:{id}")).await.expect("HGETALL");
        let mut want_hash = BTreeMap::new();
        for column in [
            "id", "name", "price", "active", "seen", "tags", "body", "meta",
        ] {
            if let Some(v) = hash_form(&want[column]) {
                want_hash.insert(column.to_string(), v);
            }
        }
        // The big integer in meta goes through the same JSON text on both sides.
        let normalise = |m: &BTreeMap<String, String>| -> BTreeMap<String, Json> {
            m.iter()
                .map(|(k, v)| {
                    let parsed = if k == "meta" || k == "tags" {
                        serde_json::from_str(v).unwrap_or(Json::String(v.clone()))
                    } else {
                        Json::String(v.clone())
                    };
                    (k.clone(), parsed)
                })
                .collect()
        };
        assert_eq!(
            normalise(&hash),
            normalise(&want_hash),
            "hash mirror of row {id}"
        );
    }
    expected.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_equal_the_table_after_a_random_workload() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let daemon = start(config(&pg, &redis, "app", "mirror_random", MIRRORS));
    let client = pg.client("app").await;
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .expect("UTC");
    wait_streaming(&client, "mirror_random").await;

    let mut rng = Lcg(0x5eed_1234);
    let mut ids = BTreeSet::new();
    let mut next_id = 0;
    let (mut compared, mut toasted, mut truncates) = (0, 0, 0);
    for round in 0..8 {
        for _ in 0..30 {
            let statements = 1 + rng.below(6);
            let mut txn = String::from("BEGIN;");
            for _ in 0..statements {
                let sql = statement(&mut rng, &mut ids, &mut next_id);
                truncates += usize::from(sql.starts_with("TRUNCATE"));
                txn.push_str(&sql);
                txn.push(';');
            }
            txn.push_str("COMMIT;");
            client
                .batch_execute(&txn)
                .await
                .unwrap_or_else(|e| panic!("workload: {e}\n{txn}"));
        }
        let toasted_now: i64 = client
            .query_one(
                "SELECT count(*) FROM items WHERE pg_column_size(body) > 2000",
                &[],
            )
            .await
            .expect("count toasted")
            .get(0);
        toasted += toasted_now;
        caught_up(&client, &mut conn, round).await;
        compared += assert_mirrors_equal_table(&client, &mut conn).await;
    }
    // Guards against a workload that would compare nothing.
    assert!(compared > 100, "only {compared} rows compared");
    assert!(toasted > 0, "no TOASTed body was compared");
    assert!(truncates > 0, "the workload never truncated");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_if_present_refreshes_cached_rows_and_never_creates_one() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql(
        "app",
        "CREATE TABLE items (id int PRIMARY KEY, name text, qty int);
         CREATE TABLE markers (id int PRIMARY KEY);
         INSERT INTO items VALUES (1, 'one', 1), (2, 'two', 2);
         CREATE PUBLICATION pub FOR TABLE items, markers;",
    );
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let rules = r#"
[[table]]
name = "public.items"
[[table.mirror]]
key = "item:{id}"
only_if_present = true
[[table.mirror.index]]
key = "items:by_qty"
member = "{id}"
score = "qty"
[[table]]
name = "public.markers"
[[table.mirror]]
key = "marker:{id}"
"#;
    let daemon = start(config(&pg, &redis, "app", "mirror_present", rules));
    let client = pg.client("app").await;
    wait_streaming(&client, "mirror_present").await;
    // The app cached row 1 (in its own form); row 2 is not cached.
    let _: () = conn.set("item:1", "{\"stale\":true}").await.expect("SET");
    client
        .batch_execute(
            "UPDATE items SET name = 'uno', qty = 10 WHERE id = 1;
             UPDATE items SET name = 'dos', qty = 20 WHERE id = 2;
             INSERT INTO items VALUES (3, 'three', 3);",
        )
        .await
        .expect("updates");
    caught_up(&client, &mut conn, 1).await;
    let one: String = conn.get("item:1").await.expect("GET");
    assert_eq!(
        serde_json::from_str::<Json>(&one).expect("json"),
        serde_json::json!({"id": 1, "name": "uno", "qty": 10})
    );
    assert!(!conn.exists::<_, bool>("item:2").await.expect("EXISTS"));
    assert!(!conn.exists::<_, bool>("item:3").await.expect("EXISTS"));
    let members: Vec<(String, f64)> = conn
        .zrange_withscores("items:by_qty", 0, -1)
        .await
        .expect("ZRANGE");
    assert_eq!(
        members,
        vec![("1".to_string(), 10.0)],
        "only the cached row is indexed"
    );
    client
        .batch_execute("DELETE FROM items WHERE id = 1")
        .await
        .expect("delete");
    caught_up(&client, &mut conn, 2).await;
    assert!(!conn.exists::<_, bool>("item:1").await.expect("EXISTS"));
    assert!(!conn
        .exists::<_, bool>("items:by_qty")
        .await
        .expect("EXISTS"));
    daemon.stop().await;
}

const READINGS: &str = "
CREATE TABLE readings (device_id smallint, seq int, ts timestamptz NOT NULL, value float8,
    PRIMARY KEY (device_id, seq));
CREATE TABLE markers (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE readings, markers;
";

/// tablecache's segmented index: one sorted set, each device's readings in their own score
/// segment `(device_id << 32) | epoch(ts)`.
const SEGMENTED: &str = r#"
[[table]]
name = "public.readings"
[[table.mirror]]
key = "reading:{device_id}:{seq}"
[[table.mirror.index]]
key = "readings:by_device_time"
member = "{device_id}:{seq}"
score = "(device_id << 32) | epoch(ts)"
[[table.mirror.index]]
key = "readings:recent:{device_id}"
member = "{seq}"
score = "epoch(ts)"
retention_seconds = 3600
[[table]]
name = "public.markers"
[[table.mirror]]
key = "marker:{id}"
"#;

/// 2024-01-01T00:00:00Z: readings fall within a day after it.
const DAY_START: i64 = 1_704_067_200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segmented_index_ranges_equal_sql_ranges() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", READINGS);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let daemon = start(config(&pg, &redis, "app", "segmented", SEGMENTED));
    let client = pg.client("app").await;
    wait_streaming(&client, "segmented").await;

    let mut rng = Lcg(42);
    let mut rows: BTreeSet<(i16, i32)> = BTreeSet::new();
    let mut seq = 0;
    for _ in 0..60 {
        let mut txn = String::from("BEGIN;");
        for _ in 0..5 {
            let roll = rng.below(10);
            let existing = rng.pick(rows.iter().copied());
            let at = DAY_START + rng.below(86_400) as i64;
            match (roll, existing) {
                (0..=5, _) | (_, None) => {
                    seq += 1;
                    let device = rng.below(4) as i16;
                    rows.insert((device, seq));
                    txn.push_str(&format!(
                        "INSERT INTO readings VALUES ({device}, {seq}, to_timestamp({at}.{frac}), {v});",
                        frac = rng.below(1000),
                        v = rng.below(100)
                    ));
                }
                // The time moves: the member moves between scores.
                (6, Some((d, s))) => txn.push_str(&format!(
                    "UPDATE readings SET ts = to_timestamp({at}) WHERE device_id = {d} AND seq = {s};"
                )),
                // The device changes: key, member and segment move.
                (7, Some((d, s))) => {
                    let to = (d + 1) % 4;
                    if !rows.contains(&(to, s)) {
                        rows.remove(&(d, s));
                        rows.insert((to, s));
                        txn.push_str(&format!(
                            "UPDATE readings SET device_id = {to} WHERE device_id = {d} AND seq = {s};"
                        ));
                    }
                }
                (_, Some((d, s))) => {
                    rows.remove(&(d, s));
                    txn.push_str(&format!(
                        "DELETE FROM readings WHERE device_id = {d} AND seq = {s};"
                    ));
                }
            }
        }
        txn.push_str("COMMIT;");
        client.batch_execute(&txn).await.expect("workload");
    }
    caught_up(&client, &mut conn, 1).await;

    let mut checked_members = 0;
    for _ in 0..40 {
        let device = rng.below(4) as i64;
        let a = DAY_START + rng.below(86_400) as i64;
        let b = DAY_START + rng.below(86_400) as i64;
        let (from, to) = (a.min(b), a.max(b));
        let min = (device << 32) | from;
        let max = (device << 32) | to;
        let got: Vec<String> = conn
            .zrangebyscore("readings:by_device_time", min, max)
            .await
            .expect("ZRANGEBYSCORE");
        let want: Vec<String> = client
            .query(
                "SELECT device_id || ':' || seq FROM readings \
                 WHERE device_id = $1 AND floor(extract(epoch FROM ts))::bigint BETWEEN $2 AND $3 \
                 ORDER BY floor(extract(epoch FROM ts)), device_id || ':' || seq",
                &[&(device as i16), &from, &to],
            )
            .await
            .expect("SQL range")
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Equal scores order by member in Redis: compare as sets, and the order of scores.
        let sorted = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
        assert_eq!(
            sorted(&got),
            sorted(&want),
            "device {device}, epoch {from}..={to}"
        );
        checked_members += got.len();
    }
    assert!(
        checked_members > 20,
        "ranges were too empty ({checked_members})"
    );
    let total: usize = conn.zcard("readings:by_device_time").await.expect("ZCARD");
    assert_eq!(total, rows.len(), "one member per row");
    // Retention: every reading is older than an hour before the commits, so the per-device
    // "recent" indexes trim everything they are given.
    for device in 0..4 {
        let n: usize = conn
            .zcard(format!("readings:recent:{device}"))
            .await
            .expect("ZCARD");
        assert_eq!(n, 0, "old readings of device {device} were kept");
    }
    client
        .batch_execute(
            "INSERT INTO readings VALUES (1, 100000, now(), 1), (1, 100001, now() - interval '2 hours', 1)",
        )
        .await
        .expect("recent readings");
    caught_up(&client, &mut conn, 2).await;
    let recent: Vec<String> = conn
        .zrange("readings:recent:1", 0, -1)
        .await
        .expect("ZRANGE");
    assert_eq!(recent, vec!["100000".to_string()]);
    daemon.stop().await;
}

/// Rows already in the table before walsweep first starts, some with TOASTed bodies.
const PREFILL: &str = "
INSERT INTO items
SELECT i, (i % 7)::smallint, 'pre ' || i, (i || '.75')::numeric, i, i % 2 = 0,
       '2024-01-02 03:04:05+00'::timestamptz + i * interval '1 second', ARRAY['p' || i],
       CASE WHEN i % 500 = 0
            THEN (SELECT string_agg(md5(i::text || g::text), '') FROM generate_series(1, 300) g)
            ELSE 'pre body ' || i END,
       jsonb_build_object('i', i)
FROM generate_series(1, 20000) i;
";

/// Runs random transactions until told to stop; returns how many committed.
fn spawn_writer(
    client: tokio_postgres::Client,
    first_id: i32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(tokio_postgres::Client, Vec<std::time::Instant>)> {
    tokio::spawn(async move {
        let mut rng = Lcg(7);
        // The writer only touches rows it knows: the prefilled ones and its own.
        let mut ids: BTreeSet<i32> = (1..=first_id).collect();
        let mut next_id = first_id;
        let mut committed = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut txn = String::from("BEGIN;");
            for _ in 0..3 {
                let sql = statement(&mut rng, &mut ids, &mut next_id);
                if sql.starts_with("TRUNCATE") {
                    continue;
                }
                txn.push_str(&sql);
                txn.push(';');
            }
            txn.push_str("COMMIT;");
            client
                .batch_execute(&txn)
                .await
                .unwrap_or_else(|e| panic!("writer: {e}\n{txn}"));
            committed.push(std::time::Instant::now());
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        (client, committed)
    })
}

async fn warm_up_then_stream_loses_nothing(slot: &str, via_command: bool) {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    pg.psql("app", PREFILL);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    // Leftovers of rows deleted while nobody watched must not survive a warm-up.
    let _: () = conn.set("item:999999", "{\"stale\":1}").await.expect("SET");
    let mut cfg = config(&pg, &redis, "app", slot, MIRRORS);
    cfg.source.warm_up = !via_command;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = spawn_writer(pg.client("app").await, 20_000, stop.clone());
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let load_started = std::time::Instant::now();
    if via_command {
        let summary = walsweep::cli::snapshot::load_mirrors(&cfg)
            .await
            .expect("walsweep snapshot");
        // The prefilled 20 000 rows, give or take what the writer (up to 3 statements per
        // transaction, some of them DELETEs) changed in the 100 ms before the snapshot; the
        // exact comparison with SELECT comes at the end.
        let items = summary.tables.iter().find(|(t, _)| t == "public.items");
        assert!(
            items.is_some_and(|(_, rows)| *rows >= 19_500),
            "{summary:?}"
        );
    }
    let daemon = start(cfg);
    let client = pg.client("app").await;
    wait_streaming(&client, slot).await;
    let streaming_since = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (_writer_client, committed) = writer.await.expect("writer");
    let during_load = committed
        .iter()
        .filter(|t| **t > load_started && **t < streaming_since)
        .count();
    assert!(
        during_load > 0,
        "no transaction committed while the mirrors were loading; the test proves nothing"
    );
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .expect("UTC");
    caught_up(&client, &mut conn, 1).await;
    let compared = assert_mirrors_equal_table(&client, &mut conn).await;
    assert!(compared >= 19_000, "only {compared} rows compared");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_on_slot_creation_loses_no_change_made_during_it() {
    warm_up_then_stream_loses_nothing("warm_up_daemon", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_command_then_streaming_loses_no_change_made_during_it() {
    warm_up_then_stream_loses_nothing("warm_up_command", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_slot_reloads_the_mirrors_with_the_changes_of_the_gap() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    pg.psql("app", &PREFILL.replace("20000", "2000"));
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let slot = "recreated";
    let mut cfg = config(&pg, &redis, "app", slot, MIRRORS);
    cfg.source.warm_up = true;
    cfg.source.on_slot_lost = walsweep::config::SlotLostPolicy::Recreate;
    let daemon = start(cfg);
    let client = pg.client("app").await;
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .expect("UTC");
    wait_streaming(&client, slot).await;
    assert_eq!(assert_mirrors_equal_table(&client, &mut conn).await, 2000);

    // Someone drops the slot under the running daemon (it reconnects within ~50 ms, so retry).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let dropped = client
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = '{slot}' AND active_pid IS NOT NULL; \
                 SELECT pg_drop_replication_slot('{slot}');"
            ))
            .await;
        if dropped.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "could not drop the slot"
        );
    }
    // Changes nobody streams: only the reload can bring them.
    client
        .batch_execute(
            "UPDATE items SET name = 'changed in the gap' WHERE id <= 100; \
             DELETE FROM items WHERE id BETWEEN 101 AND 200; \
             INSERT INTO items (id, name) VALUES (30001, 'inserted in the gap');",
        )
        .await
        .expect("gap changes");
    wait_streaming(&client, slot).await;
    client
        .batch_execute("UPDATE items SET qty = -1 WHERE id = 300")
        .await
        .expect("after the gap");
    caught_up(&client, &mut conn, 1).await;
    assert_eq!(assert_mirrors_equal_table(&client, &mut conn).await, 1901);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_stay_exact_when_transactions_are_redelivered_after_a_hard_stop() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let slot = "mirror_redelivery";
    let client = pg.client("app").await;
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .expect("UTC");
    let mut rng = Lcg(99);
    let mut ids = BTreeSet::new();
    let mut next_id = 0;
    let workload = |rng: &mut Lcg, ids: &mut BTreeSet<i32>, next_id: &mut i32| {
        let mut txns = Vec::new();
        for _ in 0..60 {
            let mut txn = String::from("BEGIN;");
            for _ in 0..4 {
                let sql = statement(rng, ids, next_id);
                if !sql.starts_with("TRUNCATE") {
                    txn.push_str(&sql);
                    txn.push(';');
                }
            }
            txn.push_str("COMMIT;");
            txns.push(txn);
        }
        txns
    };

    let daemon = start(config(&pg, &redis, "app", slot, MIRRORS));
    wait_streaming(&client, slot).await;
    // An open transaction large enough to be streamed keeps walsweep from being caught up, so
    // the applied workload is confirmed only at status-interval ticks, not at once: the stop
    // below then lands before the confirmation (rolled back after the stop).
    let open = pg.client("app").await;
    open.batch_execute(
        "BEGIN; INSERT INTO markers SELECT g FROM generate_series(1000000, 1010000) g",
    )
    .await
    .expect("open streamed transaction");
    for txn in workload(&mut rng, &mut ids, &mut next_id) {
        client.batch_execute(&txn).await.expect("workload");
    }
    let end: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    // A hard stop: no drain, no final status update.
    daemon.task.abort();
    let _ = daemon.task.await;
    let confirmed: String = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot")
        .get(0);
    let lag: i64 = client
        .query_one(
            &format!("SELECT pg_wal_lsn_diff('{end}', '{confirmed}')::bigint"),
            &[],
        )
        .await
        .expect("lag")
        .get(0);
    assert!(
        lag > 0,
        "the slot confirmed everything before the stop ({confirmed} >= {end}): nothing would be \
         redelivered"
    );

    open.batch_execute("ROLLBACK").await.expect("rollback");

    // The restart receives again what was applied but not confirmed, then new work.
    let daemon = start(config(&pg, &redis, "app", slot, MIRRORS));
    wait_streaming(&client, slot).await;
    // An open transaction large enough to be streamed keeps walsweep from being caught up, so
    // the applied workload is confirmed only at status-interval ticks, not at once: the stop
    // below then lands before the confirmation (rolled back after the stop).
    let open = pg.client("app").await;
    open.batch_execute(
        "BEGIN; INSERT INTO markers SELECT g FROM generate_series(1000000, 1010000) g",
    )
    .await
    .expect("open streamed transaction");
    for txn in workload(&mut rng, &mut ids, &mut next_id) {
        client.batch_execute(&txn).await.expect("workload");
    }
    caught_up(&client, &mut conn, 1).await;
    assert!(assert_mirrors_equal_table(&client, &mut conn).await > 20);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enums_domains_and_their_arrays_are_typed_like_postgres_types_them() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql(
        "app",
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE DOMAIN score AS int CHECK (VALUE >= 0);
         CREATE DOMAIN price AS numeric(8,2);
         CREATE TABLE feelings (id int PRIMARY KEY, m mood, ms mood[], s score, ss score[], p price);
         CREATE TABLE markers (id int PRIMARY KEY);
         CREATE PUBLICATION pub FOR TABLE feelings, markers;
         INSERT INTO feelings VALUES (1, 'ok', '{sad,happy}', 7, '{1,2}', 3.5);",
    );
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let rules = r#"
[[table]]
name = "public.feelings"
[[table.mirror]]
key = "feeling:{id}"
[[table]]
name = "public.markers"
[[table.mirror]]
key = "marker:{id}"
"#;
    let mut cfg = config(&pg, &redis, "app", "typed", rules);
    cfg.source.warm_up = true;
    let daemon = start(cfg);
    let client = pg.client("app").await;
    wait_streaming(&client, "typed").await;
    client
        .batch_execute("INSERT INTO feelings VALUES (2, 'happy', '{ok,NULL}', 0, '{}', NULL)")
        .await
        .expect("insert");
    caught_up(&client, &mut conn, 1).await;
    // Loaded by the warm-up (row 1) and streamed (row 2): both as to_json types them, except
    // numeric (and domains over it), which mirrors keep as exact strings.
    let expected = [
        (
            1,
            serde_json::json!({"id": 1, "m": "ok", "ms": ["sad", "happy"], "s": 7, "ss": [1, 2], "p": "3.50"}),
        ),
        (
            2,
            serde_json::json!({"id": 2, "m": "happy", "ms": ["ok", null], "s": 0, "ss": [], "p": null}),
        ),
    ];
    for (id, want) in expected {
        let stored: String = conn.get(format!("feeling:{id}")).await.expect("GET");
        let got: Json = serde_json::from_str(&stored).expect("JSON");
        assert_eq!(got, want, "feeling {id}");
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_refuses_while_a_daemon_streams_and_without_mirrors() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let cfg = config(&pg, &redis, "app", "busy", MIRRORS);
    let daemon = start(cfg.clone());
    let client = pg.client("app").await;
    wait_streaming(&client, "busy").await;
    let err = walsweep::cli::snapshot::load_mirrors(&cfg)
        .await
        .expect_err("the slot is in use");
    let msg = walsweep::telemetry::log::display_chain(&err);
    assert!(
        msg.contains("replication slot \"busy\" is in use") && msg.contains("stop it first"),
        "{msg}"
    );
    daemon.stop().await;

    let no_mirrors = config(
        &pg,
        &redis,
        "app",
        "busy",
        "[[table]]\nname = \"public.items\"\nkeys = [\"item:{id}\"]\n",
    );
    let err = walsweep::cli::snapshot::load_mirrors(&no_mirrors)
        .await
        .expect_err("nothing to load");
    let msg = walsweep::telemetry::log::display_chain(&err);
    assert!(msg.contains("no [[table.mirror]] to load"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttls_are_set_incomplete_rows_are_removed_and_foreign_index_keys_left_alone() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql(
        "app",
        "CREATE TABLE notes (id int PRIMARY KEY, name text, body text);
         CREATE TABLE markers (id int PRIMARY KEY);
         CREATE PUBLICATION pub FOR TABLE notes, markers;",
    );
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    // Another app's string where the index would go.
    let _: () = conn.set("nidx", "other app").await.expect("SET");
    let rules = r#"
[[table]]
name = "public.notes"
[[table.mirror]]
key = "n:{id}"
ttl_seconds = 600
[[table.mirror.index]]
key = "nidx"
member = "{id}"
score = "id"
[[table.mirror]]
key = "nh:{id}"
format = "hash"
ttl_seconds = 600
[[table]]
name = "public.markers"
[[table.mirror]]
key = "marker:{id}"
"#;
    let daemon = start(config(&pg, &redis, "app", "edges", rules));
    let client = pg.client("app").await;
    wait_streaming(&client, "edges").await;
    client
        .batch_execute(
            "INSERT INTO notes VALUES (1, 'one', 'short');
             INSERT INTO notes SELECT 2, 'two', string_agg(md5(g::text), '')
                 FROM generate_series(1, 300) g;",
        )
        .await
        .expect("inserts");
    caught_up(&client, &mut conn, 1).await;
    for key in ["n:1", "nh:1", "n:2", "nh:2"] {
        let ttl: i64 = conn.ttl(key).await.expect("TTL");
        assert!((1..=600).contains(&ttl), "{key} has TTL {ttl}");
    }
    let foreign: String = conn.get("nidx").await.expect("GET");
    assert_eq!(foreign, "other app", "another app's key is left alone");

    // The cache evicted row 2; an update that leaves its TOASTed body unchanged cannot
    // rebuild it, so no half row appears.
    let _: () = conn.del(&["n:2", "nh:2"]).await.expect("DEL");
    client
        .batch_execute("UPDATE notes SET name = 'zwei' WHERE id = 2; UPDATE notes SET name = 'uno' WHERE id = 1")
        .await
        .expect("updates");
    caught_up(&client, &mut conn, 2).await;
    for key in ["n:2", "nh:2"] {
        assert!(
            !conn.exists::<_, bool>(key).await.expect("EXISTS"),
            "{key} half-written"
        );
    }
    let one: String = conn.get("n:1").await.expect("GET");
    assert_eq!(
        serde_json::from_str::<Json>(&one).expect("JSON"),
        serde_json::json!({"id": 1, "name": "uno", "body": "short"})
    );
    daemon.stop().await;
}

/// A stored entry can lack a field the row has: it was mirrored before `columns` named that
/// field, or the entry was edited by hand. An update that leaves the field's TOASTed value
/// unchanged cannot fill it in, so the row is removed (counted `incomplete`) rather than
/// written without it: the same for JSON and hash mirrors, moved or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_entry_missing_a_kept_field_is_removed_not_half_written_in_both_formats() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql(
        "app",
        "CREATE TABLE notes (id int PRIMARY KEY, name text, body text);
         CREATE TABLE markers (id int PRIMARY KEY);
         CREATE PUBLICATION pub FOR TABLE notes, markers;",
    );
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let rules = r#"
[[table]]
name = "public.notes"
[[table.mirror]]
key = "n:{id}"
[[table.mirror]]
key = "nh:{id}"
format = "hash"
[[table]]
name = "public.markers"
[[table.mirror]]
key = "marker:{id}"
"#;
    let daemon = start(config(&pg, &redis, "app", "kept_missing", rules));
    let client = pg.client("app").await;
    wait_streaming(&client, "kept_missing").await;
    client
        .batch_execute(
            "INSERT INTO notes SELECT id, 'n' || id, string_agg(md5(g::text), '')
                 FROM (VALUES (2), (4)) ids(id), generate_series(1, 300) g GROUP BY id",
        )
        .await
        .expect("inserts");
    caught_up(&client, &mut conn, 1).await;
    for id in [2, 4] {
        let _: () = conn.hdel(format!("nh:{id}"), "body").await.expect("HDEL");
        let _: () = conn
            .set(
                format!("n:{id}"),
                format!(r#"{{"id":{id},"name":"n{id}"}}"#),
            )
            .await
            .expect("SET");
    }
    // Row 2 moves to key 3, row 4 stays; both keep their TOASTed body unchanged.
    client
        .batch_execute(
            "UPDATE notes SET id = 3 WHERE id = 2; UPDATE notes SET name = 'vier' WHERE id = 4",
        )
        .await
        .expect("updates");
    caught_up(&client, &mut conn, 2).await;
    for key in ["n:2", "n:3", "n:4", "nh:2", "nh:3", "nh:4"] {
        let present: bool = conn.exists(key).await.expect("EXISTS");
        assert!(!present, "{key} is still there without its body");
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_key_the_replica_identity_cannot_name_is_cleared_not_left_stale() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql(
        "app",
        "CREATE TABLE things (id int PRIMARY KEY, grp int);
         CREATE TABLE markers (id int PRIMARY KEY);
         CREATE PUBLICATION pub FOR TABLE things, markers;",
    );
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    // `grp` is not in the replica identity (`check` rejects this; the daemon must stay safe).
    let rules = r#"
[[table]]
name = "public.things"
[[table.mirror]]
key = "t:{id}"
[[table.mirror.index]]
key = "tidx:{grp}"
member = "{id}"
score = "id"
[[table]]
name = "public.markers"
[[table.mirror]]
key = "marker:{id}"
"#;
    let daemon = start(config(&pg, &redis, "app", "unnamed", rules));
    let client = pg.client("app").await;
    wait_streaming(&client, "unnamed").await;
    client
        .batch_execute("INSERT INTO things VALUES (1, 1), (2, 2)")
        .await
        .expect("inserts");
    caught_up(&client, &mut conn, 1).await;
    client
        .batch_execute("UPDATE things SET grp = 3 WHERE id = 1")
        .await
        .expect("update");
    caught_up(&client, &mut conn, 2).await;
    let old: Vec<String> = conn.zrange("tidx:1", 0, -1).await.expect("ZRANGE");
    assert!(old.is_empty(), "row 1 left in its old group: {old:?}");
    let new: Vec<String> = conn.zrange("tidx:3", 0, -1).await.expect("ZRANGE");
    assert_eq!(new, vec!["1".to_string()]);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_warm_up_is_retried_from_a_new_slot_until_it_loads_everything() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    pg.psql("app", &PREFILL.replace("20000", "500"));
    let mut redis = Redis::start();
    let slot = "warm_retry";
    let mut cfg = config(&pg, &redis, "app", slot, MIRRORS);
    cfg.source.warm_up = true;
    // Redis is down when walsweep creates the slot: the load fails.
    redis.stop();
    let daemon = start(cfg);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let client = pg.client("app").await;
    client
        .batch_execute(
            "SET TimeZone = 'UTC'; UPDATE items SET name = 'while redis was down' WHERE id <= 50",
        )
        .await
        .expect("updates");
    redis.restart();
    let mut conn = redis.connection().await;
    wait_streaming(&client, slot).await;
    caught_up(&client, &mut conn, 1).await;
    assert_eq!(assert_mirrors_equal_table(&client, &mut conn).await, 500);
    daemon.stop().await;
}

/// The replication session pins the text forms the decoder reads, so a database whose own
/// server's defaults differ (`IntervalStyle = iso_8601`, `bytea_output = escape`) mirrors the
/// same JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_text_form_settings_do_not_change_mirrored_values() {
    support::init_tracing();
    let pg = Postgres::start_with(support::PostgresOptions {
        extra_settings: vec![
            ("IntervalStyle".into(), "iso_8601".into()),
            ("bytea_output".into(), "escape".into()),
        ],
        ..Default::default()
    });
    pg.create_database("app");
    pg.psql(
        "app",
        "CREATE TABLE blobs (id int PRIMARY KEY, span interval, data bytea);
         CREATE TABLE markers (id int PRIMARY KEY);
         CREATE PUBLICATION pub FOR TABLE blobs, markers;",
    );
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let rules = r#"
[[table]]
name = "public.blobs"
[[table.mirror]]
key = "blob:{id}"
[[table]]
name = "public.markers"
[[table.mirror]]
key = "marker:{id}"
"#;
    let daemon = start(config(&pg, &redis, "app", "styles", rules));
    let client = pg.client("app").await;
    wait_streaming(&client, "styles").await;
    client
        .batch_execute(
            "INSERT INTO blobs VALUES (1, interval '1 day 2 hours 3.5 seconds', '\\x00ff41')",
        )
        .await
        .expect("insert");
    caught_up(&client, &mut conn, 1).await;
    let stored: Option<String> = conn.get("blob:1").await.expect("GET");
    let got: Json = serde_json::from_str(&stored.expect("blob:1 mirrored")).expect("JSON");
    assert_eq!(
        got,
        serde_json::json!({"id": 1, "span": "1 day 02:00:03.5", "data": "\\x00ff41"})
    );
    daemon.stop().await;
}

/// `[mirror]` spilling past a few KiB into `dir`, then the test's mirrors.
fn spilling(dir: &std::path::Path) -> String {
    format!(
        "[mirror]\nspill_after_bytes = 4096\nspill_dir = \"{}\"\n{MIRRORS}",
        dir.display()
    )
}

fn spill_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read the spill dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.starts_with("walsweep-spill-"))
        .collect()
}

/// Waits until walsweep has spilled part of the open transaction (it is streamed to walsweep
/// before its commit, `logical_decoding_work_mem` being 64kB in tests).
async fn wait_spilled(dir: &std::path::Path) {
    wait_for(60, || async { !spill_files(dir).is_empty() }).await;
}

async fn wait_no_spill_files(dir: &std::path::Path) {
    wait_for(30, || async { spill_files(dir).is_empty() }).await;
}

/// What the spill tests run against: walsweep streaming `SCHEMA`'s mirrors with a spill
/// threshold low enough to spill, into `dir`; `before_start` runs on the dir first.
struct SpillRun {
    pg: Postgres,
    _redis: Redis,
    conn: redis::aio::MultiplexedConnection,
    dir: tempfile::TempDir,
    daemon: support::daemon::Daemon,
    client: tokio_postgres::Client,
}

async fn spill_run(slot: &str, before_start: impl FnOnce(&std::path::Path)) -> SpillRun {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let conn = redis.connection().await;
    let dir = tempfile::tempdir().expect("spill dir");
    before_start(dir.path());
    let daemon = start(config(&pg, &redis, "app", slot, &spilling(dir.path())));
    let client = pg.client("app").await;
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .expect("UTC");
    wait_streaming(&client, slot).await;
    SpillRun {
        pg,
        _redis: redis,
        conn,
        dir,
        daemon,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_spilled_to_disk_leaves_the_mirrors_equal_to_the_table() {
    // Left by a crashed walsweep (a pid above the kernel's largest): removed at start.
    let stale_name = "walsweep-spill-4194305-0";
    let SpillRun {
        pg: _pg,
        _redis,
        mut conn,
        dir,
        daemon,
        client,
    } = spill_run("mirror_spill", |dir| {
        std::fs::write(dir.join(stale_name), b"pending ops of a crashed run").expect("stale file")
    })
    .await;
    let stale = dir.path().join(stale_name);
    assert!(!stale.exists(), "the stale spill file is still there");

    let mut rng = Lcg(0x5b111);
    let mut ids = BTreeSet::new();
    let mut next_id = 0;
    let mut compared = 0;
    for round in 0..3 {
        // Rows committed before, so the big transaction also updates, moves and deletes rows
        // whose mirror exists.
        for _ in 0..20 {
            let sql = statement(&mut rng, &mut ids, &mut next_id);
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{sql}"));
        }
        client.batch_execute("BEGIN").await.expect("BEGIN");
        let mut statements = 0;
        // Enough rows in one transaction to pass 4 KiB of pending ops many times over.
        while statements < 400 || spill_files(dir.path()).is_empty() {
            let sql = statement(&mut rng, &mut ids, &mut next_id);
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{sql}"));
            statements += 1;
            if statements % 100 == 0 && statements >= 400 {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            assert!(
                statements < 20_000,
                "walsweep never spilled the open transaction"
            );
        }
        // The same keys written again after some of their ops went to disk: last write wins.
        for id in ids.iter().take(50).copied().collect::<Vec<_>>() {
            client
                .batch_execute(&format!(
                    "UPDATE items SET qty = qty + 1000, name = 'last {round}' WHERE id = {id}"
                ))
                .await
                .expect("update after the spill");
        }
        client.batch_execute("COMMIT").await.expect("COMMIT");
        caught_up(&client, &mut conn, round).await;
        compared += assert_mirrors_equal_table(&client, &mut conn).await;
        wait_no_spill_files(dir.path()).await;
    }
    // Guards against a workload that would compare nothing (a TRUNCATE can come late).
    assert!(compared > 100, "only {compared} rows compared");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_spilled_transaction_leaves_no_file_and_no_effect() {
    let SpillRun {
        pg: _pg,
        _redis,
        mut conn,
        dir,
        daemon,
        client,
    } = spill_run("mirror_spill_abort", |_| {}).await;
    let insert = |from: i32, to: i32| {
        format!(
            "INSERT INTO items (id, name, body) SELECT g, 'row ' || g, repeat('x', 100) \
             FROM generate_series({from}, {to}) g"
        )
    };

    // The whole transaction rolls back after walsweep spilled part of it.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    client
        .batch_execute(&insert(1, 3000))
        .await
        .expect("insert");
    wait_spilled(dir.path()).await;
    client.batch_execute("ROLLBACK").await.expect("ROLLBACK");
    wait_no_spill_files(dir.path()).await;
    caught_up(&client, &mut conn, 1).await;
    assert_eq!(keys(&mut conn, "item:*").await, BTreeSet::new());

    // A subtransaction rolls back after spilling; the rest of the transaction commits.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    client.batch_execute(&insert(1, 10)).await.expect("insert");
    client
        .batch_execute("SAVEPOINT s")
        .await
        .expect("SAVEPOINT");
    client
        .batch_execute(&insert(100, 3100))
        .await
        .expect("insert");
    wait_spilled(dir.path()).await;
    client
        .batch_execute("ROLLBACK TO s")
        .await
        .expect("ROLLBACK TO");
    client
        .batch_execute(&insert(5000, 5002))
        .await
        .expect("insert");
    client.batch_execute("COMMIT").await.expect("COMMIT");
    caught_up(&client, &mut conn, 2).await;
    assert_eq!(assert_mirrors_equal_table(&client, &mut conn).await, 13);
    wait_no_spill_files(dir.path()).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spill_dir_that_cannot_take_files_stops_walsweep_naming_the_setting() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let dir = tempfile::tempdir().expect("temp dir");
    // Root writes into any directory whatever its mode, but never into a plain file.
    let not_a_dir = dir.path().join("not-a-directory");
    std::fs::write(&not_a_dir, b"").expect("plain file");
    let daemon = start(config(
        &pg,
        &redis,
        "app",
        "mirror_spill_dir",
        &spilling(&not_a_dir),
    ));
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), daemon.task)
        .await
        .expect("walsweep stops at once")
        .expect("no panic");
    let err = walsweep::telemetry::log::display_chain(&ended.expect_err("a start-up error"));
    assert!(
        err.contains(&format!("mirror.spill_dir {}", not_a_dir.display())),
        "{err}"
    );
    assert!(err.contains("spill_after_bytes = 0"), "{err}");
}
