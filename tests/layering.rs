//! The layering in docs/architecture.md, checked: every `crate::` path in `src/` points to the
//! file's own layer or one below it. A failure names the file, the line and the upward path.

use std::path::Path;

/// Bottom to top. A layer may use itself and anything before it in this list.
const LAYERS: &[&str] = &[
    "telemetry",
    "pg",
    "value",
    "config",
    "plan",
    "stream",
    "sink",
    "pipeline",
    "cli",
];

fn rank(layer: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == layer)
}

/// The top-level module a file under `src/` belongs to (`src/plan/rules/mod.rs` -> `plan`).
fn layer_of(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::<module>` in `line`, outside comments.
fn crate_paths(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let preceded_by_ident = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
        let after = &rest[at + "crate::".len()..];
        let module: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !preceded_by_ident && !module.is_empty() {
            found.push(module);
        }
        rest = after;
    }
    found
}

#[test]
fn every_crate_import_points_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut upward = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src/");
        let layer = layer_of(relative).expect("file name");
        if layer == "lib" || layer == "main" {
            continue;
        }
        let own = rank(&layer).unwrap_or_else(|| {
            panic!(
                "src/{} is in no layer; add `{layer}` to LAYERS here and to docs/architecture.md",
                relative.display()
            )
        });
        let text = std::fs::read_to_string(file).expect("read source");
        for (number, line) in text.lines().enumerate() {
            for module in crate_paths(line) {
                checked += 1;
                match rank(&module) {
                    Some(target) if target <= own => {}
                    Some(_) => upward.push(format!(
                        "src/{}:{}: {layer} uses crate::{module}, a layer above it",
                        relative.display(),
                        number + 1
                    )),
                    None => upward.push(format!(
                        "src/{}:{}: crate::{module} is in no layer",
                        relative.display(),
                        number + 1
                    )),
                }
            }
        }
    }
    assert!(
        checked > 100,
        "found only {checked} crate:: paths; is the scan broken?"
    );
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
}

#[test]
fn the_scan_sees_paths_and_skips_comments() {
    assert_eq!(crate_paths("use crate::plan::Op;"), ["plan"]);
    assert_eq!(
        crate_paths("    crate::telemetry::metrics::error(crate::pg::X)"),
        ["telemetry", "pg"]
    );
    assert!(crate_paths("// see crate::cli").is_empty());
    assert!(crate_paths("use walsweep_crate::x;").is_empty());
    assert_eq!(rank("cli"), Some(LAYERS.len() - 1));
}
