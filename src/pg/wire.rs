//! Codecs for the messages the streaming replication protocol carries inside CopyData:
//! `XLogData`, `PrimaryKeepalive` (server to client) and `StandbyStatusUpdate` (client to server).
//!
//! Pure byte work: never touches the network, never panics on malformed input.

use bytes::{BufMut, Bytes, BytesMut};

use super::pgoutput::POSTGRES_EPOCH_UNIX_MICROS;
use super::Lsn;

const XLOG_DATA_TAG: u8 = b'w';
const PRIMARY_KEEPALIVE_TAG: u8 = b'k';
const STANDBY_STATUS_UPDATE_TAG: u8 = b'r';
const XLOG_DATA_HEADER_LEN: usize = 1 + 8 + 8 + 8;
const PRIMARY_KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;

/// One replication message from the walsender.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum WireMessage {
    XLogData(XLogData),
    PrimaryKeepalive(PrimaryKeepalive),
}

/// A chunk of decoded WAL: for a logical slot, exactly one pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct XLogData {
    pub(crate) wal_start_lsn: Lsn,
    /// The server's current end of WAL when it sent this message.
    pub(crate) wal_end_lsn: Lsn,
    pub(crate) send_time: i64,
    pub(crate) data: Bytes,
}

/// A heartbeat; `reply_requested` means the server wants a status update now
/// (it is about to time the connection out otherwise).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PrimaryKeepalive {
    pub(crate) wal_end_lsn: Lsn,
    pub(crate) send_time: i64,
    pub(crate) reply_requested: bool,
}

/// Positions we report back. `flush_lsn` is what moves the slot's `confirmed_flush_lsn`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct StandbyStatusUpdate {
    pub(crate) write_lsn: Lsn,
    pub(crate) flush_lsn: Lsn,
    pub(crate) apply_lsn: Lsn,
    pub(crate) client_time: i64,
    pub(crate) reply_requested: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("empty CopyData message from the walsender")]
    Empty,
    #[error("unknown replication message tag 0x{tag:02x} ({:?}) from the walsender", char::from(*tag))]
    UnknownTag { tag: u8 },
    #[error("truncated {message}: {len} bytes, need at least {need}")]
    Truncated {
        message: &'static str,
        len: usize,
        need: usize,
    },
    #[error("{message} has {extra} trailing bytes")]
    Trailing { message: &'static str, extra: usize },
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(word)
}

/// Parses the payload of one CopyData message. `data` shares the input buffer (no copy).
pub(crate) fn parse_wire_message(buf: Bytes) -> Result<WireMessage, WireError> {
    match buf.first().copied() {
        None => Err(WireError::Empty),
        Some(XLOG_DATA_TAG) => {
            if buf.len() < XLOG_DATA_HEADER_LEN {
                return Err(WireError::Truncated {
                    message: "XLogData",
                    len: buf.len(),
                    need: XLOG_DATA_HEADER_LEN,
                });
            }
            Ok(WireMessage::XLogData(XLogData {
                wal_start_lsn: Lsn(read_u64(&buf, 1)),
                wal_end_lsn: Lsn(read_u64(&buf, 9)),
                send_time: read_u64(&buf, 17) as i64,
                data: buf.slice(XLOG_DATA_HEADER_LEN..),
            }))
        }
        Some(PRIMARY_KEEPALIVE_TAG) => {
            if buf.len() < PRIMARY_KEEPALIVE_LEN {
                return Err(WireError::Truncated {
                    message: "PrimaryKeepalive",
                    len: buf.len(),
                    need: PRIMARY_KEEPALIVE_LEN,
                });
            }
            if buf.len() > PRIMARY_KEEPALIVE_LEN {
                return Err(WireError::Trailing {
                    message: "PrimaryKeepalive",
                    extra: buf.len() - PRIMARY_KEEPALIVE_LEN,
                });
            }
            Ok(WireMessage::PrimaryKeepalive(PrimaryKeepalive {
                wal_end_lsn: Lsn(read_u64(&buf, 1)),
                send_time: read_u64(&buf, 9) as i64,
                reply_requested: buf[17] != 0,
            }))
        }
        Some(tag) => Err(WireError::UnknownTag { tag }),
    }
}

