//! TLS for both Postgres connections (replication and SQL), configured the libpq way.
//!
//! tokio-postgres knows only `sslmode=disable|prefer|require` and rejects `sslrootcert`, so
//! walsweep takes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of the source URL (or
//! key=value string) itself ([`split_conninfo`]) and hands the rest to tokio-postgres. Both
//! connections then open their socket through the same [`negotiate`]: `SSLRequest`, the
//! server's one-byte answer, and a rustls handshake with the verifier the mode asks for.
//!
//! | sslmode            | TLS                     | CA chain checked          | host name checked |
//! |--------------------|-------------------------|---------------------------|-------------------|
//! | `disable`          | never                   | -                         | -                 |
//! | `prefer` (default) | if the server offers it | only with a root cert     | no                |
//! | `require`          | always                  | only with a root cert     | no                |
//! | `verify-ca`        | always                  | yes                       | no                |
//! | `verify-full`      | always                  | yes                       | yes               |
//!
//! The root certificates are, as in libpq: the PEM file `sslrootcert` names; else
//! `~/.postgresql/root.crt` when it exists. Where libpq would then fail, walsweep's `verify-ca`
//! and `verify-full` fall back to the platform trust store (`sslrootcert=system` asks for it
//! explicitly and, as in libpq 16, only with `verify-full`). Without a root certificate,
//! `prefer` and `require` encrypt but do not authenticate the server, exactly like libpq: that
//! stops passive eavesdropping, not an active man in the middle. Use `verify-full`.
//!
//! Unix-domain sockets never use TLS (libpq does not either). A failed handshake with `prefer`
//! is an error, not a silent fallback to plain text. SCRAM over the TLS session binds to the
//! server's certificate as `channel_binding` says (see `channel_binding`).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::SslNegotiation;

