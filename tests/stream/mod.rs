//! The replication core against a real Postgres: decoding, streaming, progress, resilience.

mod auth;
mod decoding;
mod harness;
mod progress;
mod resilience;
