//! Sorted-set scores: a small integer expression over row columns, e.g.
//! `(device_id << 32) | epoch(ts)`, configured per index in TOML.
//!
//! A Redis score is an f64, so an integer score is only exact while its magnitude stays within
//! 2^53. Rather than discovering a collision in production (two rows silently sharing a rounded
//! score), [`ScoreExpr::check_types`] bounds every expression from the column types alone and
//! refuses anything whose worst case needs more than 53 bits. [`ScoreExpr::eval`] then computes
//! in `i128` and still checks the result, so a row that breaks a declared range (a `bits(c, N)`
//! column holding 2^N, a timestamp before 1970) is an error naming the column, never a wrong
//! score.
//!
//! Grammar, lowest precedence first (as in C):
//!
//! ```text
//! or    := add ('|' add)*
//! add   := shift ('+' shift)*
//! shift := mul ('<<' INT)*          shift amount 0..=63
//! mul   := atom ('*' INT)*
//! atom  := INT | column | epoch(column) | epoch_ms(column) | bits(column, INT) | '(' or ')'
//! ```
//!
//! INT is decimal or `0x` hex; a column is `[A-Za-z_][A-Za-z0-9_]*` or a double-quoted name
//! (`""` inside for a quote). Column names are taken exactly as written (no case folding), as
//! everywhere else in the config.

use postgres_types::Type;

use crate::value::{Date, Time, Timestamp, Value, Ymd};

/// The largest magnitude an f64 holds with every integer below it exact.
const EXACT_BITS: u32 = 53;
const EXACT_LIMIT: i128 = 1 << EXACT_BITS;
/// Parse limits: they keep every recursive walk over the tree (and its drop) shallow, so a
/// hostile config cannot overflow the stack. Real score expressions are a handful of nodes.
const MAX_NESTING: usize = 32;
const MAX_NODES: usize = 256;

/// A parsed score expression.
#[derive(Debug, Clone)]
pub struct ScoreExpr {
    source: String,
    columns: Vec<String>,
    root: Node,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeUnit {
    Seconds,
    Millis,
}

impl TimeUnit {
    fn function(self) -> &'static str {
        match self {
            TimeUnit::Seconds => "epoch",
            TimeUnit::Millis => "epoch_ms",
        }
    }

    /// Static width, and (at runtime) the exclusive upper bound as a power of two: 2^32 s reaches
    /// 2106, 2^42 ms reaches 2109, both comfortably within 53 bits once shifted by a small id.
    fn bits(self) -> u32 {
        match self {
            TimeUnit::Seconds => 32,
            TimeUnit::Millis => 42,
        }
    }

    fn micros_per_unit(self) -> i128 {
        match self {
            TimeUnit::Seconds => 1_000_000,
            TimeUnit::Millis => 1_000,
        }
    }
}

#[derive(Debug, Clone)]
enum Node {
    Lit(u64),
    /// Index into `ScoreExpr::columns`.
    Col(usize),
    Epoch {
        col: usize,
        unit: TimeUnit,
    },
    Bits {
        col: usize,
        n: u32,
    },
    Shl(Box<Node>, u32),
    Mul(Box<Node>, u64),
    Or(Box<Node>, Box<Node>),
    Add(Box<Node>, Box<Node>),
}

/// A syntax error: where (byte offset into the expression) and what was expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at {at}: {message}")]
pub struct ScoreParseError {
    pub at: usize,
    pub message: String,
}

/// Why one row has no score.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScoreError {
    #[error("column {column} is NULL; a score needs a value")]
    Null { column: String },
    #[error("column {column} holds {found}; {expected}")]
    WrongType {
        column: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("column {column} holds {value}, not an integer; a score must be exact")]
    NotInteger { column: String, value: String },
    #[error("bits({column}, {bits}): {column} = {value} is outside [0, 2^{bits})")]
    OutOfRange {
        column: String,
        bits: u32,
        value: String,
    },
    #[error("column {column} is {value}; a score needs a finite time")]
    InfiniteTime { column: String, value: &'static str },
    #[error("column {column} holds the invalid date {year}-{month:02}-{day:02}")]
    InvalidDate {
        column: String,
        year: i32,
        month: u8,
        day: u8,
    },
    #[error(
        "{function}({column}): {column} is {value} {unit} from 1970-01-01 00:00:00 UTC, \
         outside [0, 2^{bits}) ({range})"
    )]
    TimeOutOfRange {
        column: String,
        function: &'static str,
        value: i128,
        unit: &'static str,
        bits: u32,
        range: &'static str,
    },
    #[error("float column {column} cannot be combined exactly; use it alone as the score")]
    FloatInArithmetic { column: String },
    #[error("float column {column} is NaN, which is not a valid score")]
    NaN { column: String },
    #[error("score {value} is beyond the ±2^53 a Redis score (a 64-bit float) holds exactly")]
    TooLarge { value: String },
    #[error("score expects {expected} column values, got {got}")]
    ValueCount { expected: usize, got: usize },
}

