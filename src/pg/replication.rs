//! The replication connection: startup with `replication=database`, authentication, replication
//! commands over the simple query protocol, and the CopyBoth stream of `START_REPLICATION`.
//!
//! This is the only place that touches the replication socket. The transport is any
//! `AsyncRead + AsyncWrite` (`Transport`), so TLS can wrap the TCP stream without this module's
//! protocol code changing. Message framing comes from `postgres-protocol`; the replication
//! payloads are decoded by `wire` and `pgoutput`.

use std::collections::HashMap;
use std::fmt;
use std::io;

use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS};
use postgres_protocol::message::backend::{self, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::channel_binding::{self, EndPoint, RequireRefused, Unbound};
use super::connect::{self, open_transport, Attempt, Endpoint};
use super::tls::TlsError;
use super::wire::{self, StandbyStatusUpdate, WireMessage};
use super::Lsn;

const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// Any byte stream the protocol can run over (plain TCP, a Unix socket, or TLS).
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// The concrete stream, for what only a TLS session knows (channel binding data). Call as
    /// `Transport::as_any(&*boxed)`: on the box itself it would be the box.
    fn as_any(&self) -> &dyn std::any::Any;
}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Fields of a server `ErrorResponse` that callers act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub(crate) severity: String,
    pub(crate) sqlstate: String,
    pub(crate) message: String,
    pub(crate) detail: Option<String>,
    pub(crate) hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.sqlstate, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " (detail: {detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot connect to Postgres at {target}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("replication connection I/O failed")]
    Io(#[from] io::Error),
    #[error("Postgres refused")]
    Server(#[source] ServerError),
    #[error("authentication failed for user {user:?}: {reason}")]
    Auth {
        user: String,
        reason: &'static str,
        /// What Postgres or the SCRAM exchange said, when something did.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("unexpected {got} from Postgres while {during}")]
    UnexpectedMessage {
        got: &'static str,
        during: &'static str,
    },
    #[error("Postgres closed the replication connection")]
    Closed,
    #[error("unsupported connection setting: {0}")]
    Unsupported(String),
    #[error(
        "no Postgres server in the source's host list is {wanted} (target_session_attrs): \
         {tried}"
    )]
    NoSuitableHost { wanted: &'static str, tried: String },
    #[error("malformed replication message")]
    Wire(#[from] wire::WireError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    ChannelBinding(#[from] RequireRefused),
}

impl ReplicationError {
    /// Whether reconnecting could help. Configuration, authentication and missing-object errors
    /// will fail the same way every time, so they stop the daemon with their message instead.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplicationError::Connect { .. }
            | ReplicationError::Io(_)
            | ReplicationError::Closed
            | ReplicationError::UnexpectedMessage { .. }
            // During a failover, no node may be the primary for a moment.
            | ReplicationError::NoSuitableHost { .. } => true,
            ReplicationError::Server(e) => is_retryable_sqlstate(&e.sqlstate),
            ReplicationError::Tls(e) => e.is_retryable(),
            ReplicationError::Auth { .. }
            | ReplicationError::ChannelBinding(_)
            | ReplicationError::Unsupported(_)
            | ReplicationError::Wire(_) => false,
        }
    }

    /// A short low-cardinality label for metrics and logs.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ReplicationError::Connect { .. } => "connect",
            ReplicationError::Io(_) => "io",
            ReplicationError::Server(_) => "server",
            ReplicationError::Auth { .. } | ReplicationError::ChannelBinding(_) => "auth",
            ReplicationError::UnexpectedMessage { .. } => "protocol",
            ReplicationError::Closed => "closed",
            ReplicationError::Unsupported(_) => "unsupported",
            ReplicationError::NoSuitableHost { .. } => "no_suitable_host",
            ReplicationError::Wire(_) => "wire",
            ReplicationError::Tls(_) => "tls",
        }
    }
}

