//! SCRAM channel binding (`SCRAM-SHA-256-PLUS`, `tls-server-end-point`), set the libpq way
//! with `channel_binding=disable|prefer|require` in the source URL.
//!
//! Binding ties the SCRAM proof to the TLS session's server certificate, so a man in the
//! middle that terminates TLS with another certificate cannot relay the login even when
//! walsweep does not verify certificates (`sslmode=require` without `sslrootcert`).
//!
//! | channel_binding    | SCRAM over TLS, server offers -PLUS | anything else                  |
//! |--------------------|-------------------------------------|--------------------------------|
//! | `disable`          | SCRAM-SHA-256                       | as the server asks             |
//! | `prefer` (default) | SCRAM-SHA-256-PLUS                  | as the server asks             |
//! | `require`          | SCRAM-SHA-256-PLUS                  | refused, naming what to change |
//!
//! The replication connection runs SCRAM itself ([`scram_mechanism`]); the SQL connection's
//! tokio-postgres takes the binding data from its TLS stream, which [`AlreadyTls`] provides
//! for a socket walsweep negotiated already.

use std::any::Any;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use postgres_protocol::authentication::sasl::{self, SCRAM_SHA_256, SCRAM_SHA_256_PLUS};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::config::ChannelBinding as Mode;
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

/// Why `channel_binding=require` refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unbound {
    NotTls,
    /// A certificate signed with an algorithm RFC 5929 gives no hash for (e.g. Ed25519,
    /// RSA-PSS): Postgres cannot bind to it either.
    Unhashable,
    /// SCRAM without the -PLUS variant.
    NoPlus,
    Md5,
    Cleartext,
    /// trust or cert: no exchange at all.
    NoPassword,
    /// The SQL connection's login ended without binding (tokio-postgres does not say how).
    NotBound,
}

/// `channel_binding=require` and a connection that cannot bind.
#[derive(Debug, Clone, thiserror::Error)]
pub struct RequireRefused {
    pub(crate) target: String,
    pub(crate) why: Unbound,
}

impl fmt::Display for RequireRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HBA: &str = "make the user's pg_hba.conf line hostssl ... scram-sha-256 and store \
                           its password as SCRAM (password_encryption = scram-sha-256, then set \
                           the password again)";
        let target = &self.target;
        let (what, fix) = match self.why {
            Unbound::NotTls => (
                format!("the connection to Postgres at {target} is not TLS"),
                "set sslmode=verify-full (or require) in source.url",
            ),
            Unbound::Unhashable => (
                format!(
                    "the certificate of Postgres at {target} is signed with an algorithm \
                     channel binding has no hash for (RFC 5929)"
                ),
                "give the server an RSA or ECDSA certificate",
            ),
            Unbound::NoPlus => (
                format!("Postgres at {target} offers SCRAM-SHA-256 without channel binding"),
                "check that the server is PostgreSQL 11 or later with ssl = on",
            ),
            Unbound::Md5 => (
                format!("Postgres at {target} asked for an MD5 password"),
                HBA,
            ),
            Unbound::Cleartext => (
                format!("Postgres at {target} asked for a cleartext password"),
                HBA,
            ),
            Unbound::NoPassword => (
                format!(
                    "Postgres at {target} let walsweep in without a password (trust or cert in \
                     pg_hba.conf)"
                ),
                HBA,
            ),
            Unbound::NotBound => (
                format!("Postgres at {target} authenticated walsweep without channel binding"),
                HBA,
            ),
        };
        write!(
            f,
            "channel_binding=require in source.url, but {what}, so walsweep cannot log in with \
             SCRAM-SHA-256-PLUS; {fix}, or use channel_binding=prefer"
        )
    }
}

/// What a connection can bind to: the `tls-server-end-point` data of its TLS session, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EndPoint {
    NotTls,
    Unhashable,
    Data(Vec<u8>),
}

