//! Typed column values: the one conversion from the text pgoutput sends (each type's output
//! function, under the replication session's settings) to values with a type, and the two
//! renderings built on it: JSON ([`Value::to_json`], used by `walsweep tail` and JSON mirrors)
//! and Python's `str()` ([`python_str`], the form matroska-cache dependency and scope strings
//! use).
//!
//! Pure: no I/O. Which type an OID is comes from built-in tables for the common types and, for
//! everything else (enums, domains, arrays of those), from a [`TypeRegistry`] that the caller
//! fills, e.g. from `pg_type` (see `tail`). A type neither knows is read as text.
//!
//! The text forms expected are those of a session with `DateStyle=ISO`, `IntervalStyle=postgres`,
//! `extra_float_digits=3` and `bytea_output=hex` (escape-format bytea is read too). Anything
//! that does not parse as its type is an error naming the type and the (truncated) text, never a
//! guess and never a panic.
//!
//! # JSON forms
//!
//! [`Value::to_json`] gives exactly what Postgres' own `to_json()` gives for the same value in a
//! `TimeZone=UTC` session (the oracle test in `tests/tail.rs` checks this against the server),
//! except for `numeric`:
//!
//! | type | JSON |
//! |---|---|
//! | NULL | `null` |
//! | bool | `true` / `false` |
//! | int2, int4, int8 | number (int8 beyond 2^53 is exact in the text, not in JavaScript) |
//! | float4, float8 | number (shortest round-trip digits); NaN and ±Infinity as the strings `"NaN"`, `"Infinity"`, `"-Infinity"` |
//! | numeric | **string** with Postgres' exact digits and scale (`"1.50"`, `"NaN"`, `"Infinity"`): a JSON number would lose precision in most parsers. This is the one deviation from `to_json()`, which prints a number |
//! | text, varchar, char, name, enums, unknown types | string |
//! | bytea | `"\\x00ff"` (hex, as Postgres prints it) |
//! | uuid | `"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"` |
//! | date | `"2020-01-02"`, `"0044-03-15 BC"`, `"infinity"`, `"-infinity"` |
//! | time, timetz | `"03:04:05.5"`, `"03:04:05+05:30"` |
//! | timestamp | `"2020-01-02T03:04:05.5"` (ISO 8601; ` BC` suffix before year 1) |
//! | timestamptz | `"2020-01-02T03:04:05.5+00:00"` (offset of the session time zone: walsweep's replication session runs in UTC) |
//! | interval | Postgres' `postgres`-style text, `"1 year 2 mons -3 days +04:05:06.7"` |
//! | json, jsonb | the JSON value itself (object keys come out sorted; numbers beyond f64 precision are rounded; numbers beyond f64 range and nesting deeper than 128 levels are an error) |
//! | arrays | JSON arrays, nested for more dimensions, `null` elements; lower bounds (`[0:1]=`) are dropped |
//!
//! Domains take their base type's form.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;

use postgres_types::Type;

/// A column value with its type.
#[derive(Debug, Clone)]
pub enum Value {
    Null,
    Bool(bool),
    /// int2, int4, int8.
    Int(i64),
    /// float4 and float8. float4 is read from its (shortest) text, so `1.1::float4` is `1.1`,
    /// not the f32's exact binary value.
    Float(f64),
    /// numeric, as Postgres prints it (exact digits and scale, or `NaN`, `Infinity`,
    /// `-Infinity`); never through a float.
    Numeric(String),
    /// text, varchar, char, name, enums and every type not otherwise known.
    Text(String),
    Bytes(Vec<u8>),
    Uuid([u8; 16]),
    Date(Date),
    Time(Time),
    /// timetz: the time and its offset in seconds east of UTC.
    TimeTz(Time, i32),
    Timestamp(Timestamp),
    /// timestamptz: the local date and time in the session's time zone, and that zone's offset
    /// in seconds east of UTC at that instant (0 in walsweep's UTC replication session).
    TimestampTz(Timestamp, i32),
    Interval(Interval),
    /// json and jsonb.
    Json(serde_json::Value),
    /// One- or more-dimensional arrays: the elements of the first dimension, each an `Array`
    /// again for more dimensions.
    Array(Vec<Value>),
}

/// A calendar date. `year` is astronomical: 1 BC is year 0, 44 BC is -43.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ymd {
    pub year: i32,
    pub month: u8,
    pub day: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Date {
    Ymd(Ymd),
    Infinity,
    NegInfinity,
}

/// A time of day; `24:00:00` is valid (Postgres allows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Time {
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub micros: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timestamp {
    At(Ymd, Time),
    Infinity,
    NegInfinity,
}

/// Postgres' own interval representation: months, days and microseconds, each with its own
/// sign. Infinite intervals (Postgres 17+) are all three fields at their maximum (`infinity`)
/// or minimum (`-infinity`), as Postgres stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interval {
    pub months: i32,
    pub days: i32,
    pub micros: i64,
}

impl Interval {
    pub const INFINITY: Interval = Interval {
        months: i32::MAX,
        days: i32::MAX,
        micros: i64::MAX,
    };
    pub const NEG_INFINITY: Interval = Interval {
        months: i32::MIN,
        days: i32::MIN,
        micros: i64::MIN,
    };
}

/// Floats compare NaN equal to NaN, so decoded rows can be compared in tests.
impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        use Value::*;
        match (self, other) {
            (Null, Null) => true,
            (Bool(a), Bool(b)) => a == b,
            (Int(a), Int(b)) => a == b,
            (Float(a), Float(b)) => a == b || (a.is_nan() && b.is_nan()),
            (Numeric(a), Numeric(b)) | (Text(a), Text(b)) => a == b,
            (Bytes(a), Bytes(b)) => a == b,
            (Uuid(a), Uuid(b)) => a == b,
            (Date(a), Date(b)) => a == b,
            (Time(a), Time(b)) => a == b,
            (TimeTz(a, x), TimeTz(b, y)) => a == b && x == y,
            (Timestamp(a), Timestamp(b)) => a == b,
            (TimestampTz(a, x), TimestampTz(b, y)) => a == b && x == y,
            (Interval(a), Interval(b)) => a == b,
            (Json(a), Json(b)) => a == b,
            (Array(a), Array(b)) => a == b,
            _ => false,
        }
    }
}

/// A value's text did not parse as its type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {type_name} value {text}: {reason}")]
pub struct ValueError {
    /// `int4`, `timestamptz`, `public.mood`, `type oid 16384`, ...
    pub type_name: String,
    /// The offending text, quoted and truncated to a readable length.
    pub text: String,
    pub reason: String,
}

/// Longest piece of offending text an error repeats.
const ERROR_TEXT_MAX_CHARS: usize = 64;

fn quote_for_error(text: &[u8]) -> String {
    let lossy = String::from_utf8_lossy(text);
    let mut chars = lossy.chars();
    let head: String = chars.by_ref().take(ERROR_TEXT_MAX_CHARS).collect();
    if chars.next().is_some() {
        format!("{head:?}... ({} bytes)", text.len())
    } else {
        format!("{head:?}")
    }
}

/// What walsweep knows about a type beyond the built-in ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// `schema.name`, for messages.
    pub name: String,
    pub kind: TypeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeKind {
    /// Read as text.
    Enum,
    /// Read as its base type (which may be a domain again, or an array).
    Domain { base: u32 },
    /// An array of `element`, whose elements are separated by `delimiter` (`,` for every type
    /// except `box`).
    Array { element: u32, delimiter: u8 },
    /// Anything else (composite, range, ...): read as text.
    Other,
}

/// Types that are not built in, by OID. Fill it before decoding values of such types; a type it
/// does not know is read as text (which is wrong only for domains over non-text types and for
/// arrays of non-built-in types).
#[derive(Debug, Clone, Default)]
pub struct TypeRegistry {
    types: HashMap<u32, TypeInfo>,
}

/// How deep domains over domains (over arrays of domains...) may nest before it is an error.
const MAX_TYPE_DEPTH: usize = 16;

