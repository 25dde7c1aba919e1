//! The binary encoding of openraft's RPCs (v1 network API) on the inter-node port, for
//! many Raft groups over one connection.
//!
//! ```text
//! // Format of every body: { version: u8 (= RPC_VERSION) | request_id: u64 | group: u64 | fields }
//! vote      = { term: u64 | node: u64 | committed: u8 }
//! KIND_VOTE            { vote | last_log_id: opt<log_id> }
//! KIND_APPEND          { vote | prev_log_id: opt<log_id> | leader_commit: opt<log_id>
//!                        | n: u32 | n × entry: bytes }       entry = entry.rs encoding
//! KIND_SNAPSHOT        { vote | last_log_id: opt<log_id> | membership_log_id: opt<log_id>
//!                        | membership | snapshot_id: str | offset: u64 | done: u8 | data: bytes }
//! KIND_VOTE_REPLY      { vote | granted: u8 | last_log_id: opt<log_id> }
//! KIND_APPEND_REPLY    { tag: u8 } 0 success | 1 partial { opt<log_id> } | 2 conflict | 3 higher { vote }
//! KIND_SNAPSHOT_REPLY  { vote }
//! KIND_JOIN            { node: u64 | member_addr: str }                  (group 0 only)
//! KIND_LEAVE           { node: u64 }                                     (group 0 only)
//! KIND_MEMBERSHIP_REPLY { tag: u8 } 0 done { detail: str } | 1 not leader { known: u8
//!                        [ | leader: u64 | leader_addr: str ] } | 2 refused { reason: str }
//!                        | 3 last voter { node: u64 }
//! KIND_HIBERNATE       { term: u64 | leader: u64 | last_log_id: opt<log_id> }
//! KIND_HIBERNATE_REPLY { tag: u8 } 0 stopped | 1 wrong term { asked: u64 | ours: u64 }
//!                        | 2 not leader { asked: u64 | known: opt<u64> }
//!                        | 3 log mismatch { asked: opt<log_id> | last_index: opt<u64>
//!                                           | applied: opt<log_id> } | 4 busy
//! KIND_PING            {}                                                  (group 0)
//! KIND_PONG            {}
//! KIND_PROPOSE         { payload: bytes }          (forward.rs: a proposal for the leader)
//! KIND_PROPOSE_REPLY   { tag: u8 } 0 committed { index: u64 | slot: u32 } | 1..7 refusals
//! KIND_ELECT           { term: u64 | leader: u64 | last_log_index: opt<u64> }  (host/handover.rs)
//! KIND_ELECT_REPLY     { tag: u8 } 0 campaigning | 1 refused { reason: str }
//! KIND_HAND_OVER       { to: u64 }       (host/handover.rs: the leader is asked to hand over)
//! KIND_HAND_OVER_REPLY { tag: u8 } 0 campaigning | 1 refused { reason: str }
//! KIND_ERROR           { tag: u8 } 1 unavailable { reason: str }
//!                                  | 2 snapshot mismatch { expect_id: str | expect_offset: u64
//!                                                          | got_id: str | got_offset: u64 }
//!                                  | 3 unknown group (the header's group)
//! ```
//! A reply carries the `request_id` and `group` of its request ([`Header`]), so replies on
//! a connection may come back in any order; `request_id` 0 is never a request's and marks a
//! refusal of the whole connection (failed authentication). Entries reuse the log's
//! encoding (`entry.rs`), so an entry costs the same bytes on the wire as on disk. Every
//! count and length is bounded by a `MAX_*` constant before allocating; an unknown version
//! is [`ClusterError::UnsupportedVersion`].
//!
//! `KIND_HIBERNATE` (issue 12 step 5, `hibernate.rs`) is not openraft's either: a group's
//! leader asks a follower to stop its instance; the follower does only if it holds
//! exactly that term, leader and last log id (applied), else it refuses and says why
//! ([`HibernateRefusal`]). `KIND_PING` is the per-peer liveness heartbeat (one per node
//! pair, not per group): answered at once by the peer server, it touches no group.
//!
//! `KIND_JOIN` and `KIND_LEAVE` are not openraft's: a node asks the leader of the metadata
//! group ([`METADATA_GROUP`]) to add it (auto-join) or to take it out (drain);
//! `membership.rs` serves and sends them. They travel the same authenticated port as Raft
//! traffic, so only a peer holding the cluster secret / certificate can change the
//! membership.

use bytes::Bytes;
use openraft::error::SnapshotMismatch;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{LeaderId, SnapshotMeta, SnapshotSegmentId, StoredMembership, Vote};

use crate::codec::{check_limit, Decoder, Encoder};
use crate::entry::{decode_entry, decode_membership, encode_entry_into, encode_membership};
use crate::error::{ClusterError, Result};
use crate::frame::MAX_RPC_FRAME_BYTES;
use crate::groups::METADATA_GROUP;
use crate::placement::GroupId;
use crate::state_file::{decode_opt_log_id, encode_opt_log_id};
use crate::types::*;

