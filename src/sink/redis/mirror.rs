//! Applying mirror ops: rows and their index moves through `scripts/mirror_rows.lua`, in plan
//! order, many rows per atomic call, many calls per pipelined round trip. A `Clear` (TRUNCATE
//! or a table-wide fallback) ends the round trip, so it lands after every op before it and
//! before every op after it.

use std::fmt::Write as _;
use std::sync::LazyLock;

use super::RedisConn;
use ::redis::{Script, Value};

use super::errors::ScriptCalls;
use super::{script_round_trip, RedisSink};
use crate::config::MirrorFormat;
use crate::plan::mirror::plan::{json_document, push_json_name, Field, IndexAdd};
use crate::plan::mirror::MirrorOp;
use crate::sink::SinkError;
use crate::telemetry::metrics as m;

pub(super) static MIRROR_ROWS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/mirror_rows.lua")));

/// Rows per script call: long enough to amortise the call, short enough not to stall Redis.
pub(super) const ROWS_PER_CALL: usize = 100;
/// Script calls per round trip.
const CALLS_PER_ROUND_TRIP: usize = 64;

/// What applying mirror ops did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MirrorApplied {
    pub(crate) written: u64,
    pub(crate) deleted: u64,
    /// `only_if_present` rows that were not cached.
    pub(crate) skipped: u64,
    /// Rows with an unchanged TOAST value and no stored entry, or one without that field, to
    /// take it from: removed.
    pub(crate) incomplete: u64,
    pub(crate) cleared_keys: u64,
    /// Index keys holding another type (someone else's data): left alone.
    pub(crate) wrong_type: u64,
}

impl MirrorApplied {
    /// Adds a `mirror_rows.lua` (or `mirror_index.lua`) reply's counts.
    pub(super) fn add_reply(&mut self, reply: &Value) {
        if let Value::Array(items) = reply {
            let n = |i: usize| match items.get(i) {
                Some(Value::Int(n)) => *n as u64,
                _ => 0,
            };
            self.written += n(0);
            self.deleted += n(1);
            self.skipped += n(2);
            self.incomplete += n(3);
            self.wrong_type += n(4);
        }
    }
}

/// One script call being built.
#[derive(Default)]
pub(super) struct Call {
    pub(super) keys: Vec<String>,
    pub(super) args: Vec<String>,
    pub(super) rows: usize,
}

/// Which part of a row op a call carries: all of it (one node, or every key in one slot), or,
/// on a cluster, only the row at its new key (its index moves and a move across slots are
/// applied apart, `cluster_mirror`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RowPart {
    Whole,
    RowOnly,
}

fn score_arg(score: f64) -> String {
    // Rust prints every finite f64 without an exponent and infinities as inf / -inf, both of
    // which Redis parses exactly.
    format!("{score}")
}

pub(super) fn score_arg_of(score: f64) -> String {
    score_arg(score)
}

pub(super) fn retention_args(add: &IndexAdd, cutoff_unix_secs: i64) -> (String, String) {
    match add.retention {
        None => (String::new(), String::new()),
        Some(r) => {
            let cutoff = cutoff_unix_secs - r.window_seconds as i64;
            let base = if r.base.is_finite() { r.base } else { 0.0 };
            let max = base + cutoff as f64 * r.units_per_second;
            (score_arg(r.base), score_arg(max))
        }
    }
}

/// (name literal, value) pairs for the script to merge, `''` for a kept value.
fn json_fields(fields: &[(std::sync::Arc<str>, Field)]) -> Vec<String> {
    let mut out = Vec::with_capacity(2 * fields.len());
    for (name, field) in fields {
        let mut literal = String::with_capacity(name.len() + 2);
        push_json_name(&mut literal, name);
        out.push(literal);
        out.push(match field {
            Field::Value(v) => v.clone(),
            Field::Null => "null".into(),
            Field::Keep => String::new(),
        });
    }
    out
}

impl Call {
    /// The row header, see `scripts/mirror_rows.lua`.
    fn push_header(&mut self, op: char, fmt: char, flags: [bool; 3], ttl: u64, counts: [usize; 5]) {
        let flag = |f: bool| if f { '1' } else { '0' };
        let [only_if_present, moved, retention] = flags;
        let mut header = String::with_capacity(24);
        header.push(op);
        header.push(fmt);
        header.push(flag(only_if_present));
        header.push(flag(moved));
        header.push(flag(retention));
        let _ = write!(header, ":{ttl}");
        for c in counts {
            let _ = write!(header, ":{c}");
        }
        self.args.push(header);
    }

