//! Applying mirror ops on a Redis Cluster. A row's key and its index keys usually hash to
//! different slots, so what `mirror_rows.lua` does in one call on one node is done in two
//! phases per stretch of ops:
//!
//! 1. rows: every op's row part (write, merge with kept TOAST fields, delete) in a
//!    `mirror_rows.lua` call on the row's slot, the calls of each slot in commit order, one
//!    pipeline per primary (`RedisConn::per_node`);
//! 2. index moves: each op's ZREM / ZADD in a `mirror_index.lua` call on the index key's slot,
//!    again in commit order per slot, skipping the adds of an `only_if_present` row that was
//!    not cached (like the one-node script).
//!
//! Each phase keeps commit order per key, so the last write of a key wins as on one node. A
//! reader may see a row before its index entry moved (atomicity is per slot). Two kinds of op
//! end a stretch: a `Clear` (it must land between the ops around it), and a row whose key
//! changed to another slot (its stored fields are carried over with DUMP / RESTORE before it
//! is written, then the old key is removed). Everything is idempotent: a failed batch is
//! retried whole.

use std::sync::LazyLock;

use ::redis::{Script, Value};

use super::cluster::{group_by_slot, slot_of};
use super::mirror::{
    log_op, retention_args, score_arg_of, Call, MirrorApplied, RowPart, MIRROR_ROWS, ROWS_PER_CALL,
};
use super::{RedisConn, RedisSink};
use crate::plan::mirror::MirrorOp;
use crate::sink::SinkError;

static MIRROR_INDEX: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/mirror_index.lua")));

/// Index moves per `mirror_index.lua` call.
const MOVES_PER_CALL: usize = 200;

/// One index move of phase 2: key, then the script's arguments.
struct IndexMove {
    key: String,
    args: Vec<String>,
}

impl RedisSink {
    pub(super) async fn apply_mirror_ops_on_cluster<'a>(
        &mut self,
        ops: impl IntoIterator<Item = &'a MirrorOp>,
        cutoff_unix_secs: i64,
    ) -> Result<MirrorApplied, SinkError> {
        let mut conn = self.connection().await?;
        self.load_cluster_scripts(&conn).await?;
        let mut applied = MirrorApplied::default();
        let mut stretch: Vec<&MirrorOp> = Vec::new();
        for op in ops {
            if tracing::enabled!(target: super::EFFECTS_LOG_TARGET, tracing::Level::DEBUG) {
                log_op(op);
            }
            match op {
                MirrorOp::Clear { prefixes, cause } => {
                    apply_stretch(
                        &conn,
                        &std::mem::take(&mut stretch),
                        cutoff_unix_secs,
                        &mut applied,
                    )
                    .await?;
                    for prefix in prefixes {
                        applied.cleared_keys += self
                            .unlink_prefix(&mut conn, prefix, "clear mirror keys")
                            .await?;
                        tracing::debug!(target: super::EFFECTS_LOG_TARGET, cause = cause.as_str(), "clear mirror {prefix}*");
                    }
                }
                MirrorOp::Write(w)
                    if w.source != w.key
                        && slot_of(w.source.as_bytes()) != slot_of(w.key.as_bytes()) =>
                {
                    apply_stretch(
                        &conn,
                        &std::mem::take(&mut stretch),
                        cutoff_unix_secs,
                        &mut applied,
                    )
                    .await?;
                    carry_over(&conn, &w.source, &w.key).await?;
                    apply_stretch(&conn, &[op], cutoff_unix_secs, &mut applied).await?;
                    super::cluster::unlink_keys(
                        &conn,
                        &[&w.source],
                        "remove a moved row's old key",
                    )
                    .await?;
                }
                _ => stretch.push(op),
            }
        }
        apply_stretch(&conn, &stretch, cutoff_unix_secs, &mut applied).await?;
        Ok(applied)
    }

    /// Loads the mirror scripts on every node once per connection (again after any error, which
    /// drops the connection: a failover or a new node may lack them).
    async fn load_cluster_scripts(&mut self, conn: &RedisConn) -> Result<(), SinkError> {
        if self.cluster_scripts_loaded {
            return Ok(());
        }
        for source in [
            include_str!("scripts/mirror_rows.lua"),
            include_str!("scripts/mirror_index.lua"),
        ] {
            let mut conn = conn.clone();
            // SCRIPT LOAD goes to every node of the cluster.
            let _: Value = super::round_trip(
                "load the mirror scripts on every node",
                ::redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(source)
                    .query_async(&mut conn),
            )
            .await?;
        }
        self.cluster_scripts_loaded = true;
        Ok(())
    }
}

/// A row moving to a key of another slot: its stored entry is copied to the new key first
/// (when there is one and the new key holds none), so a write that keeps unchanged TOAST fields
/// or only updates cached rows finds it there. Run again after a crash, it copies the same
/// entry again: the old key is removed only after the row was written.
async fn carry_over(conn: &RedisConn, source: &str, target: &str) -> Result<(), SinkError> {
    const OPERATION: &str = "carry a moved row to its new key";
    let mut conn = conn.clone();
    let dumped: Option<Vec<u8>> = super::round_trip(
        OPERATION,
        ::redis::cmd("DUMP").arg(source).query_async(&mut conn),
    )
    .await?;
    if let Some(payload) = dumped {
        let ttl_ms: i64 = super::round_trip(
            OPERATION,
            ::redis::cmd("PTTL").arg(source).query_async(&mut conn),
        )
        .await?;
        let _: Value = super::round_trip(
            OPERATION,
            ::redis::cmd("RESTORE")
                .arg(target)
                .arg(ttl_ms.max(0))
                .arg(payload)
                .arg("REPLACE")
                .query_async(&mut conn),
        )
        .await?;
    }
    Ok(())
}

