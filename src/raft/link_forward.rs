//! Link forwarding in `cluster-mode: groups` with `link-routing: forward` (issue 12 item
//! 4): a producer link attached to a node that does not lead its address stays there, and
//! its messages are carried to the leader over the nodes' shared peer connection as
//! application requests (`entrepot_cluster::app_request`, payload format in
//! `cluster/FORMAT.md`, "link-forwarding payload, version 1").
//!
//! Both ends live here:
//! * **Forwarding node** (X, the client's): [`RemoteLeader`] is the
//!   [`RemoteAddress`] the router answers ([`Route::Forward`](crate::broker::routing::Route));
//!   each producer link gets one carrier task ([`carry`]) that drains the link's
//!   [`ProducerIntake`] in batches (at most [`MAX_FORWARD_BATCH_MESSAGES`] /
//!   [`MAX_FORWARD_BATCH_BYTES`]), one request in flight per link (so the leader stores a
//!   link's messages in its order), and confirms the prefix the leader stored. No task
//!   per message.
//! * **Leader** (Y): [`LinkForwardServer`] is the node's application-request handler. An
//!   enqueue is served exactly as a local producer's message: appended to the address's
//!   group store (the served, group-backed queue's), waited for until committed (the
//!   same durability wait), then queued — and only then answered `stored`.
//!
//! Invariants:
//! * The client's `accepted` for a forwarded message comes from the leader's `stored`
//!   answer (`ProducerIntake::confirm` after the reply), never before: a message accepted
//!   here is committed by a majority of its group.
//! * A link never hangs on a dead or stopped leader: the carrier gives up (the link is
//!   detached `amqp:link:detach-forced`, naming why) when the connection to the leader
//!   fails, when no answer came within [`FORWARD_REPLY_TIMEOUT`], or — while this node
//!   holds a replica of the group — as soon as that replica sees another leader or an
//!   election (within the election timeout of the leader's death or partition).
//!
//! Decided: no resend. A carrier that loses a reply fails the rest of the link; the
//! client resends what was not accepted (at-least-once, the same promise as a local
//! producer whose link is detached when its leader changes). So the leader needs no
//! per-forwarder deduplication (the `forwarder` id is carried for logs and for a later
//! transparent re-route, which would need it in the group's state machine).
//!
//! Consumer links (ops 2–5 of the same payload): the forwarding node's carrier and
//! shadow are in [`consume`], the leader's side in [`serve_consume`], the wire in
//! [`consume_wire`].
//!
//! Does not: browse through a forward (refused at the attach), transactions (refused, as for a local clustered address), plans' limits (the leader
//! does not reserve room), or re-route a link transparently to a new leader.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use entrepot_cluster::{AppFuture, AppHandler, Host, Leadership, NodeId};
use tokio::sync::watch;

use crate::amqp::message::MessageView;
use crate::broker::forwarding::{
    producer_channel, ConsumerRequest, ForwardedMessage, ForwardedProducer, ProducerIntake,
    RemoteAddress,
};
use crate::broker::queue::Queue;

mod consume;
mod consume_wire;
mod serve_consume;

use crate::broker::store::AddressStoreError;
use crate::broker::{queued_view, Address, Broker};
pub use consume::{FETCH_WAIT, FORWARDED_CONSUMER_KEEPALIVE, FORWARDED_CONSUMER_PREFETCH};
pub use consume_wire::{MAX_FETCH_BYTES, MAX_FETCH_MESSAGES, MAX_SETTLE_BATCH};
pub use serve_consume::{
    FORWARDED_CONSUMER_IDLE_TIMEOUT, MAX_FORWARDED_CONSUMERS, MAX_PARKED_FETCHES,
};

