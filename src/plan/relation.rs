//! What walsweep knows about a published table, from pgoutput Relation messages.

use crate::pg::pgoutput::{DecodeError, Relation, ReplicaIdentity};

#[derive(Debug, Clone, PartialEq)]
pub struct ColumnInfo {
    pub name: String,
    pub(crate) type_oid: u32,
    pub(crate) type_modifier: i32,
    /// Part of the replica identity (primary key or identity index, or every column with FULL).
    pub(crate) is_key: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RelationInfo {
    pub(crate) oid: u32,
    pub(crate) namespace: String,
    pub(crate) name: String,
    /// `schema.table`, the form config uses.
    pub qualified_name: String,
    pub(crate) replica_identity: ReplicaIdentity,
    pub columns: Vec<ColumnInfo>,
    /// Set when a name is not valid UTF-8 (the names above are then lossy): no rule can be
    /// matched against it reliably, so its changes are skipped, or the stream stops if a
    /// planner needs the relation anyway.
    pub(crate) undecodable: Option<DecodeError>,
}

impl RelationInfo {
    pub(crate) fn from_message(rel: &Relation<'_>) -> Self {
        RelationInfo {
            oid: rel.oid,
            namespace: rel.namespace.to_string(),
            name: rel.name.to_string(),
            qualified_name: format!("{}.{}", rel.namespace, rel.name),
            replica_identity: rel.replica_identity,
            columns: rel
                .columns
                .iter()
                .map(|c| ColumnInfo {
                    name: c.name.to_string(),
                    type_oid: c.type_oid,
                    type_modifier: c.type_modifier,
                    is_key: c.is_key(),
                })
                .collect(),
            undecodable: rel.undecodable.clone(),
        }
    }

    pub(crate) fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// Indexes of the identity columns, or of every column when the table has none
    /// (REPLICA IDENTITY NOTHING), so a row can still be told apart by its full contents.
    pub(crate) fn key_indexes(&self) -> Vec<usize> {
        let keys: Vec<usize> = (0..self.columns.len())
            .filter(|&i| self.columns[i].is_key)
            .collect();
        if keys.is_empty() {
            (0..self.columns.len()).collect()
        } else {
            keys
        }
    }
}
