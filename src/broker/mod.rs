//! The broker core, behind the connections: the store, and the queues, topics, in-memory
//! addresses and durable subscriptions by address; dead-lettering and expiry.
//!
//! Connections call in here to resolve an address, to store a message and to move a
//! message elsewhere (dead-letter, expiry).
//!
//! Invariants: a message enters a queue only once the store made it durable; an existing
//! address keeps its kind (queue, topic, in-memory); auto-creation stops at
//! `max-auto-created-addresses`; a moved message's copy is durable before its original
//! is acknowledged.
//!
//! Does not: own a socket or AMQP framing, choose an AMQP error condition (its errors are
//! typed, [`BrokerError`] and [`AddressError`]; `connection/errors.rs` maps them), read
//! manifests (the manifest layer declares addresses through [`Declaration`]), or name
//! anything above it (`tests/architecture.rs`).

mod declare;
mod error;
pub mod intake;
pub use declare::{internal_name, Declaration, DeclarationStats, DeclaredType};
pub use error::BrokerError;
pub mod forwarding;
pub mod latency;
pub mod lease;
pub mod limits;
pub mod memory;
pub mod queue;
pub mod replication;
pub mod routing;
pub mod selector;
pub mod store;
pub mod subscriptions;
pub mod topic;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::primitives::{Symbol, Value};

use crate::amqp::message::MessageView;
use crate::config::BrokerConfig;
use limits::{AddressLimits, LimitExceeded, Reservation, SpaceUsage};
use memory::MemoryAddress;
use queue::{Diversion, Queue, QueuedMessage};
use store::Store;
use topic::{Topic, TopicRetention};

/// How often housekeeping runs (segment reclaim, expiry sweep).
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(500);

/// Why an address could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    #[error("address {0:?} does not exist")]
    NotFound(String),
    #[error("address must not be empty")]
    Empty,
    #[error("address of {0} bytes is too long")]
    TooLong(usize),
    #[error("address {name:?} not created: the broker holds max-auto-created-addresses ({limit}) queues and topics")]
    TooMany { name: String, limit: usize },
}

/// Connection and link gauges for metrics.
#[derive(Debug, Default)]
pub struct BrokerStats {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub links: AtomicU64,
    pub connection_errors: AtomicU64,
    /// What the applies of declaration sets (manifests) did here, for metrics and status.
    pub declarations: DeclarationStats,
    /// From the socket read that brought a producer's transfer to the encoding of its
    /// `accepted` (the group commit plus the connection's wake-up): the broker's share of
    /// a client's produce→accepted latency.
    pub produce_accept: latency::LatencyHistogram,
}

pub struct Broker {
    me: Weak<Broker>,
    config: BrokerConfig,
    store: Store,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Anycast and multicast addresses (declared by manifests only; never stored).
    memory: RwLock<HashMap<String, Arc<MemoryAddress>>>,
    /// Stored bytes per address space, against its plan (see `limits`).
    spaces: RwLock<HashMap<String, Arc<SpaceUsage>>>,
    subscriptions: subscriptions::Registry,
    pub stats: BrokerStats,
    /// Bytes of multi-frame deliveries still arriving, broker-wide (`max-incomplete-bytes`).
    pub intake: Arc<intake::IncompleteBudget>,
    /// Why this broker's connections are closed, when it is for another reason than the
    /// process shutting down (a cluster node that stops leading): what clients are told.
    close_reason: std::sync::OnceLock<String>,
    /// A clustered leader's delivery lease: its connections write to their sockets only
    /// while it holds (see [`lease`]); unset on a single node, which never waits.
    delivery_lease: std::sync::OnceLock<Arc<lease::DeliveryLease>>,
    /// Where each address is served, in a cluster whose addresses are led by different
    /// nodes (see [`routing`]); unset: every address is served here.
    router: std::sync::OnceLock<Arc<dyn routing::AddressRouter>>,
}

/// What clients are told when their connection closes because the broker shuts down.
pub const SHUTDOWN_DESCRIPTION: &str = "broker is shutting down";

/// What kind of address a name is, or should be created as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressKind {
    Queue,
    Topic,
}

/// A resolved address.
#[derive(Debug, Clone)]
pub enum Address {
    Queue(Arc<Queue>),
    Topic(Arc<Topic>),
    /// Anycast or multicast: in memory, at-most-once (see [`memory`]).
    Memory(Arc<MemoryAddress>),
}

