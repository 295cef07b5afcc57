//! The mirror part of a transaction's plan: ordered row writes and deletes.
//!
//! Unlike invalidations (a set: order never matters), mirror writes are last-write-wins per key
//! and a TRUNCATE must land before the rows inserted after it. So the plan is a sequence, and
//! dedup only folds a later op on a key into that key's earlier op when nothing in between
//! depends on the key: memory grows with distinct keys, not with rows, up to
//! `[mirror] spill_after_bytes`; past it the ops held go to a spill file (`spill`) and the
//! sink reads them back in order, a chunk at a time (`MirrorPlan::chunks`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::mem::size_of;
use std::sync::Arc;

use super::spill::{Spill, SpillError, SpillFile, SpillReader};
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

/// Ops that come before every op a plan still folds into.
#[derive(Debug, Clone)]
enum Part {
    /// On disk. Clones of the plan share the file; it goes with the last of them.
    Disk(Arc<SpillFile>),
    /// In memory: spilling failed, or the plan had nowhere to spill when a spilled plan was
    /// merged after it.
    Memory(Vec<MirrorOp>),
}

impl PartialEq for Part {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Part::Disk(a), Part::Disk(b)) => Arc::ptr_eq(a, b),
            (Part::Memory(a), Part::Memory(b)) => a == b,
            _ => false,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub(crate) struct MirrorPlan {
    /// Ops before every op of `ops`, in order.
    earlier: Vec<Part>,
    earlier_ops: usize,
    ops: Vec<MirrorOp>,
    /// Hash of a key -> position of the last op on it that a later op may still fold into.
    /// Hashes, not keys, so a pending row's key is stored once; a collision only means an op
    /// that could have been folded is appended instead (the key is checked before folding).
    foldable: HashMap<u64, usize>,
    /// Estimated heap bytes of `ops` and `foldable`: what `spill` bounds.
    bytes: usize,
    /// Where to put `ops` past `Spill::after_bytes`; `None`: never (plans built outside the
    /// stream, or spilling turned off or failed).
    spill: Option<Arc<Spill>>,
}

impl PartialEq for MirrorPlan {
    fn eq(&self, other: &Self) -> bool {
        self.earlier == other.earlier && self.ops == other.ops
    }
}

