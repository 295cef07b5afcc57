//! Column types guessed from JSON values, since `explain` reads no database: a JSON number stands
//! for a number column, an object for jsonb, and a string a score column holds is taken as a time
//! when it reads as one (a score can use a string only through `epoch()`).

use serde_json::Value as Json;

use crate::value::{decode_text, oid, TypeRegistry};

/// Postgres text form of a JSON value, and the column type it most likely comes from: integers
/// as bigint and other numbers as double precision (what ids, counters and measurements usually
/// are, and what a score can use), objects and arrays as jsonb.
pub(super) fn pg_text(value: &Json) -> (Option<String>, u32) {
    match value {
        Json::Null => (None, oid::TEXT),
        Json::Bool(b) => (Some(if *b { "t" } else { "f" }.into()), oid::BOOL),
        Json::Number(n) if n.is_i64() => (Some(n.to_string()), oid::INT8),
        Json::Number(n) if n.is_f64() => (Some(n.to_string()), oid::FLOAT8),
        // Beyond bigint: only numeric holds it.
        Json::Number(n) => (Some(n.to_string()), oid::NUMERIC),
        Json::String(s) => (Some(s.clone()), oid::TEXT),
        other => (Some(other.to_string()), oid::JSONB),
    }
}

/// The type a string column named by a score most likely has: a score can only use a string
/// through epoch(), so one in Postgres' output form of a time is taken as that time.
pub(super) fn guess_time_type(texts: &[&str]) -> Option<u32> {
    let types = TypeRegistry::new();
    [oid::TIMESTAMPTZ, oid::TIMESTAMP, oid::DATE]
        .into_iter()
        .find(|&t| {
            !texts.is_empty()
                && texts
                    .iter()
                    .all(|text| decode_text(t, text.as_bytes(), &types).is_ok())
        })
}

pub(super) fn type_name(type_oid: u32) -> &'static str {
    match type_oid {
        oid::BOOL => "boolean",
        oid::INT8 => "bigint",
        oid::FLOAT8 => "double precision",
        oid::NUMERIC => "numeric",
        oid::JSONB => "jsonb",
        oid::TIMESTAMPTZ => "timestamptz",
        oid::TIMESTAMP => "timestamp",
        oid::DATE => "date",
        _ => "text",
    }
}
