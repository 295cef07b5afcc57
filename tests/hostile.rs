//! Hostile inputs, each handled with a correct result or a clear error, never a panic:
//!
//! | input                                   | where                       | expected             |
//! |-----------------------------------------|-----------------------------|----------------------|
//! | 63-byte (maximum) multibyte names       | real server, rules, Redis   | keys removed         |
//! | 1600 columns (the Postgres maximum)     | real server, rules, Redis   | keys removed         |
//! | 10 000 columns                          | decoder, assembler, rules   | decoded, fast        |
//! | a forged column count (65 535, no data) | decoder                     | "truncated" error    |
//! | a 64 MB text value                      | real server, pipeline       | exact value, bounded memory |
//! | a 1 GB text value                       | decoder, assembler, rules   | borrowed, not copied |
//! | non-ASCII bytes (SQL_ASCII database)    | real server, pipeline       | bytes unchanged      |
//! | invalid UTF-8 in a text value           | decoder                     | raw bytes kept       |
//! | invalid UTF-8 in relation/column names  | decoder                     | error naming the field |
//! | invalid UTF-8 (SQL_ASCII database)      | real server, pipeline       | values exact; a table name: error naming the field |
//! | a key template over a non-UTF-8 value   | decoder, assembler, rules   | prefix invalidated   |
//! | unknown message types                   | decoder, assembler          | error naming the tag |
//!
//! Postgres caps a table at 1600 columns and a value at 1 GB minus its header, and a walsender
//! cannot even build a message holding a value that size (its buffers stop at 1 GB), so 10 000
//! columns and 1 GB values are hand-built pgoutput messages. The 1 GB message sits in a zeroed
//! allocation the kernel maps lazily: the test shows the decoder never touches (copies) the
//! value, so the process does not grow by anything near 1 GB.
//!
//! The real-server UTF-8 cases use a SQL_ASCII database: walsweep asks every other database for
//! UTF8, which the server converts to, so only SQL_ASCII's unchecked bytes reach it unconverted.
//!
//! Memory is measured as the growth of this process's peak RSS (VmHWM, reset through
//! /proc/self/clear_refs) while one case runs; the tests take a lock so they never overlap.

mod support;

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use support::daemon::Daemon;
use walsweep::config::{Config, SourceConfig};
use walsweep::pg::pgoutput::{parse_message, DecodeError, PgOutput, TupleValue};
use walsweep::pipeline::{self, PipelineError, RunSummary, ShutdownHandle};
use walsweep::plan::rules::{EffectPlan, Rules, RulesPlanner};
use walsweep::plan::{Op, Plan, Planner, RelationInfo, RowChange};
use walsweep::sink::{Applied, Sink, SinkError};
use walsweep::stream::assembler::{Assembler, CommittedTxn};
use walsweep::telemetry::log::display_chain;

use support::{Postgres, Redis};

/// One case at a time: memory figures are per process.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Memory.

