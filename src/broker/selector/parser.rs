//! A Pratt parser from tokens to [`Expr`], with the static type checks the JMS
//! specification asks for (`'a' + 1`, `x LIKE 5` and a non-boolean selector are errors).
//!
//! Recursion and tree height are bounded by [`MAX_DEPTH`]; types of identifiers are
//! unknown until evaluation and never rejected here.

use super::ast::{ArithOp, CmpOp, Expr, PatternElem};
use super::lexer::{describe, lex, Tok};
use super::{error, SelectorError, SelectorValue, MAX_DEPTH};

/// Parses a whole selector into its tree.
pub(super) fn parse(text: &str) -> Result<Expr, SelectorError> {
    let mut parser = Parser {
        tokens: lex(text)?,
        at: 0,
        depth: 0,
    };
    if parser.peek() == &Tok::Eof {
        return Err(error(0, "selector is empty".into()));
    }
    let root = parser.expr(0)?;
    let (tok, pos) = parser.next();
    if tok != Tok::Eof {
        return Err(error(
            pos,
            format!("unexpected {} after the selector", describe(&tok)),
        ));
    }
    require(&root, Kind::Bool, root.start)?;
    Ok(root.expr)
}

/// What an expression statically evaluates to; `Any` for identifiers and NULL.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Bool,
    Number,
    String,
    Any,
}

/// An expression with its tree height and where its text starts.
struct Node {
    expr: Expr,
    height: usize,
    start: usize,
}

// Binding powers, loosest first, per the JMS precedence table.
const BP_OR: u8 = 1;
const BP_AND: u8 = 3;
const BP_NOT: u8 = 5;
const BP_COMPARE: u8 = 7;
const BP_ADD: u8 = 9;
const BP_MUL: u8 = 11;
const BP_SIGN: u8 = 13;

