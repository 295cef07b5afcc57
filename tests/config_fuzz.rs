//! The config loader under bad input: `Config::parse` (and what `walsweep run` does with a
//! config that parses: warnings, table names, rule compilation) must never panic, must return
//! in bounded time and memory, and every error must be the documented `config[:line]: key:
//! message` form with a line inside the file.
//!
//! Inputs are seeded mutations of the shipped example configs: bit flips, interesting bytes,
//! deleted, spliced and duplicated ranges and lines, truncations, TOML tokens, and now and then a
//! huge string or number. `WALSWEEP_CONFIG_FUZZ_CASES` (default 50 000) and
//! `WALSWEEP_CONFIG_FUZZ_SEED` change the run; a failing input is written to the temp dir. The
//! guided fuzzer for the same properties is `fuzz/fuzz_targets/config.rs`.

use std::panic::{catch_unwind, AssertUnwindSafe, PanicHookInfo};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use walsweep::config::Config;
use walsweep::plan::rules::Rules;
use walsweep::telemetry::log::display_chain;

type PanicHook = dyn Fn(&PanicHookInfo<'_>) + Send + Sync + 'static;

const SEEDS: &[&str] = &[
    include_str!("../config/walsweep.toml"),
    include_str!("../config/demo.toml"),
    "[source]\nurl = \"postgres://u@h/db\"\n",
    r#"[source]
url = "postgres://u:p@h:5432/db?sslmode=disable"
slot = "s_1"
publication = "p"
status_interval_ms = 1
reconnect_min_ms = 1
reconnect_max_ms = 1
[redis]
url = "redis://:pw@127.0.0.1:6379/15"
timeout_ms = 1
[metrics]
listen = ""
[matroska]
prefix = "c"
remove_dependency_sets = true
[[table]]
name = "a"
keys = ["a:{id}", "a:{{lit}}:{x!r}"]
deps = ["pk:A:({id!r}, {y!r})"]
columns = ["x", "y"]
ops = ["insert", "update", "delete", "truncate"]
[[table.scope]]
name = "A"
columns = ["x"]
[[table]]
name = "s.b"
deps = ["id:b:{id}"]
"#,
];

const TOKENS: &[&str] = &[
    "[[table]]\n",
    "[[table.scope]]\n",
    "[source]\n",
    "[redis]\n",
    "[matroska]\n",
    "[metrics]\n",
    "[inspect]\nrows_per_minute",
    "name = \"\"\n",
    "name = \"a.b.c\"\n",
    "keys = [\"{\"]\n",
    "keys = [\"}\"]\n",
    "deps = [\"{}\"]\n",
    "{id}",
    "{id!r}",
    "{{",
    "}}",
    "!r",
    " = -1",
    " = 0",
    " = 18446744073709551616",
    " = 1e400",
    " = inf",
    " = nan",
    " = true",
    " = []",
    " = {}",
    " = 1979-05-27T07:32:00Z",
    "\"\"\"",
    "'''",
    "\\u0000",
    "\\uD800",
    "\u{feff}",
    "\u{0}",
    "\r\n",
    "\t",
    "#",
    "=",
    ".",
    "\"",
    "'",
    "[",
    "]",
    "ß",
    "🙂",
];

const INTERESTING: &[u8] = b"\"'[]{}=\n#.\\ 09-+_:!\r\t\0";

/// Inputs stop growing past this; only huge-string mutations start above it.
const GROWTH_CAP: usize = 64 * 1024;

fn mutate(rng: &mut StdRng, buf: &mut Vec<u8>) {
    let pos = |rng: &mut StdRng, buf: &Vec<u8>| rng.random_range(0..=buf.len());
    let roll = rng.random_range(0..1000);
    // A huge string, number, template or nesting, now and then (they are slow to parse in a
    // debug build: about 0.1 s per MB).
    if roll == 0 {
        let len = rng.random_range(64 * 1024..1024 * 1024);
        let filler: &[u8] = match rng.random_range(0..4) {
            0 => b"x",
            1 => b"9",
            2 => b"{a}",
            _ => b"[",
        };
        let at = pos(rng, buf);
        buf.splice(at..at, filler.repeat(len / filler.len()));
        return;
    }
    let grows = buf.len() < GROWTH_CAP;
    match roll / 10 {
        // Bit flip.
        0..=14 if !buf.is_empty() => {
            let i = rng.random_range(0..buf.len());
            buf[i] ^= 1 << rng.random_range(0..8);
        }
        // An interesting byte replaces one.
        15..=29 if !buf.is_empty() => {
            let i = rng.random_range(0..buf.len());
            buf[i] = INTERESTING[rng.random_range(0..INTERESTING.len())];
        }
        // Delete a range.
        30..=39 if !buf.is_empty() => {
            let a = rng.random_range(0..buf.len());
            let b = (a + rng.random_range(1..64)).min(buf.len());
            buf.drain(a..b);
        }
        // Splice a copy of another range in.
        40..=49 if !buf.is_empty() && grows => {
            let a = rng.random_range(0..buf.len());
            let b = (a + rng.random_range(1..256)).min(buf.len());
            let piece = buf[a..b].to_vec();
            let at = pos(rng, buf);
            buf.splice(at..at, piece);
        }
        // Truncate.
        50..=54 => {
            let at = pos(rng, buf);
            buf.truncate(at);
        }
        // Duplicate a line, up to 50 times.
        55..=64 if grows => {
            let text = String::from_utf8_lossy(buf).into_owned();
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            if !lines.is_empty() {
                let i = rng.random_range(0..lines.len());
                let times = rng.random_range(1..50);
                let mut out: Vec<&str> = lines[..=i].to_vec();
                out.extend(std::iter::repeat_n(lines[i], times));
                out.extend(&lines[i + 1..]);
                *buf = out.concat().into_bytes();
            }
        }
        // Swap two lines.
        65..=69 => {
            let text = String::from_utf8_lossy(buf).into_owned();
            let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
            if lines.len() > 1 {
                let (a, b) = (
                    rng.random_range(0..lines.len()),
                    rng.random_range(0..lines.len()),
                );
                lines.swap(a, b);
                *buf = lines.concat().into_bytes();
            }
        }
        // A TOML token.
        _ if grows => {
            let token = TOKENS[rng.random_range(0..TOKENS.len())];
            let at = pos(rng, buf);
            buf.splice(at..at, token.bytes());
        }
        // Too big to grow: shrink instead.
        _ => {
            let at = pos(rng, buf);
            buf.truncate(at);
        }
    }
}

/// What one input did.
enum Outcome {
    Ok { tables: usize, rules_ok: bool },
    Err(String),
}

/// Parses `text` the way `walsweep run` loads a config, minus the environment.
fn load(text: &str) -> Outcome {
    match Config::parse(text) {
        Ok(config) => {
            let _ = config.warnings();
            let tables = config.qualified_tables().len();
            let rules_ok = match Rules::from_config(&config) {
                Ok(rules) => {
                    let _ = rules.reset_plan();
                    true
                }
                Err(e) => {
                    let _ = e.to_string();
                    false
                }
            };
            Outcome::Ok { tables, rules_ok }
        }
        Err(e) => Outcome::Err(display_chain(&e)),
    }
}

/// Every error line reads `config:LINE: key: message` (LINE within the text) or
/// `config: key: message`.
fn check_error_form(text: &str, err: &str) -> Result<(), String> {
    let lines = text.lines().count().max(1);
    for line in err.lines() {
        let rest = line
            .strip_prefix("config")
            .ok_or_else(|| format!("error line without the file: {line:?}"))?;
        let rest = match rest.strip_prefix(':') {
            Some(rest) if rest.starts_with(' ') => rest,
            Some(rest) => {
                let (n, rest) = rest
                    .split_once(':')
                    .ok_or_else(|| format!("no key after the line number: {line:?}"))?;
                let n: usize = n
                    .parse()
                    .map_err(|_| format!("bad line number {n:?} in {line:?}"))?;
                if n == 0 || n > lines + 1 {
                    return Err(format!("line {n} outside a {lines}-line file: {line:?}"));
                }
                rest
            }
            None => return Err(format!("no ':' after config: {line:?}")),
        };
        let (key, message) = rest
            .trim_start()
            .split_once(": ")
            .ok_or_else(|| format!("no 'key: message' in {line:?}"))?;
        if key.is_empty() || message.trim().is_empty() {
            return Err(format!("empty key or message in {line:?}"));
        }
    }
    Ok(())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

fn status_kb(field: &str) -> usize {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

#[test]
fn config_parse_never_panics_and_errors_name_file_line_and_key() {
    let cases: usize = env_or("WALSWEEP_CONFIG_FUZZ_CASES", 50_000);
    let seed: u64 = env_or("WALSWEEP_CONFIG_FUZZ_SEED", 0xC0_4F16);
    let mut rng = StdRng::seed_from_u64(seed);
    // Peak RSS from here on ("5" resets VmHWM to the current RSS).
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let rss_before = status_kb("VmRSS");
    // Panics are caught and reported with their input: keep the hook from printing each one as
    // it happens on this thread (other tests' threads keep the usual output).
    let this_thread = std::thread::current().id();
    let previous: Arc<PanicHook> = Arc::from(std::panic::take_hook());
    let others = previous.clone();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != this_thread {
            others(info);
        }
    }));

    let started = Instant::now();
    let (mut ok, mut ok_rules, mut errors) = (0usize, 0usize, 0usize);
    let mut failures: Vec<String> = Vec::new();
    let mut slowest = (Duration::ZERO, 0usize, 0usize);
    // (MB of peak RSS growth, case, input bytes) of the hungriest big input.
    let mut hungriest = (0usize, 0usize, 0usize);
    let mut ran = 0;
    for case in 0..cases {
        ran += 1;
        let mut buf = SEEDS[rng.random_range(0..SEEDS.len())].as_bytes().to_vec();
        for _ in 0..rng.random_range(1..5) {
            mutate(&mut rng, &mut buf);
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        // Big inputs get their own memory figure.
        let big = text.len() > GROWTH_CAP;
        if big {
            std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
        }
        let rss = if big { status_kb("VmRSS") } else { 0 };
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| load(&text)));
        let took = t.elapsed();
        let mut hungry = None;
        if big {
            let grew = status_kb("VmHWM").saturating_sub(rss) / 1024;
            if grew > hungriest.0 {
                hungriest = (grew, case, text.len());
            }
            // Linear: the toml parser keeps up to a few hundred bytes of state per input byte
            // on pathological input (e.g. 200 000 `{a}` in an array: ~400 bytes per byte).
            if grew * 1024 * 1024 > 64 * 1024 * 1024 + 1024 * text.len() {
                hungry = Some(format!("grew the peak RSS by {grew} MB"));
            }
        }
        if took > slowest.0 {
            slowest = (took, case, text.len());
        }
        let problem = hungry.or(match outcome {
            Err(panic) => Some(format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(non-string payload)")
            )),
            // A guard against runaway (super-linear) parsing, not a speed target: a debug build
            // takes up to ~2 s on the largest inputs when other tests share the cores, and a
            // quadratic parse of them would take minutes.
            Ok(_) if took > Duration::from_secs(20) => Some(format!("took {took:?}")),
            Ok(Outcome::Ok { tables, rules_ok }) => {
                ok += 1;
                ok_rules += usize::from(rules_ok);
                let _ = tables;
                None
            }
            Ok(Outcome::Err(err)) => {
                errors += 1;
                check_error_form(&text, &err).err()
            }
        });
        if let Some(problem) = problem {
            let path =
                std::env::temp_dir().join(format!("walsweep-config-fuzz-{seed}-{case}.toml"));
            let _ = std::fs::write(&path, &buf);
            failures.push(format!(
                "case {case}: {problem} (input: {})",
                path.display()
            ));
            if failures.len() >= 10 {
                break;
            }
        }
    }
    std::panic::set_hook(Box::new(move |info| previous(info)));
    let growth_mb = status_kb("VmHWM").saturating_sub(rss_before) / 1024;
    eprintln!(
        "config_fuzz: seed {seed:#x}: {ran} inputs in {:.1}s: {ok} parsed ({ok_rules} with \
         rules that compile), {errors} rejected; slowest {:?} (case {}, {} bytes); hungriest \
         +{} MB peak RSS (case {}, {} bytes); peak RSS growth since start {growth_mb} MB",
        started.elapsed().as_secs_f64(),
        slowest.0,
        slowest.1,
        slowest.2,
        hungriest.0,
        hungriest.1,
        hungriest.2,
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The mutations must leave some inputs valid, or only the TOML syntax errors get tested.
    assert!(
        ok * 50 > ran && errors * 50 > ran,
        "{ok} parsed, {errors} rejected"
    );
    assert!(growth_mb < 512, "peak RSS grew by {growth_mb} MB");
}

#[test]
fn a_config_file_that_is_not_utf8_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("walsweep.toml");
    std::fs::write(&path, b"[source]\nurl = \"postgres://u@h/db\xff\"\n").expect("write");
    let err = Config::load(&path).expect_err("not UTF-8");
    let shown = display_chain(&err);
    assert_eq!(
        shown,
        format!(
            "cannot read config file {}: stream did not contain valid UTF-8",
            path.display()
        )
    );
}

/// Many broken `[[table]]` entries (each problem's line used to be found by rescanning the
/// whole file: quadratic). All 20 000 are reported, each with its own line.
#[test]
fn many_invalid_tables_are_all_reported_with_their_lines() {
    let mut text = String::from("[source]\nurl = \"postgres://u@h/db\"\n");
    for _ in 0..20_000 {
        text.push_str("[[table]]\nname = \"\"\n");
    }
    let err = Config::parse(&text).expect_err("empty names").to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 20_000);
    assert!(
        lines[0].starts_with("config:4: table[0].name: "),
        "{}",
        lines[0]
    );
    assert!(
        lines[19_999].starts_with("config:40002: table[19999].name: "),
        "{}",
        lines[19_999]
    );
}
