//! Reading Postgres' text output as typed values ([`decode_text`]), and why a text is refused
//! ([`ValueError`]).
//!
//! The text forms expected are those of a session with `DateStyle=ISO`, `IntervalStyle=postgres`,
//! `extra_float_digits=3` and `bytea_output=hex` (escape-format bytea is read too). Anything
//! that does not parse as its type is an error naming the type and the (truncated) text, never a
//! guess and never a panic.

use super::array::{parse_array, ArrayNode};
use super::time::days_in_month;
use super::types::{Scalar, Shape, TypeRegistry, MAX_TYPE_DEPTH};
use super::{Date, Interval, Time, Timestamp, Value, Ymd};

/// A value's text did not parse as its type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {type_name} value {text}: {reason}")]
pub struct ValueError {
    /// `int4`, `timestamptz`, `public.mood`, `type oid 16384`, ...
    pub(crate) type_name: String,
    /// The offending text, quoted and truncated to a readable length.
    pub(crate) text: String,
    pub(crate) reason: String,
}

/// Longest piece of offending text an error repeats.
pub(super) const ERROR_TEXT_MAX_CHARS: usize = 64;

pub(super) fn quote_for_error(text: &[u8]) -> String {
    let lossy = String::from_utf8_lossy(text);
    let mut chars = lossy.chars();
    let head: String = chars.by_ref().take(ERROR_TEXT_MAX_CHARS).collect();
    if chars.next().is_some() {
        format!("{head:?}... ({} bytes)", text.len())
    } else {
        format!("{head:?}")
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
    let shape = types.shape(type_oid, depth).map_err(|deep| ValueError {
        type_name: types.type_name(deep.type_oid),
        text: quote_for_error(text),
        reason: format!("domains nest more than {MAX_TYPE_DEPTH} levels deep"),
    })?;
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

#[cfg(test)]
mod tests {
    use postgres_types::Type;
    use serde_json::json;

    use super::super::fixtures::{builtin, hms, ok, ymd};
    use super::*;
    use crate::value::json::interval_text;

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
        let zone = jiff::tz::TimeZone::get("America/New_York").expect("bundled tzdb");
        for _ in 0..50_000 {
            let len = (next() % 24) as usize;
            let text: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let type_oid = oids[(next() % oids.len() as u64) as usize];
            if let Ok(v) = decode_text(type_oid, &text, &TypeRegistry::new()) {
                let _ = v.to_json();
                let _ = v.python_str(&zone);
            }
        }
    }
}
