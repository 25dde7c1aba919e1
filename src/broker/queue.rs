//! A queue: messages waiting for consumers, the consumers competing for them, and the
//! deliveries they have not settled yet.
//!
//! All state sits behind one mutex per queue (never a global lock); critical sections are
//! short and never await. Deliveries leave through each consumer's connection channel,
//! and the queue never sends more than the consumer's link credit, so those channels stay
//! bounded by credit. Delivery counting for flow control lives here, not in the connection:
//! the queue is the one place that knows how many transfers it has handed out.
//!
//! Invariants:
//! * A message is in exactly one place: `ready`, `unsettled`, or on its way to another
//!   address (dead-letter, expiry) — or acknowledged and gone.
//! * A message only enters a queue once it is durable in the store.
//! * Accepted messages are acknowledged in the store before they are forgotten: an
//!   acceptance the store cannot record ([`AckRefused`], e.g. the disk is full) puts the
//!   message back at the head of the queue — it was never durably consumed — and the
//!   caller learns it, so the consumer is never told it was settled.
//! * A queue under a delivery lease (a group-backed queue, issue 12) dispatches nothing
//!   while its lease does not hold; whoever renews it calls [`Queue::resume`] when it
//!   holds again. A *retired* queue ([`Queue::retire`]: its group's leadership here
//!   ended) dispatches nothing ever again and detaches every consumer that is or comes
//!   ([`Outbound::Retired`]); its messages live on in the group, not here.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use entrepot_storage::Durable;
use tokio::sync::{mpsc, watch};

use super::lease::DeliveryLease;
use super::limits::{self, AddressLimits, LimitExceeded, Reservation, SpaceUsage};
use super::store::{AddressStore, AddressStoreError, RecordError};
use super::Broker;

/// Most ready messages one dispatch passes over because no consumer may take them (all
/// excluded it, or no selector matches) before it stops looking; bounds the work a queue
/// with selective consumers does per event.
pub const MAX_DISPATCH_SKIP: usize = 10_000;

/// Unique id of a consumer (one sending link of the broker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub u64);

static NEXT_CONSUMER: AtomicU64 = AtomicU64::new(1);

impl ConsumerId {
    pub fn next() -> ConsumerId {
        ConsumerId(NEXT_CONSUMER.fetch_add(1, Ordering::Relaxed))
    }
}

/// Where a consumer's deliveries go: a link of a session of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkKey {
    pub channel: u16,
    pub handle: u32,
    pub consumer: ConsumerId,
}

/// A message held by a queue. `message` is a slice of the store's mapping.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub offset: u64,
    pub message: Bytes,
    /// Failed delivery attempts so far (the header's delivery-count on the wire).
    pub delivery_count: u32,
    /// When the message expires (ms since the epoch), from ttl or absolute-expiry-time.
    pub expires_at_ms: Option<i64>,
    /// Consumers that said `undeliverable-here` for this message.
    pub excluded: Option<Box<Vec<ConsumerId>>>,
}

/// What a queue sends to a consumer's connection.
#[derive(Debug)]
pub enum Outbound {
    /// Send this message on the link; it is unsettled unless `settled`.
    Deliver {
        link: LinkKey,
        queue: Arc<Queue>,
        msg: QueuedMessage,
        settled: bool,
    },
    /// A drain ran out of messages: the link's delivery-count advanced to this value and
    /// its credit is zero; tell the receiver with a flow.
    Drained { link: LinkKey, delivery_count: u32 },
    /// The queue is no longer served here (its group's leadership on this node ended):
    /// detach the link with `amqp:link:detach-forced` and this description. What the
    /// consumer left unsettled is not settled here; it is delivered again where the
    /// address is served now.
    Retired { link: LinkKey, description: String },
    /// A forwarded producer link's carrier gave up (`forwarding.rs`): detach producer
    /// link `handle` on session `channel` with `amqp:link:detach-forced` and the carrier's
    /// reason, even with nothing in flight (not a queue's event; the same channel).
    ForwardEnded { channel: u16, handle: u32 },
}

/// The receiver's outcome for one delivery.
#[derive(Debug, Clone)]
pub enum Outcome {
    Accepted,
    Released,
    Modified {
        delivery_failed: bool,
        undeliverable_here: bool,
    },
    Rejected {
        condition: String,
        description: Option<String>,
    },
}

/// A consumer's acceptance the store could not record: the message is back in its queue
/// (to be delivered again) and the consumer must not be told it was settled.
#[derive(Debug, thiserror::Error)]
#[error("acknowledgement of message {offset} of {queue} not recorded: {source}")]
pub struct AckRefused {
    pub queue: String,
    pub offset: u64,
    #[source]
    pub source: RecordError,
}

impl AckRefused {
    /// The store refused for lack of space (retryable once space is freed).
    pub fn is_out_of_space(&self) -> bool {
        self.source.is_out_of_space()
    }
}

