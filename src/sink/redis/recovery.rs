//! The crash-recovery record (`crate::sink::Recovery`) kept in Redis next to the data it
//! protects, at `walsweep:<database>/<slot>:recovery`: written before walsweep drops or creates
//! its slot, deleted when the clear and the warm-up after it are done. Keeping it in Redis rather
//! than on local disk means a daemon restarted elsewhere (a new pod) still finds it.

use super::{round_trip, RedisSink};
use crate::pg::Lsn;
use crate::sink::{Recovery, SinkError};
use crate::stream::history::RecordedSource;

const RECORD: &str = "recovery";
/// The source walsweep streamed from: a hash an operator can read (`HGETALL`).
pub(crate) const SOURCE: &str = "source";

impl RedisSink {
    pub(super) async fn read_recovery(&mut self) -> Result<Recovery, SinkError> {
        let mut conn = self.connection().await?;
        let stored: Option<String> = round_trip(
            "read the crash-recovery record",
            ::redis::cmd("GET")
                .arg(self.state_key(RECORD))
                .query_async(&mut conn),
        )
        .await?;
        Ok(stored.as_deref().map(Recovery::decode).unwrap_or_default())
    }

    pub(super) async fn write_recovery(&mut self, steps: Recovery) -> Result<(), SinkError> {
        let mut conn = self.connection().await?;
        let () = round_trip(
            "write the crash-recovery record",
            ::redis::cmd("SET")
                .arg(self.state_key(RECORD))
                .arg(steps.encode())
                .query_async(&mut conn),
        )
        .await?;
        Ok(())
    }

    pub(super) async fn delete_recovery(&mut self) -> Result<(), SinkError> {
        let mut conn = self.connection().await?;
        let _: u64 = round_trip(
            "delete the crash-recovery record",
            ::redis::cmd("DEL")
                .arg(self.state_key(RECORD))
                .query_async(&mut conn),
        )
        .await?;
        Ok(())
    }

    pub(super) async fn read_source(&mut self) -> Result<Option<RecordedSource>, SinkError> {
        let mut conn = self.connection().await?;
        let fields: std::collections::HashMap<String, String> = round_trip(
            "read walsweep's record of its source",
            ::redis::cmd("HGETALL")
                .arg(self.state_key(SOURCE))
                .query_async(&mut conn),
        )
        .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        // A record that does not parse still says walsweep streamed from the slot: keep that,
        // with an identity nothing matches, rather than take it for a first start.
        Ok(Some(RecordedSource {
            system_id: fields.get("system_id").cloned().unwrap_or_default(),
            timeline: fields
                .get("timeline")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0),
            confirmed_lsn: fields
                .get("confirmed_lsn")
                .and_then(|l| l.parse::<Lsn>().ok())
                .unwrap_or_default(),
        }))
    }

    pub(super) async fn write_source(&mut self, source: &RecordedSource) -> Result<(), SinkError> {
        let mut conn = self.connection().await?;
        let () = round_trip(
            "record the source walsweep streams from",
            ::redis::cmd("HSET")
                .arg(self.state_key(SOURCE))
                .arg("system_id")
                .arg(&source.system_id)
                .arg("timeline")
                .arg(source.timeline)
                .arg("confirmed_lsn")
                .arg(source.confirmed_lsn.to_string())
                .query_async(&mut conn),
        )
        .await
        .map(|_: u64| ())?;
        Ok(())
    }
}