/// Appends the CopyData payload of a status update (without the CopyData framing).
pub(crate) fn encode_standby_status_update(update: &StandbyStatusUpdate, out: &mut BytesMut) {
    out.reserve(34);
    out.put_u8(STANDBY_STATUS_UPDATE_TAG);
    out.put_u64(update.write_lsn.0);
    out.put_u64(update.flush_lsn.0);
    out.put_u64(update.apply_lsn.0);
    out.put_i64(update.client_time);
    out.put_u8(u8::from(update.reply_requested));
}

/// Microseconds since 2000-01-01 UTC, the clock the replication protocol speaks.
pub(crate) fn pg_now_micros() -> i64 {
    let unix_micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix_micros - POSTGRES_EPOCH_UNIX_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlog_data_without_copying_payload() {
        let mut raw = vec![b'w'];
        raw.extend_from_slice(&0x10u64.to_be_bytes());
        raw.extend_from_slice(&0x20u64.to_be_bytes());
        raw.extend_from_slice(&7i64.to_be_bytes());
        raw.extend_from_slice(b"Bpayload");
        let msg = parse_wire_message(Bytes::from(raw)).unwrap();
        let WireMessage::XLogData(x) = msg else {
            panic!("expected XLogData, got {msg:?}")
        };
        assert_eq!(x.wal_start_lsn, Lsn(0x10));
        assert_eq!(x.wal_end_lsn, Lsn(0x20));
        assert_eq!(x.send_time, 7);
        assert_eq!(&x.data[..], b"Bpayload");
    }

    #[test]
    fn parses_keepalive() {
        let mut raw = vec![b'k'];
        raw.extend_from_slice(&0x1234u64.to_be_bytes());
        raw.extend_from_slice(&9i64.to_be_bytes());
        raw.push(1);
        let msg = parse_wire_message(Bytes::from(raw.clone())).unwrap();
        assert_eq!(
            msg,
            WireMessage::PrimaryKeepalive(PrimaryKeepalive {
                wal_end_lsn: Lsn(0x1234),
                send_time: 9,
                reply_requested: true
            })
        );
        raw.push(0);
        assert_eq!(
            parse_wire_message(Bytes::from(raw)),
            Err(WireError::Trailing {
                message: "PrimaryKeepalive",
                extra: 1
            })
        );
    }

    #[test]
    fn rejects_malformed_frames_without_panicking() {
        assert_eq!(parse_wire_message(Bytes::new()), Err(WireError::Empty));
        assert_eq!(
            parse_wire_message(Bytes::from_static(b"z")),
            Err(WireError::UnknownTag { tag: b'z' })
        );
        for len in 1..XLOG_DATA_HEADER_LEN {
            let mut raw = vec![0u8; len];
            raw[0] = b'w';
            assert!(parse_wire_message(Bytes::from(raw)).is_err());
        }
        for len in 1..PRIMARY_KEEPALIVE_LEN {
            let mut raw = vec![0u8; len];
            raw[0] = b'k';
            assert!(parse_wire_message(Bytes::from(raw)).is_err());
        }
    }

    #[test]
    fn encodes_status_update_in_protocol_layout() {
        let mut out = BytesMut::new();
        encode_standby_status_update(
            &StandbyStatusUpdate {
                write_lsn: Lsn(3),
                flush_lsn: Lsn(2),
                apply_lsn: Lsn(1),
                client_time: 5,
                reply_requested: false,
            },
            &mut out,
        );
        assert_eq!(out.len(), 34);
        assert_eq!(out[0], b'r');
        assert_eq!(read_u64(&out, 1), 3);
        assert_eq!(read_u64(&out, 9), 2);
        assert_eq!(read_u64(&out, 17), 1);
        assert_eq!(read_u64(&out, 25), 5);
        assert_eq!(out[33], 0);
    }
}
