//! Which Redis failures a retry can fix, and what walsweep says about an error raised by one of
//! its scripts.
//!
//! Retried like an outage: I/O errors (but not a refused TLS certificate, see `certificate`),
//! timeouts, dropped connections, and the error replies Redis gives while it cannot serve for
//! now (`TRANSIENT_CODES`). An error raised by a script
//! is none of those: a bug, an argument Redis rejects, a command walsweep's ACL user may not
//! run, a key of another type. Retrying the same batch fails the same way forever, and Redis
//! does not roll back what the script wrote before the error, so walsweep stops instead, with
//! the script, the commit and what to do.

use std::ops::Range;

use ::redis::{ErrorKind, RedisError};

use super::certificate::CertificateRejected;
use crate::pg::Lsn;
use crate::sink::SinkError;
use crate::telemetry::metrics as m;

/// Error codes of replies meaning "not now": a script of another client running (BUSY), the
/// dataset loading after a restart, a replica or a failover in progress, `maxmemory` reached,
/// snapshots failing to save, too few replicas for `min-replicas-to-write`, the script cache
/// flushed by another client between SCRIPT LOAD and EVALSHA, and a cluster's slot moving. Inside a script Redis refuses
/// OOM and READONLY at its first write, so a script failing with them wrote nothing.
const TRANSIENT_CODES: [&str; 12] = [
    "BUSY",
    "LOADING",
    "READONLY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "OOM",
    "MISCONF",
    "NOREPLICAS",
    "NOSCRIPT",
    // A cluster's slot moved (MOVED) or is moving (ASK): the cluster client follows these for
    // single commands but returns them inside a pipeline's replies; the batch is applied again
    // once the client's slot map is fresh (or the migration is over).
    "MOVED",
    "ASK",
];

/// Whether an error a script raised means its hash slot is being migrated to another node: a
/// key the script removed and then wrote again must now be created on the new node, so Redis
/// stops the script. Applied again, the script is redirected there (ASK) and succeeds.
fn moving_slot(details: &str) -> bool {
    details.contains("non local key in a cluster node")
}

/// Whether an error a script raised means the cluster is down for now (a primary failed and
/// its replica has not taken over yet): a script that declares no key (`invalidate_node.lua`)
/// runs on a node that still answers, and Redis refuses the commands inside it.
fn cluster_down(details: &str) -> bool {
    details.contains("while the cluster is down")
}

/// Whether an error reply means "not now" rather than a fault of the request.
fn transient(code: &str, details: &str) -> bool {
    TRANSIENT_CODES.contains(&code) || moving_slot(details) || cluster_down(details)
}

/// Counts the replies of `err` (a pipeline's, or one command's) saying a cluster's hash slot
/// moved or is moving (`walsweep_redis_cluster_redirects_total`).
fn count_cluster_redirects(err: &RedisError) {
    let replies: Vec<(String, String)> = match err.clone().into_server_errors() {
        Some(replies) => replies
            .iter()
            .map(|(_, r)| {
                (
                    r.code().to_string(),
                    r.details().unwrap_or_default().to_string(),
                )
            })
            .collect(),
        None => vec![(
            err.code().unwrap_or_default().to_string(),
            err.detail().unwrap_or_default().to_string(),
        )],
    };
    for (code, details) in replies {
        let reason = match code.as_str() {
            "MOVED" => "moved",
            "ASK" => "ask",
            "TRYAGAIN" => "tryagain",
            "CLUSTERDOWN" => "clusterdown",
            _ if moving_slot(&details) => "migrating",
            _ if cluster_down(&details) => "clusterdown",
            _ => continue,
        };
        m::cluster_redirect(reason);
    }
}

/// The script calls of a round trip: which script, at which positions of the pipeline
/// (counting ignored commands; a single command is position 0).
#[derive(Debug, Clone)]
pub(crate) struct ScriptCalls {
    pub(crate) script: &'static str,
    pub(crate) at: Range<usize>,
}

