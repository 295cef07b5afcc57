//! Why Postgres invalidated a replication slot, told so that an operator can act on it: what
//! happened, and which setting keeps it from happening again. Every invalidated slot shows
//! `wal_status = 'lost'`, whatever the cause; only `invalidation_reason` (Postgres 17+) tells
//! WAL removal (`max_slot_wal_keep_size`) from an idle timeout (`idle_replication_slot_timeout`,
//! 18+) and the rest.

use tokio_postgres::Client;

use super::catalog::CatalogError;

/// What the server says about one slot's invalidation, with the setting behind each cause.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Invalidation {
    /// `pg_replication_slots.invalidation_reason`: `wal_removed`, `rows_removed`,
    /// `wal_level_insufficient`, `idle_timeout` (18+); `None` before 17, where WAL removal was
    /// the only cause on a primary.
    pub(crate) reason: Option<String>,
    /// `max_slot_wal_keep_size` as `SHOW` prints it (`-1`, `2MB`, ...).
    pub(crate) max_slot_wal_keep_size: Option<String>,
    /// `idle_replication_slot_timeout` as `SHOW` prints it (`0`, `1d`, ...); `None` before 18.
    pub(crate) idle_replication_slot_timeout: Option<String>,
}

impl Invalidation {
    /// Reads it for `slot`; `Ok(None)` when the slot does not exist. Columns and settings a
    /// server's major lacks read as `None` (through `to_jsonb` and `current_setting(.., true)`,
    /// so one query serves every major).
    pub(crate) async fn read(client: &Client, slot: &str) -> Result<Option<Self>, CatalogError> {
        let row = client
            .query_opt(
                "SELECT to_jsonb(s) ->> 'invalidation_reason', \
                        current_setting('max_slot_wal_keep_size', true), \
                        current_setting('idle_replication_slot_timeout', true) \
                 FROM pg_replication_slots s WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|source| CatalogError::Query {
                what: "reading why the replication slot was invalidated",
                source,
            })?;
        Ok(row.map(|r| Invalidation {
            reason: r.get(0),
            max_slot_wal_keep_size: r.get(1),
            idle_replication_slot_timeout: r.get(2),
        }))
    }

    /// What happened to the slot, to follow `replication slot "name" `; short enough for a log
    /// line and for the reason a reset carries.
    pub(crate) fn what(&self) -> String {
        match self.reason.as_deref() {
            None | Some("wal_removed") => {
                "is lost (Postgres removed WAL it still needed)".to_string()
            }
            Some("idle_timeout") => format!(
                "was invalidated by Postgres: it was idle past idle_replication_slot_timeout ({})",
                self.idle_replication_slot_timeout
                    .as_deref()
                    .unwrap_or("unknown")
            ),
            Some("rows_removed") => "was invalidated by Postgres: rows it still needed were \
                                     removed (a conflict with recovery on a standby)"
                .to_string(),
            Some("wal_level_insufficient") => {
                "was invalidated by Postgres: wal_level is no longer logical".to_string()
            }
            Some(other) => format!("was invalidated by Postgres (invalidation_reason {other:?})"),
        }
    }

    /// Why it happened and which setting keeps it from happening again; `None` for a cause
    /// walsweep knows nothing about.
    pub(crate) fn prevention(&self) -> Option<String> {
        let setting = |value: &Option<String>| value.as_deref().unwrap_or("unknown").to_string();
        match self.reason.as_deref() {
            None | Some("wal_removed") => Some(format!(
                "Postgres keeps at most max_slot_wal_keep_size ({}) of WAL for a slot, and \
                 walsweep was stopped or behind for longer than that much WAL: raise \
                 max_slot_wal_keep_size (-1 keeps WAL without limit, which a stopped walsweep \
                 can let fill the disk), or keep walsweep running and caught up",
                setting(&self.max_slot_wal_keep_size)
            )),
            Some("idle_timeout") => Some(
                "Postgres invalidates a slot at its next checkpoint once no one has read from \
                 it for longer than that: walsweep was stopped that long, or had let go of the \
                 slot while Redis was down (after source.release_slot_after_sink_outage_ms). \
                 Raise idle_replication_slot_timeout above the longest time walsweep may be \
                 stopped (ALTER SYSTEM SET idle_replication_slot_timeout = '7d'; SELECT \
                 pg_reload_conf(); 0 turns the timeout off), or keep walsweep running"
                    .to_string(),
            ),
            Some("rows_removed") => Some(
                "on a standby, set hot_standby_feedback = on and give it a physical slot on the \
                 primary (primary_slot_name), so the primary keeps the rows logical decoding \
                 needs"
                    .to_string(),
            ),
            Some("wal_level_insufficient") => Some(
                "set wal_level = logical (on the primary too, when walsweep reads a standby) and \
                 restart Postgres"
                    .to_string(),
            ),
            Some(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalidation(reason: Option<&str>) -> Invalidation {
        Invalidation {
            reason: reason.map(str::to_string),
            max_slot_wal_keep_size: Some("2MB".into()),
            idle_replication_slot_timeout: Some("1min".into()),
        }
    }

    #[test]
    fn wal_removal_names_max_slot_wal_keep_size_and_its_value() {
        for reason in [None, Some("wal_removed")] {
            let lost = invalidation(reason);
            assert_eq!(
                lost.what(),
                "is lost (Postgres removed WAL it still needed)"
            );
            let prevention = lost.prevention().unwrap();
            assert!(
                prevention.contains("max_slot_wal_keep_size (2MB)"),
                "{prevention}"
            );
            assert!(!prevention.contains("idle"), "{prevention}");
        }
    }

    #[test]
    fn idle_timeout_names_the_setting_its_value_and_both_fixes() {
        let idle = invalidation(Some("idle_timeout"));
        assert_eq!(
            idle.what(),
            "was invalidated by Postgres: it was idle past idle_replication_slot_timeout (1min)"
        );
        let prevention = idle.prevention().unwrap();
        for part in [
            "next checkpoint",
            "Raise idle_replication_slot_timeout",
            "keep walsweep running",
            "release_slot_after_sink_outage_ms",
        ] {
            assert!(prevention.contains(part), "{part:?} missing: {prevention}");
        }
        assert!(
            !prevention.contains("max_slot_wal_keep_size"),
            "{prevention}"
        );
    }

    #[test]
    fn other_causes_are_named_and_an_unknown_one_is_quoted() {
        assert!(invalidation(Some("wal_level_insufficient"))
            .prevention()
            .unwrap()
            .contains("wal_level = logical"));
        assert!(invalidation(Some("rows_removed"))
            .prevention()
            .unwrap()
            .contains("hot_standby_feedback"));
        let unknown = invalidation(Some("cosmic_rays"));
        assert_eq!(
            unknown.what(),
            "was invalidated by Postgres (invalidation_reason \"cosmic_rays\")"
        );
        assert_eq!(unknown.prevention(), None);
    }
}
