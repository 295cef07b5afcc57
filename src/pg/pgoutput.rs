//! pgoutput: the logical replication messages a `pgoutput` slot emits, decoded from bytes.
//!
//! This module owns the byte layout of protocol versions 1 to 4 and nothing else. It never
//! touches the network and never panics, whatever the input: every read is bounds-checked,
//! every count is checked against the bytes actually left before anything is allocated, and a
//! message with bytes left over is an error. A decoder that skipped what it did not understand
//! would turn a protocol mismatch into silently missed cache invalidations.
//!
//! Decoded values borrow from the input. Column values stay raw bytes: they are whatever the
//! column's output function produced, and only a layer that knows the column type may read them.
//!
//! Inside a streamed transaction (between StreamStart and StreamStop) the server puts the xid in
//! front of the data messages, and nothing in those messages says so. The caller has to know,
//! hence the `in_stream` argument of [`parse_message`] and the [`Decoder`] that tracks it.

use std::borrow::Cow;
use std::fmt;

use crate::pg::Lsn;

/// 2000-01-01 00:00:00 UTC, the zero of every Postgres timestamp, in Unix microseconds.
pub(crate) const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Converts a timestamp as sent (microseconds since 2000-01-01) to Unix microseconds.
///
/// Saturates instead of overflowing: the value came off the wire.
pub(crate) fn pg_time_to_unix_micros(t: i64) -> i64 {
    t.saturating_add(POSTGRES_EPOCH_UNIX_MICROS)
}

const TAG_BEGIN: u8 = b'B';
const TAG_COMMIT: u8 = b'C';
const TAG_ORIGIN: u8 = b'O';
const TAG_RELATION: u8 = b'R';
const TAG_TYPE: u8 = b'Y';
const TAG_INSERT: u8 = b'I';
const TAG_UPDATE: u8 = b'U';
const TAG_DELETE: u8 = b'D';
const TAG_TRUNCATE: u8 = b'T';
const TAG_MESSAGE: u8 = b'M';
const TAG_STREAM_START: u8 = b'S';
const TAG_STREAM_STOP: u8 = b'E';
const TAG_STREAM_COMMIT: u8 = b'c';
const TAG_STREAM_ABORT: u8 = b'A';
const TAG_BEGIN_PREPARE: u8 = b'b';
const TAG_PREPARE: u8 = b'P';
const TAG_COMMIT_PREPARED: u8 = b'K';
const TAG_ROLLBACK_PREPARED: u8 = b'r';
const TAG_STREAM_PREPARE: u8 = b'p';

const TUPLE_KEY: u8 = b'K';
const TUPLE_OLD: u8 = b'O';
const TUPLE_NEW: u8 = b'N';

const COLUMN_NULL: u8 = b'n';
const COLUMN_UNCHANGED_TOAST: u8 = b'u';
const COLUMN_TEXT: u8 = b't';
const COLUMN_BINARY: u8 = b'b';

const REPLICA_IDENTITY_DEFAULT: u8 = b'd';
const REPLICA_IDENTITY_NOTHING: u8 = b'n';
const REPLICA_IDENTITY_FULL: u8 = b'f';
const REPLICA_IDENTITY_INDEX: u8 = b'i';

/// Relation column flag: the column is part of the replica identity.
const COLUMN_FLAG_KEY: u8 = 1;
/// Truncate option bits.
const TRUNCATE_CASCADE: u8 = 1;
const TRUNCATE_RESTART_IDENTITY: u8 = 2;
/// Message flag: the message was emitted with `transactional => true`.
const MESSAGE_TRANSACTIONAL: u8 = 1;

/// Smallest possible encodings of repeated entries, used to reject a count the remaining bytes
/// cannot possibly hold before allocating for it.
const MIN_TUPLE_COLUMN_LEN: usize = 1; // kind byte ('n' or 'u')
const MIN_RELATION_COLUMN_LEN: usize = 1 + 1 + 4 + 4; // flags, empty name, type oid, typmod
const TRUNCATE_OID_LEN: usize = 4;

/// Bytes of the protocol v4 abort LSN and abort timestamp at the end of a StreamAbort.
const STREAM_ABORT_PARALLEL_LEN: usize = 8 + 8;