impl Address {
    pub fn name(&self) -> &str {
        match self {
            Address::Queue(q) => q.name(),
            Address::Topic(t) => t.name(),
            Address::Memory(m) => m.name(),
        }
    }

    /// True while producers to this address must get no new credit.
    pub fn is_blocked(&self) -> bool {
        self.room() == Some(0)
    }

    /// How many more messages producers may be granted credit for; `None`: no limit.
    pub fn room(&self) -> Option<u64> {
        match self {
            Address::Queue(q) => q.room(),
            Address::Topic(t) => t.room(),
            Address::Memory(m) => m.room(),
        }
    }

    pub fn limits(&self) -> AddressLimits {
        match self {
            Address::Queue(q) => q.limits(),
            Address::Topic(t) => t.limits(),
            Address::Memory(m) => m.limits(),
        }
    }

    /// Checks a message of `size` bytes against the address's plan and takes room for
    /// it until it is durable and enqueued (queues; a topic only checks its space).
    pub fn admit(&self, size: u64) -> Result<Option<Reservation>, LimitExceeded> {
        if let Some(max) = self.limits().message_bytes_max.filter(|&m| size > m) {
            return Err(LimitExceeded::MessageSize {
                address: self.name().to_owned(),
                size,
                max,
            });
        }
        match self {
            Address::Queue(q) => q.reserve(size),
            Address::Topic(t) => match t.space() {
                Some(space) if !space.fits(size) => Err(LimitExceeded::SpaceBytes {
                    space: space.name.clone(),
                    bytes: size,
                    max: space.bytes_max().unwrap_or(0),
                }),
                _ => Ok(None),
            },
            Address::Memory(_) => Ok(None),
        }
    }

    /// The address's own store, when it has one (a clustered address's group): its
    /// messages go there instead of into the shared store.
    pub fn address_store(&self) -> Option<Arc<dyn store::AddressStore>> {
        match self {
            Address::Queue(q) => q.address_store().cloned(),
            _ => None,
        }
    }

    /// Hands a durable message to the queue, or fans it out on the topic.
    pub fn accept(&self, broker: &Broker, msg: QueuedMessage, stored_at_ms: i64) {
        match self {
            Address::Queue(q) => q.enqueue(broker, msg),
            Address::Topic(t) => t.publish(broker, msg, stored_at_ms),
            // Never pending: the connection routes in-memory messages on arrival.
            Address::Memory(m) => drop(m.route(broker, msg.message, true)),
        }
    }
}

/// True if the stored message `bytes` matches the selector (a message that does not parse
/// matches nothing).
pub fn selector_matches(selector: &selector::Selector, bytes: &bytes::Bytes) -> bool {
    let Ok(view) = MessageView::parse(bytes.clone()) else {
        return false;
    };
    let header = view.header().ok().flatten();
    let properties = view.properties().ok().flatten();
    let app = view.application_properties().ok().flatten();
    let fields = selector::MessageFields {
        header: header.as_ref(),
        properties: properties.as_ref(),
        app: app.as_ref(),
    };
    selector.matches(&fields)
}

impl Broker {
    /// Opens the store and rebuilds every queue from it.
    pub fn open(config: BrokerConfig) -> Result<Arc<Broker>, BrokerError> {
        let sync = config.sync;
        let record_max = (config.max_message_bytes + config::RECORD_OVERHEAD_BYTES)
            .min(u64::from(u32::MAX)) as u32;
        let store = Store::open(&config.data_dir, sync, config.segment_bytes, record_max)?;
        Broker::with_store(config, store)
    }

    /// The record size limit the store is opened with for `config`.
    pub fn record_bytes_max(config: &BrokerConfig) -> u32 {
        (config.max_message_bytes + config::RECORD_OVERHEAD_BYTES).min(u64::from(u32::MAX)) as u32
    }

    /// Rebuilds every queue from an open store (a cluster node's, when it becomes leader).
    pub fn with_store(config: BrokerConfig, store: Store) -> Result<Arc<Broker>, BrokerError> {
        let intake = Arc::new(intake::IncompleteBudget::new(config.max_incomplete_bytes));
        let broker = Arc::new_cyclic(|me| Broker {
            me: me.clone(),
            config,
            store,
            queues: RwLock::new(HashMap::new()),
            topics: RwLock::new(HashMap::new()),
            memory: RwLock::new(HashMap::new()),
            spaces: RwLock::new(HashMap::new()),
            subscriptions: subscriptions::Registry::default(),
            stats: BrokerStats::default(),
            intake,
            close_reason: std::sync::OnceLock::new(),
            delivery_lease: std::sync::OnceLock::new(),
            router: std::sync::OnceLock::new(),
        });
        broker.recover()?;
        Ok(broker)
    }