/// Version byte of every link-forwarding payload.
pub const LINK_FORWARD_VERSION: u8 = 1;
/// Most messages one enqueue request carries.
pub const MAX_FORWARD_BATCH_MESSAGES: usize = 256;
/// Most message bytes one enqueue request carries (a single larger message goes alone).
pub const MAX_FORWARD_BATCH_BYTES: usize = 1 << 20;
/// Longest address name on the wire.
pub const MAX_FORWARD_ADDRESS_BYTES: usize = 1024;
/// Longest reason on the wire.
const MAX_REASON_BYTES: usize = 1024;
/// Longest a carrier waits for the leader's answer to one request when this node holds
/// no replica of the group to watch: the election timeout + 1 s, the bound the issue
/// sets on a client waiting for a stopped leader.
pub const FORWARD_REPLY_TIMEOUT: Duration =
    Duration::from_millis(super::ELECTION_TIMEOUT_MS.1 + 1000);
/// The same when this node's replica watches the leadership (which bounds the wait on a
/// dead or partitioned leader by itself): long enough that a commit slowed by a loaded
/// machine does not detach a healthy link.
pub const FORWARD_REPLY_TIMEOUT_WATCHED: Duration = entrepot_cluster::APP_TIMEOUT_MAX;
/// Longest the leader waits for a forwarded message's commit before answering its
/// outcome unknown (below the forwarding node's wait).
pub const SERVE_COMMIT_WAIT: Duration = Duration::from_secs(3);
const _: () = assert!(SERVE_COMMIT_WAIT.as_millis() < FORWARD_REPLY_TIMEOUT_WATCHED.as_millis());

const OP_ENQUEUE: u8 = 1;
const REST_NONE: u8 = 0;
const REST_NOT_SERVED: u8 = 1;
const REST_FAILED: u8 = 2;

/// Forwarding counters of one node (`/metrics`).
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Messages this node forwarded that their leader stored (`accepted` sent).
    pub transfers: AtomicU64,
    /// Messages peers forwarded that this node stored as their leader.
    pub served: AtomicU64,
    /// Forwarded producer links carried now.
    pub links: AtomicU64,
    /// Forwarded links given up (detached `detach-forced`).
    pub failed_links: AtomicU64,
    /// Forwarded consumer links carried now (this node is the client's).
    pub consumer_links: AtomicU64,
    /// Deliveries fetched from their leader for forwarded consumer links.
    pub deliveries: AtomicU64,
    /// Forwarded consumers this node serves as their address's leader now.
    pub consumers_served: AtomicU64,
    /// Forwarded consumers given back after `FORWARDED_CONSUMER_IDLE_TIMEOUT` without a
    /// request (their node or connection vanished).
    pub consumers_released: AtomicU64,
}

impl ForwardStats {
    /// Appends the counters in Prometheus' text format.
    pub fn render(&self, out: &mut String) {
        use crate::metrics::{counter, gauge};
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            out,
            "entrepot_forwarded_transfers_total",
            "Messages this node forwarded to their address's leader that the leader stored (accepted).",
            get(&self.transfers),
        );
        counter(
            out,
            "entrepot_forwarded_served_total",
            "Messages other nodes forwarded that this node stored as their address's leader.",
            get(&self.served),
        );
        gauge(
            out,
            "entrepot_forwarded_producer_links",
            "Producer links this node carries to their address's leader now.",
            get(&self.links),
        );
        counter(
            out,
            "entrepot_forwarded_links_failed_total",
            "Forwarded links given up (detached detach-forced: leader moved or did not answer).",
            get(&self.failed_links),
        );
        gauge(
            out,
            "entrepot_forwarded_consumer_links",
            "Consumer links this node serves from their address's leader now.",
            get(&self.consumer_links),
        );
        counter(
            out,
            "entrepot_forwarded_deliveries_total",
            "Deliveries fetched from their address's leader for forwarded consumer links.",
            get(&self.deliveries),
        );
        gauge(
            out,
            "entrepot_forwarded_consumers_served",
            "Forwarded consumers other nodes hold on this node's queues (as their leader).",
            get(&self.consumers_served),
        );
        counter(
            out,
            "entrepot_forwarded_consumers_released_total",
            "Forwarded consumers given back after FORWARDED_CONSUMER_IDLE_TIMEOUT without a request.",
            get(&self.consumers_released),
        );
    }
}

