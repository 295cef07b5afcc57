//! Before streaming: what only a human can fix is checked, and the publication and slot are
//! created when the config allows it (with the warm-up when the slot is new).

use crate::config::{SlotLostPolicy, SourceConfig};
use crate::pg::catalog;
use crate::pg::replication::{ConnectParams, ReplicationConnection};
use crate::sink::Recovery;
use crate::stream::history::RecordedSource;

use super::recovery::{recreate_slot, SinkControl};
use super::sink_task::Control;
use super::warm_up::{WarmUp, WarmUpSummary};
use super::PipelineError;

/// Failover slots (`CREATE_REPLICATION_SLOT ... FAILOVER`) arrived in Postgres 17.
const FAILOVER_MIN_SERVER_VERSION: u32 = 170_000;

/// What `prepare_source` did.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// What the warm-up loaded, when it ran.
    pub(crate) warm_up: Option<WarmUpSummary>,
    /// What an earlier run recorded of the source, when the slot it describes still exists.
    pub(crate) recorded: Option<RecordedSource>,
}

/// Checks what only a human can fix, creates the publication and slot when allowed to, and
/// finishes a slot recovery that an earlier run recorded and did not complete (`super::recovery`).
///
/// A slot created here restarts the sink's chains and, with `warm_up`, exports its snapshot so
/// the mirrors are loaded from it before anything streams.
pub(crate) async fn prepare_source(
    source: &SourceConfig,
    params: &ConnectParams,
    tables: &[String],
    warm_up: Option<&WarmUp>,
    control: &mut impl SinkControl,
    pending: Recovery,
    recorded: Option<RecordedSource>,
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
    if source.failover {
        let version = catalog::server_version_num(&client).await?;
        if version < FAILOVER_MIN_SERVER_VERSION {
            return Err(PipelineError::Setup(format!(
                "source.failover = true needs Postgres 17 or newer (failover slots), but {} \
                 is version {version}; remove it (before 17 no slot survives a failover: on \
                 the promoted standby walsweep's slot is missing and source.on_slot_lost \
                 decides)",
                params.target()
            )));
        }
    }
    let slot = catalog::slot_state(&client, &source.slot).await?;
    drop(client);
    if let Some(state) = &slot {
        if source.failover
            && state.failover == Some(false)
            && state.plugin.as_deref() == Some("pgoutput")
        {
            let mut conn = ReplicationConnection::connect(params).await?;
            conn.make_failover_slot(&source.slot).await?;
            tracing::info!(slot = %source.slot, "made the replication slot a failover slot (source.failover)");
        }
    }
    match slot {
        Some(slot) if slot.plugin.as_deref() != Some("pgoutput") => {
            Err(PipelineError::Setup(format!(
                "replication slot {:?} exists but uses plugin {:?}, not pgoutput; drop it \
                 (SELECT pg_drop_replication_slot('{}')) or configure another source.slot",
                source.slot, slot.plugin, source.slot
            )))
        }
        Some(_) if pending.is_empty() => Ok(Prepared {
            warm_up: None,
            recorded,
        }),
        Some(_) if pending.load && warm_up.is_some() => {
            // A warm-up died halfway: only a new slot exports a snapshot to load from, and the
            // old slot's changes were never streamed, so the caches are cleared too.
            tracing::warn!(slot = %source.slot, "an earlier warm-up did not finish; recreating the slot and loading again");
            let steps = Recovery {
                clear: true,
                restart_chain: true,
                load: true,
            };
            let reason = "an earlier warm-up did not finish; the slot was recreated";
            let (_, loaded) =
                recreate_slot(control, source, params, steps, warm_up, reason).await?;
            Ok(Prepared {
                warm_up: loaded,
                recorded: None,
            })
        }
        Some(_) => {
            // The slot was created, but walsweep died before clearing behind it: clear now,
            // before anything streams.
            tracing::warn!(slot = %source.slot, clear = pending.clear, "an earlier slot recovery did not finish; finishing it");
            if pending.clear || pending.load {
                control
                    .run(Control::Reset {
                        reason: "an earlier slot recovery did not finish".into(),
                    })
                    .await?;
            } else if pending.restart_chain {
                control.run(Control::SlotCreated).await?;
            }
            control.run(Control::EndRecovery).await?;
            // A cleared sink starts a new history: positions recorded before mean nothing.
            let cleared = pending.clear || pending.load;
            Ok(Prepared {
                warm_up: None,
                recorded: recorded.filter(|_| !cleared),
            })
        }
        None if source.create_slot && recorded.is_some() => {
            // Not a first start: walsweep streamed from this slot before, so whatever changed
            // since it last ran was never seen.
            let what = lost_slot_story(source, params, recorded.as_ref());
            if source.on_slot_lost == SlotLostPolicy::Fail {
                return Err(PipelineError::Setup(format!(
                    "{what}. Either set source.on_slot_lost = \"recreate\" (walsweep creates \
                     the slot and clears every key and dependency set its rules maintain), or \
                     clear the caches yourself and delete walsweep's record of the slot \
                     (redis-cli DEL {}) before starting again",
                    source_record_key(source, params)
                )));
            }
            tracing::error!(slot = %source.slot, "{what}; recreating it and clearing the caches");
            crate::telemetry::metrics::error("slot_lost");
            let steps = Recovery {
                clear: true,
                restart_chain: true,
                load: warm_up.is_some(),
            };
            let (_, loaded) = recreate_slot(control, source, params, steps, warm_up, &what).await?;
            crate::telemetry::metrics::slot_recreated();
            Ok(Prepared {
                warm_up: loaded,
                recorded: None,
            })
        }
        None if source.create_slot => {
            let steps = Recovery {
                // Left by a crash between dropping a slot and creating its successor.
                clear: pending.clear || pending.load,
                restart_chain: true,
                load: warm_up.is_some(),
            };
            let reason = "an earlier slot recovery did not finish; the slot was created again";
            let (_, loaded) =
                recreate_slot(control, source, params, steps, warm_up, reason).await?;
            Ok(Prepared {
                warm_up: loaded,
                recorded: None,
            })
        }
        None => Err(PipelineError::Setup(format!(
            "replication slot {:?} does not exist and source.create_slot is false; create \
             it with: SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
            source.slot, source.slot
        ))),
    }
}

/// Where the Redis sink keeps its record of the source (for the operator's recovery command).
fn source_record_key(source: &SourceConfig, params: &ConnectParams) -> String {
    format!(
        "{}source",
        crate::sink::redis::state_prefix(&params.dbname(), &source.slot)
    )
}

fn lost_slot_story(
    source: &SourceConfig,
    params: &ConnectParams,
    recorded: Option<&RecordedSource>,
) -> String {
    let position = recorded
        .map(|r| {
            format!(
                " (it had confirmed up to {} when walsweep last started)",
                r.confirmed_lsn
            )
        })
        .unwrap_or_default();
    format!(
        "replication slot {:?} does not exist, but walsweep streamed from it before{position}, \
         as its record in Redis ({}) says: the slot was dropped while walsweep was stopped, and \
         the changes made since were never seen, so caches may be stale",
        source.slot,
        source_record_key(source, params)
    )
}
