//! Where and as whom both Postgres connections (replication and catalog SQL) connect: the
//! resolved connection settings, libpq's host list with `target_session_attrs`, the password
//! (given, or from the password file for the host actually tried), and the socket with TLS.
//!
//! As libpq does, hosts are tried in order; one that cannot be reached, refuses the login, or
//! (with `target_session_attrs=read-write`) is read-only is skipped for the next, so a list of
//! all the cluster's nodes finds the primary after a failover. Whether a server is read-only
//! comes from the `in_hot_standby` and `default_transaction_read_only` it reports at startup
//! (Postgres 14+), else from `SHOW transaction_read_only`.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_postgres::config::{Host, TargetSessionAttrs};

use super::pgpass;
use super::replication::{ReplicationError, Transport};
use super::tls::{self, Negotiated, TlsSettings};
use crate::telemetry::log::display_chain;

pub(crate) const DEFAULT_PORT: u16 = 5432;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as whom to connect: the source URL (or key=value string) with the libpq
/// environment filled in (see `config::libpq`). Holds the password, so it is not `Debug`.
#[derive(Clone)]
pub struct ConnectParams {
    /// Everything but the TLS parameters (tokio-postgres rejects most of those).
    pub config: tokio_postgres::Config,
    pub application_name: String,
    /// `sslmode`, `sslrootcert`, `sslcert`, `sslkey`: used by both connections.
    pub tls: TlsSettings,
    /// The password file to look the password up in when `config` has none.
    pub passfile: Option<PathBuf>,
}

/// One host of the list, with its port.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) host: Host,
    pub(crate) port: u16,
}

impl Endpoint {
    fn host_text(&self) -> String {
        match &self.host {
            Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            Host::Unix(p) => p.display().to_string(),
        }
    }
}

/// What a connection attempt to one host came to.
pub(crate) enum Attempt<T> {
    Accepted(T),
    /// Connected, but the session is not what `target_session_attrs` asks for.
    WrongSession {
        read_only: bool,
    },
}

impl ConnectParams {
    pub(crate) fn user(&self) -> String {
        self.config
            .get_user()
            .map(str::to_owned)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".into())
    }

    pub(crate) fn dbname(&self) -> String {
        self.config
            .get_dbname()
            .map(str::to_owned)
            .unwrap_or_else(|| self.user())
    }

    /// The hosts to try, in order, each with its port: one port for all hosts, or one each.
    pub(crate) fn endpoints(&self) -> Result<Vec<Endpoint>, String> {
        let hosts = match self.config.get_hosts() {
            [] => vec![Host::Tcp("localhost".into())],
            hosts => hosts.to_vec(),
        };
        let ports = self.config.get_ports();
        let port_of = |i: usize| match ports {
            [] => Ok(DEFAULT_PORT),
            [port] => Ok(*port),
            ports if ports.len() == hosts.len() => Ok(ports[i]),
            ports => Err(format!(
                "{} hosts but {} ports; give one port for all hosts or one per host",
                hosts.len(),
                ports.len()
            )),
        };
        hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                Ok(Endpoint {
                    host: host.clone(),
                    port: port_of(i)?,
                })
            })
            .collect()
    }

    /// `host:port[,host:port...]/database` for messages; never includes the password.
    pub(crate) fn target(&self) -> String {
        let hosts = match self.endpoints() {
            Ok(endpoints) => endpoints
                .iter()
                .map(|e| format!("{}:{}", e.host_text(), e.port))
                .collect::<Vec<_>>()
                .join(","),
            Err(_) => "(invalid host list)".into(),
        };
        format!("{hosts}/{}", self.dbname())
    }

    /// `host:port/database` of one endpoint, for messages.
    pub(crate) fn target_of(&self, endpoint: &Endpoint) -> String {
        format!(
            "{}:{}/{}",
            endpoint.host_text(),
            endpoint.port,
            self.dbname()
        )
    }

    /// The password for `endpoint`: the one given (URL or `PGPASSWORD`), else the password
    /// file's line for this host, port, database and user. A password file libpq would
    /// ignore is ignored with a warning.
    pub(crate) fn password_for(&self, endpoint: &Endpoint) -> Option<Vec<u8>> {
        if let Some(password) = self.config.get_password() {
            return Some(password.to_vec());
        }
        let path = self.passfile.as_deref()?;
        let host = endpoint.host_text();
        let user = self.user();
        let database = self.dbname();
        let target = pgpass::Target {
            host: &host,
            is_unix_socket: !matches!(endpoint.host, Host::Tcp(_)),
            port: endpoint.port,
            database: &database,
            user: &user,
        };
        match pgpass::lookup(path, &target) {
            Ok(password) => password.map(String::into_bytes),
            Err(ignored) => {
                tracing::warn!("{ignored}");
                None
            }
        }
    }

    /// Where a password could come from, for when the server asks and there is none.
    pub(crate) fn no_password_hint(&self) -> String {
        let file = match &self.passfile {
            Some(path) => format!(
                "a line for this server in the password file {}",
                path.display()
            ),
            None => "a password file (PGPASSFILE)".into(),
        };
        format!("put it in the source URL (or WALSWEEP_SOURCE_URL), set PGPASSWORD, or add {file}")
    }

    /// Whether a session that is (or is not) read-only is what `target_session_attrs` asks for.
    pub(crate) fn accepts(&self, read_only: bool) -> bool {
        match self.config.get_target_session_attrs() {
            TargetSessionAttrs::ReadWrite => !read_only,
            TargetSessionAttrs::ReadOnly => read_only,
            _ => true,
        }
    }

    /// Whether the session's read-only-ness matters (so it must be found out).
    pub(crate) fn checks_session(&self) -> bool {
        !matches!(
            self.config.get_target_session_attrs(),
            TargetSessionAttrs::Any
        )
    }

    fn wanted_session(&self) -> &'static str {
        match self.config.get_target_session_attrs() {
            TargetSessionAttrs::ReadOnly => "read-only",
            _ => "read-write",
        }
    }
}

