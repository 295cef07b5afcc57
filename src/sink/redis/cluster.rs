//! Invalidations on a Redis Cluster, where a command or a pipeline may only touch keys of one
//! hash slot. A batch names thousands of keys and sets, nearly each in a slot of its own, so
//! each primary gets its share in one `invalidate_node.lua` call (a script flagged
//! `allow-cross-slot-keys` runs one command per key, any slot of its node), the primaries
//! concurrently (`RedisConn::per_node`). A cluster that refuses that script is sent one command
//! per slot instead, in one pipeline per primary.
//!
//! Atomicity becomes per node (per slot on the fallback). Every effect stays idempotent, so a
//! batch that fails halfway is retried whole and converges; nothing is confirmed to Postgres
//! before every request of the batch succeeded on every node.

use ::redis::Value;

use super::endpoint::Primary;
use super::{RedisConn, Unlinked, KEYS_PER_COMMAND};
use crate::sink::SinkError;

pub(crate) use crate::config::hash_slot::{same_slot_key, slot_of, SLOTS};

/// Items grouped by the slot of their key, each group in the order the items came.
pub(crate) fn group_by_slot<T>(
    items: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> &[u8],
) -> Vec<(u16, Vec<T>)> {
    // An index per slot rather than a hash map: a batch groups hundreds of thousands of keys.
    let mut index: Vec<u32> = vec![u32::MAX; usize::from(SLOTS)];
    let mut groups: Vec<(u16, Vec<T>)> = Vec::new();
    for item in items {
        let slot = slot_of(key(&item));
        let at = &mut index[usize::from(slot)];
        if *at == u32::MAX {
            *at = groups.len() as u32;
            groups.push((slot, Vec::new()));
        }
        groups[*at as usize].1.push(item);
    }
    groups
}

/// `RedisConn::per_node`, with every error reply turned into the batch's error (a moved or
/// moving slot's is retryable, `errors`).
async fn run_all(
    conn: &RedisConn,
    commands: Vec<(u16, ::redis::Cmd)>,
    operation: &'static str,
) -> Result<Vec<Value>, SinkError> {
    let replies = per_node(conn, commands, operation).await?;
    replies.into_iter().map(|r| reply(r, operation)).collect()
}

/// `RedisConn::per_node`, a failed request as the batch's error; error replies stay in their
/// places for the caller to read.
async fn per_node(
    conn: &RedisConn,
    commands: Vec<(u16, ::redis::Cmd)>,
    operation: &'static str,
) -> Result<Vec<Value>, SinkError> {
    conn.per_node(commands)
        .await
        .map_err(|e| super::sink_error(operation, e))
}

/// A reply of a `per_node` pipeline, an error reply as the batch's error.
pub(crate) fn reply(value: Value, operation: &'static str) -> Result<Value, SinkError> {
    match value {
        Value::ServerError(e) => Err(super::sink_error(operation, e.into())),
        other => Ok(other),
    }
}

/// An integer reply as a count (0 for anything else).
pub(crate) fn count(value: &Value) -> u64 {
    match value {
        Value::Int(n) => (*n).max(0) as u64,
        _ => 0,
    }
}

/// `invalidate_node.lua`: one node's share of a batch in one call.
const INVALIDATE_NODE_LUA: &str = include_str!("scripts/invalidate_node.lua");
const INVALIDATE_NODE_SCRIPT: &str = "invalidate_node.lua";

/// Most keys and sets in one `invalidate_node.lua` call, so one call never holds its node for
/// long (a node runs one script at a time).
const ITEMS_PER_NODE_CALL: usize = 4_096;

/// What the `invalidate_node.lua` calls of a request did and found.
#[derive(Default)]
struct NodeReads {
    keys_unlinked: u64,
    wrong_type_sets: u64,
    /// Each non-empty set read, with its members.
    found: Vec<(String, Vec<String>)>,
}

