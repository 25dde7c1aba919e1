//! Raw AMQP frames for the campaign's own clients, and the campaign's message format.
//!
//! Unlike `raw_client`, nothing here panics on I/O: the broker under test is SIGKILLed,
//! frozen or closes sockets at any moment, and the campaign must go on and report. Every
//! call returns an `io::Result`; callers bound every wait.
//!
//! A campaign message is one application-properties section (`seq`) and one data
//! section whose body starts with the big-endian sequence number and continues with a
//! pattern derived from it, so a delivery names its message and a torn, mixed-up or
//! foreign body shows.

use std::io::{Error, ErrorKind};
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use fe2o3_amqp::types::definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode};
use fe2o3_amqp::types::messaging::{DeliveryState, Source, Target, TargetArchetype};
use fe2o3_amqp::types::performatives::{
    Attach, Begin, ChannelMax, Close, Flow, MaxFrameSize, Open, Performative, Transfer,
};
use fe2o3_amqp::types::primitives::Binary;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// Our max-frame-size; the broker's is larger, so this bounds both directions.
pub const MAX_FRAME: u32 = 64 * 1024;
/// Largest payload we put in one transfer frame (room for the frame header and transfer).
pub const CHUNK: usize = 60_000;

/// One frame from the broker.
pub struct Frame {
    pub channel: u16,
    pub performative: Performative,
    /// The bytes after the performative (a transfer's message section).
    pub payload: Bytes,
}

pub struct Wire {
    stream: TcpStream,
    rbuf: BytesMut,
    /// When bytes last came from the broker (an empty heartbeat frame counts).
    last_read: std::time::Instant,
}

impl Wire {
    /// Header exchange (no SASL) and open as `container`; no session yet.
    pub async fn connect(addr: SocketAddr, container: &str) -> std::io::Result<Wire> {
        Wire::connect_with(addr, container, None).await
    }

    /// [`Wire::connect`] announcing `idle_time_out` (ms) in our open: the broker then
    /// sends a frame at least every half of it, so [`Wire::silent_for`] beyond it means
    /// the broker is gone (stopped, partitioned) even though its socket stays open.
    pub async fn connect_with(
        addr: SocketAddr,
        container: &str,
        idle_time_out: Option<u32>,
    ) -> std::io::Result<Wire> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&AMQP_HEADER).await?;
        let mut header = [0u8; 8];
        stream.read_exact(&mut header).await?;
        if header != AMQP_HEADER {
            return Err(Error::new(
                ErrorKind::InvalidData,
                format!("header {header:?}"),
            ));
        }
        let mut wire = Wire {
            stream,
            rbuf: BytesMut::new(),
            last_read: std::time::Instant::now(),
        };
        let mut ours = open(container);
        ours.idle_time_out = idle_time_out;
        wire.send(0, &Performative::Open(ours), &[]).await?;
        wire.expect(|_, p| matches!(p, Performative::Open(_)).then_some(()))
            .await?;
        Ok(wire)
    }

    /// Begins a session on `channel`; returns the broker's begin.
    pub async fn begin(&mut self, channel: u16, incoming_window: u32) -> std::io::Result<Begin> {
        let begin = Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window,
            outgoing_window: 100_000,
            handle_max: Handle(1023),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.send(channel, &Performative::Begin(begin), &[]).await?;
        self.expect(|ch, p| match p {
            Performative::Begin(b) if ch == channel => Some(b),
            _ => None,
        })
        .await
    }

    /// Sends one frame: `{ size: u32 | doff: u8 = 2 | type: u8 = 0 | channel: u16 | body }`.
    pub async fn send(
        &mut self,
        channel: u16,
        p: &Performative,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let body = serde_amqp::to_vec(p).map_err(|e| Error::new(ErrorKind::InvalidData, e))?;
        let size = 8 + body.len() + payload.len();
        let mut frame = Vec::with_capacity(size);
        frame.extend_from_slice(&(size as u32).to_be_bytes());
        frame.extend_from_slice(&[2, 0]);
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&body);
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).await
    }

    /// Reads frames until `pick` takes one. A `close` from the broker is an error naming
    /// its condition. Cancel safe: a frame is only consumed once whole.
    pub async fn expect<T>(
        &mut self,
        pick: impl Fn(u16, Performative) -> Option<T>,
    ) -> std::io::Result<T> {
        loop {
            let f = self.next_frame().await?;
            if let Performative::Close(c) = &f.performative {
                return Err(Error::new(
                    ErrorKind::ConnectionAborted,
                    format!("broker closed the connection: {:?}", c.error),
                ));
            }
            if let Some(t) = pick(f.channel, f.performative) {
                return Ok(t);
            }
        }
    }

    /// The next non-empty frame. Cancel safe.
    pub async fn next_frame(&mut self) -> std::io::Result<Frame> {
        loop {
            if let Some(f) = self.buffered_frame()? {
                return Ok(f);
            }
            let n = self.stream.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                return Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    "the broker closed the socket",
                ));
            }
            self.last_read = std::time::Instant::now();
        }
    }

    /// How long the broker has sent nothing at all (not even a heartbeat).
    pub fn silent_for(&self) -> std::time::Duration {
        self.last_read.elapsed()
    }

    fn buffered_frame(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            let Some(size) = self.rbuf.get(..4) else {
                return Ok(None);
            };
            let size = u32::from_be_bytes(size.try_into().expect("4 bytes")) as usize;
            if size < 8 {
                return Err(Error::new(
                    ErrorKind::InvalidData,
                    format!("frame size {size}"),
                ));
            }
            if self.rbuf.len() < size {
                return Ok(None);
            }
            let frame = self.rbuf.split_to(size).freeze();
            let doff = usize::from(frame[4]) * 4;
            let channel = u16::from_be_bytes([frame[6], frame[7]]);
            if frame.len() > doff {
                let (performative, payload) =
                    entrepot::amqp::frame::split_performative(&frame.slice(doff..))
                        .map_err(|e| Error::new(ErrorKind::InvalidData, format!("{e:?}")))?;
                return Ok(Some(Frame {
                    channel,
                    performative,
                    payload,
                }));
            }
        }
    }

    /// A polite end: our `close`, then the broker's, waited for at most `limit`.
    pub async fn close(mut self, limit: std::time::Duration) {
        if self
            .send(0, &Performative::Close(Close { error: None }), &[])
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(limit, self.next_close()).await;
        }
    }

    async fn next_close(&mut self) {
        while let Ok(f) = self.next_frame().await {
            if matches!(f.performative, Performative::Close(_)) {
                return;
            }
        }
    }

    /// An impolite end: the socket is reset (SO_LINGER 0), nothing more is said.
    pub fn reset(self) {
        // Deprecated because a non-zero linger blocks the thread on drop; zero never does.
        #[allow(deprecated)]
        let _ = self.stream.set_linger(Some(std::time::Duration::ZERO));
        drop(self.stream);
    }
}

