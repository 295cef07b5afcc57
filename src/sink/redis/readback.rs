//! Reading back what walsweep wrote, for drift checks (`walsweep verify` and the inspector):
//! mirror entries of any type, index scores, pages of keys under a prefix, index members, and
//! the published applied position. Read-only, on a connection of its own, and kept out of
//! `walsweep_redis_round_trip_seconds`, which measures the sink.

use std::sync::LazyLock;

use ::redis::aio::ConnectionManager;
use ::redis::{Script, Value};

use super::sink_error;
use crate::config::RedisConfig;
use crate::sink::SinkError;

static READ_ENTRIES: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/read_entries.lua")));
static READ_SCORES: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/read_scores.lua")));

/// Keys per script call: long enough to amortise it, short enough not to stall Redis.
const KEYS_PER_CALL: usize = 200;

/// What a key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stored {
    Absent,
    String(Vec<u8>),
    /// Field-value pairs, in the order Redis returned them.
    Hash(Vec<(String, String)>),
    /// Another type (its name, e.g. `zset`).
    Other(String),
}

pub(crate) struct Readback {
    conn: ConnectionManager,
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".into()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn stored(item: &Value) -> Stored {
    let Value::Array(parts) = item else {
        return Stored::Other("unreadable".into());
    };
    let kind = parts.first().and_then(text).unwrap_or_default();
    match (kind.as_str(), parts.get(1)) {
        ("none", _) => Stored::Absent,
        ("string", Some(Value::BulkString(b))) => Stored::String(b.clone()),
        ("hash", Some(Value::Array(flat))) => Stored::Hash(
            flat.chunks(2)
                .map(|pair| {
                    (
                        pair.first().and_then(text).unwrap_or_default(),
                        pair.get(1).and_then(text).unwrap_or_default(),
                    )
                })
                .collect(),
        ),
        _ => Stored::Other(kind),
    }
}

/// A score as Redis prints it (`inf` included).
fn score(value: &Value) -> Option<f64> {
    match value {
        Value::Double(d) => Some(*d),
        other => text(other).and_then(|s| s.parse().ok()),
    }
}

impl Readback {
    /// Connects with `[redis]`'s URL, TLS files and timeout.
    pub(crate) async fn connect(redis: &RedisConfig) -> Result<Readback, SinkError> {
        let (client, config) = super::managed_client(redis)?;
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| sink_error("connect to Redis", e))?;
        Ok(Readback { conn })
    }

    /// The text at a string key, `None` when there is none.
    pub(crate) async fn get(&mut self, key: &str) -> Result<Option<String>, SinkError> {
        ::redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| sink_error("read the applied position", e))
    }

    /// What each key holds, in order.
    pub(crate) async fn entries(&mut self, keys: &[String]) -> Result<Vec<Stored>, SinkError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(KEYS_PER_CALL) {
            let mut call = READ_ENTRIES.prepare_invoke();
            for key in chunk {
                call.key(key);
            }
            let reply: Vec<Value> = call
                .invoke_async(&mut self.conn)
                .await
                .map_err(|e| sink_error("read mirror entries", e))?;
            check_length("read mirror entries", reply.len(), chunk.len())?;
            out.extend(reply.iter().map(stored));
        }
        Ok(out)
    }

    /// The score of each (sorted set, member), `None` when absent or not a sorted set.
    pub(crate) async fn scores(
        &mut self,
        pairs: &[(String, String)],
    ) -> Result<Vec<Option<f64>>, SinkError> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(KEYS_PER_CALL) {
            let mut call = READ_SCORES.prepare_invoke();
            for (key, member) in chunk {
                call.key(key).arg(member);
            }
            let reply: Vec<Value> = call
                .invoke_async(&mut self.conn)
                .await
                .map_err(|e| sink_error("read index scores", e))?;
            check_length("read index scores", reply.len(), chunk.len())?;
            out.extend(reply.iter().map(score));
        }
        Ok(out)
    }

    /// One SCAN page over `pattern`: the next cursor (0 when the scan is complete) and the keys.
    pub(crate) async fn scan(
        &mut self,
        pattern: &str,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<String>), SinkError> {
        ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| sink_error("scan mirror keys", e))
    }

    /// Whether `key` holds a sorted set.
    pub(crate) async fn is_sorted_set(&mut self, key: &str) -> Result<bool, SinkError> {
        let kind: String = ::redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| sink_error("read a key's type", e))?;
        Ok(kind == "zset")
    }

    /// One ZSCAN page of a sorted set: the next cursor and (member, score) pairs.
    pub(crate) async fn members(
        &mut self,
        key: &str,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<(String, f64)>), SinkError> {
        let (next, flat): (u64, Vec<Value>) = ::redis::cmd("ZSCAN")
            .arg(key)
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| sink_error("scan index members", e))?;
        Ok((next, pairs(&flat)))
    }

    /// Up to `n` distinct random (member, score) pairs of a sorted set.
    pub(crate) async fn random_members(
        &mut self,
        key: &str,
        n: usize,
    ) -> Result<Vec<(String, f64)>, SinkError> {
        let flat: Vec<Value> = ::redis::cmd("ZRANDMEMBER")
            .arg(key)
            .arg(n)
            .arg("WITHSCORES")
            .query_async(&mut self.conn)
            .await
            .map_err(|e| sink_error("sample index members", e))?;
        Ok(pairs(&flat))
    }
}

/// A reply of another length would pair entries with the wrong keys.
fn check_length(operation: &'static str, got: usize, asked: usize) -> Result<(), SinkError> {
    if got == asked {
        return Ok(());
    }
    Err(SinkError {
        operation,
        retryable: true,
        source: format!("Redis answered {got} items for {asked} keys").into(),
    })
}

/// `member, score, member, score, ...` (RESP2) or `[member, score]` items (RESP3).
fn pairs(flat: &[Value]) -> Vec<(String, f64)> {
    if flat.iter().all(|v| matches!(v, Value::Array(_))) {
        return flat
            .iter()
            .filter_map(|v| match v {
                Value::Array(p) => Some((p.first().and_then(text)?, p.get(1).and_then(score)?)),
                _ => None,
            })
            .collect();
    }
    flat.chunks(2)
        .filter_map(|p| Some((p.first().and_then(text)?, p.get(1).and_then(score)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_replies_become_stored_entries() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(stored(&Value::Array(vec![bulk("none")])), Stored::Absent);
        assert_eq!(
            stored(&Value::Array(vec![bulk("string"), bulk("{}")])),
            Stored::String(b"{}".to_vec())
        );
        assert_eq!(
            stored(&Value::Array(vec![
                bulk("hash"),
                Value::Array(vec![bulk("a"), bulk("1")])
            ])),
            Stored::Hash(vec![("a".into(), "1".into())])
        );
        assert_eq!(
            stored(&Value::Array(vec![bulk("zset")])),
            Stored::Other("zset".into())
        );
        assert_eq!(score(&bulk("inf")), Some(f64::INFINITY));
        assert_eq!(score(&bulk("1.5")), Some(1.5));
        assert_eq!(pairs(&[bulk("m"), bulk("2")]), vec![("m".to_string(), 2.0)]);
    }
}
