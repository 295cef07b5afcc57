//! How the source URL and the libpq environment become the connection settings, the way psql
//! would build them: per setting, a value in the URL (or key=value string) wins over the
//! environment variable, which wins over the default. A password not in the URL comes from
//! `PGPASSWORD`, then from the password file (`PGPASSFILE`, default `~/.pgpass`), which is read
//! per host at connection time (see `pg::pgpass`).
//!
//! The resolution is a pure function of the URL and an environment lookup, so tests never
//! touch the process environment. It also records where each setting came from, for
//! `walsweep check`.

use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::config::{Host, TargetSessionAttrs};

use crate::pg::connect::DEFAULT_PORT;
use crate::pg::replication::ConnectParams;
use crate::pg::tls::{split_conninfo_raw, SslMode, TlsError};

use super::DEFAULT_APPLICATION_NAME;

/// Where one setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The source URL (`source.url` or `WALSWEEP_SOURCE_URL`).
    Url,
    /// `source.application_name` in the file.
    File,
    Env(&'static str),
    Default,
}

impl Origin {
    fn label(&self) -> &'static str {
        match self {
            Origin::Url => "source.url",
            Origin::File => "source.application_name",
            Origin::Env(var) => var,
            Origin::Default => "default",
        }
    }
}

/// The settings and where each came from; never holds the password's value in `origins`.
pub(crate) struct Resolved {
    pub(crate) params: ConnectParams,
    /// `(setting, value as shown, origin)`; the password's value is never shown.
    pub(crate) origins: Vec<(&'static str, String, Origin)>,
}

impl Resolved {
    /// One line for `walsweep check`: each setting with where it came from.
    pub(crate) fn describe(&self) -> String {
        let settings = self
            .origins
            .iter()
            .map(|(name, value, origin)| {
                if value.is_empty() {
                    format!("{name} ({})", origin.label())
                } else {
                    format!("{name} {value} ({})", origin.label())
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!("source: {settings}")
    }
}

/// A problem with a setting: the message names the setting's source and the fix, never the
/// URL (it may hold a password).
#[derive(Debug)]
pub(crate) enum ResolveError {
    Invalid(String),
    Tls(TlsError),
}

/// Builds the connection settings from `url` (None: none configured), the file's
/// `application_name`, and `env` (the process environment, or a map in tests).
pub(crate) fn resolve(
    url: Option<&str>,
    application_name: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Resolved, ResolveError> {
    // An empty variable counts as unset, as an empty URL parameter does.
    let env = |name: &str| env(name).filter(|v| !v.is_empty());
    let (mut raw_tls, rest) = split_conninfo_raw(url.unwrap_or("")).map_err(ResolveError::Tls)?;
    let mut config: tokio_postgres::Config = if rest.trim().is_empty() {
        tokio_postgres::Config::new()
    } else {
        rest.parse().map_err(|_| {
            ResolveError::Invalid(
                "source.url is not a valid Postgres connection string; expected \
                 postgres://user:password@host:port/database"
                    .into(),
            )
        })?
    };
    let mut origins = Vec::new();

    let host_origin = if !config.get_hosts().is_empty() {
        Origin::Url
    } else if let Some(hosts) = env("PGHOST") {
        for host in hosts.split(',') {
            config.host(host.trim());
        }
        Origin::Env("PGHOST")
    } else {
        config.host("localhost");
        Origin::Default
    };
    let hosts = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            Host::Unix(p) => p.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    origins.push(("host", hosts, host_origin));

    let port_origin = if !config.get_ports().is_empty() {
        Origin::Url
    } else if let Some(ports) = env("PGPORT") {
        for port in ports.split(',') {
            let port = port
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    ResolveError::Invalid(format!(
                        "PGPORT={ports:?} is not a port number (or comma-separated list of them); \
                     fix or unset PGPORT"
                    ))
                })?;
            config.port(port);
        }
        Origin::Env("PGPORT")
    } else {
        config.port(DEFAULT_PORT);
        Origin::Default
    };
    let ports = config
        .get_ports()
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    origins.push(("port", ports, port_origin));

    let (user, user_origin) = match (config.get_user(), env("PGUSER")) {
        (Some(user), _) => (user.to_string(), Origin::Url),
        (None, Some(user)) => (user, Origin::Env("PGUSER")),
        // libpq uses the operating-system user name.
        (None, None) => (
            env("USER").unwrap_or_else(|| "postgres".into()),
            Origin::Default,
        ),
    };
    config.user(&user);
    origins.push(("user", user.clone(), user_origin));

    let (dbname, db_origin) = match (config.get_dbname(), env("PGDATABASE")) {
        (Some(db), _) => (db.to_string(), Origin::Url),
        (None, Some(db)) => (db, Origin::Env("PGDATABASE")),
        (None, None) => (user, Origin::Default),
    };
    config.dbname(&dbname);
    origins.push(("database", dbname, db_origin));

    let passfile = env("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|home| PathBuf::from(home).join(".pgpass")));
    if config.get_password().is_some() {
        origins.push(("password", String::new(), Origin::Url));
    } else if let Some(password) = env("PGPASSWORD") {
        config.password(password);
        origins.push(("password", String::new(), Origin::Env("PGPASSWORD")));
    } else {
        let place = match &passfile {
            Some(path) => format!("from password file {}, if it has a line", path.display()),
            None => "none".into(),
        };
        let origin = if env("PGPASSFILE").is_some() {
            Origin::Env("PGPASSFILE")
        } else {
            Origin::Default
        };
        origins.push(("password", place, origin));
    }

    let tls_from_env = |slot: &mut Option<String>, var: &'static str| {
        if slot.is_some() {
            Origin::Url
        } else if let Some(value) = env(var) {
            *slot = Some(value);
            Origin::Env(var)
        } else {
            Origin::Default
        }
    };
    let mode_origin = tls_from_env(&mut raw_tls.mode, "PGSSLMODE");
    let root_origin = tls_from_env(&mut raw_tls.root_cert, "PGSSLROOTCERT");
    tls_from_env(&mut raw_tls.client_cert, "PGSSLCERT");
    tls_from_env(&mut raw_tls.client_key, "PGSSLKEY");
    if let (Origin::Env(var), Some(mode)) = (&mode_origin, &raw_tls.mode) {
        SslMode::parse(mode).map_err(|_| {
            ResolveError::Invalid(format!(
                "{var}={mode:?} is not a valid sslmode; use one of {}, or unset {var}",
                SslMode::ALLOWED
            ))
        })?;
    }
    let root_shown = raw_tls.root_cert.clone().unwrap_or_default();
    let tls = raw_tls.into_settings().map_err(ResolveError::Tls)?;
    origins.push(("sslmode", tls.mode.to_string(), mode_origin));
    if root_origin != Origin::Default {
        origins.push(("sslrootcert", root_shown, root_origin));
    }

    let (app_name, app_origin) = match (
        application_name,
        config.get_application_name(),
        env("PGAPPNAME"),
    ) {
        (Some(name), _, _) => (name.to_string(), Origin::File),
        (None, Some(name), _) => (name.to_string(), Origin::Url),
        (None, None, Some(name)) => (name, Origin::Env("PGAPPNAME")),
        (None, None, None) => (DEFAULT_APPLICATION_NAME.to_string(), Origin::Default),
    };
    origins.push(("application_name", app_name.clone(), app_origin));

    if config.get_connect_timeout().is_none() {
        if let Some(secs) = env("PGCONNECT_TIMEOUT") {
            let secs = secs
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| {
                    ResolveError::Invalid(format!(
                        "PGCONNECT_TIMEOUT={secs:?} is not a positive number of seconds; fix or \
                     unset PGCONNECT_TIMEOUT"
                    ))
                })?;
            // libpq treats anything below 2 seconds as 2.
            config.connect_timeout(Duration::from_secs(secs.max(2)));
        }
    }

    // tokio-postgres reports `any` whether or not the URL said so; only the text can tell.
    if !rest.contains("target_session_attrs") {
        if let Some(attrs) = env("PGTARGETSESSIONATTRS") {
            config.target_session_attrs(match attrs.as_str() {
                "any" => TargetSessionAttrs::Any,
                "read-write" => TargetSessionAttrs::ReadWrite,
                "read-only" => TargetSessionAttrs::ReadOnly,
                other => {
                    return Err(ResolveError::Invalid(format!(
                        "PGTARGETSESSIONATTRS={other:?} is not supported; use any, read-write \
                         or read-only, or unset PGTARGETSESSIONATTRS"
                    )))
                }
            });
        }
    }

    let params = ConnectParams {
        config,
        application_name: app_name,
        tls,
        passfile,
    };
    params.endpoints().map_err(ResolveError::Invalid)?;
    Ok(Resolved { params, origins })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn resolve_ok(url: Option<&str>, pairs: &[(&str, &str)]) -> Resolved {
        match resolve(url, None, &env_of(pairs)) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        }
    }

