//! The state machine of one group as the host's user writes it ([`GroupMachine`]), and
//! the adapter that makes it openraft's `RaftStateMachine` (`Adapter`, crate-private:
//! openraft's types stay in this crate).
//!
//! What the adapter owns: the group's last applied log id and membership (openraft's
//! bookkeeping, never shown to the machine), the persisted snapshot
//! (`groups/<g>/snapshot`, `snapshot_file.rs` around the host snapshot data of
//! `snapshot.rs`), and the carried entries a snapshot install brought.
//!
//! Invariants:
//! * The machine sees every committed proposal once, in position order (entry index,
//!   then slot), after the snapshot it was last restored from; blank and membership
//!   entries take an index but are not shown to it.
//! * A snapshot is persisted (tmp, fsync, rename) before openraft hears it is built, and
//!   records the machine's `lowest_needed` with it; the host purges the log only below
//!   that (`mod.rs`), so every entry the snapshot's state still reads stays readable.
//! * An install persists the received snapshot before the machine is restored from it.

// openraft's storage error is large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};

use super::batch::{Position, Slots};
use super::snapshot::{self as host_snapshot, PartsSource};
use super::GroupShared;
use crate::error::{ClusterError, RaftStorageError, Result};
use crate::snapshot_data::SnapshotData;
use crate::snapshot_file::{read_snapshot_file, write_snapshot_file};
use crate::types::{Entry, LogId, NodeId, Response, TypeConfig};

/// Why a state machine refused an entry or a snapshot: the group stops (a replica that
/// cannot apply what the group committed must not go on).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct MachineError(pub Arc<dyn std::error::Error + Send + Sync>);

impl MachineError {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> MachineError {
        MachineError(Arc::new(e))
    }

    /// An error with only a message.
    pub fn msg(reason: impl Into<String>) -> MachineError {
        MachineError::new(std::io::Error::other(reason.into()))
    }
}

impl PartialEq for MachineError {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}
impl Eq for MachineError {}

/// A replicated state machine of one group, in the host's terms: indexes and payloads,
/// no openraft type. Its methods run on openraft's state-machine task (a snapshot build on
/// a blocking thread); they should not block for long.
///
/// `apply` is called once per proposal, not once per entry: a machine's logic is about
/// messages and acknowledgements, and a batch boundary is an accident of load (how many
/// proposals queued while the previous entry was in flight) that no replica must
/// depend on. What does depend on entries — purging, snapshot carrying — goes by
/// [`Self::lowest_needed`], an entry index.
pub trait GroupMachine: Send + 'static {
    /// Applies the committed proposal at `at` whose payload is `payload` (as proposed).
    /// Called in increasing position order (index gaps are blank or membership entries;
    /// slots of one entry from 0). The `Bytes` given here is the leader's proposal or the
    /// replication frame, not the log: to keep a payload, keep its position and read it
    /// back ([`super::GroupHandle::read`]), a zero-copy slice of the node log.
    fn apply(&mut self, at: Position, payload: Bytes) -> Result<(), MachineError>;

    /// The machine's state as of the last applied index, opaque to the host. It need not
    /// hold the payloads of entries at or above [`Self::lowest_needed`]: the host keeps
    /// them readable (in its log, or carried by the snapshot).
    fn snapshot(&self) -> Result<Bytes, MachineError>;

    /// Replaces the machine's state with a snapshot's, taken at `last_index`: at start
    /// from the one persisted on this node, or one installed from the leader. Entries
    /// from the snapshot's `lowest_needed` up to `last_index` are readable through the
    /// group's handle afterwards.
    fn restore(&mut self, last_index: u64, state: Bytes) -> Result<(), MachineError>;

    /// The lowest index whose payload the machine may still read (for a queue: its
    /// oldest unacknowledged message; the index after the last applied one when none).
    /// The log is purged only below the value recorded with the last snapshot.
    fn lowest_needed(&self) -> u64;
}

/// What [`Adapter::restored`] reports.
pub(crate) struct Restored {
    pub(crate) membership: openraft::Membership<NodeId, BasicNode>,
    pub(crate) snapshot: Option<u64>,
}

/// openraft's state machine over a [`GroupMachine`]; clones share it.
pub(crate) struct Adapter<M> {
    shared: Arc<GroupShared>,
    inner: Arc<Mutex<Inner<M>>>,
}

