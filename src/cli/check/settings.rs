//! Server settings that work today and bite later: WAL a stopped walsweep holds without bound,
//! a `wal_sender_timeout` that a late status update trips, standbys that would come up without
//! walsweep's slot after a failover, and a slot timeout that a long stop runs into. Warnings (or
//! notes, where nothing can be changed), never errors: walsweep runs either way.

use tokio_postgres::Client;

use crate::config::{SlotLostPolicy, SourceConfig};
use crate::telemetry::log::display_chain;

use super::Report;

/// A status update every `status_interval_ms` should fit this many times into
/// `wal_sender_timeout`, so that one late update (backpressure, a slow network) does not end
/// the connection.
const STATUS_UPDATES_PER_TIMEOUT: i64 = 3;

/// Postgres 17 introduced failover slots.
const FAILOVER_SLOTS_MIN_MAJOR: u32 = 17;

/// What the server says, read once.
#[derive(Debug, Clone, Default)]
struct SourceSettings {
    major: u32,
    /// As `SHOW` prints it: `-1`, `10GB`.
    max_slot_wal_keep_size: Option<String>,
    /// In ms, and as `SHOW` prints it.
    wal_sender_timeout: Option<(i64, String)>,
    /// `0` (off) or a duration as `SHOW` prints it; `None` before 18.
    idle_replication_slot_timeout: Option<String>,
    /// What makes the server a primary with standbys: its physical slots, and physical
    /// walsenders without one.
    standbys: Vec<String>,
    /// walsweep's slot: `None` when it does not exist; inside, its `failover` (`None` before 17).
    slot_failover: Option<Option<bool>>,
    /// `synchronized_standby_slots` (17+): the standbys logical walsenders wait for.
    synchronized_standby_slots: Option<String>,
    /// `synchronous_standby_names`: commits wait for these standbys before becoming visible.
    synchronous_standby_names: String,
}

/// The findings a checker adds: an error (walsweep would stop), a warning or a note.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Finding {
    Error(String),
    Warning(String),
    Note(String),
}

pub(super) async fn check_source_settings(
    source: &SourceConfig,
    client: &Client,
    report: &mut Report,
) {
    let settings = match read(client, &source.slot).await {
        Ok(s) => s,
        Err(e) => {
            report.warnings.push(format!(
                "cannot read the server settings walsweep depends on ({}); check them by hand: \
                 max_slot_wal_keep_size, wal_sender_timeout",
                display_chain(&e)
            ));
            return;
        }
    };
    let findings = [
        settings
            .max_slot_wal_keep_size
            .as_deref()
            .and_then(|size| wal_keep_warning(size, source.on_slot_lost)),
        settings
            .wal_sender_timeout
            .as_ref()
            .and_then(|(ms, shown)| sender_timeout_warning(*ms, shown, source.status_interval_ms)),
        failover_finding(&Failover {
            major: settings.major,
            standbys: &settings.standbys,
            slot: &source.slot,
            slot_failover: settings.slot_failover,
            configured: source.failover,
            synchronized_standby_slots: settings.synchronized_standby_slots.as_deref(),
        }),
        settings
            .idle_replication_slot_timeout
            .as_deref()
            .and_then(idle_timeout_note),
        ungated_sync_standby_warning(&settings.synchronous_standby_names, source.visibility_gate),
    ];
    for finding in findings.into_iter().flatten() {
        match finding {
            Finding::Error(e) => report.errors.push(e),
            Finding::Warning(w) => report.warnings.push(w),
            Finding::Note(n) => report.notes.push(n),
        }
    }
}

