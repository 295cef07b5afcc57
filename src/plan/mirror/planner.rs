//! Row changes to mirror ops: which key a row lives at before and after, its typed fields, and
//! the index members to move.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::plan::{
    json_document, Field, IndexAdd, IndexRemove, MirrorOp, MirrorPlan, Retention, RowWrite,
};
use super::{IndexRule, MirrorRule};
use crate::config::MirrorFormat;
use crate::pg::pgoutput::TupleValue;
use crate::plan::rules::{
    bind_template, render, BoundTemplate, FallbackCause, Rendered, Side, ValueFormat,
};
use crate::plan::{Op, RelationInfo, RowChange};
use crate::value::{decode_text, TypeRegistry, Value};

struct BoundIndex {
    rule: IndexRule,
    key: BoundTemplate,
    member: BoundTemplate,
    /// Positions of `rule.score.columns()`; `None` when the table lacks the column.
    score_positions: Vec<Option<usize>>,
}

struct BoundMirror {
    rule: Arc<MirrorRule>,
    key: BoundTemplate,
    /// Stored columns: name, position, type.
    columns: Vec<(Arc<str>, usize, u32)>,
    indexes: Vec<BoundIndex>,
    type_oids: Vec<u32>,
}

impl BoundMirror {
    fn bind(rule: Arc<MirrorRule>, relation: &RelationInfo) -> BoundMirror {
        let columns = relation
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                rule.columns
                    .as_ref()
                    .is_none_or(|wanted| wanted.contains(&c.name))
            })
            .map(|(i, c)| (Arc::from(c.name.as_str()), i, c.type_oid))
            .collect();
        BoundMirror {
            key: bind_template(0, &rule.key, relation),
            columns,
            indexes: rule
                .indexes
                .iter()
                .map(|i| BoundIndex {
                    key: bind_template(i.index, &i.key, relation),
                    member: bind_template(i.index, &i.member, relation),
                    score_positions: i
                        .score
                        .columns()
                        .iter()
                        .map(|c| relation.column_index(c))
                        .collect(),
                    rule: i.clone(),
                })
                .collect(),
            type_oids: relation.columns.iter().map(|c| c.type_oid).collect(),
            rule,
        }
    }
}

/// Turns changes of mirrored tables into `MirrorOp`s.
pub(crate) struct MirrorPlanner {
    rules: Vec<Arc<MirrorRule>>,
    bound: HashMap<u32, Vec<BoundMirror>>,
    types: TypeRegistry,
    /// (table, mirror, what) already logged, so a problem logs once, not once per row.
    warned: HashSet<(usize, usize, String)>,
    /// Counts problems in the metrics and warns about them; off for drift checks, which plan
    /// rows the stream already planned (and counted) when it wrote them.
    observed: bool,
    /// Where the plans of the stream put pending ops past `[mirror] spill_after_bytes`.
    spill: Option<Arc<super::spill::Spill>>,
}

/// Something a row's planning ran into: counted, and logged once per rule.
struct Problem {
    rule: Arc<MirrorRule>,
    what: String,
    /// `None`: counted only.
    message: Option<String>,
    counted: Counted,
}

enum Counted {
    Fallback(FallbackCause),
    Error(&'static str),
}

/// What the new side of a row says about one index.
enum IndexTarget {
    Member(IndexAdd),
    /// The row has no member here (NULL in the key or member, or an unusable score).
    None,
    Unknown(FallbackCause),
}

fn decode(oid: u32, bytes: &[u8], types: &TypeRegistry) -> Result<Value, String> {
    decode_text(oid, bytes, types).map_err(|e| e.to_string())
}

impl MirrorPlanner {
    pub(crate) fn new(rules: Vec<Arc<MirrorRule>>) -> Self {
        MirrorPlanner {
            rules,
            bound: HashMap::new(),
            types: TypeRegistry::new(),
            warned: HashSet::new(),
            observed: true,
            spill: None,
        }
    }

    /// Plans spill to `spill` (`None`: never).
    pub(crate) fn with_spill(mut self, spill: Option<Arc<super::spill::Spill>>) -> Self {
        self.spill = spill;
        self
    }

