//! Fenced fills (README, "Fenced fills"; `matroska.fences`): before walsweep unlinks a key or
//! invalidates a dependency set, it raises a fence, `walsweep:fence:<that key>` = the commit's
//! LSN (`walsweep:fence-all` for a table-wide invalidation), in its own round trip first, so no
//! fill can slip between an unlink and its fence. The app stores through the `walsweep_fill`
//! function (`functions/walsweep.lua`), which refuses a fill whose token (walsweep's applied
//! position when the fill began, before it read the database) is older than a fence of its key
//! or of its dependency sets. Fences are LSNs and never lowered, so a redelivered batch raises
//! the same ones again.
//!
//! The function library is loaded with the first fenced batch and again after any Redis error
//! (a restarted Redis without persistence has lost it); `walsweep setup` loads it too.

use ::redis::aio::ConnectionLike;
use ::redis::Value;

use super::errors::ScriptCalls;
use super::{round_trip, script_round_trip, RedisSink, KEYS_PER_COMMAND};
use crate::pg::Lsn;
use crate::sink::SinkError;
use crate::telemetry::metrics as m;

/// `walsweep:fence:<key>`: the fence of one key or dependency set.
pub const FENCE_PREFIX: &str = "walsweep:fence:";
/// Raised by a table-wide invalidation: every fill older than it is refused.
pub const FENCE_ALL: &str = "walsweep:fence-all";
/// The functions count fills here (fields `stored`, `refused`); walsweep exports them.
pub const FILLS: &str = "walsweep:fills";
/// The Redis Function library (`FUNCTION LOAD REPLACE`).
pub const FUNCTION_LIBRARY: &str = include_str!("functions/walsweep.lua");

const RAISE_FENCES_LUA: &str = include_str!("scripts/fence.lua");

/// `matroska.fences` at work: the fence TTL, and whether the library is known to be loaded.
#[derive(Debug, Clone)]
pub(crate) struct Fences {
    pub(crate) ttl_ms: u64,
    pub(crate) library_loaded: bool,
}

/// Loads (or replaces) the function library on the Redis behind `conn`.
pub async fn load_function_library<C: ConnectionLike>(conn: &mut C) -> ::redis::RedisResult<()> {
    let _: String = ::redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(FUNCTION_LIBRARY)
        .query_async(conn)
        .await?;
    Ok(())
}

impl RedisSink {
    /// Raises the fences of `keys` and dependency `sets` (full Redis keys) at `lsn`, and of
    /// everything when `all` (a table-wide invalidation follows). Reads the fill counters in
    /// the same round trip.
    pub(super) async fn raise_fences(
        &mut self,
        keys: &[&str],
        sets: &[String],
        all: bool,
        lsn: Lsn,
    ) -> Result<(), SinkError> {
        let Some(fences) = self.fences.clone() else {
            return Ok(());
        };
        self.ensure_function_library().await?;
        let mut conn = self.connection().await?;
        let mut fence_keys: Vec<String> = keys
            .iter()
            .map(|k| format!("{FENCE_PREFIX}{k}"))
            .chain(sets.iter().map(|s| format!("{FENCE_PREFIX}{s}")))
            .collect();
        if all {
            fence_keys.push(FENCE_ALL.to_string());
        }
        if fence_keys.is_empty() {
            return Ok(());
        }
        let lsn = lsn.as_u64().to_string();
        let mut pipe = ::redis::pipe();
        let calls = fence_keys.len().div_ceil(KEYS_PER_COMMAND);
        for chunk in fence_keys.chunks(KEYS_PER_COMMAND) {
            // EVAL with the source, as for invalidate_deps.lua: no NOSCRIPT after a restart.
            pipe.cmd("EVAL")
                .arg(RAISE_FENCES_LUA)
                .arg(chunk.len())
                .arg(chunk)
                .arg(&lsn)
                .arg(fences.ttl_ms);
        }
        pipe.cmd("HMGET").arg(FILLS).arg("stored").arg("refused");
        let replies: Vec<Value> = script_round_trip(
            "raise fences before invalidating",
            ScriptCalls {
                script: "fence.lua",
                at: 0..calls,
            },
            pipe.query_async(&mut conn),
        )
        .await?;
        m::fences_raised(fence_keys.len() as u64);
        if let Some(Value::Array(counts)) = replies.last() {
            let count = |i: usize| match counts.get(i) {
                Some(Value::BulkString(b)) => {
                    std::str::from_utf8(b).ok().and_then(|s| s.parse().ok())
                }
                _ => None,
            };
            m::set_fills(count(0).unwrap_or(0), count(1).unwrap_or(0));
        }
        Ok(())
    }

    /// Loads the function library unless it is known to be there (`Fences::library_loaded`).
    pub(super) async fn ensure_function_library(&mut self) -> Result<(), SinkError> {
        if self.fences.as_ref().is_none_or(|f| f.library_loaded) {
            return Ok(());
        }
        let mut conn = self.connection().await?;
        round_trip(
            "load the walsweep function library (FUNCTION LOAD)",
            load_function_library(&mut conn),
        )
        .await?;
        if let Some(f) = &mut self.fences {
            f.library_loaded = true;
        }
        Ok(())
    }

    /// A new history: fences of the old one hold LSNs the new one may not reach for a long
    /// time, which would refuse every fill until they expire.
    pub(super) async fn drop_fences(&mut self) -> Result<(), SinkError> {
        if self.fences.is_none() {
            return Ok(());
        }
        let mut conn = self.connection().await?;
        self.unlink_prefix(&mut conn, FENCE_PREFIX, "remove the old history's fences")
            .await?;
        let _: u64 = round_trip(
            "remove the old history's fence-all",
            ::redis::cmd("UNLINK").arg(FENCE_ALL).query_async(&mut conn),
        )
        .await?;
        Ok(())
    }
}
