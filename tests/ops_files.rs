//! The operations files (Grafana dashboard, Prometheus config and alerts, Dockerfile, compose,
//! Kubernetes and systemd) against each other and against walsweep itself:
//!
//! - every YAML file parses, and the dashboard JSON;
//! - every `walsweep_*` metric the dashboard and the alerts use is in `metrics::ALL`, is
//!   exported as `# TYPE <name>` by a running pipeline (private Postgres and Redis), histograms
//!   are only used through `_bucket`/`_sum`/`_count`, and grouping labels and label matchers
//!   exist on the scraped series;
//! - a real Prometheus on a free port scrapes that pipeline with
//!   config/prometheus/prometheus.yml's job and alerts.yml; every dashboard query returns data,
//!   every alert rule evaluates without error, and none is pending or firing for the healthy,
//!   idle pipeline;
//! - `promtool check rules`, `check config` and `test rules` pass;
//! - promtool or prometheus missing: `scripts/ensure-promtool` installs them (as CI's test
//!   command does); still missing, a failure under CI and a loud "SKIPPED" on stderr otherwise;
//! - configs carried by compose and Kubernetes are valid walsweep configs; ports, paths,
//!   environment variable names, probe paths and exit codes agree across the files and with
//!   the binary.
//!
//! Its own test binary, because the metrics recorder is process-wide.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::{Postgres, Redis};
use walsweep::config::Config;

const DASHBOARD: &str = "config/grafana/walsweep-dashboard.json";
const GRAFANA_DATASOURCES: &str = "config/grafana/provisioning/datasources/prometheus.yml";
const GRAFANA_DASHBOARDS: &str = "config/grafana/provisioning/dashboards/walsweep.yml";
const PROMETHEUS: &str = "config/prometheus/prometheus.yml";
const ALERTS: &str = "config/prometheus/alerts.yml";
const ALERTS_TEST: &str = "config/prometheus/alerts_test.yml";
const COMPOSE: &str = "docker-compose.yml";
const COMPOSE_CONFIG: &str = "config/compose.toml";
const DEMO_CONFIG: &str = "config/demo.toml";
const KUBERNETES: &str = "deploy/kubernetes/walsweep-sidecar.yaml";
const SYSTEMD: &str = "deploy/systemd/walsweep.service";
const DOCKERFILE: &str = "Dockerfile";
const DOCKERIGNORE: &str = ".dockerignore";

/// Every YAML file this test knows about.
const YAML_FILES: [&str; 7] = [
    GRAFANA_DATASOURCES,
    GRAFANA_DASHBOARDS,
    PROMETHEUS,
    ALERTS,
    ALERTS_TEST,
    COMPOSE,
    KUBERNETES,
];

/// The port walsweep listens on in containers, as the files publish and scrape it.
const METRICS_PORT: u16 = 9187;
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];
/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

// ---------------------------------------------------------------------------------------------
// Reading the files

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(rel: &str) -> Yaml {
    serde_yaml_ng::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn yaml_documents(rel: &str) -> Vec<Yaml> {
    let text = read(rel);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
        })
        .filter(|doc: &Yaml| !doc.is_null())
        .collect()
}

fn dashboard() -> Json {
    serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

fn str_of<'a>(v: &'a Yaml, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {v:?}"))
}

fn seq_of<'a>(v: &'a Yaml, what: &str) -> &'a Vec<Yaml> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what}: expected a list, found {v:?}"))
}

fn strings_of(v: &Yaml, what: &str) -> Vec<String> {
    seq_of(v, what)
        .iter()
        .map(|s| str_of(s, what).to_string())
        .collect()
}

/// `walsweep_*` names in a text, in order of appearance.
fn walsweep_names(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(pos) = text[from..].find("walsweep_") {
        let start = from + pos;
        let mut end = start + "walsweep_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        let standalone = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_' || b == b':')
        };
        if standalone {
            out.push(text[start..end].to_string());
        }
        from = end;
    }
    out
}

/// A PromQL expression and where it comes from.
#[derive(Debug, Clone)]
struct Expr {
    origin: String,
    promql: String,
}

/// Dashboard target exprs (`$__rate_interval` and `$instance` left in).
fn dashboard_exprs(dash: &Json) -> Vec<Expr> {
    let mut out = Vec::new();
    for panel in all_panels(dash) {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_else(|| {
                panic!("{DASHBOARD}: panel {title:?} has a target without expr")
            });
            out.push(Expr {
                origin: format!("{DASHBOARD} panel {title:?} target {}", target["refId"]),
                promql: expr.to_string(),
            });
        }
    }
    out
}

/// Panels, including those nested in collapsed rows.
fn all_panels(dash: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("dashboard has panels") {
        out.push(panel);
        for nested in panel["panels"].as_array().into_iter().flatten() {
            out.push(nested);
        }
    }
    out
}

/// Every string in a JSON document.
fn json_strings<'a>(v: &'a Json, out: &mut Vec<&'a str>) {
    match v {
        Json::String(s) => out.push(s),
        Json::Array(a) => a.iter().for_each(|x| json_strings(x, out)),
        Json::Object(o) => o.values().for_each(|x| json_strings(x, out)),
        _ => {}
    }
}

