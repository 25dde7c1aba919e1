//! Lazy view of a stored AMQP message, and the few rewrites a broker makes.
//!
//! A message is kept as the exact bytes its producer sent in its transfers
//! (`Bytes`). [`MessageView::parse`] walks the sections once, measuring each
//! with [`skip_value`] and remembering only their offsets; accessors then
//! decode just the section asked for. The body is never decoded.
//!
//! Invariants:
//! - Sections appear in spec order (3.2): header, delivery-annotations,
//!   message-annotations, properties, application-properties, body (data* |
//!   amqp-sequence* | one amqp-value), footer; each at most once.
//! - Rewrites ([`MessageView::with_delivery_count`],
//!   [`MessageView::with_annotations`]) re-encode only the section they change
//!   and return the rest as zero-copy slices of the original: the bare message
//!   stays byte-identical, as the spec requires of intermediaries.
//! - Every section is checked with [`check_nesting`] before serde_amqp sees it.
//!
//! Does not: validate the body's contents, strip delivery-annotations, or
//! decide TTL policy (it only reports `ttl` and `absolute-expiry-time`, the
//! latter read by hand in `properties.rs` rather than through serde).

use std::ops::Range;

use bytes::Bytes;
use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::{ApplicationProperties, Header, MessageAnnotations, Properties};
use serde::de::DeserializeOwned;
use serde_amqp::primitives::Timestamp;
use serde_amqp::Value;

use super::encoding::{
    byte_at, check_nesting, read_descriptor, skip_value, Descriptor, EncodingError, DESCRIBED,
};
use super::properties::{self, PropertiesError};

/// The sections of an annotated message, in the order the spec requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SectionKind {
    Header,
    DeliveryAnnotations,
    MessageAnnotations,
    Properties,
    ApplicationProperties,
    Data,
    AmqpSequence,
    AmqpValue,
    Footer,
}

impl SectionKind {
    fn from_descriptor(descriptor: Descriptor<'_>) -> Option<Self> {
        let kind = match descriptor {
            Descriptor::Code(0x70) | Descriptor::Symbol(b"amqp:header:list") => Self::Header,
            Descriptor::Code(0x71) | Descriptor::Symbol(b"amqp:delivery-annotations:map") => {
                Self::DeliveryAnnotations
            }
            Descriptor::Code(0x72) | Descriptor::Symbol(b"amqp:message-annotations:map") => {
                Self::MessageAnnotations
            }
            Descriptor::Code(0x73) | Descriptor::Symbol(b"amqp:properties:list") => {
                Self::Properties
            }
            Descriptor::Code(0x74) | Descriptor::Symbol(b"amqp:application-properties:map") => {
                Self::ApplicationProperties
            }
            Descriptor::Code(0x75) | Descriptor::Symbol(b"amqp:data:binary") => Self::Data,
            Descriptor::Code(0x76) | Descriptor::Symbol(b"amqp:amqp-sequence:list") => {
                Self::AmqpSequence
            }
            Descriptor::Code(0x77) | Descriptor::Symbol(b"amqp:amqp-value:*") => Self::AmqpValue,
            Descriptor::Code(0x78) | Descriptor::Symbol(b"amqp:footer:map") => Self::Footer,
            _ => return None,
        };
        Some(kind)
    }

    fn is_body(self) -> bool {
        matches!(self, Self::Data | Self::AmqpSequence | Self::AmqpValue)
    }

    /// Whether `next` may directly follow `prev` in a message.
    fn may_follow(prev: Option<Self>, next: Self) -> bool {
        match prev {
            None => true,
            // Body sections repeat (data, amqp-sequence) but never mix.
            Some(prev) if prev.is_body() && next.is_body() => {
                prev == next && next != Self::AmqpValue
            }
            Some(prev) => next > prev,
        }
    }
}

