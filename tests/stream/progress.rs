use std::time::Duration;

use super::harness;
use crate::support::{self, Postgres};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text);
CREATE TABLE unpublished (id int, payload text);
CREATE PUBLICATION pub FOR TABLE items;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_position_waits_for_the_sink() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let mut run = harness::start(harness::source(&pg, "app", "held"), &[]);
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "held").await;

    run.hold.send(true).unwrap();
    pg.psql("app", "INSERT INTO items VALUES (1, 'held back')");
    // Several status intervals (200 ms) and keepalives pass while the sink holds the commit.
    let mut samples = Vec::new();
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        samples.push(harness::slot_confirmed_flush(&client, "held").await);
    }
    run.hold.send(false).unwrap();
    let txn = run.next_txn(10).await;
    for confirmed in &samples {
        assert!(
            *confirmed < txn.end_lsn,
            "confirmed_flush_lsn {confirmed} passed the unapplied commit ending at {}",
            txn.end_lsn
        );
    }
    harness::wait_for(10, || async {
        harness::slot_confirmed_flush(&client, "held").await >= txn.end_lsn
    })
    .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_up_stream_confirms_without_waiting_for_the_status_interval() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let mut source = harness::source(&pg, "app", "prompt");
    // Far longer than the test waits: only the caught-up update can confirm in time.
    source.status_interval_ms = 60_000;
    let mut run = harness::start(source, &[]);
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "prompt").await;
    for id in 1..=3 {
        pg.psql("app", &format!("INSERT INTO items VALUES ({id}, 'now')"));
        let txn = run.next_txn(10).await;
        // Unasked, the server asks for a reply only every few seconds once it waits for WAL.
        harness::wait_for(2, || async {
            harness::slot_confirmed_flush(&client, "prompt").await >= txn.end_lsn
        })
        .await;
    }
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slot_does_not_hold_wal_written_elsewhere() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.create_database("elsewhere");
    pg.psql("app", SCHEMA);
    pg.psql("elsewhere", "CREATE TABLE busy (id int, payload text)");
    let mut run = harness::start(harness::source(&pg, "app", "idle"), &[]);
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "idle").await;
    let start = harness::current_wal_lsn(&client).await;

    for round in 0..20 {
        pg.psql(
            "app",
            &format!("INSERT INTO unpublished SELECT g, repeat('u', 500) FROM generate_series(1, 200) g -- {round}"),
        );
        pg.psql(
            "elsewhere",
            "INSERT INTO busy SELECT g, repeat('e', 500) FROM generate_series(1, 200) g",
        );
    }
    let written = harness::current_wal_lsn(&client).await.bytes_since(start);
    assert!(
        written > 1_000_000,
        "workload wrote only {written} bytes of WAL"
    );

    // Nothing applied, yet the slot follows the end of WAL closely.
    harness::wait_for(20, || async {
        let wal = harness::current_wal_lsn(&client).await;
        let confirmed = harness::slot_confirmed_flush(&client, "idle").await;
        wal.bytes_since(confirmed) < 16 * 1024
    })
    .await;
    while let Ok(txn) = run.applied.try_recv() {
        assert!(
            txn.plan.changes.is_empty(),
            "no published change was made: {txn:?}"
        );
    }
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_committed_work_and_confirms_it() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let run = harness::start(harness::source(&pg, "app", "drain"), &[]);
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "drain").await;

    run.hold.send(true).unwrap();
    pg.psql(
        "app",
        "INSERT INTO items VALUES (1, 'in flight at shutdown')",
    );
    let commit_end = harness::current_wal_lsn(&client).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.shutdown.request();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !run.task.is_finished(),
        "stopped before applying committed work"
    );
    run.hold.send(false).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(20), run.task)
        .await
        .expect("drain finished")
        .unwrap()
        .unwrap();
    let mut applied = run.applied;
    let txn = applied
        .try_recv()
        .expect("the in-flight transaction was applied");
    assert!(txn.end_lsn <= commit_end);
    assert_eq!(summary.confirmed_lsn, txn.end_lsn);
    // The final status update moves the slot to the drained commit (the walsender applies it
    // asynchronously, so give it a moment).
    harness::wait_for(10, || async {
        harness::slot_confirmed_flush(&client, "drain").await >= txn.end_lsn
    })
    .await;
}