impl ScoreExpr {
    pub fn parse(source: &str) -> Result<ScoreExpr, ScoreParseError> {
        let mut parser = Parser {
            src: source,
            pos: 0,
            depth: 0,
            nodes: 0,
            columns: Vec::new(),
        };
        let root = parser.or()?;
        let end = parser.peek()?;
        if end.tok != Tok::End {
            return Err(parser.expected(&end, "'|', '+', '<<', '*' or the end of the expression"));
        }
        Ok(ScoreExpr {
            source: source.to_string(),
            columns: parser.columns,
            root,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Distinct column names in first-appearance order. `eval` takes values in this order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Static check from column type OIDs (`type_of(column)` returns the column's pg_type OID,
    /// None if the table lacks it). The error explains the problem and the fix.
    pub fn check_types(&self, type_of: &dyn Fn(&str) -> Option<u32>) -> Result<(), String> {
        let mut types = Vec::with_capacity(self.columns.len());
        for name in &self.columns {
            match type_of(name) {
                Some(t) => types.push(t),
                None => return Err(self.fail(&format!("table has no column {name}"))),
            }
        }
        // A float is exact by definition when it is the score itself; anywhere else it would
        // have to be rounded into an integer, so only the bare form is allowed.
        if let Node::Col(i) = self.root {
            if matches!(Type::from_oid(types[i]), Some(Type::FLOAT4 | Type::FLOAT8)) {
                return Ok(());
            }
        }
        let width = self.width(&self.root, &types)?;
        if width.bits <= EXACT_BITS {
            return Ok(());
        }
        Err(format!(
            "score {:?} can reach 2^{} ({}), beyond the 2^{EXACT_BITS} a Redis score (a 64-bit \
             float) holds exactly; {}",
            self.source,
            width.bits,
            width.why,
            width.fix(width.bits - EXACT_BITS)
        ))
    }

    /// Evaluates for one row; `values[i]` is the value of `columns()[i]`.
    pub fn eval(&self, values: &[&Value]) -> Result<f64, ScoreError> {
        self.check_arity(values)?;
        if let Node::Col(i) = self.root {
            if let Value::Float(f) = values[i] {
                // Redis accepts ±inf scores, and they order correctly; NaN has no order.
                if f.is_nan() {
                    return Err(ScoreError::NaN {
                        column: self.columns[i].clone(),
                    });
                }
                return Ok(*f);
            }
        }
        let v = self.eval_node(&self.root, values)?;
        exact(v)
    }

    /// Whether retention (dropping members older than a window) is possible: the expression is
    /// `epoch(c)` / `epoch_ms(c)` alone, or a top-level `|` or `+` chain of one such time term
    /// and other terms without one, where those other terms only ever occupy bits above the
    /// time term's (e.g. `(device_id << 32) | epoch(ts)`).
    pub fn supports_retention(&self) -> bool {
        self.retention_shape().is_some()
    }

    /// For retention: the score range `[min, max_exclusive)` holding members of the same
    /// segment as this row whose time is before `cutoff_unix_micros`. For a time term alone:
    /// `(-inf, cutoff)`; for `X | T` or `X + T`: `(X, X + cutoff)`, the cutoff in T's unit
    /// (floored, so a member in the cutoff's own second is kept). None when
    /// `!supports_retention()`.
    pub fn retention_range(
        &self,
        values: &[&Value],
        cutoff_unix_micros: i64,
    ) -> Result<Option<(f64, f64)>, ScoreError> {
        let Some(shape) = self.retention_shape() else {
            return Ok(None);
        };
        self.check_arity(values)?;
        match shape {
            RetentionShape::Alone(unit) => {
                let cutoff = i128::from(cutoff_unix_micros).div_euclid(unit.micros_per_unit());
                // Beyond 2^53 the f64 would round; no member can score that high anyway.
                let cutoff = cutoff.clamp(-EXACT_LIMIT, EXACT_LIMIT);
                Ok(Some((f64::NEG_INFINITY, cutoff as f64)))
            }
            RetentionShape::Segmented { op, others, unit } => {
                let mut x: Option<i128> = None;
                for node in others {
                    let v = self.eval_node(node, values)?;
                    x = Some(match x {
                        None => v,
                        Some(acc) => combine(op, acc, v)?,
                    });
                }
                let x = x.unwrap_or(0);
                let cutoff = i128::from(cutoff_unix_micros).div_euclid(unit.micros_per_unit());
                // Clamped to the time term's own range so the window never spills into the
                // neighbouring segment (a cutoff past 2106 just means "the whole segment").
                let cutoff = cutoff.clamp(0, 1 << unit.bits());
                let low = exact(x)?;
                let high = exact(x.checked_add(cutoff).ok_or_else(overflow)?)?;
                Ok(Some((low, high)))
            }
        }
    }

    fn fail(&self, detail: &str) -> String {
        format!("score {:?}: {detail}", self.source)
    }

    fn check_arity(&self, values: &[&Value]) -> Result<(), ScoreError> {
        if values.len() != self.columns.len() {
            return Err(ScoreError::ValueCount {
                expected: self.columns.len(),
                got: values.len(),
            });
        }
        Ok(())
    }

    fn width(&self, node: &Node, types: &[u32]) -> Result<Width, String> {
        Ok(match node {
            Node::Lit(v) => {
                let bits = bit_len(*v);
                Width::leaf(
                    bits,
                    format!("the constant {v} is {bits} bits"),
                    Culprit::Literal,
                )
            }
            Node::Col(i) => {
                let name = &self.columns[*i];
                let t = types[*i];
                let bits = match Type::from_oid(t) {
                    Some(Type::INT2) => 16,
                    Some(Type::INT4) => 32,
                    Some(Type::INT8) => 64,
                    Some(Type::FLOAT4 | Type::FLOAT8) => {
                        return Err(self.fail(&format!(
                            "float column {name} cannot be combined exactly; use it alone as \
                             the score, or use an integer column"
                        )))
                    }
                    Some(Type::NUMERIC) => {
                        return Err(self.fail(&format!(
                            "{name} is numeric, which may hold fractions and any magnitude; wrap \
                             it as bits({name}, N) when it holds integers below 2^N"
                        )))
                    }
                    Some(Type::DATE | Type::TIMESTAMP | Type::TIMESTAMPTZ) => {
                        return Err(self.fail(&format!(
                            "{name} is {}, not a number; use epoch({name}) or epoch_ms({name})",
                            type_name(t)
                        )))
                    }
                    _ => {
                        return Err(self.fail(&format!(
                            "{name} is {}, not a number; use an integer column, a float column \
                             alone or epoch() of a time column, or store integers and wrap it as \
                             bits({name}, N) when it holds integers below 2^N",
                            type_name(t)
                        )))
                    }
                };
                Width::leaf(
                    bits,
                    format!("{name} is {}, {bits} bits", type_name(t)),
                    Culprit::IntColumn {
                        name: name.clone(),
                        bits,
                    },
                )
            }
            Node::Epoch { col, unit } => {
                let name = &self.columns[*col];
                let t = types[*col];
                let function = unit.function();
                if !matches!(
                    Type::from_oid(t),
                    Some(Type::DATE | Type::TIMESTAMP | Type::TIMESTAMPTZ)
                ) {
                    return Err(self.fail(&format!(
                        "{function}({name}) needs a date, timestamp or timestamptz column, and \
                         {name} is {}; {}",
                        type_name(t),
                        if is_integer_type(t) {
                            format!("use {name} directly if it already holds a time number")
                        } else {
                            "use a time column".to_string()
                        }
                    )));
                }
                let bits = unit.bits();
                Width::leaf(
                    bits,
                    format!("{function}({name}) is {bits} bits"),
                    Culprit::Time {
                        name: name.clone(),
                        unit: *unit,
                    },
                )
            }
            Node::Bits { col, n } => {
                let name = &self.columns[*col];
                let t = types[*col];
                if !(is_integer_type(t) || t == Type::NUMERIC.oid()) {
                    return Err(self.fail(&format!(
                        "bits({name}, {n}) needs an integer or numeric column, and {name} is {}{}",
                        type_name(t),
                        if matches!(
                            Type::from_oid(t),
                            Some(Type::DATE | Type::TIMESTAMP | Type::TIMESTAMPTZ)
                        ) {
                            format!("; use epoch({name}) or epoch_ms({name})")
                        } else {
                            String::new()
                        }
                    )));
                }
                Width::leaf(
                    *n,
                    format!("bits({name}, {n}) is {n} bits"),
                    Culprit::Bits {
                        name: name.clone(),
                        n: *n,
                    },
                )
            }
            Node::Shl(inner, k) => {
                let mut w = self.width(inner, types)?;
                w.bits = w.bits.saturating_add(*k);
                w.why.push_str(&format!(", shifted by {k}"));
                w.scaled = true;
                w
            }
            Node::Mul(inner, k) => {
                let mut w = self.width(inner, types)?;
                w.bits = w.bits.saturating_add(bit_len(*k));
                w.why.push_str(&format!(", times {k}"));
                w.scaled = true;
                w
            }
            Node::Or(a, b) => {
                let a = self.width(a, types)?;
                let b = self.width(b, types)?;
                if b.bits > a.bits {
                    b
                } else {
                    a
                }
            }
            Node::Add(a, b) => {
                let a = self.width(a, types)?;
                let b = self.width(b, types)?;
                let mut w = if b.bits > a.bits { b } else { a };
                w.bits = w.bits.saturating_add(1);
                w.why.push_str(", plus a carry bit from +");
                w.carry = true;
                w
            }
        })
    }

    fn eval_node(&self, node: &Node, values: &[&Value]) -> Result<i128, ScoreError> {
        match node {
            Node::Lit(v) => Ok(i128::from(*v)),
            Node::Col(i) => {
                let column = &self.columns[*i];
                match values[*i] {
                    Value::Null => Err(ScoreError::Null {
                        column: column.clone(),
                    }),
                    Value::Int(v) => Ok(i128::from(*v)),
                    // Not accepted by check_types, but exact when integral; the final ±2^53
                    // check still guards the result.
                    Value::Numeric(text) => numeric_integer(column, text),
                    Value::Float(_) => Err(ScoreError::FloatInArithmetic {
                        column: column.clone(),
                    }),
                    other => Err(ScoreError::WrongType {
                        column: column.clone(),
                        found: value_kind(other),
                        expected: "a score takes integer columns",
                    }),
                }
            }
            Node::Bits { col, n } => {
                let column = &self.columns[*col];
                let v = match values[*col] {
                    Value::Null => {
                        return Err(ScoreError::Null {
                            column: column.clone(),
                        })
                    }
                    Value::Int(v) => i128::from(*v),
                    Value::Numeric(text) => numeric_integer(column, text)?,
                    other => {
                        return Err(ScoreError::WrongType {
                            column: column.clone(),
                            found: value_kind(other),
                            expected: "bits() needs an integer or numeric column",
                        })
                    }
                };
                if v < 0 || v >= 1i128 << n {
                    return Err(ScoreError::OutOfRange {
                        column: column.clone(),
                        bits: *n,
                        value: v.to_string(),
                    });
                }
                Ok(v)
            }
            Node::Epoch { col, unit } => {
                let column = &self.columns[*col];
                let micros = unix_micros(column, values[*col])?;
                let v = micros.div_euclid(unit.micros_per_unit());
                if v < 0 || v >= 1i128 << unit.bits() {
                    let (unit_name, range) = match unit {
                        TimeUnit::Seconds => ("s", "1970 to 2106"),
                        TimeUnit::Millis => ("ms", "1970 to 2109"),
                    };
                    return Err(ScoreError::TimeOutOfRange {
                        column: column.clone(),
                        function: unit.function(),
                        value: v,
                        unit: unit_name,
                        bits: unit.bits(),
                        range,
                    });
                }
                Ok(v)
            }
            Node::Shl(inner, k) => {
                let v = self.eval_node(inner, values)?;
                // Multiplying rather than `<<` makes overflow detectable and keeps negative
                // values meaning "times 2^k".
                v.checked_mul(1i128 << k).ok_or_else(overflow)
            }
            Node::Mul(inner, k) => {
                let v = self.eval_node(inner, values)?;
                v.checked_mul(i128::from(*k)).ok_or_else(overflow)
            }
            Node::Or(a, b) => {
                let a = self.eval_node(a, values)?;
                let b = self.eval_node(b, values)?;
                combine(Op::Or, a, b)
            }
            Node::Add(a, b) => {
                let a = self.eval_node(a, values)?;
                let b = self.eval_node(b, values)?;
                combine(Op::Add, a, b)
            }
        }
    }

    fn retention_shape(&self) -> Option<RetentionShape<'_>> {
        if let Some((_, unit)) = time_term(&self.root) {
            return Some(RetentionShape::Alone(unit));
        }
        let op = match self.root {
            Node::Or(..) => Op::Or,
            Node::Add(..) => Op::Add,
            _ => return None,
        };
        // `|` and `+` are associative and commutative, so `T | a | b` is `(a | b) | T`.
        let mut operands = Vec::new();
        flatten(&self.root, op, &mut operands);
        let mut unit = None;
        let mut others = Vec::new();
        for node in operands {
            if let Some((_, u)) = time_term(node) {
                if unit.replace(u).is_some() {
                    return None;
                }
            } else if contains_time(node) {
                return None;
            } else {
                others.push(node);
            }
        }
        let unit = unit?;
        // The range [X, X + cutoff) only holds this segment's members if X never touches the
        // time term's bits: otherwise `|` would merge X into the time, and with `+` the
        // segments of neighbouring X values would overlap and retention would drop recent
        // members of another segment.
        if others
            .iter()
            .any(|node| trailing_zero_bits(node) < unit.bits())
        {
            return None;
        }
        Some(RetentionShape::Segmented { op, others, unit })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Or,
    Add,
}

enum RetentionShape<'a> {
    Alone(TimeUnit),
    Segmented {
        op: Op,
        others: Vec<&'a Node>,
        unit: TimeUnit,
    },
}

fn combine(op: Op, a: i128, b: i128) -> Result<i128, ScoreError> {
    match op {
        // Two's complement `|` keeps both operands' magnitude bound, so negative ids still stay
        // within the statically computed width.
        Op::Or => Ok(a | b),
        Op::Add => a.checked_add(b).ok_or_else(overflow),
    }
}

fn overflow() -> ScoreError {
    ScoreError::TooLarge {
        value: "beyond 2^127".to_string(),
    }
}

fn exact(v: i128) -> Result<f64, ScoreError> {
    if v.unsigned_abs() > EXACT_LIMIT as u128 {
        return Err(ScoreError::TooLarge {
            value: v.to_string(),
        });
    }
    // Exact: |v| <= 2^53.
    Ok(v as f64)
}

fn flatten<'a>(node: &'a Node, op: Op, out: &mut Vec<&'a Node>) {
    match (node, op) {
        (Node::Or(a, b), Op::Or) | (Node::Add(a, b), Op::Add) => {
            flatten(a, op, out);
            flatten(b, op, out);
        }
        _ => out.push(node),
    }
}

fn time_term(node: &Node) -> Option<(usize, TimeUnit)> {
    match node {
        Node::Epoch { col, unit } => Some((*col, *unit)),
        _ => None,
    }
}

fn contains_time(node: &Node) -> bool {
    match node {
        Node::Epoch { .. } => true,
        Node::Lit(_) | Node::Col(_) | Node::Bits { .. } => false,
        Node::Shl(a, _) | Node::Mul(a, _) => contains_time(a),
        Node::Or(a, b) | Node::Add(a, b) => contains_time(a) || contains_time(b),
    }
}

/// How many low bits are zero whatever the row; 128 stands for "always zero".
fn trailing_zero_bits(node: &Node) -> u32 {
    match node {
        Node::Lit(0) => 128,
        Node::Lit(v) => v.trailing_zeros(),
        Node::Col(_) | Node::Epoch { .. } | Node::Bits { .. } => 0,
        Node::Shl(a, k) => trailing_zero_bits(a).saturating_add(*k).min(128),
        Node::Mul(_, 0) => 128,
        Node::Mul(a, k) => trailing_zero_bits(a)
            .saturating_add(k.trailing_zeros())
            .min(128),
        Node::Or(a, b) | Node::Add(a, b) => trailing_zero_bits(a).min(trailing_zero_bits(b)),
    }
}

fn bit_len(v: u64) -> u32 {
    64 - v.leading_zeros()
}

fn is_integer_type(t: u32) -> bool {
    matches!(
        Type::from_oid(t),
        Some(Type::INT2 | Type::INT4 | Type::INT8)
    )
}

fn type_name(t: u32) -> String {
    let name = match Type::from_oid(t) {
        Some(Type::INT2) => "smallint",
        Some(Type::INT4) => "integer",
        Some(Type::INT8) => "bigint",
        Some(Type::FLOAT4) => "real",
        Some(Type::FLOAT8) => "double precision",
        Some(Type::NUMERIC) => "numeric",
        Some(Type::DATE) => "date",
        Some(Type::TIMESTAMP) => "timestamp",
        Some(Type::TIMESTAMPTZ) => "timestamptz",
        Some(Type::TIME) => "time",
        Some(Type::TIMETZ) => "timetz",
        Some(Type::INTERVAL) => "interval",
        Some(Type::BOOL) => "boolean",
        Some(Type::TEXT) => "text",
        Some(Type::VARCHAR) => "varchar",
        Some(Type::BPCHAR) => "char",
        Some(Type::NAME) => "name",
        Some(Type::UUID) => "uuid",
        Some(Type::BYTEA) => "bytea",
        Some(Type::JSON) => "json",
        Some(Type::JSONB) => "jsonb",
        _ => return format!("of type OID {t}"),
    };
    name.to_string()
}

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "NULL",
        Value::Bool(_) => "a boolean",
        Value::Int(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Numeric(_) => "a numeric",
        Value::Text(_) => "text",
        Value::Bytes(_) => "bytes",
        Value::Uuid(_) => "a uuid",
        Value::Date(_) => "a date",
        Value::Time(_) | Value::TimeTz(..) => "a time of day",
        Value::Timestamp(_) | Value::TimestampTz(..) => "a timestamp",
        Value::Interval(_) => "an interval",
        Value::Json(_) => "json",
        Value::Array(_) => "an array",
    }
}

/// The integer a Postgres numeric text denotes, if it is one: `12`, `-3`, `12.00`.
fn numeric_integer(column: &str, text: &str) -> Result<i128, ScoreError> {
    let not_integer = || ScoreError::NotInteger {
        column: column.to_string(),
        value: truncate(text),
    };
    let s = text.trim();
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
    // NaN and ±Infinity fail here too: they are not digits.
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b == b'0')
    {
        return Err(not_integer());
    }
    let mut v: i128 = 0;
    for b in whole.bytes() {
        v = match v
            .checked_mul(10)
            .and_then(|v| v.checked_add(i128::from(b - b'0')))
        {
            Some(v) => v,
            None => {
                return Err(ScoreError::TooLarge {
                    value: truncate(text),
                })
            }
        };
    }
    Ok(if negative { -v } else { v })
}

