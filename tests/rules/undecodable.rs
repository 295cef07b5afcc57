//! A relation whose name is not UTF-8 (possible in a SQL_ASCII database) is skipped when no rule
//! names it, and stops the stream with a clear error when one does.

use std::time::Duration;

use super::{config, set_keys, start, wait_gone};
use crate::stream::harness;
use crate::support::{self, Postgres, Redis};

/// `café` in Latin-1: the 0xe9 byte alone is not valid UTF-8.
const ODD: &str = "convert_from('\\x636166e9'::bytea, 'SQL_ASCII')";

/// A database that stores names as raw bytes, so a table name can be any byte string.
fn sql_ascii_database(pg: &Postgres) {
    pg.psql(
        "postgres",
        "CREATE DATABASE odd ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    );
}

/// Runs `sql` with `%I` replaced by the odd name, quoted (psql's scripts must be UTF-8 text).
fn with_odd_name(pg: &Postgres, sql: &str) {
    pg.psql(
        "odd",
        &format!("DO $$ BEGIN EXECUTE format('{sql}', {ODD}); END $$"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_to_a_table_no_rule_names_with_a_non_utf8_name_are_skipped() {
    support::init_tracing();
    let pg = Postgres::start();
    sql_ascii_database(&pg);
    pg.psql("odd", "CREATE TABLE items (id int PRIMARY KEY, v int)");
    with_odd_name(&pg, "CREATE TABLE %I (id int PRIMARY KEY, v int)");
    pg.psql("odd", "CREATE PUBLICATION pub FOR ALL TABLES");
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let daemon = start(config(
        &pg,
        &redis,
        "odd",
        "odd_skip",
        "[[table]]\nname = \"public.items\"\nkeys = [\"item:{id}\"]\n",
    ));
    let client = pg.client("odd").await;
    harness::wait_streaming(&client, "odd_skip").await;

    for id in 1..=3 {
        with_odd_name(&pg, &format!("INSERT INTO %I VALUES ({id}, 0)"));
        with_odd_name(&pg, &format!("UPDATE %I SET v = 1 WHERE id = {id}"));
        let key = format!("item:{id}");
        set_keys(&mut conn, &[&key]).await;
        // The odd change and the followed one in one transaction, too.
        pg.psql(
            "odd",
            &format!(
                "BEGIN; DO $$ BEGIN EXECUTE format('DELETE FROM %I WHERE id = {id}', {ODD}); END $$; \
                 INSERT INTO items VALUES ({id}, 0); COMMIT;"
            ),
        );
        wait_gone(&mut conn, &key, 20).await;
    }
    assert!(!daemon.task.is_finished(), "walsweep stopped");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_table_that_cannot_be_decoded_stops_with_what_to_do() {
    support::init_tracing();
    let pg = Postgres::start();
    sql_ascii_database(&pg);
    with_odd_name(&pg, "CREATE TABLE items (id int PRIMARY KEY, %I int)");
    pg.psql("odd", "CREATE PUBLICATION pub FOR ALL TABLES");
    let redis = Redis::start();
    let daemon = start(config(
        &pg,
        &redis,
        "odd",
        "odd_stop",
        "[[table]]\nname = \"public.items\"\nkeys = [\"item:{id}\"]\n",
    ));
    let client = pg.client("odd").await;
    harness::wait_streaming(&client, "odd_stop").await;
    pg.psql("odd", "INSERT INTO items VALUES (1, 0)");

    let result = tokio::time::timeout(Duration::from_secs(30), daemon.task)
        .await
        .expect("walsweep stops within 30s")
        .expect("no panic");
    let err = result.expect_err("a rule needs the table, so walsweep cannot go on");
    let chain = walsweep::telemetry::log::display_chain(&err);
    for part in ["public.items", "not valid UTF-8", "column 1 name", "rename"] {
        assert!(chain.contains(part), "{part:?} missing from: {chain}");
    }
}
