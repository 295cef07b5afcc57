//! Process-wide health flags behind `/readyz`: whether the replication stream is open and
//! whether Redis answered lately. Set by the pipeline, the sink and the Redis probe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::config::RedisConfig;

static STREAMING: AtomicBool = AtomicBool::new(false);
static REDIS_UP: AtomicBool = AtomicBool::new(false);

pub fn set_streaming(on: bool) {
    STREAMING.store(on, Ordering::Relaxed);
    crate::telemetry::metrics::set_streaming(on);
}

pub fn set_redis_up(up: bool) {
    REDIS_UP.store(up, Ordering::Relaxed);
    crate::telemetry::metrics::set_redis_up(up);
}

pub fn streaming() -> bool {
    STREAMING.load(Ordering::Relaxed)
}

pub fn redis_up() -> bool {
    REDIS_UP.load(Ordering::Relaxed)
}

/// Pings Redis every `interval` so readiness reflects an outage even while no change flows.
/// Uses the whole `[redis]` section (TLS files included) and its `timeout_ms`.
pub async fn probe_redis(redis: RedisConfig, interval: Duration) {
    let timeout = Duration::from_millis(redis.timeout_ms);
    let Ok(client) = crate::sink::redis::redis_client(&redis) else {
        return;
    };
    let mut connection = None;
    loop {
        let ping = async {
            if connection.is_none() {
                connection = Some(client.get_multiplexed_async_connection().await?);
            }
            let conn = connection.as_mut().expect("set above");
            ::redis::cmd("PING").query_async::<String>(conn).await
        };
        let up = matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(_)));
        if !up {
            connection = None;
        }
        set_redis_up(up);
        tokio::time::sleep(interval).await;
    }
}