/// The scalar types with a typed reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar {
    Bool,
    Int2,
    Int4,
    Int8,
    Float,
    Numeric,
    Text,
    Bytea,
    Uuid,
    Date,
    Time,
    TimeTz,
    Timestamp,
    TimestampTz,
    Interval,
    Json,
}

enum Shape {
    Scalar(Scalar),
    Array { element: u32, delimiter: u8 },
}

fn builtin_scalar(type_oid: u32) -> Option<Scalar> {
    Some(match Type::from_oid(type_oid)? {
        Type::BOOL => Scalar::Bool,
        Type::INT2 => Scalar::Int2,
        Type::INT4 => Scalar::Int4,
        Type::INT8 => Scalar::Int8,
        Type::FLOAT4 | Type::FLOAT8 => Scalar::Float,
        Type::NUMERIC => Scalar::Numeric,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::CHAR | Type::NAME => Scalar::Text,
        Type::BYTEA => Scalar::Bytea,
        Type::UUID => Scalar::Uuid,
        Type::DATE => Scalar::Date,
        Type::TIME => Scalar::Time,
        Type::TIMETZ => Scalar::TimeTz,
        Type::TIMESTAMP => Scalar::Timestamp,
        Type::TIMESTAMPTZ => Scalar::TimestampTz,
        Type::INTERVAL => Scalar::Interval,
        Type::JSON | Type::JSONB => Scalar::Json,
        _ => return None,
    })
}

/// The element type of a built-in array type this module reads.
pub fn builtin_array_element(type_oid: u32) -> Option<u32> {
    // Listed rather than taken from `Type::kind()`, which also calls int2vector an array of
    // int2 although its text form has no braces.
    let element = match Type::from_oid(type_oid)? {
        Type::BOOL_ARRAY => Type::BOOL,
        Type::BYTEA_ARRAY => Type::BYTEA,
        Type::CHAR_ARRAY => Type::CHAR,
        Type::NAME_ARRAY => Type::NAME,
        Type::INT2_ARRAY => Type::INT2,
        Type::INT4_ARRAY => Type::INT4,
        Type::INT8_ARRAY => Type::INT8,
        Type::TEXT_ARRAY => Type::TEXT,
        Type::BPCHAR_ARRAY => Type::BPCHAR,
        Type::VARCHAR_ARRAY => Type::VARCHAR,
        Type::FLOAT4_ARRAY => Type::FLOAT4,
        Type::FLOAT8_ARRAY => Type::FLOAT8,
        Type::NUMERIC_ARRAY => Type::NUMERIC,
        Type::UUID_ARRAY => Type::UUID,
        Type::DATE_ARRAY => Type::DATE,
        Type::TIME_ARRAY => Type::TIME,
        Type::TIMETZ_ARRAY => Type::TIMETZ,
        Type::TIMESTAMP_ARRAY => Type::TIMESTAMP,
        Type::TIMESTAMPTZ_ARRAY => Type::TIMESTAMPTZ,
        Type::INTERVAL_ARRAY => Type::INTERVAL,
        Type::JSON_ARRAY => Type::JSON,
        Type::JSONB_ARRAY => Type::JSONB,
        _ => return None,
    };
    Some(element.oid())
}

/// Postgres' short name, with `[]` for an array (`typname` has `_` in front instead).
fn builtin_name(type_oid: u32) -> Option<String> {
    if !is_builtin(type_oid) {
        return None;
    }
    let ty = Type::from_oid(type_oid)?;
    Some(
        match builtin_array_element(type_oid).and_then(Type::from_oid) {
            Some(element) => format!("{}[]", element.name()),
            None => ty.name().to_string(),
        },
    )
}

/// Whether this module reads `type_oid` without help from a registry.
pub fn is_builtin(type_oid: u32) -> bool {
    builtin_scalar(type_oid).is_some() || builtin_array_element(type_oid).is_some()
}

impl TypeRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, type_oid: u32, info: TypeInfo) {
        self.types.insert(type_oid, info);
    }

    pub fn get(&self, type_oid: u32) -> Option<&TypeInfo> {
        self.types.get(&type_oid)
    }

    pub fn len(&self) -> usize {
        self.types.len()
    }

    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// The OIDs among `oids` that are neither built in nor registered, sorted and without
    /// duplicates: what a caller should look up before decoding.
    pub fn unresolved(&self, oids: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut missing: Vec<u32> = oids
            .into_iter()
            .filter(|o| !is_builtin(*o) && !self.types.contains_key(o))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        missing
    }

    /// A readable name: the built-in short name, the registered `schema.name`, or `type oid N`.
    /// The type a domain stands for (through domains over domains); any other type itself.
    pub fn base_type(&self, type_oid: u32) -> u32 {
        let mut current = type_oid;
        // Bounded like the lookup: a catalog cannot nest domains deeper than it resolved.
        for _ in 0..16 {
            match self.get(current).map(|t| &t.kind) {
                Some(TypeKind::Domain { base }) => current = *base,
                _ => break,
            }
        }
        current
    }

    pub fn type_name(&self, type_oid: u32) -> String {
        if let Some(name) = builtin_name(type_oid) {
            return name;
        }
        match self.types.get(&type_oid) {
            Some(info) => info.name.clone(),
            None => format!("type oid {type_oid}"),
        }
    }

    fn shape(&self, type_oid: u32, depth: usize, text: &[u8]) -> Result<Shape, ValueError> {
        if let Some(scalar) = builtin_scalar(type_oid) {
            return Ok(Shape::Scalar(scalar));
        }
        if let Some(element) = builtin_array_element(type_oid) {
            return Ok(Shape::Array {
                element,
                delimiter: b',',
            });
        }
        match self.types.get(&type_oid).map(|i| i.kind) {
            Some(TypeKind::Domain { base }) => {
                if depth >= MAX_TYPE_DEPTH {
                    return Err(ValueError {
                        type_name: self.type_name(type_oid),
                        text: quote_for_error(text),
                        reason: format!("domains nest more than {MAX_TYPE_DEPTH} levels deep"),
                    });
                }
                self.shape(base, depth + 1, text)
            }
            Some(TypeKind::Array { element, delimiter }) => Ok(Shape::Array { element, delimiter }),
            Some(TypeKind::Enum) | Some(TypeKind::Other) | None => Ok(Shape::Scalar(Scalar::Text)),
        }
    }
}

/// Reads one value in Postgres' text output form as the type `type_oid`.
pub fn decode_text(type_oid: u32, text: &[u8], types: &TypeRegistry) -> Result<Value, ValueError> {
    decode_at(type_oid, text, types, 0)
}

fn decode_at(
    type_oid: u32,
    text: &[u8],
    types: &TypeRegistry,
    depth: usize,
) -> Result<Value, ValueError> {
    let fail = |reason: String| ValueError {
        type_name: types.type_name(type_oid),
        text: quote_for_error(text),
        reason,
    };
    let shape = types.shape(type_oid, depth, text)?;
    let s = std::str::from_utf8(text).map_err(|e| {
        fail(format!(
            "not valid UTF-8 at byte {} (walsweep needs a UTF8 server encoding)",
            e.valid_up_to()
        ))
    })?;
    match shape {
        Shape::Scalar(scalar) => decode_scalar(scalar, s).map_err(fail),
        Shape::Array { element, delimiter } => {
            if depth >= MAX_TYPE_DEPTH {
                return Err(fail(format!(
                    "array types nest more than {MAX_TYPE_DEPTH} levels deep"
                )));
            }
            let node = parse_array(s, delimiter).map_err(fail)?;
            node_to_value(node, element, types, depth + 1)
        }
    }
}

fn node_to_value(
    node: ArrayNode,
    element: u32,
    types: &TypeRegistry,
    depth: usize,
) -> Result<Value, ValueError> {
    match node {
        ArrayNode::Null => Ok(Value::Null),
        ArrayNode::Element(text) => decode_at(element, text.as_bytes(), types, depth),
        ArrayNode::List(items) => items
            .into_iter()
            .map(|n| node_to_value(n, element, types, depth))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
    }
}

