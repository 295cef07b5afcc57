//! The rows `explain` is given, as JSON objects of column values, turned into what the planners
//! take: a relation whose columns are those the rows and rules name, and a tuple per row.

use postgres_types::Type;

use std::sync::Arc;

use serde_json::Value as Json;

use crate::pg::pgoutput::{ReplicaIdentity, TupleValue};
use crate::plan::mirror::MirrorRule;
use crate::plan::rules::TableRule;
use crate::plan::{ColumnInfo, RelationInfo};

use super::guess::{guess_time_type, pg_text};
use super::ExplainError;

pub(super) fn parse_row(
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

/// A column of a given row: not given (`None`), NULL (`Some(None)`) or its text.
pub(super) type Cell = Option<Option<String>>;

/// The relation and rows `explain` plans: columns the rows give, then those the rules and
/// mirrors name (absent = not sent), typed from the JSON values.
pub(super) fn row_shape(
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
        undecodable: None,
    };
    (relation, old_text, new_text)
}

pub(super) fn to_tuple(cells: &[Cell]) -> Vec<TupleValue<'_>> {
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
