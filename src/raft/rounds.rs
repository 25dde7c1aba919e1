//! When the node's placement followers — the group opener and the balancer — look at
//! their groups again (issue 12: thousands of groups per node at a low idle cost).
//!
//! A round of either visits every group placed on the node, so it runs when something
//! it acts on may have changed, not on a short timer:
//! * the metadata group's machine applied an op or a snapshot ([`MetaMachine::changes`]);
//! * a group opened or closed on the host, or a replica here saw its leadership or its
//!   membership change or its latest membership applied ([`Host::group_changes`]);
//! * a timer of the follower itself came due (a bootstrap fallback, a campaign backoff, a
//!   move's retry): the caller passes the earliest as `due`;
//! * and, as a safety net, [`Rounds::safety_net`] after the last round whatever happened.
//!
//! Invariants: a change seen after a round began is never lost (it is marked seen when
//! the round *begins*, so one during the round wakes the next); rounds begin at least
//! [`Rounds::gap`] apart, so a burst of changes (a declaration of thousands of addresses,
//! each an op of group 0 and a group opening on three nodes) costs one round per gap, not
//! one per change.
//!
//! Does not: run the rounds (the opener and the balancer do), or look at what changed —
//! a round still visits every group; what this removes is the rounds nothing asked for.

use std::time::Duration;

use entrepot_cluster::Host;
use tokio::sync::watch;
use tokio::time::Instant;

use super::meta_machine::MetaMachine;

/// Default: the longest time between two rounds when nothing changed and no timer of the
/// follower is due — a safety net for a change no notification carries.
pub const SAFETY_NET: Duration = Duration::from_secs(5);
/// Default: the least time between the beginnings of two rounds.
pub const ROUND_GAP_MIN: Duration = Duration::from_millis(100);

const _: () = assert!(ROUND_GAP_MIN.as_millis() < SAFETY_NET.as_millis());

/// Why [`Rounds::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The metadata or a group changed.
    Changed,
    /// The caller's timer, or the safety net, came due.
    Due,
}

/// One change counter followed; a closed one (its sender dropped) is no longer polled.
struct Follow {
    rx: watch::Receiver<u64>,
    open: bool,
}

impl Follow {
    async fn changed(&mut self) {
        if self.open && self.rx.changed().await.is_ok() {
            return;
        }
        self.open = false;
        std::future::pending::<()>().await
    }
}

/// The schedule of one follower's rounds (see the module docs).
pub struct Rounds {
    meta: Follow,
    groups: Follow,
    safety_net: Duration,
    gap: Duration,
    began: Instant,
}

impl Rounds {
    /// Follows `meta`'s and `host`'s changes; rounds at least `gap` apart and at most
    /// `safety_net` apart.
    pub fn new(meta: &MetaMachine, host: &Host, safety_net: Duration, gap: Duration) -> Rounds {
        Rounds::over(meta.changes(), host.group_changes(), safety_net, gap)
    }

    /// [`Rounds::new`] over the change counters themselves.
    pub fn over(
        meta: watch::Receiver<u64>,
        groups: watch::Receiver<u64>,
        safety_net: Duration,
        gap: Duration,
    ) -> Rounds {
        Rounds {
            meta: Follow {
                rx: meta,
                open: true,
            },
            groups: Follow {
                rx: groups,
                open: true,
            },
            safety_net,
            gap,
            began: Instant::now(),
        }
    }

    /// The longest time between two rounds.
    pub fn safety_net(&self) -> Duration {
        self.safety_net
    }

    /// The least time between the beginnings of two rounds.
    pub fn gap(&self) -> Duration {
        self.gap
    }

    /// Call as a round begins: the changes so far are the round's.
    pub fn begin(&mut self) {
        self.meta.rx.mark_unchanged();
        self.groups.rx.mark_unchanged();
        self.began = Instant::now();
    }

    /// Waits until the next round is due: a change since the last [`Self::begin`],
    /// `due`, or the safety net — then at least until [`Self::gap`] after the last
    /// round began. Cancel-safe (a change is not consumed until `begin`).
    pub async fn wait(&mut self, due: Option<Instant>) -> Wake {
        let net = self.began + self.safety_net;
        let at = due.map_or(net, |d| d.min(net));
        let wake = tokio::select! {
            _ = self.meta.changed() => Wake::Changed,
            _ = self.groups.changed() => Wake::Changed,
            _ = tokio::time::sleep_until(at) => Wake::Due,
        };
        tokio::time::sleep_until(self.began + self.gap).await;
        wake
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    fn rounds(gap: Duration) -> (watch::Sender<u64>, watch::Sender<u64>, Rounds) {
        let (meta, meta_rx) = watch::channel(0);
        let (groups, groups_rx) = watch::channel(0);
        (meta, groups, Rounds::over(meta_rx, groups_rx, LONG, gap))
    }

    // Time is paused: a sleep with nothing else to do jumps ahead, so `Due` would come at
    // once (an hour of virtual time later) were the change not noticed.
    #[tokio::test(start_paused = true)]
    async fn a_change_of_the_metadata_or_of_a_group_wakes_a_round_before_the_safety_net() {
        let (meta, groups, mut r) = rounds(Duration::from_millis(100));
        r.begin();
        let start = Instant::now();
        meta.send_modify(|n| *n += 1);
        assert_eq!(r.wait(None).await, Wake::Changed);
        // Not before the gap after the round began.
        assert!(start.elapsed() >= r.gap() && start.elapsed() < LONG);

        r.begin();
        let start = Instant::now();
        groups.send_modify(|n| *n += 1);
        assert_eq!(r.wait(None).await, Wake::Changed);
        assert!(start.elapsed() < LONG);

        // Nothing changed since the round began: the caller's timer, then the net.
        r.begin();
        let start = Instant::now();
        let due = start + Duration::from_secs(2);
        assert_eq!(r.wait(Some(due)).await, Wake::Due);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        r.begin();
        let start = Instant::now();
        assert_eq!(r.wait(None).await, Wake::Due);
        assert_eq!(start.elapsed(), LONG);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_during_a_round_wakes_the_next_and_a_burst_wakes_one() {
        let (meta, groups, mut r) = rounds(Duration::from_millis(100));
        r.begin();
        // The round runs; changes come meanwhile.
        for _ in 0..50 {
            meta.send_modify(|n| *n += 1);
            groups.send_modify(|n| *n += 1);
        }
        assert_eq!(r.wait(None).await, Wake::Changed);
        r.begin();
        let start = Instant::now();
        assert_eq!(r.wait(None).await, Wake::Due, "the burst woke one round");
        assert_eq!(start.elapsed(), LONG);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_counter_neither_spins_nor_stops_the_other() {
        let (meta, groups, mut r) = rounds(Duration::ZERO);
        drop(meta);
        r.begin();
        let start = Instant::now();
        groups.send_modify(|n| *n += 1);
        assert_eq!(r.wait(None).await, Wake::Changed);
        r.begin();
        assert_eq!(r.wait(None).await, Wake::Due);
        assert_eq!(start.elapsed(), LONG);
    }
}
