//! `walsweep explain`: the effects one hypothetical row change would produce, and which rule
//! produced each: invalidations, mirror writes and the broadcast entry. Offline: the row is given
//! as JSON, no database is needed, so column types are guessed from the JSON values (and said
//! so in the output).

use std::fmt::Write as _;
use std::sync::Arc;

use postgres_types::Type;
use serde_json::Value as Json;

use crate::config::{Config, MirrorFormat};
use crate::pg::pgoutput::{ReplicaIdentity, TupleValue};
use crate::pg::Lsn;
use crate::plan::broadcast::{BroadcastPlan, BroadcastPlanner};
use crate::plan::mirror::plan::Field;
use crate::plan::mirror::{IndexRule, MirrorOp, MirrorPlan, MirrorPlanner, MirrorRule, RowWrite};
use crate::plan::rules::{Effect, Origin, RuleRef, Rules, RulesPlanner, TableRule};
use crate::plan::{ColumnInfo, OldRow, Op, RelationInfo, RowChange};
use crate::sink::redis::dep_set_key;
use crate::value::{decode_text, TypeRegistry, Value};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("no [[table]] named {0:?} in the config")]
    UnknownTable(String),
    #[error("--{which} is not a JSON object of column values: {reason}")]
    BadRow { which: &'static str, reason: String },
    #[error("--op {op} needs --{needs}")]
    MissingRow {
        op: &'static str,
        needs: &'static str,
    },
    #[error("the config does not compile: {0}; `walsweep check --no-environment` shows where")]
    Config(String),
}

fn parse_row(
    which: &'static str,
    text: Option<&str>,
) -> Result<Option<serde_json::Map<String, Json>>, ExplainError> {
    let Some(text) = text else { return Ok(None) };
    match serde_json::from_str::<Json>(text) {
        Ok(Json::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(ExplainError::BadRow {
            which,
            reason: "expected an object like {\"id\": 1}".into(),
        }),
        Err(e) => Err(ExplainError::BadRow {
            which,
            reason: e.to_string(),
        }),
    }
}

/// Postgres text form of a JSON value, and the column type it most likely comes from: integers
/// as bigint and other numbers as double precision (what ids, counters and measurements usually
/// are, and what a score can use), objects and arrays as jsonb.
fn pg_text(value: &Json) -> (Option<String>, u32) {
    match value {
        Json::Null => (None, Type::TEXT.oid()),
        Json::Bool(b) => (Some(if *b { "t" } else { "f" }.into()), Type::BOOL.oid()),
        Json::Number(n) if n.is_i64() => (Some(n.to_string()), Type::INT8.oid()),
        Json::Number(n) if n.is_f64() => (Some(n.to_string()), Type::FLOAT8.oid()),
        // Beyond bigint: only numeric holds it.
        Json::Number(n) => (Some(n.to_string()), Type::NUMERIC.oid()),
        Json::String(s) => (Some(s.clone()), Type::TEXT.oid()),
        other => (Some(other.to_string()), Type::JSONB.oid()),
    }
}

/// The type a string column named by a score most likely has: a score can only use a string
/// through epoch(), so one in Postgres' output form of a time is taken as that time.
fn guess_time_type(texts: &[&str]) -> Option<u32> {
    let types = TypeRegistry::new();
    [
        Type::TIMESTAMPTZ.oid(),
        Type::TIMESTAMP.oid(),
        Type::DATE.oid(),
    ]
    .into_iter()
    .find(|&t| {
        !texts.is_empty()
            && texts
                .iter()
                .all(|text| decode_text(t, text.as_bytes(), &types).is_ok())
    })
}

fn type_name(type_oid: u32) -> &'static str {
    match Type::from_oid(type_oid) {
        Some(Type::BOOL) => "boolean",
        Some(Type::INT8) => "bigint",
        Some(Type::FLOAT8) => "double precision",
        Some(Type::NUMERIC) => "numeric",
        Some(Type::JSONB) => "jsonb",
        Some(Type::TIMESTAMPTZ) => "timestamptz",
        Some(Type::TIMESTAMP) => "timestamp",
        Some(Type::DATE) => "date",
        _ => "text",
    }
}

