//! The replication core against a real Postgres: decoding, streaming, progress, resilience.

mod auth;
mod decoding;
pub mod harness;
mod idle_timeout;
mod progress;
mod protocol;
mod resilience;
mod takeover;
