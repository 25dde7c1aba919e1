//! openraft's `RaftStateMachine` over the stand-in [`Model`], with binary snapshots that
//! are persisted (so a purged log prefix is never the only copy of applied state).
//!
//! ```text
//! // Format (file `snapshot`, envelope of state_file.rs, magic "ENTRPSNP"):
//! //   body = { last_log_id: opt<log_id> | membership_log_id: opt<log_id> | membership
//! //          | snapshot_id: str | data: bytes }       (data = Model::encode, see model.rs)
//! ```
//! Invariants: the snapshot file is replaced (tmp, fsync, rename, dir fsync) before
//! `build_snapshot` or `install_snapshot` returns, because openraft may purge the log up
//! to the snapshot right after. At open, the model is the last snapshot's; openraft then
//! re-applies committed entries after it.
//!
//! Does not: persist applied state between snapshots (the broker's state machine will be
//! its own log and will), stream snapshots in chunks, or bound the snapshot's size beyond
//! [`MAX_SNAPSHOT_BYTES`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};

use crate::codec::{Decoder, Encoder};
use crate::entry::{decode_membership, encode_membership};
use crate::error::{raft_err, ClusterError, RaftStorageError, Result};
use crate::model::Model;
use crate::snapshot_data::SnapshotData;
use crate::state_file::{self, decode_opt_log_id, encode_opt_log_id};
use crate::types::{Entry, LogId, NodeId, Response, TypeConfig, MAX_ADDRESS_BYTES};

/// Largest persisted or received snapshot: 4 GiB − 1 (the envelope's length is a u32).
pub const MAX_SNAPSHOT_BYTES: usize = u32::MAX as usize;
const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_MAGIC: &[u8; 8] = b"ENTRPSNP";

/// The state machine of one Raft group. Cheap to clone (the snapshot builder is a clone).
#[derive(Clone)]
pub struct StateMachineStore {
    dir: PathBuf,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
    model: Model,
    current: Option<StoredSnapshot>,
    /// Counts snapshots built by this process, to make snapshot ids unique.
    built: u64,
}

#[derive(Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

impl StateMachineStore {
    /// Opens the state machine in `dir`, starting from the persisted snapshot if any.
    pub fn open(dir: impl AsRef<Path>) -> Result<StateMachineStore> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| ClusterError::io("creating", &dir, e))?;
        let mut state = State::default();
        if let Some(body) =
            state_file::read_bounded(&dir, SNAPSHOT_FILE, SNAPSHOT_MAGIC, MAX_SNAPSHOT_BYTES)?
        {
            let snap = decode_snapshot_file(body)?;
            state.model = Model::decode(Bytes::from(snap.data.clone()))?;
            state.last_applied = snap.meta.last_log_id;
            state.membership = snap.meta.last_membership.clone();
            state.current = Some(snap);
        }
        Ok(StateMachineStore {
            dir,
            state: Arc::new(Mutex::new(state)),
        })
    }

    /// A copy of the applied model (for tests and, later, the broker's reads).
    pub fn model(&self) -> Result<Model> {
        Ok(self.lock()?.model.clone())
    }

    /// The log id of the last applied entry.
    pub fn last_applied(&self) -> Result<Option<LogId>> {
        Ok(self.lock()?.last_applied)
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| ClusterError::Storage(entrepot_storage::StorageError::Closed))
    }

    fn apply_entries(&self, entries: impl Iterator<Item = Entry>) -> Result<Vec<Response>> {
        let mut state = self.lock()?;
        let mut out = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Blank => Response::None,
                EntryPayload::Normal(req) => state.model.apply(&req),
                EntryPayload::Membership(m) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::None
                }
            });
        }
        Ok(out)
    }

    fn build(&self) -> Result<Snapshot<TypeConfig>> {
        let mut state = self.lock()?;
        state.built += 1;
        let data = state.model.encode()?;
        let last = state.last_applied;
        let snapshot_id = match last {
            Some(l) => format!(
                "{}-{}-{}-{}",
                l.leader_id.term, l.leader_id.node_id, l.index, state.built
            ),
            None => format!("none-{}", state.built),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: state.membership.clone(),
            snapshot_id,
        };
        let snap = StoredSnapshot { meta, data };
        self.persist(&snap)?;
        state.current = Some(snap.clone());
        Ok(Snapshot {
            meta: snap.meta,
            snapshot: Box::new(SnapshotData::memory(snap.data)),
        })
    }

    fn install(&self, meta: &SnapshotMeta<NodeId, BasicNode>, data: Vec<u8>) -> Result<()> {
        let model = Model::decode(Bytes::from(data.clone()))?;
        let snap = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.persist(&snap)?;
        let mut state = self.lock()?;
        state.model = model;
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        state.current = Some(snap);
        Ok(())
    }

    fn persist(&self, snap: &StoredSnapshot) -> Result<()> {
        let body = encode_snapshot_file(&snap.meta, &snap.data)?;
        state_file::write(&self.dir, SNAPSHOT_FILE, SNAPSHOT_MAGIC, &body, true)
    }
}

