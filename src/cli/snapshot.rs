//! `walsweep snapshot`: load every mirror into Redis now, from the slot's exported snapshot when
//! this command creates the slot, else from a fresh one. The loader itself is
//! `pipeline::warm_up`; this file decides whether loading is safe and reports what was loaded.

use std::path::Path;
use std::process::ExitCode;

use crate::cli::{config_failure, load};
use crate::config::Config;
use crate::pg::catalog;
use crate::pipeline::warm_up::{WarmUp, WarmUpSummary};
use crate::pipeline::{prepare, PipelineError};
use crate::telemetry::log::display_chain;

/// Creates the publication and slot when the config allows and they are missing (then the load
/// uses the slot's exported snapshot); refuses while a daemon streams from the slot.
pub async fn load_mirrors(config: &Config) -> Result<WarmUpSummary, PipelineError> {
    let warm_up = WarmUp::from_config(config)
        .map_err(|e| PipelineError::Compile {
            what: "mirrors",
            source: Box::new(e),
        })?
        .ok_or_else(|| {
            PipelineError::Setup(
                "no [[table.mirror]] to load (only_if_present mirrors are never warmed up)".into(),
            )
        })?;
    let params = config.source.connect_params()?;
    let client = catalog::connect(&params).await?;
    match catalog::slot_state(&client, &config.source.slot).await? {
        Some(slot) if slot.active => Err(PipelineError::Setup(format!(
            "replication slot {:?} is in use (a walsweep is streaming from it); stop it first: \
             its writes would race the load",
            config.source.slot
        ))),
        Some(_) => {
            tracing::warn!(
                slot = %config.source.slot,
                "the slot exists, so there is no snapshot matching it: loading a fresh one; \
                 rows may show older versions until walsweep catches up past this moment"
            );
            Ok(warm_up.load(&params, None).await?)
        }
        None => {
            drop(client);
            let tables = config.qualified_tables();
            // The sink restarts its chains behind the new slot, as at a daemon's first start.
            let (_, mut sink) = crate::pipeline::daemon::build(config)?;
            let (_handle, shutdown) = crate::pipeline::shutdown_channel();
            let loaded = prepare::<crate::plan::txn::TxnPlan, _>(
                &config.source,
                &params,
                &tables,
                Some(&warm_up),
                &mut sink,
                shutdown,
            )
            .await?;
            loaded.warm_up.ok_or_else(|| {
                PipelineError::Setup(format!(
                    "replication slot {:?} does not exist and source.create_slot is false; \
                     create it, or let walsweep create it",
                    config.source.slot
                ))
            })
        }
    }
}

pub async fn command(path: &Path) -> ExitCode {
    let (config, _) = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match load_mirrors(&config).await {
        Ok(summary) => {
            for (table, rows) in &summary.tables {
                println!("{table}: {rows} rows loaded");
            }
            ExitCode::SUCCESS
        }
        Err(PipelineError::Config(e)) => config_failure(&e),
        Err(e) => {
            eprintln!("walsweep snapshot: {}", display_chain(&e));
            ExitCode::FAILURE
        }
    }
}
