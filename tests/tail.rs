//! `walsweep tail` against a private Postgres, and the typed value conversion against Postgres
//! itself.
//!
//! The oracle test reads the same changes three ways: `test_decoding` over the SQL interface
//! (the oracle, a second slot), walsweep's pgoutput decoder on the raw pgoutput messages, and
//! `walsweep tail` on the replication protocol. Nothing is compared with itself:
//! - every raw pgoutput value must be byte-equal to test_decoding's (both are the type's output
//!   function; test_decoding only quotes them and spells booleans out);
//! - every typed value tail prints must equal what Postgres' own `to_json()` makes of
//!   test_decoding's text, cast back to the column type by Postgres (numeric excepted by
//!   design: walsweep prints its exact text as a JSON string);
//! - the typed values of the edge-case row must equal a hand-written table.

// Not every helper support re-exports is used here (Redis).
#[allow(unused_imports)]
mod support;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value as J};
use support::Postgres;
use walsweep::cli::tail::{self, TailError, TailFormat, TailOptions, TailSlot, TailStop};
use walsweep::config::SourceConfig;
use walsweep::pg::pgoutput::{Decoder, PgOutput, TupleData, TupleValue};
use walsweep::value::{self, Time, TypeRegistry, Value, Ymd};

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'it''s "quoted"', 'ünïcode');
CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
CREATE DOMAIN tinypos AS posint CHECK (VALUE < 100);
CREATE DOMAIN money_amount AS numeric(12, 2);
CREATE DOMAIN tags AS text[];
CREATE TABLE everything (
    id int PRIMARY KEY,
    b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, n numeric,
    tx text, vc varchar(40), bc char(5), by bytea, u uuid,
    d date, tm time, ttz timetz, ts timestamp, tz timestamptz, iv interval,
    j json, jb jsonb,
    a_b bool[], a_i2 int2[], a_i4 int4[], a_i8 int8[], a_f4 float4[], a_f8 float8[],
    a_n numeric[], a_tx text[], a_vc varchar[], a_bc char(2)[], a_by bytea[], a_u uuid[],
    a_d date[], a_tm time[], a_ts timestamp[], a_tz timestamptz[], a_iv interval[],
    a_j json[], a_jb jsonb[],
    en mood, a_en mood[], dom posint, dom2 tinypos, dnum money_amount, dtags tags,
    a_dom posint[]
);
ALTER TABLE everything REPLICA IDENTITY FULL;
CREATE TABLE toasty (id int PRIMARY KEY, note text, big text);
ALTER TABLE toasty ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE unpublished (id int);
CREATE PUBLICATION pub FOR TABLE everything, toasty;
"#;

/// Ordinary values, edge values (row 2), all NULLs (row 3), more edges (row 4).
const ROWS: &str = r#"
INSERT INTO everything VALUES (
    1, true, 1, 2, 3, 1.5, 2.25, 3.14, 'hello', 'world', 'abc', '\x0102',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2020-01-02', '03:04:05', '03:04:05+02',
    '2020-01-02 03:04:05', '2020-01-02 03:04:05+00', '1 day', '{"a": 1}', '{"b": [1, 2]}',
    '{t,f}', '{1,2}', '{3,4}', '{5,6}', '{1.5}', '{2.5}', '{3.50}', '{a,b}', '{c}', '{ab}',
    '{"\\x01"}', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}', '{2020-01-02}', '{03:04:05}',
    '{"2020-01-02 03:04:05"}', '{"2020-01-02 03:04:05+00"}', '{"1 day"}', '{"{}"}', '{"[]"}',
    'sad', '{sad,ok}', 5, 7, 12.50, '{a,b}', '{1,2}');
INSERT INTO everything VALUES (
    2, false, -32768, -2147483648, -9223372036854775808, 'NaN', '-Infinity',
    '-123456789012345678901234567890.123456789012345678901234567890',
    '', $$it's "q" \ back$$, 'x', '\x', '00000000-0000-0000-0000-000000000000',
    '0044-03-15 BC', '24:00:00', '00:00:00.000001-03:30',
    '1969-07-20 20:17:40.123456', '1900-01-01 00:00:00 Europe/Amsterdam',
    '-1 years +2 mons -3 days +04:05:06.789',
    $${"q": "it's \"x\" \\ é", "nested": {"deep": [1, [2, [3]]]}, "dup": 1, "dup": 2}$$,
    $${"": "", "ü": [null, true, false, -0.5, 12345678901234567], "big": 1e300}$$,
    '{t,NULL,f}', '{{1,NULL},{3,4}}', '[0:1]={7,8}',
    '{9223372036854775807,-9223372036854775808}', '{NaN,Infinity,-0,1.1}',
    '{{1e300,NULL},{-1e-300,NaN}}', '{1.50,NaN,-0.0000001,NULL}',
    $${"a,b","NULL",NULL,"","q\"x\\y"," lead","{}","é ü",null2}$$, '{}', $${"a ",NULL}$$,
    $${"\\x00ff","\\x"}$$, '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}',
    $${infinity,-infinity,"0001-01-01 BC","2000-02-29"}$$, '{00:00:00.5,NULL}',
    $${"1969-12-31 23:59:59.999999",infinity,"0044-03-15 12:00:00 BC"}$$,
    $${"1900-01-01 00:00:00 Europe/Amsterdam","2021-03-28 02:30:00 Europe/Amsterdam","2021-10-31 02:30:00 Europe/Amsterdam",-infinity}$$,
    $${"1 year","-00:00:01","3 days -04:00:00"}$$,
    $${"{\"a\": [1, 2]}","null","\"s\""}$$, $${"{\"b\": 1, \"a\": 2}","[]"}$$,
    $$it's "quoted"$$, $${"it's \"quoted\"",ünïcode,NULL}$$, 2147483647, 99, -0.01,
    $${"x y",NULL,""}$$, '{{1,2},{3,NULL}}');