pub(crate) fn is_retryable_sqlstate(sqlstate: &str) -> bool {
    // Class 28 (auth), 3D000 (no such database), 42704 (no such slot/publication) and
    // 42501 (insufficient privilege) need a human; 55006 (slot in use by another consumer),
    // 57P01..57P03 (admin shutdown, crash shutdown, cannot connect now), class 08 (connection)
    // and 53 (insufficient resources, e.g. too many walsenders) pass by themselves.
    // Class 22 (data exception, e.g. a value the client encoding cannot hold) repeats on every
    // attempt at the same position.
    !(sqlstate.starts_with("28")
        || sqlstate.starts_with("22")
        || sqlstate == "3D000"
        || sqlstate == "42704"
        || sqlstate == "42501"
        || sqlstate == "42601"
        || sqlstate == "0A000"
        || sqlstate == "55000")
}

fn server_error(body: &backend::ErrorResponseBody) -> ServerError {
    let mut err = ServerError {
        severity: "ERROR".into(),
        sqlstate: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'S' => err.severity = value,
            b'C' => err.sqlstate = value,
            b'M' => err.message = value,
            b'D' => err.detail = Some(value),
            b'H' => err.hint = Some(value),
            _ => {}
        }
    }
    err
}

fn message_name(msg: &Message) -> &'static str {
    match msg {
        Message::AuthenticationOk => "AuthenticationOk",
        Message::AuthenticationCleartextPassword => "AuthenticationCleartextPassword",
        Message::AuthenticationMd5Password(_) => "AuthenticationMD5Password",
        Message::AuthenticationSasl(_) => "AuthenticationSASL",
        Message::AuthenticationSaslContinue(_) => "AuthenticationSASLContinue",
        Message::AuthenticationSaslFinal(_) => "AuthenticationSASLFinal",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NoticeResponse(_) => "NoticeResponse",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "message",
    }
}

/// A backend message, or the CopyBothResponse that `postgres-protocol` does not know.
enum Incoming {
    Message(Message),
    CopyBothResponse,
}

pub use super::connect::ConnectParams;

/// An authenticated replication connection (before `START_REPLICATION`).
pub struct ReplicationConnection {
    transport: Box<dyn Transport>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    parameters: HashMap<String, String>,
}

/// One row of a simple-query result, as text.
pub(crate) type TextRow = Vec<Option<String>>;

impl ReplicationConnection {
    /// Opens the socket and runs startup and authentication, on the first host of the list
    /// that is up and the kind `target_session_attrs` asks for.
    pub async fn connect(params: &ConnectParams) -> Result<Self, ReplicationError> {
        connect::first_acceptable(params, |endpoint| async move {
            let mut conn = Self::connect_to(params, &endpoint).await?;
            if !params.checks_session() {
                return Ok(Attempt::Accepted(conn));
            }
            let read_only = match connect::reported_read_only(|name| conn.parameter(name)) {
                Some(read_only) => read_only,
                None => {
                    let rows = conn.simple_query("SHOW transaction_read_only").await?;
                    rows.first()
                        .and_then(|r| r.first().cloned().flatten())
                        .as_deref()
                        == Some("on")
                }
            };
            Ok(if params.accepts(read_only) {
                Attempt::Accepted(conn)
            } else {
                Attempt::WrongSession { read_only }
            })
        })
        .await
    }

    async fn connect_to(
        params: &ConnectParams,
        endpoint: &Endpoint,
    ) -> Result<Self, ReplicationError> {
        let transport = open_transport(params, endpoint).await?;
        let mut conn = ReplicationConnection {
            transport,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::with_capacity(1024),
            parameters: HashMap::new(),
        };
        conn.startup(params, endpoint).await?;
        // A SQL_ASCII database may hold any bytes; converting them to UTF8 fails the walsender
        // on every attempt. Take the bytes as they are (rules treat invalid UTF-8 explicitly).
        if conn.parameter("server_encoding") == Some("SQL_ASCII") {
            conn.simple_query("SET client_encoding = 'SQL_ASCII'")
                .await?;
        }
        Ok(conn)
    }

