//! The syntax of sorted-set score expressions (`score = "..."` in `[[table.mirror.index]]`): a
//! small integer expression over row columns, e.g. `(device_id << 32) | epoch(ts)`. Config
//! validation parses each one at load; `plan::mirror::score` proves from the column types that it
//! stays exact in a Redis score and evaluates it per row.
//!
//! Grammar, lowest precedence first (as in C):
//!
//! ```text
//! or    := add ('|' add)*
//! add   := shift ('+' shift)*
//! shift := mul ('<<' INT)*          shift amount 0..=63
//! mul   := atom ('*' INT)*
//! atom  := INT | column | epoch(column) | epoch_ms(column) | bits(column, INT) | '(' or ')'
//! ```
//!
//! INT is decimal or `0x` hex; a column is `[A-Za-z_][A-Za-z0-9_]*` or a double-quoted name
//! (`""` inside for a quote). Column names are taken exactly as written (no case folding), as
//! everywhere else in the config.
//!
//! Which parsed forms allow retention (one time term below every other term's bits) is read from
//! the tree here too: validation refuses `retention_seconds` on any other score.

/// The largest magnitude an f64 holds with every integer below it exact.
pub(crate) const EXACT_BITS: u32 = 53;
/// Parse limits: they keep every recursive walk over the tree (and its drop) shallow, so a
/// hostile config cannot overflow the stack. Real score expressions are a handful of nodes.
const MAX_NESTING: usize = 32;
const MAX_NODES: usize = 256;

/// A parsed score expression.
#[derive(Debug, Clone)]
pub(crate) struct ScoreExpr {
    pub(crate) source: String,
    /// Distinct column names in first-appearance order; `Node` refers to them by index.
    pub(crate) columns: Vec<String>,
    pub(crate) root: Node,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeUnit {
    Seconds,
    Millis,
}

impl TimeUnit {
    pub(crate) fn function(self) -> &'static str {
        match self {
            TimeUnit::Seconds => "epoch",
            TimeUnit::Millis => "epoch_ms",
        }
    }

    /// Static width, and (at runtime) the exclusive upper bound as a power of two: 2^32 s reaches
    /// 2106, 2^42 ms reaches 2109, both comfortably within 53 bits once shifted by a small id.
    pub(crate) fn bits(self) -> u32 {
        match self {
            TimeUnit::Seconds => 32,
            TimeUnit::Millis => 42,
        }
    }