/// Version byte of every RPC body. 2: the `request_id | group` header (one connection per
/// peer pair carries every group, replies in any order).
pub const RPC_VERSION: u8 = 2;
/// Bytes of the header every body starts with: `version | request_id | group`.
pub(crate) const HEADER_LEN: usize = 1 + 8 + 8;
/// The `request_id` of a refusal that concerns the whole connection, not one request.
pub(crate) const CONNECTION_REQUEST_ID: u64 = 0;
/// Most entries one `append_entries` may carry (openraft's default batch is 300).
pub const MAX_RPC_ENTRIES: usize = 64 * 1024;
/// Longest snapshot id, and longest error reason, on the wire.
pub const MAX_RPC_STRING_BYTES: usize = 1024;

pub(crate) const KIND_VOTE: u8 = 1;
pub(crate) const KIND_APPEND: u8 = 2;
pub(crate) const KIND_SNAPSHOT: u8 = 3;
pub(crate) const KIND_JOIN: u8 = 4;
pub(crate) const KIND_LEAVE: u8 = 5;
pub(crate) const KIND_HIBERNATE: u8 = 6;
pub(crate) const KIND_PING: u8 = 7;
pub(crate) const KIND_PROPOSE: u8 = 8;
pub(crate) const KIND_APP: u8 = 9;
pub(crate) const KIND_ELECT: u8 = 10;
pub(crate) const KIND_HAND_OVER: u8 = 11;
pub(crate) const KIND_VOTE_REPLY: u8 = 0x81;
pub(crate) const KIND_APPEND_REPLY: u8 = 0x82;
pub(crate) const KIND_SNAPSHOT_REPLY: u8 = 0x83;
pub(crate) const KIND_MEMBERSHIP_REPLY: u8 = 0x84;
pub(crate) const KIND_HIBERNATE_REPLY: u8 = 0x86;
pub(crate) const KIND_PONG: u8 = 0x87;
pub(crate) const KIND_PROPOSE_REPLY: u8 = 0x88;
pub(crate) const KIND_APP_REPLY: u8 = 0x89;
pub(crate) const KIND_ELECT_REPLY: u8 = 0x8a;
pub(crate) const KIND_HAND_OVER_REPLY: u8 = 0x8b;
pub(crate) const KIND_ERROR: u8 = 0xff;

const ERROR_UNAVAILABLE: u8 = 1;
const ERROR_SNAPSHOT_MISMATCH: u8 = 2;
const ERROR_UNKNOWN_GROUP: u8 = 3;

/// What every RPC body starts with after its version: which request a reply answers, and
/// which Raft group both concern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// Chosen by the sender of a request, unique among its requests in flight on the
    /// connection, never [`CONNECTION_REQUEST_ID`]; echoed by the reply.
    pub request_id: u64,
    pub group: GroupId,
}

impl Header {
    /// A request's header; the connection sets the id when it sends the body
    /// ([`set_request_id`]).
    pub fn request(group: GroupId) -> Header {
        Header {
            request_id: CONNECTION_REQUEST_ID,
            group,
        }
    }
}

/// Stamps request `id` into an encoded body (its bytes 1..9).
pub(crate) fn set_request_id(body: &mut [u8], id: u64) {
    if let Some(field) = body.get_mut(1..9) {
        field.copy_from_slice(&id.to_le_bytes());
    }
}

/// The header of a body, without decoding the rest; an unknown version or a body shorter
/// than [`HEADER_LEN`] is an error.
pub(crate) fn decode_header(body: &Bytes) -> Result<Header> {
    open_header(body.clone(), "rpc header").map(|(_, h)| h)
}

/// Why a peer refused an RPC (sent as a `KIND_ERROR` frame).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteRefusal {
    /// Its Raft is stopping or stopped; try again later (or another node).
    #[error("peer unavailable: {0}")]
    Unavailable(String),
    /// A snapshot chunk did not continue the transfer the peer was receiving.
    #[error(transparent)]
    SnapshotMismatch(SnapshotMismatch),
    /// The peer hosts no replica of this group (not created there yet, or removed).
    #[error("peer hosts no replica of group {0}")]
    UnknownGroup(GroupId),
}

pub(crate) fn start(h: Header, kind_hint: usize) -> Encoder {
    let mut e = Encoder::with_capacity(HEADER_LEN + kind_hint);
    e.u8(RPC_VERSION);
    e.u64(h.request_id);
    e.u64(h.group);
    e
}

pub(crate) fn open_header(body: Bytes, what: &'static str) -> Result<(Decoder, Header)> {
    let mut d = Decoder::new(body, what);
    let version = d.u8()?;
    if version != RPC_VERSION {
        return Err(ClusterError::UnsupportedVersion {
            what,
            found: u16::from(version),
            supported: u16::from(RPC_VERSION),
        });
    }
    let request_id = d.u64()?;
    let group = d.u64()?;
    Ok((d, Header { request_id, group }))
}

