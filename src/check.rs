//! `walsweep check`: offline lint of the config, then checks against the live database and
//! Redis. Collects every finding instead of stopping at the first, like a compiler.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use crate::config::Config;
use crate::pg::catalog::{self, qualified_ident, split_table_name};
use crate::pipeline::display_chain;
use crate::plan::Op;
use crate::rules::{Rules, TableRule};

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
    /// Tables whose rules need REPLICA IDENTITY FULL (for `setup`).
    pub needs_full_identity: Vec<String>,
    /// Tables not yet in the publication (for `setup`).
    pub missing_from_publication: Vec<String>,
}

/// One column of a table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct CatalogColumn {
    pub name: String,
    pub in_identity: bool,
}

/// Columns and replica identity of a table; `None` when the table does not exist.
pub async fn table_shape(
    client: &Client,
    table: &str,
) -> Result<Option<(char, Vec<CatalogColumn>)>, tokio_postgres::Error> {
    let (schema, name) = split_table_name(table);
    let rows = client
        .query(
            "SELECT a.attname::text, c.relreplident::text,
                    CASE c.relreplident
                      WHEN 'f' THEN true
                      WHEN 'd' THEN a.attnum = ANY(coalesce((SELECT i.indkey::int2[] FROM pg_index i
                                     WHERE i.indrelid = c.oid AND i.indisprimary), '{}'))
                      WHEN 'i' THEN a.attnum = ANY(coalesce((SELECT i.indkey::int2[] FROM pg_index i
                                     WHERE i.indrelid = c.oid AND i.indisreplident), '{}'))
                      ELSE false END
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
             ORDER BY a.attnum",
            &[&schema, &name],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let identity = first.get::<_, String>(1).chars().next().unwrap_or('d');
    Ok(Some((
        identity,
        rows.iter()
            .map(|r| CatalogColumn {
                name: r.get(0),
                in_identity: r.get(2),
            })
            .collect(),
    )))
}

/// Columns a rule must read from the OLD row (UPDATE/DELETE), with what needs each.
fn old_row_columns(rule: &TableRule) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if !(rule.ops.contains(&Op::Update) || rule.ops.contains(&Op::Delete)) {
        return out;
    }
    for (column, used_by) in rule.referenced_columns() {
        if used_by == "columns" {
            continue; // only decides whether an UPDATE counts; unknown old = changed
        }
        out.entry(column).or_default().push(used_by);
    }
    out
}

/// Checks against the live database and Redis.
pub async fn check_environment(config: &Config, rules: &Rules, report: &mut Report) {
    let params = match config.source.connect_params() {
        Ok(p) => p,
        Err(e) => {
            report.errors.push(e.to_string());
            return;
        }
    };
    match catalog::connect(&params).await {
        Err(e) => report.errors.push(format!(
            "{}; check source.url (or WALSWEEP_SOURCE_URL) and that Postgres is up",
            display_chain(&e)
        )),
        Ok(client) => check_database(config, rules, &client, report).await,
    }
    check_redis(config, report).await;
}

