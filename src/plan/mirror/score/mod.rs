//! Sorted-set scores from rows: the static proof that an expression stays exact (`width`), its
//! value for one row (`eval`) and the score range retention drops (`retention`). The calendar
//! math `epoch()` needs is `value::time`'s, shared with the rest of the date handling.
//!
//! The expression itself, [`ScoreExpr`], is parsed and validated by `config::score`; these
//! modules add its row- and type-facing methods (`check_types`, `eval`, `retention_range`) as
//! inherent methods, so callers keep writing `score.eval(..)` while the config layer never
//! depends on how rows are evaluated.
//!
//! A Redis score is an f64, so an integer score is only exact while its magnitude stays within
//! 2^53. Rather than discovering a collision in production (two rows silently sharing a rounded
//! score), [`ScoreExpr::check_types`] bounds every expression from the column types alone and
//! refuses anything whose worst case needs more than 53 bits. [`ScoreExpr::eval`] then computes
//! in `i128` and still checks the result, so a row that breaks a declared range (a `bits(c, N)`
//! column holding 2^N, a timestamp before 1970) is an error naming the column, never a wrong
//! score.
//!
//! [`ScoreExpr`]: crate::config::score::ScoreExpr
//! [`ScoreExpr::check_types`]: crate::config::score::ScoreExpr::check_types
//! [`ScoreExpr::eval`]: crate::config::score::ScoreExpr::eval

mod eval;
mod retention;
mod width;

/// Why one row has no score.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum ScoreError {
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

/// Rows and shorthands the tests of every score module share.
#[cfg(test)]
mod fixtures {
    use crate::config::score::ScoreExpr;
    use crate::value::{Time, Timestamp, Value, Ymd};

    use super::ScoreError;

    pub(super) const COMPOSITE: &str = "(device_id << 32) | epoch(ts)";

    pub(super) fn ymd(year: i32, month: u8, day: u8) -> Ymd {
        Ymd { year, month, day }
    }

    pub(super) fn ts(
        year: i32,
        month: u8,
        day: u8,
        hour: u8,
        minute: u8,
        second: u8,
        micros: u32,
    ) -> Value {
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

    pub(super) fn types<'a>(pairs: &'a [(&'a str, u32)]) -> impl Fn(&str) -> Option<u32> + 'a {
        move |name| pairs.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }

    pub(super) fn parse(s: &str) -> ScoreExpr {
        ScoreExpr::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    pub(super) fn eval(s: &str, values: &[Value]) -> Result<f64, ScoreError> {
        let refs: Vec<&Value> = values.iter().collect();
        parse(s).eval(&refs)
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::ScoreError;
    use crate::config::score::ScoreExpr;
    use crate::value::{Time, Timestamp, Value};
    use postgres_types::Type;

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
