//! The pgoutput protocol per server: the version each major speaks is negotiated, protocol 1
//! delivers large transactions whole at commit, prepared transactions apply at COMMIT PREPARED
//! only. `scripts/test-matrix` runs these on every major from 14 to 18.

use std::time::Duration;

use super::harness::{self, t};
use crate::support::binaries::server_major;
use crate::support::{self, Postgres, PostgresOptions};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text);
CREATE PUBLICATION pub FOR TABLE items;
";

/// What walsweep should ask a server of `major` for: (proto_version, streaming option).
fn expected_protocol(major: u32) -> (&'static str, Option<&'static str>) {
    match major {
        14 => ("2", Some("on")),
        15 => ("3", Some("on")),
        _ => ("4", Some("parallel")),
    }
}

/// The `START_REPLICATION` command of the slot's walsender, as `pg_stat_activity` shows it.
async fn start_command(client: &tokio_postgres::Client, slot: &str) -> String {
    let row = client
        .query_one(
            "SELECT a.query FROM pg_stat_activity a \
             JOIN pg_replication_slots s ON s.active_pid = a.pid WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .expect("walsender query");
    row.get(0)
}

/// `(stream_txns, spill_txns)` of the slot, once the statistics show any transaction at all
/// (they are flushed by the walsender now and then, not per transaction).
async fn slot_stats(client: &tokio_postgres::Client, slot: &str) -> (i64, i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let row = client
            .query_one(
                "SELECT stream_txns, spill_txns FROM pg_stat_replication_slots \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("slot stats");
        let stats: (i64, i64) = (row.get(0), row.get(1));
        if stats.0 + stats.1 > 0 {
            return stats;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot's statistics never showed a transaction"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_protocol_the_server_speaks_is_negotiated() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let mut run = harness::start(harness::source(&pg, "app", "proto_newest"), &[]);
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "proto_newest").await;

    let command = start_command(&client, "proto_newest").await;
    let (version, streaming) = expected_protocol(server_major());
    assert!(
        command.contains(&format!("\"proto_version\" '{version}'")),
        "Postgres {} should get protocol {version}: {command}",
        server_major()
    );
    if let Some(mode) = streaming {
        assert!(
            command.contains(&format!("\"streaming\" '{mode}'")),
            "Postgres {} should stream with {mode}: {command}",
            server_major()
        );
    }

    // And it decodes what that protocol sends, a streamed transaction included.
    pg.psql(
        "app",
        "INSERT INTO items (id, name) SELECT g, repeat('x', 200) FROM generate_series(1, 3000) g",
    );
    assert_eq!(run.next_txn(60).await.plan.changes.len(), 3000);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_1_delivers_a_large_transaction_whole_at_commit_without_streaming() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let mut source = harness::source(&pg, "app", "proto_one");
    source.protocol_version = Some(1);
    let mut run = harness::start(source, &[]);
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "proto_one").await;
    let command = start_command(&client, "proto_one").await;
    assert!(command.contains("\"proto_version\" '1'"), "{command}");
    assert!(!command.contains("streaming"), "{command}");

    // Far beyond logical_decoding_work_mem (64kB): without streaming, Postgres spills it.
    pg.psql(
        "app",
        "BEGIN;
         INSERT INTO items (id, name) SELECT g, repeat('x', 200) FROM generate_series(1, 3000) g;
         SAVEPOINT sp;
         INSERT INTO items (id, name) SELECT g, repeat('y', 200) FROM generate_series(5000, 7999) g;
         ROLLBACK TO SAVEPOINT sp;
         COMMIT;",
    );
    let big = run.next_txn(60).await;
    assert_eq!(
        big.plan.changes.len(),
        3000,
        "only the rows not rolled back"
    );
    let (streamed, spilled) = slot_stats(&client, "proto_one").await;
    assert_eq!(streamed, 0, "protocol 1 must not stream");
    assert!(spilled >= 1, "the transaction should have been spilled");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_transactions_apply_at_commit_prepared_and_never_when_rolled_back() {
    support::init_tracing();
    let pg = Postgres::start_with(PostgresOptions {
        extra_settings: vec![("max_prepared_transactions".into(), "10".into())],
        ..Default::default()
    });
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let mut run = harness::start(harness::source(&pg, "app", "proto_prepared"), &[]);
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "proto_prepared").await;

    // Prepared, then a marker committed: only the marker is applied.
    pg.psql(
        "app",
        "BEGIN; INSERT INTO items VALUES (1, 'prepared'); PREPARE TRANSACTION 'a';
         INSERT INTO items VALUES (2, 'marker-2');",
    );
    let marker = run.next_txn(30).await;
    assert_eq!(marker.plan.changes.len(), 1);
    assert_eq!(
        marker.plan.changes[0].new_value("name"),
        Some(&t("marker-2"))
    );

    pg.psql("app", "COMMIT PREPARED 'a'");
    let committed = run.next_txn(30).await;
    assert_eq!(committed.plan.changes.len(), 1);
    assert_eq!(
        committed.plan.changes[0].new_value("name"),
        Some(&t("prepared"))
    );

    // Rolled back: nothing, the next marker comes first.
    pg.psql(
        "app",
        "BEGIN; INSERT INTO items VALUES (3, 'never'); PREPARE TRANSACTION 'b';
         ROLLBACK PREPARED 'b';
         INSERT INTO items VALUES (4, 'marker-4');",
    );
    let marker = run.next_txn(30).await;
    assert_eq!(marker.plan.changes.len(), 1);
    assert_eq!(
        marker.plan.changes[0].new_value("name"),
        Some(&t("marker-4"))
    );

    // Large enough to be streamed while in progress (14+), prepared, committed later.
    pg.psql(
        "app",
        "BEGIN;
         INSERT INTO items (id, name) SELECT g, repeat('z', 200) FROM generate_series(10000, 12999) g;
         PREPARE TRANSACTION 'c';
         INSERT INTO items VALUES (5, 'marker-5');",
    );
    let marker = run.next_txn(60).await;
    assert_eq!(marker.plan.changes.len(), 1, "the prepared rows must wait");
    tokio::time::sleep(Duration::from_millis(200)).await;
    pg.psql("app", "COMMIT PREPARED 'c'");
    let big = run.next_txn(60).await;
    assert_eq!(big.plan.changes.len(), 3000);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_the_server_does_not_speak_stops_with_the_versions_and_the_fix() {
    support::init_tracing();
    let major = server_major();
    if major >= 16 {
        eprintln!("skipped: Postgres {major} speaks every protocol walsweep does");
        return;
    }
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let mut source = harness::source(&pg, "app", "proto_unspoken");
    source.protocol_version = Some(4);
    let run = harness::start(source, &[]);
    let result = tokio::time::timeout(Duration::from_secs(30), run.task)
        .await
        .expect("walsweep should stop")
        .expect("no panic");
    let error = result.expect_err("protocol 4 on an older server must stop walsweep");
    let message = error.to_string();
    assert!(message.contains("needs Postgres 16 or newer"), "{message}");
    assert!(
        message.contains(&format!("the server is {major}.")),
        "{message}"
    );
    assert!(message.contains("source.protocol_version"), "{message}");
}