/// Persists a snapshot as `dir/snapshot` (the format above, tmp + fsync + rename), for a
/// state machine other than the stand-in (the broker's store).
pub fn write_snapshot_file(
    dir: &Path,
    meta: &SnapshotMeta<NodeId, BasicNode>,
    data: &[u8],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ClusterError::io("creating", dir, e))?;
    let body = encode_snapshot_file(meta, data)?;
    state_file::write(dir, SNAPSHOT_FILE, SNAPSHOT_MAGIC, &body, true)
}

/// A persisted snapshot: what it covers, and its data.
pub type SnapshotFile = (SnapshotMeta<NodeId, BasicNode>, Vec<u8>);

/// Reads the snapshot [`write_snapshot_file`] persisted in `dir`, if any.
pub fn read_snapshot_file(dir: &Path) -> Result<Option<SnapshotFile>> {
    match state_file::read_bounded(dir, SNAPSHOT_FILE, SNAPSHOT_MAGIC, MAX_SNAPSHOT_BYTES)? {
        Some(body) => {
            let snap = decode_snapshot_file(body)?;
            Ok(Some((snap.meta, snap.data)))
        }
        None => Ok(None),
    }
}

fn encode_snapshot_file(meta: &SnapshotMeta<NodeId, BasicNode>, data: &[u8]) -> Result<Vec<u8>> {
    crate::codec::check_limit("snapshot", data.len(), MAX_SNAPSHOT_BYTES - 4096)?;
    let mut e = Encoder::with_capacity(data.len() + 256);
    encode_opt_log_id(&mut e, &meta.last_log_id);
    encode_opt_log_id(&mut e, meta.last_membership.log_id());
    encode_membership(&mut e, meta.last_membership.membership())?;
    crate::codec::check_limit("snapshot id", meta.snapshot_id.len(), MAX_ADDRESS_BYTES)?;
    e.str(&meta.snapshot_id);
    e.bytes(data);
    Ok(e.buf)
}

fn decode_snapshot_file(body: Bytes) -> Result<StoredSnapshot> {
    let mut d = Decoder::new(body, "snapshot file");
    let last_log_id = decode_opt_log_id(&mut d)?;
    let membership_log_id = decode_opt_log_id(&mut d)?;
    let membership = decode_membership(&mut d)?;
    let snapshot_id = d.str("snapshot id", MAX_ADDRESS_BYTES)?;
    let data = d.bytes("snapshot data", MAX_SNAPSHOT_BYTES)?.to_vec();
    d.finish()?;
    let meta = SnapshotMeta {
        last_log_id,
        last_membership: StoredMembership::new(membership_log_id, membership),
        snapshot_id,
    };
    Ok(StoredSnapshot { meta, data })
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        self.build()
            .map_err(raft_err(StorageIOError::write_state_machine))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), RaftStorageError> {
        let state = self
            .lock()
            .map_err(raft_err(StorageIOError::read_state_machine))?;
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        self.apply_entries(entries.into_iter())
            .map_err(raft_err(StorageIOError::write_state_machine))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, RaftStorageError> {
        Ok(Box::new(SnapshotData::memory(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), RaftStorageError> {
        let data = snapshot.into_memory().ok_or(ClusterError::Decode {
            what: "snapshot",
            position: 0,
            reason: "the stand-in state machine receives snapshots in memory",
        });
        data.and_then(|data| self.install(meta, data))
            .map_err(raft_err(StorageIOError::write_state_machine))
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        let state = self
            .lock()
            .map_err(raft_err(StorageIOError::read_state_machine))?;
        Ok(state.current.clone().map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(SnapshotData::memory(s.data)),
        }))
    }
}