INSERT INTO everything (id) VALUES (3);
"#;

const ROW_4: &str = r#"
INSERT INTO everything (id, b, i2, i4, i8, f4, f8, n, tx, vc, bc, by, u, d, tm, ttz, ts, tz,
                        iv, j, jb, a_f8, a_tx, en, dom) VALUES (
    4, true, 32767, 0, 0, '3.4028235e+38', '-0', '0.0000000',
    E'it''s a \\ "q"\n\ttab 😀 line', 'NULL', '', '\xDEADBEEF',
    'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', 'infinity', '23:59:59.999999',
    '23:59:59.999999+14', 'infinity', '-infinity', '178000000 years', '[]', '{}',
    '{1e-300,-0,1.7976931348623157e308}', $${"\\",",","{","}"," "}$$, 'ünïcode', 1);
"#;

/// 32 kB stored out of line, so an UPDATE that leaves it alone sends it as unchanged TOAST.
const BIG: &str = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 1000) i)";

/// Columns whose (base) type is numeric: walsweep prints them as JSON strings.
const NUMERIC_COLUMNS: &[&str] = &["n", "a_n", "dnum"];

fn source(pg: &Postgres) -> SourceConfig {
    let mut s = SourceConfig::new(pg.url("app"));
    s.publication = "pub".into();
    s.status_interval_ms = 200;
    s
}

/// A `Write` the test can read while tail runs in a task.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).expect("tail prints UTF-8")
    }
}

/// A value as test_decoding prints it.
#[derive(Debug, Clone, PartialEq)]
enum OVal {
    Null,
    Unchanged,
    Text(String),
}

#[derive(Debug, Clone)]
struct OCol {
    name: String,
    type_name: String,
    value: OVal,
}

#[derive(Debug)]
struct OChange {
    table: String,
    op: String,
    old: Option<Vec<OCol>>,
    new: Option<Vec<OCol>>,
}

impl OChange {
    /// test_decoding leaves NULLs out of old tuples.
    fn old_value(&self, name: &str) -> Option<OVal> {
        let old = self.old.as_ref()?;
        Some(
            old.iter()
                .find(|c| c.name == name)
                .map_or(OVal::Null, |c| c.value.clone()),
        )
    }
}

#[derive(Debug)]
struct OTxn {
    xid: u32,
    changes: Vec<OChange>,
}

/// Parses `pg_logical_slot_get_changes` output of test_decoding (with xids).
fn parse_oracle(lines: &[String]) -> Vec<OTxn> {
    let mut txns = Vec::new();
    let mut current: Option<OTxn> = None;
    for line in lines {
        if let Some(xid) = line.strip_prefix("BEGIN ") {
            current = Some(OTxn {
                xid: xid.parse().expect("BEGIN xid"),
                changes: Vec::new(),
            });
        } else if line.starts_with("COMMIT ") {
            txns.push(current.take().expect("COMMIT after BEGIN"));
        } else {
            let rest = line.strip_prefix("table ").expect("a table line");
            let (table, rest) = rest.split_once(": ").expect("table name");
            let (op, rest) = rest.split_once(':').expect("op");
            let change = parse_change(table, op, rest);
            current
                .as_mut()
                .expect("change inside BEGIN")
                .changes
                .push(change);
        }
    }
    assert!(current.is_none(), "unterminated transaction");
    txns
}

fn parse_change(table: &str, op: &str, rest: &str) -> OChange {
    let mut change = OChange {
        table: table.to_string(),
        op: op.to_lowercase(),
        old: None,
        new: None,
    };
    match op {
        "TRUNCATE" => return change,
        "INSERT" => change.new = Some(parse_columns(rest).0),
        "DELETE" => change.old = Some(parse_columns(rest).0),
        "UPDATE" => {
            if let Some(old) = rest.strip_prefix(" old-key:") {
                let (cols, rest) = parse_columns(old);
                change.old = Some(cols);
                let new = rest
                    .strip_prefix(" new-tuple:")
                    .expect("new-tuple after old-key");
                change.new = Some(parse_columns(new).0);
            } else {
                change.new = Some(parse_columns(rest).0);
            }
        }
        other => panic!("unknown test_decoding op {other}"),
    }
    change
}

/// ` name[type]:value name[type]:'quoted'' value' ...` up to the end or ` new-tuple:`.
fn parse_columns(mut s: &str) -> (Vec<OCol>, &str) {
    let mut cols = Vec::new();
    loop {
        if s.is_empty() || s.starts_with(" new-tuple:") {
            return (cols, s);
        }
        s = s.strip_prefix(' ').expect("space before a column");
        let (name, rest) = if let Some(quoted) = s.strip_prefix('"') {
            let end = quoted.find("\"[").expect("end of quoted name");
            (quoted[..end].replace("\"\"", "\""), &quoted[end + 1..])
        } else {
            let end = s.find('[').expect("column type");
            (s[..end].to_string(), &s[end..])
        };
        let rest = rest.strip_prefix('[').expect("[");
        let end = rest.find("]:").expect("]:");
        let type_name = rest[..end].to_string();
        let rest = &rest[end + 2..];
        let (value, rest) = if let Some(quoted) = rest.strip_prefix('\'') {
            let mut out = String::new();
            let mut chars = quoted.char_indices().peekable();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '\'' {
                    if chars.peek().map(|(_, c)| *c) == Some('\'') {
                        out.push('\'');
                        chars.next();
                    } else {
                        end = Some(i + 1);
                        break;
                    }
                } else {
                    out.push(c);
                }
            }
            (OVal::Text(out), &quoted[end.expect("closing quote")..])
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            let value = match &rest[..end] {
                "null" => OVal::Null,
                "unchanged-toast-datum" => OVal::Unchanged,
                // test_decoding spells booleans out; the output function says t/f.
                "true" => OVal::Text("t".into()),
                "false" => OVal::Text("f".into()),
                other => OVal::Text(other.to_string()),
            };
            (value, &rest[end..])
        };
        cols.push(OCol {
            name,
            type_name,
            value,
        });
        s = rest;
    }
}

