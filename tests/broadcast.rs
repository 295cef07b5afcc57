//! Broadcasts end to end (`[broadcast]`, docs/broadcasts.md): one message per committed
//! transaction that changed a broadcast table, chained by `prev_lsn`, listing exactly what the
//! transaction did; never published twice for a redelivered transaction; counts only for large
//! transactions; and the Python client example keeps a dict fresh with them.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use serde_json::{json, Value as Json};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use support::binaries::{python, repo};
use support::daemon::{config, start, wait_for, wait_gone, wait_streaming};
use support::rng::Lcg;
use support::{Postgres, Redis};

const CHANNEL: &str = "walsweep:changes";
const STREAM: &str = "walsweep:stream";

/// A small deterministic generator, so a failing workload can be replayed.
/// `0/1A2B3C0` as a number.
fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text
        .split_once('/')
        .unwrap_or_else(|| panic!("LSN {text:?}"));
    let hi = u64::from_str_radix(hi, 16).unwrap_or_else(|e| panic!("LSN {text:?}: {e}"));
    let lo = u64::from_str_radix(lo, 16).unwrap_or_else(|e| panic!("LSN {text:?}: {e}"));
    (hi << 32) | lo
}

/// Every message published on the channel, as it arrives.
async fn subscribe(redis: &Redis, channel: &str) -> mpsc::UnboundedReceiver<String> {
    let client = redis::Client::open(redis.url()).expect("Redis URL");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub connection");
    pubsub.subscribe(channel).await.expect("SUBSCRIBE");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let payload: String = msg.get_payload().expect("text payload");
            if tx.send(payload).is_err() {
                return;
            }
        }
    });
    rx
}

/// Receives messages until one carries `last_xid` (or `secs` pass), returning all received.
async fn receive_until_xid(
    rx: &mut mpsc::UnboundedReceiver<String>,
    received: &mut Vec<String>,
    last_xid: u64,
    secs: u64,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(last) = received.last() {
            let json: Json = serde_json::from_str(last).expect("message is JSON");
            if json["xid"].as_u64() == Some(last_xid) {
                return;
            }
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(message)) => received.push(message),
            Ok(None) => panic!("the subscription ended"),
            Err(_) => panic!(
                "no message for xid {last_xid} within {secs}s; received {}:\n{}",
                received.len(),
                received.join("\n")
            ),
        }
    }
}

/// Every `message` field of the stream, oldest first.
async fn stream_messages(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(STREAM)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE");
    entries
        .into_iter()
        .map(|(id, fields)| match fields.as_slice() {
            [name, message] if name == "message" => message.clone(),
            other => panic!("stream entry {id} has fields {other:?}, not just `message`"),
        })
        .collect()
}

/// The message walsweep publishes when it creates the slot (the chain starts anew), which
/// every test that lets walsweep create its slot receives first.
async fn expect_slot_created_reset(rx: &mut mpsc::UnboundedReceiver<String>) -> String {
    let message = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a reset message when walsweep creates the slot")
        .expect("subscription open");
    let json: Json = serde_json::from_str(&message).expect("message is JSON");
    assert_eq!(json["reset"], true, "{message}");
    assert_eq!(json["prev_lsn"], Json::Null, "{message}");
    assert!(
        json["reason"]
            .as_str()
            .is_some_and(|r| r.contains("created the replication slot")),
        "{message}"
    );
    message
}

/// Checks the chain: `prev_lsn` of each message is the previous `lsn` (`first_prev` for the
/// first), LSNs strictly increase. Returns the parsed messages.
fn assert_chain(messages: &[String], first_prev: Json) -> Vec<Json> {
    let mut prev = first_prev;
    let mut prev_lsn = 0;
    let mut parsed = Vec::new();
    for (i, text) in messages.iter().enumerate() {
        assert!(
            text.starts_with("{\"prev_lsn\":"),
            "message {i} does not start with prev_lsn: {text}"
        );
        let json: Json = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(json["prev_lsn"], prev, "prev_lsn of message {i}: {text}");
        let lsn = parse_lsn(json["lsn"].as_str().expect("lsn is a string"));
        assert!(lsn > prev_lsn, "message {i}: LSN not increasing: {text}");
        prev_lsn = lsn;
        prev = json["lsn"].clone();
        parsed.push(json);
    }
    parsed
}