/// An address led by `leader`, reached from this node (see the module docs).
pub struct RemoteLeader {
    pub address: String,
    pub leader: NodeId,
    /// The leader's member address (its inter-node port).
    pub peer: String,
    pub host: Host,
    /// This node's replica's view of the group's leadership, when it holds one.
    pub leadership: Option<watch::Receiver<Leadership>>,
    pub stats: Arc<ForwardStats>,
}

/// Numbers the forwarded links of this process (logs only).
static NEXT_FORWARDER: AtomicU64 = AtomicU64::new(1);

impl std::fmt::Debug for RemoteLeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteLeader")
            .field("address", &self.address)
            .field("leader", &self.leader)
            .field("peer", &self.peer)
            .finish()
    }
}

impl RemoteAddress for RemoteLeader {
    fn leader(&self) -> String {
        format!("node {}", self.leader)
    }

    fn open_producer(&self) -> Result<ForwardedProducer, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "no runtime to carry the link".to_owned())?;
        let (producer, intake) = producer_channel();
        let carrier = Carrier {
            address: self.address.clone(),
            leader: self.leader,
            peer: self.peer.clone(),
            host: self.host.clone(),
            leadership: self.leadership.clone(),
            forwarder: NEXT_FORWARDER.fetch_add(1, Ordering::Relaxed),
            stats: Arc::clone(&self.stats),
        };
        tracing::debug!(address = %self.address, leader = self.leader, forwarder = carrier.forwarder,
            "forwarding a producer link");
        runtime.spawn(carry(intake, carrier));
        Ok(producer)
    }

    fn open_consumer(
        &self,
        broker: &Arc<Broker>,
        request: ConsumerRequest,
    ) -> Result<Arc<Queue>, String> {
        consume::open(self, broker, request)
    }
}

/// What one link's carrier works with.
struct Carrier {
    address: String,
    leader: NodeId,
    peer: String,
    host: Host,
    leadership: Option<watch::Receiver<Leadership>>,
    forwarder: u64,
    stats: Arc<ForwardStats>,
}

/// Carries one producer link's messages to its leader until the link goes (its
/// producer end is dropped) or the carrier gives up.
async fn carry(mut intake: ProducerIntake, mut c: Carrier) {
    c.stats.links.fetch_add(1, Ordering::Relaxed);
    let ended = carry_batches(&mut intake, &mut c).await;
    c.stats.links.fetch_sub(1, Ordering::Relaxed);
    if let Err(why) = ended {
        c.stats.failed_links.fetch_add(1, Ordering::Relaxed);
        tracing::info!(address = %c.address, leader = c.leader, forwarder = c.forwarder,
            reason = %why, "forwarded producer link given up");
        intake.fail(why);
    }
}

/// The carrier's loop; `Err`: why it gave up.
async fn carry_batches(intake: &mut ProducerIntake, c: &mut Carrier) -> Result<(), String> {
    let timeout = match c.leadership {
        Some(_) => FORWARD_REPLY_TIMEOUT_WATCHED,
        None => FORWARD_REPLY_TIMEOUT,
    };
    let mut leadership = c.leadership.take();
    loop {
        let first = tokio::select! {
            m = intake.rx.recv() => match m {
                Some(m) => m,
                None => return Ok(()),
            },
            why = leader_moved(&mut leadership, c.leader, &c.address) => return Err(why),
        };
        let batch = take_batch(intake, first);
        let first_seq = batch[0].seq;
        let bytes: usize = batch.iter().map(|m| m.message.len()).sum();
        let request = encode_enqueue(&c.address, c.forwarder, &batch);
        let call = c.host.app_request(c.leader, &c.peer, &request, timeout);
        let answer = tokio::select! {
            a = call => a,
            why = leader_moved(&mut leadership, c.leader, &c.address) => return Err(why),
        };
        intake.release_bytes(bytes as u64);
        let reply = answer
            .map_err(|e| e.to_string())
            .and_then(|b| decode_reply(b).map_err(|e| format!("undecodable answer: {e}")))
            .map_err(|e| {
                format!(
                    "no answer from node {} for address {}: {e}",
                    c.leader, c.address
                )
            })?;
        // Only now — the leader answered committed — may these be accepted.
        intake.confirm(first_seq + u64::from(reply.stored));
        c.stats
            .transfers
            .fetch_add(u64::from(reply.stored), Ordering::Relaxed);
        if let Some(why) = reply.rest {
            return Err(format!(
                "node {} did not store every message: {why}",
                c.leader
            ));
        }
    }
}

