//! Declaring addresses ahead of use, for manifests: creates a queue, topic, in-memory
//! address or named durable subscription by its store name regardless of `auto-create`,
//! applies its plan's limits, and reports what an address still holds.
//!
//! Also keeps what the applies of declaration sets did ([`DeclarationStats`]): the
//! applier writes it, metrics and status read it, each through the broker they serve.
//!
//! Does not: know the manifest types — the manifest module translates its documents
//! into a [`Declaration`].

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use super::limits::{AddressLimits, SpaceUsage};
use super::memory::{Distribution, MemoryAddress};
use super::subscriptions::SubscriptionError;
use super::topic::StartAt;
use super::{AddressKind, Broker};

/// What an address is, as declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeclaredType {
    Queue,
    Topic,
    Anycast,
    Multicast,
    /// A durable subscription named after the address, on the topic with this store name.
    Subscription {
        topic: String,
    },
}

/// `<space>/<address>`: the store's name for an address of a space.
pub fn internal_name(space: &str, address: &str) -> String {
    format!("{space}/{address}")
}

/// Counters of the applies of declaration sets (manifest directories) to this broker.
#[derive(Debug, Default)]
pub struct DeclarationStats {
    /// Sets applied whole.
    pub applied: AtomicU64,
    /// Sets rejected for errors (nothing applied).
    pub rejected: AtomicU64,
    /// Address removals refused because the queue still held messages.
    pub deletions_refused: AtomicU64,
    /// Addresses the last apply kept although the set removed them (they still held
    /// messages), as `space/address (N messages)`, for `entrepot status`.
    pub kept: Mutex<Vec<String>>,
}

/// One address to create (or update) with its plan.
#[derive(Debug, Clone)]
pub struct Declaration {
    /// The store name (`<space>/<address>` with manifests).
    pub name: String,
    pub declared: DeclaredType,
    pub limits: AddressLimits,
    /// The address space whose stored bytes it counts against.
    pub space: Option<Arc<SpaceUsage>>,
}

impl Broker {
    /// Creates the queue or topic `name` if it does not exist yet.
    pub fn declare(&self, name: &str, kind: AddressKind) {
        match kind {
            AddressKind::Queue => drop(self.queue_or_create(name)),
            AddressKind::Topic => drop(self.topic_or_create(name)),
        }
    }

    /// The stored-bytes account of address space `space`, with its plan's limit.
    pub fn space_usage(&self, space: &str, bytes_max: Option<u64>) -> Arc<SpaceUsage> {
        let mut spaces = self.spaces.write().unwrap_or_else(|p| p.into_inner());
        let usage = spaces
            .entry(space.to_owned())
            .or_insert_with(|| Arc::new(SpaceUsage::new(space.to_owned())));
        usage.set_bytes_max(bytes_max);
        Arc::clone(usage)
    }

    /// The account of address space `space`, if an apply declared it.
    pub fn space(&self, space: &str) -> Option<Arc<SpaceUsage>> {
        self.spaces.read().ok()?.get(space).cloned()
    }

    /// Creates the address if needed and applies its limits (a re-apply updates them).
    pub fn declare_address(&self, d: &Declaration) -> Result<(), SubscriptionError> {
        match &d.declared {
            DeclaredType::Queue => self
                .queue_or_create(&d.name)
                .set_limits(d.limits, d.space.clone()),
            DeclaredType::Topic => self
                .topic_or_create(&d.name)
                .set_limits(d.limits, d.space.clone()),
            DeclaredType::Anycast => self.memory_address(&d.name, Distribution::Anycast, d.limits),
            DeclaredType::Multicast => {
                self.memory_address(&d.name, Distribution::Multicast, d.limits)
            }
            DeclaredType::Subscription { topic } => {
                let topic = self.topic_or_create(topic);
                self.durable_subscription(&topic, &d.name, None, StartAt::Next)?;
            }
        }
        Ok(())
    }

    fn memory_address(&self, name: &str, distribution: Distribution, limits: AddressLimits) {
        let mut memory = self.memory.write().unwrap_or_else(|p| p.into_inner());
        let address = memory
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(MemoryAddress::new(name.to_owned(), distribution)));
        if address.distribution != distribution {
            *address = Arc::new(MemoryAddress::new(name.to_owned(), distribution));
        }
        address.set_limits(limits);
    }

    /// Removes what an address declared beyond its store name: a named durable
    /// subscription is deleted, an in-memory address forgotten. Queues and topics stay
    /// (their records are reclaimed as they are consumed).
    pub fn undeclare_address(&self, name: &str) {
        if let Some(m) = self.memory.write().ok().and_then(|mut m| m.remove(name)) {
            tracing::info!(address = m.name(), "in-memory address removed");
        }
        if let Some((topic, _)) = self.find_durable(name) {
            if let Err(e) = self.delete_subscription(&topic, name) {
                tracing::warn!(subscription = name, error = %e, "could not delete subscription");
            }
        }
    }

    /// Messages held by queue `name` (ready plus unsettled), or by the named durable
    /// subscription `name`; 0 if there is no such address.
    pub fn held_messages(&self, name: &str) -> usize {
        let queue = self
            .queues
            .read()
            .ok()
            .and_then(|q| q.get(name).map(Arc::clone))
            .or_else(|| {
                self.find_durable(name)
                    .map(|(_, sub)| Arc::clone(&sub.queue))
            });
        queue.map_or(0, |q| {
            let (ready, unsettled) = q.depth();
            ready + unsettled
        })
    }
}