/// One decoded pgoutput message.
///
/// The `xid: Option<u32>` of data messages is set only inside a stream segment, and it names the
/// (sub)transaction that made the change, which is not necessarily the StreamStart xid: a
/// StreamAbort with `subxid != xid` discards exactly the changes that carried `subxid`.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOutput<'a> {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin<'a>),
    Relation(Relation<'a>),
    Type(TypeMessage<'a>),
    Insert(Insert<'a>),
    Update(Update<'a>),
    Delete(Delete<'a>),
    Truncate(Truncate),
    Message(LogicalMessage<'a>),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
    BeginPrepare(BeginPrepare<'a>),
    Prepare(Prepare<'a>),
    CommitPrepared(CommitPrepared<'a>),
    RollbackPrepared(RollbackPrepared<'a>),
    StreamPrepare(Prepare<'a>),
}

impl PgOutput<'_> {
    /// The protocol's name for the message, as used in errors; stable, so usable as a metric label.
    pub fn name(&self) -> &'static str {
        match self {
            PgOutput::Begin(_) => "Begin",
            PgOutput::Commit(_) => "Commit",
            PgOutput::Origin(_) => "Origin",
            PgOutput::Relation(_) => "Relation",
            PgOutput::Type(_) => "Type",
            PgOutput::Insert(_) => "Insert",
            PgOutput::Update(_) => "Update",
            PgOutput::Delete(_) => "Delete",
            PgOutput::Truncate(_) => "Truncate",
            PgOutput::Message(_) => "Message",
            PgOutput::StreamStart(_) => "StreamStart",
            PgOutput::StreamStop => "StreamStop",
            PgOutput::StreamCommit(_) => "StreamCommit",
            PgOutput::StreamAbort(_) => "StreamAbort",
            PgOutput::BeginPrepare(_) => "BeginPrepare",
            PgOutput::Prepare(_) => "Prepare",
            PgOutput::CommitPrepared(_) => "CommitPrepared",
            PgOutput::RollbackPrepared(_) => "RollbackPrepared",
            PgOutput::StreamPrepare(_) => "StreamPrepare",
        }
    }
}

/// Start of a transaction that is sent only once it has committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Begin {
    /// LSN of the commit record; equals the matching Commit's `commit_lsn`.
    pub(crate) final_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC, as sent; see [`pg_time_to_unix_micros`].
    pub(crate) commit_time: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// Unused by the server so far; kept so a future flag is visible rather than dropped.
    pub(crate) flags: u8,
    pub(crate) commit_lsn: Lsn,
    /// The position to confirm once this transaction's effects are durable.
    pub(crate) end_lsn: Lsn,
    pub(crate) commit_time: i64,
}

/// The transaction was replayed from another node, named here.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin<'a> {
    pub(crate) commit_lsn: Lsn,
    pub(crate) name: &'a str,
}

/// The shape of a table, sent before the first change to it and again after any schema change;
/// tuples that follow are positional against the latest Relation with the same oid.
///
/// Names are C strings in the database encoding, and a SQL_ASCII database can hold any bytes:
/// such a relation still decodes, with lossy names and `undecodable` set, so that whoever
/// follows it decides whether it can be skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation<'a> {
    pub(crate) xid: Option<u32>,
    pub oid: u32,
    pub namespace: Cow<'a, str>,
    pub name: Cow<'a, str>,
    pub(crate) replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn<'a>>,
    /// The first name (namespace, relation or column) that is not valid UTF-8.
    pub(crate) undecodable: Option<DecodeError>,
}

/// Decides what an Update or Delete carries about the old row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplicaIdentity {
    /// Primary key columns only, and only when they changed (Update) or always (Delete).
    Default,
    /// No old row at all.
    Nothing,
    /// The whole old row.
    Full,
    /// Columns of a chosen unique index, like `Default`.
    Index,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RelationColumn<'a> {
    pub(crate) flags: u8,
    pub name: Cow<'a, str>,
    pub type_oid: u32,
    pub(crate) type_modifier: i32,
}

impl RelationColumn<'_> {
    /// Whether the column is part of the replica identity, i.e. present in 'K' tuples.
    pub fn is_key(&self) -> bool {
        self.flags & COLUMN_FLAG_KEY != 0
    }
}

/// Names a non-built-in column type, since its oid means nothing to the subscriber otherwise.
/// Names are lossy: walsweep looks types up by oid, and a type with a non-UTF-8 name (a
/// SQL_ASCII database) must not stop the stream for a table no rule names.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeMessage<'a> {
    pub(crate) xid: Option<u32>,
    pub(crate) oid: u32,
    pub(crate) namespace: Cow<'a, str>,
    pub(crate) name: Cow<'a, str>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Insert<'a> {
    pub(crate) xid: Option<u32>,
    pub relation_oid: u32,
    pub new: TupleData<'a>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Update<'a> {
    pub(crate) xid: Option<u32>,
    pub relation_oid: u32,
    /// Old replica identity columns ('K'), other columns NULL; sent only when the identity
    /// changed or cannot be read from `new` (an unchanged value stored out of line).
    pub key: Option<TupleData<'a>>,
    /// Whole old row ('O'); sent only for REPLICA IDENTITY FULL.
    pub old: Option<TupleData<'a>>,
    pub new: TupleData<'a>,
}

/// Exactly one of `key` and `old` is set in anything a server sends; a table with REPLICA
/// IDENTITY NOTHING produces no Delete at all.
#[derive(Debug, Clone, PartialEq)]
pub struct Delete<'a> {
    pub(crate) xid: Option<u32>,
    pub relation_oid: u32,
    pub key: Option<TupleData<'a>>,
    pub old: Option<TupleData<'a>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Truncate {
    pub(crate) xid: Option<u32>,
    pub(crate) options: u8,
    pub relation_oids: Vec<u32>,
}

impl Truncate {
    pub fn cascade(&self) -> bool {
        self.options & TRUNCATE_CASCADE != 0
    }

    pub fn restart_identity(&self) -> bool {
        self.options & TRUNCATE_RESTART_IDENTITY != 0
    }
}

/// A `pg_logical_emit_message` payload; only sent when the slot was started with
/// `messages 'true'`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalMessage<'a> {
    pub(crate) xid: Option<u32>,
    /// Non-transactional messages arrive on their own, outside Begin/Commit, and are not undone
    /// by a rollback.
    pub(crate) transactional: bool,
    pub(crate) lsn: Lsn,
    pub(crate) prefix: &'a str,
    pub(crate) content: &'a [u8],
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamStart {
    pub(crate) xid: u32,
    /// Segments of different transactions may interleave; this marks where one begins.
    pub(crate) first_segment: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamCommit {
    pub(crate) xid: u32,
    pub(crate) flags: u8,
    pub(crate) commit_lsn: Lsn,
    pub(crate) end_lsn: Lsn,
    pub(crate) commit_time: i64,
}

/// Discards a streamed transaction (`subxid == xid`) or only the changes of one of its
/// subtransactions (`subxid != xid`).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamAbort {
    pub(crate) xid: u32,
    pub(crate) subxid: u32,
    /// Sent only with `streaming 'parallel'` (protocol v4), which walsweep never requests.
    pub(crate) abort_lsn: Option<Lsn>,
    pub(crate) abort_time: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BeginPrepare<'a> {
    pub(crate) prepare_lsn: Lsn,
    pub(crate) end_lsn: Lsn,
    pub(crate) prepare_time: i64,
    pub(crate) xid: u32,
    pub(crate) gid: &'a str,
}

/// Body of both Prepare and StreamPrepare.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepare<'a> {
    pub(crate) flags: u8,
    pub(crate) prepare_lsn: Lsn,
    pub(crate) end_lsn: Lsn,
    pub(crate) prepare_time: i64,
    pub(crate) xid: u32,
    pub(crate) gid: &'a str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommitPrepared<'a> {
    pub(crate) flags: u8,
    pub(crate) commit_lsn: Lsn,
    pub(crate) end_lsn: Lsn,
    pub(crate) commit_time: i64,
    pub(crate) xid: u32,
    pub(crate) gid: &'a str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RollbackPrepared<'a> {
    pub(crate) flags: u8,
    pub(crate) prepare_end_lsn: Lsn,
    pub(crate) rollback_end_lsn: Lsn,
    pub(crate) prepare_time: i64,
    pub(crate) rollback_time: i64,
    pub(crate) xid: u32,
    pub(crate) gid: &'a str,
}

/// One row image, positional against the relation's columns.
#[derive(Debug, Clone, PartialEq)]
pub struct TupleData<'a> {
    pub columns: Vec<TupleValue<'a>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue<'a> {
    Null,
    /// The column is stored out of line and did not change, so the server did not send it:
    /// "unknown", not "empty".
    UnchangedToast,
    /// The column's text output, not necessarily UTF-8 (it follows the server encoding).
    Text(&'a [u8]),
    /// The column's binary send format; only with the `binary 'true'` option.
    Binary(&'a [u8]),
}

/// Which part of a message a [`DecodeError`] is about, rendered as words in the error text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// A field that occurs once, such as "relation oid".
    Named(&'static str),
    /// A part of one entry of a list, rendered as "{list} {index} {part}", for example
    /// "new tuple column 3 length". `index` counts from 0.
    Indexed {
        list: &'static str,
        index: u32,
        part: &'static str,
    },
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Named(name) => f.write_str(name),
            Field::Indexed { list, index, part } => write!(f, "{list} {index} {part}"),
        }
    }
}

impl From<&'static str> for Field {
    fn from(name: &'static str) -> Self {
        Field::Named(name)
    }
}

/// A byte shown as hex, plus the character when it is printable, as tags are read by humans as
/// letters.
struct ByteDisplay(u8);

impl fmt::Display for ByteDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#04x}", self.0)?;
        if self.0.is_ascii_graphic() {
            write!(f, " ('{}')", char::from(self.0))?;
        }
        Ok(())
    }
}

/// A message that does not match the pgoutput layout. `message` is the protocol's name for the
/// message being decoded and `offset` counts bytes from the tag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message: no tag byte")]
    Empty,
    #[error("unknown pgoutput message tag {} at offset 0", ByteDisplay(*.tag))]
    UnknownTag { tag: u8 },
    #[error(
        "pgoutput {message}: truncated at offset {offset} reading {field} \
         (need {need} bytes, {left} left)"
    )]
    Truncated {
        message: &'static str,
        offset: usize,
        field: Field,
        need: usize,
        left: usize,
    },
    #[error("pgoutput {message}: {field} at offset {offset} has no NUL terminator")]
    MissingNul {
        message: &'static str,
        offset: usize,
        field: Field,
    },
    #[error("pgoutput {message}: {field} is not valid UTF-8 at offset {offset}")]
    InvalidUtf8 {
        message: &'static str,
        offset: usize,
        field: Field,
    },
    #[error(
        "pgoutput {message}: unexpected {field} {} at offset {offset}, expected {expected}",
        ByteDisplay(*.found)
    )]
    UnexpectedByte {
        message: &'static str,
        offset: usize,
        field: Field,
        found: u8,
        expected: &'static str,
    },
    #[error("pgoutput {message}: negative {field} {value} at offset {offset}")]
    NegativeLength {
        message: &'static str,
        offset: usize,
        field: Field,
        value: i32,
    },
    #[error("{count} trailing bytes after {message} at offset {offset}")]
    TrailingBytes {
        message: &'static str,
        offset: usize,
        count: usize,
    },
}

impl DecodeError {
    /// Where decoding failed, counting from the tag byte.
    pub fn offset(&self) -> usize {
        match self {
            DecodeError::Empty | DecodeError::UnknownTag { .. } => 0,
            DecodeError::Truncated { offset, .. }
            | DecodeError::MissingNul { offset, .. }
            | DecodeError::InvalidUtf8 { offset, .. }
            | DecodeError::UnexpectedByte { offset, .. }
            | DecodeError::NegativeLength { offset, .. }
            | DecodeError::TrailingBytes { offset, .. } => *offset,
        }
    }

    /// The message being decoded, when the tag was recognised.
    pub fn message(&self) -> Option<&'static str> {
        match self {
            DecodeError::Empty | DecodeError::UnknownTag { .. } => None,
            DecodeError::Truncated { message, .. }
            | DecodeError::MissingNul { message, .. }
            | DecodeError::InvalidUtf8 { message, .. }
            | DecodeError::UnexpectedByte { message, .. }
            | DecodeError::NegativeLength { message, .. }
            | DecodeError::TrailingBytes { message, .. } => Some(message),
        }
    }

    /// Never: the slot replays the same bytes after a reconnect, so retrying cannot succeed. The
    /// fix is a newer walsweep or a different `proto_version`.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

fn message_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        TAG_BEGIN => "Begin",
        TAG_COMMIT => "Commit",
        TAG_ORIGIN => "Origin",
        TAG_RELATION => "Relation",
        TAG_TYPE => "Type",
        TAG_INSERT => "Insert",
        TAG_UPDATE => "Update",
        TAG_DELETE => "Delete",
        TAG_TRUNCATE => "Truncate",
        TAG_MESSAGE => "Message",
        TAG_STREAM_START => "StreamStart",
        TAG_STREAM_STOP => "StreamStop",
        TAG_STREAM_COMMIT => "StreamCommit",
        TAG_STREAM_ABORT => "StreamAbort",
        TAG_BEGIN_PREPARE => "BeginPrepare",
        TAG_PREPARE => "Prepare",
        TAG_COMMIT_PREPARED => "CommitPrepared",
        TAG_ROLLBACK_PREPARED => "RollbackPrepared",
        TAG_STREAM_PREPARE => "StreamPrepare",
        _ => return None,
    })
}

