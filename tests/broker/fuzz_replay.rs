//! Goal: every input the fuzzers kept, and every input that once broke the broker, runs
//! clean on stable in every test run — so a regression is caught without nightly.
//! Method: feed each file of `fuzz/corpus/<target>/`, `fuzz/seeds/<target>/` and
//! `fuzz/regressions/<target>/` through the same `entrepot::fuzzing` entry point the
//! cargo-fuzz target calls; a panic fails the test, so does a stalled connection or an
//! input that does not return within a bound (a hang, not a speed check). The corpus
//! directories must not be empty, so the test cannot pass by finding nothing.
//!
//! The seeds (valid frames, messages, SASL exchanges, manifests) are written by the
//! ignored test `write_fuzz_seeds`: `cargo nextest run --test broker --run-ignored only
//! write_fuzz_seeds`.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use entrepot::fuzzing;

/// Longest one input may take before the replay calls it a hang: generous, for a debug
/// build on a loaded machine; a real hang (issue 14's disposition loop) takes far longer.
const INPUT_BOUND: Duration = Duration::from_secs(20);

type Entry = fn(&[u8]) -> Result<(), String>;

/// Each target and the entry point it replays through.
const TARGETS: [(&str, Entry); 5] = [
    ("frame_decoder", |d| {
        fuzzing::frame_decoder(d);
        Ok(())
    }),
    ("sasl", |d| {
        fuzzing::sasl(d);
        Ok(())
    }),
    ("message_sections", |d| {
        fuzzing::message_sections(d);
        Ok(())
    }),
    ("manifest", |d| {
        fuzzing::manifest(d);
        Ok(())
    }),
    ("connection", |d| {
        fuzzing::connection(d).map_err(|e| e.to_string())
    }),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Every file directly in `dir`, in name order; none if it does not exist.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Replays `files` through `entry` on a thread of their own, bounding each input.
fn replay(target: &'static str, entry: Entry, files: Vec<PathBuf>) {
    let (done_tx, done_rx) = mpsc::channel();
    let worker_files = files.clone();
    std::thread::spawn(move || {
        for file in worker_files {
            let data = std::fs::read(&file).unwrap();
            let outcome = entry(&data);
            done_tx.send((file, outcome)).unwrap();
        }
    });
    for expected in files {
        match done_rx.recv_timeout(INPUT_BOUND) {
            Ok((file, Ok(()))) => assert_eq!(file, expected),
            Ok((file, Err(e))) => panic!("{target}: {}: {e}", file.display()),
            // A panic in the entry point ends the worker and drops the sender.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{target}: {} panicked", expected.display())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "{target}: {} hangs (over {INPUT_BOUND:?})",
                    expected.display()
                )
            }
        }
    }
}