    pub(crate) fn micros_per_unit(self) -> i128 {
        match self {
            TimeUnit::Seconds => 1_000_000,
            TimeUnit::Millis => 1_000,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Node {
    Lit(u64),
    /// Index into `ScoreExpr::columns`.
    Col(usize),
    Epoch {
        col: usize,
        unit: TimeUnit,
    },
    Bits {
        col: usize,
        n: u32,
    },
    Shl(Box<Node>, u32),
    Mul(Box<Node>, u64),
    Or(Box<Node>, Box<Node>),
    Add(Box<Node>, Box<Node>),
}

/// A syntax error: where (byte offset into the expression) and what was expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at {at}: {message}")]
pub struct ScoreParseError {
    pub(crate) at: usize,
    pub(crate) message: String,
}

impl ScoreExpr {
    pub(crate) fn parse(source: &str) -> Result<ScoreExpr, ScoreParseError> {
        let mut parser = Parser {
            src: source,
            pos: 0,
            depth: 0,
            nodes: 0,
            columns: Vec::new(),
        };
        let root = parser.or()?;
        let end = parser.peek()?;
        if end.tok != Tok::End {
            return Err(parser.expected(&end, "'|', '+', '<<', '*' or the end of the expression"));
        }
        Ok(ScoreExpr {
            source: source.to_string(),
            columns: parser.columns,
            root,
        })
    }

    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Distinct column names in first-appearance order. `eval` takes values in this order.
    pub(crate) fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Whether retention (dropping members older than a window) is possible: the expression is
    /// `epoch(c)` / `epoch_ms(c)` alone, or a top-level `|` or `+` chain of one such time term
    /// and other terms without one, where those other terms only ever occupy bits above the
    /// time term's (e.g. `(device_id << 32) | epoch(ts)`).
    pub(crate) fn supports_retention(&self) -> bool {
        self.retention_shape().is_some()
    }

    /// The form that makes retention possible, or None; `plan::mirror::score` turns it into the
    /// score range to drop.
    pub(crate) fn retention_shape(&self) -> Option<RetentionShape<'_>> {
        if let Some((_, unit)) = time_term(&self.root) {
            return Some(RetentionShape::Alone(unit));
        }
        let op = match self.root {
            Node::Or(..) => BinOp::Or,
            Node::Add(..) => BinOp::Add,
            _ => return None,
        };
        // `|` and `+` are associative and commutative, so `T | a | b` is `(a | b) | T`.
        let mut operands = Vec::new();
        flatten(&self.root, op, &mut operands);
        let mut unit = None;
        let mut others = Vec::new();
        for node in operands {
            if let Some((_, u)) = time_term(node) {
                if unit.replace(u).is_some() {
                    return None;
                }
            } else if contains_time(node) {
                return None;
            } else {
                others.push(node);
            }
        }
        let unit = unit?;
        // The range [X, X + cutoff) only holds this segment's members if X never touches the
        // time term's bits: otherwise `|` would merge X into the time, and with `+` the
        // segments of neighbouring X values would overlap and retention would drop recent
        // members of another segment.
        if others
            .iter()
            .any(|node| trailing_zero_bits(node) < unit.bits())
        {
            return None;
        }
        Some(RetentionShape::Segmented { op, others, unit })
    }
}

/// The operator of a top-level `|` or `+` chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Or,
    Add,
}

pub(crate) enum RetentionShape<'a> {
    /// `epoch(c)` or `epoch_ms(c)` alone.
    Alone(TimeUnit),
    /// One time term combined by `op` with `others`, all of which stay above its bits.
    Segmented {
        op: BinOp,
        others: Vec<&'a Node>,
        unit: TimeUnit,
    },
}

fn flatten<'a>(node: &'a Node, op: BinOp, out: &mut Vec<&'a Node>) {
    match (node, op) {
        (Node::Or(a, b), BinOp::Or) | (Node::Add(a, b), BinOp::Add) => {
            flatten(a, op, out);
            flatten(b, op, out);
        }
        _ => out.push(node),
    }
}

fn time_term(node: &Node) -> Option<(usize, TimeUnit)> {
    match node {
        Node::Epoch { col, unit } => Some((*col, *unit)),
        _ => None,
    }
}

fn contains_time(node: &Node) -> bool {
    match node {
        Node::Epoch { .. } => true,
        Node::Lit(_) | Node::Col(_) | Node::Bits { .. } => false,
        Node::Shl(a, _) | Node::Mul(a, _) => contains_time(a),
        Node::Or(a, b) | Node::Add(a, b) => contains_time(a) || contains_time(b),
    }
}