impl EndPoint {
    /// The end point of a socket from `replication::open_transport`, looked up by type because
    /// the socket comes boxed as a byte stream.
    pub(crate) fn of(transport: &dyn Any) -> EndPoint {
        type Tls = tokio_rustls::client::TlsStream<TcpStream>;
        let tls = transport
            .downcast_ref::<Box<Tls>>()
            .map(|b| &**b)
            .or_else(|| transport.downcast_ref::<Tls>());
        let Some(tls) = tls else {
            return EndPoint::NotTls;
        };
        match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => certificate_hash(cert).map_or(EndPoint::Unhashable, EndPoint::Data),
            None => EndPoint::Unhashable,
        }
    }

    /// Refuses the connection up front when `mode` requires binding and there is nothing to
    /// bind to; the binding data to use otherwise (`None` with `disable`).
    pub(crate) fn usable(
        self,
        mode: Mode,
        target: &str,
    ) -> Result<Option<Vec<u8>>, RequireRefused> {
        let refused = |why| RequireRefused {
            target: target.to_string(),
            why,
        };
        match (self, mode) {
            (_, Mode::Disable) => Ok(None),
            (EndPoint::Data(data), _) => Ok(Some(data)),
            (EndPoint::NotTls, Mode::Require) => Err(refused(Unbound::NotTls)),
            (EndPoint::Unhashable, Mode::Require) => Err(refused(Unbound::Unhashable)),
            _ => Ok(None),
        }
    }
}

/// The SASL mechanism and SCRAM binding to answer the server's offer with. `binding` is what
/// `EndPoint::usable` returned.
pub(crate) fn scram_mechanism(
    mode: Mode,
    binding: Option<Vec<u8>>,
    offers_plus: bool,
    target: &str,
) -> Result<(&'static str, sasl::ChannelBinding), RequireRefused> {
    match binding {
        Some(data) if offers_plus => Ok((
            SCRAM_SHA_256_PLUS,
            sasl::ChannelBinding::tls_server_end_point(data),
        )),
        _ if mode == Mode::Require => Err(RequireRefused {
            target: target.to_string(),
            why: Unbound::NoPlus,
        }),
        // "y": walsweep could bind but the server did not offer to, which the server checks
        // against what it offered (a stripped -PLUS is a downgrade attack).
        Some(_) => Ok((SCRAM_SHA_256, sasl::ChannelBinding::unrequested())),
        None => Ok((SCRAM_SHA_256, sasl::ChannelBinding::unsupported())),
    }
}

/// The `tls-server-end-point` hash of a DER certificate (RFC 5929 section 4.1): the hash of its
/// signature algorithm, SHA-256 for MD5 and SHA-1; `None` for algorithms without one, as in
/// Postgres.
pub(crate) fn certificate_hash(der: &[u8]) -> Option<Vec<u8>> {
    // DER of the OIDs (1.2.840.113549.1.1.x for RSA, 1.2.840.10045.4.x for ECDSA).
    const RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03];
    let oid = signature_algorithm(der)?;
    let hash: fn(&[u8]) -> Vec<u8> = match oid {
        [rsa @ .., n] if rsa == RSA => match n {
            0x04 | 0x05 | 0x0B => |d| sha2::Sha256::digest(d).to_vec(),
            0x0C => |d| sha2::Sha384::digest(d).to_vec(),
            0x0D => |d| sha2::Sha512::digest(d).to_vec(),
            0x0E => |d| sha2::Sha224::digest(d).to_vec(),
            _ => return None,
        },
        o if o == ECDSA_SHA1 => |d| sha2::Sha256::digest(d).to_vec(),
        [ecdsa @ .., n] if ecdsa == ECDSA_SHA2 => match n {
            0x01 => |d| sha2::Sha224::digest(d).to_vec(),
            0x02 => |d| sha2::Sha256::digest(d).to_vec(),
            0x03 => |d| sha2::Sha384::digest(d).to_vec(),
            0x04 => |d| sha2::Sha512::digest(d).to_vec(),
            _ => return None,
        },
        _ => return None,
    };
    Some(hash(der))
}

/// The OID of `Certificate.signatureAlgorithm`: SEQUENCE { tbsCertificate, SEQUENCE { OID,
/// ... }, ... }.
fn signature_algorithm(der: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let (certificate, _) = der_item(der, SEQUENCE)?;
    let (_, after_tbs) = der_item(certificate, SEQUENCE)?;
    let (algorithm, _) = der_item(after_tbs, SEQUENCE)?;
    Some(der_item(algorithm, OID)?.0)
}

