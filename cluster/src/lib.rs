//! # entrepot-cluster
//!
//! Raft replication for Entrepot, on [openraft] 0.9 (`storage-v2`). This crate is the only
//! one that talks to openraft; it never touches a client socket.
//!
//! What it owns, so far (issue 7, foundation):
//! * [`TypeConfig`] and the replicated commands ([`Request`]): one Raft entry is one
//!   produce batch for an address (many messages — openraft writes one entry per
//!   `client_write`, so batching is what makes replication cheap), a batch of consumer
//!   settlements, or a subscription cursor move. Entries are stored and shipped in a
//!   versioned, bounded binary encoding (`entry.rs`), never JSON.
//! * [`LogStore`]: openraft's log storage on an `entrepot_storage::Log` — one record per
//!   entry, group-commit durability before openraft hears "flushed", suffix truncation,
//!   segment-granular purge, the vote in a durable state file.
//! * The persisted snapshot file of a state machine ([`write_snapshot_file`],
//!   [`read_snapshot_file`], `snapshot_file.rs`): what a snapshot covers, and its data.
//! * [`identity`]: node id from a StatefulSet hostname or `--node-id`, `--peers` parsing.
//! * The inter-node port, for many Raft groups per node (issue 12 step 2): [`TcpNetwork`]
//!   (openraft's network of one group, [`TcpNetwork::group`]; every group of a node shares
//!   one multiplexed connection per peer, `network.rs`, `peer_connection.rs`) and
//!   [`PeerServer`] (accepts peers, hands each RPC to the `Raft` of the group it names
//!   from a [`GroupRegistry`], `peer_server.rs`, `groups.rs`); frames
//!   `{ len: u32 | kind: u8 | body }` (`frame.rs`) with versioned binary bodies that carry
//!   a request id and a group (`rpc.rs`) and reuse the entry encoding.
//!
//! Invariants:
//! * An entry is reported flushed to openraft only after the segment log's sync covered it.
//! * Raft indexes in a log are dense and equal record offset + one bias; checked on read.
//! * Every length read from disk is bounded by a `MAX_*` constant before allocating.
//!
//! The state machine is the broker's: its store (`src/raft/state_machine.rs` in the broker
//! crate), with activation on the leader, forwarding and membership administration; this
//! crate has none of its own. openraft's storage conformance suite runs on this crate's
//! [`LogStore`] with that state machine (`tests/raft_conformance.rs` in the broker crate);
//! this crate's own Raft tests use a minimal test-only one (`tests/support/machine.rs`).
//!
//! * [`auth`]: peers prove they share the cluster secret (HMAC challenge-response)
//!   before any RPC.
//! * [`PeerTls`]: TLS on the inter-node port, mutually authenticated against one cluster
//!   CA (`tls.rs`); connections are plain or TLS streams behind one type (`stream.rs`).
//!
//! * [`membership`]: a node joins by itself (scale up) and leaves on a drain (scale
//!   down): `KIND_JOIN` / `KIND_LEAVE` on the inter-node port, served by the leader.
//!
//! * [`node_log`]: one segment log per node shared by every Raft group on it ([`NodeLog`];
//!   each group's openraft storage is a [`GroupLog`]): records name their group, one group
//!   commit covers every group, a segment goes when no group needs it (issue 12 step 4;
//!   not wired into the broker yet, which runs one [`LogStore`] per node).
//!
//! * [`host`]: the node-level host the broker is to use instead of openraft (issue 12
//!   point 5): a [`Host`] owns the node log, the registry, the network and the peer
//!   server; a [`GroupHandle`] per group proposes (resolving with the committed log
//!   index), reads committed payloads as zero-copy slices of the node log, and watches
//!   leadership; the group's state machine is a [`GroupMachine`] (indexes and payloads,
//!   no openraft type), snapshots carry the payloads it still needs, and the log is
//!   purged only below its lowest needed index.
//!
//! * [`runtime`]: openraft runs on tokio with its election timeouts drawn from a
//!   per-thread generator a simulation seeds, so a simulation seed replays exactly.
//!
//! * [`hibernate`]: idle groups stop their Raft instances (a hibernate handshake led by
//!   the group's leader), wake on a write or an RPC, and a lost peer wakes the stopped
//!   groups it led, seen by one liveness heartbeat per peer (issue 12 step 5).
//!
//! * [`placement`]: which members hold each Raft group's replicas and which should lead,
//!   balanced and moved as little as possible (pure; not wired in yet — issue 12 step 5).
//!
//! Not here yet: one group per address in the broker (the host is built for it, unused so
//! far; the broker registers its one Raft as group 0, [`METADATA_GROUP`]).
//!
//! On-disk formats: `cluster/FORMAT.md`.
//!
//! ## A tour: open → append through openraft → read back
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use entrepot_cluster::LogStore;
//! use entrepot_storage::LogConfig;
//! use openraft::storage::RaftLogStorage;
//! use openraft::RaftLogReader;
//!
//! let dir = tempfile::tempdir()?;
//! let config = LogConfig { segment_bytes: 1 << 20, record_bytes_max: 64 << 10, ..LogConfig::default() };
//! let mut log = LogStore::open(dir.path(), config.clone())?;
//! assert_eq!(log.get_log_state().await?.last_log_id, None);
//! assert!(log.try_get_log_entries(0..10).await?.is_empty());
//! # Ok(()) }
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod app_request;
pub mod auth;
mod codec;
pub mod entry;
mod error;
pub mod forward;
mod frame;
pub mod groups;
pub mod hibernate;
pub mod host;
pub mod identity;
mod index_map;
mod log_store;
pub mod membership;
mod network;
pub mod node_log;
mod peer_connection;
mod peer_server;
pub mod placement;
mod rpc;
pub mod runtime;
#[cfg(feature = "sim-net")]
pub mod sim_net;
pub mod snapshot_data;
mod snapshot_file;
mod state_file;
mod stream;
mod tls;
mod types;