/// One `invalidate_node.lua` call: keys and sets, all served by one node.
struct NodeCall<'a> {
    /// A slot of the node, which `per_node` routes the call by.
    route: u16,
    keys: Vec<&'a str>,
    sets: Vec<&'a str>,
}

/// Unlinks `keys` and reads the members of `sets` with one `invalidate_node.lua` call per
/// primary (more for a big batch), the primaries concurrently. `None`: the cluster refuses the
/// script, so the caller goes one command per slot (said once, in the log).
async fn by_node(
    conn: &RedisConn,
    keys: &[&str],
    sets: &[&str],
    operation: &'static str,
) -> Result<Option<NodeReads>, SinkError> {
    let Some(slots) = conn.node_script_slots() else {
        return Ok(None);
    };
    let calls = node_calls(|slot| slots.owner(slot), slots.primaries.len(), keys, sets);
    let requests: Vec<(u16, ::redis::Cmd)> = calls
        .iter()
        .map(|call| {
            let mut eval = ::redis::cmd("EVAL");
            // No key declared (see the script); the source rather than a SHA, as on one node.
            eval.arg(INVALIDATE_NODE_LUA)
                .arg(0)
                .arg(call.keys.len())
                .arg(&call.keys)
                .arg(&call.sets);
            (call.route, eval)
        })
        .collect();
    let replies = per_node(conn, requests, operation).await?;
    let mut reads = NodeReads::default();
    let mut refused_keys: Vec<String> = Vec::new();
    let mut refused_sets: Vec<String> = Vec::new();
    for reply in replies {
        type Reply = (u64, u64, Vec<Vec<String>>, Vec<String>, Vec<String>);
        let (unlinked, wrong_type, found, keys_elsewhere, sets_elsewhere): Reply = match reply {
            Value::ServerError(e) if refuses_scripts(e.code(), e.details().unwrap_or_default()) => {
                if conn.refuse_node_scripts() {
                    tracing::warn!(
                        reply = %super::errors::reply_text(&e),
                        "{NODE_SCRIPT_REFUSED}"
                    );
                }
                return Ok(None);
            }
            Value::ServerError(e) => {
                return Err(super::errors::script_reply_error(
                    operation,
                    INVALIDATE_NODE_SCRIPT,
                    e,
                ))
            }
            other => ::redis::from_redis_value(other)
                .map_err(|e| super::sink_error(operation, e.into()))?,
        };
        reads.keys_unlinked += unlinked;
        reads.wrong_type_sets += wrong_type;
        for mut set in found {
            if set.is_empty() {
                continue;
            }
            let name = set.remove(0);
            reads.found.push((name, set));
        }
        refused_keys.extend(keys_elsewhere);
        refused_sets.extend(sets_elsewhere);
    }
    if !refused_keys.is_empty() || !refused_sets.is_empty() {
        // A slot moved (the map is old) or is moving (ASK): either way the next batch reads
        // the map again, and these go where the cluster redirects them now.
        conn.mark_slot_map_stale();
        crate::telemetry::metrics::cluster_redirect("migrating");
        redirected(conn, &refused_keys, &refused_sets, &mut reads, operation).await?;
    }
    Ok(Some(reads))
}

/// Keys and sets a node refused (`invalidate_node.lua`'s "non local key"), one command each on
/// the connection that follows MOVED and ASK (a single command, so nothing else is re-sent),
/// concurrently.
async fn redirected(
    conn: &RedisConn,
    keys: &[String],
    sets: &[String],
    reads: &mut NodeReads,
    operation: &'static str,
) -> Result<(), SinkError> {
    let unlinks = futures_util::future::try_join_all(keys.iter().map(|key| {
        let mut conn = conn.clone();
        async move {
            ::redis::cmd("UNLINK")
                .arg(key)
                .query_async::<u64>(&mut conn)
                .await
        }
    }))
    .await
    .map_err(|e| super::sink_error(operation, e))?;
    reads.keys_unlinked += unlinks.iter().sum::<u64>();
    let members = futures_util::future::join_all(sets.iter().map(|set| {
        let mut conn = conn.clone();
        async move {
            ::redis::cmd("SMEMBERS")
                .arg(set)
                .query_async::<Vec<String>>(&mut conn)
                .await
        }
    }))
    .await;
    for (set, members) in sets.iter().zip(members) {
        match members {
            Ok(members) if members.is_empty() => {}
            Ok(members) => reads.found.push((set.clone(), members)),
            // Not a set: not ours to interpret (like the script).
            Err(e) if e.code() == Some("WRONGTYPE") => reads.wrong_type_sets += 1,
            Err(e) => return Err(super::sink_error(operation, e)),
        }
    }
    Ok(())
}