    pub(super) fn push_row(&mut self, op: &MirrorOp, cutoff_unix_secs: i64, part: RowPart) {
        self.rows += 1;
        let whole = part == RowPart::Whole;
        let none_removed: &[crate::plan::mirror::plan::IndexRemove] = &[];
        let none_added: &[IndexAdd] = &[];
        match op {
            MirrorOp::Delete { key, index_removes } => {
                let index_removes = if whole {
                    &index_removes[..]
                } else {
                    none_removed
                };
                self.push_header('d', 'j', [false; 3], 0, [index_removes.len(), 0, 0, 0, 0]);
                self.keys.push(key.clone());
                for r in index_removes {
                    self.keys.push(r.key.clone());
                    self.args.push(r.member.clone());
                }
            }
            MirrorOp::Write(w) => {
                let keeps: Vec<&str> = w
                    .fields
                    .iter()
                    .filter(|(_, f)| *f == Field::Keep)
                    .map(|(n, _)| &**n)
                    .collect();
                let (fmt, fields, pairs, nulls): (char, Vec<String>, usize, Vec<&str>) =
                    match w.mode.format {
                        // The common case: the whole document, so Redis only stores it.
                        MirrorFormat::Json if keeps.is_empty() => {
                            let document = match &w.document {
                                Some(d) => d.clone(),
                                None => json_document(&w.fields),
                            };
                            ('J', vec![document], 1, Vec::new())
                        }
                        MirrorFormat::Json => {
                            let fields = json_fields(&w.fields);
                            let pairs = fields.len() / 2;
                            ('j', fields, pairs, Vec::new())
                        }
                        MirrorFormat::Hash => {
                            let mut fields = Vec::with_capacity(2 * w.fields.len());
                            let mut nulls = Vec::new();
                            for (name, field) in &w.fields {
                                match field {
                                    Field::Value(v) => {
                                        fields.push(name.to_string());
                                        fields.push(v.clone());
                                    }
                                    Field::Null => nulls.push(&**name),
                                    Field::Keep => {}
                                }
                            }
                            let pairs = fields.len() / 2;
                            ('h', fields, pairs, nulls)
                        }
                    };
                // Only within one slot can a single call move the row (a move across slots is
                // carried over before the call, `cluster_mirror`).
                let moved = w.source != w.key
                    && (whole
                        || super::cluster::slot_of(w.source.as_bytes())
                            == super::cluster::slot_of(w.key.as_bytes()));
                let (index_removes, index_adds) = if whole {
                    (&w.index_removes[..], &w.index_adds[..])
                } else {
                    (none_removed, none_added)
                };
                let retention = index_adds.iter().any(|a| a.retention.is_some());
                self.push_header(
                    'w',
                    fmt,
                    [w.mode.only_if_present, moved, retention],
                    w.mode.ttl_seconds,
                    [
                        index_removes.len(),
                        index_adds.len(),
                        pairs,
                        nulls.len(),
                        keeps.len(),
                    ],
                );
                self.keys.push(w.key.clone());
                if moved {
                    self.keys.push(w.source.clone());
                }
                for r in index_removes {
                    self.keys.push(r.key.clone());
                    self.args.push(r.member.clone());
                }
                for add in index_adds {
                    self.keys.push(add.key.clone());
                    self.args.push(add.member.clone());
                    self.args.push(score_arg(add.score));
                    if retention {
                        let (min, max) = retention_args(add, cutoff_unix_secs);
                        self.args.push(min);
                        self.args.push(max);
                    }
                }
                self.args.extend(fields);
                for name in nulls.into_iter().chain(keeps) {
                    self.args.push(name.to_string());
                }
            }
            MirrorOp::Clear { .. } => {}
        }
    }
}