fn decode_scalar(scalar: Scalar, s: &str) -> Result<Value, String> {
    match scalar {
        Scalar::Bool => match s {
            "t" => Ok(Value::Bool(true)),
            "f" => Ok(Value::Bool(false)),
            _ => Err("expected t or f".into()),
        },
        Scalar::Int2 => parse_int(s, i64::from(i16::MIN), i64::from(i16::MAX)),
        Scalar::Int4 => parse_int(s, i64::from(i32::MIN), i64::from(i32::MAX)),
        Scalar::Int8 => parse_int(s, i64::MIN, i64::MAX),
        Scalar::Float => parse_float(s).map(Value::Float),
        Scalar::Numeric => parse_numeric(s).map(|()| Value::Numeric(s.to_string())),
        Scalar::Text => Ok(Value::Text(s.to_string())),
        Scalar::Bytea => parse_bytea(s).map(Value::Bytes),
        Scalar::Uuid => parse_uuid(s).map(Value::Uuid),
        Scalar::Date => parse_date(s).map(Value::Date),
        Scalar::Time => {
            let (time, rest) = parse_time(s)?;
            expect_end(rest)?;
            Ok(Value::Time(time))
        }
        Scalar::TimeTz => {
            let (time, rest) = parse_time(s)?;
            let (offset, rest) = parse_offset(rest)?;
            expect_end(rest)?;
            Ok(Value::TimeTz(time, offset))
        }
        Scalar::Timestamp => parse_timestamp(s, false).map(|(ts, _)| Value::Timestamp(ts)),
        Scalar::TimestampTz => {
            parse_timestamp(s, true).map(|(ts, offset)| Value::TimestampTz(ts, offset))
        }
        Scalar::Interval => parse_interval(s).map(Value::Interval),
        Scalar::Json => serde_json::from_str(s)
            .map(Value::Json)
            .map_err(|e| format!("not JSON: {e}")),
    }
}

fn parse_int(s: &str, min: i64, max: i64) -> Result<Value, String> {
    let v: i64 = s.parse().map_err(|_| "not an integer".to_string())?;
    if v < min || v > max {
        return Err(format!("out of range [{min}, {max}]"));
    }
    Ok(Value::Int(v))
}

fn parse_float(s: &str) -> Result<f64, String> {
    match s {
        "NaN" => Ok(f64::NAN),
        "Infinity" => Ok(f64::INFINITY),
        "-Infinity" => Ok(f64::NEG_INFINITY),
        _ if s
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
            && !s.is_empty() =>
        {
            s.parse()
                .map_err(|_| "not a floating-point number".to_string())
        }
        _ => Err("not a floating-point number".into()),
    }
}

/// `-?digits(.digits)?`, `NaN`, `Infinity`, `-Infinity`: what numeric_out prints.
fn parse_numeric(s: &str) -> Result<(), String> {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return Ok(());
    }
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if digits(int) && frac.is_none_or(digits) {
        Ok(())
    } else {
        Err("not a numeric (expected digits with an optional fraction)".into())
    }
}

fn parse_bytea(s: &str) -> Result<Vec<u8>, String> {
    if let Some(hex) = s.strip_prefix("\\x") {
        let bytes = hex.as_bytes();
        if bytes.len() % 2 != 0 {
            return Err("odd number of hex digits".into());
        }
        return bytes
            .chunks_exact(2)
            .map(|pair| match (hex_digit(pair[0]), hex_digit(pair[1])) {
                (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
                _ => Err("invalid hex digit".to_string()),
            })
            .collect();
    }
    // bytea_output = escape: `\\` for a backslash, `\ooo` for other bytes, the rest as is.
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        match bytes.get(i + 1..i + 4) {
            _ if bytes.get(i + 1) == Some(&b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(&[a, b, c])
                if (b'0'..=b'3').contains(&a)
                    && (b'0'..=b'7').contains(&b)
                    && (b'0'..=b'7').contains(&c) =>
            {
                out.push((a - b'0') << 6 | (b - b'0') << 3 | (c - b'0'));
                i += 4;
            }
            _ => return Err(format!("invalid escape at byte {i}")),
        }
    }
    Ok(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn parse_uuid(s: &str) -> Result<[u8; 16], String> {
    let bytes = s.as_bytes();
    let err = || "not a UUID (expected 8-4-4-4-12 hex digits)".to_string();
    if bytes.len() != 36 || [8, 13, 18, 23].iter().any(|&i| bytes[i] != b'-') {
        return Err(err());
    }
    let hex: Vec<u8> = bytes.iter().copied().filter(|&b| b != b'-').collect();
    let mut out = [0u8; 16];
    for (slot, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        match (hex_digit(pair[0]), hex_digit(pair[1])) {
            (Some(hi), Some(lo)) => *slot = hi << 4 | lo,
            _ => return Err(err()),
        }
    }
    Ok(out)
}

fn expect_end(rest: &str) -> Result<(), String> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!("unexpected {rest:?} at the end"))
    }
}

/// Splits off a run of ASCII digits (at least `min`, at most `max`) and its value.
fn take_digits(s: &str, min: usize, max: usize) -> Option<(i64, &str)> {
    let n = s.bytes().take_while(u8::is_ascii_digit).count();
    if n < min || n > max {
        return None;
    }
    let (digits, rest) = s.split_at(n);
    digits.parse().ok().map(|v| (v, rest))
}

fn is_leap(year: i32) -> bool {
    year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0)
}

fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `YYYY-MM-DD` (the year may have more digits); the BC suffix is handled by the caller.
fn parse_ymd(s: &str, bc: bool) -> Result<(Ymd, &str), String> {
    let err = || "not an ISO date (YYYY-MM-DD)".to_string();
    let (year, rest) = take_digits(s, 1, 9).ok_or_else(err)?;
    let rest = rest.strip_prefix('-').ok_or_else(err)?;
    let (month, rest) = take_digits(rest, 2, 2).ok_or_else(err)?;
    let rest = rest.strip_prefix('-').ok_or_else(err)?;
    let (day, rest) = take_digits(rest, 2, 2).ok_or_else(err)?;
    if year == 0 {
        return Err("year 0 does not exist (1 BC precedes 1 AD)".into());
    }
    let year = i32::try_from(year).map_err(|_| err())?;
    let year = if bc { 1 - year } else { year };
    let month = month as u8;
    if !(1..=12).contains(&month) {
        return Err(format!("month {month} out of range"));
    }
    let day = day as u8;
    if day == 0 || day > days_in_month(year, month) {
        return Err(format!("day {day} out of range for the month"));
    }
    Ok((Ymd { year, month, day }, rest))
}

fn strip_bc(s: &str) -> (&str, bool) {
    match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    }
}

fn parse_date(s: &str) -> Result<Date, String> {
    match s {
        "infinity" => return Ok(Date::Infinity),
        "-infinity" => return Ok(Date::NegInfinity),
        _ => {}
    }
    let (body, bc) = strip_bc(s);
    let (ymd, rest) = parse_ymd(body, bc)?;
    expect_end(rest)?;
    Ok(Date::Ymd(ymd))
}

/// `HH:MM:SS[.ffffff]`.
fn parse_time(s: &str) -> Result<(Time, &str), String> {
    let err = || "not a time (HH:MM:SS[.ffffff])".to_string();
    let (hour, rest) = take_digits(s, 2, 2).ok_or_else(err)?;
    let rest = rest.strip_prefix(':').ok_or_else(err)?;
    let (minute, rest) = take_digits(rest, 2, 2).ok_or_else(err)?;
    let rest = rest.strip_prefix(':').ok_or_else(err)?;
    let (second, rest) = take_digits(rest, 2, 2).ok_or_else(err)?;
    let (micros, rest) = match rest.strip_prefix('.') {
        Some(frac) => {
            let n = frac.bytes().take_while(u8::is_ascii_digit).count();
            if n == 0 || n > 6 {
                return Err("fraction of a second must have 1 to 6 digits".into());
            }
            let (digits, rest) = frac.split_at(n);
            let mut micros: u32 = digits.parse().map_err(|_| err())?;
            for _ in n..6 {
                micros *= 10;
            }
            (micros, rest)
        }
        None => (0, rest),
    };
    let time = Time {
        hour: hour as u8,
        minute: minute as u8,
        second: second as u8,
        micros,
    };
    let past_midnight = time.hour == 24 && (time.minute, time.second, time.micros) != (0, 0, 0);
    if time.hour > 24 || time.minute > 59 || time.second > 59 || past_midnight {
        return Err("time of day out of range".into());
    }
    Ok((time, rest))
}