    fn invalid(url: Option<&str>, pairs: &[(&str, &str)]) -> String {
        match resolve(url, None, &env_of(pairs)) {
            Err(ResolveError::Invalid(msg)) => msg,
            Err(ResolveError::Tls(e)) => panic!("tls error {e}"),
            Ok(_) => panic!("must fail"),
        }
    }

    const FULL_ENV: &[(&str, &str)] = &[
        ("PGHOST", "envhost"),
        ("PGPORT", "6543"),
        ("PGUSER", "envuser"),
        ("PGDATABASE", "envdb"),
        ("PGPASSWORD", "env-secret"),
        ("PGSSLMODE", "require"),
        ("PGSSLROOTCERT", "/env/root.crt"),
        ("PGAPPNAME", "envapp"),
        ("PGPASSFILE", "/env/pgpass"),
        ("HOME", "/home/op"),
    ];

    #[test]
    fn every_setting_can_come_from_the_environment_alone() {
        let r = resolve_ok(None, FULL_ENV);
        let p = &r.params;
        assert_eq!(p.target(), "envhost:6543/envdb");
        assert_eq!(p.user(), "envuser");
        assert_eq!(p.config.get_password(), Some(&b"env-secret"[..]));
        assert_eq!(p.tls.mode, SslMode::Require);
        assert_eq!(p.tls.root_cert, Some(PathBuf::from("/env/root.crt")));
        assert_eq!(p.application_name, "envapp");
        assert_eq!(p.passfile, Some(PathBuf::from("/env/pgpass")));
        let described = r.describe();
        for expected in [
            "host envhost (PGHOST)",
            "port 6543 (PGPORT)",
            "user envuser (PGUSER)",
            "database envdb (PGDATABASE)",
            "password (PGPASSWORD)",
            "sslmode require (PGSSLMODE)",
            "sslrootcert /env/root.crt (PGSSLROOTCERT)",
            "application_name envapp (PGAPPNAME)",
        ] {
            assert!(described.contains(expected), "{expected:?} in {described}");
        }
        assert!(!described.contains("env-secret"), "{described}");
    }