fn truncate(text: &str) -> String {
    const MAX: usize = 40;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

/// Microseconds since 1970-01-01 00:00:00 UTC of a date or timestamp value.
fn unix_micros(column: &str, value: &Value) -> Result<i128, ScoreError> {
    let infinite = |value: &'static str| ScoreError::InfiniteTime {
        column: column.to_string(),
        value,
    };
    let (ymd, time, offset) = match value {
        Value::Null => {
            return Err(ScoreError::Null {
                column: column.to_string(),
            })
        }
        Value::Date(Date::Ymd(ymd)) => (ymd, None, 0),
        Value::Timestamp(Timestamp::At(ymd, time)) => (ymd, Some(time), 0),
        // The local time minus its offset east of UTC is UTC.
        Value::TimestampTz(Timestamp::At(ymd, time), offset) => (ymd, Some(time), *offset),
        Value::Date(Date::Infinity)
        | Value::Timestamp(Timestamp::Infinity)
        | Value::TimestampTz(Timestamp::Infinity, _) => return Err(infinite("infinity")),
        Value::Date(Date::NegInfinity)
        | Value::Timestamp(Timestamp::NegInfinity)
        | Value::TimestampTz(Timestamp::NegInfinity, _) => return Err(infinite("-infinity")),
        other => {
            return Err(ScoreError::WrongType {
                column: column.to_string(),
                found: value_kind(other),
                expected: "epoch() needs a date, timestamp or timestamptz column",
            })
        }
    };
    if !(1..=12).contains(&ymd.month) || !(1..=31).contains(&ymd.day) {
        return Err(ScoreError::InvalidDate {
            column: column.to_string(),
            year: ymd.year,
            month: ymd.month,
            day: ymd.day,
        });
    }
    let days = i128::from(days_since_epoch(*ymd));
    let Time {
        hour,
        minute,
        second,
        micros,
    } = time.copied().unwrap_or(Time {
        hour: 0,
        minute: 0,
        second: 0,
        micros: 0,
    });
    let seconds = days * 86_400 + i128::from(hour) * 3600 + i128::from(minute) * 60
        - i128::from(offset)
        + i128::from(second);
    Ok(seconds * 1_000_000 + i128::from(micros))
}