pub use app_request::{
    AppCallError, AppFuture, AppHandler, APP_TIMEOUT_MAX, MAX_APP_PAYLOAD_BYTES,
    MAX_APP_REQUESTS_IN_FLIGHT,
};
pub use auth::PeerSecret;
pub use error::{ClusterError, GroupError, RaftStorageError, Result};
pub use forward::{Proposer, MAX_FORWARDED_IN_FLIGHT, MAX_FORWARD_HOPS};
pub use frame::{FRAME_HEADER_LEN, FRAME_TRANSFER_TIMEOUT, MAX_RPC_FRAME_BYTES};
pub use groups::{
    GroupRegistry, GroupStarter, HeardCommit, HostState, Stopped, WriteHold, MAX_CONCURRENT_WAKES,
    MAX_HOSTED_GROUPS, METADATA_GROUP, WAKE_TIMEOUT,
};
pub use hibernate::{Hibernation, HibernationConfig};
pub use host::{
    GroupHandle, GroupMachine, GroupStatus, HibernationCounters, Host, HostConfig, Leadership,
    MachineError, Position, Proposal, MAX_BATCH_BYTES, MAX_BATCH_SLOTS, MAX_ENTRIES_IN_FLIGHT,
    MAX_PROPOSAL_BYTES, MAX_READ_ENTRIES,
};
pub use log_store::{LogStore, LogStoreReader, FLUSH_QUEUE_MAX, LOG_DIR, RAFT_ENTRY_FLAG};
pub use network::{PeerCallError, PeerClient, TcpNetwork, MAX_PEER_LINKS};
pub use node_log::{GroupLog, GroupLogReader, NodeLog};
pub use peer_connection::{MAX_IN_FLIGHT_PER_PEER, SILENT_CONNECTION_TIMEOUT};
pub use peer_server::{
    PeerListener, PeerServer, PeerServerOptions, MAX_CONCURRENT_REQUESTS_PER_CONNECTION,
    MAX_PEER_CONNECTIONS,
};
pub use rpc::{
    HibernateRefusal, HibernateRequest, MembershipReply, MembershipRequest, RemoteRefusal,
    MAX_RPC_ENTRIES, MAX_RPC_STRING_BYTES, RPC_VERSION,
};
pub use snapshot_data::{SnapshotData, SnapshotSource};
pub use snapshot_file::{
    read_snapshot_file, write_snapshot_file, SnapshotFile, MAX_SNAPSHOT_BYTES,
};
pub use state_file::{MAX_STATE_FILE_BYTES, STATE_FILE_VERSION};
pub use tls::{PeerTls, PeerTlsError, PEER_TLS_HANDSHAKE_TIMEOUT};
pub use types::*;
