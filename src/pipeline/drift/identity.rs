//! From a stored key (or index key and member) back to the rows that could have written it: the
//! template is matched against the text to recover column values, and the table is queried
//! for rows with those values. Rows found are planned again and kept only when they render
//! exactly that text, so a lenient cast (`'007'` for an integer) never passes for a match.

use crate::config::template::{Segment, Template};
use crate::pg::replication::{quote_ident, quote_literal};

/// Most ways one text may split into column values (a value containing the literal that
/// follows it): beyond that, the key is not looked up and the caller says so.
pub(crate) const MAX_SPLITS: usize = 16;

/// Column name to the text Postgres printed for it.
pub(crate) type Assignment = Vec<(String, String)>;

/// Why a text cannot be matched back to columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unmatched {
    /// The template does not produce this text (it is someone else's key).
    NotRendered,
    /// `{col!r}` renders Python's repr(), which cannot be read back into a column value.
    Repr,
    /// More than `MAX_SPLITS` ways to split it.
    Ambiguous,
}

/// Every assignment of column texts for which `template` renders `text`.
pub(crate) fn unrender(template: &Template, text: &str) -> Result<Vec<Assignment>, Unmatched> {
    if template
        .segments
        .iter()
        .any(|s| matches!(s, Segment::Column { repr: true, .. }))
    {
        return Err(Unmatched::Repr);
    }
    let mut out = Vec::new();
    let mut partial = Vec::new();
    split(&template.segments, text, &mut partial, &mut out)?;
    if out.is_empty() {
        return Err(Unmatched::NotRendered);
    }
    Ok(out)
}

fn split(
    segments: &[Segment],
    text: &str,
    partial: &mut Assignment,
    out: &mut Vec<Assignment>,
) -> Result<(), Unmatched> {
    let Some((first, rest)) = segments.split_first() else {
        if text.is_empty() {
            if out.len() == MAX_SPLITS {
                return Err(Unmatched::Ambiguous);
            }
            out.push(partial.clone());
        }
        return Ok(());
    };
    match first {
        Segment::Literal(literal) => match text.strip_prefix(literal.as_str()) {
            Some(after) => split(rest, after, partial, out),
            None => Ok(()),
        },
        Segment::Column { name, .. } => {
            // Where this value may end: at each occurrence of the next literal, anywhere for a
            // column directly followed by another, at the end for the last segment.
            let ends: Vec<usize> = match rest.first() {
                None => vec![text.len()],
                Some(Segment::Literal(next)) => {
                    text.match_indices(next.as_str()).map(|(i, _)| i).collect()
                }
                Some(Segment::Column { .. }) => (0..=text.len())
                    .filter(|&i| text.is_char_boundary(i))
                    .collect(),
            };
            for end in ends {
                let value = &text[..end];
                // A column named twice must have one value.
                if let Some((_, earlier)) = partial.iter().find(|(n, _)| n == name) {
                    if earlier != value {
                        continue;
                    }
                    split(rest, &text[end..], partial, out)?;
                    continue;
                }
                partial.push((name.clone(), value.to_string()));
                let result = split(rest, &text[end..], partial, out);
                partial.pop();
                result?;
            }
            Ok(())
        }
    }
}

/// The assignments that satisfy every (template, text) pair at once, e.g. an index key and its
/// member; at most `MAX_SPLITS`.
pub(crate) fn unrender_all(pairs: &[(&Template, &str)]) -> Result<Vec<Assignment>, Unmatched> {
    let mut combined: Vec<Assignment> = vec![Vec::new()];
    for (template, text) in pairs {
        let options = unrender(template, text)?;
        let mut next = Vec::new();
        for base in &combined {
            for option in &options {
                let agrees = option
                    .iter()
                    .all(|(n, v)| base.iter().all(|(bn, bv)| bn != n || bv == v));
                if !agrees {
                    continue;
                }
                if next.len() == MAX_SPLITS {
                    return Err(Unmatched::Ambiguous);
                }
                let mut merged = base.clone();
                merged.extend(
                    option
                        .iter()
                        .filter(|(n, _)| !base.iter().any(|(bn, _)| bn == n))
                        .cloned(),
                );
                next.push(merged);
            }
        }
        combined = next;
    }
    if combined.is_empty() {
        return Err(Unmatched::NotRendered);
    }
    Ok(combined)
}

