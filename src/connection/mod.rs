//! One task per client connection: our own AMQP 1.0 connection engine.
//!
//! The task owns the socket, the sessions and their links. It reads frames, applies them
//! to sessions, links and queues, and writes replies into one buffer that is flushed
//! whenever the task is about to wait — so a burst of dispositions or deliveries goes out
//! in one `write` — and right after a consumer's `flow` that opened deliveries, which must
//! not wait for the rest of the read (hundreds of dispositions, at small credit). Queues
//! push deliveries to the task through an unbounded channel whose length is bounded by
//! the link credit the consumer granted.
//!
//! A producer's transfer is appended to the store at once, but its `accepted` disposition
//! (and its entry into the queue) waits for the group commit that makes it durable: the
//! task keeps a FIFO of pending messages and drains it whenever the store's durable offset
//! moves. One disposition frame covers each run of consecutive delivery ids.
//!
//! Errors are scoped like the protocol: a bad transfer detaches its link, a window
//! violation ends its session, a framing error closes the connection; other connections
//! never notice. The AMQP condition of every broker error a client hears is chosen in one
//! place, `errors.rs`.

pub mod errors;
mod handshake;
mod link;
mod outbuf;
mod quickack;
mod session;
mod tenant;
mod txn;
pub use txn::{MAX_TRANSACTIONS_PER_CONNECTION, MAX_TRANSACTION_MESSAGES, TXN_ID_BYTES};

pub use handshake::TLS_HANDSHAKE_TIMEOUT;
pub use quickack::QuickAck;
mod subscribe;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fe2o3_amqp_types::definitions::{
    AmqpError, ConnectionError, Error as AmqpErrorBody, ErrorCondition,
};
use fe2o3_amqp_types::performatives::{ChannelMax, Close, MaxFrameSize, Open, Performative};
use fe2o3_amqp_types::primitives::Symbol;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::amqp::frame::{
    self, encode_frame, encode_heartbeat, FrameDecoder, FrameError, FrameKind,
};
use crate::amqp::sasl::Identity;
use crate::auth::Gatekeeper;
use crate::broker::lease::DeliveryLease;
use crate::broker::queue::{Outbound, QueuedMessage};
use crate::broker::Address;
use crate::broker::Broker;
use entrepot_storage::Durable;
use session::Session;

/// Frame size accepted before `open` is negotiated (lenient: the spec's minimum is 512).
pub const PRE_OPEN_MAX_FRAME_SIZE: u32 = 64 * 1024;
/// Flush the write buffer once it holds this much, even mid-batch.
pub const WRITE_BUFFER_FLUSH_BYTES: usize = 256 * 1024;
/// Most queue events handled before flushing and looking at the socket again.
pub const OUTBOUND_BATCH: usize = 512;
/// Frames handled from one read before the task yields to the others on its worker.
pub const FRAMES_PER_YIELD: usize = 256;
/// Most renewals one flush waits for while the leases of its deliveries take turns not
/// holding; past it the write is refused and the connection ends.
pub const MAX_GATE_WAITS: usize = 64;
/// Longest a connection waits, not reading its socket, for room in the broker-wide
/// budget of incomplete deliveries before the delivery's link is refused.
pub const INCOMPLETE_BUDGET_WAIT: Duration = Duration::from_secs(2);
/// How often a parked delivery re-checks the budget (besides being woken when room frees).
pub const INCOMPLETE_BUDGET_RECHECK: Duration = Duration::from_millis(50);
/// How often a connection re-checks producer links held back by a blocked topic.
pub const WITHHELD_RECHECK: Duration = Duration::from_millis(100);
/// Container id this broker announces.
pub const CONTAINER_ID: &str = "entrepot";

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    #[error("handshake: {0}")]
    Handshake(&'static str),
    #[error("{description}")]
    Protocol {
        condition: ErrorCondition,
        description: String,
    },
    /// An error scoped to one session: the session is ended with it, the connection and
    /// its other sessions carry on.
    #[error("session: {description}")]
    Session {
        condition: ErrorCondition,
        description: String,
    },
    #[error("peer closed the connection")]
    PeerClosed,
    #[error("connection closed")]
    Closed,
}

impl ConnError {
    /// An error that ends only the session it happened on.
    pub fn session(
        condition: impl Into<ErrorCondition>,
        description: impl Into<String>,
    ) -> ConnError {
        ConnError::Session {
            condition: condition.into(),
            description: description.into(),
        }
    }

    /// Closes the connection with `e`'s own condition and text (see `errors.rs`).
    pub fn refused(e: &impl errors::ClientError) -> ConnError {
        let (condition, description) = e.refusal();
        ConnError::Protocol {
            condition,
            description,
        }
    }

    pub fn protocol(
        condition: impl Into<ErrorCondition>,
        description: impl Into<String>,
    ) -> ConnError {
        ConnError::Protocol {
            condition: condition.into(),
            description: description.into(),
        }
    }
}

/// What the broker offers in its `open`: the anonymous relay (a sender without a target
/// address, each message routed by its `to`) and shared subscriptions (qpid-jms refuses
/// shared subscribers unless the broker offers `SHARED-SUBS`).
pub const OFFERED_CAPABILITIES: [&str; 2] = ["ANONYMOUS-RELAY", "SHARED-SUBS"];

fn offered_capabilities() -> fe2o3_amqp_types::primitives::Array<Symbol> {
    OFFERED_CAPABILITIES
        .iter()
        .map(|c| Symbol::from(*c))
        .collect::<Vec<_>>()
        .into()
}

