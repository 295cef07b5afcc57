//! The static half of exactness: from the column types alone, how many bits a score expression
//! can reach, refused past 53 with the term that set the width and how to narrow it.

use crate::config::score::{Node, ScoreExpr, TimeUnit, EXACT_BITS};
use postgres_types::Type;

impl ScoreExpr {
    /// Static check from column type OIDs (`type_of(column)` returns the column's pg_type OID,
    /// None if the table lacks it). The error explains the problem and the fix.
    pub(crate) fn check_types(&self, type_of: &dyn Fn(&str) -> Option<u32>) -> Result<(), String> {
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

    fn fail(&self, detail: &str) -> String {
        format!("score {:?}: {detail}", self.source)
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

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use postgres_types::Type;

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
    }

    #[test]
    fn time_terms_take_time_columns_and_their_bits() {
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
}
