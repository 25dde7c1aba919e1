//! The store of one clustered address over its Raft group on the node's host (issue 12,
//! step 4.2): what `broker::Store` is for a local address — append a message, record
//! acknowledgements, consumer-group floors and delivery counts, read a body back, list
//! the live messages after a restart or a leader change — with the group's log as the
//! only copy of every message and [`AddressMachine`] as the index over it.
//!
//! What it owns:
//! * **The pipeline.** Every change is one proposal (one ops batch of
//!   `broker/replication.rs`): a message op alone (its record in the `store.rs` format),
//!   or one ack / ack group / floor / drop group / delivery count op. The calls are
//!   synchronous, like `Store`'s: each change is numbered (its *sequence*, dense from 0)
//!   and handed to the [`GroupHandle`] at once, in that order (`try_submit`; the host
//!   batches them into entries); one task awaits their [`Proposal`]s in the same order
//!   (at most [`MAX_UNRESOLVED_PROPOSALS`] in flight) and raises the store's committed
//!   watch. A full pipeline refuses ([`GroupStoreError::Busy`]) rather than waits.
//! * **Durability** is a `Durable` on that watch, as the clustered `Store` hands out
//!   today: complete once the change's proposal resolved — a majority holds its entry on
//!   disk and this node applied it. This is the adapter from `Proposal` to the handle the
//!   connection waits on before `accepted`: one watch for the store, no task per message.
//! * **Offsets** are the machine's (dense in log order): an append learns its message's
//!   offset from the resolved position ([`PendingMessage::committed`] →
//!   `AddressMachine::offset_at`), never from a local guess.
//! * **Bodies** are read with `GroupHandle::read(position)`: a `Bytes` slice of the node
//!   log's mapping, checked to be a message record of this address.
//!
//! Invariants:
//! * A store lives for one leadership. The first proposal that fails (`NotLeader`, a
//!   timeout with the outcome unknown, the group stopped) fails the committed watch for
//!   good: no later change of this store counts as durable, even one that commits, since
//!   one before it may not have (as the one-group `Replication` fails with its
//!   leadership). The broker builds a new store when it leads again.
//! * A node that does not lead the group refuses every change at once
//!   ([`GroupStoreError::NotLeader`]); a loss of leadership after the check fails the
//!   change through its durability handle.
//! * [`GroupStore::recover`] lists the live messages only after an entry of this
//!   leadership was applied here, so everything committed before it is in the index.
//!
//! * **Store time.** A message's record is the `store.rs` *timed* message record (kind
//!   3): the log entry has no timestamp, so the record carries the proposer's clock and a
//!   recovered message's `ttl` still counts from when it was stored.
//!
//! Does not: append a transaction's batch (its messages would need one proposal), write
//! the subscription registry (the metadata group's), delete anything (the host purges
//! below the machine's `lowest_needed`), or decide leadership. A `Queue` runs over it
//! as its `broker::store::AddressStore` (producers' appends, acks, delivery counts;
//! activation in `group_queue.rs`); `group_driver.rs` builds one per leadership and
//! [`GroupStore::retire`]s it when that leadership's service of the address ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use entrepot_cluster::{
    ClusterError, GroupError, GroupHandle, Leadership, NodeId, Position, Proposal,
};
use entrepot_storage::{Durable, DurableState, DEFAULT_GROUP};
use tokio::sync::{mpsc, oneshot, watch};

use super::address_machine::{message_record, AddressMachine};
use crate::broker::queue::now_ms;
use crate::broker::replication::{self, OPS_VERSION};
use crate::broker::store::{
    self, AddressAppend, AddressStore, AddressStoreError, CommittedMessage, PendingCommit,
    MAX_ADDRESS_LEN,
};

/// Proposals submitted and not yet resolved; a change past this is refused
/// ([`GroupStoreError::Busy`]) rather than waited for, as the calls are synchronous.
pub const MAX_UNRESOLVED_PROPOSALS: usize = 16_384;
/// Live messages [`GroupStore::recover`] takes from the index per step of its walk.
pub const RECOVER_PAGE: usize = 4096;