async fn read(client: &Client, slot: &str) -> Result<SourceSettings, tokio_postgres::Error> {
    // current_setting(.., true) and to_jsonb read as NULL what a major does not have.
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int / 10000, \
                    current_setting('max_slot_wal_keep_size', true), \
                    (SELECT setting::bigint * CASE unit WHEN 's' THEN 1000 WHEN 'min' THEN 60000 \
                                                        ELSE 1 END \
                     FROM pg_settings WHERE name = 'wal_sender_timeout'), \
                    current_setting('wal_sender_timeout'), \
                    current_setting('idle_replication_slot_timeout', true), \
                    current_setting('synchronized_standby_slots', true), \
                    current_setting('synchronous_standby_names')",
            &[],
        )
        .await?;
    let wal_sender_timeout = row
        .get::<_, Option<i64>>(2)
        .map(|ms| (ms, row.get::<_, String>(3)));
    // A temporary physical slot, or a walsender in state 'backup', is a base backup running,
    // not a standby. Walsenders that hold a slot are named by their slot.
    let standbys = client
        .query(
            "SELECT 'physical slot ' || slot_name FROM pg_replication_slots \
             WHERE slot_type = 'physical' AND NOT temporary \
             UNION ALL \
             SELECT 'walsender ' || coalesce(nullif(r.application_name, ''), 'pid ' || r.pid) \
             FROM pg_stat_replication r \
             WHERE r.state IS DISTINCT FROM 'backup' \
               AND NOT EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.active_pid = r.pid) \
             ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let slot_failover = client
        .query_opt(
            "SELECT (to_jsonb(s) ->> 'failover')::bool FROM pg_replication_slots s \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|r| r.get(0));
    Ok(SourceSettings {
        major: u32::try_from(row.get::<_, i32>(0)).unwrap_or(0),
        max_slot_wal_keep_size: row.get(1),
        wal_sender_timeout,
        idle_replication_slot_timeout: row.get(4),
        standbys,
        slot_failover,
        synchronized_standby_slots: row.get(5),
        synchronous_standby_names: row.get(6),
    })
}

/// `max_slot_wal_keep_size = -1`: nothing bounds the WAL a stopped walsweep's slot holds.
fn wal_keep_warning(max_slot_wal_keep_size: &str, on_slot_lost: SlotLostPolicy) -> Option<Finding> {
    if max_slot_wal_keep_size.trim() != "-1" {
        return None;
    }
    let then = match on_slot_lost {
        SlotLostPolicy::Fail => {
            "with source.on_slot_lost = \"fail\" (as configured) walsweep then stops with \
             instructions until someone recreates the slot and clears the caches"
        }
        SlotLostPolicy::Recreate => {
            "with source.on_slot_lost = \"recreate\" (as configured) walsweep then recreates the \
             slot and clears every key its rules maintain"
        }
    };
    Some(Finding::Warning(format!(
        "max_slot_wal_keep_size = -1 (unlimited): while walsweep is stopped or behind, its slot \
         keeps every WAL segment since its confirmed position, so a walsweep stopped long enough \
         fills the WAL disk and stops Postgres. Bound it with a size the disk can spare, e.g. \
         ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf(); the \
         trade-off: a walsweep further behind than that loses its slot, and {then}"
    )))
}

/// A `wal_sender_timeout` that fits fewer than `STATUS_UPDATES_PER_TIMEOUT` status updates.
fn sender_timeout_warning(
    timeout_ms: i64,
    shown: &str,
    status_interval_ms: u64,
) -> Option<Finding> {
    let interval = i64::try_from(status_interval_ms).unwrap_or(i64::MAX);
    let needed = interval.saturating_mul(STATUS_UPDATES_PER_TIMEOUT);
    if timeout_ms <= 0 || timeout_ms >= needed {
        return None;
    }
    let lower = timeout_ms / STATUS_UPDATES_PER_TIMEOUT;
    let fix = if lower >= 1 {
        format!("Lower source.status_interval_ms to {lower} or less, or raise")
    } else {
        "Raise".to_string()
    };
    Some(Finding::Warning(format!(
        "wal_sender_timeout = {shown} is shorter than {STATUS_UPDATES_PER_TIMEOUT} status \
         updates at source.status_interval_ms = {status_interval_ms}: Postgres ends a \
         replication connection that sent nothing for wal_sender_timeout, and walsweep sends a \
         status update every status_interval_ms (the only thing it sends while Redis is slow \
         and it stops reading), so one late update drops the connection and walsweep reconnects \
         and reads again from its confirmed position. {fix} wal_sender_timeout to at \
         least {needed}ms for walsweep's role (ALTER ROLE ... SET wal_sender_timeout = '60s') \
         or the server (ALTER SYSTEM SET wal_sender_timeout = '60s'; SELECT pg_reload_conf())"
    )))
}

/// What decides whether walsweep's slot survives a failover.
struct Failover<'a> {
    major: u32,
    standbys: &'a [String],
    slot: &'a str,
    /// `None`: no slot yet; inside, its `failover` (`None` before 17).
    slot_failover: Option<Option<bool>>,
    /// `source.failover`.
    configured: bool,
    synchronized_standby_slots: Option<&'a str>,
}