/// `sslrootcert` value that selects the platform trust store (libpq 16+).
pub(crate) const SYSTEM_ROOTS: &str = "system";
/// What the server and libpq 17 agree on for ALPN; required with `sslnegotiation=direct`.
const ALPN_POSTGRESQL: &[u8] = b"postgresql";
/// `SSLRequest` answers.
const TLS_ACCEPTED: u8 = b'S';
const TLS_REFUSED: u8 = b'N';

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// libpq's default: TLS when the server offers it.
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub(crate) const ALLOWED: &'static str = "disable, prefer, require, verify-ca, verify-full";

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    pub(crate) fn parse(value: &str) -> Result<SslMode, TlsError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(TlsError::InvalidMode {
                    value: other.to_string(),
                })
            }
        })
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The TLS part of a connection string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// `sslmode`; default `prefer`.
    pub(crate) mode: SslMode,
    /// `sslrootcert`: PEM file of the CA certificates to trust, or `system`.
    pub(crate) root_cert: Option<PathBuf>,
    /// `sslcert`: PEM client certificate (chain), for servers that ask for one.
    pub(crate) client_cert: Option<PathBuf>,
    /// `sslkey`: PEM private key of `sslcert`.
    pub(crate) client_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "sslmode={value:?} is not a valid sslmode; use one of {}",
        SslMode::ALLOWED
    )]
    InvalidMode { value: String },
    #[error("{param} in the source URL is not valid percent-encoded UTF-8")]
    BadParam { param: &'static str },
    #[error(
        "sslcert and sslkey must be given together (the source URL has only {given}); set both \
         for a client certificate, or neither"
    )]
    ClientCertPair { given: &'static str },
    #[error(
        "sslrootcert=system trusts every public CA, so it needs sslmode=verify-full (got \
         sslmode={mode}); use sslmode=verify-full, or set sslrootcert to your CA's PEM file"
    )]
    SystemRootsNeedVerifyFull { mode: SslMode },
    #[error(
        "cannot read {param} {}; fix {param}=... in the source URL or make the file readable by \
         walsweep", path.display()
    )]
    ReadFile {
        param: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{param} {} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
        path.display()
    )]
    NoCertificate { param: &'static str, path: PathBuf },
    #[error("{param} {} is not a usable PEM certificate file", path.display())]
    BadPem {
        param: &'static str,
        path: PathBuf,
        /// The PEM parser's or, for a root, the certificate store's objection.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "sslkey {} holds no usable private key (expected -----BEGIN PRIVATE KEY-----, RSA \
         PRIVATE KEY or EC PRIVATE KEY)", path.display()
    )]
    BadKey {
        path: PathBuf,
        /// None when the file is valid PEM without a key: the message already says so.
        #[source]
        source: Option<pem::Error>,
    },
    #[error(
        "sslcert {} and sslkey {} do not form a usable client certificate",
        cert.display(), key.display()
    )]
    ClientCert {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "no trusted root certificates found in the system trust store; install the \
         ca-certificates package or set sslrootcert=/path/to/ca.pem in the source URL"
    )]
    SystemRoots {
        /// None when the store simply holds nothing.
        #[source]
        source: Option<SystemRootErrors>,
    },
    #[error(
        "Postgres at {target} does not accept TLS connections, but sslmode={mode} requires TLS; \
         set ssl = on (with ssl_cert_file and ssl_key_file) in the server's postgresql.conf, or \
         use sslmode=prefer"
    )]
    ServerRefused { target: String, mode: SslMode },
    #[error("sslnegotiation=direct needs sslmode=require or stricter (got sslmode=prefer)")]
    DirectNeedsRequire,
    #[error(
        "unexpected answer {byte:#04x} from {target} to walsweep's TLS request; is this a \
         Postgres server?"
    )]
    UnexpectedAnswer { target: String, byte: u8 },
    #[error(
        "TLS certificate verification failed for Postgres at {target} (sslmode={mode}): \
         {reason}; {hint}"
    )]
    Verify {
        target: String,
        mode: SslMode,
        reason: String,
        hint: &'static str,
        /// rustls' verdict, or why the host is no name to verify against.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("TLS handshake with Postgres at {target} failed{hint}")]
    Handshake {
        target: String,
        hint: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot set up TLS")]
    Setup(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("TLS negotiation with Postgres at {target} failed")]
    Io {
        target: String,
        #[source]
        source: io::Error,
    },
}

/// Everything that went wrong reading the platform trust store, which may be several
/// independent failures (one per file or directory), so they cannot form one chain.
#[derive(Debug, Clone)]
pub struct SystemRootErrors(Arc<[rustls_native_certs::Error]>);

impl fmt::Display for SystemRootErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SystemRootErrors {}

impl TlsError {
    /// Only a connection that broke mid-negotiation is worth retrying: settings, files,
    /// certificates and a server without TLS stay wrong until a human changes them.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(self, TlsError::Io { .. })
    }
}

/// Splits walsweep's TLS parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) off a
/// `postgres://` URL or a key=value string. Returns them and the connection string without
/// them, for tokio-postgres. Later occurrences win, as in libpq; an empty value means unset.
/// Text that is not a well-formed connection string is returned unchanged, for tokio-postgres
/// to reject. Error messages never contain the string (it may hold a password).
#[cfg(test)]
pub(crate) fn split_conninfo(conninfo: &str) -> Result<(TlsSettings, String), TlsError> {
    let (raw, rest) = split_conninfo_raw(conninfo)?;
    Ok((raw.into_settings()?, rest))
}

/// `split_conninfo` before validation, so values the string leaves out can still come from
/// the libpq environment (`PGSSLMODE`, ...).
pub(crate) fn split_conninfo_raw(conninfo: &str) -> Result<(RawTls, String), TlsError> {
    let mut raw = RawTls::default();
    let rest = if let Some(rest) = split_url(conninfo, &mut raw)? {
        rest
    } else if let Some(rest) = split_key_values(conninfo, &mut raw) {
        rest
    } else {
        return Ok((raw, conninfo.to_string()));
    };
    Ok((raw, rest))
}

/// The TLS parameters as written, `None` where the string has none (or an empty value).
#[derive(Default)]
pub(crate) struct RawTls {
    pub(crate) mode: Option<String>,
    pub(crate) root_cert: Option<String>,
    pub(crate) client_cert: Option<String>,
    pub(crate) client_key: Option<String>,
}

