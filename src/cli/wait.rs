//! `walsweep wait`: blocks until walsweep's published applied position reaches an LSN (the
//! app's own commit), so a read through the cache after it sees that commit. The same
//! protocol any client can follow (README, "Read your own writes"):
//!
//! 1. after COMMIT, on the same connection: `SELECT pg_current_wal_insert_lsn() - '0/0'`
//!    (a decimal number; the insert position, not `pg_current_wal_lsn()`, which is only what
//!    was written out so far and can be before the commit record);
//! 2. SUBSCRIBE to `walsweep:<database>/<slot>:applied`, then GET the key of the same name;
//! 3. done when the value (a decimal LSN) is ≥ yours; else wait for a message ≥ yours.
//!
//! Subscribing before the GET means no advance can fall between the two.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use futures_util::StreamExt;

use crate::cli::config_failure;
use crate::config::Config;
use crate::pg::Lsn;
use crate::sink::redis::{pubsub_connection, state_prefix, Endpoint};
use crate::telemetry::log::display_chain;

/// Exit code when the position did not reach the LSN in time (0: reached; 1: could not ask).
pub(crate) const EXIT_TIMEOUT: u8 = 3;

/// An LSN as Postgres prints it (`0/16B3748`) or as a decimal number (`pg_lsn - '0/0'`).
pub(crate) fn parse_lsn(text: &str) -> Result<Lsn, String> {
    let text = text.trim();
    if let Ok(lsn) = text.parse::<Lsn>() {
        return Ok(lsn);
    }
    text.parse::<u64>().map(Lsn::from).map_err(|_| {
        format!(
            "{text:?} is not an LSN: expected 0/16B3748 (pg_current_wal_insert_lsn()) or a \
             decimal number (pg_current_wal_insert_lsn() - '0/0')"
        )
    })
}

/// The published position's key and channel for `config`'s database and slot.
pub(crate) fn position_key(config: &Config) -> Result<String, crate::config::ConfigError> {
    Ok(format!(
        "{}{}",
        state_prefix(
            &config.source.connect_params()?.dbname(),
            &config.source.slot
        ),
        crate::sink::redis::APPLIED_POSITION
    ))
}

/// Whether a published value (decimal LSN) is at or past `target`.
fn reached(published: Option<&str>, target: Lsn) -> bool {
    published
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|v| v >= target.as_u64())
}

pub async fn command(path: &Path, lsn: &str, timeout: Duration) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    let target = match parse_lsn(lsn) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("walsweep wait: --lsn {e}");
            return ExitCode::from(2);
        }
    };
    let key = match position_key(&config) {
        Ok(k) => k,
        Err(e) => return config_failure(&e),
    };
    match tokio::time::timeout(timeout, wait_for(&config, &key, target)).await {
        Ok(Ok(published)) => {
            println!("{published}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("walsweep wait: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!(
                "walsweep wait: {key} did not reach {target} ({}) within {} ms; is walsweep \
                 running and streaming from slot {:?}?",
                target.as_u64(),
                timeout.as_millis(),
                config.source.slot
            );
            ExitCode::from(EXIT_TIMEOUT)
        }
    }
}

/// Returns the published value once it reaches `target`.
async fn wait_for(config: &Config, key: &str, target: Lsn) -> Result<String, String> {
    let endpoint = Endpoint::new(&config.redis).map_err(|e| display_chain(&e))?;
    let failed = |what: &str, e: ::redis::RedisError| format!("{what} on Redis: {e}");
    let mut pubsub = pubsub_connection(&config.redis).await?;
    pubsub
        .subscribe(key)
        .await
        .map_err(|e| failed("SUBSCRIBE", e))?;
    let mut conn = endpoint
        .connect_plain()
        .await
        .map_err(|e| failed("connecting", e))?;
    let current: Option<String> = ::redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .map_err(|e| failed("GET", e))?;
    if reached(current.as_deref(), target) {
        return Ok(current.unwrap_or_default());
    }
    let mut messages = pubsub.into_on_message();
    while let Some(message) = messages.next().await {
        let value: String = message.get_payload().unwrap_or_default();
        if reached(Some(&value), target) {
            return Ok(value);
        }
    }
    Err(format!("the subscription to {key} ended"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_parse_as_postgres_prints_them_or_as_decimal_numbers() {
        assert_eq!(parse_lsn("0/16B3748").unwrap().as_u64(), 0x16B3748);
        assert_eq!(parse_lsn("1/0").unwrap().as_u64(), 1 << 32);
        assert_eq!(parse_lsn(" 23803720 ").unwrap().as_u64(), 23_803_720);
        let e = parse_lsn("yesterday").unwrap_err();
        assert!(e.contains("pg_current_wal_insert_lsn()"), "{e}");
    }

    #[test]
    fn reached_compares_the_published_decimal_with_the_target() {
        let target = Lsn::from(1000);
        assert!(reached(Some("1000"), target));
        assert!(reached(Some("1001"), target));
        assert!(!reached(Some("999"), target));
        assert!(!reached(None, target));
        assert!(!reached(Some("garbage"), target));
    }
}