/// A decoder past the header (which [`decode_header`] reads).
pub(crate) fn open(body: Bytes, what: &'static str) -> Result<Decoder> {
    open_header(body, what).map(|(d, _)| d)
}

fn encode_vote(e: &mut Encoder, v: &Vote<NodeId>) {
    e.u64(v.leader_id.term);
    e.u64(v.leader_id.node_id);
    e.u8(u8::from(v.committed));
}

fn decode_vote(d: &mut Decoder) -> Result<Vote<NodeId>> {
    let term = d.u64()?;
    let node = d.u64()?;
    let committed = d.bool()?;
    Ok(Vote {
        leader_id: LeaderId::new(term, node),
        committed,
    })
}

fn encode_str(e: &mut Encoder, what: &'static str, s: &str) -> Result<()> {
    check_limit(what, s.len(), MAX_RPC_STRING_BYTES)?;
    e.str(s);
    Ok(())
}

pub(crate) fn encode_vote_request(h: Header, rpc: &VoteRequest<NodeId>) -> Vec<u8> {
    let mut e = start(h, 64);
    encode_vote(&mut e, &rpc.vote);
    encode_opt_log_id(&mut e, &rpc.last_log_id);
    e.buf
}

pub(crate) fn decode_vote_request(body: Bytes) -> Result<VoteRequest<NodeId>> {
    let mut d = open(body, "vote request")?;
    let vote = decode_vote(&mut d)?;
    let last_log_id = decode_opt_log_id(&mut d)?;
    d.finish()?;
    Ok(VoteRequest { vote, last_log_id })
}

pub(crate) fn encode_vote_reply(h: Header, r: &VoteResponse<NodeId>) -> Vec<u8> {
    let mut e = start(h, 64);
    encode_vote(&mut e, &r.vote);
    e.u8(u8::from(r.vote_granted));
    encode_opt_log_id(&mut e, &r.last_log_id);
    e.buf
}

pub(crate) fn decode_vote_reply(body: Bytes) -> Result<VoteResponse<NodeId>> {
    let mut d = open(body, "vote reply")?;
    let vote = decode_vote(&mut d)?;
    let vote_granted = d.bool()?;
    let last_log_id = decode_opt_log_id(&mut d)?;
    d.finish()?;
    Ok(VoteResponse {
        vote,
        vote_granted,
        last_log_id,
    })
}

/// Encodes an `append_entries`; a body over [`MAX_RPC_FRAME_BYTES`] is `LimitExceeded`
/// (the caller turns that into openraft's `PayloadTooLarge`).
pub(crate) fn encode_append_request(
    h: Header,
    rpc: &AppendEntriesRequest<TypeConfig>,
) -> Result<Vec<u8>> {
    check_limit("append entries count", rpc.entries.len(), MAX_RPC_ENTRIES)?;
    let mut e = start(h, 128);
    encode_vote(&mut e, &rpc.vote);
    encode_opt_log_id(&mut e, &rpc.prev_log_id);
    encode_opt_log_id(&mut e, &rpc.leader_commit);
    e.u32(rpc.entries.len() as u32);
    for entry in &rpc.entries {
        // `len: u32 | entry`, the entry encoded in place (no copy through a buffer).
        let at = e.buf.len();
        e.u32(0);
        encode_entry_into(&mut e, entry)?;
        let len = (e.buf.len() - at - 4) as u32;
        e.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        check_limit("append entries frame", e.buf.len(), MAX_RPC_FRAME_BYTES)?;
    }
    Ok(e.buf)
}

pub(crate) fn decode_append_request(body: Bytes) -> Result<AppendEntriesRequest<TypeConfig>> {
    let mut d = open(body, "append entries request")?;
    let vote = decode_vote(&mut d)?;
    let prev_log_id = decode_opt_log_id(&mut d)?;
    let leader_commit = decode_opt_log_id(&mut d)?;
    let n = d.count("append entries count", MAX_RPC_ENTRIES, 4)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        let raw = d.bytes("raft entry", MAX_RPC_FRAME_BYTES)?;
        entries.push(decode_entry(raw)?);
    }
    d.finish()?;
    Ok(AppendEntriesRequest {
        vote,
        prev_log_id,
        entries,
        leader_commit,
    })
}

const APPEND_SUCCESS: u8 = 0;
const APPEND_PARTIAL: u8 = 1;
const APPEND_CONFLICT: u8 = 2;
const APPEND_HIGHER_VOTE: u8 = 3;