/// Connection properties of our `open`: `product` and `version`, as Artemis and RabbitMQ
/// announce theirs.
fn open_properties() -> fe2o3_amqp_types::definitions::Fields {
    let mut fields = fe2o3_amqp_types::definitions::Fields::new();
    fields.insert(
        Symbol::from("product"),
        fe2o3_amqp_types::primitives::Value::String(CONTAINER_ID.into()),
    );
    fields.insert(
        Symbol::from("version"),
        fe2o3_amqp_types::primitives::Value::String(env!("CARGO_PKG_VERSION").into()),
    );
    fields
}

/// The error condition's symbol, for logs and tests.
pub fn condition_name(c: &ErrorCondition) -> String {
    let s: Symbol = match c {
        ErrorCondition::AmqpError(e) => e.into(),
        ErrorCondition::ConnectionError(e) => e.into(),
        ErrorCondition::SessionError(e) => e.into(),
        ErrorCondition::LinkError(e) => e.into(),
        ErrorCondition::Custom(s) => s.clone(),
        ErrorCondition::TransactionError(txn_error) => txn_error.into(),
        #[allow(unreachable_patterns)]
        _ => Symbol::from("amqp:internal-error"),
    };
    s.0
}

/// A message stored but not yet durable, waiting to be enqueued and acknowledged.
struct PendingProduce {
    durable: Durable,
    target: Address,
    msg: QueuedMessage,
    stored_at_ms: i64,
    /// When the read that brought its transfer returned (`BrokerStats::produce_accept`).
    read_at: Instant,
    /// `(remote channel, delivery id)` to accept once durable; `None` if pre-settled.
    ack: Option<(u16, u32)>,
    /// Room held in the target queue under its plan until the message is enqueued.
    reservation: Option<crate::broker::limits::Reservation>,
    /// For an address with its own store: where the committed message lies (its offset
    /// and body replace `msg`'s once `durable` completes; `link/address_produce.rs`).
    committed: Option<Box<dyn crate::broker::store::PendingCommit>>,
    /// For an address with its own store: the producer link (our channel, handle),
    /// detached if that store fails before the message is accepted.
    link: Option<(u16, u32)>,
}

/// A frame of an incomplete delivery waiting for room in the broker-wide budget; while
/// one is parked the connection does not read its socket.
struct Parked {
    /// The session's channel.
    channel: u16,
    transfer: fe2o3_amqp_types::performatives::Transfer,
    payload: bytes::Bytes,
    /// When the delivery first waited.
    since: Instant,
}

/// A consumer's outcome (receiver-settle-mode second) recorded but not yet durable: the
/// delivery is settled back once it is (for a dead-lettering outcome: once the move is).
struct PendingSettle {
    durable: crate::broker::queue::Recorded,
    /// Our channel of the session the delivery went out on.
    channel: u16,
    delivery_id: u32,
    /// The consumer's link (detached when a move to the dead-letter address fails).
    handle: u32,
    state: Option<fe2o3_amqp_types::messaging::DeliveryState>,
}

/// State of one connection (see the module docs).
pub struct Connection {
    broker: Arc<Broker>,
    wr: Writer,
    wbuf: outbuf::OutBuf,
    /// The delivery leases of the queues whose deliveries `wbuf` holds (group-backed
    /// queues, issue 12): the buffer is written only while every one holds.
    gates: Vec<Arc<DeliveryLease>>,
    decoder: FrameDecoder,
    /// Largest frame the peer accepts.
    peer_max_frame: u32,
    peer_idle_timeout: Option<Duration>,
    container_id: String,
    hostname: Option<String>,
    identity: Identity,
    /// Manifests, token authenticator, failure table.
    gate: Arc<Gatekeeper>,
    /// The address space SASL authenticated the client in (with manifests).
    login_space: Option<String>,
    /// The address space the connection works in, chosen at `open` (with manifests).
    space: Option<String>,
    /// This connection's place under its space plan's `maxConnections`.
    space_slot: Option<crate::broker::limits::SpaceConnection>,
    /// TLS SNI, when the connection came in on the amqps listener.
    sni: Option<String>,
    /// Whether the connection came in on the amqps listener.
    tls: bool,
    sessions: HashMap<u16, Session>,
    /// Channels of sessions we ended with an error, until the peer's `end` arrives.
    ending: HashSet<u16>,
    outbound_tx: mpsc::UnboundedSender<Outbound>,
    pending: VecDeque<PendingProduce>,
    /// Messages of forwarded producer links waiting for their leader's confirmation, in
    /// the order they arrived (`link/forward_produce.rs`).
    pending_forwards: VecDeque<link::PendingForward>,
    /// Consumers' outcomes waiting to become durable, in the order they were recorded
    /// (which is the order they become durable: one ack log, or one Raft log).
    pending_settles: VecDeque<PendingSettle>,
    last_read: Instant,
    last_write: Instant,
    closing: bool,
    /// Our `open` went out; a `close` must always follow one.
    open_sent: bool,
    /// Some producer link has credit withheld (a blocked topic): re-check periodically.
    withheld_links: bool,
    /// This connection's share of the budget for incomplete deliveries.
    intake: Arc<crate::broker::intake::ConnectionIntake>,
    /// A frame waiting for room in the broker-wide budget (see [`Parked`]).
    parked: Option<Parked>,
    /// Set while a parked frame is retried: when it first waited.
    park_since: Option<Instant>,
    /// The client's TCP socket: a read that leaves nothing to write is ACKed at once.
    quickack: Option<QuickAck>,
    /// Local transactions declared on this connection (txn.rs).
    txns: txn::Transactions,
}

