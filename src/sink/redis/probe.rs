//! Redis health while no change flows: the readiness flag must reflect an outage even when the
//! sink has nothing to apply.

use std::time::Duration;

use crate::config::RedisConfig;

/// Pings Redis every `interval` so readiness reflects an outage even while no change flows.
/// Uses the whole `[redis]` section (TLS files included) and its `timeout_ms`.
pub async fn probe_redis(redis: RedisConfig, interval: Duration) {
    let timeout = Duration::from_millis(redis.timeout_ms);
    let Ok(client) = super::redis_client(&redis) else {
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
        crate::telemetry::health::set_redis_up(up);
        tokio::time::sleep(interval).await;
    }
}
