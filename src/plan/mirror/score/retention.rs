//! Retention's score ranges: for one row, the scores of the members of its segment older than a
//! cutoff, which the sink removes. Which expressions have such a range is decided from their
//! form by `config::score` (`supports_retention`).

use crate::config::score::{RetentionShape, ScoreExpr};
use crate::value::Value;

use super::eval::{combine, exact, overflow, EXACT_LIMIT};
use super::ScoreError;

impl ScoreExpr {
    /// For retention: the score range `[min, max_exclusive)` holding members of the same
    /// segment as this row whose time is before `cutoff_unix_micros`. For a time term alone:
    /// `(-inf, cutoff)`; for `X | T` or `X + T`: `(X, X + cutoff)`, the cutoff in T's unit
    /// (floored, so a member in the cutoff's own second is kept). None when
    /// `!supports_retention()`.
    pub(crate) fn retention_range(
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
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::ScoreError;
    use crate::value::Value;

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

        let e = parse("epoch(ts) | (d << 40) | (e << 32)");
        let (d, ee) = (Value::Int(1), Value::Int(2));
        let x = ((1u64 << 40) | (2 << 32)) as f64;
        assert_eq!(
            e.retention_range(&[&v, &d, &ee], 1_000_000).unwrap(),
            Some((x, x + 1.0))
        );

        for s in crate::config::score::tests::WITHOUT_RETENTION {
            let e = parse(s);
            assert!(!e.supports_retention(), "{s}");
            let values: Vec<Value> = e.columns().iter().map(|_| Value::Int(1)).collect();
            let refs: Vec<&Value> = values.iter().collect();
            assert_eq!(e.retention_range(&refs, 0).unwrap(), None, "{s}");
        }
    }
}
