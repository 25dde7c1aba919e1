//! Resource limits of addresses and address spaces (the manifests' AddressPlan and
//! AddressSpacePlan), and the bookkeeping that enforces them on the message path.
//!
//! * [`AddressLimits`] bound one queue (or each subscription of a topic): messages held,
//!   bytes held, the size of one message, and for topics how long messages are retained.
//! * [`SpaceUsage`] counts the bytes held by every queue of one address space against the
//!   space plan's `maxStoredBytes`; queues add and subtract as messages come and go.
//! * [`Reservation`] is room taken in a queue (and its space) for a message that is
//!   stored but not yet durable: counting it from the moment it is admitted is what keeps
//!   concurrent producers from overshooting a limit while their group commit runs.
//!
//! Invariants: a queue with limits never holds (ready + unsettled + reserved) more than
//! `depth_max` messages or `bytes_max` bytes; the space's count is the sum of its queues'
//! held and reserved bytes.
//!
//! Does not: decide what happens to a producer over a limit (the connection withholds
//! credit or rejects, see `connection::link`), or read manifests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Limits of one address; `None` means "no limit beyond the broker's own".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddressLimits {
    /// Most messages held (ready + unsettled + admitted but not yet durable).
    pub depth_max: Option<u64>,
    /// Most message bytes held, counted the same way.
    pub bytes_max: Option<u64>,
    /// Largest message accepted to this address.
    pub message_bytes_max: Option<u64>,
    /// Topics only: how long messages are kept for replay after publication.
    pub retention_secs: Option<u64>,
}

/// Bytes held by the queues of one address space, against its plan's limit.
#[derive(Debug, Default)]
pub struct SpaceUsage {
    pub name: String,
    bytes: AtomicU64,
    /// 0: unlimited.
    bytes_max: AtomicU64,
    /// Open connections that chose this space.
    connections: AtomicU64,
    /// 0: unlimited.
    connections_max: AtomicU64,
}

impl SpaceUsage {
    pub fn new(name: String) -> SpaceUsage {
        SpaceUsage {
            name,
            ..SpaceUsage::default()
        }
    }

    pub fn set_bytes_max(&self, max: Option<u64>) {
        self.bytes_max.store(max.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn set_connections_max(&self, max: Option<u64>) {
        self.connections_max
            .store(max.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Counts one more connection in this space, or says why not (its plan's
    /// `maxConnections`, which re-applies take into account from the next connection).
    pub fn connect(self: &Arc<Self>) -> Result<SpaceConnection, LimitExceeded> {
        let max = self.connections_max.load(Ordering::Relaxed);
        let taken = self
            .connections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (max == 0 || n < max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(SpaceConnection(Arc::clone(self))),
            Err(_) => Err(LimitExceeded::Connections {
                space: self.name.clone(),
                max,
            }),
        }
    }

    pub fn bytes_max(&self) -> Option<u64> {
        Some(self.bytes_max.load(Ordering::Relaxed)).filter(|&m| m > 0)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// True if `more` bytes fit under the limit.
    pub fn fits(&self, more: u64) -> bool {
        self.bytes_max()
            .is_none_or(|max| self.bytes().saturating_add(more) <= max)
    }

    pub(crate) fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sub(&self, n: u64) {
        // Saturating: a limit changed under a queue never wraps the count.
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n))
            });
    }
}

/// Why a message was not admitted to an address; the description goes to the producer
/// with `amqp:resource-limit-exceeded`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    #[error("address {address:?} is full: it holds its plan's maximum of {max} messages")]
    Depth { address: String, max: u64 },
    #[error("address {address:?} is full: {bytes} more bytes would exceed its plan's maximum of {max} bytes")]
    Bytes {
        address: String,
        bytes: u64,
        max: u64,
    },
    #[error("message of {size} bytes exceeds the maximum of {max} bytes for address {address:?}")]
    MessageSize {
        address: String,
        size: u64,
        max: u64,
    },
    #[error("address space {space:?} is full: {bytes} more bytes would exceed its plan's maxStoredBytes of {max}")]
    SpaceBytes { space: String, bytes: u64, max: u64 },
    #[error("address space {space:?} has its plan's maximum of {max} connections open")]
    Connections { space: String, max: u64 },
}

/// One open connection counted in its space; dropping it (the connection ended) frees
/// the slot.
#[derive(Debug)]
pub struct SpaceConnection(Arc<SpaceUsage>);

impl Drop for SpaceConnection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Room taken in a queue for one admitted message; given back when dropped (after the
/// message entered the queue, or if it never will).
#[derive(Debug)]
pub struct Reservation {
    pub(crate) queue: Arc<super::queue::Queue>,
    pub(crate) bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.queue.unreserve(self.bytes);
    }
}

/// Space usage handle of a queue: counts into its address space, if it has one.
pub(crate) fn space_add(space: &Option<Arc<SpaceUsage>>, n: u64) {
    if let Some(s) = space {
        s.add(n);
    }
}

pub(crate) fn space_sub(space: &Option<Arc<SpaceUsage>>, n: u64) {
    if let Some(s) = space {
        s.sub(n);
    }
}
