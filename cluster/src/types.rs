//! The Raft type configuration and what one Raft entry carries.
//!
//! One entry is one [`Request`]: a whole produce batch for one address (many messages,
//! so one Raft round trip and one fsync cover them all), or a batch of consumer outcomes,
//! or a subscription cursor move. They are stored and shipped in the binary encoding of
//! `entry.rs`, never JSON. (openraft's `serde` feature needs them to be `Serialize`, which
//! is all the derives are for.)

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Longest address or subscription name in a request, in bytes.
pub const MAX_ADDRESS_BYTES: usize = 1024;
/// Most messages one produce batch (one Raft entry) may carry.
pub const MAX_BATCH_MESSAGES: usize = 64 * 1024;
/// Largest single message; the whole entry is also bounded by the segment log's
/// `record_bytes_max`.
pub const MAX_MESSAGE_BYTES: usize = entrepot_storage::DEFAULT_RECORD_BYTES as usize;
/// Most message ids one settle request may carry.
pub const MAX_SETTLE_IDS: usize = 64 * 1024;
/// Most nodes a membership may name.
pub const MAX_MEMBERS: usize = 1024;
/// Most voter sets in a membership (openraft's joint consensus uses two).
pub const MAX_JOINT_CONFIGS: usize = 2;
/// Largest broker operation batch ([`Request::Ops`]) in one entry.
pub const MAX_OPS_BYTES: usize = 64 << 20;
/// Longest inter-node address (`host:port`) of a member.
pub const MAX_NODE_ADDR_BYTES: usize = 256;

openraft::declare_raft_types!(
    /// Entrepot's Raft types: u64 node ids (the StatefulSet ordinal), `BasicNode` holding
    /// the inter-node address, entries carrying [`Request`]s.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = crate::snapshot_data::SnapshotData,
        AsyncRuntime = crate::runtime::SeededTokio,
);

/// A node's id: the ordinal of its StatefulSet pod, or `--node-id`.
pub type NodeId = u64;
/// One Raft log entry of this cluster.
pub type Entry = openraft::Entry<TypeConfig>;
/// A Raft log id (term, leader, index).
pub type LogId = openraft::LogId<NodeId>;

/// What one Raft entry asks the state machine to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Messages for one address, in the order the producers' transfers arrived. They get
    /// consecutive message ids when applied.
    Produce {
        address: String,
        messages: Vec<Bytes>,
    },
    /// Messages settled for good by a consumer outcome (`accepted`, or moved to the
    /// dead-letter address): they will never be delivered again.
    Settle {
        address: String,
        message_ids: Vec<u64>,
    },
    /// A subscription consumed everything below `floor`.
    Cursor { subscription: String, floor: u64 },
    /// A batch of the broker's store operations (stored messages, acknowledgements,
    /// subscription changes), encoded by the broker (`src/cluster/ops.rs`); opaque here.
    /// This is what a broker node replicates; a broker never writes the variants above
    /// (they are part of entry format 1, and the cluster crate's own tests replicate them).
    Ops(Bytes),
    /// Several proposals of the node-level host in one entry, in the host's batch
    /// encoding (`host/batch.rs`); what a host group writes (request tag 5).
    Batch(Bytes),
}

/// What applying a [`Request`] answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Nothing to say (blank and membership entries).
    None,
    /// The batch's messages got ids `first_id..first_id + count`.
    Produced { first_id: u64, count: u32 },
    /// How many of the settled ids were still stored.
    Settled { removed: u32 },
    /// The cursor is now at this floor (never moves backwards).
    CursorMoved { floor: u64 },
}
