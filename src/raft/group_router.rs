//! Where an address is served in `cluster-mode: groups`: the broker's
//! [`AddressRouter`] implemented over the metadata group, the node's opener and its
//! leadership drivers.
//!
//! On an attach to `address` ([`GroupRouter::route`]):
//! 1. Not placed yet and auto-create allowed: declared through group 0 from this node
//!    (`MetaGroup::declare_address_anywhere`, forwarded to group 0's leader when this
//!    node does not lead it). Not placed and no auto-create: `Here`, so the broker
//!    answers `amqp:not-found` as usual.
//! 2. Placed: `Here` once this node's driver serves the address (its group-backed queue
//!    is adopted, this node leads and holds the lease); `Elsewhere` with the leader's
//!    AMQP and amqps listeners from group 0's members when another node leads (the
//!    connection names the one its client came in on; the leader this
//!    node's replica knows; without a replica here, the placement's preferred leader; with
//!    one that is no voter and knows no leader yet — a replica a move has just opened —
//!    another replica of the placement ([`ask_elsewhere`]), whose node redirects again
//!    if another leads; when forwarding, it waits for the leader instead, since a carried
//!    link follows this replica's view of the leader); while a voter here knows no
//!    leader (an election), or this node leads but is still activating, it waits.
//!    A node that is *busy* — groups of a lost peer still being woken here, or its own
//!    timers running more than [`DECLARE_BUSY_LAG`] late — declares nothing new: the
//!    attach is answered at once, `Unavailable` "busy" (the client attaches again later),
//!    rather than adding a group, an election and its heartbeats to a starved node
//!    (benches/RESULTS.md, session 16). Addresses already placed are served as usual.
//! 3. No answer within [`ROUTE_WAIT`]: `Unavailable` with the reason (the link is
//!    detached `amqp:link:detach-forced`; the client attaches again).
//!
//! Invariants: `Here` only while the driver serves, so a local queue is never auto-created
//! under a clustered name; every wait is bounded by [`ROUTE_WAIT`].
//!
//! Decided: the connection engine's attach is synchronous, so a route that must wait (a
//! declaration, an election) blocks the connection's task on a worker thread
//! (`block_in_place`) for at most [`ROUTE_WAIT`]; other connections go on. On a
//! current-thread runtime (tests) it does not wait: an address not ready at once is
//! `Unavailable`. An address already served here is answered without blocking.
//!
//! With `link-routing: forward` ([`GroupRouter::forwarding`]), a link led elsewhere —
//! producer or consumer — is answered [`Route::Forward`] with a [`RemoteLeader`] (the
//! leader, its member address, this node's replica's leadership watch) and carried there
//! (`link_forward.rs`, `link_forward/consume.rs`).
//!
//! Does not: route topics, subscriptions, temporary
//! queues and the anonymous relay (they stay local to the node a client reaches).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use entrepot_cluster::{identity, Host, NodeId};
use tokio::time::Instant;

use super::group_driver::GroupDriver;
use super::group_opener::GroupOpener;
use super::link_forward::{ForwardStats, RemoteLeader};
use super::meta_machine::{AddressPlacement, MetaGroup};
use crate::broker::routing::{AddressRouter, LinkDirection, Route};

/// Longest an attach waits for its address to be placed or to get a leader.
pub const ROUTE_WAIT: Duration = Duration::from_secs(3);
/// A node whose own timers ran later than this lately declares no new address (busy).
pub const DECLARE_BUSY_LAG: Duration = Duration::from_millis(500);
/// How often a waiting attach looks again.
const ROUTE_POLL: Duration = Duration::from_millis(20);

/// The drivers of the addresses open on this node, by address.
pub type Drivers = Arc<Mutex<BTreeMap<String, GroupDriver>>>;

/// The router of one node (see the module docs).
pub struct GroupRouter {
    node: NodeId,
    meta: MetaGroup,
    opener: Arc<GroupOpener>,
    drivers: Drivers,
    /// Set with `link-routing: forward`: links led elsewhere are carried there.
    forward: Option<ForwardVia>,
    /// This node's host, whose load decides whether a new address is declared now.
    busy_from: Option<Host>,
}

