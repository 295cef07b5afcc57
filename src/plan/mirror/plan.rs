//! The mirror part of a transaction's plan: ordered row writes and deletes.
//!
//! Unlike invalidations (a set: order never matters), mirror writes are last-write-wins per key
//! and a TRUNCATE must land before the rows inserted after it. So the plan is a sequence, and
//! dedup only folds a later op on a key into that key's earlier op when nothing in between
//! depends on the key: memory grows with distinct keys, not with rows.

use std::collections::HashMap;
use std::sync::Arc;

use super::WriteMode;
use crate::plan::rules::FallbackCause;

/// A row field to write.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Field {
    /// The stored form: JSON text for `json` mirrors, the field's string for `hash` mirrors.
    Value(String),
    /// NULL: `null` in JSON, no field in a hash.
    Null,
    /// Unchanged TOAST: keep what the stored entry holds (or drop the entry when there is none,
    /// since the row cannot be completed).
    Keep,
}

/// A sorted-set member to add (or re-score).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IndexAdd {
    /// Which `[[table.mirror.index]]` of the mirror (for drift checks; the sink ignores it).
    pub(crate) index: usize,
    pub(crate) key: String,
    pub(crate) member: String,
    pub(crate) score: f64,
    /// Retention: the segment's base score and how many score units one second is; the sink
    /// removes `[base, base + (commit_time - window) * units)` from the key.
    pub(crate) retention: Option<Retention>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Retention {
    /// Lowest score of this member's segment (`-inf` for a plain time score).
    pub(crate) base: f64,
    pub(crate) units_per_second: f64,
    pub(crate) window_seconds: u64,
}

/// A sorted-set member to remove.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct IndexRemove {
    pub(crate) key: String,
    pub(crate) member: String,
}

/// Write a row to `key`; `source` is where kept fields come from and is removed afterwards
/// when it differs (the row's key changed).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RowWrite {
    pub(crate) key: String,
    pub(crate) source: String,
    pub(crate) mode: WriteMode,
    /// The whole stored JSON object, for a `json` mirror with nothing to keep (the common
    /// case: one allocation per pending row instead of one per column); `fields` is then
    /// empty.
    pub(crate) document: Option<String>,
    /// In column order; names shared by every row of the relation.
    pub(crate) fields: Vec<(Arc<str>, Field)>,
    pub(crate) index_removes: Vec<IndexRemove>,
    pub(crate) index_adds: Vec<IndexAdd>,
}

/// `"name"` as a JSON string literal.
pub(crate) fn push_json_name(out: &mut String, name: &str) {
    if name
        .bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.push('"');
        out.push_str(name);
        out.push('"');
    } else {
        out.push_str(&serde_json::Value::String(name.to_string()).to_string());
    }
}