/// How many low bits are zero whatever the row; 128 stands for "always zero".
fn trailing_zero_bits(node: &Node) -> u32 {
    match node {
        Node::Lit(0) => 128,
        Node::Lit(v) => v.trailing_zeros(),
        Node::Col(_) | Node::Epoch { .. } | Node::Bits { .. } => 0,
        Node::Shl(a, k) => trailing_zero_bits(a).saturating_add(*k).min(128),
        Node::Mul(_, 0) => 128,
        Node::Mul(a, k) => trailing_zero_bits(a)
            .saturating_add(k.trailing_zeros())
            .min(128),
        Node::Or(a, b) | Node::Add(a, b) => trailing_zero_bits(a).min(trailing_zero_bits(b)),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Int(u64),
    /// An unquoted identifier: a column, or a function name when `(` follows.
    Word(String),
    Quoted(String),
    LParen,
    RParen,
    Comma,
    Pipe,
    Plus,
    Shl,
    Star,
    End,
}

struct Token {
    tok: Tok,
    start: usize,
    end: usize,
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
    nodes: usize,
    columns: Vec<String>,
}

impl Parser<'_> {
    fn error(&self, at: usize, message: String) -> ScoreParseError {
        ScoreParseError { at, message }
    }

    fn describe(&self, token: &Token) -> String {
        match &token.tok {
            Tok::End => "the end of the expression".to_string(),
            _ => format!("'{}'", &self.src[token.start..token.end]),
        }
    }

    fn expected(&self, found: &Token, what: &str) -> ScoreParseError {
        self.error(
            found.start,
            format!("expected {what}, found {}", self.describe(found)),
        )
    }

    /// Lexes the token at `pos` without consuming it.
    fn peek(&self) -> Result<Token, ScoreParseError> {
        let src = self.src;
        let mut start = self.pos;
        while let Some(c) = src[start..].chars().next() {
            if !c.is_whitespace() {
                break;
            }
            start += c.len_utf8();
        }
        let rest = &src[start..];
        let Some(c) = rest.chars().next() else {
            return Ok(Token {
                tok: Tok::End,
                start,
                end: start,
            });
        };
        let single = |tok| {
            Ok(Token {
                tok,
                start,
                end: start + 1,
            })
        };
        match c {
            '(' => single(Tok::LParen),
            ')' => single(Tok::RParen),
            ',' => single(Tok::Comma),
            '|' => single(Tok::Pipe),
            '+' => single(Tok::Plus),
            '*' => single(Tok::Star),
            '<' if rest.starts_with("<<") => Ok(Token {
                tok: Tok::Shl,
                start,
                end: start + 2,
            }),
            '<' => Err(self.error(start, "expected '<<' (shift), found a single '<'".into())),
            '0'..='9' => self.number(start),
            'A'..='Z' | 'a'..='z' | '_' => {
                let len = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                Ok(Token {
                    tok: Tok::Word(rest[..len].to_string()),
                    start,
                    end: start + len,
                })
            }
            '"' => self.quoted(start),
            other => Err(self.error(
                start,
                format!(
                    "unexpected character {other:?}; expected a number, a column, a function or \
                     '('"
                ),
            )),
        }
    }

    fn number(&self, start: usize) -> Result<Token, ScoreParseError> {
        let rest = &self.src[start..];
        let (digits_at, radix) = if rest.starts_with("0x") || rest.starts_with("0X") {
            (2, 16)
        } else {
            (0, 10)
        };
        let body = &rest[digits_at..];
        let len = body
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        let digits = &body[..len];
        let end = start + digits_at + len;
        let text = &rest[..digits_at + len];
        if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
            return Err(self.error(
                start,
                format!(
                    "malformed integer '{text}'; write decimal digits or 0x followed by hex digits"
                ),
            ));
        }
        match u64::from_str_radix(digits, radix) {
            Ok(v) => Ok(Token {
                tok: Tok::Int(v),
                start,
                end,
            }),
            Err(_) => Err(self.error(
                start,
                format!("integer '{text}' is too large (more than 64 bits)"),
            )),
        }
    }

    fn quoted(&self, start: usize) -> Result<Token, ScoreParseError> {
        let mut name = String::new();
        let mut chars = self.src[start + 1..].char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c != '"' {
                name.push(c);
                continue;
            }
            if chars.peek().map(|(_, c)| *c) == Some('"') {
                chars.next();
                name.push('"');
                continue;
            }
            if name.is_empty() {
                return Err(self.error(start, "empty quoted column name \"\"".into()));
            }
            return Ok(Token {
                tok: Tok::Quoted(name),
                start,
                end: start + 1 + i + 1,
            });
        }
        Err(self.error(
            start,
            "unterminated quoted column name; expected a closing '\"' (write \"\" for a quote \
             inside the name)"
                .into(),
        ))
    }

    fn bump(&mut self, token: &Token) {
        self.pos = token.end;
    }

    fn node(&mut self, at: usize, node: Node) -> Result<Node, ScoreParseError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(self.error(
                at,
                format!("expression too long (more than {MAX_NODES} terms)"),
            ));
        }
        Ok(node)
    }

    fn column(&mut self, name: String) -> usize {
        match self.columns.iter().position(|c| *c == name) {
            Some(i) => i,
            None => {
                self.columns.push(name);
                self.columns.len() - 1
            }
        }
    }

    fn or(&mut self) -> Result<Node, ScoreParseError> {
        let mut left = self.add()?;
        loop {
            let t = self.peek()?;
            if t.tok != Tok::Pipe {
                return Ok(left);
            }
            self.bump(&t);
            let right = self.add()?;
            left = self.node(t.start, Node::Or(Box::new(left), Box::new(right)))?;
        }
    }

    fn add(&mut self) -> Result<Node, ScoreParseError> {
        let mut left = self.shift()?;
        loop {
            let t = self.peek()?;
            if t.tok != Tok::Plus {
                return Ok(left);
            }
            self.bump(&t);
            let right = self.shift()?;
            left = self.node(t.start, Node::Add(Box::new(left), Box::new(right)))?;
        }
    }

    fn shift(&mut self) -> Result<Node, ScoreParseError> {
        let mut left = self.mul()?;
        loop {
            let t = self.peek()?;
            if t.tok != Tok::Shl {
                return Ok(left);
            }
            self.bump(&t);
            let k = self.peek()?;
            let Tok::Int(amount) = k.tok else {
                return Err(self.expected(
                    &k,
                    "an integer literal after '<<' (shift amounts are constants 0..=63)",
                ));
            };
            if amount > 63 {
                return Err(self.error(
                    k.start,
                    format!("shift by {amount} is too large; shift amounts are 0..=63"),
                ));
            }
            self.bump(&k);
            left = self.node(t.start, Node::Shl(Box::new(left), amount as u32))?;
        }
    }

    fn mul(&mut self) -> Result<Node, ScoreParseError> {
        let mut left = self.atom()?;
        loop {
            let t = self.peek()?;
            if t.tok != Tok::Star {
                return Ok(left);
            }
            self.bump(&t);
            let k = self.peek()?;
            let Tok::Int(factor) = k.tok else {
                return Err(self.expected(
                    &k,
                    "an integer literal after '*' (multipliers are non-negative constants)",
                ));
            };
            self.bump(&k);
            left = self.node(t.start, Node::Mul(Box::new(left), factor))?;
        }
    }

    fn atom(&mut self) -> Result<Node, ScoreParseError> {
        let t = self.peek()?;
        match t.tok {
            Tok::Int(v) => {
                self.bump(&t);
                self.node(t.start, Node::Lit(v))
            }
            Tok::Quoted(ref name) => {
                self.bump(&t);
                let col = self.column(name.clone());
                self.node(t.start, Node::Col(col))
            }
            Tok::Word(ref word) => {
                self.bump(&t);
                let after = self.peek()?;
                let is_call = after.tok == Tok::LParen;
                match word.as_str() {
                    "epoch" if is_call => self.call(t.start, after, Call::Epoch(TimeUnit::Seconds)),
                    "epoch_ms" if is_call => {
                        self.call(t.start, after, Call::Epoch(TimeUnit::Millis))
                    }
                    "bits" if is_call => self.call(t.start, after, Call::Bits),
                    _ => {
                        let col = self.column(word.clone());
                        self.node(t.start, Node::Col(col))
                    }
                }
            }
            Tok::LParen => {
                self.depth += 1;
                if self.depth > MAX_NESTING {
                    return Err(self.error(
                        t.start,
                        format!("parentheses nested more than {MAX_NESTING} deep"),
                    ));
                }
                self.bump(&t);
                let inner = self.or()?;
                let close = self.peek()?;
                if close.tok != Tok::RParen {
                    return Err(self.expected(
                        &close,
                        &format!(
                            "')' to close the '(' at {}, or an operator ('|', '+', '<<', '*')",
                            t.start
                        ),
                    ));
                }
                self.bump(&close);
                self.depth -= 1;
                Ok(inner)
            }
            _ => Err(self.expected(
                &t,
                "a number, a column, epoch(column), epoch_ms(column), bits(column, N) or '('",
            )),
        }
    }

    /// `name(` has been seen (`open` is the `(`); parses the arguments and `)`.
    fn call(&mut self, start: usize, open: Token, call: Call) -> Result<Node, ScoreParseError> {
        self.bump(&open);
        let name = self.src[start..open.start].trim_end().to_string();
        let arg = self.peek()?;
        let column = match arg.tok {
            Tok::Word(ref c) | Tok::Quoted(ref c) => c.clone(),
            _ => {
                return Err(self.expected(&arg, &format!("a column name inside {name}(")));
            }
        };
        self.bump(&arg);
        let column_name = column.clone();
        let col = self.column(column);
        let node = match call {
            Call::Epoch(unit) => Node::Epoch { col, unit },
            Call::Bits => {
                let comma = self.peek()?;
                if comma.tok != Tok::Comma {
                    return Err(self.expected(
                        &comma,
                        &format!("',' and a bit count after {}", self.so_far(start)),
                    ));
                }
                self.bump(&comma);
                let count = self.peek()?;
                let Tok::Int(n) = count.tok else {
                    return Err(self.expected(
                        &count,
                        &format!("the bit count (1..=53) of bits({column_name}, N)"),
                    ));
                };
                if !(1..=u64::from(EXACT_BITS)).contains(&n) {
                    return Err(self.error(
                        count.start,
                        format!(
                            "bit count {n} in {name}(...) is out of range; it must be 1..=53, \
                             the bits a Redis score holds exactly"
                        ),
                    ));
                }
                self.bump(&count);
                Node::Bits { col, n: n as u32 }
            }
        };
        let close = self.peek()?;
        if close.tok != Tok::RParen {
            return Err(self.error(
                close.start,
                format!(
                    "expected ')' after {}, found {}",
                    self.so_far(start),
                    self.describe(&close)
                ),
            ));
        }
        self.bump(&close);
        self.node(start, node)
    }

    /// The source from `start` to the last consumed token, to quote in an error.
    fn so_far(&self, start: usize) -> &str {
        self.src[start..self.pos].trim_end()
    }
}