/// `+HH`, `+HH:MM` or `+HH:MM:SS` (or `-`): seconds east of UTC.
fn parse_offset(s: &str) -> Result<(i32, &str), String> {
    let err = || "expected a UTC offset such as +00 or -03:30".to_string();
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(err()),
    };
    let (hours, mut rest) = take_digits(rest, 2, 2).ok_or_else(err)?;
    let mut minutes = 0;
    let mut seconds = 0;
    if let Some(r) = rest.strip_prefix(':') {
        let (m, r) = take_digits(r, 2, 2).ok_or_else(err)?;
        minutes = m;
        rest = r;
        if let Some(r) = rest.strip_prefix(':') {
            let (sec, r) = take_digits(r, 2, 2).ok_or_else(err)?;
            seconds = sec;
            rest = r;
        }
    }
    if minutes > 59 || seconds > 59 {
        return Err(err());
    }
    Ok((sign * (hours * 3600 + minutes * 60 + seconds) as i32, rest))
}

fn parse_timestamp(s: &str, with_zone: bool) -> Result<(Timestamp, i32), String> {
    match s {
        "infinity" => return Ok((Timestamp::Infinity, 0)),
        "-infinity" => return Ok((Timestamp::NegInfinity, 0)),
        _ => {}
    }
    let (body, bc) = strip_bc(s);
    let (ymd, rest) = parse_ymd(body, bc)?;
    let rest = rest
        .strip_prefix(' ')
        .ok_or_else(|| "expected a space between date and time".to_string())?;
    let (time, rest) = parse_time(rest)?;
    if time.hour == 24 {
        return Err("time of day out of range".into());
    }
    let (offset, rest) = if with_zone {
        parse_offset(rest)?
    } else {
        (0, rest)
    };
    expect_end(rest)?;
    Ok((Timestamp::At(ymd, time), offset))
}

/// IntervalStyle `postgres`: `[N year[s]] [N mon[s]] [N day[s]] [[+-]HH:MM:SS[.ffffff]]`, each
/// part with its own sign, e.g. `-1 years +2 mons -3 days +04:05:06.7`.
fn parse_interval(s: &str) -> Result<Interval, String> {
    match s {
        "infinity" => return Ok(Interval::INFINITY),
        "-infinity" => return Ok(Interval::NEG_INFINITY),
        _ => {}
    }
    let style_hint = || {
        format!(
            "not an interval in IntervalStyle postgres (e.g. \"1 year 2 mons 3 days 04:05:06\"); \
             other IntervalStyle settings are not read{}",
            if s.starts_with('P') || s.starts_with('@') || s.starts_with("-P") {
                " (this looks like iso_8601 or postgres_verbose)"
            } else {
                ""
            }
        )
    };
    let overflow = || "interval out of range".to_string();
    let mut months: i32 = 0;
    let mut days: i32 = 0;
    let mut micros: i64 = 0;
    let mut tokens = s.split(' ').peekable();
    let mut seen_any = false;
    while let Some(token) = tokens.next() {
        seen_any = true;
        if token.contains(':') {
            if tokens.peek().is_some() {
                return Err(style_hint());
            }
            micros = parse_interval_time(token).ok_or_else(style_hint)?;
            break;
        }
        let (negative, digits) = match token.as_bytes().first() {
            Some(b'-') => (true, &token[1..]),
            Some(b'+') => (false, &token[1..]),
            _ => (false, token),
        };
        let (magnitude, rest) = take_digits(digits, 1, 10).ok_or_else(style_hint)?;
        if !rest.is_empty() {
            return Err(style_hint());
        }
        let value = if negative { -magnitude } else { magnitude };
        let value = i32::try_from(value).map_err(|_| overflow())?;
        match tokens.next() {
            Some("year" | "years") => {
                let m = value.checked_mul(12).ok_or_else(overflow)?;
                months = months.checked_add(m).ok_or_else(overflow)?;
            }
            Some("mon" | "mons") => months = months.checked_add(value).ok_or_else(overflow)?,
            Some("day" | "days") => days = days.checked_add(value).ok_or_else(overflow)?,
            _ => return Err(style_hint()),
        }
    }
    if !seen_any || s.is_empty() {
        return Err(style_hint());
    }
    Ok(Interval {
        months,
        days,
        micros,
    })
}

/// `[+-]H+:MM:SS[.ffffff]` as signed microseconds.
fn parse_interval_time(token: &str) -> Option<i64> {
    let (negative, rest) = match token.as_bytes().first() {
        Some(b'-') => (true, &token[1..]),
        Some(b'+') => (false, &token[1..]),
        _ => (false, token),
    };
    let (hours, rest) = take_digits(rest, 1, 12)?;
    let rest = rest.strip_prefix(':')?;
    let (minutes, rest) = take_digits(rest, 2, 2)?;
    let rest = rest.strip_prefix(':')?;
    let (seconds, rest) = take_digits(rest, 2, 2)?;
    let fraction = match rest.strip_prefix('.') {
        Some(frac) if (1..=6).contains(&frac.len()) && frac.bytes().all(|b| b.is_ascii_digit()) => {
            let v: i64 = frac.parse().ok()?;
            v * 10_i64.pow(6 - frac.len() as u32)
        }
        Some(_) => return None,
        None if rest.is_empty() => 0,
        None => return None,
    };
    if minutes > 59 || seconds > 59 {
        return None;
    }
    let total = hours
        .checked_mul(3_600_000_000)?
        .checked_add(minutes * 60_000_000 + seconds * 1_000_000 + fraction)?;
    Some(if negative { -total } else { total })
}

/// An array literal, before its elements are read as their type.
#[derive(Debug, PartialEq)]
enum ArrayNode {
    Null,
    Element(String),
    List(Vec<ArrayNode>),
}

/// Postgres array syntax as array_out prints it: an optional dimension decoration
/// (`[0:1][1:2]=`), then `{...}` with elements separated by `delimiter`, nested braces for more
/// dimensions, `NULL` (unquoted, any case) for nulls, and double-quoted elements with backslash
/// escapes.
fn parse_array(s: &str, delimiter: u8) -> Result<ArrayNode, String> {
    let bytes = s.as_bytes();
    let mut pos = 0;
    if bytes.first() == Some(&b'[') {
        // Dimension decoration: lower bounds are dropped (JSON arrays have none).
        let eq = s
            .find('=')
            .ok_or_else(|| "dimension decoration without '='".to_string())?;
        let decoration = &s[..eq];
        let well_formed = decoration.split_inclusive(']').all(|d| {
            d.strip_prefix('[')
                .and_then(|d| d.strip_suffix(']'))
                .and_then(|d| d.split_once(':'))
                .is_some_and(|(lo, hi)| lo.parse::<i32>().is_ok() && hi.parse::<i32>().is_ok())
        });
        if !well_formed {
            return Err(format!("malformed dimension decoration {decoration:?}"));
        }
        pos = eq + 1;
    }
    let node = parse_array_level(bytes, &mut pos, delimiter, 0)?;
    if pos != bytes.len() {
        return Err(format!("unexpected text after the array at byte {pos}"));
    }
    Ok(node)
}

/// Postgres allows at most 6 dimensions.
const MAX_ARRAY_DIMS: usize = 6;