/// Read-only-ness from the parameters the server reported at startup, when it reports both
/// (Postgres 14+); `None` means ask with `SHOW transaction_read_only`.
pub(crate) fn reported_read_only<'a>(parameter: impl Fn(&str) -> Option<&'a str>) -> Option<bool> {
    let hot_standby = parameter("in_hot_standby")?;
    let default_read_only = parameter("default_transaction_read_only")?;
    Some(hot_standby == "on" || default_read_only == "on")
}

/// Tries `attempt` on each host in order and returns the first accepted connection. A failed
/// host is logged and the next one tried. When none is left: `NoSuitableHost` if some host
/// was reachable but the wrong kind (a failover may be under way, so it is worth retrying),
/// else the last host's error unchanged (so a single host behaves as if there were no list).
pub(crate) async fn first_acceptable<T, E, F, Fut>(
    params: &ConnectParams,
    mut attempt: F,
) -> Result<T, E>
where
    F: FnMut(Endpoint) -> Fut,
    Fut: Future<Output = Result<Attempt<T>, E>>,
    E: From<ReplicationError> + std::error::Error + 'static,
{
    let endpoints = params.endpoints().map_err(ReplicationError::Unsupported)?;
    let count = endpoints.len();
    let mut tried = Vec::new();
    let mut wrong_session = false;
    let mut last_error = None;
    for (i, endpoint) in endpoints.into_iter().enumerate() {
        let target = params.target_of(&endpoint);
        let more = i + 1 < count;
        match attempt(endpoint).await {
            Ok(Attempt::Accepted(conn)) => return Ok(conn),
            Ok(Attempt::WrongSession { read_only }) => {
                let what = if read_only { "read-only" } else { "read-write" };
                tracing::warn!(
                    "skipping Postgres at {target}: the server is {what}, and \
                     target_session_attrs={} asks for the other",
                    params.wanted_session()
                );
                tried.push(format!("{target} is {what}"));
                wrong_session = true;
            }
            Err(err) => {
                let text = display_chain(&err);
                if more {
                    tracing::warn!("cannot use Postgres at {target}, trying the next host: {text}");
                }
                tried.push(format!("{target}: {text}"));
                last_error = Some(err);
            }
        }
    }
    match last_error {
        Some(err) if !wrong_session => Err(err),
        _ => Err(ReplicationError::NoSuitableHost {
            wanted: params.wanted_session(),
            tried: tried.join("; "),
        }
        .into()),
    }
}

