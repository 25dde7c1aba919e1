//! AMQP 1.0 framing, server side: protocol headers, frames, performatives.
//!
//! Owns the byte layout of the transport: the 8-byte protocol headers, the
//! 8-byte frame header, splitting a frame body into its performative and its
//! payload, and encoding frames, including a hand-written fast path for the
//! `transfer` performative so outgoing deliveries never go through serde.
//!
//! Invariants:
//! - A frame's declared size is checked against the negotiated max-frame-size
//!   before a single byte of its body is buffered; the read buffer never grows
//!   past one maximal frame.
//! - Frame bodies and transfer payloads are `Bytes` slices of the read buffer:
//!   zero copy from the socket to the queue.
//! - Only the performative (a described list) is decoded, and only after a
//!   bounded walk ([`check_nesting`]) proved it well formed; the payload is
//!   never looked at.
//!
//! Does not: perform I/O, track connection/session state, enforce which frame
//! type is legal when (SASL before AMQP, payload only on `transfer`), or split
//! large deliveries across frames — the connection and link own those.
// Format: frame = { size: u32 | doff: u8 | type: u8 | channel: u16 | ext: (doff*4-8) bytes | body }

use bytes::{BufMut, Bytes, BytesMut};
use fe2o3_amqp_types::definitions::{AmqpError, ConnectionError, ErrorCondition};
use fe2o3_amqp_types::performatives::Performative;
use fe2o3_amqp_types::sasl::{SaslChallenge, SaslInit, SaslMechanisms, SaslOutcome, SaslResponse};
use serde::Serialize;

use super::encoding::{
    byte_at, check_nesting, need, read_descriptor, read_size, Descriptor, EncodingError, DESCRIBED,
};

/// Protocol header a client sends to speak plain AMQP 1.0.0.
pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// Protocol header a client sends to start the SASL layer.
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// Protocol header a client sends to start TLS (not supported in-band).
pub const TLS_HEADER: [u8; 8] = *b"AMQP\x02\x01\x00\x00";
/// Length of every protocol header.
pub const PROTOCOL_HEADER_LEN: usize = 8;

/// Length of the fixed frame header: size, doff, type, channel.
pub const FRAME_HEADER_LEN: usize = 8;
/// Smallest max-frame-size a peer may negotiate, and the limit in force
/// before `open` is exchanged (spec 2.7.1 `MIN-MAX-FRAME-SIZE`).
pub const MIN_MAX_FRAME_SIZE: u32 = 512;
/// Largest max-frame-size this server ever accepts, whatever is configured:
/// it bounds the read buffer of every connection.
pub const MAX_FRAME_SIZE_LIMIT: u32 = 16 * 1024 * 1024;
/// Longest delivery tag allowed by the spec (2.8.7 `delivery-tag`).
pub const MAX_DELIVERY_TAG_LEN: usize = 32;

const _: () = assert!(MIN_MAX_FRAME_SIZE <= MAX_FRAME_SIZE_LIMIT);
const _: () = assert!(FRAME_HEADER_LEN as u32 <= MIN_MAX_FRAME_SIZE);

const FRAME_TYPE_AMQP: u8 = 0x00;
const FRAME_TYPE_SASL: u8 = 0x01;
/// doff of every frame we write: no extended header.
const DOFF_NO_EXTENDED_HEADER: u8 = 2;

/// What the 8 bytes a client opened with ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolHeader {
    Amqp,
    Sasl,
    Tls,
    /// Not AMQP, or an unsupported version: reply with our header and close.
    Invalid,
}

/// Classifies the protocol header a client sent.
pub fn classify_protocol_header(bytes: &[u8; PROTOCOL_HEADER_LEN]) -> ProtocolHeader {
    match *bytes {
        AMQP_HEADER => ProtocolHeader::Amqp,
        SASL_HEADER => ProtocolHeader::Sasl,
        TLS_HEADER => ProtocolHeader::Tls,
        _ => ProtocolHeader::Invalid,
    }
}

/// Which layer a frame belongs to (frame header byte 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Amqp,
    Sasl,
}

/// One whole frame, extended header already skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub channel: u16,
    pub kind: FrameKind,
    /// Performative followed by payload; empty for a heartbeat.
    pub body: Bytes,
}

impl Frame {
    /// An empty AMQP frame: only resets the peer's idle timer.
    pub fn is_heartbeat(&self) -> bool {
        self.kind == FrameKind::Amqp && self.body.is_empty()
    }
}

