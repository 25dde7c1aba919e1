//! Links: attaching a producer (the peer sends to a queue) or a consumer (the peer
//! receives from one), receiving transfers, and detaching.
//!
//! A producer link's credit is the broker's backpressure: the peer may only send what we
//! granted, and we grant [`crate::config::BrokerConfig::link_credit`] again once half is
//! used. A multi-frame delivery is held until its last frame under three bounds: the max
//! message size per link (beyond it `amqp:link:message-size-exceeded`), and the
//! connection's and the broker's budgets for incomplete deliveries
//! (`crate::broker::intake`; beyond them `amqp:resource-limit-exceeded`, after a bounded
//! wait for the broker-wide one). Either way only the link is detached and the
//! connection keeps working.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fe2o3_amqp_types::definitions::{
    AmqpError, Error as AmqpErrorBody, ErrorCondition, LinkError, ReceiverSettleMode, Role,
    SenderSettleMode, SessionError,
};
use fe2o3_amqp_types::messaging::{
    DeliveryState, DistributionMode, Rejected, Released, TargetArchetype,
};
use fe2o3_amqp_types::performatives::{Attach, Detach, Disposition, Performative, Transfer};

use super::errors::{ClientError, Refusal};
use super::session::Session;
use super::subscribe::{self, SubscriptionRef};
use super::{ConnError, Connection, Parked, PendingProduce, INCOMPLETE_BUDGET_WAIT};
use crate::amqp::message::MessageView;
use crate::auth::authz::Operation;
use crate::broker::intake::{Charge, IntakeRefused};
use crate::broker::limits::Reservation;
use crate::broker::memory::{MemoryAddress, Routed};
use crate::broker::queue::{ConsumerId, ConsumerSpec, LinkKey, Queue};
use crate::broker::routing::{LinkDirection, Route};
use crate::broker::Address;
use crate::manifest::AddressType;

mod address_produce;
mod forward_consume;
mod forward_produce;
pub(super) use forward_produce::PendingForward;

pub(super) enum Link {
    Producer(ProducerLink),
    Consumer(ConsumerLink),
    /// We detached it with an error and wait for the peer's detach; its frames are ignored.
    Detached,
}

pub(super) struct ProducerLink {
    /// `None`: the anonymous relay, each message routed by its `to`.
    pub target: Option<Address>,
    /// The target is this link's temporary queue (a dynamic target): deleted with it.
    pub temporary: bool,
    pub credit: u32,
    pub delivery_count: u32,
    /// Credit is being withheld because the target has no room (a subscription's
    /// backlog, a plan's depth or bytes limit, an anycast address without receivers).
    pub withheld: bool,
    partial: Option<Partial>,
    /// A transaction coordinator (see `txn.rs`): its messages are declares and discharges.
    pub txn_coordinator: bool,
    /// Set when the address is led by another node and this link is carried there
    /// (`link/forward_produce.rs`); `target` is then `None`.
    pub forward: Option<Box<crate::broker::forwarding::ForwardedProducer>>,
}

impl ProducerLink {
    /// A link with no target of its own (a transaction coordinator, a forwarded link)
    /// and the full credit.
    fn without_target(conn: &Connection, attach: &Attach) -> ProducerLink {
        ProducerLink {
            target: None,
            credit: conn.broker.config().link_credit,
            delivery_count: attach.initial_delivery_count.unwrap_or(0),
            withheld: false,
            partial: None,
            temporary: false,
            txn_coordinator: false,
            forward: None,
        }
    }

    /// Room in the target under its plan (`None`: unlimited, or the anonymous relay, whose
    /// messages are admitted one by one).
    fn room(&self) -> Option<u64> {
        self.target.as_ref().and_then(Address::room)
    }
}

/// A browser's view of its queue: the messages held when it attached (filtered by its
/// selector), sent pre-settled as the receiver grants credit; the queue never sees the
/// browser, so consumers are neither blocked nor raced, and nothing is consumed.
pub(super) struct Browse {
    pub snapshot: std::collections::VecDeque<crate::broker::queue::QueuedMessage>,
    pub delivery_count: u32,
    pub credit: u32,
}

/// A temporary queue for a dynamic source or target (`what`); refused under manifests,
/// where every address is declared, and at `max-auto-created-addresses`.
fn temporary_queue(conn: &Connection, what: &str) -> Result<Arc<Queue>, Refusal> {
    if conn.gate.manifests.current().is_some() {
        let d = format!("dynamic {what} are not available under manifests: declare the address");
        return Err((AmqpError::NotImplemented.into(), d));
    }
    conn.broker
        .create_temporary_queue()
        .map_err(|e| e.refusal())
}

/// Resolves the address a producer sends to — tenancy and authorization (a pass-through
/// without manifests, see tenant.rs), then the broker's address (created when
/// auto-create allows); for an attach and for each message of the anonymous relay.
fn resolve_send_target(
    conn: &Connection,
    address: &str,
    caps: Option<&[fe2o3_amqp_types::primitives::Symbol]>,
) -> Result<Address, Refusal> {
    let name = match conn.authorize(Operation::Send, address)? {
        r if r.address_type == Some(AddressType::Subscription) => {
            let d = format!(
                "address {address:?} is a subscription: receive from it, send to its topic"
            );
            return Err((AmqpError::NotAllowed.into(), d));
        }
        r => r.name,
    };
    conn.broker
        .address(&name, subscribe::kind_from_capabilities(caps))
        .map_err(|e| e.refusal())
}

/// The target of one message on the anonymous relay: its `properties.to`, resolved and
/// authorized like an attach's (`amqp:not-found`, `amqp:unauthorized-access`, …), or
/// `amqp:invalid-field` when the message names none.
fn relay_target(conn: &Connection, chunks: &[Bytes]) -> Result<Address, Refusal> {
    let whole = match chunks {
        [one] => one.clone(),
        many => Bytes::from(many.concat()),
    };
    let view = MessageView::parse(whole).map_err(|e| {
        (
            AmqpError::DecodeError.into(),
            format!("malformed message: {e}"),
        )
    })?;
    let to = view
        .properties()
        .map_err(|e| {
            (
                AmqpError::DecodeError.into(),
                format!("malformed properties: {e}"),
            )
        })?
        .and_then(|p| p.to);
    match to {
        Some(to) => resolve_send_target(conn, &to, None),
        None => Err((
            AmqpError::InvalidField.into(),
            "a message on the anonymous relay needs a `to` address".into(),
        )),
    }
}

