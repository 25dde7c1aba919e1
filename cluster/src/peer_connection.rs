//! The client end of the inter-node port: one multiplexed connection to a peer node,
//! shared by every Raft group of this node that talks to it ([`PeerLink`]).
//!
//! A [`PeerLink`] dials lazily and keeps one [`Connection`]; a connection is a task that
//! owns the stream — a writer sending request frames in the order they were queued and a
//! reader handing each reply to the caller waiting for its request id ([`Demux`]) — so
//! any number of groups' RPCs are in flight on it at once and their replies may come back
//! in any order. Callers never touch the stream.
//!
//! Invariants:
//! * At most [`MAX_IN_FLIGHT_PER_PEER`] requests in flight per link; one more is refused at
//!   once with [`PeerCallError::TooManyInFlight`] (openraft retries it like any network
//!   error), so a stalled peer costs bounded memory.
//! * A reply is delivered only to the caller of the request id it names. A caller that
//!   gives up (openraft drops every RPC at its own timeout) forgets its id first, so its
//!   late reply is discarded and never read as another call's.
//! * When a connection ends — read or write error, end of stream, an undecodable reply, a
//!   refusal of the whole connection, or no frame at all for [`SILENT_CONNECTION_TIMEOUT`]
//!   while requests wait — every request waiting on it fails at once, and the next call
//!   dials a new one. A failed dial is the caller's `Connect`/`Tls`/`Auth` error, which
//!   `network.rs` turns into openraft's `Unreachable` (openraft backs off before the next
//!   try), exactly as with one connection per client before.
//!
//! A new connection is, in order: TCP connect (`TCP_NODELAY`), the TLS handshake when
//! configured (`tls.rs`: the peer's certificate must chain to the cluster CA and name the
//! host of its member address), then the cluster-secret handshake when configured
//! (`auth.rs`, inside the TLS stream) — the same [`PeerStream`] as before multiplexing.
//!
//! Head of line: frames go out one after the other, so a large `append_entries` or a
//! snapshot chunk (each at most `MAX_RPC_FRAME_BYTES`) delays the frames queued behind it,
//! heartbeats of other groups included, by its transfer time. Heartbeats are small and the
//! election timeout is many heartbeats long; a deployment shipping frames near the limit on
//! a slow link should keep snapshot chunks and append batches small.
//!
//! Does not: retry (openraft does), compress, or carry requests from the peer back to us
//! (the peer dials its own connection to us: one connection per direction per node pair).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

// tokio's clock, not std's: the watchdog sleeps on it, and a simulation pauses it.
use tokio::time::Instant;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::auth::{client_handshake, PeerSecret};
use crate::frame::{read_frame, write_frame};
use crate::network::PeerCallError;
use crate::rpc::{self, RemoteRefusal, CONNECTION_REQUEST_ID};
use crate::stream::PeerStream;
use crate::tls::PeerTls;

/// Most requests in flight on one peer link (every group's RPCs to that peer together).
/// Openraft keeps one replication RPC per (group, target) in flight, plus votes, so this
/// covers thousands of groups per node.
pub const MAX_IN_FLIGHT_PER_PEER: usize = 8192;
/// A connection on which requests wait and no frame at all arrives for this long is taken
/// for dead (a peer that stopped, a path that silently dropped) and closed, failing its
/// requests; the next call dials anew. Longer than any Raft RPC's TTL (heartbeat interval,
/// `install_snapshot_timeout`): a live peer always answers something within it.
pub const SILENT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a connection checks for [`SILENT_CONNECTION_TIMEOUT`].
const SILENCE_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// What one request's caller receives: the reply frame `(kind, body)`, or why none came.
type Delivery = Result<(u8, Bytes), PeerCallError>;

/// Why a connection ended, given to every request still waiting on it.
#[derive(Debug, Clone)]
enum Closed {
    Lost(String),
    Refused(RemoteRefusal),
}

