//! Several proposals in one Raft entry: the batch encoding, the [`Position`] of a
//! proposal inside its entry, and the per-group batcher task that packs whatever is
//! queued into the next entry.
//!
//! ```text
//! // Format: host batch, version 1 (the body of a `Request::Batch` entry, request tag 5)
//! { version: u8 | n: u32 | n × len: u32 | payload 0 | payload 1 | … }   little-endian
//! ```
//! * `1 ≤ n ≤ MAX_BATCH_SLOTS`; the lengths add up to exactly the bytes after the table
//!   (else `Decode`); an unknown version is `UnsupportedVersion`.
//! * Slot `s` of entry `i` is the proposal at [`Position`] `{ index: i, slot: s }`; its
//!   bytes are a slice of the entry's body, so a read from the node log is a slice of
//!   its mapping, never a copy.
//! * A `Request::Ops` entry (what the host wrote before batching) reads as a batch of one
//!   payload at slot 0.
//!
//! # The batcher (one task per open group)
//! [`super::GroupHandle::submit`] queues a payload (at most [`MAX_QUEUED_PROPOSALS`]
//! waiting; `submit` waits for room beyond that). The batcher hands openraft one entry at
//! a time, in queue order, and keeps at most [`MAX_ENTRIES_IN_FLIGHT`] entries submitted
//! and not yet answered: while they are flushed and replicated the queue fills, and the
//! next entry takes everything queued, up to [`MAX_BATCH_SLOTS`] payloads and
//! [`MAX_BATCH_BYTES`] (a payload larger than that goes alone). A lone payload with no
//! entry in flight goes at once: there is no timer. The more load, the more per entry.
//!
//! Invariants: proposals land in the log in the order they were queued; a proposal's
//! [`Position`] is sent only after openraft answered its entry committed and applied
//! here; when an entry fails, every proposal in it gets the same error.
//!
//! **Held** (a leadership hand-over, `handover.rs`): while the group's `writes_held` is
//! set, the batcher forms no entry; once every entry in flight was answered it reports
//! itself `batcher_quiet` (the leader's last log id then stands still) and waits until
//! the hold ends. Queued proposals wait meanwhile, and go to openraft afterwards (refused
//! `NotLeader` when the leadership moved).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use openraft::error::ClientWriteError;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::instance::Instance;
use super::GroupShared;
use crate::codec::Decoder;
use crate::error::{ClusterError, GroupError, Result};
use crate::groups::WriteHold;
use crate::placement::GroupId;
use crate::types::{NodeId, Request, TypeConfig, MAX_OPS_BYTES};

/// Version byte of the host batch encoding.
pub const HOST_BATCH_VERSION: u8 = 1;
/// Most payloads one entry carries.
pub const MAX_BATCH_SLOTS: usize = 4096;
/// Most bytes (payloads and their length words) one entry gathers from the queue; a
/// larger single payload, up to [`super::MAX_PROPOSAL_BYTES`], goes in an entry of its
/// own. Lower when the node log's records are smaller ([`Limits::for_record`]).
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// Bytes of a node-log record around a batch's payloads and length words: the node
/// record head (10), the entry head (26), the request tag and length (5), the batch head
/// (5), with room to spare.
pub const ENTRY_OVERHEAD_BYTES: usize = 64;
/// Bytes each proposal adds to an entry besides its payload (its length word).
const SLOT_OVERHEAD_BYTES: usize = 4;
/// Entries of one group handed to openraft and not yet answered. Small on purpose: an
/// entry submitted early is formed early, with little in it; with two, one entry is
/// being flushed and replicated while the next waits in openraft, and the queue fills
/// for the one after.
pub const MAX_ENTRIES_IN_FLIGHT: usize = 2;
/// Proposals one group queues before [`super::GroupHandle::submit`] waits for room.
pub const MAX_QUEUED_PROPOSALS: usize = 65_536;
/// Bytes of the batch header besides the length table: version and count.
const BATCH_HEAD_LEN: usize = 1 + 4;

const _: () = assert!(MAX_BATCH_SLOTS <= u32::MAX as usize);
const _: () = assert!(MAX_BATCH_BYTES + BATCH_HEAD_LEN + 4 * MAX_BATCH_SLOTS <= MAX_OPS_BYTES);
const _: () = assert!(MAX_ENTRIES_IN_FLIGHT >= 1);
const _: () =
    assert!(ENTRY_OVERHEAD_BYTES >= 10 + crate::entry::ENTRY_HEADER_LEN + 5 + BATCH_HEAD_LEN);

