//! Typed column values: the one conversion from the text pgoutput sends (each type's output
//! function, under the replication session's settings) to values with a type, and the two
//! renderings built on it: JSON (`Value::to_json`, used by `walsweep tail` and JSON mirrors)
//! and Python's `str()` and `repr()` (`python_str`, `python_repr`, the forms matroska-cache
//! dependency, scope and key strings use).
//!
//! Pure: no I/O. Which type an OID is comes from built-in tables for the common types and, for
//! everything else (enums, domains, arrays of those), from a [`TypeRegistry`] that the caller
//! fills, e.g. from `pg_type` (see `tail`). A type neither knows is read as text.
//!
//! This file owns what a value is ([`Value`] and its date and time parts); each idea built on it
//! has its own file: `types` (which type an OID is), `text` (Postgres text to a value, and why
//! text is refused), `array` (array literal syntax), `json` and `python` (the renderings) and
//! `time` (calendar math and ISO formatting). Their public names are re-exported here, so
//! callers write `crate::value::X` whichever file `X` lives in.

mod array;
mod json;
mod python;
mod text;
pub(crate) mod time;
mod types;

pub(crate) use python::{python_repr, python_str, PYTHON_NONE};
pub use text::{decode_text, ValueError};
pub(crate) use time::iso_utc;
pub use types::{builtin_array_element, is_builtin, TypeInfo, TypeKind, TypeRegistry};

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
    pub(crate) const INFINITY: Interval = Interval {
        months: i32::MAX,
        days: i32::MAX,
        micros: i64::MAX,
    };
    pub(crate) const NEG_INFINITY: Interval = Interval {
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

/// Shorthands the tests of every value module share.
#[cfg(test)]
mod fixtures {
    use super::{decode_text, Time, TypeRegistry, Value, ValueError, Ymd};

    pub(super) fn builtin(type_oid: u32, text: &str) -> Result<Value, ValueError> {
        decode_text(type_oid, text.as_bytes(), &TypeRegistry::new())
    }

    pub(super) fn ok(type_oid: u32, text: &str) -> Value {
        builtin(type_oid, text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    pub(super) fn ymd(year: i32, month: u8, day: u8) -> Ymd {
        Ymd { year, month, day }
    }

    pub(super) fn hms(hour: u8, minute: u8, second: u8, micros: u32) -> Time {
        Time {
            hour,
            minute,
            second,
            micros,
        }
    }
}
