//! Rules end to end: SQL changes in a real Postgres remove exactly the right entries from a
//! real Redis.

mod compat;
mod invalidation;

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use tokio::task::JoinHandle;

use walsweep::config::Config;
use walsweep::pipeline::{self, PipelineError, RunSummary, ShutdownHandle};
use walsweep::redis::RedisSink;
use walsweep::rules::{Rules, RulesPlanner};

use crate::support::{Postgres, Redis};

pub struct Daemon {
    pub shutdown: ShutdownHandle,
    pub task: JoinHandle<Result<RunSummary, PipelineError>>,
}

/// Parses a config whose `[source]`/`[redis]` point at the test servers; `rules` is the
/// `[matroska]`/`[[table]]` part.
pub fn config(pg: &Postgres, redis: &Redis, db: &str, slot: &str, rules: &str) -> Config {
    let text = format!(
        "[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"pub\"\nstatus_interval_ms = 200\n\
         reconnect_min_ms = 50\nreconnect_max_ms = 500\n[redis]\nurl = \"{}\"\ntimeout_ms = 1000\n{rules}",
        pg.url(db),
        redis.url()
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

pub fn start(config: Config) -> Daemon {
    let rules = Rules::from_config(&config).expect("rules compile");
    let sink = RedisSink::new(&config.redis, &config.matroska).expect("sink");
    let (shutdown, signal) = pipeline::shutdown_channel();
    let task = tokio::spawn(async move {
        let tables = config.qualified_tables();
        pipeline::run(
            &config.source,
            &tables,
            RulesPlanner::new(rules),
            sink,
            signal,
        )
        .await
    });
    Daemon { shutdown, task }
}

impl Daemon {
    pub async fn stop(self) -> RunSummary {
        self.shutdown.request();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("stops within 30s")
            .expect("no panic")
            .expect("no error")
    }
}

pub async fn set_keys(conn: &mut redis::aio::MultiplexedConnection, keys: &[&str]) {
    for k in keys {
        let _: () = conn.set(*k, "cached").await.expect("SET");
    }
}

/// matroska-cache's `put`: SADD the data key to each dependency set, then SETEX the data.
pub async fn matroska_put(conn: &mut redis::aio::MultiplexedConnection, key: &str, deps: &[&str]) {
    let data_key = format!("cache::data::{key}");
    for d in deps {
        let _: () = conn
            .sadd(format!("cache::rdep::{d}"), &data_key)
            .await
            .expect("SADD");
    }
    let _: () = conn.set_ex(&data_key, "s1", 600).await.expect("SETEX");
}

pub async fn exists(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    conn.exists(key).await.expect("EXISTS")
}

/// Waits until `key` is gone (walsweep applied the change that removes it).
pub async fn wait_gone(conn: &mut redis::aio::MultiplexedConnection, key: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while exists(conn, key).await {
        assert!(
            Instant::now() < deadline,
            "{key} still present after {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