/// Decodes one pgoutput message: the whole payload of one XLogData, or one `data` row of
/// `pg_logical_slot_get_binary_changes`.
///
/// `in_stream` says whether the message arrived between StreamStart and StreamStop, where data
/// messages carry a leading xid; [`Decoder`] keeps track of it.
pub fn parse_message(buf: &[u8], in_stream: bool) -> Result<PgOutput<'_>, DecodeError> {
    let (&tag, _) = buf.split_first().ok_or(DecodeError::Empty)?;
    let message = message_name(tag).ok_or(DecodeError::UnknownTag { tag })?;
    let mut r = Reader {
        buf,
        pos: 1,
        message,
    };
    let decoded = match tag {
        TAG_BEGIN => PgOutput::Begin(Begin {
            final_lsn: r.lsn("final lsn")?,
            commit_time: r.i64("commit time")?,
            xid: r.u32("xid")?,
        }),
        TAG_COMMIT => PgOutput::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("end lsn")?,
            commit_time: r.i64("commit time")?,
        }),
        TAG_ORIGIN => PgOutput::Origin(Origin {
            commit_lsn: r.lsn("commit lsn")?,
            name: r.cstr("origin name")?,
        }),
        TAG_RELATION => PgOutput::Relation(parse_relation(&mut r, in_stream)?),
        TAG_TYPE => PgOutput::Type(TypeMessage {
            xid: r.stream_xid(in_stream)?,
            oid: r.u32("type oid")?,
            namespace: r.cstr_lossy("namespace", &mut None)?,
            name: r.cstr_lossy("type name", &mut None)?,
        }),
        TAG_INSERT => PgOutput::Insert(parse_insert(&mut r, in_stream)?),
        TAG_UPDATE => PgOutput::Update(parse_update(&mut r, in_stream)?),
        TAG_DELETE => PgOutput::Delete(parse_delete(&mut r, in_stream)?),
        TAG_TRUNCATE => PgOutput::Truncate(parse_truncate(&mut r, in_stream)?),
        TAG_MESSAGE => PgOutput::Message(parse_logical_message(&mut r, in_stream)?),
        TAG_STREAM_START => PgOutput::StreamStart(StreamStart {
            xid: r.u32("xid")?,
            first_segment: r.u8("first segment flag")? != 0,
        }),
        TAG_STREAM_STOP => PgOutput::StreamStop,
        TAG_STREAM_COMMIT => PgOutput::StreamCommit(StreamCommit {
            xid: r.u32("xid")?,
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("end lsn")?,
            commit_time: r.i64("commit time")?,
        }),
        TAG_STREAM_ABORT => PgOutput::StreamAbort(parse_stream_abort(&mut r)?),
        TAG_BEGIN_PREPARE => PgOutput::BeginPrepare(BeginPrepare {
            prepare_lsn: r.lsn("prepare lsn")?,
            end_lsn: r.lsn("end lsn")?,
            prepare_time: r.i64("prepare time")?,
            xid: r.u32("xid")?,
            gid: r.cstr("gid")?,
        }),
        TAG_PREPARE => PgOutput::Prepare(parse_prepare(&mut r)?),
        TAG_COMMIT_PREPARED => PgOutput::CommitPrepared(CommitPrepared {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("end lsn")?,
            commit_time: r.i64("commit time")?,
            xid: r.u32("xid")?,
            gid: r.cstr("gid")?,
        }),
        TAG_ROLLBACK_PREPARED => PgOutput::RollbackPrepared(RollbackPrepared {
            flags: r.u8("flags")?,
            prepare_end_lsn: r.lsn("prepare end lsn")?,
            rollback_end_lsn: r.lsn("rollback end lsn")?,
            prepare_time: r.i64("prepare time")?,
            rollback_time: r.i64("rollback time")?,
            xid: r.u32("xid")?,
            gid: r.cstr("gid")?,
        }),
        TAG_STREAM_PREPARE => PgOutput::StreamPrepare(parse_prepare(&mut r)?),
        // message_name() accepted the tag, so this arm is unreachable; an error keeps it panic-free.
        _ => return Err(DecodeError::UnknownTag { tag }),
    };
    r.finish()?;
    Ok(decoded)
}

/// Feeds messages in slot order and remembers whether a stream segment is open, which decides
/// how the next message is laid out.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    in_stream: bool,
}

impl Decoder {
    pub const fn new() -> Self {
        Decoder { in_stream: false }
    }

    /// Decodes the next message. State changes only on success, so a caller that skips a bad
    /// message keeps decoding the rest of the segment the right way.
    pub fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<PgOutput<'a>, DecodeError> {
        let decoded = parse_message(buf, self.in_stream)?;
        match decoded {
            PgOutput::StreamStart(_) => self.in_stream = true,
            PgOutput::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(decoded)
    }

    /// Whether the last decoded message left a stream segment open.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }
}

fn parse_relation<'a>(r: &mut Reader<'a>, in_stream: bool) -> Result<Relation<'a>, DecodeError> {
    let xid = r.stream_xid(in_stream)?;
    let oid = r.u32("relation oid")?;
    let mut undecodable = None;
    let namespace = r.cstr_lossy("namespace", &mut undecodable)?;
    let name = r.cstr_lossy("relation name", &mut undecodable)?;
    let identity_offset = r.pos;
    let replica_identity = match r.u8("replica identity")? {
        REPLICA_IDENTITY_DEFAULT => ReplicaIdentity::Default,
        REPLICA_IDENTITY_NOTHING => ReplicaIdentity::Nothing,
        REPLICA_IDENTITY_FULL => ReplicaIdentity::Full,
        REPLICA_IDENTITY_INDEX => ReplicaIdentity::Index,
        found => {
            return Err(r.unexpected(
                identity_offset,
                "replica identity".into(),
                found,
                "'d', 'n', 'f' or 'i'",
            ))
        }
    };
    let count = r.count16("column count")?;
    r.ensure_room(count, MIN_RELATION_COLUMN_LEN, "columns")?;
    let mut columns = Vec::with_capacity(count);
    for index in 0..count {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let field = |part| Field::Indexed {
            list: "column",
            index,
            part,
        };
        columns.push(RelationColumn {
            flags: r.u8(field("flags"))?,
            name: r.cstr_lossy(field("name"), &mut undecodable)?,
            type_oid: r.u32(field("type oid"))?,
            type_modifier: r.i32(field("type modifier"))?,
        });
    }
    Ok(Relation {
        xid,
        oid,
        namespace,
        name,
        replica_identity,
        columns,
        undecodable,
    })
}

fn parse_insert<'a>(r: &mut Reader<'a>, in_stream: bool) -> Result<Insert<'a>, DecodeError> {
    let xid = r.stream_xid(in_stream)?;
    let relation_oid = r.u32("relation oid")?;
    r.expect_tuple_type(TUPLE_NEW, "'N'")?;
    Ok(Insert {
        xid,
        relation_oid,
        new: parse_tuple(r, TupleRole::New)?,
    })
}

fn parse_update<'a>(r: &mut Reader<'a>, in_stream: bool) -> Result<Update<'a>, DecodeError> {
    let xid = r.stream_xid(in_stream)?;
    let relation_oid = r.u32("relation oid")?;
    let (mut key, mut old) = (None, None);
    let offset = r.pos;
    match r.u8("tuple type")? {
        TUPLE_KEY => key = Some(parse_tuple(r, TupleRole::Key)?),
        TUPLE_OLD => old = Some(parse_tuple(r, TupleRole::Old)?),
        TUPLE_NEW => {}
        found => {
            return Err(r.unexpected(offset, "tuple type".into(), found, "'K', 'O' or 'N'"));
        }
    }
    if key.is_some() || old.is_some() {
        r.expect_tuple_type(TUPLE_NEW, "'N'")?;
    }
    Ok(Update {
        xid,
        relation_oid,
        key,
        old,
        new: parse_tuple(r, TupleRole::New)?,
    })
}

fn parse_delete<'a>(r: &mut Reader<'a>, in_stream: bool) -> Result<Delete<'a>, DecodeError> {
    let xid = r.stream_xid(in_stream)?;
    let relation_oid = r.u32("relation oid")?;
    let (mut key, mut old) = (None, None);
    let offset = r.pos;
    match r.u8("tuple type")? {
        TUPLE_KEY => key = Some(parse_tuple(r, TupleRole::Key)?),
        TUPLE_OLD => old = Some(parse_tuple(r, TupleRole::Old)?),
        found => return Err(r.unexpected(offset, "tuple type".into(), found, "'K' or 'O'")),
    }
    Ok(Delete {
        xid,
        relation_oid,
        key,
        old,
    })
}

fn parse_truncate(r: &mut Reader<'_>, in_stream: bool) -> Result<Truncate, DecodeError> {
    let xid = r.stream_xid(in_stream)?;
    let count = r.length("relation count")?;
    let options = r.u8("options")?;
    r.ensure_room(count, TRUNCATE_OID_LEN, "relation oids")?;
    let mut relation_oids = Vec::with_capacity(count);
    for index in 0..count {
        relation_oids.push(r.u32(Field::Indexed {
            list: "relation",
            index: u32::try_from(index).unwrap_or(u32::MAX),
            part: "oid",
        })?);
    }
    Ok(Truncate {
        xid,
        options,
        relation_oids,
    })
}

