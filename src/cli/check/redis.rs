//! The check against the live Redis: it answers PING within `redis.timeout_ms`, and a TLS
//! certificate it cannot verify is reported as the daemon would stop on it.

use crate::config::Config;
use crate::sink::redis::certificate::CertificateRejected;
use crate::telemetry::log::display_chain;

use super::Report;

pub(super) async fn check_redis(config: &Config, report: &mut Report) {
    let client = match crate::sink::redis::redis_client(&config.redis) {
        Ok(c) => c,
        Err(e) => {
            report.errors.push(display_chain(&e));
            return;
        }
    };
    let timeout = std::time::Duration::from_millis(config.redis.timeout_ms);
    let ping = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        ::redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(timeout, ping).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            let target = client.get_connection_info().addr().to_string();
            report
                .errors
                .push(match CertificateRejected::find(&e, Some(target)) {
                    Some(rejected) => rejected.to_string(),
                    None => format!(
                        "Redis does not answer PING: {e}; check redis.url (or WALSWEEP_REDIS_URL)"
                    ),
                })
        }
        Err(_) => report.errors.push(format!(
            "Redis did not answer PING within {} ms; check redis.url (or WALSWEEP_REDIS_URL)",
            config.redis.timeout_ms
        )),
    }
}
