//! Forwarded proposals: a node that does not lead a group hands a proposal to the group's
//! leader over the node's multiplexed peer connection (`peer_connection.rs`), and gets
//! back the committed [`Position`] or the leader's typed refusal ([`GroupError`]).
//!
//! Generic on purpose: the payload is opaque here, whatever the group's machine takes —
//! a metadata op proposed from any node (`MetaGroup::run` in the broker), and next a
//! producer's message forwarded from the node its link is attached to.
//!
//! ```text
//! // Format: KIND_PROPOSE       { header | payload: bytes (≤ MAX_PROPOSAL_BYTES) }
//! // Format: KIND_PROPOSE_REPLY { header | tag: u8 } 0 committed { index: u64 | slot: u32 }
//! //   | 1 not leader { leader: opt<u64> | leader_addr: opt<str> } | 2 too large { len: u64 | max: u64 }
//! //   | 3 timeout { after_ms: u64 } | 4 stopped { reason: str } | 5 no quorum { reason: str }
//! //   | 6 membership { reason: str } | 7 busy { limit: u64 }
//! ```
//!
//! Invariants:
//! * The leader submits a forwarded payload exactly as its own ([`GroupHandle::propose`]):
//!   `committed` is sent only once a majority has the entry durable and the leader applied
//!   it. A reply that never comes (connection lost, timeout) leaves the outcome unknown,
//!   exactly as a local [`GroupError::Timeout`].
//! * `not leader`, `too large` and `busy` mean nothing was queued: the caller may try
//!   again (the forwarder does, at the leader named, at most [`MAX_FORWARD_HOPS`] times).
//! * At most [`MAX_FORWARDED_IN_FLIGHT`] forwarded proposals are served at once per node;
//!   one more is answered `busy` at once, so a flood from peers costs bounded memory.
//!
//! Does not: deduplicate a proposal resent after a lost reply (a producer's resend is the
//! broker's to recognise), or forward reads (a follower reads its own replica).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::codec::Encoder;
use crate::error::{GroupError, Result};
use crate::host::{Position, MAX_PROPOSAL_BYTES};
use crate::placement::GroupId;
use crate::rpc::{self, Header, MAX_RPC_STRING_BYTES};
use crate::types::NodeId;

/// Most forwarded proposals a node serves at once (from all its peers together).
pub const MAX_FORWARDED_IN_FLIGHT: usize = 1024;
/// Most leaders one forwarded proposal is sent to: a `not leader` answer naming another
/// leader sends it there, up to this many times (a leadership moving while it travels).
pub const MAX_FORWARD_HOPS: usize = 3;

/// Longest one forwarded proposal waits for its leader's answer: below the shared
/// connection's silence limit, which would otherwise close the connection (and fail every
/// other request on it) under a proposal that is merely slow.
pub const FORWARD_TIMEOUT_MAX: Duration = Duration::from_secs(4);
const _: () =
    assert!(FORWARD_TIMEOUT_MAX.as_millis() < crate::SILENT_CONNECTION_TIMEOUT.as_millis());
/// Pause before asking again when the leader answered `not leader` without naming
/// another one, or `busy` (an election under way there, or a flood).
pub const FORWARD_RETRY_PAUSE: Duration = Duration::from_millis(50);

const REPLY_COMMITTED: u8 = 0;
const REPLY_NOT_LEADER: u8 = 1;
const REPLY_TOO_LARGE: u8 = 2;
const REPLY_TIMEOUT: u8 = 3;
const REPLY_STOPPED: u8 = 4;
const REPLY_NO_QUORUM: u8 = 5;
const REPLY_MEMBERSHIP: u8 = 6;
const REPLY_BUSY: u8 = 7;
const REPLY_FORWARD: u8 = 8;

/// What the peer server calls with a forwarded proposal: `None` when the group is not
/// open on this node (answered as an unknown group), else the proposal's outcome.
pub type ProposeFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Position, GroupError>> + Send>>;

/// Submits a forwarded payload to the local replica of a group (the host's).
pub trait Proposer: Send + Sync + 'static {
    fn propose(&self, group: GroupId, payload: Bytes) -> Option<ProposeFuture>;
}

