//! # Entrepot
//!
//! A persistent store-and-forward AMQP 1.0 broker node. The pieces, from the wire in:
//!
//! * [`amqp`] — the protocol layer: framing, performatives, lazy message views, SASL.
//!   No I/O, no queues.
//! * [`connection`] — one task per client connection: our own connection engine
//!   (sessions, links, flow control) on top of [`amqp`].
//! * [`broker`] — queues and the message store they share (on `entrepot-storage`).
//! * [`server`] — listeners, connection limits, shutdown; [`metrics`] — Prometheus and
//!   health over HTTP; [`config`] — settings and their limits.
//! * [`manifest`] — address spaces, addresses, plans and users from YAML manifests;
//!   [`auth`] — credential checks and authorization rules; [`tls`] — the amqps listener's
//!   certificates.
//! * [`fuzzing`] — entry points shared by the cargo-fuzz targets (`fuzz/`) and the
//!   corpus replay test; not used by the broker itself.
//! * [`raft`] — a clustered node: the store replicated through Raft (`entrepot-cluster`),
//!   the broker active on the leader only, followers forwarding clients to it.
//!
//! Dependencies point one way: `connection → broker → entrepot-storage`; `broker` never
//! sees a socket and `amqp` never sees a queue.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod amqp;
pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod fuzzing;
pub mod manifest;
pub mod metrics;
pub mod raft;
pub mod server;
pub mod status;
#[cfg(test)]
mod test_rng;
pub mod tls;