/// What one pending op costs in memory, roughly: the op, its strings with an allocator's
/// overhead each, and its `foldable` entry.
fn heap_bytes(op: &MirrorOp) -> usize {
    const ALLOC: usize = 16;
    let text = |s: &str| s.len() + ALLOC;
    let removes = |r: &[IndexRemove]| {
        r.iter()
            .map(|r| size_of::<IndexRemove>() + text(&r.key) + text(&r.member))
            .sum::<usize>()
    };
    let own = match op {
        MirrorOp::Write(w) => {
            text(&w.key)
                + text(&w.source)
                + w.document.as_deref().map_or(0, text)
                + w.fields
                    .iter()
                    .map(|(_, f)| {
                        size_of::<(Arc<str>, Field)>()
                            + match f {
                                Field::Value(v) => text(v),
                                _ => 0,
                            }
                    })
                    .sum::<usize>()
                + removes(&w.index_removes)
                + w.index_adds
                    .iter()
                    .map(|a| size_of::<IndexAdd>() + text(&a.key) + text(&a.member))
                    .sum::<usize>()
        }
        MirrorOp::Delete { key, index_removes } => text(key) + removes(index_removes),
        MirrorOp::Clear { prefixes, .. } => prefixes
            .iter()
            .map(|p| size_of::<String>() + text(p))
            .sum::<usize>(),
    };
    size_of::<MirrorOp>() + own + 2 * size_of::<(u64, usize)>()
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
    /// The ops, for plans that never spill (built outside the stream: explain, warm-up, drift
    /// checks). The sink reads a streamed transaction's with `chunks`.
    pub(crate) fn ops(&self) -> &[MirrorOp] {
        debug_assert!(self.earlier.is_empty(), "ops() of a spilled plan");
        &self.ops
    }

    /// Every op in order, at most `max_ops` at a time from disk (the ops still in memory come
    /// as they are). Stops after the first error.
    pub(crate) fn chunks(&self, max_ops: usize) -> Chunks<'_> {
        Chunks {
            parts: self.earlier.iter(),
            reading: None,
            tail: Some(&self.ops),
            max_ops,
        }
    }

    /// Spill past `spill`'s threshold from now on, unless the plan already has a way to spill.
    pub(crate) fn spill_with(&mut self, spill: &Option<Arc<Spill>>) {
        if self.spill.is_none() {
            self.spill.clone_from(spill);
        }
    }

    /// Ops held in memory over the threshold go to disk. On failure they stay in memory, and
    /// this plan stops trying (one error per transaction, not one per row).
    fn spill_if_over(&mut self) {
        let Some(spill) = &self.spill else {
            return;
        };
        if self.bytes <= spill.after_bytes() || self.ops.is_empty() {
            return;
        }
        if let Err(e) = self.spill_ops() {
            tracing::error!(error = %crate::telemetry::log::display_chain(&e), "cannot spill a large transaction's pending mirror writes to disk; keeping them in memory");
            crate::telemetry::metrics::error(crate::telemetry::metrics::ERROR_MIRROR_SPILL);
            self.spill = None;
        }
    }

    /// Moves `ops` to the end of this plan's own last file, or a new one.
    fn spill_ops(&mut self) -> Result<(), SpillError> {
        let Some(spill) = &self.spill else {
            return Ok(());
        };
        let own_last =
            matches!(self.earlier.last(), Some(Part::Disk(f)) if Arc::strong_count(f) == 1);
        if !own_last {
            self.earlier.push(Part::Disk(Arc::new(spill.create()?)));
        }
        let Some(Part::Disk(file)) = self.earlier.last_mut() else {
            unreachable!("a file was just made the last part");
        };
        let Some(file) = Arc::get_mut(file) else {
            unreachable!("the last file is this plan's own");
        };
        file.append(&self.ops)?;
        self.earlier_ops += self.ops.len();
        self.ops.clear();
        self.foldable.clear();
        self.bytes = 0;
        Ok(())
    }

    /// Everything held so far moves before what comes next, on disk when it can.
    fn seal(&mut self) {
        if self.ops.is_empty() {
            return;
        }
        if self.spill.is_some() {
            match self.spill_ops() {
                Ok(()) => return,
                Err(e) => {
                    tracing::error!(error = %crate::telemetry::log::display_chain(&e), "cannot spill a large transaction's pending mirror writes to disk; keeping them in memory");
                    crate::telemetry::metrics::error(crate::telemetry::metrics::ERROR_MIRROR_SPILL);
                    self.spill = None;
                }
            }
        }
        let ops = std::mem::take(&mut self.ops);
        self.earlier_ops += ops.len();
        self.earlier.push(Part::Memory(ops));
        self.foldable.clear();
        self.bytes = 0;
    }

    pub(crate) fn push(&mut self, op: MirrorOp) {
        self.push_op(op);
        self.spill_if_over();
    }

    fn push_op(&mut self, op: MirrorOp) {
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
                let before = heap_bytes(&earlier);
                let folded = fold(earlier, op);
                self.bytes = self.bytes.saturating_sub(before) + heap_bytes(&folded);
                self.ops[at] = folded;
                return;
            }
        }
        self.foldable.insert(hash, self.ops.len());
        self.bytes += heap_bytes(&op);
        self.ops.push(op);
    }

    /// Appends `later`'s ops (a later segment or transaction), folding where allowed.
    pub(crate) fn merge(&mut self, mut later: MirrorPlan) {
        if self.earlier.is_empty() && self.ops.is_empty() {
            later.spill_with(&self.spill);
            *self = later;
            return;
        }
        self.spill_with(&later.spill);
        if later.earlier.is_empty() {
            for op in later.ops {
                self.push(op);
            }
            return;
        }
        // `later` holds ops on disk: everything here must come before them.
        self.seal();
        self.earlier.append(&mut later.earlier);
        self.earlier_ops += later.earlier_ops;
        self.ops = later.ops;
        self.foldable = later.foldable;
        self.bytes = later.bytes;
        self.spill_if_over();
    }

    pub(crate) fn len(&self) -> usize {
        self.earlier_ops + self.ops.len()
    }

    /// Whether some ops are on disk.
    #[cfg(test)]
    pub(crate) fn spilled(&self) -> bool {
        self.earlier.iter().any(|p| matches!(p, Part::Disk(_)))
    }
}