/// The reading side of a client's byte stream (TCP or TLS).
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// The writing side of a client's byte stream (TCP or TLS).
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// An accepted client stream, split, with what the listener learned about it.
pub struct Accepted {
    pub rd: Reader,
    pub wr: Writer,
    pub peer: Option<std::net::SocketAddr>,
    /// The TLS server name the client asked for.
    pub sni: Option<String>,
    /// Whether the stream is TLS (amqps): a redirect then names the amqps port.
    pub tls: bool,
    /// The TCP socket under the stream, for prompt ACKs (`quickack.rs`).
    pub quickack: Option<QuickAck>,
}

impl Accepted {
    /// A plain TCP stream: split without a lock between the halves.
    pub fn tcp(stream: TcpStream) -> Accepted {
        let peer = stream.peer_addr().ok();
        let _ = stream.set_nodelay(true);
        let quickack = Some(QuickAck::of(&stream));
        let (rd, wr) = stream.into_split();
        Accepted {
            rd: Box::new(rd),
            wr: Box::new(wr),
            peer,
            sni: None,
            tls: false,
            quickack,
        }
    }
}

/// Serves one accepted socket until it closes.
pub async fn serve(
    stream: Accepted,
    broker: Arc<Broker>,
    gate: Arc<Gatekeeper>,
    shutdown: watch::Receiver<bool>,
) {
    let peer = stream.peer;
    broker.stats.connections.fetch_add(1, Ordering::Relaxed);
    broker
        .stats
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    let result = run(stream, Arc::clone(&broker), gate, shutdown).await;
    broker.stats.connections.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(()) | Err(ConnError::PeerClosed) | Err(ConnError::Closed) => {
            tracing::debug!(?peer, "connection closed")
        }
        Err(e) => {
            broker
                .stats
                .connection_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(?peer, error = %e, "connection ended with an error");
        }
    }
}

async fn run(
    stream: Accepted,
    broker: Arc<Broker>,
    gate: Arc<Gatekeeper>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let Accepted {
        mut rd,
        mut wr,
        peer,
        sni,
        tls,
        quickack,
    } = stream;
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    // One deadline from accept to `open`, however slowly the bytes come.
    let deadline = tokio::time::Instant::now() + broker.config().handshake_timeout();
    let admission = handshake::Admission {
        gate: &gate,
        static_users: &broker.config().users,
        allow_anonymous: broker.config().allow_anonymous,
        peer: peer.map(|p| p.ip()),
        sni: sni.as_deref(),
    };
    let login = handshake::handshake(&mut rd, &mut wr, &mut rbuf, &admission, deadline).await?;
    let (outbound_tx, outbound_rx) = mpsc::unbounded_channel();
    let intake = crate::broker::intake::ConnectionIntake::new(
        broker.config().max_incomplete_bytes_per_connection,
    );
    let mut conn = Connection {
        decoder: FrameDecoder::new(PRE_OPEN_MAX_FRAME_SIZE),
        broker,
        wr,
        wbuf: outbuf::OutBuf::default(),
        gates: Vec::new(),
        peer_max_frame: frame::MIN_MAX_FRAME_SIZE,
        peer_idle_timeout: None,
        container_id: String::new(),
        hostname: None,
        identity: login.identity,
        gate: Arc::clone(&gate),
        login_space: login.space,
        space: None,
        space_slot: None,
        sni,
        tls,
        sessions: HashMap::new(),
        ending: HashSet::new(),
        outbound_tx,
        pending: VecDeque::new(),
        pending_forwards: VecDeque::new(),
        pending_settles: VecDeque::new(),
        last_read: Instant::now(),
        last_write: Instant::now(),
        closing: false,
        open_sent: false,
        withheld_links: false,
        intake,
        parked: None,
        park_since: None,
        quickack,
        txns: txn::Transactions::default(),
    };
    let result = conn
        .main_loop(&mut rd, rbuf, outbound_rx, shutdown, deadline)
        .await;
    conn.cleanup();
    match result {
        Err(ConnError::Protocol {
            condition,
            description,
        })
        | Err(ConnError::Session {
            condition,
            description,
        }) => {
            tracing::info!(condition = %condition_name(&condition), %description, "closing connection with error");
            conn.close_with(Some(AmqpErrorBody::new(condition, description, None)))
                .await;
            Ok(())
        }
        Err(ConnError::Frame(e)) => {
            tracing::info!(error = %e, "closing connection after a framing error");
            conn.close_with(Some(e.to_amqp_error())).await;
            Err(ConnError::Frame(e))
        }
        other => other,
    }
}

