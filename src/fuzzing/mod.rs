//! Entry points for fuzzing: one function per target, each taking arbitrary bytes.
//!
//! The cargo-fuzz targets in `fuzz/` (nightly, libFuzzer) and the corpus replay test
//! `tests/broker/fuzz_replay.rs` (stable, every CI run) call the same functions, so an
//! input that once crashed or hung stays a regression test without nightly.
//!
//! Every entry point must return for any input: a panic is a bug the fuzzer found, either
//! in the code under test or an invariant asserted here (a rewrite that changes the bare
//! message, a decoded frame that does not re-encode). The connection target runs the real
//! connection engine against a throw-away broker and reports a stall as [`Stalled`].
//!
//! Inputs are shaped to reach deep states quickly, not to be pretty: see each function's
//! doc for the layout. The targets [`frame_decoder`] and [`connection`] together cover
//! raw bytes (framing errors) and well-framed performatives (the state machines).
//!
//! Does not: run in the broker. Nothing outside tests and `fuzz/` calls this module.

mod connection;

use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::performatives::Performative;
use serde_amqp::primitives::Symbol;
use serde_amqp::Value;

use crate::amqp::frame::{
    decode_performative, decode_sasl, encode_frame, encode_sasl_frame, split_performative,
    FrameDecoder, FrameKind, SaslFrame,
};
use crate::amqp::message::{concat, MessageView, SectionKind};
use crate::amqp::sasl::{Authenticator, SaslConfig, SaslServer};
use crate::amqp::scram::ScramCredential;

pub use connection::{connection, Stalled, CONNECTION_INPUT_DEADLINE};

/// The user every SASL input may log in as, with PLAIN or SCRAM-SHA-256.
pub const FUZZ_USER: &str = "alice";
/// [`FUZZ_USER`]'s password.
pub const FUZZ_PASSWORD: &str = "secret";