impl Closed {
    fn error(&self, addr: &str) -> PeerCallError {
        match self {
            Closed::Lost(reason) => PeerCallError::ConnectionLost {
                addr: addr.to_owned(),
                reason: reason.clone(),
            },
            Closed::Refused(r) => PeerCallError::Refused(r.clone()),
        }
    }
}

/// The requests waiting for a reply on one connection, by request id.
#[derive(Debug)]
pub(crate) struct Demux {
    addr: String,
    state: Mutex<DemuxState>,
}

#[derive(Debug)]
struct DemuxState {
    /// Next request id; starts at 1 (0 is [`CONNECTION_REQUEST_ID`]).
    next_id: u64,
    waiting: HashMap<u64, oneshot::Sender<Delivery>>,
    /// Since when requests have waited with no frame read (`None`: nothing waits, or a
    /// frame arrived since the last request was sent and none waits now).
    silent_since: Option<Instant>,
    closed: Option<Closed>,
}

impl Demux {
    pub(crate) fn new(addr: &str) -> Demux {
        Demux {
            addr: addr.to_owned(),
            state: Mutex::new(DemuxState {
                next_id: CONNECTION_REQUEST_ID + 1,
                waiting: HashMap::new(),
                silent_since: None,
                closed: None,
            }),
        }
    }

    // A poisoned lock means a panic elsewhere while holding it; every update of the state
    // is a single map operation or assignment, so it is whole.
    fn lock(&self) -> MutexGuard<'_, DemuxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new request id and where its reply will arrive; an error once closed.
    pub(crate) fn register(&self) -> Result<(u64, oneshot::Receiver<Delivery>), PeerCallError> {
        let mut s = self.lock();
        if let Some(closed) = &s.closed {
            return Err(closed.error(&self.addr));
        }
        let id = s.next_id;
        s.next_id = s.next_id.wrapping_add(1).max(CONNECTION_REQUEST_ID + 1);
        let (tx, rx) = oneshot::channel();
        s.waiting.insert(id, tx);
        s.silent_since.get_or_insert_with(Instant::now);
        Ok((id, rx))
    }

    /// The caller of `id` gave up: a reply still to come is discarded.
    pub(crate) fn forget(&self, id: u64) {
        self.lock().waiting.remove(&id);
    }

    /// Hands a reply to the caller of `id`; `false` when nobody waits for it (a call that
    /// gave up, or an id never sent).
    pub(crate) fn deliver(&self, id: u64, frame: (u8, Bytes)) -> bool {
        let waiter = {
            let mut s = self.lock();
            let waiter = s.waiting.remove(&id);
            s.silent_since = (!s.waiting.is_empty()).then(Instant::now);
            waiter
        };
        // A caller dropped between our lookup and now is the same as one that forgot.
        waiter.is_some_and(|w| w.send(Ok(frame)).is_ok())
    }

