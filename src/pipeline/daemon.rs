//! walsweep as `walsweep run` assembles it from a config: the planner for every rule kind, the
//! Redis sink with its reset plan and broadcasts, the warm-up, and the inspector. Shared by the binary and the
//! integration tests, so tests run exactly what users run.

use std::sync::Arc;

use crate::config::Config;
use crate::pipeline::warm_up::WarmUp;
use crate::pipeline::{self, PipelineError, RunSummary, Shutdown};
use crate::plan::mirror::spill::Spill;
use crate::plan::rules::{Effect, EffectPlan, FallbackCause, Rules};
use crate::plan::txn::TxnPlanner;
use crate::sink::redis::RedisSink;

use super::visibility::{GatedSink, VisibilityGate};

/// Everything a sink reset clears: every prefix the rules invalidate and every mirror prefix.
pub(crate) fn reset_plan(config: &Config, rules: &Rules) -> Result<EffectPlan, PipelineError> {
    let mut plan = rules.reset_plan();
    for mirror in crate::plan::mirror::compile_all(&config.tables).map_err(setup)? {
        for prefix in mirror.prefixes() {
            plan.add(Effect::UnlinkKeysWithPrefix {
                prefix,
                cause: FallbackCause::SlotRecreated,
            });
        }
    }
    Ok(plan)
}

fn setup(e: impl std::error::Error + Send + Sync + 'static) -> PipelineError {
    PipelineError::Compile {
        what: "rules",
        source: Box::new(e),
    }
}

/// The planner and sink for `config`.
pub fn build(config: &Config) -> Result<(TxnPlanner, RedisSink), PipelineError> {
    let rules = Rules::from_config(config).map_err(setup)?;
    let sink = RedisSink::new(&config.redis, &config.matroska)?
        .with_reset_plan(reset_plan(config, &rules)?)
        .with_broadcast(config.broadcast.clone())
        .with_state_prefix(crate::sink::redis::state_prefix(
            &config.source.connect_params()?.dbname(),
            &config.source.slot,
        ));
    let planner = TxnPlanner::from_config(config, rules)
        .map_err(setup)?
        .with_spill(spill(config)?);
    Ok((planner, sink))
}

/// Where mirror plans spill (`[mirror]`), checked writable; `None` without mirrors or with
/// `spill_after_bytes = 0`.
fn spill(config: &Config) -> Result<Option<Arc<Spill>>, PipelineError> {
    crate::plan::mirror::spill::settings(config)
        .map(|(dir, after)| Spill::open(&dir, after))
        .transpose()
        .map_err(PipelineError::Setup)
}

/// Runs until `shutdown` (or an error no retry fixes).
pub async fn run(config: &Config, shutdown: Shutdown) -> Result<RunSummary, PipelineError> {
    let (planner, sink) = build(config)?;
    let warm_up = if config.source.warm_up {
        WarmUp::from_config(config).map_err(setup)?
    } else {
        None
    };
    let tables = config.qualified_tables();
    let gate = config
        .source
        .visibility_gate
        .then(|| config.source.connect_params().map(VisibilityGate::new))
        .transpose()?;
    let sink = GatedSink::new(sink, gate);
    // Its own task, reading on its own connections: it never holds up the stream, and stops
    // at the first shutdown request (or with the run, whichever way it ends).
    let _inspector = config.inspect.is_some().then(|| {
        pipeline::AbortOnDrop(tokio::spawn(crate::pipeline::inspect::run(
            config.clone(),
            shutdown.clone(),
        )))
    });
    pipeline::run_warming_up(&config.source, &tables, planner, sink, shutdown, warm_up).await
}