pub(super) struct ConsumerLink {
    pub queue: Arc<Queue>,
    pub consumer: ConsumerId,
    /// The queue is this link's temporary queue (a dynamic source): deleted with the link.
    pub temporary: bool,
    /// A browser (distribution-mode `copy`): it reads a snapshot and never consumes.
    pub browse: Option<Box<Browse>>,
    /// Set when the link consumes a topic subscription.
    pub subscription: Option<SubscriptionRef>,
}

/// A delivery arriving in several frames: each frame's payload copied out of the read
/// buffer (a zero-copy slice would pin the whole read buffer it sits in, so the bytes
/// held could far exceed the bytes charged), charged to the connection's and the
/// broker's budget for incomplete deliveries until the last frame arrives or the
/// delivery is dropped. The store copies the pieces straight into the log.
struct Partial {
    delivery_id: Option<u32>,
    settled: bool,
    chunks: Vec<Bytes>,
    len: u64,
    charge: Charge,
    /// The txn-id of its transactional state (on its first frame).
    txn: Option<fe2o3_amqp_types::primitives::Binary>,
}

/// A whole message off the wire, on its way into the store: the link it came on, its
/// delivery id and whether the producer settled it, and its bytes.
#[derive(Clone, Copy)]
struct Incoming<'a> {
    handle: u32,
    delivery_id: Option<u32>,
    settled: bool,
    chunks: &'a [Bytes],
}

/// Bytes of a message that arrived in `chunks`.
fn chunks_len(chunks: &[Bytes]) -> u64 {
    chunks.iter().map(|c| c.len() as u64).sum()
}

/// Longest delivery-tag a peer may send: the spec's limit (binary up to 32 octets).
pub const MAX_DELIVERY_TAG_BYTES: usize = 32;

/// The filters a consumer link runs with: the selector its queue applies for it, and the
/// filter set our attach echoes (every filter in force, as the client wrote it).
#[derive(Default)]
struct Applied {
    selector: Option<Arc<crate::broker::selector::Selector>>,
    echo: Option<fe2o3_amqp_types::messaging::FilterSet>,
}

/// How a producer's named target is served (see `Session::route_producer`).
enum ProducerRoute {
    Here,
    /// Carried to the node that leads it.
    Forward(Arc<dyn crate::broker::forwarding::RemoteAddress>),
    /// Refused: the attach was answered.
    Refused(Result<(), ConnError>),
}

/// Credit to grant a producer: the configured amount, capped by the target's room.
fn credit_for(link_credit: u32, room: Option<u64>) -> u32 {
    room.map_or(link_credit, |r| r.min(u64::from(link_credit)) as u32)
}

/// Our answer to `attach` before any choice of ours: the peer's name, handle, termini and
/// settle modes echoed, the role flipped, an initial delivery-count when we are the sender.
fn mirror(attach: &Attach) -> Attach {
    let we_send = attach.role == Role::Receiver;
    Attach {
        name: attach.name.clone(),
        handle: attach.handle.clone(),
        role: if we_send {
            Role::Sender
        } else {
            Role::Receiver
        },
        snd_settle_mode: attach.snd_settle_mode.clone(),
        rcv_settle_mode: attach.rcv_settle_mode.clone(),
        source: attach.source.clone(),
        target: attach.target.clone(),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: we_send.then_some(0),
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    }
}

impl Session {
    pub(super) fn on_attach(
        &mut self,
        conn: &mut Connection,
        attach: Attach,
    ) -> Result<(), ConnError> {
        let handle = attach.handle.0;
        if handle > self.handle_max() {
            return Err(ConnError::protocol(
                ConnectionErrorOrFraming::framing(),
                format!("handle {handle} exceeds handle-max"),
            ));
        }
        if self.links.contains_key(&handle) {
            return Err(ConnError::session(
                SessionError::HandleInUse,
                format!("handle {handle} is already attached"),
            ));
        }
        match attach.role {
            Role::Sender => self.attach_producer(conn, attach),
            Role::Receiver => self.attach_consumer(conn, attach),
        }
    }

    fn attach_producer(&mut self, conn: &mut Connection, attach: Attach) -> Result<(), ConnError> {
        let (address, caps) = match attach.target.as_deref() {
            Some(TargetArchetype::Target(t)) => (
                t.address.clone(),
                t.capabilities.as_ref().map(|c| c.0.clone()),
            ),
            Some(TargetArchetype::Coordinator(c)) => {
                // A transaction coordinator (AMQP 1.0 part 4, see txn.rs).
                let txn_refused = super::txn::txn_capability_refused(c);
                return self.attach_txn_coordinator(conn, attach, txn_refused);
            }
            None => (None, None),
        };
        let dynamic =
            matches!(attach.target.as_deref(), Some(TargetArchetype::Target(t)) if t.dynamic);
        if dynamic {
            return self.attach_dynamic_target(conn, attach);
        }
        // No address: the anonymous relay (ANONYMOUS-RELAY, offered in our open) — each
        // message goes where its `to` says, authorized one by one.
        if let Some(address) = &address {
            match self.route_producer(conn, &attach, address) {
                ProducerRoute::Here => {}
                ProducerRoute::Refused(refused) => return refused,
                ProducerRoute::Forward(remote) => {
                    return self.attach_forwarded_producer(conn, attach, remote)
                }
            }
        }
        let target = match address {
            None => None,
            Some(address) => match resolve_send_target(conn, &address, caps.as_deref()) {
                Ok(target) => Some(target),
                Err(refusal) => return self.refuse(conn, attach, refusal),
            },
        };
        let room = target.as_ref().and_then(Address::room);
        let credit = credit_for(conn.broker.config().link_credit, room);
        let withheld = credit == 0;
        conn.withheld_links |= withheld;
        let plan_max = target.as_ref().and_then(|t| t.limits().message_bytes_max);
        let max_message_size = match plan_max {
            Some(plan) => plan.min(conn.broker.config().max_message_bytes),
            None => conn.broker.config().max_message_bytes,
        };
        let reply = Attach {
            rcv_settle_mode: ReceiverSettleMode::First,
            max_message_size: Some(max_message_size),
            ..mirror(&attach)
        };
        let link = ProducerLink {
            target,
            credit,
            delivery_count: attach.initial_delivery_count.unwrap_or(0),
            withheld,
            partial: None,
            temporary: false,
            txn_coordinator: false,
            forward: None,
        };
        self.open_producer(conn, reply, link)
    }