pub(crate) fn encode_append_reply(h: Header, r: &AppendEntriesResponse<NodeId>) -> Vec<u8> {
    let mut e = start(h, 64);
    match r {
        AppendEntriesResponse::Success => e.u8(APPEND_SUCCESS),
        AppendEntriesResponse::PartialSuccess(id) => {
            e.u8(APPEND_PARTIAL);
            encode_opt_log_id(&mut e, id);
        }
        AppendEntriesResponse::Conflict => e.u8(APPEND_CONFLICT),
        AppendEntriesResponse::HigherVote(v) => {
            e.u8(APPEND_HIGHER_VOTE);
            encode_vote(&mut e, v);
        }
    }
    e.buf
}

pub(crate) fn decode_append_reply(body: Bytes) -> Result<AppendEntriesResponse<NodeId>> {
    let mut d = open(body, "append entries reply")?;
    let reply = match d.u8()? {
        APPEND_SUCCESS => AppendEntriesResponse::Success,
        APPEND_PARTIAL => AppendEntriesResponse::PartialSuccess(decode_opt_log_id(&mut d)?),
        APPEND_CONFLICT => AppendEntriesResponse::Conflict,
        APPEND_HIGHER_VOTE => AppendEntriesResponse::HigherVote(decode_vote(&mut d)?),
        _ => return Err(d.fail("unknown append entries reply tag")),
    };
    d.finish()?;
    Ok(reply)
}

pub(crate) fn encode_snapshot_request(
    h: Header,
    rpc: &InstallSnapshotRequest<TypeConfig>,
) -> Result<Vec<u8>> {
    check_limit(
        "snapshot chunk",
        rpc.data.len(),
        MAX_RPC_FRAME_BYTES - 64 * 1024,
    )?;
    let mut e = start(h, rpc.data.len() + 256);
    encode_vote(&mut e, &rpc.vote);
    encode_opt_log_id(&mut e, &rpc.meta.last_log_id);
    encode_opt_log_id(&mut e, rpc.meta.last_membership.log_id());
    encode_membership(&mut e, rpc.meta.last_membership.membership())?;
    encode_str(&mut e, "snapshot id", &rpc.meta.snapshot_id)?;
    e.u64(rpc.offset);
    e.u8(u8::from(rpc.done));
    e.bytes(&rpc.data);
    check_limit("snapshot frame", e.buf.len(), MAX_RPC_FRAME_BYTES)?;
    Ok(e.buf)
}

pub(crate) fn decode_snapshot_request(body: Bytes) -> Result<InstallSnapshotRequest<TypeConfig>> {
    let mut d = open(body, "install snapshot request")?;
    let vote = decode_vote(&mut d)?;
    let last_log_id = decode_opt_log_id(&mut d)?;
    let membership_log_id = decode_opt_log_id(&mut d)?;
    let membership = decode_membership(&mut d)?;
    let snapshot_id = d.str("snapshot id", MAX_RPC_STRING_BYTES)?;
    let offset = d.u64()?;
    let done = d.bool()?;
    let data = d.bytes("snapshot chunk", MAX_RPC_FRAME_BYTES)?.to_vec();
    d.finish()?;
    let meta = SnapshotMeta {
        last_log_id,
        last_membership: StoredMembership::new(membership_log_id, membership),
        snapshot_id,
    };
    Ok(InstallSnapshotRequest {
        vote,
        meta,
        offset,
        data,
        done,
    })
}

pub(crate) fn encode_snapshot_reply(h: Header, r: &InstallSnapshotResponse<NodeId>) -> Vec<u8> {
    let mut e = start(h, 32);
    encode_vote(&mut e, &r.vote);
    e.buf
}

pub(crate) fn decode_snapshot_reply(body: Bytes) -> Result<InstallSnapshotResponse<NodeId>> {
    let mut d = open(body, "install snapshot reply")?;
    let vote = decode_vote(&mut d)?;
    d.finish()?;
    Ok(InstallSnapshotResponse { vote })
}

/// A node's request to the leader about its own membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipRequest {
    /// Add `node` (member address `addr`) as a learner, let it catch up, make it a voter.
    Join { node: NodeId, addr: String },
    /// Take `node` out of the membership (a voter is first demoted to learner).
    Leave { node: NodeId },
}

/// The leader's (or a follower's) answer to a [`MembershipRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipReply {
    /// Done: the node is a voter (join) or no longer a member (leave); `detail` says
    /// what changed (or that nothing had to).
    Done { detail: String },
    /// The node asked does not lead; the leader it knows of, `(id, member address)`.
    NotLeader { leader: Option<(NodeId, String)> },
    /// The leader will not do it now (a change is running, catch-up too slow, …).
    Refused { reason: String },
    /// `node` is the last voter: it cannot leave (the cluster would have none).
    LastVoter { node: NodeId },
}

const MEMBERSHIP_DONE: u8 = 0;
const MEMBERSHIP_NOT_LEADER: u8 = 1;
const MEMBERSHIP_REFUSED: u8 = 2;
const MEMBERSHIP_LAST_VOTER: u8 = 3;