struct AlertRule {
    name: String,
    expr: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn alert_rules() -> Vec<AlertRule> {
    let doc = yaml(ALERTS);
    let mut out = Vec::new();
    for group in seq_of(&doc["groups"], "alerts.yml groups") {
        for rule in seq_of(&group["rules"], "alerts.yml rules") {
            let name = str_of(&rule["alert"], "alerts.yml: a rule without `alert`").to_string();
            let map = |v: &Yaml| -> BTreeMap<String, String> {
                v.as_mapping()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| {
                                (
                                    str_of(k, "label name").to_string(),
                                    str_of(v, "label value").to_string(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            };
            out.push(AlertRule {
                expr: str_of(&rule["expr"], &format!("{name}: expr")).to_string(),
                labels: map(&rule["labels"]),
                annotations: map(&rule["annotations"]),
                name,
            });
        }
    }
    out
}

fn alert_exprs() -> Vec<Expr> {
    alert_rules()
        .into_iter()
        .map(|r| Expr {
            origin: format!("{ALERTS} alert {}", r.name),
            promql: r.expr,
        })
        .collect()
}

/// Every `walsweep_*` name the files mention, with where: dashboard (all strings: exprs,
/// variable queries, descriptions), alert exprs and annotations, alert test input series.
fn referenced_names() -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let dash = dashboard();
    let mut strings = Vec::new();
    json_strings(&dash, &mut strings);
    for s in strings {
        for name in walsweep_names(s) {
            out.entry(name).or_default().insert(DASHBOARD.to_string());
        }
    }
    for rule in alert_rules() {
        let texts = std::iter::once(&rule.expr).chain(rule.annotations.values());
        for text in texts {
            for name in walsweep_names(text) {
                out.entry(name)
                    .or_default()
                    .insert(format!("{ALERTS} {}", rule.name));
            }
        }
    }
    let tests = yaml(ALERTS_TEST);
    for test in seq_of(&tests["tests"], "alerts_test.yml tests") {
        for series in seq_of(&test["input_series"], "input_series") {
            let s = str_of(&series["series"], "input series");
            for name in walsweep_names(s) {
                out.entry(name).or_default().insert(format!(
                    "{ALERTS_TEST} {:?}",
                    test["name"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    out
}

/// The metric a referenced name stands for: itself, or a histogram's base for
/// `_bucket`/`_sum`/`_count`. `None` when walsweep does not have it.
fn exported_base(name: &str) -> Option<(&'static str, bool)> {
    if let Some(m) = walsweep::telemetry::metrics::ALL
        .iter()
        .find(|m| **m == name)
    {
        return Some((m, false));
    }
    HISTOGRAM_SUFFIXES.iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        walsweep::telemetry::metrics::ALL
            .iter()
            .find(|m| **m == base)
            .map(|m| (*m, true))
    })
}

// ---------------------------------------------------------------------------------------------
// Static checks

#[test]
fn every_file_parses() {
    for file in YAML_FILES {
        let docs = yaml_documents(file);
        assert!(!docs.is_empty(), "{file} holds no YAML document");
    }
    let dash = dashboard();
    assert!(dash.is_object(), "{DASHBOARD} is not a JSON object");
    toml::from_str::<toml::Table>(&read(COMPOSE_CONFIG))
        .unwrap_or_else(|e| panic!("{COMPOSE_CONFIG}: {e}"));
}

#[test]
fn referenced_metrics_are_in_metrics_all() {
    let names = referenced_names();
    assert!(
        names.len() >= 10,
        "found only {} walsweep_* names in the dashboard and alerts: {names:?}",
        names.len()
    );
    let unknown: Vec<String> = names
        .iter()
        .filter(|(name, _)| exported_base(name).is_none())
        .map(|(name, origins)| format!("{name} (in {origins:?})"))
        .collect();
    assert!(
        unknown.is_empty(),
        "names walsweep does not export (walsweep::telemetry::metrics::ALL, plus _bucket/_sum/_count of \
         histograms):\n  {}",
        unknown.join("\n  ")
    );
}

#[test]
fn every_expr_uses_walsweep_metrics() {
    let exprs: Vec<Expr> = dashboard_exprs(&dashboard())
        .into_iter()
        .chain(alert_exprs())
        .collect();
    assert!(exprs.len() >= 20, "only {} exprs found", exprs.len());
    for e in &exprs {
        let uses_up = e.promql.contains(r#"up{job="walsweep"}"#);
        assert!(
            uses_up || !walsweep_names(&e.promql).is_empty(),
            "{}: {:?} uses no walsweep metric",
            e.origin,
            e.promql
        );
    }
}

#[test]
fn dashboard_is_well_formed_and_has_the_panels() {
    let dash = dashboard();
    let schema = dash["schemaVersion"].as_i64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert_eq!(dash["uid"], "walsweep");
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a `datasource` variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(
            v["datasource"]["uid"], "${datasource}",
            "variable {} must query ${{datasource}}",
            v["name"]
        );
    }

    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, i64, i64, i64, i64)> = Vec::new();
    for panel in all_panels(&dash) {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        assert!(
            ids.insert(panel["id"].as_i64().expect("panel id")),
            "duplicate panel id in {title:?}"
        );
        let g = &panel["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_i64().expect("gridPos.x"),
            g["y"].as_i64().expect("gridPos.y"),
            g["w"].as_i64().expect("gridPos.w"),
            g["h"].as_i64().expect("gridPos.h"),
        );
        assert!(
            x >= 0 && w > 0 && h > 0 && x + w <= 24,
            "{title:?}: gridPos {g}"
        );
        for (other, ox, oy, ow, oh) in &boxes {
            let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
            assert!(!overlap, "panels {title:?} and {other:?} overlap");
        }
        boxes.push((title.clone(), x, y, w, h));
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{title:?} must use the ${{datasource}} variable"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title:?} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title:?} target");
            assert!(
                refs.insert(t["refId"].to_string()),
                "{title:?}: duplicate refId"
            );
        }
    }

    // What the dashboard must show: each entry is a set of fragments one expr must contain
    // (spaces ignored).
    let exprs: Vec<String> = dashboard_exprs(&dash)
        .into_iter()
        .map(|e| e.promql.replace(' ', ""))
        .collect();
    let required: &[(&str, &[&str])] = &[
        (
            "transactions applied/s",
            &["rate(walsweep_transactions_applied_total"],
        ),
        ("mirror rows/s", &["rate(walsweep_mirror_rows_total"]),
        ("broadcasts/s", &["rate(walsweep_broadcasts_total"]),
        (
            "changes decoded/s",
            &["rate(walsweep_changes_decoded_total"],
        ),
        ("slot lag bytes", &["walsweep_slot_lag_bytes"]),
        ("lag seconds", &["walsweep_lag_seconds"]),
        (
            "latency p50",
            &[
                "histogram_quantile(0.5,",
                "walsweep_commit_to_applied_seconds_bucket",
            ],
        ),
        (
            "latency p90",
            &[
                "histogram_quantile(0.9,",
                "walsweep_commit_to_applied_seconds_bucket",
            ],
        ),
        (
            "latency p99",
            &[
                "histogram_quantile(0.99,",
                "walsweep_commit_to_applied_seconds_bucket",
            ],
        ),
        (
            "Redis round trip p99",
            &[
                "histogram_quantile(0.99,",
                "walsweep_redis_round_trip_seconds_bucket",
            ],
        ),
        (
            "effects by kind",
            &["by(kind)", "rate(walsweep_effects_applied_total"],
        ),
        ("keys unlinked rate", &["rate(walsweep_keys_unlinked_total"]),
        (
            "fallbacks by cause",
            &["by(cause)", "walsweep_fallbacks_total"],
        ),
        ("errors by kind", &["by(kind)", "walsweep_errors_total"]),
        ("reconnects", &["walsweep_reconnects_total"]),
        ("Redis up", &["walsweep_redis_up"]),
        ("streaming", &["walsweep_streaming"]),
        ("slot wal_status", &["walsweep_slot_wal_status"]),
        (
            "inspected rows by table",
            &["by(instance,table)", "rate(walsweep_inspected_rows_total"],
        ),
        (
            "drift by table and kind",
            &["by(table,kind)", "walsweep_drift_rows_total"],
        ),
        (
            "visibility gate wait",
            &["walsweep_visibility_wait_seconds_bucket"],
        ),
        (
            "fills by result",
            &["by(instance,result)", "walsweep_fills_total"],
        ),
        ("fences raised", &["walsweep_fences_raised_total"]),
        ("cluster primaries", &["walsweep_redis_cluster_primaries"]),
        (
            "cluster slot redirections by reason",
            &[
                "by(instance,reason)",
                "walsweep_redis_cluster_redirects_total",
            ],
        ),
    ];
    for (what, fragments) in required {
        assert!(
            exprs
                .iter()
                .any(|e| fragments.iter().all(|f| e.contains(f))),
            "no dashboard query shows {what} (an expr containing {fragments:?})"
        );
    }
    // Histograms are read through histogram_quantile over le.
    for e in &exprs {
        if e.contains("_seconds_bucket") {
            assert!(
                e.contains("histogram_quantile(") && e.contains("by(le)"),
                "{e}"
            );
        }
    }
}

#[test]
fn alerts_are_documented_and_each_has_firing_and_quiet_tests() {
    let rules = alert_rules();
    let names: BTreeSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    for required in [
        "WalsweepTargetDown",
        "WalsweepNotStreaming",
        "WalsweepRedisDown",
        "WalsweepErrors",
        "WalsweepSlotLagHigh",
        "WalsweepSlotLagGrowing",
        "WalsweepNoProgress",
        "WalsweepSlotWalUnreserved",
        "WalsweepSlotLost",
        "WalsweepMirrorDrift",
    ] {
        assert!(names.contains(required), "{ALERTS} lacks {required}");
    }
    assert_eq!(
        names.len(),
        rules.len(),
        "duplicate alert names in {ALERTS}"
    );
    for r in &rules {
        for key in ["summary", "description"] {
            let text = r.annotations.get(key).map(String::as_str).unwrap_or("");
            assert!(
                text.len() >= 20,
                "{}: annotation {key} missing or too short",
                r.name
            );
        }
        assert!(
            matches!(
                r.labels.get("severity").map(String::as_str),
                Some("warning" | "critical")
            ),
            "{}: severity label must be warning or critical",
            r.name
        );
    }
    let uses_target_job = rules
        .iter()
        .any(|r| r.expr.contains(r#"up{job="walsweep"}"#));
    assert!(uses_target_job, "no alert on up{{job=\"walsweep\"}}");

    // alerts_test.yml: for each alert, an evaluation where it fires and one where it must not.
    let tests = yaml(ALERTS_TEST);
    assert_eq!(
        strings_of(&tests["rule_files"], "alerts_test.yml rule_files"),
        ["alerts.yml"],
        "{ALERTS_TEST} must test alerts.yml"
    );
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in seq_of(&tests["tests"], "tests") {
        for case in seq_of(&test["alert_rule_test"], "alert_rule_test") {
            let name = str_of(&case["alertname"], "alertname").to_string();
            assert!(
                names.contains(name.as_str()),
                "{ALERTS_TEST} tests unknown alert {name}"
            );
            if seq_of(&case["exp_alerts"], "exp_alerts").is_empty() {
                quiet.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }
    for name in &names {
        assert!(
            fires.contains(*name),
            "{ALERTS_TEST}: no case where {name} fires"
        );
        assert!(
            quiet.contains(*name),
            "{ALERTS_TEST}: no case where {name} must not fire"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// promtool

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// `program` (`promtool` or `prometheus`, both from Debian's `prometheus` package). When it is
/// missing, `scripts/ensure-promtool` (the step `scripts/test`, and so CI, runs before the
/// tests) installs it, so a plain `cargo test` checks the same as CI. Still missing: a failure
/// under CI, a loud skip otherwise (not root, or no apt-get).
fn prometheus_tool(program: &str) -> Option<PathBuf> {
    if let Some(p) = on_path(program) {
        return Some(p);
    }
    let install = ensure_promtool(program);
    if let Some(p) = on_path(program) {
        return Some(p);
    }
    let reason = match install {
        Ok(out) => format!("scripts/ensure-promtool succeeded but left no {program}:\n{out}"),
        Err(out) => format!("scripts/ensure-promtool could not install it:\n{out}"),
    };
    if in_ci() {
        panic!("{program} not found under CI; {reason}");
    }
    // Not eprintln!: the harness swallows that for a passing test, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\nSKIPPED: the {program} checks of tests/ops_files.rs did not run: {program} is not on \
         PATH and {reason}\nInstall it with scripts/ensure-promtool as root (or `apt-get install \
         -y --no-install-recommends prometheus`).\n"
    );
    None
}

/// Runs scripts/ensure-promtool once per test binary (tests asking at the same time wait for
/// the one run): its output, `Err` when it failed.
fn ensure_promtool(missing: &str) -> &'static Result<String, String> {
    static RESULT: OnceLock<Result<String, String>> = OnceLock::new();
    RESULT.get_or_init(|| {
        let script = root().join("scripts/ensure-promtool");
        let _ = writeln!(
            std::io::stderr(),
            "{missing} not on PATH: running {}",
            script.display()
        );
        match Command::new(&script).stdin(Stdio::null()).output() {
            Err(e) => Err(format!("running {}: {e}", script.display())),
            Ok(out) => {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                if out.status.success() {
                    Ok(text)
                } else {
                    Err(format!("{} ({}):\n{text}", script.display(), out.status))
                }
            }
        }
    })
}

fn run_ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{text}",
        out.status
    );
    text
}

#[test]
fn promtool_checks_and_rule_tests_pass() {
    let Some(promtool) = prometheus_tool("promtool") else {
        return;
    };
    let promtool = |args: &[&str]| {
        // From the repository root; rule_files resolve relative to the file naming them.
        run_ok(Command::new(&promtool).args(args).current_dir(root()))
    };
    let out = promtool(&["check", "rules", ALERTS]);
    let expected = format!("SUCCESS: {} rules found", alert_rules().len());
    assert!(
        out.contains(&expected),
        "promtool check rules: want {expected:?}:\n{out}"
    );
    let out = promtool(&["check", "config", PROMETHEUS]);
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");
    let out = promtool(&["test", "rules", ALERTS_TEST]);
    assert!(out.contains("SUCCESS"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Cross-file consistency

/// The Dockerfile's final-stage instructions we care about.
struct Dockerfile {
    froms: Vec<String>,
    runs: Vec<String>,
    user: Option<String>,
    expose: Vec<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    copies_from_build: Vec<String>,
}

fn dockerfile() -> Dockerfile {
    let text = read(DOCKERFILE).replace("\\\n", " ");
    let mut d = Dockerfile {
        froms: vec![],
        runs: vec![],
        user: None,
        expose: vec![],
        entrypoint: vec![],
        cmd: vec![],
        copies_from_build: vec![],
    };
    let json_array = |rest: &str, what: &str| -> Vec<String> {
        serde_json::from_str(rest.trim())
            .unwrap_or_else(|e| panic!("{DOCKERFILE}: {what} must be a JSON array: {e}"))
    };
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (instr, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        match instr.to_ascii_uppercase().as_str() {
            "FROM" => d.froms.push(rest.trim().to_string()),
            "RUN" => d
                .runs
                .push(rest.split_whitespace().collect::<Vec<_>>().join(" ")),
            "USER" => d.user = Some(rest.trim().to_string()),
            "EXPOSE" => d.expose.extend(rest.split_whitespace().map(str::to_string)),
            "ENTRYPOINT" => d.entrypoint = json_array(rest, "ENTRYPOINT"),
            "CMD" => d.cmd = json_array(rest, "CMD"),
            "COPY" if rest.trim_start().starts_with("--from=") => {
                d.copies_from_build.push(rest.trim().to_string())
            }
            _ => {}
        }
    }
    d
}

/// `run --config PATH` → PATH.
fn config_path_of_run(args: &[String], origin: &str) -> String {
    match args {
        [run, flag, path] if run == "run" && (flag == "--config" || flag == "-c") => path.clone(),
        _ => panic!("{origin}: expected [\"run\", \"--config\", PATH], found {args:?}"),
    }
}

fn parse_listen(listen: &str, origin: &str) -> (String, u16) {
    let (host, port) = listen
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{origin}: listen {listen:?} is not host:port"));
    (
        host.to_string(),
        port.parse()
            .unwrap_or_else(|_| panic!("{origin}: listen {listen:?} has no numeric port")),
    )
}

/// A config a container runs with: valid for walsweep, listening on all interfaces of the
/// container on the port the files publish.
fn assert_container_config(text: &str, origin: &str) -> Config {
    let config = Config::parse(text).unwrap_or_else(|e| panic!("{origin}: invalid config: {e}"));
    let (host, port) = parse_listen(&config.metrics.listen, origin);
    assert_eq!(
        host, "0.0.0.0",
        "{origin}: [metrics] listen must be 0.0.0.0 in a container (127.0.0.1 is unreachable \
         from Prometheus and the kubelet)"
    );
    assert_eq!(port, METRICS_PORT, "{origin}: [metrics] listen port");
    assert!(
        config.source.url.is_none(),
        "{origin}: keep the source URL (password) out of the file: WALSWEEP_SOURCE_URL"
    );
    config
}

fn walsweep_binary() -> &'static str {
    env!("CARGO_BIN_EXE_walsweep")
}

#[test]
fn dockerfile_builds_locked_and_runs_unprivileged() {
    let d = dockerfile();
    assert_eq!(d.froms.len(), 2, "two stages: {:?}", d.froms);
    assert!(
        d.froms[0].starts_with("rust:1-bookworm"),
        "builder: {}",
        d.froms[0]
    );
    assert_eq!(d.froms[1], "debian:bookworm-slim");
    assert!(
        d.runs
            .iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "no `cargo build --release --locked` in {:?}",
        d.runs
    );
    assert!(d.runs.iter().any(|r| r.contains("ca-certificates")));
    let user = d.user.as_deref().expect("a USER instruction");
    assert!(
        !user.is_empty() && !user.starts_with("root") && !user.starts_with("0"),
        "runs as root: USER {user}"
    );
    assert!(
        user.split(':').all(|p| p.parse::<u32>().is_ok()),
        "USER {user}: numeric, so Kubernetes runAsNonRoot can check it"
    );
    assert_eq!(d.expose, [METRICS_PORT.to_string()]);
    assert_eq!(d.entrypoint, ["walsweep"]);
    config_path_of_run(&d.cmd, "Dockerfile CMD");
    assert!(
        d.copies_from_build
            .iter()
            .any(|c| c.ends_with(" /usr/local/bin/walsweep")),
        "the binary must land on PATH as walsweep: {:?}",
        d.copies_from_build
    );

    // The build context after .dockerignore still holds what `cargo build` needs: manifest,
    // lockfile, sources and every explicitly declared target.
    let patterns: Vec<String> = read(DOCKERIGNORE)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/').to_string())
        .collect();
    for required in ["target", ".venv", "fuzz/target"] {
        assert!(
            patterns.iter().any(|p| p == required),
            "{DOCKERIGNORE} lacks {required}"
        );
    }
    let ignored = |path: &str| {
        patterns.iter().any(|p| {
            if let Some(ext) = p.strip_prefix("*.") {
                !path.contains('/') && path.ends_with(&format!(".{ext}"))
            } else {
                assert!(
                    !p.contains(['*', '?', '[', '!']),
                    "{DOCKERIGNORE}: extend this test for pattern {p:?}"
                );
                path == p || path.starts_with(&format!("{p}/"))
            }
        })
    };
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).expect("Cargo.toml");
    let mut needed = vec![
        "Cargo.toml".to_string(),
        "Cargo.lock".to_string(),
        "src/main.rs".to_string(),
        "src/lib.rs".to_string(),
    ];
    for (kind, dir) in [
        ("bench", "benches"),
        ("bin", "src/bin"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        for target in manifest
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let path = match target.get("path").and_then(|p| p.as_str()) {
                Some(p) => p.to_string(),
                None => {
                    let name = target["name"].as_str().expect("target name");
                    format!("{dir}/{name}.rs")
                }
            };
            needed.push(path);
        }
    }
    for path in &needed {
        assert!(root().join(path).exists(), "{path} does not exist");
        assert!(
            !ignored(path),
            "{DOCKERIGNORE} excludes {path}, which the build needs"
        );
    }
}

#[test]
fn compose_is_consistent_with_walsweep_and_monitoring() {
    let compose = yaml(COMPOSE);
    let services = compose["services"]
        .as_mapping()
        .expect("docker-compose.yml: services");
    let service = |name: &str| -> &Yaml {
        services
            .get(name)
            .unwrap_or_else(|| panic!("{COMPOSE}: no service {name}"))
    };
    let bind_mounts = |name: &str| -> Vec<(String, String)> {
        strings_of(&service(name)["volumes"], &format!("{name} volumes"))
            .into_iter()
            .map(|v| {
                let mut parts = v.splitn(3, ':');
                let (src, dst) = (parts.next().unwrap(), parts.next().unwrap_or(""));
                assert!(
                    src.starts_with("./"),
                    "{name}: use repository-relative mounts: {v}"
                );
                assert!(
                    root().join(src).exists(),
                    "{COMPOSE} {name}: mounted {src} does not exist"
                );
                (src.trim_start_matches("./").to_string(), dst.to_string())
            })
            .collect()
    };
    let env = |name: &str| -> BTreeMap<String, String> {
        service(name)["environment"]
            .as_mapping()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Yaml::String(s) => s.clone(),
                            other => serde_yaml_ng::to_string(other).unwrap().trim().to_string(),
                        };
                        (str_of(k, "env name").to_string(), v)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };

    // Postgres: logical decoding on, demo schema loaded.
    let pg = service("postgres");
    assert!(str_of(&pg["image"], "postgres image").starts_with("postgres:15"));
    let pg_cmd = strings_of(&pg["command"], "postgres command");
    assert_eq!(pg_cmd[0], "postgres");
    assert!(
        pg_cmd.windows(2).any(|w| w == ["-c", "wal_level=logical"]),
        "{pg_cmd:?}"
    );
    assert!(
        bind_mounts("postgres")
            .iter()
            .any(|(src, dst)| src == "sql/demo.sql"
                && dst.starts_with("/docker-entrypoint-initdb.d/")
                && dst.ends_with(".sql")),
        "sql/demo.sql must be mounted into /docker-entrypoint-initdb.d"
    );
    let pg_password = env("postgres")
        .get("POSTGRES_PASSWORD")
        .cloned()
        .expect("postgres: POSTGRES_PASSWORD (the image requires it)");
    assert!(str_of(&service("redis")["image"], "redis image").starts_with("redis:7"));

    // walsweep: built here, the config it is told to read is mounted and valid, URLs point at
    // the services, the metrics port matches what Prometheus scrapes.
    let ws = service("walsweep");
    assert_eq!(ws["build"].as_str(), Some("."), "walsweep: build: .");
    let cmd = strings_of(&ws["command"], "walsweep command");
    let d = dockerfile();
    assert_eq!(cmd, d.cmd, "compose command and the Dockerfile CMD differ");
    let config_path = config_path_of_run(&cmd, "compose walsweep command");
    let (config_src, _) = bind_mounts("walsweep")
        .into_iter()
        .find(|(_, dst)| *dst == config_path)
        .unwrap_or_else(|| panic!("{COMPOSE}: nothing mounted at {config_path}"));
    assert_eq!(config_src, COMPOSE_CONFIG);
    let config = assert_container_config(&read(COMPOSE_CONFIG), COMPOSE_CONFIG);
    // Same rules as the demo it is a copy of.
    let demo = Config::parse(&read(DEMO_CONFIG)).expect("demo config");
    assert_eq!(
        format!("{:?}", config.tables),
        format!("{:?}", demo.tables),
        "[[table]] rules differ from {DEMO_CONFIG}"
    );
    assert_eq!(format!("{:?}", config.source), format!("{:?}", demo.source));
    assert_eq!(
        format!("{:?}", config.matroska),
        format!("{:?}", demo.matroska)
    );

    let ws_env = env("walsweep");
    let source_url = ws_env
        .get(walsweep::config::SOURCE_URL_ENV)
        .unwrap_or_else(|| panic!("walsweep: no {}", walsweep::config::SOURCE_URL_ENV));
    assert_eq!(
        source_url,
        &format!("postgres://postgres:{pg_password}@postgres:5432/postgres"),
        "walsweep's source URL must reach the postgres service with its password"
    );
    let redis_url = ws_env
        .get(walsweep::config::REDIS_URL_ENV)
        .unwrap_or_else(|| panic!("walsweep: no {}", walsweep::config::REDIS_URL_ENV));
    assert_eq!(redis_url, "redis://redis:6379/0");
    let mut with_env = config.clone();
    with_env.apply_env(|name| ws_env.get(name).cloned());
    assert_eq!(with_env.source.url.as_deref(), Some(source_url.as_str()));
    assert_eq!(&with_env.redis.url, redis_url);
    with_env
        .source
        .connect_params()
        .unwrap_or_else(|e| panic!("walsweep cannot use {source_url}: {e}"));

    // Prometheus: config and alerts mounted side by side; it scrapes walsweep's port.
    let prom_mounts = bind_mounts("prometheus");
    let prom_cmd = strings_of(&service("prometheus")["command"], "prometheus command");
    let config_file = prom_cmd
        .iter()
        .find_map(|a| a.strip_prefix("--config.file="))
        .expect("prometheus: --config.file=");
    let (_, prom_dir) = config_file.rsplit_once('/').map(|(d, f)| (f, d)).unwrap();
    assert!(prom_mounts.contains(&(PROMETHEUS.to_string(), config_file.to_string())));
    let prom = yaml(PROMETHEUS);
    for rule_file in strings_of(&prom["rule_files"], "rule_files") {
        assert!(
            prom_mounts.contains(&(
                format!("config/prometheus/{rule_file}"),
                format!("{prom_dir}/{rule_file}")
            )),
            "{rule_file} must be mounted next to the Prometheus config ({prom_dir}/)"
        );
    }
    let targets = prometheus_walsweep_targets(&prom);
    assert_eq!(targets, [format!("walsweep:{METRICS_PORT}")]);

    // Grafana: provisioning mounted, the dashboard where the provider looks, the datasource
    // pointing at the prometheus service.
    let gf = bind_mounts("grafana");
    let gf_env = env("grafana");
    assert_eq!(
        gf_env.get("GF_AUTH_ANONYMOUS_ENABLED").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        gf_env.get("GF_AUTH_ANONYMOUS_ORG_ROLE").map(String::as_str),
        Some("Viewer")
    );
    for (src, dir) in [
        (
            "config/grafana/provisioning/datasources",
            "/etc/grafana/provisioning/datasources",
        ),
        (
            "config/grafana/provisioning/dashboards",
            "/etc/grafana/provisioning/dashboards",
        ),
    ] {
        assert!(
            gf.contains(&(src.to_string(), dir.to_string())),
            "grafana: mount {src} at {dir}"
        );
    }
    let providers = yaml(GRAFANA_DASHBOARDS);
    let provider = &seq_of(&providers["providers"], "providers")[0];
    assert_eq!(provider["type"].as_str(), Some("file"));
    let provider_dir = str_of(&provider["options"]["path"], "provider options.path");
    let (_, dash_dst) = gf
        .iter()
        .find(|(src, _)| src == DASHBOARD)
        .unwrap_or_else(|| panic!("grafana: {DASHBOARD} is not mounted"));
    assert!(
        dash_dst.starts_with(&format!("{provider_dir}/")),
        "the dashboard is mounted at {dash_dst}, the provider reads {provider_dir}"
    );
    let datasources = yaml(GRAFANA_DATASOURCES);
    let datasources = seq_of(&datasources["datasources"], "datasources");
    let prom_ds = datasources
        .iter()
        .find(|d| d["type"].as_str() == Some("prometheus"))
        .expect("a prometheus datasource");
    assert_eq!(prom_ds["url"].as_str(), Some("http://prometheus:9090"));
    assert_eq!(prom_ds["isDefault"].as_bool(), Some(true));
    if let Some(home) = gf_env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH") {
        assert_eq!(
            home, dash_dst,
            "the home dashboard path is not where the dashboard is mounted"
        );
    }

    // `docker compose config -q` validates the file against the compose spec without an
    // engine; only where the compose plugin (or docker-compose) is installed.
    let compose_cli: Option<Vec<&str>> = if Command::new("docker")
        .args(["compose", "version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        Some(vec!["docker", "compose"])
    } else if on_path("docker-compose").is_some() {
        Some(vec!["docker-compose"])
    } else {
        None
    };
    match compose_cli {
        Some(cli) => {
            run_ok(
                Command::new(cli[0])
                    .args(&cli[1..])
                    .args(["-f", COMPOSE, "config", "-q"])
                    .current_dir(root()),
            );
        }
        None => eprintln!(
            "note: no `docker compose` / docker-compose here: {COMPOSE} checked by parsing only"
        ),
    }
}

/// Targets of the `walsweep` scrape job.
fn prometheus_walsweep_targets(prom: &Yaml) -> Vec<String> {
    let job = seq_of(&prom["scrape_configs"], "scrape_configs")
        .iter()
        .find(|j| j["job_name"].as_str() == Some("walsweep"))
        .unwrap_or_else(|| {
            panic!("{PROMETHEUS}: no job_name walsweep (alerts.yml matches job=\"walsweep\")")
        });
    seq_of(&job["static_configs"], "static_configs")
        .iter()
        .flat_map(|s| strings_of(&s["targets"], "targets"))
        .collect()
}

fn k8s_named<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "{KUBERNETES}: want exactly one {kind}");
    found[0]
}

/// The walsweep container's probe paths from the Kubernetes manifest: (readiness, liveness).
fn k8s_probe_paths() -> (String, String) {
    let docs = yaml_documents(KUBERNETES);
    let c = k8s_walsweep_container(k8s_named(&docs, "Deployment"));
    (
        str_of(
            &c["readinessProbe"]["httpGet"]["path"],
            "readinessProbe path",
        )
        .to_string(),
        str_of(&c["livenessProbe"]["httpGet"]["path"], "livenessProbe path").to_string(),
    )
}

fn k8s_walsweep_container(deploy: &Yaml) -> &Yaml {
    seq_of(
        &deploy["spec"]["template"]["spec"]["containers"],
        "containers",
    )
    .iter()
    .find(|c| c["name"].as_str() == Some("walsweep"))
    .expect("a container named walsweep")
}

#[test]
fn kubernetes_sidecar_is_consistent_with_walsweep() {
    let docs = yaml_documents(KUBERNETES);
    for d in &docs {
        assert!(
            d["apiVersion"].is_string() && d["kind"].is_string(),
            "{d:?}"
        );
        assert!(d["metadata"]["name"].is_string(), "{d:?}");
    }
    let cm = k8s_named(&docs, "ConfigMap");
    let deploy = k8s_named(&docs, "Deployment");
    assert_eq!(deploy["apiVersion"].as_str(), Some("apps/v1"));
    let spec = &deploy["spec"];
    assert_eq!(
        spec["replicas"].as_i64(),
        Some(1),
        "a slot has one consumer: more replicas never become ready"
    );
    assert_eq!(
        spec["strategy"]["type"].as_str(),
        Some("Recreate"),
        "a rolling update would wait forever for the new pod while the old one holds the slot"
    );
    let selector = &spec["selector"]["matchLabels"];
    let labels = &spec["template"]["metadata"]["labels"];
    for (k, v) in selector.as_mapping().expect("selector.matchLabels") {
        assert_eq!(&labels[k], v, "pod template labels must match the selector");
    }
    let pod = &spec["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace >= 30,
        "terminationGracePeriodSeconds {grace}: too short to drain"
    );

    let annotations = &spec["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(METRICS_PORT.to_string().as_str())
    );
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));

    let c = k8s_walsweep_container(deploy);
    let containers = seq_of(&pod["containers"], "containers");
    assert!(
        containers.len() >= 2,
        "walsweep is a sidecar: the app container goes beside it"
    );
    let args = strings_of(&c["args"], "walsweep args");
    assert_eq!(args, dockerfile().cmd, "args differ from the image's CMD");
    let config_path = config_path_of_run(&args, "walsweep container args");

    // The config file comes from the ConfigMap, and is a valid container config.
    let (dir, file) = config_path.rsplit_once('/').unwrap();
    let mount = seq_of(&c["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    let volume_name = str_of(&mount["name"], "volumeMount name");
    let volume = seq_of(&pod["volumes"], "volumes")
        .iter()
        .find(|v| v["name"].as_str() == Some(volume_name))
        .unwrap_or_else(|| panic!("no volume {volume_name}"));
    assert_eq!(
        volume["configMap"]["name"], cm["metadata"]["name"],
        "volume must be the ConfigMap"
    );
    let key = seq_of(&volume["configMap"]["items"], "configMap items")
        .iter()
        .find(|i| i["path"].as_str() == Some(file))
        .map(|i| str_of(&i["key"], "item key"))
        .unwrap_or(file);
    let toml_text = str_of(&cm["data"][key], &format!("ConfigMap data.{key}"));
    assert_container_config(toml_text, &format!("{KUBERNETES} ConfigMap {key}"));

    // Secret source URL under the name walsweep reads.
    let env = seq_of(&c["env"], "env");
    let source = env
        .iter()
        .find(|e| e["name"].as_str() == Some(walsweep::config::SOURCE_URL_ENV))
        .unwrap_or_else(|| panic!("no {} env", walsweep::config::SOURCE_URL_ENV));
    assert!(
        source["valueFrom"]["secretKeyRef"]["name"].is_string(),
        "the source URL comes from a Secret"
    );
    assert!(
        source["value"].is_null(),
        "no literal source URL in the manifest"
    );

    // Port, probes on it, resources, security.
    let ports = seq_of(&c["ports"], "ports");
    let port_of = |p: &Yaml| -> i64 {
        match p {
            Yaml::Number(n) => n.as_i64().unwrap(),
            Yaml::String(name) => ports
                .iter()
                .find(|q| q["name"].as_str() == Some(name))
                .and_then(|q| q["containerPort"].as_i64())
                .unwrap_or_else(|| panic!("probe port {name} is not a container port")),
            other => panic!("probe port {other:?}"),
        }
    };
    assert!(ports
        .iter()
        .any(|p| p["containerPort"].as_i64() == Some(METRICS_PORT.into())));
    let (ready, live) = k8s_probe_paths();
    assert_eq!(ready, "/readyz");
    assert_eq!(live, "/healthz");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            port_of(&c[probe]["httpGet"]["port"]),
            i64::from(METRICS_PORT),
            "{probe} port"
        );
    }
    for kind in ["requests", "limits"] {
        assert!(
            c["resources"][kind]["memory"].is_string(),
            "walsweep resources.{kind}.memory"
        );
    }
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    let uid = dockerfile().user.unwrap();
    assert_eq!(
        sc["runAsUser"].as_i64().map(|u| u.to_string()),
        uid.split(':').next().map(str::to_string),
        "runAsUser must be the image's USER"
    );
}

/// `Key=value` lines of the unit file (repeated keys keep every value).
fn systemd_unit() -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in read(SYSTEMD).lines().map(str::trim) {
        if line.starts_with(['#', ';', '[']) || line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{SYSTEMD}: not Key=value: {line}"));
        out.entry(k.trim().to_string())
            .or_default()
            .push(v.trim().to_string());
    }
    out
}

#[test]
fn systemd_unit_is_hardened_and_matches_walsweep() {
    let unit = systemd_unit();
    let one = |k: &str| -> &str {
        let v = unit.get(k).unwrap_or_else(|| panic!("{SYSTEMD}: no {k}="));
        v.last().unwrap()
    };
    for (k, v) in [
        ("Type", "simple"),
        ("Restart", "on-failure"),
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(one(k), v, "{SYSTEMD}: {k}");
    }
    assert!(
        one("EnvironmentFile").starts_with('/'),
        "EnvironmentFile holds the secrets"
    );
    let exec: Vec<String> = one("ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert!(exec[0].ends_with("/walsweep"), "ExecStart {exec:?}");
    let config_path = config_path_of_run(&exec[1..], "ExecStart");

    // The exit status it will not restart on is the one walsweep uses for a bad config.
    let no_restart: i32 = one("RestartPreventExitStatus").parse().expect("a number");
    let out = Command::new(walsweep_binary())
        .args(["run", "--config", "/nonexistent/walsweep.toml"])
        .env_remove(walsweep::config::SOURCE_URL_ENV)
        .output()
        .expect("running walsweep");
    assert_eq!(
        out.status.code(),
        Some(no_restart),
        "walsweep run with a missing config exits {:?}, the unit prevents restarts on {no_restart}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(config_path.starts_with("/etc/"), "{config_path}");

    // systemd's own parser, where installed: no unknown keys or bad values. ExecStart must
    // name an existing executable, so point it at the binary built for this test.
    if let Some(analyze) = on_path("systemd-analyze") {
        let dir = tempfile::tempdir().unwrap();
        let unit_text = read(SYSTEMD).replace(
            &format!("ExecStart={}", exec[0]),
            &format!("ExecStart={}", walsweep_binary()),
        );
        let path = dir.path().join("walsweep.service");
        std::fs::write(&path, unit_text).unwrap();
        let out = Command::new(analyze)
            .args(["verify", path.to_str().unwrap()])
            .output()
            .expect("running systemd-analyze");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.trim().is_empty(),
            "systemd-analyze verify {SYSTEMD}:\n{text}"
        );
    } else {
        eprintln!("note: systemd-analyze not installed; {SYSTEMD} checked by parsing only");
    }
}

#[test]
fn container_configs_pass_walsweep_check() {
    // The CLI itself, not only Config::parse: the file compose mounts passes `walsweep check`.
    let out = Command::new(walsweep_binary())
        .args(["check", "--no-environment", "--config", COMPOSE_CONFIG])
        .current_dir(root())
        .output()
        .expect("running walsweep check");
    assert!(
        out.status.success(),
        "walsweep check {COMPOSE_CONFIG}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Against a running pipeline and a real Prometheus

/// HTTP/1.0 GET (no chunked bodies): (status, body).
async fn http_get(addr: std::net::SocketAddr, path_and_query: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .write_all(format!("GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response from {addr}{path_and_query}: {response}"));
    (status, body.to_string())
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One scrape of `/metrics`: metric types, and for each series name its labels and values.
#[derive(Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    labels: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

fn parse_scrape(body: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                s.types.insert(name.to_string(), kind.to_string());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let series = s.labels.entry(name.to_string()).or_default();
        if line[name_end..].starts_with('{') {
            let inner = &line[name_end + 1..line.rfind('}').expect("closing }")];
            // label="value" pairs; values here never hold quotes or commas.
            for pair in inner.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').expect("label=value");
                series
                    .entry(k.to_string())
                    .or_default()
                    .insert(v.trim_matches('"').to_string());
            }
        }
    }
    s
}

/// Words inside `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`.
fn grouping_labels(promql: &str) -> Vec<String> {
    let mut out = Vec::new();
    for kw in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        let mut from = 0;
        while let Some(pos) = promql[from..].find(kw) {
            let start = from + pos;
            from = start + kw.len();
            let before_ok = start == 0
                || !promql.as_bytes()[start - 1].is_ascii_alphanumeric()
                    && promql.as_bytes()[start - 1] != b'_';
            let rest = promql[from..].trim_start();
            if before_ok && rest.starts_with('(') {
                let inner = &rest[1..rest.find(')').expect("closing )")];
                out.extend(
                    inner
                        .split(',')
                        .map(|l| l.trim().to_string())
                        .filter(|l| !l.is_empty()),
                );
            }
        }
    }
    out
}

/// `walsweep_x{a="b", c=~"d"}` → (walsweep_x, [(a, "=", b), (c, "=~", d)]).
/// (label, operator, value) of one label matcher.
type Matcher = (String, String, String);

fn selectors(promql: &str) -> Vec<(String, Vec<Matcher>)> {
    let mut out = Vec::new();
    for name in walsweep_names(promql) {
        let mut from = 0;
        while let Some(pos) = promql[from..].find(&name) {
            let start = from + pos;
            from = start + name.len();
            let after = &promql[from..];
            let boundary = !after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
            if !boundary {
                continue;
            }
            let mut matchers = Vec::new();
            if let Some(inner) = after.strip_prefix('{') {
                let inner = &inner[..inner.find('}').expect("closing }")];
                for m in inner.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                    let op_at = m.find(['=', '!']).expect("matcher operator");
                    let label = m[..op_at].trim().to_string();
                    let rest = &m[op_at..];
                    let op_len = if rest.starts_with("=~")
                        || rest.starts_with("!~")
                        || rest.starts_with("!=")
                    {
                        2
                    } else {
                        1
                    };
                    let value = rest[op_len..].trim().trim_matches('"').to_string();
                    matchers.push((label, rest[..op_len].to_string(), value));
                }
            }
            out.push((name.clone(), matchers));
        }
    }
    out
}

/// Checks one expr against the scrape: names exported with `# TYPE`, histograms only through
/// their series, grouping labels and matchers that exist. Returns problems.
fn check_expr(e: &Expr, scrape: &Scrape) -> Vec<String> {
    let mut problems = Vec::new();
    let mut known_labels: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
    for name in walsweep_names(&e.promql) {
        let Some((base, part)) = exported_base(&name) else {
            problems.push(format!(
                "{}: {name} is not in walsweep::telemetry::metrics::ALL",
                e.origin
            ));
            continue;
        };
        let kind = scrape.types.get(base).map(String::as_str);
        if kind.is_none() {
            problems.push(format!("{}: /metrics has no `# TYPE {base}`", e.origin));
        }
        if kind == Some("histogram") && !part {
            problems.push(format!(
                "{}: {name} is a histogram: query {name}_bucket, _sum or _count",
                e.origin
            ));
        }
        if part && kind.is_some_and(|k| k != "histogram") {
            problems.push(format!(
                "{}: {name}: {base} is a {}, not a histogram",
                e.origin,
                kind.unwrap()
            ));
        }
        if let Some(labels) = scrape.labels.get(&name) {
            known_labels.extend(labels.keys().cloned());
        } else if kind.is_some() {
            problems.push(format!("{}: /metrics has no sample of {name}", e.origin));
        }
    }
    for label in grouping_labels(&e.promql) {
        if !known_labels.contains(&label) {
            problems.push(format!(
                "{}: groups by {label:?}, which none of its series has (labels: {known_labels:?})",
                e.origin
            ));
        }
    }
    for (name, matchers) in selectors(&e.promql) {
        let labels = scrape.labels.get(&name).cloned().unwrap_or_default();
        for (label, op, value) in matchers {
            if TARGET_LABELS.contains(&label.as_str()) {
                continue;
            }
            match labels.get(&label) {
                None => problems.push(format!("{}: {name} has no label {label:?}", e.origin)),
                Some(values) if op == "=" && !value.contains('$') && !values.contains(&value) => {
                    problems.push(format!(
                        "{}: {name}{{{label}=\"{value}\"}} matches nothing walsweep exports (values: {values:?})",
                        e.origin
                    ))
                }
                _ => {}
            }
        }
    }
    problems
}

/// A Prometheus server of the tests' own: free port on 127.0.0.1, data in a temp dir, killed
/// on drop.
struct PrometheusServer {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrometheusServer {
    /// Scrapes `target` every second as config/prometheus/prometheus.yml's walsweep job, with
    /// its rule files, evaluated every second.
    async fn start(binary: &Path, target: std::net::SocketAddr) -> PrometheusServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = yaml(PROMETHEUS);
        config["global"]["scrape_interval"] = Yaml::from("1s");
        config["global"]["evaluation_interval"] = Yaml::from("1s");
        let rule_files: Vec<Yaml> = strings_of(&config["rule_files"], "rule_files")
            .iter()
            .map(|f| Yaml::from(root().join("config/prometheus").join(f).to_str().unwrap()))
            .collect();
        config["rule_files"] = Yaml::Sequence(rule_files);
        let jobs = config["scrape_configs"].as_sequence_mut().unwrap();
        let job = jobs
            .iter_mut()
            .find(|j| j["job_name"].as_str() == Some("walsweep"))
            .expect("walsweep job");
        job["static_configs"] =
            serde_yaml_ng::from_str(&format!("[{{targets: [\"{target}\"]}}]")).unwrap();
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, serde_yaml_ng::to_string(&config).unwrap()).unwrap();

        let port = support::scratch::free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = dir.path().join("prometheus.log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut server = PrometheusServer {
            child,
            addr,
            _dir: dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            server.assert_running();
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && http_get(addr, "/-/ready").await.0 == 200
            {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus did not get ready:\n{}",
                server.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("Prometheus exited ({status}):\n{}", self.log_tail());
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn api(&self, path_and_query: &str) -> Json {
        let (status, body) = http_get(self.addr, path_and_query).await;
        let json: Json = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("Prometheus {path_and_query}: {status} {e}: {body}"));
        assert_eq!(
            json["status"], "success",
            "Prometheus {path_and_query}: {body}"
        );
        json
    }

    async fn query(&self, promql: &str) -> Vec<Json> {
        let json = self
            .api(&format!("/api/v1/query?query={}", url_encode(promql)))
            .await;
        json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// A dashboard query as Grafana sends it.
fn as_grafana_sends(promql: &str) -> String {
    promql
        .replace("$__rate_interval", "1m")
        .replace("$instance", ".+")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referenced_metrics_are_exported_by_a_running_pipeline() {
    support::init_tracing();
    let names = referenced_names();
    let exprs: Vec<Expr> = dashboard_exprs(&dashboard())
        .into_iter()
        .chain(alert_exprs())
        .collect();

    let pg = Postgres::start();
    pg.psql(
        "postgres",
        "CREATE TABLE items (id int PRIMARY KEY, name text); CREATE PUBLICATION pub FOR TABLE items;
         CREATE TABLE gauges (id int PRIMARY KEY);",
    );
    let redis = Redis::start();
    // The inspector's metrics exist while it runs: an (empty) mirrored table to inspect.
    let config = Config::parse(&format!(
        "[source]\nurl = \"{}\"\npublication = \"pub\"\nstatus_interval_ms = 200\n\
         [redis]\nurl = \"{}\"\ntimeout_ms = 500\n[[table]]\nname = \"items\"\nkeys = [\"item:{{id}}\"]\n\
         [[table]]\nname = \"gauges\"\n[[table.mirror]]\nkey = \"gauge:{{id}}\"\n[inspect]\nrows_per_minute = 60\n",
        pg.url("postgres"),
        redis.url()
    ))
    .unwrap();
    let handle = walsweep::telemetry::http::install_recorder();
    let addr = walsweep::telemetry::http::serve("127.0.0.1:0", handle)
        .await
        .unwrap();
    tokio::spawn(walsweep::sink::redis::probe::probe_redis(
        config.redis.clone(),
        Duration::from_millis(100),
    ));
    let rules = walsweep::plan::rules::Rules::from_config(&config).unwrap();
    let sink = walsweep::sink::redis::RedisSink::new(&config.redis, &config.matroska).unwrap();
    let (shutdown, signal) = walsweep::pipeline::shutdown_channel();
    // As `walsweep::pipeline::daemon::run` does.
    tokio::spawn(walsweep::pipeline::inspect::run(
        config.clone(),
        signal.clone(),
    ));
    let source = config.source.clone();
    let task = tokio::spawn(async move {
        walsweep::pipeline::run(
            &source,
            &[],
            walsweep::plan::rules::RulesPlanner::new(rules),
            sink,
            signal,
        )
        .await
    });

    // The Kubernetes probe paths answer as the manifest expects once streaming.
    let (ready_path, live_path) = k8s_probe_paths();
    assert_eq!(http_get(addr, &live_path).await.0, 200, "{live_path}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(addr, &ready_path).await.0 != 200 {
        assert!(Instant::now() < deadline, "{ready_path} never answered 200");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Some work, so histograms have observations; then wait for the slot monitor's first poll.
    pg.psql(
        "postgres",
        "INSERT INTO items VALUES (1, 'a'); UPDATE items SET name = 'b'; TRUNCATE items;",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (_, body) = http_get(addr, "/metrics").await;
        let has = |line: &str| body.lines().any(|l| l == line);
        if has("walsweep_transactions_applied_total 3")
            && has(r#"walsweep_slot_wal_status{status="reserved"} 1"#)
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the workload and a slot poll never showed in /metrics:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let scrape = parse_scrape(&body);

    let mut problems = Vec::new();
    for (name, origins) in &names {
        match exported_base(name) {
            None => problems.push(format!(
                "{name} (in {origins:?}) is not in walsweep::telemetry::metrics::ALL"
            )),
            Some((base, _)) if !body.contains(&format!("# TYPE {base} ")) => problems.push(
                format!("{name} (in {origins:?}): /metrics has no `# TYPE {base}`"),
            ),
            _ => {}
        }
    }
    for e in &exprs {
        problems.extend(check_expr(e, &scrape));
    }
    assert!(
        problems.is_empty(),
        "dashboard/alerts against walsweep's /metrics:\n  {}\n\n/metrics:\n{body}",
        problems.join("\n  ")
    );

    // A real Prometheus (see prometheus_tool for when there is none): scrape this walsweep,
    // evaluate every dashboard query and every alert rule.
    if let Some(binary) = prometheus_tool("prometheus") {
        let mut prom = PrometheusServer::start(&binary, addr).await;
        let dash_exprs = dashboard_exprs(&dashboard());
        let mut template_metrics = Vec::new();
        let dash = dashboard();
        for v in dash["templating"]["list"].as_array().unwrap() {
            if v["type"] == "query" {
                let q = v["query"]["query"]
                    .as_str()
                    .or(v["query"].as_str())
                    .unwrap_or("");
                template_metrics.extend(walsweep_names(q));
            }
        }
        assert!(
            !template_metrics.is_empty(),
            "the instance variable queries no walsweep metric"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            prom.assert_running();
            let up = prom.query(r#"up{job="walsweep"}"#).await;
            let mut empty = Vec::new();
            if up.len() != 1 || up[0]["value"][1] != "1" {
                empty.push(format!("up{{job=\"walsweep\"}} = {up:?}"));
            }
            for e in &dash_exprs {
                let q = as_grafana_sends(&e.promql);
                if prom.query(&q).await.is_empty() {
                    empty.push(format!("{}: {q}", e.origin));
                }
            }
            for m in &template_metrics {
                if prom.query(m).await.is_empty() {
                    empty.push(format!("variable query metric {m}"));
                }
            }
            let rules = prom.api("/api/v1/rules").await;
            let mut evaluated = 0;
            for group in rules["data"]["groups"].as_array().unwrap() {
                for rule in group["rules"].as_array().unwrap() {
                    let never = rule["lastEvaluation"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("0001-");
                    if rule["health"] == "ok" && !never {
                        evaluated += 1;
                    } else if rule["health"] == "err" {
                        panic!(
                            "rule {} fails to evaluate: {}",
                            rule["name"], rule["lastError"]
                        );
                    }
                }
            }
            if evaluated != alert_rules().len() {
                empty.push(format!(
                    "{evaluated} of {} alert rules evaluated so far",
                    alert_rules().len()
                ));
            }
            if empty.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "with a real Prometheus scraping walsweep, these returned no data:\n  {}\nPrometheus log:\n{}",
                empty.join("\n  "),
                prom.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // A healthy, streaming, idle walsweep sets off no alert, not even a pending one (an
        // inverted or always-true expression would). A few evaluations first.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let alerts = prom.query("ALERTS").await;
        let lag = prom.query("walsweep_slot_lag_bytes").await;
        assert!(
            alerts.is_empty(),
            "alerts active for a healthy walsweep: {alerts:#?}\n(slot lag: {lag:?})"
        );
        eprintln!(
            "real Prometheus at {} scraped walsweep: {} dashboard queries returned data, {} alert rules evaluated",
            prom.addr,
            dash_exprs.len(),
            alert_rules().len()
        );
    }

    shutdown.request();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
