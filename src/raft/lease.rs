//! The active leader's delivery lease: renewed by rounds a majority acknowledges, each one
//! anchored to the instant *before* its requests went out.
//!
//! Why a deadline of [`LEASE`] after that instant is safe (openraft 0.9.25):
//! * `Raft::get_read_log_id` sends every voter a fresh AppendEntries (heartbeat) carrying
//!   this leader's vote, and succeeds once a quorum of the effective membership (the leader
//!   itself counted, joint configurations in both halves) answered with anything but a
//!   higher vote. We take `sent = Instant::now()` before calling it, so every request it
//!   counts left after `sent`.
//! * A voter that accepts an AppendEntries with a committed vote touches that vote's time
//!   (`VoteHandler::update_vote` → `vote.touch(now)`), and refuses any vote request while
//!   `now <= vote_utime + leader_lease` (`Engine::handle_vote_req`), where `leader_lease`
//!   is `Config::election_timeout_max` ([`ELECTION_TIMEOUT_MS`]`.1`, 240 ms). It received
//!   our request after `sent`, so it refuses every candidate until at least
//!   `sent + 240 ms` of its clock.
//! * A new leader needs the votes of a quorum, and every quorum shares a voter with the
//!   quorum that acknowledged us. If that voter is a follower, no new leader exists before
//!   `sent + 240 ms`. If it is this leader itself, its Raft granted the vote and left the
//!   `Leader` state first; the leadership task then stops the broker and ends the lease
//!   (see "What is left" below).
//! * Clocks: both sides read `CLOCK_MONOTONIC` (std's and tokio's `Instant`), whose rate
//!   NTP may slew by at most 500 ppm — 0.12 ms over 240 ms. [`LEASE_MARGIN_MS`] (40 ms,
//!   one heartbeat) covers that many times over, plus timer granularity. A pause of the
//!   leader (SIGSTOP) does not stop that clock: a lease anchored before the pause has
//!   expired when the process resumes, whatever answers were waiting in its sockets.
//!   Assumed: the monotonic clock of a paused *virtual machine* advances too (kvmclock does
//!   after a pause; a hypervisor that hides the pause would break the lease).
//!
//! `RaftMetrics::millis_since_quorum_ack` is not used: it is computed when the metrics are
//! published, so a value read after a resume is the pre-pause age and looks fresh.
//!
//! Renewal runs every [`RENEW_EVERY`] for as long as the broker is active, so a healthy
//! leader renews at least four times within one lease and never pauses its deliveries;
//! each renewal costs one heartbeat round (one empty AppendEntries per follower).
//!
//! **One renewal for both modes.** [`renew`] takes the round as a closure: the one-group
//! cluster mode passes `Raft::get_read_log_id` of its group; a group-backed queue (issue
//! 12, `group_driver.rs`) passes `GroupHandle::lease_round` of its address's host group,
//! which makes the same call inside `cluster/` (openraft's types stay there) and whose
//! doc repeats the argument above. The timing comes from the followers' vote refusal
//! ([`LeaseTiming::for_vote_refusal_ms`]: the election timeout's maximum, less a margin
//! of a sixth of it and at least [`LEASE_MARGIN_MS`], renewed five times per lease) —
//! 200 ms every 40 ms for the broker's 240 ms; a host group's comes from its handle
//! (`GroupHandle::leader_lease`). A per-group lease is renewed only while it is needed
//! ([`Demand`]: its queue has consumers — a consumed group is awake anyway, and an idle
//! one may hibernate), resumes the queue when it holds again, and gives up when rounds
//! failed for too long (two leases: the driver then deactivates the address here).
//!
//! What is left: a delivery is gated immediately before its bytes are written to the
//! client's socket (`connection::flush`), so a pause landing between that check and the
//! `write` system call (microseconds) still writes that buffer after the resume; and a
//! running leader that grants its own vote to a candidate keeps its lease until the
//! leadership task sees it is no longer leader (one metrics publication) — the new leader
//! needs more round trips than that before any delivery of its own can be settled.

use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use entrepot_cluster::TypeConfig;
use openraft::Raft;
use tokio::sync::watch;

use super::{ELECTION_TIMEOUT_MS, HEARTBEAT_MS};
use crate::broker::lease::DeliveryLease;

/// Kept off the followers' vote refusal (`election_timeout_max`) for clock drift and timer
/// granularity, at least; see the module docs.
pub const LEASE_MARGIN_MS: u64 = HEARTBEAT_MS;
/// The margin is at least this fraction (1/n) of the vote refusal.
pub const LEASE_MARGIN_DIVISOR: u64 = 6;
/// Renewal rounds started within one lease.
pub const RENEWALS_PER_LEASE: u64 = 5;

/// How long a lease lasts and how often it is renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a majority's acknowledgement lets this leader deliver, counted from the
    /// instant before the acknowledged requests were sent.
    pub lease: Duration,
    /// How often a renewal round starts.
    pub renew_every: Duration,
}

impl LeaseTiming {
    /// The timing for followers that refuse other candidates for `refusal_ms` after a
    /// round (openraft's `election_timeout_max`).
    pub const fn for_vote_refusal_ms(refusal_ms: u64) -> LeaseTiming {
        let fraction = refusal_ms / LEASE_MARGIN_DIVISOR;
        let margin = if fraction > LEASE_MARGIN_MS {
            fraction
        } else {
            LEASE_MARGIN_MS
        };
        let lease_ms = refusal_ms.saturating_sub(margin);
        LeaseTiming {
            lease: Duration::from_millis(lease_ms),
            renew_every: Duration::from_millis(lease_ms / RENEWALS_PER_LEASE),
        }
    }

