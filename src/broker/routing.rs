//! Where a clustered address is served: the seam between the connection engine and a
//! cluster whose addresses are led by different nodes (`cluster-mode: groups`).
//!
//! The broker holds at most one [`AddressRouter`] ([`super::Broker::route_by`]); the
//! connection engine asks it, on every attach to a named address, whether the address
//! is served [`Route::Here`], led by another node ([`Route::Elsewhere`], the client is to
//! attach there; or [`Route::Forward`], the link stays here and is carried to the leader,
//! see `forwarding.rs`) or has no server now ([`Route::Unavailable`], with a reason).
//! Without a router every address is served here (a single node, or the one-group
//! cluster).
//!
//! Invariant: a router answers `Here` only once this broker serves the address (its
//! queue is adopted), so an attach never auto-creates a local queue under the name of a
//! clustered one.
//!
//! Does not: name the cluster layer (the router is implemented in `raft/`), choose an AMQP
//! condition (`connection/errors.rs` does), or carry a forwarded link's messages (the
//! [`super::forwarding::RemoteAddress`] the router hands out does).

/// Where an address is served, as the router sees it now.
#[derive(Debug, Clone)]
pub enum Route {
    /// This broker serves it: resolve it as usual.
    Here,
    /// Another node leads it: its client listener.
    Elsewhere {
        host: String,
        /// Its AMQP port (for a client that came in over plain TCP).
        port: u16,
        /// Its amqps port (for a client that came in over TLS).
        amqps_port: u16,
    },
    /// Another node leads it and this node carries the link there (producer links only).
    Forward(std::sync::Arc<dyn super::forwarding::RemoteAddress>),
    /// Nobody serves it now (an election, a placement that failed): why.
    Unavailable(String),
}

/// Which way the link being routed carries messages, as the broker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkDirection {
    /// A producer's link: messages come in.
    Produce,
    /// A consumer's link: messages go out.
    Consume,
}

/// Answers where an address is served. `route` may wait, bounded by its own limit (an
/// address being placed, an election), and must not be called from a current-thread
/// runtime when it does.
pub trait AddressRouter: Send + Sync + 'static {
    /// Where `address` is served; `may_create`: an address not placed yet is placed (as a
    /// new queue) rather than refused; `direction`: [`Route::Forward`] is answered only
    /// for a link the router can carry.
    fn route(&self, address: &str, may_create: bool, direction: LinkDirection) -> Route;
}
