//! openraft's state machine for a broker node: the node's store itself. Applying an
//! entry applies its batch of store operations (`broker/replication.rs`) to the message
//! log, the ack log and the subscription registry of this node.
//!
//! Applied state is not persisted after every entry: at start `last_applied` is the last
//! snapshot's (or none), and openraft re-applies the committed log after it, which is safe
//! because applying is idempotent (and repairs a local tail the last leadership never
//! committed). A snapshot (`snapshot.rs`: the store's live messages, ack sets, registry) is
//! built every [`super::SNAPSHOT_EVERY_ENTRIES`] entries; the store is flushed before the
//! snapshot's state is persisted, so the store on disk always covers the snapshot, and
//! openraft may then purge the log before it. A lagging or new member installs the
//! snapshot: it is sent as a source generated from the store's mapping and received into a
//! file (`raft/sm/receiving`), never held whole in memory.
//!
//! Invariant: every node applies the same operations in the same order, so message
//! offsets, acknowledgements and consumer groups are identical on every node up to the
//! commit index.

// openraft's storage error is large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use entrepot_cluster::{NodeId, RaftStorageError, Request, Response, SnapshotData, TypeConfig};
use entrepot_storage::{AckLog, Log};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};

use super::snapshot::{self, LazySource, SnapshotError, StoreSource, StoreState};
use crate::broker::replication::{self, Applied};

/// Directory (inside the Raft directory) of the persisted snapshot.
pub const SNAPSHOT_DIR: &str = "sm";
/// File (in [`SNAPSHOT_DIR`]) a snapshot from the leader is received into.
const RECEIVING_FILE: &str = "receiving";

/// The store as openraft's state machine; cheap to clone (all clones share the store).
#[derive(Clone)]
pub struct StoreMachine {
    inner: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    snapshot_dir: PathBuf,
    log: Log,
    acks: Arc<AckLog>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    applied: Applied,
    /// Snapshots built by this process (for unique ids).
    built: u64,
}

impl StoreMachine {
    /// [`StoreMachine::open`] with the Raft directory in its usual place, `dir/raft`.
    pub fn new(dir: PathBuf, log: Log, acks: Arc<AckLog>) -> Result<StoreMachine, SnapshotError> {
        let raft_dir = super::raft_dir(&dir);
        StoreMachine::open(dir, &raft_dir, log, acks)
    }

