//! walsweep: keeps Redis caches honest by following a Postgres logical replication slot.
//!
//! Data enters in `stream` (over `pg`'s replication connection and pgoutput decoder), is turned
//! into effects in `plan`, and leaves through `sink`. `pipeline` ties those hops together and
//! confirms to Postgres exactly what the sink reports applied; `cli` holds the subcommands.
//! `docs/architecture.md` draws the layers; every `use crate::` points down them.

pub mod cli;
pub mod config;
pub mod pg;
pub mod pipeline;
pub mod plan;
pub mod sink;
pub mod stream;
pub mod telemetry;
pub mod value;