    /// How a producer's target `address` is served (`cluster-mode: groups`: here, carried
    /// to its leader, or refused as `errors::route_refusal` says), under the name its
    /// authorization resolves to (an authorization refusal is the attach's, later).
    fn route_producer(
        &mut self,
        conn: &mut Connection,
        attach: &Attach,
        address: &str,
    ) -> ProducerRoute {
        let Ok(resolved) = conn.authorize(Operation::Send, address) else {
            return ProducerRoute::Here;
        };
        let route = conn.broker.route(&resolved.name, LinkDirection::Produce);
        if let Route::Forward(remote) = route {
            return ProducerRoute::Forward(remote);
        }
        match self.refuse_route(conn, attach, &route, address) {
            Some(refused) => ProducerRoute::Refused(refused),
            None => ProducerRoute::Here,
        }
    }

    /// Answers a producer's attach with `reply`, registers `link` under its handle and
    /// grants the link its first credit.
    fn open_producer(
        &mut self,
        conn: &mut Connection,
        reply: Attach,
        link: ProducerLink,
    ) -> Result<(), ConnError> {
        let handle = reply.handle.0;
        let (delivery_count, credit) = (link.delivery_count, link.credit);
        conn.send(self.local_channel(), &Performative::Attach(reply), &[])?;
        self.links.insert(handle, Link::Producer(link));
        conn.broker.stats.links.fetch_add(1, Ordering::Relaxed);
        self.send_flow(conn, Some((handle, delivery_count, Some(credit), false)))
    }

    /// A sender to a transaction coordinator: refused (at link level) when it needs a
    /// capability we lack or the node is clustered; otherwise answered with our
    /// coordinator's capabilities and credit for its declares and discharges.
    fn attach_txn_coordinator(
        &mut self,
        conn: &mut Connection,
        attach: Attach,
        txn_refused: Option<String>,
    ) -> Result<(), ConnError> {
        if let Some(d) = txn_refused {
            return self.refuse(conn, attach, (AmqpError::NotImplemented.into(), d));
        }
        if conn.broker.store().is_replicated() {
            let d = "transactions are not available on a clustered node (a commit's atomicity \
                     is not carried through Raft yet): send without a transaction";
            return self.refuse(conn, attach, (AmqpError::NotImplemented.into(), d.into()));
        }
        let caps: Vec<_> = super::txn::TXN_CAPABILITIES.to_vec();
        let txn_target = fe2o3_amqp_types::transaction::Coordinator::new(
            fe2o3_amqp_types::primitives::Array::from(caps),
        );
        let reply = Attach {
            rcv_settle_mode: ReceiverSettleMode::First,
            target: Some(Box::new(TargetArchetype::Coordinator(txn_target))),
            ..mirror(&attach)
        };
        let link = ProducerLink {
            txn_coordinator: true,
            ..ProducerLink::without_target(conn, &attach)
        };
        self.open_producer(conn, reply, link)
    }

    /// A sender asking for a dynamic target: a temporary queue is created and named in
    /// the attach reply's target, the link sends to it, and it is deleted with the link.
    fn attach_dynamic_target(
        &mut self,
        conn: &mut Connection,
        attach: Attach,
    ) -> Result<(), ConnError> {
        self.attach_temporary(
            conn,
            attach,
            "targets",
            |session, conn, mut attach, queue| {
                if let Some(TargetArchetype::Target(t)) = attach.target.as_deref_mut() {
                    t.address = Some(queue.name().to_owned());
                    // Resolved now: the attach below takes the named path.
                    t.dynamic = false;
                }
                session.attach_producer(conn, attach)
            },
        )
    }

    /// A dynamic terminus (`what`: `sources` or `targets`): a temporary queue is created
    /// (see [`temporary_queue`]), `attach_named` names it in the attach and attaches the
    /// link to it, and the link is marked as its owner, which deletes it when the link
    /// goes; if no link came of the attach, the queue is deleted at once.
    fn attach_temporary(
        &mut self,
        conn: &mut Connection,
        attach: Attach,
        what: &str,
        attach_named: impl FnOnce(
            &mut Self,
            &mut Connection,
            Attach,
            &Arc<Queue>,
        ) -> Result<(), ConnError>,
    ) -> Result<(), ConnError> {
        let queue = match temporary_queue(conn, what) {
            Ok(q) => q,
            Err(refusal) => return self.refuse(conn, attach, refusal),
        };
        let handle = attach.handle.0;
        let result = attach_named(self, conn, attach, &queue);
        match self.links.get_mut(&handle) {
            Some(Link::Producer(p)) => p.temporary = true,
            Some(Link::Consumer(c)) => c.temporary = true,
            _ => conn.broker.delete_temporary_queue(queue.name()),
        }
        result
    }