    /// The state machine over a store, starting from the snapshot persisted in
    /// `raft_dir/sm` if any (the store on disk covers it).
    pub fn open(
        dir: PathBuf,
        raft_dir: &Path,
        log: Log,
        acks: Arc<AckLog>,
    ) -> Result<StoreMachine, SnapshotError> {
        let snapshot_dir = raft_dir.join(SNAPSHOT_DIR);
        let mut state = State::default();
        if let Some((meta, data)) = entrepot_cluster::read_snapshot_file(&snapshot_dir)? {
            let snap = StoreState::decode(&data)?;
            state.last_applied = meta.last_log_id;
            state.membership = meta.last_membership;
            state.applied.message_end = Some(snap.message_end);
        }
        Ok(StoreMachine {
            inner: Arc::new(Shared {
                dir,
                snapshot_dir,
                log,
                acks,
                state: Mutex::new(state),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The offset after the last message applied in this process (`None` before the first).
    pub fn applied_message_end(&self) -> Option<u64> {
        self.lock().applied.message_end
    }

    /// The message log and ack log the broker shares when this node leads.
    pub fn logs(&self) -> (Log, Arc<AckLog>) {
        (self.inner.log.clone(), Arc::clone(&self.inner.acks))
    }

    /// The data directory (subscription registry).
    pub fn dir(&self) -> &std::path::Path {
        &self.inner.dir
    }
}

fn sm_error(
    log_id: Option<LogId<NodeId>>,
    e: impl std::error::Error + 'static,
) -> RaftStorageError {
    let io = match log_id {
        Some(id) => StorageIOError::new(ErrorSubject::Apply(id), ErrorVerb::Write, &e),
        None => StorageIOError::new(ErrorSubject::StateMachine, ErrorVerb::Write, &e),
    };
    StorageError::IO { source: io }
}

impl StoreMachine {
    fn build(&self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let (last, membership, message_end, built) = {
            let mut state = self.lock();
            state.built += 1;
            (
                state.last_applied,
                state.membership.clone(),
                state.applied.message_end.unwrap_or(0),
                state.built,
            )
        };
        let shared = &self.inner;
        // Entries applied after `last` may show in the acks and registry captured here;
        // they are applied again after an install, idempotently, so the result is the same.
        let snap = StoreState::capture(&shared.acks, &shared.dir, message_end)
            .map_err(|e| sm_error(None, e))?;
        // The store on disk must cover the snapshot before the log before it may go.
        shared.log.flush().map_err(|e| sm_error(None, e))?;
        shared.acks.log().flush().map_err(|e| sm_error(None, e))?;
        let persisted = snap.encode();
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id: match last {
                Some(l) => format!(
                    "{}-{}-{}-{built}",
                    l.leader_id.term, l.leader_id.node_id, l.index
                ),
                None => format!("none-{built}"),
            },
        };
        entrepot_cluster::write_snapshot_file(&shared.snapshot_dir, &meta, &persisted)
            .map_err(|e| sm_error(None, e))?;
        tracing::info!(
            index = last.map_or(0, |l| l.index),
            persisted_bytes = persisted.len(),
            "store snapshot built"
        );
        // openraft keeps only the meta of a snapshot it just built (a follower that needs
        // it asks `get_current_snapshot`), so the store is indexed only if read.
        let (log, acks) = self.logs();
        let source = LazySource::new(move || StoreSource::new(&snap, &log, &acks));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::source(source)),
        })
    }

    /// The wire snapshot of `state` over the store's records as they are now.
    fn source(&self, state: &StoreState) -> Result<StoreSource, RaftStorageError> {
        let shared = &self.inner;
        StoreSource::new(state, &shared.log, &shared.acks).map_err(|e| sm_error(None, e))
    }

    fn install(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        file: std::fs::File,
    ) -> Result<(), RaftStorageError> {
        let shared = &self.inner;
        let mut state = self.lock();
        let snap = snapshot::install_from(file, &shared.log, &shared.acks, &shared.dir)
            .map_err(|e| sm_error(None, e))?;
        entrepot_cluster::write_snapshot_file(&shared.snapshot_dir, meta, &snap.encode())
            .map_err(|e| sm_error(None, e))?;
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        state.applied.message_end = Some(snap.message_end);
        let _ = std::fs::remove_file(shared.snapshot_dir.join(RECEIVING_FILE));
        tracing::info!(
            index = meta.last_log_id.map_or(0, |l| l.index),
            message_end = snap.message_end,
            "store snapshot installed"
        );
        Ok(())
    }
}

impl StoreMachine {
    /// `snapshot` as a received file. openraft's chunked transfer writes into the file
    /// [`RaftStateMachine::begin_receiving_snapshot`] gave, but its API lets a caller hand
    /// over any snapshot data whole (its storage suite installs the sender's source as it
    /// is): that is copied into the receiving file first, so installing always reads a file
    /// checked whole before the store is touched.
    async fn spooled(
        &self,
        snapshot: Box<SnapshotData>,
    ) -> Result<Box<SnapshotData>, RaftStorageError> {
        use tokio::io::AsyncSeekExt;
        if matches!(*snapshot, SnapshotData::File(_)) {
            return Ok(snapshot);
        }
        let mut whole = snapshot;
        let dir = &self.inner.snapshot_dir;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| sm_error(None, e))?;
        let mut file = SnapshotData::receiving_file(&dir.join(RECEIVING_FILE))
            .await
            .map_err(|e| sm_error(None, e))?;
        whole
            .seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|e| sm_error(None, e))?;
        tokio::io::copy(&mut *whole, &mut file)
            .await
            .map_err(|e| sm_error(None, e))?;
        Ok(Box::new(file))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StoreMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.build())
            .await
            .map_err(|e| sm_error(None, std::io::Error::other(e.to_string())))?
    }
}

impl RaftStateMachine<TypeConfig> for StoreMachine {
    type SnapshotBuilder = StoreMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), RaftStorageError>
    {
        let state = self.lock();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, RaftStorageError>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let shared = Arc::clone(&self.inner);
        let mut state = self.lock();
        let mut out = Vec::new();
        for entry in entries {
            match &entry.payload {
                EntryPayload::Normal(Request::Ops(ops)) => {
                    replication::apply(
                        ops,
                        &shared.log,
                        &shared.acks,
                        &shared.dir,
                        &mut state.applied,
                    )
                    .map_err(|e| sm_error(Some(entry.log_id), e))?;
                }
                EntryPayload::Membership(m) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                }
                EntryPayload::Blank | EntryPayload::Normal(_) => {}
            }
            state.last_applied = Some(entry.log_id);
            out.push(Response::None);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, RaftStorageError> {
        let dir = &self.inner.snapshot_dir;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| sm_error(None, e))?;
        let data = SnapshotData::receiving_file(&dir.join(RECEIVING_FILE))
            .await
            .map_err(|e| sm_error(None, e))?;
        Ok(Box::new(data))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), RaftStorageError> {
        let snapshot = self.spooled(snapshot).await?;
        let file = snapshot
            .into_std_file()
            .await
            .map_err(|e| sm_error(None, e))?
            .ok_or_else(|| {
                sm_error(
                    None,
                    std::io::Error::other("a snapshot to install arrives in a file"),
                )
            })?;
        let this = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || this.install(&meta, file))
            .await
            .map_err(|e| sm_error(None, std::io::Error::other(e.to_string())))?
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let found = entrepot_cluster::read_snapshot_file(&this.inner.snapshot_dir)
                .map_err(|e| sm_error(None, e))?;
            let Some((meta, data)) = found else {
                return Ok(None);
            };
            let state = StoreState::decode(&data).map_err(|e| sm_error(None, e))?;
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(SnapshotData::source(this.source(&state)?)),
            }))
        })
        .await
        .map_err(|e| sm_error(None, std::io::Error::other(e.to_string())))?
    }
}