/// Where a proposal is in its group: the entry's log index and the slot inside it.
/// Positions order as the proposals were queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The Raft log index of the entry (the unit of purge and of snapshot carrying).
    pub index: u64,
    /// The proposal's slot in the entry, from 0.
    pub slot: u32,
}

impl Position {
    pub fn new(index: u64, slot: u32) -> Position {
        Position { index, slot }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.index, self.slot)
    }
}

/// What one group's entries may hold, from the node log's record size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Bytes of payloads and length words one entry gathers.
    pub(crate) batch_bytes: usize,
    /// Largest single proposal.
    pub(crate) proposal_bytes: usize,
}

impl Limits {
    /// The limits for a node log whose records hold at most `record_bytes_max` bytes: an
    /// entry must fit in one record, or the log refuses it and the group stops.
    pub(crate) fn for_record(record_bytes_max: u32) -> Limits {
        let room = (record_bytes_max as usize).saturating_sub(ENTRY_OVERHEAD_BYTES);
        Limits {
            batch_bytes: MAX_BATCH_BYTES.min(room),
            proposal_bytes: super::MAX_PROPOSAL_BYTES.min(room.saturating_sub(SLOT_OVERHEAD_BYTES)),
        }
    }
}

/// Encodes `payloads` (at least one) as a batch body.
pub(crate) fn encode(payloads: &[Bytes]) -> Bytes {
    let data: usize = payloads.iter().map(Bytes::len).sum();
    let mut b = BytesMut::with_capacity(BATCH_HEAD_LEN + 4 * payloads.len() + data);
    b.extend_from_slice(&[HOST_BATCH_VERSION]);
    b.extend_from_slice(&(payloads.len() as u32).to_le_bytes());
    for p in payloads {
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
    }
    for p in payloads {
        b.extend_from_slice(p);
    }
    b.freeze()
}

/// The payloads of one entry, as its body holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Slots {
    /// A `Request::Ops` entry: one payload, slot 0.
    One(Bytes),
    /// A `Request::Batch` entry: its body in the batch encoding.
    Batch(Bytes),
}

impl Slots {
    /// The payloads of a request, if it is one the host proposes.
    pub(crate) fn of(request: Request) -> Option<Slots> {
        match request {
            Request::Ops(b) => Some(Slots::One(b)),
            Request::Batch(b) => Some(Slots::Batch(b)),
            _ => None,
        }
    }

    /// Every payload, in slot order, as slices of the body.
    pub(crate) fn payloads(&self) -> Result<Vec<Bytes>> {
        match self {
            Slots::One(b) => Ok(vec![b.clone()]),
            Slots::Batch(b) => {
                let (lens, mut at) = table(b)?;
                let mut out = Vec::with_capacity(lens.len());
                for len in lens {
                    out.push(b.slice(at..at + len));
                    at += len;
                }
                Ok(out)
            }
        }
    }

    /// The payload in `slot`, `None` past the last.
    pub(crate) fn get(&self, slot: u32) -> Result<Option<Bytes>> {
        match self {
            Slots::One(b) => Ok((slot == 0).then(|| b.clone())),
            Slots::Batch(b) => {
                let (lens, data) = table(b)?;
                let slot = slot as usize;
                if slot >= lens.len() {
                    return Ok(None);
                }
                let at = data + lens[..slot].iter().sum::<usize>();
                Ok(Some(b.slice(at..at + lens[slot])))
            }
        }
    }
}

/// The length table of a batch body and where its first payload starts; checks that the
/// lengths cover the rest exactly.
fn table(body: &Bytes) -> Result<(Vec<usize>, usize)> {
    let mut d = Decoder::new(body.clone(), "host batch");
    let version = d.u8()?;
    if version != HOST_BATCH_VERSION {
        return Err(ClusterError::UnsupportedVersion {
            what: "host batch",
            found: u16::from(version),
            supported: u16::from(HOST_BATCH_VERSION),
        });
    }
    let n = d.count("host batch slots (MAX_BATCH_SLOTS)", MAX_BATCH_SLOTS, 4)?;
    if n == 0 {
        return Err(d.fail("host batch without a payload"));
    }
    let mut lens = Vec::with_capacity(n);
    let mut total = 0usize;
    for _ in 0..n {
        let len = d.u32()? as usize;
        total = total.saturating_add(len);
        lens.push(len);
    }
    let start = BATCH_HEAD_LEN + 4 * n;
    if body.len().checked_sub(start) != Some(total) {
        return Err(d.fail("host batch lengths do not match its size"));
    }
    Ok((lens, start))
}