/// A reason or detail cut to [`MAX_RPC_STRING_BYTES`] (informative only, never refused).
pub(crate) fn encode_cut_str(e: &mut Encoder, s: &str) {
    let mut end = s.len().min(MAX_RPC_STRING_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    e.str(&s[..end]);
}

/// `(kind, body)` of a membership request; an address over [`MAX_NODE_ADDR_BYTES`] is
/// `LimitExceeded`.
pub(crate) fn encode_membership_request(r: &MembershipRequest) -> Result<(u8, Vec<u8>)> {
    let mut e = start(Header::request(METADATA_GROUP), 64);
    Ok(match r {
        MembershipRequest::Join { node, addr } => {
            check_limit("member address", addr.len(), MAX_NODE_ADDR_BYTES)?;
            e.u64(*node);
            e.str(addr);
            (KIND_JOIN, e.buf)
        }
        MembershipRequest::Leave { node } => {
            e.u64(*node);
            (KIND_LEAVE, e.buf)
        }
    })
}

pub(crate) fn decode_membership_request(kind: u8, body: Bytes) -> Result<MembershipRequest> {
    let mut d = open(body, "membership request")?;
    let node = d.u64()?;
    let request = if kind == KIND_JOIN {
        let addr = d.str("member address", MAX_NODE_ADDR_BYTES)?;
        MembershipRequest::Join { node, addr }
    } else {
        MembershipRequest::Leave { node }
    };
    d.finish()?;
    Ok(request)
}

pub(crate) fn encode_membership_reply(h: Header, r: &MembershipReply) -> Vec<u8> {
    let mut e = start(h, 128);
    match r {
        MembershipReply::Done { detail } => {
            e.u8(MEMBERSHIP_DONE);
            encode_cut_str(&mut e, detail);
        }
        MembershipReply::NotLeader { leader } => {
            e.u8(MEMBERSHIP_NOT_LEADER);
            match leader {
                // An address the membership holds is bounded already; a longer one is
                // not passed on (the asker then looks for the leader elsewhere).
                Some((id, addr)) if addr.len() <= MAX_NODE_ADDR_BYTES => {
                    e.u8(1);
                    e.u64(*id);
                    e.str(addr);
                }
                _ => e.u8(0),
            }
        }
        MembershipReply::Refused { reason } => {
            e.u8(MEMBERSHIP_REFUSED);
            encode_cut_str(&mut e, reason);
        }
        MembershipReply::LastVoter { node } => {
            e.u8(MEMBERSHIP_LAST_VOTER);
            e.u64(*node);
        }
    }
    e.buf
}

pub(crate) fn decode_membership_reply(body: Bytes) -> Result<MembershipReply> {
    let mut d = open(body, "membership reply")?;
    let reply = match d.u8()? {
        MEMBERSHIP_DONE => MembershipReply::Done {
            detail: d.str("membership detail", MAX_RPC_STRING_BYTES)?,
        },
        MEMBERSHIP_NOT_LEADER => {
            let leader = if d.bool()? {
                let id = d.u64()?;
                Some((id, d.str("member address", MAX_NODE_ADDR_BYTES)?))
            } else {
                None
            };
            MembershipReply::NotLeader { leader }
        }
        MEMBERSHIP_REFUSED => MembershipReply::Refused {
            reason: d.str("membership refusal", MAX_RPC_STRING_BYTES)?,
        },
        MEMBERSHIP_LAST_VOTER => MembershipReply::LastVoter { node: d.u64()? },
        _ => return Err(d.fail("unknown membership reply tag")),
    };
    d.finish()?;
    Ok(reply)
}

/// A leader's request that a follower stop its instance of the header's group
/// (`hibernate.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HibernateRequest {
    /// The leader's term.
    pub term: u64,
    /// The leader's node id.
    pub leader: NodeId,
    /// The leader's last log id, committed and matched by every follower.
    pub last_log_id: Option<LogId>,
}

/// Why a follower refused to hibernate: it does not hold exactly what the leader named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HibernateRefusal {
    /// The request's term is not the replica's.
    #[error("hibernate refused: term {asked} is not this replica's term {ours}")]
    WrongTerm { asked: u64, ours: u64 },
    /// The requester is not the leader this replica follows.
    #[error("hibernate refused: node {asked} is not this replica's leader ({known:?})")]
    NotLeader {
        asked: NodeId,
        known: Option<NodeId>,
    },
    /// The replica's log or applied index is not exactly the request's last log id.
    #[error(
        "hibernate refused: asked to stop at {asked:?}, this replica holds up to index \
         {last_index:?} and applied {applied:?}"
    )]
    LogMismatch {
        asked: Option<LogId>,
        last_index: Option<u64>,
        applied: Option<LogId>,
    },
    /// A write is being proposed through this replica.
    #[error("hibernate refused: a write is being proposed through this replica")]
    Busy,
}