/// What one transaction of the workload did, and what its message must say.
struct Txn {
    sql: String,
    /// Expected `changes`; `None` for a transaction no message may be published for.
    changes: Option<Vec<Json>>,
}

/// What the server says around a transaction.
struct Committed {
    xid: u64,
    /// WAL insert position and UTC time just before and just after the transaction.
    lsn_bounds: (u64, u64),
    time_bounds: (String, String),
}

async fn wal_position_and_time(client: &tokio_postgres::Client) -> (u64, String) {
    let row = client
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, to_char(clock_timestamp() AT TIME ZONE \
             'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .expect("WAL position");
    (parse_lsn(row.get::<_, &str>(0)), row.get(1))
}

/// Runs `sql` (statements without BEGIN/COMMIT) as one transaction. Its xid is
/// `txid_current()`: the 32-bit xid itself on a fresh cluster (epoch 0).
async fn run_txn(client: &tokio_postgres::Client, sql: &str) -> Committed {
    let (lsn_before, time_before) = wal_position_and_time(client).await;
    let text = format!("BEGIN; {sql}; SELECT txid_current()::text; COMMIT;");
    let replies = client
        .simple_query(&text)
        .await
        .unwrap_or_else(|e| panic!("workload: {e}\n{text}"));
    let xid = replies
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .expect("txid_current() row")
        .parse()
        .expect("xid is a number");
    let (lsn_after, time_after) = wal_position_and_time(client).await;
    Committed {
        xid,
        lsn_bounds: (lsn_before, lsn_after),
        time_bounds: (time_before, time_after),
    }
}

/// A change of a table whose rules name `keys` and `deps`.
fn change(table: &str, op: &str, pk: Json, keys: &[String], deps: &[String]) -> Json {
    json!({"table": table, "op": op, "pk": pk, "keys": keys, "deps": deps})
}

/// The article rules' change for `id` (and, for a key change, the old `from` id as well).
fn article(op: &str, id: i32, from: Option<i32>) -> Json {
    let ids: Vec<i32> = from.into_iter().chain([id]).collect();
    change(
        "public.articles",
        op,
        json!({"id": id}),
        &ids.iter()
            .map(|i| format!("article:{i}"))
            .collect::<Vec<_>>(),
        &ids.iter()
            .map(|i| format!("id:article:{i}"))
            .collect::<Vec<_>>(),
    )
}

fn comment(op: &str, article_id: i32, n: i32) -> Json {
    change(
        "public.comments",
        op,
        json!({"article_id": article_id, "n": n}),
        &[format!("comments:{article_id}")],
        &[
            format!("id:comment:{article_id}:{n}"),
            format!("id:article:{article_id}"),
        ],
    )
}

/// The random workload of test 1: statements and the changes they make, in order.
struct Workload {
    rng: Lcg,
    articles: BTreeMap<i32, ()>,
    comments: BTreeMap<(i32, i32), ()>,
    next_id: i32,
    next_noise: i32,
}

impl Workload {
    /// One statement touching a broadcast table, with its changes appended to `changes`.
    fn broadcast_statement(&mut self, changes: &mut Vec<Json>) -> String {
        let roll = self.rng.below(100);
        let value = self.rng.below(1000);
        let picked_article = self.rng.pick(self.articles.keys().copied());
        let picked_comment = self.rng.pick(self.comments.keys().copied());
        match (roll, picked_article, picked_comment) {
            (0..=24, _, _) | (25..=59, None, _) => {
                // Several rows in one statement: listed in VALUES order.
                let rows = 1 + self.rng.below(3) as i32;
                let mut values = Vec::new();
                for _ in 0..rows {
                    self.next_id += 1;
                    let id = self.next_id;
                    self.articles.insert(id, ());
                    values.push(format!("({id}, 'title {value}', {value})"));
                    changes.push(article("insert", id, None));
                }
                format!("INSERT INTO articles VALUES {}", values.join(", "))
            }
            (25..=39, Some(id), _) => {
                changes.push(article("update", id, None));
                format!("UPDATE articles SET views = views + {value}, title = 'retitled {value}' WHERE id = {id}")
            }
            (40..=46, Some(id), _) => {
                // The key changes: both the old and the new row's keys are invalidated.
                self.next_id += 1;
                let new = self.next_id;
                self.articles.remove(&id);
                self.articles.insert(new, ());
                changes.push(article("update", new, Some(id)));
                format!("UPDATE articles SET id = {new} WHERE id = {id}")
            }
            (47..=59, Some(id), _) => {
                self.articles.remove(&id);
                changes.push(article("delete", id, None));
                format!("DELETE FROM articles WHERE id = {id}")
            }
            (60..=79, _, _) | (_, _, None) => {
                let article_id = (value % 20) as i32;
                let n = self
                    .comments
                    .keys()
                    .filter(|(a, _)| *a == article_id)
                    .map(|(_, n)| n + 1)
                    .max()
                    .unwrap_or(1);
                self.comments.insert((article_id, n), ());
                changes.push(comment("insert", article_id, n));
                format!("INSERT INTO comments VALUES ({article_id}, {n}, 'comment {value}')")
            }
            (80..=89, _, Some((a, n))) => {
                changes.push(comment("update", a, n));
                format!("UPDATE comments SET body = 'edited {value}' WHERE article_id = {a} AND n = {n}")
            }
            (_, _, Some((a, n))) => {
                self.comments.remove(&(a, n));
                changes.push(comment("delete", a, n));
                format!("DELETE FROM comments WHERE article_id = {a} AND n = {n}")
            }
        }
    }

    /// A statement on a table that is not broadcast: `noise` is published but has no
    /// `[[table]]`, `private` is not even published.
    fn unbroadcast_statement(&mut self) -> String {
        self.next_noise += 1;
        if self.rng.below(2) == 0 {
            format!("INSERT INTO noise VALUES ({})", self.next_noise)
        } else {
            format!("INSERT INTO private VALUES ({})", self.next_noise)
        }
    }

    fn txn(&mut self, index: usize) -> Txn {
        let mut changes = Vec::new();
        let mut statements = Vec::new();
        match index {
            // Only tables that are not broadcast: no message.
            _ if index % 9 == 4 => {
                for _ in 0..1 + self.rng.below(3) {
                    statements.push(self.unbroadcast_statement());
                }
                return Txn {
                    sql: statements.join("; "),
                    changes: None,
                };
            }
            // TRUNCATE between two inserts: listed in place, without pk, keys or deps.
            50 => {
                statements.push(self.broadcast_statement(&mut changes));
                statements.push("TRUNCATE comments".into());
                self.comments.clear();
                changes.push(json!({"table": "public.comments", "op": "truncate"}));
                self.comments.insert((1, 1), ());
                statements.push("INSERT INTO comments VALUES (1, 1, 'after truncate')".into());
                changes.push(comment("insert", 1, 1));
            }
            // A rolled-back subtransaction: its changes are not listed.
            30 | 70 => {
                statements.push(self.broadcast_statement(&mut changes));
                statements.push("SAVEPOINT s".into());
                let id = self.next_id + 1_000;
                statements.push(format!(
                    "INSERT INTO articles VALUES ({id}, 'rolled back', 0)"
                ));
                statements.push("ROLLBACK TO SAVEPOINT s".into());
                statements.push(self.broadcast_statement(&mut changes));
            }
            _ => {
                for _ in 0..1 + self.rng.below(5) {
                    if self.rng.below(5) == 0 {
                        statements.push(self.unbroadcast_statement());
                    }
                    statements.push(self.broadcast_statement(&mut changes));
                }
            }
        }
        Txn {
            sql: statements.join("; "),
            changes: Some(changes),
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE articles (id int PRIMARY KEY, title text, views int);
CREATE TABLE comments (article_id int, n int, body text, PRIMARY KEY (article_id, n));
CREATE TABLE noise (id int PRIMARY KEY);
CREATE TABLE private (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE articles, comments, noise;
";

/// `[broadcast]` on every `[[table]]` (no `tables`), to a channel and a stream.
const RULES: &str = r#"
[broadcast]
channel = "walsweep:changes"
stream = "walsweep:stream"
[[table]]
name = "public.articles"
keys = ["article:{id}"]
deps = ["id:article:{id}"]
[[table]]
name = "public.comments"
keys = ["comments:{article_id}"]
deps = ["id:comment:{article_id}:{n}", "id:article:{article_id}"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_receives_every_transaction_once_in_lsn_order() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let mut rx = subscribe(&redis, CHANNEL).await;
    let daemon = start(config(&pg, &redis, "app", "bcast_order", RULES));
    let reset = expect_slot_created_reset(&mut rx).await;
    let client = pg.client("app").await;
    wait_streaming(&client, "bcast_order").await;

    let mut workload = Workload {
        rng: Lcg(0xb40a_dca5),
        articles: BTreeMap::new(),
        comments: BTreeMap::new(),
        next_id: 0,
        next_noise: 0,
    };
    let mut expected: Vec<(Committed, Vec<Json>)> = Vec::new();
    let (mut silent, mut multi_row, mut key_moves) = (0, 0, 0);
    for index in 0..100 {
        let txn = workload.txn(index);
        let committed = run_txn(&client, &txn.sql).await;
        match txn.changes {
            None => silent += 1,
            Some(changes) => {
                multi_row += usize::from(changes.len() > 1);
                key_moves += changes
                    .iter()
                    .filter(|c| c["keys"].as_array().is_some_and(|k| k.len() == 2))
                    .count();
                expected.push((committed, changes));
            }
        }
    }
    // Guards against a workload that would check little.
    assert!(silent >= 10, "only {silent} unbroadcast transactions");
    assert!(multi_row >= 30, "only {multi_row} multi-row transactions");
    assert!(key_moves >= 3, "only {key_moves} key changes");

    let last_xid = expected.last().expect("transactions").0.xid;
    let mut received = Vec::new();
    receive_until_xid(&mut rx, &mut received, last_xid, 60).await;
    let messages = assert_chain(&received, Json::Null);
    // `noise` is published but has no [[table]]: not broadcast, since `tables` defaults to
    // every [[table]].
    for message in &messages {
        let tables = message["changes"].as_array().expect("changes");
        assert!(
            tables
                .iter()
                .all(|c| c["table"] == "public.articles" || c["table"] == "public.comments"),
            "a change of a table that is not a [[table]] was broadcast: {message}"
        );
    }
    assert_eq!(
        messages.len(),
        expected.len(),
        "one message per broadcast transaction; received:\n{}",
        received.join("\n")
    );
    for (i, (message, (committed, changes))) in messages.iter().zip(&expected).enumerate() {
        let lsn = parse_lsn(message["lsn"].as_str().expect("lsn"));
        assert_eq!(message["xid"], json!(committed.xid), "xid of message {i}");
        assert!(
            committed.lsn_bounds.0 < lsn && lsn <= committed.lsn_bounds.1,
            "message {i}: lsn {} is not within the transaction's WAL ({:X}..{:X})",
            message["lsn"],
            committed.lsn_bounds.0,
            committed.lsn_bounds.1
        );
        let time = message["commit_time"].as_str().expect("commit_time");
        assert!(
            time.len() == 27
                && time.ends_with('Z')
                && committed.time_bounds.0.as_str() <= time
                && time <= committed.time_bounds.1.as_str(),
            "message {i}: commit_time {time} is not within {:?}",
            committed.time_bounds
        );
        assert_eq!(
            &message["changes"],
            &Json::Array(changes.clone()),
            "changes of message {i} (xid {})",
            committed.xid
        );
        assert!(message.get("truncated").is_none() && message.get("counts").is_none());
    }

    // The stream holds the same messages, in the same order, after the reset.
    let mut expected_stream = vec![reset];
    expected_stream.extend(received.iter().cloned());
    assert_eq!(stream_messages(&mut conn).await, expected_stream);
    // Nothing more arrives (e.g. a late duplicate).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "an extra message arrived");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_transactions_are_not_published_twice() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql(
        "app",
        "CREATE TABLE articles (id int PRIMARY KEY, title text);
         CREATE PUBLICATION pub FOR TABLE articles;
         SELECT pg_create_logical_replication_slot('bcast_b', 'pgoutput');",
    );
    let rules = r#"
[broadcast]
channel = "walsweep:changes"
stream = "walsweep:stream"
[[table]]
name = "public.articles"
keys = ["article:{id}"]
"#;
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let mut rx = subscribe(&redis, CHANNEL).await;
    let client = pg.client("app").await;

    // Run A on slot `bcast_a` publishes the first transactions.
    let daemon = start(config(&pg, &redis, "app", "bcast_a", rules));
    let reset = expect_slot_created_reset(&mut rx).await;
    wait_streaming(&client, "bcast_a").await;
    let mut xids = Vec::new();
    for id in 1..=20 {
        let sql = if id % 4 == 0 {
            format!("UPDATE articles SET title = 'again' WHERE id = {}", id - 1)
        } else {
            format!("INSERT INTO articles VALUES ({id}, 'first')")
        };
        xids.push(run_txn(&client, &sql).await.xid);
    }
    let mut received = Vec::new();
    receive_until_xid(&mut rx, &mut received, *xids.last().unwrap(), 60).await;
    assert_eq!(received.len(), 20);
    daemon.stop().await;

    // Run B on slot `bcast_b`, created before all of them, is sent every one again. The last
    // one's invalidation lands again (effects are idempotent), its message must not.
    let _: () = conn.set("article:19", "cached").await.expect("SET");
    let daemon = start(config(&pg, &redis, "app", "bcast_b", rules));
    wait_gone(&mut conn, "article:19", 60).await;
    wait_streaming(&client, "bcast_b").await;
    for id in 21..=25 {
        let sql = format!("INSERT INTO articles VALUES ({id}, 'second')");
        xids.push(run_txn(&client, &sql).await.xid);
    }
    receive_until_xid(&mut rx, &mut received, *xids.last().unwrap(), 60).await;
    let messages = assert_chain(&received, Json::Null);
    let got: Vec<u64> = messages
        .iter()
        .map(|m| m["xid"].as_u64().expect("xid"))
        .collect();
    assert_eq!(got, xids, "each transaction published once, in order");
    // Slot `bcast_b` existed before run B, so run B sent no reset.
    let mut expected_stream = vec![reset];
    expected_stream.extend(received.iter().cloned());
    assert_eq!(stream_messages(&mut conn).await, expected_stream);
    let xlen: u64 = conn.xlen(STREAM).await.expect("XLEN");
    assert_eq!(xlen, 26);
    // The state key names the last message's LSN.
    let state: String = conn
        .get(format!("{STREAM}:last_lsn"))
        .await
        .expect("state key");
    let last_lsn = messages.last().unwrap()["lsn"].as_str().unwrap();
    assert_eq!(
        state,
        format!("{:016X} {last_lsn}", parse_lsn(last_lsn)),
        "state key"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "an extra message arrived");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_transaction_lists_counts_only() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql(
        "app",
        "CREATE TABLE x (id int PRIMARY KEY);
         CREATE TABLE y (id int PRIMARY KEY);
         CREATE TABLE audit (id int PRIMARY KEY);
         CREATE PUBLICATION pub FOR TABLE x, y, audit;",
    );
    // `audit` is followed (its rules apply) but not broadcast.
    let rules = r#"
[broadcast]
channel = "walsweep:changes"
max_changes_per_message = 5
tables = ["public.x", "y"]
[[table]]
name = "public.x"
keys = ["x:{id}"]
[[table]]
name = "public.y"
keys = ["y:{id}"]
[[table]]
name = "public.audit"
keys = ["audit:{id}"]
"#;
    let redis = Redis::start();
    let mut rx = subscribe(&redis, CHANNEL).await;
    let daemon = start(config(&pg, &redis, "app", "bcast_big", rules));
    expect_slot_created_reset(&mut rx).await;
    let client = pg.client("app").await;
    wait_streaming(&client, "bcast_big").await;

    let x = |id: i32| {
        change(
            "public.x",
            "insert",
            json!({"id": id}),
            &[format!("x:{id}")],
            &[],
        )
    };
    let y = |id: i32| {
        change(
            "public.y",
            "insert",
            json!({"id": id}),
            &[format!("y:{id}")],
            &[],
        )
    };
    let cases: Vec<(&str, Option<Json>)> = vec![
        (
            "INSERT INTO x SELECT generate_series(1, 20)",
            Some(json!({"changes": [], "truncated": true, "counts": {"public.x": 20}})),
        ),
        // Exactly the limit: listed.
        (
            "INSERT INTO x SELECT generate_series(101, 105)",
            Some(json!({"changes": (101..=105).map(x).collect::<Vec<_>>()})),
        ),
        // One over, across two tables.
        (
            "INSERT INTO x VALUES (201), (202), (203); INSERT INTO y VALUES (1), (2), (3)",
            Some(json!({"changes": [], "truncated": true,
                        "counts": {"public.x": 3, "public.y": 3}})),
        ),
        ("INSERT INTO audit SELECT generate_series(1, 10)", None),
        // Changes of a table that is not broadcast are neither listed nor counted.
        (
            "INSERT INTO audit VALUES (11), (12); INSERT INTO y VALUES (4); \
             INSERT INTO audit VALUES (13), (14), (15), (16), (17)",
            Some(json!({"changes": [y(4)]})),
        ),
        (
            "INSERT INTO x SELECT generate_series(301, 320); \
             INSERT INTO audit SELECT generate_series(101, 110)",
            Some(json!({"changes": [], "truncated": true, "counts": {"public.x": 20}})),
        ),
    ];
    let mut expected = Vec::new();
    for (sql, want) in cases {
        let committed = run_txn(&client, sql).await;
        if let Some(want) = want {
            expected.push((committed.xid, want));
        }
    }
    let mut received = Vec::new();
    receive_until_xid(&mut rx, &mut received, expected.last().unwrap().0, 60).await;
    let messages = assert_chain(&received, Json::Null);
    assert_eq!(
        messages.len(),
        expected.len(),
        "received:\n{}",
        received.join("\n")
    );
    for (message, (xid, want)) in messages.iter().zip(&expected) {
        assert_eq!(message["xid"], json!(xid));
        // Everything but the chain, the LSN and the time, which test 1 checks.
        let mut rest = message.as_object().unwrap().clone();
        for field in ["prev_lsn", "lsn", "commit_time", "xid"] {
            rest.remove(field);
        }
        assert_eq!(Json::Object(rest), *want, "message for xid {xid}");
    }
    daemon.stop().await;
}

/// `{"<key>": <row as JSON>}` for every row of `table` (an `id` or `name` keyed table).
async fn rows(client: &tokio_postgres::Client, sql: &str) -> BTreeMap<String, Json> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|row| {
            let json: String = row.get(1);
            (row.get(0), serde_json::from_str(&json).expect("row JSON"))
        })
        .collect()
}

const ARTICLE_ROWS: &str = "SELECT 'article:' || id, row_to_json(a)::text FROM articles a";
const TAG_ROWS: &str = "SELECT 'tag:' || name, row_to_json(t)::text FROM tags t";
const AUTHOR_ROWS: &str = "SELECT 'author:' || id, row_to_json(a)::text FROM authors a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_example_keeps_a_dict_fresh() {
    let python = python("examples/broadcast_client.py needs a Python with the redis package");
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql(
        "app",
        "CREATE TABLE articles (id int PRIMARY KEY, title text, views int);
         CREATE TABLE tags (name text PRIMARY KEY, n int);
         CREATE TABLE authors (id int PRIMARY KEY, name text);
         INSERT INTO articles SELECT i, 'title ' || i, i FROM generate_series(1, 30) i;
         INSERT INTO tags SELECT 'tag' || i, i FROM generate_series(1, 20) i;
         INSERT INTO authors SELECT i, 'author ' || i FROM generate_series(1, 5) i;
         CREATE PUBLICATION pub FOR TABLE articles, tags, authors;",
    );
    let rules = r#"
[broadcast]
channel = "walsweep:changes"
max_changes_per_message = 10
[[table]]
name = "public.articles"
keys = ["article:{id}"]
[[table]]
name = "public.tags"
keys = ["tag:{name}"]
[[table]]
name = "public.authors"
keys = ["author:{id}"]
"#;
    let redis = Redis::start();
    let conn = redis.connection().await;
    let daemon = start(config(&pg, &redis, "app", "bcast_client", rules));
    let client = pg.client("app").await;
    wait_streaming(&client, "bcast_client").await;

    // The app's cache as loaded from the database: table -> key -> row.
    let loaded = json!({
        "public.articles": rows(&client, ARTICLE_ROWS).await,
        "public.tags": rows(&client, TAG_ROWS).await,
        "public.authors": rows(&client, AUTHOR_ROWS).await,
    });
    let workload = [
        "UPDATE articles SET title = 'changed' WHERE id = 3",
        "DELETE FROM articles WHERE id = 7",
        "INSERT INTO articles VALUES (31, 'new', 0), (32, 'new', 0)",
        "UPDATE articles SET views = views + 1 WHERE id IN (10, 11); DELETE FROM articles WHERE id = 12",
        // 15 changes over the limit of 10: counts only, the client drops every tag.
        "UPDATE tags SET n = n + 100 WHERE n <= 15",
        "TRUNCATE authors",
        "UPDATE articles SET id = 40 WHERE id = 20",
        "INSERT INTO authors VALUES (9, 'new author')",
        "UPDATE articles SET title = 'changed again' WHERE id = 3",
    ];
    let mut child = tokio::process::Command::new(&python)
        .arg(repo().join("examples/broadcast_client.py"))
        .arg(redis.url())
        .arg(CHANNEL)
        .arg("--exit-after")
        .arg(workload.len().to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", python.display()));
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(loaded.to_string().as_bytes())
        .await
        .expect("write the loaded cache");
    drop(stdin);
    // The client subscribed: nothing it must hear of is published before.
    wait_for(30, || {
        let mut c = conn.clone();
        async move {
            let (_, n): (String, u64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(CHANNEL)
                .query_async(&mut c)
                .await
                .expect("PUBSUB NUMSUB");
            n == 1
        }
    })
    .await;
    for sql in workload {
        run_txn(&client, sql).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the client exits after its messages within 60s")
        .expect("client output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "broadcast_client.py failed ({}):\n--- stdout\n{stdout}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let cache: Json = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));

    // What is left is exactly what the table still holds unchanged: nothing stale, nothing
    // fresh dropped. Tags (too many changes to list) and authors (truncated) are gone.
    let now = rows(&client, ARTICLE_ROWS).await;
    let kept: BTreeMap<String, Json> = loaded["public.articles"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(key, row)| now.get(*key) == Some(*row))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(kept.len(), 30 - 6, "the workload changed 6 cached articles");
    assert_eq!(cache, json!({ "public.articles": kept }));
    daemon.stop().await;
}

/// The example's bookkeeping for what a live run rarely shows: a gap in the chain (Pub/Sub
/// dropped messages while the client was disconnected), a reset, a table-wide `prefix*` key.
const GAP_CHECKS: &str = r#"
import sys
sys.path.insert(0, sys.argv[1])
from broadcast_client import apply

def message(prev, lsn, keys=()):
    changes = [{"table": "public.t", "op": "update", "pk": {"id": 1}, "keys": list(keys), "deps": []}]
    return {"prev_lsn": prev, "lsn": lsn, "changes": changes}

cache = {"public.t": {"t:1": 1, "t:2": 2}, "public.u": {"u:1": 1}}
last = apply(cache, message(None, "0/10", ["t:1"]), None)
assert cache == {"public.t": {"t:2": 2}, "public.u": {"u:1": 1}}, cache
last = apply(cache, message("0/10", "0/20"), last)
assert cache == {"public.t": {"t:2": 2}, "public.u": {"u:1": 1}} and last == "0/20", cache
last = apply(cache, message("0/30", "0/40"), last)
assert cache == {} and last == "0/40", "a gap drops everything"
cache = {"public.t": {"t:1": 1}}
last = apply(cache, {"prev_lsn": None, "lsn": None, "reset": True, "reason": "slot"}, last)
assert cache == {} and last is None, "a reset drops everything"
cache = {"public.t": {"t:1": 1, "t:2": 2, "tt": 3}}
last = apply(cache, message(None, "0/50", ["t:*"]), last)
assert cache == {"public.t": {"tt": 3}}, cache
print("ok")
"#;

#[tokio::test]
async fn client_example_drops_everything_after_a_gap_or_reset() {
    let python = python("examples/broadcast_client.py needs a Python with the redis package");
    let out = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(GAP_CHECKS)
        .arg(repo().join("examples"))
        // Importing the example must not leave examples/__pycache__ behind.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {}: {e}", python.display()));
    assert!(
        out.status.success() && out.stdout == b"ok\n",
        "gap checks failed ({}):\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A restored or replaced database starts again at lower LSNs than the chain recorded: the slot
/// walsweep creates there restarts the chain, so nothing is skipped as "already published".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_created_on_a_new_database_restarts_the_chain() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    // What a previous database with far higher LSNs left behind.
    let _: () = conn
        .set(format!("{STREAM}:last_lsn"), "00000FFF00000000 FFF/0")
        .await
        .expect("SET");
    let mut rx = subscribe(&redis, CHANNEL).await;
    let daemon = start(config(&pg, &redis, "app", "bcast_moved", RULES));
    expect_slot_created_reset(&mut rx).await;
    let client = pg.client("app").await;
    wait_streaming(&client, "bcast_moved").await;
    let committed = run_txn(&client, "INSERT INTO articles (id, title) VALUES (1, 'x')").await;
    let mut received = Vec::new();
    receive_until_xid(&mut rx, &mut received, committed.xid, 30).await;
    let messages = assert_chain(&received, Json::Null);
    assert_eq!(messages.len(), 1);
    daemon.stop().await;
}
