//! Before streaming: what only a human can fix is checked, and the publication and slot are
//! created when the config allows it (with the warm-up when the slot is new).

use crate::config::SourceConfig;
use crate::pg::catalog;
use crate::pg::replication::{ConnectParams, ReplicationConnection};
use crate::telemetry::log::display_chain;

use super::warm_up::{WarmUp, WarmUpSummary};
use super::PipelineError;

/// What `prepare_source` did.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// This run created the slot.
    pub(crate) slot_created: bool,
    /// What the warm-up loaded, when it ran.
    pub(crate) warm_up: Option<WarmUpSummary>,
}

/// Checks what only a human can fix and creates the publication and slot when allowed to.
///
/// With `warm_up`, a slot created here exports its snapshot and the mirrors are loaded from it
/// before anything streams; if loading fails the slot is dropped again, so the next attempt
/// creates it and loads anew instead of streaming into half-loaded mirrors.
pub(crate) async fn prepare_source(
    source: &SourceConfig,
    params: &ConnectParams,
    tables: &[String],
    warm_up: Option<&WarmUp>,
) -> Result<Prepared, PipelineError> {
    let client = catalog::connect(params).await?;
    let wal_level = catalog::wal_level(&client).await?;
    if wal_level != "logical" {
        return Err(PipelineError::Setup(format!(
            "wal_level is {wal_level:?} on {}; logical replication needs \
             ALTER SYSTEM SET wal_level = logical and a server restart",
            params.target()
        )));
    }
    if !catalog::publication_exists(&client, &source.publication).await? {
        if !source.create_publication {
            return Err(PipelineError::Setup(format!(
                "publication {:?} does not exist and source.create_publication is false; \
                 create it with: {}",
                source.publication,
                catalog::create_publication_sql(&source.publication, tables)
            )));
        }
        if tables.is_empty() {
            return Err(PipelineError::Setup(format!(
                "publication {:?} does not exist and no [[table]] is configured to create it \
                 for; add [[table]] entries or create the publication yourself",
                source.publication
            )));
        }
        catalog::create_publication(&client, &source.publication, tables).await?;
        tracing::info!(publication = %source.publication, ?tables, "created publication");
    }
    match catalog::slot_state(&client, &source.slot).await? {
        Some(slot) if slot.plugin.as_deref() != Some("pgoutput") => {
            return Err(PipelineError::Setup(format!(
                "replication slot {:?} exists but uses plugin {:?}, not pgoutput; drop it \
                 (SELECT pg_drop_replication_slot('{}')) or configure another source.slot",
                source.slot, slot.plugin, source.slot
            )));
        }
        Some(_) => {}
        None if source.create_slot => {
            let mut conn = ReplicationConnection::connect(params).await?;
            match warm_up {
                None => {
                    let lsn = conn.create_slot(&source.slot).await?;
                    tracing::info!(slot = %source.slot, consistent_point = %lsn, "created replication slot");
                    return Ok(Prepared {
                        slot_created: true,
                        warm_up: None,
                    });
                }
                Some(warm_up) => {
                    let (lsn, snapshot) = conn.create_slot_exporting_snapshot(&source.slot).await?;
                    tracing::info!(slot = %source.slot, consistent_point = %lsn, %snapshot, "created replication slot; warming up the mirrors from its snapshot");
                    let loaded = warm_up.load(params, Some(&snapshot)).await;
                    // The exported snapshot lives as long as this connection stays idle.
                    drop(conn);
                    match loaded {
                        Ok(summary) => {
                            return Ok(Prepared {
                                slot_created: true,
                                warm_up: Some(summary),
                            })
                        }
                        Err(e) => {
                            if let Err(drop_error) = catalog::drop_slot(&client, &source.slot).await
                            {
                                tracing::error!(error = %display_chain(&drop_error), slot = %source.slot, "cannot drop the slot after a failed warm-up; drop it by hand before the next start");
                            }
                            return Err(e.into());
                        }
                    }
                }
            }
        }
        None => {
            return Err(PipelineError::Setup(format!(
                "replication slot {:?} does not exist and source.create_slot is false; create \
                 it with: SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
                source.slot, source.slot
            )));
        }
    }
    Ok(Prepared::default())
}
