//! Python renderings of a value, as the app sees the value a Python driver (psycopg2) hands it:
//! `str()` ([`python_str`]), because matroska-cache builds dependency and scope strings with
//! `str()`, and `repr()` ([`python_repr`]) for `{column!r}` template segments, because it renders
//! composite primary keys as `repr()` of the identity tuple, e.g. `pk:Pair:(1, "it's")`.
//! Enums and domains render through the [`TypeRegistry`] the stream resolves.

use std::borrow::Cow;
use std::fmt::Write as _;

use jiff::tz::TimeZone;
use postgres_types::Type;

use super::text::decode_text;
use super::time::{in_zone, push_offset, push_ymd};
use super::types::{Scalar, Shape, TypeRegistry};
use super::{Time, Timestamp, Value, Ymd};

impl Value {
    /// Python's `str()` of the value a Python driver (psycopg2) builds from it, when that differs
    /// from Postgres' text: `None` means "use the Postgres text as is" (text, uuid, dates,
    /// intervals, bytea, json and arrays, whose Python objects would print as reprs no cache key
    /// should contain; and dates, which print the same).
    /// A timestamptz is shown in `zone`, as psycopg2 converts it to the session's TimeZone.
    pub(crate) fn python_str(&self, zone: &TimeZone) -> Option<String> {
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
                let (date, time, offset) =
                    in_zone(*date, *time, *offset, zone).unwrap_or((*date, *time, *offset));
                Some(python_datetime(&date, &time, Some(offset)))
            }
            _ => None,
        }
    }
}

/// Python's `str(None)`.
pub(crate) const PYTHON_NONE: &str = "None";