/// What forwarding a link needs (`link_forward.rs`): this node's host (its peer
/// connections) and the node's forwarding counters.
pub struct ForwardVia {
    pub host: Host,
    pub stats: Arc<ForwardStats>,
}

/// Where to send an attach that a replica here cannot place because it is no voter and
/// knows no leader: the placement's preferred leader unless that is this node (a move
/// often brings the preferred leader's replica here, and the group is led elsewhere until
/// it is handed back), else the lowest other replica of the placement — a voter that
/// knows the leader redirects again (or serves), one that is joining too sends the client
/// on (bounded by the client's redirect limit).
fn ask_elsewhere(node: NodeId, placed: &AddressPlacement) -> Option<NodeId> {
    if placed.leader != node {
        return Some(placed.leader);
    }
    placed.replicas.iter().copied().find(|&r| r != node)
}

/// What one look at the state says.
enum Seen {
    Done(Route),
    NotPlaced,
    Wait(&'static str),
}

impl GroupRouter {
    pub fn new(
        node: NodeId,
        meta: MetaGroup,
        opener: Arc<GroupOpener>,
        drivers: Drivers,
    ) -> GroupRouter {
        GroupRouter {
            node,
            meta,
            opener,
            drivers,
            forward: None,
            busy_from: None,
        }
    }

    /// Declares no new address while `host` is busy (see the module docs).
    pub fn busy_from(mut self, host: Host) -> GroupRouter {
        self.busy_from = Some(host);
        self
    }

    /// Why this node should not declare a new address now, if it should not.
    fn busy(&self) -> Option<String> {
        let h = self.busy_from.as_ref()?.hibernation_counters();
        let waking = h.lost_peer_wakes.queued + h.lost_peer_wakes.in_flight;
        if waking > 0 {
            return Some(format!(
                "busy: {waking} groups of a lost peer are being woken here"
            ));
        }
        (h.lag > DECLARE_BUSY_LAG).then(|| {
            format!(
                "busy: this node runs {} ms late (DECLARE_BUSY_LAG {} ms)",
                h.lag.as_millis(),
                DECLARE_BUSY_LAG.as_millis()
            )
        })
    }

    /// Carries links led elsewhere with `via` (`link-routing: forward`) instead of
    /// redirecting them.
    pub fn forwarding(mut self, via: ForwardVia) -> GroupRouter {
        self.forward = Some(via);
        self
    }

    /// Whether this node's driver of `address` serves it now.
    fn served_here(&self, address: &str) -> bool {
        let drivers = self.drivers.lock().unwrap_or_else(|e| e.into_inner());
        drivers
            .get(address)
            .is_some_and(|d| d.serving().borrow().is_some())
    }

