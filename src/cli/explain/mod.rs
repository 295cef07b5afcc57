//! `walsweep explain`: the effects one hypothetical row change would produce, and which rule
//! produced each: invalidations, mirror writes and the broadcast entry. Offline: the row is given
//! as JSON, no database is needed, so column types are guessed from the JSON values (and said
//! so in the output).
//!
//! `input` reads the rows given as JSON into a relation and tuples, `guess` picks the column
//! types those JSON values most likely have, and `report` plans and prints each section.

use std::sync::Arc;

use crate::config::Config;
use crate::plan::mirror::MirrorRule;
use crate::plan::rules::{EffectRef, Origin, Rules, RulesPlanner};
use crate::plan::{OldRow, Op, RowChange};

mod guess;
mod input;
mod report;

use input::{parse_row, row_shape, to_tuple};
use report::{write_broadcast, write_effects, write_mirrors, write_type_guesses};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ExplainError {
    #[error("no [[table]] named {0:?} in the config")]
    UnknownTable(String),
    #[error("--{which} is not a JSON object of column values: {reason}")]
    BadRow { which: &'static str, reason: String },
    #[error("--op {op} needs --{needs}")]
    MissingRow {
        op: &'static str,
        needs: &'static str,
    },
    #[error("the config does not compile: {0}; `walsweep check --no-environment` shows where")]
    Config(String),
}

/// Renders the effects as lines of text.
pub(crate) fn explain(
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
    let rules = Rules::from_config(config).map_err(|e| ExplainError::Config(e.to_string()))?;
    let rule_set: Vec<_> = rules
        .tables
        .iter()
        .filter(|r| r.name == qualified)
        .cloned()
        .collect();
    if rule_set.is_empty() {
        return Err(ExplainError::UnknownTable(qualified));
    }
    let mirrors: Vec<Arc<MirrorRule>> = crate::plan::mirror::compile_all(&config.tables)
        .map_err(|e| ExplainError::Config(e.to_string()))?
        .into_iter()
        .filter(|m| m.table_name == qualified)
        .collect();
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
    let (relation, old_text, new_text) = row_shape(&qualified, &rule_set, &mirrors, &old, &new);
    let old_tuple = to_tuple(&old_text);
    let new_tuple = to_tuple(&new_text);
    let mut planner = RulesPlanner::new(Rules {
        tables: rule_set.clone(),
        timezone: rules.timezone.clone(),
    });
    let mut lines = Vec::new();
    let mut emit = |effect: EffectRef<'_>, origin: Origin| lines.push((effect.to_owned(), origin));
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
    if op == Op::Truncate {
        planner.truncate_effects(&relation, &mut emit);
    } else {
        planner.effects(&change, &mut emit);
    }
    // What a broadcast lists: every effect as emitted, like the daemon's transaction planner.
    let (mut broadcast_keys, mut broadcast_deps) = (Vec::new(), Vec::new());
    for (effect, _) in &lines {
        crate::plan::broadcast::list_effect(
            effect.as_ref(),
            &mut broadcast_keys,
            &mut broadcast_deps,
        );
    }
    let mut out = String::new();
    write_effects(
        &mut out,
        op,
        &qualified,
        lines,
        &rule_set,
        &config.matroska.prefix,
    );
    if !mirrors.is_empty() {
        write_mirrors(
            &mut out,
            &mirrors,
            &relation,
            &change,
            &new_tuple,
            old.is_none(),
        );
    }
    write_broadcast(
        &mut out,
        config,
        &relation,
        &change,
        &broadcast_keys,
        &broadcast_deps,
    );
    if !mirrors.is_empty() || config.broadcast.is_some() {
        write_type_guesses(&mut out, &relation, &old_text, &new_text);
    }
    Ok(out)
}

/// `walsweep explain`: prints the report, or says why it cannot (exit 2; 78 for a bad config).
pub fn command(
    path: &std::path::Path,
    table: &str,
    op: Op,
    old: Option<&str>,
    new: Option<&str>,
) -> std::process::ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return super::config_failure(&e),
    };
    match explain(&config, table, op, old, new) {
        Ok(text) => {
            print!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("walsweep explain: {e}");
            std::process::ExitCode::from(2)
        }
    }
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

    const MIRRORED: &str = r#"