    #[test]
    fn the_url_wins_over_the_environment_setting_by_setting() {
        let url = "postgres://urluser:url-secret@urlhost:7000/urldb?sslmode=disable\
                   &application_name=urlapp";
        let r = resolve_ok(Some(url), FULL_ENV);
        let p = &r.params;
        assert_eq!(p.target(), "urlhost:7000/urldb");
        assert_eq!(p.user(), "urluser");
        assert_eq!(p.config.get_password(), Some(&b"url-secret"[..]));
        assert_eq!(p.tls.mode, SslMode::Disable);
        // Not in the URL: the environment still fills it in.
        assert_eq!(p.tls.root_cert, Some(PathBuf::from("/env/root.crt")));
        assert_eq!(p.application_name, "urlapp");
        let described = r.describe();
        assert!(
            described.contains("user urluser (source.url)"),
            "{described}"
        );
        assert!(described.contains("password (source.url)"), "{described}");
        assert!(!described.contains("url-secret"), "{described}");

        // A URL with only a host: everything else from the environment.
        let r = resolve_ok(Some("host=urlhost"), FULL_ENV);
        assert_eq!(r.params.target(), "urlhost:6543/envdb");
        assert_eq!(r.params.user(), "envuser");

        // The file's application_name beats both.
        let r = resolve(Some(url), Some("fileapp"), &env_of(FULL_ENV)).unwrap_or_else(|e| {
            panic!("{e:?}");
        });
        assert_eq!(r.params.application_name, "fileapp");
    }