fn parse_array_level(
    bytes: &[u8],
    pos: &mut usize,
    delimiter: u8,
    depth: usize,
) -> Result<ArrayNode, String> {
    if depth >= MAX_ARRAY_DIMS {
        return Err(format!("more than {MAX_ARRAY_DIMS} dimensions"));
    }
    if bytes.get(*pos) != Some(&b'{') {
        return Err(format!("expected '{{' at byte {}", *pos));
    }
    *pos += 1;
    let mut items = Vec::new();
    skip_spaces(bytes, pos);
    if bytes.get(*pos) == Some(&b'}') {
        *pos += 1;
        return Ok(ArrayNode::List(items));
    }
    loop {
        skip_spaces(bytes, pos);
        let item = match bytes.get(*pos) {
            None => return Err("unterminated array".into()),
            Some(b'{') => parse_array_level(bytes, pos, delimiter, depth + 1)?,
            Some(b'"') => {
                *pos += 1;
                let mut out = Vec::new();
                loop {
                    match bytes.get(*pos) {
                        None => return Err("unterminated quoted array element".into()),
                        Some(b'"') => {
                            *pos += 1;
                            break;
                        }
                        Some(b'\\') => {
                            let escaped = bytes
                                .get(*pos + 1)
                                .ok_or_else(|| "array ends inside an escape".to_string())?;
                            out.push(*escaped);
                            *pos += 2;
                        }
                        Some(&b) => {
                            out.push(b);
                            *pos += 1;
                        }
                    }
                }
                ArrayNode::Element(element_string(out)?)
            }
            Some(_) => {
                let mut out = Vec::new();
                let mut had_escape = false;
                while let Some(&b) = bytes.get(*pos) {
                    if b == delimiter || b == b'}' || b == b'{' || b == b'"' {
                        break;
                    }
                    if b == b'\\' {
                        let escaped = bytes
                            .get(*pos + 1)
                            .ok_or_else(|| "array ends inside an escape".to_string())?;
                        out.push(*escaped);
                        had_escape = true;
                        *pos += 2;
                        continue;
                    }
                    out.push(b);
                    *pos += 1;
                }
                while !had_escape && out.last().is_some_and(u8::is_ascii_whitespace) {
                    out.pop();
                }
                if out.is_empty() {
                    return Err(format!("empty unquoted array element at byte {}", *pos));
                }
                if !had_escape && out.eq_ignore_ascii_case(b"NULL") {
                    ArrayNode::Null
                } else {
                    ArrayNode::Element(element_string(out)?)
                }
            }
        };
        items.push(item);
        skip_spaces(bytes, pos);
        match bytes.get(*pos) {
            Some(&b) if b == delimiter => *pos += 1,
            Some(b'}') => {
                *pos += 1;
                return Ok(ArrayNode::List(items));
            }
            Some(_) => {
                return Err(format!(
                    "expected '{}' or '}}' at byte {}",
                    char::from(delimiter),
                    *pos
                ))
            }
            None => return Err("unterminated array".into()),
        }
    }
}

fn skip_spaces(bytes: &[u8], pos: &mut usize) {
    while bytes.get(*pos).is_some_and(u8::is_ascii_whitespace) {
        *pos += 1;
    }
}

fn element_string(bytes: Vec<u8>) -> Result<String, String> {
    // The literal was valid UTF-8 and escapes only ever remove ASCII backslashes.
    String::from_utf8(bytes).map_err(|_| "array element is not valid UTF-8".to_string())
}

fn push_fraction(out: &mut String, micros: u32) {
    if micros != 0 {
        let digits = format!("{micros:06}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
}

fn push_time(out: &mut String, t: &Time) {
    let _ = write!(out, "{:02}:{:02}:{:02}", t.hour, t.minute, t.second);
    push_fraction(out, t.micros);
}

/// Pushes the year as Postgres prints it (at least 4 digits); returns whether it is BC.
fn push_ymd(out: &mut String, d: &Ymd) -> bool {
    let (year, bc) = if d.year <= 0 {
        (1 - i64::from(d.year), true)
    } else {
        (i64::from(d.year), false)
    };
    let _ = write!(out, "{year:04}-{:02}-{:02}", d.month, d.day);
    bc
}

/// Postgres' offset form: `+HH`, `+HH:MM` when minutes are set, `+HH:MM:SS` when seconds are;
/// `always_minutes` gives `+HH:MM` at least (ISO 8601, as `to_json` prints timestamptz).
fn push_offset(out: &mut String, offset: i32, always_minutes: bool) {
    let sign = if offset < 0 { '-' } else { '+' };
    let abs = offset.unsigned_abs();
    let (h, m, s) = (abs / 3600, abs / 60 % 60, abs % 60);
    let _ = write!(out, "{sign}{h:02}");
    if s != 0 {
        let _ = write!(out, ":{m:02}:{s:02}");
    } else if m != 0 || always_minutes {
        let _ = write!(out, ":{m:02}");
    }
}

fn timestamp_json(ts: &Timestamp, offset: Option<i32>) -> String {
    match ts {
        Timestamp::Infinity => "infinity".into(),
        Timestamp::NegInfinity => "-infinity".into(),
        Timestamp::At(date, time) => {
            let mut out = String::with_capacity(32);
            let bc = push_ymd(&mut out, date);
            out.push('T');
            push_time(&mut out, time);
            if let Some(offset) = offset {
                push_offset(&mut out, offset, true);
            }
            if bc {
                out.push_str(" BC");
            }
            out
        }
    }
}

/// IntervalStyle `postgres`, as Postgres' EncodeInterval writes it.
pub fn interval_text(iv: &Interval) -> String {
    if *iv == Interval::INFINITY {
        return "infinity".into();
    }
    if *iv == Interval::NEG_INFINITY {
        return "-infinity".into();
    }
    let year = iv.months / 12;
    let mon = iv.months % 12;
    let mut time = iv.micros;
    let hour = time / 3_600_000_000;
    time -= hour * 3_600_000_000;
    let min = time / 60_000_000;
    time -= min * 60_000_000;
    let sec = time / 1_000_000;
    let fsec = time - sec * 1_000_000;

    let mut out = String::new();
    let mut is_zero = true;
    let mut is_before = false;
    for (value, unit) in [(year, "year"), (mon, "mon"), (iv.days, "day")] {
        if value == 0 {
            continue;
        }
        let _ = write!(
            out,
            "{}{}{value} {unit}{}",
            if is_zero { "" } else { " " },
            if is_before && value > 0 { "+" } else { "" },
            if value != 1 { "s" } else { "" }
        );
        is_before = value < 0;
        is_zero = false;
    }
    if is_zero || hour != 0 || min != 0 || sec != 0 || fsec != 0 {
        let minus = hour < 0 || min < 0 || sec < 0 || fsec < 0;
        let _ = write!(
            out,
            "{}{}{:02}:{:02}:{:02}",
            if is_zero { "" } else { " " },
            if minus {
                "-"
            } else if is_before {
                "+"
            } else {
                ""
            },
            hour.unsigned_abs(),
            min.unsigned_abs(),
            sec.unsigned_abs()
        );
        push_fraction(&mut out, fsec.unsigned_abs() as u32);
    }
    out
}

fn hex_string(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 + bytes.len() * 2);
    out.push_str("\\x");
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn uuid_string(u: &[u8; 16]) -> String {
    let mut out = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        let _ = write!(out, "{b:02x}");
    }
    out
}

impl Value {
    /// The JSON form (see the module docs for the table).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => match serde_json::Number::from_f64(*f) {
                Some(n) => J::Number(n),
                None if f.is_nan() => J::String("NaN".into()),
                None if *f > 0.0 => J::String("Infinity".into()),
                None => J::String("-Infinity".into()),
            },
            Value::Numeric(s) | Value::Text(s) => J::String(s.clone()),
            Value::Bytes(b) => J::String(hex_string(b)),
            Value::Uuid(u) => J::String(uuid_string(u)),
            Value::Date(d) => J::String(match d {
                Date::Infinity => "infinity".into(),
                Date::NegInfinity => "-infinity".into(),
                Date::Ymd(ymd) => {
                    let mut out = String::with_capacity(16);
                    if push_ymd(&mut out, ymd) {
                        out.push_str(" BC");
                    }
                    out
                }
            }),
            Value::Time(t) => {
                let mut out = String::with_capacity(16);
                push_time(&mut out, t);
                J::String(out)
            }
            Value::TimeTz(t, offset) => {
                let mut out = String::with_capacity(24);
                push_time(&mut out, t);
                push_offset(&mut out, *offset, false);
                J::String(out)
            }
            Value::Timestamp(ts) => J::String(timestamp_json(ts, None)),
            Value::TimestampTz(ts, offset) => J::String(timestamp_json(ts, Some(*offset))),
            Value::Interval(iv) => J::String(interval_text(iv)),
            Value::Json(j) => j.clone(),
            Value::Array(items) => J::Array(items.iter().map(Value::to_json).collect()),
        }
    }

    /// Python's `str()` of the value a Python driver (psycopg2) builds from it, when that differs
    /// from Postgres' text: `None` means "use the Postgres text as is" (text, uuid, dates,
    /// intervals, bytea, json and arrays, whose Python objects would print as reprs no cache key
    /// should contain; and dates, which print the same).
    pub fn python_str(&self) -> Option<String> {
        match self {
            Value::Null => Some(PYTHON_NONE.into()),
            Value::Bool(true) => Some("True".into()),
            Value::Bool(false) => Some("False".into()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(python_float(*f)),
            Value::Numeric(s) => Some(python_decimal(s)),
            Value::Time(t) => Some(python_time(t)),
            Value::TimeTz(t, offset) => {
                let mut out = python_time(t);
                push_python_offset(&mut out, *offset);
                Some(out)
            }
            Value::Timestamp(Timestamp::At(date, time)) => Some(python_datetime(date, time, None)),
            Value::TimestampTz(Timestamp::At(date, time), offset) => {
                Some(python_datetime(date, time, Some(*offset)))
            }
            _ => None,
        }
    }
}

