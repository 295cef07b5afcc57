//! Where the types a Relation message names become known: enums, domains and arrays looked up
//! in `pg_type`, so the rules, the mirrors and `tail` render their values like the built-in
//! types they stand for.

use tokio_postgres::Client;

use crate::pg::catalog::{self, CatalogError};
use crate::pg::replication::ConnectParams;
use crate::value::{TypeInfo, TypeKind, TypeRegistry};

/// The types known so far and a catalog connection kept for the rare lookup mid-stream (a type
/// created after streaming started), so no connection is opened per Relation message.
#[derive(Default)]
pub(crate) struct TypeResolver {
    registry: TypeRegistry,
    client: Option<Client>,
}

impl TypeResolver {
    pub(crate) fn new() -> Self {
        TypeResolver::default()
    }

    pub(crate) fn registry(&self) -> &TypeRegistry {
        &self.registry
    }

    /// Keeps `client` for later lookups (the session's catalog connection).
    pub(crate) fn keep_connection(&mut self, client: Client) {
        self.client = Some(client);
    }

    /// Every column type of the tables in `publication`, looked up before streaming starts so
    /// the first rows are rendered right without a lookup in the middle of the stream. Returns
    /// whether anything new became known.
    pub(crate) async fn resolve_publication(
        &mut self,
        client: &Client,
        publication: &str,
    ) -> Result<bool, CatalogError> {
        let rows = client
            .query(
                "SELECT DISTINCT a.atttypid \
                 FROM pg_publication_tables p \
                 JOIN pg_namespace n ON n.nspname = p.schemaname \
                 JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
                 JOIN pg_attribute a ON a.attrelid = c.oid \
                 WHERE p.pubname = $1 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&publication],
            )
            .await
            .map_err(|source| CatalogError::Query {
                what: "reading the column types of the publication's tables",
                source,
            })?;
        let oids: Vec<u32> = rows.iter().map(|row| row.get(0)).collect();
        let unresolved = self.registry.unresolved(oids);
        if unresolved.is_empty() {
            return Ok(false);
        }
        resolve_types(client, &mut self.registry, unresolved).await?;
        Ok(true)
    }

    /// Looks up what `oids` need, over the kept connection (opened again when it closed).
    /// Returns whether anything new became known.
    pub(crate) async fn resolve(
        &mut self,
        params: &ConnectParams,
        oids: impl IntoIterator<Item = u32>,
    ) -> Result<bool, CatalogError> {
        let unresolved = self.registry.unresolved(oids);
        if unresolved.is_empty() {
            return Ok(false);
        }
        let client = match self.client.take() {
            Some(client) if !client.is_closed() => client,
            _ => catalog::connect(params).await?,
        };
        let result = resolve_types(&client, &mut self.registry, unresolved).await;
        self.client = Some(client);
        result.map(|()| true)
    }
}

/// Looks up `oids` (and the bases and elements they refer to) in `pg_type` and registers what
/// they are; built-in types need no lookup.
pub async fn resolve_types(
    client: &Client,
    registry: &mut TypeRegistry,
    oids: impl IntoIterator<Item = u32>,
) -> Result<(), CatalogError> {
    let mut pending = registry.unresolved(oids);
    // Domains over arrays of domains... each round resolves one level.
    for _ in 0..16 {
        if pending.is_empty() {
            return Ok(());
        }
        let rows = client
            .query(
                "SELECT t.oid, n.nspname::text, t.typname::text, t.typtype::text, \
                        t.typbasetype, t.typelem, t.typcategory::text, t.typdelim::text \
                 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
                 WHERE t.oid = ANY($1)",
                &[&pending],
            )
            .await
            .map_err(|source| CatalogError::Query {
                what: "reading pg_type",
                source,
            })?;
        let mut referenced = Vec::new();
        for row in &rows {
            let type_oid: u32 = row.get(0);
            let namespace: String = row.get(1);
            let name: String = row.get(2);
            let typtype: String = row.get(3);
            let base: u32 = row.get(4);
            let element: u32 = row.get(5);
            let category: String = row.get(6);
            let delimiter: String = row.get(7);
            let kind = match typtype.as_str() {
                "e" => TypeKind::Enum,
                "d" if base != 0 => {
                    referenced.push(base);
                    TypeKind::Domain { base }
                }
                _ if category == "A" && element != 0 => {
                    referenced.push(element);
                    TypeKind::Array {
                        element,
                        delimiter: delimiter.bytes().next().unwrap_or(b','),
                    }
                }
                _ => TypeKind::Other,
            };
            registry.insert(
                type_oid,
                TypeInfo {
                    name: format!("{namespace}.{name}"),
                    kind,
                },
            );
        }
        for type_oid in &pending {
            if registry.get(*type_oid).is_none() {
                // Dropped since: read as text, and do not ask again.
                registry.insert(
                    *type_oid,
                    TypeInfo {
                        name: format!("type oid {type_oid}"),
                        kind: TypeKind::Other,
                    },
                );
            }
        }
        pending = registry.unresolved(referenced);
    }
    Ok(())
}