/// Days from 1970-01-01 to a proleptic Gregorian date, after Howard Hinnant's
/// `days_from_civil`: counting years from March puts the leap day at the end of the year, so
/// the day within a year is a fixed function of the month, and 400-year eras repeat exactly.
fn days_since_epoch(date: Ymd) -> i64 {
    let month = i64::from(date.month);
    let day = i64::from(date.day);
    // January and February belong to the previous March-based year.
    let year = i64::from(date.year) - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400; // 0..=399
    let month_from_march = (month + 9) % 12; // March = 0, February = 11
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1; // 0..=365
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    // 719468 days separate 0000-03-01 (day 0 of era 0) from 1970-01-01.
    era * 146_097 + day_of_era - 719_468
}

/// A static bound and the story of how it arose, for the error message.
struct Width {
    bits: u32,
    why: String,
    culprit: Culprit,
    scaled: bool,
    carry: bool,
}

enum Culprit {
    Literal,
    IntColumn { name: String, bits: u32 },
    Bits { name: String, n: u32 },
    Time { name: String, unit: TimeUnit },
}

impl Width {
    fn leaf(bits: u32, why: String, culprit: Culprit) -> Width {
        Width {
            bits,
            why,
            culprit,
            scaled: false,
            carry: false,
        }
    }

    /// How to lose `excess` bits, starting from the term that set the width.
    fn fix(&self, excess: u32) -> String {
        let mut fixes = Vec::new();
        match &self.culprit {
            Culprit::Literal => fixes.push("use a smaller constant".to_string()),
            Culprit::IntColumn { name, bits } => match bits.checked_sub(excess) {
                Some(n) if n >= 1 => fixes.push(format!("use a smaller type or bits({name}, {n})")),
                _ => fixes.push("use a smaller type".to_string()),
            },
            Culprit::Bits { name, n } => match n.checked_sub(excess) {
                Some(smaller) if smaller >= 1 => fixes.push(format!("use bits({name}, {smaller})")),
                _ => fixes.push(format!("drop bits({name}, {n})")),
            },
            Culprit::Time { name, unit } => {
                if *unit == TimeUnit::Millis {
                    fixes.push(format!("use epoch({name}) (seconds, 32 bits)"));
                }
            }
        }
        if self.scaled {
            fixes.push("shift by less".to_string());
        }
        if self.carry {
            fixes.push("combine non-overlapping parts with | instead of +".to_string());
        }
        if fixes.is_empty() {
            fixes.push("use fewer or narrower terms".to_string());
        }
        fixes.join(", or ")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Int(u64),
    /// An unquoted identifier: a column, or a function name when `(` follows.
    Word(String),
    Quoted(String),
    LParen,
    RParen,
    Comma,
    Pipe,
    Plus,
    Shl,
    Star,
    End,
}

struct Token {
    tok: Tok,
    start: usize,
    end: usize,
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
    nodes: usize,
    columns: Vec<String>,
}

impl Parser<'_> {
    fn error(&self, at: usize, message: String) -> ScoreParseError {
        ScoreParseError { at, message }
    }

    fn describe(&self, token: &Token) -> String {
        match &token.tok {
            Tok::End => "the end of the expression".to_string(),
            _ => format!("'{}'", &self.src[token.start..token.end]),
        }
    }

    fn expected(&self, found: &Token, what: &str) -> ScoreParseError {
        self.error(
            found.start,
            format!("expected {what}, found {}", self.describe(found)),
        )
    }

    /// Lexes the token at `pos` without consuming it.
    fn peek(&self) -> Result<Token, ScoreParseError> {
        let src = self.src;
        let mut start = self.pos;
        while let Some(c) = src[start..].chars().next() {
            if !c.is_whitespace() {
                break;
            }
            start += c.len_utf8();
        }
        let rest = &src[start..];
        let Some(c) = rest.chars().next() else {
            return Ok(Token {
                tok: Tok::End,
                start,
                end: start,
            });
        };
        let single = |tok| {
            Ok(Token {
                tok,
                start,
                end: start + 1,
            })
        };
        match c {
            '(' => single(Tok::LParen),
            ')' => single(Tok::RParen),
            ',' => single(Tok::Comma),
            '|' => single(Tok::Pipe),
            '+' => single(Tok::Plus),
            '*' => single(Tok::Star),
            '<' if rest.starts_with("<<") => Ok(Token {
                tok: Tok::Shl,
                start,
                end: start + 2,
            }),
            '<' => Err(self.error(start, "expected '<<' (shift), found a single '<'".into())),
            '0'..='9' => self.number(start),
            'A'..='Z' | 'a'..='z' | '_' => {
                let len = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                Ok(Token {
                    tok: Tok::Word(rest[..len].to_string()),
                    start,
                    end: start + len,
                })
            }
            '"' => self.quoted(start),
            other => Err(self.error(
                start,
                format!(
                    "unexpected character {other:?}; expected a number, a column, a function or \
                     '('"
                ),
            )),
        }
    }

