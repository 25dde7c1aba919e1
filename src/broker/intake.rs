//! The memory budget of deliveries still arriving: bytes a producer sent in `more=true`
//! transfer frames that the broker holds until the delivery's last frame.
//!
//! Three bounds, each a setting: a link's delivery is at most `max-message-bytes`; a
//! connection holds at most `max-incomplete-bytes-per-connection`; the whole broker at most
//! `max-incomplete-bytes` (this budget). Every held byte is a [`Charge`] that gives its
//! bytes back when dropped — on completion, abort, detach, session end or connection
//! close alike — so the counters cannot drift from what is held.
//!
//! Invariant: `used() <= limit()` at all times (taking is a compare-and-swap), and each
//! held chunk is charged [`CHUNK_OVERHEAD_BYTES`] on top of its length, so a peer sending
//! one-byte frames pays for the bookkeeping it causes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Bytes charged per held chunk on top of its payload: the chunk's handle and the heap
/// allocation's own overhead.
pub const CHUNK_OVERHEAD_BYTES: u64 = 64;

/// The broker-wide budget (see the module docs).
#[derive(Debug)]
pub struct IncompleteBudget {
    used: AtomicU64,
    limit: u64,
    refused: AtomicU64,
    freed: Notify,
}

impl IncompleteBudget {
    pub fn new(limit: u64) -> IncompleteBudget {
        IncompleteBudget {
            used: AtomicU64::new(0),
            limit,
            refused: AtomicU64::new(0),
            freed: Notify::new(),
        }
    }

    /// Takes `bytes` if they fit under the limit.
    fn try_take(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&n| n <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, bytes: u64) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            self.freed.notify_waiters();
        }
    }

    /// Bytes held now, broker-wide.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Deliveries refused because a bound was reached (any of the three).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn count_refusal(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Completes when some held bytes were given back (a waiter registered before the
    /// give is woken; callers re-check and bound their wait).
    pub async fn freed(&self) {
        self.freed.notified().await
    }
}

/// Why a [`Charge`] could not grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IntakeRefused {
    #[error("incomplete deliveries on this connection would exceed max-incomplete-bytes-per-connection ({limit} bytes)")]
    Connection { limit: u64 },
    #[error("incomplete deliveries broker-wide would exceed max-incomplete-bytes ({limit} bytes)")]
    Broker { limit: u64 },
}

/// One connection's share: what its incomplete deliveries hold, against its limit.
#[derive(Debug)]
pub struct ConnectionIntake {
    used: AtomicU64,
    limit: u64,
}

impl ConnectionIntake {
    pub fn new(limit: u64) -> Arc<ConnectionIntake> {
        Arc::new(ConnectionIntake {
            used: AtomicU64::new(0),
            limit,
        })
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// Bytes one incomplete delivery holds, charged to its connection and to the broker;
/// given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<IncompleteBudget>,
    connection: Arc<ConnectionIntake>,
    bytes: u64,
}

impl Charge {
    pub fn new(budget: Arc<IncompleteBudget>, connection: Arc<ConnectionIntake>) -> Charge {
        Charge {
            budget,
            connection,
            bytes: 0,
        }
    }

    /// Grows the charge by a chunk of `len` bytes (plus [`CHUNK_OVERHEAD_BYTES`]).
    /// The connection's bound is checked first: a connection over its own share is
    /// refused at once, whereas the broker-wide budget may free up.
    pub fn grow(&mut self, len: usize) -> Result<(), IntakeRefused> {
        let bytes = len as u64 + CHUNK_OVERHEAD_BYTES;
        let limit = self.connection.limit;
        let took = self
            .connection
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&n| n <= limit)
            });
        if took.is_err() {
            return Err(IntakeRefused::Connection { limit });
        }
        if !self.budget.try_take(bytes) {
            self.connection.used.fetch_sub(bytes, Ordering::AcqRel);
            return Err(IntakeRefused::Broker {
                limit: self.budget.limit,
            });
        }
        self.bytes += bytes;
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.connection.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.give(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_bounded_per_connection_and_broker_wide_and_given_back_on_drop() {
        let budget = Arc::new(IncompleteBudget::new(1000));
        let a = ConnectionIntake::new(600);
        let b = ConnectionIntake::new(800);
        let mut ca = Charge::new(Arc::clone(&budget), Arc::clone(&a));
        ca.grow(400).unwrap();
        assert_eq!(ca.bytes(), 400 + CHUNK_OVERHEAD_BYTES);
        assert_eq!(
            ca.grow(200),
            Err(IntakeRefused::Connection { limit: 600 }),
            "the connection's own bound comes first"
        );
        let mut cb = Charge::new(Arc::clone(&budget), Arc::clone(&b));
        cb.grow(400).unwrap();
        assert_eq!(
            cb.grow(100),
            Err(IntakeRefused::Broker { limit: 1000 }),
            "broker-wide: 928 held, 164 more do not fit"
        );
        assert_eq!(
            b.used(),
            400 + CHUNK_OVERHEAD_BYTES,
            "a refused grow takes nothing"
        );
        drop(ca);
        assert_eq!(a.used(), 0);
        assert_eq!(budget.used(), 400 + CHUNK_OVERHEAD_BYTES);
        cb.grow(100).unwrap();
        drop(cb);
        assert_eq!(budget.used(), 0);
        assert_eq!(b.used(), 0);
    }
}
