//! Ordinary SQL against the source database (over tokio-postgres): server facts, slot and
//! publication state, and creating the publication when configured to.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::{ChannelBinding, SslMode, SslNegotiation};
use tokio_postgres::{Client, Connection, NoTls};

use super::channel_binding::{AlreadyTls, EndPoint, RequireRefused, Unbound};
use super::connect::{self, open_transport, Attempt};
use super::replication::{quote_ident, ConnectParams, ReplicationError, Transport};
use super::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Connecting or TLS negotiation failed (the same code as the replication connection's).
    #[error("cannot open a SQL connection to {target}")]
    Open {
        target: String,
        #[source]
        source: Box<ReplicationError>,
    },
    #[error("cannot open a SQL connection to {target}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The server asked for a password and none was given anywhere.
    #[error(
        "cannot open a SQL connection to {target}: the server asks for a password for user \
         {user:?} and none was given; {hint}"
    )]
    NoPassword {
        target: String,
        user: String,
        hint: String,
    },
    /// No host of a list would do (see `ReplicationError::NoSuitableHost`).
    #[error("cannot open a SQL connection")]
    NoHost(#[source] Box<ReplicationError>),
    #[error("catalog query failed: {what}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl CatalogError {
    /// Connection trouble passes; a missing database, a refused login or a failing query
    /// (permissions, missing objects) does not.
    pub fn is_retryable(&self) -> bool {
        match self {
            CatalogError::Open { source, .. } => source.is_retryable(),
            CatalogError::Connect { source, .. } => match source.as_db_error() {
                Some(db) => super::replication::is_retryable_sqlstate(db.code().code()),
                None => true,
            },
            CatalogError::Query { source, .. } => source.is_closed(),
            CatalogError::NoPassword { .. } => false,
            CatalogError::NoHost(source) => source.is_retryable(),
        }
    }
}

impl From<ReplicationError> for CatalogError {
    fn from(source: ReplicationError) -> Self {
        CatalogError::NoHost(Box::new(source))
    }
}

/// Opens a SQL connection and drives it on a background task, on the first host of the list
/// that is up and the kind `target_session_attrs` asks for. The socket, and TLS as
/// `params.tls` says, come from `connect::open_transport`, as for the replication connection,
/// so both reach hosts the same way; tokio-postgres runs the protocol on top without
/// negotiating again, and binds SCRAM to the TLS session as `channel_binding` says.
pub async fn connect(params: &ConnectParams) -> Result<Client, CatalogError> {
    connect::first_acceptable(params, |endpoint| async move {
        let target = params.target_of(&endpoint);
        let mut config = params.config.clone();
        config.application_name(format!("{}-catalog", params.application_name));
        config.user(params.user());
        config.dbname(params.dbname());
        // tokio-postgres asks for the password only up front: give it the one the password
        // file has for this host, if any.
        let password = params.password_for(&endpoint);
        if let Some(password) = &password {
            config.password(password.clone());
        }
        let open_err = |source: ReplicationError| CatalogError::Open {
            target: target.clone(),
            source: Box::new(source),
        };
        let transport = open_transport(params, &endpoint).await.map_err(open_err)?;
        let mode = config.get_channel_binding();
        let binding = EndPoint::of(Transport::as_any(&*transport))
            .usable(mode, &target)
            .map_err(|e| open_err(e.into()))?;
        let connected = match binding {
            // tokio-postgres binds only on a TLS stream: hand it the negotiated socket as one,
            // with direct negotiation so it sends no second SSLRequest.
            Some(end_point) => {
                config
                    .ssl_mode(SslMode::Require)
                    .ssl_negotiation(SslNegotiation::Direct);
                spawn(config.connect_raw(transport, AlreadyTls(end_point)).await)
            }
            None => {
                config.ssl_mode(SslMode::Disable);
                spawn(config.connect_raw(transport, NoTls).await)
            }
        };
        let (client, reported) = match connected {
            Ok(connected) => connected,
            // tokio-postgres says only "password missing" (an error without a kind to match);
            // say where one could come from.
            Err(source)
                if password.is_none()
                    && source.as_db_error().is_none()
                    && crate::telemetry::log::display_chain(&source)
                        .contains("password missing") =>
            {
                return Err(CatalogError::NoPassword {
                    target,
                    user: params.user(),
                    hint: params.no_password_hint(),
                })
            }
            // tokio-postgres refuses a login without binding under require, saying only that.
            Err(source) if mode == ChannelBinding::Require && source.as_db_error().is_none() => {
                return Err(open_err(
                    RequireRefused {
                        target: target.clone(),
                        why: Unbound::NotBound,
                    }
                    .into(),
                ))
            }
            Err(source) => return Err(CatalogError::Connect { target, source }),
        };
        if !params.checks_session() {
            return Ok(Attempt::Accepted(client));
        }
        let read_only = match reported {
            Some(read_only) => read_only,
            None => {
                let row = client
                    .query_one("SHOW transaction_read_only", &[])
                    .await
                    .map_err(query_err("reading transaction_read_only"))?;
                row.get::<_, String>(0) == "on"
            }
        };
        Ok(if params.accepts(read_only) {
            Attempt::Accepted(client)
        } else {
            Attempt::WrongSession { read_only }
        })
    })
    .await
}

