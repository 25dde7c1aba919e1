//! AMQP encode and decode of one 1 KiB message with properties and
//! application-properties: Entrepot's zero-copy path next to fe2o3-amqp's full
//! serialize/deserialize through serde_amqp.
//!
//! The message: a durable header, properties (message-id, to, subject, content-type,
//! creation-time, correlation-id), five application-properties and a 1 KiB `data` body.
//! Each case works on one whole transfer frame, as a broker does:
//!
//! * `encode/entrepot`: the broker delivering a stored message — `encode_transfer` writes
//!   the transfer performative by hand and copies the message bytes as they arrived.
//! * `encode/fe2o3`: a server holding a `Message` object — serde serializes the transfer
//!   performative and then every section of the message (fe2o3-amqp's frame encoder path).
//! * `decode/entrepot`: `split_performative` (serde decodes the small performative, the
//!   payload stays a slice), `MessageView::parse` (measures the sections, decodes none),
//!   then the accessors a broker needs: header `durable`, `properties`,
//!   `application-properties`. The body is never decoded or copied.
//! * `decode/fe2o3`: fe2o3-amqp's frame decoder path — deserialize the performative from a
//!   reader, then the whole `Message<Data>` (body copied into a `Vec`).
//!
//! * `decode/entrepot-view-only`: the same without decoding properties and
//!   application-properties — what the receive path does when nothing asks for them.
//!
//! * `expiry/serde` and `expiry/hand`: reading `absolute-expiry-time` from an already
//!   parsed view of a message whose properties carry message-id, to, content-type and
//!   absolute-expiry-time — what the broker does for every stored message
//!   (`broker::queued`). `serde` decodes the whole properties section
//!   (`MessageView::properties`, the path used before session 3); `hand` is
//!   `MessageView::absolute_expiry_time`, which skips the first eight fields by size.
//!
//! * `performative/{transfer,disposition,flow}/{hand,serde}`: the three performatives
//!   of the message path read by hand (`amqp/hot.rs`, what `split_performative` does
//!   first) and through serde_amqp after the nesting check (what it did before).
//!
//! `decode/entrepot` and `decode/fe2o3` end with the same facts in hand (durable,
//! properties, application properties), so their difference is the body work the lazy
//! view skips; serde decoding of the two property sections costs the same on both sides.
//! Criterion prints time per operation and bytes per second.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use entrepot::amqp::frame::{
    decode_performative, encode_transfer, split_performative, TransferHeader, FRAME_HEADER_LEN,
};
use entrepot::amqp::message::MessageView;
use fe2o3_amqp_types::definitions::{DeliveryNumber, DeliveryTag, Handle, MessageFormat, Role};
use fe2o3_amqp_types::messaging::message::__private::{Deserializable, Serializable};
use fe2o3_amqp_types::messaging::{
    Accepted, ApplicationProperties, Data, DeliveryState, Header, Message, Properties,
};
use fe2o3_amqp_types::performatives::{Disposition, Flow, Performative, Transfer};
use serde::{Deserialize, Serialize};
use serde_amqp::de::Deserializer;
use serde_amqp::primitives::{Binary, Timestamp};
use serde_amqp::read::IoReader;
use serde_amqp::ser::Serializer;

const BODY_BYTES: usize = 1024;
const DELIVERY_TAG: [u8; 8] = 42u64.to_be_bytes();

