//! The JSON form of a value ([`Value::to_json`]): what `walsweep tail` prints and JSON mirrors
//! store.

use std::fmt::Write as _;

use super::time::{push_fraction, push_offset, push_time, push_ymd};
use super::{Date, Interval, Timestamp, Value};

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
pub(crate) fn interval_text(iv: &Interval) -> String {
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
    /// The JSON form: exactly what Postgres' own `to_json()` gives for the same value in a
    /// `TimeZone=UTC` session (the oracle test in `tests/tail.rs` checks this against the
    /// server), except for `numeric`:
    ///
    /// | type | JSON |
    /// |---|---|
    /// | NULL | `null` |
    /// | bool | `true` / `false` |
    /// | int2, int4, int8 | number (int8 beyond 2^53 is exact in the text, not in JavaScript) |
    /// | float4, float8 | number (shortest round-trip digits); NaN and ±Infinity as the strings `"NaN"`, `"Infinity"`, `"-Infinity"` |
    /// | numeric | **string** with Postgres' exact digits and scale (`"1.50"`, `"NaN"`, `"Infinity"`): a JSON number would lose precision in most parsers. This is the one deviation from `to_json()`, which prints a number |
    /// | text, varchar, char, name, enums, unknown types | string |
    /// | bytea | `"\\x00ff"` (hex, as Postgres prints it) |
    /// | uuid | `"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"` |
    /// | date | `"2020-01-02"`, `"0044-03-15 BC"`, `"infinity"`, `"-infinity"` |
    /// | time, timetz | `"03:04:05.5"`, `"03:04:05+05:30"` |
    /// | timestamp | `"2020-01-02T03:04:05.5"` (ISO 8601; ` BC` suffix before year 1) |
    /// | timestamptz | `"2020-01-02T03:04:05.5+00:00"` (offset of the session time zone: walsweep's replication session runs in UTC) |
    /// | interval | Postgres' `postgres`-style text, `"1 year 2 mons -3 days +04:05:06.7"` |
    /// | json, jsonb | the JSON value itself (object keys come out sorted; numbers beyond f64 precision are rounded; numbers beyond f64 range and nesting deeper than 128 levels are an error) |
    /// | arrays | JSON arrays, nested for more dimensions, `null` elements; lower bounds (`[0:1]=`) are dropped |
    ///
    /// Domains take their base type's form.
    pub(crate) fn to_json(&self) -> serde_json::Value {
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
}

#[cfg(test)]
mod tests {
    use postgres_types::Type;
    use serde_json::json;

    use super::super::fixtures::ok;

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
}