/// The columns every row query selects before the row itself: what tells one version of a row
/// from another (an UPDATE gives the row a new xmin and usually a new ctid).
pub(crate) const VERSION_COLUMNS: &str = "t.tableoid, t.ctid, t.xmin";
/// How many columns `VERSION_COLUMNS` is.
pub(crate) const VERSION_WIDTH: usize = 3;

/// The rows of `qualified` (a quoted `schema.table`) whose columns print as `assignment`.
/// The literals are cast to the column types by Postgres, so an index on them is used; a text
/// that is not a value of the type fails the query (SQLSTATE class 22), which means no row.
pub(crate) fn lookup_sql(qualified: &str, assignment: &Assignment) -> String {
    let mut sql = format!("SELECT {VERSION_COLUMNS}, t.* FROM {qualified} t");
    for (i, (column, value)) in assignment.iter().enumerate() {
        sql.push_str(if i == 0 { " WHERE " } else { " AND " });
        sql.push_str(&format!(
            "t.{} = {}",
            quote_ident(column),
            quote_literal(value)
        ));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Template {
        Template::parse(s).unwrap()
    }

    fn a(pairs: &[(&str, &str)]) -> Assignment {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_split_back_into_column_values() {
        assert_eq!(
            unrender(&t("item:{id}"), "item:42"),
            Ok(vec![a(&[("id", "42")])])
        );
        assert_eq!(
            unrender(&t("reading:{device_id}:{seq}"), "reading:3:17"),
            Ok(vec![a(&[("device_id", "3"), ("seq", "17")])])
        );
        // A value containing the separator: every split is a candidate.
        assert_eq!(
            unrender(&t("r:{a}:{b}"), "r:x:y:z"),
            Ok(vec![
                a(&[("a", "x"), ("b", "y:z")]),
                a(&[("a", "x:y"), ("b", "z")])
            ])
        );
        assert_eq!(
            unrender(&t("r:{a}-{a}"), "r:1-1"),
            Ok(vec![a(&[("a", "1")])])
        );
        assert_eq!(
            unrender(&t("r:{a}-{a}"), "r:1-2"),
            Err(Unmatched::NotRendered)
        );
        assert_eq!(
            unrender(&t("item:{id}"), "other:1"),
            Err(Unmatched::NotRendered)
        );
        assert_eq!(unrender(&t("items:all"), "items:all"), Ok(vec![a(&[])]));
        assert_eq!(unrender(&t("p:({a!r})"), "p:(1)"), Err(Unmatched::Repr));
        assert_eq!(
            unrender(&t("r:{a}{b}"), &format!("r:{}", "x".repeat(40))),
            Err(Unmatched::Ambiguous)
        );
        assert_eq!(
            unrender(&t("é:{a}é"), "é:ü:éé"),
            Ok(vec![a(&[("a", "ü:é")])])
        );
    }

    #[test]
    fn an_index_key_and_member_must_agree() {
        let key = t("readings:{device_id}");
        let member = t("{device_id}:{seq}");
        assert_eq!(
            unrender_all(&[(&key, "readings:4"), (&member, "4:9")]),
            Ok(vec![a(&[("device_id", "4"), ("seq", "9")])])
        );
        assert_eq!(
            unrender_all(&[(&key, "readings:4"), (&member, "5:9")]),
            Err(Unmatched::NotRendered)
        );
    }

    #[test]
    fn lookups_quote_names_and_values() {
        assert_eq!(
            lookup_sql("\"public\".\"t\"", &a(&[("id", "1"), ("Na\"me", "it's")])),
            "SELECT t.tableoid, t.ctid, t.xmin, t.* FROM \"public\".\"t\" t WHERE t.\"id\" = '1' \
             AND t.\"Na\"\"me\" = 'it''s'"
        );
    }
}
