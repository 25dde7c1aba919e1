//! Single fields of an encoded `properties` section, read by hand.
//!
//! Decoding the whole section with serde (fe2o3-amqp-types' `Properties`) costs
//! about a microsecond and allocates every string it meets; the broker reads
//! `absolute-expiry-time` of every stored message that has a properties section
//! and needs nothing else from it on that path. [`absolute_expiry_time`] walks
//! the section's list (spec 3.2.4), skipping the eight fields before it by their
//! encoded size with [`skip_value`], and reads only the timestamp.
//!
//! Invariants: nothing here reads past the section or the list's own size
//! prefix, nothing allocates, and malformed input is a [`PropertiesError`],
//! never a panic.
//!
//! Does not: check the types of the fields it skips (a `message-id` that is a
//! list still lets the expiry be read; serde, via `MessageView::properties`,
//! rejects it), nor validate anything after `absolute-expiry-time`.

use serde_amqp::primitives::Timestamp;

use super::encoding::{
    byte_at, compound_bounds, need, read_descriptor, skip_value, Descriptor, EncodingError,
    DESCRIBED,
};

/// Numeric descriptor of the properties section.
pub const PROPERTIES_CODE: u64 = 0x73;
/// Symbolic descriptor of the properties section.
pub const PROPERTIES_SYMBOL: &[u8] = b"amqp:properties:list";
/// 0-based position of `absolute-expiry-time` in the properties list: after
/// message-id, user-id, to, subject, reply-to, correlation-id, content-type and
/// content-encoding.
pub const ABSOLUTE_EXPIRY_TIME_INDEX: usize = 8;

/// Format codes this reader distinguishes (spec 1.6).
const NULL: u8 = 0x40;
const LIST0: u8 = 0x45;
const LIST8: u8 = 0xc0;
const LIST32: u8 = 0xd0;
const TIMESTAMP: u8 = 0x83;
/// Width of a list8's size and count fields, and of a list32's.
const LIST8_WIDTH: usize = 1;
const LIST32_WIDTH: usize = 4;
/// Data bytes of a timestamp: milliseconds since the epoch as a big-endian i64.
const TIMESTAMP_LEN: usize = 8;

/// Why bytes are not a properties section whose expiry could be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PropertiesError {
    #[error("properties section: {0}")]
    Encoding(#[from] EncodingError),
    #[error("section at offset {offset} is not described by amqp:properties:list")]
    NotProperties { offset: usize },
    #[error("properties value at offset {offset} has format code {code:#04x}, not a list")]
    NotAList { code: u8, offset: usize },
    #[error(
        "absolute-expiry-time at offset {offset} has format code {code:#04x}, not a timestamp"
    )]
    NotATimestamp { code: u8, offset: usize },
}

/// The `absolute-expiry-time` of the encoded properties section `section`
/// (descriptor included), or `None` when the list stops before it or holds null.
pub fn absolute_expiry_time(section: &[u8]) -> Result<Option<Timestamp>, PropertiesError> {
    let list = list_start(section)?;
    let (items, end, count) = match byte_at(section, list)? {
        LIST0 => return Ok(None),
        LIST8 => compound_bounds(section, LIST8_WIDTH, list + 1)?,
        LIST32 => compound_bounds(section, LIST32_WIDTH, list + 1)?,
        code => return Err(PropertiesError::NotAList { code, offset: list }),
    };
    if count <= ABSOLUTE_EXPIRY_TIME_INDEX {
        return Ok(None);
    }
    // Items are read within the list's own size, never past it.
    let items_buf = &section[..end];
    let mut pos = items;
    for _ in 0..ABSOLUTE_EXPIRY_TIME_INDEX {
        pos = skip_value(items_buf, pos)?;
    }
    match byte_at(items_buf, pos)? {
        NULL => Ok(None),
        TIMESTAMP => {
            let data_end = need(items_buf, pos + 1, TIMESTAMP_LEN)?;
            let mut millis = [0u8; TIMESTAMP_LEN];
            millis.copy_from_slice(&items_buf[pos + 1..data_end]);
            Ok(Some(Timestamp::from_milliseconds(i64::from_be_bytes(
                millis,
            ))))
        }
        code => Err(PropertiesError::NotATimestamp { code, offset: pos }),
    }
}