fn message() -> Message<Data> {
    Message::builder()
        .header(Header {
            durable: true,
            ..Header::default()
        })
        .properties(
            Properties::builder()
                .message_id(String::from("order-7f3a9c1e-0001"))
                .to("orders.eu")
                .subject("order-created")
                .content_type("application/octet-stream")
                .creation_time(Timestamp::from_milliseconds(1_764_000_000_000))
                .correlation_id(String::from("session-42"))
                .build(),
        )
        .application_properties(
            ApplicationProperties::builder()
                .insert("tenant", "acme")
                .insert("region", "eu-west")
                .insert("priority-class", 3i32)
                .insert("retry", false)
                .insert(
                    "trace-id",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .build(),
        )
        .data(Binary::from(vec![0x5au8; BODY_BYTES]))
        .build()
}

/// A message with the properties a producer setting an expiry typically sends.
fn expiring_message() -> Message<Data> {
    Message::builder()
        .header(Header {
            durable: true,
            ..Header::default()
        })
        .properties(
            Properties::builder()
                .message_id(String::from("order-7f3a9c1e-0001"))
                .to("orders.eu")
                .content_type("application/json")
                .absolute_expiry_time(Some(Timestamp::from_milliseconds(1_764_000_060_000)))
                .build(),
        )
        .data(Binary::from(vec![0x5au8; BODY_BYTES]))
        .build()
}

fn transfer() -> Transfer {
    Transfer {
        handle: Handle(1),
        delivery_id: Some(DeliveryNumber::from(1000u32)),
        delivery_tag: Some(DeliveryTag::from(DELIVERY_TAG.to_vec())),
        message_format: Some(MessageFormat::from(0u32)),
        settled: Some(false),
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    }
}

fn header() -> TransferHeader<'static> {
    TransferHeader {
        handle: 1,
        delivery_id: 1000,
        delivery_tag: &DELIVERY_TAG,
        message_format: 0,
        settled: false,
        more: false,
    }
}