/// The stored JSON object of a row without kept fields.
pub(crate) fn json_document(fields: &[(std::sync::Arc<str>, Field)]) -> String {
    let mut out = String::with_capacity(
        2 + fields
            .iter()
            .map(|(n, f)| {
                n.len()
                    + 4
                    + match f {
                        Field::Value(v) => v.len(),
                        _ => 4,
                    }
            })
            .sum::<usize>(),
    );
    out.push('{');
    for (i, (name, field)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_name(&mut out, name);
        out.push(':');
        match field {
            Field::Value(v) => out.push_str(v),
            Field::Null | Field::Keep => out.push_str("null"),
        }
    }
    out.push('}');
    out
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MirrorOp {
    Write(RowWrite),
    /// Remove the row at `key` and its index members.
    Delete {
        key: String,
        index_removes: Vec<IndexRemove>,
    },
    /// Remove every key under these prefixes (TRUNCATE, or a value needed to find a row's old
    /// key or index entry was not sent).
    Clear {
        prefixes: Vec<String>,
        cause: FallbackCause,
    },
}

impl MirrorOp {
    fn key(&self) -> Option<&str> {
        match self {
            MirrorOp::Write(w) => Some(&w.key),
            MirrorOp::Delete { key, .. } => Some(key),
            MirrorOp::Clear { .. } => None,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub(crate) struct MirrorPlan {
    ops: Vec<MirrorOp>,
    /// Hash of a key -> position of the last op on it that a later op may still fold into.
    /// Hashes, not keys, so a pending row's key is stored once; a collision only means an op
    /// that could have been folded is appended instead (the key is checked before folding).
    foldable: HashMap<u64, usize>,
}

impl PartialEq for MirrorPlan {
    fn eq(&self, other: &Self) -> bool {
        self.ops == other.ops
    }
}

fn union_removes(mut earlier: Vec<IndexRemove>, later: Vec<IndexRemove>) -> Vec<IndexRemove> {
    for r in later {
        if !earlier.contains(&r) {
            earlier.push(r);
        }
    }
    earlier
}

/// `later` applied after `earlier` on the same key, as one op.
fn fold(earlier: MirrorOp, later: MirrorOp) -> MirrorOp {
    match (earlier, later) {
        (MirrorOp::Write(mut first), MirrorOp::Write(second))
            if second.fields.iter().any(|(_, f)| *f == Field::Keep) =>
        {
            // A partial write over a pending write keeps the pending values for kept fields.
            for (name, field) in second.fields {
                if field == Field::Keep {
                    continue;
                }
                match first.fields.iter_mut().find(|(n, _)| *n == name) {
                    Some(slot) => slot.1 = field,
                    None => first.fields.push((name, field)),
                }
            }
            first.index_removes = union_removes(first.index_removes, second.index_removes);
            first.index_adds = second.index_adds;
            first.mode = second.mode;
            MirrorOp::Write(first)
        }
        (first, MirrorOp::Write(mut second)) => {
            let removes = match first {
                MirrorOp::Write(w) => {
                    // A move followed by a rewrite is still a move from the first source.
                    second.source = w.source;
                    w.index_removes
                }
                MirrorOp::Delete { index_removes, .. } => index_removes,
                MirrorOp::Clear { .. } => Vec::new(),
            };
            second.index_removes = union_removes(removes, second.index_removes);
            MirrorOp::Write(second)
        }
        (first, MirrorOp::Delete { key, index_removes }) => {
            let removes = match first {
                MirrorOp::Write(w) => w.index_removes,
                MirrorOp::Delete { index_removes, .. } => index_removes,
                MirrorOp::Clear { .. } => Vec::new(),
            };
            MirrorOp::Delete {
                key,
                index_removes: union_removes(removes, index_removes),
            }
        }
        (_, clear @ MirrorOp::Clear { .. }) => clear,
    }
}

fn key_hash(key: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(key)
}

impl MirrorPlan {
    pub(crate) fn ops(&self) -> &[MirrorOp] {
        &self.ops
    }

    pub(crate) fn push(&mut self, op: MirrorOp) {
        match &op {
            MirrorOp::Clear { .. } => {
                // A barrier: nothing after it may fold into anything before it.
                self.foldable.clear();
                self.ops.push(op);
            }
            MirrorOp::Write(w) if w.source != w.key => {
                // A move reads and removes its source: later ops on the source must come after
                // it, and it must not fold into an earlier op on the source.
                self.foldable.remove(&key_hash(&w.source));
                self.push_on_key(op);
            }
            _ => self.push_on_key(op),
        }
    }

    fn push_on_key(&mut self, op: MirrorOp) {
        let hash = key_hash(op.key().unwrap_or_default());
        let same_key = |at: usize| self.ops.get(at).and_then(MirrorOp::key) == op.key();
        if let Some(&at) = self.foldable.get(&hash).filter(|&&at| same_key(at)) {
            let moves_away = matches!(&op, MirrorOp::Write(w) if w.source != w.key);
            let earlier_is_move = matches!(&self.ops[at], MirrorOp::Write(w) if w.source != w.key);
            // Kept fields cannot be taken from a pending whole document without parsing it
            // (which could round numbers): the partial write stays a separate op after it.
            let keeps_over_document = matches!(
                (&self.ops[at], &op),
                (MirrorOp::Write(first), MirrorOp::Write(second))
                    if first.document.is_some()
                        && second.fields.iter().any(|(_, f)| *f == Field::Keep)
            );
            // A delete after a move must still remove the move's source, which folding into a
            // Delete would forget; and a move onto a key with a pending op must keep order.
            let keeps_meaning = !(moves_away
                || keeps_over_document
                || earlier_is_move && matches!(op, MirrorOp::Delete { .. }));
            if keeps_meaning {
                let earlier = std::mem::replace(
                    &mut self.ops[at],
                    MirrorOp::Clear {
                        prefixes: Vec::new(),
                        cause: FallbackCause::Truncate,
                    },
                );
                self.ops[at] = fold(earlier, op);
                return;
            }
        }
        self.foldable.insert(hash, self.ops.len());
        self.ops.push(op);
    }

    /// Appends `later`'s ops (a later segment or transaction), folding where allowed.
    pub(crate) fn merge(&mut self, later: MirrorPlan) {
        if self.ops.is_empty() {
            *self = later;
            return;
        }
        for op in later.ops {
            self.push(op);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.ops.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MirrorFormat;

    const MODE: WriteMode = WriteMode {
        format: MirrorFormat::Json,
        only_if_present: false,
        ttl_seconds: 0,
    };

    fn write(key: &str, source: &str, fields: &[(&str, Field)]) -> MirrorOp {
        MirrorOp::Write(RowWrite {
            key: key.into(),
            source: source.into(),
            mode: MODE,
            document: None,
            fields: fields
                .iter()
                .map(|(n, f)| (Arc::from(*n), f.clone()))
                .collect(),
            index_removes: Vec::new(),
            index_adds: Vec::new(),
        })
    }

    fn v(s: &str) -> Field {
        Field::Value(s.into())
    }

    #[test]
    fn later_full_write_replaces_earlier_in_place() {
        let mut plan = MirrorPlan::default();
        plan.push(write("r:1", "r:1", &[("a", v("1"))]));
        plan.push(write("r:2", "r:2", &[("a", v("2"))]));
        plan.push(write("r:1", "r:1", &[("a", v("3"))]));
        assert_eq!(plan.len(), 2);
        assert_eq!(plan.ops()[0], write("r:1", "r:1", &[("a", v("3"))]));
    }

    #[test]
    fn partial_write_overlays_pending_write() {
        let mut plan = MirrorPlan::default();
        plan.push(write("r:1", "r:1", &[("a", v("1")), ("body", v("\"x\""))]));
        plan.push(write("r:1", "r:1", &[("a", v("2")), ("body", Field::Keep)]));
        assert_eq!(
            plan.ops(),
            &[write("r:1", "r:1", &[("a", v("2")), ("body", v("\"x\""))])]
        );
    }

    #[test]
    fn partial_write_after_a_whole_document_stays_a_separate_op() {
        let mut plan = MirrorPlan::default();
        let mut whole = write("r:1", "r:1", &[]);
        if let MirrorOp::Write(w) = &mut whole {
            w.document = Some("{\"a\":1,\"body\":\"x\"}".into());
        }
        plan.push(whole.clone());
        let partial = write("r:1", "r:1", &[("a", v("2")), ("body", Field::Keep)]);
        plan.push(partial.clone());
        assert_eq!(plan.ops(), &[whole, partial.clone()]);
        // A later whole write still folds into the partial one.
        plan.push(write("r:1", "r:1", &[("a", v("3")), ("body", v("\"y\""))]));
        assert_eq!(plan.len(), 2);
    }

    #[test]
    fn delete_after_write_keeps_index_removals() {
        let mut plan = MirrorPlan::default();
        let mut w = write("r:1", "r:1", &[("a", v("1"))]);
        if let MirrorOp::Write(w) = &mut w {
            w.index_removes.push(IndexRemove {
                key: "i:old".into(),
                member: "1".into(),
            });
        }
        plan.push(w);
        plan.push(MirrorOp::Delete {
            key: "r:1".into(),
            index_removes: vec![IndexRemove {
                key: "i:new".into(),
                member: "1".into(),
            }],
        });
        let MirrorOp::Delete { index_removes, .. } = &plan.ops()[0] else {
            panic!("expected a delete: {:?}", plan.ops());
        };
        assert_eq!(index_removes.len(), 2);
    }

    #[test]
    fn ops_after_a_move_of_their_key_stay_after_it() {
        let mut plan = MirrorPlan::default();
        plan.push(write("r:1", "r:1", &[("a", v("1"))]));
        plan.push(write("r:2", "r:1", &[("a", v("1"))]));
        plan.push(write("r:1", "r:1", &[("a", v("9"))]));
        assert_eq!(plan.len(), 3, "{:?}", plan.ops());
        assert_eq!(plan.ops()[2], write("r:1", "r:1", &[("a", v("9"))]));
    }

    #[test]
    fn truncate_is_a_barrier() {
        let mut plan = MirrorPlan::default();
        plan.push(write("r:1", "r:1", &[("a", v("1"))]));
        plan.push(MirrorOp::Clear {
            prefixes: vec!["r:".into()],
            cause: FallbackCause::Truncate,
        });
        plan.push(write("r:1", "r:1", &[("a", v("2"))]));
        assert_eq!(plan.len(), 3);
        let mut merged = MirrorPlan::default();
        merged.push(write("r:1", "r:1", &[("a", v("0"))]));
        merged.merge(plan);
        assert_eq!(merged.len(), 3, "{:?}", merged.ops());
    }
}