    fn attach_consumer(&mut self, conn: &mut Connection, attach: Attach) -> Result<(), ConnError> {
        if attach.source.as_ref().is_some_and(|s| s.dynamic) {
            return self.attach_dynamic_source(conn, attach);
        }
        let address = attach.source.as_ref().and_then(|s| s.address.clone());
        let Some(address) = address else {
            return self.attach_by_subscription_name(conn, attach);
        };
        // Tenancy and authorization (a pass-through without manifests): see tenant.rs.
        let address = match conn.authorize(Operation::Recv, &address) {
            Ok(r) if r.address_type == Some(AddressType::Subscription) => {
                return self.attach_declared_subscription(conn, attach, &r.name);
            }
            Ok(resolved) => resolved.name,
            Err(refusal) => return self.refuse(conn, attach, refusal),
        };
        let client_address = attach.source.as_ref().and_then(|s| s.address.clone());
        let client_address = client_address.unwrap_or_else(|| address.clone());
        let route = conn.broker.route(&address, LinkDirection::Consume);
        if let Route::Forward(remote) = route {
            return self.attach_forwarded_consumer(conn, attach, remote);
        }
        if let Some(refused) = self.refuse_route(conn, &attach, &route, &client_address) {
            return refused;
        }
        let caps = attach
            .source
            .as_ref()
            .and_then(|s| s.capabilities.as_ref())
            .map(|c| c.0.as_slice());
        let source = attach.source.as_deref().cloned().unwrap_or_default();
        let filters = match subscribe::filters(&source) {
            Ok(f) => f,
            Err(refusal) => return self.refuse(conn, attach, refusal),
        };
        let (queue, subscription, applied) = match conn
            .broker
            .address(&address, subscribe::kind_from_capabilities(caps))
        {
            Ok(Address::Queue(q)) => {
                // A queue applies a selector per consumer (or browser); no replay start.
                let selector = match filters
                    .selector
                    .as_ref()
                    .map(|(text, _)| subscribe::parse_selector(text))
                {
                    Some(Ok(s)) => Some(s),
                    Some(Err(refusal)) => return self.refuse(conn, attach, refusal),
                    None => None,
                };
                let applied = Applied {
                    selector,
                    echo: filters.applied(false),
                };
                if source.distribution_mode == Some(DistributionMode::Copy) {
                    return self.attach_browser(conn, attach, q, applied);
                }
                (q, None, applied)
            }
            Ok(Address::Memory(m)) => {
                // At-most-once: deliveries from an in-memory address are pre-settled; no
                // filter applies.
                let mut attach = attach;
                attach.snd_settle_mode = SenderSettleMode::Settled;
                let queue = m.receiver_queue();
                return self.finish_consumer_attach(conn, attach, queue, None, Applied::default());
            }
            Ok(Address::Topic(topic)) => {
                match subscribe::subscribe(
                    &conn.broker,
                    &topic,
                    &source,
                    &conn.container_id,
                    &attach.name,
                ) {
                    // The subscription filters what it keeps; its consumers take it all.
                    Ok((sub, holder)) => {
                        let applied = Applied {
                            selector: None,
                            echo: filters.applied(true),
                        };
                        (Arc::clone(&sub.queue), Some(holder), applied)
                    }
                    Err(refusal) => return self.refuse(conn, attach, refusal),
                }
            }
            Err(e) => return self.refuse(conn, attach, e.refusal()),
        };
        self.finish_consumer_attach(conn, attach, queue, subscription, applied)
    }

    /// A receiver without a source address: qpid-jms unsubscribes by attaching to the
    /// subscription's name with no source, then closing the link (see subscribe::reattach).
    fn attach_by_subscription_name(
        &mut self,
        conn: &mut Connection,
        attach: Attach,
    ) -> Result<(), ConnError> {
        match subscribe::reattach(&conn.broker, &conn.container_id, &attach) {
            Ok((sub, holder, source)) => {
                let mut attach = attach;
                attach.source = Some(Box::new(source));
                let (queue, applied) = (Arc::clone(&sub.queue), Applied::default());
                self.finish_consumer_attach(conn, attach, queue, Some(holder), applied)
            }
            Err(refusal) => self.refuse(conn, attach, refusal),
        }
    }

    /// A receiver asking for a dynamic source (request/reply: its reply address; JMS
    /// TemporaryQueue): the broker creates a temporary queue, names it in the attach
    /// reply's source, and deletes it when the link goes away (the default lifetime,
    /// delete-on-close). Under manifests, where every address is declared, it is refused.
    fn attach_dynamic_source(
        &mut self,
        conn: &mut Connection,
        attach: Attach,
    ) -> Result<(), ConnError> {
        self.attach_temporary(
            conn,
            attach,
            "sources",
            |session, conn, mut attach, queue| {
                if let Some(source) = attach.source.as_mut() {
                    source.address = Some(queue.name().to_owned());
                }
                let queue = Arc::clone(queue);
                session.finish_consumer_attach(conn, attach, queue, None, Applied::default())
            },
        )
    }

    /// A browser (distribution-mode `copy`: proton's `Copy()`, a JMS QueueBrowser): its
    /// deliveries are pre-settled copies from a snapshot of the queue (see [`Browse`]);
    /// its outcomes, if any, are ignored, so browsing never changes the queue.
    fn attach_browser(
        &mut self,
        conn: &mut Connection,
        attach: Attach,
        queue: Arc<Queue>,
        filters: Applied,
    ) -> Result<(), ConnError> {
        let mut reply = Attach {
            snd_settle_mode: SenderSettleMode::Settled,
            max_message_size: Some(conn.broker.config().max_message_bytes),
            ..mirror(&attach)
        };
        if let Some(source) = reply.source.as_mut() {
            source.filter = filters.echo;
        }
        let snapshot = queue
            .snapshot()
            .into_iter()
            .filter(|m| {
                filters
                    .selector
                    .as_ref()
                    .is_none_or(|s| crate::broker::selector_matches(s, &m.message))
            })
            .collect();
        let link = ConsumerLink {
            queue,
            consumer: ConsumerId::next(),
            subscription: None,
            temporary: false,
            browse: Some(Box::new(Browse {
                snapshot,
                delivery_count: 0,
                credit: 0,
            })),
        };
        self.open_consumer(conn, reply, link)
    }