const HIBERNATE_STOPPED: u8 = 0;
const HIBERNATE_WRONG_TERM: u8 = 1;
const HIBERNATE_NOT_LEADER: u8 = 2;
const HIBERNATE_LOG_MISMATCH: u8 = 3;
const HIBERNATE_BUSY: u8 = 4;

pub(crate) fn encode_opt_u64(e: &mut Encoder, v: Option<u64>) {
    match v {
        Some(v) => {
            e.u8(1);
            e.u64(v);
        }
        None => e.u8(0),
    }
}

pub(crate) fn decode_opt_u64(d: &mut Decoder) -> Result<Option<u64>> {
    Ok(if d.bool()? { Some(d.u64()?) } else { None })
}

pub(crate) fn encode_hibernate_request(h: Header, r: &HibernateRequest) -> Vec<u8> {
    let mut e = start(h, 48);
    e.u64(r.term);
    e.u64(r.leader);
    encode_opt_log_id(&mut e, &r.last_log_id);
    e.buf
}

pub(crate) fn decode_hibernate_request(body: Bytes) -> Result<HibernateRequest> {
    let mut d = open(body, "hibernate request")?;
    let term = d.u64()?;
    let leader = d.u64()?;
    let last_log_id = decode_opt_log_id(&mut d)?;
    d.finish()?;
    Ok(HibernateRequest {
        term,
        leader,
        last_log_id,
    })
}

pub(crate) fn encode_hibernate_reply(
    h: Header,
    r: &std::result::Result<(), HibernateRefusal>,
) -> Vec<u8> {
    let mut e = start(h, 48);
    match r {
        Ok(()) => e.u8(HIBERNATE_STOPPED),
        Err(HibernateRefusal::WrongTerm { asked, ours }) => {
            e.u8(HIBERNATE_WRONG_TERM);
            e.u64(*asked);
            e.u64(*ours);
        }
        Err(HibernateRefusal::NotLeader { asked, known }) => {
            e.u8(HIBERNATE_NOT_LEADER);
            e.u64(*asked);
            encode_opt_u64(&mut e, *known);
        }
        Err(HibernateRefusal::LogMismatch {
            asked,
            last_index,
            applied,
        }) => {
            e.u8(HIBERNATE_LOG_MISMATCH);
            encode_opt_log_id(&mut e, asked);
            encode_opt_u64(&mut e, *last_index);
            encode_opt_log_id(&mut e, applied);
        }
        Err(HibernateRefusal::Busy) => e.u8(HIBERNATE_BUSY),
    }
    e.buf
}

pub(crate) fn decode_hibernate_reply(
    body: Bytes,
) -> Result<std::result::Result<(), HibernateRefusal>> {
    let mut d = open(body, "hibernate reply")?;
    let reply = match d.u8()? {
        HIBERNATE_STOPPED => Ok(()),
        HIBERNATE_WRONG_TERM => Err(HibernateRefusal::WrongTerm {
            asked: d.u64()?,
            ours: d.u64()?,
        }),
        HIBERNATE_NOT_LEADER => Err(HibernateRefusal::NotLeader {
            asked: d.u64()?,
            known: decode_opt_u64(&mut d)?,
        }),
        HIBERNATE_LOG_MISMATCH => Err(HibernateRefusal::LogMismatch {
            asked: decode_opt_log_id(&mut d)?,
            last_index: decode_opt_u64(&mut d)?,
            applied: decode_opt_log_id(&mut d)?,
        }),
        HIBERNATE_BUSY => Err(HibernateRefusal::Busy),
        _ => return Err(d.fail("unknown hibernate reply tag")),
    };
    d.finish()?;
    Ok(reply)
}

/// A liveness ping or its pong: the header only.
pub(crate) fn encode_empty(h: Header) -> Vec<u8> {
    start(h, 0).buf
}

pub(crate) fn decode_empty(body: Bytes, what: &'static str) -> Result<()> {
    open(body, what)?.finish()
}

pub(crate) fn encode_refusal(h: Header, r: &RemoteRefusal) -> Vec<u8> {
    let mut e = start(h, 128);
    match r {
        RemoteRefusal::Unavailable(reason) => {
            e.u8(ERROR_UNAVAILABLE);
            // A reason is informative only: cut it to the limit rather than fail.
            let mut end = reason.len().min(MAX_RPC_STRING_BYTES);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            e.str(&reason[..end]);
        }
        RemoteRefusal::SnapshotMismatch(m) => {
            e.u8(ERROR_SNAPSHOT_MISMATCH);
            for seg in [&m.expect, &m.got] {
                let id = if seg.id.len() <= MAX_RPC_STRING_BYTES {
                    &seg.id[..]
                } else {
                    ""
                };
                e.str(id);
                e.u64(seg.offset);
            }
        }
        RemoteRefusal::UnknownGroup(_) => e.u8(ERROR_UNKNOWN_GROUP),
    }
    e.buf
}

