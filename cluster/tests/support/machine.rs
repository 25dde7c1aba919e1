//! A minimal state machine for the cluster crate's own Raft tests, which run openraft over
//! our log store and network without a broker: per address, the produced messages in
//! apply order; snapshots in memory. Test-only — a broker node's state machine is its
//! store (`src/raft/state_machine.rs`), and openraft's storage suite runs on that one
//! (`tests/raft_conformance.rs`).
//!
//! Applying `Request::Produce` appends and answers `Response::Produced`; every other
//! request is ignored (`Response::None`). A snapshot is the applied messages,
//! `{ n: u32 | n × { address_len: u32 | address | count: u32 | count × { len: u32 | body } } }`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, BufMut, Bytes};
use entrepot_cluster::{
    Entry, LogId, NodeId, RaftStorageError, Request, Response, SnapshotData, TypeConfig,
};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};

type Messages = BTreeMap<String, Vec<Bytes>>;

/// Cheap to clone: clones share the state (openraft's handle and the test's).
#[derive(Clone, Default)]
pub struct MessageMachine {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
    messages: Messages,
    current: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
    built: u64,
}

impl MessageMachine {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// The messages produced to `address`, in apply order.
    pub fn messages(&self, address: &str) -> Vec<Bytes> {
        self.lock()
            .messages
            .get(address)
            .cloned()
            .unwrap_or_default()
    }
}

fn encode(messages: &Messages) -> Vec<u8> {
    let mut out = Vec::new();
    out.put_u32_le(messages.len() as u32);
    for (address, bodies) in messages {
        out.put_u32_le(address.len() as u32);
        out.put_slice(address.as_bytes());
        out.put_u32_le(bodies.len() as u32);
        for body in bodies {
            out.put_u32_le(body.len() as u32);
            out.put_slice(body);
        }
    }
    out
}

fn take(r: &mut &[u8]) -> Bytes {
    let len = r.get_u32_le() as usize;
    r.copy_to_bytes(len)
}

fn decode(data: &[u8]) -> Messages {
    let mut r = data;
    let mut messages = Messages::new();
    for _ in 0..r.get_u32_le() {
        let address = String::from_utf8(take(&mut r).to_vec()).unwrap();
        let count = r.get_u32_le();
        let bodies = (0..count).map(|_| take(&mut r)).collect();
        messages.insert(address, bodies);
    }
    assert!(r.is_empty(), "trailing bytes in a test snapshot");
    messages
}

fn snapshot(meta: SnapshotMeta<NodeId, BasicNode>, data: Vec<u8>) -> Snapshot<TypeConfig> {
    Snapshot {
        meta,
        snapshot: Box::new(SnapshotData::memory(data)),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MessageMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let mut state = self.lock();
        state.built += 1;
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
            snapshot_id: format!("{:?}-{}", state.last_applied, state.built),
        };
        let data = encode(&state.messages);
        state.current = Some((meta.clone(), data.clone()));
        Ok(snapshot(meta, data))
    }
}

impl RaftStateMachine<TypeConfig> for MessageMachine {
    type SnapshotBuilder = MessageMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), RaftStorageError> {
        let state = self.lock();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut state = self.lock();
        let mut out = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Normal(Request::Produce { address, messages }) => {
                    let stored = state.messages.entry(address).or_default();
                    let first_id = stored.len() as u64;
                    let count = messages.len() as u32;
                    stored.extend(messages);
                    Response::Produced { first_id, count }
                }
                EntryPayload::Membership(m) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::None
                }
                EntryPayload::Blank | EntryPayload::Normal(_) => Response::None,
            });
        }
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
        let data = snapshot.into_memory().ok_or_else(|| {
            RaftStorageError::from(StorageIOError::write_snapshot(
                Some(meta.signature()),
                AnyError::error("the test machine receives snapshots in memory"),
            ))
        })?;
        let mut state = self.lock();
        state.messages = decode(&data);
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        state.current = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        let state = self.lock();
        Ok(state
            .current
            .clone()
            .map(|(meta, data)| snapshot(meta, data)))
    }
}