/// Phase 1 then phase 2 (module docs) for `ops`, none of them a `Clear`.
async fn apply_stretch(
    conn: &RedisConn,
    ops: &[&MirrorOp],
    cutoff_unix_secs: i64,
    applied: &mut MirrorApplied,
) -> Result<(), SinkError> {
    if ops.is_empty() {
        return Ok(());
    }
    // Phase 1. A row that is written only if cached gets a call of its own, whose reply says
    // whether it was, so phase 2 knows whether to add its index entries.
    let mut calls: Vec<(u16, ::redis::Cmd)> = Vec::new();
    let mut conditional: Vec<Option<usize>> = Vec::new();
    for (slot, group) in group_by_slot(ops.iter().enumerate(), |(_, op)| row_key(op).as_bytes()) {
        let mut call = Call::default();
        for (at, op) in group {
            let only_if_present = matches!(op, MirrorOp::Write(w) if w.mode.only_if_present);
            if only_if_present || call.rows >= ROWS_PER_CALL {
                push_call(
                    &mut calls,
                    &mut conditional,
                    slot,
                    std::mem::take(&mut call),
                    None,
                );
            }
            call.push_row(op, cutoff_unix_secs, RowPart::RowOnly);
            if only_if_present {
                push_call(
                    &mut calls,
                    &mut conditional,
                    slot,
                    std::mem::take(&mut call),
                    Some(at),
                );
            }
        }
        push_call(&mut calls, &mut conditional, slot, call, None);
    }
    let mut skipped = vec![false; ops.len()];
    let replies = run_calls(conn, calls, "write mirrored rows", "mirror_rows.lua").await?;
    for (reply, at) in replies.iter().zip(conditional) {
        applied.add_reply(reply);
        if let (Some(at), Value::Array(counts)) = (at, reply) {
            skipped[at] = matches!(counts.get(2), Some(Value::Int(n)) if *n > 0);
        }
    }
    // Phase 2.
    let mut moves: Vec<IndexMove> = Vec::new();
    for (op, skipped) in ops.iter().zip(skipped) {
        push_index_moves(&mut moves, op, skipped, cutoff_unix_secs);
    }
    let mut calls = Vec::new();
    for (slot, group) in group_by_slot(moves, |m| m.key.as_bytes()) {
        for chunk in group.chunks(MOVES_PER_CALL) {
            let mut cmd = ::redis::cmd("EVALSHA");
            cmd.arg(MIRROR_INDEX.get_hash()).arg(chunk.len());
            for m in chunk {
                cmd.arg(&m.key);
            }
            for m in chunk {
                cmd.arg(&m.args);
            }
            calls.push((slot, cmd));
        }
    }
    for reply in run_calls(conn, calls, "move mirror index entries", "mirror_index.lua").await? {
        applied.add_reply(&reply);
    }
    Ok(())
}

/// The key a row op's phase-1 call runs on.
fn row_key(op: &MirrorOp) -> &str {
    match op {
        MirrorOp::Write(w) => &w.key,
        MirrorOp::Delete { key, .. } => key,
        MirrorOp::Clear { .. } => "",
    }
}

fn push_call(
    calls: &mut Vec<(u16, ::redis::Cmd)>,
    conditional: &mut Vec<Option<usize>>,
    slot: u16,
    call: Call,
    at: Option<usize>,
) {
    if call.rows == 0 {
        return;
    }
    let mut cmd = ::redis::cmd("EVALSHA");
    cmd.arg(MIRROR_ROWS.get_hash())
        .arg(call.keys.len())
        .arg(&call.keys)
        .arg(&call.args);
    calls.push((slot, cmd));
    conditional.push(at);
}

/// Phase 2's moves of `op`, in the order `mirror_rows.lua` applies them on one node: removes,
/// then (unless the row was skipped) adds.
fn push_index_moves(
    moves: &mut Vec<IndexMove>,
    op: &MirrorOp,
    skipped: bool,
    cutoff_unix_secs: i64,
) {
    let (removes, adds) = match op {
        MirrorOp::Write(w) => (&w.index_removes[..], &w.index_adds[..]),
        MirrorOp::Delete { index_removes, .. } => (&index_removes[..], &[][..]),
        MirrorOp::Clear { .. } => return,
    };
    for r in removes {
        moves.push(IndexMove {
            key: r.key.clone(),
            args: vec!["r".into(), r.member.clone()],
        });
    }
    if skipped {
        return;
    }
    for add in adds {
        let mut args = vec![String::new(), add.member.clone(), score_arg_of(add.score)];
        if add.retention.is_some() {
            let (min, max) = retention_args(add, cutoff_unix_secs);
            args[0] = "A".into();
            args.push(min);
            args.push(max);
        } else {
            args[0] = "a".into();
        }
        moves.push(IndexMove {
            key: add.key.clone(),
            args,
        });
    }
}

/// Sends script calls (each within one slot) as one pipeline per primary; their replies in
/// order, or the batch's error (`errors::script_reply_error`).
async fn run_calls(
    conn: &RedisConn,
    calls: Vec<(u16, ::redis::Cmd)>,
    operation: &'static str,
    script: &'static str,
) -> Result<Vec<Value>, SinkError> {
    let replies = conn
        .per_node(calls)
        .await
        .map_err(|e| super::sink_error(operation, e))?;
    replies
        .into_iter()
        .map(|reply| match reply {
            Value::ServerError(e) => Err(super::errors::script_reply_error(operation, script, e)),
            other => Ok(other),
        })
        .collect()
}