/// Why the store refused or could not finish a change or a read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupStoreError {
    /// This node does not lead the address's group (`leader`: the one it knows of).
    #[error("address {address}: group {group} is not led by this node (leader: {leader:?})")]
    NotLeader {
        address: String,
        group: u64,
        leader: Option<NodeId>,
    },
    #[error("address of {0} bytes exceeds {MAX_ADDRESS_LEN}")]
    AddressTooLong(usize),
    /// [`MAX_UNRESOLVED_PROPOSALS`] changes wait for their commit, or the host's queue
    /// is full: refuse, retry later.
    #[error("address {address}: too many changes already wait for the group")]
    Busy { address: String },
    /// The store's tasks ended (the store was dropped, or the runtime is stopping).
    #[error("address {address}: the group store's pipeline ended")]
    Closed { address: String },
    /// The proposal failed (see [`GroupError`]: not leader, timeout, stopped, too large).
    #[error(transparent)]
    Group(#[from] GroupError),
    /// Reading the group's log failed (purged, not applied, I/O).
    #[error(transparent)]
    Read(#[from] ClusterError),
    /// The index names a position whose payload is not a message record of this address
    /// (checked where the body is read back).
    #[error("address {address}: offset {offset} at {position} is not a message record of it")]
    NotAMessage {
        address: String,
        offset: u64,
        position: Position,
    },
    /// Activation found another queue serving the address's name on this broker.
    #[error("address {address}: the broker serves another queue of that name")]
    NameTaken { address: String },
    /// The store was retired ([`GroupStore::retire`]: this leadership's service of the
    /// address ended); it takes no change any more.
    #[error("address {address}: the store was retired: {reason}")]
    Retired { address: String, reason: String },
    /// A resolved message proposal whose position the index does not hold (it was
    /// acknowledged before the appender asked, or the position is not a message).
    #[error("address {address}: no message at {position}")]
    NoOffset { address: String, position: Position },
}

/// A message of the address, as stored in the group's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMessage {
    pub offset: u64,
    pub position: Position,
    /// When it was stored: the proposer's clock, carried in its record.
    pub stored_at_ms: i64,
    /// The AMQP message exactly as the producer sent it: a slice of the node log.
    pub message: Bytes,
}

/// What [`GroupStore::append`] hands back.
pub struct GroupAppended {
    /// Complete once a majority holds the message and this node applied it (the
    /// producer's `accepted`); fails with the store (see the module invariants).
    pub durable: Durable,
    /// The message's own outcome: its offset and body once committed.
    pub pending: PendingMessage,
}

/// A message on its way through the group.
pub struct PendingMessage {
    answer: oneshot::Receiver<Result<Position, GroupError>>,
    reader: Reader,
}

impl PendingMessage {
    /// Waits for the proposal: the message's offset (the machine's, from its position)
    /// and its body read back from the node log.
    pub async fn committed(self) -> Result<GroupMessage, GroupStoreError> {
        let closed = GroupStoreError::Closed {
            address: self.reader.address.clone(),
        };
        let position = self.answer.await.map_err(|_| closed)??;
        self.reader.message(position)
    }

    /// The same without waiting: `None` while the proposal is unresolved. Once the
    /// append's durable handle completed or failed, the answer is there (the resolver
    /// answers before it moves the watch). The offset and body are read here, by the
    /// caller, not by the store's resolver (one task per group).
    pub fn try_committed(&mut self) -> Option<Result<GroupMessage, GroupStoreError>> {
        match self.answer.try_recv() {
            Ok(Ok(position)) => Some(self.reader.message(position)),
            Ok(Err(e)) => Some(Err(e.into())),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(GroupStoreError::Closed {
                address: self.reader.address.clone(),
            })),
        }
    }
}