    /// Ends the connection for its requests: every waiting one fails with `why`, and so
    /// does every later [`Demux::register`]. The first reason wins.
    fn close(&self, why: Closed) {
        let waiting = {
            let mut s = self.lock();
            if s.closed.is_none() {
                s.closed = Some(why);
            }
            std::mem::take(&mut s.waiting)
        };
        let closed = self.lock().closed.clone();
        if let Some(closed) = closed {
            for (_, w) in waiting {
                let _ = w.send(Err(closed.error(&self.addr)));
            }
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// How long requests have waited with no frame read.
    fn silence(&self) -> Duration {
        self.lock()
            .silent_since
            .map_or(Duration::ZERO, |t| t.elapsed())
    }

    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

/// One open connection: its task and the queue to its writer.
#[derive(Debug)]
pub(crate) struct Connection {
    demux: Arc<Demux>,
    outgoing: mpsc::Sender<(u8, Vec<u8>)>,
    task: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
        self.demux.close(Closed::Lost("connection dropped".into()));
    }
}

impl Connection {
    /// Runs the connection over an established (handshaken) stream; `silence_limit`: see
    /// [`PeerLink::new`].
    fn start(stream: PeerStream, addr: &str, silence_limit: Option<Duration>) -> Connection {
        let demux = Arc::new(Demux::new(addr));
        let (outgoing, queued) = mpsc::channel(MAX_IN_FLIGHT_PER_PEER);
        let task = tokio::spawn(run(stream, queued, Arc::clone(&demux), silence_limit));
        Connection {
            demux,
            outgoing,
            task,
        }
    }

    fn is_open(&self) -> bool {
        !self.demux.is_closed() && !self.task.is_finished()
    }

    /// Sends one request body (its id is stamped here) and waits for its reply. Dropping
    /// the future forgets the request.
    pub(crate) async fn exchange(&self, kind: u8, mut body: Vec<u8>) -> Delivery {
        let (id, reply) = self.demux.register()?;
        let _forget = Forget {
            demux: &self.demux,
            id,
        };
        rpc::set_request_id(&mut body, id);
        if self.outgoing.send((kind, body)).await.is_err() {
            return Err(Closed::Lost("connection ended".into()).error(&self.demux.addr));
        }
        match reply.await {
            Ok(delivery) => delivery,
            Err(_) => Err(Closed::Lost("connection ended".into()).error(&self.demux.addr)),
        }
    }
}

/// Forgets a request when its caller stops waiting, for whatever reason.
struct Forget<'a> {
    demux: &'a Demux,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.demux.forget(self.id);
    }
}

/// The connection task: writer, reader and silence check until one of them ends it.
async fn run(
    stream: PeerStream,
    mut queued: mpsc::Receiver<(u8, Vec<u8>)>,
    demux: Arc<Demux>,
    silence_limit: Option<Duration>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async {
        while let Some((kind, body)) = queued.recv().await {
            if let Err(e) = write_frame(&mut wr, kind, &body).await {
                return Closed::Lost(format!("write failed: {e}"));
            }
        }
        Closed::Lost("connection dropped".into())
    };
    let reader = async {
        loop {
            match read_frame(&mut rd).await {
                Ok(Some(frame)) => {
                    if let Err(closed) = route(&demux, frame) {
                        return closed;
                    }
                }
                Ok(None) => return Closed::Lost("closed by the peer".into()),
                Err(e) => return Closed::Lost(format!("read failed: {e}")),
            }
        }
    };
    let silence = async {
        let Some(limit) = silence_limit else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(SILENCE_CHECK_INTERVAL).await;
            let silent = demux.silence();
            if silent >= limit {
                return Closed::Lost(format!(
                    "no frame for {silent:?} while requests waited \
                     (SILENT_CONNECTION_TIMEOUT {limit:?})"
                ));
            }
        }
    };
    let why = tokio::select! {
        why = writer => why,
        why = reader => why,
        why = silence => why,
    };
    tracing::debug!(peer = %demux.addr, ?why, "inter-node connection closed");
    demux.close(why);
}

/// Hands one reply frame to its caller; `Err` ends the connection.
fn route(demux: &Demux, (kind, body): (u8, Bytes)) -> Result<(), Closed> {
    let header =
        rpc::decode_header(&body).map_err(|e| Closed::Lost(format!("undecodable reply: {e}")))?;
    if header.request_id == CONNECTION_REQUEST_ID {
        // The peer refuses the whole connection (failed authentication), then closes it.
        let refusal = match kind {
            rpc::KIND_ERROR => rpc::decode_refusal(body)
                .map_err(|e| Closed::Lost(format!("undecodable refusal: {e}")))?,
            _ => RemoteRefusal::Unavailable(format!("reply kind {kind:#x} to no request")),
        };
        return Err(Closed::Refused(refusal));
    }
    if !demux.deliver(header.request_id, (kind, body)) {
        // The late reply of a call that gave up: nobody must read it.
        tracing::debug!(peer = %demux.addr, id = header.request_id, "reply to no waiting request; dropped");
    }
    Ok(())
}

