//! Just enough of an AMQP 1.0 client to send what fe2o3 will not, and to see the exact
//! frames the broker answers with: frames built by hand around performatives encoded with
//! the same types the broker decodes. No SASL, one session on channel 0. Callers bound
//! every wait.

use std::net::SocketAddr;

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

pub struct Client {
    stream: TcpStream,
    rbuf: Vec<u8>,
    /// Transfer frames sent so far: our session's next-outgoing-id.
    next_outgoing_id: u32,
}

/// A whole message of one data section: descriptor 0x75, vbin32.
pub fn data_message(body: &[u8]) -> Vec<u8> {
    let mut m = vec![0x00, 0x53, 0x75, 0xb0];
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
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
            next_outgoing_id: 0,
        };
        let open = Open {
            container_id: "raw".into(),
            hostname: None,
            max_frame_size: MaxFrameSize(MAX_FRAME),
            channel_max: ChannelMax(0),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        c.send(&Performative::Open(open), &[]).await;
        c.expect(|p| matches!(p, Performative::Open(_)).then_some(()))
            .await;
        let begin = Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 1000,
            outgoing_window: 100_000,
            handle_max: Handle(15),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        c.send(&Performative::Begin(begin), &[]).await;
        c.expect(|p| matches!(p, Performative::Begin(_)).then_some(()))
            .await;
        Ok(c)
    }

    /// Attaches a sending link and waits for the broker's attach and its credit.
    pub async fn attach_sender(&mut self, handle: u32, name: &str, address: &str) {
        let attach = Attach {
            name: name.into(),
            handle: Handle(handle),
            role: Role::Sender,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: Some(Box::new(Source::builder().build())),
            target: Some(Box::new(TargetArchetype::Target(
                Target::builder().address(address).build(),
            ))),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.send(&Performative::Attach(attach), &[]).await;
        self.expect(|p| match p {
            Performative::Attach(a) if a.handle.0 == handle => Some(()),
            _ => None,
        })
        .await;
        self.expect(|p| match p {
            Performative::Flow(f) if f.handle.as_ref().map(|h| h.0) == Some(handle) => Some(()),
            _ => None,
        })
        .await;
    }

    /// Attaches a receiving link (the broker sends) and returns the broker's attach.
    pub async fn attach_receiver(&mut self, handle: u32, name: &str, address: &str) -> Attach {
        let attach = Attach {
            name: name.into(),
            handle: Handle(handle),
            role: Role::Receiver,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
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
        self.send(&Performative::Attach(attach), &[]).await;
        self.expect(|p| match p {
            Performative::Attach(a) if a.handle.0 == handle => Some(a),
            _ => None,
        })
        .await
    }

    /// Grants `credit` on a receiving link whose delivery-count we know to be
    /// `delivery_count`, optionally asking the broker to drain.
    pub async fn flow(&mut self, handle: u32, delivery_count: u32, credit: u32, drain: bool) {
        let flow = Flow {
            next_incoming_id: Some(0),
            incoming_window: 1000,
            next_outgoing_id: self.next_outgoing_id,
            outgoing_window: 100_000,
            handle: Some(Handle(handle)),
            delivery_count: Some(delivery_count),
            link_credit: Some(credit),
            available: None,
            drain,
            echo: false,
            properties: None,
        };
        self.send(&Performative::Flow(flow), &[]).await;
    }

    /// Sends `message` as one delivery in as many frames as it takes.
    pub async fn transfer(&mut self, handle: u32, delivery_id: u32, message: &[u8]) {
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
                state: None,
                resume: false,
                aborted: false,
                batchable: false,
            };
            self.send(&Performative::Transfer(t), chunk).await;
            self.next_outgoing_id = self.next_outgoing_id.wrapping_add(1);
        }
    }

    pub async fn detach(&mut self, handle: u32) {
        let d = Detach {
            handle: Handle(handle),
            closed: true,
            error: None,
        };
        self.send(&Performative::Detach(d), &[]).await;
    }

    async fn send(&mut self, p: &Performative, payload: &[u8]) {
        let body = serde_amqp::to_vec(p).expect("performative encodes");
        let size = 8 + body.len() + payload.len();
        assert!(size <= MAX_FRAME as usize, "frame of {size} bytes");
        let mut frame = Vec::with_capacity(size);
        frame.extend_from_slice(&(size as u32).to_be_bytes());
        frame.extend_from_slice(&[2, 0, 0, 0]); // doff 2, type AMQP, channel 0
        frame.extend_from_slice(&body);
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).await.expect("write frame");
    }

    /// Reads frames until `pick` accepts one; the others are skipped. Callers bound
    /// the wait.
    pub async fn expect<T>(&mut self, pick: impl Fn(Performative) -> Option<T>) -> T {
        loop {
            if let Some(p) = self.next_performative() {
                if let Some(t) = pick(p) {
                    return t;
                }
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await.expect("read frame");
            assert!(n > 0, "the broker closed the socket");
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next whole non-empty frame's performative, if buffered.
    fn next_performative(&mut self) -> Option<Performative> {
        loop {
            let size = u32::from_be_bytes(self.rbuf.get(..4)?.try_into().ok()?) as usize;
            if self.rbuf.len() < size {
                return None;
            }
            let frame: Vec<u8> = self.rbuf.drain(..size).collect();
            let doff = usize::from(frame[4]) * 4;
            if frame.len() > doff {
                let p = serde_amqp::from_slice(&frame[doff..]).expect("performative decodes");
                return Some(p);
            }
        }
    }
}
