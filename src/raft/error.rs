//! A clustered node's errors: why it could not start (beyond what a single node can hit,
//! [`StartError`]), and why its broker could not be activated when it became leader.
//!
//! Neither reaches a client: a start error ends the process (`main` prints the chain), an
//! activation error is logged and activation is tried again. Each variant names the step
//! that failed and keeps the cause as its source.

use std::net::SocketAddr;
use std::path::PathBuf;

use entrepot_cluster::{ClusterError, NodeId};
use openraft::error::Fatal;

use super::snapshot::SnapshotError;
use crate::broker::BrokerError;
use crate::server::StartError;

/// Why a clustered node could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterStartError {
    /// A step a single node takes too (store, listeners, TLS, manifests, final sync).
    #[error(transparent)]
    Node(#[from] StartError),
    /// The data directory holds a single node's messages and no Raft log.
    #[error(
        "{} holds a single-node store ({messages} messages logged) and no Raft log: a \
         clustered node starts from an empty data directory (drain the single node into the \
         cluster instead)",
        dir.display()
    )]
    SingleNodeStore { dir: PathBuf, messages: u64 },
    #[error("opening the store's snapshot")]
    Snapshot(#[source] SnapshotError),
    #[error("opening the Raft log")]
    RaftLog(#[source] ClusterError),
    /// Boxed: openraft's error is large, and this one is rare.
    #[error("Raft settings")]
    RaftSettings(#[source] Box<openraft::ConfigError>),
    #[error("starting Raft")]
    RaftStart(#[source] Box<Fatal<NodeId>>),
    /// The node's Raft host (`cluster-mode: groups`) could not start or open group 0.
    #[error("starting the node's Raft host")]
    Host(#[source] entrepot_cluster::ClusterError),
    #[error("binding the inter-node port {addr}")]
    BindPeers {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Raft stopped before the cluster could be formed (boxed, as the two above: the
    /// error stays small on the success path).
    #[error(transparent)]
    Raft(Box<Fatal<NodeId>>),
}

impl From<Fatal<NodeId>> for ClusterStartError {
    fn from(e: Fatal<NodeId>) -> ClusterStartError {
        ClusterStartError::Raft(Box::new(e))
    }
}

impl From<std::io::Error> for ClusterStartError {
    fn from(e: std::io::Error) -> ClusterStartError {
        ClusterStartError::Node(StartError::Io(e))
    }
}

/// Why this leader's broker could not be activated (it is tried again while it leads).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivationError {
    #[error("no majority confirmed this leader")]
    NoMajority,
    #[error("not the leader after all: {0}")]
    NotLeader(String),
    #[error("this leader's own entries did not commit in time")]
    NotCommitted,
    #[error("Raft stopped")]
    RaftStopped,
    /// Cutting the local tail this node never committed failed.
    #[error(transparent)]
    Storage(#[from] entrepot_storage::StorageError),
    /// Rebuilding the queues from the store failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The gatekeeper (tokens, manifests) could not be built.
    #[error(transparent)]
    Admit(#[from] StartError),
}