/// Drives a connected client's connection on a background task; returns the client and
/// whether the server reported itself read-only at login (`None`: it did not say).
fn spawn<S, T>(
    connected: Result<(Client, Connection<S, T>), tokio_postgres::Error>,
) -> Result<(Client, Option<bool>), tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = connected?;
    let reported = connect::reported_read_only(|name| connection.parameter(name));
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "catalog connection ended");
        }
    });
    Ok((client, reported))
}

fn query_err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> CatalogError {
    move |source| CatalogError::Query { what, source }
}

/// What `pg_replication_slots` says about one slot.
#[derive(Debug, Clone)]
pub(crate) struct SlotState {
    pub(crate) plugin: Option<String>,
    pub(crate) active: bool,
    pub(crate) active_pid: Option<i32>,
    pub(crate) confirmed_flush_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost` (PG13+).
    pub(crate) wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is at risk of being lost
    /// (`max_slot_wal_keep_size`); `None` when unlimited.
    pub(crate) safe_wal_size: Option<i64>,
    /// Whether standbys that sync slots keep a copy (Postgres 17+; `None` before).
    pub(crate) failover: Option<bool>,
}

pub async fn wal_level(client: &Client) -> Result<String, CatalogError> {
    let row = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(query_err("reading wal_level"))?;
    Ok(row.get(0))
}

pub(crate) async fn slot_state(
    client: &Client,
    slot: &str,
) -> Result<Option<SlotState>, CatalogError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, active, active_pid, \
                    confirmed_flush_lsn::text, restart_lsn::text, wal_status, safe_wal_size, \
                    (to_jsonb(s) ->> 'failover')::bool \
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query_err("reading pg_replication_slots"))?;
    Ok(row.map(|r| SlotState {
        plugin: r.get(0),
        active: r.get(3),
        active_pid: r.get(4),
        confirmed_flush_lsn: r.get::<_, Option<String>>(5).and_then(|t| t.parse().ok()),
        wal_status: r.get(7),
        safe_wal_size: r.get(8),
        failover: r.get(9),
    }))
}

pub(crate) async fn publication_exists(
    client: &Client,
    publication: &str,
) -> Result<bool, CatalogError> {
    let row = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query_err("reading pg_publication"))?;
    Ok(row.is_some())
}

/// `CREATE PUBLICATION` for the given tables (`schema.table`, already validated names).
pub(crate) async fn create_publication(
    client: &Client,
    publication: &str,
    tables: &[String],
) -> Result<(), CatalogError> {
    let sql = create_publication_sql(publication, tables);
    client
        .batch_execute(&sql)
        .await
        .map_err(query_err("creating the publication"))
}

pub(crate) fn create_publication_sql(publication: &str, tables: &[String]) -> String {
    let list = tables
        .iter()
        .map(|t| qualified_ident(t))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "CREATE PUBLICATION {} FOR TABLE {list}",
        quote_ident(publication)
    )
}

/// `public.articles` -> `"public"."articles"`; a bare name is taken as `public`.
pub(crate) fn qualified_ident(name: &str) -> String {
    let (schema, table) = split_table_name(name);
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

pub(crate) fn split_table_name(name: &str) -> (&str, &str) {
    name.split_once('.').unwrap_or(("public", name))
}

pub(crate) async fn drop_slot(client: &Client, slot: &str) -> Result<(), CatalogError> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(query_err("dropping the replication slot"))?;
    Ok(())
}

/// Current WAL position of the server (for lag): on a standby, which has no WAL of its own
/// to insert, the position it has replayed (what decoding from it can reach).
pub(crate) async fn current_wal_lsn(client: &Client) -> Result<Lsn, CatalogError> {
    let row = client
        .query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                     ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
        .await
        .map_err(query_err("reading pg_current_wal_lsn()"))?;
    // NULL on a standby that has replayed nothing yet.
    Ok(row
        .get::<_, Option<String>>(0)
        .and_then(|t| t.parse().ok())
        .unwrap_or_default())
}

/// Names of the server's physical slots (the standbys that stream from it through a slot).
pub(crate) async fn physical_slots(client: &Client) -> Result<Vec<String>, CatalogError> {
    let rows = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical' \
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(query_err("reading pg_replication_slots"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// `server_version_num` of the server, e.g. 170004.
pub(crate) async fn server_version_num(client: &Client) -> Result<u32, CatalogError> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(query_err("reading server_version_num"))?;
    Ok(u32::try_from(row.get::<_, i32>(0)).unwrap_or(0))
}