/// Python's `str(None)`.
pub const PYTHON_NONE: &str = "None";

/// Python's `str()` of a column value given as Postgres text, through the typed conversion.
/// Text that does not parse as its type is returned as is (a key is better than no key; the
/// typed reading is the one to trust). Types whose Python form is their text (text, uuid,
/// dates, arrays, ...) are returned without being decoded, so rendering them allocates nothing.
pub fn python_str<'a>(type_oid: u32, text: &'a str, types: &TypeRegistry) -> Cow<'a, str> {
    let passthrough = match types.shape(type_oid, 0, text.as_bytes()) {
        Ok(Shape::Scalar(scalar)) => matches!(
            scalar,
            Scalar::Text
                | Scalar::Bytea
                | Scalar::Uuid
                | Scalar::Date
                | Scalar::Interval
                | Scalar::Json
        ),
        Ok(Shape::Array { .. }) | Err(_) => true,
    };
    if passthrough {
        return Cow::Borrowed(text);
    }
    match decode_text(type_oid, text.as_bytes(), types) {
        Ok(value) => match value.python_str() {
            Some(s) => Cow::Owned(s),
            None => Cow::Borrowed(text),
        },
        Err(_) => Cow::Borrowed(text),
    }
}

/// Python prints a non-zero fraction of a second with exactly six digits.
fn python_time(t: &Time) -> String {
    let mut out = format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second);
    if t.micros != 0 {
        let _ = write!(out, ".{:06}", t.micros);
    }
    out
}

fn python_datetime(date: &Ymd, time: &Time, offset: Option<i32>) -> String {
    let mut out = String::with_capacity(32);
    // Python has no BC years nor years past 9999 (psycopg2 raises); keep Postgres' year form.
    let bc = push_ymd(&mut out, date);
    out.push(' ');
    out.push_str(&python_time(time));
    if let Some(offset) = offset {
        push_python_offset(&mut out, offset);
    }
    if bc {
        out.push_str(" BC");
    }
    out
}

/// Python prints offsets as `+HH:MM`, with `:SS` when there are seconds.
fn push_python_offset(out: &mut String, offset: i32) {
    push_offset(out, offset, true);
}