    /// Answers a consumer's attach with `reply` and registers `link` under its handle.
    fn open_consumer(
        &mut self,
        conn: &mut Connection,
        reply: Attach,
        link: ConsumerLink,
    ) -> Result<(), ConnError> {
        let handle = reply.handle.0;
        conn.send(self.local_channel(), &Performative::Attach(reply), &[])?;
        self.links.insert(handle, Link::Consumer(link));
        conn.broker.stats.links.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A receiver on a `subscription` address consumes the durable subscription declared
    /// under that name. It holds no [`SubscriptionRef`]: closing the link never deletes
    /// a declared subscription, only removing it from the manifests does.
    fn attach_declared_subscription(
        &mut self,
        conn: &mut Connection,
        attach: Attach,
        name: &str,
    ) -> Result<(), ConnError> {
        match conn.broker.find_durable(name) {
            Some((_, sub)) => self.finish_consumer_attach(
                conn,
                attach,
                Arc::clone(&sub.queue),
                None,
                Applied::default(),
            ),
            None => {
                let d = format!("subscription {name:?} is declared but could not be created");
                self.refuse(conn, attach, (AmqpError::InternalError.into(), d))
            }
        }
    }

    /// Answers a consumer's attach and registers it with its queue or subscription.
    fn finish_consumer_attach(
        &mut self,
        conn: &mut Connection,
        attach: Attach,
        queue: Arc<Queue>,
        subscription: Option<SubscriptionRef>,
        filters: Applied,
    ) -> Result<(), ConnError> {
        let handle = attach.handle.0;
        let presettled = attach.snd_settle_mode == SenderSettleMode::Settled;
        let mut reply = Attach {
            snd_settle_mode: if presettled {
                SenderSettleMode::Settled
            } else {
                SenderSettleMode::Unsettled
            },
            max_message_size: Some(conn.broker.config().max_message_bytes),
            offered_capabilities: subscribe::offered_capabilities(&attach),
            ..mirror(&attach)
        };
        // Our source lists the filters in force, and only those (AMQP 1.0 §3.5.3).
        if let Some(source) = reply.source.as_mut() {
            source.filter = filters.echo;
        }
        let consumer = ConsumerId::next();
        queue.add_consumer(ConsumerSpec {
            link: LinkKey {
                channel: self.remote_channel(),
                handle,
                consumer,
            },
            tx: conn.outbound_tx.clone(),
            presettled,
            unsettled_max: conn.broker.config().unsettled_per_link,
            selector: filters.selector,
        });
        let link = ConsumerLink {
            queue,
            consumer,
            temporary: false,
            browse: None,
            subscription,
        };
        self.open_consumer(conn, reply, link)
    }

    /// Refuses an attach the way the spec describes: attach back with no terminus on our
    /// side, then detach (closed) with the error.
    fn refuse(
        &mut self,
        conn: &mut Connection,
        attach: Attach,
        refusal: Refusal,
    ) -> Result<(), ConnError> {
        self.refuse_with_info(conn, attach, refusal, None)
    }

    /// Refuses `attach` when `route` says its address is not served here (redirected or
    /// detached as `errors::route_refusal` says); `None` when it is served here.
    /// `address` is the one the client attached to.
    fn refuse_route(
        &mut self,
        conn: &mut Connection,
        attach: &Attach,
        route: &Route,
        address: &str,
    ) -> Option<Result<(), ConnError>> {
        let (condition, description, info) =
            super::errors::route_refusal(route, address, conn.tls)?;
        let refused = self.refuse_with_info(conn, attach.clone(), (condition, description), info);
        Some(refused)
    }

    fn refuse_with_info(
        &mut self,
        conn: &mut Connection,
        attach: Attach,
        (condition, description): Refusal,
        info: Option<fe2o3_amqp_types::definitions::Fields>,
    ) -> Result<(), ConnError> {
        tracing::info!(link = %attach.name, condition = %super::condition_name(&condition), %description, "attach refused");
        let handle = attach.handle.0;
        // No terminus on our side: the source when we would have sent, else the target.
        let reply = match attach.role {
            Role::Sender => Attach {
                target: None,
                ..mirror(&attach)
            },
            Role::Receiver => Attach {
                source: None,
                ..mirror(&attach)
            },
        };
        conn.send(self.local_channel(), &Performative::Attach(reply), &[])?;
        self.links.insert(handle, Link::Detached);
        let detach = Detach {
            handle: handle.into(),
            closed: true,
            error: Some(AmqpErrorBody::new(condition, description, info)),
        };
        conn.send(self.local_channel(), &Performative::Detach(detach), &[])
    }

    /// Marks the link detached by us and sends `detach(closed, error)`; frames for it are
    /// ignored until the peer's detach arrives.
    fn send_closing_detach(
        &mut self,
        conn: &mut Connection,
        handle: u32,
        condition: ErrorCondition,
        description: String,
    ) -> Result<(), ConnError> {
        self.links.insert(handle, Link::Detached);
        let detach = Detach {
            handle: handle.into(),
            closed: true,
            error: Some(AmqpErrorBody::new(condition, description, None)),
        };
        conn.send(self.local_channel(), &Performative::Detach(detach), &[])
    }

    /// Detaches a link with an error of ours; the link ignores frames until the peer's
    /// detach arrives.
    pub(super) fn detach_with_error(
        &mut self,
        conn: &mut Connection,
        handle: u32,
        condition: ErrorCondition,
        description: String,
    ) -> Result<(), ConnError> {
        tracing::info!(handle, condition = %super::condition_name(&condition), %description, "detaching link");
        self.forget_link(conn, handle, false);
        self.send_closing_detach(conn, handle, condition, description)
    }

    pub(super) fn on_detach(
        &mut self,
        conn: &mut Connection,
        detach: Detach,
    ) -> Result<(), ConnError> {
        let handle = detach.handle.0;
        let Some(link) = self.links.get(&handle) else {
            // Nothing to tear down, so nothing to fight over: some clients (fe2o3-amqp
            // 0.18) answer a refused attach's detach twice. Ending the connection for
            // that would turn a refused attach into a lost connection.
            tracing::debug!(handle, "ignoring detach of unattached handle");
            return Ok(());
        };
        let we_detached = matches!(link, Link::Detached);
        self.forget_link(conn, handle, detach.closed);
        if we_detached {
            return Ok(());
        }
        let reply = Detach {
            handle: detach.handle,
            closed: detach.closed,
            error: None,
        };
        conn.send(self.local_channel(), &Performative::Detach(reply), &[])
    }

    /// A transfer frame on a producer link: whole messages are stored at once, the frames
    /// of a multi-frame delivery are held (bounded, see [`Partial`]) until the last.
    pub(super) fn on_transfer(
        &mut self,
        conn: &mut Connection,
        t: Transfer,
        payload: Bytes,
    ) -> Result<(), ConnError> {
        let handle = t.handle.0;
        let max = conn.broker.config().max_message_bytes;
        let link = match self.links.get_mut(&handle) {
            Some(Link::Producer(p)) => p,
            Some(Link::Detached) => return Ok(()),
            Some(Link::Consumer(_)) => {
                return Err(ConnError::protocol(
                    AmqpError::NotAllowed,
                    format!("transfer on handle {handle}, where the broker is the sender"),
                ));
            }
            None => {
                return Err(ConnError::session(
                    SessionError::UnattachedHandle,
                    format!("transfer on unattached handle {handle}"),
                ))
            }
        };
        if t.aborted {
            link.partial = None;
            return Ok(());
        }
        if let Some(tag) = t
            .delivery_tag
            .as_ref()
            .filter(|t| t.len() > MAX_DELIVERY_TAG_BYTES)
        {
            let d = format!(
                "delivery-tag of {} bytes exceeds MAX_DELIVERY_TAG_BYTES ({MAX_DELIVERY_TAG_BYTES}, AMQP 1.0 §2.8.7)",
                tag.len()
            );
            return self.detach_with_error(conn, handle, AmqpError::InvalidField.into(), d);
        }
        let settled = t.settled.unwrap_or(false);
        let message = match (link.partial.as_mut(), t.more) {
            (None, false) => payload,
            (None, true) => return self.start_partial(conn, t, payload),
            (Some(p), more) => {
                if more {
                    if let Err(refused) = p.charge.grow(payload.len()) {
                        return self.intake_refused(conn, t, payload, refused);
                    }
                }
                p.len += payload.len() as u64;
                if !payload.is_empty() {
                    // The last frame is stored at once: no need to copy it out.
                    p.chunks.push(match more {
                        true => Bytes::copy_from_slice(&payload),
                        false => payload,
                    });
                }
                p.settled |= settled;
                if more {
                    return self.check_size(conn, handle, max);
                }
                match link.partial.take() {
                    Some(p) => {
                        let id = p.delivery_id.or(t.delivery_id);
                        let txn = p
                            .txn
                            .or_else(|| super::txn::txn_of_transfer(t.state.as_ref()));
                        return self.receive(conn, handle, id, p.settled, &p.chunks, txn);
                    }
                    None => return Ok(()),
                }
            }
        };
        let txn = super::txn::txn_of_transfer(t.state.as_ref());
        self.receive(
            conn,
            handle,
            t.delivery_id,
            settled,
            std::slice::from_ref(&message),
            txn,
        )
    }

    /// A producer sent a delivery without link credit: its link is detached.
    fn refuse_without_credit(
        &mut self,
        conn: &mut Connection,
        handle: u32,
    ) -> Result<(), ConnError> {
        self.detach_with_error(
            conn,
            handle,
            LinkError::TransferLimitExceeded.into(),
            "transfer without link credit".into(),
        )
    }

    /// The first frame of a multi-frame delivery on a producer link: held, and charged to
    /// the incomplete-delivery budgets, until the last frame.
    fn start_partial(
        &mut self,
        conn: &mut Connection,
        t: Transfer,
        payload: Bytes,
    ) -> Result<(), ConnError> {
        let handle = t.handle.0;
        let max = conn.broker.config().max_message_bytes;
        let Some(Link::Producer(link)) = self.links.get_mut(&handle) else {
            return Ok(());
        };
        if link.credit == 0 {
            return self.refuse_without_credit(conn, handle);
        }
        let mut charge = Charge::new(Arc::clone(&conn.broker.intake), Arc::clone(&conn.intake));
        if let Err(refused) = charge.grow(payload.len()) {
            return self.intake_refused(conn, t, payload, refused);
        }
        link.partial = Some(Partial {
            delivery_id: t.delivery_id,
            settled: t.settled.unwrap_or(false),
            len: payload.len() as u64,
            chunks: vec![Bytes::copy_from_slice(&payload)],
            charge,
            txn: super::txn::txn_of_transfer(t.state.as_ref()),
        });
        self.check_size(conn, handle, max)
    }

    /// Grants credit again to producer links whose target is no longer blocked; returns
    /// whether any link is still held back.
    pub(super) fn release_withheld(&mut self, conn: &mut Connection) -> Result<bool, ConnError> {
        let credit = conn.broker.config().link_credit;
        let mut grants = Vec::new();
        let mut still = false;
        for (&handle, link) in self.links.iter_mut() {
            let Link::Producer(p) = link else { continue };
            if !p.withheld {
                continue;
            }
            let want = credit_for(credit, p.room());
            if want > p.credit {
                p.withheld = false;
                p.credit = want;
                grants.push((handle, p.delivery_count, want));
            } else if p.credit == 0 {
                still = true;
            } else {
                // It can still send; its next transfer tops its credit up again.
                p.withheld = false;
            }
        }
        for (handle, dc, c) in grants {
            self.send_flow(conn, Some((handle, dc, Some(c), false)))?;
        }
        Ok(still)
    }

    /// A frame of an incomplete delivery did not fit its budget. Over the connection's
    /// own share: the link is detached with `amqp:resource-limit-exceeded` naming the
    /// limit. Over the broker-wide budget: the frame is parked and the connection stops
    /// reading its socket until room frees up (backpressure); once it has waited
    /// [`INCOMPLETE_BUDGET_WAIT`], the link is refused the same way.
    fn intake_refused(
        &mut self,
        conn: &mut Connection,
        t: Transfer,
        payload: Bytes,
        refused: IntakeRefused,
    ) -> Result<(), ConnError> {
        let handle = t.handle.0;
        let waited = conn.park_since.map(|since| since.elapsed());
        match refused {
            IntakeRefused::Broker { .. } if waited.is_none_or(|w| w < INCOMPLETE_BUDGET_WAIT) => {
                conn.parked = Some(Parked {
                    channel: self.remote_channel(),
                    transfer: t,
                    payload,
                    since: conn.park_since.unwrap_or_else(Instant::now),
                });
                Ok(())
            }
            _ => {
                conn.broker.intake.count_refusal();
                let description = match waited {
                    Some(w) => format!("{refused} (waited {} ms for room)", w.as_millis()),
                    None => refused.to_string(),
                };
                self.detach_with_error(conn, handle, refused.condition(), description)
            }
        }
    }

    fn check_size(
        &mut self,
        conn: &mut Connection,
        handle: u32,
        max: u64,
    ) -> Result<(), ConnError> {
        let size = match self.links.get(&handle) {
            Some(Link::Producer(ProducerLink {
                partial: Some(p), ..
            })) => p.len,
            _ => 0,
        };
        if size > max {
            return self.detach_with_error(
                conn,
                handle,
                LinkError::MessageSizeExceeded.into(),
                format!("message exceeds max-message-size of {max} bytes"),
            );
        }
        Ok(())
    }

    /// A whole message arrived: validate, store, and queue the acceptance for when it is
    /// durable (or, with `txn`, stage it in its transaction).
    fn receive(
        &mut self,
        conn: &mut Connection,
        handle: u32,
        delivery_id: Option<u32>,
        settled: bool,
        chunks: &[Bytes],
        txn: Option<fe2o3_amqp_types::primitives::Binary>,
    ) -> Result<(), ConnError> {
        let max = conn.broker.config().max_message_bytes;
        let size = chunks_len(chunks);
        let Some(Link::Producer(link)) = self.links.get_mut(&handle) else {
            return Ok(());
        };
        if link.credit == 0 {
            return self.refuse_without_credit(conn, handle);
        }
        link.credit -= 1;
        link.delivery_count = link.delivery_count.wrapping_add(1);
        let link_target = link.target.clone();
        let txn_coordinator = link.txn_coordinator;
        let forwarded = link.forward.is_some();
        if size > max {
            return self.detach_with_error(
                conn,
                handle,
                LinkError::MessageSizeExceeded.into(),
                format!("message exceeds max-message-size of {max} bytes"),
            );
        }
        if txn_coordinator {
            self.top_up_credit(conn, handle)?;
            return self.on_txn_control(conn, handle, delivery_id, chunks);
        }
        if conn.broker.config().sink {
            // `serve --sink`, for benchmarks only: accepted at once, dropped, never stored.
            self.top_up_credit(conn, handle)?;
            return match (settled, delivery_id) {
                (false, Some(id)) => self.send_accepted(conn, id, id),
                _ => Ok(()),
            };
        }
        let incoming = Incoming {
            handle,
            delivery_id,
            settled,
            chunks,
        };
        if forwarded {
            return self.forward_message(conn, &incoming, txn.is_some());
        }
        let Some((target, reservation)) =
            self.admit_message(conn, &incoming, txn.as_ref(), link_target)?
        else {
            return Ok(());
        };
        if let Some(store) = target.address_store() {
            let in_txn = txn.is_some();
            return self.store_in_address(conn, &incoming, in_txn, target, store, reservation);
        }
        if let Some(txn_id) = txn {
            return self.stage_txn_message(
                conn,
                handle,
                &txn_id,
                delivery_id,
                settled,
                target,
                reservation,
                chunks,
            );
        }
        if let Address::Memory(m) = &target {
            return self.route_in_memory(conn, &m.clone(), delivery_id, settled, chunks);
        }
        self.store_message(conn, &incoming, target, reservation)
    }

    /// Where a whole message goes (the link's target, or its `to` on the anonymous relay)
    /// and the room its plan reserved for it; `None` when it alone was refused (the
    /// refusal is sent, the link stays). Credit is topped up either way.
    fn admit_message(
        &mut self,
        conn: &mut Connection,
        incoming: &Incoming<'_>,
        txn: Option<&fe2o3_amqp_types::primitives::Binary>,
        link_target: Option<Address>,
    ) -> Result<Option<(Address, Option<Reservation>)>, ConnError> {
        let Incoming {
            handle,
            delivery_id,
            settled,
            chunks,
        } = *incoming;
        let target = match link_target {
            Some(target) => Ok(target),
            None => relay_target(conn, chunks),
        };
        // The plan's limits: room is taken before the message is stored, so the credit
        // granted next already counts it.
        let admitted = target.and_then(|target| match target.admit(chunks_len(chunks)) {
            Ok(reservation) => Ok((target, reservation)),
            Err(e) => {
                tracing::debug!(address = target.name(), reason = %e, "message refused by its plan");
                Err(e.refusal())
            }
        });
        self.top_up_credit(conn, handle)?;
        match admitted {
            Ok(admitted) => Ok(Some(admitted)),
            Err((condition, description)) => {
                // One message's address or room is wrong, not the link: it alone is refused.
                conn.txns.refused_in_txn(txn, &description);
                self.refuse_message(conn, handle, delivery_id, settled, condition, description)?;
                Ok(None)
            }
        }
    }

    /// Appends a whole message to the store and queues its acceptance for when the group
    /// commit makes it durable; a message the store refuses, or that does not parse where
    /// it now lives, is rejected (and a malformed one dropped from the log again).
    fn store_message(
        &mut self,
        conn: &mut Connection,
        incoming: &Incoming<'_>,
        target: Address,
        reservation: Option<Reservation>,
    ) -> Result<(), ConnError> {
        let Incoming {
            delivery_id,
            settled,
            chunks,
            ..
        } = *incoming;
        // A message that came in one transfer (the common case) needs no list of parts
        // on the heap: one allocation per produced message less (issue 15).
        let one: [&[u8]; 1];
        let many: Vec<&[u8]>;
        let parts: &[&[u8]] = match chunks {
            [chunk] => {
                one = [&chunk[..]];
                &one
            }
            _ => {
                many = chunks.iter().map(|c| &c[..]).collect();
                &many
            }
        };
        let stored = conn.broker.store().append(target.name(), parts);
        let (appended, offset, ts, view) = match stored {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(address = target.name(), error = %e, "store refused a message");
                return self.reject(
                    conn,
                    delivery_id,
                    settled,
                    e.condition(),
                    format!("message not stored: {e}"),
                );
            }
        };
        // Validated where it now lives, in one piece: a malformed message is dropped
        // from the log again (marked consumed) and rejected.
        let parsed = match MessageView::parse(view) {
            Ok(parsed) => parsed,
            Err(e) => {
                if let Err(err) = conn.broker.store().ack(&[offset]) {
                    tracing::warn!(offset, error = %err, "could not drop a malformed message");
                }
                return self.reject(
                    conn,
                    delivery_id,
                    settled,
                    AmqpError::DecodeError.into(),
                    format!("malformed message: {e}"),
                );
            }
        };
        let msg = crate::broker::queued_view(offset, &parsed, ts);
        let ack = match (settled, delivery_id) {
            (false, Some(id)) => Some((self.remote_channel(), id)),
            _ => None,
        };
        conn.pending.push_back(PendingProduce {
            link: None,
            durable: appended.durable,
            target,
            msg,
            stored_at_ms: ts,
            read_at: conn.last_read,
            ack,
            reservation,
            committed: None,
        });
        Ok(())
    }

