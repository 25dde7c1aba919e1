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
//! What is left: a delivery is gated immediately before its bytes are written to the
//! client's socket (`connection::flush`), so a pause landing between that check and the
//! `write` system call (microseconds) still writes that buffer after the resume; and a
//! running leader that grants its own vote to a candidate keeps its lease until the
//! leadership task sees it is no longer leader (one metrics publication) — the new leader
//! needs more round trips than that before any delivery of its own can be settled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use entrepot_cluster::TypeConfig;
use openraft::Raft;
use tokio::sync::watch;

use super::{ELECTION_TIMEOUT_MS, HEARTBEAT_MS};
use crate::broker::lease::DeliveryLease;

/// Kept off the followers' vote refusal (`election_timeout_max`) for clock drift and timer
/// granularity; see the module docs.
pub const LEASE_MARGIN_MS: u64 = HEARTBEAT_MS;
/// How long a majority's acknowledgement lets this leader deliver, counted from the
/// instant before the acknowledged requests were sent.
pub const LEASE: Duration = Duration::from_millis(ELECTION_TIMEOUT_MS.1 - LEASE_MARGIN_MS);
/// How often an active leader starts a renewal round.
pub const RENEW_EVERY: Duration = Duration::from_millis(HEARTBEAT_MS);

// A healthy leader renews several times within one lease, and the lease ends before any
// follower may vote for another candidate.
const _: () = assert!(4 * HEARTBEAT_MS <= ELECTION_TIMEOUT_MS.1 - LEASE_MARGIN_MS);
const _: () = assert!(LEASE_MARGIN_MS > 0 && LEASE_MARGIN_MS < ELECTION_TIMEOUT_MS.1);

/// Renews `lease` while the broker is active (until `shutdown`); counts each lapse in
/// `lapses` and logs it. Ends the lease when it stops.
pub async fn renew(
    raft: Raft<TypeConfig>,
    lease: Arc<DeliveryLease>,
    lapses: Arc<AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut held_until: Option<Instant> = None;
    loop {
        let sent = Instant::now();
        note_lapse(&mut held_until, sent, &lapses);
        let round = tokio::select! {
            r = tokio::time::timeout(LEASE, raft.get_read_log_id()) => r,
            _ = shutdown.changed() => break,
        };
        match round {
            Ok(Ok(_)) => {
                let until = sent + LEASE;
                lease.extend_to(until);
                held_until = Some(until);
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "delivery lease not renewed this round"),
            Err(_) => tracing::debug!("delivery lease round timed out"),
        }
        let next = tokio::time::Instant::from_std(sent + RENEW_EVERY);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shutdown.changed() => break,
        }
    }
    // A leadership that ends after its lease ran out (a resumed, deposed leader) lapsed.
    note_lapse(&mut held_until, Instant::now(), &lapses);
    lease.end();
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
