//! AMQP 1.0 type-system encoding measured, never decoded.
//!
//! Owns the table of format codes (how wide each primitive encoding is),
//! [`skip_value`] — the length of one encoded value, O(1) for compound values
//! thanks to their size prefixes — and [`check_nesting`], a bounded recursive
//! walk run before untrusted bytes reach `serde_amqp`, whose deserializer
//! recurses without a depth limit (a frame of nested `list8`s would otherwise
//! overflow the stack).
//!
//! Invariants: nothing here reads past the slice it is given, nothing
//! allocates, and every size or count prefix is checked against the bytes
//! actually present before it is used.
//!
//! Does not: decode values into Rust types (serde_amqp does that), or know
//! about frames and messages (`frame.rs`, `message.rs`).

/// Deepest nesting of described types, lists, maps and arrays accepted from
/// the wire. Real performatives and message sections nest a handful of levels.
pub const MAX_NESTING_DEPTH: usize = 32;

/// Format code introducing a described type: descriptor value, then value.
pub const DESCRIBED: u8 = 0x00;

/// Why a run of bytes is not a well-formed AMQP value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodingError {
    #[error("value truncated at offset {offset}")]
    Truncated { offset: usize },
    #[error("invalid format code {code:#04x} at offset {offset}")]
    InvalidFormatCode { code: u8, offset: usize },
    #[error("values nested deeper than {MAX_NESTING_DEPTH} levels at offset {offset}")]
    TooDeep { offset: usize },
    #[error("compound value at offset {offset} has inconsistent size and count")]
    BadCompound { offset: usize },
    #[error(
        "descriptor with format code {code:#04x} at offset {offset} is neither ulong nor symbol"
    )]
    InvalidDescriptor { code: u8, offset: usize },
    /// A map's count is its keys plus its values, so always even (spec 1.6.23).
    #[error("map at offset {offset} has an odd count {count}: a key without a value")]
    OddMapCount { count: usize, offset: usize },
}

/// How the bytes after a format code are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Width {
    /// A fixed number of data bytes.
    Fixed(usize),
    /// A size prefix of 1 or 4 bytes, then that many bytes of opaque data.
    Variable(usize),
    /// list/map: size prefix of 1 or 4 bytes, then count and encoded items.
    Compound(usize),
    /// array: size prefix of 1 or 4 bytes, then count, one constructor, items.
    Array(usize),
}

fn width_of(code: u8) -> Option<Width> {
    let width = match code {
        0x40..=0x45 => Width::Fixed(0),
        0x50..=0x56 => Width::Fixed(1),
        0x60 | 0x61 => Width::Fixed(2),
        0x70..=0x74 => Width::Fixed(4),
        0x80..=0x84 => Width::Fixed(8),
        0x94 | 0x98 => Width::Fixed(16),
        0xa0 | 0xa1 | 0xa3 => Width::Variable(1),
        0xb0 | 0xb1 | 0xb3 => Width::Variable(4),
        0xc0 | 0xc1 => Width::Compound(1),
        0xd0 | 0xd1 => Width::Compound(4),
        0xe0 => Width::Array(1),
        0xf0 => Width::Array(4),
        _ => return None,
    };
    Some(width)
}

/// Byte at `pos`, or `Truncated`.
pub fn byte_at(buf: &[u8], pos: usize) -> Result<u8, EncodingError> {
    buf.get(pos)
        .copied()
        .ok_or(EncodingError::Truncated { offset: pos })
}

/// `pos + len` if that many bytes are present from `pos`, else `Truncated`.
pub fn need(buf: &[u8], pos: usize, len: usize) -> Result<usize, EncodingError> {
    match pos.checked_add(len) {
        Some(end) if end <= buf.len() => Ok(end),
        _ => Err(EncodingError::Truncated { offset: pos }),
    }
}

/// Reads a big-endian size field of `width` (1 or 4) bytes at `pos`.
pub fn read_size(buf: &[u8], pos: usize, width: usize) -> Result<usize, EncodingError> {
    let end = need(buf, pos, width)?;
    let size = buf[pos..end]
        .iter()
        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    Ok(size)
}

/// Descriptor of a described type as found on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descriptor<'a> {
    Code(u64),
    Symbol(&'a [u8]),
}

impl std::fmt::Display for Descriptor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(code) => write!(f, "{code:#x}"),
            Self::Symbol(name) => write!(f, "{}", String::from_utf8_lossy(name)),
        }
    }
}