/// One line per mirror op on the effects log target (`RUST_LOG=walsweep::effects=debug`).
pub(super) fn log_op(op: &MirrorOp) {
    use super::EFFECTS_LOG_TARGET as target;
    match op {
        MirrorOp::Write(w) if w.source != w.key => {
            tracing::debug!(target: target, "mirror {} (moved from {})", w.key, w.source)
        }
        MirrorOp::Write(w) => tracing::debug!(target: target, "mirror {}", w.key),
        MirrorOp::Delete { key, .. } => tracing::debug!(target: target, "mirror delete {key}"),
        MirrorOp::Clear { .. } => {}
    }
    let (removes, adds) = match op {
        MirrorOp::Write(w) => (&w.index_removes[..], &w.index_adds[..]),
        MirrorOp::Delete { index_removes, .. } => (&index_removes[..], &[][..]),
        MirrorOp::Clear { .. } => (&[][..], &[][..]),
    };
    for r in removes {
        tracing::debug!(target: target, "index {} remove {}", r.key, r.member);
    }
    for a in adds {
        tracing::debug!(target: target, "index {} add {} score {}", a.key, a.member, a.score);
    }
}

impl RedisSink {
    /// Applies mirror ops in order. `cutoff_unix_secs` is the commit time retention windows
    /// count back from.
    pub(crate) async fn apply_mirror_ops<'a>(
        &mut self,
        ops: impl IntoIterator<Item = &'a MirrorOp>,
        cutoff_unix_secs: i64,
    ) -> Result<MirrorApplied, SinkError> {
        let applied = if self.endpoint.is_cluster() {
            self.apply_mirror_ops_on_cluster(ops, cutoff_unix_secs)
                .await?
        } else {
            self.apply_mirror_ops_on_node(ops, cutoff_unix_secs).await?
        };
        m::mirror_applied(
            [
                applied.written,
                applied.deleted,
                applied.skipped,
                applied.incomplete,
            ],
            applied.cleared_keys,
        );
        if applied.wrong_type > 0 {
            m::error(m::ERROR_WRONG_TYPE);
            tracing::warn!(
                keys = applied.wrong_type,
                "some mirror index keys are not sorted sets; left alone (another app may use the \
                 same names: give the index a prefix of its own)"
            );
        }
        Ok(applied)
    }

    async fn apply_mirror_ops_on_node<'a>(
        &mut self,
        ops: impl IntoIterator<Item = &'a MirrorOp>,
        cutoff_unix_secs: i64,
    ) -> Result<MirrorApplied, SinkError> {
        let mut conn = self.connection().await?;
        let mut applied = MirrorApplied::default();
        let mut calls: Vec<Call> = Vec::new();
        for op in ops {
            if let MirrorOp::Clear { prefixes, cause } = op {
                self.run_calls(&mut conn, std::mem::take(&mut calls), &mut applied)
                    .await?;
                for prefix in prefixes {
                    applied.cleared_keys += self
                        .unlink_prefix(&mut conn, prefix, "clear mirror keys")
                        .await?;
                    tracing::debug!(target: super::EFFECTS_LOG_TARGET, cause = cause.as_str(), "clear mirror {prefix}*");
                }
                continue;
            }
            if calls.last().is_none_or(|c| c.rows >= ROWS_PER_CALL) {
                if calls.len() >= CALLS_PER_ROUND_TRIP {
                    self.run_calls(&mut conn, std::mem::take(&mut calls), &mut applied)
                        .await?;
                }
                calls.push(Call::default());
            }
            if tracing::enabled!(target: super::EFFECTS_LOG_TARGET, tracing::Level::DEBUG) {
                log_op(op);
            }
            if let Some(call) = calls.last_mut() {
                call.push_row(op, cutoff_unix_secs, RowPart::Whole);
            }
        }
        self.run_calls(&mut conn, calls, &mut applied).await?;
        Ok(applied)
    }

    async fn run_calls(
        &self,
        conn: &mut RedisConn,
        calls: Vec<Call>,
        applied: &mut MirrorApplied,
    ) -> Result<(), SinkError> {
        if calls.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        // Loading first makes every EVALSHA below valid even right after a Redis restart, and
        // costs one short command per round trip instead of the script text per call.
        pipe.cmd("SCRIPT")
            .arg("LOAD")
            .arg(include_str!("scripts/mirror_rows.lua"))
            .ignore();
        for call in &calls {
            pipe.cmd("EVALSHA")
                .arg(MIRROR_ROWS.get_hash())
                .arg(call.keys.len())
                .arg(&call.keys)
                .arg(&call.args);
        }
        let replies: Vec<Value> = script_round_trip(
            "write mirrored rows",
            ScriptCalls {
                script: "mirror_rows.lua",
                at: 1..usize::MAX,
            },
            pipe.query_async(conn),
        )
        .await?;
        for reply in &replies {
            applied.add_reply(reply);
        }
        Ok(())
    }
}
