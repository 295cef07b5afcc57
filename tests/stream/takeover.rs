use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use walsweep::config::SlotLostPolicy;

use super::harness::{self, V};
use crate::support::{self, Postgres, PostgresOptions};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text);
CREATE PUBLICATION pub FOR TABLE items;
";

fn ids(txn: &walsweep::stream::assembler::CommittedTxn<harness::Recorded>) -> Vec<i64> {
    txn.plan
        .changes
        .iter()
        .filter_map(|c| match c.new_value("id") {
            Some(V::T(s)) => s.parse().ok(),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_active_instance_dies() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let client = pg.client("app").await;
    let mut active = harness::start(harness::source(&pg, "app", "shared"), &[]);
    harness::wait_streaming(&client, "shared").await;
    let active_pid: i32 = client
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'shared'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut standby = harness::start(harness::source(&pg, "app", "shared"), &[]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !standby.task.is_finished(),
        "the standby waits instead of failing"
    );

    let mut seen = BTreeSet::new();
    pg.psql(
        "app",
        "INSERT INTO items SELECT g, 'before' FROM generate_series(1, 50) g",
    );
    while seen.len() < 50 {
        seen.extend(ids(&active.next_txn(20).await));
    }
    // The active instance dies without any goodbye.
    active.task.abort();
    let died = Instant::now();
    pg.psql(
        "app",
        "INSERT INTO items SELECT g, 'after' FROM generate_series(51, 100) g",
    );
    harness::wait_for(20, || async {
        client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'shared' AND active \
                 AND active_pid <> $1",
                &[&active_pid],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let takeover = died.elapsed();
    while !(1..=100).all(|id| seen.contains(&id)) {
        seen.extend(ids(&standby.next_txn(20).await));
    }
    eprintln!("standby took over {takeover:?} after the active instance died");
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
    standby.stop().await;
}

fn source_with_policy(pg: &Postgres, policy: SlotLostPolicy) -> walsweep::config::SourceConfig {
    let mut s = harness::source(pg, "app", "fragile");
    s.on_slot_lost = policy;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_slot_fails_or_is_recreated_with_a_reset() {
    support::init_tracing();
    let pg = Postgres::start_with(PostgresOptions {
        extra_settings: vec![("max_slot_wal_keep_size".into(), "2MB".into())],
        ..Default::default()
    });
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let client = pg.client("app").await;

    let mut first = harness::start(source_with_policy(&pg, SlotLostPolicy::Fail), &[]);
    harness::wait_streaming(&client, "fragile").await;
    pg.psql("app", "INSERT INTO items VALUES (1, 'seen')");
    assert_eq!(ids(&first.next_txn(20).await), vec![1]);
    first.stop().await;

    // While walsweep is away, far more WAL than the slot may keep is written and recycled.
    pg.psql("app", "INSERT INTO items VALUES (2, 'missed')");
    pg.lose_slot("app", "fragile");

    let failing = harness::start(source_with_policy(&pg, SlotLostPolicy::Fail), &[]);
    let err = tokio::time::timeout(Duration::from_secs(30), failing.task)
        .await
        .expect("a lost slot stops walsweep")
        .unwrap()
        .expect_err("fail policy");
    let msg = walsweep::telemetry::log::display_chain(&err);
    assert!(
        msg.contains("replication slot \"fragile\" is lost"),
        "{msg}"
    );
    assert!(msg.contains("on_slot_lost = \"recreate\""), "{msg}");
    assert!(
        msg.contains("Postgres keeps at most max_slot_wal_keep_size (2MB) of WAL for a slot"),
        "{msg}"
    );
    assert_eq!(failing.resets.load(Ordering::SeqCst), 0);

    let mut recreating = harness::start(source_with_policy(&pg, SlotLostPolicy::Recreate), &[]);
    harness::wait_streaming(&client, "fragile").await;
    assert_eq!(
        pg.psql(
            "app",
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'fragile'"
        ),
        "reserved"
    );
    pg.psql("app", "INSERT INTO items VALUES (3, 'after recreate')");
    let txn = recreating.next_txn(20).await;
    assert_eq!(ids(&txn), vec![3]);
    // The caches were told to drop everything (row 2's change was never seen), before row 3.
    assert_eq!(recreating.resets.load(Ordering::SeqCst), 1);
    recreating.stop().await;
}