/// A pgoutput value, owned.
#[derive(Debug, Clone, PartialEq)]
enum Raw {
    Null,
    Unchanged,
    Text(Vec<u8>),
}

#[derive(Debug)]
struct RawChange {
    table: String,
    op: String,
    columns: Vec<(String, u32)>,
    old: Option<Vec<Raw>>,
    new: Option<Vec<Raw>>,
}

#[derive(Debug)]
struct RawTxn {
    xid: u32,
    changes: Vec<RawChange>,
}

fn raw_tuple(t: &TupleData<'_>) -> Vec<Raw> {
    t.columns
        .iter()
        .map(|v| match v {
            TupleValue::Null => Raw::Null,
            TupleValue::UnchangedToast => Raw::Unchanged,
            TupleValue::Text(b) => Raw::Text(b.to_vec()),
            TupleValue::Binary(_) => panic!("binary value without the binary option"),
        })
        .collect()
}

/// Decodes raw pgoutput messages (as `pg_logical_slot_peek_binary_changes` returns them) with
/// walsweep's decoder.
fn decode_pgoutput(messages: &[Vec<u8>]) -> Vec<RawTxn> {
    let mut decoder = Decoder::new();
    let mut relations: HashMap<u32, (String, Vec<(String, u32)>)> = HashMap::new();
    let mut txns = Vec::new();
    let mut current: Option<RawTxn> = None;
    for bytes in messages {
        let message = decoder.decode(bytes).expect("walsweep decodes pgoutput");
        let mut push = |oid: u32, op: &str, old: Option<Vec<Raw>>, new: Option<Vec<Raw>>| {
            let (table, columns) = relations[&oid].clone();
            current.as_mut().expect("in a txn").changes.push(RawChange {
                table,
                op: op.into(),
                columns,
                old,
                new,
            });
        };
        match message {
            PgOutput::Begin(b) => {
                current = Some(RawTxn {
                    xid: b.xid,
                    changes: Vec::new(),
                })
            }
            PgOutput::Commit(_) => txns.push(current.take().expect("commit in a txn")),
            PgOutput::Relation(r) => {
                relations.insert(
                    r.oid,
                    (
                        format!("{}.{}", r.namespace, r.name),
                        r.columns
                            .iter()
                            .map(|c| (c.name.to_string(), c.type_oid))
                            .collect(),
                    ),
                );
            }
            PgOutput::Insert(i) => push(i.relation_oid, "insert", None, Some(raw_tuple(&i.new))),
            PgOutput::Update(u) => {
                let old = u.old.as_ref().or(u.key.as_ref()).map(raw_tuple);
                push(u.relation_oid, "update", old, Some(raw_tuple(&u.new)))
            }
            PgOutput::Delete(d) => {
                let old = d.old.as_ref().or(d.key.as_ref()).map(raw_tuple);
                push(d.relation_oid, "delete", old, None)
            }
            PgOutput::Truncate(t) => {
                for oid in t.relation_oids {
                    push(oid, "truncate", None, None);
                }
            }
            PgOutput::Type(_) | PgOutput::Origin(_) | PgOutput::Message(_) => {}
            other => panic!("unexpected {} outside streaming", other.name()),
        }
    }
    txns
}

/// Checks raw pgoutput text against the oracle's, byte for byte.
fn compare_raw(oracle: &[OTxn], raw: &[RawTxn]) -> usize {
    assert_eq!(oracle.len(), raw.len(), "transaction count");
    let mut compared = 0;
    for (o, r) in oracle.iter().zip(raw) {
        assert_eq!(o.xid, r.xid, "transaction order");
        assert_eq!(o.changes.len(), r.changes.len(), "changes of xid {}", o.xid);
        for (oc, rc) in o.changes.iter().zip(&r.changes) {
            let at = format!("xid {} {} {}", o.xid, oc.op, oc.table);
            assert_eq!((&oc.table, &oc.op), (&rc.table, &rc.op), "{at}");
            match (&oc.new, &rc.new) {
                (Some(on), Some(rn)) => {
                    assert_eq!(on.len(), rn.len(), "{at}: new columns");
                    for ((col, rv), (name, _)) in on.iter().zip(rn).zip(&rc.columns) {
                        assert_eq!(&col.name, name, "{at}");
                        assert_same_raw(&col.value, rv, &format!("{at} new.{name}"));
                        compared += 1;
                    }
                }
                (None, None) => {}
                other => panic!("{at}: new tuple presence differs: {other:?}"),
            }
            match (&oc.old, &rc.old) {
                (Some(_), Some(ro)) => {
                    for (rv, (name, _)) in ro.iter().zip(&rc.columns) {
                        let ov = oc.old_value(name).expect("old");
                        assert_same_raw(&ov, rv, &format!("{at} old.{name}"));
                        compared += 1;
                    }
                }
                (None, None) => {}
                other => panic!("{at}: old tuple presence differs: {other:?}"),
            }
        }
    }
    compared
}

fn assert_same_raw(oracle: &OVal, raw: &Raw, at: &str) {
    match (oracle, raw) {
        (OVal::Null, Raw::Null) | (OVal::Unchanged, Raw::Unchanged) => {}
        (OVal::Text(o), Raw::Text(r)) => assert_eq!(
            o.as_bytes(),
            &r[..],
            "{at}: test_decoding {o:?} vs pgoutput {:?}",
            String::from_utf8_lossy(r)
        ),
        other => panic!("{at}: {other:?}"),
    }
}