/// `keys` and `sets` split into `invalidate_node.lua` calls: each call's items all served by
/// one of `nodes` primaries (`owner` of their slot), at most `ITEMS_PER_NODE_CALL` per call.
fn node_calls<'a>(
    owner: impl Fn(u16) -> usize,
    nodes: usize,
    keys: &[&'a str],
    sets: &[&'a str],
) -> Vec<NodeCall<'a>> {
    let mut calls: Vec<NodeCall<'a>> = Vec::new();
    // Per primary, its call being filled.
    let mut open: Vec<Option<usize>> = vec![None; nodes];
    let mut call_for = |slot: u16, calls: &mut Vec<NodeCall<'a>>| {
        let node = owner(slot);
        match open.get(node).copied().flatten() {
            Some(at) if calls[at].keys.len() + calls[at].sets.len() < ITEMS_PER_NODE_CALL => at,
            _ => {
                calls.push(NodeCall {
                    route: slot,
                    keys: Vec::new(),
                    sets: Vec::new(),
                });
                if let Some(open) = open.get_mut(node) {
                    *open = Some(calls.len() - 1);
                }
                calls.len() - 1
            }
        }
    };
    for key in keys {
        let at = call_for(slot_of(key.as_bytes()), &mut calls);
        calls[at].keys.push(key);
    }
    for set in sets {
        let at = call_for(slot_of(set.as_bytes()), &mut calls);
        calls[at].sets.push(set);
    }
    calls
}

/// Whether an error reply to an `invalidate_node.lua` call means the cluster will never run
/// it: an ACL denying EVAL, or a Redis older than 7.0 (no script flags).
fn refuses_scripts(code: &str, details: &str) -> bool {
    code == "NOPERM" || details.contains("compiling script") || details.contains("shebang")
}

/// What walsweep says, in its log and in `walsweep check`, of a cluster refusing
/// `invalidate_node.lua`.
pub(crate) const NODE_SCRIPT_REFUSED: &str = "the Redis Cluster refuses walsweep's per-node \
     script (invalidate_node.lua); invalidations go one command per hash slot instead, which \
     costs Redis and walsweep more per change: allow EVAL for walsweep's Redis user (Redis 7.0 \
     or newer runs the script)";

/// Runs `invalidate_node.lua` with nothing to invalidate on each of `primaries`: `None` when
/// every one ran it, else the refusal as the node replied (`walsweep check`); `Err`: another
/// failure, with the node that failed.
pub(crate) async fn node_script_refusal(
    conn: &mut RedisConn,
    primaries: &[Primary],
) -> Result<Option<String>, String> {
    let mut eval = ::redis::cmd("EVAL");
    // No key declared, no key to unlink, no set to read.
    eval.arg(INVALIDATE_NODE_LUA).arg(0).arg(0);
    for primary in primaries {
        // An error reply may come back as a value (the cluster connection's routing) or as
        // the error: either way, as Redis wrote it.
        let (refused, reply) = match conn.query_on::<Value>(Some(primary), &eval).await {
            Ok(Value::ServerError(e)) => (
                refuses_scripts(e.code(), e.details().unwrap_or_default()),
                super::errors::reply_text(&e),
            ),
            Ok(_) => continue,
            Err(e) => (
                e.code()
                    .is_some_and(|code| refuses_scripts(code, e.detail().unwrap_or_default())),
                e.to_string(),
            ),
        };
        let reply = format!("{}:{}: {reply}", primary.host, primary.port);
        return if refused { Ok(Some(reply)) } else { Err(reply) };
    }
    Ok(None)
}

