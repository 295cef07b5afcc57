//! A sink that prints each committed transaction's touched rows: for watching the stream
//! before any Redis rule is configured.

use super::{Sink, SinkError};
use crate::assembler::CommittedTxn;
use crate::plan::touched::TouchedRows;

#[derive(Debug, Default)]
pub struct LogSink;

impl Sink<TouchedRows> for LogSink {
    async fn apply(&mut self, batch: &[CommittedTxn<TouchedRows>]) -> Result<(), SinkError> {
        for txn in batch {
            tracing::info!(
                xid = txn.xid,
                commit_lsn = %txn.commit_lsn,
                changes = txn.change_count,
                rows = txn.plan.rows.len(),
                truncated = txn.plan.truncated.len(),
                "committed"
            );
            for row in &txn.plan.rows {
                tracing::info!(table = %row.table, key = ?row.key, "touched row");
            }
        }
        Ok(())
    }
}