/// Equal as JSON, numbers compared by value (Postgres prints `100`, serde_json `100.0`).
fn json_same(a: &J, b: &J) -> bool {
    match (a, b) {
        (J::Number(x), J::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (J::Array(x), J::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_same(a, b))
        }
        (J::Object(x), J::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_same(v, w)))
        }
        _ => a == b,
    }
}

/// What Postgres' `to_json()` makes of the oracle's text cast back to the column type; for
/// numeric columns the text (walsweep's documented form).
struct Expect<'a> {
    client: &'a tokio_postgres::Client,
    cache: HashMap<(String, String, bool), J>,
}

impl Expect<'_> {
    async fn json(&mut self, column: &str, type_name: &str, value: &OVal) -> J {
        let text = match value {
            OVal::Null => return J::Null,
            OVal::Text(t) => t.clone(),
            OVal::Unchanged => panic!("unchanged TOAST has no value"),
        };
        // format_type_be omits typmods: `character` would be char(1) and truncate.
        let pg_type = match type_name {
            "character" => "bpchar",
            "character[]" => "bpchar[]",
            t => t,
        };
        let numeric = NUMERIC_COLUMNS.contains(&column);
        let key = (pg_type.to_string(), text.clone(), numeric);
        if let Some(j) = self.cache.get(&key) {
            return j.clone();
        }
        let sql = match (numeric, pg_type.ends_with("[]")) {
            (true, true) => {
                format!("SELECT to_json(CAST(CAST($1::text AS {pg_type}) AS text[]))::text")
            }
            (true, false) => {
                format!("SELECT to_json(CAST(CAST($1::text AS {pg_type}) AS text))::text")
            }
            (false, _) => format!("SELECT to_json(CAST($1::text AS {pg_type}))::text"),
        };
        let row = self
            .client
            .query_one(&sql, &[&text])
            .await
            .unwrap_or_else(|e| panic!("{sql} with {text:?}: {e}"));
        let j: J = serde_json::from_str(row.get::<_, &str>(0)).expect("Postgres JSON");
        self.cache.insert(key, j.clone());
        j
    }
}

/// Sets what every comparison session needs: the forms walsweep's replication session uses.
async fn oracle_session(pg: &Postgres) -> tokio_postgres::Client {
    let client = pg.client("app").await;
    client
        .batch_execute(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET IntervalStyle = 'postgres';
             SET extra_float_digits = 3; SET bytea_output = 'hex'",
        )
        .await
        .expect("session settings");
    client
}

async fn wait_for<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn slot_count(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .expect("pg_replication_slots")
        .get(0)
}

async fn temporary_slot_exists(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE temporary",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0) > 0)
        .unwrap_or(false)
}

fn ymd(year: i32, month: u8, day: u8) -> Ymd {
    Ymd { year, month, day }
}

fn hms(hour: u8, minute: u8, second: u8, micros: u32) -> Time {
    Time {
        hour,
        minute,
        second,
        micros,
    }
}

