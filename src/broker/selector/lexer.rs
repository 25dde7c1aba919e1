//! Tokens of the selector text, each with its byte offset for error messages.
//!
//! Does not know precedence or types; a malformed literal (unterminated string,
//! `1.2.3`, out-of-range number) is rejected here.

use super::{error, SelectorError};

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    Ident(String),
    Str(String),
    /// An exact numeric literal's magnitude; the sign is a separate token.
    Int(u64),
    Float(f64),
    And,
    Or,
    Not,
    Between,
    Like,
    Escape,
    In,
    Is,
    Null,
    True,
    False,
    LParen,
    RParen,
    Comma,
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Plus,
    Minus,
    Star,
    Slash,
    Eof,
}

pub(super) fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Ident(s) => format!("identifier {s}"),
        Tok::Str(_) => "string literal".into(),
        Tok::Int(_) | Tok::Float(_) => "number".into(),
        Tok::Eof => "end of selector".into(),
        Tok::LParen => "'('".into(),
        Tok::RParen => "')'".into(),
        Tok::Comma => "','".into(),
        Tok::Eq => "'='".into(),
        Tok::Ne => "'<>'".into(),
        Tok::Lt => "'<'".into(),
        Tok::Gt => "'>'".into(),
        Tok::Le => "'<='".into(),
        Tok::Ge => "'>='".into(),
        Tok::Plus => "'+'".into(),
        Tok::Minus => "'-'".into(),
        Tok::Star => "'*'".into(),
        Tok::Slash => "'/'".into(),
        keyword => format!("{keyword:?}").to_uppercase(),
    }
}

/// Splits the text into tokens with their byte offsets, ending with `Eof`.
pub(super) fn lex(src: &str) -> Result<Vec<(Tok, usize)>, SelectorError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let (tok, len) = match b[i] {
            b' ' | b'\t' | b'\r' | b'\n' | 0x0c => {
                i += 1;
                continue;
            }
            b'(' => (Tok::LParen, 1),
            b')' => (Tok::RParen, 1),
            b',' => (Tok::Comma, 1),
            b'=' => (Tok::Eq, 1),
            b'+' => (Tok::Plus, 1),
            b'-' => (Tok::Minus, 1),
            b'*' => (Tok::Star, 1),
            b'/' => (Tok::Slash, 1),
            b'<' => match b.get(i + 1) {
                Some(b'>') => (Tok::Ne, 2),
                Some(b'=') => (Tok::Le, 2),
                _ => (Tok::Lt, 1),
            },
            b'>' => match b.get(i + 1) {
                Some(b'=') => (Tok::Ge, 2),
                _ => (Tok::Gt, 1),
            },
            b'\'' => lex_string(src, i)?,
            b'0'..=b'9' => lex_number(src, i)?,
            b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => lex_number(src, i)?,
            _ => lex_word(src, i)?,
        };
        out.push((tok, start));
        i += len;
    }
    out.push((Tok::Eof, src.len()));
    Ok(out)
}

/// `'...'` with `''` standing for one quote. Returns the token and its length in bytes.
fn lex_string(src: &str, start: usize) -> Result<(Tok, usize), SelectorError> {
    let mut value = String::new();
    let mut chars = src[start + 1..].char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if c != '\'' {
            value.push(c);
        } else if chars.peek().is_some_and(|&(_, n)| n == '\'') {
            value.push('\'');
            chars.next();
        } else {
            return Ok((Tok::Str(value), at + 2));
        }
    }
    Err(error(start, "unterminated string literal".into()))
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '$'
}

fn is_ident_part(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$' || c == '.'
}