    /// A server parameter reported at startup, e.g. `server_version`.
    pub(crate) fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// `server_version_num` derived from the startup parameter `server_version` ("15.4 (Debian...)").
    pub fn server_version_num(&self) -> Option<u32> {
        let text = self.parameter("server_version")?;
        let mut parts = text
            .split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty());
        let major: u32 = parts.next()?.parse().ok()?;
        let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(if major >= 10 {
            major * 10_000 + minor
        } else {
            major * 10_000 + minor * 100
        })
    }

    async fn startup(
        &mut self,
        params: &ConnectParams,
        endpoint: &Endpoint,
    ) -> Result<(), ReplicationError> {
        let user = params.user();
        let dbname = params.dbname();
        // Text values in pgoutput are rendered with the walsender's settings: pin the ones that
        // change how timestamps and floats look, so rules see the same text everywhere.
        let startup = [
            ("user", user.as_str()),
            ("database", dbname.as_str()),
            ("replication", "database"),
            ("application_name", params.application_name.as_str()),
            ("client_encoding", "UTF8"),
            ("TimeZone", "UTC"),
            ("DateStyle", "ISO"),
            ("extra_float_digits", "3"),
            ("IntervalStyle", "postgres"),
            ("bytea_output", "hex"),
        ];
        frontend::startup_message(startup.iter().copied(), &mut self.write_buf)?;
        self.flush().await?;
        self.authenticate(params, endpoint, &user).await?;
        loop {
            match self.read_message().await? {
                Incoming::Message(Message::ParameterStatus(body)) => {
                    let name = body.name().map_err(ReplicationError::Io)?.to_string();
                    let value = body.value().map_err(ReplicationError::Io)?.to_string();
                    self.parameters.insert(name, value);
                }
                Incoming::Message(Message::BackendKeyData(_))
                | Incoming::Message(Message::NoticeResponse(_)) => {}
                Incoming::Message(Message::ReadyForQuery(_)) => return Ok(()),
                Incoming::Message(Message::ErrorResponse(body)) => {
                    return Err(ReplicationError::Server(server_error(&body)))
                }
                other => return Err(unexpected(&other, "starting up")),
            }
        }
    }

    async fn authenticate(
        &mut self,
        params: &ConnectParams,
        endpoint: &Endpoint,
        user: &str,
    ) -> Result<(), ReplicationError> {
        // Looked up only when the server asks, so a trusted login never reads the file.
        let mut password: Option<Option<Vec<u8>>> = None;
        let mut password = || {
            password
                .get_or_insert_with(|| params.password_for(endpoint))
                .clone()
                .ok_or_else(|| ReplicationError::Auth {
                    user: user.to_string(),
                    reason: "the server asks for a password and none was given",
                    source: Some(params.no_password_hint().into()),
                })
        };
        let mode = params.config.get_channel_binding();
        let target = params.target_of(endpoint);
        let binding = EndPoint::of(Transport::as_any(&*self.transport)).usable(mode, &target)?;
        // channel_binding=require accepts only a login that went through SCRAM-SHA-256-PLUS.
        let unbound = |why| -> Result<(), ReplicationError> {
            if mode == tokio_postgres::config::ChannelBinding::Require {
                return Err(RequireRefused {
                    target: target.clone(),
                    why,
                }
                .into());
            }
            Ok(())
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = match self.read_message().await? {
                Incoming::Message(m) => m,
                other => return Err(unexpected(&other, "authenticating")),
            };
            match msg {
                Message::AuthenticationOk => {
                    if scram.is_none() {
                        unbound(Unbound::NoPassword)?;
                    }
                    return Ok(());
                }
                Message::AuthenticationCleartextPassword => {
                    unbound(Unbound::Cleartext)?;
                    let pw = password()?;
                    frontend::password_message(&pw, &mut self.write_buf)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    unbound(Unbound::Md5)?;
                    let pw = password()?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        &pw,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let pw = password()?;
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    let mut has_scram_plus = false;
                    while let Some(m) = mechanisms.next()? {
                        has_scram |= m == SCRAM_SHA_256;
                        has_scram_plus |= m == SCRAM_SHA_256_PLUS;
                    }
                    if !has_scram && !has_scram_plus {
                        return Err(ReplicationError::Auth {
                            user: user.to_string(),
                            reason: "the server offers no SASL mechanism walsweep supports \
                                     (need SCRAM-SHA-256)",
                            source: None,
                        });
                    }
                    let (mechanism, binding) = channel_binding::scram_mechanism(
                        mode,
                        binding.clone(),
                        has_scram_plus,
                        &target,
                    )?;
                    let state = ScramSha256::new(&pw, binding);
                    frontend::sasl_initial_response(
                        mechanism,
                        state.message(),
                        &mut self.write_buf,
                    )?;
                    scram = Some(state);
                    self.flush().await?;
                }
                Message::AuthenticationSaslContinue(body) => {
                    let state = scram.as_mut().ok_or(ReplicationError::UnexpectedMessage {
                        got: "AuthenticationSASLContinue",
                        during: "authenticating without SASL",
                    })?;
                    state
                        .update(body.data())
                        .map_err(|e| ReplicationError::Auth {
                            user: user.to_string(),
                            reason: "SCRAM exchange failed",
                            source: Some(e.into()),
                        })?;
                    frontend::sasl_response(state.message(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let state = scram.as_mut().ok_or(ReplicationError::UnexpectedMessage {
                        got: "AuthenticationSASLFinal",
                        during: "authenticating without SASL",
                    })?;
                    state
                        .finish(body.data())
                        .map_err(|e| ReplicationError::Auth {
                            user: user.to_string(),
                            reason: "server SCRAM signature did not verify",
                            source: Some(e.into()),
                        })?;
                }
                Message::ErrorResponse(body) => {
                    let err = server_error(&body);
                    if err.sqlstate.starts_with("28") {
                        return Err(ReplicationError::Auth {
                            user: user.to_string(),
                            reason: "Postgres rejected the login; check the user and password \
                                     (source URL, PGPASSWORD or the password file) and \
                                     pg_hba.conf",
                            source: Some(err.into()),
                        });
                    }
                    return Err(ReplicationError::Server(err));
                }
                other => {
                    return Err(ReplicationError::UnexpectedMessage {
                        got: message_name(&other),
                        during: "authenticating (unsupported authentication method?)",
                    })
                }
            }
        }
    }

    /// Runs a replication command (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, ...) and
    /// returns its rows as text.
    pub(crate) async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<TextRow>, ReplicationError> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                Incoming::Message(Message::DataRow(row)) => {
                    let buf = row.buffer();
                    let mut ranges = row.ranges();
                    let mut values = Vec::new();
                    while let Some(range) = ranges.next()? {
                        values.push(range.and_then(|r| {
                            buf.get(r).map(|b| String::from_utf8_lossy(b).into_owned())
                        }));
                    }
                    rows.push(values);
                }
                Incoming::Message(Message::ErrorResponse(body)) => {
                    error = Some(server_error(&body));
                }
                Incoming::Message(Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(e) => Err(ReplicationError::Server(e)),
                        None => Ok(rows),
                    };
                }
                Incoming::Message(
                    Message::RowDescription(_)
                    | Message::CommandComplete(_)
                    | Message::EmptyQueryResponse
                    | Message::NoticeResponse(_)
                    | Message::ParameterStatus(_),
                ) => {}
                other => return Err(unexpected(&other, "running a replication command")),
            }
        }
    }

    /// `IDENTIFY_SYSTEM`: returns (systemid, timeline, current WAL position, dbname).
    pub async fn identify_system(&mut self) -> Result<IdentifySystem, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows.first().ok_or(ReplicationError::UnexpectedMessage {
            got: "empty result",
            during: "IDENTIFY_SYSTEM",
        })?;
        let field = |i: usize| row.get(i).cloned().flatten();
        let xlogpos = field(2).and_then(|t| t.parse::<Lsn>().ok()).ok_or(
            ReplicationError::UnexpectedMessage {
                got: "malformed xlogpos",
                during: "IDENTIFY_SYSTEM",
            },
        )?;
        Ok(IdentifySystem {
            system_id: field(0).unwrap_or_default(),
            timeline: field(1).and_then(|t| t.parse().ok()).unwrap_or(0),
            xlogpos,
            dbname: field(3),
        })
    }

    /// `TIMELINE_HISTORY`: the contents of `timeline`'s history file (where each ancestor
    /// timeline ended).
    pub(crate) async fn timeline_history(
        &mut self,
        timeline: u32,
    ) -> Result<String, ReplicationError> {
        let rows = self
            .simple_query(&format!("TIMELINE_HISTORY {timeline}"))
            .await?;
        rows.first()
            .and_then(|row| row.get(1).cloned().flatten())
            .ok_or(ReplicationError::UnexpectedMessage {
                got: "no history file content",
                during: "TIMELINE_HISTORY",
            })
    }

    /// Creates a pgoutput slot; returns its consistent point. A `failover` slot (Postgres 17+)
    /// is synchronized to standbys that sync slots, so it survives their promotion.
    pub(crate) async fn create_slot(
        &mut self,
        slot: &str,
        failover: bool,
    ) -> Result<Lsn, ReplicationError> {
        Ok(self
            .create_slot_with(slot, SnapshotAction::Nothing, failover)
            .await?
            .0)
    }

    /// Creates the slot and exports the snapshot it starts from: a transaction on another
    /// connection that runs `SET TRANSACTION SNAPSHOT '<name>'` sees exactly the data the
    /// slot's stream continues from. The snapshot lives until this connection runs its next
    /// command or closes, so keep it idle until the importer has started.
    pub(crate) async fn create_slot_exporting_snapshot(
        &mut self,
        slot: &str,
        failover: bool,
    ) -> Result<(Lsn, String), ReplicationError> {
        let (lsn, snapshot) = self
            .create_slot_with(slot, SnapshotAction::Export, failover)
            .await?;
        let snapshot = snapshot.ok_or(ReplicationError::UnexpectedMessage {
            got: "no snapshot_name",
            during: "CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT",
        })?;
        Ok((lsn, snapshot))
    }

    async fn create_slot_with(
        &mut self,
        slot: &str,
        snapshot: SnapshotAction,
        failover: bool,
    ) -> Result<(Lsn, Option<String>), ReplicationError> {
        let sql = create_slot_command(slot, snapshot, failover);
        let rows = self.simple_query(&sql).await?;
        let row = rows.first();
        let lsn = row
            .and_then(|r| r.get(1).cloned().flatten())
            .and_then(|t| t.parse::<Lsn>().ok())
            .ok_or(ReplicationError::UnexpectedMessage {
                got: "malformed consistent_point",
                during: "CREATE_REPLICATION_SLOT",
            })?;
        Ok((lsn, row.and_then(|r| r.get(2).cloned().flatten())))
    }

    /// `ALTER_REPLICATION_SLOT slot (FAILOVER true)` (Postgres 17+): an existing slot becomes a
    /// failover slot without losing its position.
    pub(crate) async fn make_failover_slot(&mut self, slot: &str) -> Result<(), ReplicationError> {
        self.simple_query(&format!(
            "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
            quote_ident(slot)
        ))
        .await?;
        Ok(())
    }

    /// `START_REPLICATION SLOT ... LOGICAL start (options)`; hands the socket to the stream.
    pub(crate) async fn start_replication(
        mut self,
        slot: &str,
        start_lsn: Lsn,
        options: &[(&str, String)],
    ) -> Result<ReplicationStream, ReplicationError> {
        let opts = options
            .iter()
            .map(|(k, v)| format!("{} {}", quote_ident(k), quote_literal(v)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({})",
            quote_ident(slot),
            start_lsn,
            opts
        );
        frontend::query(&sql, &mut self.write_buf)?;
        self.flush().await?;
        loop {
            match self.read_message().await? {
                Incoming::CopyBothResponse => break,
                Incoming::Message(Message::NoticeResponse(_)) => {}
                Incoming::Message(Message::ErrorResponse(body)) => {
                    return Err(ReplicationError::Server(server_error(&body)))
                }
                other => return Err(unexpected(&other, "starting replication")),
            }
        }
        Ok(ReplicationStream { conn: self })
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.transport.write_all(&self.write_buf).await?;
        self.transport.flush().await?;
        self.write_buf.clear();
        Ok(())
    }

    /// Reads one backend message. Cancel-safe: a partial frame stays in `read_buf`.
    async fn read_message(&mut self) -> Result<Incoming, ReplicationError> {
        loop {
            if let Some(msg) = self.try_parse()? {
                return Ok(msg);
            }
            let n = self.transport.read_buf(&mut self.read_buf).await?;
            if n == 0 {
                return Err(ReplicationError::Closed);
            }
        }
    }

    fn try_parse(&mut self) -> Result<Option<Incoming>, ReplicationError> {
        let Some(header) = backend::Header::parse(&self.read_buf)? else {
            return Ok(None);
        };
        if header.tag() == COPY_BOTH_RESPONSE_TAG {
            let total = header.len() as usize + 1;
            if self.read_buf.len() < total {
                return Ok(None);
            }
            let _ = self.read_buf.split_to(total);
            return Ok(Some(Incoming::CopyBothResponse));
        }
        Ok(Message::parse(&mut self.read_buf)?.map(Incoming::Message))
    }
}