impl<M> Clone for Adapter<M> {
    fn clone(&self) -> Self {
        Adapter {
            shared: Arc::clone(&self.shared),
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<M> {
    machine: M,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
    /// Snapshots built by this process (for unique ids).
    built: u64,
}

/// Runs `f` on tokio's blocking threads, or on this thread when `inline`
/// ([`crate::HostConfig::snapshot_inline`]: a deterministic simulation).
async fn blocking<T: Send + 'static>(
    inline: bool,
    f: impl FnOnce() -> Result<T, RaftStorageError> + Send + 'static,
) -> Result<T, RaftStorageError> {
    if inline {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| sm_error(std::io::Error::other(e.to_string())))?
}

fn sm_error(e: impl std::error::Error + 'static) -> RaftStorageError {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}

impl<M: GroupMachine> Adapter<M> {
    /// The adapter over `machine`, restored from the snapshot persisted for the group, if
    /// any (its carried entries then readable through `shared`).
    pub(crate) fn open(shared: Arc<GroupShared>, mut machine: M) -> Result<Adapter<M>> {
        let group = shared.group;
        let mut last_applied = None;
        let mut membership = StoredMembership::default();
        if let Some((meta, data)) = read_snapshot_file(&shared.snapshot_dir)? {
            let snap = host_snapshot::decode(Bytes::from(data))?;
            let last = meta.last_log_id.map_or(0, |l| l.index);
            machine
                .restore(last, snap.state.clone())
                .map_err(|source| ClusterError::Machine { group, source })?;
            shared.set_snapshot(meta.last_log_id.map(|l| l.index), &snap);
            last_applied = meta.last_log_id;
            membership = meta.last_membership;
        }
        shared.applied.send_replace(last_applied.map(|l| l.index));
        Ok(Adapter {
            shared,
            inner: Arc::new(Mutex::new(Inner {
                machine,
                last_applied,
                membership,
                built: 0,
            })),
        })
    }

    /// What the machine was restored to at the open: the snapshot's index and
    /// membership (empty without a snapshot).
    pub(crate) fn restored(&self) -> Restored {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Restored {
            membership: inner.membership.membership().clone(),
            snapshot: inner.last_applied.map(|l| l.index),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner<M>>, RaftStorageError> {
        self.inner
            .lock()
            .map_err(|_| sm_error(std::io::Error::other("state machine lock poisoned")))
    }

    /// Builds and persists a snapshot of the machine as it is now (blocking: file I/O).
    fn build(&self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let group = self.shared.group;
        let (meta, lowest_needed, state) = {
            let mut inner = self.lock()?;
            inner.built += 1;
            let state = inner
                .machine
                .snapshot()
                .map_err(|source| sm_error(ClusterError::Machine { group, source }))?;
            let last = inner.last_applied;
            let meta = SnapshotMeta {
                last_log_id: last,
                last_membership: inner.membership.clone(),
                snapshot_id: match last {
                    Some(l) => format!(
                        "{}-{}-{}-{}",
                        l.leader_id.term, l.leader_id.node_id, l.index, inner.built
                    ),
                    None => format!("none-{}", inner.built),
                },
            };
            (meta, inner.machine.lowest_needed(), state)
        };
        let last_index = meta.last_log_id.map(|l| l.index);
        // Persisted: only the carried entries still needed that the log does not hold.
        let held_from = self.shared.log_first_held().map_err(sm_error)?;
        let carried: BTreeMap<u64, Slots> = self
            .shared
            .carried_range(lowest_needed, held_from)
            .map_err(sm_error)?;
        let parts =
            host_snapshot::encode_parts(lowest_needed, &state, &carried).map_err(sm_error)?;
        write_snapshot_file(
            &self.shared.snapshot_dir,
            &meta,
            &host_snapshot::concat(&parts),
        )
        .map_err(sm_error)?;
        let snap = host_snapshot::HostSnapshot {
            lowest_needed,
            state,
            entries: carried,
        };
        self.shared.set_snapshot(last_index, &snap);
        tracing::debug!(group, index = ?last_index, lowest_needed, "group snapshot built");
        let wire = self.wire(&snap, last_index)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(wire),
        })
    }

    /// What a receiver gets for `snap`: its state plus every payload entry it still needs,
    /// from the node log (zero-copy slices) or carried.
    fn wire(
        &self,
        snap: &host_snapshot::HostSnapshot,
        last_index: Option<u64>,
    ) -> Result<SnapshotData, RaftStorageError> {
        let mut entries = snap.entries.clone();
        if let Some(last) = last_index {
            let from = snap.lowest_needed;
            if from <= last {
                for (index, payload) in
                    self.shared.log_payloads(from, last + 1).map_err(sm_error)?
                {
                    entries.insert(index, payload);
                }
            }
            entries.retain(|&i, _| i >= from && i <= last);
        }
        let parts = host_snapshot::encode_parts(snap.lowest_needed, &snap.state, &entries)
            .map_err(sm_error)?;
        Ok(SnapshotData::source(PartsSource::new(parts)))
    }

    fn install(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        data: Vec<u8>,
    ) -> Result<(), RaftStorageError> {
        let group = self.shared.group;
        let data = Bytes::from(data);
        let snap = host_snapshot::decode(data.clone()).map_err(sm_error)?;
        // Every carried entry is needed here: this node's log holds none of them.
        write_snapshot_file(&self.shared.snapshot_dir, meta, &data).map_err(sm_error)?;
        let last_index = meta.last_log_id.map(|l| l.index);
        let mut inner = self.lock()?;
        inner
            .machine
            .restore(last_index.unwrap_or(0), snap.state.clone())
            .map_err(|source| sm_error(ClusterError::Machine { group, source }))?;
        self.shared.set_snapshot(last_index, &snap);
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        self.shared.applied.send_replace(last_index);
        tracing::info!(
            group,
            index = ?last_index,
            carried = snap.entries.len(),
            "group snapshot installed"
        );
        Ok(())
    }
}

impl<M: GroupMachine> RaftSnapshotBuilder<TypeConfig> for Adapter<M> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let this = self.clone();
        let inline = this.shared.snapshot_inline;
        blocking(inline, move || this.build()).await
    }
}

impl<M: GroupMachine> RaftStateMachine<TypeConfig> for Adapter<M> {
    type SnapshotBuilder = Adapter<M>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), RaftStorageError> {
        let inner = self.lock()?;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let group = self.shared.group;
        let mut inner = self.lock()?;
        let mut out = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            match entry.payload {
                EntryPayload::Normal(request) => {
                    let payloads = match Slots::of(request) {
                        Some(slots) => slots.payloads().map_err(sm_error)?,
                        None => Vec::new(),
                    };
                    for (slot, payload) in payloads.into_iter().enumerate() {
                        inner
                            .machine
                            .apply(Position::new(index, slot as u32), payload)
                            .map_err(|source| sm_error(ClusterError::Machine { group, source }))?;
                    }
                }
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), m);
                }
                EntryPayload::Blank => {}
            }
            inner.last_applied = Some(entry.log_id);
            out.push(Response::None);
        }
        let applied = inner.last_applied.map(|l| l.index);
        drop(inner);
        self.shared.applied.send_replace(applied);
        Ok(out)
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
        let data = match *snapshot {
            SnapshotData::Memory(cursor) => cursor.into_inner(),
            other => {
                // openraft's API lets a caller hand any snapshot data whole.
                let mut other = other;
                let mut buf = Vec::new();
                use tokio::io::{AsyncReadExt, AsyncSeekExt};
                other
                    .seek(std::io::SeekFrom::Start(0))
                    .await
                    .map_err(sm_error)?;
                other.read_to_end(&mut buf).await.map_err(sm_error)?;
                buf
            }
        };
        let this = self.clone();
        let meta = meta.clone();
        let inline = this.shared.snapshot_inline;
        blocking(inline, move || this.install(&meta, data)).await
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        let this = self.clone();
        let inline = this.shared.snapshot_inline;
        blocking(inline, move || {
            let Some((meta, data)) =
                read_snapshot_file(&this.shared.snapshot_dir).map_err(sm_error)?
            else {
                return Ok(None);
            };
            let snap = host_snapshot::decode(Bytes::from(data)).map_err(sm_error)?;
            let wire = this.wire(&snap, meta.last_log_id.map(|l| l.index))?;
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(wire),
            }))
        })
        .await
    }
}
