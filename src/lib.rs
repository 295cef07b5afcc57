//! walsweep: keeps Redis caches honest by following a Postgres logical replication slot.
//!
//! Data enters in `pg` (replication connection, pgoutput decoder), is assembled into committed
//! transactions in `assembler`, turned into effects by a `plan::Planner`, and leaves through a
//! `sink::Sink`. `pipeline` ties them together and reports progress back to Postgres.

pub mod assembler;
pub mod backoff;
pub mod broadcast;
pub mod check;
pub mod config;
pub mod daemon;
pub mod explain;
pub mod health;
pub mod http;
pub mod metrics;
pub mod mirror;
pub mod monitor;
pub mod pg;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod redis;
pub mod rules;
pub mod setup;
pub mod sink;
pub mod snapshot;
pub mod tail;
pub mod txn_plan;
pub mod value;
