//! Just enough of an AMQP 1.0 client to send what fe2o3 will not, and to see the exact
//! frames the broker answers with: frames built by hand around performatives encoded with
//! the same types the broker decodes. No SASL. [`Client::open`] begins one session on
//! channel 0 and the plain methods use it; the `_on` methods take a channel, for peers
//! such as a router that multiplex many sessions on one connection. Callers bound every
//! wait.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use fe2o3_amqp::types::definitions::Fields;
use fe2o3_amqp::types::definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode};
use fe2o3_amqp::types::messaging::{DeliveryState, Source, Target, TargetArchetype};
use fe2o3_amqp::types::performatives::{
    Attach, Begin, ChannelMax, Detach, Flow, MaxFrameSize, Open, Performative, Transfer,
};
use fe2o3_amqp::types::primitives::Binary;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// Our max-frame-size; the broker's is larger, so this bounds both directions.
const MAX_FRAME: u32 = 64 * 1024;
/// Payload per transfer frame, leaving room for the frame header and performative.
const CHUNK: usize = 60_000;

/// Incoming window each session announces unless [`Client::begin_with_window`] says.
const INCOMING_WINDOW: u32 = 1000;

pub struct Client {
    stream: TcpStream,
    rbuf: Vec<u8>,
    sessions: HashMap<u16, SessionState>,
}

/// Our side of one session's transfer numbering.
#[derive(Default)]
struct SessionState {
    /// Transfer frames sent so far: the session's next-outgoing-id.
    next_outgoing_id: u32,
    /// Transfer frames received so far: the session's next-incoming-id.
    next_incoming_id: u32,
    incoming_window: u32,
}

/// One frame from the broker.
#[derive(Debug)]
pub struct Frame {
    pub channel: u16,
    pub performative: Performative,
    /// The bytes after the performative (a transfer's message section).
    pub payload: Vec<u8>,
}

