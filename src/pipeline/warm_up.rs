//! Warm-up: load every mirrored table into Redis from one consistent snapshot.
//!
//! When walsweep creates the slot it can export the snapshot the slot starts from; loading the
//! mirrors inside that snapshot and then streaming from the slot misses nothing and applies
//! nothing twice (`source.warm_up = true`, or `walsweep snapshot` before the first start).
//!
//! With a slot that already exists there is no matching snapshot. `walsweep snapshot` then
//! loads a fresh one and the stream replays from the slot's confirmed position, which is older:
//! rows briefly go back to earlier versions while the daemon catches up, and end exact once it
//! passes the snapshot (every later change is replayed in order). That is why the command
//! refuses to run while a daemon streams from the slot: its writes would race the load.
//!
//! Rows are read in Postgres' text form under the replication session's settings and planned
//! by the same `MirrorPlanner` as streamed INSERTs, so a loaded row is byte-for-byte what
//! streaming would have written.

use std::sync::Arc;
use std::time::Instant;

use crate::config::{Config, MatroskaConfig, RedisConfig};
use crate::pg::catalog::{self, CatalogError};
use crate::pg::replication::ConnectParams;
use crate::pipeline::rows;
use crate::plan::mirror::{MirrorOp, MirrorPlan, MirrorRule};
use crate::plan::rules::FallbackCause;
use crate::plan::{OldRow, Op, RowChange};
use crate::sink::redis::RedisSink;
use crate::sink::SinkError;

/// Rows fetched and written per round.
const ROWS_PER_FETCH: usize = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("warm-up query failed: {what}")]
    Query {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("warm-up could not write to Redis")]
    Sink(#[from] SinkError),
    #[error("table {table} (mirrored by [[table]] {index}) does not exist in the source database; fix the name or create the table")]
    NoTable { table: String, index: usize },
}

impl SnapshotError {
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            SnapshotError::Catalog(e) => e.is_retryable(),
            SnapshotError::Query { source, .. } => source.is_closed(),
            SnapshotError::Sink(e) => e.is_retryable(),
            SnapshotError::NoTable { .. } => false,
        }
    }
}

/// What a warm-up loaded.
#[derive(Debug, Default, Clone)]
pub struct WarmUpSummary {
    /// (table, rows) in load order.
    pub tables: Vec<(String, u64)>,
}

/// The mirrors a warm-up loads and where to.
pub(crate) struct WarmUp {
    mirrors: Vec<Arc<MirrorRule>>,
    redis: RedisConfig,
    matroska: MatroskaConfig,
}

impl WarmUp {
    /// `None` when no mirror can be loaded (none configured, or all `only_if_present`, which
    /// never creates entries).
    pub(crate) fn from_config(
        config: &Config,
    ) -> Result<Option<WarmUp>, crate::plan::mirror::MirrorRuleError> {
        let mirrors: Vec<_> = crate::plan::mirror::compile_all(&config.tables)?
            .into_iter()
            .filter(|m| !m.mode.only_if_present)
            .collect();
        Ok((!mirrors.is_empty()).then(|| WarmUp {
            mirrors,
            redis: config.redis.clone(),
            matroska: config.matroska.clone(),
        }))
    }