/// A [`PendingMessage`] as the broker sees it (`AddressAppend::committed`).
struct PendingForBroker(PendingMessage);

impl PendingCommit for PendingForBroker {
    fn try_committed(&mut self) -> Option<Result<CommittedMessage, AddressStoreError>> {
        let address = self.0.reader.address.clone();
        let answer = self.0.try_committed()?;
        Some(
            answer
                .map(|m| CommittedMessage {
                    offset: m.offset,
                    stored_at_ms: m.stored_at_ms,
                    message: m.message,
                })
                .map_err(|e| refusal(address, e)),
        )
    }
}

/// What reading a message needs: the address, the handle, the index.
#[derive(Clone)]
struct Reader {
    address: String,
    handle: GroupHandle,
    machine: AddressMachine,
}

impl Reader {
    /// The message proposed at `position`: its offset from the index, its body from the
    /// log.
    fn message(&self, position: Position) -> Result<GroupMessage, GroupStoreError> {
        let offset = self
            .machine
            .offset_at(position)
            .ok_or_else(|| GroupStoreError::NoOffset {
                address: self.address.clone(),
                position,
            })?;
        let (stored_at_ms, message) = self.body(offset, position)?;
        Ok(GroupMessage {
            offset,
            position,
            stored_at_ms,
            message,
        })
    }

    /// When the message at `position` (the record of `offset`) was stored, and the
    /// message: a slice of the node log.
    fn body(&self, offset: u64, position: Position) -> Result<(i64, Bytes), GroupStoreError> {
        let not_a_message = || GroupStoreError::NotAMessage {
            address: self.address.clone(),
            offset,
            position,
        };
        let payload = self.handle.read(position)?.ok_or_else(not_a_message)?;
        let record = message_record(&payload).ok_or_else(not_a_message)?;
        match store::parse_timed_record(&record) {
            Some((address, at, message)) if address == self.address => Ok((at, message)),
            _ => Err(not_a_message()),
        }
    }
}

/// Told a change's outcome (an append's or the barrier's), before the watch moves.
type Answer = oneshot::Sender<Result<Position, GroupError>>;

/// A change submitted, waiting for its proposal.
type Submitted = (Proposal, Option<Answer>);

/// The store of one clustered address; see the module docs.
pub struct GroupStore {
    reader: Reader,
    leadership: watch::Receiver<Leadership>,
    /// The next change's sequence number, held while it is queued so that sequence and
    /// queue order agree.
    next_seq: Mutex<u64>,
    to_resolve: mpsc::Sender<Submitted>,
    committed: watch::Receiver<DurableState>,
    /// The committed watch's sender, shared with the resolver: [`GroupStore::retire`]
    /// fails it.
    raise: Arc<watch::Sender<DurableState>>,
    /// Why the store takes nothing any more, once retired.
    retired: std::sync::OnceLock<String>,
    /// The offset the next message is expected to get (the message op's own offset; the
    /// machine counts a wrong guess in `renumbered`).
    next_offset_guess: AtomicU64,
}

impl GroupStore {
    /// A store for `address` over its group's `handle` and the `machine` the host applies
    /// the group's entries to. Spawns its resolver task on the current runtime; it ends when
    /// the store is dropped.
    pub fn new(address: &str, handle: GroupHandle, machine: AddressMachine) -> GroupStore {
        let (to_resolve, submitted) = mpsc::channel(MAX_UNRESOLVED_PROPOSALS);
        let (raise, committed) = watch::channel(DurableState::default());
        let raise = Arc::new(raise);
        let reader = Reader {
            address: address.to_owned(),
            handle: handle.clone(),
            machine: machine.clone(),
        };
        tokio::spawn(resolve_in_order(submitted, Arc::clone(&raise)));
        GroupStore {
            raise,
            retired: std::sync::OnceLock::new(),
            leadership: handle.leadership(),
            next_offset_guess: AtomicU64::new(machine.next_offset()),
            reader,
            next_seq: Mutex::new(0),
            to_resolve,
            committed,
        }
    }