/// An identifier or a keyword. Identifiers may contain `.` (`header.priority`).
fn lex_word(src: &str, start: usize) -> Result<(Tok, usize), SelectorError> {
    let rest = &src[start..];
    match rest.chars().next() {
        Some(c) if is_ident_start(c) => {}
        Some(c) => return Err(error(start, format!("unexpected character {c:?}"))),
        None => return Err(error(start, "unexpected end of selector".into())),
    }
    let len = rest.find(|c| !is_ident_part(c)).unwrap_or(rest.len());
    let word = &rest[..len];
    const KEYWORDS: [(&str, Tok); 11] = [
        ("AND", Tok::And),
        ("OR", Tok::Or),
        ("NOT", Tok::Not),
        ("BETWEEN", Tok::Between),
        ("LIKE", Tok::Like),
        ("ESCAPE", Tok::Escape),
        ("IN", Tok::In),
        ("IS", Tok::Is),
        ("NULL", Tok::Null),
        ("TRUE", Tok::True),
        ("FALSE", Tok::False),
    ];
    let tok = KEYWORDS
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(word))
        .map_or_else(|| Tok::Ident(word.to_owned()), |(_, t)| t.clone());
    Ok((tok, len))
}

/// Exact numerics: decimal, octal (`017`, as ActiveMQ/Artemis read it), hex (`0x1F`),
/// each with an optional `L`. Approximate: `1.5`, `.5`, `7.`, `1e3`, optional `F`/`D`.
fn lex_number(src: &str, start: usize) -> Result<(Tok, usize), SelectorError> {
    let b = src.as_bytes();
    let digits_from = |mut j: usize, radix: u32| {
        while b.get(j).is_some_and(|d| char::from(*d).is_digit(radix)) {
            j += 1;
        }
        j
    };
    let out_of_range = || error(start, "numeric literal out of range".into());
    if b[start] == b'0' && matches!(b.get(start + 1), Some(b'x' | b'X')) {
        let end = digits_from(start + 2, 16);
        if end == start + 2 {
            return Err(error(start, "hex literal without digits".into()));
        }
        let value = u64::from_str_radix(&src[start + 2..end], 16).map_err(|_| out_of_range())?;
        let end = skip_suffix(b, end, b"lL");
        return number_end(src, start, end).map(|len| (Tok::Int(value), len));
    }
    let int_end = digits_from(start, 10);
    let mut end = int_end;
    let mut frac = "";
    let mut exponent = "";
    let mut float = false;
    if b.get(end) == Some(&b'.') {
        float = true;
        let frac_end = digits_from(end + 1, 10);
        frac = &src[end + 1..frac_end];
        end = frac_end;
    }
    if matches!(b.get(end), Some(b'e' | b'E')) {
        float = true;
        let sign = usize::from(matches!(b.get(end + 1), Some(b'+' | b'-')));
        let exp_end = digits_from(end + 1 + sign, 10);
        if exp_end == end + 1 + sign {
            return Err(error(start, "exponent without digits".into()));
        }
        exponent = &src[end..exp_end];
        end = exp_end;
    }
    let int = &src[start..int_end];
    if float || matches!(b.get(end), Some(b'f' | b'F' | b'd' | b'D')) {
        // Rebuilt as `int.frac e exp` so every JMS spelling (`7.`, `.5`) parses.
        let int = if int.is_empty() { "0" } else { int };
        let frac = if frac.is_empty() { "0" } else { frac };
        let value: f64 = format!("{int}.{frac}{exponent}")
            .parse()
            .map_err(|_| error(start, "malformed numeric literal".into()))?;
        if !value.is_finite() {
            return Err(out_of_range());
        }
        let end = skip_suffix(b, end, b"fFdD");
        return number_end(src, start, end).map(|len| (Tok::Float(value), len));
    }
    let value = if int.len() > 1 && int.starts_with('0') {
        u64::from_str_radix(&int[1..], 8)
            .map_err(|_| error(start, "malformed octal literal".into()))?
    } else {
        int.parse::<u64>().map_err(|_| out_of_range())?
    };
    let end = skip_suffix(b, end, b"lL");
    number_end(src, start, end).map(|len| (Tok::Int(value), len))
}

fn skip_suffix(b: &[u8], at: usize, suffixes: &[u8]) -> usize {
    at + usize::from(b.get(at).is_some_and(|c| suffixes.contains(c)))
}

/// A number must not run into a letter, digit or dot (`1.2.3`, `12abc`, `0x1G`).
fn number_end(src: &str, start: usize, end: usize) -> Result<usize, SelectorError> {
    match src[end..].chars().next() {
        Some(c) if is_ident_part(c) => Err(error(start, "malformed numeric literal".into())),
        _ => Ok(end - start),
    }
}