fn unexpected(msg: &Incoming, during: &'static str) -> ReplicationError {
    match msg {
        Incoming::Message(Message::ErrorResponse(body)) => {
            ReplicationError::Server(server_error(body))
        }
        Incoming::Message(m) => ReplicationError::UnexpectedMessage {
            got: message_name(m),
            during,
        },
        Incoming::CopyBothResponse => ReplicationError::UnexpectedMessage {
            got: "CopyBothResponse",
            during,
        },
    }
}

/// Result of `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone)]
pub struct IdentifySystem {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    pub dbname: Option<String>,
}

/// The CopyBoth phase: replication messages in, status updates out.
pub(crate) struct ReplicationStream {
    conn: ReplicationConnection,
}

impl ReplicationStream {
    /// The next `XLogData` or keepalive. Cancel-safe, so it can sit in a `select!` next to timers.
    /// `Ok(None)` means the server ended the stream (CopyDone).
    pub(crate) async fn next(&mut self) -> Result<Option<WireMessage>, ReplicationError> {
        loop {
            let incoming = self.conn.read_message().await?;
            if let Some(item) = Self::stream_item(incoming)? {
                return Ok(item);
            }
        }
    }

    /// The next message `next` would return if it is already read from the socket (`None`
    /// when the buffer holds no whole one): while a backlog drains, a single read brings
    /// hundreds, and taking them without a `select!` per message saves most of the stream
    /// task's overhead.
    pub(crate) fn next_buffered(
        &mut self,
    ) -> Result<Option<Option<WireMessage>>, ReplicationError> {
        while let Some(incoming) = self.conn.try_parse()? {
            if let Some(item) = Self::stream_item(incoming)? {
                return Ok(Some(item));
            }
        }
        Ok(None)
    }

