//! Watches the slot from the outside over SQL: how much WAL it holds, whether Postgres still
//! reserves that WAL, and, while a backlog drains, how fast and how long until caught up.

use std::time::{Duration, Instant};

use crate::pg::catalog;
use crate::pg::replication::ConnectParams;
use crate::pg::slot_invalidation::Invalidation;
use crate::pg::Lsn;
use crate::telemetry::metrics as m;

/// A backlog above this many bytes counts as catching up and gets progress lines.
const CATCHING_UP_BYTES: u64 = 16 * 1024 * 1024;

/// One poll.
#[derive(Debug, Clone)]
pub(crate) struct SlotSample {
    pub(crate) current_wal_lsn: Lsn,
    pub(crate) confirmed_flush_lsn: Option<Lsn>,
    pub(crate) active: bool,
    pub(crate) wal_status: Option<String>,
    pub(crate) safe_wal_size: Option<i64>,
}

impl SlotSample {
    pub(crate) fn lag_bytes(&self) -> u64 {
        self.confirmed_flush_lsn
            .map_or(0, |c| self.current_wal_lsn.bytes_since(c))
    }
}

/// Reads the slot's state; `Ok(None)` when the slot does not exist.
pub(crate) async fn sample(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotSample>, catalog::CatalogError> {
    let Some(state) = catalog::slot_state(client, slot).await? else {
        return Ok(None);
    };
    let current_wal_lsn = catalog::current_wal_lsn(client).await?;
    Ok(Some(SlotSample {
        current_wal_lsn,
        confirmed_flush_lsn: state.confirmed_flush_lsn,
        active: state.active,
        wal_status: state.wal_status,
        safe_wal_size: state.safe_wal_size,
    }))
}

/// Polls every `interval` until dropped; failures are logged at debug and retried, since the
/// replication side already reports outages.
pub(crate) async fn watch_slot(params: ConnectParams, slot: String, interval: Duration) {
    let mut client = None;
    let mut previous: Option<(Instant, u64)> = None;
    let mut lost_reported = false;
    loop {
        if client.is_none() {
            match catalog::connect(&params).await {
                Ok(c) => client = Some(c),
                Err(e) => tracing::debug!(error = %e, "slot monitor cannot connect"),
            }
        }
        if let Some(c) = &client {
            match sample(c, &slot).await {
                Ok(Some(s)) => {
                    let lag = s.lag_bytes();
                    m::slot_polled(lag, s.wal_status.as_deref(), s.safe_wal_size);
                    if s.wal_status.as_deref() == Some("lost") && !lost_reported {
                        lost_reported = true;
                        let invalidation = Invalidation::read(c, &slot)
                            .await
                            .ok()
                            .flatten()
                            .unwrap_or_default();
                        tracing::error!(
                            slot = %slot,
                            "replication slot {}; caches may have missed changes. Recreate the \
                             slot and clear the caches (source.on_slot_lost = \"recreate\" does \
                             both when walsweep reconnects).{}",
                            invalidation.what(),
                            invalidation
                                .prevention()
                                .map(|p| format!(" {p}."))
                                .unwrap_or_default()
                        );
                    }
                    let now = Instant::now();
                    if lag > CATCHING_UP_BYTES {
                        if let Some((then, before)) = previous {
                            let secs = now.duration_since(then).as_secs_f64().max(0.001);
                            let rate = (before as f64 - lag as f64) / secs;
                            let eta = (rate > 0.0).then(|| (lag as f64 / rate).round() as u64);
                            tracing::info!(
                                remaining_bytes = lag,
                                drain_rate_bytes_per_s = rate.round() as i64,
                                eta_s = ?eta,
                                "catching up"
                            );
                        }
                    }
                    previous = Some((now, lag));
                }
                Ok(None) => tracing::debug!(slot = %slot, "slot monitor: slot does not exist"),
                Err(e) => {
                    tracing::debug!(error = %e, "slot monitor query failed");
                    client = None;
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}
