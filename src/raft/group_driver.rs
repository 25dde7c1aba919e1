//! The leadership driver of one clustered address on this node (issue 12, step 4.2): it
//! serves the address exactly while this node leads the address's Raft group and a
//! majority keeps confirming it, and never delivers from a stale group-backed queue after
//! it was deposed.
//!
//! What it owns: one task per address ([`GroupDriver::spawn`], given what a group opener
//! hands over per group this node holds: the address, its [`GroupHandle`] and its
//! [`AddressMachine`], plus the [`Broker`]). The task watches the group's `Leadership`:
//! * **Activation** when this node leads: a new delivery lease, then
//!   `group_queue::activate_leased` (a new `GroupStore` for this leadership, its barrier,
//!   the live messages, the queue the broker adopts), then the lease's renewal
//!   (`lease::renew` with the group's `GroupHandle::lease_round`, only while the queue has
//!   consumers; each round `touch`es the group, so a consumed group never hibernates). A
//!   failed activation (no quorum for the barrier, the name served by another queue) is
//!   tried again while this node still leads, after [`ACTIVATION_RETRY`] doubling up to
//!   [`ACTIVATION_RETRY_MAX`].
//! * **Deactivation** when the leadership here ends (`leads` false, or a new term), when
//!   the lease cannot be renewed (rounds failing for [`GIVE_UP_AFTER_LEASES`] leases: a
//!   leader cut off from its followers, which openraft keeps Leader), or when the store fails (a proposal
//!   failed): the queue is retired (`Broker::retire_adopted`: every consumer link on it is
//!   detached with `amqp:link:detach-forced`, later attaches too), the store is retired
//!   (producers' transfers not yet accepted fail and their links are detached
//!   `detach-forced`, so the client resends; a producer's next transfer is refused the
//!   same way), and the lease ends. Links of other addresses, on the same connections,
//!   are untouched. Then it waits to lead again: a re-election starts a fresh activation
//!   (one store per leadership).
//!
//! Invariants:
//! * At most one activation of the address at a time on this node; a new one only after
//!   the previous one's queue, store and lease were retired.
//! * The queue dispatches only while its lease holds, and a connection writes a delivery
//!   of it only while its lease holds (`connection::flush`): no byte of a delivery reaches
//!   a client socket after the lease ran out (`lease.rs` says why the lease is safe).
//!
//! * **Stand-down** ([`GroupDriver::stand_down_handle`], a leadership hand-over,
//!   `handover.rs`): the activation ends as on a leadership change, and no new one starts
//!   while the stand-down lasts, even though this node still leads; when it ends the
//!   driver serves again if it still leads (a hand-over that failed).
//!
//! Decided: `amqp:link:detach-forced`, not `amqp:link:redirect`. A redirect's `info`
//! needs the new leader's *client* address (its AMQP listener), which the group does not
//! know — `GroupError::NotLeader` names its peer port; the metadata group's placement
//! (issue 12 step 3) will, and a redirect can then replace it.
//!
//! Does not: open or close the group (the group opener does), forward links to the
//! leader elsewhere (step 3), or decide placement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use entrepot_cluster::{GroupHandle, Leadership};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::address_machine::AddressMachine;
use super::group_queue::{activate_leased, Activated};
use super::lease::{self, Demand, LeaseTiming, RenewEnd};
use crate::broker::lease::DeliveryLease;
use crate::broker::Broker;

/// Wait before activating again after a failed activation while this node still leads;
/// doubled after each failure in a row, up to [`ACTIVATION_RETRY_MAX`].
pub const ACTIVATION_RETRY: Duration = Duration::from_millis(200);
/// Longest wait between two activation attempts.
pub const ACTIVATION_RETRY_MAX: Duration = Duration::from_secs(5);
/// Lease rounds failing for this many leases deactivate the address: long enough that a
/// round lost to a slow moment does not, short enough that a cut-off leader's consumers
/// are told within a few election timeouts.
pub const GIVE_UP_AFTER_LEASES: u32 = 2;

/// What a driver did, for tests and metrics.
#[derive(Debug, Default)]
pub struct DriverStats {
    /// Activations that served the address (one per leadership served).
    pub activations: AtomicU64,
    /// Activations ended (leadership lost, lease not renewed, store failed, stop).
    pub deactivations: AtomicU64,
    /// Activations that failed before serving.
    pub failed_activations: AtomicU64,
    /// Times the address's lease ran out while it was served.
    pub lease_lapses: Arc<AtomicU64>,
}