    fn number(&self, start: usize) -> Result<Token, ScoreParseError> {
        let rest = &self.src[start..];
        let (digits_at, radix) = if rest.starts_with("0x") || rest.starts_with("0X") {
            (2, 16)
        } else {
            (0, 10)
        };
        let body = &rest[digits_at..];
        let len = body
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        let digits = &body[..len];
        let end = start + digits_at + len;
        let text = &rest[..digits_at + len];
        if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
            return Err(self.error(
                start,
                format!(
                    "malformed integer '{text}'; write decimal digits or 0x followed by hex digits"
                ),
            ));
        }
        match u64::from_str_radix(digits, radix) {
            Ok(v) => Ok(Token {
                tok: Tok::Int(v),
                start,
                end,
            }),
            Err(_) => Err(self.error(
                start,
                format!("integer '{text}' is too large (more than 64 bits)"),
            )),
        }
    }

    fn quoted(&self, start: usize) -> Result<Token, ScoreParseError> {
        let mut name = String::new();
        let mut chars = self.src[start + 1..].char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c != '"' {
                name.push(c);
                continue;
            }
            if chars.peek().map(|(_, c)| *c) == Some('"') {
                chars.next();
                name.push('"');
                continue;
            }
            if name.is_empty() {
                return Err(self.error(start, "empty quoted column name \"\"".into()));
            }
            return Ok(Token {
                tok: Tok::Quoted(name),
                start,
                end: start + 1 + i + 1,
            });
        }
        Err(self.error(
            start,
            "unterminated quoted column name; expected a closing '\"' (write \"\" for a quote \
             inside the name)"
                .into(),
        ))
    }

    fn bump(&mut self, token: &Token) {
        self.pos = token.end;
    }

    fn node(&mut self, at: usize, node: Node) -> Result<Node, ScoreParseError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(self.error(
                at,
                format!("expression too long (more than {MAX_NODES} terms)"),
            ));
        }
        Ok(node)
    }

    fn column(&mut self, name: String) -> usize {
        match self.columns.iter().position(|c| *c == name) {
            Some(i) => i,
            None => {
                self.columns.push(name);
                self.columns.len() - 1
            }
        }
    }

    fn or(&mut self) -> Result<Node, ScoreParseError> {
        let mut left = self.add()?;
        loop {
            let t = self.peek()?;
            if t.tok != Tok::Pipe {
                return Ok(left);
            }
            self.bump(&t);
            let right = self.add()?;
            left = self.node(t.start, Node::Or(Box::new(left), Box::new(right)))?;
        }
    }

    fn add(&mut self) -> Result<Node, ScoreParseError> {
        let mut left = self.shift()?;
        loop {
            let t = self.peek()?;
            if t.tok != Tok::Plus {
                return Ok(left);
            }
            self.bump(&t);
            let right = self.shift()?;
            left = self.node(t.start, Node::Add(Box::new(left), Box::new(right)))?;
        }
    }

    fn shift(&mut self) -> Result<Node, ScoreParseError> {
        let mut left = self.mul()?;
        loop {
            let t = self.peek()?;
            if t.tok != Tok::Shl {
                return Ok(left);
            }
            self.bump(&t);
            let k = self.peek()?;
            let Tok::Int(amount) = k.tok else {
                return Err(self.expected(
                    &k,
                    "an integer literal after '<<' (shift amounts are constants 0..=63)",
                ));
            };
            if amount > 63 {
                return Err(self.error(
                    k.start,
                    format!("shift by {amount} is too large; shift amounts are 0..=63"),
                ));
            }
            self.bump(&k);
            left = self.node(t.start, Node::Shl(Box::new(left), amount as u32))?;
        }
    }

    fn mul(&mut self) -> Result<Node, ScoreParseError> {
        let mut left = self.atom()?;
        loop {
            let t = self.peek()?;
            if t.tok != Tok::Star {
                return Ok(left);
            }
            self.bump(&t);
            let k = self.peek()?;
            let Tok::Int(factor) = k.tok else {
                return Err(self.expected(
                    &k,
                    "an integer literal after '*' (multipliers are non-negative constants)",
                ));
            };
            self.bump(&k);
            left = self.node(t.start, Node::Mul(Box::new(left), factor))?;
        }
    }

    fn atom(&mut self) -> Result<Node, ScoreParseError> {
        let t = self.peek()?;
        match t.tok {
            Tok::Int(v) => {
                self.bump(&t);
                self.node(t.start, Node::Lit(v))
            }
            Tok::Quoted(ref name) => {
                self.bump(&t);
                let col = self.column(name.clone());
                self.node(t.start, Node::Col(col))
            }
            Tok::Word(ref word) => {
                self.bump(&t);
                let after = self.peek()?;
                let is_call = after.tok == Tok::LParen;
                match word.as_str() {
                    "epoch" if is_call => self.call(t.start, after, Call::Epoch(TimeUnit::Seconds)),
                    "epoch_ms" if is_call => {
                        self.call(t.start, after, Call::Epoch(TimeUnit::Millis))
                    }
                    "bits" if is_call => self.call(t.start, after, Call::Bits),
                    _ => {
                        let col = self.column(word.clone());
                        self.node(t.start, Node::Col(col))
                    }
                }
            }
            Tok::LParen => {
                self.depth += 1;
                if self.depth > MAX_NESTING {
                    return Err(self.error(
                        t.start,
                        format!("parentheses nested more than {MAX_NESTING} deep"),
                    ));
                }
                self.bump(&t);
                let inner = self.or()?;
                let close = self.peek()?;
                if close.tok != Tok::RParen {
                    return Err(self.expected(
                        &close,
                        &format!(
                            "')' to close the '(' at {}, or an operator ('|', '+', '<<', '*')",
                            t.start
                        ),
                    ));
                }
                self.bump(&close);
                self.depth -= 1;
                Ok(inner)
            }
            _ => Err(self.expected(
                &t,
                "a number, a column, epoch(column), epoch_ms(column), bits(column, N) or '('",
            )),
        }
    }

    /// `name(` has been seen (`open` is the `(`); parses the arguments and `)`.
    fn call(&mut self, start: usize, open: Token, call: Call) -> Result<Node, ScoreParseError> {
        self.bump(&open);
        let name = self.src[start..open.start].trim_end().to_string();
        let arg = self.peek()?;
        let column = match arg.tok {
            Tok::Word(ref c) | Tok::Quoted(ref c) => c.clone(),
            _ => {
                return Err(self.expected(&arg, &format!("a column name inside {name}(")));
            }
        };
        self.bump(&arg);
        let column_name = column.clone();
        let col = self.column(column);
        let node = match call {
            Call::Epoch(unit) => Node::Epoch { col, unit },
            Call::Bits => {
                let comma = self.peek()?;
                if comma.tok != Tok::Comma {
                    return Err(self.expected(
                        &comma,
                        &format!("',' and a bit count after {}", self.so_far(start)),
                    ));
                }
                self.bump(&comma);
                let count = self.peek()?;
                let Tok::Int(n) = count.tok else {
                    return Err(self.expected(
                        &count,
                        &format!("the bit count (1..=53) of bits({column_name}, N)"),
                    ));
                };
                if !(1..=u64::from(EXACT_BITS)).contains(&n) {
                    return Err(self.error(
                        count.start,
                        format!(
                            "bit count {n} in {name}(...) is out of range; it must be 1..=53, \
                             the bits a Redis score holds exactly"
                        ),
                    ));
                }
                self.bump(&count);
                Node::Bits { col, n: n as u32 }
            }
        };
        let close = self.peek()?;
        if close.tok != Tok::RParen {
            return Err(self.error(
                close.start,
                format!(
                    "expected ')' after {}, found {}",
                    self.so_far(start),
                    self.describe(&close)
                ),
            ));
        }
        self.bump(&close);
        self.node(start, node)
    }

    /// The source from `start` to the last consumed token, to quote in an error.
    fn so_far(&self, start: usize) -> &str {
        self.src[start..self.pos].trim_end()
    }
}

