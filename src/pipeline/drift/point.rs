//! A consistent point to compare at: a REPEATABLE READ snapshot, and walsweep's published
//! applied position past every commit that snapshot sees.
//!
//! The snapshot is taken by the transaction's first query, which also reads the WAL insert
//! position. Every commit the snapshot sees wrote its commit record before the snapshot was
//! taken, so before that position; once walsweep's applied position (`walsweep:<database>/
//! <slot>:applied`) reaches it, Redis holds the effects of everything the snapshot sees.
//! Redis may hold more (later commits): that is what rechecks are for (`check`).
//!
//! A recheck's point must also see every commit Redis held at the previous reads. walsweep
//! may apply a commit as soon as its WAL is flushed, before the committing backend has made it
//! visible (a moment, or longer on a busy machine, or with a synchronous standby). So a recheck
//! point first waits until the transactions running when it is asked for have ended, and a
//! snapshot that still counts a committed transaction as running is marked `in_gap`.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use super::DriftError;
use crate::pipeline::rows::STREAM_TEXT_FORMS;
use crate::sink::redis::readback::Readback;

/// The first query of the transaction: the LSN every visible commit precedes (the replay
/// position on a standby, where nothing is inserted), and how many transactions the snapshot
/// counts as running although they already committed (`pg_xact_status`): the moment between a
/// commit's WAL flush and its visibility, when walsweep may already have applied it.
const POINT_SQL: &str = "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
     ELSE pg_current_wal_insert_lsn() END - '0/0'::pg_lsn)::text, \
     (SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot()) AS x \
      WHERE pg_xact_status(x) = 'committed')::text";

/// How often a snapshot taken inside that moment is taken again before it is used as it is.
const GAP_RETRIES: u32 = 50;

/// Polling interval of the applied position.
const POLL: Duration = Duration::from_millis(10);

/// How long a recheck point waits for the transactions running when it was asked for to end.
/// Committing ones end within moments; what is still running after this is taken for a long
/// transaction that has not committed, so cannot be in Redis yet.
const RUNNING_WAIT: Duration = Duration::from_secs(2);

/// Whether the transactions in progress in snapshot `$1` (text) are all still running.
const STILL_RUNNING_SQL: &str =
    "SELECT count(*)::text FROM pg_snapshot_xip($1::text::pg_snapshot) AS x \
     WHERE x IN (SELECT pg_snapshot_xip(pg_current_snapshot()))";

/// An open consistent point (the transaction stays open until `close`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Point {
    pub(crate) lsn: u64,
    /// Taken while a committed transaction was still invisible: a recheck at this point cannot
    /// confirm drift (Redis may hold that commit, the snapshot does not).
    pub(crate) in_gap: bool,
}

fn query_failed(what: &str) -> impl FnOnce(tokio_postgres::Error) -> DriftError + '_ {
    move |source| DriftError::Query {
        what: what.to_string(),
        source,
    }
}

/// Opens the transaction and waits until walsweep has applied up to its snapshot. A `recheck`
/// point first waits for the transactions running now to end (see the module docs).
pub(crate) async fn open(
    client: &Client,
    redis: &mut Readback,
    position_key: &str,
    timeout: Duration,
    recheck: bool,
) -> Result<Point, DriftError> {
    if recheck {
        wait_running(client).await?;
    }
    let mut attempt = 0;
    let point = loop {
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; {STREAM_TEXT_FORMS}"
            ))
            .await
            .map_err(query_failed("BEGIN"))?;
        let messages = client
            .simple_query(POINT_SQL)
            .await
            .map_err(query_failed("take a snapshot and the WAL position"))?;
        let (lsn, committed_invisible) = messages
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some((
                    row.get(0).and_then(|v| v.parse::<u64>().ok()),
                    row.get(1).and_then(|v| v.parse::<u64>().ok()),
                )),
                _ => None,
            })
            .unwrap_or((None, None));
        let Some(lsn) = lsn else {
            return Err(DriftError::Unexpected(
                "Postgres returned no WAL position for the snapshot".into(),
            ));
        };
        let in_gap = committed_invisible.unwrap_or(0) > 0;
        attempt += 1;
        if !in_gap || attempt > GAP_RETRIES {
            break Point { lsn, in_gap };
        }
        close(client).await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    wait_applied(redis, position_key, point.lsn, timeout).await?;
    Ok(point)
}

/// Waits (up to `RUNNING_WAIT`) until no transaction running now is still running.
async fn wait_running(client: &Client) -> Result<(), DriftError> {
    let first = |messages: Vec<SimpleQueryMessage>| {
        messages.into_iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
    };
    let running = client
        .simple_query("SELECT pg_current_snapshot()::text")
        .await
        .map(first)
        .map_err(query_failed("read the running transactions"))?
        .unwrap_or_default();
    let started = Instant::now();
    while started.elapsed() < RUNNING_WAIT {
        let still: u64 = client
            .query_one(STILL_RUNNING_SQL, &[&running])
            .await
            .map_err(query_failed("wait for running transactions to end"))?
            .get::<_, String>(0)
            .parse()
            .unwrap_or(0);
        if still == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Ends the point's transaction (read-only: nothing to keep).
pub(crate) async fn close(client: &Client) -> Result<(), DriftError> {
    client
        .batch_execute("ROLLBACK")
        .await
        .map_err(query_failed("end the snapshot"))
}

/// Polls the published position until it reaches `lsn`.
async fn wait_applied(
    redis: &mut Readback,
    key: &str,
    lsn: u64,
    timeout: Duration,
) -> Result<(), DriftError> {
    let started = Instant::now();
    loop {
        let published = redis.get(key).await?;
        let position = published
            .as_deref()
            .and_then(|v| v.trim().parse::<u64>().ok());
        if position.is_some_and(|p| p >= lsn) {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(DriftError::NotApplied {
                key: key.to_string(),
                lsn,
                published: position,
                waited: timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