/// fe2o3-amqp's encoder: frame header, serde performative, serde message.
fn fe2o3_encode(dst: &mut BytesMut, transfer: &Transfer, message: &Message<Data>) {
    let start = dst.len();
    dst.put_u32(0);
    dst.put_slice(&[2, 0, 0, 0]);
    let mut ser = Serializer::from(dst.writer());
    Performative::Transfer(transfer.clone())
        .serialize(&mut ser)
        .expect("transfer");
    Serializable(message).serialize(&mut ser).expect("message");
    let len = (dst.len() - start) as u32;
    dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// fe2o3-amqp's decoder on a frame body: performative from a reader, then the message.
fn fe2o3_decode(body: &Bytes) -> (bool, Option<Properties>, Option<ApplicationProperties>) {
    let mut src = body.clone();
    let performative: Performative = {
        let mut de = Deserializer::new(IoReader::new((&mut src).reader()));
        Deserialize::deserialize(&mut de).expect("performative")
    };
    assert!(matches!(performative, Performative::Transfer(_)));
    let payload = src;
    let Deserializable(m): Deserializable<Message<Data>> =
        serde_amqp::from_slice(&payload).expect("message");
    (
        m.header.is_some_and(|h| h.durable),
        m.properties,
        m.application_properties,
    )
}

fn entrepot_decode(body: &Bytes) -> (bool, Option<Properties>, Option<ApplicationProperties>) {
    let (performative, payload) = split_performative(body).expect("performative");
    assert!(matches!(performative, Performative::Transfer(_)));
    let view = MessageView::parse(payload).expect("message");
    (
        view.durable().expect("header"),
        view.properties().expect("properties"),
        view.application_properties()
            .expect("application-properties"),
    )
}

fn codec(c: &mut Criterion) {
    let message = message();
    let transfer = transfer();
    let stored = Bytes::from(serde_amqp::to_vec(&Serializable(&message)).expect("encode"));
    let mut frame = BytesMut::new();
    encode_transfer(&mut frame, 0, &header(), &stored).expect("encode_transfer");
    let body = Bytes::copy_from_slice(&frame[FRAME_HEADER_LEN..]);
    // Both encoders write a frame of the same message, and both decoders read the same facts.
    let mut theirs = BytesMut::new();
    fe2o3_encode(&mut theirs, &transfer, &message);
    // (fe2o3 encodes some performative fields differently; the frames carry the same message.)
    let theirs_body = Bytes::copy_from_slice(&theirs[FRAME_HEADER_LEN..]);
    assert_eq!(entrepot_decode(&theirs_body), fe2o3_decode(&body));
    let ours = entrepot_decode(&body);
    assert_eq!(ours, fe2o3_decode(&body));
    assert!(ours.0 && ours.1.is_some() && ours.2.is_some());
    println!(
        "amqp_codec: message {} bytes (body {BODY_BYTES}), frame {} bytes",
        stored.len(),
        frame.len()
    );

    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    let mut buf = BytesMut::with_capacity(4 * frame.len());
    g.bench_function("entrepot", |b| {
        b.iter(|| {
            buf.clear();
            encode_transfer(&mut buf, 0, &header(), black_box(&stored)).expect("encode");
            black_box(buf.len())
        })
    });
    g.bench_function("fe2o3", |b| {
        b.iter(|| {
            buf.clear();
            fe2o3_encode(&mut buf, &transfer, black_box(&message));
            black_box(buf.len())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("entrepot", |b| {
        b.iter(|| black_box(entrepot_decode(black_box(&body))))
    });
    // What the broker's receive path needs: the sections measured and the header read;
    // properties are only decoded when a filter or TTL asks for them.
    g.bench_function("entrepot-view-only", |b| {
        b.iter(|| {
            let (_, payload) = split_performative(black_box(&body)).expect("performative");
            let view = MessageView::parse(payload).expect("message");
            black_box(view.durable().expect("header"))
        })
    });
    g.bench_function("fe2o3", |b| {
        b.iter(|| black_box(fe2o3_decode(black_box(&body))))
    });
    g.finish();

    // The performatives of the message path as a client sends them (fe2o3-amqp's
    // encoding): read by hand (`split_performative`, `amqp/hot.rs`) and through serde_amqp
    // after the nesting check (the path every other performative takes).
    let flow = Performative::Flow(Flow {
        next_incoming_id: Some(4_711),
        incoming_window: 2_048,
        next_outgoing_id: 1,
        outgoing_window: u32::MAX,
        handle: Some(Handle(1)),
        delivery_count: Some(4_700),
        link_credit: Some(250),
        available: None,
        drain: false,
        echo: false,
        properties: None,
    });
    let disposition = Performative::Disposition(Disposition {
        role: Role::Receiver,
        first: 4_700,
        last: Some(4_730),
        settled: true,
        state: Some(DeliveryState::Accepted(Accepted {})),
        batchable: false,
    });
    let mut g = c.benchmark_group("performative");
    for (name, p) in [
        ("transfer", Performative::Transfer(transfer.clone())),
        ("disposition", disposition),
        ("flow", flow),
    ] {
        let encoded = Bytes::from(serde_amqp::to_vec(&p).expect("encode"));
        let by_serde = |body: &Bytes| decode_performative(body).expect("decode").0;
        assert_eq!(split_performative(&encoded).expect("decode").0, p);
        assert_eq!(by_serde(&encoded), p);
        g.bench_function(format!("{name}/hand"), |b| {
            b.iter(|| black_box(split_performative(black_box(&encoded)).expect("decode")))
        });
        g.bench_function(format!("{name}/serde"), |b| {
            b.iter(|| black_box(by_serde(black_box(&encoded))))
        });
    }
    g.finish();

    let expiring =
        Bytes::from(serde_amqp::to_vec(&Serializable(expiring_message())).expect("encode"));
    let view = MessageView::parse(expiring).expect("message");
    let serde_expiry = |view: &MessageView| {
        view.properties()
            .expect("properties")
            .and_then(|p| p.absolute_expiry_time)
    };
    let expected = Some(Timestamp::from_milliseconds(1_764_000_060_000));
    assert_eq!(serde_expiry(&view), expected);
    assert_eq!(view.absolute_expiry_time().expect("expiry"), expected);
    let mut g = c.benchmark_group("expiry");
    g.bench_function("serde", |b| {
        b.iter(|| black_box(serde_expiry(black_box(&view))))
    });
    g.bench_function("hand", |b| {
        b.iter(|| black_box(black_box(&view).absolute_expiry_time().expect("expiry")))
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
