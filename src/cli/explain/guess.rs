//! Column types guessed from JSON values, since `explain` reads no database: a JSON number stands
//! for a number column, an object for jsonb, and a string a score column holds is taken as a time
//! when it reads as one (a score can use a string only through `epoch()`).

use serde_json::Value as Json;

use postgres_types::Type;

use crate::value::{decode_text, TypeRegistry};

/// Postgres text form of a JSON value, and the column type it most likely comes from: integers
/// as bigint and other numbers as double precision (what ids, counters and measurements usually
/// are, and what a score can use), objects and arrays as jsonb.
pub(super) fn pg_text(value: &Json) -> (Option<String>, u32) {
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
pub(super) fn guess_time_type(texts: &[&str]) -> Option<u32> {
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

pub(super) fn type_name(type_oid: u32) -> &'static str {
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