/// A whole message of one data section: descriptor 0x75, vbin32.
pub fn data_message(body: &[u8]) -> Vec<u8> {
    let mut m = vec![0x00, 0x53, 0x75, 0xb0];
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A sender's attach on `handle` with `target` as given (a named target, a coordinator…).
pub fn sender_attach(handle: u32, name: &str, target: TargetArchetype) -> Attach {
    Attach {
        name: name.into(),
        handle: Handle(handle),
        role: Role::Sender,
        snd_settle_mode: SenderSettleMode::Unsettled,
        rcv_settle_mode: ReceiverSettleMode::First,
        source: Some(Box::new(Source::builder().build())),
        target: Some(Box::new(target)),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: Some(0),
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    }
}

pub fn detach_of(handle: u32) -> impl Fn(Performative) -> Option<Detach> {
    move |p| match p {
        Performative::Detach(d) if d.handle.0 == handle => Some(d),
        _ => None,
    }
}

/// Matches the broker's disposition settling delivery `id` as accepted.
pub fn accepted(id: u32) -> impl Fn(Performative) -> Option<bool> {
    move |p| match p {
        Performative::Disposition(d)
            if d.role == Role::Receiver && d.first <= id && d.last.unwrap_or(d.first) >= id =>
        {
            Some(d.settled && matches!(d.state, Some(DeliveryState::Accepted(_))))
        }
        _ => None,
    }
}

impl Client {
    /// Header exchange (no SASL), open, and begin on channel 0.
    pub async fn open(addr: SocketAddr) -> std::io::Result<Client> {
        let mut c = Client::connect(addr, "raw", None).await?;
        c.begin(0).await;
        Ok(c)
    }

    /// Header exchange (no SASL) and open as `container_id` with open `properties`; no
    /// session yet.
    pub async fn connect(
        addr: SocketAddr,
        container_id: &str,
        properties: Option<Fields>,
    ) -> std::io::Result<Client> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(&AMQP_HEADER).await?;
        let mut header = [0u8; 8];
        stream.read_exact(&mut header).await?;
        assert_eq!(
            header, AMQP_HEADER,
            "the broker answers with the AMQP header"
        );
        let mut c = Client {
            stream,
            rbuf: Vec::new(),
            sessions: HashMap::new(),
        };
        let open = Open {
            container_id: container_id.into(),
            hostname: None,
            max_frame_size: MaxFrameSize(MAX_FRAME),
            channel_max: ChannelMax(u16::MAX),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties,
        };
        c.send_on(0, &Performative::Open(open), &[]).await;
        c.expect(|p| matches!(p, Performative::Open(_)).then_some(()))
            .await;
        Ok(c)
    }

    /// Begins a session on `channel` and waits for the broker's begin.
    pub async fn begin(&mut self, channel: u16) {
        self.begin_with_window(channel, INCOMING_WINDOW).await;
    }

    /// Begins a session on `channel` that lets the broker send at most `incoming_window`
    /// transfer frames until our next flow.
    pub async fn begin_with_window(&mut self, channel: u16, incoming_window: u32) {
        self.sessions.insert(
            channel,
            SessionState {
                incoming_window,
                ..SessionState::default()
            },
        );
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
        self.send_on(channel, &Performative::Begin(begin), &[])
            .await;
        self.expect_on(|ch, p| match p {
            Performative::Begin(b) if ch == channel => {
                assert_eq!(b.remote_channel, Some(channel), "begin answers our channel");
                Some(())
            }
            _ => None,
        })
        .await;
    }

    /// Attaches a sending link and waits for the broker's attach and its credit.
    pub async fn attach_sender(&mut self, handle: u32, name: &str, address: &str) {
        self.attach_sender_on(0, handle, name, address).await;
    }

    /// Attaches a sending link on the session of `channel`, waits for the broker's attach
    /// and returns the credit it grants (its first link flow).
    pub async fn attach_sender_on(
        &mut self,
        channel: u16,
        handle: u32,
        name: &str,
        address: &str,
    ) -> Flow {
        let target = TargetArchetype::Target(Target::builder().address(address).build());
        let attach = sender_attach(handle, name, target);
        self.send_on(channel, &Performative::Attach(attach), &[])
            .await;
        self.expect_on(|ch, p| match p {
            Performative::Attach(a) if ch == channel && a.handle.0 == handle => Some(()),
            _ => None,
        })
        .await;
        self.expect_on(|ch, p| match p {
            Performative::Flow(f)
                if ch == channel && f.handle.as_ref().map(|h| h.0) == Some(handle) =>
            {
                Some(f)
            }
            _ => None,
        })
        .await
    }

    /// Attaches a receiving link (the broker sends) and returns the broker's attach.
    pub async fn attach_receiver(&mut self, handle: u32, name: &str, address: &str) -> Attach {
        self.attach_receiver_on(0, handle, name, address).await
    }

    /// Attaches a receiving link on the session of `channel` and returns the broker's
    /// attach.
    pub async fn attach_receiver_on(
        &mut self,
        channel: u16,
        handle: u32,
        name: &str,
        address: &str,
    ) -> Attach {
        self.attach_receiver_settling(channel, handle, name, address, ReceiverSettleMode::First)
            .await
    }

    /// [`Client::attach_receiver_on`] asking for receiver-settle-mode `mode`.
    pub async fn attach_receiver_settling(
        &mut self,
        channel: u16,
        handle: u32,
        name: &str,
        address: &str,
        mode: ReceiverSettleMode,
    ) -> Attach {
        let attach = Attach {
            name: name.into(),
            handle: Handle(handle),
            role: Role::Receiver,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: mode,
            source: Some(Box::new(Source::builder().address(address).build())),
            target: Some(Box::new(TargetArchetype::Target(Target::builder().build()))),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: None,
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.send_on(channel, &Performative::Attach(attach), &[])
            .await;
        self.expect_on(|ch, p| match p {
            Performative::Attach(a) if ch == channel && a.handle.0 == handle => Some(a),
            _ => None,
        })
        .await
    }

    /// Sends `attach` exactly as given (any source, target and capabilities) on the session
    /// of `channel` and returns the broker's attach for its handle.
    pub async fn attach_as_given_on(&mut self, channel: u16, attach: Attach) -> Attach {
        let handle = attach.handle.0;
        self.send_on(channel, &Performative::Attach(attach), &[])
            .await;
        self.expect_on(|ch, p| match p {
            Performative::Attach(a) if ch == channel && a.handle.0 == handle => Some(a),
            _ => None,
        })
        .await
    }

    /// Grants `credit` on a receiving link whose delivery-count we know to be
    /// `delivery_count`, optionally asking the broker to drain.
    pub async fn flow(&mut self, handle: u32, delivery_count: u32, credit: u32, drain: bool) {
        self.flow_on(0, handle, delivery_count, credit, drain).await;
    }

    /// [`Client::flow`] on the session of `channel`; it also reopens the session's
    /// incoming window to its size as begun.
    pub async fn flow_on(
        &mut self,
        channel: u16,
        handle: u32,
        delivery_count: u32,
        credit: u32,
        drain: bool,
    ) {
        let s = self.session(channel);
        let flow = Flow {
            next_incoming_id: Some(s.next_incoming_id),
            incoming_window: s.incoming_window,
            next_outgoing_id: s.next_outgoing_id,
            outgoing_window: 100_000,
            handle: Some(Handle(handle)),
            delivery_count: Some(delivery_count),
            link_credit: Some(credit),
            available: None,
            drain,
            echo: false,
            properties: None,
        };
        self.send_on(channel, &Performative::Flow(flow), &[]).await;
    }

    /// Sends `message` as one delivery in as many frames as it takes.
    pub async fn transfer(&mut self, handle: u32, delivery_id: u32, message: &[u8]) {
        self.transfer_on(0, handle, delivery_id, message).await;
    }

    /// [`Client::transfer`] on the session of `channel`.
    pub async fn transfer_on(
        &mut self,
        channel: u16,
        handle: u32,
        delivery_id: u32,
        message: &[u8],
    ) {
        self.transfer_with_state_on(channel, handle, delivery_id, message, None)
            .await;
    }

    /// [`Client::transfer_on`] with a delivery state on its first frame (a transaction's
    /// `transactional-state`, say).
    pub async fn transfer_with_state_on(
        &mut self,
        channel: u16,
        handle: u32,
        delivery_id: u32,
        message: &[u8],
        state: Option<DeliveryState>,
    ) {
        let chunks: Vec<&[u8]> = message.chunks(CHUNK).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let first = i == 0;
            let t = Transfer {
                handle: Handle(handle),
                delivery_id: first.then_some(delivery_id),
                delivery_tag: first.then(|| Binary::from(delivery_id.to_be_bytes().to_vec())),
                message_format: first.then_some(0),
                settled: first.then_some(false),
                more: i + 1 < chunks.len(),
                rcv_settle_mode: None,
                state: if first { state.clone() } else { None },
                resume: false,
                aborted: false,
                batchable: false,
            };
            self.send_on(channel, &Performative::Transfer(t), chunk)
                .await;
            let s = self.session(channel);
            s.next_outgoing_id = s.next_outgoing_id.wrapping_add(1);
        }
    }

    /// A session flow (no handle) that reopens the incoming window of `channel`.
    pub async fn window_on(&mut self, channel: u16) {
        let s = self.session(channel);
        let flow = Flow {
            next_incoming_id: Some(s.next_incoming_id),
            incoming_window: s.incoming_window,
            next_outgoing_id: s.next_outgoing_id,
            outgoing_window: 100_000,
            handle: None,
            delivery_count: None,
            link_credit: None,
            available: None,
            drain: false,
            echo: false,
            properties: None,
        };
        self.send_on(channel, &Performative::Flow(flow), &[]).await;
    }

    pub async fn detach(&mut self, handle: u32) {
        self.detach_on(0, handle).await;
    }

    pub async fn detach_on(&mut self, channel: u16, handle: u32) {
        let d = Detach {
            handle: Handle(handle),
            closed: true,
            error: None,
        };
        self.send_on(channel, &Performative::Detach(d), &[]).await;
    }

    /// Sends any performative on `channel`, e.g. a disposition.
    pub async fn send_on(&mut self, channel: u16, p: &Performative, payload: &[u8]) {
        let body = serde_amqp::to_vec(p).expect("performative encodes");
        let size = 8 + body.len() + payload.len();
        assert!(size <= MAX_FRAME as usize, "frame of {size} bytes");
        let mut frame = Vec::with_capacity(size);
        frame.extend_from_slice(&(size as u32).to_be_bytes());
        frame.extend_from_slice(&[2, 0]); // doff 2, type AMQP
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&body);
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).await.expect("write frame");
    }

    /// Reads frames until `pick` accepts one; the others are skipped. Callers bound
    /// the wait.
    pub async fn expect<T>(&mut self, pick: impl Fn(Performative) -> Option<T>) -> T {
        self.expect_on(|_, p| pick(p)).await
    }

    /// [`Client::expect`], with the channel each frame came on.
    pub async fn expect_on<T>(&mut self, pick: impl Fn(u16, Performative) -> Option<T>) -> T {
        loop {
            let f = self.next_frame().await;
            if let Some(t) = pick(f.channel, f.performative) {
                return t;
            }
        }
    }

    /// The next non-empty frame, whatever it is. Callers bound the wait.
    pub async fn next_frame(&mut self) -> Frame {
        loop {
            if let Some(f) = self.buffered_frame() {
                return f;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await.expect("read frame");
            assert!(n > 0, "the broker closed the socket");
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Ends our side (FIN after every byte written, never a reset that could discard
    /// them) and reads until the broker closes its side; bounded by `limit`.
    pub async fn finish_and_wait_close(mut self, limit: Duration) {
        self.stream.shutdown().await.expect("shutdown our side");
        let mut sink = [0u8; 16 * 1024];
        let drained = tokio::time::timeout(limit, async {
            while matches!(self.stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        assert!(drained.is_ok(), "the broker did not close within {limit:?}");
    }

    /// Every frame that arrives until the broker closes the socket or has been silent
    /// for `quiet`; a read error counts as closed.
    pub async fn frames_until_quiet_or_closed(&mut self, quiet: Duration) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            if let Some(f) = self.buffered_frame() {
                frames.push(f);
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout(quiet, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.rbuf.extend_from_slice(&chunk[..n]),
                _ => return frames,
            }
        }
    }

    /// Every frame that arrives until the broker has been silent for `quiet`.
    pub async fn frames_until_quiet(&mut self, quiet: Duration) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Ok(f) = tokio::time::timeout(quiet, self.next_frame()).await {
            frames.push(f);
        }
        frames
    }

    /// The next whole non-empty frame, if buffered; counts incoming transfers.
    fn buffered_frame(&mut self) -> Option<Frame> {
        loop {
            let size = u32::from_be_bytes(self.rbuf.get(..4)?.try_into().ok()?) as usize;
            if self.rbuf.len() < size {
                return None;
            }
            let frame: Vec<u8> = self.rbuf.drain(..size).collect();
            let doff = usize::from(frame[4]) * 4;
            let channel = u16::from_be_bytes([frame[6], frame[7]]);
            if frame.len() > doff {
                let body = bytes::Bytes::copy_from_slice(&frame[doff..]);
                let (performative, payload) =
                    entrepot::amqp::frame::split_performative(&body).expect("performative decodes");
                if matches!(performative, Performative::Transfer(_)) {
                    let s = self.session(channel);
                    s.next_incoming_id = s.next_incoming_id.wrapping_add(1);
                }
                return Some(Frame {
                    channel,
                    performative,
                    payload: payload.to_vec(),
                });
            }
        }
    }

    fn session(&mut self, channel: u16) -> &mut SessionState {
        self.sessions
            .entry(channel)
            .or_insert_with(|| SessionState {
                incoming_window: INCOMING_WINDOW,
                ..SessionState::default()
            })
    }
}