impl RawTls {
    /// Takes `key` if it is one of ours; returns whether it was.
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.root_cert,
            "sslcert" => &mut self.client_cert,
            "sslkey" => &mut self.client_key,
            _ => return false,
        };
        *slot = Some(value).filter(|v| !v.is_empty());
        true
    }

    pub(crate) fn into_settings(self) -> Result<TlsSettings, TlsError> {
        let mode = match &self.mode {
            Some(m) => SslMode::parse(m)?,
            None => SslMode::default(),
        };
        match (&self.client_cert, &self.client_key) {
            (Some(_), None) => return Err(TlsError::ClientCertPair { given: "sslcert" }),
            (None, Some(_)) => return Err(TlsError::ClientCertPair { given: "sslkey" }),
            _ => {}
        }
        Ok(TlsSettings {
            mode,
            root_cert: self.root_cert.map(PathBuf::from),
            client_cert: self.client_cert.map(PathBuf::from),
            client_key: self.client_key.map(PathBuf::from),
        })
    }
}

/// The URL form. Splits where tokio-postgres does: credentials end at the first `@`, the
/// parameters start at the first `?` after them.
fn split_url(url: &str, raw: &mut RawTls) -> Result<Option<String>, TlsError> {
    let Some(scheme_len) = ["postgres://", "postgresql://"]
        .iter()
        .find(|p| url.starts_with(*p))
        .map(|p| p.len())
    else {
        return Ok(None);
    };
    let after_creds = url[scheme_len..]
        .find('@')
        .map_or(scheme_len, |at| scheme_len + at + 1);
    let Some(q) = url[after_creds..].find('?').map(|q| after_creds + q) else {
        return Ok(Some(url.to_string()));
    };
    let mut kept = Vec::new();
    for pair in url[q + 1..].split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let param = match key {
            "sslmode" => "sslmode",
            "sslrootcert" => "sslrootcert",
            "sslcert" => "sslcert",
            "sslkey" => "sslkey",
            _ => {
                kept.push(pair);
                continue;
            }
        };
        let value = percent_decode(value).ok_or(TlsError::BadParam { param })?;
        raw.take(param, value);
    }
    let mut rest = url[..q].to_string();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok(Some(rest))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The key=value form, tokenized like tokio-postgres (and libpq): `key = value`, values
/// optionally single-quoted, backslash escapes. `None` if it does not tokenize.
fn split_key_values(s: &str, raw: &mut RawTls) -> Option<String> {
    let mut kept: Vec<&str> = Vec::new();
    let mut chars = s.char_indices().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key_end = start;
        while let Some((i, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key_end = i + c.len_utf8();
        }
        let key = &s[start..key_end];
        if key.is_empty() {
            return None;
        }
        skip_ws(&mut chars);
        chars.next_if(|(_, c)| *c == '=')?;
        skip_ws(&mut chars);
        let mut value = String::new();
        let end;
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                let (i, c) = chars.next()?;
                match c {
                    '\'' => {
                        end = i + 1;
                        break;
                    }
                    '\\' => value.push(chars.next()?.1),
                    c => value.push(c),
                }
            }
        } else {
            let mut last = None;
            while let Some((i, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some((j, escaped)) = chars.next() {
                        value.push(escaped);
                        last = Some(j + escaped.len_utf8());
                        continue;
                    }
                }
                value.push(c);
                last = Some(i + c.len_utf8());
            }
            end = last?;
        }
        if !raw.take(key, value) {
            kept.push(&s[start..end]);
        }
    }
    Some(kept.join(" "))
}

/// The platform trust store, read once per process.
fn system_roots() -> Result<Arc<RootCertStore>, TlsError> {
    static ROOTS: std::sync::OnceLock<Result<Arc<RootCertStore>, Option<SystemRootErrors>>> =
        std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                Err((!found.errors.is_empty()).then(|| SystemRootErrors(found.errors.into())))
            } else {
                Ok(Arc::new(store))
            }
        })
        .clone()
        .map_err(|source| TlsError::SystemRoots { source })
}

/// The provider walsweep's TLS runs on. Also installed as the process default, for the Redis
/// client (which builds its rustls configs with the default provider).
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            // Err: another provider was installed first, which is fine for the Redis client.
            let _ = CryptoProvider::install_default((*provider).clone());
            provider
        })
        .clone()
}

/// libpq's default `sslrootcert`.
fn default_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(Path::new(&home).join(".postgresql").join("root.crt"))
}

