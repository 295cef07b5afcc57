//! The checks against the live database: wal_level, publication, tables, columns, replica
//! identity, and mirrors against each table's catalog shape.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use crate::config::Config;
use crate::pg::catalog::{self, qualified_ident, split_table_name};
use crate::pg::slot_invalidation::Invalidation;
use crate::plan::mirror::MirrorRule;
use crate::plan::rules::{Rules, TableRule};
use crate::plan::Op;
use crate::telemetry::log::display_chain;

use super::{push_once, Report};

/// One column of a table as the catalog describes it.
#[derive(Debug, Clone)]
pub(crate) struct CatalogColumn {
    pub(crate) name: String,
    pub(crate) in_identity: bool,
    /// `pg_attribute.atttypid` (a domain's own OID, not its base type's: pgoutput sends it so).
    pub(crate) type_oid: u32,
    /// Storage other than `plain`: the value may be TOASTed, and then an UPDATE that leaves it
    /// unchanged does not send it.
    pub(crate) toastable: bool,
}

/// Columns and replica identity of a table; `None` when the table does not exist.
pub(crate) async fn table_shape(
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
                      ELSE false END,
                    a.atttypid, a.attstorage::text <> 'p'
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
                type_oid: r.get(3),
                toastable: r.get(4),
            })
            .collect(),
    )))
}

/// Columns a rule must read from the OLD row (UPDATE/DELETE), with what needs each.
fn old_row_columns(rule: &TableRule) -> Vec<(String, String)> {
    if !(rule.ops.contains(&Op::Update) || rule.ops.contains(&Op::Delete)) {
        return Vec::new();
    }
    rule.referenced_columns()
        .into_iter()
        // `columns` only decides whether an UPDATE counts; an unknown old value counts as changed.
        .filter(|(_, used_by)| used_by != "columns")
        .collect()
}

/// Of the columns whose old value is `needed` (column, what needs it), those the replica
/// identity does not send on UPDATE/DELETE, each with what needs it. Columns the table lacks are
/// left out: the missing-column error already names them.
fn unsent_old_values(
    columns: &[CatalogColumn],
    needed: impl IntoIterator<Item = (String, String)>,
) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (column, used_by) in needed {
        if columns.iter().any(|c| c.name == column && !c.in_identity) {
            let users = out.entry(column).or_default();
            if !users.contains(&used_by) {
                users.push(used_by);
            }
        }
    }
    out
}

fn identity_name(identity: char) -> &'static str {
    match identity {
        'n' => "NOTHING",
        'i' => "USING INDEX",
        'f' => "FULL",
        _ => "DEFAULT",
    }
}