fn open(container: &str) -> Open {
    Open {
        container_id: container.into(),
        hostname: None,
        max_frame_size: MaxFrameSize(MAX_FRAME),
        channel_max: ChannelMax(u16::MAX),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    }
}

/// The exact bytes of the protocol header and an `open` frame, for a dribbling client.
pub fn handshake_bytes(container: &str) -> Vec<u8> {
    let body = serde_amqp::to_vec(&Performative::Open(open(container))).expect("open encodes");
    let mut bytes = AMQP_HEADER.to_vec();
    bytes.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
    bytes.extend_from_slice(&[2, 0, 0, 0]);
    bytes.extend_from_slice(&body);
    bytes
}

/// A link attach: we send to `address` (`Role::Sender`) or receive from it.
pub fn attach(
    handle: u32,
    name: &str,
    role: Role,
    address: &str,
    mode: ReceiverSettleMode,
) -> Attach {
    let (source, target) = match role {
        Role::Sender => (
            Source::builder().build(),
            Target::builder().address(address).build(),
        ),
        Role::Receiver => (
            Source::builder().address(address).build(),
            Target::builder().build(),
        ),
    };
    Attach {
        name: name.into(),
        handle: Handle(handle),
        role: role.clone(),
        snd_settle_mode: SenderSettleMode::Unsettled,
        rcv_settle_mode: mode,
        source: Some(Box::new(source)),
        target: Some(Box::new(TargetArchetype::Target(target))),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: (role == Role::Sender).then_some(0),
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    }
}

/// A link flow that also reopens the session's incoming window.
pub fn flow(
    next_incoming_id: u32,
    incoming_window: u32,
    handle: u32,
    delivery_count: u32,
    credit: u32,
) -> Performative {
    Performative::Flow(Flow {
        next_incoming_id: Some(next_incoming_id),
        incoming_window,
        next_outgoing_id: 0,
        outgoing_window: 100_000,
        handle: Some(Handle(handle)),
        delivery_count: Some(delivery_count),
        link_credit: Some(credit),
        available: None,
        drain: false,
        echo: false,
        properties: None,
    })
}

/// The first (or only) transfer frame of a delivery we send.
pub fn transfer(handle: u32, delivery_id: u32, tag: Vec<u8>, more: bool) -> Performative {
    Performative::Transfer(Transfer {
        handle: Handle(handle),
        delivery_id: Some(delivery_id),
        delivery_tag: Some(Binary::from(tag)),
        message_format: Some(0),
        settled: Some(false),
        more,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    })
}

/// A continuation frame of a multi-frame delivery.
pub fn continuation(handle: u32, more: bool) -> Performative {
    Performative::Transfer(Transfer {
        handle: Handle(handle),
        delivery_id: None,
        delivery_tag: None,
        message_format: None,
        settled: None,
        more,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    })
}