fn status_kb(field: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Peak RSS growth (bytes) while `f` runs: the peak is reset to the current RSS first.
struct PeakMeter {
    start_rss: usize,
}

impl PeakMeter {
    fn start() -> PeakMeter {
        // "5" resets VmHWM to the current RSS (Linux >= 4.0).
        std::fs::write("/proc/self/clear_refs", "5")
            .expect("reset VmHWM via /proc/self/clear_refs");
        PeakMeter {
            start_rss: status_kb("VmRSS") * 1024,
        }
    }

    fn growth(&self) -> usize {
        (status_kb("VmHWM") * 1024).saturating_sub(self.start_rss)
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-built pgoutput messages.

struct Msg(Vec<u8>);

impl Msg {
    fn new(tag: u8) -> Msg {
        Msg(vec![tag])
    }
    fn u8(mut self, v: u8) -> Msg {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Msg {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Msg {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Msg {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Msg {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn cstr(mut self, v: &[u8]) -> Msg {
        self.0.extend_from_slice(v);
        self.0.push(0);
        self
    }
    fn text(self, v: &[u8]) -> Msg {
        let mut m = self.u8(b't').i32(i32::try_from(v.len()).expect("small"));
        m.0.extend_from_slice(v);
        m
    }
}

const TEXT_OID: u32 = 25;
const INT4_OID: u32 = 23;
const REL_OID: u32 = 16_384;

fn begin(xid: u32) -> Vec<u8> {
    Msg::new(b'B').u64(0x100).u64(0).u32(xid).0
}

fn commit() -> Vec<u8> {
    Msg::new(b'C').u8(0).u64(0x100).u64(0x180).u64(0).0
}

/// A Relation message: REPLICA IDENTITY FULL, every column flagged as part of the identity.
fn relation(name: &[u8], columns: &[(Vec<u8>, u32)]) -> Vec<u8> {
    let mut m = Msg::new(b'R')
        .u32(REL_OID)
        .cstr(b"public")
        .cstr(name)
        .u8(b'f')
        .u16(u16::try_from(columns.len()).expect("at most 65535 columns"));
    for (column, oid) in columns {
        m = m.u8(1).cstr(column).u32(*oid).i32(-1);
    }
    m.0
}

fn insert(values: &[Vec<u8>]) -> Vec<u8> {
    let mut m = Msg::new(b'I')
        .u32(REL_OID)
        .u8(b'N')
        .u16(u16::try_from(values.len()).expect("at most 65535 columns"));
    for v in values {
        m = m.text(v);
    }
    m.0
}

fn rules(toml_rules: &str) -> Rules {
    let text = format!("[source]\nurl = \"postgres://u@127.0.0.1:1/db\"\n{toml_rules}");
    let config = Config::parse(&text).unwrap_or_else(|e| panic!("config: {e}\n{text}"));
    Rules::from_config(&config).expect("rules compile")
}

/// Feeds whole messages to an assembler with rules and returns the committed plan.
fn assemble(rules: Rules, messages: &[&[u8]]) -> CommittedTxn<EffectPlan> {
    let mut assembler = Assembler::new(RulesPlanner::new(rules));
    let mut committed = None;
    for (i, m) in messages.iter().enumerate() {
        match assembler.feed(m) {
            Ok(Some(txn)) => committed = Some(txn),
            Ok(None) => {}
            Err(e) => panic!("message {i}: {}", display_chain(&e)),
        }
    }
    committed.expect("a committed transaction")
}

// ---------------------------------------------------------------------------------------------
// Decoder-level cases.

#[test]
fn ten_thousand_columns_decode_and_plan_quickly() {
    let _serial = SERIAL.blocking_lock();
    const N: usize = 10_000;
    let columns: Vec<(Vec<u8>, u32)> = (0..N)
        .map(|i| (format!("c{i}").into_bytes(), TEXT_OID))
        .collect();
    let values: Vec<Vec<u8>> = (0..N).map(|i| format!("v{i}").into_bytes()).collect();
    let rel = relation(b"wide", &columns);
    let ins = insert(&values);

    let started = Instant::now();
    match parse_message(&rel, false).expect("Relation with 10 000 columns") {
        PgOutput::Relation(r) => {
            assert_eq!(r.columns.len(), N);
            assert_eq!(r.columns[N - 1].name, "c9999");
            assert!(r
                .columns
                .iter()
                .all(|c| c.is_key() && c.type_oid == TEXT_OID));
        }
        other => panic!("decoded as {}", other.name()),
    }
    match parse_message(&ins, false).expect("Insert with 10 000 values") {
        PgOutput::Insert(i) => {
            assert_eq!(i.new.columns.len(), N);
            assert_eq!(i.new.columns[N - 1], TupleValue::Text(b"v9999"));
        }
        other => panic!("decoded as {}", other.name()),
    }
    // Through the assembler and the rules: the last column renders the key.
    let txn = assemble(
        rules("[[table]]\nname = \"public.wide\"\nkeys = [\"w:{c9999}\", \"w0:{c0}\"]\n"),
        &[&begin(7), &rel, &ins, &commit()],
    );
    assert_eq!(
        txn.plan.keys,
        ["w:v9999".to_string(), "w0:v0".to_string()]
            .into_iter()
            .collect::<walsweep::plan::rules::EffectSet>()
    );
    let took = started.elapsed();
    eprintln!("hostile: 10 000 columns decoded and planned in {took:?}");
    assert!(
        took < Duration::from_secs(2),
        "10 000 columns took {took:?}"
    );

    // A forged count fails before sizing anything by it.
    let forged = Msg::new(b'R')
        .u32(REL_OID)
        .cstr(b"public")
        .cstr(b"wide")
        .u8(b'f')
        .u16(u16::MAX)
        .0;
    let err = parse_message(&forged, false).unwrap_err().to_string();
    assert_eq!(
        err,
        "pgoutput Relation: truncated at offset 20 reading columns (need 655350 bytes, 0 left)"
    );
    let tuple = Msg::new(b'I').u32(REL_OID).u8(b'N').u16(u16::MAX).0;
    let err = parse_message(&tuple, false).unwrap_err().to_string();
    assert!(
        err.starts_with("pgoutput Insert: truncated at offset 8 reading new tuple columns"),
        "{err}"
    );
}

#[test]
fn a_one_gigabyte_value_is_borrowed_not_copied() {
    let _serial = SERIAL.blocking_lock();
    const VALUE: usize = 1 << 30;
    let rel = relation(
        b"big",
        &[(b"id".to_vec(), INT4_OID), (b"t".to_vec(), TEXT_OID)],
    );
    let head = Msg::new(b'I')
        .u32(REL_OID)
        .u8(b'N')
        .u16(2)
        .text(b"1")
        .u8(b't')
        .i32(i32::try_from(VALUE).expect("1 GB fits an Int32 length"))
        .0;

    let meter = PeakMeter::start();
    // Zeroed memory comes straight from mmap: pages the decoder does not read stay unmapped.
    let mut message = vec![0u8; head.len() + VALUE];
    message[..head.len()].copy_from_slice(&head);
    match parse_message(&message, false).expect("Insert with a 1 GB value") {
        PgOutput::Insert(i) => match &i.new.columns[1] {
            TupleValue::Text(v) => {
                assert_eq!(v.len(), VALUE);
                assert_eq!(v.as_ptr(), message[head.len()..].as_ptr(), "borrowed");
            }
            other => panic!("value decoded as {other:?}"),
        },
        other => panic!("decoded as {}", other.name()),
    }
    // The rules only render `id`, so planning does not read the value either.
    let txn = assemble(
        rules("[[table]]\nname = \"public.big\"\nkeys = [\"big:{id}\"]\n"),
        &[&begin(8), &rel, &message, &commit()],
    );
    assert_eq!(
        txn.plan.keys,
        ["big:1".to_string()]
            .into_iter()
            .collect::<walsweep::plan::rules::EffectSet>()
    );
    let growth = meter.growth();
    drop(message);
    eprintln!(
        "hostile: decoding and planning a 1 GB value grew the peak RSS by {} MB",
        growth / MB
    );
    assert!(
        growth < 64 * MB,
        "decoding and planning a 1 GB value grew the peak RSS by {} MB",
        growth / MB
    );

    // One byte short: a clear error, not a read past the end.
    let mut short = head.clone();
    short.extend_from_slice(b"only a few bytes");
    let err = parse_message(&short, false).unwrap_err().to_string();
    assert_eq!(
        err,
        "pgoutput Insert: truncated at offset 19 reading new tuple column 1 value \
         (need 1073741824 bytes, 16 left)"
    );
}

#[test]
fn unknown_message_types_are_named_in_the_error() {
    let _serial = SERIAL.blocking_lock();
    for (tag, shown) in [
        (b'Z', "0x5a ('Z')"),
        (b'x', "0x78 ('x')"),
        (b'?', "0x3f ('?')"),
        (0x00, "0x00"),
        (0x01, "0x01"),
        (0xff, "0xff"),
    ] {
        let message = [tag, 1, 2, 3];
        for in_stream in [false, true] {
            let err = parse_message(&message, in_stream).unwrap_err();
            assert_eq!(err, DecodeError::UnknownTag { tag });
            assert_eq!(
                err.to_string(),
                format!("unknown pgoutput message tag {shown} at offset 0")
            );
        }
        // Mid-transaction, through the assembler: the chain still names the tag.
        let mut assembler = Assembler::new(RulesPlanner::new(rules("")));
        assembler.feed(&begin(9)).expect("Begin");
        let err = assembler.feed(&message).unwrap_err();
        let chain = display_chain(&err);
        assert_eq!(
            chain,
            format!(
                "cannot decode pgoutput message: unknown pgoutput message tag {shown} at offset 0"
            )
        );
    }
    assert_eq!(
        parse_message(&[], false).unwrap_err().to_string(),
        "empty pgoutput message: no tag byte"
    );
}

#[test]
fn invalid_utf8_in_names_decodes_lossily_and_in_values_is_kept() {
    let _serial = SERIAL.blocking_lock();
    // Whether such a relation may be skipped is for the assembler to decide (only one a rule
    // names stops the stream), so the codec decodes it with lossy names.
    let rel = relation(b"t\xff\xfe", &[(b"id".to_vec(), INT4_OID)]);
    match parse_message(&rel, false).expect("a non-UTF-8 name still decodes") {
        PgOutput::Relation(r) => assert_eq!(r.name, "t\u{fffd}\u{fffd}"),
        other => panic!("decoded as {}", other.name()),
    }
    // A lead byte cut off by the NUL terminator.
    let rel = relation(b"t", &[(b"c\xc3".to_vec(), INT4_OID)]);
    match parse_message(&rel, false).expect("a non-UTF-8 column name still decodes") {
        PgOutput::Relation(r) => assert_eq!(r.columns[0].name, "c\u{fffd}"),
        other => panic!("decoded as {}", other.name()),
    }
    let ins = insert(&[b"\xff\xfe raw".to_vec()]);
    match parse_message(&ins, false).expect("values need not be UTF-8") {
        PgOutput::Insert(i) => assert_eq!(i.new.columns[0], TupleValue::Text(b"\xff\xfe raw")),
        other => panic!("decoded as {}", other.name()),
    }
}

// ---------------------------------------------------------------------------------------------
// Through a real server.

/// Keeps what the tests need to see of each change, summarising big values.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Unchanged,
    Bytes(Vec<u8>),
    /// A value over 1 MB: its length and whether every byte is `x`.
    Big {
        len: usize,
        all_x: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct SeenChange {
    table: String,
    op: Op,
    columns: Vec<String>,
    old: Option<Vec<Cell>>,
    new: Option<Vec<Cell>>,
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Seen(Vec<SeenChange>);

impl Plan for Seen {
    fn merge(&mut self, later: Self) {
        self.0.extend(later.0);
    }
    fn effect_count(&self) -> usize {
        self.0.len()
    }
}

fn cell(v: &TupleValue<'_>) -> Cell {
    match v {
        TupleValue::Null => Cell::Null,
        TupleValue::UnchangedToast => Cell::Unchanged,
        TupleValue::Text(b) | TupleValue::Binary(b) if b.len() > MB => Cell::Big {
            len: b.len(),
            all_x: b.iter().all(|&c| c == b'x'),
        },
        TupleValue::Text(b) | TupleValue::Binary(b) => Cell::Bytes(b.to_vec()),
    }
}

struct Recorder;

impl Planner for Recorder {
    type Plan = Seen;

    fn plan_change(&mut self, change: &RowChange<'_>, plan: &mut Seen) {
        let n = change.relation.columns.len();
        plan.0.push(SeenChange {
            table: change.relation.qualified_name.clone(),
            op: change.op,
            columns: change
                .relation
                .columns
                .iter()
                .map(|c| c.name.clone())
                .collect(),
            old: (change.op != Op::Insert).then(|| {
                (0..n)
                    .map(|i| change.old_value(i).map_or(Cell::Unchanged, cell))
                    .collect()
            }),
            new: change.new.map(|row| row.iter().map(cell).collect()),
        });
    }

    fn plan_truncate(&mut self, _relations: &[&RelationInfo], _plan: &mut Seen) {}
}

struct ForwardSink(mpsc::UnboundedSender<Seen>);

impl Sink<Seen> for ForwardSink {
    async fn apply(&mut self, batch: &[CommittedTxn<Seen>]) -> Result<Applied, SinkError> {
        for txn in batch {
            let _ = self.0.send(txn.plan.clone());
        }
        Ok(Applied::whole(batch))
    }

    async fn reset(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

struct Recording {
    shutdown: ShutdownHandle,
    task: JoinHandle<Result<RunSummary, PipelineError>>,
    seen: mpsc::UnboundedReceiver<Seen>,
}

fn source(pg: &Postgres, db: &str, slot: &str, publication: &str) -> SourceConfig {
    let mut s = SourceConfig::new(pg.url(db));
    s.slot = slot.into();
    s.publication = publication.into();
    s.status_interval_ms = 200;
    s.reconnect_min_ms = 50;
    s.reconnect_max_ms = 500;
    s
}

fn record(source: SourceConfig) -> Recording {
    let (tx, seen) = mpsc::unbounded_channel();
    let (shutdown, signal) = pipeline::shutdown_channel();
    let task = tokio::spawn(async move {
        pipeline::run(&source, &[], Recorder, ForwardSink(tx), signal).await
    });
    Recording {
        shutdown,
        task,
        seen,
    }
}

impl Recording {
    async fn next_change(&mut self, secs: u64) -> SeenChange {
        loop {
            match tokio::time::timeout(Duration::from_secs(secs), self.seen.recv()).await {
                Ok(Some(seen)) if seen.0.is_empty() => {}
                Ok(Some(mut seen)) => {
                    assert_eq!(seen.0.len(), 1, "one change per transaction: {seen:?}");
                    return seen.0.remove(0);
                }
                Ok(None) => panic!("pipeline stopped: {:?}", self.task.is_finished()),
                Err(_) => panic!("no change within {secs}s"),
            }
        }
    }

    async fn stop(self) {
        self.shutdown.request();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("pipeline stops within 30s")
            .expect("no panic")
            .expect("no error");
    }
}

/// walsweep with rules and the Redis sink, in this process.
fn daemon(pg: &Postgres, redis: &Redis, db: &str, slot: &str, table_rules: &str) -> Daemon {
    support::daemon::start(support::daemon::config(pg, redis, db, slot, table_rules))
}

async fn wait_streaming(pg: &Postgres, db: &str, slot: &str) {
    let client = pg.client(db).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .query_opt(
            "SELECT 1 FROM pg_stat_replication r JOIN pg_replication_slots s \
             ON s.active_pid = r.pid WHERE s.slot_name = $1 AND r.state = 'streaming'",
            &[&slot],
        )
        .await
        .expect("pg_stat_replication")
        .is_none()
    {
        assert!(Instant::now() < deadline, "{slot} not streaming within 30s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sets `keys`, runs `sql`, and waits (bounded) until every key is gone.
async fn set_then_wait_gone(
    pg: &Postgres,
    conn: &mut redis::aio::MultiplexedConnection,
    db: &str,
    keys: &[String],
    sql: &str,
) {
    for k in keys {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg("cached")
            .query_async(conn)
            .await
            .expect("SET");
    }
    pg.psql(db, sql);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut left = Vec::new();
        for k in keys {
            let n: u32 = redis::cmd("EXISTS")
                .arg(k)
                .query_async(conn)
                .await
                .expect("EXISTS");
            if n > 0 {
                left.push(k.as_str());
            }
        }
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still present 20s after {sql:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_identifiers_flow_from_the_slot_to_redis() {
    let _serial = SERIAL.lock().await;
    support::init_tracing();
    // 63 bytes each (NAMEDATALEN - 1), multibyte, so a byte/char mix-up would truncate them.
    let schema = format!("s{}", "ß".repeat(31));
    let table = format!("t{}", "é".repeat(31));
    let column = format!("c{}", "ü".repeat(31));
    for name in [&schema, &table, &column] {
        assert_eq!(name.len(), 63);
    }
    let pg = Postgres::start();
    pg.create_database("app");
    let (s, t, c) = (
        quote_ident(&schema),
        quote_ident(&table),
        quote_ident(&column),
    );
    pg.psql(
        "app",
        &format!(
            "CREATE SCHEMA {s};
             CREATE TABLE {s}.{t} (id int PRIMARY KEY, {c} text);
             ALTER TABLE {s}.{t} REPLICA IDENTITY FULL;
             CREATE PUBLICATION pub FOR TABLE {s}.{t};"
        ),
    );
    // Postgres kept every byte (it truncates longer names with a NOTICE).
    assert_eq!(
        pg.psql(
            "app",
            "SELECT octet_length(n.nspname::text) || ',' || octet_length(c.relname::text) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname LIKE 's%ß'"
        ),
        "63,63"
    );
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let d = daemon(
        &pg,
        &redis,
        "app",
        "long",
        &format!(
            "[[table]]\nname = \"{schema}.{table}\"\nkeys = [\"long:{{{column}}}\"]\n\
             deps = [\"dep:{{{column}}}\"]\n"
        ),
    );
    wait_streaming(&pg, "app", "long").await;
    let _: () = redis::cmd("SADD")
        .arg("cache::rdep::dep:v1")
        .arg("cache::data::entry")
        .query_async(&mut conn)
        .await
        .expect("SADD");
    set_then_wait_gone(
        &pg,
        &mut conn,
        "app",
        &["long:v1".into(), "cache::data::entry".into()],
        &format!("INSERT INTO {s}.{t} VALUES (1, 'v1')"),
    )
    .await;
    set_then_wait_gone(
        &pg,
        &mut conn,
        "app",
        &["long:v1".into(), "long:v2".into()],
        &format!("UPDATE {s}.{t} SET {c} = 'v2'"),
    )
    .await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_hundred_columns_flow_from_the_slot_to_redis() {
    let _serial = SERIAL.lock().await;
    support::init_tracing();
    const N: usize = 1600;
    let pg = Postgres::start();
    pg.create_database("app");
    let columns: Vec<String> = (2..=N).map(|i| format!("c{i} int")).collect();
    pg.psql(
        "app",
        &format!(
            "CREATE TABLE wide (id int PRIMARY KEY, {});
             ALTER TABLE wide REPLICA IDENTITY FULL;
             CREATE PUBLICATION pub FOR TABLE wide;",
            columns.join(", ")
        ),
    );
    assert_eq!(
        pg.psql(
            "app",
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'wide'::regclass AND attnum > 0"
        ),
        "1600"
    );
    let redis = Redis::start();
    let mut conn = redis.connection().await;
    let d = daemon(
        &pg,
        &redis,
        "app",
        "wide",
        "[[table]]\nname = \"public.wide\"\nkeys = [\"wide:{id}:{c1600}\", \"mid:{c800}\"]\n",
    );
    wait_streaming(&pg, "app", "wide").await;
    let started = Instant::now();
    let values: Vec<String> = (1..=N).map(|i| i.to_string()).collect();
    set_then_wait_gone(
        &pg,
        &mut conn,
        "app",
        &["wide:1:1600".into(), "mid:800".into()],
        &format!("INSERT INTO wide VALUES ({})", values.join(", ")),
    )
    .await;
    set_then_wait_gone(
        &pg,
        &mut conn,
        "app",
        &["wide:1:1600".into(), "wide:1:-1".into(), "mid:800".into()],
        "UPDATE wide SET c1600 = -1",
    )
    .await;
    set_then_wait_gone(
        &pg,
        &mut conn,
        "app",
        &["wide:1:-1".into(), "mid:800".into()],
        "DELETE FROM wide",
    )
    .await;
    let took = started.elapsed();
    eprintln!("hostile: 1600 columns: insert, update, delete invalidated in {took:?}");
    assert!(took < Duration::from_secs(10), "1600 columns took {took:?}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixty_four_megabyte_value_arrives_whole_in_bounded_memory() {
    let _serial = SERIAL.lock().await;
    support::init_tracing();
    const VALUE: usize = 64 * MB;
    let pg = Postgres::start();
    pg.create_database("app");
    pg.psql(
        "app",
        "CREATE TABLE big (id int PRIMARY KEY, t text);
         CREATE PUBLICATION pub FOR TABLE big;",
    );
    let mut rec = record(source(&pg, "app", "big", "pub"));
    wait_streaming(&pg, "app", "big").await;

    let meter = PeakMeter::start();
    pg.psql(
        "app",
        &format!("INSERT INTO big VALUES (1, repeat('x', {VALUE}))"),
    );
    let change = rec.next_change(60).await;
    let growth = meter.growth();
    assert_eq!(change.op, Op::Insert);
    assert_eq!(
        change.new,
        Some(vec![
            Cell::Bytes(b"1".to_vec()),
            Cell::Big {
                len: VALUE,
                all_x: true
            }
        ])
    );
    // The frame is read into one buffer (reserved once) and decoded in place; what is left is
    // the socket buffer's growth and the allocator's slack.
    assert!(
        growth < 4 * VALUE,
        "a {} MB value grew the peak RSS by {} MB",
        VALUE / MB,
        growth / MB
    );
    eprintln!(
        "hostile: a {} MB value grew the peak RSS by {} MB",
        VALUE / MB,
        growth / MB
    );
    // An UPDATE that leaves it alone sends it as unchanged TOAST, not again.
    pg.psql("app", "UPDATE big SET id = 2");
    let change = rec.next_change(30).await;
    assert_eq!(
        change.new,
        Some(vec![Cell::Bytes(b"2".to_vec()), Cell::Unchanged])
    );
    rec.stop().await;
}

/// A SQL_ASCII database (it stores text bytes unchecked) with a table `notes` in publication
/// `pub`, a table whose name is the bytes `t\xff`, and publication `everything`.
fn sql_ascii_database(pg: &Postgres) {
    pg.psql(
        "postgres",
        "CREATE DATABASE ascii ENCODING 'SQL_ASCII' TEMPLATE template0",
    );
    // convert_from(..., 'SQL_ASCII') makes text of any bytes.
    pg.psql(
        "ascii",
        "CREATE TABLE notes (id int PRIMARY KEY, note text);
         ALTER TABLE notes REPLICA IDENTITY FULL;
         CREATE PUBLICATION pub FOR TABLE notes;
         DO $$ BEGIN EXECUTE format('CREATE TABLE %I (id int)',
             convert_from('\\x74ff'::bytea, 'SQL_ASCII')); END $$;
         CREATE PUBLICATION everything FOR ALL TABLES;",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_bytes_from_a_sql_ascii_database_arrive_unchanged() {
    let _serial = SERIAL.lock().await;
    support::init_tracing();
    let pg = Postgres::start();
    sql_ascii_database(&pg);
    let mut rec = record(source(&pg, "ascii", "high", "pub"));
    wait_streaming(&pg, "ascii", "high").await;
    // Bytes that happen to be UTF-8 (a 2-byte and a 4-byte sequence): passed through as is.
    pg.psql(
        "ascii",
        "INSERT INTO notes VALUES (1, convert_from('\\xc3bc20f09f9982'::bytea, 'SQL_ASCII'))",
    );
    let change = rec.next_change(30).await;
    assert_eq!(
        change.new,
        Some(vec![
            Cell::Bytes(b"1".to_vec()),
            Cell::Bytes("ü 🙂".as_bytes().to_vec())
        ])
    );
    rec.stop().await;
}

/// In a SQL_ASCII database any bytes can be stored. Asking the walsender for UTF8 would fail
/// the conversion on the server on every attempt (SQLSTATE 22021), so walsweep takes the bytes
/// as they are there; the values arrive exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_from_a_sql_ascii_database() {
    let _serial = SERIAL.lock().await;
    support::init_tracing();
    let pg = Postgres::start();
    sql_ascii_database(&pg);
    let mut rec = record(source(&pg, "ascii", "raw", "pub"));
    wait_streaming(&pg, "ascii", "raw").await;
    pg.psql(
        "ascii",
        "INSERT INTO notes VALUES (1, convert_from('\\xfffe206f6b'::bytea, 'SQL_ASCII'))",
    );
    let change = rec.next_change(10).await;
    assert_eq!(
        change.new,
        Some(vec![
            Cell::Bytes(b"1".to_vec()),
            Cell::Bytes(b"\xff\xfe ok".to_vec())
        ])
    );
    pg.psql(
        "ascii",
        "UPDATE notes SET note = convert_from('\\xc328'::bytea, 'SQL_ASCII')",
    );
    let change = rec.next_change(10).await;
    assert_eq!(change.op, Op::Update);
    assert_eq!(
        change.old,
        Some(vec![
            Cell::Bytes(b"1".to_vec()),
            Cell::Bytes(b"\xff\xfe ok".to_vec())
        ])
    );
    assert_eq!(
        change.new,
        Some(vec![
            Cell::Bytes(b"1".to_vec()),
            Cell::Bytes(b"\xc3(".to_vec())
        ])
    );
    rec.stop().await;

    // A relation whose name is not UTF-8 that the planner needs (this recorder needs every
    // table) stops the pipeline with what to do, without retrying forever.
    let rec = record(source(&pg, "ascii", "names", "everything"));
    wait_streaming(&pg, "ascii", "names").await;
    pg.psql(
        "ascii",
        "DO $$ BEGIN EXECUTE format('INSERT INTO %I VALUES (1)',
             convert_from('\\x74ff'::bytea, 'SQL_ASCII')); END $$;",
    );
    let result = tokio::time::timeout(Duration::from_secs(30), rec.task)
        .await
        .expect("the pipeline stops")
        .expect("no panic");
    let err = display_chain(&result.expect_err("a decode error"));
    assert!(
        err.starts_with("cannot decode the replication stream at ")
            && err.contains(
                "is named in the config, but a name in its Relation message is not valid UTF-8"
            )
            && err.contains("rename the table or column to a UTF-8 name"),
        "{err}"
    );
}

/// A key template over a non-UTF-8 value: a lossy rendering (U+FFFD) would name a key no app
/// wrote, so the template's whole prefix is invalidated instead, and counted.
#[test]
fn keys_from_non_utf8_values_fall_back_to_their_prefix() {
    let rel = relation(
        b"notes",
        &[(b"id".to_vec(), INT4_OID), (b"note".to_vec(), TEXT_OID)],
    );
    let ins = insert(&[b"1".to_vec(), b"\xff\xfe ok".to_vec()]);
    let txn = assemble(
        rules("[[table]]\nname = \"public.notes\"\nkeys = [\"note:{note}\"]\n"),
        &[&begin(10), &rel, &ins, &commit()],
    );
    assert!(
        txn.plan.keys.is_empty(),
        "rendered lossily: {:?}",
        txn.plan.keys
    );
    assert_eq!(
        txn.plan.key_prefixes.get("note:"),
        Some(&walsweep::plan::rules::FallbackCause::NonUtf8Value),
        "{:?}",
        txn.plan
    );
}
