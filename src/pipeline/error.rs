//! Why a run stopped, and which of those reasons a retry can fix.

use crate::pg::catalog::CatalogError;
use crate::pg::replication::ReplicationError;
use crate::pg::Lsn;
use crate::sink::SinkError;
use crate::stream::assembler::AssembleError;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("cannot decode the replication stream at {lsn}")]
    Assemble {
        lsn: Lsn,
        #[source]
        source: AssembleError,
    },
    #[error("the sink failed and cannot be retried")]
    Sink(#[from] SinkError),
    #[error("warm-up failed (the next start loads the mirrors again from a new slot)")]
    WarmUp(#[from] super::warm_up::SnapshotError),
    /// The config loaded, but its rules or mirrors do not compile (`walsweep check` says where).
    #[error("cannot compile the {what}")]
    Compile {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Something only a human can fix; the message says what to do.
    #[error("{0}")]
    Setup(String),
    /// The sink task ended while the stream still had work for it: a bug, not a setup problem.
    #[error("internal error: the sink task stopped while the stream was running")]
    SinkStopped,
    #[error("internal error: the sink task panicked")]
    SinkPanicked(#[source] tokio::task::JoinError),
    /// Shutdown was requested while the slot was being recovered; the recovery record stays, so
    /// the next start finishes the job.
    #[error("stopped during slot recovery; the next start finishes it")]
    Interrupted,
}

impl PipelineError {
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            PipelineError::Replication(e) => e.is_retryable(),
            PipelineError::Catalog(e) => e.is_retryable(),
            PipelineError::WarmUp(e) => e.is_retryable(),
            // Only before streaming: the sink task retries retryable errors itself.
            PipelineError::Sink(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The `kind` label of `walsweep_errors_total`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            PipelineError::Config(_) | PipelineError::Compile { .. } => "config",
            PipelineError::Replication(e) => e.kind(),
            PipelineError::Catalog(_) => "catalog",
            PipelineError::Assemble { .. } => "decode",
            PipelineError::Sink(_) => "sink",
            PipelineError::Setup(_) => "setup",
            PipelineError::WarmUp(_) => "warm_up",
            PipelineError::SinkStopped | PipelineError::SinkPanicked(_) => "internal",
            PipelineError::Interrupted => "setup",
        }
    }
}