/// The driver of one address; see the module docs. Dropping it stops nothing: call
/// [`GroupDriver::stop`].
pub struct GroupDriver {
    address: String,
    stop: watch::Sender<bool>,
    /// The term being served, `None` while the address is not served here.
    serving: watch::Receiver<Option<u64>>,
    /// Set while the driver must not serve ([`StandDownHandle`]).
    stand: Arc<watch::Sender<bool>>,
    /// True while an activation is under way or served.
    busy: watch::Receiver<bool>,
    stats: Arc<DriverStats>,
    task: JoinHandle<()>,
}

/// Makes a driver stop serving its address and stay so ([`StandDownHandle::stand_down`]).
#[derive(Clone)]
pub struct StandDownHandle {
    stand: Arc<watch::Sender<bool>>,
    busy: watch::Receiver<bool>,
}

/// While it lives, the driver does not serve; dropping it lets the driver serve again
/// where its node still leads.
pub struct StoodDown {
    stand: Arc<watch::Sender<bool>>,
}

impl Drop for StoodDown {
    fn drop(&mut self) {
        self.stand.send_replace(false);
    }
}

impl StandDownHandle {
    /// Deactivates the address here (as on a leadership change: its links detached, its
    /// lease ended) and returns once no activation is under way or served, at the latest
    /// at `deadline` (then the caller must not count on it).
    pub async fn stand_down(&self, deadline: tokio::time::Instant) -> StoodDown {
        self.stand.send_replace(true);
        let mut busy = self.busy.clone();
        let _ = tokio::time::timeout_at(deadline, busy.wait_for(|b| !*b)).await;
        StoodDown {
            stand: Arc::clone(&self.stand),
        }
    }
}

/// Why an activation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    LeadershipChanged,
    LeaseNotRenewed,
    StoreFailed,
    HandingOver,
    Stopped,
}

impl Ended {
    fn describe(self, address: &str) -> String {
        let why = match self {
            Ended::LeadershipChanged => "this node no longer leads its group",
            Ended::LeaseNotRenewed => "no majority confirmed this node's leadership of its group",
            Ended::StoreFailed => "its group store failed",
            Ended::HandingOver => "this node hands its group's leadership over",
            Ended::Stopped => "its driver stopped",
        };
        format!("address {address} is no longer served by this node: {why}; attach again")
    }
}

/// What the task works with.
struct Ctx {
    broker: Arc<Broker>,
    address: String,
    handle: GroupHandle,
    machine: AddressMachine,
    stats: Arc<DriverStats>,
    serving: watch::Sender<Option<u64>>,
    busy: watch::Sender<bool>,
}

impl GroupDriver {
    /// Starts driving `address` (its group's `handle` and the `machine` the host applies
    /// the group to) on `broker`.
    pub fn spawn(
        broker: Arc<Broker>,
        address: String,
        handle: GroupHandle,
        machine: AddressMachine,
    ) -> GroupDriver {
        let (stop, stop_rx) = watch::channel(false);
        let (serving_tx, serving) = watch::channel(None);
        let (busy_tx, busy) = watch::channel(false);
        let stand = Arc::new(watch::Sender::new(false));
        let stats = Arc::new(DriverStats::default());
        let ctx = Ctx {
            broker,
            address: address.clone(),
            handle,
            machine,
            stats: Arc::clone(&stats),
            serving: serving_tx,
            busy: busy_tx,
        };
        let task = tokio::spawn(drive(ctx, stop_rx, stand.subscribe()));
        GroupDriver {
            address,
            stop,
            serving,
            stand,
            busy,
            stats,
            task,
        }
    }

    /// The address driven.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The term this node serves the address in, `None` while it does not.
    pub fn serving(&self) -> watch::Receiver<Option<u64>> {
        self.serving.clone()
    }

    pub fn stats(&self) -> &DriverStats {
        &self.stats
    }

    /// What stands the driver down during a hand-over (see the module docs).
    pub fn stand_down_handle(&self) -> StandDownHandle {
        StandDownHandle {
            stand: Arc::clone(&self.stand),
            busy: self.busy.clone(),
        }
    }

