//! The syntax tree [`super::parse`] builds and [`super::eval`] walks.

use super::SelectorValue;

/// One selector expression. Literals are typed at parse time; identifiers are
/// resolved at evaluation through [`super::Fields`].
#[derive(Debug, Clone)]
pub(super) enum Expr {
    Literal(SelectorValue),
    Ident(String),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    /// Flattened: `a AND b AND c` is one node, so long chains stay shallow.
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    Compare(CmpOp, Box<Expr>, Box<Expr>),
    Between {
        value: Box<Expr>,
        low: Box<Expr>,
        high: Box<Expr>,
        negated: bool,
    },
    In {
        value: Box<Expr>,
        list: Vec<String>,
        negated: bool,
    },
    Like {
        value: Box<Expr>,
        pattern: Vec<PatternElem>,
        negated: bool,
    },
    IsNull {
        value: Box<Expr>,
        negated: bool,
    },
}

#[derive(Debug, Clone, Copy)]
pub(super) enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum PatternElem {
    Char(char),
    /// `_`
    One,
    /// `%`
    Any,
}
