//! The crash-recovery record (`crate::sink::Recovery`) kept in Redis next to the data it
//! protects, at `walsweep:<database>/<slot>:recovery`: written before walsweep drops or creates
//! its slot, deleted when the clear and the warm-up after it are done. Keeping it in Redis rather
//! than on local disk means a daemon restarted elsewhere (a new pod) still finds it.

use super::{round_trip, RedisSink};
use crate::sink::{Recovery, SinkError};

const RECORD: &str = "recovery";

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
}
