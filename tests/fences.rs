//! walsweep's side of fenced fills (`matroska.fences`): the function library is loaded, a fence
//! with the commit's LSN is raised for every dependency set and key it invalidates (fence-all
//! for a table-wide invalidation) before the invalidation, and `walsweep_fill` refuses a fill
//! whose token predates the fence while storing one taken after it.

mod support;

use redis::AsyncCommands;

use support::daemon::{self, wait_gone, wait_streaming};
use support::{Postgres, Redis};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO items VALUES (1, 'v0'), (2, 'v0');
CREATE PUBLICATION pub FOR TABLE items;
";

const RULES: &str = r#"
[matroska]
fences = true
[[table]]
name = "public.items"
keys = ["itemkey:{id}"]
deps = ["id:item:{id}"]
"#;

const POSITION: &str = "walsweep:app/fenced:applied";
const SET: &str = "cache::rdep::id:item:1";

async fn fill(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    token: &str,
    value: &str,
) -> i64 {
    redis::cmd("FCALL")
        .arg("walsweep_fill")
        .arg(6)
        .arg(key)
        .arg(format!("walsweep:fence:{key}"))
        .arg("walsweep:fence-all")
        .arg("walsweep:fills")
        .arg(SET)
        .arg(format!("walsweep:fence:{SET}"))
        .arg(token)
        .arg(value)
        .arg(600)
        .query_async(conn)
        .await
        .expect("FCALL walsweep_fill")
}

async fn token(conn: &mut redis::aio::MultiplexedConnection) -> String {
    redis::cmd("FCALL")
        .arg("walsweep_fill_begin")
        .arg(1)
        .arg(POSITION)
        .query_async(conn)
        .await
        .expect("FCALL walsweep_fill_begin")
}

async fn wait_position(conn: &mut redis::aio::MultiplexedConnection, lsn: u64) {
    daemon::wait_for(10, || {
        let mut conn = conn.clone();
        async move {
            let p: Option<String> = conn.get(POSITION).await.unwrap();
            p.and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) >= lsn
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_are_raised_before_invalidations_and_refuse_older_fills() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let walsweep = daemon::start(daemon::config(&pg, &redis, "app", "fenced", RULES));
    let client = pg.client("app").await;
    wait_streaming(&client, "fenced").await;

    // A reader misses and takes its token before the writer's commit is applied.
    let _: () = conn.sadd(SET, "cache::data::a").await.unwrap();
    let _: () = conn.set("cache::data::a", "v0").await.unwrap();
    let _: () = conn.set("itemkey:1", "v0").await.unwrap();
    let early = token(&mut conn).await;

    client
        .execute("UPDATE items SET v = 'v1' WHERE id = 1", &[])
        .await
        .unwrap();
    let lsn = daemon::insert_lsn(&client).await;
    wait_gone(&mut conn, "cache::data::a", 10).await;
    wait_position(&mut conn, lsn).await;
    let version: String = redis::cmd("FCALL")
        .arg("walsweep_version")
        .arg(0)
        .query_async(&mut conn)
        .await
        .expect("walsweep loaded its function library");
    assert_eq!(version, "1");

    // Fences for the set and the template key, at the commit's LSN (before its end).
    for key in [SET, "itemkey:1"] {
        let fence: String = conn
            .get(format!("walsweep:fence:{key}"))
            .await
            .unwrap_or_else(|e| panic!("no fence for {key}: {e}"));
        let fence: u64 = fence.parse().unwrap();
        assert!(
            fence > early.parse::<u64>().unwrap() && fence < lsn,
            "fence {fence} of {key}"
        );
        let ttl: i64 = conn.pttl(format!("walsweep:fence:{key}")).await.unwrap();
        assert!(ttl > 0 && ttl <= 60_000, "fence TTL {ttl} ms");
    }
    let untouched: Option<String> = conn
        .get("walsweep:fence:cache::rdep::id:item:2")
        .await
        .unwrap();
    assert_eq!(untouched, None, "no fence for a set no commit touched");

    // The early reader read the old row: refused. One that began after the commit: stored.
    assert_eq!(fill(&mut conn, "cache::data::a", &early, "v0").await, 0);
    assert!(!daemon::exists(&mut conn, "cache::data::a").await);
    let late = token(&mut conn).await;
    assert_eq!(fill(&mut conn, "cache::data::a", &late, "v1").await, 1);
    let stored: String = conn.get("cache::data::a").await.unwrap();
    assert_eq!(stored, "v1");
    let members: Vec<String> = conn.smembers(SET).await.unwrap();
    assert_eq!(members, vec!["cache::data::a".to_string()]);
    let counts: (u64, u64) = redis::cmd("HMGET")
        .arg("walsweep:fills")
        .arg("stored")
        .arg("refused")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counts, (1, 1));

    // A table-wide invalidation raises fence-all: every older fill is refused.
    let before_truncate = token(&mut conn).await;
    client.execute("TRUNCATE items", &[]).await.unwrap();
    let lsn = daemon::insert_lsn(&client).await;
    wait_position(&mut conn, lsn).await;
    let all: String = conn.get("walsweep:fence-all").await.unwrap();
    assert!(all.parse::<u64>().unwrap() > before_truncate.parse::<u64>().unwrap());
    assert_eq!(
        fill(&mut conn, "cache::data::b", &before_truncate, "x").await,
        0
    );
    walsweep.stop().await;
}