/// Renders the effects as lines of text.
pub fn explain(
    config: &Config,
    table: &str,
    op: Op,
    old: Option<&str>,
    new: Option<&str>,
) -> Result<String, ExplainError> {
    let qualified = if table.contains('.') {
        table.to_string()
    } else {
        format!("public.{table}")
    };
    let rules = Rules::from_config(config).map_err(|e| ExplainError::Config(e.to_string()))?;
    let rule_set: Vec<_> = rules
        .tables
        .iter()
        .filter(|r| r.name == qualified)
        .cloned()
        .collect();
    if rule_set.is_empty() {
        return Err(ExplainError::UnknownTable(qualified));
    }
    let mirrors: Vec<Arc<MirrorRule>> = crate::plan::mirror::compile_all(&config.tables)
        .map_err(|e| ExplainError::Config(e.to_string()))?
        .into_iter()
        .filter(|m| m.table_name == qualified)
        .collect();
    let old = parse_row("old", old)?;
    let new = parse_row("new", new)?;
    match (op, &old, &new) {
        (Op::Insert, _, None) => {
            return Err(ExplainError::MissingRow {
                op: "insert",
                needs: "new",
            })
        }
        (Op::Update, _, None) => {
            return Err(ExplainError::MissingRow {
                op: "update",
                needs: "new",
            })
        }
        (Op::Delete, None, _) => {
            return Err(ExplainError::MissingRow {
                op: "delete",
                needs: "old",
            })
        }
        _ => {}
    }
    let (relation, old_text, new_text) = row_shape(&qualified, &rule_set, &mirrors, &old, &new);
    let old_tuple = to_tuple(&old_text);
    let new_tuple = to_tuple(&new_text);
    let mut planner = RulesPlanner::new(Rules {
        tables: rule_set.clone(),
    });
    let mut lines = Vec::new();
    let mut emit = |effect: Effect, origin: Origin| lines.push((effect, origin));
    let change = RowChange {
        relation: &relation,
        op,
        old: if old.is_some() {
            OldRow::Full(&old_tuple)
        } else {
            OldRow::Absent
        },
        new: new.as_ref().map(|_| new_tuple.as_slice()),
    };
    if op == Op::Truncate {
        planner.truncate_effects(&relation, &mut emit);
    } else {
        planner.effects(&change, &mut emit);
    }
    // What a broadcast lists: every effect as emitted, like the daemon's transaction planner.
    let (mut broadcast_keys, mut broadcast_deps) = (Vec::new(), Vec::new());
    for (effect, _) in &lines {
        crate::plan::broadcast::list_effect(effect, &mut broadcast_keys, &mut broadcast_deps);
    }
    let mut out = String::new();
    write_effects(
        &mut out,
        op,
        &qualified,
        lines,
        &rule_set,
        &config.matroska.prefix,
    );
    if !mirrors.is_empty() {
        write_mirrors(
            &mut out,
            &mirrors,
            &relation,
            &change,
            &new_tuple,
            old.is_none(),
        );
    }
    write_broadcast(
        &mut out,
        config,
        &relation,
        &change,
        &broadcast_keys,
        &broadcast_deps,
    );
    if !mirrors.is_empty() || config.broadcast.is_some() {
        write_type_guesses(&mut out, &relation, &old_text, &new_text);
    }
    Ok(out)
}

/// A column of a given row: not given (`None`), NULL (`Some(None)`) or its text.
type Cell = Option<Option<String>>;