/// Splits a DER item with `tag` off the front of `der`: its contents and what follows.
fn der_item(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = der.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, mut rest) = rest.split_first()?;
    let len = if len < 0x80 {
        usize::from(len)
    } else {
        let octets = usize::from(len & 0x7F);
        if octets == 0 || octets > 4 || rest.len() < octets {
            return None;
        }
        let (bytes, after) = rest.split_at(octets);
        rest = after;
        bytes.iter().fold(0, |n, b| (n << 8) | usize::from(*b))
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// For tokio-postgres on a socket walsweep already negotiated TLS on (`sslnegotiation=direct`
/// makes it call `connect` straight away): no handshake, just the session's binding data.
pub(crate) struct AlreadyTls(pub(crate) Vec<u8>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsConnect<S> for AlreadyTls {
    type Stream = Bound<S>;
    type Error = io::Error;
    type Future = std::future::Ready<Result<Bound<S>, io::Error>>;

    fn connect(self, stream: S) -> Self::Future {
        std::future::ready(Ok(Bound {
            stream,
            end_point: self.0,
        }))
    }
}

/// A TLS socket and its `tls-server-end-point` data.
pub(crate) struct Bound<S> {
    stream: S,
    end_point: Vec<u8>,
}

impl<S> TlsStream for Bound<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::tls_server_end_point(self.end_point.clone())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Bound<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bound<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384};

    fn cert_der(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).expect("key");
        let params = CertificateParams::new(vec!["db.example".to_string()]).expect("params");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn the_end_point_hash_follows_the_signature_algorithm() {
        let der = cert_der(&PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            certificate_hash(&der),
            Some(sha2::Sha256::digest(&der).to_vec())
        );
        let der = cert_der(&PKCS_ECDSA_P384_SHA384);
        let hash = certificate_hash(&der).expect("ECDSA with SHA-384");
        assert_eq!(hash, sha2::Sha384::digest(&der).to_vec());
        assert_eq!(hash.len(), 48);
        assert_eq!(certificate_hash(b"not a certificate"), None);
        assert_eq!(certificate_hash(&der[..der.len() / 2]), None);
    }

    #[test]
    fn require_refuses_what_cannot_bind_and_prefer_falls_back() {
        let t = "h:5432/db";
        let refused = |r: Result<_, RequireRefused>| r.err().map(|e| e.why);
        assert_eq!(
            refused(EndPoint::NotTls.usable(Mode::Require, t)),
            Some(Unbound::NotTls)
        );
        assert_eq!(
            refused(EndPoint::Unhashable.usable(Mode::Require, t)),
            Some(Unbound::Unhashable)
        );
        assert_eq!(EndPoint::NotTls.usable(Mode::Prefer, t).unwrap(), None);
        let data = EndPoint::Data(vec![1; 32]);
        assert_eq!(data.clone().usable(Mode::Disable, t).unwrap(), None);
        assert_eq!(data.usable(Mode::Prefer, t).unwrap(), Some(vec![1; 32]));

        let (mechanism, _) = scram_mechanism(Mode::Prefer, Some(vec![1; 32]), true, t).unwrap();
        assert_eq!(mechanism, SCRAM_SHA_256_PLUS);
        let (mechanism, _) = scram_mechanism(Mode::Prefer, Some(vec![1; 32]), false, t).unwrap();
        assert_eq!(mechanism, SCRAM_SHA_256);
        let (mechanism, _) = scram_mechanism(Mode::Prefer, None, true, t).unwrap();
        assert_eq!(mechanism, SCRAM_SHA_256);
        let Err(err) = scram_mechanism(Mode::Require, Some(vec![1; 32]), false, t) else {
            panic!("require accepted a server without SCRAM-SHA-256-PLUS");
        };
        assert_eq!(err.why, Unbound::NoPlus);
        let text = err.to_string();
        for needle in ["channel_binding=require", "SCRAM-SHA-256-PLUS", t, "prefer"] {
            assert!(text.contains(needle), "{needle:?} missing from {text}");
        }
    }
}