/// The messages waiting on the link, `first` first, within the batch bounds.
fn take_batch(intake: &mut ProducerIntake, first: ForwardedMessage) -> Vec<ForwardedMessage> {
    let mut bytes = first.message.len();
    let mut batch = vec![first];
    while batch.len() < MAX_FORWARD_BATCH_MESSAGES && bytes < MAX_FORWARD_BATCH_BYTES {
        match intake.rx.try_recv() {
            Ok(m) => {
                bytes += m.message.len();
                batch.push(m);
            }
            Err(_) => break,
        }
    }
    batch
}

/// Completes once this replica no longer sees `leader` leading (another leader, or an
/// election); never without a replica to watch.
async fn leader_moved(
    watch: &mut Option<watch::Receiver<Leadership>>,
    leader: NodeId,
    address: &str,
) -> String {
    let Some(w) = watch else {
        return std::future::pending().await;
    };
    let seen = w.wait_for(|l| l.leader != Some(leader)).await;
    match seen {
        Ok(l) => match l.leader {
            Some(other) => {
                format!("address {address}: its leader moved from node {leader} to node {other}")
            }
            None => format!(
                "address {address}: its leader node {leader} is no longer followed (an election)"
            ),
        },
        Err(_) => format!("address {address}: its group was closed on this node"),
    }
}

/// The leader's end: serves enqueue requests from peers (see the module docs).
pub struct LinkForwardServer {
    broker: Weak<Broker>,
    stats: Arc<ForwardStats>,
    consumers: Arc<serve_consume::RemoteConsumers>,
}

impl LinkForwardServer {
    pub fn new(broker: Weak<Broker>, stats: Arc<ForwardStats>) -> LinkForwardServer {
        LinkForwardServer {
            broker,
            stats,
            consumers: Arc::default(),
        }
    }
}

impl AppHandler for LinkForwardServer {
    fn handle(&self, payload: Bytes) -> AppFuture {
        let broker = self.broker.upgrade();
        let stats = Arc::clone(&self.stats);
        let consumers = Arc::clone(&self.consumers);
        Box::pin(async move {
            let broker = broker.ok_or_else(|| "the broker is stopped".to_owned())?;
            match payload.get(..2) {
                Some(&[LINK_FORWARD_VERSION, op]) if op != OP_ENQUEUE => {
                    return serve_consume::serve(broker, consumers, stats, op, payload.slice(2..))
                        .await;
                }
                _ => {}
            }
            let request = decode_enqueue(payload)?;
            let reply = serve_enqueue(&broker, &request).await;
            stats
                .served
                .fetch_add(u64::from(reply.stored), Ordering::Relaxed);
            Ok(encode_reply(&reply))
        })
    }
}