/// Why bytes from the peer could not be framed, or a frame not encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds max-frame-size {max}")]
    FrameTooLarge { size: u64, max: u32 },
    #[error("frame size {size} is smaller than the frame header")]
    FrameTooSmall { size: u32 },
    #[error("data offset {doff} is invalid for a frame of {size} bytes")]
    BadDoff { doff: u8, size: u32 },
    #[error("unknown frame type {frame_type:#04x}")]
    UnknownFrameType { frame_type: u8 },
    #[error("frame body is empty where a performative was expected")]
    EmptyBody,
    #[error("malformed frame body: {reason}")]
    Malformed { reason: &'static str },
    #[error("malformed performative encoding: {0}")]
    Encoding(#[from] EncodingError),
    #[error("descriptor {descriptor} is not a {expected} frame body")]
    UnexpectedDescriptor {
        descriptor: String,
        expected: &'static str,
    },
    #[error("performative does not decode: {0}")]
    Decode(#[source] serde_amqp::Error),
    #[error("performative does not encode: {0}")]
    Encode(#[source] serde_amqp::Error),
    #[error("delivery tag of {len} bytes exceeds {MAX_DELIVERY_TAG_LEN}")]
    DeliveryTagTooLong { len: usize },
}

impl FrameError {
    /// The condition the connection closes with when this error ends it.
    pub fn condition(&self) -> ErrorCondition {
        match self {
            Self::FrameTooLarge { .. }
            | Self::FrameTooSmall { .. }
            | Self::BadDoff { .. }
            | Self::UnknownFrameType { .. } => ConnectionError::FramingError.into(),
            Self::EmptyBody
            | Self::Malformed { .. }
            | Self::Encoding(_)
            | Self::UnexpectedDescriptor { .. }
            | Self::Decode(_) => AmqpError::DecodeError.into(),
            // Failing to encode our own frame is our bug, not the peer's.
            Self::Encode(_) | Self::DeliveryTagTooLong { .. } => AmqpError::InternalError.into(),
        }
    }

    /// The `error` to put in the closing `close` performative.
    pub fn to_amqp_error(&self) -> fe2o3_amqp_types::definitions::Error {
        fe2o3_amqp_types::definitions::Error::new(self.condition(), self.to_string(), None)
    }
}

/// Cuts whole frames off a connection's read buffer.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    /// Largest frame accepted, header included; `MIN_MAX_FRAME_SIZE` until
    /// `open` negotiates more.
    max_frame_size: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MIN_MAX_FRAME_SIZE)
    }
}

impl FrameDecoder {
    /// A decoder accepting frames up to `max_frame_size` bytes, clamped to
    /// `MIN_MAX_FRAME_SIZE..=MAX_FRAME_SIZE_LIMIT`.
    pub fn new(max_frame_size: u32) -> Self {
        Self {
            max_frame_size: max_frame_size.clamp(MIN_MAX_FRAME_SIZE, MAX_FRAME_SIZE_LIMIT),
        }
    }

    pub fn max_frame_size(&self) -> u32 {
        self.max_frame_size
    }

    /// Applies the max-frame-size this server announced in its `open`.
    pub fn set_max_frame_size(&mut self, max_frame_size: u32) {
        *self = Self::new(max_frame_size);
    }

    /// Splits the next whole frame off `buf`, or `Ok(None)` if more bytes are
    /// needed (the buffer is then reserved to hold the whole frame).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        self.check_size(size)?;
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let (kind, body_offset) = parse_header(buf, size)?;
        let size = size as usize;
        if buf.len() < size {
            buf.reserve(size - buf.len());
            return Ok(None);
        }
        let channel = u16::from_be_bytes([buf[6], buf[7]]);
        let frame = buf.split_to(size).freeze();
        Ok(Some(Frame {
            channel,
            kind,
            body: frame.slice(body_offset..),
        }))
    }

    fn check_size(&self, size: u32) -> Result<(), FrameError> {
        if size < FRAME_HEADER_LEN as u32 {
            return Err(FrameError::FrameTooSmall { size });
        }
        if size > self.max_frame_size {
            return Err(FrameError::FrameTooLarge {
                size: u64::from(size),
                max: self.max_frame_size,
            });
        }
        Ok(())
    }
}

/// Validates doff and type of a frame header; returns the kind and the offset
/// of the body (past any extended header).
fn parse_header(header: &[u8], size: u32) -> Result<(FrameKind, usize), FrameError> {
    let doff = header[4];
    let body_offset = usize::from(doff) * 4;
    if doff < DOFF_NO_EXTENDED_HEADER || body_offset > size as usize {
        return Err(FrameError::BadDoff { doff, size });
    }
    let kind = match header[5] {
        FRAME_TYPE_AMQP => FrameKind::Amqp,
        FRAME_TYPE_SASL => FrameKind::Sasl,
        frame_type => return Err(FrameError::UnknownFrameType { frame_type }),
    };
    Ok((kind, body_offset))
}

