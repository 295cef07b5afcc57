use std::collections::BTreeSet;
use std::time::Duration;

use super::harness::{self, V};
use crate::support::{self, Postgres, PostgresOptions};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text);
CREATE PUBLICATION pub FOR TABLE items;
";

fn inserted_ids(
    txns: &[walsweep::stream::assembler::CommittedTxn<harness::Recorded>],
) -> BTreeSet<i64> {
    txns.iter()
        .flat_map(|t| t.plan.changes.iter())
        .filter_map(|c| match c.new_value("id") {
            Some(V::T(s)) => s.parse().ok(),
            _ => None,
        })
        .collect()
}

/// Inserts ids `from..to`, one transaction each, from a separate task.
fn insert_range(pg: &Postgres, from: i64, to: i64) -> tokio::task::JoinHandle<()> {
    let url = pg.url("app");
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("writer connects");
        tokio::spawn(conn);
        for id in from..to {
            client
                .execute("INSERT INTO items VALUES ($1::int8::int, 'w')", &[&id])
                .await
                .expect("insert");
            if id % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_walsender_reconnects_without_missing_commits() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let mut run = harness::start(harness::source(&pg, "app", "killed"), &[]);
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "killed").await;

    let writer = insert_range(&pg, 1, 1501);
    let mut kills = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = client
            .query_one(
                "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots \
                 WHERE slot_name = 'killed' AND active_pid IS NOT NULL",
                &[],
            )
            .await
            .unwrap();
        kills += killed.get::<_, i64>(0);
        harness::wait_streaming(&client, "killed").await;
    }
    writer.await.unwrap();
    assert!(kills >= 2, "walsender was terminated {kills} times");

    let mut seen = BTreeSet::new();
    while seen.len() < 1500 {
        let txn = run.next_txn(30).await;
        seen.extend(inserted_ids(std::slice::from_ref(&txn)));
    }
    assert_eq!(seen, (1..=1500).collect::<BTreeSet<_>>());
    let summary = run.stop().await;
    assert!(
        summary.reconnects >= 2,
        "reconnected {} times",
        summary.reconnects
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_hard_stop_resumes_without_missing_commits() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let client = pg.client("app").await;

    let mut first = harness::start(harness::source(&pg, "app", "crash"), &[]);
    harness::wait_streaming(&client, "crash").await;
    insert_range(&pg, 1, 301).await.unwrap();
    let mut seen = BTreeSet::new();
    while !seen.contains(&300) {
        seen.extend(inserted_ids(&[first.next_txn(30).await]));
    }
    // Hold the sink and write more: these commits are received but never confirmed.
    first.hold.send(true).unwrap();
    insert_range(&pg, 301, 401).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Crash: the task is dropped mid-flight, no drain, no final status update.
    first.task.abort();
    let _ = first.task.await;
    insert_range(&pg, 401, 501).await.unwrap();

    let mut second = harness::start(harness::source(&pg, "app", "crash"), &[]);
    while !(1..=500).all(|id| seen.contains(&id)) {
        seen.extend(inserted_ids(&[second.next_txn(30).await]));
    }
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_errors_are_retried_without_losing_the_batch() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let mut run = harness::start(harness::source(&pg, "app", "retry"), &[]);
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "retry").await;
    run.failures.store(3, std::sync::atomic::Ordering::SeqCst);
    pg.psql("app", "INSERT INTO items VALUES (7, 'retried')");
    let txn = run.next_txn(30).await;
    assert_eq!(inserted_ids(&[txn]), BTreeSet::from([7]));
    assert_eq!(run.failures.load(std::sync::atomic::Ordering::SeqCst), 0);
    run.stop().await;
}

async fn run_to_error(source: walsweep::config::SourceConfig, tables: &[&str]) -> String {
    let run = harness::start(source, tables);
    let result = tokio::time::timeout(Duration::from_secs(30), run.task)
        .await
        .expect("fatal errors stop the pipeline")
        .unwrap();
    match result {
        Err(e) => walsweep::telemetry::log::display_chain(&e),
        Ok(s) => panic!("expected an error, ran to {s:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfixable_setup_errors_stop_with_what_to_do() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", "CREATE TABLE items (id int PRIMARY KEY)");

    let mut no_pub = harness::source(&pg, "app", "nopub");
    no_pub.create_publication = false;
    let msg = run_to_error(no_pub, &["public.items"]).await;
    assert!(msg.contains("publication \"pub\" does not exist"), "{msg}");
    assert!(
        msg.contains("CREATE PUBLICATION \"pub\" FOR TABLE \"public\".\"items\""),
        "{msg}"
    );

    pg.psql("app", "CREATE PUBLICATION pub FOR TABLE items");
    let mut no_slot = harness::source(&pg, "app", "noslot");
    no_slot.create_slot = false;
    let msg = run_to_error(no_slot, &[]).await;
    assert!(
        msg.contains("replication slot \"noslot\" does not exist"),
        "{msg}"
    );
    assert!(
        msg.contains("pg_create_logical_replication_slot('noslot', 'pgoutput')"),
        "{msg}"
    );

    let mut no_db = harness::source(&pg, "missing_db", "s");
    no_db.reconnect_max_ms = 100;
    let msg = run_to_error(no_db, &[]).await;
    assert!(msg.contains("missing_db"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_reported_with_the_fix() {
    support::init_tracing();
    let pg = Postgres::start_with(PostgresOptions {
        extra_settings: vec![("wal_level".into(), "replica".into())],
        ..Default::default()
    });
    let msg = run_to_error(harness::source(&pg, "postgres", "s"), &[]).await;
    assert!(msg.contains("wal_level is \"replica\""), "{msg}");
    assert!(
        msg.contains("ALTER SYSTEM SET wal_level = logical"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_sink_outage_releases_the_slot_so_postgres_can_shut_down() {
    support::init_tracing();
    let mut pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let mut run = harness::start(harness::source(&pg, "app", "outage"), &[]);
    let client = pg.client("app").await;
    harness::wait_streaming(&client, "outage").await;

    // The sink fails from now on (retryable): nothing is confirmed, and after the configured
    // outage (1 s here) walsweep lets go of the slot.
    run.failures
        .store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
    pg.psql("app", "INSERT INTO items VALUES (1, 'during the outage')");
    harness::wait_for(20, || async {
        client
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'outage'",
                &[],
            )
            .await
            .map(|r| !r.get::<_, bool>(0))
            .unwrap_or(false)
    })
    .await;
    // With no walsender waiting for confirmations, a fast shutdown goes through.
    drop(client);
    pg.stop(support::ShutdownMode::Fast);
    pg.restart();
    let client = pg.client("app").await;
    pg.psql("app", "INSERT INTO items VALUES (2, 'after the restart')");

    // The sink recovers: walsweep resumes and applies both commits, nothing lost.
    run.failures.store(0, std::sync::atomic::Ordering::SeqCst);
    let mut seen = BTreeSet::new();
    while !(seen.contains(&1) && seen.contains(&2)) {
        seen.extend(inserted_ids(&[run.next_txn(30).await]));
    }
    harness::wait_streaming(&client, "outage").await;
    run.stop().await;
}