    #[test]
    fn defaults_apply_when_nothing_says_otherwise() {
        let r = resolve_ok(None, &[("USER", "osuser"), ("HOME", "/home/op")]);
        let p = &r.params;
        assert_eq!(p.target(), "localhost:5432/osuser");
        assert_eq!(p.user(), "osuser");
        assert_eq!(p.config.get_password(), None);
        assert_eq!(p.passfile, Some(PathBuf::from("/home/op/.pgpass")));
        assert_eq!(p.tls.mode, SslMode::Prefer);
        assert_eq!(p.application_name, DEFAULT_APPLICATION_NAME);
        let described = r.describe();
        assert!(
            described.contains("password from password file /home/op/.pgpass"),
            "{described}"
        );
        // Empty variables count as unset.
        let r = resolve_ok(None, &[("PGHOST", ""), ("PGUSER", ""), ("USER", "osuser")]);
        assert_eq!(r.params.target(), "localhost:5432/osuser");
    }

    #[test]
    fn host_and_port_lists_come_from_the_environment_too() {
        let r = resolve_ok(
            None,
            &[
                ("PGHOST", "a,b"),
                ("PGPORT", "5432,5433"),
                ("PGUSER", "u"),
                ("PGTARGETSESSIONATTRS", "read-write"),
            ],
        );
        assert_eq!(r.params.target(), "a:5432,b:5433/u");
        assert!(r.params.checks_session() && !r.params.accepts(true));
        // The URL's own target_session_attrs wins, even `any`.
        let r = resolve_ok(
            Some("host=a,b user=u target_session_attrs=any"),
            &[("PGTARGETSESSIONATTRS", "read-write")],
        );
        assert!(!r.params.checks_session());
        let r = resolve_ok(
            Some("postgres://u@a,b:5433/db?target_session_attrs=read-write"),
            &[],
        );
        assert_eq!(r.params.target(), "a:5432,b:5433/db");
        assert!(r.params.checks_session());
    }

    #[test]
    fn bad_environment_values_name_the_variable_and_the_fix() {
        let msg = invalid(None, &[("PGPORT", "54x")]);
        assert!(
            msg.contains("PGPORT=\"54x\"") && msg.contains("unset PGPORT"),
            "{msg}"
        );
        let msg = invalid(None, &[("PGSSLMODE", "bogus")]);
        assert!(
            msg.contains("PGSSLMODE=\"bogus\"") && msg.contains("verify-full"),
            "{msg}"
        );
        let msg = invalid(None, &[("PGHOST", "a,b,c"), ("PGPORT", "1,2")]);
        assert!(msg.contains("3 hosts but 2 ports"), "{msg}");
        let msg = invalid(None, &[("PGTARGETSESSIONATTRS", "primary")]);
        assert!(msg.contains("PGTARGETSESSIONATTRS"), "{msg}");
        let msg = invalid(None, &[("PGCONNECT_TIMEOUT", "soon")]);
        assert!(msg.contains("PGCONNECT_TIMEOUT"), "{msg}");
        let msg = invalid(Some("postgres://u:pw-in-url@h:notaport/db"), &[]);
        assert!(!msg.contains("pw-in-url"), "{msg}");
    }
}