/// Python's `repr(float)`: shortest round-trip digits, fixed notation when the decimal exponent
/// is in [-4, 16) (always with a fractional part), `1e+20` form otherwise.
fn python_float(value: f64) -> String {
    if value.is_nan() {
        return "nan".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf" } else { "-inf" }.into();
    }
    if value == 0.0 {
        return if value.is_sign_negative() {
            "-0.0"
        } else {
            "0.0"
        }
        .into();
    }
    // `{:e}` gives the shortest round-trip digits: "1.5e16", "-2e-5".
    let sci = format!("{value:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let sign = if mantissa.starts_with('-') { "-" } else { "" };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1;
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat(point.unsigned_abs() as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let mantissa = if rest.is_empty() {
            first.to_string()
        } else {
            format!("{first}.{rest}")
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.unsigned_abs())
    }
}

/// Python's `str(Decimal(text))` for numeric_out text: plain notation unless the exponent is
/// positive or the number is smaller than 1e-6 in magnitude (`0.0000001` is `1E-7`).
fn python_decimal(text: &str) -> String {
    if matches!(text, "NaN" | "Infinity" | "-Infinity") {
        return text.into();
    }
    let (sign, body) = match text.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", text),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let all: String = format!("{int}{frac}");
    let trimmed = all.trim_start_matches('0');
    let coefficient = if trimmed.is_empty() { "0" } else { trimmed };
    let exp = -(frac.len() as i64);
    let leftdigits = exp + coefficient.len() as i64;
    let dotplace = if leftdigits > -6 { leftdigits } else { 1 };
    let (intpart, fracpart) = if dotplace <= 0 {
        (
            "0".to_string(),
            format!(
                ".{}{}",
                "0".repeat(dotplace.unsigned_abs() as usize),
                coefficient
            ),
        )
    } else if dotplace as usize >= coefficient.len() {
        (
            format!(
                "{coefficient}{}",
                "0".repeat(dotplace as usize - coefficient.len())
            ),
            String::new(),
        )
    } else {
        let (i, f) = coefficient.split_at(dotplace as usize);
        (i.to_string(), format!(".{f}"))
    };
    let exponent = if leftdigits == dotplace {
        String::new()
    } else {
        format!("E{:+}", leftdigits - dotplace)
    };
    format!("{sign}{intpart}{fracpart}{exponent}")
}

/// Unix microseconds as `2024-01-02T03:04:05.123456Z`.
pub fn iso_utc(unix_micros: i64) -> String {
    let days = unix_micros.div_euclid(86_400_000_000);
    let micros_of_day = unix_micros.rem_euclid(86_400_000_000);
    let (year, month, day) = civil_from_days(days);
    let secs = micros_of_day / 1_000_000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        micros_of_day % 1_000_000
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn commit_times_print_as_iso_utc() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(iso_utc(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(
            iso_utc(1_709_210_096_123_456),
            "2024-02-29T12:34:56.123456Z"
        );
        assert_eq!(iso_utc(951_782_400_000_000), "2000-02-29T00:00:00.000000Z");
    }

    fn builtin(type_oid: u32, text: &str) -> Result<Value, ValueError> {
        decode_text(type_oid, text.as_bytes(), &TypeRegistry::new())
    }

    fn ok(type_oid: u32, text: &str) -> Value {
        builtin(type_oid, text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
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

    #[test]
    fn scalars_decode_to_their_types() {
        assert_eq!(ok(Type::BOOL.oid(), "t"), Value::Bool(true));
        assert_eq!(ok(Type::BOOL.oid(), "f"), Value::Bool(false));
        assert_eq!(ok(Type::INT2.oid(), "-32768"), Value::Int(-32768));
        assert_eq!(ok(Type::INT4.oid(), "2147483647"), Value::Int(2147483647));
        assert_eq!(
            ok(Type::INT8.oid(), "-9223372036854775808"),
            Value::Int(i64::MIN)
        );
        assert_eq!(ok(Type::FLOAT8.oid(), "1.5e+300"), Value::Float(1.5e300));
        assert_eq!(ok(Type::FLOAT8.oid(), "NaN"), Value::Float(f64::NAN));
        assert_eq!(
            ok(Type::FLOAT8.oid(), "-Infinity"),
            Value::Float(f64::NEG_INFINITY)
        );
        assert_eq!(ok(Type::FLOAT4.oid(), "1.1"), Value::Float(1.1));
        assert_eq!(
            ok(Type::NUMERIC.oid(), "-1.50"),
            Value::Numeric("-1.50".into())
        );
        assert_eq!(ok(Type::NUMERIC.oid(), "NaN"), Value::Numeric("NaN".into()));
        assert_eq!(ok(Type::TEXT.oid(), ""), Value::Text("".into()));
        assert_eq!(ok(Type::BPCHAR.oid(), "ab "), Value::Text("ab ".into()));
        assert_eq!(ok(Type::BYTEA.oid(), "\\x00ff"), Value::Bytes(vec![0, 255]));
        assert_eq!(ok(Type::BYTEA.oid(), "\\x"), Value::Bytes(vec![]));
        assert_eq!(
            ok(Type::BYTEA.oid(), "a\\\\b\\000\\377"),
            Value::Bytes(vec![b'a', b'\\', b'b', 0, 255])
        );
        assert_eq!(
            ok(Type::UUID.oid(), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").to_json(),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(
            ok(Type::JSONB.oid(), r#"{"a": [1, null]}"#),
            Value::Json(json!({"a": [1, null]}))
        );
    }

    #[test]
    fn dates_and_times_keep_every_edge() {
        assert_eq!(
            ok(Type::DATE.oid(), "1969-12-31"),
            Value::Date(Date::Ymd(ymd(1969, 12, 31)))
        );
        assert_eq!(
            ok(Type::DATE.oid(), "0044-03-15 BC"),
            Value::Date(Date::Ymd(ymd(-43, 3, 15)))
        );
        assert_eq!(
            ok(Type::DATE.oid(), "0001-02-29 BC"),
            Value::Date(Date::Ymd(ymd(0, 2, 29)))
        );
        assert_eq!(
            ok(Type::DATE.oid(), "infinity"),
            Value::Date(Date::Infinity)
        );
        assert_eq!(
            ok(Type::DATE.oid(), "-infinity"),
            Value::Date(Date::NegInfinity)
        );
        assert_eq!(
            ok(Type::DATE.oid(), "12345-01-02"),
            Value::Date(Date::Ymd(ymd(12345, 1, 2)))
        );
        assert_eq!(
            ok(Type::TIME.oid(), "24:00:00"),
            Value::Time(hms(24, 0, 0, 0))
        );
        assert_eq!(
            ok(Type::TIME.oid(), "03:04:05.5"),
            Value::Time(hms(3, 4, 5, 500_000))
        );
        assert_eq!(
            ok(Type::TIMETZ.oid(), "03:04:05.000001-03:30"),
            Value::TimeTz(hms(3, 4, 5, 1), -12600)
        );
        assert_eq!(
            ok(Type::TIMESTAMPTZ.oid(), "1900-01-01 00:00:00+00:19:32"),
            Value::TimestampTz(Timestamp::At(ymd(1900, 1, 1), hms(0, 0, 0, 0)), 1172)
        );
        assert_eq!(
            ok(Type::TIMESTAMP.oid(), "0044-03-15 12:00:00.123 BC"),
            Value::Timestamp(Timestamp::At(ymd(-43, 3, 15), hms(12, 0, 0, 123_000)))
        );
        assert_eq!(
            ok(Type::TIMESTAMPTZ.oid(), "-infinity"),
            Value::TimestampTz(Timestamp::NegInfinity, 0)
        );
    }

    #[test]
    fn json_forms_match_postgres_to_json() {
        for (type_oid, text, want) in [
            (Type::FLOAT8.oid(), "NaN", json!("NaN")),
            (Type::FLOAT8.oid(), "Infinity", json!("Infinity")),
            (Type::FLOAT4.oid(), "-Infinity", json!("-Infinity")),
            (Type::NUMERIC.oid(), "1.50", json!("1.50")),
            (Type::BYTEA.oid(), "\\x00ff", json!("\\x00ff")),
            (Type::DATE.oid(), "0044-03-15 BC", json!("0044-03-15 BC")),
            (Type::TIME.oid(), "03:04:05.5", json!("03:04:05.5")),
            (Type::TIMETZ.oid(), "12:00:00+00", json!("12:00:00+00")),
            (
                Type::TIMETZ.oid(),
                "12:00:00.25-03:30",
                json!("12:00:00.25-03:30"),
            ),
            (
                Type::TIMESTAMPTZ.oid(),
                "1969-07-20 20:17:40.5+00",
                json!("1969-07-20T20:17:40.5+00:00"),
            ),
            (
                Type::TIMESTAMPTZ.oid(),
                "1900-01-01 00:00:00+00:19:32",
                json!("1900-01-01T00:00:00+00:19:32"),
            ),
            (
                Type::TIMESTAMP.oid(),
                "0044-03-15 12:00:00.123 BC",
                json!("0044-03-15T12:00:00.123 BC"),
            ),
            (
                Type::TIMESTAMP.oid(),
                "12345-06-07 01:02:03",
                json!("12345-06-07T01:02:03"),
            ),
            (Type::TIMESTAMP.oid(), "-infinity", json!("-infinity")),
            (
                Type::INT4_ARRAY.oid(),
                "{{1,NULL},{3,4}}",
                json!([[1, null], [3, 4]]),
            ),
            (
                Type::INT4_ARRAY.oid(),
                "[1:1][3:4]={{1,2}}",
                json!([[1, 2]]),
            ),
            (Type::INT4_ARRAY.oid(), "{}", json!([])),
            (
                Type::NUMERIC_ARRAY.oid(),
                "{1.50,NaN}",
                json!(["1.50", "NaN"]),
            ),
        ] {
            assert_eq!(ok(type_oid, text).to_json(), want, "{text}");
        }
    }

    #[test]
    fn intervals_round_trip_postgres_style() {
        for (text, months, days, micros) in [
            ("00:00:00", 0, 0, 0),
            ("-00:00:01", 0, 0, -1_000_000),
            ("1000:00:00.000003", 0, 0, 3_600_000_000_003),
            ("11 mons", 11, 0, 0),
            ("-1 days +00:00:01", 0, -1, 1_000_000),
            ("-2147483648 days", 0, i32::MIN, 0),
            ("178000000 years", 2_136_000_000, 0, 0),
            ("-1 days -00:00:01", 0, -1, -1_000_000),
            ("1 day -00:00:01", 0, 1, -1_000_000),
            ("-10 mons -3 days +04:05:06.7", -10, -3, 14_706_700_000),
            ("1 year 2 mons 3 days 04:05:06", 14, 3, 14_706_000_000),
            ("-1 years -2 mons", -14, 0, 0),
        ] {
            let want = Interval {
                months,
                days,
                micros,
            };
            assert_eq!(
                ok(Type::INTERVAL.oid(), text),
                Value::Interval(want),
                "{text}"
            );
            assert_eq!(interval_text(&want), text);
        }
        assert_eq!(interval_text(&Interval::INFINITY), "infinity");
        let err = builtin(Type::INTERVAL.oid(), "P1Y2M").unwrap_err();
        assert!(err.reason.contains("iso_8601"), "{err}");
    }

    #[test]
    fn arrays_parse_quotes_escapes_nulls_and_dimensions() {
        let text = |s: &str| Value::Text(s.into());
        assert_eq!(
            ok(
                Type::TEXT_ARRAY.oid(),
                r#"{"a,b","NULL",NULL,"","q\"x\\\\",plain,"{}"}"#
            ),
            Value::Array(vec![
                text("a,b"),
                text("NULL"),
                Value::Null,
                text(""),
                text("q\"x\\\\"),
                text("plain"),
                text("{}"),
            ])
        );
        assert_eq!(
            ok(Type::INT8_ARRAY.oid(), "{{NULL,NULL}}"),
            Value::Array(vec![Value::Array(vec![Value::Null, Value::Null])])
        );
        assert_eq!(
            ok(Type::FLOAT8_ARRAY.oid(), "{NaN,-Infinity,1.5}").to_json(),
            json!(["NaN", "-Infinity", 1.5])
        );
        assert_eq!(
            ok(Type::JSONB_ARRAY.oid(), r#"{"{\"a\": 1}","[1, 2]"}"#).to_json(),
            json!([{"a": 1}, [1, 2]])
        );
        assert_eq!(
            ok(Type::BYTEA_ARRAY.oid(), r#"{"\\x00ff",NULL}"#),
            Value::Array(vec![Value::Bytes(vec![0, 255]), Value::Null])
        );
        assert_eq!(
            ok(
                Type::TIMESTAMPTZ_ARRAY.oid(),
                r#"{"2020-01-02 03:04:05+00",infinity}"#
            )
            .to_json(),
            json!(["2020-01-02T03:04:05+00:00", "infinity"])
        );
    }

    #[test]
    fn registry_resolves_enums_domains_and_their_arrays() {
        let mut types = TypeRegistry::new();
        let info = |name: &str, kind| TypeInfo {
            name: name.into(),
            kind,
        };
        types.insert(90_001, info("public.mood", TypeKind::Enum));
        types.insert(
            90_002,
            info(
                "public.mood[]",
                TypeKind::Array {
                    element: 90_001,
                    delimiter: b',',
                },
            ),
        );
        types.insert(
            90_003,
            info(
                "public.posint",
                TypeKind::Domain {
                    base: Type::INT4.oid(),
                },
            ),
        );
        types.insert(
            90_004,
            info("public.tiny", TypeKind::Domain { base: 90_003 }),
        );
        types.insert(
            90_005,
            info(
                "public.tiny[]",
                TypeKind::Array {
                    element: 90_004,
                    delimiter: b',',
                },
            ),
        );
        types.insert(
            90_006,
            info("public.loop", TypeKind::Domain { base: 90_006 }),
        );
        let dec = |o: u32, t: &str| decode_text(o, t.as_bytes(), &types);
        assert_eq!(dec(90_001, "it's").unwrap(), Value::Text("it's".into()));
        assert_eq!(
            dec(90_002, r#"{sad,"it's \"x\""}"#).unwrap().to_json(),
            json!(["sad", "it's \"x\""])
        );
        assert_eq!(dec(90_004, "5").unwrap(), Value::Int(5));
        assert_eq!(dec(90_005, "{1,NULL}").unwrap().to_json(), json!([1, null]));
        let err = dec(90_004, "x").unwrap_err();
        assert_eq!(err.type_name, "public.tiny");
        let err = dec(90_006, "1").unwrap_err();
        assert!(err.reason.contains("nest"), "{err}");
        // Unknown types are text.
        assert_eq!(dec(123_456, "(1,2)").unwrap(), Value::Text("(1,2)".into()));
        assert_eq!(
            types.unresolved([Type::INT4.oid(), 90_001, 777, 777, 1020, 5]),
            vec![5, 777, 1020]
        );
    }

    #[test]
    fn bad_input_is_a_clear_error_never_a_panic() {
        for (type_oid, text, reason) in [
            (Type::BOOL.oid(), "yes", "expected t or f"),
            (Type::INT2.oid(), "70000", "out of range"),
            (Type::INT4.oid(), "1.5", "not an integer"),
            (Type::FLOAT8.oid(), "one", "floating-point"),
            (Type::NUMERIC.oid(), "1e5", "not a numeric"),
            (Type::BYTEA.oid(), "\\x0", "odd number"),
            (Type::BYTEA.oid(), "\\xzz", "invalid hex"),
            (Type::BYTEA.oid(), "a\\9", "invalid escape"),
            (Type::UUID.oid(), "a0eebc99", "not a UUID"),
            (Type::DATE.oid(), "2021-02-29", "day 29"),
            (Type::DATE.oid(), "0000-01-01", "year 0"),
            (Type::DATE.oid(), "01/02/2020", "ISO date"),
            (Type::TIME.oid(), "25:00:00", "out of range"),
            (Type::TIME.oid(), "03:04:05.1234567", "1 to 6 digits"),
            (Type::TIMESTAMPTZ.oid(), "2020-01-02 03:04:05", "UTC offset"),
            (
                Type::TIMESTAMP.oid(),
                "2020-01-02 03:04:05+00",
                "at the end",
            ),
            (Type::INTERVAL.oid(), "1 fortnight", "IntervalStyle"),
            (Type::JSON.oid(), "{", "not JSON"),
            (Type::JSONB.oid(), "[1e400]", "out of range"),
            (
                Type::JSON.oid(),
                &format!("{}{}", "[".repeat(200), "]".repeat(200)),
                "recursion",
            ),
            (Type::INT4_ARRAY.oid(), "{1,2", "unterminated"),
            (Type::INT4_ARRAY.oid(), "{1,,2}", "empty unquoted"),
            (Type::INT4_ARRAY.oid(), "{1}x", "after the array"),
            (Type::INT4_ARRAY.oid(), "[1:2={1,2}", "decoration"),
            (Type::INT4_ARRAY.oid(), "{{{{{{{1}}}}}}}", "dimensions"),
            (Type::TEXT_ARRAY.oid(), "{\"abc}", "unterminated quoted"),
        ] {
            let err = builtin(type_oid, text).expect_err(text);
            assert!(
                err.reason.contains(reason),
                "{text:?}: {err} lacks {reason:?}"
            );
            if text.len() <= ERROR_TEXT_MAX_CHARS {
                assert!(err.to_string().contains(&format!("{text:?}")), "{err}");
            }
        }
        let long = format!("{{{}", "1,".repeat(200));
        let err = builtin(Type::INT4_ARRAY.oid(), &long).unwrap_err();
        assert!(err.text.ends_with("(401 bytes)"), "{err}");
        let err = decode_text(Type::TEXT.oid(), b"\xff", &TypeRegistry::new()).unwrap_err();
        assert!(err.reason.contains("UTF-8"), "{err}");
    }

    #[test]
    fn survives_arbitrary_bytes() {
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"{}\",\\NUL01-+:. TPx9e:[]=ABCinfty";
        let oids = [
            Type::INT4_ARRAY.oid(),
            Type::TEXT_ARRAY.oid(),
            Type::INTERVAL.oid(),
            Type::TIMESTAMPTZ.oid(),
            Type::TIMETZ.oid(),
            Type::BYTEA.oid(),
            Type::NUMERIC.oid(),
            Type::FLOAT8.oid(),
            Type::DATE.oid(),
            Type::UUID.oid(),
            Type::JSONB_ARRAY.oid(),
        ];
        for _ in 0..50_000 {
            let len = (next() % 24) as usize;
            let text: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let type_oid = oids[(next() % oids.len() as u64) as usize];
            if let Ok(v) = decode_text(type_oid, &text, &TypeRegistry::new()) {
                let _ = v.to_json();
                let _ = v.python_str();
            }
        }
    }

    /// Where the typed path is right and the text path is not: Python's Decimal switches to
    /// exponent notation below 1e-6 (checked with CPython 3).
    #[test]
    fn python_str_of_numeric_follows_decimal() {
        let types = TypeRegistry::new();
        for (pg, py) in [
            ("1.50", "1.50"),
            ("-123.4500", "-123.4500"),
            ("0.000001", "0.000001"),
            ("0.0000001", "1E-7"),
            ("0.00000010", "1.0E-7"),
            ("-0.0000001", "-1E-7"),
            ("0.0000000", "0E-7"),
            ("100000000000000000000", "100000000000000000000"),
            ("NaN", "NaN"),
            ("Infinity", "Infinity"),
        ] {
            assert_eq!(python_str(Type::NUMERIC.oid(), pg, &types), py, "{pg}");
        }
        assert_eq!(python_str(Type::FLOAT8.oid(), "garbage", &types), "garbage");
        assert!(matches!(
            python_str(Type::TEXT.oid(), "x", &types),
            Cow::Borrowed("x")
        ));
        assert_eq!(Value::Null.python_str().as_deref(), Some("None"));
    }
}