/// Reads the descriptor and measures the described list at the start of a
/// frame body: returns the descriptor and the encoded length of the list.
pub fn described_list(body: &[u8]) -> Result<(Descriptor<'_>, usize), FrameError> {
    if body.is_empty() {
        return Err(FrameError::EmptyBody);
    }
    if byte_at(body, 0)? != DESCRIBED {
        return Err(FrameError::Malformed {
            reason: "frame body does not start with a described type",
        });
    }
    let (descriptor, list_start) = read_descriptor(body, 1)?;
    Ok((descriptor, list_end(body, list_start)?))
}

fn list_end(body: &[u8], pos: usize) -> Result<usize, FrameError> {
    let end = match byte_at(body, pos)? {
        0x45 => pos + 1,
        0xc0 => need(body, pos + 2, read_size(body, pos + 1, 1)?)?,
        0xd0 => need(body, pos + 5, read_size(body, pos + 1, 4)?)?,
        _ => {
            return Err(FrameError::Malformed {
                reason: "performative is not encoded as a list",
            })
        }
    };
    Ok(end)
}

/// Measures and validates the performative at the start of `body`; returns
/// its descriptor and encoded length.
fn checked_performative(body: &[u8]) -> Result<(Descriptor<'_>, usize), FrameError> {
    let (descriptor, len) = described_list(body)?;
    check_nesting(&body[..len], 0)?;
    Ok((descriptor, len))
}

/// Splits an AMQP frame body into its performative and its payload. The
/// payload is a slice of `body` and is never decoded. Transfers, dispositions
/// and flows are read by hand where they can be (`hot.rs`, the same result);
/// the rest, and anything unusual, through serde_amqp after [`check_nesting`].
pub fn split_performative(body: &Bytes) -> Result<(Performative, Bytes), FrameError> {
    let (performative, len) = match super::hot::decode(body) {
        Some(read) => read,
        None => decode_performative(body)?,
    };
    Ok((performative, body.slice(len..)))
}

/// The performative at the start of `body` and its encoded length, through serde_amqp
/// after [`check_nesting`]: the path of everything `hot.rs` does not read, and what its
/// result is compared with (tests, fuzzing, the codec bench).
pub fn decode_performative(body: &[u8]) -> Result<(Performative, usize), FrameError> {
    let (_, len) = checked_performative(body)?;
    let performative = serde_amqp::from_slice(&body[..len]).map_err(FrameError::Decode)?;
    Ok((performative, len))
}

/// A SASL frame body (spec 5.3.3).
#[derive(Debug, Clone)]
pub enum SaslFrame {
    Mechanisms(SaslMechanisms),
    Init(SaslInit),
    Challenge(SaslChallenge),
    Response(SaslResponse),
    Outcome(SaslOutcome),
}

impl Serialize for SaslFrame {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Mechanisms(value) => value.serialize(serializer),
            Self::Init(value) => value.serialize(serializer),
            Self::Challenge(value) => value.serialize(serializer),
            Self::Response(value) => value.serialize(serializer),
            Self::Outcome(value) => value.serialize(serializer),
        }
    }
}

fn sasl_code(descriptor: Descriptor<'_>) -> Option<u64> {
    match descriptor {
        Descriptor::Code(code) => Some(code),
        Descriptor::Symbol(b"amqp:sasl-mechanisms:list") => Some(0x40),
        Descriptor::Symbol(b"amqp:sasl-init:list") => Some(0x41),
        Descriptor::Symbol(b"amqp:sasl-challenge:list") => Some(0x42),
        Descriptor::Symbol(b"amqp:sasl-response:list") => Some(0x43),
        Descriptor::Symbol(b"amqp:sasl-outcome:list") => Some(0x44),
        Descriptor::Symbol(_) => None,
    }
}

/// Decodes a SASL frame body. SASL frames carry no payload.
pub fn decode_sasl(body: &[u8]) -> Result<SaslFrame, FrameError> {
    let (descriptor, len) = checked_performative(body)?;
    if len != body.len() {
        return Err(FrameError::Malformed {
            reason: "bytes after the SASL frame body",
        });
    }
    let bytes = &body[..len];
    let decode_error = FrameError::Decode;
    let frame = match sasl_code(descriptor) {
        Some(0x40) => SaslFrame::Mechanisms(serde_amqp::from_slice(bytes).map_err(decode_error)?),
        Some(0x41) => SaslFrame::Init(serde_amqp::from_slice(bytes).map_err(decode_error)?),
        Some(0x42) => SaslFrame::Challenge(serde_amqp::from_slice(bytes).map_err(decode_error)?),
        Some(0x43) => SaslFrame::Response(serde_amqp::from_slice(bytes).map_err(decode_error)?),
        Some(0x44) => SaslFrame::Outcome(serde_amqp::from_slice(bytes).map_err(decode_error)?),
        _ => {
            return Err(FrameError::UnexpectedDescriptor {
                descriptor: descriptor.to_string(),
                expected: "SASL",
            })
        }
    };
    Ok(frame)
}

