//! Effects on a Redis Cluster, where one script or command may only touch keys of one hash
//! slot: what the one-node sink does in a single script call is split here into per-slot
//! commands, sent as one pipeline per primary, the primaries concurrently
//! (`RedisConn::per_node`).
//!
//! Atomicity becomes per slot. Every effect stays idempotent, so a batch that fails halfway is
//! retried whole and converges; nothing is confirmed to Postgres before every request of the
//! batch succeeded on every node.

use ::redis::Value;

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
    let replies = conn
        .per_node(commands)
        .await
        .map_err(|e| super::sink_error(operation, e))?;
    replies.into_iter().map(|r| reply(r, operation)).collect()
}

/// A reply of a `per_node` pipeline, an error reply as the batch's error.
pub(crate) fn reply(value: Value, operation: &'static str) -> Result<Value, SinkError> {
    match value {
        Value::ServerError(e) => Err(super::sink_error(operation, e.into())),
        other => Ok(other),
    }
}

fn count(value: &Value) -> u64 {
    match value {
        Value::Int(n) => (*n).max(0) as u64,
        _ => 0,
    }
}

/// UNLINKs `keys` wherever they live; returns how many existed. One UNLINK per slot (at most
/// `KEYS_PER_COMMAND` keys), one pipeline per primary.
pub(crate) async fn unlink_keys<S: AsRef<str>>(
    conn: &RedisConn,
    keys: &[S],
    operation: &'static str,
) -> Result<u64, SinkError> {
    let mut commands = Vec::new();
    let groups = if conn.is_cluster() {
        group_by_slot(keys.iter().map(AsRef::as_ref), |k| k.as_bytes())
    } else {
        // One node: any keys go in one command.
        vec![(0, keys.iter().map(AsRef::as_ref).collect())]
    };
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

/// Invalidates matroska-cache dependency sets on a cluster: each set's members are read on the
/// set's node, then unlinked wherever they live; with `remove_sets`, the members read are then
/// removed from their set (SREM, so a member added meanwhile stays for the next change to
/// find, and a set left empty disappears). A crash in between leaves the set whole, so the
/// retried batch finds the same members again.
pub(crate) async fn invalidate_sets(
    conn: &RedisConn,
    sets: &[String],
    remove_sets: bool,
    operation: &'static str,
) -> Result<Unlinked, SinkError> {
    let mut applied = Unlinked::default();
    if sets.is_empty() {
        return Ok(applied);
    }
    let reads: Vec<(u16, ::redis::Cmd)> = sets
        .iter()
        .map(|set| {
            let mut smembers = ::redis::cmd("SMEMBERS");
            smembers.arg(set);
            (slot_of(set.as_bytes()), smembers)
        })
        .collect();
    let read = conn
        .per_node(reads)
        .await
        .map_err(|e| super::sink_error(operation, e))?;
    let mut members: Vec<String> = Vec::new();
    let mut removals = Vec::new();
    for (set, read) in sets.iter().zip(read) {
        let m: Vec<String> = match read {
            // Not a set: not ours to interpret (like the one-node script).
            Value::ServerError(e) if e.code() == "WRONGTYPE" => {
                applied.wrong_type_sets += 1;
                continue;
            }
            other => ::redis::from_redis_value(reply(other, operation)?)
                .map_err(|e| super::sink_error(operation, e.into()))?,
        };
        if remove_sets {
            for chunk in m.chunks(KEYS_PER_COMMAND) {
                let mut srem = ::redis::cmd("SREM");
                srem.arg(set).arg(chunk);
                removals.push((slot_of(set.as_bytes()), srem));
            }
        }
        members.extend(m);
    }
    applied.keys_unlinked += unlink_keys(conn, &members, operation).await?;
    run_all(conn, removals, operation).await?;
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
}
