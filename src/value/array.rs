//! Postgres array literal syntax, as array_out prints it, split into elements before each
//! element is read as its type.

/// An array literal, before its elements are read as their type.
#[derive(Debug, PartialEq)]
pub(super) enum ArrayNode {
    Null,
    Element(String),
    List(Vec<ArrayNode>),
}

/// Postgres array syntax as array_out prints it: an optional dimension decoration
/// (`[0:1][1:2]=`), then `{...}` with elements separated by `delimiter`, nested braces for more
/// dimensions, `NULL` (unquoted, any case) for nulls, and double-quoted elements with backslash
/// escapes.
pub(super) fn parse_array(s: &str, delimiter: u8) -> Result<ArrayNode, String> {
    let bytes = s.as_bytes();
    let mut pos = 0;
    if bytes.first() == Some(&b'[') {
        // Dimension decoration: lower bounds are dropped (JSON arrays have none).
        let eq = s
            .find('=')
            .ok_or_else(|| "dimension decoration without '='".to_string())?;
        let decoration = &s[..eq];
        let well_formed = decoration.split_inclusive(']').all(|d| {
            d.strip_prefix('[')
                .and_then(|d| d.strip_suffix(']'))
                .and_then(|d| d.split_once(':'))
                .is_some_and(|(lo, hi)| lo.parse::<i32>().is_ok() && hi.parse::<i32>().is_ok())
        });
        if !well_formed {
            return Err(format!("malformed dimension decoration {decoration:?}"));
        }
        pos = eq + 1;
    }
    let node = parse_array_level(bytes, &mut pos, delimiter, 0)?;
    if pos != bytes.len() {
        return Err(format!("unexpected text after the array at byte {pos}"));
    }
    Ok(node)
}

/// Postgres allows at most 6 dimensions.
const MAX_ARRAY_DIMS: usize = 6;

fn parse_array_level(
    bytes: &[u8],
    pos: &mut usize,
    delimiter: u8,
    depth: usize,
) -> Result<ArrayNode, String> {
    if depth >= MAX_ARRAY_DIMS {
        return Err(format!("more than {MAX_ARRAY_DIMS} dimensions"));
    }
    if bytes.get(*pos) != Some(&b'{') {
        return Err(format!("expected '{{' at byte {}", *pos));
    }
    *pos += 1;
    let mut items = Vec::new();
    skip_spaces(bytes, pos);
    if bytes.get(*pos) == Some(&b'}') {
        *pos += 1;
        return Ok(ArrayNode::List(items));
    }
    loop {
        skip_spaces(bytes, pos);
        let item = match bytes.get(*pos) {
            None => return Err("unterminated array".into()),
            Some(b'{') => parse_array_level(bytes, pos, delimiter, depth + 1)?,
            Some(b'"') => {
                *pos += 1;
                let mut out = Vec::new();
                loop {
                    match bytes.get(*pos) {
                        None => return Err("unterminated quoted array element".into()),
                        Some(b'"') => {
                            *pos += 1;
                            break;
                        }
                        Some(b'\\') => {
                            let escaped = bytes
                                .get(*pos + 1)
                                .ok_or_else(|| "array ends inside an escape".to_string())?;
                            out.push(*escaped);
                            *pos += 2;
                        }
                        Some(&b) => {
                            out.push(b);
                            *pos += 1;
                        }
                    }
                }
                ArrayNode::Element(element_string(out)?)
            }
            Some(_) => {
                let mut out = Vec::new();
                let mut had_escape = false;
                while let Some(&b) = bytes.get(*pos) {
                    if b == delimiter || b == b'}' || b == b'{' || b == b'"' {
                        break;
                    }
                    if b == b'\\' {
                        let escaped = bytes
                            .get(*pos + 1)
                            .ok_or_else(|| "array ends inside an escape".to_string())?;
                        out.push(*escaped);
                        had_escape = true;
                        *pos += 2;
                        continue;
                    }
                    out.push(b);
                    *pos += 1;
                }
                while !had_escape && out.last().is_some_and(u8::is_ascii_whitespace) {
                    out.pop();
                }
                if out.is_empty() {
                    return Err(format!("empty unquoted array element at byte {}", *pos));
                }
                if !had_escape && out.eq_ignore_ascii_case(b"NULL") {
                    ArrayNode::Null
                } else {
                    ArrayNode::Element(element_string(out)?)
                }
            }
        };
        items.push(item);
        skip_spaces(bytes, pos);
        match bytes.get(*pos) {
            Some(&b) if b == delimiter => *pos += 1,
            Some(b'}') => {
                *pos += 1;
                return Ok(ArrayNode::List(items));
            }
            Some(_) => {
                return Err(format!(
                    "expected '{}' or '}}' at byte {}",
                    char::from(delimiter),
                    *pos
                ))
            }
            None => return Err("unterminated array".into()),
        }
    }
}

fn skip_spaces(bytes: &[u8], pos: &mut usize) {
    while bytes.get(*pos).is_some_and(u8::is_ascii_whitespace) {
        *pos += 1;
    }
}

fn element_string(bytes: Vec<u8>) -> Result<String, String> {
    // The literal was valid UTF-8 and escapes only ever remove ASCII backslashes.
    String::from_utf8(bytes).map_err(|_| "array element is not valid UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use postgres_types::Type;
    use serde_json::json;

    use super::super::fixtures::ok;
    use crate::value::Value;

    #[test]
    fn arrays_parse_quotes_escapes_nulls_and_dimensions() {
        let text = |s: &str| Value::Text(s.into());
        assert_eq!(
            ok(
                Type::TEXT_ARRAY.oid(),
                r#"{"a,b","NULL",NULL,"","q\"x\\\\",plain,"{}"}"#
            ),
            Value::Array(vec![
                text("a,b"),
                text("NULL"),
                Value::Null,
                text(""),
                text("q\"x\\\\"),
                text("plain"),
                text("{}"),
            ])
        );
        assert_eq!(
            ok(Type::INT8_ARRAY.oid(), "{{NULL,NULL}}"),
            Value::Array(vec![Value::Array(vec![Value::Null, Value::Null])])
        );
        assert_eq!(
            ok(Type::FLOAT8_ARRAY.oid(), "{NaN,-Infinity,1.5}").to_json(),
            json!(["NaN", "-Infinity", 1.5])
        );
        assert_eq!(
            ok(Type::JSONB_ARRAY.oid(), r#"{"{\"a\": 1}","[1, 2]"}"#).to_json(),
            json!([{"a": 1}, [1, 2]])
        );
        assert_eq!(
            ok(Type::BYTEA_ARRAY.oid(), r#"{"\\x00ff",NULL}"#),
            Value::Array(vec![Value::Bytes(vec![0, 255]), Value::Null])
        );
        assert_eq!(
            ok(
                Type::TIMESTAMPTZ_ARRAY.oid(),
                r#"{"2020-01-02 03:04:05+00",infinity}"#
            )
            .to_json(),
            json!(["2020-01-02T03:04:05+00:00", "infinity"])
        );
    }
}