/// Writes a frame header with a placeholder size; returns where it starts.
fn begin_frame(buf: &mut BytesMut, frame_type: u8, channel: u16) -> usize {
    let start = buf.len();
    buf.put_u32(0);
    buf.put_u8(DOFF_NO_EXTENDED_HEADER);
    buf.put_u8(frame_type);
    buf.put_u16(channel);
    start
}

/// Patches the size of the frame that starts at `start`; returns its length.
/// On failure the partial frame is removed from `buf`.
fn finish_frame(buf: &mut BytesMut, start: usize) -> Result<usize, FrameError> {
    let len = buf.len() - start;
    let Ok(size) = u32::try_from(len) else {
        buf.truncate(start);
        return Err(FrameError::FrameTooLarge {
            size: len as u64,
            max: u32::MAX,
        });
    };
    buf[start..start + 4].copy_from_slice(&size.to_be_bytes());
    Ok(len)
}

fn serialize_into<T: Serialize>(
    buf: &mut BytesMut,
    start: usize,
    value: &T,
) -> Result<(), FrameError> {
    let mut serializer = serde_amqp::ser::Serializer::new((&mut *buf).writer());
    value.serialize(&mut serializer).map_err(|error| {
        buf.truncate(start);
        FrameError::Encode(error)
    })
}

/// Appends one AMQP frame; returns the frame's length in bytes. The caller
/// keeps it within the peer's max-frame-size (split payloads beforehand).
pub fn encode_frame(
    buf: &mut BytesMut,
    channel: u16,
    performative: &Performative,
    payload: &[u8],
) -> Result<usize, FrameError> {
    let start = begin_frame(buf, FRAME_TYPE_AMQP, channel);
    serialize_into(buf, start, performative)?;
    buf.extend_from_slice(payload);
    finish_frame(buf, start)
}

/// Appends one SASL frame; returns the frame's length in bytes.
pub fn encode_sasl_frame(buf: &mut BytesMut, frame: &SaslFrame) -> Result<usize, FrameError> {
    let start = begin_frame(buf, FRAME_TYPE_SASL, 0);
    serialize_into(buf, start, frame)?;
    finish_frame(buf, start)
}

/// Appends an empty AMQP frame (heartbeat).
pub fn encode_heartbeat(buf: &mut BytesMut) {
    buf.put_u32(FRAME_HEADER_LEN as u32);
    buf.put_u8(DOFF_NO_EXTENDED_HEADER);
    buf.put_u8(FRAME_TYPE_AMQP);
    buf.put_u16(0);
}

/// The fields of an outgoing `transfer` the broker sets; the others
/// (rcv-settle-mode, state, resume, aborted, batchable) are left at default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferHeader<'a> {
    pub handle: u32,
    pub delivery_id: u32,
    pub delivery_tag: &'a [u8],
    pub message_format: u32,
    pub settled: bool,
    pub more: bool,
}

/// Field bytes of the largest hand-encoded transfer: three `uint`s of 5
/// bytes, a `vbin8` tag and two booleans.
const TRANSFER_FIELDS_LEN_MAX: usize = 3 * 5 + 2 + MAX_DELIVERY_TAG_LEN + 2;
const TRANSFER_FIELD_COUNT: u8 = 6;
/// descriptor (0x00 0x53 0x14) + list8 code, size and count.
const TRANSFER_PREFIX_LEN: usize = 3 + 3;
const TRANSFER_DESCRIPTOR: u8 = 0x14;
const _: () = assert!(TRANSFER_FIELDS_LEN_MAX < u8::MAX as usize, "list8 suffices");

fn uint_len(value: u32) -> usize {
    match value {
        0 => 1,
        1..=255 => 2,
        _ => 5,
    }
}

/// Smallest AMQP encoding of a `uint`: uint0, smalluint or uint.
fn put_uint(buf: &mut BytesMut, value: u32) {
    match u8::try_from(value) {
        Ok(0) => buf.put_u8(0x43),
        Ok(small) => {
            buf.put_u8(0x52);
            buf.put_u8(small);
        }
        Err(_) => {
            buf.put_u8(0x70);
            buf.put_u32(value);
        }
    }
}

fn put_bool(buf: &mut BytesMut, value: bool) {
    buf.put_u8(if value { 0x41 } else { 0x42 });
}

