//! The syntax of key, dependency and member templates (`article:{id}`, `pk:Pair:({a}, '{b}')`):
//! their parser, their parsed form, and the literal prefix every rendering starts with (with
//! its escaping for `SCAN MATCH`, so the prefix and the pattern that finds it stay together).
//!
//! Config validation parses them at load; `plan::rules` binds a parsed template to a relation's
//! column positions once per Relation message and renders it per row.

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Literal(String),
    /// `{name}`, or `{name!r}` for Python's `repr()` of the value (how matroska-cache writes
    /// the values of a composite primary key: `pk:Pair:(1, 'x')`).
    Column {
        name: String,
        repr: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    pub(crate) source: String,
    pub(crate) segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unclosed `{{` at byte {at}; write `{{{{` for a literal brace")]
    Unclosed { at: usize },
    #[error("stray `}}` at byte {at}; write `}}}}` for a literal brace")]
    Stray { at: usize },
    #[error("empty column name `{{}}` at byte {at}")]
    EmptyColumn { at: usize },
    #[error("template is empty")]
    Empty,
}

impl Template {
    pub(crate) fn parse(source: &str) -> Result<Template, TemplateError> {
        if source.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|(_, n)| *n) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|(_, n)| *n) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for (_, c) in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(TemplateError::Unclosed { at });
                    }
                    let name = name.trim();
                    let (name, repr) = match name.strip_suffix("!r") {
                        Some(n) => (n.trim().to_string(), true),
                        None => (name.to_string(), false),
                    };
                    if name.is_empty() {
                        return Err(TemplateError::EmptyColumn { at });
                    }
                    if !literal.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut literal)));
                    }
                    segments.push(Segment::Column { name, repr });
                }
                '}' => return Err(TemplateError::Stray { at }),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        Ok(Template {
            source: source.to_string(),
            segments,
        })
    }

    pub(crate) fn columns(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Column { name, .. } => Some(name.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// The literal text before the first column: every rendering starts with it, so a
    /// table-wide invalidation can find all of them with `SCAN MATCH prefix*`.
    pub(crate) fn literal_prefix(&self) -> &str {
        match self.segments.first() {
            Some(Segment::Literal(l)) => l,
            _ => "",
        }
    }
}

/// Escapes Redis glob metacharacters so a literal prefix matches only itself in `SCAN MATCH`.
pub(crate) fn glob_escape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len() + 4);
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_columns_literals_and_escaped_braces() {
        let t = Template::parse("pk:Pair:({a}, { b !r}){{x}}").unwrap();
        assert_eq!(
            t.segments,
            vec![
                Segment::Literal("pk:Pair:(".into()),
                Segment::Column {
                    name: "a".into(),
                    repr: false
                },
                Segment::Literal(", ".into()),
                Segment::Column {
                    name: "b".into(),
                    repr: true
                },
                Segment::Literal("){x}".into()),
            ]
        );
        assert_eq!(t.literal_prefix(), "pk:Pair:(");
        assert_eq!(t.columns().collect::<Vec<_>>(), vec!["a", "b"]);
    }

    #[test]
    fn rejects_malformed_templates() {
        assert_eq!(
            Template::parse("a:{id"),
            Err(TemplateError::Unclosed { at: 2 })
        );
        assert_eq!(Template::parse("a:}"), Err(TemplateError::Stray { at: 2 }));
        assert_eq!(
            Template::parse("a:{}"),
            Err(TemplateError::EmptyColumn { at: 2 })
        );
        assert_eq!(Template::parse(""), Err(TemplateError::Empty));
    }

    #[test]
    fn glob_escape_neutralises_metacharacters() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
