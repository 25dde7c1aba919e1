//! Hostile and broken bytes on the AMQP port: each is confined to its own connection.
//!
//! Method: raw TCP sockets write exact bytes — a wrong protocol header, seeded random
//! bytes after a valid header, an oversized frame, a truncated frame, an unknown
//! performative — and read everything the broker answers until it closes the socket
//! (every read bounded by [`READ_TIMEOUT`]). Frames in the answer are decoded with
//! serde_amqp and the `close` frame's error condition is checked. Afterwards an fe2o3
//! client on a fresh connection still sends and receives, and the process is alive.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use fe2o3_amqp_types::performatives::{ChannelMax, MaxFrameSize, Open, Performative};
use fe2o3_amqp_types::primitives::Symbol;

use crate::harness::BrokerProcess;

/// Longest we wait for the broker to answer or close; beyond the broker's own 10 s
/// handshake timeout so a broker that merely waits is caught as "never closed".
const READ_TIMEOUT: Duration = Duration::from_secs(20);
const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
const FRAMING_ERROR: &str = "amqp:connection:framing-error";
const DECODE_ERROR: &str = "amqp:decode-error";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_its_own_connection_and_the_broker_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.amqp;
    tokio::task::spawn_blocking(move || {
        a_wrong_protocol_header_gets_our_header_and_a_closed_socket(addr);
        random_bytes_after_the_header_close_the_connection(addr);
        a_frame_beyond_max_frame_size_is_a_framing_error(addr);
        a_truncated_frame_then_close_is_harmless(addr);
        an_unknown_performative_is_a_decode_error(addr);
    })
    .await
    .unwrap();
    a_normal_client_still_round_trips(&broker).await;
    assert!(process_is_running(broker.pid()), "broker process died");
}

fn a_wrong_protocol_header_gets_our_header_and_a_closed_socket(addr: std::net::SocketAddr) {
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"AMQP\x00\x02\x00\x00",
        b"\x16\x03\x01\x02\x00\x01\x00\x01",
    ] {
        let mut s = connect(addr);
        s.write_all(garbage).unwrap();
        let reply = read_to_close(&mut s);
        assert_eq!(reply.len(), 8, "reply to {garbage:?}: {reply:?}");
        assert_eq!(&reply[..4], b"AMQP", "reply to {garbage:?}: {reply:?}");
    }
}

fn random_bytes_after_the_header_close_the_connection(addr: std::net::SocketAddr) {
    for seed in 1..=16u64 {
        let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let len = 1 + (rng.next() % 2048) as usize;
        let garbage: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let after_open = seed % 2 == 0;

        // Raw random bytes: the broker must not hang waiting for a frame that never
        // completes, so we half-close after writing; it must close its side too.
        let mut s = connect(addr);
        s.write_all(&AMQP_HEADER).unwrap();
        if after_open {
            s.write_all(&frame(0, &open_body())).unwrap();
        }
        s.write_all(&garbage).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let reply = read_to_close(&mut s);
        if let Some(condition) = close_condition(&reply) {
            assert!(
                [FRAMING_ERROR, DECODE_ERROR, "amqp:illegal-state"].contains(&condition.as_str()),
                "seed {seed}: closed with {condition}"
            );
        }

        // The same bytes as the body of a well-formed frame: the frame layer accepts it,
        // the performative decoder must reject it with a close frame.
        let mut body = garbage.clone();
        body[0] = body[0].max(1); // never a described type, so never a valid performative
        let mut s = connect(addr);
        s.write_all(&AMQP_HEADER).unwrap();
        s.write_all(&frame(0, &open_body())).unwrap();
        s.write_all(&frame(0, &body)).unwrap();
        let reply = read_to_close(&mut s);
        let condition = close_condition(&reply)
            .unwrap_or_else(|| panic!("seed {seed}: no close with error in {reply:?}"));
        assert!(
            [FRAMING_ERROR, DECODE_ERROR].contains(&condition.as_str()),
            "seed {seed}: closed with {condition}"
        );
    }
}

fn a_frame_beyond_max_frame_size_is_a_framing_error(addr: std::net::SocketAddr) {
    let mut s = connect(addr);
    s.write_all(&AMQP_HEADER).unwrap();
    s.write_all(&frame(0, &open_body())).unwrap();
    // Learn the broker's max-frame-size from its open before exceeding it.
    let mut head = [0u8; 8];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head, AMQP_HEADER);
    let broker_open = read_frame(&mut s);
    let Performative::Open(open) = decode_performative(&broker_open) else {
        panic!("expected the broker's open");
    };
    let too_big = open.max_frame_size.0 + 1;
    let mut header = too_big.to_be_bytes().to_vec();
    header.extend_from_slice(&[2, 0, 0, 0]);
    // Only the header: the size alone is the error, and the broker has then read all we
    // sent (unread bytes would make its close a reset that can swallow the close frame).
    s.write_all(&header).unwrap();
    let reply = read_to_close(&mut s);
    assert_eq!(close_condition(&reply).as_deref(), Some(FRAMING_ERROR));
}

