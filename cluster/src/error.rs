//! The cluster crate's one error type, and its mapping onto openraft's `StorageError`.
//!
//! Decoding failures name what was being decoded and where, so a corrupt Raft entry,
//! state file or snapshot can be found; `Storage` wraps the segment log's own errors
//! (whose `is_fatal` still tells whether the node must stop); `Tls` says which inter-node
//! TLS file is unusable and why.

use std::io;
use std::path::PathBuf;

use openraft::{AnyError, StorageIOError};

/// Errors of the Raft storage, codecs and node identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The segment log failed (see [`entrepot_storage::StorageError::is_fatal`]).
    #[error(transparent)]
    Storage(#[from] entrepot_storage::StorageError),
    /// A file operation on a state or snapshot file failed.
    #[error("{verb} {path}: {source}")]
    Io {
        verb: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Bytes that do not parse as the named structure (truncated, trailing bytes, bad tag).
    #[error("cannot decode {what} at byte {position}: {reason}")]
    Decode {
        what: &'static str,
        position: usize,
        reason: &'static str,
    },
    /// A length or count read from disk or the wire is larger than its `MAX_*` bound.
    #[error("{what} of {len} exceeds the limit of {max}")]
    LimitExceeded {
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// A file or encoded value with a format version this build does not know.
    #[error("{what} has format version {found}, this build reads version {supported}")]
    UnsupportedVersion {
        what: &'static str,
        found: u16,
        supported: u16,
    },
    /// A state or snapshot file that does not start with its magic bytes or fails its CRC.
    #[error("{path} is damaged: {reason}")]
    BadFile { path: PathBuf, reason: &'static str },
    /// openraft asked to append an entry at or below the last one without truncating first.
    #[error("raft entry {got} appended after entry {last}")]
    AppendOutOfOrder { last: u64, got: u64 },
    /// A record read back does not carry the Raft index its offset implies.
    #[error("record at offset {offset} holds raft index {found}, expected {expected}")]
    IndexMismatch {
        offset: u64,
        expected: u64,
        found: u64,
    },
    /// A node-log record that cannot be read or applied at open (`node_log/recovery.rs`):
    /// where it is, which group it names when that much decoded, and what is wrong.
    #[error("node-log record at offset {offset} (group {group:?}): {source}")]
    NodeLogRecord {
        offset: u64,
        group: Option<u64>,
        #[source]
        source: Box<ClusterError>,
    },
    /// A record in a node log without the node-log flags: another log's directory.
    #[error("record at offset {offset} has flags {flags:#x}, not a node-log record")]
    ForeignRecord { offset: u64, flags: u16 },
    /// The index of a group points at a record that is not one of its entries.
    #[error("record at offset {offset} is not an entry of raft group {group}")]
    NotAnEntry { offset: u64, group: u64 },
    /// A group this node log does not hold (never opened, or removed).
    #[error("raft group {group} is not held by this node log")]
    UnknownGroup { group: u64 },
    /// A stopped Raft group could not be started again (`groups.rs`: the owner's starter
    /// failed, or the wake exceeded `WAKE_TIMEOUT`).
    #[error("raft group {group} could not be woken: {reason}")]
    GroupStart { group: u64, reason: String },
    /// A stopped Raft group was to be woken, but the registry has no starter
    /// (`GroupRegistry::set_starter`).
    #[error("raft group {group} is stopped and this node has no starter to wake it")]
    NoGroupStarter { group: u64 },
    /// A proposal reached a replica that does not lead its group (`hibernate.rs`).
    #[error("raft group {group}: this node does not lead it (leader {leader:?})")]
    NotLeader { group: u64, leader: Option<u64> },
    /// The group's Raft refused or failed a proposal.
    #[error("raft group {group}: {reason}")]
    Raft { group: u64, reason: String },
    /// A hostname, `--node-id` or `--peers` value that names no node.
    #[error("invalid {what} {value:?}: {reason}")]
    Identity {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    /// The inter-node TLS files cannot be used (`--cluster-tls-*`), or a handshake failed.
    #[error(transparent)]
    Tls(#[from] crate::tls::PeerTlsError),
    /// A read of a group's entry above what this replica has applied (`host/`): only
    /// committed entries are read.
    #[error("entry {index} of raft group {group} is not applied here (applied: {applied:?})")]
    NotApplied {
        group: u64,
        index: u64,
        applied: Option<u64>,
    },
    /// A read of a group's entry that neither the node log nor the group's snapshot holds
    /// any more: below the lowest index its state machine said it still reads.
    #[error("entry {index} of raft group {group} is purged")]
    Purged { group: u64, index: u64 },
    /// A group opened twice on one host (`host/`).
    #[error("raft group {group} is already open on this host")]
    GroupAlreadyOpen { group: u64 },
    /// A group's state machine refused an entry or a snapshot (`host/machine.rs`).
    #[error("state machine of raft group {group}: {source}")]
    Machine {
        group: u64,
        #[source]
        source: crate::host::MachineError,
    },
    /// openraft stopped a group or refused to start it (storage failure, shutdown).
    #[error("raft group {group} stopped: {reason}")]
    GroupStopped { group: u64, reason: String },
}

/// Why a proposal or a membership change of a group did not complete (`host/`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// This node does not lead the group; `leader` is the one it knows of, if any, with
    /// its member address (`host:peer_port/...`), so the caller can go there.
    #[error("raft group {group} is not led by this node (leader: {leader:?} at {leader_addr:?})")]
    NotLeader {
        group: u64,
        leader: Option<u64>,
        leader_addr: Option<String>,
    },
    /// A payload longer than [`crate::host::MAX_PROPOSAL_BYTES`], or than one node-log
    /// record holds (`max` says which).
    #[error("proposal of {len} bytes exceeds the largest a group entry holds ({max})")]
    TooLarge { len: usize, max: usize },
    /// No commit within the host's `propose_timeout` (no quorum reachable, or a slow
    /// one): the entry may still commit later — the outcome is unknown.
    #[error("raft group {group}: not committed within {after:?} (outcome unknown)")]
    Timeout {
        group: u64,
        after: std::time::Duration,
    },
    /// The group's Raft stopped (shutdown or a storage failure) before answering.
    #[error("raft group {group} stopped: {reason}")]
    Stopped { group: u64, reason: String },
    /// A lease round ([`crate::GroupHandle::lease_round`]) was not acknowledged by a
    /// quorum of the group's voters (some answered with a higher vote, or too few
    /// answered at all): this leader may not count on its leadership now.
    #[error("raft group {group}: no quorum acknowledged this leader ({reason})")]
    NoQuorum { group: u64, reason: String },
    /// openraft refused a membership change (another one in progress, a learner that
    /// did not catch up, …).
    #[error("raft group {group}: membership change refused: {reason}")]
    Membership { group: u64, reason: String },
    /// The leader refused a forwarded proposal at once: it already serves
    /// `MAX_FORWARDED_IN_FLIGHT` of them (nothing was queued; try again).
    #[error("raft group {group}: the leader serves {limit} forwarded proposals already")]
    Busy { group: u64, limit: usize },
    /// A proposal forwarded to the group's leader got no answer (`forward.rs`): the
    /// connection failed or timed out after it may have been sent — the outcome is
    /// unknown, as with [`GroupError::Timeout`].
    #[error(
        "raft group {group}: forwarding to leader {leader} failed: {reason} (outcome unknown)"
    )]
    Forward {
        group: u64,
        leader: u64,
        reason: String,
    },
}

impl ClusterError {
    pub(crate) fn io(verb: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ClusterError::Io {
            verb,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn any(&self) -> AnyError {
        AnyError::new(self)
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// openraft's storage error for this crate's node id type.
pub type RaftStorageError = openraft::StorageError<u64>;

/// Builds an openraft storage error from ours with the right subject and verb.
pub(crate) fn raft_err(
    make: fn(AnyError) -> StorageIOError<u64>,
) -> impl Fn(ClusterError) -> RaftStorageError {
    move |e| make(e.any()).into()
}