/// The server side: the proposer and the bound on what it serves at once.
#[derive(Clone)]
pub(crate) struct ForwardServer {
    proposer: Arc<dyn Proposer>,
    slots: Arc<Semaphore>,
}

impl ForwardServer {
    pub(crate) fn new(proposer: Arc<dyn Proposer>) -> ForwardServer {
        ForwardServer {
            proposer,
            slots: Arc::new(Semaphore::new(MAX_FORWARDED_IN_FLIGHT)),
        }
    }

    /// Serves one forwarded proposal: the reply frame, or `None` when the group is not
    /// open here (the caller answers unknown group).
    pub(crate) async fn serve(&self, h: Header, payload: Bytes) -> Option<(u8, Vec<u8>)> {
        let Ok(_slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            let busy = Err(GroupError::Busy {
                group: h.group,
                limit: MAX_FORWARDED_IN_FLIGHT,
            });
            return Some((rpc::KIND_PROPOSE_REPLY, encode_reply(h, &busy)));
        };
        let outcome = self.proposer.propose(h.group, payload)?.await;
        Some((rpc::KIND_PROPOSE_REPLY, encode_reply(h, &outcome)))
    }
}

pub(crate) fn encode_request(h: Header, payload: &[u8]) -> Result<Vec<u8>> {
    crate::codec::check_limit("forwarded proposal", payload.len(), MAX_PROPOSAL_BYTES)?;
    let mut e = rpc::start(h, 4 + payload.len());
    e.bytes(payload);
    Ok(e.buf)
}

pub(crate) fn decode_request(body: Bytes) -> Result<Bytes> {
    let mut d = rpc::open(body, "forwarded proposal")?;
    let payload = d.bytes("forwarded proposal", MAX_PROPOSAL_BYTES)?;
    d.finish()?;
    Ok(payload)
}

fn cut(e: &mut Encoder, s: &str) {
    rpc::encode_cut_str(e, s);
}

pub(crate) fn encode_reply(h: Header, r: &Result<Position, GroupError>) -> Vec<u8> {
    let mut e = rpc::start(h, 32);
    match r {
        Ok(at) => {
            e.u8(REPLY_COMMITTED);
            e.u64(at.index);
            e.u32(at.slot);
        }
        Err(GroupError::NotLeader {
            leader,
            leader_addr,
            ..
        }) => {
            e.u8(REPLY_NOT_LEADER);
            rpc::encode_opt_u64(&mut e, *leader);
            // An address too long to send is sent as unknown, never cut.
            match leader_addr
                .as_deref()
                .filter(|a| a.len() <= MAX_RPC_STRING_BYTES)
            {
                Some(addr) => {
                    e.u8(1);
                    e.str(addr);
                }
                None => e.u8(0),
            }
        }
        Err(GroupError::TooLarge { len, max }) => {
            e.u8(REPLY_TOO_LARGE);
            e.u64(*len as u64);
            e.u64(*max as u64);
        }
        Err(GroupError::Timeout { after, .. }) => {
            e.u8(REPLY_TIMEOUT);
            e.u64(u64::try_from(after.as_millis()).unwrap_or(u64::MAX));
        }
        Err(GroupError::Stopped { reason, .. }) => {
            e.u8(REPLY_STOPPED);
            cut(&mut e, reason);
        }
        Err(GroupError::NoQuorum { reason, .. }) => {
            e.u8(REPLY_NO_QUORUM);
            cut(&mut e, reason);
        }
        Err(GroupError::Membership { reason, .. }) => {
            e.u8(REPLY_MEMBERSHIP);
            cut(&mut e, reason);
        }
        Err(GroupError::Busy { limit, .. }) => {
            e.u8(REPLY_BUSY);
            e.u64(*limit as u64);
        }
        Err(GroupError::Forward { leader, reason, .. }) => {
            e.u8(REPLY_FORWARD);
            e.u64(*leader);
            cut(&mut e, reason);
        }
    }
    e.buf
}