/// What a consumer's outcome became in the store: the handle a settle-second consumer's
/// settlement waits on.
#[derive(Debug, Clone)]
pub enum Recorded {
    /// An acknowledgement record: done once durable (committed, in a cluster).
    Durable(Durable),
    /// A move to the dead-letter address (`rejected`, or the last allowed failure): done
    /// once the annotated copy and the original's acknowledgement are both durable
    /// (`Some(true)`); `Some(false)` when the move failed and the message went back to its
    /// queue — then the consumer must not be told it was settled.
    Moving(watch::Receiver<Option<bool>>),
}

impl Recorded {
    pub fn is_done(&self) -> bool {
        match self {
            Recorded::Durable(d) => d.is_durable(),
            Recorded::Moving(rx) => *rx.borrow() == Some(true),
        }
    }

    pub fn has_failed(&self) -> bool {
        match self {
            Recorded::Durable(d) => d.has_failed(),
            Recorded::Moving(rx) => *rx.borrow() == Some(false),
        }
    }

    /// Completes when the outcome is done or has failed.
    pub async fn wait(self) {
        match self {
            Recorded::Durable(d) => {
                let _ = d.wait().await;
            }
            Recorded::Moving(mut rx) => {
                let _ = rx.wait_for(Option::is_some).await;
            }
        }
    }
}

/// A consumer as the queue sees it.
#[derive(Debug)]
pub struct ConsumerSpec {
    pub link: LinkKey,
    pub tx: mpsc::UnboundedSender<Outbound>,
    /// The link was attached with snd-settle-mode `settled`: at-most-once.
    pub presettled: bool,
    /// Most unsettled deliveries this consumer may hold.
    pub unsettled_max: usize,
    /// A JMS selector: the consumer only gets the messages it matches; the others stay
    /// in the queue, in their place, for other consumers.
    pub selector: Option<Arc<super::selector::Selector>>,
}

#[derive(Debug)]
struct Consumer {
    spec: ConsumerSpec,
    credit: u32,
    delivery_count: u32,
    drain: bool,
    unsettled: usize,
}

impl Consumer {
    /// It may take a delivery now: credit, and room under its unsettled limit.
    fn has_room(&self) -> bool {
        self.credit > 0 && self.unsettled < self.spec.unsettled_max
    }

    /// It may take `msg`: not excluded by its own `undeliverable-here`, and its selector
    /// (if any) matches.
    fn wants(&self, msg: &QueuedMessage) -> bool {
        let excluded = msg
            .excluded
            .as_ref()
            .is_some_and(|e| e.contains(&self.spec.link.consumer));
        !excluded
            && self
                .spec
                .selector
                .as_ref()
                .is_none_or(|sel| super::selector_matches(sel, &msg.message))
    }
}

#[derive(Debug, Default)]
struct QueueState {
    ready: VecDeque<QueuedMessage>,
    unsettled: HashMap<u64, (ConsumerId, QueuedMessage)>,
    consumers: Vec<Consumer>,
    next_consumer: usize,
    /// Bytes of the messages in `ready` and `unsettled`.
    bytes: u64,
    /// Messages admitted but not yet durable (see [`Reservation`]), and their bytes.
    reserved: u64,
    reserved_bytes: u64,
    limits: AddressLimits,
    /// The address space whose `maxStoredBytes` this queue counts against.
    space: Option<Arc<SpaceUsage>>,
    /// Why the queue is no longer served here ([`Queue::retire`]), once it is not.
    retired: Option<String>,
}

impl QueueState {
    /// Puts a message that was out (delivered, then released, modified, left unsettled,
    /// or given back) where it belongs in queue order — before the first ready message
    /// that came after it — so a consumer that releases 51..55 one by one leaves them
    /// 51..55 for the next, not 55..51. Ready messages are in offset order but for races
    /// between producers' group commits, so a binary search by offset finds the place.
    fn put_back(&mut self, msg: QueuedMessage) {
        let at = self.ready.partition_point(|m| m.offset < msg.offset);
        self.ready.insert(at, msg);
    }

    /// The next consumer, round robin from `next_consumer`, that has room and wants the
    /// ready message at `at`.
    fn choose_consumer(&self, at: usize) -> Option<usize> {
        let msg = self.ready.get(at)?;
        let n = self.consumers.len();
        (0..n)
            .map(|step| (self.next_consumer + step) % n)
            .find(|&i| self.consumers[i].has_room() && self.consumers[i].wants(msg))
    }

    /// `n` bytes entered the queue.
    fn hold(&mut self, n: u64) {
        self.bytes += n;
        limits::space_add(&self.space, n);
    }

    /// A message of `n` bytes left the queue for good.
    fn release(&mut self, n: u64) {
        debug_assert!(self.bytes >= n, "queue byte count underflow");
        self.bytes = self.bytes.saturating_sub(n);
        limits::space_sub(&self.space, n);
    }

    /// Forgets every ready and unsettled message here (they are owned elsewhere: the
    /// group's next leader, or a shadow's leader), releasing their bytes.
    fn forget_all(&mut self) {
        let held: Vec<u64> = self
            .ready
            .drain(..)
            .chain(self.unsettled.drain().map(|(_, (_, m))| m))
            .map(|m| len_of(&m))
            .collect();
        for bytes in held {
            self.release(bytes);
        }
    }