    /// One look: where `address` is served, if that is known now.
    fn look(&self, address: &str, direction: LinkDirection) -> Seen {
        if self.served_here(address) {
            return Seen::Done(Route::Here);
        }
        let Some(placed) = self.meta.machine.address(address) else {
            return Seen::NotPlaced;
        };
        let leader = match self.opener.get(placed.group) {
            Some(open) => {
                let l = *open.handle.leadership().borrow();
                match l.leader {
                    _ if l.leads => return Seen::Wait("this node leads it and is activating"),
                    Some(other) => other,
                    // A replica that is no voter here (one a move has just opened, still
                    // empty) hears of the leader only when the leader reaches it — after
                    // the balancer's move adds it, seconds later under a drain: its
                    // ignorance says nothing about an election. Another replica of the
                    // placement knows (see `ask_elsewhere`). Not when forwarding: the
                    // carried link follows this replica's view of the leader and would
                    // be given up at once ("no longer followed"); it waits for the leader
                    // to reach the replica, as before.
                    None if self.forward.is_none()
                        && !open.handle.status().voters.contains(&self.node) =>
                    {
                        match ask_elsewhere(self.node, &placed) {
                            Some(other) => other,
                            None => return Seen::Wait("its replica here is still joining"),
                        }
                    }
                    None => return Seen::Wait("its group is electing a leader"),
                }
            }
            None if placed.leader != self.node => placed.leader,
            None => return Seen::Wait("its group is being opened here"),
        };
        // Both directions are carried: producers (`link_forward.rs`) and consumers
        // (`link_forward/consume.rs`).
        let _ = direction;
        if let Some(via) = &self.forward {
            let Some(member) = self.meta.machine.members().remove(&leader) else {
                return Seen::Wait("its leader's member address is not known yet");
            };
            let remote = RemoteLeader {
                address: address.to_owned(),
                leader,
                peer: member.peer,
                host: via.host.clone(),
                leadership: self.opener.get(placed.group).map(|o| o.handle.leadership()),
                stats: Arc::clone(&via.stats),
            };
            return Seen::Done(Route::Forward(Arc::new(remote)));
        }
        match self.client_address(leader) {
            Some((host, port, amqps_port)) => Seen::Done(Route::Elsewhere {
                host,
                port,
                amqps_port,
            }),
            None => Seen::Wait("its leader's client address is not known yet"),
        }
    }

    /// `host`, AMQP port and amqps port of node `id`'s client listeners, from group 0's
    /// members (the amqps port from its member address, `host:peer/amqp/amqps`, the
    /// default amqps port when it names none — as the one-group mode's front door does).
    fn client_address(&self, id: NodeId) -> Option<(String, u16, u16)> {
        let member = self.meta.machine.members().remove(&id)?;
        let (host, port) = split_host_port(&member.amqp)?;
        let (_, amqps_port) = split_host_port(&identity::amqps_addr(&member.peer))?;
        Some((host, port, amqps_port))
    }

    /// The route, waiting (declaring first when allowed) up to [`ROUTE_WAIT`].
    async fn route_waiting(
        &self,
        address: &str,
        may_create: bool,
        direction: LinkDirection,
    ) -> Route {
        let deadline = Instant::now() + ROUTE_WAIT;
        let mut declared = false;
        let mut why: &str;
        loop {
            match self.look(address, direction) {
                Seen::Done(route) => return route,
                Seen::NotPlaced if !may_create => return Route::Here,
                Seen::NotPlaced if !declared => {
                    if let Some(busy) = self.busy() {
                        tracing::debug!(address, %busy, "declaration refused");
                        return Route::Unavailable(format!("{busy}; attach again later"));
                    }
                    declared = true;
                    let declare = self.meta.declare_address_anywhere(address);
                    match tokio::time::timeout_at(deadline, declare).await {
                        Ok(Ok(group)) => {
                            tracing::info!(address, group, "address declared");
                            continue;
                        }
                        Ok(Err(e)) => return Route::Unavailable(format!("placing it failed: {e}")),
                        Err(_) => why = "placing it took too long",
                    }
                }
                Seen::NotPlaced => why = "it is being placed",
                Seen::Wait(w) => why = w,
            }
            if Instant::now() >= deadline {
                return Route::Unavailable(format!("{why} (waited {ROUTE_WAIT:?})"));
            }
            tokio::time::sleep(ROUTE_POLL).await;
        }
    }
}

impl AddressRouter for GroupRouter {
    fn route(&self, address: &str, may_create: bool, direction: LinkDirection) -> Route {
        match self.look(address, direction) {
            Seen::Done(route) => return route,
            Seen::NotPlaced if !may_create => return Route::Here,
            _ => {}
        }
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(r) if r.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => r,
            _ => return Route::Unavailable("not served here yet".into()),
        };
        tokio::task::block_in_place(|| {
            runtime.block_on(self.route_waiting(address, may_create, direction))
        })
    }
}

/// `host` (brackets of an IPv6 literal removed) and port of `host:port`.
fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_owned(), port.parse().ok()?))
}