/// Why stored bytes are not a well-formed message, or a section would not
/// decode or encode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    #[error("message encoding: {0}")]
    Encoding(#[from] EncodingError),
    #[error("byte at offset {offset} does not start a described section")]
    NotASection { offset: usize },
    #[error("unknown section descriptor {descriptor} at offset {offset}")]
    UnknownSection { descriptor: String, offset: usize },
    #[error("{section:?} section at offset {offset} is out of order or repeated")]
    OutOfOrder { section: SectionKind, offset: usize },
    #[error("{section:?} section does not decode: {source}")]
    Decode {
        section: SectionKind,
        source: serde_amqp::Error,
    },
    #[error("{0}")]
    Properties(#[from] PropertiesError),
    #[error("{section:?} section does not encode: {source}")]
    Encode {
        section: SectionKind,
        source: serde_amqp::Error,
    },
}

/// Offsets of the sections of one message; the bytes are shared, not copied.
#[derive(Debug, Clone, Default)]
pub struct MessageView {
    bytes: Bytes,
    header: Option<Range<usize>>,
    delivery_annotations: Option<Range<usize>>,
    message_annotations: Option<Range<usize>>,
    properties: Option<Range<usize>>,
    application_properties: Option<Range<usize>>,
    /// From the first to the last body section, and which kind they are.
    body: Option<(SectionKind, Range<usize>)>,
    footer: Option<Range<usize>>,
}

/// One section's kind and byte range within the message.
fn read_section(bytes: &[u8], pos: usize) -> Result<(SectionKind, Range<usize>), MessageError> {
    if byte_at(bytes, pos)? != DESCRIBED {
        return Err(MessageError::NotASection { offset: pos });
    }
    let (descriptor, value_start) = read_descriptor(bytes, pos + 1)?;
    let kind =
        SectionKind::from_descriptor(descriptor).ok_or_else(|| MessageError::UnknownSection {
            descriptor: descriptor.to_string(),
            offset: pos,
        })?;
    let end = skip_value(bytes, value_start)?;
    Ok((kind, pos..end))
}

impl MessageView {
    /// Walks the sections of `bytes`, measuring each without decoding it.
    pub fn parse(bytes: Bytes) -> Result<Self, MessageError> {
        let mut view = Self {
            bytes,
            ..Self::default()
        };
        let mut pos = 0;
        let mut prev = None;
        while pos < view.bytes.len() {
            let (kind, range) = read_section(&view.bytes, pos)?;
            if !SectionKind::may_follow(prev, kind) {
                return Err(MessageError::OutOfOrder {
                    section: kind,
                    offset: pos,
                });
            }
            pos = range.end;
            view.record(kind, range);
            prev = Some(kind);
        }
        Ok(view)
    }

    fn record(&mut self, kind: SectionKind, range: Range<usize>) {
        let slot = match kind {
            SectionKind::Header => &mut self.header,
            SectionKind::DeliveryAnnotations => &mut self.delivery_annotations,
            SectionKind::MessageAnnotations => &mut self.message_annotations,
            SectionKind::Properties => &mut self.properties,
            SectionKind::ApplicationProperties => &mut self.application_properties,
            SectionKind::Footer => &mut self.footer,
            SectionKind::Data | SectionKind::AmqpSequence | SectionKind::AmqpValue => {
                let start = self.body.as_ref().map_or(range.start, |(_, r)| r.start);
                self.body = Some((kind, start..range.end));
                return;
            }
        };
        *slot = Some(range);
    }

    /// The whole message as received.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    fn range_of(&self, kind: SectionKind) -> Option<&Range<usize>> {
        match kind {
            SectionKind::Header => self.header.as_ref(),
            SectionKind::DeliveryAnnotations => self.delivery_annotations.as_ref(),
            SectionKind::MessageAnnotations => self.message_annotations.as_ref(),
            SectionKind::Properties => self.properties.as_ref(),
            SectionKind::ApplicationProperties => self.application_properties.as_ref(),
            SectionKind::Footer => self.footer.as_ref(),
            body => match &self.body {
                Some((kind, range)) if *kind == body => Some(range),
                _ => None,
            },
        }
    }

    /// Encoded bytes of one section (all body sections together for a body
    /// kind), as a zero-copy slice.
    pub fn section(&self, kind: SectionKind) -> Option<Bytes> {
        self.range_of(kind)
            .map(|range| self.bytes.slice(range.clone()))
    }

    /// Kind of the body sections, if the message has a body.
    pub fn body_kind(&self) -> Option<SectionKind> {
        self.body.as_ref().map(|(kind, _)| *kind)
    }

    /// The bare message (properties through body): immutable once sent.
    pub fn bare_message(&self) -> Bytes {
        let start = [&self.properties, &self.application_properties]
            .into_iter()
            .flatten()
            .map(|r| r.start)
            .chain(self.body.as_ref().map(|(_, r)| r.start))
            .next();
        let end = self.body.as_ref().map(|(_, r)| r.end).or_else(|| {
            let last = self
                .application_properties
                .as_ref()
                .or(self.properties.as_ref());
            last.map(|r| r.end)
        });
        match (start, end) {
            (Some(start), Some(end)) => self.bytes.slice(start..end),
            _ => Bytes::new(),
        }
    }

    fn decode<T: DeserializeOwned>(&self, kind: SectionKind) -> Result<Option<T>, MessageError> {
        let Some(range) = self.range_of(kind) else {
            return Ok(None);
        };
        let section = &self.bytes[range.clone()];
        check_nesting(section, 0)?;
        serde_amqp::from_slice(section)
            .map(Some)
            .map_err(|source| MessageError::Decode {
                section: kind,
                source,
            })
    }

    pub fn header(&self) -> Result<Option<Header>, MessageError> {
        self.decode(SectionKind::Header)
    }

    pub fn message_annotations(&self) -> Result<Option<MessageAnnotations>, MessageError> {
        self.decode(SectionKind::MessageAnnotations)
    }

    pub fn properties(&self) -> Result<Option<Properties>, MessageError> {
        self.decode(SectionKind::Properties)
    }

    pub fn application_properties(&self) -> Result<Option<ApplicationProperties>, MessageError> {
        self.decode(SectionKind::ApplicationProperties)
    }

    /// Header `ttl` in milliseconds, if set.
    pub fn ttl(&self) -> Result<Option<u32>, MessageError> {
        Ok(self.header()?.and_then(|header| header.ttl))
    }

    /// Header `durable`; false when there is no header (spec default).
    pub fn durable(&self) -> Result<bool, MessageError> {
        Ok(self.header()?.is_some_and(|header| header.durable))
    }

    /// Properties `absolute-expiry-time`, if set. Read by hand, without
    /// decoding the rest of the section (see [`properties::absolute_expiry_time`]);
    /// [`Self::properties`] gives the same value through serde.
    pub fn absolute_expiry_time(&self) -> Result<Option<Timestamp>, MessageError> {
        match self.range_of(SectionKind::Properties) {
            None => Ok(None),
            Some(range) => Ok(properties::absolute_expiry_time(
                &self.bytes[range.clone()],
            )?),
        }
    }

    /// The message with the header's `delivery-count` set to `n`, as chunks
    /// to be sent back to back: a re-encoded header, then the original bytes
    /// after it. Returns the original bytes alone when nothing changes.
    pub fn with_delivery_count(&self, n: u32) -> Result<Vec<Bytes>, MessageError> {
        let current = self.header()?;
        let unchanged = match &current {
            Some(header) => header.delivery_count == n,
            None => n == 0,
        };
        if unchanged {
            return Ok(vec![self.bytes.clone()]);
        }
        let mut header = current.unwrap_or_default();
        header.delivery_count = n;
        let encoded = encode_section(SectionKind::Header, &header)?;
        let rest_start = self.header.as_ref().map_or(0, |range| range.end);
        Ok(splice(
            encoded,
            self.bytes.slice(..0),
            self.bytes.slice(rest_start..),
        ))
    }

    /// The message with `entries` merged into its message-annotations
    /// (inserted after header and delivery-annotations if absent; existing
    /// keys are overwritten). Only that section is re-encoded.
    pub fn with_annotations(
        &self,
        entries: impl IntoIterator<Item = (OwnedKey, Value)>,
    ) -> Result<Vec<Bytes>, MessageError> {
        let mut annotations = self.message_annotations()?.unwrap_or_default();
        for (key, value) in entries {
            annotations.insert(key, value);
        }
        let encoded = encode_section(SectionKind::MessageAnnotations, &annotations)?;
        let cut = match &self.message_annotations {
            Some(range) => range.clone(),
            None => {
                let before = self.delivery_annotations.as_ref().or(self.header.as_ref());
                let at = before.map_or(0, |range| range.end);
                at..at
            }
        };
        let before = self.bytes.slice(..cut.start);
        Ok(splice(encoded, before, self.bytes.slice(cut.end..)))
    }
}

