//! Python's `repr()` of the value a Python driver hands the app, for `{column!r}` template
//! segments: matroska-cache renders composite primary keys as `repr()` of the identity tuple,
//! e.g. `pk:Pair:(1, "it's")`.

use postgres_types::Type;

use crate::value::{python_str, TypeRegistry};

/// `repr()` for the types whose Python value has a simple repr; other types are rendered as
/// `repr()` of their text, which matches apps that key on strings.
pub fn python_repr(type_oid: u32, text: &str, types: &TypeRegistry) -> String {
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
        ) => python_str(type_oid, text, types).into_owned(),
        // Decimal's repr quotes its str(), which switches to exponent form below 1e-6.
        Some(Type::NUMERIC) => {
            format!("Decimal({})", repr_str(&python_str(type_oid, text, types)))
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
pub fn repr_str(text: &str) -> String {
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