/// One error per reference (`used_by`) to a column the table does not have.
fn check_columns_exist(
    label: &str,
    referenced: &[(String, String)],
    columns: &[CatalogColumn],
    report: &mut Report,
) {
    for (column, used_by) in referenced {
        if !columns.iter().any(|c| &c.name == column) {
            report.errors.push(format!(
                "{label}: {used_by} names column {column:?}, which the table does not have \
                 (columns: {}); correct the name in the config or add the column",
                columns
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
}

/// The timestamptz columns whose values deps and scopes render (Python's `str()`), so the
/// app's session TimeZone shows in their strings: each is named with what uses it and the zone
/// walsweep renders it in. Keys print Postgres text, which the zone does not change.
fn timezone_notes(
    label: &str,
    rule: &TableRule,
    columns: &[CatalogColumn],
    timezone: &str,
    report: &mut Report,
) {
    let mut affected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (column, used_by) in rule.referenced_columns() {
        let rendered_by_python = used_by.starts_with("deps[") || used_by.starts_with("scope[");
        let is_timestamptz = columns
            .iter()
            .any(|c| c.name == column && c.type_oid == postgres_types::Type::TIMESTAMPTZ.oid());
        if rendered_by_python && is_timestamptz {
            let users = affected.entry(column).or_default();
            if !users.contains(&used_by) {
                users.push(used_by);
            }
        }
    }
    for (column, users) in affected {
        report.notes.push(format!(
            "{label}: timestamptz column {column} (used by {}) renders in matroska.timezone \
             {timezone:?}, as str() of what psycopg2 hands an app whose connections run with \
             TimeZone '{timezone}'; if the app's connections use another TimeZone, set \
             matroska.timezone to it, or invalidations will miss",
            users.join(", ")
        ));
    }
}

/// Mirrors of one table against its catalog shape: named columns exist, scores fit a 64-bit
/// float exactly for the column types, and the replica identity sends what finding a row's old
/// entry needs.
fn check_mirrors(
    label: &str,
    table: &str,
    mirrors: &[&MirrorRule],
    identity: char,
    columns: &[CatalogColumn],
    report: &mut Report,
) {
    let mut needs_full = false;
    for mirror in mirrors {
        let at = format!("mirror[{}]", mirror.index);
        check_columns_exist(label, &mirror.referenced_columns(), columns, report);
        for index in &mirror.indexes {
            let score = &index.score;
            // A missing column already has its error above; check_types would repeat it.
            if !score
                .columns()
                .iter()
                .all(|c| columns.iter().any(|col| &col.name == c))
            {
                continue;
            }
            let type_of = |name: &str| columns.iter().find(|c| c.name == name).map(|c| c.type_oid);
            if let Err(problem) = score.check_types(&type_of) {
                report
                    .errors
                    .push(format!("{label}: {at}.index[{}]: {problem}", index.index));
            }
        }
        let unsent = unsent_old_values(columns, mirror.identity_columns());
        // Grouped by template, in config order: the error names the template to change.
        let mut by_template: Vec<(String, Vec<&str>)> = Vec::new();
        for (column, used_by) in mirror.identity_columns() {
            let Some((column, _)) = unsent.get_key_value(&column) else {
                continue;
            };
            match by_template.iter_mut().find(|(u, _)| *u == used_by) {
                Some((_, cols)) if cols.contains(&column.as_str()) => {}
                Some((_, cols)) => cols.push(column),
                None => by_template.push((used_by, vec![column])),
            }
        }
        let identity_columns: Vec<&str> = columns
            .iter()
            .filter(|c| c.in_identity)
            .map(|c| c.name.as_str())
            .collect();
        let other_fix = if identity == 'n' {
            "or use REPLICA IDENTITY DEFAULT with a primary key and build the template from its \
             columns"
                .to_string()
        } else if identity_columns.is_empty() {
            "or give the table a primary key and build the template from its columns".to_string()
        } else {
            format!(
                "or build the template from replica identity columns only ({})",
                identity_columns.join(", ")
            )
        };
        for (used_by, cols) in &by_template {
            needs_full = true;
            // What the planner's fallback clears when the old entry cannot be found.
            let cleared = if used_by.contains(".index[") {
                "the index"
            } else {
                "the mirror and its indexes"
            };
            report.errors.push(format!(
                "{label}: {used_by} uses {}, which replica identity {} does not send on \
                 UPDATE/DELETE, so walsweep could not find the old entry (it would clear \
                 {cleared} table-wide instead); run: ALTER TABLE {} REPLICA IDENTITY FULL; \
                 {other_fix}",
                cols.join(", "),
                identity_name(identity),
                qualified_ident(table)
            ));
        }
        if identity != 'f' {
            let toastable: Vec<&str> = columns
                .iter()
                .filter(|c| {
                    c.toastable
                        && mirror
                            .columns
                            .as_ref()
                            .is_none_or(|stored| stored.contains(&c.name))
                })
                .map(|c| c.name.as_str())
                .collect();
            if !toastable.is_empty() {
                report.notes.push(format!(
                    "{label}: {at} stores {}, which Postgres may TOAST, and replica identity {} \
                     does not send an unchanged TOASTed value on UPDATE: walsweep then keeps the \
                     value from the stored entry, and an entry missing from Redis is removed \
                     instead of half-written (walsweep_mirror_rows_total{{result=\"incomplete\"}}); \
                     REPLICA IDENTITY FULL sends every value",
                    toastable.join(", "),
                    identity_name(identity)
                ));
            }
        }
    }
    if needs_full {
        push_once(&mut report.needs_full_identity, table);
    }
}

pub(super) async fn check_database(
    config: &Config,
    rules: &Rules,
    client: &Client,
    report: &mut Report,
) {
    let source = &config.source;
    let mirrors = match crate::plan::mirror::compile_all(&config.tables) {
        Ok(m) => m,
        Err(e) => {
            report.errors.push(format!("[[table.mirror]]: {e}"));
            Vec::new()
        }
    };
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
            let invalidation = match Invalidation::read(client, &source.slot).await {
                Ok(found) => found.unwrap_or_default(),
                Err(e) => {
                    report.errors.push(display_chain(&e));
                    Invalidation::default()
                }
            };
            report.errors.push(format!(
                "slot {:?} {}; caches may have missed changes: drop and recreate the slot, then \
                 clear the caches (source.on_slot_lost = \"recreate\" makes walsweep run do \
                 both).{}",
                source.slot,
                invalidation.what(),
                invalidation
                    .prevention()
                    .map(|p| format!(" {p}."))
                    .unwrap_or_default()
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
    super::settings::check_source_settings(source, client, report).await;
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
        check_columns_exist(&label, &rule.referenced_columns(), &columns, report);
        timezone_notes(&label, rule, &columns, &config.matroska.timezone, report);
        let weak: Vec<String> = unsent_old_values(&columns, old_row_columns(rule))
            .into_iter()
            .map(|(column, used_by)| format!("{column} (used by {})", used_by.join(", ")))
            .collect();
        if !weak.is_empty() {
            report.errors.push(format!(
                "{label}: replica identity {} does not send the old value of {} on \
                 UPDATE/DELETE, so those changes would fall back to table-wide invalidation; \
                 run: ALTER TABLE {} REPLICA IDENTITY FULL;",
                identity_name(identity),
                weak.join("; "),
                qualified_ident(&rule.name)
            ));
            push_once(&mut report.needs_full_identity, &rule.name);
        }
        let table_mirrors: Vec<&MirrorRule> = mirrors
            .iter()
            .filter(|m| m.table == rule.index)
            .map(|m| m.as_ref())
            .collect();
        check_mirrors(
            &label,
            &rule.name,
            &table_mirrors,
            identity,
            &columns,
            report,
        );
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cli::check::check_config;
    use postgres_types::Type;

    fn column(name: &str, type_oid: u32, in_identity: bool, toastable: bool) -> CatalogColumn {
        CatalogColumn {
            name: name.into(),
            in_identity,
            type_oid,
            toastable,
        }
    }

    fn readings(device_id: u32, identity: char) -> Vec<CatalogColumn> {
        let full = identity == 'f';
        vec![
            column("id", Type::INT8.oid(), true, false),
            column("device_id", device_id, full, false),
            column("seq", Type::INT4.oid(), full, false),
            column("ts", Type::TIMESTAMPTZ.oid(), full, false),
        ]
    }

    fn mirrors(toml_tables: &str) -> (Config, Vec<Arc<MirrorRule>>) {
        let config = Config::parse(&format!(
            "[source]\nurl = \"postgres://u@h/db\"\n{toml_tables}"
        ))
        .unwrap();
        let mirrors = crate::plan::mirror::compile_all(&config.tables).unwrap();
        (config, mirrors)
    }

    fn run(toml_tables: &str, identity: char, columns: &[CatalogColumn]) -> Report {
        let (_, mirrors) = mirrors(toml_tables);
        let refs: Vec<&MirrorRule> = mirrors.iter().map(|m| m.as_ref()).collect();
        let mut report = Report::default();
        check_mirrors(
            "table[0] (public.readings)",
            "public.readings",
            &refs,
            identity,
            columns,
            &mut report,
        );
        report
    }

    const READINGS: &str = r#"
[[table]]
name = "public.readings"
[[table.mirror]]
key = "reading:{id}"
[[table.mirror.index]]
key = "readings:all"
member = "{id}"
score = "(device_id << 32) | epoch(ts)"
"#;

    #[test]
    fn timestamptz_in_deps_and_scopes_is_named_with_the_zone() {
        let config = Config::parse(
            "[source]\nurl = \"postgres://u@h/db\"\n[matroska]\ntimezone = \"Europe/Paris\"\n\
             [[table]]\nname = \"public.readings\"\nkeys = [\"r:{ts}\"]\ndeps = [\"d:{ts}\"]\n\
             [[table.scope]]\nname = \"Reading\"\ncolumns = [\"ts\", \"seq\"]\n",
        )
        .unwrap();
        let rules = Rules::from_config(&config).unwrap();
        let mut report = Report::default();
        timezone_notes(
            "table[0] (public.readings)",
            &rules.tables[0],
            &readings(Type::INT4.oid(), 'f'),
            &config.matroska.timezone,
            &mut report,
        );
        assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
        let note = &report.notes[0];
        for part in [
            "table[0] (public.readings): timestamptz column ts",
            "deps[0] \"d:{ts}\", scope[0] \"Reading\"",
            "matroska.timezone \"Europe/Paris\"",
        ] {
            assert!(note.contains(part), "{part:?} not in {note}");
        }
        assert!(!note.contains("keys[0]"), "{note}");
    }

    #[test]
    fn score_must_be_exact_for_the_column_types() {
        let report = run(READINGS, 'd', &readings(Type::INT4.oid(), 'd'));
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        let error = &report.errors[0];
        assert!(
            error.starts_with(
                "table[0] (public.readings): mirror[0].index[0]: score \"(device_id << 32) | \
                 epoch(ts)\" can reach 2^64"
            ),
            "{error}"
        );
        assert!(
            error.contains("2^53") && error.contains("bits(device_id, 21)"),
            "{error}"
        );
        let report = run(READINGS, 'd', &readings(Type::INT2.oid(), 'd'));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }

    #[test]
    fn unknown_column_is_one_error_naming_rule_and_fix() {
        let config = READINGS.replace("epoch(ts)", "epoch(taken_at)");
        let report = run(&config, 'd', &readings(Type::INT2.oid(), 'd'));
        assert_eq!(
            report.errors,
            vec![
                "table[0] (public.readings): mirror[0].index[0].score \"(device_id << 32) | \
                 epoch(taken_at)\" names column \"taken_at\", which the table does not have \
                 (columns: id, device_id, seq, ts); correct the name in the config or add the \
                 column"
                    .to_string()
            ]
        );
    }

    #[test]
    fn old_entry_must_be_findable_from_the_replica_identity() {
        let config = READINGS
            .replace("readings:all", "readings:{device_id}")
            .replace("member = \"{id}\"", "member = \"{id}:{seq}\"")
            .replace("<< 32", "<< 16");
        let report = run(&config, 'd', &readings(Type::INT2.oid(), 'd'));
        assert_eq!(
            report.errors,
            vec![
                "table[0] (public.readings): mirror[0].index[0].key \"readings:{device_id}\" uses \
                 device_id, which replica identity DEFAULT does not send on UPDATE/DELETE, so \
                 walsweep could not find the old entry (it would clear the index table-wide \
                 instead); run: ALTER TABLE \"public\".\"readings\" REPLICA IDENTITY FULL; or \
                 build the template from replica identity columns only (id)"
                    .to_string(),
                "table[0] (public.readings): mirror[0].index[0].member \"{id}:{seq}\" uses seq, \
                 which replica identity DEFAULT does not send on UPDATE/DELETE, so walsweep \
                 could not find the old entry (it would clear the index table-wide instead); \
                 run: ALTER TABLE \"public\".\"readings\" REPLICA IDENTITY FULL; or build the \
                 template from replica identity columns only (id)"
                    .to_string(),
            ]
        );
        assert_eq!(report.needs_full_identity, vec!["public.readings"]);
        let report = run(&config, 'f', &readings(Type::INT2.oid(), 'f'));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(report.needs_full_identity.is_empty());
    }

    #[test]
    fn toastable_stored_columns_get_a_note_unless_identity_is_full() {
        let config = "[[table]]\nname = \"public.readings\"\n[[table.mirror]]\nkey = \"r:{id}\"\n";
        let mut columns = readings(Type::INT4.oid(), 'd');
        columns.push(column("body", Type::TEXT.oid(), false, true));
        let report = run(config, 'd', &columns);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
        assert!(
            report.notes[0].starts_with("table[0] (public.readings): mirror[0] stores body,"),
            "{}",
            report.notes[0]
        );
        assert!(
            report.notes[0].contains("walsweep_mirror_rows_total{result=\"incomplete\"}"),
            "{}",
            report.notes[0]
        );
        let stored_elsewhere = format!("{config}columns = [\"id\"]\n");
        assert!(run(&stored_elsewhere, 'd', &columns).notes.is_empty());
        for c in &mut columns {
            c.in_identity = true;
        }
        assert!(run(config, 'f', &columns).notes.is_empty());
    }

    #[test]
    fn warm_up_without_a_loadable_mirror_warns() {
        let (mut config, _) = mirrors(
            "[[table]]\nname = \"t\"\n[[table.mirror]]\nkey = \"t:{id}\"\nonly_if_present = true\n",
        );
        config.source.warm_up = true;
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("source.warm_up = true"),
            "{warnings:?}"
        );
        config.tables[0].mirror[0].only_if_present = false;
        assert!(config.warnings().is_empty());
    }

    #[test]
    fn overlapping_prefixes_warn_once_per_pair() {
        let (config, _) = mirrors(
            r#"
[[table]]
name = "a"
keys = ["page:{id}"]
[[table.mirror]]
key = "item:{id}"
[[table.mirror.index]]
key = "item:{id}:idx"
member = "{id}"
score = "id"
[[table]]
name = "b"
keys = ["it{id}"]
[[table.mirror]]
key = "item:b:{id}"
[[table.mirror]]
key = "item:{id}"
"#,
        );
        let mut report = Report::default();
        check_config(&config, &mut report);
        check_config(&config, &mut report);
        let w = &report.warnings;
        // a's key and index ("item:") each cover b.mirror[0] and b.mirror[1] (equal: once), but
        // not each other; b.mirror[1] covers b.mirror[0]; b.keys[0] ("it") covers all four.
        assert_eq!(w.len(), 9, "{w:#?}");
        assert!(w.iter().any(|w| w.starts_with(
            "table[0] (public.a) mirror[0].key \"item:{id}\" and table[1] (public.b) \
             mirror[0].key \"item:b:{id}\": prefix \"item:\" starts \"item:b:\", so clearing \
             the first mirror's keys (on TRUNCATE of public.a"
        )));
        assert!(w.iter().any(|w| w.starts_with(
            "table[1] (public.b) keys[0] \"it{id}\" and table[0] (public.a) mirror[0].key \
             \"item:{id}\": prefix \"it\" starts \"item:\", so a table-wide invalidation of \
             public.b (UNLINK of every key matching it*) also removes the mirror's entries"
        )));
        assert!(w.iter().any(|w| w.contains(
            "table[0] (public.a) mirror[0].key \"item:{id}\" and table[1] (public.b) \
             mirror[1].key \"item:{id}\": both start with \"item:\""
        )));
        assert!(!w.iter().any(|w| w.contains("page:")), "{w:#?}");
    }
}