/// Where trust comes from, for messages.
#[derive(Debug, Clone)]
enum Trust {
    /// Nothing verified (`prefer`/`require` without a root certificate).
    Nothing,
    File(PathBuf),
    /// libpq's default `~/.postgresql/root.crt`, found.
    DefaultFile(PathBuf),
    /// The platform store: `sslrootcert=system`, or verify-* without any root certificate.
    System {
        explicit: bool,
    },
}

impl fmt::Display for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trust::Nothing => f.write_str("no root certificate"),
            Trust::File(p) => write!(f, "sslrootcert {}", p.display()),
            Trust::DefaultFile(p) => write!(f, "{} (the default sslrootcert)", p.display()),
            Trust::System { explicit: true } => f.write_str("the system trust store"),
            Trust::System { explicit: false } => {
                f.write_str("the system trust store (the source URL sets no sslrootcert)")
            }
        }
    }
}

/// A ready rustls configuration plus what error messages need to know about it.
#[derive(Clone)]
pub(crate) struct Connector {
    config: Arc<ClientConfig>,
    mode: SslMode,
    trust: Trust,
}

impl TlsSettings {
    /// Reads the certificate files and builds the rustls configuration; `None` for
    /// `sslmode=disable`. Run per connection, so rotated files are picked up on reconnect.
    pub(crate) fn connector(&self) -> Result<Option<Connector>, TlsError> {
        if self.mode == SslMode::Disable {
            return Ok(None);
        }
        let provider = crypto_provider();
        let trust = match &self.root_cert {
            Some(p) if p.as_os_str() == SYSTEM_ROOTS => {
                if self.mode != SslMode::VerifyFull {
                    return Err(TlsError::SystemRootsNeedVerifyFull { mode: self.mode });
                }
                Trust::System { explicit: true }
            }
            Some(p) => Trust::File(p.clone()),
            None => match default_root_cert().filter(|p| p.is_file()) {
                Some(p) => Trust::DefaultFile(p),
                None if self.mode.verifies() => Trust::System { explicit: false },
                None => Trust::Nothing,
            },
        };
        let roots = match &trust {
            Trust::Nothing => None,
            Trust::File(p) | Trust::DefaultFile(p) => Some(Arc::new(load_roots(p)?)),
            Trust::System { .. } => Some(system_roots()?),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (roots, self.mode) {
            (Some(roots), SslMode::VerifyFull) => {
                WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| TlsError::Setup(e.into()))?
            }
            (Some(roots), _) => Arc::new(ChainOnly {
                roots,
                provider: provider.clone(),
            }),
            (None, _) => Arc::new(Unverified {
                provider: provider.clone(),
            }),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.into()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = load_certs("sslcert", cert)?;
                let key_der = load_key(key)?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|source| TlsError::ClientCert {
                        cert: cert.clone(),
                        key: key.clone(),
                        source,
                    })?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(Some(Connector {
            config: Arc::new(config),
            mode: self.mode,
            trust,
        }))
    }
}

fn read_file(param: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::ReadFile {
        param,
        path: path.to_path_buf(),
        source,
    })
}

