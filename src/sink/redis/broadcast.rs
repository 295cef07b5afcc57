//! Publishing broadcast messages (`crate::plan::broadcast`): one `scripts/broadcast.lua` call per
//! transaction, pipelined after the batch's invalidations and mirror writes, so a subscriber
//! that reacts to a message already sees the transaction's effects in Redis.

use std::sync::LazyLock;

use ::redis::{Script, Value};

use super::errors::ScriptCalls;
use super::{script_round_trip, RedisSink};
use crate::config::BroadcastConfig;
use crate::plan::txn::TxnPlan;
use crate::sink::SinkError;
use crate::stream::assembler::CommittedTxn;
use crate::telemetry::metrics as m;

static BROADCAST: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/broadcast.lua")));

/// Where the last published LSN is kept: next to the stream, else the channel's name. On a
/// cluster the script writes both, so the key shares the stream's hash slot (`None` when the
/// stream's name cannot have such a neighbour, see `cluster::same_slot_key`).
pub(crate) fn state_key(config: &BroadcastConfig, cluster: bool) -> Option<String> {
    let base = config
        .stream
        .as_deref()
        .or(config.channel.as_deref())
        .unwrap_or("walsweep");
    match (&config.stream, cluster) {
        (Some(stream), true) => super::cluster::same_slot_key(stream, ":last_lsn"),
        _ => Some(format!("{base}:last_lsn")),
    }
}

impl RedisSink {
    pub(super) async fn publish(
        &mut self,
        batch: &[CommittedTxn<TxnPlan>],
    ) -> Result<(u64, u64), SinkError> {
        let Some(config) = self.broadcast.clone() else {
            return Ok((0, 0));
        };
        let messages: Vec<(String, String, String)> = batch
            .iter()
            .filter(|t| !t.plan.broadcast.is_empty())
            .map(|t| {
                (
                    format!("{:016X}", t.commit_lsn.as_u64()),
                    t.commit_lsn.to_string(),
                    t.plan
                        .broadcast
                        .message_body(t.commit_lsn, t.commit_time_unix_micros, t.xid),
                )
            })
            .collect();
        self.run_broadcast(&config, &messages).await
    }

    /// Tells subscribers to drop everything (the stream had a gap).
    pub(super) async fn publish_reset(&mut self, reason: &str) -> Result<(), SinkError> {
        let Some(config) = self.broadcast.clone() else {
            return Ok(());
        };
        let body = crate::plan::broadcast::reset_body(reason);
        self.run_broadcast(&config, &[(String::new(), String::new(), body)])
            .await?;
        Ok(())
    }

    /// Returns (published, duplicates skipped).
    async fn run_broadcast(
        &mut self,
        config: &BroadcastConfig,
        messages: &[(String, String, String)],
    ) -> Result<(u64, u64), SinkError> {
        if messages.is_empty() {
            return Ok((0, 0));
        }
        let mut conn = self.connection().await?;
        let state = state_key(config, self.endpoint.is_cluster()).ok_or_else(|| SinkError {
            operation: "publish broadcast messages",
            retryable: false,
            source: "on a Redis Cluster, broadcast.stream must be a name walsweep can keep its \
                     chain state next to (in the same hash slot): give it a hash tag, e.g. \
                     \"{walsweep}:changes\", or leave '}' out of it"
                .into(),
        })?;
        let mut keys = vec![state.as_str()];
        keys.extend(config.stream.as_deref());
        let mut pipe = ::redis::pipe();
        pipe.cmd("SCRIPT")
            .arg("LOAD")
            .arg(include_str!("scripts/broadcast.lua"))
            .ignore();
        for (hex, text, body) in messages {
            pipe.cmd("EVALSHA")
                .arg(BROADCAST.get_hash())
                .arg(keys.len())
                .arg(&keys)
                .arg(hex)
                .arg(text)
                .arg(body)
                .arg(config.channel.as_deref().unwrap_or(""))
                .arg(config.stream_max_len);
        }
        let replies: Vec<Value> = script_round_trip(
            "publish broadcast messages",
            ScriptCalls {
                script: "broadcast.lua",
                at: 1..usize::MAX,
            },
            pipe.query_async(&mut conn),
        )
        .await?;
        let published = replies
            .iter()
            .filter(|r| matches!(r, Value::Int(1)))
            .count() as u64;
        let duplicates = replies.len() as u64 - published;
        m::broadcasts(published, duplicates);
        Ok((published, duplicates))
    }
}
