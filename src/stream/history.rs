//! Which WAL history the stream's positions belong to.
//!
//! LSNs only order changes within one database system's history. When the database behind the
//! URL is replaced (a restore, a new cluster, a failover to a replica that had not received
//! everything), positions walsweep remembers can lie beyond every new commit: resuming there
//! would skip them. `IDENTIFY_SYSTEM` at each connection tells the system and timeline; this
//! file decides whether the remembered positions still mean anything.

use crate::pg::Lsn;

/// What `IDENTIFY_SYSTEM` says of the server walsweep streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceIdentity {
    pub(crate) system_id: String,
    pub(crate) timeline: u32,
    /// The server's current WAL position (flushed, or replayed on a standby).
    pub(crate) wal_position: Lsn,
}

/// What walsweep keeps of the source between runs (next to the data it maintains, so that a
/// restarted walsweep tells a lost slot from a first start, and a replaced database from the
/// one it streamed from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedSource {
    pub system_id: String,
    pub timeline: u32,
    /// The slot's confirmed position when walsweep last started streaming from it.
    pub confirmed_lsn: Lsn,
}

impl RecordedSource {
    /// As it was last seen: the server's WAL ended no earlier than the confirmed position.
    pub(crate) fn identity(&self) -> SourceIdentity {
        SourceIdentity {
            system_id: self.system_id.clone(),
            timeline: self.timeline,
            wal_position: self.confirmed_lsn,
        }
    }
}

/// How the server's history relates to the one walsweep streamed before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HistoryCheck {
    /// The same history: positions stand.
    Continues,
    /// A later timeline of the same system: whether it still holds everything walsweep applied
    /// depends on where it forked (`fork_check`, from `TIMELINE_HISTORY`).
    NewTimeline { from: u32, to: u32 },
    /// Another history: what walsweep applied may not exist here, and its positions may lie past
    /// every new commit. The text says why, for the operator.
    Replaced(String),
}

/// Compares the server now with what walsweep saw, given the furthest position walsweep
/// received or applied.
pub(crate) fn check(known: &SourceIdentity, now: &SourceIdentity, position: Lsn) -> HistoryCheck {
    if known.system_id != now.system_id {
        return HistoryCheck::Replaced(format!(
            "the database is another system now (system identifier {}, walsweep streamed from {})",
            now.system_id, known.system_id
        ));
    }
    if now.timeline < known.timeline {
        return HistoryCheck::Replaced(format!(
            "the database went back to timeline {} from {} (restored from a backup?)",
            now.timeline, known.timeline
        ));
    }
    if now.timeline > known.timeline {
        return HistoryCheck::NewTimeline {
            from: known.timeline,
            to: now.timeline,
        };
    }
    // WAL never moves back within one history: a server behind what walsweep received was
    // restored or replaced.
    if now.wal_position < position {
        return HistoryCheck::Replaced(format!(
            "the database's WAL ends at {}, before {position} that walsweep already received \
             (restored from a backup, or replaced by a copy?)",
            now.wal_position
        ));
    }
    HistoryCheck::Continues
}

/// Where timeline `from` ended in the history of a later timeline, from the contents of its
/// history file (`TIMELINE_HISTORY`): lines of `parent_timeline <TAB> switch_lsn <TAB> reason`.
/// `None` when `from` is not an ancestor.
pub(crate) fn switch_point(history_file: &str, from: u32) -> Option<Lsn> {
    history_file.lines().find_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let mut fields = line.split_whitespace();
        let timeline: u32 = fields.next()?.parse().ok()?;
        let lsn: Lsn = fields.next()?.parse().ok()?;
        (timeline == from).then_some(lsn)
    })
}

/// After a failover to timeline `to`: `None` when the new timeline still holds `position`
/// (everything walsweep received precedes the fork), else why not.
pub(crate) fn fork_check(switch: Option<Lsn>, from: u32, to: u32, position: Lsn) -> Option<String> {
    match switch {
        Some(fork) if position <= fork => None,
        Some(fork) => Some(format!(
            "the database failed over to timeline {to}, which forked from timeline {from} at \
             {fork}, before {position} that walsweep already received: what it applied after \
             the fork is not in the new history"
        )),
        None => Some(format!(
            "the database is on timeline {to}, whose history does not include timeline {from} \
             that walsweep streamed from"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(system: &str, timeline: u32, wal: &str) -> SourceIdentity {
        SourceIdentity {
            system_id: system.into(),
            timeline,
            wal_position: wal.parse().unwrap(),
        }
    }

    fn lsn(text: &str) -> Lsn {
        text.parse().unwrap()
    }

    #[test]
    fn the_same_history_continues() {
        let known = id("7", 1, "0/5000000");
        assert_eq!(
            check(&known, &id("7", 1, "0/6000000"), lsn("0/5000000")),
            HistoryCheck::Continues
        );
    }

    #[test]
    fn another_system_or_wal_behind_what_was_received_is_a_replaced_history() {
        let known = id("7", 1, "0/5000000");
        assert!(matches!(
            check(&known, &id("8", 1, "0/6000000"), lsn("0/5000000")),
            HistoryCheck::Replaced(why) if why.contains("system identifier 8")
        ));
        assert!(matches!(
            check(&known, &id("7", 1, "0/1000000"), lsn("0/5000000")),
            HistoryCheck::Replaced(why) if why.contains("0/1000000")
        ));
        assert!(matches!(
            check(
                &id("7", 3, "0/5000000"),
                &id("7", 2, "0/9000000"),
                lsn("0/5000000")
            ),
            HistoryCheck::Replaced(_)
        ));
    }

    #[test]
    fn a_later_timeline_is_checked_against_its_fork_point() {
        let known = id("7", 1, "0/5000000");
        assert_eq!(
            check(&known, &id("7", 2, "0/4000000"), lsn("0/5000000")),
            HistoryCheck::NewTimeline { from: 1, to: 2 }
        );
        let file =
            "1\t0/5000100\tno recovery target specified\n\n2\t0/7000000\tbefore 2000-01-01\n";
        assert_eq!(switch_point(file, 1), Some(lsn("0/5000100")));
        assert_eq!(switch_point(file, 2), Some(lsn("0/7000000")));
        assert_eq!(switch_point(file, 3), None);
        assert_eq!(
            fork_check(switch_point(file, 1), 1, 3, lsn("0/5000000")),
            None
        );
        assert!(fork_check(switch_point(file, 1), 1, 3, lsn("0/5000200")).is_some());
        assert!(fork_check(None, 1, 3, lsn("0/1")).is_some());
    }
}
