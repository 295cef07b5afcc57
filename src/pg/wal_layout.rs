//! Where a WAL record can start, for the applied position walsweep publishes.
//!
//! walsweep applies a commit and knows the end of its record. An app waits for
//! `pg_current_wal_insert_lsn()` taken after its commit. The two differ when the record ends
//! exactly at a WAL page boundary: the insert position then points past the next page's header
//! (24 bytes, 40 at a segment start), where the next record will begin. No record ends inside a
//! header, so "applied up to the boundary" is "applied up to after the header"; publishing the
//! latter is what makes such a wait end.

use std::sync::atomic::{AtomicU64, Ordering};

use super::Lsn;

/// Page header sizes (`SizeOfXLogShortPHD`, `SizeOfXLogLongPHD` on 64-bit builds).
const SHORT_PAGE_HEADER: u64 = 24;
const LONG_PAGE_HEADER: u64 = 40;

/// `wal_block_size` and `wal_segment_size` of the server, read at each session (Postgres's
/// defaults until then).
#[derive(Debug)]
pub(crate) struct WalLayout {
    block_size: AtomicU64,
    segment_size: AtomicU64,
}

impl Default for WalLayout {
    fn default() -> Self {
        WalLayout {
            block_size: AtomicU64::new(8192),
            segment_size: AtomicU64::new(16 * 1024 * 1024),
        }
    }
}

impl WalLayout {
    pub(crate) fn set(&self, block_size: u64, segment_size: u64) {
        if block_size > 0 && segment_size > 0 {
            self.block_size.store(block_size, Ordering::Relaxed);
            self.segment_size.store(segment_size, Ordering::Relaxed);
        }
    }

    /// The insert position right after a record that ends at `end`.
    pub(crate) fn insert_position_after(&self, end: Lsn) -> Lsn {
        let block = self.block_size.load(Ordering::Relaxed);
        let segment = self.segment_size.load(Ordering::Relaxed);
        let at = end.as_u64();
        if at == 0 || !at.is_multiple_of(block) {
            return end;
        }
        let header = if at.is_multiple_of(segment) {
            LONG_PAGE_HEADER
        } else {
            SHORT_PAGE_HEADER
        };
        Lsn::from(at + header)
    }
}

/// A size as `SHOW` prints it: `8192`, `16MB`, `1MB`, `8kB`.
pub(crate) fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number: u64 = text[..digits].parse().ok()?;
    let unit = match text[digits..].trim() {
        "" | "B" => 1,
        "kB" => 1024,
        "MB" => 1024 * 1024,
        "GB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    Some(number * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_ending_at_a_page_boundary_is_followed_by_the_next_page_header() {
        let layout = WalLayout::default();
        layout.set(8192, 1024 * 1024);
        let pos = |v: u64| layout.insert_position_after(Lsn::from(v)).as_u64();
        assert_eq!(pos(0x10_0123), 0x10_0123, "mid-page: unchanged");
        assert_eq!(pos(0x10_2000), 0x10_2000 + 24, "page start");
        assert_eq!(pos(0x20_0000), 0x20_0000 + 40, "segment start");
        assert_eq!(pos(0), 0);
    }

    #[test]
    fn sizes_parse_as_show_prints_them() {
        assert_eq!(parse_size("8192"), Some(8192));
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1MB"), Some(1 << 20));
        assert_eq!(parse_size("8kB"), Some(8192));
        assert_eq!(parse_size("lots"), None);
    }
}