impl TransferHeader<'_> {
    fn fields_len(&self) -> usize {
        uint_len(self.handle)
            + uint_len(self.delivery_id)
            + 2
            + self.delivery_tag.len()
            + uint_len(self.message_format)
            + 2
    }

    /// Encoded length of the performative, so a link can compute how much
    /// payload fits: `max_frame_size - FRAME_HEADER_LEN - encoded_len()`.
    pub fn encoded_len(&self) -> usize {
        TRANSFER_PREFIX_LEN + self.fields_len()
    }
}

/// Appends one AMQP frame carrying a `transfer`, encoding the performative by
/// hand (no serde on the delivery hot path); returns the frame's length.
pub fn encode_transfer(
    buf: &mut BytesMut,
    channel: u16,
    transfer: &TransferHeader<'_>,
    payload: &[u8],
) -> Result<usize, FrameError> {
    buf.reserve(FRAME_HEADER_LEN + transfer.encoded_len() + payload.len());
    let len = encode_transfer_head(buf, channel, transfer, payload.len())?;
    buf.put_slice(payload);
    Ok(len)
}

/// Appends the frame header and `transfer` performative of a frame whose `payload_len`
/// bytes of payload the caller writes right after them, from wherever they are (the
/// frame's size counts them); returns the whole frame's length.
pub fn encode_transfer_head(
    buf: &mut BytesMut,
    channel: u16,
    transfer: &TransferHeader<'_>,
    payload_len: usize,
) -> Result<usize, FrameError> {
    let tag_len = transfer.delivery_tag.len();
    let too_long = FrameError::DeliveryTagTooLong { len: tag_len };
    if tag_len > MAX_DELIVERY_TAG_LEN {
        return Err(too_long);
    }
    let tag_len_u8 = u8::try_from(tag_len).map_err(|_| too_long)?;
    // Within TRANSFER_FIELDS_LEN_MAX < 255 once the tag is bounded.
    let list_size = u8::try_from(transfer.fields_len() + 1)
        .map_err(|_| FrameError::DeliveryTagTooLong { len: tag_len })?;
    let start = begin_frame(buf, FRAME_TYPE_AMQP, channel);
    buf.put_slice(&[DESCRIBED, 0x53, TRANSFER_DESCRIPTOR, 0xc0, list_size]);
    buf.put_u8(TRANSFER_FIELD_COUNT);
    put_uint(buf, transfer.handle);
    put_uint(buf, transfer.delivery_id);
    buf.put_u8(0xa0);
    buf.put_u8(tag_len_u8);
    buf.put_slice(transfer.delivery_tag);
    put_uint(buf, transfer.message_format);
    put_bool(buf, transfer.settled);
    put_bool(buf, transfer.more);
    let head_len = buf.len() - start;
    let len = head_len as u64 + payload_len as u64;
    let Ok(size) = u32::try_from(len) else {
        buf.truncate(start);
        return Err(FrameError::FrameTooLarge {
            size: len,
            max: u32::MAX,
        });
    };
    buf[start..start + 4].copy_from_slice(&size.to_be_bytes());
    Ok(len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode};
    use fe2o3_amqp_types::messaging::{Accepted, Source, Target, TargetArchetype};
    use fe2o3_amqp_types::performatives::{
        Attach, Begin, Close, Detach, Disposition, End, Flow, MaxFrameSize, Open, Transfer,
    };
    use fe2o3_amqp_types::sasl::SaslCode;
    use serde_amqp::primitives::{Binary, Symbol};

    fn open() -> Open {
        Open {
            container_id: "client-1".into(),
            hostname: Some("localhost".into()),
            max_frame_size: MaxFrameSize(65_536),
            channel_max: Default::default(),
            idle_time_out: Some(30_000),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }
    }

    fn attach() -> Attach {
        Attach {
            name: "link-1".into(),
            handle: Handle(3),
            role: Role::Sender,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: Some(Box::new(Source::builder().address("client").build())),
            target: Some(Box::new(TargetArchetype::Target(
                Target::builder().address("orders").build(),
            ))),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: Some(1 << 20),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }
    }

    fn transfer() -> Transfer {
        Transfer {
            handle: Handle(3),
            delivery_id: Some(7),
            delivery_tag: Some(Binary::from(vec![1, 2, 3])),
            message_format: Some(0),
            settled: Some(false),
            more: false,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        }
    }

    fn all_performatives() -> Vec<Performative> {
        vec![
            Performative::Open(open()),
            Performative::Begin(Begin {
                remote_channel: Some(0),
                next_outgoing_id: 1,
                incoming_window: 2048,
                outgoing_window: 2048,
                handle_max: Handle(255),
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            }),
            Performative::Attach(attach()),
            Performative::Flow(Flow {
                next_incoming_id: Some(1),
                incoming_window: 10,
                next_outgoing_id: 1,
                outgoing_window: 10,
                handle: Some(Handle(3)),
                delivery_count: Some(0),
                link_credit: Some(100),
                available: None,
                drain: false,
                echo: false,
                properties: None,
            }),
            Performative::Transfer(transfer()),
            Performative::Disposition(Disposition {
                role: Role::Receiver,
                first: 7,
                last: Some(9),
                settled: true,
                state: Some(Accepted {}.into()),
                batchable: false,
            }),
            Performative::Detach(Detach {
                handle: Handle(3),
                closed: true,
                error: None,
            }),
            Performative::End(End { error: None }),
            Performative::Close(Close {
                error: Some(FrameError::EmptyBody.to_amqp_error()),
            }),
        ]
    }

    fn decode_one(bytes: &[u8], max: u32) -> Result<Option<Frame>, FrameError> {
        let mut buf = BytesMut::from(bytes);
        FrameDecoder::new(max).decode(&mut buf)
    }

    #[test]
    fn protocol_headers_are_classified() {
        assert_eq!(classify_protocol_header(&AMQP_HEADER), ProtocolHeader::Amqp);
        assert_eq!(classify_protocol_header(&SASL_HEADER), ProtocolHeader::Sasl);
        assert_eq!(classify_protocol_header(&TLS_HEADER), ProtocolHeader::Tls);
        assert_eq!(
            classify_protocol_header(b"AMQP\x00\x01\x00\x01"),
            ProtocolHeader::Invalid
        );
        assert_eq!(
            classify_protocol_header(b"GET / HT"),
            ProtocolHeader::Invalid
        );
    }

    #[test]
    fn every_performative_round_trips_through_a_frame() {
        for performative in all_performatives() {
            let mut buf = BytesMut::new();
            let payload: &[u8] = match performative {
                Performative::Transfer(_) => b"payload bytes",
                _ => b"",
            };
            let written = encode_frame(&mut buf, 5, &performative, payload).unwrap();
            assert_eq!(written, buf.len());
            let frame = FrameDecoder::new(65_536).decode(&mut buf).unwrap().unwrap();
            assert!(buf.is_empty());
            assert_eq!((frame.channel, frame.kind), (5, FrameKind::Amqp));
            let (decoded, rest) = split_performative(&frame.body).unwrap();
            assert_eq!(decoded, performative);
            assert_eq!(&rest[..], payload);
        }
    }

    #[test]
    fn decoder_waits_for_whole_frames_and_splits_back_to_back_ones() {
        let mut wire = BytesMut::new();
        encode_frame(&mut wire, 1, &Performative::End(End { error: None }), b"").unwrap();
        encode_heartbeat(&mut wire);
        encode_frame(&mut wire, 2, &Performative::Open(open()), b"").unwrap();
        let wire = wire.freeze();

        let mut decoder = FrameDecoder::default();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for byte in wire.iter() {
            buf.extend_from_slice(&[*byte]);
            while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), 3);
        assert!(!frames[0].is_heartbeat());
        assert!(frames[1].is_heartbeat());
        assert_eq!(frames[2].channel, 2);
        assert!(buf.is_empty());
    }

    #[test]
    fn frame_body_and_payload_are_slices_of_the_read_buffer() {
        let mut buf = BytesMut::with_capacity(4096);
        let payload = [0xabu8; 100];
        encode_frame(&mut buf, 0, &Performative::Transfer(transfer()), &payload).unwrap();
        let base = buf.as_ptr() as usize;
        let frame = FrameDecoder::new(4096).decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame.body.as_ptr() as usize, base + FRAME_HEADER_LEN);
        let (_, rest) = split_performative(&frame.body).unwrap();
        let rest_at = rest.as_ptr() as usize;
        assert_eq!(
            rest_at + rest.len(),
            base + FRAME_HEADER_LEN + frame.body.len()
        );
    }

    #[test]
    fn extended_header_is_skipped() {
        // doff 3: four bytes of extended header, then an End.
        let bytes = [
            0, 0, 0, 15, 3, 0, 0, 9, 0xee, 0xee, 0xee, 0xee, 0x00, 0x53, 0x17,
        ];
        let mut bytes = bytes.to_vec();
        bytes.push(0x45);
        bytes[3] = 16;
        let frame = decode_one(&bytes, 512).unwrap().unwrap();
        assert_eq!(frame.channel, 9);
        let (performative, rest) = split_performative(&frame.body).unwrap();
        assert_eq!(performative, Performative::End(End { error: None }));
        assert!(rest.is_empty());
    }

    #[test]
    fn bad_headers_are_rejected_with_framing_error() {
        type Expected = fn(&FrameError) -> bool;
        let cases: [(&[u8], Expected); 5] = [
            (&[0, 0, 2, 1], |e| {
                matches!(
                    e,
                    FrameError::FrameTooLarge {
                        size: 513,
                        max: 512
                    }
                )
            }),
            (&[0, 0, 0, 7], |e| {
                matches!(e, FrameError::FrameTooSmall { size: 7 })
            }),
            (&[0, 0, 0, 8, 1, 0, 0, 0], |e| {
                matches!(e, FrameError::BadDoff { doff: 1, .. })
            }),
            (&[0, 0, 0, 8, 3, 0, 0, 0], |e| {
                matches!(e, FrameError::BadDoff { doff: 3, .. })
            }),
            (&[0, 0, 0, 8, 2, 7, 0, 0], |e| {
                matches!(e, FrameError::UnknownFrameType { frame_type: 7 })
            }),
        ];
        for (bytes, expected) in cases {
            let error = decode_one(bytes, 512).unwrap_err();
            assert!(expected(&error), "{bytes:?} gave {error:?}");
            assert_eq!(error.condition(), ConnectionError::FramingError.into());
        }
    }

    #[test]
    fn max_frame_size_is_clamped_and_raised_by_negotiation() {
        assert_eq!(FrameDecoder::new(0).max_frame_size(), MIN_MAX_FRAME_SIZE);
        assert_eq!(
            FrameDecoder::new(u32::MAX).max_frame_size(),
            MAX_FRAME_SIZE_LIMIT
        );
        let mut decoder = FrameDecoder::default();
        let mut buf = BytesMut::new();
        encode_frame(&mut buf, 0, &Performative::Transfer(transfer()), &[0; 1000]).unwrap();
        assert!(matches!(
            decoder.decode(&mut buf.clone()),
            Err(FrameError::FrameTooLarge { .. })
        ));
        decoder.set_max_frame_size(4096);
        assert!(matches!(decoder.decode(&mut buf), Ok(Some(_))));
    }

    #[test]
    fn sasl_frames_round_trip() {
        let frames = [
            SaslFrame::Mechanisms(SaslMechanisms {
                sasl_server_mechanisms: vec![Symbol::from("PLAIN"), Symbol::from("ANONYMOUS")]
                    .into(),
            }),
            SaslFrame::Init(SaslInit {
                mechanism: Symbol::from("PLAIN"),
                initial_response: Some(Binary::from(b"\0user\0pass".to_vec())),
                hostname: Some("localhost".into()),
            }),
            SaslFrame::Outcome(SaslOutcome {
                code: SaslCode::Auth,
                additional_data: None,
            }),
        ];
        for sasl in frames {
            let mut buf = BytesMut::new();
            encode_sasl_frame(&mut buf, &sasl).unwrap();
            let frame = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
            assert_eq!(frame.kind, FrameKind::Sasl);
            let decoded = decode_sasl(&frame.body).unwrap();
            assert_eq!(format!("{decoded:?}"), format!("{sasl:?}"));
        }
    }

    #[test]
    fn symbolic_descriptors_are_understood() {
        let mut body = vec![0x00, 0xa3, 13];
        body.extend_from_slice(b"amqp:end:list");
        body.push(0x45);
        let (performative, _) = split_performative(&Bytes::from(body)).unwrap();
        assert_eq!(performative, Performative::End(End { error: None }));

        let mut body = vec![0x00, 0xa3, 19];
        body.extend_from_slice(b"amqp:sasl-init:list");
        body.extend_from_slice(&[0xc0, 0x08, 0x01, 0xa3, 0x05]);
        body.extend_from_slice(b"PLAIN");
        let Ok(SaslFrame::Init(init)) = decode_sasl(&body) else {
            panic!("not an init");
        };
        assert_eq!(init.mechanism, Symbol::from("PLAIN"));
        assert!(init.initial_response.is_none());
    }

    #[test]
    fn sasl_decoder_rejects_performatives_and_trailing_bytes() {
        let mut buf = BytesMut::new();
        encode_frame(&mut buf, 0, &Performative::End(End { error: None }), b"").unwrap();
        let body = &buf[FRAME_HEADER_LEN..];
        let error = decode_sasl(body).unwrap_err();
        assert!(matches!(error, FrameError::UnexpectedDescriptor { .. }));
        assert_eq!(error.condition(), AmqpError::DecodeError.into());

        let mut buf = BytesMut::new();
        let outcome = SaslFrame::Outcome(SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        });
        encode_sasl_frame(&mut buf, &outcome).unwrap();
        buf.extend_from_slice(b"x");
        assert!(matches!(
            decode_sasl(&buf[FRAME_HEADER_LEN..]),
            Err(FrameError::Malformed { .. })
        ));
    }

    #[test]
    fn hand_encoded_transfer_decodes_like_serde() {
        let tags: [&[u8]; 3] = [b"", b"tag-1", &[7; MAX_DELIVERY_TAG_LEN]];
        let numbers = [0u32, 1, 255, 256, u32::MAX];
        for (i, tag) in tags.iter().enumerate() {
            for n in numbers {
                let header = TransferHeader {
                    handle: n,
                    delivery_id: n.wrapping_add(i as u32),
                    delivery_tag: tag,
                    message_format: n,
                    settled: n % 2 == 0,
                    more: i == 1,
                };
                let payload = vec![n as u8; 17];
                let mut buf = BytesMut::new();
                let written = encode_transfer(&mut buf, 4, &header, &payload).unwrap();
                assert_eq!(
                    written,
                    FRAME_HEADER_LEN + header.encoded_len() + payload.len()
                );
                let frame = FrameDecoder::new(4096).decode(&mut buf).unwrap().unwrap();
                assert_eq!(frame.channel, 4);
                let (performative, rest) = split_performative(&frame.body).unwrap();
                let Performative::Transfer(t) = performative else {
                    panic!("not a transfer: {performative:?}");
                };
                assert_eq!(t.handle, Handle(header.handle));
                assert_eq!(t.delivery_id, Some(header.delivery_id));
                assert_eq!(t.delivery_tag.as_ref().map(|b| b.as_slice()), Some(*tag));
                assert_eq!(t.message_format, Some(header.message_format));
                assert_eq!(t.settled, Some(header.settled));
                assert_eq!(t.more, header.more);
                assert!(!t.aborted && !t.resume && !t.batchable && t.state.is_none());
                assert_eq!(&rest[..], &payload[..]);
            }
        }
    }

    #[test]
    fn overlong_delivery_tag_is_refused() {
        let header = TransferHeader {
            handle: 0,
            delivery_id: 0,
            delivery_tag: &[0; MAX_DELIVERY_TAG_LEN + 1],
            message_format: 0,
            settled: true,
            more: false,
        };
        let mut buf = BytesMut::new();
        let error = encode_transfer(&mut buf, 0, &header, b"").unwrap_err();
        assert!(matches!(error, FrameError::DeliveryTagTooLong { len: 33 }));
        assert!(buf.is_empty());
    }

    #[test]
    fn deeply_nested_attach_properties_are_rejected_before_serde() {
        // Attach with a 60-deep list nest in place of its name.
        let mut value = vec![0x45u8];
        for _ in 0..60 {
            let mut outer = vec![0xc0, (value.len() + 1) as u8, 0x01];
            outer.extend_from_slice(&value);
            value = outer;
        }
        let mut body = vec![0x00, 0x53, 0x12, 0xd0];
        body.extend_from_slice(&(value.len() as u32 + 4).to_be_bytes());
        body.extend_from_slice(&[0, 0, 0, 1]);
        body.extend_from_slice(&value);
        let error = split_performative(&Bytes::from(body)).unwrap_err();
        assert!(matches!(
            error,
            FrameError::Encoding(EncodingError::TooDeep { .. })
        ));
    }

    #[test]
    fn malformed_bodies_map_to_decode_error() {
        let bodies: [&[u8]; 5] = [
            &[],
            &[0x45],
            &[0x00, 0x41, 0x45],
            &[0x00, 0x53, 0x10, 0xa1, 0x00],
            &[0x00, 0x53, 0x99, 0x45],
        ];
        for body in bodies {
            let error = split_performative(&Bytes::copy_from_slice(body)).unwrap_err();
            assert_eq!(error.condition(), AmqpError::DecodeError.into(), "{body:?}");
        }
    }

    #[test]
    fn truncated_and_corrupted_bodies_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for performative in all_performatives() {
            let mut buf = BytesMut::new();
            encode_frame(&mut buf, 0, &performative, b"").unwrap();
            let body = buf.split_off(FRAME_HEADER_LEN).freeze();
            for cut in 0..body.len() {
                let _ = split_performative(&body.slice(..cut));
            }
            for _ in 0..200 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let mut corrupt = body.to_vec();
                let at = (seed as usize) % corrupt.len();
                corrupt[at] = (seed >> 32) as u8;
                let _ = split_performative(&Bytes::from(corrupt.clone()));
                let _ = decode_sasl(&corrupt);
                let _ = decode_one(&corrupt, 512);
            }
        }
    }
}
