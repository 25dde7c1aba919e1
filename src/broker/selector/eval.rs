//! Evaluation of an [`Expr`] in SQL three-valued logic: booleans are `Bool`, UNKNOWN
//! is `Null`. Never fails and never panics; mismatched types give UNKNOWN.

use super::ast::{ArithOp, CmpOp, Expr, PatternElem};
use super::{Fields, SelectorValue};

use SelectorValue as V;

fn truth(v: &SelectorValue) -> Option<bool> {
    match v {
        V::Bool(b) => Some(*b),
        _ => None,
    }
}

fn tri(b: Option<bool>) -> SelectorValue {
    b.map_or(V::Null, V::Bool)
}

impl Expr {
    pub(super) fn eval(&self, f: &dyn Fields) -> SelectorValue {
        match self {
            Expr::Literal(v) => v.clone(),
            Expr::Ident(name) => f.get(name),
            Expr::Neg(e) => match e.eval(f) {
                V::Long(x) => x.checked_neg().map_or(V::Double(-(x as f64)), V::Long),
                V::Double(x) => V::Double(-x),
                _ => V::Null,
            },
            Expr::Not(e) => tri(truth(&e.eval(f)).map(|b| !b)),
            Expr::And(all) => tri(all_of(all, f, false)),
            Expr::Or(all) => tri(all_of(all, f, true)),
            Expr::Arith(op, a, b) => arith(*op, &a.eval(f), &b.eval(f)),
            Expr::Compare(op, a, b) => tri(compare(*op, &a.eval(f), &b.eval(f))),
            Expr::Between {
                value,
                low,
                high,
                negated,
            } => {
                let v = value.eval(f);
                let above = compare(CmpOp::Ge, &v, &low.eval(f));
                let below = compare(CmpOp::Le, &v, &high.eval(f));
                let inside = match (above, below) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                };
                tri(inside.map(|b| b != *negated))
            }
            Expr::In {
                value,
                list,
                negated,
            } => match value.eval(f) {
                V::String(s) => V::Bool(list.contains(&s) != *negated),
                _ => V::Null,
            },
            Expr::Like {
                value,
                pattern,
                negated,
            } => match value.eval(f) {
                V::String(s) => V::Bool(like(pattern, &s) != *negated),
                _ => V::Null,
            },
            Expr::IsNull { value, negated } => {
                V::Bool(matches!(value.eval(f), V::Null) != *negated)
            }
        }
    }
}

/// AND (`short_circuit == false`) or OR (`true`) in three-valued logic: the
/// short-circuit value wins, otherwise any UNKNOWN makes the result UNKNOWN.
fn all_of(all: &[Expr], f: &dyn Fields, short_circuit: bool) -> Option<bool> {
    let mut unknown = false;
    for e in all {
        match truth(&e.eval(f)) {
            Some(b) if b == short_circuit => return Some(b),
            Some(_) => {}
            None => unknown = true,
        }
    }
    if unknown {
        None
    } else {
        Some(!short_circuit)
    }
}

/// Long op long stays exact (falling back to double on overflow, as a JMS selector has
/// no overflow error); anything involving a double is double; else NULL.
fn arith(op: ArithOp, a: &SelectorValue, b: &SelectorValue) -> SelectorValue {
    if let (V::Long(x), V::Long(y)) = (a, b) {
        let (x, y) = (*x, *y);
        let exact = match op {
            ArithOp::Add => x.checked_add(y),
            ArithOp::Sub => x.checked_sub(y),
            ArithOp::Mul => x.checked_mul(y),
            ArithOp::Div if y == 0 => return V::Null,
            ArithOp::Div => x.checked_div(y),
        };
        if let Some(v) = exact {
            return V::Long(v);
        }
    }
    let (Some(x), Some(y)) = (as_double(a), as_double(b)) else {
        return V::Null;
    };
    match op {
        ArithOp::Add => V::Double(x + y),
        ArithOp::Sub => V::Double(x - y),
        ArithOp::Mul => V::Double(x * y),
        ArithOp::Div if y == 0.0 => V::Null,
        ArithOp::Div => V::Double(x / y),
    }
}

fn as_double(v: &SelectorValue) -> Option<f64> {
    match v {
        V::Long(x) => Some(*x as f64),
        V::Double(x) => Some(*x),
        _ => None,
    }
}

/// Numbers compare with long→double promotion; strings and booleans only with `=` and
/// `<>`; anything else, and any NULL, is UNKNOWN. NaN is unequal to everything.
fn compare(op: CmpOp, a: &SelectorValue, b: &SelectorValue) -> Option<bool> {
    use std::cmp::Ordering;
    let equality = |eq: bool| match op {
        CmpOp::Eq => Some(eq),
        CmpOp::Ne => Some(!eq),
        _ => None,
    };
    let ordering = match (a, b) {
        (V::Long(x), V::Long(y)) => Some(x.cmp(y)),
        (V::String(x), V::String(y)) => return equality(x == y),
        (V::Bool(x), V::Bool(y)) => return equality(x == y),
        _ => match (as_double(a), as_double(b)) {
            (Some(x), Some(y)) => x.partial_cmp(&y),
            _ => return None,
        },
    };
    let Some(ord) = ordering else {
        return Some(op == CmpOp::Ne);
    };
    Some(match op {
        CmpOp::Eq => ord == Ordering::Equal,
        CmpOp::Ne => ord != Ordering::Equal,
        CmpOp::Lt => ord == Ordering::Less,
        CmpOp::Gt => ord == Ordering::Greater,
        CmpOp::Le => ord != Ordering::Greater,
        CmpOp::Ge => ord != Ordering::Less,
    })
}

/// Wildcard match with one backtrack point for the last `%`: O(pattern × text).
fn like(pattern: &[PatternElem], text: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    let mut last_any: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(PatternElem::Any) => {
                last_any = Some((p, t));
                p += 1;
            }
            Some(PatternElem::One) => (p, t) = (p + 1, t + 1),
            Some(PatternElem::Char(c)) if *c == text[t] => (p, t) = (p + 1, t + 1),
            _ => match last_any {
                // Let the last `%` swallow one more character and retry.
                Some((ap, at)) => {
                    last_any = Some((ap, at + 1));
                    (p, t) = (ap + 1, at + 1);
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|e| *e == PatternElem::Any)
}