/// Standbys, and a slot that would not be on them after a failover; `source.failover` on a
/// server without failover slots, or without the primary setting that makes them safe.
fn failover_finding(f: &Failover<'_>) -> Option<Finding> {
    let slot = f.slot;
    let major = f.major;
    if f.configured && major < FAILOVER_SLOTS_MIN_MAJOR {
        return Some(Finding::Error(format!(
            "source.failover = true needs Postgres 17 or newer (failover slots), but the server \
             is {major}; walsweep run stops at start. Remove it: before 17 no slot survives a \
             failover, and source.on_slot_lost decides what happens after one"
        )));
    }
    if f.standbys.is_empty() {
        return None;
    }
    let standbys = f.standbys.join(", ");
    if major < FAILOVER_SLOTS_MIN_MAJOR {
        return Some(Finding::Note(format!(
            "the server has standbys ({standbys}), and Postgres {major} has no failover slots \
             (they came with 17): slot {slot:?} will not exist on a promoted standby, so after a \
             failover walsweep finds it missing and source.on_slot_lost decides (\"recreate\" \
             creates it there and clears the caches)"
        )));
    }
    if f.configured {
        if f.synchronized_standby_slots
            .is_none_or(|s| s.trim().is_empty())
        {
            return Some(Finding::Warning(format!(
                "source.failover = true, but synchronized_standby_slots is empty on this primary \
                 (standbys: {standbys}): walsweep may receive and apply a change the standby has \
                 not got yet; promoted, that standby's history forks before it and walsweep goes \
                 to source.on_slot_lost. Set it to the standbys' physical slots (ALTER SYSTEM SET \
                 synchronized_standby_slots = '<slot>'; SELECT pg_reload_conf()), as `walsweep \
                 setup --print` shows"
            )));
        }
        if f.slot_failover == Some(Some(false)) {
            return Some(Finding::Note(format!(
                "slot {slot:?} is not a failover slot yet; walsweep run makes it one \
                 (source.failover = true)"
            )));
        }
        return None;
    }
    let what = match f.slot_failover {
        Some(Some(true)) => return None,
        Some(_) => {
            format!("slot {slot:?} is not a failover slot (pg_replication_slots.failover = false)")
        }
        None => format!("slot {slot:?} will not be created as a failover slot"),
    };
    Some(Finding::Warning(format!(
        "{what} and the server has standbys ({standbys}): after a failover the promoted standby \
         has no slot {slot:?}, and walsweep would go to source.on_slot_lost. Set [source] \
         failover = true (walsweep run then makes the slot a failover slot) and give the \
         primary and the standbys the settings `walsweep setup --print` then prints \
         (synchronized_standby_slots on the primary; sync_replication_slots, \
         hot_standby_feedback and primary_slot_name on each standby)"
    )))
}

/// Synchronous standbys widen the window in which a commit walsweep already received is not
/// visible yet; without the visibility gate an invalidation in it is refilled with the old row.
fn ungated_sync_standby_warning(synchronous_standby_names: &str, gate: bool) -> Option<Finding> {
    if gate || synchronous_standby_names.trim().is_empty() {
        return None;
    }
    Some(Finding::Warning(format!(
        "synchronous_standby_names = '{synchronous_standby_names}' and source.visibility_gate = \
         false: a commit becomes visible only after a synchronous standby acknowledges it, but \
         walsweep may receive and apply it before, and a reader that refills the cache then \
         stores the old row. Remove visibility_gate = false (the gate waits until each batch's \
         commits are visible)"
    )))
}

