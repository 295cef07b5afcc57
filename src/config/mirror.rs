//! `[[table.mirror]]`, `[[table.mirror.index]]` and `[broadcast]`: the parts of the config that
//! keep Redis current instead of emptying it.

use serde::Deserialize;

use super::Config;
use crate::config::score::ScoreExpr;
use crate::config::template::Template;

/// Longest accepted `ttl_seconds` / `retention_seconds` (one year): longer is a typo for "none".
pub(crate) const MAX_WINDOW_SECONDS: u64 = 366 * 24 * 3600;
pub(crate) const DEFAULT_STREAM_MAX_LEN: u64 = 10_000;
pub(crate) const DEFAULT_MAX_CHANGES_PER_MESSAGE: usize = 1_000;

/// How a mirrored row is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MirrorFormat {
    /// One string: a JSON object, column name to typed value (see `value::Value::to_json`).
    #[default]
    Json,
    /// A hash, one field per column: numbers and booleans as their JSON text, strings as they
    /// are, JSON/array columns as JSON text; a NULL column has no field.
    Hash,
}

impl MirrorFormat {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MirrorFormat::Json => "json",
            MirrorFormat::Hash => "hash",
        }
    }
}

/// `[[table.mirror]]`: a copy of each row in Redis, written on INSERT and UPDATE, removed on
/// DELETE and TRUNCATE, moved when its key changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(crate) struct MirrorConfig {
    /// Key template, e.g. `reading:{device_id}:{seq}`; must start with literal text that no
    /// other data in Redis starts with (TRUNCATE removes every key with that prefix).
    pub(crate) key: String,
    /// `json` (default) or `hash`.
    #[serde(default)]
    pub(crate) format: MirrorFormat,
    /// Columns stored; default every column.
    #[serde(default)]
    pub(crate) columns: Option<Vec<String>>,
    /// Expire each written entry after this many seconds (refreshed by every write). Default:
    /// never.
    #[serde(default)]
    pub(crate) ttl_seconds: Option<u64>,
    /// Only refresh entries that already exist (the app filled them); never create one. Indexes
    /// follow the same rule. Default false. `walsweep snapshot` skips such mirrors.
    #[serde(default)]
    pub(crate) only_if_present: bool,
    /// Sorted-set indexes over the mirrored rows.
    #[serde(default)]
    pub(crate) index: Vec<IndexConfig>,
}

/// `[[table.mirror.index]]`: a sorted set whose members are rows, scored by a column expression.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(crate) struct IndexConfig {
    /// Sorted-set key template, e.g. `readings:by_time` or `readings:{device_id}`.
    pub(crate) key: String,
    /// Member template, e.g. `{device_id}:{seq}` (usually the row's mirror key suffix).
    pub(crate) member: String,
    /// Score expression (see `config::score`): a column, `epoch(ts)`, `epoch_ms(ts)`,
    /// `bits(col, N)`, integers, `<<`, `|`, `+`, `*`, e.g. `(device_id << 32) | epoch(ts)`.
    /// Must be exact in a 64-bit float (|score| <= 2^53); `check` proves it from column types.
    pub(crate) score: String,
    /// Drop members whose time part is older than this many seconds before the commit that
    /// writes to their segment. Needs a score with one `epoch()`/`epoch_ms()` term (`epoch(ts)`
    /// or `X | epoch(ts)`). Default: keep everything.
    #[serde(default)]
    pub(crate) retention_seconds: Option<u64>,
}

/// `[broadcast]`: publish one JSON message per committed transaction that changed a followed
/// table. See the README section "Broadcasts" for the message format and a client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(crate) struct BroadcastConfig {
    /// Pub/Sub channel to PUBLISH on, e.g. `walsweep:changes`.
    #[serde(default)]
    pub(crate) channel: Option<String>,
    /// Stream to XADD to (capped at `stream_max_len`, approximately), e.g. `walsweep:stream`.
    #[serde(default)]
    pub(crate) stream: Option<String>,
    /// Approximate most entries the stream keeps. Default 10000.
    #[serde(default = "default_stream_max_len")]
    pub(crate) stream_max_len: u64,
    /// Tables whose changes are broadcast (`schema.table`); default every `[[table]]`.
    #[serde(default)]
    pub(crate) tables: Option<Vec<String>>,
    /// Most changes listed in one message; a larger transaction's message lists none and says
    /// `"truncated": true` with per-table counts, so clients drop those tables. Default 1000.
    #[serde(default = "default_max_changes_per_message")]
    pub(crate) max_changes_per_message: usize,
}