/// Offset of the list constructor after the section's properties descriptor.
fn list_start(section: &[u8]) -> Result<usize, PropertiesError> {
    if byte_at(section, 0)? != DESCRIBED {
        return Err(PropertiesError::NotProperties { offset: 0 });
    }
    match read_descriptor(section, 1)? {
        (Descriptor::Code(PROPERTIES_CODE), list) => Ok(list),
        (Descriptor::Symbol(PROPERTIES_SYMBOL), list) => Ok(list),
        _ => Err(PropertiesError::NotProperties { offset: 0 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{MessageId, Properties};
    use serde_amqp::primitives::{Binary, Symbol, Uuid};

    /// Deterministic xorshift64 generator: every failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn some(&mut self) -> bool {
            self.below(3) != 0
        }

        /// Short and long (past str8/vbin8's 255 bytes) strings.
        fn text(&mut self) -> String {
            let len = match self.below(4) {
                0 => 0,
                1 | 2 => self.below(40) as usize,
                _ => 200 + self.below(200) as usize,
            };
            (0..len)
                .map(|i| char::from(b'a' + ((self.0 as usize + i) % 26) as u8))
                .collect()
        }

        fn timestamp(&mut self) -> Timestamp {
            Timestamp::from_milliseconds(self.next() as i64)
        }

        fn message_id(&mut self) -> MessageId {
            match self.below(4) {
                0 => MessageId::Ulong(self.next() >> self.below(64)),
                1 => {
                    let mut uuid = [0u8; 16];
                    uuid[..8].copy_from_slice(&self.next().to_be_bytes());
                    uuid[8..].copy_from_slice(&self.next().to_be_bytes());
                    MessageId::Uuid(Uuid::from(uuid))
                }
                2 => MessageId::Binary(Binary::from(self.text().into_bytes())),
                _ => MessageId::String(self.text()),
            }
        }

        fn properties(&mut self) -> Properties {
            Properties {
                message_id: self.some().then(|| self.message_id()),
                user_id: self.some().then(|| Binary::from(self.text().into_bytes())),
                to: self.some().then(|| self.text()),
                subject: self.some().then(|| self.text()),
                reply_to: self.some().then(|| self.text()),
                correlation_id: self.some().then(|| self.message_id()),
                content_type: self.some().then(|| Symbol::from(self.text())),
                content_encoding: self.some().then(|| Symbol::from(self.text())),
                absolute_expiry_time: self.some().then(|| self.timestamp()),
                creation_time: self.some().then(|| self.timestamp()),
                group_id: self.some().then(|| self.text()),
                group_sequence: self.some().then(|| self.next() as u32),
                reply_to_group_id: self.some().then(|| self.text()),
            }
        }
    }

    fn encode(properties: &Properties) -> Vec<u8> {
        serde_amqp::to_vec(properties).unwrap()
    }

    /// The serde path: what `MessageView::properties` decodes.
    fn oracle(bytes: &[u8]) -> Result<Option<Timestamp>, serde_amqp::Error> {
        serde_amqp::from_slice::<Properties>(bytes).map(|p| p.absolute_expiry_time)
    }

    #[test]
    fn hand_reader_agrees_with_serde_on_generated_properties() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let (mut with_expiry, mut list32) = (0, 0);
        for case in 0..3_000 {
            let properties = rng.properties();
            let bytes = encode(&properties);
            let expected = oracle(&bytes).unwrap();
            assert_eq!(expected, properties.absolute_expiry_time);
            assert_eq!(
                absolute_expiry_time(&bytes),
                Ok(expected.clone()),
                "case {case}: {properties:?}"
            );
            with_expiry += usize::from(expected.is_some());
            list32 += usize::from(bytes[3] == LIST32);
        }
        // The generator covers both outcomes and both list widths.
        assert!(with_expiry > 1_000 && with_expiry < 2_900, "{with_expiry}");
        assert!(list32 > 100 && list32 < 2_900, "{list32}");
    }

    #[test]
    fn empty_and_symbolic_encodings_are_understood() {
        assert_eq!(absolute_expiry_time(&[0x00, 0x53, 0x73, LIST0]), Ok(None));
        let empty = encode(&Properties::default());
        assert_eq!(absolute_expiry_time(&empty), Ok(None));

        // Symbolic descriptor; list32 of nine items: eight nulls, then the timestamp.
        let mut bytes = vec![0x00, 0xa3, PROPERTIES_SYMBOL.len() as u8];
        bytes.extend_from_slice(PROPERTIES_SYMBOL);
        let items: Vec<u8> = [[NULL; 8].as_slice(), &[TIMESTAMP], &42i64.to_be_bytes()].concat();
        bytes.push(LIST32);
        bytes.extend_from_slice(&(items.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(&9u32.to_be_bytes());
        bytes.extend_from_slice(&items);
        let expected = Some(Timestamp::from_milliseconds(42));
        assert_eq!(absolute_expiry_time(&bytes), Ok(expected.clone()));
        assert_eq!(oracle(&bytes).unwrap(), expected);
    }

    #[test]
    fn described_message_ids_are_skipped() {
        // message-id: a described string (descriptor ulong 0x01), then seven nulls.
        let mut items = vec![0x00, 0x53, 0x01, 0xa1, 0x03, b'a', b'b', b'c'];
        items.extend_from_slice(&[NULL; 7]);
        items.push(TIMESTAMP);
        items.extend_from_slice(&(-5i64).to_be_bytes());
        let mut bytes = vec![0x00, 0x53, 0x73, LIST8, items.len() as u8 + 1, 9];
        bytes.extend_from_slice(&items);
        assert_eq!(
            absolute_expiry_time(&bytes),
            Ok(Some(Timestamp::from_milliseconds(-5)))
        );
    }

    #[test]
    fn wrong_shapes_are_typed_errors() {
        assert!(matches!(
            absolute_expiry_time(&[0x00, 0x53, 0x70, LIST0]),
            Err(PropertiesError::NotProperties { offset: 0 })
        ));
        assert!(matches!(
            absolute_expiry_time(&[0x45]),
            Err(PropertiesError::NotProperties { offset: 0 })
        ));
        assert!(matches!(
            absolute_expiry_time(&[0x00, 0x53, 0x73, 0xa1, 0x00]),
            Err(PropertiesError::NotAList { code: 0xa1, .. })
        ));
        let mut bytes = vec![0x00, 0x53, 0x73, LIST8, 11, 9];
        bytes.extend_from_slice(&[NULL; 8]);
        bytes.extend_from_slice(&[0x52, 0x01]);
        assert!(matches!(
            absolute_expiry_time(&bytes),
            Err(PropertiesError::NotATimestamp { code: 0x52, .. })
        ));
        // A count of nine in a list whose size holds only eight items.
        let mut bytes = vec![0x00, 0x53, 0x73, LIST8, 9, 9];
        bytes.extend_from_slice(&[NULL; 8]);
        bytes.extend_from_slice(&[TIMESTAMP, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(matches!(
            absolute_expiry_time(&bytes),
            Err(PropertiesError::Encoding(EncodingError::Truncated { .. }))
        ));
    }

    #[test]
    fn truncated_and_garbage_bytes_are_errors_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..300 {
            let mut properties = rng.properties();
            properties.absolute_expiry_time = Some(rng.timestamp());
            let bytes = encode(&properties);
            for cut in 0..bytes.len() {
                assert!(absolute_expiry_time(&bytes[..cut]).is_err(), "cut {cut}");
            }
            for _ in 0..20 {
                let mut corrupt = bytes.clone();
                let at = rng.below(corrupt.len() as u64) as usize;
                corrupt[at] = rng.next() as u8;
                let _ = absolute_expiry_time(&corrupt);
            }
        }
        for _ in 0..20_000 {
            let len = rng.below(24) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if len > 3 && rng.some() {
                bytes[..3].copy_from_slice(&[0x00, 0x53, 0x73]);
            }
            let _ = absolute_expiry_time(&bytes);
        }
    }
}