fn parse_logical_message<'a>(
    r: &mut Reader<'a>,
    in_stream: bool,
) -> Result<LogicalMessage<'a>, DecodeError> {
    let xid = r.stream_xid(in_stream)?;
    let flags = r.u8("flags")?;
    let lsn = r.lsn("message lsn")?;
    let prefix = r.cstr("prefix")?;
    let len = r.length("content length")?;
    Ok(LogicalMessage {
        xid,
        transactional: flags & MESSAGE_TRANSACTIONAL != 0,
        lsn,
        prefix,
        content: r.bytes(len, "content")?,
    })
}

fn parse_stream_abort(r: &mut Reader<'_>) -> Result<StreamAbort, DecodeError> {
    let xid = r.u32("xid")?;
    let subxid = r.u32("subtransaction xid")?;
    // The v4 fields are present only with streaming 'parallel'; anything else left over is
    // reported by finish() as trailing bytes.
    let (abort_lsn, abort_time) = if r.remaining() == STREAM_ABORT_PARALLEL_LEN {
        (Some(r.lsn("abort lsn")?), Some(r.i64("abort time")?))
    } else {
        (None, None)
    };
    Ok(StreamAbort {
        xid,
        subxid,
        abort_lsn,
        abort_time,
    })
}

fn parse_prepare<'a>(r: &mut Reader<'a>) -> Result<Prepare<'a>, DecodeError> {
    Ok(Prepare {
        flags: r.u8("flags")?,
        prepare_lsn: r.lsn("prepare lsn")?,
        end_lsn: r.lsn("end lsn")?,
        prepare_time: r.i64("prepare time")?,
        xid: r.u32("xid")?,
        gid: r.cstr("gid")?,
    })
}

/// Which tuple of a change is being read; only names it in errors.
#[derive(Clone, Copy)]
enum TupleRole {
    Key,
    Old,
    New,
}

impl TupleRole {
    fn column_list(self) -> &'static str {
        match self {
            TupleRole::Key => "key tuple column",
            TupleRole::Old => "old tuple column",
            TupleRole::New => "new tuple column",
        }
    }

    fn count_field(self) -> &'static str {
        match self {
            TupleRole::Key => "key tuple column count",
            TupleRole::Old => "old tuple column count",
            TupleRole::New => "new tuple column count",
        }
    }

    fn columns_field(self) -> &'static str {
        match self {
            TupleRole::Key => "key tuple columns",
            TupleRole::Old => "old tuple columns",
            TupleRole::New => "new tuple columns",
        }
    }
}

fn parse_tuple<'a>(r: &mut Reader<'a>, role: TupleRole) -> Result<TupleData<'a>, DecodeError> {
    let count = r.count16(role.count_field())?;
    r.ensure_room(count, MIN_TUPLE_COLUMN_LEN, role.columns_field())?;
    let mut columns = Vec::with_capacity(count);
    for index in 0..count {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let field = |part| Field::Indexed {
            list: role.column_list(),
            index,
            part,
        };
        let offset = r.pos;
        let value = match r.u8(field("kind"))? {
            COLUMN_NULL => TupleValue::Null,
            COLUMN_UNCHANGED_TOAST => TupleValue::UnchangedToast,
            COLUMN_TEXT => {
                let len = r.length(field("length"))?;
                TupleValue::Text(r.bytes(len, field("value"))?)
            }
            COLUMN_BINARY => {
                let len = r.length(field("length"))?;
                TupleValue::Binary(r.bytes(len, field("value"))?)
            }
            found => {
                return Err(r.unexpected(offset, field("kind"), found, "'n', 'u', 't' or 'b'"));
            }
        };
        columns.push(value);
    }
    Ok(TupleData { columns })
}