fn a_truncated_frame_then_close_is_harmless(addr: std::net::SocketAddr) {
    for cut in [1, 4, 7, 12] {
        let mut s = connect(addr);
        s.write_all(&AMQP_HEADER).unwrap();
        let open = frame(0, &open_body());
        s.write_all(&open[..cut.min(open.len() - 1)]).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let reply = read_to_close(&mut s);
        assert!(reply.starts_with(&AMQP_HEADER), "cut {cut}: {reply:?}");
    }
}

fn an_unknown_performative_is_a_decode_error(addr: std::net::SocketAddr) {
    // described(ulong 0x30, empty list) and described(symbol, empty list)
    let numeric = vec![0x00, 0x53, 0x30, 0x45];
    let mut symbolic = vec![0x00, 0xa3, 18];
    symbolic.extend_from_slice(b"amqp:nonsense:list");
    symbolic.push(0x45);
    for body in [numeric, symbolic] {
        let mut s = connect(addr);
        s.write_all(&AMQP_HEADER).unwrap();
        s.write_all(&frame(0, &open_body())).unwrap();
        s.write_all(&frame(0, &body)).unwrap();
        let reply = read_to_close(&mut s);
        assert_eq!(
            close_condition(&reply).as_deref(),
            Some(DECODE_ERROR),
            "{body:?}"
        );
    }
}

async fn a_normal_client_still_round_trips(broker: &BrokerProcess) {
    let mut conn = Connection::open("after-garbage", broker.url().as_str())
        .await
        .unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut sender = Sender::attach(&mut session, "s", "after-garbage")
        .await
        .unwrap();
    sender
        .send("still here")
        .await
        .unwrap()
        .accepted_or_else(|o| o)
        .unwrap();
    let mut receiver = Receiver::attach(&mut session, "r", "after-garbage")
        .await
        .unwrap();
    let d = tokio::time::timeout(READ_TIMEOUT, receiver.recv::<String>())
        .await
        .expect("receive in time")
        .unwrap();
    assert_eq!(d.body(), "still here");
    receiver.accept(&d).await.unwrap();
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
    session.end().await.unwrap();
    conn.close().await.unwrap();
}

fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, READ_TIMEOUT).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s
}

/// Everything the broker writes until it closes; panics if it never does.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A reset after the close frame still means "closed".
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("broker did not close within {READ_TIMEOUT:?} ({e}); got {out:?}"),
        }
    }
}

/// The error condition of the `close` frame in a reply (frames, after the protocol
/// header if it is still there), if there is a close with an error.
fn close_condition(reply: &[u8]) -> Option<String> {
    let mut rest = reply.strip_prefix(&AMQP_HEADER[..]).unwrap_or(reply);
    while rest.len() >= 8 {
        let size = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        assert!(
            size >= 8 && size <= rest.len(),
            "broken frame from broker: {rest:?}"
        );
        let doff = usize::from(rest[4]) * 4;
        let body = &rest[doff..size];
        if !body.is_empty() {
            if let Performative::Close(close) = decode_performative(body) {
                let condition = close.error?.condition;
                let symbol: Symbol =
                    serde_amqp::from_slice(&serde_amqp::to_vec(&condition).unwrap()).unwrap();
                return Some(symbol.0);
            }
        }
        rest = &rest[size..];
    }
    None
}

fn read_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut size = [0u8; 4];
    s.read_exact(&mut size).unwrap();
    let mut rest = vec![0u8; u32::from_be_bytes(size) as usize - 4];
    s.read_exact(&mut rest).unwrap();
    let doff = usize::from(rest[0]) * 4;
    rest[doff - 4..].to_vec()
}

fn decode_performative(body: &[u8]) -> Performative {
    serde_amqp::from_slice(body).unwrap_or_else(|e| panic!("broker sent {body:?}: {e}"))
}

/// An AMQP frame: `{ size: u32 | doff: u8 = 2 | type: u8 = 0 | channel: u16 | body }`.
fn frame(channel: u16, body: &[u8]) -> Vec<u8> {
    let mut f = ((body.len() + 8) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[2, 0]);
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn open_body() -> Vec<u8> {
    let open = Open {
        container_id: "garbage".into(),
        hostname: None,
        max_frame_size: MaxFrameSize(64 * 1024),
        channel_max: ChannelMax(7),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    serde_amqp::to_vec(&Performative::Open(open)).unwrap()
}

fn process_is_running(pid: u32) -> bool {
    // `/proc/<pid>/stat`'s third field is the state; a zombie ("Z") has exited.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit(')').next().unwrap_or_default().trim_start();
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

/// Seeded so a failure names a reproducible input.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