/// A proposal waiting in a group's queue.
pub(crate) struct Queued {
    pub(crate) payload: Bytes,
    pub(crate) done: oneshot::Sender<Result<Position, GroupError>>,
}

/// The batcher of one group: takes proposals from `queue` in order, packs them into
/// entries, and answers each with its position. Ends when every handle of the group is
/// gone. It outlives the group's Raft instances: each entry is handed to the instance
/// running when it is formed (a hibernated group is woken for it — or refused
/// `NotLeader` when it is stopped here and led elsewhere, `addresses` naming the
/// leader's member address), held ([`WriteHold`]) until openraft answers the entry, so
/// the group is not stopped under it. Idle, it holds nothing: a parked task, no timer.
pub(crate) async fn run(
    instance: Instance,
    mut queue: mpsc::Receiver<Queued>,
    limits: Limits,
    addresses: impl Fn(NodeId) -> Option<String>,
    shared: Arc<GroupShared>,
) {
    let group = instance.group;
    let in_flight = Arc::new(Semaphore::new(MAX_ENTRIES_IN_FLIGHT));
    let mut held = shared.writes_held.subscribe();
    let mut held_over: Option<Queued> = None;
    loop {
        // Wait for room first: meanwhile the queue fills and the entry gets fuller.
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        let first = match held_over.take() {
            Some(q) => q,
            None => {
                // `held`'s sender lives in `shared`, which this task holds: never closed.
                let next = tokio::select! {
                    q = queue.recv() => Some(q),
                    _ = held.wait_for(|h| *h) => None,
                };
                match next {
                    Some(Some(q)) => q,
                    Some(None) => return,
                    None => {
                        drop(permit);
                        park(&in_flight, &mut held, &shared.batcher_quiet).await;
                        continue;
                    }
                }
            }
        };
        if *held.borrow() {
            held_over = Some(first);
            drop(permit);
            park(&in_flight, &mut held, &shared.batcher_quiet).await;
            continue;
        }
        // The wake (if any) happens before the entry is formed: the queue fills meanwhile.
        let held = instance.hold(&addresses).await;
        let (payloads, dones) = fill(first, &mut queue, &mut held_over, limits.batch_bytes);
        let (raft, hold) = match held {
            Ok(held) => held,
            Err(e) => {
                for done in dones {
                    let _ = done.send(Err(e.clone()));
                }
                continue;
            }
        };
        let body = encode(&payloads);
        drop(payloads);
        match raft.client_write_ff(Request::Batch(body)).await {
            Ok(answer) => {
                tokio::spawn(answer_entry(group, answer, dones, (permit, hold)));
            }
            Err(e) => {
                let e = GroupError::Stopped {
                    group,
                    reason: e.to_string(),
                };
                for done in dones {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Waits, holding every in-flight slot (so every entry formed before was answered), until
/// the hold ends; `quiet` says so meanwhile.
async fn park(
    in_flight: &Arc<Semaphore>,
    held: &mut watch::Receiver<bool>,
    quiet: &watch::Sender<bool>,
) {
    let Ok(all) = in_flight.acquire_many(MAX_ENTRIES_IN_FLIGHT as u32).await else {
        return;
    };
    quiet.send_replace(true);
    let _ = held.wait_for(|h| !*h).await;
    quiet.send_replace(false);
    drop(all);
}

type Dones = Vec<oneshot::Sender<Result<Position, GroupError>>>;

/// The next entry's payloads: `first` and whatever is queued behind it, within the
/// bounds; a payload that would take the entry past `batch_bytes` waits in `held_over`.
fn fill(
    first: Queued,
    queue: &mut mpsc::Receiver<Queued>,
    held_over: &mut Option<Queued>,
    batch_bytes: usize,
) -> (Vec<Bytes>, Dones) {
    let mut bytes = first.payload.len() + SLOT_OVERHEAD_BYTES;
    let mut payloads = vec![first.payload];
    let mut dones = vec![first.done];
    while payloads.len() < MAX_BATCH_SLOTS {
        let Ok(next) = queue.try_recv() else {
            break;
        };
        let len = next.payload.len() + SLOT_OVERHEAD_BYTES;
        if bytes + len > batch_bytes {
            *held_over = Some(next);
            break;
        }
        bytes += len;
        payloads.push(next.payload);
        dones.push(next.done);
    }
    (payloads, dones)
}

type Answer = oneshot::Receiver<
    Result<
        openraft::raft::ClientWriteResponse<TypeConfig>,
        ClientWriteError<crate::types::NodeId, openraft::BasicNode>,
    >,
>;

/// Waits for openraft's answer to one entry and gives every proposal in it its
/// position, or all of them the same error. Holds the entry's in-flight permit and the
/// instance's write hold.
async fn answer_entry(
    group: GroupId,
    answer: Answer,
    dones: Dones,
    _held: (OwnedSemaphorePermit, WriteHold),
) {
    let result = match answer.await {
        Ok(Ok(response)) => Ok(response.log_id.index),
        Ok(Err(ClientWriteError::ForwardToLeader(f))) => Err(GroupError::NotLeader {
            group,
            leader: f.leader_id,
            leader_addr: f.leader_node.map(|n| n.addr),
        }),
        Ok(Err(e)) => Err(GroupError::Membership {
            group,
            reason: e.to_string(),
        }),
        Err(_) => Err(GroupError::Stopped {
            group,
            reason: "Raft stopped before answering".into(),
        }),
    };
    for (slot, done) in dones.into_iter().enumerate() {
        let _ = done.send(match &result {
            Ok(index) => Ok(Position::new(*index, slot as u32)),
            Err(e) => Err(e.clone()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_reads_back_every_slot_as_a_slice_of_its_body() {
        let payloads: Vec<Bytes> = [&b"one"[..], b"", b"three", &[7u8; 300]]
            .iter()
            .map(|p| Bytes::copy_from_slice(p))
            .collect();
        let body = encode(&payloads);
        let slots = Slots::Batch(body.clone());
        let all = slots.payloads().unwrap();
        assert_eq!(all, payloads);
        let range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
        for (s, p) in payloads.iter().enumerate() {
            let got = slots.get(s as u32).unwrap().unwrap();
            assert_eq!(&got, p);
            assert!(range.contains(&(got.as_ptr() as usize)) || got.is_empty());
        }
        assert_eq!(slots.get(4).unwrap(), None);
        let one = Slots::One(Bytes::from_static(b"single"));
        assert_eq!(one.get(0).unwrap().unwrap(), Bytes::from_static(b"single"));
        assert_eq!(one.get(1).unwrap(), None);
        assert_eq!(one.payloads().unwrap().len(), 1);
    }

    /// The layout of `cluster/FORMAT.md` ("host batch"), byte by byte.
    #[test]
    fn the_batch_layout_is_the_documented_one() {
        let body = encode(&[Bytes::from_static(b"ab"), Bytes::from_static(b"xyz")]);
        let expected: &[u8] = &[
            1, // version
            2, 0, 0, 0, // n
            2, 0, 0, 0, // length of slot 0
            3, 0, 0, 0, // length of slot 1
            b'a', b'b', b'x', b'y', b'z',
        ];
        assert_eq!(&body[..], expected);
        let slots = Slots::Batch(Bytes::from_static(expected));
        assert_eq!(slots.get(1).unwrap().unwrap(), Bytes::from_static(b"xyz"));
    }

    #[test]
    fn an_entry_fits_in_one_node_log_record() {
        let small = Limits::for_record(64 << 10);
        assert_eq!(small.batch_bytes, (64 << 10) - ENTRY_OVERHEAD_BYTES);
        assert_eq!(
            small.proposal_bytes,
            small.batch_bytes - SLOT_OVERHEAD_BYTES
        );
        let large = Limits::for_record(u32::MAX);
        assert_eq!(large.batch_bytes, MAX_BATCH_BYTES);
        assert_eq!(large.proposal_bytes, super::super::MAX_PROPOSAL_BYTES);
        assert_eq!(Limits::for_record(10).proposal_bytes, 0);
    }

    #[test]
    fn a_malformed_batch_is_a_typed_error() {
        let body = encode(&[Bytes::from_static(b"abc")]);
        let mut bad = body.to_vec();
        bad[0] = 9;
        assert!(matches!(
            Slots::Batch(Bytes::from(bad)).payloads(),
            Err(ClusterError::UnsupportedVersion { found: 9, .. })
        ));
        let short = body.slice(..body.len() - 1);
        assert!(matches!(
            Slots::Batch(short).get(0),
            Err(ClusterError::Decode { .. })
        ));
        let empty = encode(&[]);
        assert!(matches!(
            Slots::Batch(empty).payloads(),
            Err(ClusterError::Decode { .. })
        ));
        let mut many = vec![HOST_BATCH_VERSION];
        many.extend_from_slice(&(MAX_BATCH_SLOTS as u32 + 1).to_le_bytes());
        assert!(Slots::Batch(Bytes::from(many)).payloads().is_err());
    }
}