    /// Records why this broker's connections are about to be closed (the first reason
    /// given stays); without one they are told [`SHUTDOWN_DESCRIPTION`].
    pub fn closing_because(&self, reason: &str) {
        let _ = self.close_reason.set(reason.to_owned());
    }

    /// Why this broker's connections are being closed, once [`Self::closing_because`]
    /// was called (a clustered leader stepping down); `None` otherwise.
    pub fn closing(&self) -> Option<&str> {
        self.close_reason.get().map(String::as_str)
    }

    /// Asks `router` where each address is served from now on (the first router given
    /// stays); set before the broker serves its first client.
    pub fn route_by(&self, router: Arc<dyn routing::AddressRouter>) {
        let _ = self.router.set(router);
    }

    /// Where `address` is served ([`routing::Route::Here`] without a router).
    pub fn route(&self, address: &str, direction: routing::LinkDirection) -> routing::Route {
        match self.router.get() {
            Some(r) => r.route(address, self.config.auto_create, direction),
            None => routing::Route::Here,
        }
    }

    /// Makes this broker deliver only while `lease` holds (a clustered leader, before it
    /// serves its first client); the first lease given stays.
    pub fn deliver_under(&self, lease: Arc<lease::DeliveryLease>) {
        let _ = self.delivery_lease.set(lease);
    }

    /// The delivery lease this broker's connections wait for; `None` on a single node.
    pub fn delivery_lease(&self) -> Option<&Arc<lease::DeliveryLease>> {
        self.delivery_lease.get()
    }

    /// What a connection closed by this broker's shutdown signal tells its client.
    pub fn close_description(&self) -> &str {
        self.close_reason
            .get()
            .map_or(SHUTDOWN_DESCRIPTION, String::as_str)
    }