/// UNLINKs `keys` wherever they live; returns how many existed. On a cluster, one
/// `invalidate_node.lua` call per primary (or one UNLINK per slot if the cluster refuses it);
/// on one node, UNLINKs of at most `KEYS_PER_COMMAND` keys in one pipeline.
pub(crate) async fn unlink_keys<S: AsRef<str>>(
    conn: &RedisConn,
    keys: &[S],
    operation: &'static str,
) -> Result<u64, SinkError> {
    if keys.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&str> = keys.iter().map(AsRef::as_ref).collect();
    if let Some(reads) = by_node(conn, &keys, &[], operation).await? {
        return Ok(reads.keys_unlinked);
    }
    unlink_keys_per_slot(conn, &keys, operation).await
}

async fn unlink_keys_per_slot(
    conn: &RedisConn,
    keys: &[&str],
    operation: &'static str,
) -> Result<u64, SinkError> {
    let groups = if conn.is_cluster() {
        group_by_slot(keys.iter().copied(), |k| k.as_bytes())
    } else {
        // One node: any keys go in one command.
        vec![(0, keys.to_vec())]
    };
    let mut commands = Vec::new();
    for (slot, group) in groups {
        for chunk in group.chunks(KEYS_PER_COMMAND) {
            let mut unlink = ::redis::cmd("UNLINK");
            unlink.arg(chunk);
            commands.push((slot, unlink));
        }
    }
    let counts = run_all(conn, commands, operation).await?;
    Ok(counts.iter().map(count).sum())
}

/// Reads the members of `sets`, one SMEMBERS per set, one pipeline per primary.
async fn read_sets_per_slot(
    conn: &RedisConn,
    sets: &[&str],
    operation: &'static str,
) -> Result<NodeReads, SinkError> {
    let reads: Vec<(u16, ::redis::Cmd)> = sets
        .iter()
        .map(|set| {
            let mut smembers = ::redis::cmd("SMEMBERS");
            smembers.arg(*set);
            (slot_of(set.as_bytes()), smembers)
        })
        .collect();
    let replies = per_node(conn, reads, operation).await?;
    let mut read = NodeReads::default();
    for (set, reply) in sets.iter().zip(replies) {
        let members: Vec<String> = match reply {
            // Not a set: not ours to interpret (like the one-node script).
            Value::ServerError(e) if e.code() == "WRONGTYPE" => {
                read.wrong_type_sets += 1;
                continue;
            }
            other => ::redis::from_redis_value(self::reply(other, operation)?)
                .map_err(|e| super::sink_error(operation, e.into()))?,
        };
        if !members.is_empty() {
            read.found.push((set.to_string(), members));
        }
    }
    Ok(read)
}

