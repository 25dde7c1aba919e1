//! JMS message selectors, as carried by the AMQP source filter
//! `apache.org:selector-filter:string` (qpid-jms, Artemis).
//!
//! [`parse`] turns the selector text into an AST with a hand-written Pratt parser;
//! [`Selector::matches`] evaluates it against a message with SQL three-valued logic
//! (TRUE / FALSE / UNKNOWN): a message matches only when the result is TRUE, so with
//! `x` absent both `x = 1` and `NOT (x = 1)` are UNKNOWN and neither matches.
//!
//! Invariants:
//! * Parsing is bounded: the text is at most [`MAX_SELECTOR_LEN`] bytes and both the
//!   parser's recursion and the AST's height are at most [`MAX_DEPTH`], so hostile
//!   input can neither overflow the stack while parsing nor while evaluating.
//! * Evaluation never fails: type mismatches, missing fields and division by zero give
//!   UNKNOWN (NULL); integer overflow falls back to double instead of wrapping.
//! * Obvious type errors in the text (`'a' + 1`, `x LIKE 5`, `1 + 2` as a whole selector)
//!   are rejected at parse time, as the JMS specification asks.
//!
//! Not done here: attaching a selector to a link or a queue, and reading fields out of
//! an encoded message — callers decide what an identifier means through [`Fields`];
//! [`MessageFields`] maps decoded AMQP sections the way qpid-jms presents them.

mod ast;
mod eval;
mod lexer;
mod message_fields;
mod parser;

pub use message_fields::MessageFields;

/// Longest selector text accepted, in bytes. Real selectors are a few dozen bytes; this
/// bounds parse time and memory for a filter a client can send on every attach.
pub const MAX_SELECTOR_LEN: usize = 4096;

/// Deepest nesting accepted: parser recursion (parentheses, `NOT`, unary signs) and the
/// height of the resulting tree. `AND`/`OR` chains are flattened, so a long
/// `a = 1 OR a = 2 OR ...` stays shallow; a left-nested `1 + 1 + ...` chain does not.
pub const MAX_DEPTH: usize = 64;

/// A value a selector computes with. `Null` is SQL NULL and, for conditions, UNKNOWN.
#[derive(Debug, Clone, PartialEq)]
pub enum SelectorValue {
    Null,
    Bool(bool),
    Long(i64),
    Double(f64),
    String(String),
}

/// Resolves a selector identifier to the value it has for one message.
/// An absent field is [`SelectorValue::Null`]. Closures `Fn(&str) -> SelectorValue`
/// implement it too.
pub trait Fields {
    fn get(&self, name: &str) -> SelectorValue;
}

impl<F: Fn(&str) -> SelectorValue> Fields for F {
    fn get(&self, name: &str) -> SelectorValue {
        self(name)
    }
}

/// Why a selector was rejected; `position` is a byte offset into the selector text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at {position}")]
pub struct SelectorError {
    pub position: usize,
    pub message: String,
}

/// A parsed selector, ready to evaluate against any number of messages.
#[derive(Debug, Clone)]
pub struct Selector {
    text: String,
    root: ast::Expr,
}

impl Selector {
    /// True only when the selector evaluates to TRUE for `fields`.
    pub fn matches(&self, fields: &dyn Fields) -> bool {
        matches!(self.root.eval(fields), SelectorValue::Bool(true))
    }

    /// The selector as the client sent it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Parses a JMS selector. Keywords are case-insensitive, identifiers case-sensitive.
pub fn parse(text: &str) -> Result<Selector, SelectorError> {
    if text.len() > MAX_SELECTOR_LEN {
        return Err(error(
            MAX_SELECTOR_LEN,
            format!(
                "selector of {} bytes is longer than the limit of {MAX_SELECTOR_LEN}",
                text.len()
            ),
        ));
    }
    Ok(Selector {
        text: text.to_owned(),
        root: parser::parse(text)?,
    })
}

fn error(position: usize, message: String) -> SelectorError {
    SelectorError { position, message }
}

#[cfg(test)]
mod tests;