pub(crate) fn decode_refusal(body: Bytes) -> Result<RemoteRefusal> {
    let (mut d, header) = open_header(body, "rpc error")?;
    let refusal = match d.u8()? {
        ERROR_UNKNOWN_GROUP => RemoteRefusal::UnknownGroup(header.group),
        ERROR_UNAVAILABLE => {
            RemoteRefusal::Unavailable(d.str("error reason", MAX_RPC_STRING_BYTES)?)
        }
        ERROR_SNAPSHOT_MISMATCH => {
            let mut seg = || -> Result<SnapshotSegmentId> {
                let id = d.str("snapshot id", MAX_RPC_STRING_BYTES)?;
                let offset = d.u64()?;
                Ok(SnapshotSegmentId { id, offset })
            };
            let expect = seg()?;
            let got = seg()?;
            RemoteRefusal::SnapshotMismatch(SnapshotMismatch { expect, got })
        }
        _ => return Err(d.fail("unknown rpc error tag")),
    };
    d.finish()?;
    Ok(refusal)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership};

    use super::*;

    const H: Header = Header {
        request_id: 7,
        group: 42,
    };

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn vote() -> Vote<NodeId> {
        Vote::new_committed(3, 1)
    }

    fn membership() -> Membership<NodeId, BasicNode> {
        let nodes: BTreeMap<NodeId, BasicNode> = (0..3)
            .map(|i| (i, BasicNode::new(format!("10.0.0.{i}:5680"))))
            .collect();
        Membership::new(vec![BTreeSet::from([0, 1, 2])], nodes)
    }

    #[test]
    fn every_rpc_and_reply_round_trips() {
        let v = VoteRequest::new(vote(), Some(log_id(2, 9)));
        assert_eq!(
            decode_vote_request(encode_vote_request(H, &v).into()).unwrap(),
            v
        );
        let r = VoteResponse::new(vote(), None, true);
        assert_eq!(
            decode_vote_reply(encode_vote_reply(H, &r).into()).unwrap(),
            r
        );

        let entries = vec![
            Entry {
                log_id: log_id(3, 10),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(3, 11),
                payload: EntryPayload::Normal(Request::Produce {
                    address: "orders".into(),
                    messages: vec![Bytes::from_static(b"m1"), Bytes::from_static(b"m2")],
                }),
            },
            Entry {
                log_id: log_id(3, 12),
                payload: EntryPayload::Membership(membership()),
            },
        ];
        let a = AppendEntriesRequest {
            vote: vote(),
            prev_log_id: Some(log_id(2, 9)),
            entries,
            leader_commit: None,
        };
        let back = decode_append_request(encode_append_request(H, &a).unwrap().into()).unwrap();
        assert_eq!(
            (
                back.vote,
                back.prev_log_id,
                back.leader_commit,
                back.entries
            ),
            (a.vote, a.prev_log_id, a.leader_commit, a.entries)
        );
        for reply in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(Some(log_id(3, 11))),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new(4, 2)),
        ] {
            assert_eq!(
                decode_append_reply(encode_append_reply(H, &reply).into()).unwrap(),
                reply
            );
        }

        let s = InstallSnapshotRequest {
            vote: vote(),
            meta: SnapshotMeta {
                last_log_id: Some(log_id(3, 12)),
                last_membership: StoredMembership::new(Some(log_id(3, 12)), membership()),
                snapshot_id: "3-12-7".into(),
            },
            offset: 4096,
            data: vec![1, 2, 3],
            done: true,
        };
        assert_eq!(
            decode_snapshot_request(encode_snapshot_request(H, &s).unwrap().into()).unwrap(),
            s
        );
        let sr = InstallSnapshotResponse { vote: vote() };
        assert_eq!(
            decode_snapshot_reply(encode_snapshot_reply(H, &sr).into()).unwrap(),
            sr
        );

        let mismatch = RemoteRefusal::SnapshotMismatch(SnapshotMismatch {
            expect: SnapshotSegmentId {
                id: "a".into(),
                offset: 0,
            },
            got: SnapshotSegmentId {
                id: "b".into(),
                offset: 9,
            },
        });
        let gone = RemoteRefusal::Unavailable("raft stopped".into());
        let unknown = RemoteRefusal::UnknownGroup(H.group);
        for refusal in [mismatch, gone, unknown] {
            assert_eq!(
                decode_refusal(encode_refusal(H, &refusal).into()).unwrap(),
                refusal
            );
        }
    }

    #[test]
    fn hibernate_requests_replies_and_pings_round_trip_and_truncations_fail() {
        let r = HibernateRequest {
            term: 4,
            leader: 2,
            last_log_id: Some(log_id(4, 17)),
        };
        let body = encode_hibernate_request(H, &r);
        assert_eq!(decode_hibernate_request(body.clone().into()).unwrap(), r);
        for cut in 0..body.len() {
            assert!(decode_hibernate_request(Bytes::copy_from_slice(&body[..cut])).is_err());
        }
        for reply in [
            Ok(()),
            Err(HibernateRefusal::WrongTerm { asked: 5, ours: 4 }),
            Err(HibernateRefusal::NotLeader {
                asked: 1,
                known: Some(2),
            }),
            Err(HibernateRefusal::NotLeader {
                asked: 1,
                known: None,
            }),
            Err(HibernateRefusal::LogMismatch {
                asked: Some(log_id(4, 17)),
                last_index: Some(16),
                applied: None,
            }),
            Err(HibernateRefusal::Busy),
        ] {
            let body = encode_hibernate_reply(H, &reply);
            assert_eq!(decode_hibernate_reply(body.clone().into()).unwrap(), reply);
            for cut in 0..body.len() {
                assert!(decode_hibernate_reply(Bytes::copy_from_slice(&body[..cut])).is_err());
            }
        }
        let ping = encode_empty(H);
        assert_eq!(ping.len(), HEADER_LEN);
        decode_empty(ping.clone().into(), "ping").unwrap();
        let mut longer = ping;
        longer.push(0);
        assert!(decode_empty(longer.into(), "ping").is_err());
    }

    #[test]
    fn membership_requests_and_replies_round_trip_and_are_bounded() {
        for r in [
            MembershipRequest::Join {
                node: 3,
                addr: "entrepot-3.entrepot:5673/5672".into(),
            },
            MembershipRequest::Leave { node: 4 },
        ] {
            let (kind, body) = encode_membership_request(&r).unwrap();
            assert_eq!(decode_membership_request(kind, body.into()).unwrap(), r);
        }
        for r in [
            MembershipReply::Done {
                detail: "node 3 is a voter".into(),
            },
            MembershipReply::NotLeader { leader: None },
            MembershipReply::NotLeader {
                leader: Some((1, "10.0.0.1:5673/5672".into())),
            },
            MembershipReply::Refused {
                reason: "a membership change is running".into(),
            },
            MembershipReply::LastVoter { node: 2 },
        ] {
            let body = encode_membership_reply(H, &r);
            assert_eq!(decode_membership_reply(body.clone().into()).unwrap(), r);
            for cut in 0..body.len() {
                assert!(decode_membership_reply(Bytes::copy_from_slice(&body[..cut])).is_err());
            }
        }
        let long = MembershipRequest::Join {
            node: 3,
            addr: "x".repeat(MAX_NODE_ADDR_BYTES + 1),
        };
        assert!(matches!(
            encode_membership_request(&long),
            Err(ClusterError::LimitExceeded { .. })
        ));
    }

    #[test]
    fn unknown_versions_truncations_and_hostile_counts_are_errors() {
        let mut body = encode_vote_request(H, &VoteRequest::new(vote(), None));
        body[0] = 9;
        let err = decode_vote_request(body.into()).unwrap_err();
        assert!(matches!(
            err,
            ClusterError::UnsupportedVersion { found: 9, .. }
        ));

        let a = AppendEntriesRequest::<TypeConfig> {
            vote: vote(),
            prev_log_id: None,
            entries: vec![Entry {
                log_id: log_id(1, 1),
                payload: EntryPayload::Blank,
            }],
            leader_commit: None,
        };
        let body = encode_append_request(H, &a).unwrap();
        for cut in 0..body.len() {
            assert!(decode_append_request(Bytes::copy_from_slice(&body[..cut])).is_err());
        }
        // A count of u32::MAX entries is refused before any allocation.
        let mut hostile = body[..HEADER_LEN + 17 + 1 + 1].to_vec();
        hostile.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = decode_append_request(hostile.into()).unwrap_err();
        assert!(matches!(err, ClusterError::LimitExceeded { .. }));
    }

    #[test]
    fn every_body_carries_its_request_id_and_group() {
        let mut body = encode_vote_request(Header::request(5), &VoteRequest::new(vote(), None));
        set_request_id(&mut body, 99);
        let h = decode_header(&Bytes::from(body.clone())).unwrap();
        assert_eq!(
            h,
            Header {
                request_id: 99,
                group: 5
            }
        );
        assert_eq!(body.len(), HEADER_LEN + 17 + 1);
        for cut in 0..HEADER_LEN {
            assert!(decode_header(&Bytes::copy_from_slice(&body[..cut])).is_err());
        }
        let (_, join) = encode_membership_request(&MembershipRequest::Leave { node: 1 }).unwrap();
        assert_eq!(
            decode_header(&join.into()).unwrap().group,
            METADATA_GROUP,
            "membership requests address the metadata group"
        );
        let mut old = body.clone();
        old[0] = 1;
        assert!(matches!(
            decode_header(&old.into()),
            Err(ClusterError::UnsupportedVersion { found: 1, .. })
        ));
    }
}