/// How a link dials: the cluster secret and TLS, shared by every link of a node.
#[derive(Debug, Clone, Default)]
pub(crate) struct Dialer {
    pub secret: Option<Arc<PeerSecret>>,
    pub tls: Option<Arc<PeerTls>>,
    /// Dial through the simulated network instead, from this node's address.
    #[cfg(feature = "sim-net")]
    pub sim: Option<(crate::sim_net::SimNet, std::net::SocketAddr)>,
}

impl Dialer {
    /// A new connection: TCP, then TLS and the secret handshake when configured.
    async fn dial(&self, addr: &str) -> Result<PeerStream, PeerCallError> {
        #[cfg(feature = "sim-net")]
        if let Some((net, from)) = &self.sim {
            let connect = |source| PeerCallError::Connect {
                addr: addr.to_owned(),
                source,
            };
            let to = addr
                .parse()
                .map_err(|e| connect(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
            let stream = PeerStream::Sim(net.dial(*from, to).await.map_err(connect)?);
            return self.authenticate(addr, stream).await;
        }
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| PeerCallError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        // RPCs are small and latency-bound: never wait to coalesce.
        let _ = tcp.set_nodelay(true);
        let stream = match &self.tls {
            None => PeerStream::Plain(tcp),
            Some(tls) => tls
                .connect(addr, tcp)
                .await
                .map_err(|source| PeerCallError::Tls {
                    addr: addr.to_owned(),
                    source,
                })?
                .into(),
        };
        self.authenticate(addr, stream).await
    }

    /// The secret handshake when one is configured.
    async fn authenticate(
        &self,
        addr: &str,
        mut stream: PeerStream,
    ) -> Result<PeerStream, PeerCallError> {
        if let Some(secret) = &self.secret {
            client_handshake(&mut stream, secret)
                .await
                .map_err(|source| PeerCallError::Auth {
                    addr: addr.to_owned(),
                    source,
                })?;
        }
        Ok(stream)
    }
}

/// This node's way to one peer: the current connection, re-dialled after it ends.
#[derive(Debug)]
pub(crate) struct PeerLink {
    addr: String,
    dialer: Dialer,
    /// The open connection; a tokio lock so that concurrent callers wait for one dial
    /// instead of each dialling.
    current: tokio::sync::Mutex<Option<Arc<Connection>>>,
    in_flight: Arc<Semaphore>,
    /// Connections established on this link so far.
    opened: AtomicU64,
    /// Close a connection silent this long while requests wait; `None`: never (a link
    /// for one long request, such as a membership change).
    silence_limit: Option<Duration>,
}

impl PeerLink {
    /// A link for Raft RPCs: closes a connection silent for [`SILENT_CONNECTION_TIMEOUT`].
    pub(crate) fn new(addr: String, dialer: Dialer) -> PeerLink {
        PeerLink {
            addr,
            dialer,
            current: tokio::sync::Mutex::new(None),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_PEER)),
            opened: AtomicU64::new(0),
            silence_limit: Some(SILENT_CONNECTION_TIMEOUT),
        }
    }

