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

use std::fmt;

use crate::pg::Lsn;

/// 2000-01-01 00:00:00 UTC, the zero of every Postgres timestamp, in Unix microseconds.
pub const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Converts a timestamp as sent (microseconds since 2000-01-01) to Unix microseconds.
///
/// Saturates instead of overflowing: the value came off the wire.
pub fn pg_time_to_unix_micros(t: i64) -> i64 {
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
    pub final_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC, as sent; see [`pg_time_to_unix_micros`].
    pub commit_time: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// Unused by the server so far; kept so a future flag is visible rather than dropped.
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// The position to confirm once this transaction's effects are durable.
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

/// The transaction was replayed from another node, named here.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin<'a> {
    pub commit_lsn: Lsn,
    pub name: &'a str,
}

/// The shape of a table, sent before the first change to it and again after any schema change;
/// tuples that follow are positional against the latest Relation with the same oid.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation<'a> {
    /// Present only inside a streamed transaction.
    pub xid: Option<u32>,
    pub oid: u32,
    pub namespace: &'a str,
    pub name: &'a str,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn<'a>>,
}

/// Decides what an Update or Delete carries about the old row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
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
    pub flags: u8,
    pub name: &'a str,
    pub type_oid: u32,
    pub type_modifier: i32,
}

impl RelationColumn<'_> {
    /// Whether the column is part of the replica identity, i.e. present in 'K' tuples.
    pub fn is_key(&self) -> bool {
        self.flags & COLUMN_FLAG_KEY != 0
    }
}

/// Names a non-built-in column type, since its oid means nothing to the subscriber otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeMessage<'a> {
    pub xid: Option<u32>,
    pub oid: u32,
    pub namespace: &'a str,
    pub name: &'a str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Insert<'a> {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    pub new: TupleData<'a>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Update<'a> {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    /// Old replica identity columns ('K'); sent only when the identity changed.
    pub key: Option<TupleData<'a>>,
    /// Whole old row ('O'); sent only for REPLICA IDENTITY FULL.
    pub old: Option<TupleData<'a>>,
    pub new: TupleData<'a>,
}

/// Exactly one of `key` and `old` is set in anything a server sends; a table with REPLICA
/// IDENTITY NOTHING produces no Delete at all.
#[derive(Debug, Clone, PartialEq)]
pub struct Delete<'a> {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    pub key: Option<TupleData<'a>>,
    pub old: Option<TupleData<'a>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Truncate {
    pub xid: Option<u32>,
    pub options: u8,
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
    pub xid: Option<u32>,
    /// Non-transactional messages arrive on their own, outside Begin/Commit, and are not undone
    /// by a rollback.
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: &'a str,
    pub content: &'a [u8],
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamStart {
    pub xid: u32,
    /// The first segment of this transaction: relation caches keyed by xid start empty.
    pub first_segment: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamCommit {
    pub xid: u32,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

/// Discards a streamed transaction (`subxid == xid`) or only the changes of one of its
/// subtransactions (`subxid != xid`).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamAbort {
    pub xid: u32,
    pub subxid: u32,
    /// Sent only with `streaming 'parallel'` (protocol v4), which walsweep never requests.
    pub abort_lsn: Option<Lsn>,
    pub abort_time: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BeginPrepare<'a> {
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: i64,
    pub xid: u32,
    pub gid: &'a str,
}

/// Body of both Prepare and StreamPrepare.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepare<'a> {
    pub flags: u8,
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: i64,
    pub xid: u32,
    pub gid: &'a str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommitPrepared<'a> {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
    pub xid: u32,
    pub gid: &'a str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RollbackPrepared<'a> {
    pub flags: u8,
    pub prepare_end_lsn: Lsn,
    pub rollback_end_lsn: Lsn,
    pub prepare_time: i64,
    pub rollback_time: i64,
    pub xid: u32,
    pub gid: &'a str,
}

/// One row image, positional against the relation's columns.
#[derive(Debug, Clone, PartialEq)]
pub struct TupleData<'a> {
    pub columns: Vec<TupleValue<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
            namespace: r.cstr("namespace")?,
            name: r.cstr("type name")?,
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
    let namespace = r.cstr("namespace")?;
    let name = r.cstr("relation name")?;
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
            name: r.cstr(field("name"))?,
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
        let start = self.pos;
        let rest = self.rest();
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::MissingNul {
                message: self.message,
                offset: start,
                field: field.into(),
            });
        };
        let bytes = rest.get(..nul).unwrap_or_default();
        let name = std::str::from_utf8(bytes).map_err(|e| DecodeError::InvalidUtf8 {
            message: self.message,
            offset: start.saturating_add(e.valid_up_to()),
            field: field.into(),
        })?;
        self.pos = start.saturating_add(nul).saturating_add(1);
        Ok(name)
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