/// A length-prefixed record of a shaped input: `{ len: u16 BE | bytes: len }`. Returns
/// the record and the rest, or `None` when fewer bytes remain than the record claims.
fn take_record(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// The frame decoder on raw bytes.
///
/// Layout: `{ max_frame: u16 BE | chunk: u8 | stream }`. The decoder accepts frames up to
/// `max_frame` (clamped as in the broker); `stream` arrives in pieces of `chunk + 1`
/// bytes, as a socket would deliver it. Every whole frame is split into performative and
/// payload (AMQP) or decoded (SASL); a performative that decodes must encode again and
/// the result decode once more, and one the hand decoder reads must read the same through
/// serde_amqp.
pub fn frame_decoder(data: &[u8]) {
    let Some((header, stream)) = data.split_first_chunk::<3>() else {
        return;
    };
    let mut decoder = FrameDecoder::new(u32::from(u16::from_be_bytes([header[0], header[1]])));
    let chunk = usize::from(header[2]) + 1;
    let mut buf = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => decoded_frame(frame.channel, frame.kind, &frame.body),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// What the hand decoder of the message path's performatives reads (`amqp::hot`) is
/// what serde_amqp reads from the same bytes, after the nesting check, length included.
fn same_as_serde(body: &[u8]) {
    let Some(fast) = crate::amqp::hot::decode(body) else {
        return;
    };
    let by_serde = decode_performative(body).ok();
    assert_eq!(
        Some(fast),
        by_serde,
        "amqp::hot::decode differs from serde_amqp"
    );
}

fn decoded_frame(channel: u16, kind: FrameKind, body: &Bytes) {
    match kind {
        FrameKind::Amqp if body.is_empty() => {}
        FrameKind::Amqp => {
            same_as_serde(body);
            if let Ok((performative, payload)) = split_performative(body) {
                reencode_amqp(channel, &performative, &payload);
            }
        }
        FrameKind::Sasl => {
            if let Ok(frame) = decode_sasl(body) {
                reencode_sasl(&frame);
            }
        }
    }
}

fn reencode_amqp(channel: u16, performative: &Performative, payload: &[u8]) {
    let mut out = BytesMut::new();
    if encode_frame(&mut out, channel, performative, payload).is_err() {
        return;
    }
    let mut decoder = FrameDecoder::new(crate::amqp::frame::MAX_FRAME_SIZE_LIMIT);
    let again = decoder.decode(&mut out);
    assert!(
        matches!(&again, Ok(Some(frame)) if split_performative(&frame.body).is_ok()),
        "re-encoded {performative:?} does not decode: {again:?}"
    );
}

fn reencode_sasl(frame: &SaslFrame) {
    let mut out = BytesMut::new();
    if encode_sasl_frame(&mut out, frame).is_err() {
        return;
    }
    let body = out.split_off(crate::amqp::frame::FRAME_HEADER_LEN);
    assert!(
        decode_sasl(&body).is_ok(),
        "re-encoded {frame:?} does not decode"
    );
}

/// Accepts [`FUZZ_USER`] / [`FUZZ_PASSWORD`] with PLAIN (acting as anyone) and SCRAM.
struct FuzzUsers;

impl Authenticator for FuzzUsers {
    fn check_plain(&self, _authzid: Option<&str>, authcid: &str, passwd: &str) -> bool {
        authcid == FUZZ_USER && passwd == FUZZ_PASSWORD
    }

    fn scram_credential(&self, username: &str) -> Option<ScramCredential> {
        static CREDENTIAL: OnceLock<ScramCredential> = OnceLock::new();
        (username == FUZZ_USER).then(|| {
            CREDENTIAL
                .get_or_init(|| {
                    let salt = b"entrepot-fuzzing".to_vec();
                    ScramCredential::derive(FUZZ_PASSWORD, salt, crate::amqp::scram::MIN_ITERATIONS)
                })
                .clone()
        })
    }
}

/// The server side of SASL, fed a sequence of SASL frame bodies.
///
/// Layout: `{ policy: u8 | record* }`, each record `{ len: u16 BE | sasl frame body }`.
/// Bit 0 of `policy` offers ANONYMOUS, bit 1 SCRAM-SHA-256. Bodies that do not decode are
/// skipped (the connection would close); the exchange stops at its outcome or at a frame
/// out of turn, as the connection does. Every reply must encode.
pub fn sasl(data: &[u8]) {
    let Some((&policy, mut rest)) = data.split_first() else {
        return;
    };
    let mut server = SaslServer::new(SaslConfig {
        allow_anonymous: policy & 1 != 0,
        scram: policy & 2 != 0,
    });
    let mut out = BytesMut::new();
    assert!(encode_sasl_frame(&mut out, &server.mechanisms()).is_ok());
    while let Some((body, next)) = take_record(rest) {
        rest = next;
        let Ok(frame) = decode_sasl(body) else {
            continue;
        };
        let Ok(step) = server.on_frame(frame, &FuzzUsers) else {
            return;
        };
        out.clear();
        assert!(
            encode_sasl_frame(&mut out, &step.reply).is_ok(),
            "SASL reply {:?} does not encode",
            step.reply
        );
        if step.result.is_some() {
            assert!(server.is_done(), "an outcome was sent but SASL is not done");
            return;
        }
    }
}

/// The message-section parser and the rewrites a broker makes, on one message's bytes.
///
/// Every accessor runs; whatever parses must keep the documented invariants: the bare
/// message survives both rewrites byte for byte, a rewritten message parses again, and
/// the hand-read `absolute-expiry-time` agrees with serde's.
pub fn message_sections(data: &[u8]) {
    let Ok(view) = MessageView::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    for kind in [
        SectionKind::Header,
        SectionKind::DeliveryAnnotations,
        SectionKind::MessageAnnotations,
        SectionKind::Properties,
        SectionKind::ApplicationProperties,
        SectionKind::Data,
        SectionKind::AmqpSequence,
        SectionKind::AmqpValue,
        SectionKind::Footer,
    ] {
        let _ = view.section(kind);
    }
    let _ = (view.body_kind(), view.ttl(), view.durable());
    let _ = (view.message_annotations(), view.application_properties());
    let by_hand = view.absolute_expiry_time();
    if let (Ok(Some(properties)), Ok(by_hand)) = (view.properties(), by_hand) {
        assert_eq!(
            properties.absolute_expiry_time, by_hand,
            "absolute-expiry-time read by hand differs from serde's"
        );
    }
    check_rewrite(&view, view.with_delivery_count(7));
    let annotation = (
        OwnedKey::Symbol(Symbol::from("x-opt-fuzz")),
        Value::Ulong(data.len() as u64),
    );
    check_rewrite(&view, view.with_annotations([annotation]));
    let selector = crate::broker::selector::parse("color = 'red' OR weight > 3");
    if let Ok(selector) = selector {
        let _ = crate::broker::selector_matches(&selector, view.bytes());
    }
}

fn check_rewrite(
    view: &MessageView,
    rewritten: Result<Vec<Bytes>, crate::amqp::message::MessageError>,
) {
    let Ok(chunks) = rewritten else {
        return;
    };
    let again = MessageView::parse(concat(&chunks));
    assert!(
        matches!(&again, Ok(again) if again.bare_message() == view.bare_message()),
        "a rewrite changed the bare message or broke the message: {again:?}"
    );
}

/// The manifest loader on one YAML file (invalid UTF-8 is replaced, as a text editor
/// would show it). A catalog or a list of errors are both fine; a panic is not.
pub fn manifest(data: &[u8]) {
    let text = String::from_utf8_lossy(data).into_owned();
    let _ = crate::manifest::load::load_texts(&[("fuzz.yaml".into(), text)]);
}
