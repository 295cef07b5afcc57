use walsweep::plan::Op;

use super::harness::{self, t, V};
use crate::support::{self, Postgres};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text, note text, big text);
ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE full_items (id int PRIMARY KEY, name text, big text);
ALTER TABLE full_items REPLICA IDENTITY FULL;
ALTER TABLE full_items ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE other (k text PRIMARY KEY, v int);
CREATE TABLE unpublished (id int);
CREATE PUBLICATION pub FOR TABLE items, full_items, other;
";

/// 32 kB of text stored out of line, so an UPDATE that leaves it alone sends it as unchanged TOAST.
const BIG: &str = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 1000) i)";

/// Waits until `pg_stat_replication_slots` counts at least `at_least` streamed transactions
/// for `slot`; panics after 30 s with the last count. Polled because before 15 the counters
/// reach the view through the statistics collector, a moment after the walsender streamed.
async fn wait_stream_txns(client: &tokio_postgres::Client, slot: &str, at_least: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let streamed: i64 = client
            .query_opt(
                "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .map_or(0, |row| row.get(0));
        if streamed >= at_least {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slot {slot}: {streamed} streamed transactions after 30s, expected {at_least}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn big_value(pg: &Postgres) -> String {
    pg.psql("app", &format!("SELECT {BIG}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_changes_decode_with_their_values() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let mut run = harness::start(harness::source(&pg, "app", "s1"), &[]);
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "s1").await;
    let big = big_value(&pg);

    pg.psql(
        "app",
        &format!(
            "BEGIN;
             INSERT INTO items VALUES (1, 'a', NULL, {BIG});
             INSERT INTO full_items VALUES (1, 'x', {BIG});
             INSERT INTO other VALUES ('k1', 5);
             INSERT INTO unpublished VALUES (1);
             COMMIT;"
        ),
    );
    pg.psql("app", "UPDATE items SET name = 'b' WHERE id = 1");
    pg.psql("app", "UPDATE full_items SET name = 'y' WHERE id = 1");
    pg.psql("app", "UPDATE items SET id = 2 WHERE id = 1");
    pg.psql("app", "DELETE FROM items WHERE id = 2");
    pg.psql("app", "DELETE FROM full_items WHERE id = 1");
    pg.psql(
        "app",
        "ALTER TABLE other ADD COLUMN extra text DEFAULT 'd'; INSERT INTO other VALUES ('k2', 6, 'e')",
    );
    pg.psql("app", "TRUNCATE other");
    pg.psql(
        "app",
        "INSERT INTO items (id, name) SELECT g, 'n' || g FROM generate_series(10, 12) g",
    );
    pg.psql(
        "app",
        "BEGIN;
         INSERT INTO items (id, name) VALUES (20, 'hinted');
         SELECT pg_logical_emit_message(true, 'walsweep', '{\"keys\":[\"a\"]}');
         SELECT pg_logical_emit_message(false, 'walsweep', 'not transactional');
         COMMIT;",
    );

    let txns = run
        .txns_until(30, |txn| {
            txn.plan
                .changes
                .iter()
                .any(|c| c.new_value("name") == Some(&t("hinted")))
        })
        .await;
    let non_empty: Vec<_> = txns.iter().filter(|t| !t.plan.changes.is_empty()).collect();
    assert_eq!(non_empty.len(), 10, "{txns:#?}");
    for pair in txns.windows(2) {
        assert!(pair[0].end_lsn < pair[1].commit_lsn, "commit order");
    }

    // 1: a multi-table transaction; NULL stays NULL; the unpublished table is absent.
    let first = &non_empty[0].plan.changes;
    assert_eq!(first.len(), 3);
    assert_eq!(first[0].table, "public.items");
    assert_eq!(first[0].op, Op::Insert);
    assert_eq!(
        first[0].new,
        Some(vec![t("1"), t("a"), V::Null, V::T(big.clone())])
    );
    assert_eq!(first[1].table, "public.full_items");
    assert_eq!(first[2].new, Some(vec![t("k1"), t("5")]));

    // 2: DEFAULT identity, key unchanged: no old tuple; the untouched TOAST column is unchanged.
    let upd = &non_empty[1].plan.changes[0];
    assert_eq!(upd.op, Op::Update);
    assert_eq!(upd.new, Some(vec![t("1"), t("b"), V::Null, V::Unchanged]));
    assert_eq!(
        upd.old_value("id"),
        Some(&t("1")),
        "old key is the unchanged key"
    );
    assert_eq!(upd.old_value("name"), Some(&V::Unknown));

    // 3: FULL identity: the whole old row, and the unchanged TOAST value taken from it.
    let full = &non_empty[2].plan.changes[0];
    assert_eq!(full.old, Some(vec![t("1"), t("x"), V::T(big.clone())]));
    assert_eq!(full.new, Some(vec![t("1"), t("y"), V::T(big.clone())]));

    // 4: key change under DEFAULT identity: the old key arrives as a key tuple.
    let moved = &non_empty[3].plan.changes[0];
    assert_eq!(
        moved.old,
        Some(vec![t("1"), V::Unknown, V::Unknown, V::Unknown])
    );
    assert_eq!(moved.new_value("id"), Some(&t("2")));

    // 5, 6: deletes carry the key (DEFAULT) or the whole row (FULL).
    let del = &non_empty[4].plan.changes[0];
    assert_eq!(
        (del.op, del.old_value("id"), del.new.clone()),
        (Op::Delete, Some(&t("2")), None)
    );
    let del_full = &non_empty[5].plan.changes[0];
    assert_eq!(del_full.old, Some(vec![t("1"), t("y"), V::T(big)]));

    // 7: ALTER TABLE mid-stream: the new shape is used.
    let altered = &non_empty[6].plan.changes[0];
    assert_eq!(altered.columns, vec!["k", "v", "extra"]);
    assert_eq!(altered.new, Some(vec![t("k2"), t("6"), t("e")]));

    // 8: TRUNCATE.
    let trunc = &non_empty[7].plan.changes;
    assert_eq!(
        (trunc.len(), trunc[0].op, trunc[0].table.as_str()),
        (1, Op::Truncate, "public.other")
    );

    // 9: a multi-row statement is one transaction of three changes.
    let multi = &non_empty[8];
    assert_eq!(multi.change_count, 3);
    let ids: Vec<_> = multi
        .plan
        .changes
        .iter()
        .map(|c| c.new_value("id").cloned())
        .collect();
    assert_eq!(ids, vec![Some(t("10")), Some(t("11")), Some(t("12"))]);

    // 10: the transactional message belongs to its transaction; the other one is not applied.
    let hinted = &non_empty[9].plan;
    assert_eq!(
        hinted.messages,
        vec![("walsweep".to_string(), "{\"keys\":[\"a\"]}".to_string())]
    );

    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transactions_stream_and_apply_once_at_commit() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let mut run = harness::start(harness::source(&pg, "app", "s2"), &[]);
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "s2").await;

    // Far beyond logical_decoding_work_mem (64kB): Postgres streams it before the commit.
    pg.psql(
        "app",
        "INSERT INTO items (id, name) SELECT g, repeat('x', 200) FROM generate_series(1000, 3999) g",
    );
    let big = run.next_txn(60).await;
    assert_eq!(big.change_count, 3000);
    assert_eq!(big.plan.changes.len(), 3000);

    wait_stream_txns(&client, "s2", 1).await;

    // A rolled-back streamed transaction applies nothing. It stays open until Postgres has
    // streamed it: since 18 a transaction that has already aborted when decoding reaches
    // logical_decoding_work_mem is discarded instead of streamed, so a ROLLBACK sent with the
    // rows would usually never reach walsweep as a stream abort.
    let writer = pg.client("app").await;
    writer
        .batch_execute(
            "BEGIN;
             INSERT INTO items (id, name) SELECT g, repeat('x', 200) FROM generate_series(10000, 12999) g;",
        )
        .await
        .unwrap();
    wait_stream_txns(&client, "s2", 2).await;
    writer.batch_execute("ROLLBACK").await.unwrap();
    pg.psql("app", "INSERT INTO items (id, name) VALUES (1, 'marker-1')");
    let marker = run.next_txn(60).await;
    assert_eq!(
        marker.plan.changes.len(),
        1,
        "only the marker: {:?}",
        marker.plan.changes.first()
    );
    assert_eq!(
        marker.plan.changes[0].new_value("name"),
        Some(&t("marker-1"))
    );

    // A rolled-back subtransaction of a streamed transaction is dropped; the rest applies.
    pg.psql(
        "app",
        "BEGIN;
         INSERT INTO items (id, name) VALUES (5000, 'kept-before');
         SAVEPOINT sp;
         INSERT INTO items (id, name) SELECT g, repeat('y', 200) FROM generate_series(20000, 22999) g;
         ROLLBACK TO SAVEPOINT sp;
         INSERT INTO items (id, name) SELECT g, repeat('z', 200) FROM generate_series(30000, 32999) g;
         COMMIT;",
    );
    let mixed = run.next_txn(60).await;
    let ids: Vec<i64> = mixed
        .plan
        .changes
        .iter()
        .filter_map(|c| match c.new_value("id") {
            Some(V::T(s)) => s.parse().ok(),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 3001, "5000 plus 30000..=32999");
    assert!(ids.contains(&5000));
    assert!(
        ids.iter().all(|&id| !(20000..23000).contains(&id)),
        "rolled-back rows applied"
    );

    // The savepoint transaction was streamed too (its commit is the one whose changes were
    // checked above): three streamed transactions, one of them aborted while streamed.
    wait_stream_txns(&client, "s2", 3).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_savepoint_per_row_applies_exactly_the_rows_not_rolled_back() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let mut run = harness::start(harness::source(&pg, "app", "s_sp"), &[]);
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "s_sp").await;

    // Each row in its own subtransaction (an EXCEPTION block), every 7th rolled back after
    // its INSERT; the whole first loop rolled back to an outer savepoint. Far beyond
    // logical_decoding_work_mem, so Postgres streams it (and its subtransaction aborts).
    let each_row = |base: u32| {
        format!(
            "DO $$ BEGIN FOR i IN 1..3000 LOOP
               BEGIN
                 INSERT INTO items (id, name) VALUES ({base} + i, repeat('s', 200));
                 IF i % 7 = 0 THEN RAISE EXCEPTION 'skip'; END IF;
               EXCEPTION WHEN raise_exception THEN NULL;
               END;
             END LOOP; END $$;"
        )
    };
    pg.psql(
        "app",
        &format!(
            "BEGIN;
             SAVEPOINT outer_sp;
             {}
             ROLLBACK TO SAVEPOINT outer_sp;
             {}
             COMMIT;",
            each_row(200_000),
            each_row(100_000)
        ),
    );
    let txn = run.next_txn(60).await;
    let mut ids: Vec<i64> = txn
        .plan
        .changes
        .iter()
        .filter_map(|c| match c.new_value("id") {
            Some(V::T(s)) => s.parse().ok(),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    let expected: Vec<i64> = (1..=3000)
        .filter(|i| i % 7 != 0)
        .map(|i| 100_000 + i)
        .collect();
    assert_eq!(ids.len(), expected.len());
    assert_eq!(ids, expected);

    wait_stream_txns(&client, "s_sp", 1).await;
    run.stop().await;
}
