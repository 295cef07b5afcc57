//! `walsweep setup`: the SQL that prepares a database for walsweep (publication, replica
//! identity where rules need old values, a least-privilege role), printed or executed.

use std::path::Path;
use std::process::ExitCode;

use crate::cli::check::{check_environment, Report};
use crate::cli::{config_failure, load};
use crate::config::Config;
use crate::pg::catalog::{self, create_publication_sql, qualified_ident, split_table_name};
use crate::pg::replication::{quote_ident, quote_literal};
use crate::telemetry::log::display_chain;

/// Statements to run, given what `check` found (`None`: the database was not consulted, so
/// every statement that might be needed is included).
pub(crate) fn statements(
    config: &Config,
    found: Option<&Report>,
    role: &str,
    publication_exists: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    let tables = config.qualified_tables();
    let publication = &config.source.publication;
    match found {
        None => out.push(format!("{};", create_publication_sql(publication, &tables))),
        Some(_) if !publication_exists => {
            out.push(format!("{};", create_publication_sql(publication, &tables)))
        }
        Some(report) => {
            for table in &report.missing_from_publication {
                out.push(format!(
                    "ALTER PUBLICATION {} ADD TABLE {};",
                    quote_ident(publication),
                    qualified_ident(table)
                ));
            }
        }
    }
    let full: Vec<String> = match found {
        Some(report) => report.needs_full_identity.clone(),
        None => tables.clone(),
    };
    for table in full {
        out.push(format!(
            "ALTER TABLE {} REPLICA IDENTITY FULL;",
            qualified_ident(&table)
        ));
    }
    // REPLICATION lets the role stream and create its slot; SELECT lets `check` and snapshots
    // read the tables. Nothing else: no superuser, no write access.
    let role_ident = quote_ident(role);
    out.push(format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {}) THEN \
         CREATE ROLE {role_ident} LOGIN REPLICATION; END IF; END $$;",
        quote_literal(role)
    ));
    let mut schemas: Vec<&str> = tables.iter().map(|t| split_table_name(t).0).collect();
    schemas.sort();
    schemas.dedup();
    for schema in schemas {
        out.push(format!(
            "GRANT USAGE ON SCHEMA {} TO {role_ident};",
            quote_ident(schema)
        ));
    }
    if !tables.is_empty() {
        out.push(format!(
            "GRANT SELECT ON {} TO {role_ident};",
            tables
                .iter()
                .map(|t| qualified_ident(t))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out
}

/// With `source.failover`: what the primary and each standby need for walsweep's slot to be
/// synchronized and usable after a promotion (Postgres 17+). Server settings, not statements
/// `setup` runs: they need a reload or a restart, and a standby is not writable. `standby_slots`
/// are the primary's physical slots when known.
pub(crate) fn failover_instructions(config: &Config, standby_slots: &[String]) -> Vec<String> {
    if !config.source.failover {
        return Vec::new();
    }
    let slots = if standby_slots.is_empty() {
        "<standby's physical slot>".to_string()
    } else {
        standby_slots.join(",")
    };
    let first_slot = standby_slots
        .first()
        .map_or("<standby's physical slot>", String::as_str);
    vec![
        "-- source.failover: walsweep creates its slot as a failover slot (Postgres 17+).".into(),
        "-- On the primary: logical walsenders wait until these standbys have the WAL, so a".into(),
        "-- promoted standby never lacks a change walsweep already applied:".into(),
        format!(
            "ALTER SYSTEM SET synchronized_standby_slots = {};",
            quote_literal(&slots)
        ),
        "SELECT pg_reload_conf();".into(),
        "-- On each standby (postgresql.conf, then restart it):".into(),
        format!("--   primary_slot_name = '{first_slot}'   (a physical slot on the primary)"),
        "--   hot_standby_feedback = on".into(),
        "--   sync_replication_slots = on".into(),
        "--   wal_level = logical".into(),
        "--   primary_conninfo = '... dbname=<the database walsweep follows>'".into(),
        format!(
            "-- Then give walsweep every node in source.url with target_session_attrs=read-write \
             (e.g. postgres://u@primary,standby/db?target_session_attrs=read-write); after a \
             promotion it resumes from the synchronized slot {:?}.",
            config.source.slot
        ),
    ]
}

/// Executes only what `check` finds missing, so running it again is harmless. `print_only`
/// needs no database: the SQL can be reviewed and run by someone with the rights.
pub async fn command(path: &Path, print_only: bool, role: &str) -> ExitCode {
    let (config, rules) = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if print_only {
        for statement in statements(&config, None, role, false) {
            println!("{statement}");
        }
        for line in failover_instructions(&config, &[]) {
            println!("{line}");
        }
        if config.matroska.fences {
            println!(
                "-- matroska.fences: walsweep loads its Redis function library at start; \
                 `walsweep setup` without --print loads it now"
            );
        }
        return ExitCode::SUCCESS;
    }
    let params = match config.source.connect_params() {
        Ok(p) => p,
        Err(e) => return config_failure(&e),
    };
    let client = match catalog::connect(&params).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("walsweep setup: {}", display_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let mut report = Report::default();
    check_environment(&config, &rules, &mut report).await;
    let exists = catalog::publication_exists(&client, &config.source.publication)
        .await
        .unwrap_or(false);
    for statement in statements(&config, Some(&report), role, exists) {
        match client.batch_execute(&statement).await {
            Ok(()) => println!("{statement}"),
            Err(e) => {
                eprintln!(
                    "walsweep setup: {statement}\n  failed: {}",
                    display_chain(&e)
                );
                return ExitCode::FAILURE;
            }
        }
    }
    println!("-- done; give the role a password with: ALTER ROLE {role} PASSWORD '...';");
    if config.matroska.fences {
        if let Err(e) = load_functions(&config).await {
            eprintln!("walsweep setup: {e}");
            return ExitCode::FAILURE;
        }
        println!(
            "-- loaded the walsweep Redis function library (walsweep_fill_begin, walsweep_fill) \
             into [redis]"
        );
    }
    if config.source.failover {
        let standby_slots = catalog::physical_slots(&client).await.unwrap_or_default();
        for line in failover_instructions(&config, &standby_slots) {
            println!("{line}");
        }
    }
    ExitCode::SUCCESS
}

/// `FUNCTION LOAD REPLACE` of walsweep's fenced-fill functions into `[redis]`.
async fn load_functions(config: &Config) -> Result<(), String> {
    let endpoint =
        crate::sink::redis::Endpoint::new(&config.redis).map_err(|e| display_chain(&e))?;
    let mut conn = endpoint
        .connect_plain()
        .await
        .map_err(|e| format!("connecting to Redis to load the function library: {e}"))?;
    crate::sink::redis::fences::load_function_library(&mut conn)
        .await
        .map_err(|e| format!("FUNCTION LOAD of the walsweep library failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_statements_cover_publication_identity_and_role() {
        let config = Config::parse(
            "[source]\nurl = \"postgres://u@h/db\"\n[[table]]\nname = \"articles\"\nkeys = [\"a:{id}\"]\n",
        )
        .unwrap();
        let sql = statements(&config, None, "walsweep", false).join("\n");
        assert!(
            sql.contains("CREATE PUBLICATION \"walsweep\" FOR TABLE \"public\".\"articles\";"),
            "{sql}"
        );
        assert!(
            sql.contains("ALTER TABLE \"public\".\"articles\" REPLICA IDENTITY FULL;"),
            "{sql}"
        );
        assert!(
            sql.contains("CREATE ROLE \"walsweep\" LOGIN REPLICATION"),
            "{sql}"
        );
        assert!(
            sql.contains("GRANT SELECT ON \"public\".\"articles\" TO \"walsweep\";"),
            "{sql}"
        );
        assert!(failover_instructions(&config, &[]).is_empty());
    }

    #[test]
    fn failover_instructions_name_the_standby_slots_and_every_standby_setting() {
        let config = Config::parse(
            "[source]\nurl = \"postgres://u@h/db\"\nfailover = true\n[[table]]\nname = \"articles\"\nkeys = [\"a:{id}\"]\n",
        )
        .unwrap();
        let known = failover_instructions(&config, &["sb1".into(), "sb2".into()]).join("\n");
        assert!(
            known.contains("ALTER SYSTEM SET synchronized_standby_slots = 'sb1,sb2';"),
            "{known}"
        );
        for setting in [
            "primary_slot_name = 'sb1'",
            "hot_standby_feedback = on",
            "sync_replication_slots = on",
            "wal_level = logical",
            "dbname=",
            "target_session_attrs=read-write",
        ] {
            assert!(known.contains(setting), "{setting} missing:\n{known}");
        }
        let offline = failover_instructions(&config, &[]).join("\n");
        assert!(offline.contains("<standby's physical slot>"), "{offline}");
    }
}