fn encode_section<T: serde::Serialize>(
    kind: SectionKind,
    value: &T,
) -> Result<Bytes, MessageError> {
    serde_amqp::to_vec(value)
        .map(Bytes::from)
        .map_err(|source| MessageError::Encode {
            section: kind,
            source,
        })
}

/// `before ++ middle ++ after`, leaving out empty chunks.
fn splice(middle: Bytes, before: Bytes, after: Bytes) -> Vec<Bytes> {
    [before, middle, after]
        .into_iter()
        .filter(|chunk| !chunk.is_empty())
        .collect()
}

/// Joins chunks into one buffer (copies; for storage or tests).
pub fn concat(chunks: &[Bytes]) -> Bytes {
    match chunks {
        [one] => one.clone(),
        _ => chunks.concat().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::message::__private::{Deserializable, Serializable};
    use fe2o3_amqp_types::messaging::{
        AmqpValue, Body, Data, DeliveryAnnotations, Footer, Message, SerializableBody,
    };
    use serde_amqp::primitives::{Binary, Symbol};

    fn encode<B: SerializableBody>(message: Message<B>) -> Bytes {
        Bytes::from(serde_amqp::to_vec(&Serializable(message)).unwrap())
    }

    fn decode(bytes: &[u8]) -> Message<Body<Value>> {
        let message: Deserializable<Message<Body<Value>>> = serde_amqp::from_slice(bytes).unwrap();
        message.0
    }

    fn full_message() -> Message<Data> {
        Message::builder()
            .header(Header {
                durable: true,
                ttl: Some(5_000),
                delivery_count: 2,
                ..Header::default()
            })
            .delivery_annotations(DeliveryAnnotations::builder().insert("x-da", 1i32).build())
            .message_annotations(
                MessageAnnotations::builder()
                    .insert("x-opt-partition", Value::String("p0".into()))
                    .build(),
            )
            .properties(
                Properties::builder()
                    .message_id(String::from("m-1"))
                    .subject("orders")
                    .absolute_expiry_time(Some(Timestamp::from_milliseconds(1_700_000_000_000)))
                    .build(),
            )
            .application_properties(ApplicationProperties::builder().insert("k", 7i64).build())
            .data(Binary::from(vec![0xde, 0xad, 0xbe, 0xef]))
            .footer(Footer::builder().insert("x-f", true).build())
            .build()
    }

    fn value_message() -> Bytes {
        encode(Message::builder().value("hello").build())
    }

    #[test]
    fn full_message_sections_and_accessors() {
        let bytes = encode(full_message());
        let view = MessageView::parse(bytes.clone()).unwrap();
        let header = view.header().unwrap().unwrap();
        assert_eq!(header.delivery_count, 2);
        assert_eq!(view.ttl().unwrap(), Some(5_000));
        assert!(view.durable().unwrap());
        assert_eq!(
            view.absolute_expiry_time().unwrap(),
            Some(Timestamp::from_milliseconds(1_700_000_000_000))
        );
        let properties = view.properties().unwrap().unwrap();
        assert_eq!(
            view.absolute_expiry_time().unwrap(),
            properties.absolute_expiry_time
        );
        assert_eq!(properties.subject.as_deref(), Some("orders"));
        let app = view.application_properties().unwrap().unwrap();
        assert_eq!(app.len(), 1);
        assert_eq!(view.body_kind(), Some(SectionKind::Data));
        let data = view.section(SectionKind::Data).unwrap();
        let Data(body) = serde_amqp::from_slice(&data).unwrap();
        assert_eq!(body.as_slice(), &[0xde, 0xad, 0xbe, 0xef]);
        let footer = view.section(SectionKind::Footer).unwrap();
        assert_eq!(footer.as_ptr_range().end, bytes.as_ptr_range().end);
        let bare = view.bare_message();
        let properties_start = view.section(SectionKind::Properties).unwrap();
        assert!(bare.starts_with(&properties_start));
        assert!(bare.ends_with(&data));
    }

    #[test]
    fn minimal_message_has_spec_defaults() {
        let view = MessageView::parse(value_message()).unwrap();
        assert!(view.header().unwrap().is_none());
        assert!(!view.durable().unwrap());
        assert_eq!(view.ttl().unwrap(), None);
        assert_eq!(view.absolute_expiry_time().unwrap(), None);
        assert_eq!(view.body_kind(), Some(SectionKind::AmqpValue));
        assert_eq!(view.bare_message(), view.bytes().clone());
    }

    #[test]
    fn repeated_data_sections_form_one_body() {
        let bytes = encode(
            Message::builder()
                .data_batch(vec![Binary::from(vec![1]), Binary::from(vec![2, 3])])
                .build(),
        );
        let view = MessageView::parse(bytes.clone()).unwrap();
        assert_eq!(view.section(SectionKind::Data).unwrap(), bytes);
    }

    #[test]
    fn delivery_count_rewrite_keeps_everything_else() {
        let bytes = encode(full_message());
        let view = MessageView::parse(bytes.clone()).unwrap();
        let chunks = view.with_delivery_count(3).unwrap();
        assert_eq!(chunks.len(), 2);
        let rest = &chunks[1];
        assert!(bytes.ends_with(rest));
        assert_eq!(
            rest.as_ptr_range().end,
            bytes.as_ptr_range().end,
            "zero copy"
        );

        let rewritten = concat(&chunks);
        let again = MessageView::parse(rewritten.clone()).unwrap();
        assert_eq!(again.header().unwrap().unwrap().delivery_count, 3);
        assert_eq!(again.bare_message(), view.bare_message());
        let mut expected = decode(&bytes);
        expected.header.as_mut().unwrap().delivery_count = 3;
        assert_eq!(decode(&rewritten), expected);

        let same = view.with_delivery_count(2).unwrap();
        assert_eq!(same.len(), 1);
        assert_eq!(same[0].as_ptr(), bytes.as_ptr());
    }

    #[test]
    fn delivery_count_inserts_a_header_only_when_needed() {
        let bytes = value_message();
        let view = MessageView::parse(bytes.clone()).unwrap();
        let zero = view.with_delivery_count(0).unwrap();
        assert_eq!(zero.len(), 1);
        assert_eq!(zero[0].as_ptr(), bytes.as_ptr());

        let chunks = view.with_delivery_count(1).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[1].as_ptr(), bytes.as_ptr());
        let rewritten = decode(&concat(&chunks));
        let header = rewritten.header.unwrap();
        assert_eq!(header.delivery_count, 1);
        assert_eq!(header.priority.0, 4, "other fields keep spec defaults");
        assert_eq!(
            rewritten.body,
            Body::Value(AmqpValue(Value::String("hello".into())))
        );
    }

    fn dead_letter_reason() -> (OwnedKey, Value) {
        (
            OwnedKey::from("x-opt-dead-letter-reason"),
            Value::Symbol(Symbol::from("expired")),
        )
    }

    #[test]
    fn annotations_merge_into_existing_section() {
        let bytes = encode(full_message());
        let view = MessageView::parse(bytes.clone()).unwrap();
        let chunks = view.with_annotations([dead_letter_reason()]).unwrap();
        assert_eq!(chunks.len(), 3);
        let ma = view.section(SectionKind::MessageAnnotations).unwrap();
        let ma_start = ma.as_ptr() as usize - bytes.as_ptr() as usize;
        assert_eq!(chunks[0], bytes.slice(..ma_start));
        assert_eq!(chunks[2], bytes.slice(ma_start + ma.len()..));

        let again = MessageView::parse(concat(&chunks)).unwrap();
        let annotations = again.message_annotations().unwrap().unwrap();
        assert_eq!(annotations.len(), 2);
        let (key, value) = dead_letter_reason();
        assert_eq!(annotations.get(&key), Some(&value));
        assert_eq!(again.bare_message(), view.bare_message());
    }

    #[test]
    fn annotations_are_inserted_after_the_header() {
        let message = Message::builder()
            .header(Header::default())
            .properties(Properties::builder().subject("s").build())
            .value(5i32)
            .build();
        let bytes = encode(message);
        let view = MessageView::parse(bytes.clone()).unwrap();
        let header_len = view.section(SectionKind::Header).unwrap().len();
        let chunks = view.with_annotations([dead_letter_reason()]).unwrap();
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0], bytes.slice(..header_len));
        assert_eq!(chunks[2], bytes.slice(header_len..));
        let again = MessageView::parse(concat(&chunks)).unwrap();
        assert!(again.message_annotations().unwrap().is_some());

        let bare = MessageView::parse(value_message()).unwrap();
        let chunks = bare.with_annotations([dead_letter_reason()]).unwrap();
        assert_eq!(chunks.len(), 2);
        assert!(MessageView::parse(concat(&chunks)).is_ok());
    }

    #[test]
    fn symbolic_section_descriptors_are_understood() {
        let mut bytes = vec![0x00, 0xa3, 16];
        bytes.extend_from_slice(b"amqp:header:list");
        bytes.extend_from_slice(&[0xc0, 0x02, 0x01, 0x41]);
        bytes.extend_from_slice(&value_message());
        let view = MessageView::parse(Bytes::from(bytes)).unwrap();
        assert!(view.durable().unwrap());
    }

    #[test]
    fn sections_out_of_order_are_rejected() {
        let header = encode(
            Message::builder()
                .header(Header::default())
                .value(1)
                .build(),
        );
        let header_len = MessageView::parse(header.clone())
            .unwrap()
            .section(SectionKind::Header)
            .unwrap()
            .len();
        let value = value_message();
        let data = encode(Message::builder().data(Binary::from(vec![1])).build());
        let cases = [
            [value.clone(), header.slice(..header_len)].concat(),
            [value.to_vec(), value.to_vec()].concat(),
            [data.to_vec(), value.to_vec()].concat(),
        ];
        for bytes in cases {
            assert!(matches!(
                MessageView::parse(Bytes::from(bytes)),
                Err(MessageError::OutOfOrder { .. })
            ));
        }
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(matches!(
            MessageView::parse(Bytes::from_static(&[0x45])),
            Err(MessageError::NotASection { offset: 0 })
        ));
        assert!(matches!(
            MessageView::parse(Bytes::from_static(&[0x00, 0x53, 0x79, 0x45])),
            Err(MessageError::UnknownSection { .. })
        ));
        assert!(matches!(
            MessageView::parse(Bytes::from_static(&[0x00, 0x53, 0x77, 0xa1, 0x09])),
            Err(MessageError::Encoding(EncodingError::Truncated { .. }))
        ));
    }

    fn exercise(bytes: Bytes) {
        if let Ok(view) = MessageView::parse(bytes) {
            let _ = view.header();
            let _ = view.properties();
            let _ = view.absolute_expiry_time();
            let _ = view.application_properties();
            let _ = view.message_annotations();
            let _ = view.bare_message();
            let _ = view.with_delivery_count(9);
            let _ = view.with_annotations([dead_letter_reason()]);
        }
    }

    #[test]
    fn truncated_and_corrupted_messages_never_panic() {
        let bytes = encode(full_message());
        for cut in 0..bytes.len() {
            exercise(bytes.slice(..cut));
        }
        let mut seed = 0x853c_49e6_748f_ea9bu64;
        for _ in 0..5_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut corrupt = bytes.to_vec();
            let at = (seed as usize) % corrupt.len();
            corrupt[at] = (seed >> 40) as u8;
            exercise(Bytes::from(corrupt));
        }
    }
}