    fn held(&self) -> u64 {
        (self.ready.len() + self.unsettled.len()) as u64 + self.reserved
    }

    fn held_bytes(&self) -> u64 {
        self.bytes + self.reserved_bytes
    }
}

/// Ends the drains of consumers whose credit the dispatch could not use: their
/// delivery-count advances by it and they are told (`Outbound::Drained`).
fn finish_drains(s: &mut QueueState) {
    for c in s.consumers.iter_mut().filter(|c| c.drain && c.credit > 0) {
        c.delivery_count = c.delivery_count.wrapping_add(c.credit);
        c.credit = 0;
        c.drain = false;
        let _ = c.spec.tx.send(Outbound::Drained {
            link: c.spec.link,
            delivery_count: c.delivery_count,
        });
    }
}

fn len_of(msg: &QueuedMessage) -> u64 {
    msg.message.len() as u64
}

/// Totals exported as metrics.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub enqueued: AtomicU64,
    pub acknowledged: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub expired: AtomicU64,
    pub delivered: AtomicU64,
    /// Dropped because a subscription's backlog was over its limit.
    pub dropped: AtomicU64,
}

/// A queue; see the module docs.
#[derive(Debug)]
pub struct Queue {
    name: String,
    owner: QueueOwner,
    /// A group-backed queue's delivery lease: it dispatches only while it holds, and its
    /// deliveries reach a socket only while it holds (`connection::flush`).
    lease: Option<Arc<DeliveryLease>>,
    state: Mutex<QueueState>,
    pub stats: QueueStats,
}

/// Whose messages a queue holds, which decides how an acknowledgement is recorded.
#[derive(Debug)]
pub enum QueueOwner {
    /// A queue address: acknowledged in the store's default group.
    Address,
    /// A queue address whose messages and consumption live in its own store (a
    /// clustered address's Raft group): acknowledged and counted there.
    Group(Arc<dyn AddressStore>),
    /// A topic subscription: acknowledged in the subscription's group (if durable) and
    /// released in the topic, which acknowledges the record once nobody needs it.
    Subscription {
        topic: std::sync::Weak<super::topic::Topic>,
        group: u32,
        durable: bool,
    },
    /// An in-memory address (anycast, or one receiver of a multicast address): nothing
    /// is in the store, so nothing is acknowledged there.
    Memory,
    /// The shadow of a queue another node leads, for one forwarded consumer link
    /// (`broker::forwarding`): its messages are the leader's, unsettled there; every
    /// outcome goes to the leader through the source, and nothing is dead-lettered,
    /// expired or requeued here.
    Forwarded(Arc<dyn super::forwarding::ForwardedSource>),
}

/// Why a message leaves a queue for another address.
#[derive(Debug, Clone)]
pub enum Diversion {
    DeadLetter {
        reason: String,
        description: Option<String>,
    },
    Expired,
}

impl Queue {
    pub fn new(name: String) -> Queue {
        Queue::owned(name, QueueOwner::Address)
    }

    /// A queue that holds one subscription's messages of a topic.
    pub fn owned(name: String, owner: QueueOwner) -> Queue {
        Queue {
            name,
            owner,
            lease: None,
            state: Mutex::new(QueueState::default()),
            stats: QueueStats::default(),
        }
    }

    /// A queue that delivers only while `lease` holds (a group-backed queue: its
    /// group's leadership here, confirmed by a majority).
    pub fn leased(name: String, owner: QueueOwner, lease: Arc<DeliveryLease>) -> Queue {
        Queue {
            lease: Some(lease),
            ..Queue::owned(name, owner)
        }
    }

    /// The lease this queue delivers under, if any.
    /// The shadow of a queue another node leads, consumed by one forwarded link.
    pub fn forwarded(name: String, source: Arc<dyn super::forwarding::ForwardedSource>) -> Queue {
        Queue::owned(name, QueueOwner::Forwarded(source))
    }

    /// How many more messages a shadow's consumers may take now beyond those it holds
    /// ready: their credit within their unsettled room, less the ready messages.
    pub fn forward_demand(&self) -> usize {
        let s = self.lock();
        if s.retired.is_some() {
            return 0;
        }
        let room: usize = s
            .consumers
            .iter()
            .map(|c| (c.credit as usize).min(c.spec.unsettled_max.saturating_sub(c.unsettled)))
            .sum();
        room.saturating_sub(s.ready.len())
    }

    /// Whether consumer `id` holds the delivery of `offset` unsettled.
    pub fn holds(&self, id: ConsumerId, offset: u64) -> bool {
        self.lock()
            .unsettled
            .get(&offset)
            .is_some_and(|(owner, _)| *owner == id)
    }

    fn forwarded_source(&self) -> Option<&Arc<dyn super::forwarding::ForwardedSource>> {
        match &self.owner {
            QueueOwner::Forwarded(source) => Some(source),
            _ => None,
        }
    }

    pub fn delivery_lease(&self) -> Option<&Arc<DeliveryLease>> {
        self.lease.as_ref()
    }

    /// Whether the queue is no longer served here ([`Queue::retire`]).
    pub fn is_retired(&self) -> bool {
        self.lock().retired.is_some()
    }

