//! Rows read over SQL in the form pgoutput sends them, planned by the mirror planner the stream
//! uses: warm-up loads mirrors this way, and drift checks (`walsweep verify`, the inspector)
//! compute what a mirror must hold this way, so all three agree byte for byte with streaming.

use std::sync::Arc;

use tokio_postgres::SimpleQueryRow;

use crate::pg::catalog::CatalogError;
use crate::pg::pgoutput::{ReplicaIdentity, TupleValue};
use crate::plan::mirror::{MirrorPlanner, MirrorRule};
use crate::plan::{ColumnInfo, RelationInfo};

/// The session settings the walsender renders text under, for the transaction that reads rows:
/// the same timestamps, floats and bytea text as in the stream. `SET LOCAL` takes no snapshot,
/// so this may precede a transaction's first query.
pub(crate) const STREAM_TEXT_FORMS: &str =
    "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO'; \
     SET LOCAL IntervalStyle = 'postgres'; SET LOCAL extra_float_digits = 3; \
     SET LOCAL bytea_output = 'hex'";

/// The table's shape as a Relation message would give it (identity flags are not needed: a row
/// read over SQL is planned as an INSERT); `None` when the table does not exist.
pub(crate) async fn relation_info(
    client: &tokio_postgres::Client,
    table: &str,
) -> Result<Option<RelationInfo>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, a.attname::text, a.atttypid, \
                    a.atttypmod \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             WHERE n.nspname = $1 AND c.relname = $2 ORDER BY a.attnum",
            &[
                &table.split_once('.').map_or("public", |(s, _)| s),
                &table.split_once('.').map_or(table, |(_, t)| t),
            ],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let oid: u32 = first.get(0);
    let namespace: String = first.get(1);
    let name: String = first.get(2);
    Ok(Some(RelationInfo {
        oid,
        qualified_name: format!("{namespace}.{name}"),
        namespace,
        name,
        replica_identity: ReplicaIdentity::Default,
        columns: rows
            .iter()
            .map(|r| ColumnInfo {
                name: r.get(3),
                type_oid: r.get(4),
                type_modifier: r.get(5),
                is_key: false,
            })
            .collect(),
        undecodable: None,
    }))
}

/// A planner for `mirrors` (all of `relation`'s table), with enums, domains and their arrays
/// typed as streaming types them.
pub(crate) async fn planner_for(
    client: &tokio_postgres::Client,
    relation: &RelationInfo,
    mirrors: Vec<Arc<MirrorRule>>,
) -> Result<MirrorPlanner, CatalogError> {
    let mut types = crate::value::TypeRegistry::new();
    crate::stream::types::resolve_types(
        client,
        &mut types,
        relation.columns.iter().map(|c| c.type_oid),
    )
    .await?;
    let mut planner = MirrorPlanner::new(mirrors);
    planner.relation_changed(relation);
    planner.register_types(&types);
    Ok(planner)
}

/// The row's columns from `skip` on, as the text pgoutput sends (simple queries return text).
pub(crate) fn tuple_values(row: &SimpleQueryRow, skip: usize) -> Vec<TupleValue<'_>> {
    (skip..row.len())
        .map(|i| match row.get(i) {
            Some(text) => TupleValue::Text(text.as_bytes()),
            None => TupleValue::Null,
        })
        .collect()
}

/// `"schema"."table"` of a relation.
pub(crate) fn qualified(relation: &RelationInfo) -> String {
    format!(
        "{}.{}",
        crate::pg::replication::quote_ident(&relation.namespace),
        crate::pg::replication::quote_ident(&relation.name)
    )
}