    /// What a backend message means in the CopyBoth phase: a message (`Some(Some)`), the end
    /// of the stream (`Some(None)`), or nothing to pass on (`None`).
    fn stream_item(incoming: Incoming) -> Result<Option<Option<WireMessage>>, ReplicationError> {
        match incoming {
            Incoming::Message(Message::CopyData(body)) => {
                let data: Bytes = body.into_bytes();
                Ok(Some(Some(wire::parse_wire_message(data)?)))
            }
            // The server ends the stream with CopyDone, or (shutting down) goes straight to
            // CommandComplete.
            Incoming::Message(Message::CopyDone)
            | Incoming::Message(Message::CommandComplete(_)) => Ok(Some(None)),
            Incoming::Message(Message::NoticeResponse(_))
            | Incoming::Message(Message::ParameterStatus(_)) => Ok(None),
            other => Err(unexpected(&other, "streaming")),
        }
    }

    pub(crate) async fn send_status(
        &mut self,
        update: &StandbyStatusUpdate,
    ) -> Result<(), ReplicationError> {
        let mut payload = BytesMut::with_capacity(34);
        wire::encode_standby_status_update(update, &mut payload);
        frontend::CopyData::new(&payload[..])?.write(&mut self.conn.write_buf);
        self.conn.flush().await
    }

