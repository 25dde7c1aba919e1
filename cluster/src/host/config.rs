//! How a [`super::Host`] runs its groups: [`HostConfig`] and its defaults, and the openraft
//! configuration every group of the host shares (validated once, at the host's start).
//! Does not: hold any state; a config is read at `Host::start` and never changes.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use entrepot_storage::LogConfig;
use openraft::{Config, SnapshotPolicy};

use super::MAX_PAYLOAD_ENTRIES;
use crate::error::{ClusterError, Result};
use crate::hibernate::HibernationConfig;
use crate::peer_server::PeerServerOptions;
use crate::types::NodeId;

/// Default: longest a proposal waits for its commit before [`crate::GroupError::Timeout`].
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default: entries applied between two snapshots of a group.
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 16_384;
/// Largest `snapshot_every` (more would overflow openraft's arithmetic): "never", in effect.
pub const SNAPSHOT_EVERY_MAX: u64 = 1 << 62;
/// Default: entries kept below a snapshot for followers that lag a little.
pub const PURGE_KEEP_ENTRIES: u64 = 1024;

/// How a host runs its groups.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// This node's id in every group.
    pub node: NodeId,
    /// The node log is in `dir/log`, the groups' snapshots in `dir/groups`.
    pub dir: PathBuf,
    /// The node log's segment log (`sync` decides what "on disk" means for a commit).
    pub log: LogConfig,
    /// openraft's heartbeat interval.
    pub heartbeat: Duration,
    /// Election timeouts are drawn from this range.
    pub election_timeout: Range<Duration>,
    /// A group snapshots after this many applied entries (at most [`SNAPSHOT_EVERY_MAX`]).
    pub snapshot_every: u64,
    /// Entries kept below a snapshot (more than `lowest_needed` asks for).
    pub purge_keep: u64,
    /// Longest a proposal waits for its commit.
    pub propose_timeout: Duration,
    /// TLS and secret of the inter-node port (the same for the dialling side).
    pub peer: PeerServerOptions,
    /// Hibernate idle groups (`hibernate.rs`; `None`, the default: never). With it, the
    /// host stops a group's Raft instance on every replica once it is idle, wakes it on a
    /// write or a peer's RPC, pings the members of its groups, and opens a group the node
    /// log already holds *stopped* (see [`crate::Host::open_group`]). Its liveness timeout is
    /// raised to at least the longest election timeout (a lower one wakes groups on
    /// false positives when a loaded process answers pings late). Every node of a cluster
    /// must know RPC kinds 6/7 (`cluster/FORMAT.md`) before one turns it on.
    pub hibernation: Option<HibernationConfig>,
    /// Build, install and load snapshots on the runtime's own thread instead of tokio's
    /// blocking threads (`false`, the default). Only for a deterministic simulation on a
    /// current-thread runtime: a blocking thread's timing would decide when its waiter
    /// runs again, so a seed would not replay exactly; a server never sets it (a large
    /// snapshot would stall every group's tasks meanwhile).
    pub snapshot_inline: bool,
}

impl HostConfig {
    /// The defaults, with the broker's Raft timing (heartbeat 40 ms, elections 120–240 ms).
    pub fn new(node: NodeId, dir: impl Into<PathBuf>) -> HostConfig {
        HostConfig {
            node,
            dir: dir.into(),
            log: LogConfig::default(),
            heartbeat: Duration::from_millis(40),
            election_timeout: Duration::from_millis(120)..Duration::from_millis(240),
            snapshot_every: SNAPSHOT_EVERY_ENTRIES,
            purge_keep: PURGE_KEEP_ENTRIES,
            propose_timeout: PROPOSE_TIMEOUT,
            peer: PeerServerOptions::default(),
            hibernation: None,
            snapshot_inline: false,
        }
    }

    /// The hibernation this host runs, if any, with its liveness timeout raised to the
    /// longest election timeout.
    pub(super) fn hibernation_config(&self) -> Option<HibernationConfig> {
        self.hibernation.map(|mut h| {
            h.liveness_timeout = h.liveness_timeout.max(self.election_timeout.end);
            h
        })
    }

    pub(super) fn raft_config(&self) -> Result<Arc<Config>> {
        let ms = |d: Duration| d.as_millis().max(1) as u64;
        let config = Config {
            heartbeat_interval: ms(self.heartbeat),
            election_timeout_min: ms(self.election_timeout.start),
            election_timeout_max: ms(self.election_timeout.end),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(
                self.snapshot_every.clamp(1, SNAPSHOT_EVERY_MAX),
            ),
            // Never purge by openraft's own policy: the host purges, honouring the
            // machine's lowest needed index.
            max_in_snapshot_log_to_keep: u64::MAX,
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            ..Config::default()
        };
        config
            .validate()
            .map(Arc::new)
            .map_err(|e| ClusterError::GroupStopped {
                group: 0,
                reason: format!("invalid Raft timing: {e}"),
            })
    }
}