/// Stores `request`'s messages in order, as a local producer's: appended to the served
/// address's group store, committed, then queued; the answer counts the stored prefix.
async fn serve_enqueue(broker: &Broker, request: &Enqueue) -> Reply {
    let not_served = |why: String| Reply {
        stored: 0,
        rest: Some(Rest::NotServed(why)),
    };
    // Looked up, never created: auto-creating here would put a local queue under the
    // clustered name, and this node's own activation of the group would then fail
    // (`NameTaken`) for as long as the process lives (CI, session 14).
    let queue = match broker.existing_queue(&request.address) {
        Some(q) if q.address_store().is_some() => q,
        _ => return not_served(format!("address {} is not served here", request.address)),
    };
    let Some(store) = queue.address_store().cloned() else {
        return not_served(format!("address {} is not served here", request.address));
    };
    let mut appended = Vec::with_capacity(request.messages.len());
    let mut rest = None;
    for m in &request.messages {
        let parsed = match MessageView::parse(m.message.clone()) {
            Ok(p) => p,
            Err(e) => {
                rest = Some(Rest::Failed(format!("malformed message: {e}")));
                break;
            }
        };
        match store.append(&[&m.message[..]], m.stored_at_ms) {
            Ok(a) => appended.push((a, parsed, m.stored_at_ms)),
            Err(e @ (AddressStoreError::NotLeader { .. } | AddressStoreError::Retired { .. })) => {
                rest = Some(Rest::NotServed(e.to_string()));
                break;
            }
            Err(e) => {
                rest = Some(Rest::Failed(format!("not stored: {e}")));
                break;
            }
        }
    }
    let target = Address::Queue(queue);
    let mut stored = 0u32;
    for (mut a, parsed, stored_at_ms) in appended {
        let committed = tokio::time::timeout(SERVE_COMMIT_WAIT, a.durable.clone().wait()).await;
        let m = match (committed, a.committed.try_committed()) {
            (Ok(Ok(())), Some(Ok(m))) => m,
            (committed, m) => {
                let why = format!("outcome unknown (commit: {committed:?}, stored: {m:?})");
                rest = Some(Rest::Failed(why));
                break;
            }
        };
        let mut msg = queued_view(m.offset, &parsed, m.stored_at_ms);
        msg.message = m.message;
        target.accept(broker, msg, stored_at_ms);
        stored += 1;
    }
    Reply { stored, rest }
}

// ---------------------------------------------------------------------------------------
// The payload (cluster/FORMAT.md, "link-forwarding payload, version 1").

/// An enqueue request: a batch of one link's messages, in its order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Enqueue {
    address: String,
    forwarder: u64,
    first_seq: u64,
    messages: Vec<WireMessage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct WireMessage {
    stored_at_ms: i64,
    message: Bytes,
}

/// The leader's answer: the first `stored` messages are committed and queued; `rest`
/// why the others are not (or their outcome is unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    stored: u32,
    rest: Option<Rest>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rest {
    NotServed(String),
    Failed(String),
}

impl std::fmt::Display for Rest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rest::NotServed(why) => write!(f, "not served there: {why}"),
            Rest::Failed(why) => write!(f, "{why}"),
        }
    }
}

// Format: { version: u8 | op: u8 = 1 | address: str | forwarder: u64 | first_seq: u64 |
//           n: u32 × { stored_at_ms: i64 | message: bytes } }
fn encode_enqueue(address: &str, forwarder: u64, batch: &[ForwardedMessage]) -> Vec<u8> {
    let len: usize = batch.iter().map(|m| 12 + m.message.len()).sum();
    let mut b = BytesMut::with_capacity(32 + address.len() + len);
    b.put_u8(LINK_FORWARD_VERSION);
    b.put_u8(OP_ENQUEUE);
    put_str(&mut b, address);
    b.put_u64_le(forwarder);
    b.put_u64_le(batch.first().map_or(0, |m| m.seq));
    b.put_u32_le(batch.len() as u32);
    for m in batch {
        b.put_i64_le(m.stored_at_ms);
        b.put_u32_le(m.message.len() as u32);
        b.put_slice(&m.message);
    }
    b.to_vec()
}

