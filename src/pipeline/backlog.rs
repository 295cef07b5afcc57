//! Whether the server's WAL runs far ahead of what the sink is about to apply: then more
//! committed transactions are on their way, and the sink task waits a moment to apply them in
//! one larger batch. Each batch costs round trips (the visibility check, Redis, the published
//! position) whatever its size, so while a backlog drains, fewer and larger batches cost less
//! CPU in walsweep and in Redis. Live, the server's end is near the last commit and nothing
//! waits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::pg::Lsn;

/// WAL the server must be ahead by for the sink to wait: far more than a burst of live
/// commits writes between two batches.
const BACKLOG_BYTES: u64 = 1 << 20;

/// Longest a batch waits to fill up.
pub(crate) const FILL_WAIT: Duration = Duration::from_millis(2);

/// The server's end of WAL as the stream last heard it (XLogData and keepalive headers).
#[derive(Debug, Default)]
pub(crate) struct ServerWalEnd(AtomicU64);

impl ServerWalEnd {
    /// Only the stream task writes it.
    pub(crate) fn observe(&self, wal_end: Lsn) {
        if wal_end.as_u64() > self.0.load(Ordering::Relaxed) {
            self.0.store(wal_end.as_u64(), Ordering::Relaxed);
        }
    }

    /// Whether the server is far enough past `applying` that more commits are on their way.
    pub(crate) fn ahead_of(&self, applying: Lsn) -> bool {
        self.0
            .load(Ordering::Relaxed)
            .saturating_sub(applying.as_u64())
            > BACKLOG_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ahead_only_by_more_than_a_backlog() {
        let end = ServerWalEnd::default();
        assert!(!end.ahead_of(Lsn::from(0)), "nothing heard yet");
        end.observe(Lsn::from(10 << 20));
        assert!(end.ahead_of(Lsn::from(1 << 20)));
        assert!(
            !end.ahead_of(Lsn::from((10 << 20) - 1000)),
            "live: a few commits behind"
        );
        end.observe(Lsn::from(5));
        assert!(end.ahead_of(Lsn::from(1 << 20)), "never moves back");
    }
}
