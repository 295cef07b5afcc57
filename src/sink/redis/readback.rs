//! Reading back what walsweep wrote, for drift checks (`walsweep verify` and the inspector):
//! mirror entries of any type, index scores, pages of keys under a prefix, index members, and
//! the published applied position. Read-only, on a connection of its own, and kept out of
//! `walsweep_redis_round_trip_seconds`, which measures the sink.

use std::sync::LazyLock;

use ::redis::{Script, Value};
use futures_util::future::join_all;

use super::cluster::group_by_slot;
use super::endpoint::{Endpoint, Primary};
use super::{sink_error, RedisConn};
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
    conn: RedisConn,
    cluster: bool,
    /// Where SCAN runs (`scan`): every primary of a cluster, or the one node; read once.
    scan_nodes: Option<Vec<Option<Primary>>>,
}

/// On a cluster, `scan`'s cursor carries the index of the primary being scanned in its top
/// bits; a node's own cursor stays far below them.
const NODE_SHIFT: u32 = 56;

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
        let endpoint = Endpoint::new(redis)?;
        let conn = endpoint.connect().await?;
        Ok(Readback {
            conn,
            cluster: endpoint.is_cluster(),
            scan_nodes: None,
        })
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
        let calls = self.calls(keys.iter().map(|k| (k.as_str(), None)).collect());
        let replies = self
            .run(&READ_ENTRIES, calls, keys.len(), "read mirror entries")
            .await?;
        Ok(replies.iter().map(stored).collect())
    }

    /// The score of each (sorted set, member), `None` when absent or not a sorted set.
    pub(crate) async fn scores(
        &mut self,
        pairs: &[(String, String)],
    ) -> Result<Vec<Option<f64>>, SinkError> {
        let calls = self.calls(
            pairs
                .iter()
                .map(|(k, m)| (k.as_str(), Some(m.as_str())))
                .collect(),
        );
        let replies = self
            .run(&READ_SCORES, calls, pairs.len(), "read index scores")
            .await?;
        Ok(replies.iter().map(score).collect())
    }

    /// Script calls of at most `KEYS_PER_CALL` (key, argument) items each, within one slot on a
    /// cluster; each item with its position in the request.
    fn calls<'a>(
        &self,
        items: Vec<(&'a str, Option<&'a str>)>,
    ) -> Vec<Vec<(usize, &'a str, Option<&'a str>)>> {
        let numbered: Vec<(usize, &str, Option<&str>)> = items
            .into_iter()
            .enumerate()
            .map(|(i, (k, a))| (i, k, a))
            .collect();
        let groups = if self.cluster {
            group_by_slot(numbered, |(_, key, _)| key.as_bytes())
                .into_iter()
                .map(|(_, group)| group)
                .collect()
        } else {
            vec![numbered]
        };
        groups
            .into_iter()
            .flat_map(|group| {
                group
                    .chunks(KEYS_PER_CALL)
                    .map(<[_]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Runs `script` once per call, concurrently, and puts the replies back in request order.
    async fn run(
        &mut self,
        script: &Script,
        calls: Vec<Vec<(usize, &str, Option<&str>)>>,
        total: usize,
        operation: &'static str,
    ) -> Result<Vec<Value>, SinkError> {
        let mut requests = Vec::with_capacity(calls.len());
        for call in &calls {
            let mut invocation = script.prepare_invoke();
            for (_, key, arg) in call {
                invocation.key(*key);
                if let Some(arg) = arg {
                    invocation.arg(*arg);
                }
            }
            let mut conn = self.conn.clone();
            requests.push(async move { invocation.invoke_async::<Vec<Value>>(&mut conn).await });
        }
        let mut out = vec![Value::Nil; total];
        for (call, reply) in calls.iter().zip(join_all(requests).await) {
            let reply = reply.map_err(|e| sink_error(operation, e))?;
            check_length(operation, reply.len(), call.len())?;
            for ((at, _, _), value) in call.iter().zip(reply) {
                out[*at] = value;
            }
        }
        Ok(out)
    }

    /// One SCAN page over `pattern`: the next cursor (0 when the scan is complete) and the keys.
    /// On a cluster the scan covers every primary in turn.
    pub(crate) async fn scan(
        &mut self,
        pattern: &str,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<String>), SinkError> {
        if self.scan_nodes.is_none() {
            let nodes = self
                .conn
                .scan_nodes()
                .await
                .map_err(|e| sink_error("list the cluster's primaries", e))?;
            self.scan_nodes = Some(nodes);
        }
        let nodes = self.scan_nodes.as_deref().unwrap_or_default();
        let node = (cursor >> NODE_SHIFT) as usize;
        let Some(target) = nodes.get(node) else {
            return Ok((0, Vec::new()));
        };
        let mut scan = ::redis::cmd("SCAN");
        scan.arg(cursor & ((1 << NODE_SHIFT) - 1))
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        let (next, keys): (u64, Vec<String>) = self
            .conn
            .query_on(target.as_ref(), &scan)
            .await
            .map_err(|e| sink_error("scan mirror keys", e))?;
        let next = if next >> NODE_SHIFT != 0 {
            return Err(sink_error(
                "scan mirror keys",
                ::redis::RedisError::from((
                    ::redis::ErrorKind::Parse,
                    "SCAN returned a cursor too large to combine with a node number",
                )),
            ));
        } else if next != 0 {
            ((node as u64) << NODE_SHIFT) | next
        } else if node + 1 < nodes.len() {
            ((node + 1) as u64) << NODE_SHIFT
        } else {
            0
        };
        Ok((next, keys))
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