#[derive(Clone, Copy)]
enum Call {
    Epoch(TimeUnit),
    Bits,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ymd(year: i32, month: u8, day: u8) -> Ymd {
        Ymd { year, month, day }
    }

    fn ts(year: i32, month: u8, day: u8, hour: u8, minute: u8, second: u8, micros: u32) -> Value {
        Value::Timestamp(Timestamp::At(
            ymd(year, month, day),
            Time {
                hour,
                minute,
                second,
                micros,
            },
        ))
    }

    fn types<'a>(pairs: &'a [(&'a str, u32)]) -> impl Fn(&str) -> Option<u32> + 'a {
        move |name| pairs.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }

    fn parse(s: &str) -> ScoreExpr {
        ScoreExpr::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn eval(s: &str, values: &[Value]) -> Result<f64, ScoreError> {
        let refs: Vec<&Value> = values.iter().collect();
        parse(s).eval(&refs)
    }

    const COMPOSITE: &str = "(device_id << 32) | epoch(ts)";

    #[test]
    fn smallint_device_and_epoch_pass_and_evaluate_exactly() {
        let e = parse(COMPOSITE);
        assert_eq!(e.source(), COMPOSITE);
        assert_eq!(e.columns(), ["device_id", "ts"]);
        let t = [
            ("device_id", Type::INT2.oid()),
            ("ts", Type::TIMESTAMP.oid()),
        ];
        assert_eq!(e.check_types(&types(&t)), Ok(()));
        let v = [Value::Int(7), ts(2024, 1, 2, 3, 4, 5, 0)];
        let refs: Vec<&Value> = v.iter().collect();
        assert_eq!(
            e.eval(&refs).unwrap(),
            ((7u64 << 32) | 1_704_164_645) as f64
        );
    }

    #[test]
    fn integer_device_is_too_wide_and_bits_fixes_it() {
        let t = [
            ("device_id", Type::INT4.oid()),
            ("ts", Type::TIMESTAMPTZ.oid()),
        ];
        let err = parse(COMPOSITE).check_types(&types(&t)).unwrap_err();
        assert_eq!(
            err,
            "score \"(device_id << 32) | epoch(ts)\" can reach 2^64 (device_id is integer, 32 \
             bits, shifted by 32), beyond the 2^53 a Redis score (a 64-bit float) holds exactly; \
             use a smaller type or bits(device_id, 21), or shift by less"
        );

        let fixed = parse("(bits(device_id, 20) << 32) | epoch(ts)");
        assert_eq!(fixed.check_types(&types(&t)), Ok(()));
        let when = Value::TimestampTz(
            Timestamp::At(
                ymd(2024, 1, 2),
                Time {
                    hour: 3,
                    minute: 4,
                    second: 5,
                    micros: 0,
                },
            ),
            0,
        );
        let max = Value::Int((1 << 20) - 1);
        assert_eq!(
            fixed.eval(&[&max, &when]).unwrap(),
            ((((1u64 << 20) - 1) << 32) | 1_704_164_645) as f64
        );
        let over = Value::Int(1 << 20);
        let err = fixed.eval(&[&over, &when]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bits(device_id, 20): device_id = 1048576 is outside [0, 2^20)"
        );
        let negative = Value::Int(-1);
        assert!(matches!(
            fixed.eval(&[&negative, &when]),
            Err(ScoreError::OutOfRange { .. })
        ));
    }

    #[test]
    fn bare_columns_by_type() {
        let check = |s: &str, t: u32| parse(s).check_types(&types(&[("c", t)]));
        assert_eq!(check("c", Type::INT2.oid()), Ok(()));
        assert_eq!(check("c", Type::INT4.oid()), Ok(()));
        let err = check("c", Type::INT8.oid()).unwrap_err();
        assert!(err.contains("2^64") && err.contains("bits(c, 53)"), "{err}");
        assert_eq!(check("c", Type::FLOAT8.oid()), Ok(()));
        assert_eq!(check("(c)", Type::FLOAT4.oid()), Ok(()));
        let err = check("c + 1", Type::FLOAT8.oid()).unwrap_err();
        assert!(
            err.contains("float column c cannot be combined exactly"),
            "{err}"
        );
        let err = check("c << 1", Type::FLOAT4.oid()).unwrap_err();
        assert!(err.contains("float column c"), "{err}");
        let err = check("c", Type::NUMERIC.oid()).unwrap_err();
        assert!(
            err.contains("wrap it as bits(c, N) when it holds integers below 2^N"),
            "{err}"
        );
        let err = check("c", Type::TEXT.oid()).unwrap_err();
        assert!(
            err.contains("c is text") && err.contains("bits(c, N)"),
            "{err}"
        );
        let err = check("c", Type::TIMESTAMP.oid()).unwrap_err();
        assert!(err.contains("epoch(c)"), "{err}");
        let err = check("epoch(c)", Type::INT8.oid()).unwrap_err();
        assert!(
            err.contains("needs a date, timestamp or timestamptz"),
            "{err}"
        );
        let err = check("bits(c, 8)", Type::TEXT.oid()).unwrap_err();
        assert!(err.contains("needs an integer or numeric column"), "{err}");
        let err = parse("a | b")
            .check_types(&types(&[("a", Type::INT2.oid())]))
            .unwrap_err();
        assert_eq!(err, "score \"a | b\": table has no column b");
    }

    #[test]
    fn float_alone_evaluates_as_is() {
        assert_eq!(eval("c", &[Value::Float(1.5)]).unwrap(), 1.5);
        assert_eq!(
            eval("c", &[Value::Float(f64::INFINITY)]).unwrap(),
            f64::INFINITY
        );
        assert!(matches!(
            eval("c", &[Value::Float(f64::NAN)]),
            Err(ScoreError::NaN { .. })
        ));
        assert!(matches!(
            eval("c + 1", &[Value::Float(1.0)]),
            Err(ScoreError::FloatInArithmetic { .. })
        ));
        assert!(matches!(
            eval("c", &[Value::Null]),
            Err(ScoreError::Null { .. })
        ));
    }

    #[test]
    fn bits_of_numeric() {
        let e = parse("bits(amount, 40)");
        assert_eq!(
            e.check_types(&types(&[("amount", Type::NUMERIC.oid())])),
            Ok(())
        );
        let num = |s: &str| Value::Numeric(s.to_string());
        assert_eq!(e.eval(&[&num("12.00")]).unwrap(), 12.0);
        assert_eq!(e.eval(&[&num("12")]).unwrap(), 12.0);
        assert_eq!(e.eval(&[&num("0")]).unwrap(), 0.0);
        let err = e.eval(&[&num("12.5")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "column amount holds 12.5, not an integer; a score must be exact"
        );
        for bad in ["NaN", "Infinity", "-Infinity", "", ".5", "1e3"] {
            assert!(
                matches!(e.eval(&[&num(bad)]), Err(ScoreError::NotInteger { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            e.eval(&[&num("-1")]),
            Err(ScoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            e.eval(&[&num("1099511627776")]),
            Err(ScoreError::OutOfRange { bits: 40, .. })
        ));
        assert!(matches!(
            e.eval(&[&num(&"9".repeat(60))]),
            Err(ScoreError::TooLarge { .. })
        ));
        assert_eq!(
            e.eval(&[&num("1099511627775.000")]).unwrap(),
            1099511627775.0
        );
    }

    #[test]
    fn epoch_conversions() {
        let at = |h: u8, m: u8, s: u8, us: u32| Time {
            hour: h,
            minute: m,
            second: s,
            micros: us,
        };
        // 05:30 east of UTC: 2024-01-02 08:34:05+05:30 is 03:04:05 UTC.
        let tz = Value::TimestampTz(Timestamp::At(ymd(2024, 1, 2), at(8, 34, 5, 0)), 19_800);
        assert_eq!(eval("epoch(t)", &[tz]).unwrap(), 1_704_164_645.0);
        // West of UTC the local date can be the day before.
        let tz = Value::TimestampTz(Timestamp::At(ymd(2024, 1, 1), at(22, 4, 5, 0)), -18_000);
        assert_eq!(eval("epoch(t)", &[tz]).unwrap(), 1_704_164_645.0);
        assert_eq!(
            eval("epoch(d)", &[Value::Date(Date::Ymd(ymd(2024, 2, 29)))]).unwrap(),
            1_709_164_800.0
        );
        assert_eq!(
            eval("epoch(d)", &[Value::Date(Date::Ymd(ymd(1970, 1, 1)))]).unwrap(),
            0.0
        );
        assert_eq!(
            eval("epoch(t)", &[ts(2024, 1, 2, 3, 4, 5, 999_999)]).unwrap(),
            1_704_164_645.0
        );
        assert_eq!(
            eval("epoch_ms(t)", &[ts(2024, 1, 2, 3, 4, 5, 678_999)]).unwrap(),
            1_704_164_645_678.0
        );
        assert_eq!(
            eval("epoch(t)", &[ts(2106, 2, 7, 6, 28, 15, 0)]).unwrap(),
            4_294_967_295.0
        );
        let err = eval("epoch(t)", &[ts(2106, 2, 7, 6, 28, 16, 0)]).unwrap_err();
        assert!(matches!(err, ScoreError::TimeOutOfRange { .. }), "{err}");
        let err = eval("epoch(t)", &[ts(1969, 12, 31, 23, 59, 59, 999_999)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "epoch(t): t is -1 s from 1970-01-01 00:00:00 UTC, outside [0, 2^32) (1970 to 2106)"
        );
        assert!(eval("epoch_ms(t)", &[ts(1969, 12, 31, 23, 59, 59, 999_999)]).is_err());
        assert!(eval("epoch(t)", &[ts(-43, 3, 15, 0, 0, 0, 0)]).is_err());
        assert!(matches!(
            eval("epoch(t)", &[Value::Timestamp(Timestamp::Infinity)]),
            Err(ScoreError::InfiniteTime { .. })
        ));
        assert!(matches!(
            eval("epoch(t)", &[Value::Date(Date::NegInfinity)]),
            Err(ScoreError::InfiniteTime { .. })
        ));
        assert!(matches!(
            eval("epoch(t)", &[Value::Int(5)]),
            Err(ScoreError::WrongType { .. })
        ));
        let types_ok = |t: u32| parse("epoch_ms(t)").check_types(&types(&[("t", t)]));
        assert_eq!(types_ok(Type::DATE.oid()), Ok(()));
        assert_eq!(types_ok(Type::TIMESTAMP.oid()), Ok(()));
        assert_eq!(types_ok(Type::TIMESTAMPTZ.oid()), Ok(()));
        // 42 bits of milliseconds leave 11 for a prefix.
        let t = [("d", Type::INT2.oid()), ("t", Type::TIMESTAMP.oid())];
        let err = parse("(d << 42) | epoch_ms(t)")
            .check_types(&types(&t))
            .unwrap_err();
        assert!(err.contains("2^58") && err.contains("bits(d, 11)"), "{err}");
        assert_eq!(
            parse("(bits(d, 11) << 42) | epoch_ms(t)").check_types(&types(&t)),
            Ok(())
        );
    }

    #[test]
    fn days_match_known_dates() {
        for (date, days) in [
            (ymd(1970, 1, 1), 0),
            (ymd(1969, 12, 31), -1),
            (ymd(2000, 3, 1), 11_017),
            (ymd(2000, 2, 29), 11_016),
            (ymd(1900, 3, 1), -25_508),
            (ymd(0, 3, 1), -719_468),
            (ymd(2024, 1, 1), 19_723),
        ] {
            assert_eq!(days_since_epoch(date), days, "{date:?}");
        }
    }

    #[test]
    fn widths_of_operators() {
        let t = [("a", Type::INT2.oid()), ("b", Type::INT4.oid())];
        let check = |s: &str| parse(s).check_types(&types(&t));
        assert_eq!(check("(b << 21) | a"), Ok(()));
        assert!(check("(b << 22) | a").is_err());
        assert_eq!(check("b * 0x1FFFFF"), Ok(()));
        assert!(check("b * 0x200000").is_err());
        assert_eq!(check("bits(b, 52) + bits(a, 52)"), Ok(()));
        let err = check("bits(b, 53) + a").unwrap_err();
        assert!(err.contains("2^54") && err.contains("carry"), "{err}");
        assert_eq!(check("0x1FFFFFFFFFFFFF"), Ok(()));
        assert!(check("0x20000000000000").is_err());
        assert_eq!(
            eval("a * 1000 + 5", &[Value::Int(3)]).unwrap(),
            3005.0,
            "precedence: * binds tighter than +"
        );
        assert_eq!(eval("1 + 2 << 3", &[]).unwrap(), 17.0);
        assert_eq!(eval("1 | 2 + 4", &[]).unwrap(), 7.0);
        assert_eq!(eval("(1 | 2) << 1", &[]).unwrap(), 6.0);
    }

    #[test]
    fn eval_guards_unchecked_expressions() {
        assert!(matches!(
            eval("a << 60", &[Value::Int(1)]),
            Err(ScoreError::TooLarge { .. })
        ));
        assert!(matches!(
            eval("a << 63 << 63 << 63", &[Value::Int(i64::MAX)]),
            Err(ScoreError::TooLarge { .. })
        ));
        assert_eq!(
            eval("a << 53", &[Value::Int(-1)]).unwrap(),
            -(2f64.powi(53))
        );
        assert!(matches!(
            eval("a", &[Value::Text("x".into())]),
            Err(ScoreError::WrongType { .. })
        ));
        assert!(matches!(
            parse("a | b").eval(&[&Value::Int(1)]),
            Err(ScoreError::ValueCount {
                expected: 2,
                got: 1
            })
        ));
    }

    #[test]
    fn columns_are_distinct_in_order_and_quoted_names_work() {
        let e = parse(r#"("Weird ""Col""" << 1) + epoch(t) + bits(x, 3) + "Weird ""Col""""#);
        assert_eq!(e.columns(), ["Weird \"Col\"", "t", "x"]);
        let e = parse("epoch + bits + epoch_ms");
        assert_eq!(e.columns(), ["epoch", "bits", "epoch_ms"]);
        let e = parse(" epoch ( \"ts\" ) ");
        assert_eq!(e.columns(), ["ts"]);
        assert!(e.supports_retention());
    }

    #[test]
    fn retention() {
        let cutoff = 1_704_164_645_678_900; // 2024-01-02T03:04:05.6789Z
        let e = parse("epoch(ts)");
        assert!(e.supports_retention());
        let v = ts(2024, 1, 1, 0, 0, 0, 0);
        assert_eq!(
            e.retention_range(&[&v], cutoff).unwrap(),
            Some((f64::NEG_INFINITY, 1_704_164_645.0))
        );
        assert_eq!(
            parse("epoch_ms(ts)")
                .retention_range(&[&v], cutoff)
                .unwrap(),
            Some((f64::NEG_INFINITY, 1_704_164_645_678.0))
        );
        assert_eq!(
            e.retention_range(&[&v], -1).unwrap(),
            Some((f64::NEG_INFINITY, -1.0)),
            "floor, not truncation"
        );

        let e = parse(COMPOSITE);
        assert!(e.supports_retention());
        let device = Value::Int(7);
        let x = (7u64 << 32) as f64;
        assert_eq!(
            e.retention_range(&[&device, &v], cutoff).unwrap(),
            Some((x, x + 1_704_164_645.0))
        );
        // The row's own time does not matter, and may even be NULL.
        assert_eq!(
            e.retention_range(&[&device, &Value::Null], cutoff).unwrap(),
            Some((x, x + 1_704_164_645.0))
        );
        // A cutoff beyond the time term's range still stays inside this segment.
        assert_eq!(
            e.retention_range(&[&device, &v], i64::MAX).unwrap(),
            Some((x, x + 4_294_967_296.0))
        );
        assert_eq!(e.retention_range(&[&device, &v], -5).unwrap(), Some((x, x)));
        assert!(matches!(
            e.retention_range(&[&Value::Null, &v], cutoff),
            Err(ScoreError::Null { .. })
        ));

        for s in [
            "epoch(ts) + (device_id << 32)",
            "epoch(ts) | (d << 40) | (e << 32)",
            "(d << 40) + epoch(ts) + e * 0x100000000",
            "epoch_ms(ts) | (bits(d, 11) << 42)",
        ] {
            assert!(parse(s).supports_retention(), "{s}");
        }
        let e = parse("epoch(ts) | (d << 40) | (e << 32)");
        let (d, ee) = (Value::Int(1), Value::Int(2));
        let x = ((1u64 << 40) | (2 << 32)) as f64;
        assert_eq!(
            e.retention_range(&[&v, &d, &ee], 1_000_000).unwrap(),
            Some((x, x + 1.0))
        );

        for s in [
            "id",
            "epoch(a) + epoch(b)",
            "(epoch(a) << 32) | b",
            "epoch(a) | b",
            "(d << 31) | epoch(a)",
            "(d << 32) + epoch(a) | e",
            "(d << 32) * 3",
            "epoch(a) * 2",
        ] {
            let e = parse(s);
            assert!(!e.supports_retention(), "{s}");
            let values: Vec<Value> = e.columns().iter().map(|_| Value::Int(1)).collect();
            let refs: Vec<&Value> = values.iter().collect();
            assert_eq!(e.retention_range(&refs, 0).unwrap(), None, "{s}");
        }
    }

    #[test]
    fn parse_errors_name_offset_and_expectation() {
        let err = |s: &str| ScoreExpr::parse(s).unwrap_err().to_string();
        assert_eq!(
            err("(device_id << 32) | epoch(ts"),
            "at 28: expected ')' after epoch(ts, found the end of the expression"
        );
        assert_eq!(
            err("epoch(ts x"),
            "at 9: expected ')' after epoch(ts, found 'x'"
        );
        assert_eq!(
            err("a |"),
            "at 3: expected a number, a column, epoch(column), epoch_ms(column), \
             bits(column, N) or '(', found the end of the expression"
        );
        assert_eq!(
            err("a << b"),
            "at 5: expected an integer literal after '<<' (shift amounts are constants 0..=63), \
             found 'b'"
        );
        assert_eq!(
            err("a << 64"),
            "at 5: shift by 64 is too large; shift amounts are 0..=63"
        );
        assert_eq!(
            err("a * b"),
            "at 4: expected an integer literal after '*' (multipliers are non-negative \
             constants), found 'b'"
        );
        assert_eq!(
            err("bits(x, 54)"),
            "at 8: bit count 54 in bits(...) is out of range; it must be 1..=53, the bits a \
             Redis score holds exactly"
        );
        assert!(err("bits(x, 0)").starts_with("at 8: bit count 0"));
        assert_eq!(
            err("bits(x)"),
            "at 6: expected ',' and a bit count after bits(x, found ')'"
        );
        assert_eq!(
            err("bits(x, y)"),
            "at 8: expected the bit count (1..=53) of bits(x, N), found 'y'"
        );
        assert_eq!(
            err("epoch(1)"),
            "at 6: expected a column name inside epoch(, found '1'"
        );
        assert_eq!(
            err("(a | b"),
            "at 6: expected ')' to close the '(' at 0, or an operator ('|', '+', '<<', '*'), \
             found the end of the expression"
        );
        assert_eq!(
            err("a b"),
            "at 2: expected '|', '+', '<<', '*' or the end of the expression, found 'b'"
        );
        assert_eq!(
            err("a < 3"),
            "at 2: expected '<<' (shift), found a single '<'"
        );
        assert!(err("a - 3").starts_with("at 2: unexpected character '-'"));
        assert!(err("12ab").starts_with("at 0: malformed integer '12ab'"));
        assert!(err("0x").starts_with("at 0: malformed integer '0x'"));
        assert!(err("0xfg").starts_with("at 0: malformed integer"));
        assert!(err("99999999999999999999").contains("too large"));
        assert!(err("a | \"b").starts_with("at 4: unterminated quoted column name"));
        assert!(err("\"\"").starts_with("at 0: empty quoted column name"));
        assert!(err("").starts_with("at 0: expected a number"));
        assert!(err("   ").starts_with("at 3: expected a number"));
        assert!(err(")").starts_with("at 0: expected a number"));
        assert!(err("a | é").starts_with("at 4: unexpected character 'é'"));
        assert_eq!(parse("0xFF + 0X10 + 007").columns().len(), 0);
        assert_eq!(eval("0xFF + 0X10 + 007", &[]).unwrap(), 278.0);
    }

    #[test]
    fn limits_reject_instead_of_overflowing_the_stack() {
        let deep = format!("{}a{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(ScoreExpr::parse(&deep)
            .unwrap_err()
            .message
            .contains("nested"));
        let long = vec!["a"; 10_000].join(" | ");
        assert!(ScoreExpr::parse(&long)
            .unwrap_err()
            .message
            .contains("too long"));
        let shifts = format!("a{}", " << 1".repeat(10_000));
        assert!(ScoreExpr::parse(&shifts).is_err());
    }

    /// Parses, and when that succeeds exercises everything else, on inputs that must never
    /// panic.
    fn exercise(s: &str) {
        let Ok(e) = ScoreExpr::parse(s) else {
            return;
        };
        for t in [
            Type::INT2.oid(),
            Type::INT8.oid(),
            Type::FLOAT8.oid(),
            Type::NUMERIC.oid(),
            Type::TIMESTAMPTZ.oid(),
            Type::TEXT.oid(),
        ] {
            let _ = e.check_types(&|_| Some(t));
        }
        let _ = e.check_types(&|_| None);
        for v in [
            Value::Int(7),
            Value::Int(i64::MIN),
            Value::Float(f64::NAN),
            Value::Numeric("12.5".into()),
            ts(2024, 1, 2, 3, 4, 5, 6),
            Value::Null,
        ] {
            let values: Vec<&Value> = e.columns().iter().map(|_| &v).collect();
            let _ = e.eval(&values);
            let _ = e.retention_range(&values, i64::MIN);
            let _ = e.retention_range(&values, i64::MAX);
        }
        let _ = e.eval(&[]);
        let _ = e.supports_retention();
    }

    #[test]
    fn never_panics_on_truncations_and_garbage() {
        let samples = [
            COMPOSITE,
            "(bits(device_id, 20) << 32) | epoch_ms(\"Weird \"\"Col\"\"\") + 0x1F * 3",
            "epoch( ts ) + ( a << 63 ) * 18446744073709551615",
            "bits(é, 53) | \"ü\"",
        ];
        for s in samples {
            for (i, _) in s.char_indices().chain([(s.len(), ' ')]) {
                exercise(&s[..i]);
                exercise(&s[i..]);
                // Drop one character.
                let next = s[i..].chars().next().map_or(0, char::len_utf8);
                exercise(&format!("{}{}", &s[..i], &s[i + next..]));
            }
        }
        let alphabet: Vec<char> = "ab_09x(),|+<*\" \tepochms_bitsé\u{0}".chars().collect();
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let len = (seed >> 59) as usize;
            let mut s = String::new();
            let mut r = seed;
            for _ in 0..len {
                r = r.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                s.push(alphabet[(r >> 33) as usize % alphabet.len()]);
            }
            exercise(&s);
        }
    }
}
