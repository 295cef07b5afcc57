//! Redis health while no change flows: the readiness flag must reflect an outage even when the
//! sink has nothing to apply.

use std::time::Duration;

use super::certificate::CertificateRejected;
use crate::config::RedisConfig;

/// Pings Redis every `interval` so readiness reflects an outage even while no change flows.
/// Uses the whole `[redis]` section (TLS files included) and its `timeout_ms`.
pub async fn probe_redis(redis: RedisConfig, interval: Duration) {
    let timeout = Duration::from_millis(redis.timeout_ms);
    let Ok(endpoint) = super::Endpoint::new(&redis) else {
        return;
    };
    let mut connection = None;
    let mut told = false;
    loop {
        let ping = async {
            if connection.is_none() {
                connection = Some(endpoint.connect_plain().await?);
            }
            let conn = connection.as_mut().expect("set above");
            // On a cluster PING goes to every primary: up means all of them answer.
            ::redis::cmd("PING").query_async::<String>(conn).await
        };
        let outcome = tokio::time::timeout(timeout, ping).await;
        let up = matches!(outcome, Ok(Ok(_)));
        if let Ok(Err(e)) = &outcome {
            // The sink stops the daemon on this; said once here too, for a probe that runs
            // before the sink first connects (readiness alone would not say why).
            if let Some(rejected) = CertificateRejected::find(e, Some(endpoint.target())) {
                if !told {
                    tracing::error!(error = %rejected, "Redis health probe");
                    told = true;
                }
            }
        }
        if !up {
            connection = None;
        }
        crate::telemetry::health::set_redis_up(up);
        tokio::time::sleep(interval).await;
    }
}
