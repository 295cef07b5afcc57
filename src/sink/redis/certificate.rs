//! A Redis server certificate walsweep refuses: a configuration error, not an outage.
//!
//! A wrong `redis.ca_file`, a `rediss://` host the certificate does not name, or an expired
//! certificate fail every handshake the same way until someone changes them, so walsweep stops
//! with what to fix instead of retrying forever. The redis crate hands rustls' verdict over as
//! an I/O error, which is how it is recognised here.

use std::error::Error;
use std::fmt;

use rustls::CertificateError;

/// rustls refused the Redis server's certificate.
#[derive(Debug)]
pub struct CertificateRejected {
    /// `host:port` of the Redis server, when the caller knows it.
    target: Option<String>,
    /// rustls' verdict, e.g. "invalid peer certificate: UnknownIssuer".
    verdict: rustls::Error,
}

impl CertificateRejected {
    /// The rejection inside `err`, if rustls refused the certificate somewhere in its chain.
    pub(crate) fn find(err: &(dyn Error + 'static), target: Option<String>) -> Option<Self> {
        let verdict = rejected_certificate(err)?.clone();
        Some(CertificateRejected { target, verdict })
    }

    fn advice(&self) -> (&'static str, &'static str) {
        let rustls::Error::InvalidCertificate(cert) = &self.verdict else {
            return ("", "check the Redis server's certificate and redis.ca_file");
        };
        match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => (
                "the server's certificate is not signed by a CA walsweep trusts",
                "set redis.ca_file to the PEM file of the CA that signed the Redis server's \
                 certificate (without redis.ca_file only the system trust store is used)",
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                (
                    "the server's certificate does not name the host in redis.url",
                    "use a host name or IP address in the rediss:// URL (redis.url or \
                     WALSWEEP_REDIS_URL) that the certificate's subjectAltName lists",
                )
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => (
                "the server's certificate is outside its validity period",
                "renew the Redis server's certificate, or check this machine's clock",
            ),
            _ => ("", "check the Redis server's certificate and redis.ca_file"),
        }
    }
}

impl fmt::Display for CertificateRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TLS certificate verification failed for Redis")?;
        if let Some(target) = &self.target {
            write!(f, " at {target}")?;
        }
        let (reason, hint) = self.advice();
        write!(f, ": {}", self.verdict)?;
        if !reason.is_empty() {
            write!(f, " ({reason})")?;
        }
        write!(f, "; {hint} (a retry cannot fix a certificate)")
    }
}

impl Error for CertificateRejected {}

/// rustls' certificate verdict in `err`'s chain. Two wrappers hide what they wrap from
/// `source()`: `io::Error` (it displays its payload itself, so its source is the payload's
/// source) and the `Arc` the redis crate keeps its cause in (the chain then sees the `Arc`, not
/// the error in it), so both are opened here.
fn rejected_certificate<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    type Shared = std::sync::Arc<dyn Error + Send + Sync>;
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(tls @ rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>()
        {
            return Some(tls);
        }
        let wrapped: Option<&(dyn Error + 'static)> =
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                io.get_ref().map(|inner| inner as _)
            } else {
                e.downcast_ref::<Shared>().map(|shared| &**shared as _)
            };
        if let Some(found) = wrapped.and_then(rejected_certificate) {
            return Some(found);
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::redis::RedisError;

    fn io_with(err: rustls::Error) -> RedisError {
        RedisError::from(std::io::Error::new(std::io::ErrorKind::InvalidData, err))
    }

    #[test]
    fn a_refused_certificate_is_found_and_names_the_fix() {
        for (cert, says) in [
            (CertificateError::UnknownIssuer, "redis.ca_file"),
            (CertificateError::NotValidForName, "rediss:// URL"),
            (CertificateError::Expired, "renew"),
        ] {
            let err = io_with(rustls::Error::InvalidCertificate(cert));
            let found = CertificateRejected::find(&err, Some("h:6380".into()))
                .expect("the verdict is found through the I/O error");
            let text = found.to_string();
            for needle in ["Redis at h:6380", "invalid peer certificate", says] {
                assert!(text.contains(needle), "{needle:?} missing from {text}");
            }
        }
    }

    #[test]
    fn other_failures_are_not_certificates() {
        for err in [
            RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)),
            io_with(rustls::Error::AlertReceived(
                rustls::AlertDescription::HandshakeFailure,
            )),
        ] {
            assert!(CertificateRejected::find(&err, None).is_none(), "{err}");
        }
    }
}