struct Parser {
    tokens: Vec<(Tok, usize)>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        self.tokens.get(self.at).map_or(&Tok::Eof, |(t, _)| t)
    }

    fn pos(&self) -> usize {
        self.tokens.get(self.at).map_or(0, |&(_, p)| p)
    }

    fn next(&mut self) -> (Tok, usize) {
        match self.tokens.get(self.at) {
            Some(t) => {
                self.at += 1;
                t.clone()
            }
            None => (Tok::Eof, self.pos()),
        }
    }

    fn expect(&mut self, want: Tok, what: &str) -> Result<(), SelectorError> {
        let (tok, pos) = self.next();
        if tok == want {
            return Ok(());
        }
        Err(error(
            pos,
            format!("expected {what}, found {}", describe(&tok)),
        ))
    }

    fn expr(&mut self, min_bp: u8) -> Result<Node, SelectorError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(error(self.pos(), format!("nested deeper than {MAX_DEPTH}")));
        }
        let result = self.expr_loop(min_bp);
        self.depth -= 1;
        result
    }

    /// The Pratt loop: a prefix expression, then infix operators binding at least
    /// `min_bp`. All binary operators are left-associative.
    fn expr_loop(&mut self, min_bp: u8) -> Result<Node, SelectorError> {
        let mut lhs = self.prefix()?;
        loop {
            let bp = match self.peek() {
                Tok::Or => BP_OR,
                Tok::And => BP_AND,
                Tok::Eq | Tok::Ne | Tok::Lt | Tok::Gt | Tok::Le | Tok::Ge => BP_COMPARE,
                Tok::Like | Tok::In | Tok::Between | Tok::Is | Tok::Not => BP_COMPARE,
                Tok::Plus | Tok::Minus => BP_ADD,
                Tok::Star | Tok::Slash => BP_MUL,
                _ => return Ok(lhs),
            };
            if bp < min_bp {
                return Ok(lhs);
            }
            let (op, pos) = self.next();
            lhs = match op {
                Tok::Or | Tok::And => self.logical(lhs, &op, bp + 1)?,
                Tok::Plus | Tok::Minus | Tok::Star | Tok::Slash => {
                    self.arithmetic(lhs, &op, bp + 1)?
                }
                Tok::Eq | Tok::Ne | Tok::Lt | Tok::Gt | Tok::Le | Tok::Ge => {
                    let rhs = self.expr(bp + 1)?;
                    let cmp = compare_op(&op);
                    join(
                        lhs.start,
                        Expr::Compare(cmp, bx(lhs.expr), bx(rhs.expr)),
                        &[lhs.height, rhs.height],
                    )
                }
                _ => self.predicate(lhs, op, pos)?,
            };
            if lhs.height > MAX_DEPTH {
                return Err(error(pos, format!("nested deeper than {MAX_DEPTH}")));
            }
        }
    }

    fn prefix(&mut self) -> Result<Node, SelectorError> {
        let (tok, pos) = self.next();
        let leaf = |expr| {
            Ok(Node {
                expr,
                height: 1,
                start: pos,
            })
        };
        match tok {
            Tok::Not => {
                let operand = self.expr(BP_NOT)?;
                require(&operand, Kind::Bool, operand.start)?;
                Ok(join(pos, Expr::Not(bx(operand.expr)), &[operand.height]))
            }
            Tok::Minus if matches!(self.peek(), Tok::Int(_)) => {
                let magnitude = match self.next() {
                    (Tok::Int(m), _) => m,
                    _ => 0,
                };
                // Folded here so that -9223372036854775808 is in range.
                let value = 0i64
                    .checked_sub_unsigned(magnitude)
                    .ok_or_else(|| error(pos, "numeric literal out of range".into()))?;
                leaf(Expr::Literal(SelectorValue::Long(value)))
            }
            Tok::Minus | Tok::Plus => {
                let operand = self.expr(BP_SIGN)?;
                require(&operand, Kind::Number, operand.start)?;
                if tok == Tok::Plus {
                    return Ok(Node {
                        start: pos,
                        ..operand
                    });
                }
                Ok(join(pos, Expr::Neg(bx(operand.expr)), &[operand.height]))
            }
            Tok::LParen => {
                let inner = self.expr(0)?;
                self.expect(Tok::RParen, "')'")?;
                Ok(Node {
                    start: pos,
                    ..inner
                })
            }
            Tok::Int(v) => {
                let v = i64::try_from(v)
                    .map_err(|_| error(pos, "numeric literal out of range".into()))?;
                leaf(Expr::Literal(SelectorValue::Long(v)))
            }
            Tok::Float(v) => leaf(Expr::Literal(SelectorValue::Double(v))),
            Tok::Str(s) => leaf(Expr::Literal(SelectorValue::String(s))),
            Tok::True => leaf(Expr::Literal(SelectorValue::Bool(true))),
            Tok::False => leaf(Expr::Literal(SelectorValue::Bool(false))),
            Tok::Null => leaf(Expr::Literal(SelectorValue::Null)),
            Tok::Ident(name) => leaf(Expr::Ident(name)),
            other => Err(error(pos, format!("unexpected {}", describe(&other)))),
        }
    }

    fn logical(&mut self, lhs: Node, op: &Tok, rhs_bp: u8) -> Result<Node, SelectorError> {
        require(&lhs, Kind::Bool, lhs.start)?;
        let rhs = self.expr(rhs_bp)?;
        require(&rhs, Kind::Bool, rhs.start)?;
        let pair = 1 + lhs.height.max(rhs.height);
        let (expr, height) = match (op, lhs.expr) {
            // Same operator on the left: extend the chain instead of nesting.
            (Tok::And, Expr::And(mut all)) | (Tok::Or, Expr::Or(mut all)) => {
                all.push(rhs.expr);
                let chain = if *op == Tok::And {
                    Expr::And(all)
                } else {
                    Expr::Or(all)
                };
                (chain, lhs.height.max(rhs.height + 1))
            }
            (Tok::And, first) => (Expr::And(vec![first, rhs.expr]), pair),
            (_, first) => (Expr::Or(vec![first, rhs.expr]), pair),
        };
        Ok(Node {
            expr,
            height,
            start: lhs.start,
        })
    }

    fn arithmetic(&mut self, lhs: Node, op: &Tok, rhs_bp: u8) -> Result<Node, SelectorError> {
        require(&lhs, Kind::Number, lhs.start)?;
        let rhs = self.expr(rhs_bp)?;
        require(&rhs, Kind::Number, rhs.start)?;
        let op = match op {
            Tok::Plus => ArithOp::Add,
            Tok::Minus => ArithOp::Sub,
            Tok::Star => ArithOp::Mul,
            _ => ArithOp::Div,
        };
        let expr = Expr::Arith(op, bx(lhs.expr), bx(rhs.expr));
        Ok(join(lhs.start, expr, &[lhs.height, rhs.height]))
    }

    /// `[NOT] LIKE`, `[NOT] IN`, `[NOT] BETWEEN`, `IS [NOT] NULL`, after `op`.
    fn predicate(&mut self, lhs: Node, op: Tok, pos: usize) -> Result<Node, SelectorError> {
        let negated = op == Tok::Not;
        let op = if negated { self.next().0 } else { op };
        let start = lhs.start;
        let value = bx(lhs.expr);
        let expr = match op {
            Tok::Like => {
                require_kind(kind_of(&value), Kind::String, start)?;
                let pattern = self.like_pattern()?;
                Expr::Like {
                    value,
                    pattern,
                    negated,
                }
            }
            Tok::In => {
                require_kind(kind_of(&value), Kind::String, start)?;
                let list = self.in_list()?;
                Expr::In {
                    value,
                    list,
                    negated,
                }
            }
            Tok::Between => {
                require_kind(kind_of(&value), Kind::Number, start)?;
                let low = self.expr(BP_ADD)?;
                require(&low, Kind::Number, low.start)?;
                self.expect(Tok::And, "AND in BETWEEN")?;
                let high = self.expr(BP_ADD)?;
                require(&high, Kind::Number, high.start)?;
                let height = 1 + lhs.height.max(low.height).max(high.height);
                let expr = Expr::Between {
                    value,
                    low: bx(low.expr),
                    high: bx(high.expr),
                    negated,
                };
                return Ok(Node {
                    expr,
                    height,
                    start,
                });
            }
            Tok::Is if !negated => {
                let negated = *self.peek() == Tok::Not;
                if negated {
                    self.next();
                }
                self.expect(Tok::Null, "NULL after IS")?;
                Expr::IsNull { value, negated }
            }
            _ => return Err(error(pos, "expected LIKE, IN or BETWEEN after NOT".into())),
        };
        Ok(Node {
            expr,
            height: lhs.height + 1,
            start,
        })
    }

    fn string_literal(&mut self, what: &str) -> Result<(String, usize), SelectorError> {
        match self.next() {
            (Tok::Str(s), pos) => Ok((s, pos)),
            (other, pos) => Err(error(
                pos,
                format!(
                    "{what} must be a string literal, found {}",
                    describe(&other)
                ),
            )),
        }
    }

    fn like_pattern(&mut self) -> Result<Vec<PatternElem>, SelectorError> {
        let (pattern, pattern_pos) = self.string_literal("LIKE pattern")?;
        let mut escape = None;
        if *self.peek() == Tok::Escape {
            self.next();
            let (esc, pos) = self.string_literal("ESCAPE")?;
            let mut chars = esc.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => escape = Some(c),
                _ => return Err(error(pos, "ESCAPE must be exactly one character".into())),
            }
        }
        compile_like(&pattern, escape).ok_or_else(|| {
            error(
                pattern_pos,
                "LIKE pattern ends with its escape character".into(),
            )
        })
    }

    fn in_list(&mut self) -> Result<Vec<String>, SelectorError> {
        self.expect(Tok::LParen, "'(' after IN")?;
        let mut list = vec![self.string_literal("IN list item")?.0];
        while *self.peek() == Tok::Comma {
            self.next();
            list.push(self.string_literal("IN list item")?.0);
        }
        self.expect(Tok::RParen, "')' or ',' in IN list")?;
        Ok(list)
    }
}