/// Unlinks `keys` and invalidates matroska-cache dependency sets on a cluster: each set's
/// members are read on the set's node (with the keys of that node, `by_node`), then unlinked
/// wherever they live; with `remove_sets`, the members read are then removed from their set
/// (SREM, so a member added meanwhile stays for the next change to find, and a set left empty
/// disappears). A crash in between leaves the set whole, so the retried batch finds the same
/// members again.
pub(crate) async fn invalidate<S: AsRef<str>>(
    conn: &RedisConn,
    keys: &[&str],
    sets: &[S],
    remove_sets: bool,
    operation: &'static str,
) -> Result<Unlinked, SinkError> {
    let sets: Vec<&str> = sets.iter().map(AsRef::as_ref).collect();
    let reads = match by_node(conn, keys, &sets, operation).await? {
        Some(reads) => reads,
        None => {
            let (unlinked, mut reads) = futures_util::future::try_join(
                unlink_keys_per_slot(conn, keys, operation),
                read_sets_per_slot(conn, &sets, operation),
            )
            .await?;
            reads.keys_unlinked += unlinked;
            reads
        }
    };
    let mut applied = Unlinked {
        keys_unlinked: reads.keys_unlinked,
        wrong_type_sets: reads.wrong_type_sets,
    };
    let members: Vec<&str> = reads
        .found
        .iter()
        .flat_map(|(_, members)| members.iter().map(String::as_str))
        .collect();
    applied.keys_unlinked += unlink_keys(conn, &members, operation).await?;
    if remove_sets {
        let mut removals = Vec::new();
        for (set, members) in &reads.found {
            for chunk in members.chunks(KEYS_PER_COMMAND) {
                let mut srem = ::redis::cmd("SREM");
                srem.arg(set).arg(chunk);
                removals.push((slot_of(set.as_bytes()), srem));
            }
        }
        run_all(conn, removals, operation).await?;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_keep_each_slots_items_in_order() {
        let keys = ["a", "{a}1", "b", "{a}2", "{b}9"];
        let groups = group_by_slot(keys, |k| k.as_bytes());
        let a = groups.iter().find(|(s, _)| *s == slot_of(b"a")).unwrap();
        assert_eq!(a.1, vec!["a", "{a}1", "{a}2"]);
        assert_eq!(groups.iter().map(|(_, g)| g.len()).sum::<usize>(), 5);
    }

    #[test]
    fn node_calls_hold_one_nodes_items_and_at_most_their_share() {
        // Three primaries by slot range, as `redis-cli --cluster create` splits them.
        let owner = |slot: u16| usize::from(slot / 5462);
        let keys: Vec<String> = (0..9_000).map(|i| format!("article:{i}")).collect();
        let sets: Vec<String> = (0..6_000).map(|i| format!("cache::rdep::id:{i}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let calls = node_calls(owner, 3, &keys, &sets);
        let mut seen_keys = Vec::new();
        let mut seen_sets = Vec::new();
        for call in &calls {
            let node = owner(call.route);
            assert!(call.keys.len() + call.sets.len() <= ITEMS_PER_NODE_CALL);
            for item in call.keys.iter().chain(&call.sets) {
                assert_eq!(
                    owner(slot_of(item.as_bytes())),
                    node,
                    "{item} is on another node"
                );
            }
            seen_keys.extend(call.keys.iter().copied());
            seen_sets.extend(call.sets.iter().copied());
        }
        // 15 000 items over 3 nodes: two calls per node at least, each item exactly once.
        assert!(calls.len() >= 6, "{} calls", calls.len());
        seen_keys.sort();
        seen_sets.sort();
        let (mut want_keys, mut want_sets) = (keys.clone(), sets.clone());
        want_keys.sort();
        want_sets.sort();
        assert_eq!(seen_keys, want_keys);
        assert_eq!(seen_sets, want_sets);
        assert!(node_calls(owner, 3, &[], &[]).is_empty());
    }

    #[test]
    fn only_a_refused_script_sends_invalidations_slot_by_slot() {
        let reply = |code, details| (code, details);
        for refused in [
            reply(
                "NOPERM",
                "this user has no permissions to run the 'eval' command",
            ),
            // Redis 6 reading the flags line.
            reply(
                "ERR",
                "Error compiling script (new function): user_script:1: unexpected symbol near '#'",
            ),
            reply("ERR", "Unknown lua shebang option: allow-cross-slot-keys"),
        ] {
            assert!(refuses_scripts(refused.0, refused.1), "{refused:?}");
        }
        for other in [
            reply(
                "ERR",
                "Script attempted to access a non local key in a cluster node script: e3e1",
            ),
            reply(
                "WRONGTYPE",
                "Operation against a key holding the wrong kind of value",
            ),
            reply("BUSY", "Redis is busy running a script"),
        ] {
            assert!(!refuses_scripts(other.0, other.1), "{other:?}");
        }
    }
}