fn decode_enqueue(mut b: Bytes) -> Result<Enqueue, String> {
    let version = get_u8(&mut b)?;
    if version != LINK_FORWARD_VERSION {
        return Err(format!(
            "link-forwarding payload version {version}, this node reads {LINK_FORWARD_VERSION}"
        ));
    }
    let op = get_u8(&mut b)?;
    if op != OP_ENQUEUE {
        return Err(format!("unknown link-forwarding op {op}"));
    }
    let address = get_str(&mut b, MAX_FORWARD_ADDRESS_BYTES)?;
    let forwarder = get_u64(&mut b)?;
    let first_seq = get_u64(&mut b)?;
    let n = get_u32(&mut b)? as usize;
    if n == 0 || n > MAX_FORWARD_BATCH_MESSAGES {
        return Err(format!(
            "{n} messages in one request (1..={MAX_FORWARD_BATCH_MESSAGES}, MAX_FORWARD_BATCH_MESSAGES)"
        ));
    }
    let mut messages = Vec::with_capacity(n);
    for _ in 0..n {
        let stored_at_ms = get_u64(&mut b)? as i64;
        let len = get_u32(&mut b)? as usize;
        if len > b.remaining() {
            return Err("message cut short".into());
        }
        messages.push(WireMessage {
            stored_at_ms,
            message: b.split_to(len),
        });
    }
    if b.has_remaining() {
        return Err("trailing bytes after the enqueue request".into());
    }
    Ok(Enqueue {
        address,
        forwarder,
        first_seq,
        messages,
    })
}

// Format: { version: u8 | stored: u32 | tag: u8 } 0 all stored | 1 not served { reason: str }
//         | 2 failed { reason: str }
fn encode_reply(r: &Reply) -> Bytes {
    let mut b = BytesMut::with_capacity(64);
    b.put_u8(LINK_FORWARD_VERSION);
    b.put_u32_le(r.stored);
    match &r.rest {
        None => b.put_u8(REST_NONE),
        Some(Rest::NotServed(why)) => {
            b.put_u8(REST_NOT_SERVED);
            put_str(&mut b, cut(why));
        }
        Some(Rest::Failed(why)) => {
            b.put_u8(REST_FAILED);
            put_str(&mut b, cut(why));
        }
    }
    b.freeze()
}

fn decode_reply(mut b: Bytes) -> Result<Reply, String> {
    let version = get_u8(&mut b)?;
    if version != LINK_FORWARD_VERSION {
        return Err(format!("link-forwarding reply version {version}"));
    }
    let stored = get_u32(&mut b)?;
    let rest = match get_u8(&mut b)? {
        REST_NONE => None,
        REST_NOT_SERVED => Some(Rest::NotServed(get_str(&mut b, MAX_REASON_BYTES)?)),
        REST_FAILED => Some(Rest::Failed(get_str(&mut b, MAX_REASON_BYTES)?)),
        tag => return Err(format!("unknown link-forwarding reply tag {tag}")),
    };
    if b.has_remaining() {
        return Err("trailing bytes after the reply".into());
    }
    Ok(Reply { stored, rest })
}

