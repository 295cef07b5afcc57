//! `walsweep explain`: the effects one hypothetical row change would produce, and which rule
//! produced each. Offline: the row is given as JSON, no database is needed.

use std::fmt::Write as _;

use serde_json::Value as Json;

use crate::config::Config;
use crate::pg::pgoutput::{ReplicaIdentity, TupleValue};
use crate::plan::{ColumnInfo, OldRow, Op, RelationInfo, RowChange};
use crate::redis::dep_set_key;
use crate::rules::pystr::BOOL_OID;
use crate::rules::{Effect, Origin, RuleRef, Rules, RulesPlanner};

const TEXT_OID: u32 = 25;
const NUMERIC_OID: u32 = 1700;

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

/// Postgres text form and type of a JSON value.
fn pg_text(value: &Json) -> (Option<String>, u32) {
    match value {
        Json::Null => (None, TEXT_OID),
        Json::Bool(b) => (Some(if *b { "t" } else { "f" }.into()), BOOL_OID),
        Json::Number(n) => (Some(n.to_string()), NUMERIC_OID),
        Json::String(s) => (Some(s.clone()), TEXT_OID),
        other => (Some(other.to_string()), TEXT_OID),
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
    let rules = Rules::from_config(config).map_err(|e| ExplainError::BadRow {
        which: "config",
        reason: e.to_string(),
    })?;
    let rule_set: Vec<_> = rules
        .tables
        .iter()
        .filter(|r| r.name == qualified)
        .cloned()
        .collect();
    if rule_set.is_empty() {
        return Err(ExplainError::UnknownTable(qualified));
    }
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
    // Columns: those the rows mention, then those the rules mention (absent = unknown).
    let mut names: Vec<String> = Vec::new();
    for map in [&old, &new].into_iter().flatten() {
        for k in map.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    for rule in &rule_set {
        for (c, _) in rule.referenced_columns() {
            if !names.contains(&c) {
                names.push(c);
            }
        }
    }
    let cell = |map: &Option<serde_json::Map<String, Json>>,
                name: &str|
     -> (Option<Option<String>>, u32) {
        match map.as_ref().and_then(|m| m.get(name)) {
            Some(v) => {
                let (text, oid) = pg_text(v);
                (Some(text), oid)
            }
            None => (None, TEXT_OID),
        }
    };
    let mut columns = Vec::new();
    let mut old_text = Vec::new();
    let mut new_text = Vec::new();
    for name in &names {
        let (o, oid_o) = cell(&old, name);
        let (n, oid_n) = cell(&new, name);
        columns.push(ColumnInfo {
            name: name.clone(),
            type_oid: if oid_n != TEXT_OID { oid_n } else { oid_o },
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
        qualified_name: qualified.clone(),
        replica_identity: ReplicaIdentity::Full,
        columns,
    };
    let old_tuple = to_tuple(&old_text);
    let new_tuple = to_tuple(&new_text);
    let mut planner = RulesPlanner::new(Rules {
        tables: rule_set.clone(),
    });
    let mut lines = Vec::new();
    let mut emit = |effect: Effect, origin: Origin| lines.push((effect, origin));
    if op == Op::Truncate {
        planner.truncate_effects(&relation, &mut emit);
    } else {
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
        planner.effects(&change, &mut emit);
    }
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
    let prefix = &config.matroska.prefix;
    let mut out = String::new();
    let _ = writeln!(
        out,
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
        let _ = writeln!(out, "  {what:<60}  <- {source}, {}", sides.join(" + "));
    }
    Ok(out)
}

fn to_tuple(cells: &[Option<Option<String>>]) -> Vec<TupleValue<'_>> {
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
