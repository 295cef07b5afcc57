//! A score for one row, computed exactly: in `i128`, each column checked against what its term
//! declared (a `bits()` range, `epoch()`'s 1970 to 2106), the result refused beyond ±2^53 rather
//! than rounded.

use crate::config::score::{BinOp, Node, ScoreExpr, TimeUnit, EXACT_BITS};
use crate::value::{time, Date, Time, Timestamp, Value};

use super::ScoreError;

pub(super) const EXACT_LIMIT: i128 = 1 << EXACT_BITS;

impl ScoreExpr {
    /// Evaluates for one row; `values[i]` is the value of `columns()[i]`.
    pub(crate) fn eval(&self, values: &[&Value]) -> Result<f64, ScoreError> {
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

    pub(super) fn check_arity(&self, values: &[&Value]) -> Result<(), ScoreError> {
        if values.len() != self.columns.len() {
            return Err(ScoreError::ValueCount {
                expected: self.columns.len(),
                got: values.len(),
            });
        }
        Ok(())
    }

    pub(super) fn eval_node(&self, node: &Node, values: &[&Value]) -> Result<i128, ScoreError> {
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
                combine(BinOp::Or, a, b)
            }
            Node::Add(a, b) => {
                let a = self.eval_node(a, values)?;
                let b = self.eval_node(b, values)?;
                combine(BinOp::Add, a, b)
            }
        }
    }
}

pub(super) fn combine(op: BinOp, a: i128, b: i128) -> Result<i128, ScoreError> {
    match op {
        // Two's complement `|` keeps both operands' magnitude bound, so negative ids still stay
        // within the statically computed width.
        BinOp::Or => Ok(a | b),
        BinOp::Add => a.checked_add(b).ok_or_else(overflow),
    }
}

pub(super) fn overflow() -> ScoreError {
    ScoreError::TooLarge {
        value: "beyond 2^127".to_string(),
    }
}

pub(super) fn exact(v: i128) -> Result<f64, ScoreError> {
    if v.unsigned_abs() > EXACT_LIMIT as u128 {
        return Err(ScoreError::TooLarge {
            value: v.to_string(),
        });
    }
    // Exact: |v| <= 2^53.
    Ok(v as f64)
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

/// Microseconds since 1970-01-01 00:00:00 UTC of a date or timestamp value; an infinity is an
/// error naming the column.
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
    let midnight = Time {
        hour: 0,
        minute: 0,
        second: 0,
        micros: 0,
    };
    // No calendar check here: the callers (the mirror planner, `explain`) read their dates with
    // `decode_text`, which already refuses dates no calendar has.
    Ok(time::unix_micros(
        *ymd,
        time.copied().unwrap_or(midnight),
        offset,
    ))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::ScoreError;
    use crate::value::{Date, Time, Timestamp, Value};
    use postgres_types::Type;

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
    fn precedence_follows_c_and_literals_may_be_hex() {
        assert_eq!(
            eval("a * 1000 + 5", &[Value::Int(3)]).unwrap(),
            3005.0,
            "precedence: * binds tighter than +"
        );
        assert_eq!(eval("1 + 2 << 3", &[]).unwrap(), 17.0);
        assert_eq!(eval("1 | 2 + 4", &[]).unwrap(), 7.0);
        assert_eq!(eval("(1 | 2) << 1", &[]).unwrap(), 6.0);
        assert_eq!(eval("0xFF + 0X10 + 007", &[]).unwrap(), 278.0);
    }
}
