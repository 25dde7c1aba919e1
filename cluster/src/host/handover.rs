//! Leadership hand-over on openraft 0.9 (issue 13): a leader about to go away (a drain, a
//! planned restart) gives each group it leads to a caught-up voter in one round trip,
//! instead of leaving the others to elect one after their leader lease and an election
//! timeout.
//!
//! openraft 0.9.25 has no `transfer_leader` (0.10 has; 0.10.0 is not released, see
//! ARCHITECTURE.md). What 0.9 has, and what this builds on:
//! * a voter refuses every vote request while its leader lease runs: `Engine::
//!   handle_vote_req` rejects while `now <= vote_utime + leader_lease` for a committed
//!   vote, `vote_utime` being the last time it accepted its leader's AppendEntries;
//! * a leader's own `vote_utime` is set when it became leader and is not refreshed by its
//!   own heartbeats, so a leader that has led for longer than the lease grants its vote to
//!   a candidate whose last log id is at least its own — and steps down as it does;
//! * `trigger().elect()` campaigns at once, whatever the election timer says.
//!
//! So, the group's voters being {L, T, F}, the leader L ([`GroupHandle::hand_over`]):
//! 1. holds its batcher: no entry is formed from then on, queued proposals wait (they are
//!    refused `NotLeader` once the leadership moved), and the entries in flight are
//!    answered first, so L's last log id stops moving;
//! 2. waits until T matched L's last log index;
//! 3. asks T to campaign (`KIND_ELECT`, on the node's shared peer connection; T checks it
//!    still follows L in L's term and holds L's last index, then `trigger().elect()`);
//! 4. T's vote request reaches L, which grants it and steps down; with its own vote T has
//!    a majority. F refuses (its lease from L's last heartbeat) and accepts T's first
//!    AppendEntries (a higher committed vote). L sees itself deposed and returns.
//!
//! The caller must have stopped what leans on the leadership *before* step 3: the broker's
//! delivery lease counts on a quorum of voters refusing other candidates, and T does not
//! refuse itself (`src/raft/handover.rs` retires the address first).
//!
//! When it fails (T unreachable, not caught up in time, refusing, or L elected less than
//! one lease ago so it refuses too) the batcher is released and L goes on leading; a
//! campaign that reached T but did not win costs the group one election, as a lost
//! campaign always does.
//!
//! ```text
//! // Format: KIND_ELECT       { header | term: u64 | leader: u64 | last_log_index: opt<u64> }
//! // Format: KIND_ELECT_REPLY { header | tag: u8 } 0 campaigning | 1 refused { reason: str }
//! ```
//!
//! Does not: choose the target (the caller does: the placement's preferred leader when it
//! is a voter), hand over a group that is stopped (hibernated) here, or move leaderships
//! of groups with more than one voter change in flight (a joint membership needs both
//! halves: it may simply not win, see above).

use std::time::Duration;

use bytes::Bytes;
use openraft::Raft;
use tokio::time::Instant;

use super::GroupHandle;
use crate::codec::Decoder;
use crate::error::Result;
use crate::placement::GroupId;
use crate::rpc::{self, Header, MAX_RPC_STRING_BYTES};
use crate::types::{NodeId, TypeConfig};

/// How often the leader looks at its target's matched index while it waits.
const CATCH_UP_POLL: Duration = Duration::from_millis(5);
/// Longest the leader waits for the target's answer to the elect request.
pub const ELECT_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest the leader holds its writes for the entries in flight to be answered and the
/// target to match them: a healthy voter is a round trip behind; one further behind is
/// better left to the election path than stalling every writer for longer.
pub const CATCH_UP_MAX: Duration = Duration::from_secs(1);

const REPLY_CAMPAIGNING: u8 = 0;
const REPLY_REFUSED: u8 = 1;

/// Why a hand-over did not happen; the group is still led here (unless it says
/// otherwise), its batcher released.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandOverError {
    #[error("raft group {group}: this node does not lead it")]
    NotLeader { group: u64 },
    #[error("raft group {group}: node {target} is not one of its voters")]
    NotAVoter { group: u64, target: NodeId },
    #[error(
        "raft group {group}: node {target} matched {matched:?} of {last:?} before the deadline"
    )]
    NotCaughtUp {
        group: u64,
        target: NodeId,
        matched: Option<u64>,
        last: Option<u64>,
    },
    #[error("raft group {group}: entries in flight not answered before the deadline")]
    NotQuiet { group: u64 },
    #[error("raft group {group}: node {target} refused to campaign: {reason}")]
    Refused {
        group: u64,
        target: NodeId,
        reason: String,
    },
    #[error("raft group {group}: asking node {target} to campaign failed: {reason}")]
    Unreachable {
        group: u64,
        target: NodeId,
        reason: String,
    },
    #[error(
        "raft group {group}: node {target} campaigned, but this node still leads at the deadline"
    )]
    NotMoved { group: u64, target: NodeId },
    #[error("raft group {group}: {reason}")]
    Stopped { group: u64, reason: String },
}