/// The edge row (id 2) as typed values, written by hand.
fn expected_edge_row() -> Vec<(&'static str, Value)> {
    use Value::*;
    let t = |s: &str| Text(s.into());
    let arr = Array;
    let ts_utc = |d: Ymd, t: value::Time| TimestampTz(value::Timestamp::At(d, t), 0);
    vec![
        ("id", Int(2)),
        ("b", Bool(false)),
        ("i2", Int(-32768)),
        ("i4", Int(-2147483648)),
        ("i8", Int(i64::MIN)),
        ("f4", Float(f64::NAN)),
        ("f8", Float(f64::NEG_INFINITY)),
        (
            "n",
            Numeric("-123456789012345678901234567890.123456789012345678901234567890".into()),
        ),
        ("tx", t("")),
        ("vc", t(r#"it's "q" \ back"#)),
        ("bc", t("x    ")),
        ("by", Bytes(vec![])),
        ("u", Uuid([0; 16])),
        ("d", Date(value::Date::Ymd(ymd(-43, 3, 15)))),
        ("tm", Time(hms(24, 0, 0, 0))),
        ("ttz", TimeTz(hms(0, 0, 0, 1), -(3 * 3600 + 30 * 60))),
        (
            "ts",
            Timestamp(value::Timestamp::At(
                ymd(1969, 7, 20),
                hms(20, 17, 40, 123_456),
            )),
        ),
        // Amsterdam's local mean time was +00:19:32 in 1900.
        ("tz", ts_utc(ymd(1899, 12, 31), hms(23, 40, 28, 0))),
        (
            "iv",
            Interval(value::Interval {
                months: -10,
                days: -3,
                micros: ((4 * 60 + 5) * 60 + 6) * 1_000_000 + 789_000,
            }),
        ),
        (
            "j",
            Json(json!({"q": "it's \"x\" \\ é", "nested": {"deep": [1, [2, [3]]]}, "dup": 2})),
        ),
        (
            "jb",
            Json(
                json!({"": "", "ü": [null, true, false, -0.5, 12345678901234567_i64], "big": 1e300}),
            ),
        ),
        ("a_b", arr(vec![Bool(true), Null, Bool(false)])),
        (
            "a_i2",
            arr(vec![arr(vec![Int(1), Null]), arr(vec![Int(3), Int(4)])]),
        ),
        ("a_i4", arr(vec![Int(7), Int(8)])),
        ("a_i8", arr(vec![Int(i64::MAX), Int(i64::MIN)])),
        (
            "a_f4",
            arr(vec![
                Float(f64::NAN),
                Float(f64::INFINITY),
                Float(-0.0),
                Float(1.1),
            ]),
        ),
        (
            "a_f8",
            arr(vec![
                arr(vec![Float(1e300), Null]),
                arr(vec![Float(-1e-300), Float(f64::NAN)]),
            ]),
        ),
        (
            "a_n",
            arr(vec![
                Numeric("1.50".into()),
                Numeric("NaN".into()),
                Numeric("-0.0000001".into()),
                Null,
            ]),
        ),
        (
            "a_tx",
            arr(vec![
                t("a,b"),
                t("NULL"),
                Null,
                t(""),
                t("q\"x\\y"),
                t(" lead"),
                t("{}"),
                t("é ü"),
                t("null2"),
            ]),
        ),
        ("a_vc", arr(vec![])),
        ("a_bc", arr(vec![t("a "), Null])),
        ("a_by", arr(vec![Bytes(vec![0, 255]), Bytes(vec![])])),
        (
            "a_u",
            arr(vec![
                Uuid([
                    0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd,
                    0x38, 0x0a, 0x11,
                ]),
                Null,
            ]),
        ),
        (
            "a_d",
            arr(vec![
                Date(value::Date::Infinity),
                Date(value::Date::NegInfinity),
                Date(value::Date::Ymd(ymd(0, 1, 1))),
                Date(value::Date::Ymd(ymd(2000, 2, 29))),
            ]),
        ),
        ("a_tm", arr(vec![Time(hms(0, 0, 0, 500_000)), Null])),
        (
            "a_ts",
            arr(vec![
                Timestamp(value::Timestamp::At(
                    ymd(1969, 12, 31),
                    hms(23, 59, 59, 999_999),
                )),
                Timestamp(value::Timestamp::Infinity),
                Timestamp(value::Timestamp::At(ymd(-43, 3, 15), hms(12, 0, 0, 0))),
            ]),
        ),
        (
            "a_tz",
            arr(vec![
                ts_utc(ymd(1899, 12, 31), hms(23, 40, 28, 0)),
                // 02:30 does not exist that night (clocks jump from 02:00 CET to 03:00 CEST):
                // Postgres reads it with the offset before the jump, +01.
                ts_utc(ymd(2021, 3, 28), hms(1, 30, 0, 0)),
                // 02:30 happens twice that night: Postgres takes standard time, +01.
                ts_utc(ymd(2021, 10, 31), hms(1, 30, 0, 0)),
                TimestampTz(value::Timestamp::NegInfinity, 0),
            ]),
        ),
        (
            "a_iv",
            arr(vec![
                Interval(value::Interval {
                    months: 12,
                    days: 0,
                    micros: 0,
                }),
                Interval(value::Interval {
                    months: 0,
                    days: 0,
                    micros: -1_000_000,
                }),
                Interval(value::Interval {
                    months: 0,
                    days: 3,
                    micros: -4 * 3_600_000_000,
                }),
            ]),
        ),
        (
            "a_j",
            arr(vec![
                Json(json!({"a": [1, 2]})),
                Json(J::Null),
                Json(json!("s")),
            ]),
        ),
        (
            "a_jb",
            arr(vec![Json(json!({"a": 2, "b": 1})), Json(json!([]))]),
        ),
        ("en", t("it's \"quoted\"")),
        ("a_en", arr(vec![t("it's \"quoted\""), t("ünïcode"), Null])),
        ("dom", Int(2147483647)),
        ("dom2", Int(99)),
        ("dnum", Numeric("-0.01".into())),
        ("dtags", arr(vec![t("x y"), Null, t("")])),
        (
            "a_dom",
            arr(vec![arr(vec![Int(1), Int(2)]), arr(vec![Int(3), Null])]),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoded_values_match_test_decoding_and_postgres_to_json() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    pg.psql(
        "app",
        "SELECT 'x' FROM pg_create_logical_replication_slot('oracle', 'test_decoding');
         SELECT 'x' FROM pg_create_logical_replication_slot('ws', 'pgoutput');",
    );

    // The workload: inserts, updates (also of the key), deletes, unchanged TOAST, a truncate,
    // a rolled back transaction and one on an unpublished table.
    pg.psql("app", &format!("BEGIN; {ROWS} COMMIT;"));
    pg.psql(
        "app",
        &format!(
            "BEGIN; {ROW_4}
             UPDATE everything SET tz = '2021-03-28 03:00:00 Europe/Amsterdam',
                 ts = '2021-03-28 02:30:00', tx = $$new 'text'$$, a_i4 = '{{{{5,6}},{{7,NULL}}}}',
                 f8 = 1e-5, n = 1e20, d = '1970-01-01', b = NULL
             WHERE id = 1;
             COMMIT;"
        ),
    );
    pg.psql(
        "app",
        "BEGIN; UPDATE everything SET i4 = 42 WHERE id = 2; ROLLBACK;
         INSERT INTO unpublished VALUES (1);
         BEGIN;
         UPDATE everything SET tx = NULL, en = 'ok', a_en = '{}' WHERE id = 2;
         DELETE FROM everything WHERE id = 3;
         COMMIT;",
    );
    pg.psql(
        "app",
        &format!("INSERT INTO toasty VALUES (1, 'n', {BIG}), (2, 'o', 'small')"),
    );
    pg.psql("app", "UPDATE toasty SET note = 'm'");
    pg.psql(
        "app",
        "BEGIN;
         UPDATE everything SET id = 10 WHERE id = 4;
         DELETE FROM everything WHERE id = 1;
         DELETE FROM toasty WHERE id = 1;
         COMMIT;
         TRUNCATE toasty;",
    );

    let client = oracle_session(&pg).await;
    let oracle_lines: Vec<String> = client
        .query(
            "SELECT data FROM pg_logical_slot_get_changes('oracle', NULL, NULL, \
             'skip-empty-xacts', '1')",
            &[],
        )
        .await
        .expect("test_decoding changes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    // test_decoding knows no publications: keep what pgoutput publishes.
    let mut oracle = parse_oracle(&oracle_lines);
    for txn in &mut oracle {
        txn.changes
            .retain(|c| c.table == "public.everything" || c.table == "public.toasty");
    }
    oracle.retain(|t| !t.changes.is_empty());
    assert_eq!(oracle.len(), 7, "{oracle_lines:#?}");
    let toast_update = &oracle[4].changes[0];
    assert_eq!(toast_update.op, "update");
    assert_eq!(
        toast_update.new.as_ref().unwrap()[2].value,
        OVal::Unchanged,
        "the workload must produce unchanged TOAST"
    );

    // 1. walsweep's pgoutput decoder on the raw messages: byte-equal to test_decoding.
    let messages: Vec<Vec<u8>> = client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('ws', NULL, NULL, \
             'proto_version', '1', 'publication_names', 'pub')",
            &[],
        )
        .await
        .expect("pgoutput changes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let raw = decode_pgoutput(&messages);
    let compared = compare_raw(&oracle, &raw);
    assert!(compared > 400, "only {compared} values compared");

    // 2. The edge row's typed values, against the hand-written table.
    let mut registry = TypeRegistry::new();
    let edge = &raw[0].changes[1];
    walsweep::stream::types::resolve_types(
        &client,
        &mut registry,
        edge.columns.iter().map(|c| c.1),
    )
    .await
    .expect("pg_type lookup");
    let expected = expected_edge_row();
    let new = edge.new.as_ref().unwrap();
    assert_eq!(expected.len(), new.len(), "every column has an expectation");
    for (((name, type_oid), raw), (want_name, want)) in edge.columns.iter().zip(new).zip(&expected)
    {
        assert_eq!(name, want_name);
        let Raw::Text(text) = raw else {
            panic!("{name}: {raw:?}")
        };
        let got = value::decode_text(*type_oid, text, &registry)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&got, want, "{name}: {:?}", String::from_utf8_lossy(text));
    }

    // 3. tail on the replication protocol, reading the same slot: typed JSON equal to what
    //    Postgres' to_json() makes of the oracle's values.
    let confirmed_before = slot_confirmed(&client, "ws").await;
    let mut options = TailOptions::new(source(&pg));
    options.slot = TailSlot::Existing("ws".into());
    options.limit = Some(oracle.len() as u64);
    let out = SharedBuf::default();
    let summary = tail::run_tail_until(
        options,
        out.clone(),
        tokio::time::sleep(Duration::from_secs(60)),
    )
    .await
    .expect("tail");
    assert_eq!(summary.stop, TailStop::Limit, "{summary:?}\n{}", out.text());
    assert!(!summary.temporary);
    assert_eq!(
        slot_confirmed(&client, "ws").await,
        confirmed_before,
        "tail --slot must not move the slot"
    );
    let printed: Vec<J> = out
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(printed.len(), oracle.len());
    let mut expect = Expect {
        client: &client,
        cache: HashMap::new(),
    };
    let mut typed_compared = 0;
    for (o, p) in oracle.iter().zip(&printed) {
        assert_eq!(p["xid"], json!(o.xid));
        let changes = p["changes"].as_array().expect("changes");
        assert_eq!(changes.len(), o.changes.len(), "xid {}", o.xid);
        for (oc, pc) in o.changes.iter().zip(changes) {
            let at = format!("xid {} {} {}", o.xid, oc.op, oc.table);
            assert_eq!(pc["table"], json!(oc.table), "{at}");
            assert_eq!(pc["op"], json!(oc.op), "{at}");
            if let Some(new) = &oc.new {
                let printed_new = pc["new"].as_object().expect("new");
                let unchanged = pc["unchanged_toast"].as_array().expect("unchanged_toast");
                for col in new {
                    if col.value == OVal::Unchanged {
                        assert!(unchanged.contains(&json!(col.name)), "{at}: {}", col.name);
                        assert!(!printed_new.contains_key(&col.name), "{at}: {}", col.name);
                        continue;
                    }
                    let want = expect.json(&col.name, &col.type_name, &col.value).await;
                    let got = &printed_new[&col.name];
                    assert!(
                        json_same(got, &want),
                        "{at} new.{}: walsweep {got} vs Postgres {want} (text {:?})",
                        col.name,
                        col.value
                    );
                    typed_compared += 1;
                }
            } else {
                assert!(pc.get("new").is_none(), "{at}");
            }
            match (&oc.old, pc.get("old")) {
                (Some(_), Some(J::Object(old))) => {
                    for (name, got) in old {
                        let type_name = o_type(&oracle, &oc.table, name);
                        let value = oc.old_value(name).unwrap();
                        let want = expect.json(name, &type_name, &value).await;
                        assert!(
                            json_same(got, &want),
                            "{at} old.{name}: walsweep {got} vs Postgres {want}"
                        );
                        typed_compared += 1;
                    }
                    for col in oc.old.as_ref().unwrap() {
                        assert!(
                            old.contains_key(&col.name),
                            "{at}: old.{} missing",
                            col.name
                        );
                    }
                }
                // An UPDATE that kept its key sends no old row; tail shows the key from the
                // new row.
                (None, Some(J::Object(old))) if oc.op == "update" => {
                    for (name, got) in old {
                        assert_eq!(Some(got), pc["new"].get(name), "{at}: old.{name}");
                    }
                }
                (None, None) if oc.op == "insert" || oc.op == "truncate" => {}
                other => panic!("{at}: old {other:?}"),
            }
        }
    }
    assert!(typed_compared > 400, "only {typed_compared} typed values");
    eprintln!("compared {compared} raw and {typed_compared} typed values");

    // --from-lsn: transactions committing before it are skipped (the slot did not move, so it
    // still has them all).
    let third_commit: walsweep::pg::Lsn =
        printed[2]["commit_lsn"].as_str().unwrap().parse().unwrap();
    let mut options = TailOptions::new(source(&pg));
    options.slot = TailSlot::Existing("ws".into());
    options.from_lsn = Some(third_commit);
    options.limit = Some(1);
    let out = SharedBuf::default();
    tail::run_tail_until(
        options,
        out.clone(),
        tokio::time::sleep(Duration::from_secs(60)),
    )
    .await
    .expect("tail --from-lsn");
    let first: J = serde_json::from_str(out.text().trim_end()).expect("one transaction");
    assert_eq!(first["xid"], printed[2]["xid"], "{}", out.text());
}

/// The type name test_decoding printed for a column of `table`.
fn o_type(oracle: &[OTxn], table: &str, column: &str) -> String {
    oracle
        .iter()
        .flat_map(|t| &t.changes)
        .filter(|c| c.table == table)
        .flat_map(|c| c.new.iter().chain(c.old.iter()).flatten())
        .find(|c| c.name == column)
        .map(|c| c.type_name.clone())
        .unwrap_or_else(|| panic!("no type for {table}.{column}"))
}

async fn slot_confirmed(client: &tokio_postgres::Client, slot: &str) -> String {
    client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot")
        .get(0)
}

const SMALL_SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text);
CREATE TABLE other (id int PRIMARY KEY);
CREATE TABLE unpublished (id int);
CREATE PUBLICATION pub FOR TABLE items, other;
";

/// Runs `sql` in its own transaction and returns its xid.
fn committed_xid(pg: &Postgres, sql: &str) -> u32 {
    let out = pg.psql(
        "app",
        &format!("BEGIN; {sql}; SELECT txid_current() % 4294967296; COMMIT;"),
    );
    out.lines().last().unwrap().parse().expect("xid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_limit_prints_exactly_the_committed_transactions_and_leaves_no_slot() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SMALL_SCHEMA);
    let client = pg.client("app").await;

    let mut options = TailOptions::new(source(&pg));
    options.limit = Some(3);
    let out = SharedBuf::default();
    let task = tokio::spawn(tail::run_tail_until(
        options,
        out.clone(),
        tokio::time::sleep(Duration::from_secs(60)),
    ));
    wait_for(30, "tail's temporary slot", || {
        temporary_slot_exists(&client)
    })
    .await;

    let t1 = committed_xid(&pg, "INSERT INTO items VALUES (1, 'one'), (2, 'two')");
    pg.psql(
        "app",
        "BEGIN; INSERT INTO items VALUES (99, 'rolled back'); ROLLBACK;
         INSERT INTO unpublished VALUES (1);",
    );
    let t2 = committed_xid(
        &pg,
        "UPDATE items SET name = 'uno' WHERE id = 1; INSERT INTO other VALUES (7); \
         SELECT pg_logical_emit_message(true, 'walsweep', '{\"keys\":[\"k\"]}')",
    );
    let t3 = committed_xid(&pg, "DELETE FROM items WHERE id = 2");
    let _t4 = committed_xid(&pg, "INSERT INTO items VALUES (4, 'after the limit')");

    let summary = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("tail stops at its limit")
        .expect("tail task")
        .expect("tail");
    assert_eq!(summary.stop, TailStop::Limit);
    assert!(summary.temporary);
    assert_eq!((summary.transactions, summary.changes), (3, 5));
    assert_eq!(slot_count(&client).await, 0, "tail left a slot behind");

    let printed: Vec<J> = out
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(printed.len(), 3, "{}", out.text());
    let xids: Vec<u64> = printed.iter().map(|p| p["xid"].as_u64().unwrap()).collect();
    assert_eq!(xids, [t1, t2, t3].map(u64::from));
    let lsns: Vec<&str> = printed
        .iter()
        .map(|p| p["commit_lsn"].as_str().unwrap())
        .collect();
    let lsns: Vec<walsweep::pg::Lsn> = lsns.iter().map(|l| l.parse().unwrap()).collect();
    assert!(
        lsns.windows(2).all(|w| w[0] < w[1]),
        "commit order {lsns:?}"
    );
    for p in &printed {
        assert!(p["commit_time"].as_str().unwrap().ends_with('Z'));
    }
    let strip = |p: &J| {
        let mut p = p.clone();
        let obj = p.as_object_mut().unwrap();
        for key in ["xid", "commit_lsn", "end_lsn", "commit_time"] {
            obj.remove(key);
        }
        p
    };
    assert_eq!(
        strip(&printed[0]),
        json!({"changes": [
            {"table": "public.items", "op": "insert", "identity": "default",
             "new": {"id": 1, "name": "one"}, "unchanged_toast": []},
            {"table": "public.items", "op": "insert", "identity": "default",
             "new": {"id": 2, "name": "two"}, "unchanged_toast": []}],
         "messages": []})
    );
    assert_eq!(
        strip(&printed[1]),
        json!({"changes": [
            {"table": "public.items", "op": "update", "identity": "default",
             "old": {"id": 1}, "new": {"id": 1, "name": "uno"}, "unchanged_toast": []},
            {"table": "public.other", "op": "insert", "identity": "default",
             "new": {"id": 7}, "unchanged_toast": []}],
         "messages": [{"prefix": "walsweep", "content": "{\"keys\":[\"k\"]}"}]})
    );
    assert_eq!(
        strip(&printed[2]),
        json!({"changes": [
            {"table": "public.items", "op": "delete", "identity": "default", "old": {"id": 2}}],
         "messages": []})
    );
    // Column order is the table's, not alphabetical.
    assert!(out.text().contains(r#""new":{"id":1,"name":"one"}"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_stops_cleanly_when_interrupted_and_filters_tables() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SMALL_SCHEMA);
    let client = pg.client("app").await;

    let mut options = TailOptions::new(source(&pg));
    options.tables = vec!["items".into()];
    options.format = TailFormat::Pretty;
    let out = SharedBuf::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(tail::run_tail_until(options, out.clone(), async move {
        let _ = stop_rx.await;
    }));
    wait_for(30, "tail's temporary slot", || {
        temporary_slot_exists(&client)
    })
    .await;
    pg.psql("app", "INSERT INTO other VALUES (1)");
    pg.psql(
        "app",
        "INSERT INTO items VALUES (1, 'x'); INSERT INTO other VALUES (2)",
    );
    wait_for(30, "the items change", || {
        let seen = out.text().contains("insert public.items");
        async move { seen }
    })
    .await;
    stop_tx.send(()).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("tail stops when asked")
        .unwrap()
        .expect("tail");
    assert_eq!(summary.stop, TailStop::Interrupted);
    assert_eq!((summary.transactions, summary.changes), (1, 1));
    assert_eq!(slot_count(&client).await, 0, "tail left a slot behind");
    let text = out.text();
    assert!(!text.contains("public.other"), "{text}");
    assert!(
        text.contains("    new: id=1 name=\"x\"\n"),
        "pretty output: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_refuses_what_it_cannot_read_with_a_clear_error() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SMALL_SCHEMA);
    pg.psql(
        "app",
        "SELECT 'x' FROM pg_create_logical_replication_slot('decoded', 'test_decoding')",
    );
    let run = |options: TailOptions| async move {
        tail::run_tail_until(options, Vec::new(), std::future::pending())
            .await
            .expect_err("must refuse")
    };

    let mut options = TailOptions::new(source(&pg));
    options.source.publication = "missing".into();
    let err = run(options).await;
    assert!(matches!(err, TailError::Setup(_)), "{err:?}");
    assert!(err.to_string().contains("publication \"missing\""), "{err}");

    let mut options = TailOptions::new(source(&pg));
    options.slot = TailSlot::Existing("nope".into());
    let err = run(options).await;
    assert!(
        err.to_string().contains("slot \"nope\" does not exist"),
        "{err}"
    );

    let mut options = TailOptions::new(source(&pg));
    options.slot = TailSlot::Existing("decoded".into());
    let err = run(options).await;
    assert!(err.to_string().contains("not pgoutput"), "{err}");

    let mut options = TailOptions::new(source(&pg));
    options.limit = Some(0);
    let err = run(options).await;
    assert!(err.to_string().contains("--limit"), "{err}");

    let client = pg.client("app").await;
    assert_eq!(slot_count(&client).await, 1, "only the test's own slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_command_prints_json_lines_and_exits_after_its_limit() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql("app", SMALL_SCHEMA);
    let client = pg.client("app").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("walsweep.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{}\"\npublication = \"pub\"\n",
            pg.url("app")
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walsweep"))
        .args(["tail", "--config"])
        .arg(&config)
        .args(["--table", "public.items", "--limit", "1"])
        .env_remove("WALSWEEP_SOURCE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("walsweep binary");
    wait_for(30, "tail's temporary slot", || {
        temporary_slot_exists(&client)
    })
    .await;
    pg.psql(
        "app",
        "INSERT INTO other VALUES (1); INSERT INTO items VALUES (5, 'five')",
    );
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("walsweep tail exits after --limit")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let txn: J = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(txn["changes"][0]["new"], json!({"id": 5, "name": "five"}));
    wait_for(10, "no slot left", || async {
        slot_count(&client).await == 0
    })
    .await;
}

/// `--slot S` reads someone else's slot: when that slot's WAL is gone, tail reports it and
/// leaves every slot alone, whatever `source.on_slot_lost` says about walsweep's own slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_on_a_lost_borrowed_slot_fails_and_touches_no_slot() {
    support::init_tracing();
    let pg = Postgres::start_with(support::PostgresOptions {
        extra_settings: vec![("max_slot_wal_keep_size".into(), "2MB".into())],
        ..Default::default()
    });
    pg.create_database("app");
    pg.psql("app", SMALL_SCHEMA);
    pg.psql(
        "app",
        "SELECT 'x' FROM pg_create_logical_replication_slot('borrowed', 'pgoutput'); \
         SELECT 'x' FROM pg_create_logical_replication_slot('production', 'pgoutput')",
    );
    let client = pg.client("app").await;
    let production_before = pg.psql(
        "app",
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'production'",
    );
    pg.lose_slot("app", "borrowed");

    let mut options = TailOptions::new(source(&pg));
    options.source.slot = "production".into();
    options.source.on_slot_lost = walsweep::config::SlotLostPolicy::Recreate;
    options.slot = TailSlot::Existing("borrowed".into());
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        tail::run_tail_until(options, Vec::new(), std::future::pending()),
    )
    .await
    .expect("tail gives up on a lost slot instead of retrying");
    let err = result.expect_err("a lost slot cannot be read");
    // Postgres' wording varies by version; the slot's name and "invalidated" do not.
    let msg = walsweep::telemetry::log::display_chain(&err);
    assert!(
        msg.contains("\"borrowed\"") && msg.contains("invalidated"),
        "{msg}"
    );
    assert_eq!(
        pg.psql(
            "app",
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'production'",
        ),
        production_before,
        "walsweep's own slot was dropped or moved"
    );
    assert_eq!(
        pg.psql(
            "app",
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'borrowed'",
        ),
        "lost",
        "the borrowed slot was replaced"
    );
    assert_eq!(slot_count(&client).await, 2);
}