fn default_stream_max_len() -> u64 {
    DEFAULT_STREAM_MAX_LEN
}
fn default_max_changes_per_message() -> usize {
    DEFAULT_MAX_CHANGES_PER_MESSAGE
}

/// A key template: parses, starts with literal text, names a column.
fn validate_key_template(key: &str, source: &str, problem: &mut dyn FnMut(&str, String)) {
    match Template::parse(source) {
        Err(e) => problem(key, format!("template {source:?}: {e}")),
        Ok(t) if t.literal_prefix().is_empty() => problem(
            key,
            format!(
                "template {source:?} must start with literal text (e.g. \"reading:{{id}}\"): \
                 TRUNCATE removes everything starting with that text"
            ),
        ),
        Ok(_) => {}
    }
}

pub(super) fn validate_mirror(at: &str, m: &MirrorConfig, problem: &mut dyn FnMut(&str, String)) {
    validate_key_template(&format!("{at}.key"), &m.key, problem);
    if let Ok(t) = Template::parse(&m.key) {
        if t.columns().next().is_none() {
            problem(
                &format!("{at}.key"),
                format!(
                    "template {:?} names no column, so every row would share one key; write \
                     e.g. \"reading:{{id}}\"",
                    m.key
                ),
            );
        }
    }
    if m.columns.as_ref().is_some_and(|c| c.is_empty()) {
        problem(
            &format!("{at}.columns"),
            "is empty; remove it to store every column".into(),
        );
    }
    if let Some(ttl) = m.ttl_seconds {
        if ttl == 0 || ttl > MAX_WINDOW_SECONDS {
            problem(
                &format!("{at}.ttl_seconds"),
                format!("must be between 1 and {MAX_WINDOW_SECONDS}; remove it to never expire"),
            );
        }
    }
    for (k, index) in m.index.iter().enumerate() {
        let at = format!("{at}.index[{k}]");
        validate_key_template(&format!("{at}.key"), &index.key, problem);
        if let Err(e) = Template::parse(&index.member) {
            problem(
                &format!("{at}.member"),
                format!("template {:?}: {e}", index.member),
            );
        } else if index.member.is_empty() {
            problem(
                &format!("{at}.member"),
                "is empty; write e.g. \"{id}\"".into(),
            );
        }
        match ScoreExpr::parse(&index.score) {
            Err(e) => problem(
                &format!("{at}.score"),
                format!("score {:?}: {e}", index.score),
            ),
            Ok(expr) => {
                if let Some(window) = index.retention_seconds {
                    if window == 0 || window > MAX_WINDOW_SECONDS {
                        problem(
                            &format!("{at}.retention_seconds"),
                            format!(
                                "must be between 1 and {MAX_WINDOW_SECONDS}; remove it to keep \
                                 every member"
                            ),
                        );
                    } else if !expr.supports_retention() {
                        problem(
                            &format!("{at}.retention_seconds"),
                            format!(
                                "needs a score with one time term, epoch(col) or \
                                 X | epoch(col), to know a member's age; {:?} has none",
                                index.score
                            ),
                        );
                    }
                }
            }
        }
    }
}

pub(super) fn validate_broadcast(
    b: &BroadcastConfig,
    tables: &[String],
    problem: &mut dyn FnMut(&str, String),
) {
    let blank = |s: &Option<String>| s.as_ref().is_some_and(|s| s.is_empty());
    if b.channel.is_none() && b.stream.is_none() {
        problem(
            "broadcast.channel",
            "[broadcast] needs a channel (Pub/Sub), a stream, or both; e.g. channel = \
             \"walsweep:changes\""
                .into(),
        );
    }
    if blank(&b.channel) {
        problem("broadcast.channel", "is empty; name a channel".into());
    }
    if blank(&b.stream) {
        problem("broadcast.stream", "is empty; name a stream key".into());
    }
    if b.stream_max_len == 0 {
        problem(
            "broadcast.stream_max_len",
            "must be at least 1; 10000 is a good value".into(),
        );
    }
    if b.max_changes_per_message == 0 {
        problem(
            "broadcast.max_changes_per_message",
            "must be at least 1; 1000 is a good value".into(),
        );
    }
    for name in b.tables.iter().flatten() {
        let qualified = if name.contains('.') {
            name.clone()
        } else {
            format!("public.{name}")
        };
        if !tables.contains(&qualified) {
            problem(
                "broadcast.tables",
                format!(
                    "{name:?} is not a [[table]]; only followed tables can be broadcast \
                     (add a [[table]] with name = {qualified:?})"
                ),
            );
        }
    }
}

