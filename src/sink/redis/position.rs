//! The applied position, published for read-your-writes (`walsweep wait`, the Python helper):
//! `walsweep:<database>/<slot>:applied` holds the end LSN (as a decimal number) of the last
//! commit whose effects Redis confirmed, or the keepalive position walsweep acknowledged while
//! nothing was pending, and every advance is published on the channel of the same name.
//!
//! It is written only after the batch's effects were confirmed, in the order the sink applies
//! batches, so "position ≥ X" means every effect of every commit before X is in Redis. It never
//! moves back (a batch redelivered after a restart leaves it), except when a new history starts
//! (`reset`, `slot_created`): the key is deleted then, since the new slot's LSNs may be lower.

use std::sync::LazyLock;

use ::redis::Script;

use super::errors::ScriptCalls;
use super::{round_trip, script_round_trip, RedisSink};
use crate::pg::Lsn;
use crate::sink::SinkError;

/// The key (and channel) name after the state prefix.
pub const APPLIED: &str = "applied";

static ADVANCE_POSITION: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/advance_position.lua")));

impl RedisSink {
    pub(super) async fn write_position(&mut self, lsn: Lsn) -> Result<(), SinkError> {
        let mut conn = self.connection().await?;
        let key = self.state_key(APPLIED);
        let _moved: u64 = script_round_trip(
            "publish the applied position",
            ScriptCalls {
                script: "advance_position.lua",
                at: 0..usize::MAX,
            },
            ADVANCE_POSITION
                .key(&key)
                .arg(lsn.as_u64().to_string())
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(())
    }

    pub(super) async fn delete_position(&mut self) -> Result<(), SinkError> {
        let mut conn = self.connection().await?;
        let _: u64 = round_trip(
            "delete the applied position of the old history",
            ::redis::cmd("DEL")
                .arg(self.state_key(APPLIED))
                .query_async(&mut conn),
        )
        .await?;
        Ok(())
    }
}
