//! The delivery lease of a clustered leader: until when this broker may hand deliveries to
//! its clients' sockets.
//!
//! A Raft leader that was paused (SIGSTOP, a hung VM, a partition from its peers but not
//! from its clients) still believes it leads when it resumes, until it hears of the newer
//! term. Its in-memory queues are stale by then: the new leader may have delivered and
//! settled their messages. So a clustered broker writes to its clients only while it holds
//! a lease — a deadline before which no other leader can exist — which the Raft layer
//! extends after every round a majority acknowledged (`src/raft/lease.rs` says why the
//! deadline is safe). A single node has no lease and never waits.
//!
//! What this owns: the deadline (one atomic, read on every flush of a connection's output
//! with a clock read and no lock), the wake-up of connections that wait for it, the end
//! of the lease when the leadership ends, and the *demand* for it: a lease renewed only
//! while it is needed (a group-backed queue's, renewed while the queue has consumers) is
//! asked for with [`DeliveryLease::want`] (a consumer attached or gave credit), which wakes
//! its renewal.
//!
//! Who holds one: in the one-group cluster mode the whole broker (every connection's
//! writes wait for it: [`crate::broker::Broker::deliver_under`]); for a group-backed
//! queue (issue 12) the queue, and a connection writes a buffer that holds a delivery of
//! that queue only while the queue's lease holds (`connection::flush`).
//!
//! Invariants:
//! * [`DeliveryLease::holds`] is true only before the last deadline the Raft layer set and
//!   before [`DeliveryLease::end`]; the deadline only moves forward.
//! * No lost wake-up: a waiter registers for the next renewal *before* it re-reads the
//!   deadline ([`DeliveryLease::held`]), and a renewal stores the deadline before it wakes
//!   waiters, so a renewal either is seen by the re-read or wakes the waiter.
//!
//! It does not decide anything about settlement or acceptance: those wait for the Raft
//! commit already, which a deposed leader can never reach.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::Notify;

/// The leadership ended (the node stopped leading, or lost its majority): this broker
/// will never hold its lease again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the leadership ended: this broker delivers nothing more")]
pub struct LeaseEnded;

/// See the module docs.
#[derive(Debug)]
pub struct DeliveryLease {
    /// The origin of [`DeliveryLease::deadline_ns`].
    base: Instant,
    /// Nanoseconds after `base` until which deliveries may go out; 0: never held yet.
    deadline_ns: AtomicU64,
    /// Set once the leadership ended; the deadline is then 0 for good.
    ended: AtomicBool,
    /// Wakes connections waiting for a renewal or the end.
    renewed: Notify,
    /// Wakes a renewal that waits for someone to need the lease ([`DeliveryLease::want`]).
    wanted: Notify,
}

impl Default for DeliveryLease {
    fn default() -> Self {
        DeliveryLease::new()
    }
}

impl DeliveryLease {
    /// A lease not held yet: nothing goes out until the first [`DeliveryLease::extend_to`].
    pub fn new() -> DeliveryLease {
        DeliveryLease {
            base: Instant::now(),
            deadline_ns: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            renewed: Notify::new(),
            wanted: Notify::new(),
        }
    }

    /// Whether deliveries may go out now: one atomic load and a clock read.
    pub fn holds(&self) -> bool {
        let deadline = self.deadline_ns.load(Ordering::SeqCst);
        deadline != 0 && self.nanos_since_base(Instant::now()) < deadline
    }

    /// Extends the lease to `deadline` (never shortens it; nothing after
    /// [`DeliveryLease::end`]) and wakes the connections waiting for it.
    pub fn extend_to(&self, deadline: Instant) {
        if self.ended.load(Ordering::SeqCst) {
            return;
        }
        let at = self.nanos_since_base(deadline).max(1);
        self.deadline_ns.fetch_max(at, Ordering::SeqCst);
        // `end` may have run between the check and the store: it zeroes the deadline
        // after setting `ended`, so re-check and undo.
        if self.ended.load(Ordering::SeqCst) {
            self.deadline_ns.store(0, Ordering::SeqCst);
        }
        self.renewed.notify_waiters();
    }

    /// Ends the lease for good (the leadership ended) and wakes every waiter, which then
    /// hears [`LeaseEnded`].
    pub fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        self.deadline_ns.store(0, Ordering::SeqCst);
        self.renewed.notify_waiters();
    }

    /// Whether the leadership ended.
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Completes once the lease holds, or fails once it ended.
    pub async fn held(&self) -> Result<(), LeaseEnded> {
        loop {
            let renewal = self.renewed.notified();
            tokio::pin!(renewal);
            // Registered before the re-read: a renewal from here on wakes us.
            renewal.as_mut().enable();
            if self.has_ended() {
                return Err(LeaseEnded);
            }
            if self.holds() {
                return Ok(());
            }
            renewal.await;
        }
    }

    /// Someone needs the lease now (a consumer attached, or gave credit): wakes a
    /// renewal that waits in [`DeliveryLease::wanted`]. Cheap; a want while nobody waits
    /// is kept for the next wait (one permit).
    pub fn want(&self) {
        self.wanted.notify_one();
    }

    /// Completes after a [`DeliveryLease::want`] (one made before the call counts).
    pub async fn wanted(&self) {
        self.wanted.notified().await
    }

    fn nanos_since_base(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn holds_only_before_the_deadline_and_never_after_the_end() {
        let lease = DeliveryLease::new();
        assert!(!lease.holds(), "a new lease is not held");
        lease.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(lease.holds());
        // Never shortened.
        lease.extend_to(Instant::now());
        assert!(lease.holds());
        lease.end();
        assert!(!lease.holds());
        lease.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(!lease.holds(), "an ended lease is never renewed");
    }

    #[test]
    fn expires_with_the_clock() {
        let lease = DeliveryLease::new();
        lease.extend_to(Instant::now() + Duration::from_millis(20));
        assert!(lease.holds());
        std::thread::sleep(Duration::from_millis(30));
        assert!(!lease.holds(), "a lease past its deadline does not hold");
    }

    #[tokio::test]
    async fn a_waiter_wakes_on_renewal_and_on_the_end() {
        let lease = Arc::new(DeliveryLease::new());
        let waiter = tokio::spawn({
            let lease = Arc::clone(&lease);
            async move { lease.held().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "nothing goes out before the lease holds"
        );
        lease.extend_to(Instant::now() + Duration::from_secs(60));
        let woke = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(woke, Ok(Ok(Ok(())))), "renewal wakes the waiter");

        let fresh = Arc::new(DeliveryLease::new());
        let waiter = tokio::spawn({
            let lease = Arc::clone(&fresh);
            async move { lease.held().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        fresh.end();
        let woke = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(
            matches!(woke, Ok(Ok(Err(LeaseEnded)))),
            "the end wakes the waiter"
        );
    }
}