    /// A link for requests that may wait long for their reply with nothing else on the
    /// connection (membership changes, bounded by their own timeout): no silence limit.
    pub(crate) fn patient(addr: String, dialer: Dialer) -> PeerLink {
        PeerLink {
            silence_limit: None,
            ..PeerLink::new(addr, dialer)
        }
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    pub(crate) fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Sends one request and waits for its reply frame, on the open connection or a new
    /// one. Not bounded in time: the caller wraps it in its RPC's timeout.
    pub(crate) async fn call(&self, kind: u8, body: Vec<u8>) -> Delivery {
        let _permit = Arc::clone(&self.in_flight)
            .try_acquire_owned()
            .map_err(|_| PeerCallError::TooManyInFlight {
                addr: self.addr.clone(),
                limit: MAX_IN_FLIGHT_PER_PEER,
            })?;
        let connection = self.connection().await?;
        connection.exchange(kind, body).await
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> Result<Arc<Connection>, PeerCallError> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref().filter(|c| c.is_open()) {
            return Ok(Arc::clone(c));
        }
        // The old one (if any) is dead; dropping it ends its task.
        *current = None;
        let stream = self.dialer.dial(&self.addr).await?;
        let c = Arc::new(Connection::start(stream, &self.addr, self.silence_limit));
        self.opened.fetch_add(1, Ordering::Relaxed);
        *current = Some(Arc::clone(&c));
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::Header;

    fn reply(id: u64, tag: u8) -> (u8, Bytes) {
        let h = Header {
            request_id: id,
            group: 3,
        };
        let body = rpc::encode_refusal(h, &RemoteRefusal::Unavailable(format!("reply {tag}")));
        (rpc::KIND_ERROR, body.into())
    }

    /// Goal: replies that come back in another order than their requests reach the
    /// callers of the ids they name; a reply to a forgotten or unknown id reaches nobody;
    /// closing fails whoever still waits.
    #[tokio::test]
    async fn the_demultiplexer_routes_out_of_order_replies_by_request_id() {
        let demux = Demux::new("peer:1");
        let mut calls = Vec::new();
        for _ in 0..5 {
            calls.push(demux.register().unwrap());
        }
        let ids: Vec<u64> = calls.iter().map(|(id, _)| *id).collect();
        assert_eq!(
            ids,
            vec![1, 2, 3, 4, 5],
            "ids start after the connection's 0"
        );
        // The caller of 2 gives up; its late reply must not go anywhere.
        demux.forget(2);
        for &id in [4u64, 1, 5, 2, 99].iter() {
            let routed = route(&demux, reply(id, id as u8));
            assert!(
                routed.is_ok(),
                "a reply never ends the connection: {routed:?}"
            );
        }
        assert_eq!(demux.waiting(), 1, "only request 3 still waits");
        let mut receivers: HashMap<u64, _> = calls.into_iter().collect();
        for id in [1u64, 4, 5] {
            let (kind, body) = receivers.remove(&id).unwrap().await.unwrap().unwrap();
            assert_eq!(kind, rpc::KIND_ERROR);
            assert_eq!(rpc::decode_header(&body).unwrap().request_id, id);
            let refusal = rpc::decode_refusal(body).unwrap();
            assert_eq!(refusal, RemoteRefusal::Unavailable(format!("reply {id}")));
        }
        let forgotten = receivers.remove(&2).unwrap();
        assert!(forgotten.await.is_err(), "a forgotten call gets nothing");

        demux.close(Closed::Lost("test".into()));
        let three = receivers.remove(&3).unwrap().await.unwrap();
        assert!(
            matches!(three, Err(PeerCallError::ConnectionLost { .. })),
            "{three:?}"
        );
        assert!(matches!(
            demux.register(),
            Err(PeerCallError::ConnectionLost { .. })
        ));
    }

    /// Goal: a reply that does not decode, or a refusal of the whole connection, ends it.
    #[test]
    fn a_garbled_reply_or_a_connection_refusal_ends_the_connection() {
        let demux = Demux::new("peer:1");
        let mut bad = reply(1, 1);
        bad.1 = Bytes::from_static(&[9, 0, 0]);
        assert!(matches!(route(&demux, bad), Err(Closed::Lost(_))));
        let whole = reply(CONNECTION_REQUEST_ID, 0);
        assert!(matches!(
            route(&demux, whole),
            Err(Closed::Refused(RemoteRefusal::Unavailable(_)))
        ));
    }

    #[test]
    fn a_connection_silent_while_requests_wait_is_measured_from_the_first_unanswered() {
        let demux = Demux::new("peer:1");
        assert_eq!(demux.silence(), Duration::ZERO, "nothing waits");
        let (a, _ra) = demux.register().unwrap();
        demux.forget(a);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            demux.silence() >= Duration::from_millis(20),
            "a forgotten request still counts: nothing answered it"
        );
        let (b, _rb) = demux.register().unwrap();
        assert!(demux.silence() >= Duration::from_millis(20));
        demux.deliver(b, reply(b, 0));
        assert_eq!(
            demux.silence(),
            Duration::ZERO,
            "a frame arrived, none waits"
        );
    }
}