/// A key prefix walsweep may clear wholesale, and whose it is.
struct PrefixOwner {
    prefix: String,
    /// `table[0] (public.items) mirror[0].index[1].key "readings:{device_id}"`.
    label: String,
    /// (table, mirror) for mirror keys and indexes; `None` for `[[table]] keys`.
    mirror: Option<(usize, usize)>,
    table_name: String,
}

/// Mirror key and index prefixes that overlap another mirror's or a `[[table]] keys` prefix:
/// clearing one wholesale (TRUNCATE, a table-wide fallback) also removes the other's entries.
pub(super) fn prefix_warnings(config: &Config, out: &mut Vec<String>) {
    let names = config.qualified_tables();
    let table_name = |t: usize| names.get(t).cloned().unwrap_or_default();
    let mut owners: Vec<PrefixOwner> = Vec::new();
    // Templates were validated with the config; one that fails to parse has its own error.
    for (t, table) in config.tables.iter().enumerate() {
        for (mi, m) in table.mirror.iter().enumerate() {
            let at = format!("table[{t}] ({}) mirror[{mi}]", table_name(t));
            if let Ok(key) = Template::parse(&m.key) {
                owners.push(PrefixOwner {
                    prefix: key.literal_prefix().to_string(),
                    label: format!("{at}.key {:?}", m.key),
                    mirror: Some((t, mi)),
                    table_name: table_name(t),
                });
            }
            for (ii, index) in m.index.iter().enumerate() {
                if let Ok(key) = Template::parse(&index.key) {
                    owners.push(PrefixOwner {
                        prefix: key.literal_prefix().to_string(),
                        label: format!("{at}.index[{ii}].key {:?}", index.key),
                        mirror: Some((t, mi)),
                        table_name: table_name(t),
                    });
                }
            }
        }
    }
    for (t, table) in config.tables.iter().enumerate() {
        for (k, key) in table.keys.iter().enumerate() {
            if let Ok(template) = Template::parse(key) {
                owners.push(PrefixOwner {
                    prefix: template.literal_prefix().to_string(),
                    label: format!("table[{t}] ({}) keys[{k}] {key:?}", table_name(t)),
                    mirror: None,
                    table_name: table_name(t),
                });
            }
        }
    }
    let fix = "give each literal text that does not start the other's (e.g. \"reading:{id}\" \
               and \"readings_by_device:{device_id}\")";
    let relation = |a: &str, b: &str| {
        if a == b {
            format!("both start with {a:?}")
        } else {
            format!("prefix {a:?} starts {b:?}")
        }
    };
    for (i, a) in owners.iter().enumerate() {
        let Some(a_mirror) = a.mirror else { continue };
        for (j, b) in owners.iter().enumerate() {
            // One mirror's own key and indexes are cleared together anyway.
            if i == j || b.mirror == Some(a_mirror) {
                continue;
            }
            let a_covers_b = b.prefix.starts_with(&a.prefix);
            match b.mirror {
                // Equal prefixes between two mirrors: one warning, not two.
                Some(_) if a_covers_b && (a.prefix != b.prefix || i < j) => out.push(format!(
                    "{} and {}: {}, so clearing the first mirror's keys (on TRUNCATE of {}, or a \
                     table-wide fallback) also removes the second's; {fix}",
                    a.label,
                    b.label,
                    relation(&a.prefix, &b.prefix),
                    a.table_name
                )),
                Some(_) => {}
                None if a_covers_b => out.push(format!(
                    "{} and {}: {}, so clearing the mirror's keys (on TRUNCATE of {}, or a \
                     table-wide fallback) also removes the cache entries the app keeps under the \
                     rule's keys, and the rule's UNLINKs remove mirror entries; {fix}",
                    a.label,
                    b.label,
                    relation(&a.prefix, &b.prefix),
                    a.table_name
                )),
                None if a.prefix.starts_with(&b.prefix) => out.push(format!(
                    "{} and {}: {}, so a table-wide invalidation of {} (UNLINK of every key \
                     matching {}*) also removes the mirror's entries; {fix}",
                    b.label,
                    a.label,
                    relation(&b.prefix, &a.prefix),
                    b.table_name,
                    b.prefix
                )),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn error_of(rest: &str) -> String {
        let text = format!("[source]\nurl = \"postgres://u@h/db\"\n{rest}");
        match Config::parse(&text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    const TABLE: &str = "[[table]]\nname = \"readings\"\n";

    #[test]
    fn a_complete_mirror_parses_with_defaults() {
        let text = format!(
            "[source]\nurl = \"postgres://u@h/db\"\n{TABLE}[[table.mirror]]\nkey = \"r:{{id}}\"\n\
             [[table.mirror.index]]\nkey = \"rs\"\nmember = \"{{id}}\"\nscore = \"epoch(ts)\"\n\
             retention_seconds = 60\n[broadcast]\nchannel = \"c\"\n"
        );
        let config = Config::parse(&text).expect("valid");
        let mirror = &config.tables[0].mirror[0];
        assert_eq!(mirror.format, super::MirrorFormat::Json);
        assert!(!mirror.only_if_present);
        assert_eq!(mirror.index[0].retention_seconds, Some(60));
        let broadcast = config.broadcast.expect("broadcast");
        assert_eq!(broadcast.stream_max_len, super::DEFAULT_STREAM_MAX_LEN);
        assert_eq!(
            broadcast.max_changes_per_message,
            super::DEFAULT_MAX_CHANGES_PER_MESSAGE
        );
    }

    #[test]
    fn bad_mirrors_are_reported_with_line_and_fix() {
        let cases = [
            (
                format!("{TABLE}[[table.mirror]]\nkey = \"{{id}}\"\n"),
                "config:6: table[0].mirror[0].key: template \"{id}\" must start with literal text",
            ),
            (
                format!("{TABLE}[[table.mirror]]\nkey = \"row\"\n"),
                "config:6: table[0].mirror[0].key: template \"row\" names no column",
            ),
            (
                format!("{TABLE}[[table.mirror]]\nkey = \"r:{{id}}\"\nformat = \"xml\"\n"),
                "unknown variant `xml`, expected `json` or `hash`",
            ),
            (
                format!("{TABLE}[[table.mirror]]\nkey = \"r:{{id}}\"\nttl_seconds = 0\n"),
                "config:7: table[0].mirror[0].ttl_seconds: must be between 1 and",
            ),
            (
                format!(
                    "{TABLE}[[table.mirror]]\nkey = \"r:{{id}}\"\n[[table.mirror.index]]\n\
                     key = \"rs\"\nmember = \"{{id}}\"\nscore = \"(a << 32\"\n"
                ),
                "config:10: table[0].mirror[0].index[0].score: score \"(a << 32\": at 8:",
            ),
            (
                format!(
                    "{TABLE}[[table.mirror]]\nkey = \"r:{{id}}\"\n[[table.mirror.index]]\n\
                     key = \"rs\"\nmember = \"{{id}}\"\nscore = \"id\"\nretention_seconds = 60\n"
                ),
                "config:11: table[0].mirror[0].index[0].retention_seconds: needs a score with one \
                 time term",
            ),
            (
                format!("{TABLE}[broadcast]\nstream_max_len = 5\n"),
                "broadcast.channel: [broadcast] needs a channel (Pub/Sub), a stream, or both",
            ),
            (
                format!("{TABLE}[broadcast]\nchannel = \"c\"\ntables = [\"other\"]\n"),
                "broadcast.tables: \"other\" is not a [[table]]",
            ),
        ];
        for (rest, expected) in cases {
            let error = error_of(&rest);
            assert!(
                error.contains(expected),
                "expected {expected:?} in:\n{error}\nfor:\n{rest}"
            );
        }
    }
}