    /// Neither counts nor warns: for planning rows to compare with what the stream wrote.
    pub(crate) fn unobserved(mut self) -> Self {
        self.observed = false;
        self
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Enums, domains and arrays of them, so they are typed like built-in values.
    pub(crate) fn register_types(&mut self, types: &TypeRegistry) {
        self.types = types.clone();
    }

    /// Whether a mirror is about this relation.
    pub(crate) fn names(&self, relation: &RelationInfo) -> bool {
        self.rules
            .iter()
            .any(|r| r.table_name == relation.qualified_name)
    }

    pub(crate) fn relation_changed(&mut self, relation: &RelationInfo) {
        let mirrors = self
            .rules
            .iter()
            .filter(|r| r.table_name == relation.qualified_name)
            .map(|r| BoundMirror::bind(r.clone(), relation))
            .collect();
        self.bound.insert(relation.oid, mirrors);
    }

    fn report(&mut self, problem: Problem) {
        if !self.observed {
            return;
        }
        match problem.counted {
            Counted::Fallback(cause) => crate::telemetry::metrics::fallback(cause.as_str()),
            Counted::Error(kind) => crate::telemetry::metrics::error(kind),
        }
        let Some(message) = problem.message else {
            return;
        };
        let rule = &problem.rule;
        if self
            .warned
            .insert((rule.table, rule.index, problem.what.clone()))
        {
            tracing::warn!(table = %rule.table_name, mirror = rule.index, rule = %problem.what, "{message}");
        }
    }

    pub(crate) fn plan_change(&mut self, change: &RowChange<'_>, plan: &mut MirrorPlan) {
        plan.spill_with(&self.spill);
        if !self.bound.contains_key(&change.relation.oid) {
            self.relation_changed(change.relation);
        }
        let Some(mirrors) = self.bound.get(&change.relation.oid) else {
            return;
        };
        let mut problems: Vec<Problem> = Vec::new();
        for mirror in mirrors {
            plan_mirror(mirror, change, &self.types, plan, &mut problems);
        }
        for problem in problems {
            self.report(problem);
        }
    }

    pub(crate) fn plan_truncate(&mut self, relation: &RelationInfo, plan: &mut MirrorPlan) {
        plan.spill_with(&self.spill);
        for rule in self
            .rules
            .iter()
            .filter(|r| r.table_name == relation.qualified_name)
        {
            plan.push(MirrorOp::Clear {
                prefixes: rule.prefixes(),
                cause: FallbackCause::Truncate,
            });
            if self.observed {
                crate::telemetry::metrics::fallback(FallbackCause::Truncate.as_str());
            }
        }
    }
}

fn plan_mirror(
    mirror: &BoundMirror,
    change: &RowChange<'_>,
    types: &TypeRegistry,
    plan: &mut MirrorPlan,
    problems: &mut Vec<Problem>,
) {
    let rule = &mirror.rule;
    let fallback = |plan: &mut MirrorPlan,
                    problems: &mut Vec<Problem>,
                    cause: FallbackCause,
                    prefixes: Vec<String>,
                    what: String| {
        problems.push(Problem {
            rule: rule.clone(),
            what,
            message: Some(format!(
                "clearing mirror keys table-wide ({}): a value needed to find a row's previous \
                 key or index entry is not in the change; `walsweep check` shows the fix \
                 (usually REPLICA IDENTITY FULL)",
                cause.as_str()
            )),
            counted: Counted::Fallback(cause),
        });
        plan.push(MirrorOp::Clear { prefixes, cause });
    };
    let key_of = |side: Side| render_text(&mirror.key, change, side, mirror, types);
    let old_key = match change.op {
        Op::Update | Op::Delete => key_of(Side::Old),
        _ => Rendered::Absent,
    };
    let new_key = match change.op {
        Op::Insert | Op::Update => key_of(Side::New),
        _ => Rendered::Absent,
    };
    let (old_key, new_key) = match (old_key, new_key) {
        (Rendered::Unknown(cause), _) | (_, Rendered::Unknown(cause)) => {
            // Without the key the row cannot be found: clear the mirror and its indexes.
            fallback(
                plan,
                problems,
                cause,
                rule.prefixes(),
                format!("key {:?}", rule.key.source),
            );
            return;
        }
        (old, new) => (value_of(old), value_of(new)),
    };
    let mut index_removes = Vec::new();
    let mut index_adds = Vec::new();
    for index in &mirror.indexes {
        let old = match change.op {
            Op::Update | Op::Delete => index_member(index, change, Side::Old, mirror, types),
            _ => Ok(None),
        };
        let new = match change.op {
            Op::Insert | Op::Update => new_index_target(index, change, mirror, types, problems),
            _ => IndexTarget::None,
        };
        // A side that cannot be rendered leaves the old entry unfindable: clear the index.
        let unknown = match (&old, &new) {
            (Err(cause), _) | (_, IndexTarget::Unknown(cause)) => Some(*cause),
            _ => None,
        };
        if let Some(cause) = unknown {
            fallback(
                plan,
                problems,
                cause,
                vec![index.rule.key.literal_prefix().to_string()],
                format!("index[{}] {:?}", index.rule.index, index.rule.key.source),
            );
        }
        let old = old.ok().flatten();
        let new = match new {
            IndexTarget::Member(add) => Some(add),
            IndexTarget::None | IndexTarget::Unknown(_) => None,
        };
        if let Some(old) = old {
            let same = new
                .as_ref()
                .is_some_and(|n| n.key == old.key && n.member == old.member);
            if !same {
                index_removes.push(old);
            }
        }
        index_adds.extend(new);
    }
    match (old_key, new_key) {
        (old, Some(key)) => {
            let fields: Vec<(Arc<str>, Field)> = mirror
                .columns
                .iter()
                .map(|(name, position, oid)| {
                    let field = match change.new_value(*position) {
                        Some(TupleValue::UnchangedToast) => Field::Keep,
                        Some(TupleValue::Text(b)) | Some(TupleValue::Binary(b)) => {
                            let (field, readable) = stored_form(rule.mode.format, *oid, b, types);
                            if !readable {
                                problems.push(Problem {
                                    rule: rule.clone(),
                                    what: format!("column {name}"),
                                    message: None,
                                    counted: Counted::Error(
                                        crate::telemetry::metrics::ERROR_MIRROR_VALUE,
                                    ),
                                });
                            }
                            field
                        }
                        Some(TupleValue::Null) | None => Field::Null,
                    };
                    (name.clone(), field)
                })
                .collect();
            let (document, fields) = match rule.mode.format {
                MirrorFormat::Json if !fields.iter().any(|(_, f)| *f == Field::Keep) => {
                    (Some(json_document(&fields)), Vec::new())
                }
                _ => (None, fields),
            };
            plan.push(MirrorOp::Write(RowWrite {
                source: old.unwrap_or_else(|| key.clone()),
                key,
                mode: rule.mode,
                document,
                fields,
                index_removes,
                index_adds,
            }));
        }
        (Some(key), None) => plan.push(MirrorOp::Delete { key, index_removes }),
        (None, None) => {
            // No row key (NULL in a key column) on either side: only index entries to move.
            if !index_removes.is_empty() {
                plan.push(MirrorOp::Delete {
                    key: String::new(),
                    index_removes,
                });
            }
        }
    }
}

fn value_of(rendered: Rendered) -> Option<String> {
    match rendered {
        Rendered::Value(v) => Some(v),
        _ => None,
    }
}

/// The index key and member a row has on one side; `Ok(None)` when it has none (NULL).
fn index_member(
    index: &BoundIndex,
    change: &RowChange<'_>,
    side: Side,
    mirror: &BoundMirror,
    types: &TypeRegistry,
) -> Result<Option<IndexRemove>, FallbackCause> {
    let key = render_text(&index.key, change, side, mirror, types);
    let member = render_text(&index.member, change, side, mirror, types);
    match (key, member) {
        (Rendered::Unknown(c), _) | (_, Rendered::Unknown(c)) => Err(c),
        (Rendered::Value(key), Rendered::Value(member)) => Ok(Some(IndexRemove { key, member })),
        _ => Ok(None),
    }
}

fn new_index_target(
    index: &BoundIndex,
    change: &RowChange<'_>,
    mirror: &BoundMirror,
    types: &TypeRegistry,
    problems: &mut Vec<Problem>,
) -> IndexTarget {
    let place = match index_member(index, change, Side::New, mirror, types) {
        Err(cause) => return IndexTarget::Unknown(cause),
        Ok(None) => return IndexTarget::None,
        Ok(Some(place)) => place,
    };
    let mut values = Vec::with_capacity(index.score_positions.len());
    for (column, position) in index
        .rule
        .score
        .columns()
        .iter()
        .zip(&index.score_positions)
    {
        let value = match position.and_then(|p| change.new_value(p)) {
            Some(TupleValue::Text(b)) | Some(TupleValue::Binary(b)) => {
                decode(mirror.type_oids[position.unwrap_or(0)], b, types)
            }
            Some(TupleValue::Null) => Ok(Value::Null),
            Some(TupleValue::UnchangedToast) => Err("unchanged TOAST value".to_string()),
            None => Err("no such column".to_string()),
        };
        match value {
            Ok(v) => values.push(v),
            Err(e) => {
                score_problem(index, mirror, problems, format!("column {column}: {e}"));
                return IndexTarget::None;
            }
        }
    }
    let refs: Vec<&Value> = values.iter().collect();
    let score = match index.rule.score.eval(&refs) {
        Ok(s) => s,
        Err(e) => {
            score_problem(index, mirror, problems, e.to_string());
            return IndexTarget::None;
        }
    };
    let retention = match index.rule.retention_seconds {
        None => None,
        Some(window) => {
            // Two probes give the segment's base and the time unit of the score.
            let at = |cutoff| index.rule.score.retention_range(&refs, cutoff);
            match (at(0), at(1_000_000)) {
                (Ok(Some((base, zero))), Ok(Some((_, one)))) => Some(Retention {
                    base,
                    units_per_second: one - zero,
                    window_seconds: window,
                }),
                _ => None,
            }
        }
    };
    IndexTarget::Member(IndexAdd {
        index: index.rule.index,
        key: place.key,
        member: place.member,
        score,
        retention,
    })
}

fn score_problem(
    index: &BoundIndex,
    mirror: &BoundMirror,
    problems: &mut Vec<Problem>,
    detail: String,
) {
    problems.push(Problem {
        rule: mirror.rule.clone(),
        what: format!("index[{}] score", index.rule.index),
        message: Some(format!(
            "a row's score {:?} cannot be computed ({detail}); the row is left out of the \
             index",
            index.rule.score.source()
        )),
        counted: Counted::Error(crate::telemetry::metrics::ERROR_MIRROR_SCORE),
    });
}

/// A column's stored form in a mirror of `format`, and whether its text parsed as its type.
fn stored_form(
    format: MirrorFormat,
    oid: u32,
    bytes: &[u8],
    types: &TypeRegistry,
) -> (Field, bool) {
    let (value, readable) = match decode_text(oid, bytes, types) {
        Ok(v) => (v, true),
        // Postgres produced it, so this is a type walsweep reads wrong: keep the text rather
        // than lose the row, and count it.
        Err(_) => (
            Value::Text(String::from_utf8_lossy(bytes).into_owned()),
            false,
        ),
    };
    if let Value::Null = value {
        return (Field::Null, readable);
    }
    let field = match format {
        MirrorFormat::Json => Field::Value(value.to_json().to_string()),
        MirrorFormat::Hash => match value {
            Value::Text(s) | Value::Numeric(s) => Field::Value(s),
            other => match other.to_json() {
                serde_json::Value::String(s) => Field::Value(s),
                json => Field::Value(json.to_string()),
            },
        },
    };
    (field, readable)
}

/// Mirror keys, index keys and members render values as Postgres text (not Python's `str()`),
/// so no time zone is ever consulted.
fn render_text(
    template: &BoundTemplate,
    change: &RowChange<'_>,
    side: Side,
    mirror: &BoundMirror,
    types: &TypeRegistry,
) -> Rendered {
    render(
        template,
        change,
        side,
        &ValueFormat::text(&mirror.type_oids, types),
    )
}