/// A leader's request that a voter campaign now (what the voter checks before it does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectRequest {
    /// The requesting leader's term: the voter must follow it in this term.
    pub term: u64,
    /// The requesting leader.
    pub leader: NodeId,
    /// The leader's last log index: the voter must hold at least this much.
    pub last_log_index: Option<u64>,
}

/// What answers a voter's request that this node, its group's leader, hand the group
/// over to it (`KIND_HAND_OVER`): the broker, which stands its address down first.
pub trait HandOverHandler: Send + Sync + 'static {
    fn hand_over(&self, group: GroupId, to: NodeId) -> HandOverFuture;
}

/// The answer of a [`HandOverHandler`]: handed over, or why not.
pub type HandOverFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::result::Result<(), String>> + Send>>;

/// Longest a voter waits for its leader's answer to a hand-over request.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(4);

/// Holds the group's batcher while it lives (see [`GroupHandle::hand_over`]).
struct BatcherHold<'a>(&'a GroupHandle);

impl Drop for BatcherHold<'_> {
    fn drop(&mut self) {
        self.0.shared.writes_held.send_replace(false);
    }
}

impl GroupHandle {
    /// Hands this group's leadership to `target`, one of its voters (see the module docs),
    /// at the latest by `deadline`. Returns once this node no longer leads the group.
    pub async fn hand_over(
        &self,
        target: NodeId,
        deadline: Instant,
    ) -> std::result::Result<(), HandOverError> {
        let group = self.group();
        let Some(raft) = self.instance.current() else {
            return Err(HandOverError::NotLeader { group });
        };
        let m = raft.metrics().borrow().clone();
        if m.current_leader != Some(m.id) {
            return Err(HandOverError::NotLeader { group });
        }
        if target == m.id
            || !m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == target)
        {
            return Err(HandOverError::NotAVoter { group, target });
        }
        let Some(addr) = (self.addresses())(target) else {
            return Err(HandOverError::NotAVoter { group, target });
        };
        self.shared.writes_held.send_replace(true);
        let _hold = BatcherHold(self);
        let catch_up = deadline.min(Instant::now() + CATCH_UP_MAX);
        let mut quiet = self.shared.batcher_quiet.subscribe();
        let quieted = async move { quiet.wait_for(|q| *q).await.is_ok() };
        if !matches!(tokio::time::timeout_at(catch_up, quieted).await, Ok(true)) {
            return Err(HandOverError::NotQuiet { group });
        }
        let last = caught_up(&raft, target, catch_up)
            .await
            .map_err(|matched| HandOverError::NotCaughtUp {
                group,
                target,
                matched: matched.0,
                last: matched.1,
            })?;
        let request = ElectRequest {
            term: m.current_term,
            leader: m.id,
            last_log_index: last,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = self
            .network
            .elect(target, &addr, &request, left.min(ELECT_REQUEST_TIMEOUT))
            .await;
        match answer {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                return Err(HandOverError::Refused {
                    group,
                    target,
                    reason,
                })
            }
            Err(e) => {
                return Err(HandOverError::Unreachable {
                    group,
                    target,
                    reason: e.to_string(),
                })
            }
        }
        let mut metrics = raft.metrics();
        let deposed = async move {
            metrics
                .wait_for(|m| m.current_leader != Some(m.id))
                .await
                .map(|_| ())
        };
        match tokio::time::timeout_at(deadline, deposed).await {
            Ok(Ok(())) => {
                tracing::info!(group, to = target, "handed the leadership over");
                Ok(())
            }
            Ok(Err(_)) => Err(HandOverError::Stopped {
                group,
                reason: "Raft stopped".into(),
            }),
            Err(_) => Err(HandOverError::NotMoved { group, target }),
        }
    }
}

