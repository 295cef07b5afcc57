//! walsweep against a real Redis Cluster (3 primaries + 3 replicas, `support::RedisCluster`):
//! rules (keys, dependency sets, scopes, table-wide fallbacks, hints) and mirrors with indexes
//! land on whichever node serves each key; resharding and a primary's failover during a write
//! load miss no invalidation and leave the mirrors equal to `SELECT`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use redis::AsyncCommands;

use support::daemon::{exists, start, wait_for, wait_gone, wait_streaming, Daemon};
use support::redis_cluster::MigrationPace;
use support::rng::Lcg;
use support::{Postgres, RedisCluster};

const SCHEMA: &str = "
CREATE TABLE articles (id int PRIMARY KEY, slug text, category text, published bool);
ALTER TABLE articles REPLICA IDENTITY FULL;
CREATE TABLE items (id int PRIMARY KEY, name text, qty int, body text);
CREATE TABLE markers (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE articles, items, markers;
";

const RULES: &str = r#"
[[table]]
name = "public.articles"
keys = ["article:{id}", "article:slug:{slug}"]
deps = ["id:article:{id}"]
columns = ["slug", "category", "published"]
[[table.scope]]
name = "Article"
columns = ["published", "category"]
[[table]]
name = "public.items"
keys = ["itemkey:{id}"]
deps = ["id:item:{id}"]
[[table.mirror]]
key = "item:{id}"
[[table.mirror.index]]
key = "items:by_qty"
member = "{id}"
score = "qty"
[[table.mirror]]
key = "itemh:{id}"
format = "hash"
columns = ["id", "name", "qty", "body"]
[[table]]
name = "public.markers"
[[table.mirror]]
key = "marker:{id}"
"#;

/// The config text for walsweep on `cluster` (seed URLs of all six nodes); `redis_extra` goes
/// into `[redis]`, and may open further sections after it.
fn config_text(pg: &Postgres, cluster: &RedisCluster, slot: &str, redis_extra: &str) -> String {
    let nodes: Vec<String> = cluster
        .seed_urls()
        .iter()
        .map(|u| format!("{u:?}"))
        .collect();
    format!(
        "[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"pub\"\nstatus_interval_ms = 200\n\
         reconnect_min_ms = 50\nreconnect_max_ms = 500\nwarm_up = true\n[redis]\ncluster_nodes = [{}]\n\
         timeout_ms = 2000\n{redis_extra}\n{RULES}",
        pg.url("app"),
        nodes.join(", ")
    )
}

fn config(
    pg: &Postgres,
    cluster: &RedisCluster,
    slot: &str,
    redis_extra: &str,
) -> walsweep::config::Config {
    let text = config_text(pg, cluster, slot, redis_extra);
    walsweep::config::Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// `walsweep verify` (the real binary) on the cluster walsweep streams into: exit code, output.
async fn verify(f: &Fixture, slot: &str) -> (Option<i32>, String) {
    cli(f, slot, &["verify"]).await
}

/// A `walsweep` command (the real binary) with `--config` for the cluster walsweep streams into.
async fn cli(f: &Fixture, slot: &str, args: &[&str]) -> (Option<i32>, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("walsweep.toml");
    std::fs::write(
        &path,
        format!(
            "[metrics]\nlisten = \"\"\n{}",
            config_text(&f.pg, &f.cluster, slot, "")
        ),
    )
    .expect("write config");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_walsweep"))
            .args(&args)
            .arg("--config")
            .arg(&path)
            .env_remove(walsweep::config::REDIS_URL_ENV)
            .env_remove(walsweep::config::REDIS_CLUSTER_NODES_ENV)
            .env_remove(walsweep::config::SOURCE_URL_ENV)
            .output()
            .expect("run walsweep verify")
    })
    .await
    .expect("verify ran");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

struct Fixture {
    pg: Postgres,
    cluster: RedisCluster,
    conn: ClusterConnection,
    client: tokio_postgres::Client,
    daemon: Option<Daemon>,
    markers: i32,
}

impl Fixture {
    async fn new(slot: &str, redis_extra: &str) -> Fixture {
        support::init_tracing();
        let pg = Postgres::start();
        pg.create_database("app");
        pg.psql("app", SCHEMA);
        let cluster = RedisCluster::start();
        let conn = cluster.connection().await;
        let daemon = start(config(&pg, &cluster, slot, redis_extra));
        let client = pg.client("app").await;
        wait_streaming(&client, slot).await;
        Fixture {
            pg,
            cluster,
            conn,
            client,
            daemon: Some(daemon),
            markers: 0,
        }
    }

    /// Commits a marker row and waits until walsweep mirrored it: every earlier commit has
    /// been applied by then (commit order).
    async fn caught_up(&mut self) {
        self.markers += 1;
        let key = format!("marker:{}", self.markers);
        self.client
            .execute("INSERT INTO markers VALUES ($1)", &[&self.markers])
            .await
            .expect("marker");
        let conn = self.conn.clone();
        wait_for(60, || {
            let key = key.clone();
            let mut c = conn.clone();
            async move {
                match c.exists::<_, bool>(&key).await {
                    Ok(found) => found,
                    Err(e) => {
                        eprintln!("EXISTS {key}: {e}");
                        false
                    }
                }
            }
        })
        .await;
    }

    async fn set(&mut self, keys: &[String]) {
        for k in keys {
            let _: () = self.conn.set(k, "cached").await.expect("SET");
        }
    }

    /// matroska-cache's `put` as a cluster app does it: SADD to each dependency set (each on
    /// its own node), then SETEX the data.
    async fn matroska_put(&mut self, key: &str, deps: &[&str]) {
        let data_key = format!("cache::data::{key}");
        for d in deps {
            let _: () = self
                .conn
                .sadd(format!("cache::rdep::{d}"), &data_key)
                .await
                .expect("SADD");
        }
        let _: () = self.conn.set_ex(&data_key, "s1", 600).await.expect("SETEX");
    }

    async fn present(&mut self, keys: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for k in keys {
            if exists(&mut self.conn, k).await {
                out.push(k.clone());
            }
        }
        out
    }
}

/// Keys of `n` articles, spread over the cluster's slots (so over all three primaries).
fn article_keys(n: i32) -> Vec<String> {
    (1..=n)
        .flat_map(|id| [format!("article:{id}"), format!("article:slug:s{id}")])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_remove_keys_sets_scopes_and_table_wide_on_every_primary() {
    let mut f = Fixture::new("cluster_rules", "").await;
    f.pg.psql(
        "app",
        "INSERT INTO articles SELECT g, 's' || g, CASE WHEN g % 2 = 0 THEN 'x' ELSE 'y' END, true \
         FROM generate_series(1, 60) g",
    );
    f.caught_up().await;
    let keys = article_keys(60);
    f.set(&keys).await;
    let primaries: BTreeSet<u16> = keys
        .iter()
        .map(|k| f.cluster.owner_of_slot(f.cluster.slot_of(k)).port)
        .collect();
    assert_eq!(primaries.len(), 3, "the keys span every primary");
    f.matroska_put("one", &["id:article:1"]).await;
    f.matroska_put("seven", &["id:article:7"]).await;
    f.matroska_put(
        "list-x",
        &[
            "condition:Article:&category=x&published=True&",
            "condition:Article::InvalidateAll",
        ],
    )
    .await;
    f.matroska_put(
        "list-y",
        &[
            "condition:Article:&category=y&published=True&",
            "condition:Article::InvalidateAll",
        ],
    )
    .await;
    f.set(&["unrelated".to_string()]).await;

    // A key change, a dependency, a scope: exactly their entries go.
    f.pg.psql("app", "UPDATE articles SET slug = 'moved' WHERE id = 1");
    f.caught_up().await;
    let gone = f
        .present(&[
            "article:1".into(),
            "article:slug:s1".into(),
            "cache::data::one".into(),
            "cache::data::list-y".into(),
        ])
        .await;
    assert_eq!(
        gone,
        vec!["cache::data::list-y".to_string()],
        "row 1 (category y) removed"
    );
    assert!(
        f.present(&[
            "article:2".into(),
            "cache::data::seven".into(),
            "cache::data::list-x".into(),
            "unrelated".into()
        ])
        .await
        .len()
            == 4,
        "other rows' entries stay"
    );
    f.pg.psql("app", "UPDATE articles SET published = false WHERE id = 7");
    f.caught_up().await;
    let left = f
        .present(&[
            "cache::data::seven".into(),
            "cache::data::list-y".into(),
            "cache::data::list-x".into(),
        ])
        .await;
    assert_eq!(
        left,
        vec!["cache::data::list-x".to_string()],
        "row 7's entries and scope y removed"
    );

    // A hint names keys and a dependency on any node.
    f.set(&["hinted:1".into(), "hinted:2".into()]).await;
    f.matroska_put("tagged", &["tag:hop"]).await;
    f.pg.psql(
        "app",
        "BEGIN; SELECT pg_logical_emit_message(true, 'walsweep', \
         '{\"keys\": [\"hinted:1\", \"hinted:2\"], \"deps\": [\"tag:hop\"]}'); \
         INSERT INTO markers VALUES (1000); COMMIT;",
    );
    f.caught_up().await;
    assert!(
        f.present(&[
            "hinted:1".into(),
            "hinted:2".into(),
            "cache::data::tagged".into()
        ])
        .await
        .is_empty(),
        "hinted keys and dependency removed"
    );

    // TRUNCATE: every article key on every primary, and the scopes' InvalidateAll.
    f.set(&keys).await;
    f.matroska_put("list-all", &["condition:Article::InvalidateAll"])
        .await;
    f.pg.psql("app", "TRUNCATE articles");
    f.caught_up().await;
    let mut left = f.present(&keys).await;
    left.extend(f.present(&["cache::data::list-all".into()]).await);
    assert!(left.is_empty(), "table-wide invalidation left {left:?}");
    assert!(
        f.present(&["unrelated".into()]).await.len() == 1,
        "unrelated key stays"
    );
    // All of it went through invalidate_node.lua: one EVAL per primary and batch (nothing
    // else walsweep sends is an EVAL: its other scripts go by EVALSHA).
    assert!(
        f.cluster.command_calls("eval") > 0,
        "invalidations took the per-node script"
    );
    f.daemon.take().expect("daemon").stop().await;
}

/// A transaction naming more keys and sets than one `invalidate_node.lua` call takes is
/// invalidated in several calls per primary, every key on its own node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_transaction_is_invalidated_in_several_calls_per_primary() {
    let mut f = Fixture::new("cluster_big_txn", "").await;
    const ROWS: i32 = 6_000;
    f.pg.psql(
        "app",
        &format!(
            "INSERT INTO articles SELECT g, 's' || g, 'x', true FROM generate_series(1, {ROWS}) g"
        ),
    );
    f.caught_up().await;
    // Every key is named by the DELETE; one in ten is cached, enough to see them all go
    // without a burst of 12 000 writes starving the tests running beside this one.
    let keys: Vec<String> = article_keys(ROWS).into_iter().step_by(10).collect();
    futures_util::future::join_all(keys.chunks(300).map(|chunk| {
        let mut conn = f.conn.clone();
        async move {
            for k in chunk {
                let _: () = conn.set(k, "cached").await.expect("SET");
            }
        }
    }))
    .await;
    f.matroska_put("first", &["id:article:1"]).await;
    f.matroska_put("last", &[&format!("id:article:{ROWS}")])
        .await;
    let evals_before = f.cluster.command_calls("eval");
    // One transaction: 12 000 keys, 6 000 dependency sets and a scope, about 6 000 per primary.
    f.pg.psql("app", "DELETE FROM articles");
    f.caught_up().await;
    let calls = f.cluster.command_calls("eval") - evals_before;
    assert!(
        calls >= 6,
        "at least two calls per primary for ~6 000 items each, got {calls}"
    );
    let mut left = Vec::new();
    for chunk in keys.chunks(2_000) {
        left.extend(f.present(chunk).await);
    }
    left.extend(
        f.present(&["cache::data::first".into(), "cache::data::last".into()])
            .await,
    );
    assert!(
        left.is_empty(),
        "{} keys left, e.g. {:?}",
        left.len(),
        left.first()
    );
    f.daemon.take().expect("daemon").stop().await;
}

/// A cluster that refuses walsweep's per-node script (here an ACL without EVAL; a Redis before
/// 7.0, which knows no script flags, likewise) is still invalidated, one command per hash slot,
/// and walsweep stops asking after the first refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_refusing_the_node_script_is_invalidated_slot_by_slot() {
    let mut f = Fixture::new("cluster_no_eval", "").await;
    f.cluster
        .on_every_node(redis::cmd("ACL").arg("SETUSER").arg("default").arg("-eval"));
    let refused_before = f.cluster.error_stats().get("NOPERM").copied().unwrap_or(0);
    for round in 0..3 {
        let first = round * 20 + 1;
        f.pg.psql(
            "app",
            &format!(
                "INSERT INTO articles SELECT g, 's' || g, 'x', true \
                 FROM generate_series({first}, {}) g",
                first + 19
            ),
        );
        f.caught_up().await;
        let keys: Vec<String> = article_keys(first + 19)
            .into_iter()
            .skip(2 * (first as usize - 1))
            .collect();
        f.set(&keys).await;
        f.matroska_put(&format!("row{first}"), &[&format!("id:article:{first}")])
            .await;
        f.matroska_put(
            &format!("list{round}"),
            &["condition:Article:&category=x&published=True&"],
        )
        .await;
        f.pg.psql(
            "app",
            &format!(
                "DELETE FROM articles WHERE id BETWEEN {first} AND {}",
                first + 19
            ),
        );
        f.caught_up().await;
        let mut left = f.present(&keys).await;
        left.extend(
            f.present(&[
                format!("cache::data::row{first}"),
                format!("cache::data::list{round}"),
            ])
            .await,
        );
        assert!(left.is_empty(), "round {round} left {left:?}");
    }
    let refused = f.cluster.error_stats().get("NOPERM").copied().unwrap_or(0) - refused_before;
    assert!(
        (1..=3).contains(&refused),
        "the script is refused at most once per primary, then not asked for again: {refused}"
    );
    assert_eq!(f.cluster.command_calls("eval"), 0, "no EVAL ran");
    f.daemon.take().expect("daemon").stop().await;
}