    /// Clears and loads every mirror, inside `snapshot` when given (exported by the slot's
    /// creation), else inside a fresh repeatable-read snapshot.
    pub(crate) async fn load(
        &self,
        params: &ConnectParams,
        snapshot: Option<&str>,
    ) -> Result<WarmUpSummary, SnapshotError> {
        let started = Instant::now();
        let mut sink = RedisSink::new(&self.redis, &self.matroska)?;
        let client = catalog::connect(params).await?;
        let query = |what: &str| {
            let what = what.to_string();
            move |source| SnapshotError::Query { what, source }
        };
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(query("BEGIN"))?;
        if let Some(name) = snapshot {
            // First statement of the transaction, as Postgres requires.
            client
                .batch_execute(&format!(
                    "SET TRANSACTION SNAPSHOT {}",
                    crate::pg::replication::quote_literal(name)
                ))
                .await
                .map_err(query(
                    "SET TRANSACTION SNAPSHOT (the exported snapshot is gone?)",
                ))?;
        }
        // The text forms the decoder expects, as in the replication session.
        client
            .batch_execute(rows::STREAM_TEXT_FORMS)
            .await
            .map_err(query("session settings"))?;

        let mut tables: Vec<(usize, String)> = Vec::new();
        for m in &self.mirrors {
            if !tables.iter().any(|(_, t)| *t == m.table_name) {
                tables.push((m.table, m.table_name.clone()));
            }
        }
        // Stale entries from before (rows deleted while nobody watched) must not survive.
        let prefixes: Vec<String> = self.mirrors.iter().flat_map(|m| m.prefixes()).collect();
        let cleared = sink
            .apply_mirror_ops(
                [&MirrorOp::Clear {
                    prefixes,
                    cause: FallbackCause::SlotRecreated,
                }],
                0,
            )
            .await?;
        tracing::info!(keys = cleared.cleared_keys, "warm-up: cleared mirror keys");

        let mut summary = WarmUpSummary::default();
        for (index, table) in tables {
            let rows = self.load_table(&client, &mut sink, index, &table).await?;
            summary.tables.push((table, rows));
        }
        client
            .batch_execute("COMMIT")
            .await
            .map_err(query("COMMIT"))?;
        tracing::info!(
            tables = summary.tables.len(),
            rows = summary.tables.iter().map(|(_, n)| n).sum::<u64>(),
            seconds = started.elapsed().as_secs_f64(),
            "warm-up finished"
        );
        Ok(summary)
    }

    async fn load_table(
        &self,
        client: &tokio_postgres::Client,
        sink: &mut RedisSink,
        index: usize,
        table: &str,
    ) -> Result<u64, SnapshotError> {
        let relation = rows::relation_info(client, table)
            .await
            .map_err(|source| SnapshotError::Query {
                what: format!("describe {table}"),
                source,
            })?
            .ok_or_else(|| SnapshotError::NoTable {
                table: table.to_string(),
                index,
            })?;
        let mut planner = rows::planner_for(
            client,
            &relation,
            self.mirrors
                .iter()
                .filter(|m| m.table_name == table)
                .cloned()
                .collect(),
        )
        .await?;
        let qualified = rows::qualified(&relation);
        let total: i64 = client
            .query_one(&format!("SELECT count(*) FROM {qualified}"), &[])
            .await
            .map_err(|source| SnapshotError::Query {
                what: format!("count rows of {table}"),
                source,
            })?
            .get(0);
        tracing::info!(%table, rows = total, "warm-up: loading");
        let cursor = "walsweep_warm_up";
        let fail = |what: String| move |source| SnapshotError::Query { what, source };
        client
            .batch_execute(&format!(
                "DECLARE {cursor} NO SCROLL CURSOR FOR SELECT * FROM {qualified}"
            ))
            .await
            .map_err(fail(format!("read {table}")))?;
        let now_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let mut loaded: u64 = 0;
        let mut last_report = Instant::now();
        loop {
            // simple_query: rows in text form, exactly what pgoutput sends.
            let messages = client
                .simple_query(&format!("FETCH {ROWS_PER_FETCH} FROM {cursor}"))
                .await
                .map_err(fail(format!("read {table}")))?;
            let mut plan = MirrorPlan::default();
            let mut fetched = 0u64;
            for message in &messages {
                let tokio_postgres::SimpleQueryMessage::Row(row) = message else {
                    continue;
                };
                fetched += 1;
                let values = rows::tuple_values(row, 0);
                planner.plan_change(
                    &RowChange {
                        relation: &relation,
                        op: Op::Insert,
                        old: OldRow::Absent,
                        new: Some(&values),
                    },
                    &mut plan,
                );
            }
            if fetched == 0 {
                break;
            }
            sink.apply_mirror_ops(plan.ops(), now_secs).await?;
            loaded += fetched;
            crate::telemetry::metrics::snapshot_rows(fetched);
            if last_report.elapsed().as_secs() >= 2 {
                last_report = Instant::now();
                tracing::info!(%table, loaded, of = total, "warm-up: loading");
            }
        }
        client
            .batch_execute(&format!("CLOSE {cursor}"))
            .await
            .map_err(fail(format!("read {table}")))?;
        tracing::info!(%table, rows = loaded, "warm-up: loaded");
        Ok(loaded)
    }
}