/// Python's `str()` of a column value given as Postgres text, through the typed conversion.
/// Text that does not parse as its type is returned as is (a key is better than no key; the
/// typed reading is the one to trust). Types whose Python form is their text (integers, text,
/// uuid, dates, arrays, ...) are returned without being decoded, so rendering them allocates
/// nothing.
/// `zone` is the app's session TimeZone (`matroska.timezone`), for timestamptz values.
pub(crate) fn python_str<'a>(
    type_oid: u32,
    text: &'a str,
    types: &TypeRegistry,
    zone: &TimeZone,
) -> Cow<'a, str> {
    let passthrough = match types.shape(type_oid, 0) {
        Ok(Shape::Scalar(scalar)) => matches!(
            scalar,
            // Postgres prints integers as Python does: no sign but `-`, no leading zeros.
            Scalar::Int2
                | Scalar::Int4
                | Scalar::Int8
                | Scalar::Text
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
        Ok(value) => match value.python_str(zone) {
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

/// `repr()` for the types whose Python value has a simple repr; other types are rendered as
/// `repr()` of their text, which matches apps that key on strings.
/// Only numbers reach `python_str` from here, so no zone is needed.
pub(crate) fn python_repr(type_oid: u32, text: &str, types: &TypeRegistry) -> String {
    // A domain's Python value is its base type's.
    let type_oid = types.base_type(type_oid);
    match Type::from_oid(type_oid) {
        // For these, repr() and str() agree (repr(float('nan')) is "nan" too).
        Some(
            Type::BOOL
            | Type::INT2
            | Type::INT4
            | Type::INT8
            | Type::OID
            | Type::FLOAT4
            | Type::FLOAT8,
        ) => python_str(type_oid, text, types, &TimeZone::UTC).into_owned(),
        // Decimal's repr quotes its str(), which switches to exponent form below 1e-6.
        Some(Type::NUMERIC) => {
            format!(
                "Decimal({})",
                repr_str(&python_str(type_oid, text, types, &TimeZone::UTC))
            )
        }
        Some(Type::UUID) => format!("UUID({})", repr_str(text)),
        Some(Type::DATE) => date_repr(text).unwrap_or_else(|| repr_str(text)),
        _ => repr_str(text),
    }
}

/// `datetime.date(2020, 1, 2)` from `2020-01-02`.
fn date_repr(text: &str) -> Option<String> {
    let mut parts = text.splitn(3, '-');
    let y: u32 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    Some(format!("datetime.date({y}, {m}, {d})"))
}

/// Python's `repr(str)`: single quotes unless the text has a single quote and no double
/// quote; backslash, the quote, `\t`, `\n`, `\r` and other control characters escaped.
/// Non-ASCII printable characters are kept, as Python 3 does; non-printable non-ASCII
/// characters other than C0/C1 controls are not escaped (rare in keys).
fn repr_str(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn py_str(type_oid: u32, text: &str) -> String {
        python_str(type_oid, text, &TypeRegistry::new(), &TimeZone::UTC).into_owned()
    }

    fn py_str_in(zone: &str, text: &str) -> String {
        let zone = TimeZone::get(zone).expect("bundled tzdb");
        python_str(Type::TIMESTAMPTZ.oid(), text, &TypeRegistry::new(), &zone).into_owned()
    }

    /// psycopg2 hands the app a datetime in its session's TimeZone, so `str()` carries that
    /// zone's offset at that instant: EST before 2024-03-10 07:00 UTC, EDT after, and back on
    /// 2024-11-03 06:00 UTC, where 01:30 local happens twice (checked with CPython 3.11 and
    /// psycopg2 2.9 on `SET TimeZone = 'America/New_York'`).
    #[test]
    fn timestamptz_renders_in_the_configured_zone_across_dst() {
        for (utc, local) in [
            ("2024-03-10 06:59:59+00", "2024-03-10 01:59:59-05:00"),
            ("2024-03-10 07:00:00+00", "2024-03-10 03:00:00-04:00"),
            (
                "2024-07-01 12:00:00.25+00",
                "2024-07-01 08:00:00.250000-04:00",
            ),
            ("2024-11-03 05:30:00+00", "2024-11-03 01:30:00-04:00"),
            ("2024-11-03 06:30:00+00", "2024-11-03 01:30:00-05:00"),
            ("2024-12-31 23:00:00-02", "2024-12-31 20:00:00-05:00"),
            // Before standard time: local mean time, an offset with seconds.
            ("1800-01-01 12:00:00+00", "1800-01-01 07:03:58-04:56:02"),
        ] {
            assert_eq!(py_str_in("America/New_York", utc), local, "{utc}");
        }
        assert_eq!(
            py_str_in("Asia/Kolkata", "2024-03-10 07:00:00+00"),
            "2024-03-10 12:30:00+05:30"
        );
        assert_eq!(
            py_str_in("UTC", "2020-01-02 03:04:05+05:30"),
            "2020-01-01 21:34:05+00:00"
        );
        // Outside what a zone database covers (and Python's datetime): left as Postgres sent it.
        assert_eq!(
            py_str_in("America/New_York", "20000-01-01 00:00:00+00"),
            "20000-01-01 00:00:00+00:00"
        );
        // Only timestamptz is an instant; a timestamp or timetz is shown as stored.
        let zone = TimeZone::get("America/New_York").expect("bundled tzdb");
        let types = TypeRegistry::new();
        assert_eq!(
            python_str(Type::TIMESTAMP.oid(), "2024-07-01 12:00:00", &types, &zone),
            "2024-07-01 12:00:00"
        );
        assert_eq!(
            python_str(Type::TIMETZ.oid(), "12:00:00+00", &types, &zone),
            "12:00:00+00:00"
        );
    }

    /// Postgres's integer text is Python's `str()` of the int psycopg2 builds, so it is used
    /// as is, without a copy.
    #[test]
    fn python_str_of_an_integer_is_its_text_borrowed() {
        let types = TypeRegistry::new();
        for (oid, text) in [
            (Type::INT2.oid(), "-32768"),
            (Type::INT4.oid(), "0"),
            (Type::INT4.oid(), "42"),
            (Type::INT8.oid(), "9223372036854775807"),
        ] {
            let rendered = python_str(oid, text, &types, &TimeZone::UTC);
            assert!(
                matches!(rendered, Cow::Borrowed(t) if t == text),
                "{text}: {rendered:?}"
            );
        }
    }

    /// Where the typed path is right and the text path is not: Python's Decimal switches to
    /// exponent notation below 1e-6 (checked with CPython 3).
    #[test]
    fn python_str_of_numeric_follows_decimal() {
        let types = TypeRegistry::new();
        let utc = TimeZone::UTC;
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
            assert_eq!(
                python_str(Type::NUMERIC.oid(), pg, &types, &utc),
                py,
                "{pg}"
            );
        }
        assert_eq!(
            python_str(Type::FLOAT8.oid(), "garbage", &types, &utc),
            "garbage"
        );
        assert!(matches!(
            python_str(Type::TEXT.oid(), "x", &types, &utc),
            Cow::Borrowed("x")
        ));
        assert_eq!(Value::Null.python_str(&utc).as_deref(), Some("None"));
    }

    #[test]
    fn booleans_and_passthrough_types() {
        assert_eq!(py_str(Type::BOOL.oid(), "t"), "True");
        assert_eq!(py_str(Type::BOOL.oid(), "f"), "False");
        assert_eq!(py_str(1700, "1.50"), "1.50");
        assert_eq!(py_str(1082, "2020-01-02"), "2020-01-02");
        assert_eq!(py_str(25, "x y"), "x y");
    }

    #[test]
    fn floats_follow_python_repr() {
        for (pg, py) in [
            ("1.5", "1.5"),
            ("100", "100.0"),
            ("1e+15", "1000000000000000.0"),
            ("1e+16", "1e+16"),
            ("1.5e+20", "1.5e+20"),
            ("0.0001", "0.0001"),
            ("1e-05", "1e-05"),
            ("-2.5e-07", "-2.5e-07"),
            ("0", "0.0"),
            ("-0", "-0.0"),
            ("NaN", "nan"),
            ("-Infinity", "-inf"),
            ("0.1", "0.1"),
            ("123456.789", "123456.789"),
        ] {
            assert_eq!(py_str(Type::FLOAT8.oid(), pg), py, "{pg}");
        }
    }

    #[test]
    fn timestamps_get_six_digit_fractions_and_full_offsets() {
        assert_eq!(
            py_str(Type::TIMESTAMPTZ.oid(), "2020-01-02 03:04:05+00"),
            "2020-01-02 03:04:05+00:00"
        );
        assert_eq!(
            py_str(Type::TIMESTAMPTZ.oid(), "2020-01-02 03:04:05.5+00"),
            "2020-01-02 03:04:05.500000+00:00"
        );
        assert_eq!(
            py_str(Type::TIMESTAMP.oid(), "2020-01-02 03:04:05.123"),
            "2020-01-02 03:04:05.123000"
        );
        assert_eq!(
            py_str(Type::TIMESTAMP.oid(), "2020-01-02 03:04:05"),
            "2020-01-02 03:04:05"
        );
        assert_eq!(py_str(Type::TIME.oid(), "03:04:05.25"), "03:04:05.250000");
    }

    #[test]
    fn strings_quote_and_escape_like_python() {
        assert_eq!(repr_str("x"), "'x'");
        assert_eq!(repr_str("it's"), "\"it's\"");
        assert_eq!(repr_str("both ' and \""), "'both \\' and \"'");
        assert_eq!(repr_str("back\\slash"), "'back\\\\slash'");
        assert_eq!(repr_str("tab\there\n"), "'tab\\there\\n'");
        assert_eq!(repr_str("bell\u{7}"), "'bell\\x07'");
        assert_eq!(repr_str("héllo"), "'héllo'");
    }

    #[test]
    fn typed_values_repr_like_their_python_types() {
        assert_eq!(
            python_repr(Type::INT4.oid(), "1", &TypeRegistry::new()),
            "1"
        );
        assert_eq!(
            python_repr(Type::BOOL.oid(), "t", &TypeRegistry::new()),
            "True"
        );
        assert_eq!(
            python_repr(Type::FLOAT8.oid(), "100", &TypeRegistry::new()),
            "100.0"
        );
        assert_eq!(
            python_repr(Type::NUMERIC.oid(), "1.50", &TypeRegistry::new()),
            "Decimal('1.50')"
        );
        assert_eq!(
            python_repr(Type::NUMERIC.oid(), "0.0000001", &TypeRegistry::new()),
            "Decimal('1E-7')"
        );
        assert_eq!(
            python_repr(Type::DATE.oid(), "2020-01-02", &TypeRegistry::new()),
            "datetime.date(2020, 1, 2)"
        );
        assert_eq!(
            python_repr(
                Type::UUID.oid(),
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                &TypeRegistry::new()
            ),
            "UUID('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11')"
        );
        assert_eq!(python_repr(25, "x", &TypeRegistry::new()), "'x'");
    }
}