/// `MirrorPlan::chunks`.
pub(crate) struct Chunks<'a> {
    parts: std::slice::Iter<'a, Part>,
    reading: Option<SpillReader>,
    tail: Option<&'a [MirrorOp]>,
    max_ops: usize,
}

impl<'a> Iterator for Chunks<'a> {
    type Item = Result<Cow<'a, [MirrorOp]>, SpillError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(reader) = &mut self.reading {
                if !reader.is_done() {
                    let chunk = reader.next_chunk(self.max_ops);
                    if chunk.is_err() {
                        self.stop();
                    }
                    return Some(chunk.map(Cow::Owned));
                }
                self.reading = None;
            }
            match self.parts.next() {
                Some(Part::Disk(file)) => match file.reader() {
                    Ok(reader) => self.reading = Some(reader),
                    Err(e) => {
                        self.stop();
                        return Some(Err(e));
                    }
                },
                Some(Part::Memory(ops)) if !ops.is_empty() => return Some(Ok(Cow::Borrowed(ops))),
                Some(Part::Memory(_)) => {}
                None => {
                    return self
                        .tail
                        .take()
                        .filter(|ops| !ops.is_empty())
                        .map(|ops| Ok(Cow::Borrowed(ops)))
                }
            }
        }
    }
}

impl Chunks<'_> {
    fn stop(&mut self) {
        self.parts = [].iter();
        self.reading = None;
        self.tail = None;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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

    /// What Redis holds after `ops`, by key, as the sink's script writes it: kept fields come
    /// from the stored entry at the source key, and a row that cannot be completed is removed.
    fn applied<'a>(
        ops: impl IntoIterator<Item = &'a MirrorOp>,
    ) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for op in ops {
            match op {
                MirrorOp::Write(w) => {
                    let stored = out.get(&w.source).cloned();
                    if w.source != w.key {
                        out.remove(&w.source);
                    }
                    let mut row = BTreeMap::new();
                    let mut complete = true;
                    for (name, field) in &w.fields {
                        let value = match field {
                            Field::Value(v) => Some(v.clone()),
                            Field::Null => Some("null".into()),
                            Field::Keep => stored.as_ref().and_then(|s| s.get(&**name)).cloned(),
                        };
                        match value {
                            Some(v) => {
                                row.insert(name.to_string(), v);
                            }
                            None => complete = false,
                        }
                    }
                    if complete {
                        out.insert(w.key.clone(), row);
                    } else {
                        out.remove(&w.key);
                    }
                }
                MirrorOp::Delete { key, .. } => {
                    out.remove(key);
                }
                MirrorOp::Clear { prefixes, .. } => {
                    out.retain(|k, _| !prefixes.iter().any(|p| k.starts_with(p.as_str())));
                }
            }
        }
        out
    }

    fn chunked(plan: &MirrorPlan, max: usize) -> Vec<MirrorOp> {
        let mut out = Vec::new();
        for chunk in plan.chunks(max) {
            let chunk = chunk.expect("spill file reads back");
            assert!(matches!(chunk, Cow::Borrowed(_)) || chunk.len() <= max);
            out.extend(chunk.iter().cloned());
        }
        out
    }

    fn spill_files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    /// A random sequence of writes, moves, deletes and truncates over a few keys.
    fn random_ops(seed: u64, n: usize) -> Vec<MirrorOp> {
        let mut state = seed;
        let mut next = move |below: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % below
        };
        (0..n)
            .map(|i| {
                let key = format!("r:{}", next(20));
                match next(20) {
                    0 => MirrorOp::Clear {
                        prefixes: vec!["r:".into()],
                        cause: FallbackCause::Truncate,
                    },
                    1..=3 => MirrorOp::Delete {
                        key,
                        index_removes: Vec::new(),
                    },
                    4..=5 => write(
                        &key,
                        &format!("r:{}", next(20)),
                        &[("a", v(&i.to_string()))],
                    ),
                    6 => write(&key, &key, &[("a", v(&i.to_string())), ("b", Field::Keep)]),
                    _ => write(&key, &key, &[("a", v(&i.to_string())), ("b", Field::Null)]),
                }
            })
            .collect()
    }

    #[test]
    fn a_spilled_plan_reads_back_in_order_with_the_same_result() {
        for seed in 0..20 {
            let ops = random_ops(seed, 500);
            let mut in_memory = MirrorPlan::default();
            for op in ops.clone() {
                in_memory.push(op);
            }
            let dir = tempfile::tempdir().unwrap();
            let spill = Some(Spill::open(dir.path(), 2_000).unwrap());
            let mut spilled = MirrorPlan::default();
            spilled.spill_with(&spill);
            for op in ops.clone() {
                spilled.push(op);
            }
            assert!(spilled.spilled(), "seed {seed}: nothing spilled");
            assert_eq!(spill_files(dir.path()), 1, "one file per plan");
            let back = chunked(&spilled, 7);
            assert_eq!(back.len(), spilled.len());
            assert_eq!(applied(&back), applied(&ops), "seed {seed}");
            assert_eq!(applied(&back), applied(in_memory.ops()), "seed {seed}");
            drop(spilled);
            assert_eq!(spill_files(dir.path()), 0, "the file goes with its plan");
        }
    }

    #[test]
    fn merging_spilled_segments_keeps_their_order() {
        // Segments of a streamed transaction, some spilled, some not, merged in order.
        let dir = tempfile::tempdir().unwrap();
        let spill = Some(Spill::open(dir.path(), 3_000).unwrap());
        for seed in 0..20 {
            let segments: Vec<Vec<MirrorOp>> = (0..6)
                .map(|k| random_ops(seed * 10 + k, 40 * k as usize))
                .collect();
            let mut merged = MirrorPlan::default();
            for (k, ops) in segments.iter().enumerate() {
                let mut segment = MirrorPlan::default();
                if k % 2 == 0 {
                    segment.spill_with(&spill);
                }
                for op in ops.clone() {
                    segment.push(op);
                }
                merged.merge(segment);
            }
            let all: Vec<MirrorOp> = segments.concat();
            assert_eq!(applied(&chunked(&merged, 5)), applied(&all), "seed {seed}");
            let clone = merged.clone();
            drop(merged);
            assert_eq!(
                applied(&chunked(&clone, 64)),
                applied(&all),
                "a clone shares the files"
            );
            drop(clone);
            assert_eq!(spill_files(dir.path()), 0, "seed {seed}: files left");
        }
    }

    #[test]
    fn a_plan_that_cannot_spill_keeps_its_ops_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Some(Spill::open(dir.path(), 100).unwrap());
        let ops = random_ops(7, 200);
        let mut plan = MirrorPlan::default();
        plan.spill_with(&spill);
        // The directory disappears under the running process.
        drop(dir);
        for op in ops.clone() {
            plan.push(op);
        }
        assert!(!plan.spilled());
        assert_eq!(applied(&chunked(&plan, 3)), applied(&ops));
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
