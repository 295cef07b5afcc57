//! Fuzzes the config loader: `Config::parse` and what `walsweep run` does with a config that
//! parses (warnings, table names, rule compilation) must return, never panic, on any text.
//! Every error must name the file and a line inside it, like `config:3: source.slot: ...`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use walsweep::config::Config;
use walsweep::plan::rules::Rules;

fuzz_target!(|data: &[u8]| {
    // Config files are read as UTF-8 (`Config::load` rejects anything else); lossy conversion
    // keeps every input useful to the parser.
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text) {
        Ok(config) => {
            let _ = config.warnings();
            let _ = config.qualified_tables();
            if let Ok(rules) = Rules::from_config(&config) {
                let _ = rules.reset_plan();
            }
        }
        Err(err) => {
            let lines = text.lines().count().max(1);
            for line in err.to_string().lines() {
                let rest = line
                    .strip_prefix("config")
                    .unwrap_or_else(|| panic!("error line without the file: {line:?}"));
                if let Some(n) = rest
                    .strip_prefix(':')
                    .and_then(|r| r.split_once(':'))
                    .and_then(|(n, _)| n.parse::<usize>().ok())
                {
                    assert!(
                        n >= 1 && n <= lines + 1,
                        "line {n} outside a {lines}-line file: {line:?}"
                    );
                }
            }
        }
    }
});