/// The outcome a disposition carries, as the campaign's ledger names it.
pub fn state_name(state: &Option<DeliveryState>) -> &'static str {
    match state {
        Some(DeliveryState::Accepted(_)) => "accepted",
        Some(DeliveryState::Rejected(_)) => "rejected",
        Some(DeliveryState::Released(_)) => "released",
        Some(DeliveryState::Modified(_)) => "modified",
        Some(_) => "other",
        None => "none",
    }
}

/// The body of message `seq`: its number, then a pattern it determines.
pub fn body(seq: u64, len: usize) -> Vec<u8> {
    let mut b = seq.to_be_bytes().to_vec();
    b.extend((8..len.max(8)).map(|j| pattern(seq, j)));
    b
}

fn pattern(seq: u64, j: usize) -> u8 {
    (seq.wrapping_mul(31).wrapping_add(j as u64) % 251) as u8
}

/// Message `seq` encoded by hand: application-properties `{seq: ulong}`, one data section.
pub fn message(seq: u64, len: usize) -> Vec<u8> {
    // 0x00 0x53 0x74: application-properties; map8 of size 15, 2 items; str8 "seq"; ulong.
    let mut m = vec![
        0x00, 0x53, 0x74, 0xc1, 15, 2, 0xa1, 3, b's', b'e', b'q', 0x80,
    ];
    m.extend_from_slice(&seq.to_be_bytes());
    let body = body(seq, len);
    m.extend_from_slice(&[0x00, 0x53, 0x75, 0xb0]);
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(&body);
    m
}

/// The sequence number of a delivered message, after checking its body against the
/// pattern; an error describes what is wrong with a foreign or corrupt message.
pub fn sequence_of(message: &[u8]) -> Result<u64, String> {
    let body = data_body(message).ok_or_else(|| format!("no data section in {}", hex(message)))?;
    let seq = u64::from_be_bytes(
        body.get(..8)
            .ok_or_else(|| format!("body of {} bytes", body.len()))?
            .try_into()
            .expect("8 bytes"),
    );
    match (8..body.len()).find(|&j| body[j] != pattern(seq, j)) {
        None => Ok(seq),
        Some(j) => Err(format!("body of seq {seq} corrupt at byte {j}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    let shown: Vec<String> = bytes.iter().take(48).map(|b| format!("{b:02x}")).collect();
    shown.join("")
}

/// The content of the (last) data section, walking the sections by their encoded sizes.
fn data_body(mut rest: &[u8]) -> Option<&[u8]> {
    let mut body = None;
    while !rest.is_empty() {
        if rest[0] != 0x00 {
            return None;
        }
        let descriptor_len = value_len(&rest[1..])?;
        let descriptor = &rest[1..1 + descriptor_len];
        let is_data = descriptor == [0x53, 0x75] || descriptor == [0x80, 0, 0, 0, 0, 0, 0, 0, 0x75];
        let value = &rest[1 + descriptor_len..];
        let len = value_len(value)?;
        if is_data {
            body = Some(match value[0] {
                0xa0 => &value[2..len],
                0xb0 => &value[5..len],
                _ => return None,
            });
        }
        rest = &value[len..];
    }
    body
}

/// The encoded length of the AMQP value at the start of `v` (constructor included).
fn value_len(v: &[u8]) -> Option<usize> {
    let code = *v.first()?;
    let len = match code {
        0x00 => {
            let d = value_len(&v[1..])?;
            1 + d + value_len(v.get(1 + d..)?)?
        }
        0x40..=0x45 => 1,
        0x50..=0x56 => 2,
        0x60..=0x61 => 3,
        0x70..=0x74 => 5,
        0x80..=0x84 => 9,
        0x94 | 0x98 => 17,
        0xa0..=0xaf | 0xc0..=0xcf | 0xe0..=0xef => 2 + usize::from(*v.get(1)?),
        0xb0..=0xbf | 0xd0..=0xdf | 0xf0..=0xff => {
            5 + u32::from_be_bytes(v.get(1..5)?.try_into().ok()?) as usize
        }
        _ => return None,
    };
    (len <= v.len()).then_some(len)
}

#[test]
fn a_campaign_message_names_its_sequence_number_and_detects_corruption() {
    let m = message(42, 100);
    assert_eq!(sequence_of(&m), Ok(42));
    let mut torn = m.clone();
    let last = torn.len() - 1;
    torn[last] ^= 1;
    assert!(sequence_of(&torn).is_err());
    // A header and message annotations in front, as the broker adds on redelivery.
    let mut annotated = vec![0x00, 0x53, 0x70, 0xc0, 3, 1, 0x52, 2];
    annotated.extend_from_slice(&[0x00, 0x53, 0x72, 0xc1, 1, 0]);
    annotated.extend_from_slice(&m);
    assert_eq!(sequence_of(&annotated), Ok(42));
}