/// `s` cut to [`MAX_REASON_BYTES`] on a character boundary.
fn cut(s: &str) -> &str {
    let mut end = s.len().min(MAX_REASON_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u16_le(s.len().min(usize::from(u16::MAX)) as u16);
    b.put_slice(&s.as_bytes()[..s.len().min(usize::from(u16::MAX))]);
}

fn need(b: &Bytes, n: usize) -> Result<(), String> {
    match b.remaining() >= n {
        true => Ok(()),
        false => Err("link-forwarding payload cut short".into()),
    }
}

fn get_u8(b: &mut Bytes) -> Result<u8, String> {
    need(b, 1)?;
    Ok(b.get_u8())
}

fn get_u32(b: &mut Bytes) -> Result<u32, String> {
    need(b, 4)?;
    Ok(b.get_u32_le())
}

fn get_u64(b: &mut Bytes) -> Result<u64, String> {
    need(b, 8)?;
    Ok(b.get_u64_le())
}

fn get_str(b: &mut Bytes, max: usize) -> Result<String, String> {
    need(b, 2)?;
    let len = usize::from(b.get_u16_le());
    if len > max {
        return Err(format!("string of {len} bytes exceeds {max}"));
    }
    need(b, len)?;
    String::from_utf8(b.split_to(len).to_vec()).map_err(|_| "string not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: messages forwarded to a node that does not serve their address (not the
    /// leader yet, or no longer) are refused and leave no local queue behind, even with
    /// auto-create on: a local queue under the clustered name would block this node's
    /// activation of the group for good (mutation-checked: with `Broker::queue`, which
    /// auto-creates, it fails).
    #[test]
    fn a_node_that_does_not_serve_the_address_refuses_without_creating_a_queue() {
        let dir = std::env::temp_dir().join(format!(
            "entrepot-forward-refuse-{}-{}",
            std::process::id(),
            line!()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let config = crate::config::BrokerConfig {
            data_dir: dir.clone(),
            ..crate::config::BrokerConfig::default()
        };
        assert!(config.auto_create, "the case that matters: auto-create on");
        let broker = Broker::open(config).unwrap();
        let request = Enqueue {
            address: "clustered-q".to_owned(),
            forwarder: 1,
            first_seq: 0,
            messages: Vec::new(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let reply = rt.block_on(serve_enqueue(&broker, &request));
        assert_eq!(reply.stored, 0);
        assert!(matches!(reply.rest, Some(Rest::NotServed(_))));
        assert!(
            broker.existing_queue("clustered-q").is_none(),
            "a refused forward created a local queue"
        );
        drop(broker);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Goal: requests and replies survive the wire; a forged count, a long address, a
    /// cut body or another version are refused before allocating.
    #[test]
    fn payloads_round_trip_and_are_bounded() {
        let batch: Vec<ForwardedMessage> = (0..3)
            .map(|i| ForwardedMessage {
                seq: 7 + i,
                message: Bytes::from(vec![i as u8; 5]),
                stored_at_ms: 1000 + i as i64,
            })
            .collect();
        let wire = Bytes::from(encode_enqueue("q1", 9, &batch));
        let e = decode_enqueue(wire.clone()).unwrap();
        assert_eq!((e.address.as_str(), e.forwarder, e.first_seq), ("q1", 9, 7));
        assert_eq!(e.messages.len(), 3);
        assert_eq!(e.messages[2].message, batch[2].message);
        assert_eq!(e.messages[1].stored_at_ms, 1001);
        assert!(decode_enqueue(wire.slice(..wire.len() - 1)).is_err());
        let mut other = wire.to_vec();
        other[0] = 2;
        assert!(decode_enqueue(other.into())
            .unwrap_err()
            .contains("version 2"));
        let mut forged = BytesMut::new();
        forged.put_u8(LINK_FORWARD_VERSION);
        forged.put_u8(OP_ENQUEUE);
        put_str(&mut forged, "q");
        forged.put_u64_le(1);
        forged.put_u64_le(0);
        forged.put_u32_le(u32::MAX);
        let refused = decode_enqueue(forged.freeze()).unwrap_err();
        assert!(refused.contains("MAX_FORWARD_BATCH_MESSAGES"), "{refused}");
        let long = "a".repeat(MAX_FORWARD_ADDRESS_BYTES + 1);
        assert!(decode_enqueue(encode_enqueue(&long, 1, &batch).into()).is_err());

        for r in [
            Reply {
                stored: 3,
                rest: None,
            },
            Reply {
                stored: 1,
                rest: Some(Rest::NotServed("moved".into())),
            },
            Reply {
                stored: 0,
                rest: Some(Rest::Failed("x".repeat(5000))),
            },
        ] {
            let back = decode_reply(encode_reply(&r)).unwrap();
            match (&r.rest, &back.rest) {
                (Some(Rest::Failed(a)), Some(Rest::Failed(b))) => {
                    assert_eq!(b.len(), MAX_REASON_BYTES);
                    assert!(a.starts_with(b.as_str()));
                }
                _ => assert_eq!(back, r),
            }
        }
    }
}