/// Every row as the JSON mirror must hold it.
async fn assert_mirrors_equal_select(f: &mut Fixture) -> usize {
    let rows = f
        .client
        .query("SELECT id, name, qty, body FROM items ORDER BY id", &[])
        .await
        .expect("select items");
    let want_keys: BTreeSet<String> = rows
        .iter()
        .map(|r| format!("item:{}", r.get::<_, i32>(0)))
        .collect();
    let got_keys: BTreeSet<String> = f.cluster.keys_everywhere("item:*").into_iter().collect();
    assert_eq!(got_keys, want_keys, "JSON mirror keys");
    let got_hash: BTreeSet<String> = f.cluster.keys_everywhere("itemh:*").into_iter().collect();
    let want_hash: BTreeSet<String> = rows
        .iter()
        .map(|r| format!("itemh:{}", r.get::<_, i32>(0)))
        .collect();
    assert_eq!(got_hash, want_hash, "hash mirror keys");
    let mut want_index = Vec::new();
    for row in &rows {
        let (id, name, qty, body): (i32, Option<String>, i32, Option<String>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let stored: String = f.conn.get(format!("item:{id}")).await.expect("GET");
        let json: serde_json::Value = serde_json::from_str(&stored).expect("JSON");
        let want = serde_json::json!({"id": id, "name": name, "qty": qty, "body": body});
        assert_eq!(json, want, "JSON mirror of row {id}");
        let hash: BTreeMap<String, String> = f
            .conn
            .hgetall(format!("itemh:{id}"))
            .await
            .expect("HGETALL");
        let mut want_hash = BTreeMap::from([
            ("id".to_string(), id.to_string()),
            ("qty".to_string(), qty.to_string()),
        ]);
        if let Some(n) = name {
            want_hash.insert("name".into(), n);
        }
        if let Some(b) = body {
            want_hash.insert("body".into(), b);
        }
        assert_eq!(hash, want_hash, "hash mirror of row {id}");
        want_index.push((id.to_string(), qty as f64));
    }
    let mut index: Vec<(String, f64)> = f
        .conn
        .zrange_withscores("items:by_qty", 0, -1)
        .await
        .expect("ZRANGE");
    index.sort_by(|a, b| a.0.cmp(&b.0));
    want_index.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(index, want_index, "index members and scores");
    rows.len()
}

/// One random statement against `items`; `ids` tracks which ids exist.
fn statement(rng: &mut Lcg, ids: &mut BTreeSet<i32>, next_id: &mut i32) -> String {
    let roll = rng.below(100);
    let value = rng.below(1_000);
    match (roll, rng.pick(ids.iter().copied())) {
        (0..=44, _) | (_, None) => {
            *next_id += 1;
            let id = *next_id;
            ids.insert(id);
            // Every fifth body is large and random enough to be TOASTed out of line.
            let body = if id % 5 == 0 {
                "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 300))"
                    .to_string()
            } else {
                format!("'body {value}'")
            };
            let name = if value.is_multiple_of(9) {
                "NULL".to_string()
            } else {
                format!("'n{value}'")
            };
            format!("INSERT INTO items VALUES ({id}, {name}, {value}, {body})")
        }
        // TOASTed bodies arrive as "unchanged": merged where the row lives.
        (45..=69, Some(id)) => {
            format!("UPDATE items SET qty = qty + 1, name = 'r{value}' WHERE id = {id}")
        }
        (70..=79, Some(id)) => {
            // The key changes, usually to another slot: the row moves, body included.
            *next_id += 1;
            let new = *next_id;
            ids.remove(&id);
            ids.insert(new);
            format!("UPDATE items SET id = {new}, qty = {value} WHERE id = {id}")
        }
        (80..=97, Some(id)) => {
            ids.remove(&id);
            format!("DELETE FROM items WHERE id = {id}")
        }
        (_, Some(id)) => {
            ids.remove(&id);
            format!("DELETE FROM items WHERE id = {id}")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_equal_select_after_a_random_workload() {
    let mut f = Fixture::new("cluster_mirror", "").await;
    let mut rng = Lcg(0xC1);
    let (mut ids, mut next_id) = (BTreeSet::new(), 0);
    for round in 0..6 {
        let mut sql = String::from("BEGIN;\n");
        if round == 2 {
            // A table-wide clear of the mirrors on every primary, between changes.
            sql.push_str("TRUNCATE items;\n");
            ids.clear();
        }
        for _ in 0..(50 + round * 30) {
            sql.push_str(&statement(&mut rng, &mut ids, &mut next_id));
            sql.push_str(";\n");
            if rng.below(10) == 0 {
                sql.push_str("COMMIT;\nBEGIN;\n");
            }
        }
        sql.push_str("COMMIT;\n");
        f.pg.psql("app", &sql);
    }
    f.caught_up().await;
    let rows = assert_mirrors_equal_select(&mut f).await;
    eprintln!("cluster mirror: {rows} rows equal SELECT");
    assert!(rows > 20, "the workload left rows to compare ({rows})");
    // walsweep verify reads entries per slot and SCANs every primary.
    let (code, out) = verify(&f, "cluster_mirror").await;
    assert_eq!(code, Some(0), "verify on a clean cluster:\n{out}");
    let victim: i32 = f
        .client
        .query_one("SELECT max(id) FROM items", &[])
        .await
        .expect("max id")
        .get(0);
    let _: () = f
        .conn
        .set(format!("item:{victim}"), "{\"id\": -1}")
        .await
        .expect("corrupt an entry");
    let (code, out) = verify(&f, "cluster_mirror").await;
    assert_eq!(code, Some(1), "verify finds the corrupted entry:\n{out}");
    assert!(out.contains(&format!("item:{victim}")), "{out}");
    f.daemon.take().expect("daemon").stop().await;
}

/// The app's write loop: cache the row's key, then update the row; walsweep must remove the
/// key after each commit. Runs until `stop`; returns how many updates committed.
async fn write_load(
    client: tokio_postgres::Client,
    mut conn: ClusterConnection,
    rows: i32,
    stop: Arc<AtomicBool>,
) -> usize {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let id = (n as i32 % rows) + 1;
        // The cache write can fail while its node fails over: the app would skip caching.
        let _: Result<(), _> = conn.set(format!("itemkey:{id}"), "cached").await;
        client
            .execute(
                "UPDATE items SET qty = qty + 1, name = $2 WHERE id = $1",
                &[&id, &format!("v{n}")],
            )
            .await
            .expect("UPDATE");
        n += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    n
}

/// Every row changed by the load has no cached key left (a key left behind is a missed
/// invalidation), and the mirrors equal SELECT.
async fn assert_nothing_missed(f: &mut Fixture, rows: i32) {
    tokio::time::sleep(Duration::from_secs(3)).await;
    if f.daemon.as_ref().expect("daemon").task.is_finished() {
        let result = f.daemon.take().expect("daemon").task.await;
        panic!("walsweep ended: {result:?}");
    }
    f.caught_up().await;
    let mut missed = Vec::new();
    for id in 1..=rows {
        if exists(&mut f.conn, &format!("itemkey:{id}")).await {
            missed.push(id);
        }
    }
    assert!(
        missed.is_empty(),
        "missed invalidations for rows {missed:?}"
    );
    assert_mirrors_equal_select(f).await;
}

async fn seed_items(f: &mut Fixture, rows: i32) {
    f.pg.psql(
        "app",
        &format!("INSERT INTO items SELECT g, 'v0', 0, 'b' || g FROM generate_series(1, {rows}) g"),
    );
    f.caught_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_during_a_write_load_misses_nothing() {
    let mut f = Fixture::new("cluster_reshard", "").await;
    let rows = 200;
    seed_items(&mut f, rows).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(write_load(
        f.pg.client("app").await,
        f.cluster.connection().await,
        rows,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Move the slots of the first 40 rows' keys, mirror entries and the index, slowly, to
    // another primary each time: walsweep meets ASK while keys are in flight, MOVED after.
    let mut moved_keys = 0;
    for round in 0..2 {
        let mut slots: BTreeSet<u16> = (1..=40)
            .flat_map(|id| {
                [
                    format!("itemkey:{id}"),
                    format!("item:{id}"),
                    format!("itemh:{id}"),
                ]
            })
            .map(|k| f.cluster.slot_of(&k))
            .collect();
        slots.insert(f.cluster.slot_of("items:by_qty"));
        let primaries = f.cluster.primaries();
        // Each slot goes to the primary after its owner's, so every primary gives and takes.
        let cluster = &f.cluster;
        let mut by_target: BTreeMap<u16, Vec<u16>> = BTreeMap::new();
        for slot in slots {
            let owner = cluster.owner_of_slot(slot).port;
            let at = primaries
                .iter()
                .position(|p| p.port == owner)
                .expect("owner is a primary");
            let to = primaries[(at + 1 + round) % primaries.len()].port;
            if to != owner {
                by_target.entry(to).or_default().push(slot);
            }
        }
        for (to, slots) in by_target {
            moved_keys += tokio::task::block_in_place(|| {
                cluster.migrate_slots_paced(&slots, to, MigrationPace::SLOW)
            });
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let updates = load.await.expect("load");
    eprintln!("resharding: {moved_keys} keys migrated under {updates} updates");
    assert!(
        moved_keys > 0 && updates > 100,
        "the load ran through the migrations"
    );
    assert_nothing_missed(&mut f, rows).await;
    let errors = f.cluster.error_stats();
    eprintln!("cluster error replies: {errors:?}");
    f.daemon.take().expect("daemon").stop().await;
}

/// A batch whose pipeline to one primary meets ASK for one key (a row not yet on the migrating
/// source) after other commands already ran there must not run those again on the importing
/// node: redis-rs re-sends a redirected pipeline whole, with one ASKING in front, which wrote a
/// row that still lived on the source onto the target too (the next MIGRATE of it then failed
/// with BUSYKEY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_meeting_ask_writes_nothing_on_the_importing_node() {
    let mut f = Fixture::new("cluster_ask_pipeline", "").await;
    let rows = 100;
    seed_items(&mut f, rows).await;
    // Row `a` is mirrored on primary P; row `b` (not yet inserted) would be too, in another
    // slot. The transaction below updates `a` first, so P's pipeline starts with `a`'s call.
    let source = f.cluster.primaries()[0].port;
    let on_source = |id: i32| {
        let slot = f.cluster.slot_of(format!("item:{id}"));
        (f.cluster.owner_of_slot(slot).port == source).then_some(slot)
    };
    let (a, slot_a) = (1..=rows)
        .find_map(|id| on_source(id).map(|s| (id, s)))
        .expect("a seeded row on the first primary");
    let (b, slot_b) = (rows + 1..rows + 1000)
        .find_map(|id| on_source(id).filter(|s| *s != slot_a).map(|s| (id, s)))
        .expect("a new row on the first primary");
    let target = f.cluster.primaries()[1].port;
    f.cluster.start_migration(&[slot_a, slot_b], target);
    let asks_before = f.cluster.error_stats().get("ASK").copied().unwrap_or(0);
    f.client
        .batch_execute(&format!(
            "BEGIN; UPDATE items SET qty = 7 WHERE id = {a}; \
             INSERT INTO items VALUES ({b}, 'new', 1, 'x'); COMMIT;"
        ))
        .await
        .expect("update a, insert b");
    // walsweep now retries the batch: `item:{b}` gets ASK on the source until the hand-over.
    let count_on_target = |slot: u16| -> u64 {
        redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(slot)
            .query(&mut f.cluster.node_connection(target))
            .expect("COUNTKEYSINSLOT")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        assert_eq!(
            count_on_target(slot_a),
            0,
            "item:{a} was written on the importing node while it still lives on the source"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asks = f.cluster.error_stats().get("ASK").copied().unwrap_or(0) - asks_before;
    assert!(
        asks > 0,
        "walsweep met ASK for item:{b} during the migration"
    );
    // Finishing the migration MIGRATEs item:{a}: it fails with BUSYKEY if the target has it.
    let moved = tokio::task::block_in_place(|| {
        f.cluster
            .migrate_slots_paced(&[slot_a, slot_b], target, MigrationPace::FAST)
    });
    assert!(moved >= 1, "item:{a} moved to the target");
    f.caught_up().await;
    assert_mirrors_equal_select(&mut f).await;
    f.daemon.take().expect("daemon").stop().await;
}

/// A key or a dependency set already moved out of a slot still migrating is invalidated where
/// it now lives, without waiting for the migration to end (a resharding can take minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_moved_out_of_a_migrating_slot_are_invalidated_before_it_ends() {
    let mut f = Fixture::new("cluster_moving_keys", "").await;
    f.pg.psql(
        "app",
        "INSERT INTO articles SELECT g, 's' || g, 'x', true FROM generate_series(1, 200) g",
    );
    f.caught_up().await;
    // An article whose key and dependency set both live on the first primary, in two slots.
    let source = f.cluster.primaries()[0].port;
    let target = f.cluster.primaries()[1].port;
    let on_source = |key: &str| {
        let slot = f.cluster.slot_of(key);
        (f.cluster.owner_of_slot(slot).port == source).then_some(slot)
    };
    let (id, key, set, slots) = (1..=200)
        .find_map(|id| {
            let key = format!("article:{id}");
            let set = format!("cache::rdep::id:article:{id}");
            match (on_source(&key), on_source(&set)) {
                (Some(a), Some(b)) if a != b => Some((id, key, set, [a, b])),
                _ => None,
            }
        })
        .expect("an article with key and set on the first primary");
    f.set(std::slice::from_ref(&key)).await;
    f.matroska_put("row", &[&format!("id:article:{id}")]).await;
    // Both slots in flight to the target, and both keys already moved there by hand.
    f.cluster.start_migration(&slots, target);
    let mut source_conn = f.cluster.node_connection(source);
    for k in [&key, &set] {
        let reply: String = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(target)
            .arg(k)
            .arg(0)
            .arg(5000)
            .query(&mut source_conn)
            .unwrap_or_else(|e| panic!("MIGRATE {k}: {e}"));
        assert_eq!(reply, "OK", "MIGRATE {k}");
    }
    let on_target = |cluster: &RedisCluster, k: &str| -> bool {
        let (_, found): ((), bool) = redis::pipe()
            .cmd("ASKING")
            .cmd("EXISTS")
            .arg(k)
            .query(&mut cluster.node_connection(target))
            .expect("ASKING EXISTS on the target");
        found
    };
    assert!(
        on_target(&f.cluster, &key) && on_target(&f.cluster, &set),
        "both keys moved"
    );

    f.pg.psql("app", &format!("DELETE FROM articles WHERE id = {id}"));
    // The marker's batch is the delete's or a later one: it lands only once the delete applied.
    f.caught_up().await;
    assert!(
        !on_target(&f.cluster, &key),
        "{key} unlinked on the importing node"
    );
    assert!(
        f.present(&["cache::data::row".into()]).await.is_empty(),
        "the dependency set, read on the importing node, had its entry unlinked"
    );
    for slot in slots {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut f.cluster.node_connection(source))
            .expect("CLUSTER NODES");
        assert!(
            nodes.contains(&format!("[{slot}->-")),
            "slot {slot} still migrating when walsweep had caught up: {nodes}"
        );
    }
    let _ = tokio::task::block_in_place(|| {
        f.cluster
            .migrate_slots_paced(&slots, target, MigrationPace::FAST)
    });
    f.daemon.take().expect("daemon").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_during_a_write_load_misses_nothing() {
    // Without WAIT a primary can die with acknowledged unlinks its replica never got.
    let mut f = Fixture::new("cluster_failover", "wait_for_replicas = 1").await;
    let rows = 200;
    seed_items(&mut f, rows).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(write_load(
        f.pg.client("app").await,
        f.cluster.connection().await,
        rows,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = f
        .cluster
        .owner_of_slot(f.cluster.slot_of("items:by_qty"))
        .port;
    f.cluster.kill_primary(victim);
    let promoted = tokio::task::block_in_place(|| f.cluster.wait_for_failover(victim));
    // Until the dead node is back as the new primary's replica, its shard has no replica to
    // acknowledge: walsweep holds the slot position meanwhile (what wait_for_replicas means).
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| f.cluster.restart_node(victim));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let updates = load.await.expect("load");
    eprintln!("failover: {victim} -> {promoted} under {updates} updates");
    assert_nothing_missed(&mut f, rows).await;
    f.daemon.take().expect("daemon").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_row_key_is_gone_on_its_node() {
    // The smallest end-to-end check first: one key, one node, through the daemon.
    let mut f = Fixture::new("cluster_smoke", "").await;
    seed_items(&mut f, 3).await;
    f.set(&["itemkey:2".into()]).await;
    f.pg.psql("app", "DELETE FROM items WHERE id = 2");
    // Invalidations go before the batch's mirror writes: the key can go a moment before the
    // mirrored rows do.
    for key in ["itemkey:2", "item:2", "itemh:2"] {
        wait_gone(&mut f.conn, key, 20).await;
    }
    f.daemon.take().expect("daemon").stop().await;
}

/// The app's reads through `tests/compat/cluster_app.py` (redis-py-cluster): per id, the name
/// it got and whether both of its cache entries were hits.
fn app_reads(f: &Fixture, ids: &[i32]) -> Vec<(i32, String, bool)> {
    let seed = f.cluster.seed_urls()[0]
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let out = std::process::Command::new(support::binaries::python("the cluster app"))
        .arg(support::binaries::repo().join("tests/compat/cluster_app.py"))
        .arg(seed)
        .arg(f.pg.url("app"))
        .args(ids.iter().map(i32::to_string))
        .output()
        .expect("run cluster_app.py");
    assert!(
        out.status.success(),
        "cluster_app.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reads: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("app JSON");
    reads
        .iter()
        .map(|r| {
            let name = r["name"].as_str().expect("name").to_string();
            assert_eq!(
                r["entry_name"].as_str(),
                Some(name.as_str()),
                "both entries agree: {r}"
            );
            let hit = r["hit"].as_bool().expect("hit") && r["entry_hit"].as_bool().expect("hit");
            (r["id"].as_i64().expect("id") as i32, name, hit)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_app_never_reads_a_stale_row_after_walsweep_caught_up() {
    let mut f = Fixture::new("cluster_app", "").await;
    seed_items(&mut f, 40).await;
    let ids: Vec<i32> = (1..=40).collect();
    let first = app_reads(&f, &ids);
    assert!(
        first.iter().all(|(_, name, hit)| !hit && name == "v0"),
        "cold cache: {first:?}"
    );
    let second = app_reads(&f, &ids);
    assert!(
        second.iter().all(|(_, _, hit)| *hit),
        "warm cache: {second:?}"
    );
    for round in 1..=3 {
        f.pg.psql(
            "app",
            &format!(
                "UPDATE items SET name = 'r{round}-' || id WHERE id % 3 = {}",
                round % 3
            ),
        );
        f.caught_up().await;
        let rows = f
            .client
            .query("SELECT id, name FROM items ORDER BY id", &[])
            .await
            .expect("select");
        let want: BTreeMap<i32, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut stale = Vec::new();
        for (id, name, hit) in app_reads(&f, &ids) {
            if want[&id] != name {
                stale.push((id, name, hit));
            }
        }
        assert!(stale.is_empty(), "round {round}: stale reads {stale:?}");
    }
    f.daemon.take().expect("daemon").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_the_applied_position_and_the_second_pass_work_on_a_cluster() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    pg.psql(
        "app",
        "INSERT INTO items SELECT g, 'w' || g, g, 'b' FROM generate_series(1, 50) g",
    );
    let cluster = RedisCluster::start();
    let slot = "cluster_extras";
    let daemon = start(config(
        &pg,
        &cluster,
        slot,
        "[matroska]\nreinvalidate_after_ms = 300",
    ));
    let client = pg.client("app").await;
    wait_streaming(&client, slot).await;
    let conn = cluster.connection().await;
    let mut f = Fixture {
        pg,
        cluster,
        conn,
        client,
        daemon: Some(daemon),
        markers: 0,
    };
    f.caught_up().await;
    assert_eq!(
        assert_mirrors_equal_select(&mut f).await,
        50,
        "warm-up loaded every row"
    );

    // The published position passes the commit, on whichever node holds it.
    f.pg.psql("app", "UPDATE items SET name = 'x' WHERE id = 3");
    let lsn = support::daemon::insert_lsn(&f.client).await;
    let key = format!("walsweep:app/{slot}:applied");
    let conn = f.conn.clone();
    wait_for(20, || {
        let (key, mut c) = (key.clone(), conn.clone());
        async move {
            let at: Option<String> = c.get(&key).await.expect("GET position");
            at.and_then(|a| a.parse::<u64>().ok())
                .is_some_and(|a| a >= lsn)
        }
    })
    .await;

    // `walsweep wait` hears the position on a seed node (Pub/Sub reaches every node).
    f.pg.psql("app", "UPDATE items SET name = 'z' WHERE id = 4");
    let lsn = support::daemon::insert_lsn(&f.client).await.to_string();
    let (code, out) = cli(&f, slot, &["wait", "--lsn", &lsn, "--timeout-ms", "10000"]).await;
    assert_eq!(code, Some(0), "walsweep wait on a cluster:\n{out}");

    // An entry refilled with the old row right after the first pass is removed by the second.
    f.set(&["itemkey:7".into()]).await;
    f.pg.psql("app", "UPDATE items SET name = 'y' WHERE id = 7");
    wait_gone(&mut f.conn, "itemkey:7", 20).await;
    f.set(&["itemkey:7".into()]).await;
    wait_gone(&mut f.conn, "itemkey:7", 5).await;
    f.daemon.take().expect("daemon").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_primaries_and_which_templates_pin_a_slot() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let cluster = RedisCluster::start();
    let nodes: Vec<String> = cluster
        .seed_urls()
        .iter()
        .map(|u| format!("{u:?}"))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("walsweep.toml");
    let write = |extra: &str| {
        std::fs::write(
            &path,
            format!(
                "[source]\nurl = \"{}\"\npublication = \"pub\"\n[redis]\ncluster_nodes = [{}]\n{extra}\n\
                 [[table]]\nname = \"public.articles\"\nkeys = [\"article:{{id}}\", \"{{{{articles}}}}:{{slug}}\"]\n",
                pg.url("app"),
                nodes.join(", ")
            ),
        )
        .expect("write config");
    };
    let check = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_walsweep"))
            .args(["check", "--config"])
            .arg(&path)
            .env_remove(walsweep::config::REDIS_URL_ENV)
            .env_remove(walsweep::config::REDIS_CLUSTER_NODES_ENV)
            .output()
            .expect("run walsweep check");
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    write("");
    let (_, text) = check();
    let primaries: Vec<String> = cluster
        .primaries()
        .iter()
        .map(|p| format!("127.0.0.1:{}", p.port))
        .collect();
    assert!(text.contains("Redis Cluster with 3 primaries"), "{text}");
    assert!(
        text.contains("every primary runs invalidate_node.lua"),
        "{text}"
    );
    for p in &primaries {
        assert!(text.contains(p.as_str()), "primary {p} named: {text}");
    }
    assert!(
        text.contains("\"article:{id}\" of public.articles: no hash tag"),
        "{text}"
    );
    assert!(
        text.contains("hash tag {articles}: every key is in one slot"),
        "{text}"
    );
    // Fences need one slot per fill; refused with the fix.
    write("[matroska]\nfences = true");
    let (code, text) = check();
    assert_ne!(code, Some(0), "{text}");
    assert!(
        text.contains("matroska.fences") && text.contains("not supported on a Redis Cluster"),
        "{text}"
    );
    // A cluster whose ACL denies EVAL: said before the daemon would find out.
    cluster.on_every_node(redis::cmd("ACL").arg("SETUSER").arg("default").arg("-eval"));
    write("");
    let (_, text) = check();
    assert!(
        text.contains("refuses walsweep's per-node script") && text.contains("NOPERM"),
        "{text}"
    );
    assert!(
        !text.contains("every primary runs invalidate_node.lua"),
        "{text}"
    );
}
