//! What walsweep tells operators: metric names and recorders, health flags, the HTTP endpoint.
//! Helpers here take primitives (table names, kinds, counts), never domain types, so every
//! other layer can report without this one knowing about them.

pub mod health;
pub mod http;
pub mod log;
pub mod metrics;