/// Connects to `endpoint` and negotiates TLS as `params.tls` says (TCP only: Unix sockets
/// never use TLS, as with libpq). Both connections open their socket here, so they always
/// agree on TLS.
pub(crate) async fn open_transport(
    params: &ConnectParams,
    endpoint: &Endpoint,
) -> Result<Box<dyn Transport>, ReplicationError> {
    let port = endpoint.port;
    let timeout = params
        .config
        .get_connect_timeout()
        .copied()
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let target = params.target_of(endpoint);
    let connect_err = |source: io::Error| ReplicationError::Connect {
        target: target.clone(),
        source,
    };
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
    match &endpoint.host {
        Host::Tcp(h) => {
            let stream = tokio::time::timeout(timeout, TcpStream::connect((h.as_str(), port)))
                .await
                .map_err(|_| connect_err(timed_out()))?
                .map_err(connect_err)?;
            stream.set_nodelay(true).map_err(connect_err)?;
            let negotiation = params.config.get_ssl_negotiation();
            // A server that accepts the connection but never answers must not hang us either.
            let negotiated = tokio::time::timeout(
                timeout,
                tls::negotiate(stream, &params.tls, negotiation, h, &target),
            )
            .await
            .map_err(|_| {
                connect_err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS negotiation timed out",
                ))
            })??;
            Ok(match negotiated {
                Negotiated::Plain(stream) => Box::new(stream),
                Negotiated::Tls(stream) => Box::new(stream),
            })
        }
        #[cfg(unix)]
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let stream = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path))
                .await
                .map_err(|_| connect_err(timed_out()))?
                .map_err(connect_err)?;
            Ok(Box::new(stream))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(conninfo: &str) -> ConnectParams {
        ConnectParams {
            config: conninfo.parse().unwrap(),
            application_name: "t".into(),
            tls: TlsSettings::default(),
            passfile: None,
        }
    }

    #[test]
    fn each_host_gets_the_shared_port_or_its_own() {
        let p = params("postgres://u@a,b:5433/db");
        let targets: Vec<_> = p
            .endpoints()
            .unwrap()
            .iter()
            .map(|e| p.target_of(e))
            .collect();
        assert_eq!(targets, ["a:5432/db", "b:5433/db"]);
        let p = params("host=a,b port=6000 dbname=db user=u");
        assert_eq!(p.target(), "a:6000,b:6000/db");
        let p = params("host=a,b,c port=1,2 dbname=db user=u");
        let err = p.endpoints().unwrap_err();
        assert!(err.contains("3 hosts but 2 ports"), "{err}");
        assert_eq!(params("user=u dbname=d").target(), "localhost:5432/d");
    }

    #[test]
    fn read_only_comes_from_the_reported_parameters_when_both_are_there() {
        let reported = |pairs: &'static [(&'static str, &'static str)]| {
            reported_read_only(move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v))
        };
        assert_eq!(
            reported(&[
                ("in_hot_standby", "off"),
                ("default_transaction_read_only", "off")
            ]),
            Some(false)
        );
        assert_eq!(
            reported(&[
                ("in_hot_standby", "on"),
                ("default_transaction_read_only", "off")
            ]),
            Some(true)
        );
        assert_eq!(
            reported(&[
                ("in_hot_standby", "off"),
                ("default_transaction_read_only", "on")
            ]),
            Some(true)
        );
        assert_eq!(reported(&[("default_transaction_read_only", "off")]), None);
    }

    #[test]
    fn target_session_attrs_decides_what_is_accepted() {
        let any = params("host=a user=u");
        assert!(!any.checks_session() && any.accepts(true) && any.accepts(false));
        let rw = params("host=a user=u target_session_attrs=read-write");
        assert!(rw.checks_session() && !rw.accepts(true) && rw.accepts(false));
    }

    #[test]
    fn the_password_file_is_consulted_only_without_a_given_password() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "b:5432:db:u:from-file\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut p = params("postgres://u@a,b/db");
        p.passfile = Some(path);
        let endpoints = p.endpoints().unwrap();
        // The line names the second host only: the match uses the host actually tried.
        assert_eq!(p.password_for(&endpoints[0]), None);
        assert_eq!(
            p.password_for(&endpoints[1]).as_deref(),
            Some(&b"from-file"[..])
        );
        p.config.password("given");
        assert_eq!(
            p.password_for(&endpoints[1]).as_deref(),
            Some(&b"given"[..])
        );
    }
}