#[derive(Clone, Copy)]
enum Call {
    Epoch(TimeUnit),
    Bits,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn parse(s: &str) -> ScoreExpr {
        ScoreExpr::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn columns_are_distinct_in_order_and_quoted_names_work() {
        let e = parse(r#"("Weird ""Col""" << 1) + epoch(t) + bits(x, 3) + "Weird ""Col""""#);
        assert_eq!(e.columns(), ["Weird \"Col\"", "t", "x"]);
        let e = parse("epoch + bits + epoch_ms");
        assert_eq!(e.columns(), ["epoch", "bits", "epoch_ms"]);
        let e = parse(" epoch ( \"ts\" ) ");
        assert_eq!(e.columns(), ["ts"]);
        assert!(e.supports_retention());
    }

    /// Forms that allow no retention range (shared with the range tests in plan).
    pub(crate) const WITHOUT_RETENTION: [&str; 8] = [
        "id",
        "epoch(a) + epoch(b)",
        "(epoch(a) << 32) | b",
        "epoch(a) | b",
        "(d << 31) | epoch(a)",
        "(d << 32) + epoch(a) | e",
        "(d << 32) * 3",
        "epoch(a) * 2",
    ];

    #[test]
    fn retention_needs_one_time_term_below_the_other_terms() {
        for s in [
            "epoch(ts)",
            "epoch_ms(ts)",
            "(device_id << 32) | epoch(ts)",
            "epoch(ts) + (device_id << 32)",
            "epoch(ts) | (d << 40) | (e << 32)",
            "(d << 40) + epoch(ts) + e * 0x100000000",
            "epoch_ms(ts) | (bits(d, 11) << 42)",
        ] {
            assert!(parse(s).supports_retention(), "{s}");
        }
        for s in WITHOUT_RETENTION {
            assert!(!parse(s).supports_retention(), "{s}");
        }
    }

    #[test]
    fn parse_errors_name_offset_and_expectation() {
        let err = |s: &str| ScoreExpr::parse(s).unwrap_err().to_string();
        assert_eq!(
            err("(device_id << 32) | epoch(ts"),
            "at 28: expected ')' after epoch(ts, found the end of the expression"
        );
        assert_eq!(
            err("epoch(ts x"),
            "at 9: expected ')' after epoch(ts, found 'x'"
        );
        assert_eq!(
            err("a |"),
            "at 3: expected a number, a column, epoch(column), epoch_ms(column), \
             bits(column, N) or '(', found the end of the expression"
        );
        assert_eq!(
            err("a << b"),
            "at 5: expected an integer literal after '<<' (shift amounts are constants 0..=63), \
             found 'b'"
        );
        assert_eq!(
            err("a << 64"),
            "at 5: shift by 64 is too large; shift amounts are 0..=63"
        );
        assert_eq!(
            err("a * b"),
            "at 4: expected an integer literal after '*' (multipliers are non-negative \
             constants), found 'b'"
        );
        assert_eq!(
            err("bits(x, 54)"),
            "at 8: bit count 54 in bits(...) is out of range; it must be 1..=53, the bits a \
             Redis score holds exactly"
        );
        assert!(err("bits(x, 0)").starts_with("at 8: bit count 0"));
        assert_eq!(
            err("bits(x)"),
            "at 6: expected ',' and a bit count after bits(x, found ')'"
        );
        assert_eq!(
            err("bits(x, y)"),
            "at 8: expected the bit count (1..=53) of bits(x, N), found 'y'"
        );
        assert_eq!(
            err("epoch(1)"),
            "at 6: expected a column name inside epoch(, found '1'"
        );
        assert_eq!(
            err("(a | b"),
            "at 6: expected ')' to close the '(' at 0, or an operator ('|', '+', '<<', '*'), \
             found the end of the expression"
        );
        assert_eq!(
            err("a b"),
            "at 2: expected '|', '+', '<<', '*' or the end of the expression, found 'b'"
        );
        assert_eq!(
            err("a < 3"),
            "at 2: expected '<<' (shift), found a single '<'"
        );
        assert!(err("a - 3").starts_with("at 2: unexpected character '-'"));
        assert!(err("12ab").starts_with("at 0: malformed integer '12ab'"));
        assert!(err("0x").starts_with("at 0: malformed integer '0x'"));
        assert!(err("0xfg").starts_with("at 0: malformed integer"));
        assert!(err("99999999999999999999").contains("too large"));
        assert!(err("a | \"b").starts_with("at 4: unterminated quoted column name"));
        assert!(err("\"\"").starts_with("at 0: empty quoted column name"));
        assert!(err("").starts_with("at 0: expected a number"));
        assert!(err("   ").starts_with("at 3: expected a number"));
        assert!(err(")").starts_with("at 0: expected a number"));
        assert!(err("a | é").starts_with("at 4: unexpected character 'é'"));
        assert_eq!(parse("0xFF + 0X10 + 007").columns().len(), 0);
    }

    #[test]
    fn limits_reject_instead_of_overflowing_the_stack() {
        let deep = format!("{}a{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(ScoreExpr::parse(&deep)
            .unwrap_err()
            .message
            .contains("nested"));
        let long = vec!["a"; 10_000].join(" | ");
        assert!(ScoreExpr::parse(&long)
            .unwrap_err()
            .message
            .contains("too long"));
        let shifts = format!("a{}", " << 1".repeat(10_000));
        assert!(ScoreExpr::parse(&shifts).is_err());
    }
}