impl GroupHandle {
    /// Asks the leader this replica knows of to hand the group over to this node (how a
    /// preferred leader takes its group back without an election: the leader stops its
    /// writes and this node campaigns with its vote); `Err` with the reason when no
    /// leader is known, it refused, or no answer came within [`ASK_TIMEOUT`].
    pub async fn ask_hand_over(&self) -> std::result::Result<(), String> {
        let leadership = *self.leadership.borrow();
        let me = self.instance.node;
        let Some(leader) = leadership.leader.filter(|l| *l != me) else {
            return Err("no other leader known".into());
        };
        let Some(addr) = (self.addresses())(leader) else {
            return Err(format!("no address known for leader {leader}"));
        };
        match self
            .network
            .ask_hand_over(leader, &addr, me, ASK_TIMEOUT)
            .await
        {
            Ok(answer) => answer,
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Waits until `target` matched this leader's last log index; that index, or what it
/// matched and the last index at the deadline.
async fn caught_up(
    raft: &Raft<TypeConfig>,
    target: NodeId,
    deadline: Instant,
) -> std::result::Result<Option<u64>, (Option<u64>, Option<u64>)> {
    loop {
        let m = raft.metrics().borrow().clone();
        let last = m.last_log_index;
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&target).cloned())
            .flatten()
            .map(|l| l.index);
        if matched >= last {
            return Ok(last);
        }
        if Instant::now() >= deadline {
            return Err((matched, last));
        }
        tokio::time::sleep(CATCH_UP_POLL).await;
    }
}

/// The voter's side: campaigns when `request` still describes its group as it stands here
/// (it follows that leader in that term, holds at least its last index, and is a voter);
/// otherwise the reason it does not.
pub(crate) async fn serve(
    raft: &Raft<TypeConfig>,
    request: ElectRequest,
) -> std::result::Result<(), String> {
    let m = raft.metrics().borrow().clone();
    if m.current_term != request.term || m.current_leader != Some(request.leader) {
        return Err(format!(
            "this replica follows {:?} in term {}, not node {} in term {}",
            m.current_leader, m.current_term, request.leader, request.term
        ));
    }
    if m.last_log_index < request.last_log_index {
        return Err(format!(
            "this replica holds up to index {:?}, the leader {:?}",
            m.last_log_index, request.last_log_index
        ));
    }
    if !m
        .membership_config
        .membership()
        .voter_ids()
        .any(|v| v == m.id)
    {
        return Err("this replica is not a voter".into());
    }
    raft.trigger().elect().await.map_err(|e| e.to_string())?;
    tracing::info!(
        leader = request.leader,
        term = request.term,
        "campaigning: the leader hands its group over"
    );
    Ok(())
}

pub(crate) fn encode_request(h: Header, r: &ElectRequest) -> Vec<u8> {
    let mut e = rpc::start(h, 32);
    e.u64(r.term);
    e.u64(r.leader);
    rpc::encode_opt_u64(&mut e, r.last_log_index);
    e.buf
}

pub(crate) fn decode_request(body: Bytes) -> Result<ElectRequest> {
    let mut d = rpc::open(body, "elect request")?;
    let term = d.u64()?;
    let leader = d.u64()?;
    let last_log_index = rpc::decode_opt_u64(&mut d)?;
    d.finish()?;
    Ok(ElectRequest {
        term,
        leader,
        last_log_index,
    })
}

pub(crate) fn encode_ask(h: Header, to: NodeId) -> Vec<u8> {
    let mut e = rpc::start(h, 8);
    e.u64(to);
    e.buf
}

pub(crate) fn decode_ask(body: Bytes) -> Result<NodeId> {
    let mut d = rpc::open(body, "hand-over request")?;
    let to = d.u64()?;
    d.finish()?;
    Ok(to)
}

pub(crate) fn encode_reply(h: Header, r: &std::result::Result<(), String>) -> Vec<u8> {
    let mut e = rpc::start(h, 32);
    match r {
        Ok(()) => e.u8(REPLY_CAMPAIGNING),
        Err(reason) => {
            e.u8(REPLY_REFUSED);
            rpc::encode_cut_str(&mut e, reason);
        }
    }
    e.buf
}

pub(crate) fn decode_reply(body: Bytes) -> Result<std::result::Result<(), String>> {
    let mut d: Decoder = rpc::open(body, "elect reply")?;
    let reply = match d.u8()? {
        REPLY_CAMPAIGNING => Ok(()),
        REPLY_REFUSED => Err(d.str("refusal reason", MAX_RPC_STRING_BYTES)?),
        _ => return Err(d.fail("unknown elect reply tag")),
    };
    d.finish()?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Header = Header {
        request_id: 3,
        group: 7,
    };

    /// Goal: requests and both replies survive the wire; a cut body is an error.
    #[test]
    fn elect_requests_and_replies_round_trip_and_truncations_fail() {
        for r in [
            ElectRequest {
                term: 4,
                leader: 2,
                last_log_index: Some(99),
            },
            ElectRequest {
                term: 1,
                leader: 0,
                last_log_index: None,
            },
        ] {
            let body = encode_request(H, &r);
            assert_eq!(decode_request(body.clone().into()).unwrap(), r);
            for cut in 0..body.len() {
                assert!(decode_request(Bytes::copy_from_slice(&body[..cut])).is_err());
            }
        }
        let body = encode_ask(H, 5);
        assert_eq!(decode_ask(body.clone().into()).unwrap(), 5);
        assert!(decode_ask(Bytes::copy_from_slice(&body[..body.len() - 1])).is_err());
        for r in [Ok(()), Err("behind".to_owned())] {
            let body = encode_reply(H, &r);
            assert_eq!(decode_reply(body.clone().into()).unwrap(), r);
            for cut in 0..body.len() {
                assert!(decode_reply(Bytes::copy_from_slice(&body[..cut])).is_err());
            }
        }
    }
}