/// Reads the descriptor at `pos` (the byte after a 0x00 constructor); returns
/// it and the offset of the described value. Only `ulong` and `symbol`
/// descriptors exist in AMQP 1.0.
pub fn read_descriptor(buf: &[u8], pos: usize) -> Result<(Descriptor<'_>, usize), EncodingError> {
    let symbol = |width: usize| -> Result<(Descriptor<'_>, usize), EncodingError> {
        let len = read_size(buf, pos + 1, width)?;
        let end = need(buf, pos + 1 + width, len)?;
        Ok((Descriptor::Symbol(&buf[pos + 1 + width..end]), end))
    };
    match byte_at(buf, pos)? {
        0x44 => Ok((Descriptor::Code(0), pos + 1)),
        0x53 => Ok((Descriptor::Code(u64::from(byte_at(buf, pos + 1)?)), pos + 2)),
        0x80 => {
            let end = need(buf, pos + 1, 8)?;
            let code = buf[pos + 1..end]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            Ok((Descriptor::Code(code), end))
        }
        0xa3 => symbol(1),
        0xb3 => symbol(4),
        code => Err(EncodingError::InvalidDescriptor { code, offset: pos }),
    }
}

/// End offset of the single encoded value starting at `pos`.
///
/// Compound values are skipped by their size prefix without looking inside,
/// so this is O(1) per value except for chains of descriptors.
pub fn skip_value(buf: &[u8], pos: usize) -> Result<usize, EncodingError> {
    skip_at_depth(buf, pos, 0)
}

fn skip_at_depth(buf: &[u8], pos: usize, depth: usize) -> Result<usize, EncodingError> {
    let code = byte_at(buf, pos)?;
    if code == DESCRIBED {
        if depth >= MAX_NESTING_DEPTH {
            return Err(EncodingError::TooDeep { offset: pos });
        }
        let descriptor_end = skip_at_depth(buf, pos + 1, depth + 1)?;
        return skip_at_depth(buf, descriptor_end, depth + 1);
    }
    let width = width_of(code).ok_or(EncodingError::InvalidFormatCode { code, offset: pos })?;
    skip_body(buf, width, pos + 1)
}

/// End offset of a value's data given its layout and the offset after its code.
fn skip_body(buf: &[u8], width: Width, pos: usize) -> Result<usize, EncodingError> {
    match width {
        Width::Fixed(len) => need(buf, pos, len),
        Width::Variable(w) | Width::Compound(w) | Width::Array(w) => {
            let size = read_size(buf, pos, w)?;
            need(buf, pos + w, size)
        }
    }
}

/// Walks the value at `pos` and everything nested in it, returning its end.
///
/// Unlike [`skip_value`] this checks that every list, map and array holds
/// exactly the items its count announces and that nesting stays within
/// [`MAX_NESTING_DEPTH`]. Run it on untrusted bytes before serde_amqp.
pub fn check_nesting(buf: &[u8], pos: usize) -> Result<usize, EncodingError> {
    walk(buf, pos, 0)
}

fn walk(buf: &[u8], pos: usize, depth: usize) -> Result<usize, EncodingError> {
    if depth > MAX_NESTING_DEPTH {
        return Err(EncodingError::TooDeep { offset: pos });
    }
    let code = byte_at(buf, pos)?;
    if code == DESCRIBED {
        let descriptor_end = walk(buf, pos + 1, depth + 1)?;
        return walk(buf, descriptor_end, depth + 1);
    }
    walk_body(buf, code, pos, pos + 1, depth)
}

/// Walks the data of a value whose constructor `code` sits at `start` (or,
/// for array items, was given once by the array) and whose data begins at `pos`.
fn walk_body(
    buf: &[u8],
    code: u8,
    start: usize,
    pos: usize,
    depth: usize,
) -> Result<usize, EncodingError> {
    let invalid = EncodingError::InvalidFormatCode {
        code,
        offset: start,
    };
    match width_of(code).ok_or(invalid)? {
        Width::Compound(w) => walk_compound(buf, w, is_map(code), pos, depth),
        Width::Array(w) => walk_array(buf, w, pos, depth),
        width => skip_body(buf, width, pos),
    }
}

/// Size and count prefix of a compound or array whose size field of width `w`
/// (1 or 4) sits at `pos`: (items start, end, count). The end is checked
/// against `buf`; the count is not checked against the items.
pub fn compound_bounds(
    buf: &[u8],
    w: usize,
    pos: usize,
) -> Result<(usize, usize, usize), EncodingError> {
    let size = read_size(buf, pos, w)?;
    let end = need(buf, pos + w, size)?;
    if size < w {
        return Err(EncodingError::BadCompound { offset: pos });
    }
    let count = read_size(buf, pos + w, w)?;
    Ok((pos + 2 * w, end, count))
}