    fn recover(&self) -> Result<(), BrokerError> {
        self.recover_subscriptions()?;
        let stored = self.store.recover()?;
        let count = stored.len();
        let mut by_queue: HashMap<String, Vec<QueuedMessage>> = HashMap::new();
        let mut temporary = Vec::new();
        for m in stored {
            if is_temporary(&m.address) {
                // Its link is gone with the process: what it held is dropped.
                temporary.push(m.offset);
                continue;
            }
            let msg = queued(m.offset, m.message, m.timestamp_ms);
            if self.kind_of(&m.address, None) == AddressKind::Topic {
                self.topic_or_create(&m.address)
                    .recover(self, msg, m.timestamp_ms);
                continue;
            }
            let mut msg = msg;
            // Failed deliveries before the restart still count (the header holds only
            // the count the producer sent).
            let failed = self
                .store
                .delivery_count(entrepot_storage::DEFAULT_GROUP, m.offset);
            msg.delivery_count = msg.delivery_count.max(failed);
            by_queue.entry(m.address).or_default().push(msg);
        }
        let queues = by_queue.len();
        for (address, msgs) in by_queue {
            let q = self.queue_or_create(&address);
            q.stats
                .enqueued
                .fetch_add(msgs.len() as u64, Ordering::Relaxed);
            q.enqueue_all(self, msgs);
        }
        if !temporary.is_empty() {
            self.store.ack(&temporary)?;
            tracing::info!(
                messages = temporary.len(),
                "dropped the messages of temporary queues"
            );
        }
        tracing::info!(messages = count, queues, "recovered store");
        Ok(())
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The kind of `name`: an existing address keeps its kind; otherwise the link's
    /// capability decides, then the configured topic prefixes, then queue.
    pub fn kind_of(&self, name: &str, capability: Option<AddressKind>) -> AddressKind {
        if self.topics.read().is_ok_and(|t| t.contains_key(name)) {
            return AddressKind::Topic;
        }
        if self.queues.read().is_ok_and(|q| q.contains_key(name)) {
            return AddressKind::Queue;
        }
        if let Some(kind) = capability {
            return kind;
        }
        match self
            .config
            .topic_prefixes
            .iter()
            .any(|p| name.starts_with(p.as_str()))
        {
            true => AddressKind::Topic,
            false => AddressKind::Queue,
        }
    }

    /// Resolves `name` to a queue or topic, creating it when `auto-create` is on.
    pub fn address(
        &self,
        name: &str,
        capability: Option<AddressKind>,
    ) -> Result<Address, AddressError> {
        if let Some(m) = self.memory.read().ok().and_then(|m| m.get(name).cloned()) {
            return Ok(Address::Memory(m));
        }
        match self.kind_of(name, capability) {
            AddressKind::Queue => self.queue(name).map(Address::Queue),
            AddressKind::Topic => {
                check_name(name)?;
                if let Some(t) = self.topics.read().ok().and_then(|t| t.get(name).cloned()) {
                    return Ok(Address::Topic(t));
                }
                if !self.config.auto_create {
                    return Err(AddressError::NotFound(name.to_owned()));
                }
                self.room_to_auto_create(name)?;
                Ok(Address::Topic(self.topic_or_create(name)))
            }
        }
    }

    pub(crate) fn topic_or_create(&self, name: &str) -> Arc<Topic> {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let retention = TopicRetention {
            bytes_max: self.config.topic_retention_bytes,
            age_max: self.config.topic_retention_secs.map(Duration::from_secs),
        };
        let backlog = self.config.subscription_backlog_max;
        Arc::clone(topics.entry(name.to_owned()).or_insert_with(|| {
            tracing::debug!(topic = name, "topic created");
            Arc::new(Topic::new(
                name.to_owned(),
                retention,
                backlog,
                self.config.subscription_backlog_policy,
            ))
        }))
    }

    /// Every topic, for metrics and housekeeping.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.topics
            .read()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every queue, for metrics.
    pub fn queues(&self) -> Vec<Arc<Queue>> {
        self.queues
            .read()
            .map(|q| q.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The queue this broker serves under `address`, if any: never creates one (a node
    /// answering a peer's forwarded messages must not auto-create a local queue under a
    /// clustered name — it would hold the name against the group's own queue).
    pub fn existing_queue(&self, address: &str) -> Option<Arc<Queue>> {
        self.queues
            .read()
            .ok()
            .and_then(|q| q.get(address).cloned())
    }

    /// The queue at `address`; created when `auto-create` is on.
    pub fn queue(&self, address: &str) -> Result<Arc<Queue>, AddressError> {
        check_name(address)?;
        if let Some(q) = self
            .queues
            .read()
            .ok()
            .and_then(|q| q.get(address).cloned())
        {
            return Ok(q);
        }
        // A temporary queue exists only while its link does; nobody creates one by name.
        if !self.config.auto_create || is_temporary(address) {
            return Err(AddressError::NotFound(address.to_owned()));
        }
        self.room_to_auto_create(address)?;
        Ok(self.queue_or_create(address))
    }

    /// A new temporary queue (a dynamic source or target, AMQP 1.0 §3.5.3): a unique,
    /// unguessable name under [`TEMPORARY_PREFIX`], counted against
    /// `max-auto-created-addresses`, whether or not auto-create is on.
    pub fn create_temporary_queue(&self) -> Result<Arc<Queue>, AddressError> {
        let mut id = [0u8; 12];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| AddressError::Empty)?;
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("{TEMPORARY_PREFIX}{hex}");
        self.room_to_auto_create(&name)?;
        tracing::debug!(address = %name, "temporary queue created");
        Ok(self.queue_or_create(&name))
    }

    /// Deletes a temporary queue (its link went away): it is forgotten, and whatever it
    /// still held is acknowledged, so its records are reclaimed.
    pub fn delete_temporary_queue(&self, name: &str) {
        if !is_temporary(name) {
            return;
        }
        let removed = self
            .queues
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let Some(queue) = removed else { return };
        let held = queue.held_offsets();
        if !held.is_empty() {
            if let Err(e) = self.store.ack(&held) {
                tracing::warn!(address = name, error = %e, "temporary queue's messages not dropped; they go at the next start");
            }
        }
        tracing::debug!(
            address = name,
            dropped = held.len(),
            "temporary queue deleted"
        );
    }

    /// Auto-creation stops at `max-auto-created-addresses` queues and topics: a client
    /// attaching to ever new names cannot grow the broker (and /metrics) without bound.
    fn room_to_auto_create(&self, name: &str) -> Result<(), AddressError> {
        let held =
            self.queues.read().map_or(0, |q| q.len()) + self.topics.read().map_or(0, |t| t.len());
        let limit = self.config.max_auto_created_addresses;
        if held >= limit {
            return Err(AddressError::TooMany {
                name: name.to_owned(),
                limit,
            });
        }
        Ok(())
    }

    /// Serves `queue` at its name — a queue built over its own store (a clustered
    /// address's group, `queue::QueueOwner::Group`) — unless a queue of that name exists:
    /// then that one is kept and returned.
    ///
    /// A queue retired by [`Broker::retire_adopted`] is replaced (a new leadership of
    /// the same address serves a new queue).
    pub fn adopt_queue(&self, queue: Queue) -> Arc<Queue> {
        let mut queues = self.queues.write().unwrap_or_else(|p| p.into_inner());
        let name = queue.name().to_owned();
        match queues.get(&name) {
            Some(q) if !q.is_retired() => Arc::clone(q),
            _ => {
                let q = Arc::new(queue);
                queues.insert(name, Arc::clone(&q));
                q
            }
        }
    }

    /// Stops serving `queue`, adopted earlier ([`Broker::adopt_queue`]), here: it is
    /// retired ([`Queue::retire`]: its consumers are detached with `why`, later attaches
    /// too) and stays in place as a tombstone until a new leadership adopts a queue of
    /// that name — so the name is not taken meanwhile by an auto-created local queue. A
    /// producer's next message to it is refused by its store (closed). False when the
    /// broker serves another queue under that name (nothing is done then).
    pub fn retire_adopted(&self, queue: &Arc<Queue>, why: &str) -> bool {
        let queues = self.queues.read().unwrap_or_else(|p| p.into_inner());
        if !queues
            .get(queue.name())
            .is_some_and(|q| Arc::ptr_eq(q, queue))
        {
            return false;
        }
        queue.retire(why);
        true
    }

    fn queue_or_create(&self, address: &str) -> Arc<Queue> {
        let mut queues = self.queues.write().unwrap_or_else(|p| p.into_inner());
        Arc::clone(queues.entry(address.to_owned()).or_insert_with(|| {
            tracing::debug!(address, "queue created");
            Arc::new(Queue::new(address.to_owned()))
        }))
    }

    /// Moves `msg` from queue `from` to the dead-letter or expiry address: stores an
    /// annotated copy, waits until it is durable, enqueues it there, and only then
    /// acknowledges the original — so a crash in between duplicates, never loses.
    ///
    /// `done`, when given, learns the result: `true` once the copy and the original's
    /// acknowledgement are durable, `false` when the copy could not be stored — then the
    /// message goes back to the head of `from_queue`, never lost from view.
    pub fn divert(
        &self,
        from_queue: Arc<Queue>,
        msg: QueuedMessage,
        why: Diversion,
        done: Option<tokio::sync::watch::Sender<Option<bool>>>,
    ) {
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            let moved = me.divert_now(&from_queue, &msg, why).await;
            if let Err(e) = &moved {
                tracing::error!(queue = %from_queue.name(), offset = msg.offset, error = %e, "could not move message; it stays in its queue");
                from_queue.give_back(&me, msg);
            }
            if let Some(done) = done {
                let _ = done.send(Some(moved.is_ok()));
            }
        });
    }

    async fn divert_now(
        &self,
        from_queue: &Arc<Queue>,
        msg: &QueuedMessage,
        why: Diversion,
    ) -> Result<(), BrokerError> {
        let from = from_queue.name();
        // Under manifests every queue is `<space>/<address>`: a space's dead letters and
        // expired messages stay in that space (its own `DLQ`, which a tenant reads by
        // declaring the address), and the original address is the one the tenant knows.
        let (space, original) = match (&self.config.manifests, from.split_once('/')) {
            (Some(_), Some((space, address))) => (Some(space), address),
            _ => (None, from),
        };
        let in_space = |address: &str| match space {
            Some(space) => internal_name(space, address),
            None => address.to_owned(),
        };
        let (target, entries) = match &why {
            Diversion::DeadLetter {
                reason,
                description,
            } => {
                let mut e = vec![
                    (
                        OwnedKey::from("x-opt-dead-letter-reason"),
                        Value::Symbol(Symbol::from(reason.as_str())),
                    ),
                    (
                        OwnedKey::from("x-opt-original-address"),
                        Value::String(original.to_owned()),
                    ),
                ];
                if let Some(d) = description {
                    e.push((
                        OwnedKey::from("x-opt-dead-letter-description"),
                        Value::String(d.clone()),
                    ));
                }
                (in_space(&self.config.dead_letter_address), e)
            }
            Diversion::Expired => (
                in_space(&self.config.expiry_address),
                vec![(
                    OwnedKey::from("x-opt-original-address"),
                    Value::String(original.to_owned()),
                )],
            ),
        };
        if target == from {
            // A message dying in the dead-letter queue itself is dropped, not looped.
            tracing::warn!(
                queue = from,
                offset = msg.offset,
                "message dropped from its own diversion address"
            );
            let _ = from_queue.finish(self, msg.offset);
            return Ok(());
        }
        let view = MessageView::parse(msg.message.clone())?;
        let chunks = view.with_annotations(entries)?;
        let parts: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
        let (appended, offset, ts, stored) = self.store.append(&target, &parts)?;
        appended.durable.wait().await?;
        let queue = self.queue_or_create(&target);
        let mut moved = queued(offset, stored, ts);
        moved.delivery_count = msg.delivery_count;
        moved.expires_at_ms = None;
        queue.enqueue(self, moved);
        // The copy is durable and queued: from here on the move has happened. The
        // original's acknowledgement is awaited, so whoever waits on the move (a consumer
        // settling second) is settled only once neither copy can come back twice.
        match from_queue.finish(self, msg.offset) {
            Ok(Some(acked)) => {
                if let Err(e) = acked.wait().await {
                    tracing::warn!(queue = from, offset = msg.offset, error = %e, "dead-lettered, but the original's acknowledgement did not become durable: it may come back after a restart");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(queue = from, offset = msg.offset, error = %e, "dead-lettered, but the original's acknowledgement was refused: it comes back after a restart");
            }
        }
        Ok(())
    }

    /// Periodic work: delete fully acknowledged segments, lift the out-of-space alarm,
    /// expire waiting messages.
    pub async fn housekeeping(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            match self.store.reclaim() {
                Ok(0) => {}
                Ok(n) => tracing::debug!(segments = n, "reclaimed acknowledged segments"),
                Err(e) => tracing::warn!(error = %e, "segment reclaim failed"),
            }
            // After the reclaim, which is what frees space: lifts the out-of-space alarm
            // once a new segment fits above the reserve again.
            if let Err(e) = self.store.check_space() {
                tracing::warn!(error = %e, "cannot measure free disk space");
            }
            for q in self.queues() {
                q.expire(&self);
            }
            for t in self.topics() {
                t.apply_retention(&self);
                for sub in t.subscriptions() {
                    sub.queue.expire(&self);
                }
            }
        }
    }
}

use crate::config;

/// Prefix of temporary queues' names (see [`Broker::create_temporary_queue`]).
pub const TEMPORARY_PREFIX: &str = "$tmp.";

/// A temporary queue's name.
pub fn is_temporary(name: &str) -> bool {
    name.starts_with(TEMPORARY_PREFIX)
}

fn check_name(name: &str) -> Result<(), AddressError> {
    if name.is_empty() {
        return Err(AddressError::Empty);
    }
    if name.len() > store::MAX_ADDRESS_LEN {
        return Err(AddressError::TooLong(name.len()));
    }
    Ok(())
}

/// Builds the in-memory entry of a stored message: reads ttl and absolute-expiry-time
/// once, at enqueue, and the producer's delivery-count.
pub fn queued(offset: u64, message: bytes::Bytes, stored_at_ms: i64) -> QueuedMessage {
    match MessageView::parse(message.clone()) {
        Ok(view) => queued_view(offset, &view, stored_at_ms),
        Err(_) => QueuedMessage {
            offset,
            message,
            delivery_count: 0,
            expires_at_ms: None,
            excluded: None,
        },
    }
}

/// Like [`queued`] for a message already parsed.
pub fn queued_view(offset: u64, view: &MessageView, stored_at_ms: i64) -> QueuedMessage {
    let (mut delivery_count, mut expires_at_ms) = (0, None);
    if let Ok(Some(h)) = view.header() {
        delivery_count = h.delivery_count;
        expires_at_ms = h.ttl.map(|ttl| stored_at_ms + i64::from(ttl));
    }
    if let Ok(Some(t)) = view.absolute_expiry_time() {
        let t = t.milliseconds();
        expires_at_ms = Some(expires_at_ms.map_or(t, |e| e.min(t)));
    }
    QueuedMessage {
        offset,
        message: view.bytes().clone(),
        delivery_count,
        expires_at_ms,
        excluded: None,
    }
}
