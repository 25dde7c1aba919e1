//! In-memory addresses: `anycast` and `multicast` (EnMasse's router-backed types).
//!
//! Nothing is written to the store and nothing waits for a group commit: a message is
//! handed to receivers at once and settled with the producer at once — at-most-once.
//! Deliveries to receivers are pre-settled.
//!
//! * **Anycast**: one receiver gets each message, round robin — one in-memory [`Queue`]
//!   with the receivers as competing consumers. While no receiver is attached, producers
//!   get no credit (as a router grants none for an address without consumers).
//! * **Multicast**: every attached receiver gets each message — one in-memory queue per
//!   receiver.
//!
//! A message that reaches no receiver is **released** to an unsettled producer (as the
//! router does for a delivery it cannot forward), or counted in `dropped` for a
//! pre-settled one. Each receiver's buffer holds at most the plan's `maxDepth` (default
//! [`MEMORY_BUFFER_MAX`]) messages waiting for credit; past it an anycast producer is
//! held back by credit and a multicast receiver that cannot keep up loses its oldest
//! messages (counted in its queue's `dropped`).
//!
//! Does not: survive a restart, redeliver, dead-letter, or count against `maxStoredBytes`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::limits::AddressLimits;
use super::queue::{Queue, QueueOwner};
use super::Broker;

/// Messages one receiver's buffer holds while it has no credit, without a plan limit.
pub const MEMORY_BUFFER_MAX: u64 = 10_000;

/// Delivery tags of in-memory messages (their "offsets"), unique per broker.
static NEXT_MEMORY_OFFSET: AtomicU64 = AtomicU64::new(1);

/// Which receivers get a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    Anycast,
    Multicast,
}

/// What became of a message sent to an in-memory address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Handed to this many receivers.
    Delivered(usize),
    /// No receiver: released (unsettled producer) or dropped (pre-settled).
    NoReceiver,
}

#[derive(Debug, Default)]
pub struct MemoryStats {
    pub routed: AtomicU64,
    /// Pre-settled messages that found no receiver.
    pub dropped: AtomicU64,
    /// Unsettled messages released because they found no receiver.
    pub released: AtomicU64,
}

/// An anycast or multicast address; see the module docs.
#[derive(Debug)]
pub struct MemoryAddress {
    name: String,
    pub distribution: Distribution,
    limits: Mutex<AddressLimits>,
    /// Anycast: the one shared queue. Multicast: one queue per receiver.
    queues: Mutex<Vec<Arc<Queue>>>,
    pub stats: MemoryStats,
}

impl MemoryAddress {
    pub fn new(name: String, distribution: Distribution) -> MemoryAddress {
        let queues = match distribution {
            Distribution::Anycast => vec![Arc::new(Queue::owned(name.clone(), QueueOwner::Memory))],
            Distribution::Multicast => Vec::new(),
        };
        MemoryAddress {
            name,
            distribution,
            limits: Mutex::new(AddressLimits::default()),
            queues: Mutex::new(queues),
            stats: MemoryStats::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Queue>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_limits(&self, limits: AddressLimits) {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = limits;
    }

    pub fn limits(&self) -> AddressLimits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn buffer_max(&self) -> usize {
        self.limits().depth_max.unwrap_or(MEMORY_BUFFER_MAX) as usize
    }

    /// The queue a new receiver consumes from: the shared one (anycast) or its own.
    pub fn receiver_queue(&self) -> Arc<Queue> {
        let mut queues = self.queues();
        match self.distribution {
            Distribution::Anycast => Arc::clone(&queues[0]),
            Distribution::Multicast => {
                // Receivers that left are pruned here and on publish.
                queues.retain(|q| q.consumer_count() > 0);
                let q = Arc::new(Queue::owned(self.name.clone(), QueueOwner::Memory));
                queues.push(Arc::clone(&q));
                q
            }
        }
    }

    /// How many more messages producers may be granted credit for (anycast: none while
    /// no receiver is attached or the buffer is full; multicast: unlimited).
    pub fn room(&self) -> Option<u64> {
        match self.distribution {
            Distribution::Multicast => None,
            Distribution::Anycast => {
                let q = Arc::clone(&self.queues()[0]);
                if q.consumer_count() == 0 {
                    return Some(0);
                }
                let (ready, _) = q.depth();
                Some((self.buffer_max().saturating_sub(ready)) as u64)
            }
        }
    }

    /// Hands `message` to the receivers now; nothing is stored.
    pub fn route(&self, broker: &Broker, message: bytes::Bytes, settled: bool) -> Routed {
        let offset = NEXT_MEMORY_OFFSET.fetch_add(1, Ordering::Relaxed);
        let msg = super::queued(offset, message, super::queue::now_ms());
        let targets: Vec<Arc<Queue>> = {
            let mut queues = self.queues();
            if self.distribution == Distribution::Multicast {
                queues.retain(|q| q.consumer_count() > 0);
            }
            queues
                .iter()
                .filter(|q| q.consumer_count() > 0)
                .cloned()
                .collect()
        };
        if targets.is_empty() {
            let counter = match settled {
                true => &self.stats.dropped,
                false => &self.stats.released,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return Routed::NoReceiver;
        }
        let max = self.buffer_max();
        for q in &targets {
            q.enqueue(broker, msg.clone());
            if q.depth().0 > max {
                q.drop_oldest_beyond(broker, max);
            }
        }
        self.stats.routed.fetch_add(1, Ordering::Relaxed);
        Routed::Delivered(targets.len())
    }
}