async fn check_database(config: &Config, rules: &Rules, client: &Client, report: &mut Report) {
    let source = &config.source;
    match catalog::wal_level(client).await {
        Ok(level) if level == "logical" => {}
        Ok(level) => report.errors.push(format!(
            "wal_level is {level:?}; run ALTER SYSTEM SET wal_level = logical and restart Postgres"
        )),
        Err(e) => report.errors.push(display_chain(&e)),
    }
    let publication_exists = match catalog::publication_exists(client, &source.publication).await {
        Ok(exists) => exists,
        Err(e) => {
            report.errors.push(display_chain(&e));
            false
        }
    };
    if !publication_exists {
        let fix = catalog::create_publication_sql(&source.publication, &config.qualified_tables());
        if source.create_publication {
            report.notes.push(format!(
                "publication {:?} does not exist; walsweep run will create it: {fix}",
                source.publication
            ));
        } else {
            report.errors.push(format!(
                "publication {:?} does not exist; create it: {fix}",
                source.publication
            ));
        }
    }
    match catalog::slot_state(client, &source.slot).await {
        Ok(Some(slot)) if slot.plugin.as_deref() != Some("pgoutput") => {
            report.errors.push(format!(
                "slot {:?} uses plugin {:?}, not pgoutput; drop it or set source.slot",
                source.slot, slot.plugin
            ))
        }
        Ok(Some(slot)) if slot.wal_status.as_deref() == Some("lost") => {
            report.errors.push(format!(
            "slot {:?} is lost (its WAL was removed); caches may have missed changes: drop and \
             recreate the slot, then clear the caches",
            source.slot
        ))
        }
        Ok(Some(_)) => {}
        Ok(None) if source.create_slot => report.notes.push(format!(
            "slot {:?} does not exist; walsweep run will create it",
            source.slot
        )),
        Ok(None) => report.errors.push(format!(
            "slot {:?} does not exist and source.create_slot is false; create it: SELECT \
             pg_create_logical_replication_slot('{}', 'pgoutput')",
            source.slot, source.slot
        )),
        Err(e) => report.errors.push(display_chain(&e)),
    }
    for rule in &rules.tables {
        let label = format!("table[{}] ({})", rule.index, rule.name);
        let shape = match table_shape(client, &rule.name).await {
            Ok(Some(shape)) => shape,
            Ok(None) => {
                report.errors.push(format!(
                    "{label}: table {} does not exist in the source database",
                    rule.name
                ));
                continue;
            }
            Err(e) => {
                report.errors.push(format!("{label}: {e}"));
                continue;
            }
        };
        let (identity, columns) = shape;
        for (column, used_by) in rule.referenced_columns() {
            if !columns.iter().any(|c| c.name == column) {
                report.errors.push(format!(
                    "{label}: {used_by} names column {column:?}, which the table does not have \
                     (columns: {})",
                    columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        let weak: Vec<String> = old_row_columns(rule)
            .into_iter()
            .filter(|(column, _)| columns.iter().any(|c| &c.name == column && !c.in_identity))
            .map(|(column, used_by)| format!("{column} (used by {})", used_by.join(", ")))
            .collect();
        if !weak.is_empty() {
            let identity_name = match identity {
                'n' => "NOTHING",
                'i' => "USING INDEX",
                'f' => "FULL",
                _ => "DEFAULT",
            };
            report.errors.push(format!(
                "{label}: replica identity {identity_name} does not send the old value of {} on \
                 UPDATE/DELETE, so those changes would fall back to table-wide invalidation; \
                 run: ALTER TABLE {} REPLICA IDENTITY FULL;",
                weak.join("; "),
                qualified_ident(&rule.name)
            ));
            report.needs_full_identity.push(rule.name.clone());
        }
        if publication_exists {
            let (schema, name) = split_table_name(&rule.name);
            let member = client
                .query_opt(
                    "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 \
                     AND tablename = $3",
                    &[&source.publication, &schema, &name],
                )
                .await;
            match member {
                Ok(Some(_)) => {}
                Ok(None) => {
                    report.errors.push(format!(
                        "{label}: not in publication {:?}; run: ALTER PUBLICATION {} ADD TABLE {};",
                        source.publication,
                        crate::pg::replication::quote_ident(&source.publication),
                        qualified_ident(&rule.name)
                    ));
                    report.missing_from_publication.push(rule.name.clone());
                }
                Err(e) => report.errors.push(format!("{label}: {e}")),
            }
        }
    }
}

async fn check_redis(config: &Config, report: &mut Report) {
    let client = match crate::redis::redis_client(&config.redis) {
        Ok(c) => c,
        Err(e) => {
            report.errors.push(e.to_string());
            return;
        }
    };
    let timeout = std::time::Duration::from_millis(config.redis.timeout_ms);
    let ping = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        ::redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(timeout, ping).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => report.errors.push(format!(
            "Redis does not answer PING: {e}; check redis.url (or WALSWEEP_REDIS_URL)"
        )),
        Err(_) => report.errors.push(format!(
            "Redis did not answer PING within {} ms; check redis.url (or WALSWEEP_REDIS_URL)",
            config.redis.timeout_ms
        )),
    }
}