/// Checked big-endian reads over one message. Every method either advances past what it
/// returns or fails with the position it started at.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn truncated(&self, field: Field, need: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            offset: self.pos,
            field,
            need,
            left: self.remaining(),
        }
    }

    fn unexpected(
        &self,
        offset: usize,
        field: Field,
        found: u8,
        expected: &'static str,
    ) -> DecodeError {
        DecodeError::UnexpectedByte {
            message: self.message,
            offset,
            field,
            found,
            expected,
        }
    }

    fn array<const N: usize>(&mut self, field: impl Into<Field>) -> Result<[u8; N], DecodeError> {
        match self.rest().first_chunk::<N>() {
            Some(chunk) => {
                self.pos = self.pos.saturating_add(N);
                Ok(*chunk)
            }
            None => Err(self.truncated(field.into(), N)),
        }
    }

    fn u8(&mut self, field: impl Into<Field>) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    fn u32(&mut self, field: impl Into<Field>) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: impl Into<Field>) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn i64(&mut self, field: impl Into<Field>) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    fn lsn(&mut self, field: impl Into<Field>) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    fn bytes(&mut self, n: usize, field: impl Into<Field>) -> Result<&'a [u8], DecodeError> {
        match self.rest().get(..n) {
            Some(bytes) => {
                self.pos = self.pos.saturating_add(n);
                Ok(bytes)
            }
            None => Err(self.truncated(field.into(), n)),
        }
    }

    /// A NUL-terminated name. Names are identifiers we match configuration against, so unlike
    /// column values they must be UTF-8.
    fn cstr(&mut self, field: impl Into<Field>) -> Result<&'a str, DecodeError> {
        let field = field.into();
        let start = self.pos;
        let bytes = self.cstr_bytes(field)?;
        std::str::from_utf8(bytes).map_err(|e| self.invalid_utf8(start, e, field))
    }

    /// A NUL-terminated name that may not be UTF-8, replaced lossily; the first invalid one is
    /// kept in `first_error` so the caller can still refuse it where it matters.
    fn cstr_lossy(
        &mut self,
        field: impl Into<Field>,
        first_error: &mut Option<DecodeError>,
    ) -> Result<Cow<'a, str>, DecodeError> {
        let field = field.into();
        let start = self.pos;
        let bytes = self.cstr_bytes(field)?;
        if let Err(e) = std::str::from_utf8(bytes) {
            let error = self.invalid_utf8(start, e, field);
            first_error.get_or_insert(error);
        }
        Ok(String::from_utf8_lossy(bytes))
    }

    fn cstr_bytes(&mut self, field: Field) -> Result<&'a [u8], DecodeError> {
        let start = self.pos;
        let rest = self.rest();
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::MissingNul {
                message: self.message,
                offset: start,
                field,
            });
        };
        self.pos = start.saturating_add(nul).saturating_add(1);
        Ok(rest.get(..nul).unwrap_or_default())
    }

    fn invalid_utf8(&self, start: usize, e: std::str::Utf8Error, field: Field) -> DecodeError {
        DecodeError::InvalidUtf8 {
            message: self.message,
            offset: start.saturating_add(e.valid_up_to()),
            field,
        }
    }

    /// An Int32 length or count; the server never sends a negative one outside NULL markers,
    /// which pgoutput encodes as a column kind instead.
    fn length(&mut self, field: impl Into<Field> + Copy) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let value = self.i32(field)?;
        usize::try_from(value).map_err(|_| DecodeError::NegativeLength {
            message: self.message,
            offset,
            field: field.into(),
            value,
        })
    }

    /// An Int16 count of columns, unsigned as in the server's own reader.
    fn count16(&mut self, field: impl Into<Field>) -> Result<usize, DecodeError> {
        self.array(field)
            .map(|b| usize::from(u16::from_be_bytes(b)))
    }

    /// Fails unless `count` entries of at least `min_each` bytes can fit in what is left, so a
    /// forged count fails here instead of sizing an allocation.
    fn ensure_room(
        &self,
        count: usize,
        min_each: usize,
        field: impl Into<Field>,
    ) -> Result<(), DecodeError> {
        let need = count.saturating_mul(min_each);
        if need > self.remaining() {
            return Err(self.truncated(field.into(), need));
        }
        Ok(())
    }

    fn stream_xid(&mut self, in_stream: bool) -> Result<Option<u32>, DecodeError> {
        if in_stream {
            self.u32("xid").map(Some)
        } else {
            Ok(None)
        }
    }

    fn expect_tuple_type(&mut self, want: u8, expected: &'static str) -> Result<(), DecodeError> {
        let offset = self.pos;
        match self.u8("tuple type")? {
            found if found == want => Ok(()),
            found => Err(self.unexpected(offset, "tuple type".into(), found, expected)),
        }
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                message: self.message,
                offset: self.pos,
                count,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use postgres_types::Type;

    use super::*;

    /// Captured by `scripts/capture-pgoutput-fixtures`; see tests/fixtures/pgoutput/README.md.
    const STREAM: &[u8] = include_bytes!("../../tests/fixtures/pgoutput/stream.bin");

    /// Splits the fixture format: a u32 big-endian length, then that many bytes, repeated.
    fn frames(mut stream: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        while !stream.is_empty() {
            let (len, rest) = stream.split_first_chunk::<4>().expect("length prefix");
            let (frame, rest) = rest.split_at(u32::from_be_bytes(*len) as usize);
            out.push(frame);
            stream = rest;
        }
        out
    }

    /// Every captured message, the stream state it has to be decoded in, and the result.
    fn captured() -> Vec<(&'static [u8], bool, PgOutput<'static>)> {
        let mut decoder = Decoder::new();
        frames(STREAM)
            .into_iter()
            .enumerate()
            .map(|(i, frame)| {
                let in_stream = decoder.in_stream();
                let msg = decoder
                    .decode(frame)
                    .unwrap_or_else(|e| panic!("captured message {i}: {e}"));
                (frame, in_stream, msg)
            })
            .collect()
    }

    fn text(s: &str) -> TupleValue<'_> {
        TupleValue::Text(s.as_bytes())
    }

    fn tuple<'a>(columns: &[TupleValue<'a>]) -> TupleData<'a> {
        TupleData {
            columns: columns.to_vec(),
        }
    }

    /// Walks the decoded capture in order, so the test reads like the workload that made it.
    struct Walk {
        msgs: Vec<PgOutput<'static>>,
        pos: usize,
    }

    impl Walk {
        fn next(&mut self) -> &PgOutput<'static> {
            let msg = self
                .msgs
                .get(self.pos)
                .unwrap_or_else(|| panic!("capture ended at message {}", self.pos));
            self.pos += 1;
            msg
        }

        fn peek(&self, ahead: usize) -> Option<&PgOutput<'static>> {
            self.msgs.get(self.pos + ahead)
        }

        fn stream_stop(&mut self) {
            let at = self.pos;
            match self.next() {
                PgOutput::StreamStop => {}
                other => panic!("message {at}: expected StreamStop, got {other:?}"),
            }
        }

        /// Consumes consecutive streamed Inserts of `(id, v)` rows into `relation_oid`, across
        /// the segment boundaries of transaction `xid`, checking each against `expected`.
        /// Returns the xid each row carried and how many boundaries were crossed.
        fn bulk_inserts(
            &mut self,
            xid: u32,
            relation_oid: u32,
            expected: &mut dyn Iterator<Item = (u32, String)>,
        ) -> (Vec<u32>, usize) {
            let (mut row_xids, mut boundaries) = (Vec::new(), 0);
            loop {
                match (self.peek(0), self.peek(1), self.peek(2)) {
                    (Some(PgOutput::Insert(insert)), _, _) => {
                        let (id, v) = expected.next().expect("more inserts than rows");
                        let id = id.to_string();
                        assert_eq!(insert.relation_oid, relation_oid);
                        assert_eq!(insert.new, tuple(&[text(&id), text(&v)]));
                        row_xids.push(insert.xid.expect("streamed change without xid"));
                        self.pos += 1;
                    }
                    (
                        Some(PgOutput::StreamStop),
                        Some(PgOutput::StreamStart(start)),
                        Some(PgOutput::Insert(_)),
                    ) => {
                        assert_eq!(
                            start,
                            &StreamStart {
                                xid,
                                first_segment: false
                            }
                        );
                        self.pos += 2;
                        boundaries += 1;
                    }
                    _ => return (row_xids, boundaries),
                }
            }
        }
    }

    macro_rules! expect {
        ($walk:expr, $variant:ident) => {{
            let at = $walk.pos;
            match $walk.next() {
                PgOutput::$variant(inner) => inner.clone(),
                other => panic!(
                    "message {at}: expected {}, got {other:?}",
                    stringify!($variant)
                ),
            }
        }};
    }

    /// Begin and Commit of one transaction agree with each other and with the clock.
    fn check_pair(begin: &Begin, commit: &Commit) {
        assert_eq!(begin.final_lsn, commit.commit_lsn);
        assert_eq!(begin.commit_time, commit.commit_time);
        assert!(commit.end_lsn > commit.commit_lsn);
        assert_eq!(commit.flags, 0);
        check_time(commit.commit_time);
    }

    fn check_time(pg_time: i64) {
        // 2024-01-01 .. 2100-01-01: the capture happened on a real clock.
        let unix = pg_time_to_unix_micros(pg_time);
        assert!(
            (1_704_067_200_000_000..4_102_444_800_000_000).contains(&unix),
            "{unix}"
        );
    }

    fn column(flags: u8, name: &str, type_oid: u32) -> RelationColumn<'_> {
        RelationColumn {
            flags,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        }
    }

    #[test]
    fn captured_stream_decodes_to_the_workload() {
        let mut w = Walk {
            msgs: captured().into_iter().map(|(_, _, m)| m).collect(),
            pos: 0,
        };

        // INSERT INTO items VALUES (1, NULL, 'hello')
        let begin = expect!(w, Begin);
        let items = expect!(w, Relation);
        assert_eq!(
            (items.xid, &*items.namespace, &*items.name),
            (None, "public", "items")
        );
        assert_eq!(items.replica_identity, ReplicaIdentity::Default);
        assert_eq!(
            items.columns,
            [
                column(1, "id", Type::INT4.oid()),
                column(0, "note", Type::TEXT.oid()),
                column(0, "body", Type::TEXT.oid())
            ]
        );
        assert!(items.columns[0].is_key() && !items.columns[1].is_key());
        let insert = expect!(w, Insert);
        assert_eq!((insert.xid, insert.relation_oid), (None, items.oid));
        assert_eq!(
            insert.new,
            tuple(&[text("1"), TupleValue::Null, text("hello")])
        );
        check_pair(&begin, &expect!(w, Commit));

        // INSERT INTO items VALUES (2, 'toasty', repeat('x', 9000)): the full value is sent.
        let begin = expect!(w, Begin);
        let insert = expect!(w, Insert);
        let body = "x".repeat(9000);
        assert_eq!(insert.new, tuple(&[text("2"), text("toasty"), text(&body)]));
        check_pair(&begin, &expect!(w, Commit));

        // UPDATE items SET note = 'touched' WHERE id = 2: the TOASTed body is not resent.
        let begin = expect!(w, Begin);
        let update = expect!(w, Update);
        assert_eq!(
            update,
            Update {
                xid: None,
                relation_oid: items.oid,
                key: None,
                old: None,
                new: tuple(&[text("2"), text("touched"), TupleValue::UnchangedToast]),
            }
        );
        check_pair(&begin, &expect!(w, Commit));

        // INSERT INTO audit VALUES (1, 'happy', 'first'): the enum type is announced first.
        let begin = expect!(w, Begin);
        let mood = expect!(w, Type);
        assert_eq!(
            (mood.xid, &*mood.namespace, &*mood.name),
            (None, "public", "mood")
        );
        let audit = expect!(w, Relation);
        assert_eq!((&*audit.namespace, &*audit.name), ("public", "audit"));
        assert_eq!(audit.replica_identity, ReplicaIdentity::Full);
        // With REPLICA IDENTITY FULL every column is part of the identity.
        assert_eq!(
            audit.columns,
            [
                column(1, "id", Type::INT4.oid()),
                column(1, "mood", mood.oid),
                column(1, "payload", Type::TEXT.oid())
            ]
        );
        let insert = expect!(w, Insert);
        assert_eq!(insert.relation_oid, audit.oid);
        assert_eq!(
            insert.new,
            tuple(&[text("1"), text("happy"), text("first")])
        );
        check_pair(&begin, &expect!(w, Commit));

        // UPDATE audit SET payload = 'second': FULL sends the whole old row.
        let begin = expect!(w, Begin);
        let update = expect!(w, Update);
        assert_eq!(update.relation_oid, audit.oid);
        assert_eq!(update.key, None);
        assert_eq!(
            update.old,
            Some(tuple(&[text("1"), text("happy"), text("first")]))
        );
        assert_eq!(
            update.new,
            tuple(&[text("1"), text("happy"), text("second")])
        );
        check_pair(&begin, &expect!(w, Commit));

        // DELETE FROM items WHERE id = 1: DEFAULT sends the key, other columns as NULL.
        let begin = expect!(w, Begin);
        let delete = expect!(w, Delete);
        assert_eq!(
            delete,
            Delete {
                xid: None,
                relation_oid: items.oid,
                key: Some(tuple(&[text("1"), TupleValue::Null, TupleValue::Null])),
                old: None,
            }
        );
        check_pair(&begin, &expect!(w, Commit));

        // DELETE FROM audit WHERE id = 1
        let begin = expect!(w, Begin);
        let delete = expect!(w, Delete);
        assert_eq!(delete.relation_oid, audit.oid);
        assert_eq!(delete.key, None);
        assert_eq!(
            delete.old,
            Some(tuple(&[text("1"), text("happy"), text("second")]))
        );
        let previous = expect!(w, Commit);
        check_pair(&begin, &previous);

        // pg_logical_emit_message(true, 'walsweep', '{"keys":["a"]}')
        let begin = expect!(w, Begin);
        let message = expect!(w, Message);
        assert_eq!(
            (message.xid, message.transactional, message.prefix),
            (None, true, "walsweep")
        );
        assert_eq!(message.content, br#"{"keys":["a"]}"#);
        let commit = expect!(w, Commit);
        // The message LSN is the end of its WAL record; the commit record follows right after.
        assert!(previous.end_lsn < message.lsn && message.lsn <= commit.commit_lsn);
        check_pair(&begin, &commit);

        // pg_logical_emit_message(false, ...): alone, outside any transaction.
        let message = expect!(w, Message);
        assert_eq!(
            (message.xid, message.transactional, message.prefix),
            (None, false, "walsweep")
        );
        assert_eq!(message.content, b"not-transactional");

        // ALTER TABLE items ADD COLUMN extra int; INSERT INTO items VALUES (3, 'after-alter', 'b', 42)
        let begin = expect!(w, Begin);
        let altered = expect!(w, Relation);
        assert_eq!((altered.oid, &*altered.name), (items.oid, "items"));
        assert_eq!(altered.columns.len(), 4);
        assert_eq!(altered.columns[3], column(0, "extra", Type::INT4.oid()));
        let insert = expect!(w, Insert);
        assert_eq!(
            insert.new,
            tuple(&[text("3"), text("after-alter"), text("b"), text("42")])
        );
        check_pair(&begin, &expect!(w, Commit));

        // UPDATE items SET id = 4 WHERE id = 3: the key changed, so the old key comes along.
        let begin = expect!(w, Begin);
        let update = expect!(w, Update);
        let null = || TupleValue::Null;
        assert_eq!(
            update.key,
            Some(tuple(&[text("3"), null(), null(), null()]))
        );
        assert_eq!(update.old, None);
        assert_eq!(
            update.new,
            tuple(&[text("4"), text("after-alter"), text("b"), text("42")])
        );
        check_pair(&begin, &expect!(w, Commit));

        // INSERT INTO scratch DEFAULT VALUES
        let begin = expect!(w, Begin);
        let scratch = expect!(w, Relation);
        assert_eq!(scratch.name, "scratch");
        assert_eq!(scratch.columns, [column(1, "id", Type::INT4.oid())]);
        assert_eq!(expect!(w, Insert).new, tuple(&[text("1")]));
        check_pair(&begin, &expect!(w, Commit));

        // TRUNCATE audit, scratch RESTART IDENTITY CASCADE: both relations are re-described
        // (new relfilenodes invalidate the server's cache) before the Truncate.
        let begin = expect!(w, Begin);
        assert_eq!(expect!(w, Type).oid, mood.oid);
        assert_eq!(expect!(w, Relation).oid, audit.oid);
        assert_eq!(expect!(w, Relation).oid, scratch.oid);
        let truncate = expect!(w, Truncate);
        assert_eq!(truncate.xid, None);
        assert!(truncate.cascade() && truncate.restart_identity());
        assert_eq!(truncate.relation_oids, [audit.oid, scratch.oid]);
        check_pair(&begin, &expect!(w, Commit));

        // A committed transaction bigger than logical_decoding_work_mem, streamed in segments.
        let start = expect!(w, StreamStart);
        let xid = start.xid;
        assert!(start.first_segment);
        let bulk = expect!(w, Relation);
        assert_eq!((bulk.xid, &*bulk.name), (Some(xid), "bulk"));
        let mut rows = (1..=1000).map(|g| (g, format!("row-{g}")));
        let (row_xids, boundaries) = w.bulk_inserts(xid, bulk.oid, &mut rows);
        assert_eq!(row_xids, [xid; 1000]);
        assert!(boundaries >= 1, "expected several stream segments");
        let message = expect!(w, Message);
        assert_eq!(
            (message.xid, message.transactional, message.content),
            (Some(xid), true, &b"in-stream"[..])
        );
        assert_eq!(expect!(w, Type).xid, Some(xid));
        let streamed_audit = expect!(w, Relation);
        assert_eq!(
            (streamed_audit.xid, streamed_audit.oid),
            (Some(xid), audit.oid)
        );
        let insert = expect!(w, Insert);
        assert_eq!((insert.xid, insert.relation_oid), (Some(xid), audit.oid));
        assert_eq!(
            insert.new,
            tuple(&[text("2"), text("sad"), text("streamed")])
        );
        assert_eq!(expect!(w, Relation).oid, scratch.oid);
        let truncate = expect!(w, Truncate);
        assert_eq!(truncate.xid, Some(xid));
        assert!(!truncate.cascade() && !truncate.restart_identity());
        assert_eq!(truncate.relation_oids, [scratch.oid]);
        let update = expect!(w, Update);
        assert_eq!((update.xid, update.key.clone()), (Some(xid), None));
        assert_eq!(update.new, tuple(&[text("1"), text("updated")]));
        let delete = expect!(w, Delete);
        assert_eq!(delete.key, Some(tuple(&[text("2"), TupleValue::Null])));
        w.stream_stop();
        let commit = expect!(w, StreamCommit);
        assert_eq!((commit.xid, commit.flags), (xid, 0));
        assert!(commit.end_lsn > commit.commit_lsn);
        check_time(commit.commit_time);

        // A streamed transaction rolled back: the server stops sending at the abort.
        let start = expect!(w, StreamStart);
        let aborted = start.xid;
        assert!(start.first_segment && aborted != xid);
        assert_eq!(expect!(w, Relation).xid, Some(aborted));
        let mut rows = (1001..=1800).map(|g| (g, format!("gone-{g}")));
        let (row_xids, _) = w.bulk_inserts(aborted, bulk.oid, &mut rows);
        assert!((1..800).contains(&row_xids.len()), "{}", row_xids.len());
        assert!(row_xids.iter().all(|&x| x == aborted));
        w.stream_stop();
        assert_eq!(
            expect!(w, StreamAbort),
            StreamAbort {
                xid: aborted,
                subxid: aborted,
                abort_lsn: None,
                abort_time: None
            }
        );

        // A streamed transaction with a rolled-back savepoint, then committed.
        let start = expect!(w, StreamStart);
        let xid = start.xid;
        assert!(start.first_segment);
        assert_eq!(expect!(w, Relation).xid, Some(xid));
        let mut rows = (2001..=2600)
            .map(|g| (g, format!("kept-{g}")))
            .chain((3001..=3600).map(|g| (g, format!("sub-{g}"))));
        let (row_xids, _) = w.bulk_inserts(xid, bulk.oid, &mut rows);
        // Part of the subtransaction was streamed, which is why its abort is sent at all.
        assert!((601..1200).contains(&row_xids.len()), "{}", row_xids.len());
        // Streamed changes carry the xid of the subtransaction that made them, not the
        // StreamStart xid: that is what lets a StreamAbort discard just the subtransaction.
        let (kept, sub) = row_xids.split_at(600);
        assert!(kept.iter().all(|&x| x == xid));
        let subxid = sub[0];
        assert!(subxid != xid && sub.iter().all(|&x| x == subxid));
        w.stream_stop();
        assert_eq!(
            expect!(w, StreamAbort),
            StreamAbort {
                xid,
                subxid,
                abort_lsn: None,
                abort_time: None
            }
        );
        assert_eq!(
            expect!(w, StreamStart),
            StreamStart {
                xid,
                first_segment: false
            }
        );
        // The abort dropped the server's per-transaction relation cache, so bulk is re-described.
        assert_eq!(expect!(w, Relation).oid, bulk.oid);
        let insert = expect!(w, Insert);
        assert_eq!(insert.new, tuple(&[text("4000"), text("after-savepoint")]));
        w.stream_stop();
        assert_eq!(expect!(w, StreamCommit).xid, xid);

        assert_eq!(w.peek(0), None, "unexpected messages after the workload");
    }

    /// Data messages carry an xid exactly inside stream segments: the segment's, or that of one of
    /// its subtransactions, which are numbered after it.
    #[test]
    fn captured_xids_match_the_open_stream_segment() {
        let mut segment_xid = None;
        let mut commit_end_lsn = Lsn::ZERO;
        for (i, (_, in_stream, msg)) in captured().iter().enumerate() {
            assert_eq!(*in_stream, segment_xid.is_some(), "message {i}");
            let xid = match msg {
                PgOutput::StreamStart(start) => {
                    segment_xid = Some(start.xid);
                    continue;
                }
                PgOutput::StreamStop => {
                    segment_xid = None;
                    continue;
                }
                PgOutput::Commit(Commit { end_lsn, .. })
                | PgOutput::StreamCommit(StreamCommit { end_lsn, .. }) => {
                    assert!(*end_lsn > commit_end_lsn, "message {i}: end lsn went back");
                    commit_end_lsn = *end_lsn;
                    continue;
                }
                PgOutput::Relation(m) => m.xid,
                PgOutput::Type(m) => m.xid,
                PgOutput::Insert(m) => m.xid,
                PgOutput::Update(m) => m.xid,
                PgOutput::Delete(m) => m.xid,
                PgOutput::Truncate(m) => m.xid,
                PgOutput::Message(m) => m.xid,
                _ => continue,
            };
            assert_eq!(xid.is_some(), segment_xid.is_some(), "message {i}: {msg:?}");
            assert!(xid >= segment_xid, "message {i}: {msg:?}");
        }
        assert_eq!(segment_xid, None);
    }

    #[test]
    fn every_truncation_of_every_captured_message_is_an_error() {
        for (i, (bytes, in_stream, msg)) in captured().iter().enumerate() {
            for len in 0..bytes.len() {
                let prefix = &bytes[..len];
                assert!(
                    parse_message(prefix, *in_stream).is_err(),
                    "message {i} ({}) cut to {len} bytes parsed",
                    msg.name()
                );
                // Decoded in the wrong stream state it may or may not parse, but must not panic.
                let _ = parse_message(prefix, !*in_stream);
            }
        }
    }

    /// Builds messages by hand, for the ones the capture cannot produce and for broken ones.
    struct Msg(Vec<u8>);

    impl Msg {
        fn new(tag: u8) -> Self {
            Msg(vec![tag])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn raw(mut self, v: &[u8]) -> Self {
            self.0.extend_from_slice(v);
            self
        }
        fn cstr(self, v: &str) -> Self {
            self.raw(v.as_bytes()).u8(0)
        }
        fn text(self, v: &[u8]) -> Self {
            self.u8(b't').i32(v.len() as i32).raw(v)
        }
    }

    const LSN_A: i64 = 0x0000_0016_B374_D848;
    const LSN_B: i64 = 0x0000_0016_B374_D8A0;
    const TIME_A: i64 = 800_000_000_000_000;
    const TIME_B: i64 = 800_000_000_123_456;

    #[test]
    fn decodes_begin_prepare() {
        let bytes = Msg::new(b'b')
            .i64(LSN_A)
            .i64(LSN_B)
            .i64(TIME_A)
            .u32(731)
            .cstr("gid-1")
            .0;
        assert_eq!(
            parse_message(&bytes, false),
            Ok(PgOutput::BeginPrepare(BeginPrepare {
                prepare_lsn: Lsn(LSN_A as u64),
                end_lsn: Lsn(LSN_B as u64),
                prepare_time: TIME_A,
                xid: 731,
                gid: "gid-1",
            }))
        );
    }

    #[test]
    fn decodes_prepare_and_stream_prepare() {
        let body = |tag| {
            Msg::new(tag)
                .u8(0)
                .i64(LSN_A)
                .i64(LSN_B)
                .i64(TIME_A)
                .u32(732)
                .cstr("gid-2")
                .0
        };
        let prepare = Prepare {
            flags: 0,
            prepare_lsn: Lsn(LSN_A as u64),
            end_lsn: Lsn(LSN_B as u64),
            prepare_time: TIME_A,
            xid: 732,
            gid: "gid-2",
        };
        assert_eq!(
            parse_message(&body(b'P'), false),
            Ok(PgOutput::Prepare(prepare.clone()))
        );
        // StreamPrepare follows the last StreamStop, so it never carries a stream xid prefix.
        assert_eq!(
            parse_message(&body(b'p'), false),
            Ok(PgOutput::StreamPrepare(prepare))
        );
    }

    #[test]
    fn decodes_commit_prepared() {
        let bytes = Msg::new(b'K')
            .u8(0)
            .i64(LSN_A)
            .i64(LSN_B)
            .i64(TIME_B)
            .u32(733)
            .cstr("gid-3")
            .0;
        assert_eq!(
            parse_message(&bytes, false),
            Ok(PgOutput::CommitPrepared(CommitPrepared {
                flags: 0,
                commit_lsn: Lsn(LSN_A as u64),
                end_lsn: Lsn(LSN_B as u64),
                commit_time: TIME_B,
                xid: 733,
                gid: "gid-3",
            }))
        );
    }

    #[test]
    fn decodes_rollback_prepared() {
        let bytes = Msg::new(b'r')
            .u8(0)
            .i64(LSN_A)
            .i64(LSN_B)
            .i64(TIME_A)
            .i64(TIME_B)
            .u32(734)
            .cstr("gid-4")
            .0;
        assert_eq!(
            parse_message(&bytes, false),
            Ok(PgOutput::RollbackPrepared(RollbackPrepared {
                flags: 0,
                prepare_end_lsn: Lsn(LSN_A as u64),
                rollback_end_lsn: Lsn(LSN_B as u64),
                prepare_time: TIME_A,
                rollback_time: TIME_B,
                xid: 734,
                gid: "gid-4",
            }))
        );
    }

    #[test]
    fn decodes_origin() {
        let bytes = Msg::new(b'O').i64(LSN_A).cstr("node-east").0;
        assert_eq!(
            parse_message(&bytes, false),
            Ok(PgOutput::Origin(Origin {
                commit_lsn: Lsn(LSN_A as u64),
                name: "node-east",
            }))
        );
    }

    #[test]
    fn decodes_parallel_stream_abort_fields_when_present() {
        let bytes = Msg::new(b'A').u32(900).u32(901).i64(LSN_A).i64(TIME_A).0;
        assert_eq!(
            parse_message(&bytes, false),
            Ok(PgOutput::StreamAbort(StreamAbort {
                xid: 900,
                subxid: 901,
                abort_lsn: Some(Lsn(LSN_A as u64)),
                abort_time: Some(TIME_A),
            }))
        );
    }

    #[test]
    fn decodes_binary_values_and_stream_xids() {
        let bytes = Msg::new(b'U')
            .u32(77)
            .u32(16_384)
            .u8(b'O')
            .i16(2)
            .u8(b'b')
            .i32(4)
            .raw(&[0, 0, 0, 7])
            .u8(b'n')
            .u8(b'N')
            .i16(2)
            .text(b"\xff\xfe not utf-8")
            .u8(b'u')
            .0;
        assert_eq!(
            parse_message(&bytes, true),
            Ok(PgOutput::Update(Update {
                xid: Some(77),
                relation_oid: 16_384,
                key: None,
                old: Some(tuple(&[
                    TupleValue::Binary(&[0, 0, 0, 7]),
                    TupleValue::Null
                ])),
                new: tuple(&[
                    TupleValue::Text(b"\xff\xfe not utf-8"),
                    TupleValue::UnchangedToast
                ]),
            }))
        );
    }

    #[test]
    fn decoder_tracks_stream_segments_only_on_success() {
        let mut decoder = Decoder::new();
        let plain = Msg::new(b'I').u32(16_384).u8(b'N').i16(0).0;
        let streamed = Msg::new(b'I').u32(5).u32(16_384).u8(b'N').i16(0).0;
        assert!(matches!(
            decoder.decode(&plain),
            Ok(PgOutput::Insert(Insert { xid: None, .. }))
        ));
        assert!(decoder.decode(&streamed).is_err(), "xid outside a stream");
        decoder
            .decode(&Msg::new(b'S').u32(5).u8(1).0)
            .expect("StreamStart");
        assert!(decoder.in_stream());
        assert!(decoder.decode(&plain).is_err(), "no xid inside a stream");
        assert!(decoder.decode(&[b'E', 0]).is_err());
        assert!(
            decoder.in_stream(),
            "a failed StreamStop must not close the segment"
        );
        assert!(matches!(
            decoder.decode(&streamed),
            Ok(PgOutput::Insert(Insert { xid: Some(5), .. }))
        ));
        assert_eq!(decoder.decode(b"E"), Ok(PgOutput::StreamStop));
        assert!(!decoder.in_stream());
    }

    #[test]
    fn converts_postgres_timestamps() {
        assert_eq!(pg_time_to_unix_micros(0), POSTGRES_EPOCH_UNIX_MICROS);
        assert_eq!(pg_time_to_unix_micros(-POSTGRES_EPOCH_UNIX_MICROS), 0);
        assert_eq!(pg_time_to_unix_micros(i64::MAX), i64::MAX);
    }

    /// A SQL_ASCII database can name things with any bytes: the Relation still decodes, so the
    /// assembler can skip a table nobody follows, and keeps the first error for one it cannot.
    #[test]
    fn non_utf8_relation_names_decode_lossily_keeping_the_first_error() {
        let relation_head = || Msg::new(b'R').u32(16_384).cstr("public");
        let odd_table = relation_head()
            .raw(b"caf\xe9\0")
            .u8(b'f')
            .i16(1)
            .u8(1)
            .raw(b"\xc3(\0")
            .u32(23)
            .i32(-1)
            .0;
        let PgOutput::Relation(rel) = Decoder::new().decode(&odd_table).expect("decodes") else {
            panic!("not a Relation");
        };
        assert_eq!((&*rel.namespace, &*rel.name), ("public", "caf\u{fffd}"));
        assert_eq!(rel.columns[0].name, "\u{fffd}(");
        assert_eq!(
            rel.undecodable.map(|e| e.to_string()).as_deref(),
            Some("pgoutput Relation: relation name is not valid UTF-8 at offset 15")
        );

        let odd_column = relation_head()
            .cstr("items")
            .u8(b'f')
            .i16(1)
            .u8(1)
            .raw(b"\xc3(\0")
            .u32(23)
            .i32(-1)
            .0;
        let PgOutput::Relation(rel) = Decoder::new().decode(&odd_column).expect("decodes") else {
            panic!("not a Relation");
        };
        assert_eq!(
            rel.undecodable.map(|e| e.to_string()).as_deref(),
            Some("pgoutput Relation: column 0 name is not valid UTF-8 at offset 22")
        );

        let odd_type = Msg::new(b'Y')
            .u32(16_390)
            .raw(b"pub\xfflic\0")
            .cstr("mood")
            .0;
        let PgOutput::Type(ty) = Decoder::new().decode(&odd_type).expect("decodes") else {
            panic!("not a Type");
        };
        assert_eq!((&*ty.namespace, &*ty.name), ("pub\u{fffd}lic", "mood"));
    }

    #[test]
    fn malformed_messages_name_message_offset_and_field() {
        let commit = Msg::new(b'C').u8(0).i64(LSN_A).i64(LSN_B).i64(TIME_A);
        let relation_head = || Msg::new(b'R').u32(16_384).cstr("public").cstr("items");
        let cases: Vec<(&str, Vec<u8>, bool, &str)> =
            vec![
            ("empty", vec![], false, "empty pgoutput message: no tag byte"),
            (
                "unknown tag",
                b"Z".to_vec(),
                false,
                "unknown pgoutput message tag 0x5a ('Z') at offset 0",
            ),
            (
                "unprintable tag",
                vec![0xff, 1, 2],
                false,
                "unknown pgoutput message tag 0xff at offset 0",
            ),
            (
                "trailing bytes",
                commit.u8(0).0,
                false,
                "1 trailing bytes after Commit at offset 26",
            ),
            (
                "trailing bytes after StreamAbort that are not the v4 fields",
                Msg::new(b'A').u32(1).u32(1).raw(&[0; 5]).0,
                false,
                "5 trailing bytes after StreamAbort at offset 9",
            ),
            (
                "the documented example",
                Msg::new(b'U')
                    .u32(16_384)
                    .u8(b'N')
                    .i16(5)
                    .text(b"7")
                    .u8(b'n')
                    .u8(b'n')
                    .u8(b't')
                    .raw(&[0, 0])
                    .0,
                false,
                "pgoutput Update: truncated at offset 17 reading new tuple column 3 length \
                 (need 4 bytes, 2 left)",
            ),
            (
                "huge tuple column count",
                Msg::new(b'I').u32(16_384).u8(b'N').raw(&[0xff, 0xff]).raw(b"nnn").0,
                false,
                "pgoutput Insert: truncated at offset 8 reading new tuple columns \
                 (need 65535 bytes, 3 left)",
            ),
            (
                "huge relation column count",
                relation_head().u8(b'd').i16(i16::MAX).raw(&[0; 9]).0,
                false,
                "pgoutput Relation: truncated at offset 21 reading columns \
                 (need 327670 bytes, 9 left)",
            ),
            (
                "huge truncate relation count",
                Msg::new(b'T').i32(i32::MAX).u8(0).u32(16_384).0,
                false,
                "pgoutput Truncate: truncated at offset 6 reading relation oids \
                 (need 8589934588 bytes, 4 left)",
            ),
            (
                "negative truncate relation count",
                Msg::new(b'T').i32(-1).u8(0).0,
                false,
                "pgoutput Truncate: negative relation count -1 at offset 1",
            ),
            (
                "negative value length",
                Msg::new(b'I').u32(16_384).u8(b'N').i16(1).u8(b't').i32(-5).0,
                false,
                "pgoutput Insert: negative new tuple column 0 length -5 at offset 9",
            ),
            (
                "oversized value length",
                Msg::new(b'I').u32(16_384).u8(b'N').i16(1).u8(b'b').i32(1 << 30).raw(b"ab").0,
                false,
                "pgoutput Insert: truncated at offset 13 reading new tuple column 0 value \
                 (need 1073741824 bytes, 2 left)",
            ),
            (
                "oversized message content",
                Msg::new(b'M').u8(1).i64(LSN_A).cstr("walsweep").i32(100).raw(b"{}").0,
                false,
                "pgoutput Message: truncated at offset 23 reading content (need 100 bytes, 2 left)",
            ),
            (
                "missing NUL",
                Msg::new(b'R').u32(16_384).cstr("public").raw(b"items").0,
                false,
                "pgoutput Relation: relation name at offset 12 has no NUL terminator",
            ),
            (
                "missing NUL in a message prefix",
                Msg::new(b'M').u8(1).i64(LSN_A).raw(b"walsweep").0,
                false,
                "pgoutput Message: prefix at offset 10 has no NUL terminator",
            ),
            (
                "unknown replica identity",
                relation_head().u8(b'z').i16(0).0,
                false,
                "pgoutput Relation: unexpected replica identity 0x7a ('z') at offset 18, \
                 expected 'd', 'n', 'f' or 'i'",
            ),
            (
                "unknown tuple column kind",
                Msg::new(b'I').u32(16_384).u8(b'N').i16(1).u8(b'x').0,
                false,
                "pgoutput Insert: unexpected new tuple column 0 kind 0x78 ('x') at offset 8, \
                 expected 'n', 'u', 't' or 'b'",
            ),
            (
                "bad tuple type in Update",
                Msg::new(b'U').u32(16_384).u8(b'Q').0,
                false,
                "pgoutput Update: unexpected tuple type 0x51 ('Q') at offset 5, \
                 expected 'K', 'O' or 'N'",
            ),
            (
                "two old tuples in Update",
                Msg::new(b'U').u32(16_384).u8(b'K').i16(0).u8(b'O').i16(0).0,
                false,
                "pgoutput Update: unexpected tuple type 0x4f ('O') at offset 8, expected 'N'",
            ),
            (
                "new tuple in Delete",
                Msg::new(b'D').u32(16_384).u8(b'N').i16(0).0,
                false,
                "pgoutput Delete: unexpected tuple type 0x4e ('N') at offset 5, \
                 expected 'K' or 'O'",
            ),
            (
                "old tuple in Insert",
                Msg::new(b'I').u32(16_384).u8(b'O').i16(0).0,
                false,
                "pgoutput Insert: unexpected tuple type 0x4f ('O') at offset 5, expected 'N'",
            ),
            (
                "streamed Insert without its xid",
                Msg::new(b'I').u32(16_384).u8(b'N').0,
                true,
                "pgoutput Insert: truncated at offset 5 reading relation oid \
                 (need 4 bytes, 1 left)",
            ),
            (
                "truncated key tuple",
                Msg::new(b'D').u32(16_384).u8(b'K').i16(1).u8(b't').i32(3).raw(b"ab").0,
                false,
                "pgoutput Delete: truncated at offset 13 reading key tuple column 0 value \
                 (need 3 bytes, 2 left)",
            ),
        ];
        for (case, bytes, in_stream, want) in cases {
            let err = parse_message(&bytes, in_stream).expect_err(case);
            assert_eq!(err.to_string(), want, "{case}");
            assert!(!err.is_retryable());
            assert!(err.offset() <= bytes.len(), "{case}");
        }
    }

    #[test]
    fn error_accessors_report_message_and_offset() {
        let err = parse_message(b"E\0\0", false).unwrap_err();
        assert_eq!((err.message(), err.offset()), (Some("StreamStop"), 1));
        let err = parse_message(b"Z", false).unwrap_err();
        assert_eq!((err.message(), err.offset()), (None, 0));
    }

    /// A xorshift64 generator: deterministic, so a failure here reproduces exactly.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
    }

    const TAGS: &[u8] = b"BCORYIUDTMSEcAbPKrp";
    const INTERESTING: [[u8; 4]; 5] = [
        [0xff; 4],
        [0x7f, 0xff, 0xff, 0xff],
        [0x80, 0, 0, 0],
        [0; 4],
        [0, 0, 0, 1],
    ];

    fn mutate(buf: &mut Vec<u8>, rng: &mut XorShift) {
        match rng.below(6) {
            0 if !buf.is_empty() => {
                let i = rng.below(buf.len());
                buf[i] ^= 1 << rng.below(8);
            }
            1 if !buf.is_empty() => buf.truncate(rng.below(buf.len())),
            2 => {
                let at = rng.below(buf.len() + 1);
                for _ in 0..1 + rng.below(4) {
                    buf.insert(at, rng.byte());
                }
            }
            3 if !buf.is_empty() => {
                buf.remove(rng.below(buf.len()));
            }
            4 if buf.len() >= 4 => {
                let at = rng.below(buf.len() - 3);
                let value = INTERESTING[rng.below(INTERESTING.len())];
                buf[at..at + 4].copy_from_slice(&value);
            }
            _ => {
                let at = rng.below(buf.len() + 1);
                buf.insert(at, [0, b'n', b't', b'u', b'K', b'N'][rng.below(6)]);
            }
        }
    }

    /// Everything the fuzz target does, minus coverage guidance: cheap enough for every CI run.
    fn exercise(buf: &[u8]) {
        for in_stream in [false, true] {
            if let Err(e) = parse_message(buf, in_stream) {
                assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn survives_random_and_mutated_input() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for i in 0..100_000 {
            let mut buf: Vec<u8> = (0..rng.below(48)).map(|_| rng.byte()).collect();
            if i % 2 == 0 && !buf.is_empty() {
                buf[0] = TAGS[rng.below(TAGS.len())];
            }
            exercise(&buf);
        }

        let seeds = frames(STREAM);
        for _ in 0..100_000 {
            let mut buf = seeds[rng.below(seeds.len())].to_vec();
            for _ in 0..1 + rng.below(4) {
                mutate(&mut buf, &mut rng);
            }
            exercise(&buf);
        }

        // Whole mutated streams through the state machine, as a walsender would deliver them.
        for _ in 0..200 {
            let mut decoder = Decoder::new();
            for frame in &seeds {
                if rng.below(50) == 0 {
                    let mut buf = frame.to_vec();
                    mutate(&mut buf, &mut rng);
                    let _ = decoder.decode(&buf);
                } else {
                    let _ = decoder.decode(frame);
                }
            }
        }
    }
}