    /// Stops the driver: the address is deactivated here if it was served.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn drive(ctx: Ctx, mut stop: watch::Receiver<bool>, mut stand: watch::Receiver<bool>) {
    let mut leadership = ctx.handle.leadership();
    let mut retry = ACTIVATION_RETRY;
    loop {
        let led: Leadership = tokio::select! {
            led = leadership.wait_for(|l| l.leads) => match led {
                Ok(l) => *l,
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        // Busy first, then the stand-down read: a stand-down that saw this driver idle
        // is seen here (`StandDownHandle::stand_down` sets it, then reads busy).
        ctx.busy.send_replace(true);
        if *stand.borrow_and_update() {
            ctx.busy.send_replace(false);
            tokio::select! {
                _ = stand.wait_for(|s| !*s) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            continue;
        }
        let lease = Arc::new(DeliveryLease::new());
        let activated = activate_leased(
            &ctx.broker,
            &ctx.address,
            ctx.handle.clone(),
            ctx.machine.clone(),
            Arc::clone(&lease),
        );
        let activated = tokio::select! {
            a = activated => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        match activated {
            Ok(active) => {
                retry = ACTIVATION_RETRY;
                let watch = Watched {
                    leadership: &mut leadership,
                    stop: &mut stop,
                    stand: &mut stand,
                };
                let ended = serve(&ctx, active, lease, led.term, watch).await;
                ctx.busy.send_replace(false);
                if ended == Ended::Stopped {
                    return;
                }
            }
            Err(e) => {
                ctx.busy.send_replace(false);
                ctx.stats.failed_activations.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(address = %ctx.address, error = %e, "activation failed; retrying while this node leads");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                retry = (retry * 2).min(ACTIVATION_RETRY_MAX);
            }
        }
    }
}

/// What ends an activation besides the lease and the store.
struct Watched<'a> {
    leadership: &'a mut watch::Receiver<Leadership>,
    stop: &'a mut watch::Receiver<bool>,
    stand: &'a mut watch::Receiver<bool>,
}

/// Serves one activation until it ends, then deactivates it.
async fn serve(
    ctx: &Ctx,
    active: Activated,
    lease: Arc<DeliveryLease>,
    term: u64,
    watch: Watched<'_>,
) -> Ended {
    let Watched {
        leadership,
        stop,
        stand,
    } = watch;
    let Activated { store, queue, .. } = active;
    ctx.stats.activations.fetch_add(1, Ordering::Relaxed);
    let _ = ctx.serving.send(Some(term));
    tracing::info!(address = %ctx.address, term, "serving the address: this node leads its group");
    let timing = LeaseTiming::for_vote_refusal(ctx.handle.leader_lease());
    let demand = Demand {
        needed: Box::new({
            let queue = Arc::clone(&queue);
            move || queue.consumer_count() > 0
        }),
        regained: Box::new({
            let (queue, broker) = (Arc::clone(&queue), Arc::clone(&ctx.broker));
            move || queue.resume(&broker)
        }),
        give_up_after: timing.lease * GIVE_UP_AFTER_LEASES,
    };
    let round = {
        let handle = ctx.handle.clone();
        move || {
            let handle = handle.clone();
            async move {
                // A consumed group stays awake (hibernation, when on).
                handle.touch();
                handle.lease_round().await
            }
        }
    };
    let (renew_stop, renew_stop_rx) = watch::channel(false);
    let mut renewal = tokio::spawn(lease::renew(
        round,
        timing,
        Arc::clone(&lease),
        Arc::clone(&ctx.stats.lease_lapses),
        Some(demand),
        renew_stop_rx,
    ));
    let mut failures = store.failures();
    let ended = tokio::select! {
        _ = leadership.wait_for(|l| !l.leads || l.term != term) => Ended::LeadershipChanged,
        end = &mut renewal => match end {
            Ok(RenewEnd::GaveUp) | Err(_) => Ended::LeaseNotRenewed,
            Ok(RenewEnd::Shutdown) => Ended::Stopped,
        },
        _ = failures.wait_for(|s| s.failed.is_some()) => Ended::StoreFailed,
        _ = stand.wait_for(|s| *s) => Ended::HandingOver,
        _ = stop.wait_for(|s| *s) => Ended::Stopped,
    };
    let why = ended.describe(&ctx.address);
    ctx.broker.retire_adopted(&queue, &why);
    store.retire(&why);
    let _ = renew_stop.send(true);
    if !renewal.is_finished() {
        let _ = renewal.await;
    }
    lease.end();
    let _ = ctx.serving.send(None);
    ctx.stats.deactivations.fetch_add(1, Ordering::Relaxed);
    tracing::info!(address = %ctx.address, term, reason = ?ended, "deactivated the address");
    ended
}
