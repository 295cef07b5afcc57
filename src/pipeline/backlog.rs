//! Whether the walsender is sending commits that happened a while ago (a backlog drains): then
//! more committed transactions are on their way, and the sink task waits a moment to apply them
//! in one larger batch. Each batch costs round trips (the visibility check, Redis, the published
//! position) whatever its size, so while a backlog drains, fewer and larger batches cost less
//! CPU in walsweep and in Redis. Live, commits are sent right after they happen and nothing
//! waits.
//!
//! Both times are the server's clock (the commit's timestamp, and the send time in the header
//! of the message that carried the commit), so clock skew between hosts does not matter. The
//! message header's WAL end cannot tell: for logical decoding the walsender puts the record's
//! own position there.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// How long ago a commit must have happened when it is sent for the stream to count as behind:
/// far more than a live walsender takes.
const BEHIND_MICROS: i64 = 100_000;

/// Longest a batch waits to fill up.
pub(crate) const FILL_WAIT: Duration = Duration::from_millis(2);

/// How far behind the walsender was with the latest commit received, in microseconds.
#[derive(Debug, Default)]
pub(crate) struct SendLag(AtomicI64);

impl SendLag {
    /// A commit at `commit_unix_micros` arrived in a message sent at `sent_unix_micros` (both
    /// the server's clock). Only the stream task writes it.
    pub(crate) fn observe(&self, commit_unix_micros: i64, sent_unix_micros: i64) {
        self.0.store(
            sent_unix_micros.saturating_sub(commit_unix_micros),
            Ordering::Relaxed,
        );
    }

    /// Whether the latest commit was sent long after it happened: more are queued behind it.
    pub(crate) fn behind(&self) -> bool {
        self.0.load(Ordering::Relaxed) > BEHIND_MICROS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behind_only_when_the_latest_commit_was_sent_late() {
        let lag = SendLag::default();
        assert!(!lag.behind(), "nothing heard yet");
        lag.observe(1_000_000, 3_000_000);
        assert!(lag.behind(), "sent 2 s after its commit");
        lag.observe(5_000_000, 5_000_300);
        assert!(!lag.behind(), "live: sent right after");
    }
}