    /// Grants a producer credit again once half is used, as far as its target has room;
    /// marks the link withheld (re-checked periodically) when the target has none.
    fn top_up_credit(&mut self, conn: &mut Connection, handle: u32) -> Result<(), ConnError> {
        let refill = conn.broker.config().link_credit;
        let Some(Link::Producer(link)) = self.links.get_mut(&handle) else {
            return Ok(());
        };
        if link.credit >= refill / 2 {
            // Most transfers: no refill due, so the target's room (which looks at every
            // subscription of a topic) is not computed on the hot path.
            link.withheld = false;
            return Ok(());
        }
        let want = credit_for(refill, link.room());
        let grant = (link.credit < refill / 2 && want > link.credit).then(|| {
            link.credit = want;
            (link.delivery_count, want)
        });
        link.withheld = link.credit < refill / 2 && grant.is_none();
        conn.withheld_links |= link.withheld;
        match grant {
            Some((dc, credit)) => self.send_flow(conn, Some((handle, dc, Some(credit), false))),
            None => Ok(()),
        }
    }

    /// Refuses one message with `condition`: a `rejected` outcome, or — for a pre-settled
    /// transfer, which has no outcome to carry it — a detach, so it is never lost silently.
    fn refuse_message(
        &mut self,
        conn: &mut Connection,
        handle: u32,
        delivery_id: Option<u32>,
        settled: bool,
        condition: ErrorCondition,
        description: String,
    ) -> Result<(), ConnError> {
        match (settled, delivery_id) {
            (false, Some(_)) => self.reject(conn, delivery_id, settled, condition, description),
            _ => self.detach_with_error(conn, handle, condition, description),
        }
    }