#[test]
fn every_corpus_file_replays_clean() {
    let root = fuzz_dir();
    let mut replays = Vec::new();
    for (target, entry) in TARGETS {
        let corpus = files_in(&root.join("corpus").join(target));
        let seeds = files_in(&root.join("seeds").join(target));
        assert!(!corpus.is_empty(), "fuzz/corpus/{target} is empty");
        assert!(!seeds.is_empty(), "fuzz/seeds/{target} is empty");
        let regressions = files_in(&root.join("regressions").join(target));
        let files = [corpus, seeds, regressions].concat();
        replays.push(std::thread::spawn(move || replay(target, entry, files)));
    }
    for r in replays {
        if let Err(panic) = r.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
#[ignore = "writes fuzz/seeds/; run by hand when the seeds change"]
fn write_fuzz_seeds() {
    let root = fuzz_dir().join("seeds");
    let sets = [
        ("connection", seeds::connection()),
        ("frame_decoder", seeds::frame_decoder()),
        ("message_sections", seeds::message_sections()),
        ("sasl", seeds::sasl()),
        ("manifest", seeds::manifest()),
    ];
    for (target, inputs) in sets {
        let dir = root.join(target);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in inputs {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

/// Valid inputs of each target, shaped as its entry point documents.
mod seeds {
    use bytes::BytesMut;
    use entrepot::amqp::frame::{encode_frame, encode_sasl_frame, SaslFrame, FRAME_HEADER_LEN};
    use fe2o3_amqp_types::definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode};
    use fe2o3_amqp_types::messaging::{
        Accepted, AmqpSequence, AmqpValue, ApplicationProperties, Data, DeliveryAnnotations,
        DeliveryState, Footer, Header, MessageAnnotations, Modified, Properties, Rejected,
        Released, Source, Target, TargetArchetype,
    };
    use fe2o3_amqp_types::performatives::{
        Attach, Begin, Close, Detach, Disposition, End, Flow, Performative, Transfer,
    };
    use fe2o3_amqp_types::primitives::{Binary, Symbol, Timestamp};
    use fe2o3_amqp_types::sasl::{SaslInit, SaslResponse};
    use serde_amqp::described::Described;
    use serde_amqp::descriptor::Descriptor;
    use serde_amqp::Value;

    type Seed = (String, Vec<u8>);

    /// One performative's frame body (performative and payload, no frame header).
    fn body(performative: Performative, payload: &[u8]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode_frame(&mut buf, 0, &performative, payload).unwrap();
        buf[FRAME_HEADER_LEN..].to_vec()
    }

    /// A connection-target record: `{ channel: u8 | len: u16 BE | body }`.
    fn record(out: &mut Vec<u8>, channel: u8, performative: Performative, payload: &[u8]) {
        let b = body(performative, payload);
        out.push(channel);
        out.extend_from_slice(&(b.len() as u16).to_be_bytes());
        out.extend_from_slice(&b);
    }

    fn begin() -> Performative {
        Performative::Begin(Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 100,
            outgoing_window: 100,
            handle_max: Handle(16),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    fn attach(handle: u32, role: Role, address: &str, filter: Option<&str>) -> Performative {
        let sender = role == Role::Sender;
        let mut source = Source::builder();
        let mut target = Target::builder();
        if sender {
            target = target.address(address);
        } else {
            source = source.address(address);
        }
        if let Some(expr) = filter {
            let selector = Described {
                descriptor: Descriptor::Code(0x0000_468C_0000_0004),
                value: Value::String(expr.to_owned()),
            };
            source = source.add_to_filter("selector", selector);
        }
        Performative::Attach(Attach {
            name: format!("link-{handle}"),
            handle: Handle(handle),
            role,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: Some(Box::new(source.build())),
            target: Some(Box::new(TargetArchetype::Target(target.build()))),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: sender.then_some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    fn transfer(handle: u32, id: u32, more: bool, settled: bool) -> Performative {
        Performative::Transfer(Transfer {
            handle: Handle(handle),
            delivery_id: Some(id),
            delivery_tag: Some(Binary::from(id.to_be_bytes().to_vec())),
            message_format: Some(0),
            settled: Some(settled),
            more,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        })
    }

    fn flow(handle: u32, credit: u32, drain: bool) -> Performative {
        Performative::Flow(Flow {
            next_incoming_id: Some(0),
            incoming_window: 100,
            next_outgoing_id: 0,
            outgoing_window: 100,
            handle: Some(Handle(handle)),
            delivery_count: Some(0),
            link_credit: Some(credit),
            available: None,
            drain,
            echo: false,
            properties: None,
        })
    }

    fn disposition(first: u32, last: u32, state: DeliveryState) -> Performative {
        Performative::Disposition(Disposition {
            role: Role::Receiver,
            first,
            last: Some(last),
            settled: true,
            state: Some(state),
            batchable: false,
        })
    }

    fn detach(handle: u32) -> Performative {
        Performative::Detach(Detach {
            handle: Handle(handle),
            closed: true,
            error: None,
        })
    }

    fn section<T: serde::Serialize>(value: &T) -> Vec<u8> {
        serde_amqp::to_vec(value).unwrap()
    }

    /// A message with every section before the body, a data body and a footer.
    fn full_message(color: &str, weight: i64) -> Vec<u8> {
        let header = Header {
            durable: true,
            priority: 4.into(),
            ttl: Some(60_000),
            first_acquirer: false,
            delivery_count: 1,
        };
        let properties = Properties {
            message_id: Some(format!("m-{color}").into()),
            subject: Some("fuzz".into()),
            absolute_expiry_time: Some(Timestamp::from_milliseconds(4_000_000_000_000)),
            ..Properties::default()
        };
        let app = ApplicationProperties::builder()
            .insert("color", color)
            .insert("weight", weight)
            .build();
        let annotations = MessageAnnotations::builder()
            .insert(Symbol::from("x-opt-a"), Value::Uint(1))
            .build();
        let delivery = DeliveryAnnotations::builder()
            .insert(Symbol::from("x-opt-d"), Value::Bool(true))
            .build();
        let footer = Footer::builder()
            .insert(Symbol::from("x-opt-f"), Value::Uint(2))
            .build();
        [
            section(&header),
            section(&delivery),
            section(&annotations),
            section(&properties),
            section(&app),
            section(&Data(Binary::from(b"hello".to_vec()))),
            section(&Data(Binary::from(b"again".to_vec()))),
            section(&footer),
        ]
        .concat()
    }

    fn data_message(body: &[u8]) -> Vec<u8> {
        section(&Data(Binary::from(body.to_vec())))
    }

    pub fn message_sections() -> Vec<Seed> {
        let value = section(&AmqpValue(Value::String("v".into())));
        let sequence = [
            section(&AmqpSequence(vec![Value::Uint(1), Value::Null])),
            section(&AmqpSequence(vec![Value::Bool(false)])),
        ]
        .concat();
        let header_only = section(&Header::default());
        vec![
            ("full".into(), full_message("red", 5)),
            ("data".into(), data_message(b"body")),
            ("value".into(), [header_only.clone(), value].concat()),
            ("sequence".into(), sequence),
            ("header".into(), header_only),
        ]
    }

    /// Produce (single and multi-frame), consume with every outcome, a selector, drain.
    pub fn connection() -> Vec<Seed> {
        let msg = full_message("red", 5);
        let mut produce = vec![4u8];
        record(&mut produce, 0, begin(), &[]);
        record(&mut produce, 0, attach(0, Role::Sender, "q", None), &[]);
        record(&mut produce, 0, transfer(0, 0, false, false), &msg);
        record(&mut produce, 0, transfer(0, 1, true, false), &msg[..20]);
        record(&mut produce, 0, transfer(0, 1, false, false), &msg[20..]);
        record(
            &mut produce,
            0,
            transfer(0, 2, false, true),
            &data_message(b"x"),
        );
        record(&mut produce, 0, detach(0), &[]);
        record(&mut produce, 0, Performative::End(End { error: None }), &[]);
        record(
            &mut produce,
            0,
            Performative::Close(Close { error: None }),
            &[],
        );

        let mut consume = vec![0u8];
        record(&mut consume, 0, begin(), &[]);
        record(&mut consume, 0, attach(0, Role::Sender, "q", None), &[]);
        for id in 0..4 {
            record(&mut consume, 0, transfer(0, id, false, false), &msg);
        }
        record(&mut consume, 0, attach(1, Role::Receiver, "q", None), &[]);
        record(&mut consume, 0, flow(1, 10, false), &[]);
        let outcomes = [
            DeliveryState::Accepted(Accepted {}),
            DeliveryState::Released(Released {}),
            DeliveryState::Modified(Modified {
                delivery_failed: Some(true),
                undeliverable_here: None,
                message_annotations: None,
            }),
            DeliveryState::Rejected(Rejected { error: None }),
        ];
        for (id, outcome) in (0u32..).zip(outcomes) {
            record(&mut consume, 0, disposition(id, id, outcome), &[]);
        }
        record(
            &mut consume,
            0,
            disposition(0, 3, DeliveryState::Accepted(Accepted {})),
            &[],
        );
        record(&mut consume, 0, flow(1, 5, true), &[]);

        let mut topic = vec![1u8];
        record(&mut topic, 0, begin(), &[]);
        record(&mut topic, 1, begin(), &[]);
        let filter = Some("color = 'red' AND weight > 3");
        record(
            &mut topic,
            1,
            attach(0, Role::Receiver, "topic.t", filter),
            &[],
        );
        record(&mut topic, 1, flow(0, 10, false), &[]);
        record(&mut topic, 0, attach(0, Role::Sender, "topic.t", None), &[]);
        record(&mut topic, 0, transfer(0, 0, false, false), &msg);
        record(
            &mut topic,
            0,
            transfer(0, 1, false, false),
            &full_message("blue", 9),
        );
        record(
            &mut topic,
            1,
            disposition(0, 0, DeliveryState::Accepted(Accepted {})),
            &[],
        );
        record(&mut topic, 1, detach(0), &[]);
        vec![
            ("produce".into(), produce),
            ("consume".into(), consume),
            ("topic".into(), topic),
        ]
    }

    /// The connection seeds as raw frames, plus SASL frames.
    pub fn frame_decoder() -> Vec<Seed> {
        let mut seeds = Vec::new();
        for (name, input) in connection() {
            let mut stream = vec![0xff, 0xff, 0x0f];
            let mut rest = &input[1..];
            while let [channel, hi, lo, tail @ ..] = rest {
                let len = usize::from(u16::from_be_bytes([*hi, *lo]));
                let (b, next) = tail.split_at(len);
                stream.extend_from_slice(&((b.len() + FRAME_HEADER_LEN) as u32).to_be_bytes());
                stream.extend_from_slice(&[2, 0, 0, *channel]);
                stream.extend_from_slice(b);
                rest = next;
            }
            seeds.push((name, stream));
        }
        let mut sasl = vec![0x10, 0x00, 0x07];
        for frame in sasl_frames() {
            let mut buf = BytesMut::new();
            encode_sasl_frame(&mut buf, &frame).unwrap();
            sasl.extend_from_slice(&buf);
        }
        seeds.push(("sasl".into(), sasl));
        seeds
    }

    fn init(mechanism: &str, response: Option<&[u8]>) -> SaslFrame {
        SaslFrame::Init(SaslInit {
            mechanism: Symbol::from(mechanism),
            initial_response: response.map(|r| Binary::from(r.to_vec())),
            hostname: Some("localhost".into()),
        })
    }

    fn response(bytes: &[u8]) -> SaslFrame {
        SaslFrame::Response(SaslResponse {
            response: Binary::from(bytes.to_vec()),
        })
    }

    fn sasl_frames() -> Vec<SaslFrame> {
        vec![
            init("PLAIN", Some(b"\0alice\0secret")),
            init("ANONYMOUS", None),
            init("SCRAM-SHA-256", Some(b"n,,n=alice,r=fuzznonce")),
            response(b"c=biws,r=fuzznonce,p=AAAA"),
        ]
    }

    /// SASL frame bodies as `{ policy | { len | body }* }`.
    fn sasl_input(policy: u8, frames: &[SaslFrame]) -> Vec<u8> {
        let mut out = vec![policy];
        for frame in frames {
            let mut buf = BytesMut::new();
            encode_sasl_frame(&mut buf, frame).unwrap();
            let b = &buf[FRAME_HEADER_LEN..];
            out.extend_from_slice(&(b.len() as u16).to_be_bytes());
            out.extend_from_slice(b);
        }
        out
    }

    pub fn sasl() -> Vec<Seed> {
        let plain = init("PLAIN", Some(b"ops\0alice\0secret"));
        let wrong = init("PLAIN", Some(b"\0alice\0wrong"));
        let later = [init("PLAIN", None), response(b"\0alice\0secret")];
        let scram = [
            init("SCRAM-SHA-256", Some(b"n,,n=alice,r=fuzznonce")),
            response(b"c=biws,r=fuzznonce,p=dGhpcyBpcyBub3QgYSBwcm9vZg=="),
        ];
        vec![
            ("plain".into(), sasl_input(0, &[plain])),
            ("wrong".into(), sasl_input(0, &[wrong])),
            ("plain-later".into(), sasl_input(0, &later)),
            (
                "anonymous".into(),
                sasl_input(1, &[init("ANONYMOUS", None)]),
            ),
            ("scram".into(), sasl_input(3, &scram)),
        ]
    }

    pub fn manifest() -> Vec<Seed> {
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut seeds = Vec::new();
        for (name, path) in [
            ("app", examples.join("app.yaml")),
            (
                "address-types",
                examples.join("address-types/manifests.yaml"),
            ),
        ] {
            seeds.push((name.into(), std::fs::read(path).unwrap()));
        }
        seeds
    }
}