    /// Dispatches what waited while the lease did not hold (the renewal calls it when
    /// the lease holds again).
    pub fn resume(self: &Arc<Self>, broker: &Broker) {
        let mut s = self.lock();
        self.dispatch(broker, &mut s);
    }

    /// Stops serving the queue here for good: every consumer is told to detach
    /// ([`Outbound::Retired`] with `why`), and so is any that attaches later; the ready and
    /// unsettled messages are forgotten here (they are the group's, and its next leader
    /// serves them; nothing is recorded for them). Returns how many consumers were told.
    pub fn retire(&self, why: &str) -> usize {
        let mut s = self.lock();
        if s.retired.is_some() {
            return 0;
        }
        s.retired = Some(why.to_owned());
        let consumers = std::mem::take(&mut s.consumers);
        for c in &consumers {
            let _ = c.spec.tx.send(Outbound::Retired {
                link: c.spec.link,
                description: why.to_owned(),
            });
        }
        let st = &mut *s;
        st.forget_all();
        consumers.len()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's own store, when its owner is [`QueueOwner::Group`].
    pub fn address_store(&self) -> Option<&Arc<dyn AddressStore>> {
        match &self.owner {
            QueueOwner::Group(store) => Some(store),
            _ => None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A poisoned queue lock means a panic mid-update; the state is still the best we
        // have, and refusing service would not make it better.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages held: ready plus delivered-but-unsettled.
    pub fn depth(&self) -> (usize, usize) {
        let s = self.lock();
        (s.ready.len(), s.unsettled.len())
    }

    /// Whether this queue's deliveries may go out now (`None`: it has no lease).
    pub fn lease_holds(&self) -> Option<bool> {
        self.lease.as_ref().map(|l| l.holds())
    }

    pub fn consumer_count(&self) -> usize {
        self.lock().consumers.len()
    }

    /// Applies an address plan's limits, and the space this queue counts against.
    pub fn set_limits(&self, limits: AddressLimits, space: Option<Arc<SpaceUsage>>) {
        let mut s = self.lock();
        let bytes = s.held_bytes();
        if let Some(old) = s.space.take() {
            old.sub(bytes);
        }
        if let Some(new) = &space {
            new.add(bytes);
        }
        s.space = space;
        s.limits = limits;
    }

    pub fn limits(&self) -> AddressLimits {
        self.lock().limits
    }

    /// Bytes held (ready + unsettled), for metrics.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Takes room for a message of `bytes` that is about to be stored for this queue;
    /// `None` when the queue has no limits to keep (nothing to count).
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Option<Reservation>, LimitExceeded> {
        let mut s = self.lock();
        if s.limits == AddressLimits::default() && s.space.is_none() {
            return Ok(None);
        }
        let address = || self.name.clone();
        if let Some(max) = s.limits.depth_max.filter(|&m| s.held() >= m) {
            return Err(LimitExceeded::Depth {
                address: address(),
                max,
            });
        }
        if let Some(max) = s.limits.bytes_max.filter(|&m| s.held_bytes() + bytes > m) {
            return Err(LimitExceeded::Bytes {
                address: address(),
                bytes,
                max,
            });
        }
        if let Some(space) = s.space.as_ref().filter(|sp| !sp.fits(bytes)) {
            return Err(LimitExceeded::SpaceBytes {
                space: space.name.clone(),
                bytes,
                max: space.bytes_max().unwrap_or(0),
            });
        }
        s.reserved += 1;
        s.reserved_bytes += bytes;
        limits::space_add(&s.space, bytes);
        Ok(Some(Reservation {
            queue: Arc::clone(self),
            bytes,
        }))
    }

    pub(crate) fn unreserve(&self, bytes: u64) {
        let mut s = self.lock();
        s.reserved = s.reserved.saturating_sub(1);
        s.reserved_bytes = s.reserved_bytes.saturating_sub(bytes);
        limits::space_sub(&s.space, bytes);
    }

    /// How many more messages a producer may be granted credit for: `None` without a
    /// limit, 0 when the queue (or its space) is full by count or bytes. Under a bytes
    /// limit, room is counted in messages of the queue's current average size.
    pub fn room(&self) -> Option<u64> {
        let s = self.lock();
        if s.space.as_ref().is_some_and(|sp| !sp.fits(1)) {
            return Some(0);
        }
        let by_depth = s.limits.depth_max.map(|m| m.saturating_sub(s.held()));
        let by_bytes = s.limits.bytes_max.and_then(|max| {
            let (held, bytes) = (s.held(), s.held_bytes());
            match (bytes >= max, held) {
                (true, _) => Some(0),
                (false, 0) => None,
                (false, n) => Some((max - bytes) / (bytes / n).max(1)),
            }
        });
        match (by_depth, by_bytes) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Adds a durable message and hands it to a consumer if one has credit.
    pub fn enqueue(self: &Arc<Self>, broker: &Broker, msg: QueuedMessage) {
        self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
        let mut s = self.lock();
        s.hold(len_of(&msg));
        s.ready.push_back(msg);
        self.dispatch(broker, &mut s);
    }

    /// Adds many messages at once (recovery).
    pub fn enqueue_all(
        self: &Arc<Self>,
        broker: &Broker,
        msgs: impl IntoIterator<Item = QueuedMessage>,
    ) {
        let mut s = self.lock();
        for msg in msgs {
            s.hold(len_of(&msg));
            s.ready.push_back(msg);
        }
        self.dispatch(broker, &mut s);
    }

    pub fn add_consumer(self: &Arc<Self>, spec: ConsumerSpec) {
        let mut s = self.lock();
        if let Some(why) = &s.retired {
            let _ = spec.tx.send(Outbound::Retired {
                link: spec.link,
                description: why.clone(),
            });
            return;
        }
        if let Some(lease) = &self.lease {
            lease.want();
        }
        s.consumers.push(Consumer {
            spec,
            credit: 0,
            delivery_count: 0,
            drain: false,
            unsettled: 0,
        });
    }

    /// Removes a consumer; what it left unsettled goes back to the head of the queue with
    /// its delivery count raised (the link closed without an outcome).
    pub fn remove_consumer(self: &Arc<Self>, broker: &Broker, id: ConsumerId) {
        if let Some(source) = self.forwarded_source() {
            return self.remove_forwarded_consumer(source, id);
        }
        let mut s = self.lock();
        s.consumers.retain(|c| c.spec.link.consumer != id);
        let mut back: Vec<QueuedMessage> = Vec::new();
        s.unsettled.retain(|_, (owner, msg)| {
            if *owner == id {
                let mut msg = msg.clone();
                msg.delivery_count += 1;
                back.push(msg);
                false
            } else {
                true
            }
        });
        let max = broker.config().max_delivery_attempts;
        let mut dead = Vec::new();
        for msg in back {
            if msg.delivery_count >= max {
                s.release(len_of(&msg));
                dead.push(msg);
                continue;
            }
            self.record_delivery_count(broker, &msg);
            s.put_back(msg);
        }
        if !dead.is_empty() {
            // As for a `modified` failure: the attempt that reaches the limit dead-letters.
            drop(s);
            for msg in dead {
                self.divert(
                    broker,
                    msg,
                    Diversion::DeadLetter {
                        reason: "delivery-limit".into(),
                        description: Some(format!("delivery attempts reached {max}")),
                    },
                );
            }
            s = self.lock();
        }
        self.dispatch(broker, &mut s);
    }

    /// [`Queue::remove_consumer`] of a shadow: everything it holds is the leader's and
    /// goes back there (the source tells the leader), nothing is requeued here.
    fn remove_forwarded_consumer(
        &self,
        source: &Arc<dyn super::forwarding::ForwardedSource>,
        id: ConsumerId,
    ) {
        let mut s = self.lock();
        s.consumers.retain(|c| c.spec.link.consumer != id);
        let st = &mut *s;
        let undelivered: Vec<u64> = st.ready.iter().map(|m| m.offset).collect();
        st.forget_all();
        drop(s);
        source.closed(undelivered);
    }

    /// A consumer's outcome for the delivery of `offset` was given in a transaction: the
    /// message stays out (unsettled) but now belongs to the transaction's `txn_owner`,
    /// so the consumer's link may close without giving it back and has room for more.
    /// The transaction settles it at commit ([`Queue::settle`]) or gives
    /// it back at rollback ([`Queue::remove_consumer`] of `txn_owner`). False when the
    /// consumer no longer holds it.
    pub fn assign_to_txn(
        self: &Arc<Self>,
        broker: &Broker,
        consumer: ConsumerId,
        offset: u64,
        txn_owner: ConsumerId,
    ) -> bool {
        let mut s = self.lock();
        match s.unsettled.get_mut(&offset) {
            Some((owner, _)) if *owner == consumer => *owner = txn_owner,
            _ => return false,
        }
        if let Some(c) = s
            .consumers
            .iter_mut()
            .find(|c| c.spec.link.consumer == consumer)
        {
            c.unsettled = c.unsettled.saturating_sub(1);
        }
        self.dispatch(broker, &mut s);
        true
    }

    /// Applies a flow from the consumer's receiver: credit and drain.
    pub fn flow(
        self: &Arc<Self>,
        broker: &Broker,
        id: ConsumerId,
        rcv_delivery_count: Option<u32>,
        link_credit: u32,
        drain: bool,
    ) {
        if let Some(lease) = &self.lease {
            lease.want();
        }
        let mut s = self.lock();
        if let Some(c) = s.consumers.iter_mut().find(|c| c.spec.link.consumer == id) {
            let rcv = rcv_delivery_count.unwrap_or(0);
            c.credit = rcv.wrapping_add(link_credit).wrapping_sub(c.delivery_count);
            if c.credit > link_credit {
                c.credit = 0; // the receiver's view is older than ours: nothing to add
            }
            c.drain = drain;
        }
        self.dispatch(broker, &mut s);
        drop(s);
        if let Some(source) = self.forwarded_source() {
            source.wake();
        }
    }

    /// Applies the consumer's outcome for the delivery of `offset`. For an acceptance,
    /// returns the handle that completes once it is durable (committed, in a cluster): a
    /// consumer settling second is settled back only then; `Ok(None)` when there is
    /// nothing to wait for. An acceptance the store refuses is [`AckRefused`]: the message
    /// is back at the head of the queue, and the consumer gets no more deliveries from it
    /// until it flows again (its link is about to be detached).
    pub fn settle(
        self: &Arc<Self>,
        broker: &Broker,
        id: ConsumerId,
        offset: u64,
        outcome: Outcome,
    ) -> Result<Option<Recorded>, AckRefused> {
        let mut s = self.lock();
        if let Some(why) = &s.retired {
            // Retiring handed every unsettled delivery back (the address is served by
            // its group's next leader now): an outcome arriving after it was recorded
            // nowhere, so it is refused — never settled back as if it had been.
            let reason = why.clone();
            return Err(AckRefused {
                queue: self.name.clone(),
                offset,
                source: AddressStoreError::Retired {
                    address: self.name.clone(),
                    reason,
                }
                .into(),
            });
        }
        let Some((owner, mut msg)) = s.unsettled.remove(&offset) else {
            return Ok(None);
        };
        if let Some(c) = s
            .consumers
            .iter_mut()
            .find(|c| c.spec.link.consumer == owner)
        {
            c.unsettled = c.unsettled.saturating_sub(1);
        }
        if let Some(source) = self.forwarded_source() {
            // The leader's message: its outcome is the leader's to record.
            s.release(len_of(&msg));
            self.dispatch(broker, &mut s);
            drop(s);
            if matches!(outcome, Outcome::Accepted) {
                self.stats.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            source.wake();
            return Ok(Some(Recorded::Durable(source.settle(offset, outcome))));
        }
        match outcome {
            Outcome::Accepted => {
                s.release(len_of(&msg));
                drop(s);
                return self.accept_settled(broker, id, offset, msg);
            }
            Outcome::Released => s.put_back(msg),
            Outcome::Modified {
                delivery_failed,
                undeliverable_here,
            } => {
                if undeliverable_here {
                    msg.excluded.get_or_insert_with(Default::default).push(id);
                }
                if delivery_failed {
                    msg.delivery_count += 1;
                }
                let max = broker.config().max_delivery_attempts;
                if msg.delivery_count >= max {
                    s.release(len_of(&msg));
                    drop(s);
                    let why = Diversion::DeadLetter {
                        reason: "delivery-limit".into(),
                        description: Some(format!("delivery attempts reached {max}")),
                    };
                    return Ok(Some(self.dead_letter_settled(broker, msg, why)));
                }
                if delivery_failed {
                    self.record_delivery_count(broker, &msg);
                }
                s.put_back(msg);
            }
            Outcome::Rejected {
                condition,
                description,
            } => {
                s.release(len_of(&msg));
                drop(s);
                let why = Diversion::DeadLetter {
                    reason: condition,
                    description,
                };
                return Ok(Some(self.dead_letter_settled(broker, msg, why)));
            }
        }
        self.dispatch(broker, &mut s);
        Ok(None)
    }

    /// Records consumer `id`'s acceptance of `msg` (released from the queue's count by
    /// the caller). Refused by the store: the message goes back to the head of the queue
    /// and the consumer gets no more credit (its link is about to be detached).
    fn accept_settled(
        self: &Arc<Self>,
        broker: &Broker,
        id: ConsumerId,
        offset: u64,
        msg: QueuedMessage,
    ) -> Result<Option<Recorded>, AckRefused> {
        let recorded = self.acknowledge(broker, offset);
        let mut s = self.lock();
        if recorded.is_err() {
            s.hold(len_of(&msg));
            s.put_back(msg);
            if let Some(c) = s.consumers.iter_mut().find(|c| c.spec.link.consumer == id) {
                c.credit = 0;
            }
        }
        self.dispatch(broker, &mut s);
        recorded
            .map(|r| r.map(Recorded::Durable))
            .map_err(|source| AckRefused {
                queue: self.name.clone(),
                offset,
                source,
            })
    }

    /// Starts moving a settled `msg` (released from the queue's count by the caller) to
    /// the dead-letter address; the queue serves its consumers meanwhile.
    fn dead_letter_settled(
        self: &Arc<Self>,
        broker: &Broker,
        msg: QueuedMessage,
        why: Diversion,
    ) -> Recorded {
        let moving = self.dead_letter_for_consumer(broker, msg, why);
        let mut s = self.lock();
        self.dispatch(broker, &mut s);
        moving
    }

    /// The message at `offset` is done with in this queue (accepted, dead-lettered or
    /// expired elsewhere, dropped): record it in the store for good.
    /// Returns the handle that completes once that record is durable (committed, in a
    /// cluster); `Ok(None)` when there is nothing to record (in-memory and non-durable
    /// queues). An error means nothing was recorded: the message is not consumed, it comes
    /// back after a restart (logged here, counted by the store); a caller that can still
    /// give it back to the queue does so.
    pub(crate) fn finish(
        &self,
        broker: &Broker,
        offset: u64,
    ) -> Result<Option<Durable>, RecordError> {
        let result = match &self.owner {
            QueueOwner::Address => broker.store().ack(&[offset]).map(Some).map_err(Into::into),
            QueueOwner::Group(store) => store.ack(&[offset]).map(Some).map_err(Into::into),
            QueueOwner::Memory => Ok(None),
            // A pre-settled delivery of a shadow: the leader acknowledges it.
            QueueOwner::Forwarded(source) => Ok(Some(source.settle(offset, Outcome::Accepted))),
            QueueOwner::Subscription {
                topic,
                group,
                durable,
            } => {
                let acked = match durable {
                    true => broker.store().ack_group(*group, &[offset]).map(Some),
                    false => Ok(None),
                }
                .map_err(RecordError::from);
                // Only a recorded acknowledgement lets the topic give the record up.
                if let (Ok(_), Some(topic)) = (&acked, topic.upgrade()) {
                    topic.release(broker, offset, *durable);
                }
                acked
            }
        };
        result.inspect_err(|e| {
            tracing::error!(queue = %self.name, offset, error = %e,
                "acknowledgement not recorded: the message stays unconsumed");
        })
    }

    /// Persists a raised delivery count (queues and durable subscriptions), so
    /// `max-delivery-attempts` and the count a consumer sees survive a restart. Best
    /// effort: a store that refuses is logged, and the count lives on in memory.
    fn record_delivery_count(&self, broker: &Broker, msg: &QueuedMessage) {
        let (offset, count) = (msg.offset, msg.delivery_count);
        let store = broker.store();
        let recorded = match &self.owner {
            QueueOwner::Address => store
                .set_delivery_count(entrepot_storage::DEFAULT_GROUP, offset, count)
                .map_err(RecordError::from),
            QueueOwner::Group(own) => own
                .set_delivery_count(offset, count)
                .map_err(RecordError::from),
            QueueOwner::Subscription {
                group,
                durable: true,
                ..
            } => store
                .set_delivery_count(*group, offset, count)
                .map_err(RecordError::from),
            _ => return,
        };
        if let Err(e) = recorded {
            tracing::warn!(queue = %self.name, offset = msg.offset, error = %e, "could not record a delivery count");
        }
    }

    fn acknowledge(&self, broker: &Broker, offset: u64) -> Result<Option<Durable>, RecordError> {
        let recorded = self.finish(broker, offset)?;
        self.stats.acknowledged.fetch_add(1, Ordering::Relaxed);
        Ok(recorded)
    }

    fn divert(self: &Arc<Self>, broker: &Broker, msg: QueuedMessage, why: Diversion) {
        self.divert_tracked(broker, msg, why, None);
    }

    /// [`Queue::divert`], telling `done` whether the move completed (see [`Recorded::Moving`]).
    fn divert_tracked(
        self: &Arc<Self>,
        broker: &Broker,
        msg: QueuedMessage,
        why: Diversion,
        done: Option<watch::Sender<Option<bool>>>,
    ) {
        match &why {
            Diversion::DeadLetter { .. } => {
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed)
            }
            Diversion::Expired => self.stats.expired.fetch_add(1, Ordering::Relaxed),
        };
        broker.divert(Arc::clone(self), msg, why, done);
    }

    /// A diverted message whose move failed comes back to the head of this queue (it was
    /// never acknowledged here, so it is still this queue's).
    pub(crate) fn give_back(self: &Arc<Self>, broker: &Broker, msg: QueuedMessage) {
        let mut s = self.lock();
        s.hold(len_of(&msg));
        s.put_back(msg);
        self.dispatch(broker, &mut s);
    }

    /// Starts moving `msg` to the dead-letter address for a consumer's outcome; the
    /// returned handle completes once the move is durable.
    fn dead_letter_for_consumer(
        self: &Arc<Self>,
        broker: &Broker,
        msg: QueuedMessage,
        why: Diversion,
    ) -> Recorded {
        let (tx, rx) = watch::channel(None);
        self.divert_tracked(broker, msg, why, Some(tx));
        Recorded::Moving(rx)
    }

    /// Drops the oldest ready messages beyond `max` (a subscription over its backlog
    /// limit); returns how many were dropped.
    pub fn drop_oldest_beyond(self: &Arc<Self>, broker: &Broker, max: usize) -> usize {
        let mut s = self.lock();
        let excess = s.ready.len().saturating_sub(max);
        let dropped: Vec<QueuedMessage> = s.ready.drain(..excess).collect();
        for m in &dropped {
            s.release(len_of(m));
        }
        drop(s);
        let dropped: Vec<u64> = dropped.iter().map(|m| m.offset).collect();
        for offset in &dropped {
            let _ = self.finish(broker, *offset);
        }
        self.stats
            .dropped
            .fetch_add(dropped.len() as u64, Ordering::Relaxed);
        dropped.len()
    }

    /// Every message the queue holds now — ready, and delivered but unsettled — in queue
    /// order, for a browser (distribution-mode `copy`): copies of the handles, the
    /// queue itself is not changed.
    pub fn snapshot(&self) -> Vec<QueuedMessage> {
        let s = self.lock();
        let mut all: Vec<QueuedMessage> = s
            .ready
            .iter()
            .cloned()
            .chain(s.unsettled.values().map(|(_, m)| m.clone()))
            .collect();
        drop(s);
        all.sort_by_key(|m| m.offset);
        all
    }

    /// Offsets this queue still holds (ready or unsettled), for a subscription's removal.
    pub fn held_offsets(&self) -> Vec<u64> {
        let s = self.lock();
        s.ready
            .iter()
            .map(|m| m.offset)
            .chain(s.unsettled.keys().copied())
            .collect()
    }

    /// Hands ready messages to consumers with credit, round robin, in queue order.
    ///
    /// A message no consumer may take right now — every consumer with room said
    /// `undeliverable-here`, or none's selector matches — stays where it is and the scan
    /// goes on behind it, so it neither blocks the queue nor loses its place. The scan
    /// passes over at most [`MAX_DISPATCH_SKIP`] such messages per call.
    fn dispatch(self: &Arc<Self>, broker: &Broker, s: &mut QueueState) {
        // Under a lease, nothing is handed out while it does not hold: the renewal
        // resumes the queue once it does (`Queue::resume`).
        if s.retired.is_some() || self.lease.as_ref().is_some_and(|l| !l.holds()) {
            return;
        }
        // A shadow's messages expire on their leader, never here. The clock is read at
        // the first ready message with an expiry, once per call: most messages have none.
        let shadow = self.forwarded_source().is_some();
        let mut now = None;
        let mut expired = Vec::new();
        let mut at = 0;
        let mut skipped = 0;
        while at < s.ready.len() && skipped < MAX_DISPATCH_SKIP {
            if !s.consumers.iter().any(Consumer::has_room) {
                break;
            }
            let expiry = s.ready[at].expires_at_ms.filter(|_| !shadow);
            if expiry.is_some_and(|t| t <= *now.get_or_insert_with(now_ms)) {
                if let Some(msg) = s.ready.remove(at) {
                    s.release(len_of(&msg));
                    expired.push(msg);
                }
                continue;
            }
            let Some(i) = s.choose_consumer(at) else {
                at += 1;
                skipped += 1;
                continue;
            };
            let Some(msg) = s.ready.remove(at) else {
                break;
            };
            let n = s.consumers.len();
            s.next_consumer = (i + 1) % n;
            let c = &mut s.consumers[i];
            c.credit -= 1;
            c.delivery_count = c.delivery_count.wrapping_add(1);
            let link = c.spec.link;
            let settled = c.spec.presettled;
            if !settled {
                c.unsettled += 1;
            }
            let sent = c.spec.tx.send(Outbound::Deliver {
                link,
                queue: Arc::clone(self),
                msg: msg.clone(),
                settled,
            });
            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
            match (sent.is_ok(), settled) {
                (true, false) => {
                    s.unsettled.insert(msg.offset, (link.consumer, msg));
                }
                (true, true) => {
                    s.release(len_of(&msg));
                    // Pre-settled (at-most-once): nobody waits for the record, and the
                    // message is gone to the consumer. One the store refuses is logged and
                    // counted, and comes back after a restart.
                    let _ = self.acknowledge(broker, msg.offset);
                }
                (false, _) => {
                    // The connection is gone; its link removal will follow. Keep the
                    // message where it was.
                    s.consumers[i].unsettled = s.consumers[i]
                        .unsettled
                        .saturating_sub(usize::from(!settled));
                    s.consumers[i].credit = 0;
                    s.ready.insert(at, msg);
                }
            }
        }
        // A shadow's drain waits until its carrier asked the leader for what it holds
        // (`Queue::complete_drains`): an empty shadow is not an empty queue.
        if self.forwarded_source().is_none() {
            finish_drains(s);
        }
        for msg in expired {
            self.divert(broker, msg, Diversion::Expired);
        }
    }

    /// Whether a consumer of this shadow asked to drain and still has credit.
    pub fn drain_requested(&self) -> bool {
        self.lock()
            .consumers
            .iter()
            .any(|c| c.drain && c.credit > 0)
    }

    /// A shadow's carrier handed on what the leader had for it: the drains asked for
    /// before complete now (their remaining credit is used up, `Outbound::Drained`).
    pub fn complete_drains(self: &Arc<Self>, broker: &Broker) {
        let mut s = self.lock();
        self.dispatch(broker, &mut s);
        finish_drains(&mut s);
    }

    /// Moves expired messages that are waiting in the queue (called periodically, so
    /// messages expire even when nobody consumes).
    pub fn expire(self: &Arc<Self>, broker: &Broker) {
        if self.forwarded_source().is_some() {
            return; // the leader expires them
        }
        let now = now_ms();
        let mut s = self.lock();
        if !s
            .ready
            .iter()
            .any(|m| m.expires_at_ms.is_some_and(|t| t <= now))
        {
            return;
        }
        let (gone, keep): (VecDeque<_>, VecDeque<_>) = s
            .ready
            .drain(..)
            .partition(|m| m.expires_at_ms.is_some_and(|t| t <= now));
        s.ready = keep;
        for m in &gone {
            s.release(len_of(m));
        }
        drop(s);
        for msg in gone {
            self.divert(broker, msg, Diversion::Expired);
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