/// An item running past its container's end means the container's count lied.
fn item_error(error: EncodingError, container: usize) -> EncodingError {
    match error {
        EncodingError::Truncated { .. } => EncodingError::BadCompound { offset: container },
        other => other,
    }
}

/// map8 and map32, whose items are key/value pairs.
fn is_map(code: u8) -> bool {
    matches!(code, 0xc1 | 0xd1)
}

fn walk_compound(
    buf: &[u8],
    w: usize,
    map: bool,
    pos: usize,
    depth: usize,
) -> Result<usize, EncodingError> {
    let (mut cursor, end, count) = compound_bounds(buf, w, pos)?;
    if map && count % 2 != 0 {
        // serde_amqp counts a map down two items per entry: an odd count underflows.
        return Err(EncodingError::OddMapCount { count, offset: pos });
    }
    let items = &buf[..end];
    for _ in 0..count {
        // Every item takes at least its format code, so a lying count stops here.
        cursor = walk(items, cursor, depth + 1).map_err(|e| item_error(e, pos))?;
    }
    if cursor != end {
        return Err(EncodingError::BadCompound { offset: pos });
    }
    Ok(end)
}

fn walk_array(buf: &[u8], w: usize, pos: usize, depth: usize) -> Result<usize, EncodingError> {
    let (mut cursor, end, count) = compound_bounds(buf, w, pos)?;
    let items = &buf[..end];
    let ctor_start = cursor;
    let mut code = byte_at(items, cursor)?;
    cursor += 1;
    if code == DESCRIBED {
        cursor = walk(items, cursor, depth + 1)?;
        code = byte_at(items, cursor)?;
        cursor += 1;
    }
    if let Some(Width::Fixed(len)) = width_of(code) {
        // Fixed-width items: one multiplication, no per-item loop (a zero-width
        // element type would otherwise let a tiny frame demand 2^32 iterations).
        let total = count
            .checked_mul(len)
            .ok_or(EncodingError::BadCompound { offset: pos })?;
        cursor = need(items, cursor, total)?;
    } else {
        for _ in 0..count {
            cursor = walk_body(items, code, ctor_start, cursor, depth + 1)
                .map_err(|e| item_error(e, pos))?;
        }
    }
    if cursor != end {
        return Err(EncodingError::BadCompound { offset: pos });
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_amqp::{primitives::Array, to_vec, Value};

    fn encoded(value: &Value) -> Vec<u8> {
        to_vec(value).unwrap()
    }

    fn sample_values() -> Vec<Value> {
        use serde_amqp::primitives::{OrderedMap, Symbol};
        let mut map = OrderedMap::new();
        map.insert(Value::Symbol(Symbol::from("k")), Value::Long(-5));
        map.insert(Value::String("s".into()), Value::List(vec![Value::Null]));
        vec![
            Value::Null,
            Value::Bool(true),
            Value::Bool(false),
            Value::Ubyte(7),
            Value::Ushort(700),
            Value::Uint(0),
            Value::Uint(9),
            Value::Uint(70_000),
            Value::Ulong(0),
            Value::Ulong(1 << 40),
            Value::Int(-3),
            Value::Long(i64::MIN),
            Value::Double(1.5f64.into()),
            Value::Char('é'),
            Value::Timestamp(serde_amqp::primitives::Timestamp::from_milliseconds(5)),
            Value::Uuid([1u8; 16].into()),
            Value::Binary(vec![0u8; 300].into()),
            Value::String("x".repeat(10)),
            Value::Symbol(Symbol::from("sym")),
            Value::List(vec![]),
            Value::List(vec![Value::Uint(1), Value::String("a".repeat(300))]),
            Value::Map(map),
            Value::Array(Array::from(vec![Value::Int(1), Value::Int(2)])),
            Value::Array(Array::from(vec![
                Value::String("a".into()),
                Value::String("bb".into()),
            ])),
        ]
    }

    #[test]
    fn skip_and_check_agree_with_serde_for_every_sample() {
        for value in sample_values() {
            let bytes = encoded(&value);
            assert_eq!(skip_value(&bytes, 0), Ok(bytes.len()), "{value:?}");
            assert_eq!(check_nesting(&bytes, 0), Ok(bytes.len()), "{value:?}");
        }
    }

    #[test]
    fn truncation_is_reported_never_panics() {
        for value in sample_values() {
            let bytes = encoded(&value);
            for cut in 0..bytes.len() {
                assert!(skip_value(&bytes[..cut], 0).is_err(), "{value:?} cut {cut}");
                assert!(check_nesting(&bytes[..cut], 0).is_err());
            }
        }
    }

    #[test]
    fn described_value_skips_descriptor_and_value() {
        // descriptor smallulong 0x70, value list0
        let bytes = [0x00, 0x53, 0x70, 0x45, 0xff];
        assert_eq!(skip_value(&bytes, 0), Ok(4));
        assert_eq!(check_nesting(&bytes, 0), Ok(4));
    }

    #[test]
    fn descriptors_are_read_in_every_encoding() {
        let code = [0x80, 0, 0, 0, 0, 0, 0, 0, 0x70, 0x45];
        assert_eq!(read_descriptor(&code, 0), Ok((Descriptor::Code(0x70), 9)));
        let small = [0x53, 0x73];
        assert_eq!(read_descriptor(&small, 0), Ok((Descriptor::Code(0x73), 2)));
        let sym = [0xb3, 0, 0, 0, 2, b'a', b'b'];
        assert_eq!(read_descriptor(&sym, 0), Ok((Descriptor::Symbol(b"ab"), 7)));
        assert!(matches!(
            read_descriptor(&[0xa3, 5, b'a'], 0),
            Err(EncodingError::Truncated { .. })
        ));
        assert!(matches!(
            read_descriptor(&[0x41], 0),
            Err(EncodingError::InvalidDescriptor {
                code: 0x41,
                offset: 0
            })
        ));
    }

    #[test]
    fn unknown_format_code_is_rejected() {
        assert_eq!(
            skip_value(&[0x13], 0),
            Err(EncodingError::InvalidFormatCode {
                code: 0x13,
                offset: 0
            })
        );
    }

    #[test]
    fn deep_nesting_is_rejected_before_serde_sees_it() {
        // 100 nested list8s: c0 size 01 ... innermost list0.
        let depth = 100;
        let mut bytes = vec![0x45];
        for _ in 0..depth {
            let mut outer = vec![0xc0, (bytes.len() + 1) as u8, 0x01];
            outer.extend_from_slice(&bytes);
            if outer.len() > 255 {
                break;
            }
            bytes = outer;
        }
        assert!(skip_value(&bytes, 0).is_ok(), "shallow skip ignores depth");
        assert!(matches!(
            check_nesting(&bytes, 0),
            Err(EncodingError::TooDeep { .. })
        ));
        let chain = vec![0x00; 200];
        assert!(matches!(
            skip_value(&chain, 0),
            Err(EncodingError::TooDeep { .. })
        ));
    }

    #[test]
    fn lying_counts_are_rejected() {
        // list8 size 3, count 5, two nulls.
        let bytes = [0xc0, 0x03, 0x05, 0x40, 0x40];
        assert_eq!(skip_value(&bytes, 0), Ok(5));
        assert!(matches!(
            check_nesting(&bytes, 0),
            Err(EncodingError::BadCompound { offset: 1 })
        ));
        // array32 of nulls claiming 2^32-1 items in 5 bytes of content.
        let bytes = [0xf0, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0x40];
        assert_eq!(check_nesting(&bytes, 0), Ok(bytes.len()));
        // array8 of uints claiming more items than bytes.
        let bytes = [0xe0, 0x03, 0x09, 0x70, 0x00];
        assert!(check_nesting(&bytes, 0).is_err());
    }

    /// Found by the `message_sections` fuzzer: serde_amqp takes a map's entries two items at a
    /// time and its count underflowed (a panic with overflow checks on).
    #[test]
    fn odd_map_counts_are_rejected_before_serde_sees_them() {
        // map8 size 2, count 1, one null: a key without a value.
        let bytes = [0xc1, 0x02, 0x01, 0x40];
        assert!(matches!(
            check_nesting(&bytes, 0),
            Err(EncodingError::OddMapCount {
                count: 1,
                offset: 1
            })
        ));
        // The same map as the item of an array of maps.
        let bytes = [0xe0, 0x05, 0x01, 0xc1, 0x02, 0x01, 0x40];
        assert!(matches!(
            check_nesting(&bytes, 0),
            Err(EncodingError::OddMapCount { count: 1, .. })
        ));
        // An even count passes.
        let bytes = [0xc1, 0x03, 0x02, 0x40, 0x40];
        assert_eq!(check_nesting(&bytes, 0), Ok(bytes.len()));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let bytes = seed.to_le_bytes();
            let _ = skip_value(&bytes, 0);
            let _ = check_nesting(&bytes, 0);
        }
    }
}