fn bx(e: Expr) -> Box<Expr> {
    Box::new(e)
}

fn join(start: usize, expr: Expr, child_heights: &[usize]) -> Node {
    let height = 1 + child_heights.iter().copied().max().unwrap_or(0);
    Node {
        expr,
        height,
        start,
    }
}

fn compare_op(tok: &Tok) -> CmpOp {
    match tok {
        Tok::Eq => CmpOp::Eq,
        Tok::Ne => CmpOp::Ne,
        Tok::Lt => CmpOp::Lt,
        Tok::Gt => CmpOp::Gt,
        Tok::Le => CmpOp::Le,
        _ => CmpOp::Ge,
    }
}

fn kind_of(e: &Expr) -> Kind {
    match e {
        Expr::Literal(SelectorValue::Bool(_)) => Kind::Bool,
        Expr::Literal(SelectorValue::Long(_) | SelectorValue::Double(_)) => Kind::Number,
        Expr::Literal(SelectorValue::String(_)) => Kind::String,
        Expr::Literal(SelectorValue::Null) | Expr::Ident(_) => Kind::Any,
        Expr::Neg(_) | Expr::Arith(..) => Kind::Number,
        _ => Kind::Bool,
    }
}

/// Rejects `node` unless it can evaluate to `want`; identifiers and NULL always can.
fn require(node: &Node, want: Kind, at: usize) -> Result<(), SelectorError> {
    require_kind(kind_of(&node.expr), want, at)
}

fn require_kind(got: Kind, want: Kind, at: usize) -> Result<(), SelectorError> {
    if got == want || got == Kind::Any {
        return Ok(());
    }
    let name = |k: Kind| match k {
        Kind::Bool => "a boolean",
        Kind::Number => "a numeric",
        Kind::String => "a string",
        Kind::Any => "any",
    };
    Err(error(
        at,
        format!(
            "expected {} expression, found {} one",
            name(want),
            name(got)
        ),
    ))
}

/// `None` when the pattern ends with a lone escape character.
fn compile_like(pattern: &str, escape: Option<char>) -> Option<Vec<PatternElem>> {
    let mut out = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        out.push(match c {
            c if Some(c) == escape => PatternElem::Char(chars.next()?),
            '%' => PatternElem::Any,
            '_' => PatternElem::One,
            c => PatternElem::Char(c),
        });
    }
    Some(out)
}
