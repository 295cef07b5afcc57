//! Renders a Postgres text value the way Python's `str()` renders the value a Python driver
//! (psycopg) hands the app, because matroska-cache builds dependency and scope strings with
//! `str()`. The replication session runs with `TimeZone=UTC`, `DateStyle=ISO` and
//! `extra_float_digits=3`, so the input forms below are the only ones to expect.

use std::borrow::Cow;

pub const BOOL_OID: u32 = 16;
pub const FLOAT4_OID: u32 = 700;
pub const FLOAT8_OID: u32 = 701;
pub const TIME_OID: u32 = 1083;
pub const TIMESTAMP_OID: u32 = 1114;
pub const TIMESTAMPTZ_OID: u32 = 1184;
pub const TIMETZ_OID: u32 = 1266;

/// Python's `str(None)`.
pub const NONE: &str = "None";

/// `text` is the value as pgoutput sent it (text format).
pub fn python_str(type_oid: u32, text: &str) -> Cow<'_, str> {
    match type_oid {
        BOOL_OID => Cow::Borrowed(match text {
            "t" => "True",
            "f" => "False",
            other => other,
        }),
        FLOAT4_OID | FLOAT8_OID => Cow::Owned(python_float(text)),
        TIMESTAMP_OID | TIME_OID => Cow::Owned(python_fraction(text)),
        TIMESTAMPTZ_OID | TIMETZ_OID => Cow::Owned(python_offset(&python_fraction(text))),
        // int, numeric (Decimal keeps the scale Postgres prints), text, date, uuid: same text.
        _ => Cow::Borrowed(text),
    }
}

/// Python prints `float` with the shortest round-trip digits, in fixed notation when the
/// decimal exponent is in [-4, 16) (always with a fractional part) and in `1e+20` form
/// otherwise; Postgres switches notation at different exponents and omits `.0`.
fn python_float(text: &str) -> String {
    let value: f64 = match text {
        "NaN" => return "nan".into(),
        "Infinity" => return "inf".into(),
        "-Infinity" => return "-inf".into(),
        t => match t.parse() {
            Ok(v) => v,
            Err(_) => return t.into(),
        },
    };
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
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
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
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs())
    }
}

/// Python prints a non-zero fraction of a second with exactly six digits; Postgres trims
/// trailing zeros (`03:04:05.5` vs `03:04:05.500000`).
fn python_fraction(text: &str) -> String {
    // The fraction follows the seconds of the time part: find the '.' after the last ':'.
    let Some(colon) = text.rfind(':') else {
        return text.into();
    };
    let time_tail = &text[colon..];
    let Some(dot_rel) = time_tail.find('.') else {
        return text.into();
    };
    let dot = colon + dot_rel;
    let after = &text[dot + 1..];
    let frac_len = after.chars().take_while(|c| c.is_ascii_digit()).count();
    let frac = &after[..frac_len];
    let rest = &after[frac_len..];
    let mut padded = frac.to_string();
    while padded.len() < 6 {
        padded.push('0');
    }
    format!("{}.{}{}", &text[..dot], padded, rest)
}

/// Postgres prints a whole-hour offset as `+00`; Python as `+00:00`.
fn python_offset(text: &str) -> String {
    let Some(pos) = text.rfind(['+', '-']) else {
        return text.into();
    };
    // Only an offset after the time (not the date's '-') counts.
    if !text[..pos].contains(':') {
        return text.into();
    }
    let offset = &text[pos + 1..];
    match offset.len() {
        2 => format!("{}:00", text),
        _ => text.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_and_passthrough_types() {
        assert_eq!(python_str(BOOL_OID, "t"), "True");
        assert_eq!(python_str(BOOL_OID, "f"), "False");
        assert_eq!(python_str(1700, "1.50"), "1.50");
        assert_eq!(python_str(1082, "2020-01-02"), "2020-01-02");
        assert_eq!(python_str(25, "x y"), "x y");
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
            assert_eq!(python_str(FLOAT8_OID, pg), py, "{pg}");
        }
    }

    #[test]
    fn timestamps_get_six_digit_fractions_and_full_offsets() {
        assert_eq!(
            python_str(TIMESTAMPTZ_OID, "2020-01-02 03:04:05+00"),
            "2020-01-02 03:04:05+00:00"
        );
        assert_eq!(
            python_str(TIMESTAMPTZ_OID, "2020-01-02 03:04:05.5+00"),
            "2020-01-02 03:04:05.500000+00:00"
        );
        assert_eq!(
            python_str(TIMESTAMP_OID, "2020-01-02 03:04:05.123"),
            "2020-01-02 03:04:05.123000"
        );
        assert_eq!(
            python_str(TIMESTAMP_OID, "2020-01-02 03:04:05"),
            "2020-01-02 03:04:05"
        );
        assert_eq!(python_str(TIME_OID, "03:04:05.25"), "03:04:05.250000");
        assert_eq!(
            python_str(TIMESTAMPTZ_OID, "2020-01-02 03:04:05+05:30"),
            "2020-01-02 03:04:05+05:30"
        );
    }
}
