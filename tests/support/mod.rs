//! Test support: private, throw-away Postgres and Redis servers for integration tests.
//!
//! Every test boots its own servers on free ports in temp dirs, so tests can run in parallel
//! and can stop/restart/break their servers without affecting each other. The machine's own
//! Postgres (5432) and Redis (6379) services are never used.
//!
//! Each test binary includes this with `mod support;`. Not every binary uses every helper,
//! hence the blanket `dead_code` allowance.
#![allow(dead_code)]

pub mod binaries;
pub mod daemon;
pub mod postgres;
pub mod redis;
pub mod redis_cluster;
pub mod rng;
pub mod scratch;

#[allow(unused_imports)]
pub use postgres::{Postgres, PostgresOptions, ShutdownMode};
pub use redis::Redis;
// Only the cluster suites use it.
#[allow(unused_imports)]
pub use redis_cluster::RedisCluster;

use std::sync::Once;

/// Installs a `tracing` subscriber that writes through the test harness (so output is only
/// shown for failing tests, or with `--nocapture`). Filter from `RUST_LOG`, default
/// `walsweep=debug`. Safe to call from every test: only the first call does anything.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("walsweep=debug"));
        // try_init: another subscriber may already be installed (e.g. by the test itself);
        // that's fine, keep it.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}