impl Connection {
    async fn main_loop(
        &mut self,
        rd: &mut Reader,
        mut rbuf: BytesMut,
        mut outbound_rx: mpsc::UnboundedReceiver<Outbound>,
        mut shutdown: watch::Receiver<bool>,
        handshake_deadline: tokio::time::Instant,
    ) -> Result<(), ConnError> {
        let mut durable_rx = self.broker.store().durable_watch();
        self.expect_open(rd, &mut rbuf, handshake_deadline).await?;
        // A client may pipeline begin and attach behind its open: they are already in
        // the buffer, and no further read would bring them to light.
        self.on_buffered_frames(&mut rbuf, &mut outbound_rx).await?;
        let idle_limit = Duration::from_millis(u64::from(self.broker.config().idle_timeout_ms));
        let mut tick = tokio::time::interval(self.heartbeat_period(idle_limit));
        loop {
            self.complete_durable()?;
            self.complete_forwards()?;
            self.complete_settles()?;
            self.complete_txn_discharges()?;
            self.flush().await?;
            if self.closing {
                return Ok(());
            }
            // Outcomes wait on the ack log's (or Raft's) watch, not the message log's.
            let settle_wait = self
                .pending_settles
                .front()
                .map(|p| p.durable.clone().wait());
            let txn_wait = self.txns.discharge_wait();
            // A message to an address with its own store waits on that store's watch.
            let produce_wait = self
                .pending
                .front()
                .filter(|p| p.committed.is_some())
                .map(|p| p.durable.clone().wait());
            // A forwarded message waits on its link's carrier (its leader's answer).
            let forward_wait = self
                .pending_forwards
                .front()
                .map(|p| p.durable.clone().wait());
            let parked = self.parked.is_some();
            let intake = Arc::clone(&self.broker.intake);
            tokio::select! {
                // Backpressure: a connection whose delivery waits for room is not read.
                _ = intake.freed(), if parked => self.retry_parked(&mut rbuf, &mut outbound_rx).await?,
                _ = tokio::time::sleep(INCOMPLETE_BUDGET_RECHECK), if parked => {
                    self.retry_parked(&mut rbuf, &mut outbound_rx).await?
                }
                read = rd.read_buf(&mut rbuf), if !parked => {
                    if read? == 0 {
                        return Err(ConnError::PeerClosed);
                    }
                    self.last_read = Instant::now();
                    self.on_buffered_frames(&mut rbuf, &mut outbound_rx).await?;
                    // Deliveries queued meanwhile (by other connections' producers, or by
                    // a flow mid-read: see `on_buffered_frames`) leave in this turn's
                    // flush, before the socket is read again.
                    self.take_outbound(&mut outbound_rx).await?;
                    if self.wbuf.is_empty() {
                        // No reply to carry the ACK: a client with Nagle on would hold
                        // its next flow or disposition for the delayed ACK.
                        if let Some(q) = &self.quickack {
                            q.now();
                        }
                    }
                    if rbuf.capacity() - rbuf.len() < 16 * 1024 {
                        rbuf.reserve(64 * 1024);
                    }
                }
                Some(event) = outbound_rx.recv() => {
                    self.on_outbound(event)?;
                    self.take_outbound(&mut outbound_rx).await?;
                }
                changed = durable_rx.changed(), if !self.pending.is_empty() => {
                    if changed.is_err() {
                        return Err(ConnError::protocol(AmqpError::InternalError, "message store closed"));
                    }
                }
                _ = async { settle_wait?.await; Some(()) }, if settle_wait.is_some() => {}
                // A failure is seen by `complete_durable` (`has_failed`).
                _ = async { let _ = produce_wait?.await; Some(()) }, if produce_wait.is_some() => {}
                // A failure is seen by `complete_forwards` (`has_failed`).
                _ = async { let _ = forward_wait?.await; Some(()) }, if forward_wait.is_some() => {}
                // A commit waiting for its acknowledgements (its messages wake durable_rx).
                _ = async { txn_wait?.await; Some(()) }, if txn_wait.is_some() => {}
                _ = tick.tick() => self.on_tick(idle_limit)?,
                _ = tokio::time::sleep(WITHHELD_RECHECK), if self.withheld_links => self.release_withheld()?,
                _ = shutdown.changed() => {
                    let why = self.broker.close_description().to_owned();
                    return Err(ConnError::protocol(ConnectionError::ConnectionForced, why));
                }
            }
        }
    }