    /// [`Self::for_vote_refusal_ms`] of a duration.
    pub fn for_vote_refusal(refusal: Duration) -> LeaseTiming {
        let ms = u64::try_from(refusal.as_millis()).unwrap_or(u64::MAX);
        LeaseTiming::for_vote_refusal_ms(ms)
    }
}

/// The one-group cluster mode's timing (the broker's Raft timing).
pub const ONE_GROUP: LeaseTiming = LeaseTiming::for_vote_refusal_ms(ELECTION_TIMEOUT_MS.1);
/// How long a majority's acknowledgement lets the one-group leader deliver.
pub const LEASE: Duration = ONE_GROUP.lease;
/// How often the one-group leader starts a renewal round.
pub const RENEW_EVERY: Duration = ONE_GROUP.renew_every;

// The one group renews once per heartbeat, several times within one lease, and the lease
// ends before any follower may vote for another candidate.
const _: () = assert!(RENEW_EVERY.as_millis() == HEARTBEAT_MS as u128);
const _: () = assert!(4 * HEARTBEAT_MS <= ELECTION_TIMEOUT_MS.1 - LEASE_MARGIN_MS);
const _: () = assert!(LEASE.as_millis() == (ELECTION_TIMEOUT_MS.1 - LEASE_MARGIN_MS) as u128);
const _: () = assert!(LEASE_MARGIN_MS > 0 && LEASE_MARGIN_MS < ELECTION_TIMEOUT_MS.1);

/// When a lease is renewed only on demand (a group-backed queue's), and what its
/// renewal does besides.
pub struct Demand {
    /// Whether the lease is needed now (the queue has consumers); while not, no round
    /// runs and the renewal waits for [`DeliveryLease::want`].
    pub needed: Box<dyn Fn() -> bool + Send + Sync>,
    /// Called after a round that made the lease hold again (resumes the queue).
    pub regained: Box<dyn Fn() + Send + Sync>,
    /// Rounds failing for this long end the renewal ([`RenewEnd::GaveUp`]).
    pub give_up_after: Duration,
}

/// Why a renewal ended (it ends its lease either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewEnd {
    /// Told to stop.
    Shutdown,
    /// Rounds failed for [`Demand::give_up_after`]: no majority confirms this leader.
    GaveUp,
}

/// Renews `lease` with `round` (one majority round each; see the module docs) every
/// `timing.renew_every` until `shutdown` — or, with a `demand`, while needed and until the
/// rounds fail for too long. Counts each lapse in `lapses` and logs it. Ends the lease
/// when it stops.
pub async fn renew<R, F, E>(
    mut round: R,
    timing: LeaseTiming,
    lease: Arc<DeliveryLease>,
    lapses: Arc<AtomicU64>,
    demand: Option<Demand>,
    mut shutdown: watch::Receiver<bool>,
) -> RenewEnd
where
    R: FnMut() -> F,
    F: Future<Output = Result<(), E>>,
    E: Display,
{
    let mut held_until: Option<Instant> = None;
    let mut failing_since: Option<Instant> = None;
    let end = loop {
        if demand.as_ref().is_some_and(|d| !(d.needed)()) {
            // Idle: no rounds; an expiry while idle is no lapse.
            held_until = None;
            failing_since = None;
            tokio::select! {
                _ = lease.wanted() => continue,
                _ = shutdown.changed() => break RenewEnd::Shutdown,
            }
        }
        let sent = Instant::now();
        note_lapse(&mut held_until, sent, &lapses);
        let result = tokio::select! {
            r = tokio::time::timeout(timing.lease, round()) => r,
            _ = shutdown.changed() => break RenewEnd::Shutdown,
        };
        let renewed = match result {
            Ok(Ok(())) => {
                let was_held = lease.holds();
                let until = sent + timing.lease;
                lease.extend_to(until);
                held_until = Some(until);
                failing_since = None;
                if let Some(d) = demand.as_ref().filter(|_| !was_held) {
                    (d.regained)();
                }
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "delivery lease not renewed this round");
                false
            }
            Err(_) => {
                tracing::debug!("delivery lease round timed out");
                false
            }
        };
        if !renewed {
            let since = *failing_since.get_or_insert(sent);
            let give_up = demand.as_ref().map(|d| d.give_up_after);
            if give_up.is_some_and(|after| Instant::now().duration_since(since) >= after) {
                break RenewEnd::GaveUp;
            }
        }
        let next = tokio::time::Instant::from_std(sent + timing.renew_every);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shutdown.changed() => break RenewEnd::Shutdown,
        }
    };
    // A leadership that ends after its lease ran out (a resumed, deposed leader) lapsed.
    note_lapse(&mut held_until, Instant::now(), &lapses);
    lease.end();
    end
}

/// Renews the one group's `lease` with `raft`'s rounds while its broker is active (until
/// `shutdown`).
pub async fn renew_one_group(
    raft: Raft<TypeConfig>,
    lease: Arc<DeliveryLease>,
    lapses: Arc<AtomicU64>,
    shutdown: watch::Receiver<bool>,
) {
    let round = move || {
        let raft = raft.clone();
        async move { raft.get_read_log_id().await.map(|_| ()) }
    };
    renew(round, ONE_GROUP, lease, lapses, None, shutdown).await;
}
/// Counts and logs a lapse when the lease held until `held_until` and `now` is past it.
fn note_lapse(held_until: &mut Option<Instant>, now: Instant, lapses: &AtomicU64) {
    let Some(until) = held_until.filter(|until| now >= *until) else {
        return;
    };
    lapses.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        late_ms = now.duration_since(until).as_millis() as u64,
        "delivery lease lapsed: deliveries wait until a majority confirms this leader again"
    );
    *held_until = None;
}