pub(crate) fn decode_reply(body: Bytes) -> Result<std::result::Result<Position, GroupError>> {
    let (mut d, h) = rpc::open_header(body, "forwarded proposal reply")?;
    let group = h.group;
    let reason = |d: &mut crate::codec::Decoder| d.str("error reason", MAX_RPC_STRING_BYTES);
    let reply = match d.u8()? {
        REPLY_COMMITTED => Ok(Position::new(d.u64()?, d.u32()?)),
        REPLY_NOT_LEADER => {
            let leader = rpc::decode_opt_u64(&mut d)?;
            let leader_addr = if d.bool()? {
                Some(d.str("leader address", MAX_RPC_STRING_BYTES)?)
            } else {
                None
            };
            Err(GroupError::NotLeader {
                group,
                leader,
                leader_addr,
            })
        }
        REPLY_TOO_LARGE => Err(GroupError::TooLarge {
            len: usize::try_from(d.u64()?).unwrap_or(usize::MAX),
            max: usize::try_from(d.u64()?).unwrap_or(usize::MAX),
        }),
        REPLY_TIMEOUT => Err(GroupError::Timeout {
            group,
            after: Duration::from_millis(d.u64()?),
        }),
        REPLY_STOPPED => Err(GroupError::Stopped {
            group,
            reason: reason(&mut d)?,
        }),
        REPLY_NO_QUORUM => Err(GroupError::NoQuorum {
            group,
            reason: reason(&mut d)?,
        }),
        REPLY_MEMBERSHIP => Err(GroupError::Membership {
            group,
            reason: reason(&mut d)?,
        }),
        REPLY_BUSY => Err(GroupError::Busy {
            group,
            limit: usize::try_from(d.u64()?).unwrap_or(usize::MAX),
        }),
        REPLY_FORWARD => Err(GroupError::Forward {
            group,
            leader: d.u64()?,
            reason: reason(&mut d)?,
        }),
        _ => return Err(d.fail("unknown forwarded proposal reply tag")),
    };
    d.finish()?;
    Ok(reply)
}

/// Who a forwarded proposal goes to next, from a `NotLeader` answer (`None`: no leader
/// known with an address, stop forwarding).
pub(crate) fn next_hop(e: &GroupError) -> Option<(NodeId, String)> {
    match e {
        GroupError::NotLeader {
            leader: Some(id),
            leader_addr: Some(addr),
            ..
        } => Some((*id, addr.clone())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ClusterError;

    fn h() -> Header {
        Header {
            request_id: 9,
            group: 4,
        }
    }

    /// Goal: every reply variant survives the wire; a request is bounded before it is
    /// sent and before it is read.
    #[test]
    fn replies_round_trip_and_requests_are_bounded() {
        let replies = [
            Ok(Position::new(7, 2)),
            Err(GroupError::NotLeader {
                group: 4,
                leader: Some(2),
                leader_addr: Some("n2:5673/5672".into()),
            }),
            Err(GroupError::NotLeader {
                group: 4,
                leader: None,
                leader_addr: None,
            }),
            Err(GroupError::TooLarge { len: 10, max: 5 }),
            Err(GroupError::Timeout {
                group: 4,
                after: Duration::from_millis(1500),
            }),
            Err(GroupError::Stopped {
                group: 4,
                reason: "gone".into(),
            }),
            Err(GroupError::NoQuorum {
                group: 4,
                reason: "q".into(),
            }),
            Err(GroupError::Membership {
                group: 4,
                reason: "m".into(),
            }),
            Err(GroupError::Busy {
                group: 4,
                limit: MAX_FORWARDED_IN_FLIGHT,
            }),
            Err(GroupError::Forward {
                group: 4,
                leader: 1,
                reason: "lost".into(),
            }),
        ];
        for r in replies {
            let body = Bytes::from(encode_reply(h(), &r));
            assert_eq!(decode_reply(body).unwrap(), r);
        }
        let body = encode_request(h(), b"payload").unwrap();
        assert_eq!(decode_request(body.into()).unwrap(), &b"payload"[..]);
        let big = vec![0u8; MAX_PROPOSAL_BYTES + 1];
        assert!(matches!(
            encode_request(h(), &big),
            Err(ClusterError::LimitExceeded { .. })
        ));
        let mut forged = rpc::start(h(), 8);
        forged.u32((MAX_PROPOSAL_BYTES + 1) as u32);
        assert!(matches!(
            decode_request(forged.buf.into()),
            Err(ClusterError::LimitExceeded { .. })
        ));
    }
}
