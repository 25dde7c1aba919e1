//! openraft's state machine for a broker node: the node's store itself. Applying an
//! entry applies its batch of store operations (`broker/replication.rs`) to the message
//! log, the ack log and the subscription registry of this node.
//!
//! Applied state is not persisted separately: at start `last_applied` is none and openraft
//! re-applies the committed log from its first entry, which is safe because applying is
//! idempotent (and repairs a local tail the last leadership never committed). So the Raft
//! log is never purged and no snapshot is ever built ([`openraft::SnapshotPolicy::Never`]);
//! a new member catches up by replaying the log. Bounding the Raft log (snapshots of the
//! store, purge) is the next step — see ARCHITECTURE.md.
//!
//! Invariant: every node applies the same operations in the same order, so message
//! offsets, acknowledgements and consumer groups are identical on every node up to the
//! commit index.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use entrepot_cluster::{NodeId, RaftStorageError, Request, Response, TypeConfig};
use entrepot_storage::{AckLog, Log};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};

use crate::broker::replication::{self, Applied};

/// The store as openraft's state machine; cheap to clone (all clones share the store).
#[derive(Clone)]
pub struct StoreMachine {
    inner: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    log: Log,
    acks: Arc<AckLog>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    applied: Applied,
}

impl StoreMachine {
    pub fn new(dir: PathBuf, log: Log, acks: Arc<AckLog>) -> StoreMachine {
        StoreMachine {
            inner: Arc::new(Shared {
                dir,
                log,
                acks,
                state: Mutex::new(State::default()),
            }),
        }
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

impl RaftSnapshotBuilder<TypeConfig> for StoreMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        // Only reachable through an explicit trigger: the policy is `Never`. The log is
        // never purged, so an empty snapshot at the applied position is never installed
        // anywhere instead of the log.
        let state = self.lock();
        Ok(Snapshot {
            meta: SnapshotMeta {
                last_log_id: state.last_applied,
                last_membership: state.membership.clone(),
                snapshot_id: "unused".into(),
            },
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
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

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, RaftStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta<NodeId, BasicNode>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), RaftStorageError> {
        Err(sm_error(
            None,
            std::io::Error::other(
                "store snapshots are not supported: the Raft log is never purged",
            ),
        ))
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        Ok(None)
    }
}