    /// The address this store keeps.
    pub fn address(&self) -> &str {
        &self.reader.address
    }

    /// Appends `message` (given as chunks) as one message op, stored now. The record is
    /// the `store.rs` timed message record, so the body read back is the message exactly
    /// as sent, with its store time.
    pub fn append(&self, message: &[&[u8]]) -> Result<GroupAppended, GroupStoreError> {
        self.append_at(message, now_ms())
    }

    /// [`Self::append`] stored at `stored_at_ms`.
    fn append_at(
        &self,
        message: &[&[u8]],
        stored_at_ms: i64,
    ) -> Result<GroupAppended, GroupStoreError> {
        let payload = self.message_payload(message, stored_at_ms)?;
        let (tell, answer) = oneshot::channel();
        let durable = self.queue(payload, Some(tell))?;
        Ok(GroupAppended {
            durable,
            pending: PendingMessage {
                answer,
                reader: self.reader.clone(),
            },
        })
    }

    /// One message op carrying the `store.rs` timed record of `message`.
    fn message_payload(
        &self,
        message: &[&[u8]],
        stored_at_ms: i64,
    ) -> Result<Bytes, GroupStoreError> {
        let address = &self.reader.address;
        if address.len() > MAX_ADDRESS_LEN {
            return Err(GroupStoreError::AddressTooLong(address.len()));
        }
        let body: usize = message.iter().map(|m| m.len()).sum();
        let prefix = store::timed_record_prefix(address, stored_at_ms);
        let record_len = prefix.len() + body;
        let mut b = BytesMut::with_capacity(replication::MESSAGE_RECORD_AT + record_len);
        b.put_u8(OPS_VERSION);
        let guess = self.next_offset_guess.fetch_add(1, Ordering::Relaxed);
        let mut op = BytesMut::with_capacity(record_len);
        op.put_slice(&prefix);
        message.iter().for_each(|m| op.put_slice(m));
        replication::encode_message(&mut b, guess, &op);
        Ok(b.freeze())
    }

    /// Marks offsets acknowledged in the address's own group (consumed for good).
    pub fn ack(&self, offsets: &[u64]) -> Result<Durable, GroupStoreError> {
        self.change(|b| replication::encode_ack(b, None, offsets))
    }

    /// Marks offsets acknowledged by a subscription's consumer group.
    pub fn ack_group(&self, group: u32, offsets: &[u64]) -> Result<Durable, GroupStoreError> {
        self.change(|b| replication::encode_ack(b, Some(group), offsets))
    }

    /// Starts a subscription's group: everything below `floor` counts as consumed.
    pub fn start_group(&self, group: u32, floor: u64) -> Result<Durable, GroupStoreError> {
        self.change(|b| replication::encode_group_floor(b, group, floor))
    }

    /// Forgets a deleted subscription's group.
    pub fn drop_group(&self, group: u32) -> Result<Durable, GroupStoreError> {
        self.change(|b| replication::encode_drop_group(b, group))
    }

    /// Records how often `group`'s message at `offset` was delivered without success.
    pub fn set_delivery_count(
        &self,
        group: u32,
        offset: u64,
        count: u32,
    ) -> Result<Durable, GroupStoreError> {
        self.change(|b| replication::encode_delivery_count(b, group, offset, count))
    }

    /// Whether the address's own consumers acknowledged `offset` (as applied here).
    pub fn is_acked(&self, offset: u64) -> bool {
        self.reader.machine.is_acked(DEFAULT_GROUP, offset)
    }

    /// True if `group` consumed `offset` (an unknown group has nothing pending).
    pub fn group_acked(&self, group: u32, offset: u64) -> bool {
        self.reader.machine.is_acked(group, offset)
    }

    /// The failed deliveries recorded for `group`'s message at `offset` (0 if none).
    pub fn delivery_count(&self, group: u32, offset: u64) -> u32 {
        self.reader.machine.delivery_count(group, offset)
    }