[source]
url = "postgres://u@h/db"
[[table]]
name = "public.readings"
keys = ["reading-page:{device_id}"]
[[table.mirror]]
key = "reading:{device_id}:{seq}"
[[table.mirror.index]]
key = "readings:{device_id}"
member = "{device_id}:{seq}"
score = "(device_id << 32) | epoch(ts)"
[[table]]
name = "public.items"
[[table.mirror]]
key = "item:{id}"
format = "hash"
only_if_present = true
ttl_seconds = 60
[broadcast]
channel = "walsweep:changes"
tables = ["readings"]
"#;

    fn explain_mirrored(table: &str, op: Op, old: Option<&str>, new: Option<&str>) -> String {
        let config = Config::parse(MIRRORED).unwrap();
        explain(&config, table, op, old, new).unwrap()
    }

    fn assert_lines(out: &str, expected: &[&str]) {
        for line in expected {
            assert!(
                out.lines().any(|l| l.trim_end() == *line),
                "missing line {line:?} in:\n{out}"
            );
        }
    }

    #[test]
    fn insert_writes_the_json_row_and_adds_it_to_the_index() {
        let out = explain_mirrored(
            "readings",
            Op::Insert,
            None,
            Some(r#"{"device_id": 3, "seq": 17, "ts": "2024-01-02 03:04:05+00", "v": 1.5}"#),
        );
        // 3 << 32 | 1704164645 (2024-01-02 03:04:05 UTC).
        assert_lines(
            &out,
            &[
                "mirrors:",
                "  mirror[0] write reading:3:17 (json): {\"device_id\":3,\"seq\":17,\
                 \"ts\":\"2024-01-02T03:04:05+00:00\",\"v\":1.5}",
                "  mirror[0] index[0] zadd readings:3 member 3:17 score 14589066533",
                "column types guessed from the JSON (explain reads no database; `walsweep check` \
                 checks the real ones): device_id bigint, seq bigint, ts timestamptz, \
                 v double precision",
            ],
        );
    }

    #[test]
    fn update_moving_the_key_moves_the_row_and_its_member() {
        let out = explain_mirrored(
            "readings",
            Op::Update,
            Some(r#"{"device_id": 2, "seq": 16, "ts": "2024-01-02 03:04:05+00"}"#),
            Some(r#"{"device_id": 3, "seq": 17, "ts": "2024-01-02 03:04:05+00"}"#),
        );
        assert_lines(
            &out,
            &[
                "mirrors:",
                "  mirror[0] write reading:3:17 (json, moved from reading:2:16): \
                 {\"device_id\":3,\"seq\":17,\"ts\":\"2024-01-02T03:04:05+00:00\"}",
                "  mirror[0] index[0] zrem readings:2 member 2:16",
                "  mirror[0] index[0] zadd readings:3 member 3:17 score 14589066533",
            ],
        );
        // Without --old the key is taken as unchanged: no move, no removal.
        let out = explain_mirrored(
            "readings",
            Op::Update,
            None,
            Some(r#"{"device_id": 3, "seq": 17, "ts": "2024-01-02 03:04:05+00"}"#),
        );
        assert!(
            !out.contains("moved from") && !out.contains("zrem"),
            "{out}"
        );
        assert!(
            out.contains("(no --old: taken as an update that kept"),
            "{out}"
        );
    }

    #[test]
    fn delete_removes_the_row_and_its_member() {
        let out = explain_mirrored(
            "readings",
            Op::Delete,
            Some(r#"{"device_id": 3, "seq": 17, "ts": "2024-01-02 03:04:05+00"}"#),
            None,
        );
        assert_lines(
            &out,
            &[
                "mirrors:",
                "  mirror[0] delete reading:3:17",
                "  mirror[0] index[0] zrem readings:3 member 3:17",
            ],
        );
    }

    #[test]
    fn truncate_clears_every_prefix_of_the_mirror() {
        let out = explain_mirrored("readings", Op::Truncate, None, None);
        assert_lines(&out, &["  mirror[0] clear reading:* readings:* (truncate)"]);
    }

    #[test]
    fn only_if_present_hash_mirror_says_so_and_keeps_unsent_values() {
        let out = explain_mirrored(
            "items",
            Op::Update,
            Some(r#"{"id": 7, "name": "x", "note": null}"#),
            Some(r#"{"id": 7, "name": "y", "note": null, "flag": true}"#),
        );
        assert_lines(
            &out,
            &[
                "  mirror[0] write item:7 (hash, only if item:7 is already in Redis, expires \
               after 60 s): {\"id\":\"7\",\"name\":\"y\",\"flag\":\"true\"}   (no field, NULL: \
               note)",
            ],
        );
        // A column left out of --new is one the change did not send (unchanged TOAST).
        let out = explain_mirrored(
            "items",
            Op::Update,
            Some(r#"{"id": 7, "name": "x"}"#),
            Some(r#"{"id": 7}"#),
        );
        assert!(
            out.contains("{\"id\":\"7\"}   (kept from the stored entry: name)"),
            "{out}"
        );
        assert!(!out.contains("broadcast"), "items is not broadcast: {out}");
    }

    #[test]
    fn broadcast_entry_lists_the_change_with_its_invalidations() {
        let out = explain_mirrored(
            "readings",
            Op::Insert,
            None,
            Some(r#"{"device_id": 3, "seq": 17, "ts": "2024-01-02 03:04:05+00"}"#),
        );
        assert_lines(
            &out,
            &[
                "broadcast to channel \"walsweep:changes\", in the transaction's message:",
                "  {\"table\":\"public.readings\",\"op\":\"insert\",\"pk\":\
                 {\"device_id\":3,\"seq\":17,\"ts\":\"2024-01-02T03:04:05+00:00\"},\
                 \"keys\":[\"reading-page:3\"],\"deps\":[]}",
            ],
        );
        let out = explain_mirrored("readings", Op::Truncate, None, None);
        assert!(
            out.contains("  {\"table\":\"public.readings\",\"op\":\"truncate\"}"),
            "{out}"
        );
    }

    #[test]
    fn a_row_without_a_score_says_why() {
        let out = explain_mirrored(
            "readings",
            Op::Insert,
            None,
            Some(r#"{"device_id": 3, "seq": 17, "ts": "2024-01-02T03:04:05Z"}"#),
        );
        assert!(!out.contains("zadd"), "{out}");
        assert!(
            out.contains(
                "  mirror[0] index[0] no score, the row is left out of this index: score \
                 \"(device_id << 32) | epoch(ts)\": column ts holds text"
            ),
            "{out}"
        );
        assert!(out.contains("ts text"), "{out}");
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