fn load_certs(param: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(param, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            param,
            path: path.to_path_buf(),
            source: e.into(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            param,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in load_certs("sslrootcert", path)? {
        store.add(cert).map_err(|e| TlsError::BadPem {
            param: "sslrootcert",
            path: path.to_path_buf(),
            source: e.into(),
        })?;
    }
    Ok(store)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file("sslkey", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::BadKey {
        path: path.to_path_buf(),
        source: match e {
            pem::Error::NoItemsFound => None,
            other => Some(other),
        },
    })
}

/// verify-ca (and prefer/require with a root certificate): the chain must lead to a trusted
/// root; the host name is not compared.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// prefer/require without a root certificate: any certificate is accepted (libpq's
/// behaviour). The handshake signatures are still checked, so the session is encrypted to
/// whoever holds the presented certificate's key; who that is goes unchecked.
#[derive(Debug)]
struct Unverified {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A socket after negotiation.
pub(crate) enum Negotiated<S> {
    Plain(S),
    Tls(Box<tokio_rustls::client::TlsStream<S>>),
}

/// Runs the TLS negotiation `settings` ask for on a freshly connected TCP `stream` to `host`
/// (the name verify-full checks). `target` (host:port/db) is for messages only.
pub(crate) async fn negotiate<S>(
    mut stream: S,
    settings: &TlsSettings,
    negotiation: SslNegotiation,
    host: &str,
    target: &str,
) -> Result<Negotiated<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(connector) = settings.connector()? else {
        return Ok(Negotiated::Plain(stream));
    };
    let io_err = |source| TlsError::Io {
        target: target.to_string(),
        source,
    };
    if negotiation == SslNegotiation::Direct {
        if settings.mode == SslMode::Prefer {
            return Err(TlsError::DirectNeedsRequire);
        }
    } else {
        let mut request = bytes::BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut request);
        stream.write_all(&request).await.map_err(io_err)?;
        stream.flush().await.map_err(io_err)?;
        // Exactly one byte: anything the server sent after it belongs to the TLS session.
        match stream.read_u8().await.map_err(io_err)? {
            TLS_ACCEPTED => {}
            TLS_REFUSED if settings.mode == SslMode::Prefer => {
                return Ok(Negotiated::Plain(stream))
            }
            TLS_REFUSED => {
                return Err(TlsError::ServerRefused {
                    target: target.to_string(),
                    mode: settings.mode,
                })
            }
            byte => {
                return Err(TlsError::UnexpectedAnswer {
                    target: target.to_string(),
                    byte,
                })
            }
        }
    }
    let server_name = match ServerName::try_from(host.to_string()) {
        Ok(name) => name,
        // Only verify-full compares names; the others need some name for the handshake and
        // an IP address sends no SNI.
        Err(_) if settings.mode != SslMode::VerifyFull => {
            ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
        }
        Err(e) => {
            return Err(TlsError::Verify {
                target: target.to_string(),
                mode: settings.mode,
                reason: format!("host {host:?} is not a valid DNS name or IP address"),
                hint: "connect using a host name or IP address listed in the server \
                       certificate",
                source: e.into(),
            })
        }
    };
    tokio_rustls::TlsConnector::from(connector.config.clone())
        .connect(server_name, stream)
        .await
        .map(|s| Negotiated::Tls(Box::new(s)))
        .map_err(|e| handshake_error(e, &connector, host, target))
}

/// Turns a failed handshake into a message that says what to fix.
fn handshake_error(err: io::Error, connector: &Connector, host: &str, target: &str) -> TlsError {
    let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
    else {
        return TlsError::Io {
            target: target.to_string(),
            source: err,
        };
    };
    let trust = &connector.trust;
    let (reason, hint) = match &tls {
        rustls::Error::InvalidCertificate(cert_err) => match cert_err {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => (
                format!("the server's certificate is not signed by a CA in {trust}"),
                "point sslrootcert at the PEM file of the CA that signed the server's \
                 certificate",
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                (
                    format!("the server's certificate is not valid for host {host:?}"),
                    "connect using a host name or IP address listed in the certificate's \
                     subjectAltName, or use sslmode=verify-ca to check only the CA",
                )
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => (
                "the server's certificate is outside its validity period".to_string(),
                "renew the server's certificate, or check this machine's clock",
            ),
            _ => (
                format!("the server's certificate was rejected, trusting {trust}"),
                "check the server's certificate and sslrootcert",
            ),
        },
        rustls::Error::AlertReceived(_) => {
            return TlsError::Handshake {
                target: target.to_string(),
                hint: if connector.config.client_auth_cert_resolver.has_certs() {
                    "; the server refused it; check that the server trusts the CA of sslcert"
                } else {
                    "; the server refused it; if the server requires a client certificate, set \
                     sslcert and sslkey in the source URL"
                },
                source: tls,
            }
        }
        _ => {
            return TlsError::Handshake {
                target: target.to_string(),
                hint: "",
                source: tls,
            }
        }
    };
    TlsError::Verify {
        target: target.to_string(),
        mode: connector.mode,
        reason,
        hint,
        source: Box::new(tls),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> (TlsSettings, String) {
        split_conninfo(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn url_params_are_taken_and_the_rest_kept() {
        let (tls, rest) = split(
            "postgres://u:p%3Fw@h:5/db?application_name=x&sslmode=verify-full\
             &sslrootcert=%2Ftmp%2Fca%20dir%2Fca.pem&connect_timeout=3",
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert, Some(PathBuf::from("/tmp/ca dir/ca.pem")));
        assert_eq!(
            rest,
            "postgres://u:p%3Fw@h:5/db?application_name=x&connect_timeout=3"
        );
        rest.parse::<tokio_postgres::Config>().unwrap();

        let (tls, rest) = split("postgresql://h/db?sslmode=require&sslcert=/c&sslkey=/k");
        assert_eq!(tls.mode, SslMode::Require);
        assert_eq!(tls.client_cert, Some(PathBuf::from("/c")));
        assert_eq!(tls.client_key, Some(PathBuf::from("/k")));
        assert_eq!(rest, "postgresql://h/db");

        let (tls, rest) = split("postgres://u@h/db");
        assert_eq!(tls, TlsSettings::default());
        assert_eq!(tls.mode, SslMode::Prefer);
        assert_eq!(rest, "postgres://u@h/db");
    }

    #[test]
    fn key_value_params_are_taken_with_quotes_and_escapes() {
        let (tls, rest) = split(
            "host=h  sslmode = verify-ca user='a b' sslrootcert='/x/it\\'s ca.pem' \
             password=s\\ ecret",
        );
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.root_cert, Some(PathBuf::from("/x/it's ca.pem")));
        assert_eq!(rest, "host=h user='a b' password=s\\ ecret");
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_user(), Some("a b"));
        assert_eq!(config.get_password(), Some(&b"s ecret"[..]));
        // Later wins, empty means unset.
        let (tls, _) = split("host=h sslmode=disable sslmode=require sslrootcert=''");
        assert_eq!(tls.mode, SslMode::Require);
        assert_eq!(tls.root_cert, None);
    }

    #[test]
    fn bad_values_name_the_fix_and_not_the_password() {
        for s in [
            "postgres://u:hunter2@h/db?sslmode=verify_full",
            "host=h password=hunter2 sslmode=verify_full",
        ] {
            let err = split_conninfo(s).unwrap_err().to_string();
            assert!(err.contains("\"verify_full\""), "{err}");
            assert!(err.contains(SslMode::ALLOWED), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let err = split_conninfo("postgres://h/db?sslcert=/c")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sslcert and sslkey must be given together"),
            "{err}"
        );
        let err = split_conninfo("postgres://h/db?sslrootcert=%ZZ")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslrootcert"), "{err}");
    }

    #[test]
    fn unreadable_or_unsuitable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let settings = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: Some(missing.clone()),
            ..Default::default()
        };
        let err = settings.connector().err().unwrap();
        let message = err.to_string();
        assert!(
            message.contains(&missing.display().to_string()),
            "{message}"
        );
        assert!(message.contains("cannot read sslrootcert"), "{message}");
        // The OS error is the cause, not part of the message: it shows once, at the end.
        let cause = std::error::Error::source(&err).expect("the read error is the source");
        assert!(!message.contains(&cause.to_string()), "{message}");
        assert!(
            crate::telemetry::log::display_chain(&err).ends_with(&format!(": {cause}")),
            "{}",
            crate::telemetry::log::display_chain(&err)
        );

        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let settings = TlsSettings {
            root_cert: Some(not_pem.clone()),
            ..settings
        };
        let err = settings.connector().err().unwrap().to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");

        let settings = TlsSettings {
            mode: SslMode::Require,
            root_cert: Some(SYSTEM_ROOTS.into()),
            ..Default::default()
        };
        let err = settings.connector().err().unwrap().to_string();
        assert!(err.contains("needs sslmode=verify-full"), "{err}");
    }

    #[test]
    fn disable_builds_nothing_and_retries_only_io() {
        let settings = TlsSettings {
            mode: SslMode::Disable,
            ..Default::default()
        };
        assert!(settings.connector().unwrap().is_none());
        assert!(!TlsError::DirectNeedsRequire.is_retryable());
        assert!(TlsError::Io {
            target: "h".into(),
            source: io::ErrorKind::ConnectionReset.into()
        }
        .is_retryable());
    }
}