    /// The body of live message `offset` (`None` once it is acknowledged, or never was).
    pub fn read(&self, offset: u64) -> Result<Option<Bytes>, GroupStoreError> {
        match self.reader.machine.position(offset) {
            Some(at) => self.reader.body(offset, at).map(|(_, m)| Some(m)),
            None => Ok(None),
        }
    }

    /// What the connection waits on: the sequence of changes durable so far, failed for
    /// good with the first failed proposal.
    pub fn durable_watch(&self) -> watch::Receiver<DurableState> {
        self.committed.clone()
    }

    /// Why the store accepts nothing any more (a proposal failed, or it was retired),
    /// or `None`.
    pub fn failed(&self) -> Option<String> {
        self.committed.borrow().failed.as_deref().map(str::to_owned)
    }

    /// The committed watch, to wait for the store's failure ([`Self::failed`]).
    pub fn failures(&self) -> watch::Receiver<DurableState> {
        self.committed.clone()
    }

    /// Ends this store's leadership for good (the driver deactivates the address): every
    /// later change is refused ([`GroupStoreError::Retired`]) and the committed watch
    /// fails, so a change not yet durable never counts as durable here — a producer
    /// waiting for its `accepted` is told to go elsewhere and resends (the proposal may
    /// still commit: at-least-once, as for any failed store).
    pub fn retire(&self, reason: &str) {
        if self.retired.set(reason.to_owned()).is_err() {
            return;
        }
        let reason: Arc<str> = Arc::from(format!("retired: {reason}"));
        self.raise.send_modify(|s| {
            s.failed.get_or_insert(reason);
        });
    }

    /// Every live message of the address, oldest first, with its body. Waits first until
    /// an entry of this leadership is applied here (an empty ops batch proposed through
    /// the pipeline), so the index holds everything committed before; then walks the
    /// index in steps of [`RECOVER_PAGE`], at most as many steps as there are offsets.
    pub async fn recover(&self) -> Result<Vec<GroupMessage>, GroupStoreError> {
        self.barrier().await?;
        let machine = &self.reader.machine;
        // The walk ends by itself; the bound keeps a broken index from looping.
        let steps = machine.next_offset() / RECOVER_PAGE as u64 + 1;
        self.next_offset_guess
            .store(machine.next_offset(), Ordering::Relaxed);
        let mut out = Vec::new();
        let mut from = 0;
        for _ in 0..steps {
            let page = machine.live(from, RECOVER_PAGE);
            for &(offset, position) in &page {
                let (stored_at_ms, message) = self.reader.body(offset, position)?;
                out.push(GroupMessage {
                    offset,
                    position,
                    stored_at_ms,
                    message,
                });
            }
            match page.last() {
                Some(&(last, _)) if page.len() == RECOVER_PAGE => from = last + 1,
                _ => break,
            }
        }
        Ok(out)
    }

    /// Proposes an empty ops batch and waits for it: once it resolves, everything
    /// committed before it is applied to the machine here.
    async fn barrier(&self) -> Result<Position, GroupStoreError> {
        let (tell, answer) = oneshot::channel();
        let durable = self.queue(Bytes::from_static(&[OPS_VERSION]), Some(tell))?;
        drop(durable);
        let closed = || GroupStoreError::Closed {
            address: self.reader.address.clone(),
        };
        Ok(answer.await.map_err(|_| closed())??)
    }

    fn change(&self, encode: impl FnOnce(&mut BytesMut)) -> Result<Durable, GroupStoreError> {
        let mut b = BytesMut::new();
        b.put_u8(OPS_VERSION);
        encode(&mut b);
        self.queue(b.freeze(), None)
    }

