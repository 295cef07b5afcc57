//! `[inspect]`: the daemon's inspector, which samples mirrored rows continuously and compares
//! them with Redis (the checks of `walsweep verify --sample`, paced over each minute).

use serde::Deserialize;

use super::Config;

/// Most `rows_per_minute`: each row costs a few Postgres and Redis reads; whole tables are
/// `walsweep verify`'s job.
pub(crate) const MAX_ROWS_PER_MINUTE: u64 = 100_000;

/// `[inspect]`: sample mirrored rows while walsweep runs and export what differs from Redis
/// (`walsweep_inspected_rows_total`, `walsweep_drift_rows_total{table,kind}`). Default: off
/// (no `[inspect]` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct InspectConfig {
    /// Rows sampled per minute, over all mirrored tables in turn, spread evenly over the minute
    /// (at most one check per second); each check also samples as many stored entries per
    /// mirror and index, to find entries no row explains. Between 1 and 100000, e.g. 600.
    pub(crate) rows_per_minute: u64,
}

impl InspectConfig {
    /// Checks per minute and rows per check: at most one check a second, so a check's
    /// consistent point (one snapshot, one wait for the applied position) serves many rows.
    pub(crate) fn pace(&self) -> (u64, u64) {
        let checks = self.rows_per_minute.clamp(1, 60);
        (checks, self.rows_per_minute.div_ceil(checks))
    }
}

pub(super) fn validate_inspect(inspect: &InspectConfig, problem: &mut dyn FnMut(&str, String)) {
    if inspect.rows_per_minute == 0 || inspect.rows_per_minute > MAX_ROWS_PER_MINUTE {
        problem(
            "inspect.rows_per_minute",
            format!(
                "must be between 1 and {MAX_ROWS_PER_MINUTE}, e.g. 600; remove [inspect] to turn \
                 the inspector off, and use `walsweep verify` to check whole tables"
            ),
        );
    }
}

pub(super) fn inspect_warnings(config: &Config, out: &mut Vec<String>) {
    if config.inspect.is_some() && config.tables.iter().all(|t| t.mirror.is_empty()) {
        out.push(
            "[inspect] is set, but there is no [[table.mirror]] to inspect; remove [inspect] or \
             add a mirror"
                .to_string(),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn parse(rest: &str) -> Result<Config, String> {
        Config::parse(&format!("[source]\nurl = \"postgres://u@h/db\"\n{rest}"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn inspect_is_off_by_default_and_paced_when_on() {
        assert!(parse("").unwrap().inspect.is_none());
        let config = parse("[inspect]\nrows_per_minute = 600\n").unwrap();
        assert_eq!(config.inspect.unwrap().pace(), (60, 10));
        let slow = parse("[inspect]\nrows_per_minute = 7\n").unwrap();
        assert_eq!(slow.inspect.unwrap().pace(), (7, 1));
        let odd = parse("[inspect]\nrows_per_minute = 61\n").unwrap();
        assert_eq!(odd.inspect.unwrap().pace(), (60, 2));
    }

    #[test]
    fn bad_values_are_reported_with_line_and_fix() {
        for (rest, expected) in [
            (
                "[inspect]\nrows_per_minute = 0\n",
                "config:4: inspect.rows_per_minute: must be between 1 and 100000",
            ),
            (
                "[inspect]\nrows_per_minute = 1000000\n",
                "config:4: inspect.rows_per_minute: must be between 1 and 100000",
            ),
            (
                "[inspect]\nrows_per_minute = -5\n",
                "config:4: toml: invalid value: integer `-5`, expected u64",
            ),
            (
                "[inspect]\n",
                "config:3: toml: missing field `rows_per_minute`",
            ),
            (
                "[inspect]\nrows_per_minute = 10\nrate = 1\n",
                "config:5: toml: unknown field `rate`",
            ),
        ] {
            let error = parse(rest).unwrap_err();
            assert!(
                error.starts_with(expected),
                "for {rest:?}:\n got {error}\nwant {expected}"
            );
        }
    }

    #[test]
    fn inspect_without_mirrors_is_a_warning() {
        let config = parse("[inspect]\nrows_per_minute = 10\n").unwrap();
        assert!(
            config
                .warnings()
                .iter()
                .any(|w| w.contains("no [[table.mirror]] to inspect")),
            "{:?}",
            config.warnings()
        );
    }
}
