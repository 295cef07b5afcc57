//! Replication progress: what was received and what the sink confirmed, only ever moving
//! forward, and the status updates that report it.

use crate::pg::wire::{pg_now_micros, StandbyStatusUpdate};
use crate::pg::Lsn;

/// Why a status update was sent; doubles as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusReason {
    /// The server asked for a reply in a keepalive.
    KeepaliveReply,
    /// The periodic `status_interval` tick.
    Interval,
    /// Final update before a clean shutdown.
    Shutdown,
    /// Everything received is applied and the flush position moved: told at once rather than
    /// at the next tick, so the slot (and the WAL it holds) follows the sink.
    CaughtUp,
}

impl StatusReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StatusReason::KeepaliveReply => "keepalive_reply",
            StatusReason::Interval => "interval",
            StatusReason::Shutdown => "shutdown",
            StatusReason::CaughtUp => "caught_up",
        }
    }
}

#[test]
fn status_reasons_are_the_exported_labels() {
    let reasons = [
        StatusReason::KeepaliveReply,
        StatusReason::Interval,
        StatusReason::Shutdown,
        StatusReason::CaughtUp,
    ];
    assert_eq!(
        reasons.map(StatusReason::as_str),
        crate::telemetry::metrics::STATUS_REASONS
    );
}

/// `received_lsn`: the furthest WAL position seen on the stream.
/// `flushed_lsn`: the furthest position whose effects are applied (or that carries none).
/// Invariant: `flushed_lsn <= received_lsn`; neither moves backwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    received_lsn: Lsn,
    flushed_lsn: Lsn,
}

impl Progress {
    /// Starts from a position already safe to report (the slot's confirmed flush, or ours).
    pub(crate) fn new(start_lsn: Lsn) -> Self {
        Progress {
            received_lsn: start_lsn,
            flushed_lsn: start_lsn,
        }
    }

    #[cfg(test)]
    fn received_lsn(&self) -> Lsn {
        self.received_lsn
    }

    pub(crate) fn flushed_lsn(&self) -> Lsn {
        self.flushed_lsn
    }

    pub(crate) fn receive(&mut self, lsn: Lsn) {
        self.received_lsn = self.received_lsn.max(lsn);
    }

    /// The sink applied everything up to `lsn` (a commit end), or nothing is pending at `lsn`.
    /// Only these two facts may move the flush position. The caller must have received `lsn`
    /// first: a commit's end is received with its commit message.
    pub(crate) fn confirm(&mut self, lsn: Lsn) {
        self.flushed_lsn = self.flushed_lsn.max(lsn);
        // Confirming what was never received would report a flush the server never sent: a
        // caller that records positions in the wrong order.
        debug_assert!(
            self.flushed_lsn <= self.received_lsn,
            "confirmed {} past received {}",
            self.flushed_lsn,
            self.received_lsn
        );
    }

    pub(crate) fn status_update(&self) -> StandbyStatusUpdate {
        StandbyStatusUpdate {
            write_lsn: self.received_lsn,
            flush_lsn: self.flushed_lsn,
            apply_lsn: self.flushed_lsn,
            client_time: pg_now_micros(),
            reply_requested: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_never_move_backwards() {
        let mut p = Progress::new(Lsn(100));
        p.receive(Lsn(50));
        assert_eq!(p.received_lsn(), Lsn(100));
        p.receive(Lsn(300));
        p.confirm(Lsn(200));
        p.confirm(Lsn(150));
        assert_eq!(p.flushed_lsn(), Lsn(200));
        assert_eq!(p.received_lsn(), Lsn(300));
        let s = p.status_update();
        assert_eq!(
            (s.write_lsn, s.flush_lsn, s.apply_lsn),
            (Lsn(300), Lsn(200), Lsn(200))
        );
    }

    #[test]
    fn confirming_what_was_received_moves_only_the_flush_position() {
        let mut p = Progress::new(Lsn(0));
        p.receive(Lsn(10));
        p.confirm(Lsn(10));
        assert_eq!((p.received_lsn(), p.flushed_lsn()), (Lsn(10), Lsn(10)));
        p.receive(Lsn(40));
        p.confirm(Lsn(25));
        assert_eq!((p.received_lsn(), p.flushed_lsn()), (Lsn(40), Lsn(25)));
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "confirmed 0/A past received 0/5")]
    fn confirming_past_received_panics() {
        let mut p = Progress::new(Lsn(0));
        p.receive(Lsn(5));
        p.confirm(Lsn(10));
    }
}