    /// Numbers and queues one change; its durability handle.
    fn queue(&self, payload: Bytes, answer: Option<Answer>) -> Result<Durable, GroupStoreError> {
        if let Some(reason) = self.retired.get() {
            return Err(GroupStoreError::Retired {
                address: self.reader.address.clone(),
                reason: reason.clone(),
            });
        }
        let leadership = *self.leadership.borrow();
        if !leadership.leads {
            return Err(GroupStoreError::NotLeader {
                address: self.reader.address.clone(),
                group: self.reader.handle.group(),
                leader: leadership.leader,
            });
        }
        // Numbering and submitting under one lock keeps sequence and log order equal.
        let mut next = self.next_seq.lock().unwrap_or_else(|e| e.into_inner());
        let address = || self.reader.address.clone();
        // Room for the proposal first: once submitted it cannot be taken back.
        let room = self.to_resolve.try_reserve().map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => GroupStoreError::Busy { address: address() },
            mpsc::error::TrySendError::Closed(()) => GroupStoreError::Closed { address: address() },
        })?;
        let proposal = self
            .reader
            .handle
            .try_submit(payload)?
            .ok_or_else(|| GroupStoreError::Busy { address: address() })?;
        room.send((proposal, answer));
        let seq = *next;
        *next += 1;
        Ok(Durable::watching(self.committed.clone(), seq))
    }
}

impl std::fmt::Debug for GroupStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupStore")
            .field("address", &self.reader.address)
            .field("group", &self.reader.handle.group())
            .finish_non_exhaustive()
    }
}

/// A queue over this store records its consumers' outcomes in the group.
impl AddressStore for GroupStore {
    fn append(
        &self,
        message: &[&[u8]],
        stored_at_ms: i64,
    ) -> Result<AddressAppend, AddressStoreError> {
        let appended = self
            .append_at(message, stored_at_ms)
            .map_err(|e| refusal(self.reader.address.clone(), e))?;
        Ok(AddressAppend {
            durable: appended.durable,
            committed: Box::new(PendingForBroker(appended.pending)),
        })
    }

    fn ack(&self, offsets: &[u64]) -> Result<Durable, AddressStoreError> {
        GroupStore::ack(self, offsets).map_err(|e| refusal(self.reader.address.clone(), e))
    }

    fn set_delivery_count(&self, offset: u64, count: u32) -> Result<Durable, AddressStoreError> {
        GroupStore::set_delivery_count(self, DEFAULT_GROUP, offset, count)
            .map_err(|e| refusal(self.reader.address.clone(), e))
    }
}

/// The broker's view of a refused change.
fn refusal(address: String, e: GroupStoreError) -> AddressStoreError {
    match e {
        GroupStoreError::NotLeader { leader, .. } => {
            AddressStoreError::NotLeader { address, leader }
        }
        GroupStoreError::Busy { .. } => AddressStoreError::Busy { address },
        GroupStoreError::Retired { reason, .. } => AddressStoreError::Retired { address, reason },
        other => AddressStoreError::Unavailable {
            address,
            reason: other.to_string(),
        },
    }
}

/// Awaits the proposals in submission order (they resolve in that order) and raises
/// the committed watch: sequence `n` is durable once `durable > n`. The first failure
/// fails the watch for good (see the module invariants); every later change is still
/// answered with its own outcome.
async fn resolve_in_order(
    mut submitted: mpsc::Receiver<Submitted>,
    raise: Arc<watch::Sender<DurableState>>,
) {
    while let Some((proposal, answer)) = submitted.recv().await {
        let outcome = proposal.await;
        let (ok, reason) = match &outcome {
            Ok(_) => (true, None),
            Err(e) => (false, Some(e.to_string())),
        };
        // Answered before the watch moves: whoever sees the change durable finds its
        // position already there. The appender may have stopped waiting: no matter.
        if let Some(tell) = answer {
            let _ = tell.send(outcome);
        }
        raise.send_modify(|s| match (ok, &s.failed) {
            (true, None) => s.durable += 1,
            (false, None) => s.failed = reason.map(Arc::from),
            (_, Some(_)) => {}
        });
    }
}