    /// Ends the stream politely: CopyDone, then Terminate. Errors are ignored because the
    /// connection is being dropped anyway.
    pub(crate) async fn close(mut self) {
        frontend::copy_done(&mut self.conn.write_buf);
        frontend::terminate(&mut self.conn.write_buf);
        let _ = self.conn.flush().await;
    }
}

/// What `CREATE_REPLICATION_SLOT` does with the snapshot the slot starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapshotAction {
    Nothing,
    Export,
}

/// The `CREATE_REPLICATION_SLOT` command. The classic keywords work on every version; the
/// parenthesized options (Postgres 15+) are used only when `FAILOVER` (17+) needs them.
fn create_slot_command(slot: &str, snapshot: SnapshotAction, failover: bool) -> String {
    let slot = quote_ident(slot);
    match (failover, snapshot) {
        (false, SnapshotAction::Nothing) => {
            format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput NOEXPORT_SNAPSHOT")
        }
        (false, SnapshotAction::Export) => {
            format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput EXPORT_SNAPSHOT")
        }
        (true, SnapshotAction::Nothing) => format!(
            "CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT 'nothing', FAILOVER true)"
        ),
        (true, SnapshotAction::Export) => format!(
            "CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)"
        ),
    }
}

/// Quotes an identifier for replication commands, which take identifiers in SQL syntax.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(crate) fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_embedded_quotes() {
        assert_eq!(quote_ident("my\"slot"), "\"my\"\"slot\"");
        assert_eq!(quote_literal("a'b"), "'a''b'");
    }

    #[test]
    fn the_server_error_is_the_source_not_the_message() {
        let err = ReplicationError::Server(ServerError {
            severity: "ERROR".into(),
            sqlstate: "42704".into(),
            message: "replication slot \"s\" does not exist".into(),
            detail: None,
            hint: Some("create it".into()),
        });
        assert_eq!(err.to_string(), "Postgres refused");
        assert_eq!(
            crate::telemetry::log::display_chain(&err),
            "Postgres refused: ERROR 42704: replication slot \"s\" does not exist (hint: create it)"
        );
        assert!(!err.is_retryable());
        assert_eq!(err.kind(), "server");
    }

    #[test]
    fn auth_and_missing_objects_are_not_retried() {
        for code in ["28P01", "28000", "3D000", "42704"] {
            assert!(!is_retryable_sqlstate(code), "{code}");
        }
        for code in ["55006", "57P01", "08006", "53300"] {
            assert!(is_retryable_sqlstate(code), "{code}");
        }
    }
}
