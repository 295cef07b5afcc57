//! `walsweep check` on mirrors, against a live (private) Postgres: score expressions are proved
//! exact in a 64-bit float from the real column types, named columns must exist, and the replica
//! identity must send what finding a row's old entry needs.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use support::{Postgres, Redis};

const BIN: &str = env!("CARGO_BIN_EXE_walsweep");

/// `check`'s exit code for a failed check (EX_CONFIG).
const FAILED: i32 = 78;

struct Setup {
    pg: Postgres,
    redis: Redis,
    dir: tempfile::TempDir,
}

impl Setup {
    fn start(schema: &str) -> Setup {
        support::init_tracing();
        let pg = Postgres::start();
        pg.psql("postgres", schema);
        Setup {
            pg,
            redis: Redis::start(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn config(&self, tables: &str) -> PathBuf {
        let path = self.dir.path().join("walsweep.toml");
        let text = format!(
            "[source]\nurl = \"{}\"\nslot = \"check_mirror\"\npublication = \"pub\"\n\
             [redis]\nurl = \"{}\"\ntimeout_ms = 2000\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             {tables}",
            self.pg.url("postgres"),
            self.redis.url()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs `check` with `tables` as the config's tables; exit code and output.
    fn check(&self, tables: &str) -> (Option<i32>, String) {
        let path = self.config(tables);
        let out: Output = Command::new(BIN)
            .args(["check", "--config", path.to_str().unwrap()])
            .env_remove("WALSWEEP_SOURCE_URL")
            .env_remove("WALSWEEP_REDIS_URL")
            .output()
            .expect("run walsweep");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }
}

fn errors(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect()
}

const READINGS: &str = r#"
[[table]]
name = "public.readings"
[[table.mirror]]
key = "reading:{device_id}:{seq}"
[[table.mirror.index]]
key = "readings:{device_id}"
member = "{device_id}:{seq}"
score = "(device_id << 32) | epoch(ts)"
"#;

#[test]
fn a_spill_dir_that_cannot_take_files_is_an_error_naming_the_setting() {
    let setup = Setup::start(
        "CREATE TABLE readings (device_id smallint, seq int, ts timestamptz NOT NULL,
                                PRIMARY KEY (device_id, seq));
         CREATE PUBLICATION pub FOR TABLE readings;",
    );
    let spill_dir = setup.dir.path().join("spill");
    std::fs::create_dir(&spill_dir).unwrap();
    let with_dir =
        |dir: &std::path::Path| format!("[mirror]\nspill_dir = \"{}\"\n{READINGS}", dir.display());
    let (code, out) = setup.check(&with_dir(&spill_dir));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        std::fs::read_dir(&spill_dir).unwrap().count(),
        0,
        "check leaves no file behind"
    );

    // Root writes into any directory whatever its mode, but never into a plain file.
    let not_a_dir = setup.dir.path().join("plain-file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let (code, out) = setup.check(&with_dir(&not_a_dir));
    assert_eq!(code, Some(FAILED), "{out}");
    let errors = errors(&out);
    assert_eq!(errors.len(), 1, "{out}");
    assert!(
        errors[0].starts_with(&format!(
            "error: mirror.spill_dir {}: cannot create a file there",
            not_a_dir.display()
        )),
        "{out}"
    );
}

#[test]
fn score_must_be_exact_for_the_real_column_types() {
    let setup = Setup::start(
        "CREATE TABLE readings (device_id int, seq int, ts timestamptz NOT NULL, value float8,
                                PRIMARY KEY (device_id, seq));
         CREATE PUBLICATION pub FOR TABLE readings;",
    );

    let (code, out) = setup.check(READINGS);
    assert_eq!(code, Some(FAILED), "{out}");
    assert_eq!(
        errors(&out),
        vec![
            "error: table[0] (public.readings): mirror[0].index[0]: score \"(device_id << 32) | \
             epoch(ts)\" can reach 2^64 (device_id is integer, 32 bits, shifted by 32), beyond \
             the 2^53 a Redis score (a 64-bit float) holds exactly; use a smaller type or \
             bits(device_id, 21), or shift by less"
        ],
        "{out}"
    );

    // The fix the message offers, either way, passes.
    let bits = READINGS.replace("(device_id << 32)", "(bits(device_id, 21) << 32)");
    let (code, out) = setup.check(&bits);
    assert_eq!(code, Some(0), "{out}");
    setup.pg.psql(
        "postgres",
        "ALTER TABLE readings ALTER COLUMN device_id TYPE smallint",
    );
    let (code, out) = setup.check(READINGS);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("walsweep.toml: ok"), "{out}");

    let unknown = READINGS.replace("epoch(ts)", "epoch(taken_at)");
    let (code, out) = setup.check(&unknown);
    assert_eq!(code, Some(FAILED), "{out}");
    assert_eq!(
        errors(&out),
        vec![
            "error: table[0] (public.readings): mirror[0].index[0].score \"(device_id << 32) | \
             epoch(taken_at)\" names column \"taken_at\", which the table does not have \
             (columns: device_id, seq, ts, value); correct the name in the config or add the \
             column"
        ],
        "{out}"
    );

    let float_in_arithmetic = READINGS.replace("epoch(ts)", "value");
    let (code, out) = setup.check(&float_in_arithmetic);
    assert_eq!(code, Some(FAILED), "{out}");
    assert_eq!(
        errors(&out),
        vec![
            "error: table[0] (public.readings): mirror[0].index[0]: score \"(device_id << 32) | \
             value\": float column value cannot be combined exactly; use it alone as the score, \
             or use an integer column"
        ],
        "{out}"
    );
}

const EVENTS: &str = r#"
[[table]]
name = "public.events"
[[table.mirror]]
key = "event:{id}"
[[table.mirror.index]]
key = "events:{device_id}"
member = "{id}"
score = "epoch_ms(ts)"
"#;

#[test]
fn index_key_needs_the_old_value_from_the_replica_identity() {
    let setup = Setup::start(
        "CREATE TABLE events (id bigint PRIMARY KEY, device_id int, ts timestamptz, body text);
         CREATE PUBLICATION pub FOR TABLE events;",
    );

    let (code, out) = setup.check(EVENTS);
    assert_eq!(code, Some(FAILED), "{out}");
    assert_eq!(
        errors(&out),
        vec![
            "error: table[0] (public.events): mirror[0].index[0].key \"events:{device_id}\" uses \
             device_id, which replica identity DEFAULT does not send on UPDATE/DELETE, so \
             walsweep could not find the old entry (it would clear the index table-wide \
             instead); run: ALTER TABLE \"public\".\"events\" REPLICA IDENTITY FULL; or build \
             the template from replica identity columns only (id)"
        ],
        "{out}"
    );
    let toast_note = "note: table[0] (public.events): mirror[0] stores body, which Postgres may \
                      TOAST, and replica identity DEFAULT does not send an unchanged TOASTed \
                      value on UPDATE";
    assert!(out.contains(toast_note), "{out}");

    setup
        .pg
        .psql("postgres", "ALTER TABLE events REPLICA IDENTITY FULL");
    let (code, out) = setup.check(EVENTS);
    assert_eq!(code, Some(0), "{out}");
    assert!(errors(&out).is_empty(), "{out}");
    assert!(!out.contains("TOAST"), "FULL sends every value: {out}");
}