/// The relation and rows `explain` plans: columns the rows give, then those the rules and
/// mirrors name (absent = not sent), typed from the JSON values.
fn row_shape(
    qualified: &str,
    rule_set: &[TableRule],
    mirrors: &[Arc<MirrorRule>],
    old: &Option<serde_json::Map<String, Json>>,
    new: &Option<serde_json::Map<String, Json>>,
) -> (RelationInfo, Vec<Cell>, Vec<Cell>) {
    // Columns: those the rows mention, then those the rules and mirrors mention (absent =
    // unknown).
    let mut names: Vec<String> = Vec::new();
    for map in [old, new].into_iter().flatten() {
        for k in map.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    let referenced = rule_set
        .iter()
        .flat_map(|r| r.referenced_columns())
        .chain(mirrors.iter().flat_map(|m| m.referenced_columns()));
    for (c, _) in referenced {
        if !names.contains(&c) {
            names.push(c);
        }
    }
    let score_columns: Vec<&String> = mirrors
        .iter()
        .flat_map(|m| m.indexes.iter().flat_map(|i| i.score.columns()))
        .collect();
    let cell = |map: &Option<serde_json::Map<String, Json>>, name: &str| -> (Cell, u32) {
        match map.as_ref().and_then(|m| m.get(name)) {
            Some(v) => {
                let (text, oid) = pg_text(v);
                (Some(text), oid)
            }
            None => (None, Type::TEXT.oid()),
        }
    };
    let mut columns = Vec::new();
    let mut old_text = Vec::new();
    let mut new_text = Vec::new();
    for name in &names {
        let (o, oid_o) = cell(old, name);
        let (n, oid_n) = cell(new, name);
        let mut type_oid = if oid_n != Type::TEXT.oid() {
            oid_n
        } else {
            oid_o
        };
        if type_oid == Type::TEXT.oid() && score_columns.contains(&name) {
            let texts: Vec<&str> = [&o, &n]
                .into_iter()
                .filter_map(|c| c.as_ref().and_then(|t| t.as_deref()))
                .collect();
            type_oid = guess_time_type(&texts).unwrap_or(type_oid);
        }
        columns.push(ColumnInfo {
            name: name.clone(),
            type_oid,
            type_modifier: -1,
            is_key: false,
        });
        old_text.push(o);
        new_text.push(n);
    }
    let relation = RelationInfo {
        oid: 1,
        namespace: qualified.split('.').next().unwrap_or("public").into(),
        name: qualified.split('.').nth(1).unwrap_or("").into(),
        qualified_name: qualified.to_string(),
        replica_identity: ReplicaIdentity::Full,
        columns,
    };
    (relation, old_text, new_text)
}

/// One line per distinct effect and rule, with the sides that produced it.
fn write_effects(
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
            (RuleRef::Hint, _) => "hint".into(),
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
fn write_mirrors(
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
fn write_broadcast(
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
fn write_type_guesses(
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

fn to_tuple(cells: &[Cell]) -> Vec<TupleValue<'_>> {
    cells
        .iter()
        .map(|c| match c {
            Some(Some(t)) => TupleValue::Text(t.as_bytes()),
            Some(None) => TupleValue::Null,
            // Not given: unknown, like a column a weak replica identity does not send.
            None => TupleValue::UnchangedToast,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[source]
url = "postgres://u@h/db"
[[table]]
name = "public.articles"
keys = ["article:{id}", "article:slug:{slug}"]
deps = ["id:article:{id}"]
columns = ["title", "slug", "category", "published"]
[[table.scope]]
name = "Article"
columns = ["published", "category"]
"#;

    #[test]
    fn update_changing_slug_and_category_explains_each_effect() {
        let config = Config::parse(CONFIG).unwrap();
        let out = explain(
            &config,
            "articles",
            Op::Update,
            Some(r#"{"id": 1, "slug": "old", "title": "t", "category": "x", "published": true}"#),
            Some(r#"{"id": 1, "slug": "new", "title": "t", "category": "y", "published": true}"#),
        )
        .unwrap();
        for expected in [
            "UNLINK article:1",
            "UNLINK article:slug:old",
            "UNLINK article:slug:new",
            "invalidate cache::rdep::id:article:1",
            "invalidate cache::rdep::condition:Article:&category=x&published=True&",
            "invalidate cache::rdep::condition:Article:&category=y&published=True&",
            "table[0].keys[1] \"article:slug:{slug}\", old row\n",
            "table[0].keys[0] \"article:{id}\", old row + new row",
        ] {
            assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
        }
    }

    #[test]
    fn update_of_unwatched_column_does_nothing() {
        let config = Config::parse(CONFIG).unwrap();
        let out = explain(
            &config,
            "articles",
            Op::Update,
            Some(r#"{"id": 1, "slug": "s", "title": "t", "category": "x", "published": true, "views": 1}"#),
            Some(r#"{"id": 1, "slug": "s", "title": "t", "category": "x", "published": true, "views": 2}"#),
        )
        .unwrap();
        assert!(
            out.starts_with("update public.articles: 0 effect(s)"),
            "{out}"
        );
    }

    const MIRRORED: &str = r#"
[source]
url = "postgres://u@h/db"
[[table]]
name = "public.readings"
keys = ["reading-page:{device_id}"]
[[table.mirror]]
key = "reading:{device_id}:{seq}"
[[table.mirror.index]]
key = "readings:{device_id}"
member = "{device_id}:{seq}"
score = "(device_id << 32) | epoch(ts)"
[[table]]
name = "public.items"
[[table.mirror]]
key = "item:{id}"
format = "hash"
only_if_present = true
ttl_seconds = 60
[broadcast]
channel = "walsweep:changes"
tables = ["readings"]
"#;

    fn explain_mirrored(table: &str, op: Op, old: Option<&str>, new: Option<&str>) -> String {
        let config = Config::parse(MIRRORED).unwrap();
        explain(&config, table, op, old, new).unwrap()
    }

    fn assert_lines(out: &str, expected: &[&str]) {
        for line in expected {
            assert!(
                out.lines().any(|l| l.trim_end() == *line),
                "missing line {line:?} in:\n{out}"
            );
        }
    }

    #[test]
    fn insert_writes_the_json_row_and_adds_it_to_the_index() {
        let out = explain_mirrored(
            "readings",
            Op::Insert,
            None,
            Some(r#"{"device_id": 3, "seq": 17, "ts": "2024-01-02 03:04:05+00", "v": 1.5}"#),
        );
        // 3 << 32 | 1704164645 (2024-01-02 03:04:05 UTC).
        assert_lines(
            &out,
            &[
                "mirrors:",
                "  mirror[0] write reading:3:17 (json): {\"device_id\":3,\"seq\":17,\
                 \"ts\":\"2024-01-02T03:04:05+00:00\",\"v\":1.5}",
                "  mirror[0] index[0] zadd readings:3 member 3:17 score 14589066533",
                "column types guessed from the JSON (explain reads no database; `walsweep check` \
                 checks the real ones): device_id bigint, seq bigint, ts timestamptz, \
                 v double precision",
            ],
        );
    }

    #[test]
    fn update_moving_the_key_moves_the_row_and_its_member() {
        let out = explain_mirrored(
            "readings",
            Op::Update,
            Some(r#"{"device_id": 2, "seq": 16, "ts": "2024-01-02 03:04:05+00"}"#),
            Some(r#"{"device_id": 3, "seq": 17, "ts": "2024-01-02 03:04:05+00"}"#),
        );
        assert_lines(
            &out,
            &[
                "mirrors:",
                "  mirror[0] write reading:3:17 (json, moved from reading:2:16): \
                 {\"device_id\":3,\"seq\":17,\"ts\":\"2024-01-02T03:04:05+00:00\"}",
                "  mirror[0] index[0] zrem readings:2 member 2:16",
                "  mirror[0] index[0] zadd readings:3 member 3:17 score 14589066533",
            ],
        );
        // Without --old the key is taken as unchanged: no move, no removal.
        let out = explain_mirrored(
            "readings",
            Op::Update,
            None,
            Some(r#"{"device_id": 3, "seq": 17, "ts": "2024-01-02 03:04:05+00"}"#),
        );
        assert!(
            !out.contains("moved from") && !out.contains("zrem"),
            "{out}"
        );
        assert!(
            out.contains("(no --old: taken as an update that kept"),
            "{out}"
        );
    }

    #[test]
    fn delete_removes_the_row_and_its_member() {
        let out = explain_mirrored(
            "readings",
            Op::Delete,
            Some(r#"{"device_id": 3, "seq": 17, "ts": "2024-01-02 03:04:05+00"}"#),
            None,
        );
        assert_lines(
            &out,
            &[
                "mirrors:",
                "  mirror[0] delete reading:3:17",
                "  mirror[0] index[0] zrem readings:3 member 3:17",
            ],
        );
    }

    #[test]
    fn truncate_clears_every_prefix_of_the_mirror() {
        let out = explain_mirrored("readings", Op::Truncate, None, None);
        assert_lines(&out, &["  mirror[0] clear reading:* readings:* (truncate)"]);
    }

    #[test]
    fn only_if_present_hash_mirror_says_so_and_keeps_unsent_values() {
        let out = explain_mirrored(
            "items",
            Op::Update,
            Some(r#"{"id": 7, "name": "x", "note": null}"#),
            Some(r#"{"id": 7, "name": "y", "note": null, "flag": true}"#),
        );
        assert_lines(
            &out,
            &[
                "  mirror[0] write item:7 (hash, only if item:7 is already in Redis, expires \
               after 60 s): {\"id\":\"7\",\"name\":\"y\",\"flag\":\"true\"}   (no field, NULL: \
               note)",
            ],
        );
        // A column left out of --new is one the change did not send (unchanged TOAST).
        let out = explain_mirrored(
            "items",
            Op::Update,
            Some(r#"{"id": 7, "name": "x"}"#),
            Some(r#"{"id": 7}"#),
        );
        assert!(
            out.contains("{\"id\":\"7\"}   (kept from the stored entry: name)"),
            "{out}"
        );
        assert!(!out.contains("broadcast"), "items is not broadcast: {out}");
    }

    #[test]
    fn broadcast_entry_lists_the_change_with_its_invalidations() {
        let out = explain_mirrored(
            "readings",
            Op::Insert,
            None,
            Some(r#"{"device_id": 3, "seq": 17, "ts": "2024-01-02 03:04:05+00"}"#),
        );
        assert_lines(
            &out,
            &[
                "broadcast to channel \"walsweep:changes\", in the transaction's message:",
                "  {\"table\":\"public.readings\",\"op\":\"insert\",\"pk\":\
                 {\"device_id\":3,\"seq\":17,\"ts\":\"2024-01-02T03:04:05+00:00\"},\
                 \"keys\":[\"reading-page:3\"],\"deps\":[]}",
            ],
        );
        let out = explain_mirrored("readings", Op::Truncate, None, None);
        assert!(
            out.contains("  {\"table\":\"public.readings\",\"op\":\"truncate\"}"),
            "{out}"
        );
    }

    #[test]
    fn a_row_without_a_score_says_why() {
        let out = explain_mirrored(
            "readings",
            Op::Insert,
            None,
            Some(r#"{"device_id": 3, "seq": 17, "ts": "2024-01-02T03:04:05Z"}"#),
        );
        assert!(!out.contains("zadd"), "{out}");
        assert!(
            out.contains(
                "  mirror[0] index[0] no score, the row is left out of this index: score \
                 \"(device_id << 32) | epoch(ts)\": column ts holds text"
            ),
            "{out}"
        );
        assert!(out.contains("ts text"), "{out}");
    }

    #[test]
    fn bad_input_is_named() {
        let config = Config::parse(CONFIG).unwrap();
        let err = explain(&config, "nope", Op::Insert, None, Some("{}")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no [[table]] named \"public.nope\" in the config"
        );
        let err = explain(&config, "articles", Op::Insert, None, Some("[1]")).unwrap_err();
        assert!(
            err.to_string().starts_with("--new is not a JSON object"),
            "{err}"
        );
        let err = explain(&config, "articles", Op::Delete, None, None).unwrap_err();
        assert_eq!(err.to_string(), "--op delete needs --old");
    }
}