/// An error raised by a walsweep script in Redis; fatal.
#[derive(Debug)]
pub(crate) struct ScriptError {
    script: &'static str,
    /// The error reply, as Redis sent it.
    reply: String,
    advice: &'static str,
    /// First and last commit LSN of the transactions being applied (none for a reset or a
    /// warm-up load).
    commits: Option<(Lsn, Lsn)>,
}

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} raised an error in Redis", self.script)?;
        match self.commits {
            Some((first, last)) if first == last => write!(f, " at commit {first}")?,
            Some((first, last)) => write!(f, " at commits {first}..{last}")?,
            None => {}
        }
        write!(
            f,
            ": {}. Retrying cannot fix this (it is not an outage), and Redis keeps what the \
             script wrote before the error, so some keys may be half-updated. {}, then restart \
             walsweep",
            self.reply.trim_end_matches('.'),
            self.advice
        )?;
        if let Some((first, _)) = self.commits {
            write!(
                f,
                ": nothing from commit {first} on was confirmed to Postgres, so it applies \
                 those commits again"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ScriptError {}

/// What to do about an error reply, from its code and text.
fn advice(code: &str, reply: &str) -> &'static str {
    if code == "NOPERM" || reply.contains("can't run this command") {
        "walsweep's Redis user may not run a command the script calls (ACL; `ACL LOG` in \
         redis-cli names it): allow every command README.md lists under \"Redis permissions\""
    } else if code == "WRONGTYPE" {
        "a key the script writes holds another type, so another application uses the same \
         name: remove that key, or give walsweep's keys a prefix nothing else uses"
    } else {
        "this is a walsweep bug or a Redis walsweep does not support: report it with this \
         message"
    }
}

/// Whether retrying can fix `err`, for requests that run no script. Error replies count as
/// outages too: the commands are walsweep's own, and a reply refusing them at connection set-up
/// (e.g. `max number of clients reached`) passes.
fn retryable(err: &RedisError) -> bool {
    !matches!(
        err.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
    )
}

pub(crate) fn sink_error(operation: &'static str, err: RedisError) -> SinkError {
    sink_error_at(operation, None, err)
}

/// `sink_error` for a request to Redis at `target` (`host:port`), which a refused certificate
/// names.
pub(crate) fn sink_error_at(
    operation: &'static str,
    target: Option<String>,
    err: RedisError,
) -> SinkError {
    count_cluster_redirects(&err);
    if let Some(rejected) = CertificateRejected::find(&err, target) {
        return SinkError {
            operation,
            retryable: false,
            source: Box::new(rejected),
        };
    }
    SinkError {
        operation,
        retryable: retryable(&err),
        source: Box::new(err),
    }
}

/// Like `sink_error`, for a round trip running `calls`: an error reply to one of them that is
/// not transient is a `ScriptError`.
pub(crate) fn script_sink_error(
    operation: &'static str,
    calls: &ScriptCalls,
    err: RedisError,
) -> SinkError {
    count_cluster_redirects(&err);
    let raised = err.clone().into_server_errors().and_then(|replies| {
        replies
            .iter()
            .find(|(at, reply)| {
                calls.at.contains(at)
                    && !transient(reply.code(), reply.details().unwrap_or_default())
            })
            .map(|(_, reply)| (reply.code().to_string(), reply_text(reply)))
    });
    let Some((code, reply)) = raised else {
        return sink_error(operation, err);
    };
    m::error(m::ERROR_REDIS_SCRIPT);
    SinkError {
        operation,
        retryable: false,
        source: Box::new(ScriptError {
            script: calls.script,
            advice: advice(&code, &reply),
            reply,
            commits: None,
        }),
    }
}

/// `script_sink_error` for one error reply of a script call (a `per_node` pipeline's): fatal
/// unless it means "not now" or a moving slot.
pub(crate) fn script_reply_error(
    operation: &'static str,
    script: &'static str,
    reply: ::redis::ServerError,
) -> SinkError {
    let err = RedisError::from(reply.clone());
    count_cluster_redirects(&err);
    let details = reply.details().unwrap_or_default();
    if transient(reply.code(), details) {
        return SinkError {
            operation,
            retryable: true,
            source: Box::new(err),
        };
    }
    m::error(m::ERROR_REDIS_SCRIPT);
    let text = reply_text(&reply);
    SinkError {
        operation,
        retryable: false,
        source: Box::new(ScriptError {
            script,
            advice: advice(reply.code(), &text),
            reply: text,
            commits: None,
        }),
    }
}

/// An error reply as Redis wrote it: code, then details.
pub(crate) fn reply_text(reply: &::redis::ServerError) -> String {
    match reply.details() {
        Some(details) => format!("{} {details}", reply.code()),
        None => reply.code().to_string(),
    }
}

/// Names the commits being applied in a script error (no-op for any other error).
pub(crate) fn at_commits(mut err: SinkError, first: Lsn, last: Lsn) -> SinkError {
    if let Some(script) = err.source.downcast_mut::<ScriptError>() {
        script.commits = Some((first, last));
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::redis::make_extension_error;

    fn reply(code: &str, detail: &str) -> RedisError {
        make_extension_error(code.into(), Some(detail.into()))
    }

    fn calls() -> ScriptCalls {
        ScriptCalls {
            script: "mirror_rows.lua",
            at: 0..1,
        }
    }

    #[test]
    fn errors_raised_by_a_script_are_fatal_and_say_what_to_do() {
        for (code, detail, says) in [
            (
                "ERR",
                "The user executing the script can't run this command or subcommand script: \
                 abc, on @user_script:164.",
                "ACL",
            ),
            (
                "NOPERM",
                "this user has no permissions to run the 'evalsha' command",
                "ACL",
            ),
            (
                "WRONGTYPE",
                "Operation against a key holding the wrong kind of value",
                "prefix",
            ),
            (
                "ERR",
                "user_script:1: attempt to compare number with nil",
                "bug",
            ),
            ("mirror_rows:", "malformed row header", "bug"),
        ] {
            let err = script_sink_error("write mirrored rows", &calls(), reply(code, detail));
            assert!(!err.is_retryable(), "{code} {detail}");
            let err = at_commits(err, Lsn::from(0x16B_3748), Lsn::from(0x16B_3900));
            let text = err.source.to_string();
            for needle in [
                "mirror_rows.lua",
                detail,
                "at commits 0/16B3748..0/16B3900",
                "from commit 0/16B3748 on",
                says,
            ] {
                assert!(text.contains(needle), "{needle:?} missing from {text}");
            }
        }
    }

    #[test]
    fn replies_meaning_not_now_are_retried() {
        for code in TRANSIENT_CODES {
            let err = script_sink_error("write mirrored rows", &calls(), reply(code, "later"));
            assert!(err.is_retryable(), "{code}");
        }
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(script_sink_error("write mirrored rows", &calls(), io).is_retryable());
        // A cluster slot in migration (the exact reply of Redis 7.0).
        let migrating = reply(
            "ERR",
            "Script attempted to access a non local key in a cluster node script: e3e1, on \
             @user_script:222.",
        );
        assert!(script_sink_error("write mirrored rows", &calls(), migrating).is_retryable());
        // A script declaring no key, on a node that answers while the cluster is down.
        let down = reply(
            "ERR",
            "Script attempted to execute a command while the cluster is down script: bc46, on \
             @user_script:2.",
        );
        assert!(script_sink_error("invalidate", &calls(), down).is_retryable());
    }

    #[test]
    fn an_error_reply_outside_the_script_calls_is_not_blamed_on_the_script() {
        let calls = ScriptCalls {
            script: "invalidate_deps.lua",
            at: 1..2,
        };
        let err = script_sink_error("unlink keys", &calls, reply("ERR", "max clients"));
        assert!(err.is_retryable());
        assert!(err.source.downcast_ref::<ScriptError>().is_none());
    }
}
