use std::time::Duration;

use super::{config, exists, matroska_put, set_keys, start, wait_gone};
use crate::stream::harness;
use crate::support::{self, Postgres, Redis};

const SCHEMA: &str = "
CREATE TABLE articles (id int PRIMARY KEY, slug text, title text, category text, published bool, views int);
ALTER TABLE articles REPLICA IDENTITY FULL;
INSERT INTO articles VALUES (1, 'a', 'A', 'x', true, 0), (2, 'b', 'B', 'y', false, 0);
CREATE TABLE markers (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE articles, markers;
";

const RULES: &str = r#"
[[table]]
name = "public.articles"
keys = ["article:{id}", "article:slug:{slug}"]
deps = ["id:article:{id}"]
columns = ["slug", "title", "category", "published"]
[[table.scope]]
name = "Article"
columns = ["published", "category"]
[[table]]
name = "public.markers"
keys = ["marker:{id}"]
"#;

const SCOPE_X: &str = "condition:Article:&category=x&published=True&";
const SCOPE_Y: &str = "condition:Article:&category=y&published=False&";
const SCOPE_Z: &str = "condition:Article:&category=z&published=True&";

struct Fixture {
    pg: Postgres,
    redis: Redis,
    conn: redis::aio::MultiplexedConnection,
    daemon: super::Daemon,
    markers: i32,
}

impl Fixture {
    async fn new(slot: &str) -> Fixture {
        support::init_tracing();
        let pg = Postgres::start();
        pg.create_database("app");
        pg.psql("app", SCHEMA);
        let redis = Redis::start();
        let conn = redis.connection().await;
        let daemon = start(config(&pg, &redis, "app", slot, RULES));
        let client = pg.client("app").await;
        harness::wait_streaming(&client, slot).await;
        Fixture {
            pg,
            redis,
            conn,
            daemon,
            markers: 0,
        }
    }

    /// Fills the cache the way apps do: plain keys and matroska entries with dependencies.
    async fn fill(&mut self) {
        set_keys(
            &mut self.conn,
            &[
                "article:1",
                "article:slug:a",
                "article:2",
                "article:slug:b",
                "unrelated",
            ],
        )
        .await;
        matroska_put(&mut self.conn, "one", &["id:article:1"]).await;
        matroska_put(&mut self.conn, "two", &["id:article:2"]).await;
        matroska_put(
            &mut self.conn,
            "list-x",
            &[SCOPE_X, "condition:Article::InvalidateAll"],
        )
        .await;
        matroska_put(
            &mut self.conn,
            "list-y",
            &[SCOPE_Y, "condition:Article::InvalidateAll"],
        )
        .await;
        matroska_put(
            &mut self.conn,
            "list-z",
            &[SCOPE_Z, "condition:Article::InvalidateAll"],
        )
        .await;
    }

    /// Commits a marker row and waits until walsweep removed its key: every earlier commit has
    /// been applied by then (commit order).
    async fn barrier(&mut self) {
        self.markers += 1;
        let key = format!("marker:{}", self.markers);
        set_keys(&mut self.conn, &[&key]).await;
        self.pg.psql(
            "app",
            &format!("INSERT INTO markers VALUES ({})", self.markers),
        );
        wait_gone(&mut self.conn, &key, 20).await;
    }

    async fn present(&mut self, keys: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for k in keys {
            if exists(&mut self.conn, k).await {
                out.push(k.to_string());
            }
        }
        out
    }
}

const ALL: &[&str] = &[
    "article:1",
    "article:slug:a",
    "article:2",
    "article:slug:b",
    "unrelated",
    "cache::data::one",
    "cache::data::two",
    "cache::data::list-x",
    "cache::data::list-y",
    "cache::data::list-z",
];

fn without(removed: &[&str]) -> Vec<String> {
    ALL.iter()
        .filter(|k| !removed.contains(k))
        .map(|k| k.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_insert_and_delete_remove_exactly_their_entries() {
    let mut f = Fixture::new("rules_crud").await;

    // An UPDATE of a column no rule watches removes nothing.
    f.fill().await;
    f.pg.psql("app", "UPDATE articles SET views = views + 1 WHERE id = 1");
    f.barrier().await;
    assert_eq!(f.present(ALL).await, without(&[]));

    // A watched column changes: keys and the dependency go, scopes stay (scope columns same).
    f.pg.psql("app", "UPDATE articles SET title = 'A2' WHERE id = 1");
    f.barrier().await;
    assert_eq!(
        f.present(ALL).await,
        without(&["article:1", "article:slug:a", "cache::data::one"])
    );

    // A scope column changes: the old and the new scope both go; the slug key moves.
    f.fill().await;
    f.pg.psql(
        "app",
        "UPDATE articles SET category = 'z', slug = 'a2' WHERE id = 1",
    );
    f.barrier().await;
    assert_eq!(
        f.present(ALL).await,
        without(&[
            "article:1",
            "article:slug:a",
            "cache::data::one",
            "cache::data::list-x",
            "cache::data::list-z"
        ])
    );

    // INSERT: the new row's keys and its scope.
    f.fill().await;
    f.pg.psql(
        "app",
        "INSERT INTO articles VALUES (3, 'c', 'C', 'y', false, 0)",
    );
    f.barrier().await;
    assert_eq!(f.present(ALL).await, without(&["cache::data::list-y"]));

    // DELETE: the old row's keys, dependency and scope.
    f.pg.psql("app", "DELETE FROM articles WHERE id = 2");
    f.barrier().await;
    assert_eq!(
        f.present(ALL).await,
        without(&[
            "article:2",
            "article:slug:b",
            "cache::data::two",
            "cache::data::list-y"
        ])
    );

    // Dependency sets are kept by default (matroska's put() may have raced us).
    let mut conn = f.conn.clone();
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("cache::rdep::id:article:2")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members, vec!["cache::data::two".to_string()]);
    f.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_apply_whole_at_commit_and_rollbacks_remove_nothing() {
    let mut f = Fixture::new("rules_txn").await;
    f.fill().await;
    f.pg.psql(
        "app",
        "BEGIN; UPDATE articles SET title = 'gone' WHERE id = 1; DELETE FROM articles WHERE id = 2; ROLLBACK;",
    );
    f.barrier().await;
    assert_eq!(f.present(ALL).await, without(&[]));

    // Several rows in one transaction, plus a hint naming extra keys and a dependency.
    f.pg.psql(
        "app",
        "BEGIN;
         UPDATE articles SET title = title || '!' ;
         SELECT pg_logical_emit_message(true, 'walsweep', '{\"keys\": [\"unrelated\"], \"deps\": [\"condition:Article::InvalidateAll\"]}');
         COMMIT;",
    );
    f.barrier().await;
    assert_eq!(f.present(ALL).await, Vec::<String>::new());

    // A malformed hint is counted and skipped; the transaction still applies.
    f.fill().await;
    f.pg.psql(
        "app",
        "BEGIN; UPDATE articles SET title = 'x' WHERE id = 2;
         SELECT pg_logical_emit_message(true, 'walsweep', 'not json'); COMMIT;",
    );
    f.barrier().await;
    assert_eq!(
        f.present(ALL).await,
        without(&["article:2", "article:slug:b", "cache::data::two"])
    );
    f.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_and_unknown_old_values_invalidate_table_wide() {
    let mut f = Fixture::new("rules_wide").await;
    f.fill().await;
    f.pg.psql("app", "TRUNCATE articles");
    f.barrier().await;
    assert_eq!(f.present(ALL).await, vec!["unrelated".to_string()]);

    // With REPLICA IDENTITY DEFAULT the old slug is unknown on UPDATE: every article:slug:*
    // key goes (and the scope's InvalidateAll), but not keys of other templates' prefixes.
    f.pg.psql(
        "app",
        "INSERT INTO articles VALUES (1, 'a', 'A', 'x', true, 0), (2, 'b', 'B', 'y', false, 0);
         ALTER TABLE articles REPLICA IDENTITY DEFAULT;",
    );
    f.barrier().await;
    f.fill().await;
    f.pg.psql("app", "UPDATE articles SET slug = 'a3' WHERE id = 1");
    f.barrier().await;
    assert_eq!(
        f.present(ALL).await,
        vec![
            "article:2".to_string(),
            "unrelated".to_string(),
            "cache::data::two".to_string()
        ]
    );
    f.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_delays_but_never_drops_invalidations() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let mut redis = Redis::start_persistent();
    let mut conn = redis.connection().await;
    set_keys(&mut conn, &["article:1", "article:2", "marker:1"]).await;
    let daemon = start(config(&pg, &redis, "app", "outage", RULES));
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "outage").await;

    redis.stop();
    pg.psql(
        "app",
        "UPDATE articles SET title = 'during outage' WHERE id = 1",
    );
    let after_commit = harness::current_wal_lsn(&client).await;
    let before = harness::slot_confirmed_flush(&client, "outage").await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let confirmed = harness::slot_confirmed_flush(&client, "outage").await;
        assert!(
            confirmed < after_commit,
            "slot confirmed {confirmed} past the unapplied commit"
        );
        assert!(confirmed >= before);
    }
    pg.psql(
        "app",
        "UPDATE articles SET title = 'also during outage' WHERE id = 2",
    );
    redis.restart();
    let mut conn = redis.connection().await;
    wait_gone(&mut conn, "article:1", 30).await;
    wait_gone(&mut conn, "article:2", 30).await;
    harness::wait_for(10, || async {
        harness::slot_confirmed_flush(&client, "outage").await >= after_commit
    })
    .await;
    assert!(
        exists(&mut conn, "marker:1").await,
        "nothing else was removed"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_reset_clears_everything_the_rules_maintain_and_nothing_else() {
    use walsweep::sink::Sink;
    support::init_tracing();
    let pg = Postgres::start();
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let config = config(&pg, &redis, "postgres", "unused", RULES);
    let rules = walsweep::plan::rules::Rules::from_config(&config).unwrap();
    let mut sink = walsweep::sink::redis::RedisSink::new(&config.redis, &config.matroska)
        .unwrap()
        .with_reset_plan(rules.reset_plan());
    set_keys(
        &mut conn,
        &[
            "article:1",
            "article:slug:x",
            "marker:9",
            "unrelated",
            "articles-list",
        ],
    )
    .await;
    matroska_put(&mut conn, "one", &["id:article:1"]).await;
    matroska_put(&mut conn, "list-x", &[SCOPE_X]).await;
    matroska_put(&mut conn, "other", &["id:author:1"]).await;
    Sink::<walsweep::plan::rules::EffectPlan>::reset(&mut sink)
        .await
        .unwrap();
    let mut left = Vec::new();
    for k in [
        "article:1",
        "article:slug:x",
        "marker:9",
        "unrelated",
        "articles-list",
        "cache::data::one",
        "cache::data::list-x",
        "cache::data::other",
    ] {
        if exists(&mut conn, k).await {
            left.push(k);
        }
    }
    // `articles-list` does not start with `article:`; `id:author:` is no rule's prefix.
    assert_eq!(
        left,
        vec!["unrelated", "articles-list", "cache::data::other"]
    );
}

/// A Redis sink driven directly (no daemon), for what one batch does: its Postgres (which the
/// config needs, unused) and Redis stay up while the fixture lives.
struct SinkFixture {
    _pg: Postgres,
    _redis: Redis,
    conn: redis::aio::MultiplexedConnection,
    sink: walsweep::sink::redis::RedisSink,
}

impl SinkFixture {
    /// `rest`: the config after `[redis]` (rules, `[matroska]`).
    async fn new(rest: &str) -> SinkFixture {
        support::init_tracing();
        let pg = Postgres::start();
        let redis = Redis::start();
        let conn = redis.connection().await;
        let config = config(&pg, &redis, "postgres", "unused", rest);
        let sink = walsweep::sink::redis::RedisSink::new(&config.redis, &config.matroska).unwrap();
        SinkFixture {
            _pg: pg,
            _redis: redis,
            conn,
            sink,
        }
    }
}

/// A plan that invalidates the dependencies `deps`.
fn invalidate(deps: &[impl AsRef<str>]) -> walsweep::plan::rules::EffectPlan {
    let mut plan = walsweep::plan::rules::EffectPlan::default();
    for dep in deps {
        plan.add(walsweep::plan::rules::Effect::InvalidateDep(
            dep.as_ref().into(),
        ));
    }
    plan
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_key_of_another_type_is_reported_and_left_alone() {
    let mut f = SinkFixture::new(RULES).await;
    set_keys(&mut f.conn, &["cache::rdep::tag:not-a-set"]).await;
    matroska_put(&mut f.conn, "one", &["id:article:1"]).await;
    let plan = invalidate(&["tag:not-a-set", "id:article:1", "id:article:404"]);
    let applied = f.sink.apply_plans(std::iter::once(&plan)).await.unwrap();
    assert_eq!(applied.wrong_type_sets, 1);
    assert_eq!(applied.keys_unlinked, 1);
    assert!(!exists(&mut f.conn, "cache::data::one").await);
    assert!(exists(&mut f.conn, "cache::rdep::tag:not-a-set").await);
    assert!(
        exists(&mut f.conn, "cache::rdep::id:article:1").await,
        "sets are kept"
    );
}

/// `remove_dependency_sets = true`: each set goes with its members, on the one-call path (all
/// keys are sets) and on the set-by-set path a key of another type forces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_dependency_sets_go_with_their_members() {
    let mut f = SinkFixture::new(&format!(
        "[matroska]\nremove_dependency_sets = true\n{RULES}"
    ))
    .await;

    matroska_put(&mut f.conn, "one", &["id:article:1", "tag:a"]).await;
    matroska_put(&mut f.conn, "two", &["tag:a"]).await;
    matroska_put(&mut f.conn, "kept", &["id:article:9"]).await;
    let plan = invalidate(&["id:article:1", "tag:a", "id:article:404"]);
    let applied = f.sink.apply_plans(std::iter::once(&plan)).await.unwrap();
    assert_eq!(applied.keys_unlinked, 2, "one and two, each once");
    assert_eq!(applied.wrong_type_sets, 0);
    for gone in [
        "cache::data::one",
        "cache::data::two",
        "cache::rdep::id:article:1",
        "cache::rdep::tag:a",
    ] {
        assert!(!exists(&mut f.conn, gone).await, "{gone} is gone");
    }
    assert!(exists(&mut f.conn, "cache::data::kept").await);
    assert!(exists(&mut f.conn, "cache::rdep::id:article:9").await);

    set_keys(&mut f.conn, &["cache::rdep::tag:not-a-set"]).await;
    matroska_put(&mut f.conn, "three", &["id:article:3"]).await;
    let plan = invalidate(&["tag:not-a-set", "id:article:3"]);
    let applied = f.sink.apply_plans(std::iter::once(&plan)).await.unwrap();
    assert_eq!(applied.keys_unlinked, 1);
    assert_eq!(applied.wrong_type_sets, 1);
    assert!(!exists(&mut f.conn, "cache::data::three").await);
    assert!(!exists(&mut f.conn, "cache::rdep::id:article:3").await);
    assert!(
        exists(&mut f.conn, "cache::rdep::tag:not-a-set").await,
        "not a set: left alone"
    );
}

/// How many EVALs `conn`'s Redis has run (`INFO commandstats`).
async fn evals_run(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    // "cmdstat_eval:calls=3,usec=120,..."; no line before the first EVAL.
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_eval:calls="))
        .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
        .unwrap_or(0)
}

/// On one node, dependency sets are checked with EXISTS first and only chunks holding a set
/// that exists go through `invalidate_deps.lua`: sets nothing depends on cost no script call,
/// and a set among hundreds of missing ones is still found and invalidated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_chunks_holding_an_existing_set_run_the_dependency_script() {
    let mut f = SinkFixture::new(RULES).await;
    // 1 000 sets: several chunks of them.
    let missing: Vec<String> = (0..1_000).map(|i| format!("id:article:{i}")).collect();
    let plan = invalidate(&missing);

    let before = evals_run(&mut f.conn).await;
    let applied = f.sink.apply_plans(std::iter::once(&plan)).await.unwrap();
    assert_eq!(applied.keys_unlinked, 0);
    assert_eq!(
        evals_run(&mut f.conn).await,
        before,
        "no set exists: no script call"
    );

    // One set that exists, in the middle of the missing ones.
    matroska_put(&mut f.conn, "cached", &["id:article:700"]).await;
    let before = evals_run(&mut f.conn).await;
    let applied = f.sink.apply_plans(std::iter::once(&plan)).await.unwrap();
    assert_eq!(applied.keys_unlinked, 1);
    assert!(!exists(&mut f.conn, "cache::data::cached").await);
    assert_eq!(
        evals_run(&mut f.conn).await - before,
        1,
        "one script call, for the chunk holding the set"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_wide_invalidation_of_many_keys_unlinks_page_by_page() {
    use futures_util::StreamExt;

    const KEYS: usize = 20_000;
    const ENTRIES: usize = 5_000;
    let mut f = Fixture::new("rules_wide_many").await;
    let mut pipe = redis::pipe();
    for i in 0..KEYS {
        pipe.cmd("SET")
            .arg(format!("article:{i}"))
            .arg("cached")
            .ignore();
    }
    for i in 0..ENTRIES {
        pipe.cmd("SADD")
            .arg(format!("cache::rdep::id:article:{i}"))
            .arg(format!("cache::data::e{i}"))
            .ignore();
        pipe.cmd("SET")
            .arg(format!("cache::data::e{i}"))
            .arg("s1")
            .ignore();
    }
    pipe.cmd("SET").arg("unrelated").arg("cached").ignore();
    let _: () = pipe.query_async(&mut f.conn).await.expect("fill");

    // Every command Redis runs, in order, to see whether removals start before the SCAN ends.
    let client = redis::Client::open(f.redis.url()).expect("client");
    let monitor = client.get_async_monitor().await.expect("MONITOR");
    let log = tokio::spawn(async move {
        let mut lines: Vec<String> = Vec::new();
        let mut stream = monitor.into_on_message::<String>();
        while let Some(line) = stream.next().await {
            let done = line.contains("\"done-marker\"");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });

    f.pg.psql("app", "TRUNCATE articles");
    f.barrier().await;
    let _: () = redis::cmd("GET")
        .arg("done-marker")
        .query_async(&mut f.conn)
        .await
        .expect("GET");
    let lines = tokio::time::timeout(Duration::from_secs(20), log)
        .await
        .expect("MONITOR saw the marker")
        .expect("monitor task");

    for (pattern, expected) in [("article:*", 0), ("cache::data::e*", 0), ("unrelated", 1)] {
        let left: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut f.conn)
            .await
            .expect("KEYS");
        assert_eq!(
            left.len(),
            expected,
            "keys matching {pattern} after TRUNCATE"
        );
    }

    let position = |what: &str, needle: &str, last: bool| {
        let mut hits = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains(what) && l.contains(needle))
            .map(|(i, _)| i);
        let found = if last { hits.next_back() } else { hits.next() };
        found.unwrap_or_else(|| panic!("no {what} with {needle} in {} commands", lines.len()))
    };
    let last_scan = position("\"SCAN\"", "\"article:*\"", true);
    let first_unlink = position("\"UNLINK\"", "\"article:", false);
    assert!(
        first_unlink < last_scan,
        "keys are unlinked while the SCAN goes on (first UNLINK at {first_unlink}, last SCAN at \
         {last_scan}), so memory holds one page, not every matching key"
    );
    let last_scan = position("\"SCAN\"", "\"cache::rdep::id:article:*\"", true);
    let first_eval = position("\"EVAL\"", "\"cache::rdep::id:article:", false);
    assert!(
        first_eval < last_scan,
        "dependency sets are invalidated while their SCAN goes on (first EVAL at {first_eval}, \
         last SCAN at {last_scan})"
    );
    f.daemon.stop().await;
}
