//! The sections `explain` prints: the invalidation effects with the rule behind each, every
//! mirror's writes and index moves, the broadcast entry, and the column types it assumed. Mirror
//! and broadcast sections run their planners on the change, as the daemon would.

use std::fmt::Write as _;
use std::sync::Arc;

use serde_json::Value as Json;

use crate::config::{Config, MirrorFormat};
use crate::pg::pgoutput::TupleValue;
use crate::pg::Lsn;
use crate::plan::broadcast::{BroadcastPlan, BroadcastPlanner};
use crate::plan::mirror::plan::Field;
use crate::plan::mirror::{IndexRule, MirrorOp, MirrorPlan, MirrorPlanner, MirrorRule, RowWrite};
use crate::plan::rules::{Effect, Origin, RuleRef, TableRule};
use crate::plan::{OldRow, Op, RelationInfo, RowChange};
use crate::sink::redis::dep_set_key;
use crate::value::{decode_text, TypeRegistry, Value};

use super::guess::type_name;
use super::input::Cell;

/// One line per distinct effect and rule, with the sides that produced it.
pub(super) fn write_effects(
    out: &mut String,
    op: Op,
    qualified: &str,
    lines: Vec<(Effect, Origin)>,
    rule_set: &[TableRule],
    prefix: &str,
) {
    // One line per distinct effect and rule; the sides that produced it are listed together.
    let mut merged: Vec<(Effect, Origin, Vec<&'static str>)> = Vec::new();
    for (effect, origin) in lines {
        match merged
            .iter_mut()
            .find(|(e, o, _)| *e == effect && o.table == origin.table && o.rule == origin.rule)
        {
            Some((_, _, sides)) => sides.push(origin.side.as_str()),
            None => {
                let side = origin.side.as_str();
                merged.push((effect, origin, vec![side]));
            }
        }
    }
    let _ = writeln!(
        *out,
        "{} {qualified}: {} effect(s)",
        op.as_str(),
        merged.len()
    );
    for (effect, origin, sides) in &merged {
        let rule = rule_set.iter().find(|r| r.index == origin.table);
        let source = match (&origin.rule, rule) {
            (RuleRef::Key(i), Some(r)) => {
                format!("table[{}].keys[{i}] {:?}", origin.table, r.keys[*i].source)
            }
            (RuleRef::Dep(i), Some(r)) => {
                format!("table[{}].deps[{i}] {:?}", origin.table, r.deps[*i].source)
            }
            (RuleRef::Scope(i), Some(r)) => {
                format!("table[{}].scope[{i}] {:?}", origin.table, r.scopes[*i].name)
            }
            _ => "?".into(),
        };
        let what = match effect {
            Effect::UnlinkKey(k) => format!("UNLINK {k}"),
            Effect::InvalidateDep(d) => format!("invalidate {}", dep_set_key(prefix, d)),
            Effect::UnlinkKeysWithPrefix { prefix: p, cause } => {
                format!(
                    "UNLINK every key matching {p}* (table-wide: {})",
                    cause.as_str()
                )
            }
            Effect::InvalidateDepsWithPrefix { prefix: p, cause } => format!(
                "invalidate every set matching {}* (table-wide: {})",
                dep_set_key(prefix, p),
                cause.as_str()
            ),
        };
        let _ = writeln!(*out, "  {what:<60}  <- {source}, {}", sides.join(" + "));
    }
}

/// The mirror writes and index moves of the change. Without `--old` an UPDATE is taken as one
/// that kept the row's key and index members, as Postgres sends no old row then (with the
/// default replica identity).
pub(super) fn write_mirrors(
    out: &mut String,
    mirrors: &[Arc<MirrorRule>],
    relation: &RelationInfo,
    change: &RowChange<'_>,
    new_tuple: &[TupleValue<'_>],
    no_old: bool,
) {
    // Without --old an UPDATE is taken as one that kept the row's key and index members, as
    // Postgres sends no old row then (with the default replica identity).
    let assume_same = change.op == Op::Update && no_old;
    let mirror_change = RowChange {
        old: if assume_same {
            OldRow::Full(new_tuple)
        } else {
            change.old
        },
        ..*change
    };
    let mut ops = Vec::new();
    for mirror in mirrors {
        explain_mirror(mirror, relation, &mirror_change, new_tuple, &mut ops);
    }
    let _ = writeln!(*out, "mirrors:");
    for line in &ops {
        let _ = writeln!(*out, "  {line}");
    }
    if assume_same {
        let _ = writeln!(
            *out,
            "  (no --old: taken as an update that kept the row's key and index members; \
                 give --old to see a move)"
        );
    }
}

/// The change's entry in its transaction's broadcast message, when `[broadcast]` covers it.
pub(super) fn write_broadcast(
    out: &mut String,
    config: &Config,
    relation: &RelationInfo,
    change: &RowChange<'_>,
    keys: &[String],
    deps: &[String],
) {
    if let Some(broadcast) = &config.broadcast {
        let broadcaster =
            BroadcastPlanner::new(broadcast).defaulting_to(&config.qualified_tables());
        if broadcaster.follows(relation) {
            let entry = broadcast_entry(&broadcaster, relation, change, keys, deps);
            let to = [
                broadcast.channel.as_ref().map(|c| format!("channel {c:?}")),
                broadcast.stream.as_ref().map(|s| format!("stream {s:?}")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" and ");
            let _ = writeln!(*out, "broadcast to {to}, in the transaction's message:");
            let _ = writeln!(*out, "  {entry}");
            if change.op != Op::Truncate {
                let _ = writeln!(
                    *out,
                    "  (pk: explain lists the columns given; walsweep lists the replica identity \
                     columns)"
                );
            }
        }
    }
}

/// Which types the JSON values were taken as (explain reads no database).
pub(super) fn write_type_guesses(
    out: &mut String,
    relation: &RelationInfo,
    old_text: &[Cell],
    new_text: &[Cell],
) {
    let guesses: Vec<String> = relation
        .columns
        .iter()
        .zip(old_text.iter().zip(new_text))
        .map(|(c, (o, n))| match (o, n) {
            (None, None) => format!("{} not given (as if not sent)", c.name),
            _ => format!("{} {}", c.name, type_name(c.type_oid)),
        })
        .collect();
    let _ = writeln!(
        *out,
        "column types guessed from the JSON (explain reads no database; `walsweep check` \
             checks the real ones): {}",
        guesses.join(", ")
    );
}

/// The change's entry in the broadcast message, as the daemon would list it.
fn broadcast_entry(
    broadcaster: &BroadcastPlanner,
    relation: &RelationInfo,
    change: &RowChange<'_>,
    keys: &[String],
    deps: &[String],
) -> String {
    let mut plan = BroadcastPlan::default();
    if change.op == Op::Truncate {
        broadcaster.add_truncate(relation, &mut plan);
    } else {
        // The replica identity is unknown here: the columns given stand in for it.
        let given = |i: usize| {
            let value = match change.op {
                Op::Delete => change.old_value(i),
                _ => change.new_value(i),
            };
            !matches!(value, None | Some(TupleValue::UnchangedToast))
        };
        let mut keyed = relation.clone();
        for (i, column) in keyed.columns.iter_mut().enumerate() {
            column.is_key = given(i);
        }
        let keyed_change = RowChange {
            relation: &keyed,
            ..*change
        };
        broadcaster.add_change(&keyed_change, keys, deps, &mut plan);
    }
    let body = plan.message_body(Lsn::from(0), 0, 0);
    // The body is `{"lsn":..,"changes":[ENTRY]}`; the LSN, time and xid exist only at commit.
    const OPEN: &str = "\"changes\":[";
    match body.find(OPEN) {
        Some(at) if body.ends_with("]}") => body[at + OPEN.len()..body.len() - 2].to_string(),
        _ => body,
    }
}

/// Appends the ops one mirror makes of the change, each as a line.
fn explain_mirror(
    mirror: &Arc<MirrorRule>,
    relation: &RelationInfo,
    change: &RowChange<'_>,
    new_tuple: &[TupleValue<'_>],
    out: &mut Vec<String>,
) {
    let at = format!("mirror[{}]", mirror.index);
    let plan = |rule: MirrorRule| {
        let mut planner = MirrorPlanner::new(vec![Arc::new(rule)]);
        planner.relation_changed(relation);
        let mut plan = MirrorPlan::default();
        if change.op == Op::Truncate {
            planner.plan_truncate(relation, &mut plan);
        } else {
            planner.plan_change(change, &mut plan);
        }
        plan
    };
    // The row's op comes from the mirror without indexes and each index's moves from the mirror
    // with only that index: a plan's index entries do not say which index they belong to.
    let row = plan(MirrorRule {
        indexes: Vec::new(),
        ..MirrorRule::clone(mirror)
    });
    let before = out.len();
    for op in row.ops() {
        match op {
            MirrorOp::Clear { cause, .. } => {
                let prefixes: Vec<String> =
                    mirror.prefixes().iter().map(|p| format!("{p}*")).collect();
                let why = match cause {
                    crate::plan::rules::FallbackCause::Truncate => "truncate".to_string(),
                    other => format!(
                        "{}: the change lacks a value the key needs, so the old entry cannot be \
                         found",
                        other.as_str()
                    ),
                };
                out.push(format!("{at} clear {} ({why})", prefixes.join(" ")));
                // Everything of this mirror is cleared; index moves would be moot.
                return;
            }
            MirrorOp::Write(write) => out.push(format!("{at} {}", describe_write(write))),
            MirrorOp::Delete { key, .. } if !key.is_empty() => {
                out.push(format!("{at} delete {key}"))
            }
            MirrorOp::Delete { .. } => {}
        }
    }
    let writes = row.ops().iter().any(|op| matches!(op, MirrorOp::Write(_)));
    for index in &mirror.indexes {
        let at = format!("{at} index[{}]", index.index);
        let plan = plan(MirrorRule {
            indexes: vec![index.clone()],
            ..MirrorRule::clone(mirror)
        });
        let mut added = false;
        for op in plan.ops() {
            match op {
                MirrorOp::Clear { prefixes, cause } => {
                    // The mirror's own clear was shown above.
                    if prefixes.len() == 1 {
                        out.push(format!(
                            "{at} clear {}* ({}: the change lacks a value the index key or \
                             member needs, so the old member cannot be found)",
                            prefixes[0],
                            cause.as_str()
                        ));
                    }
                }
                MirrorOp::Write(RowWrite {
                    index_removes,
                    index_adds,
                    ..
                }) => {
                    for r in index_removes {
                        out.push(format!("{at} zrem {} member {}", r.key, r.member));
                    }
                    for a in index_adds {
                        added = true;
                        let retention = match a.retention {
                            Some(r) => format!(
                                ", then drop members more than {} s older than the commit",
                                r.window_seconds
                            ),
                            None => String::new(),
                        };
                        out.push(format!(
                            "{at} zadd {} member {} score {}{retention}",
                            a.key, a.member, a.score
                        ));
                    }
                }
                MirrorOp::Delete { index_removes, .. } => {
                    for r in index_removes {
                        out.push(format!("{at} zrem {} member {}", r.key, r.member));
                    }
                }
            }
        }
        if writes && !added {
            if let Some(problem) = score_problem(index, relation, new_tuple) {
                out.push(format!(
                    "{at} no score, the row is left out of this index: {problem} (types are \
                     guessed, see below)"
                ));
            }
        }
    }
    if out.len() == before {
        out.push(format!("{at} nothing to do"));
    }
}

/// Why the new row has no score, if it has none: the planner only logs it.
fn score_problem(
    index: &IndexRule,
    relation: &RelationInfo,
    new_tuple: &[TupleValue<'_>],
) -> Option<String> {
    let types = TypeRegistry::new();
    let mut values = Vec::new();
    for column in index.score.columns() {
        let position = relation.column_index(column)?;
        let value = match new_tuple.get(position) {
            Some(TupleValue::Text(b)) | Some(TupleValue::Binary(b)) => {
                match decode_text(relation.columns[position].type_oid, b, &types) {
                    Ok(v) => v,
                    Err(e) => return Some(format!("column {column}: {e}")),
                }
            }
            Some(TupleValue::Null) => Value::Null,
            _ => return Some(format!("column {column} is not given")),
        };
        values.push(value);
    }
    let refs: Vec<&Value> = values.iter().collect();
    index
        .score
        .eval(&refs)
        .err()
        .map(|e| format!("score {:?}: {e}", index.score.source()))
}

/// `write KEY (json, ...): {...}`, with the fields as they would be stored.
fn describe_write(write: &RowWrite) -> String {
    let mut mode = vec![write.mode.format.as_str().to_string()];
    if write.mode.only_if_present {
        mode.push(format!("only if {} is already in Redis", write.source));
    }
    if write.mode.ttl_seconds > 0 {
        mode.push(format!("expires after {} s", write.mode.ttl_seconds));
    }
    if write.source != write.key {
        mode.push(format!("moved from {}", write.source));
    }
    let mut body = Vec::new();
    let mut kept = Vec::new();
    let mut no_field = Vec::new();
    for (name, field) in &write.fields {
        let name_json = Json::String(name.to_string()).to_string();
        match (field, write.mode.format) {
            (Field::Keep, _) => kept.push(name.to_string()),
            (Field::Null, MirrorFormat::Json) => body.push(format!("{name_json}:null")),
            (Field::Null, MirrorFormat::Hash) => no_field.push(name.to_string()),
            (Field::Value(v), MirrorFormat::Json) => body.push(format!("{name_json}:{v}")),
            (Field::Value(v), MirrorFormat::Hash) => {
                body.push(format!("{name_json}:{}", Json::String(v.clone())))
            }
        }
    }
    let mut line = match &write.document {
        Some(document) => format!("write {} ({}): {document}", write.key, mode.join(", ")),
        None => format!(
            "write {} ({}): {{{}}}",
            write.key,
            mode.join(", "),
            body.join(",")
        ),
    };
    if !no_field.is_empty() {
        let _ = write!(line, "   (no field, NULL: {})", no_field.join(", "));
    }
    if !kept.is_empty() {
        let _ = write!(line, "   (kept from the stored entry: {})", kept.join(", "));
    }
    line
}