    /// An in-memory address: validate, hand to the receivers now, and settle with the
    /// producer at once — `accepted` if a receiver got it, `released` if none was there.
    fn route_in_memory(
        &mut self,
        conn: &mut Connection,
        address: &Arc<MemoryAddress>,
        delivery_id: Option<u32>,
        settled: bool,
        chunks: &[Bytes],
    ) -> Result<(), ConnError> {
        let message = match chunks {
            [one] => one.clone(),
            many => Bytes::from(many.concat()),
        };
        if let Err(e) = MessageView::parse(message.clone()) {
            let d = format!("malformed message: {e}");
            return self.reject(conn, delivery_id, settled, AmqpError::DecodeError.into(), d);
        }
        let routed = address.route(&conn.broker, message, settled);
        let (false, Some(id)) = (settled, delivery_id) else {
            return Ok(());
        };
        match routed {
            Routed::Delivered(_) => self.send_accepted(conn, id, id),
            Routed::NoReceiver => {
                let d = Disposition {
                    role: Role::Receiver,
                    first: id,
                    last: None,
                    settled: true,
                    state: Some(DeliveryState::Released(Released {})),
                    batchable: false,
                };
                conn.send(self.local_channel(), &Performative::Disposition(d), &[])
            }
        }
    }

    fn reject(
        &mut self,
        conn: &mut Connection,
        delivery_id: Option<u32>,
        settled: bool,
        condition: ErrorCondition,
        description: String,
    ) -> Result<(), ConnError> {
        let (false, Some(id)) = (settled, delivery_id) else {
            return Ok(());
        };
        let d = Disposition {
            role: Role::Receiver,
            first: id,
            last: None,
            settled: true,
            state: Some(DeliveryState::Rejected(Rejected {
                error: Some(AmqpErrorBody::new(condition, description, None)),
            })),
            batchable: false,
        };
        conn.send(self.local_channel(), &Performative::Disposition(d), &[])
    }
}

/// `amqp:connection:framing-error` for handles beyond handle-max.
struct ConnectionErrorOrFraming;
impl ConnectionErrorOrFraming {
    fn framing() -> ErrorCondition {
        fe2o3_amqp_types::definitions::ConnectionError::FramingError.into()
    }
}