    /// Encodes the queue events already waiting (at most [`OUTBOUND_BATCH`]), flushing
    /// whenever [`WRITE_BUFFER_FLUSH_BYTES`] are buffered; the caller flushes the rest.
    async fn take_outbound(
        &mut self,
        outbound_rx: &mut mpsc::UnboundedReceiver<Outbound>,
    ) -> Result<(), ConnError> {
        for _ in 0..OUTBOUND_BATCH {
            match outbound_rx.try_recv() {
                Ok(event) => self.on_outbound(event)?,
                Err(_) => break,
            }
            if self.wbuf.len() >= WRITE_BUFFER_FLUSH_BYTES {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Handles every whole frame in `rbuf`. The deliveries a `flow` opened (the queue
    /// dispatches synchronously) are written before the next frame is handled: a read can
    /// hold hundreds of dispositions behind a consumer's flow, and its credit is spent and
    /// waiting until those deliveries leave. Handling the rest first held them back by
    /// half a millisecond at credit 250 (issue 15's credit ratio). A flow that opened
    /// nothing (a session's, an echo, no credit) writes nothing early: a read of many
    /// flows costs no more writes than before.
    async fn on_buffered_frames(
        &mut self,
        rbuf: &mut BytesMut,
        outbound_rx: &mut mpsc::UnboundedReceiver<Outbound>,
    ) -> Result<(), ConnError> {
        let mut handled = 0usize;
        while self.parked.is_none() {
            let Some(frame) = self.decoder.decode(rbuf)? else {
                break;
            };
            handled += 1;
            if handled % FRAMES_PER_YIELD == 0 {
                // A read can hold thousands of small frames: let the other connections
                // (and shutdown) have the worker between slices of them.
                tokio::task::yield_now().await;
            }
            if frame.kind != FrameKind::Amqp {
                return Err(ConnError::protocol(
                    AmqpError::NotAllowed,
                    "SASL frame after the handshake",
                ));
            }
            let flow = !frame.is_heartbeat() && self.on_frame(frame.channel, &frame.body)?;
            if flow && !outbound_rx.is_empty() {
                self.take_outbound(outbound_rx).await?;
                self.flush().await?;
            }
            if self.wbuf.len() >= WRITE_BUFFER_FLUSH_BYTES {
                self.flush().await?;
            }
        }
        Ok(())
    }

    fn heartbeat_period(&self, idle_limit: Duration) -> Duration {
        let ours = idle_limit / 4;
        let theirs = self.peer_idle_timeout.map_or(ours, |t| t / 2);
        ours.min(theirs).max(Duration::from_millis(100))
    }

    fn release_withheld(&mut self) -> Result<(), ConnError> {
        let channels: Vec<u16> = self.sessions.keys().copied().collect();
        let mut still = false;
        for channel in channels {
            if let Some(mut session) = self.sessions.remove(&channel) {
                let result = session.release_withheld(self);
                self.sessions.insert(channel, session);
                still |= result?;
            }
        }
        self.withheld_links = still;
        Ok(())
    }

    fn on_tick(&mut self, idle_limit: Duration) -> Result<(), ConnError> {
        if !idle_limit.is_zero() && self.last_read.elapsed() > idle_limit {
            return Err(ConnError::protocol(
                AmqpError::ResourceLimitExceeded,
                "local-idle-timeout expired",
            ));
        }
        if let Some(t) = self.peer_idle_timeout {
            if self.last_write.elapsed() >= t / 2 {
                encode_heartbeat(&mut self.wbuf);
            }
        }
        Ok(())
    }

    /// Reads the client's `open` and answers with ours.
    async fn expect_open(
        &mut self,
        rd: &mut Reader,
        rbuf: &mut BytesMut,
        deadline: tokio::time::Instant,
    ) -> Result<(), ConnError> {
        let frame = loop {
            if let Some(f) = self.decoder.decode(rbuf)? {
                if !f.is_heartbeat() {
                    break f;
                }
                continue;
            }
            let read = tokio::time::timeout_at(deadline, rd.read_buf(rbuf))
                .await
                .map_err(|_| ConnError::Handshake("handshake-timeout-ms expired before open"))??;
            if read == 0 {
                return Err(ConnError::PeerClosed);
            }
        };
        let (performative, _) = frame::split_performative(&frame.body)?;
        let Performative::Open(open) = performative else {
            return Err(ConnError::protocol(
                AmqpError::IllegalState,
                "the first frame must be open",
            ));
        };
        self.container_id = open.container_id.clone();
        self.hostname = open.hostname.clone();
        self.choose_space()?;
        self.peer_max_frame = open.max_frame_size.0.clamp(
            frame::MIN_MAX_FRAME_SIZE,
            self.broker.config().max_frame_bytes,
        );
        self.peer_idle_timeout = open
            .idle_time_out
            .filter(|&t| t > 0)
            .map(|t| Duration::from_millis(u64::from(t)));
        let config = self.broker.config();
        self.decoder.set_max_frame_size(config.max_frame_bytes);
        tracing::debug!(container_id = %self.container_id, hostname = ?self.hostname, identity = ?self.identity, "connection opened");
        let reply = Open {
            container_id: CONTAINER_ID.into(),
            hostname: None,
            max_frame_size: MaxFrameSize(config.max_frame_bytes),
            channel_max: ChannelMax(config.max_sessions.saturating_sub(1)),
            idle_time_out: Some(config.idle_timeout_ms),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: Some(offered_capabilities()),
            desired_capabilities: None,
            properties: Some(open_properties()),
        };
        self.open_sent = true;
        self.send(0, &Performative::Open(reply), &[])
    }

    /// Our `open`, as sent before a `close` when the peer's `open` never came or was bad.
    fn minimal_open(&self) -> Open {
        Open {
            container_id: CONTAINER_ID.into(),
            hostname: None,
            max_frame_size: MaxFrameSize(self.broker.config().max_frame_bytes),
            channel_max: ChannelMax(0),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }
    }

    /// Handles one decoded frame; `Ok(true)` for a `flow`, whose deliveries the caller
    /// writes at once.
    fn on_frame(&mut self, channel: u16, body: &bytes::Bytes) -> Result<bool, ConnError> {
        let (performative, payload) = frame::split_performative(body)?;
        if !payload.is_empty() && !matches!(performative, Performative::Transfer(_)) {
            return Err(ConnError::protocol(
                AmqpError::DecodeError,
                "payload after a performative that carries none",
            ));
        }
        let flow = matches!(performative, Performative::Flow(_));
        self.on_performative(channel, performative, payload)?;
        Ok(flow)
    }

    /// Applies one performative to the connection or to its session.
    fn on_performative(
        &mut self,
        channel: u16,
        performative: Performative,
        payload: bytes::Bytes,
    ) -> Result<(), ConnError> {
        match performative {
            Performative::Open(_) => Err(ConnError::protocol(
                AmqpError::IllegalState,
                "open received twice",
            )),
            Performative::Close(close) => {
                if let Some(e) = close.error {
                    tracing::info!(condition = %condition_name(&e.condition), description = ?e.description, "peer closed with error");
                }
                self.cleanup();
                self.send(0, &Performative::Close(Close { error: None }), &[])?;
                self.closing = true;
                Ok(())
            }
            Performative::End(_) if self.ending.remove(&channel) => {
                // The peer's answer to the end we sent with an error: the channel is free.
                Ok(())
            }
            // We ended this session with an error; its frames are ignored until the
            // peer's `end` arrives.
            _ if self.ending.contains(&channel) => Ok(()),
            Performative::Begin(begin) => self.on_begin(channel, begin),
            Performative::End(end) => self.on_end(channel, end),
            other => {
                let mut session = self.sessions.remove(&channel).ok_or_else(|| {
                    ConnError::protocol(
                        AmqpError::IllegalState,
                        format!("frame on channel {channel} without a session"),
                    )
                })?;
                let result = session.on_performative(self, other, payload);
                self.session_result(channel, session, result)
            }
        }
    }

    /// Puts a session back after it handled a frame, or ends it when the frame broke one
    /// of its rules.
    fn session_result(
        &mut self,
        channel: u16,
        session: Session,
        result: Result<(), ConnError>,
    ) -> Result<(), ConnError> {
        match result {
            Err(ConnError::Session {
                condition,
                description,
            }) => self.end_with_error(session, condition, description),
            other => {
                self.sessions.insert(channel, session);
                other
            }
        }
    }

    /// Offers the parked frame the budget again (it parks anew, or its link is refused
    /// once it waited [`INCOMPLETE_BUDGET_WAIT`]); once nothing is parked, the frames
    /// already read behind it are handled.
    async fn retry_parked(
        &mut self,
        rbuf: &mut BytesMut,
        outbound_rx: &mut mpsc::UnboundedReceiver<Outbound>,
    ) -> Result<(), ConnError> {
        let Some(p) = self.parked.take() else {
            return Ok(());
        };
        if let Some(mut session) = self.sessions.remove(&p.channel) {
            self.park_since = Some(p.since);
            let result = session.on_transfer(self, p.transfer, p.payload);
            self.park_since = None;
            self.session_result(p.channel, session, result)?;
        }
        if self.parked.is_none() {
            self.on_buffered_frames(rbuf, outbound_rx).await?;
        }
        Ok(())
    }

    /// Ends one session with an error of ours (a session-scoped violation): its links are
    /// released, `end(error)` goes out, and the channel stays reserved until the peer's
    /// `end` — the connection and its other sessions carry on.
    fn end_with_error(
        &mut self,
        mut session: Session,
        condition: ErrorCondition,
        description: String,
    ) -> Result<(), ConnError> {
        tracing::info!(channel = session.remote_channel(), condition = %condition_name(&condition), %description, "ending session with error");
        session.detach_all(self);
        let local = session.local_channel();
        self.pending_settles.retain(|p| p.channel != local);
        self.ending.insert(session.remote_channel());
        let end = fe2o3_amqp_types::performatives::End {
            error: Some(AmqpErrorBody::new(condition, description, None)),
        };
        self.send(local, &Performative::End(end), &[])
    }

    fn on_outbound(&mut self, event: Outbound) -> Result<(), ConnError> {
        let channel = match &event {
            Outbound::Deliver { link, .. }
            | Outbound::Drained { link, .. }
            | Outbound::Retired { link, .. } => link.channel,
            Outbound::ForwardEnded { channel, .. } => *channel,
        };
        match self.sessions.remove(&channel) {
            Some(mut session) => {
                let result = session.on_outbound(self, event);
                self.sessions.insert(channel, session);
                result
            }
            // The session is gone; removing its consumers already requeued the message.
            None => Ok(()),
        }
    }

    /// Moves durable messages into their queues and accepts them, one disposition frame
    /// per run of consecutive delivery ids.
    fn complete_durable(&mut self) -> Result<(), ConnError> {
        let mut accepted: Vec<(u16, u32)> = Vec::new();
        let mut now = None;
        while let Some(front) = self.pending.front() {
            if front.committed.is_some() && front.durable.has_failed() {
                // The address's store failed (its group is no longer led here): the
                // message is never accepted here and its link is detached, so the client
                // resends where the address is served; other links go on.
                if let Some(p) = self.pending.pop_front() {
                    self.detach_failed_producer(p)?;
                }
                continue;
            }
            if !front.durable.is_durable() {
                break;
            }
            let Some(mut p) = self.pending.pop_front() else {
                break;
            };
            if let Some(mut committed) = p.committed.take() {
                // Answered before its durable handle completed (see `AddressAppend`).
                match committed.try_committed() {
                    Some(Ok(m)) => (p.msg.offset, p.msg.message) = (m.offset, m.message),
                    other => {
                        return Err(ConnError::protocol(
                            AmqpError::InternalError,
                            format!("message committed but not readable: {other:?}"),
                        ))
                    }
                }
            }
            p.target.accept(&self.broker, p.msg, p.stored_at_ms);
            // Enqueued: the queue counts it now, so its reservation can go.
            drop(p.reservation);
            if let Some(ack) = p.ack {
                accepted.push(ack);
                let now = *now.get_or_insert_with(Instant::now);
                let took = now.saturating_duration_since(p.read_at);
                self.broker.stats.produce_accept.record(took);
            }
        }
        let failed = self.broker.store().durable_watch().borrow().failed.clone();
        if let Some(reason) = failed {
            // A clustered leader stepping down fails its store on purpose (after it
            // recorded why it closes its connections): the client is sent to the new
            // leader as by the shutdown path, not told of an internal error.
            if let Some(why) = self.broker.closing() {
                return Err(ConnError::protocol(
                    ConnectionError::ConnectionForced,
                    why.to_owned(),
                ));
            }
            return Err(ConnError::protocol(
                AmqpError::InternalError,
                format!("message store failed: {reason}"),
            ));
        }
        let mut i = 0;
        while i < accepted.len() {
            let (channel, first) = accepted[i];
            let mut last = first;
            while i + 1 < accepted.len() && accepted[i + 1] == (channel, last.wrapping_add(1)) {
                i += 1;
                last = accepted[i].1;
            }
            i += 1;
            if let Some(mut session) = self.sessions.remove(&channel) {
                let result = session.send_accepted(self, first, last);
                self.sessions.insert(channel, session);
                result?;
            }
        }
        Ok(())
    }

    /// Detaches the producer link of `p`, whose address's own store failed before `p` was
    /// committed, with `amqp:link:detach-forced` (once: a link already detached is left).
    fn detach_failed_producer(&mut self, p: PendingProduce) -> Result<(), ConnError> {
        let Some((channel, handle)) = p.link else {
            return Ok(());
        };
        let Some(mut session) = self.sessions.remove(&channel) else {
            return Ok(());
        };
        let description = format!(
            "{}: this node no longer serves the address (its group's leadership here \
             ended); messages not yet accepted were not stored: send them again",
            p.target.name()
        );
        let result = session.detach_producer_forced(self, handle, description);
        self.sessions.insert(channel, session);
        result
    }

    /// Settles the consumers' deliveries whose outcome became durable; drops those whose
    /// outcome never will (the store failed or this node stopped leading: the connection
    /// is closing, and the consumer sees them again, unsettled, elsewhere).
    fn complete_settles(&mut self) -> Result<(), ConnError> {
        while let Some(front) = self.pending_settles.front() {
            if let crate::broker::queue::Recorded::Moving(_) = &front.durable {
                if front.durable.has_failed() {
                    // The dead-letter copy could not be stored: the message is back in its
                    // queue and this delivery is never reported settled — so its link is
                    // detached with the reason, as for an acceptance the store refused,
                    // instead of leaving the consumer waiting on it for ever.
                    if let Some(p) = self.pending_settles.pop_front() {
                        self.refuse_dead_letter(p)?;
                    }
                    continue;
                }
            }
            if front.durable.has_failed() {
                // Never settled (the store failed, or the address's group is no longer
                // led here): the consumer sees the delivery again elsewhere. Only this one
                // goes: the outcomes of other addresses behind it stay.
                self.pending_settles.pop_front();
                continue;
            }
            if !front.durable.is_done() {
                break;
            }
            let Some(p) = self.pending_settles.pop_front() else {
                break;
            };
            if self.sessions.contains_key(&p.channel) {
                Session::send_settled(self, p.channel, p.delivery_id, p.state)?;
            }
        }
        Ok(())
    }

    /// Detaches the consumer link whose rejection (or last failed attempt) could not be
    /// moved to the dead-letter address: `amqp:resource-limit-exceeded` when the store is
    /// out of space, `amqp:internal-error` otherwise.
    fn refuse_dead_letter(&mut self, p: PendingSettle) -> Result<(), ConnError> {
        let Some(mut session) = self.sessions.remove(&p.channel) else {
            return Ok(());
        };
        let (condition, why) = match self.broker.store().out_of_space() {
            Some(reason) => (AmqpError::ResourceLimitExceeded, reason),
            None => (
                AmqpError::InternalError,
                "the dead-letter copy could not be stored (see the broker log)".to_owned(),
            ),
        };
        let description = format!(
            "delivery {} could not be moved to the dead-letter address: {why}; the message \
             will be delivered again",
            p.delivery_id
        );
        let result =
            session.detach_consumer_with_error(self, p.handle, condition.into(), description);
        self.sessions.insert(p.channel, session);
        result
    }

    fn on_begin(
        &mut self,
        channel: u16,
        begin: fe2o3_amqp_types::performatives::Begin,
    ) -> Result<(), ConnError> {
        if self.sessions.contains_key(&channel) {
            return Err(ConnError::protocol(
                AmqpError::IllegalState,
                format!("channel {channel} already has a session"),
            ));
        }
        if channel >= self.broker.config().max_sessions {
            return Err(ConnError::protocol(
                ConnectionError::FramingError,
                format!("channel {channel} exceeds channel-max"),
            ));
        }
        if begin.remote_channel.is_some() {
            return Err(ConnError::protocol(
                AmqpError::NotImplemented,
                "the broker does not begin sessions",
            ));
        }
        let (session, reply) = Session::begin(channel, &begin, self.broker.config());
        self.sessions.insert(channel, session);
        self.send(channel, &Performative::Begin(reply), &[])
    }

    fn on_end(
        &mut self,
        channel: u16,
        end: fe2o3_amqp_types::performatives::End,
    ) -> Result<(), ConnError> {
        let Some(mut session) = self.sessions.remove(&channel) else {
            return Err(ConnError::protocol(
                AmqpError::IllegalState,
                format!("end on channel {channel} without a session"),
            ));
        };
        if let Some(e) = end.error {
            tracing::info!(condition = %condition_name(&e.condition), "peer ended session with error");
        }
        session.detach_all(self);
        let local = session.local_channel();
        // Delivery ids are per session: settlements for this one must not reach the next
        // session on the same channel.
        self.pending_settles.retain(|p| p.channel != local);
        self.send(
            local,
            &Performative::End(fe2o3_amqp_types::performatives::End { error: None }),
            &[],
        )
    }

    /// Messages this connection stored whose `accepted` had not gone out yet: they are in
    /// the log and will be durable, so they are delivered like any other — a task awaits
    /// their durability and enqueues them in order, without acknowledging anyone (the
    /// producer is gone; it may resend, as at-least-once allows). Left behind, they would
    /// stay invisible until a restart brought them back, their space never reclaimed.
    fn hand_over_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return;
        }
        let broker = Arc::clone(&self.broker);
        tokio::spawn(async move {
            let count = pending.len();
            for p in pending {
                if let Err(e) = p.durable.clone().wait().await {
                    // The store failed: nothing more becomes durable in this process; the
                    // log's recovery decides at the next start, as for every message.
                    tracing::warn!(error = %e, count, "messages of a closed connection not enqueued: the store failed");
                    return;
                }
                p.target.accept(&broker, p.msg, p.stored_at_ms);
                drop(p.reservation);
            }
            tracing::debug!(count, "enqueued the messages of a closed connection");
        });
    }

    /// Releases every link's consumers and producers (connection gone).
    fn cleanup(&mut self) {
        // Open transactions roll back (commits under way are in `pending`, handed over).
        self.txns.rollback_all(&self.broker);
        self.hand_over_pending();
        let sessions: Vec<Session> = self.sessions.drain().map(|(_, s)| s).collect();
        for mut s in sessions {
            s.detach_all(self);
        }
    }

    /// Encodes a frame into the write buffer.
    fn send(
        &mut self,
        channel: u16,
        performative: &Performative,
        payload: &[u8],
    ) -> Result<(), ConnError> {
        encode_frame(&mut self.wbuf, channel, performative, payload)?;
        Ok(())
    }

    /// The buffer now holds a delivery of a queue under `lease`: it is written only while
    /// that lease holds.
    pub(crate) fn gate_on(&mut self, lease: &Arc<DeliveryLease>) {
        if !self.gates.iter().any(|g| Arc::ptr_eq(g, lease)) {
            self.gates.push(Arc::clone(lease));
        }
    }

    /// Writes what is buffered. Every delivery passes here, so this is where delivery
    /// leases gate them (`broker::lease`): the broker's (one-group cluster mode: every
    /// byte of the connection) and those of the group-backed queues whose deliveries the
    /// buffer holds (`gates`). While one does not hold, nothing is written (the
    /// connection waits for the renewal; queued deliveries wait with it), and every write
    /// system call of a flush asks again, so a lease that lapses in the middle ends the
    /// connection rather than deliver after the lapse. A lease that ends (the leadership
    /// is over) while a delivery under it waits here closes the connection: bytes already
    /// encoded cannot be taken back without breaking the session's transfer numbering. A
    /// group-backed queue stops dispatching the moment its lease stops holding, so that
    /// is only a delivery encoded just before.
    async fn flush(&mut self) -> Result<(), ConnError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        // The gates stay recorded until the buffer is written: a flush that fails leaves
        // them for `close_with`, which then drops the buffer instead of writing it.
        let mut gates = self.gates.clone();
        gates.extend(self.broker.delivery_lease().cloned());
        if gates.is_empty() {
            self.wbuf.write_to(&mut self.wr).await?;
            self.last_write = Instant::now();
            return Ok(());
        }
        // Bounded: each wait ends at a renewal or the end of that lease.
        for _ in 0..MAX_GATE_WAITS {
            let Some(lapsed) = gates.iter().find(|g| !g.holds()) else {
                break;
            };
            if lapsed.held().await.is_err() {
                // Never written: the connection closes with only its `close`.
                self.wbuf = outbuf::OutBuf::default();
                return Err(ConnError::protocol(
                    ConnectionError::ConnectionForced,
                    self.lease_ended_description(lapsed),
                ));
            }
        }
        self.wbuf
            .write_while(&mut self.wr, || gates.iter().all(|g| g.holds()))
            .await?;
        self.gates.clear();
        self.last_write = Instant::now();
        Ok(())
    }

    /// What a client is told when a lease its output waited for ended.
    fn lease_ended_description(&self, lease: &Arc<DeliveryLease>) -> String {
        let broker_wide = self
            .broker
            .delivery_lease()
            .is_some_and(|b| Arc::ptr_eq(b, lease));
        match broker_wide {
            true => self.broker.close_description().to_owned(),
            false => "a delivery waited for the lease of its address, and this node stopped \
                      serving that address: reconnect"
                .to_owned(),
        }
    }

    /// Sends `close` (with an error, if any) and flushes; errors are ignored, the socket is
    /// going away anyway.
    async fn close_with(&mut self, error: Option<AmqpErrorBody>) {
        // A clustered leader without its lease drops what it had not written (deliveries
        // among it come back from their queues) and writes only the close: no delivery.
        let lapsed = self.broker.delivery_lease().is_some_and(|l| !l.holds())
            || self.gates.iter().any(|g| !g.holds());
        if lapsed {
            self.wbuf = outbuf::OutBuf::default();
            self.gates.clear();
        }
        if !self.open_sent {
            let open = self.minimal_open();
            let _ = self.send(0, &Performative::Open(open), &[]);
            self.open_sent = true;
        }
        if self
            .send(0, &Performative::Close(Close { error }), &[])
            .is_ok()
        {
            let write = async {
                if lapsed {
                    self.wbuf
                        .write_to(&mut self.wr)
                        .await
                        .map_err(ConnError::from)
                } else {
                    self.flush().await
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
        }
        let _ = self.wr.shutdown().await;
    }
}