/// Postgres 18 invalidates a slot left unused for longer than `idle_replication_slot_timeout`.
fn idle_timeout_note(timeout: &str) -> Option<Finding> {
    if timeout.trim() == "0" {
        return None;
    }
    Some(Finding::Note(format!(
        "idle_replication_slot_timeout = {timeout}: a walsweep stopped for longer than that \
         loses its slot (invalidated at the next checkpoint) and goes to source.on_slot_lost \
         when it starts; raise it above the longest planned stop, or set it to 0"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warning(finding: Option<Finding>) -> String {
        match finding {
            Some(Finding::Warning(w)) => w,
            other => panic!("expected a warning, got {other:?}"),
        }
    }

    #[test]
    fn unlimited_slot_wal_warns_with_a_size_and_the_configured_policy() {
        let w = warning(wal_keep_warning("-1", SlotLostPolicy::Fail));
        for part in [
            "max_slot_wal_keep_size = -1 (unlimited)",
            "fills the WAL disk",
            "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'",
            "on_slot_lost = \"fail\" (as configured)",
        ] {
            assert!(w.contains(part), "{part:?} missing: {w}");
        }
        let w = warning(wal_keep_warning("-1", SlotLostPolicy::Recreate));
        assert!(
            w.contains("on_slot_lost = \"recreate\" (as configured)"),
            "{w}"
        );
        assert_eq!(wal_keep_warning("10GB", SlotLostPolicy::Fail), None);
        assert_eq!(wal_keep_warning("0", SlotLostPolicy::Fail), None);
    }

    #[test]
    fn sender_timeout_must_fit_three_status_updates_unless_disabled() {
        let w = warning(sender_timeout_warning(1_000, "1s", 1_000));
        for part in [
            "wal_sender_timeout = 1s",
            "source.status_interval_ms = 1000",
            "Lower source.status_interval_ms to 333 or less, or raise wal_sender_timeout",
            "at least 3000ms",
        ] {
            assert!(w.contains(part), "{part:?} missing: {w}");
        }
        assert!(sender_timeout_warning(2_999, "2999ms", 1_000).is_some());
        assert_eq!(sender_timeout_warning(3_000, "3s", 1_000), None);
        assert_eq!(sender_timeout_warning(60_000, "1min", 1_000), None);
        assert_eq!(sender_timeout_warning(0, "0", 1_000), None, "0 disables it");
        // Too short to fit any interval: only raising it helps.
        let w = warning(sender_timeout_warning(2, "2ms", 1));
        assert!(!w.contains("status_interval_ms to"), "{w}");
        assert!(
            w.contains("Raise wal_sender_timeout to at least 3ms"),
            "{w}"
        );
    }

    fn failover<'a>(
        major: u32,
        standbys: &'a [String],
        slot_failover: Option<Option<bool>>,
        configured: bool,
        synchronized: Option<&'a str>,
    ) -> Option<Finding> {
        failover_finding(&Failover {
            major,
            standbys,
            slot: "ws",
            slot_failover,
            configured,
            synchronized_standby_slots: synchronized,
        })
    }

    #[test]
    fn standbys_need_a_failover_slot_from_17_and_get_a_note_before() {
        let standbys = vec!["physical slot standby1".to_string()];
        let w = warning(failover(17, &standbys, Some(Some(false)), false, None));
        for part in [
            "slot \"ws\" is not a failover slot (pg_replication_slots.failover = false)",
            "(physical slot standby1)",
            "[source] failover = true",
            "walsweep setup --print",
        ] {
            assert!(w.contains(part), "{part:?} missing: {w}");
        }
        assert_eq!(failover(18, &standbys, Some(Some(true)), false, None), None);
        let w = warning(failover(18, &standbys, None, false, None));
        assert!(w.contains("will not be created as a failover slot"), "{w}");
        assert_eq!(failover(18, &[], Some(Some(false)), false, None), None);
        match failover(16, &standbys, Some(None), false, None) {
            Some(Finding::Note(n)) => {
                assert!(n.contains("Postgres 16 has no failover slots"), "{n}");
                assert!(
                    n.contains("slot \"ws\" will not exist on a promoted standby"),
                    "{n}"
                );
            }
            other => panic!("expected a note, got {other:?}"),
        }
        assert_eq!(failover(16, &[], Some(None), false, None), None);
    }

    #[test]
    fn configured_failover_needs_17_and_synchronized_standby_slots() {
        let standbys = vec!["physical slot sb1".to_string()];
        match failover(16, &[], None, true, None) {
            Some(Finding::Error(e)) => assert!(e.contains("needs Postgres 17"), "{e}"),
            other => panic!("expected an error, got {other:?}"),
        }
        let w = warning(failover(17, &standbys, Some(Some(true)), true, Some("")));
        assert!(w.contains("synchronized_standby_slots is empty"), "{w}");
        assert_eq!(
            failover(17, &standbys, Some(Some(true)), true, Some("sb1")),
            None
        );
        match failover(17, &standbys, Some(Some(false)), true, Some("sb1")) {
            Some(Finding::Note(n)) => assert!(n.contains("walsweep run makes it one"), "{n}"),
            other => panic!("expected a note, got {other:?}"),
        }
        assert_eq!(failover(17, &[], None, true, None), None, "no standbys yet");
    }

    #[test]
    fn a_synchronous_standby_without_the_gate_warns() {
        let w = warning(ungated_sync_standby_warning("sb1", false));
        assert!(w.contains("synchronous_standby_names = 'sb1'"), "{w}");
        assert!(w.contains("visibility_gate"), "{w}");
        assert_eq!(ungated_sync_standby_warning("sb1", true), None);
        assert_eq!(ungated_sync_standby_warning("", false), None);
    }

    #[test]
    fn idle_slot_timeout_is_noted_when_set() {
        assert_eq!(idle_timeout_note("0"), None);
        match idle_timeout_note("1d") {
            Some(Finding::Note(n)) => assert!(n.starts_with("idle_replication_slot_timeout = 1d:")),
            other => panic!("expected a note, got {other:?}"),
        }
    }
}
