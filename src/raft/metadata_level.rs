//! The cluster-wide metadata level of `cluster-mode: groups` (as Kafka's finalized
//! `metadata.version`): which of group 0's formats the nodes may write, so that a rolling
//! upgrade never puts an op or a snapshot into group 0 that a member's build cannot
//! follow (such a replica stops the group: `MetaMachineError`).
//!
//! What it owns:
//! * **Levels.** Level 1: metadata op kinds 1–4 and snapshot version 1 (every build since
//!   session 12). Level 2: op kinds 9 (mark formed), 10 (add member at a level) and 11
//!   (finalize level) and snapshot versions 2 and 3 (this build; session 19's build
//!   proposed kind 9 and wrote version 2 unasked, and advertises nothing: level 1). A
//!   build supports up to [`METADATA_LEVEL_MAX`]; `--metadata-level-max` lowers what a
//!   node advertises and does (for tests, and to hold a cluster at a level while it is
//!   upgraded).
//! * **Advertising** ([`NodeAppHandler`], [`ask`]). A node answers a *level query* —
//!   op 6 of the application-request payload (RPC kind 9, `cluster/FORMAT.md`) — with the
//!   level its build supports and the finalized level its replica of group 0 applied. A
//!   build before this one answers it `refused` (an unknown op: its connection and
//!   everything else on it go on), one whose broker has not started yet `no handler`, a
//!   dead one nothing: each counts as level 1. No existing byte of any RPC changed.
//! * **The finalized level** ([`MetaState::level`](super::meta_machine::MetaState::level))
//!   is kept by group 0 itself: recorded by op kind 11 (finalize level), which is
//!   proposed only once every node holding group 0 said it supports that level — so no
//!   build stops on it — and kept in snapshot version 3. The same on every replica,
//!   it survives restarts and never falls.
//! * **Raising it** ([`LevelController`], on every node, active on group 0's leader):
//!   every [`LEVEL_POLL_INTERVAL`] while the finalized level is below this node's own,
//!   it asks every node that holds or may soon hold group 0's log — the members, and
//!   group 0's voters and learners — for its level (one not heard from counts as
//!   level 1). When the minimum (the *effective* level) is above the finalized level and the
//!   members are still those it asked, it proposes `FinalizeLevel` at that level. From
//!   then on the openers mark the groups, the balancer waits for marks, joiners declare
//!   their level, snapshots are version 3. Below level 2 the opener proposes no mark and
//!   the balancer moves unmarked groups, as before session 19: the founder-restart
//!   protection is off until every member runs a level-2 build (the opener's barrier is
//!   a level-1 op and is passed at any level).
//! * **The ratchet.** Once the level is 2, a node that is not a member yet is refused by
//!   group 0 itself unless it declares a level at least the finalized one
//!   (`MetaRefusal::LevelBelowFinalized`, applied alike by every replica): an
//!   `AddMember` (kind 1, what an older build sends) declares none (level 1), an
//!   `AddMemberAt` (kind 10) declares the joiner's. The joiner of this build asks its
//!   seeds for the finalized level first and, below it, refuses itself with the same
//!   error instead of proposing (`groups_membership.rs`).
//!
//! Does not: lower the level (running a build below the finalized level on a member — a
//! downgrade — is not supported: such a build stops on group 0's log), or close one
//! window completely: an older node whose `AddMember` commits after the controller read
//! the members for the last time and before its finalizing op is applied joins at
//! level 1 and then meets that op (its replica of group 0 stops: remove the node,
//! upgrade it). Reading the members again right before proposing narrows the window to
//! one proposal's commit.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use entrepot_cluster::{AppFuture, AppHandler, Host, NodeId};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::link_forward::{LinkForwardServer, LINK_FORWARD_VERSION};
use super::meta_machine::{
    MetaGroup, MetaMachine, MetaOp, METADATA_LEVEL_FORMED, METADATA_LEVEL_MAX, METADATA_LEVEL_MIN,
};

/// How often group 0's leader asks the nodes for their level while the finalized level
/// is below its own.
pub const LEVEL_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Longest one level query waits for its answer (below the poll interval: a dead node
/// does not hold a round past the next).
pub const LEVEL_QUERY_TIMEOUT: Duration = Duration::from_millis(800);
const _: () = assert!(LEVEL_QUERY_TIMEOUT.as_millis() < LEVEL_POLL_INTERVAL.as_millis());
const _: () =
    assert!(LEVEL_QUERY_TIMEOUT.as_millis() <= entrepot_cluster::APP_TIMEOUT_MAX.as_millis());

/// The op of the level query in the application-request payload (ops 1–5 are link
/// forwarding's, `link_forward.rs`).
pub const OP_LEVEL_QUERY: u8 = 6;
/// Tag of a level answer.
const ANSWER_LEVELS: u8 = 0;

/// What a node advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advertised {
    /// The highest level its build (or its `--metadata-level-max`) supports.
    pub supported: u8,
    /// The finalized level its replica of group 0 applied.
    pub finalized: u8,
}

/// Why a level answer did not decode (the asker counts the node as level 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LevelAnswerError {
    #[error("level answer of {len} bytes, expected {expected}")]
    Length { len: usize, expected: usize },
    #[error("level answer version {found}, expected {LINK_FORWARD_VERSION}")]
    Version { found: u8 },
    #[error("level answer tag {found} is unknown")]
    Tag { found: u8 },
    #[error("level answer names level 0")]
    LevelZero,
}

// Format: level query { version: u8 = 1 | op: u8 = 6 }
/// The level query's payload.
pub fn encode_query() -> [u8; 2] {
    [LINK_FORWARD_VERSION, OP_LEVEL_QUERY]
}

// Format: level answer { version: u8 = 1 | tag: u8 = 0 | supported: u8 | finalized: u8 }
fn encode_answer(a: Advertised) -> Bytes {
    let mut b = BytesMut::with_capacity(4);
    b.put_u8(LINK_FORWARD_VERSION);
    b.put_u8(ANSWER_LEVELS);
    b.put_u8(a.supported);
    b.put_u8(a.finalized);
    b.freeze()
}

/// Reads a level answer.
pub fn decode_answer(b: &[u8]) -> Result<Advertised, LevelAnswerError> {
    let &[version, tag, supported, finalized] = b else {
        return Err(LevelAnswerError::Length {
            len: b.len(),
            expected: 4,
        });
    };
    if version != LINK_FORWARD_VERSION {
        return Err(LevelAnswerError::Version { found: version });
    }
    if tag != ANSWER_LEVELS {
        return Err(LevelAnswerError::Tag { found: tag });
    }
    if supported == 0 || finalized == 0 {
        return Err(LevelAnswerError::LevelZero);
    }
    Ok(Advertised {
        supported,
        finalized,
    })
}

/// Asks node `node` at member address `addr` for its levels; `None` when it gave none
/// (an older build refuses the query, a starting one has no handler, a dead one does not
/// answer): the caller counts it as level 1.
pub async fn ask(host: &Host, node: NodeId, addr: &str) -> Option<Advertised> {
    let answer = host
        .app_request(node, addr, &encode_query(), LEVEL_QUERY_TIMEOUT)
        .await;
    match answer {
        Ok(payload) => match decode_answer(&payload) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(node, error = %e, "metadata level: an undecodable answer");
                None
            }
        },
        Err(e) => {
            tracing::debug!(node, error = %e, "metadata level: no answer (counts as level 1)");
            None
        }
    }
}

/// A node's application-request handler in groups mode: answers level queries, and
/// hands every other payload to link forwarding (refused while that is not set yet).
pub struct NodeAppHandler {
    level_max: u8,
    meta: MetaMachine,
    links: Option<LinkForwardServer>,
}

impl NodeAppHandler {
    /// `level_max`: what this node advertises; `meta`: its replica of group 0's machine
    /// (the finalized level it answers); `links`: the link-forwarding server, once the
    /// broker runs.
    pub fn new(level_max: u8, meta: MetaMachine, links: Option<LinkForwardServer>) -> Self {
        NodeAppHandler {
            level_max,
            meta,
            links,
        }
    }
}

impl AppHandler for NodeAppHandler {
    fn handle(&self, payload: Bytes) -> AppFuture {
        if payload[..] == encode_query()[..] {
            let answer = encode_answer(Advertised {
                supported: self.level_max,
                finalized: self.meta.level(),
            });
            return Box::pin(async move { Ok(answer) });
        }
        match &self.links {
            Some(links) => links.handle(payload),
            None => Box::pin(async { Err("the broker is not started yet".to_owned()) }),
        }
    }
}

/// What group 0's leader last heard (for `/status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelPoll {
    /// Every node asked, with the level it supports (1 when it did not answer).
    pub levels: BTreeMap<NodeId, u8>,
    /// Their minimum, at most this node's own: the level the cluster may run at.
    pub effective: u8,
}

/// Reads a running [`LevelController`]'s last poll.
#[derive(Clone, Default)]
pub struct LevelProgress(Arc<Mutex<Option<LevelPoll>>>);

impl LevelProgress {
    /// The last poll, while this node polls (it leads group 0 below its own level).
    pub fn last(&self) -> Option<LevelPoll> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, poll: Option<LevelPoll>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = poll;
    }
}

/// The node's level controller (see the module docs); stops with [`Self::stop`].
pub struct LevelController {
    progress: LevelProgress,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl LevelController {
    /// Starts raising the finalized level towards `level_max` whenever this node leads
    /// group 0 (`meta`, this node's replica).
    pub fn start(host: Host, meta: MetaGroup, level_max: u8) -> LevelController {
        let progress = LevelProgress::default();
        let (stop, stopped) = watch::channel(false);
        let raiser = Raiser {
            host,
            meta,
            level_max,
            progress: progress.clone(),
        };
        let task = tokio::spawn(raiser.run(stopped));
        LevelController {
            progress,
            stop,
            task,
        }
    }

    /// A reader of the last poll that outlives this handle.
    pub fn progress(&self) -> LevelProgress {
        self.progress.clone()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// What group 0's leader proposes to finalize `level` (applying it raises every
/// replica's level); `None` for a level that needs no finalizing (1) or that this build
/// does not know.
fn finalize_op(level: u8) -> Option<MetaOp> {
    (METADATA_LEVEL_FORMED..=METADATA_LEVEL_MAX)
        .contains(&level)
        .then_some(MetaOp::FinalizeLevel { level })
}

struct Raiser {
    host: Host,
    meta: MetaGroup,
    level_max: u8,
    progress: LevelProgress,
}

impl Raiser {
    async fn run(self, mut stopped: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(LEVEL_POLL_INTERVAL) => {}
                _ = stopped.changed() => return,
            }
            if *stopped.borrow() {
                return;
            }
            self.round().await;
        }
    }

    fn leads(&self) -> bool {
        self.meta.handle.leadership().borrow().leads
    }

    /// Every node that holds or may soon hold group 0's log, with its member address
    /// when it is a member (a voter of group 0 not yet a member has none here: it counts
    /// as level 1 until it is one).
    fn holders(&self) -> BTreeMap<NodeId, Option<String>> {
        let state = self.meta.machine.state();
        let mut out: BTreeMap<NodeId, Option<String>> = state
            .members()
            .iter()
            .map(|(n, m)| (*n, Some(m.peer.clone())))
            .collect();
        let status = self.meta.handle.status();
        for n in status.voters.iter().chain(status.learners.iter()) {
            out.entry(*n).or_insert(None);
        }
        out
    }

    async fn round(&self) {
        let finalized = self.meta.machine.level();
        if finalized >= self.level_max || !self.leads() {
            self.progress.set(None);
            return;
        }
        let holders = self.holders();
        let levels = self.poll(&holders).await;
        let effective = levels
            .values()
            .copied()
            .min()
            .unwrap_or(METADATA_LEVEL_MIN)
            .min(self.level_max);
        self.progress.set(Some(LevelPoll {
            levels: levels.clone(),
            effective,
        }));
        if effective <= finalized {
            return;
        }
        let asked: BTreeSet<NodeId> = holders.keys().copied().collect();
        let now: BTreeSet<NodeId> = self.holders().keys().copied().collect();
        if now != asked || !self.leads() {
            // A node came or went while they were asked: asked again next round.
            return;
        }
        let Some(op) = finalize_op(effective) else {
            return;
        };
        match self.meta.run(&op).await {
            Ok(_) => tracing::info!(
                level = effective,
                ?levels,
                "metadata level finalized: every node holding group 0 supports it"
            ),
            Err(e) => {
                tracing::info!(level = effective, error = %e, "metadata level: finalizing failed; tried again")
            }
        }
    }

    /// The level each of `holders` supports (this node's own without asking; 1 for one
    /// that did not answer or has no address here), asked all at once.
    async fn poll(&self, holders: &BTreeMap<NodeId, Option<String>>) -> BTreeMap<NodeId, u8> {
        let me = self.host.node();
        let mut levels = BTreeMap::new();
        let mut asking = JoinSet::new();
        for (node, addr) in holders {
            match addr {
                _ if *node == me => {
                    levels.insert(*node, self.level_max);
                }
                Some(addr) => {
                    let (host, node, addr) = (self.host.clone(), *node, addr.clone());
                    asking.spawn(async move {
                        let level = ask(&host, node, &addr).await.map(|a| a.supported);
                        (node, level.unwrap_or(METADATA_LEVEL_MIN))
                    });
                }
                None => {
                    levels.insert(*node, METADATA_LEVEL_MIN);
                }
            }
        }
        while let Some(joined) = asking.join_next().await {
            if let Ok((node, level)) = joined {
                levels.insert(node, level);
            }
        }
        levels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_answer_round_trips_and_anything_else_is_refused() {
        let a = Advertised {
            supported: 2,
            finalized: 1,
        };
        assert_eq!(decode_answer(&encode_answer(a)), Ok(a));
        assert!(matches!(
            decode_answer(&[1, 0, 2]),
            Err(LevelAnswerError::Length { len: 3, .. })
        ));
        assert!(matches!(
            decode_answer(&[2, 0, 2, 2]),
            Err(LevelAnswerError::Version { found: 2 })
        ));
        assert!(matches!(
            decode_answer(&[1, 1, 2, 2]),
            Err(LevelAnswerError::Tag { found: 1 })
        ));
        assert!(matches!(
            decode_answer(&[1, 0, 0, 1]),
            Err(LevelAnswerError::LevelZero)
        ));
        assert_eq!(encode_query(), [1, OP_LEVEL_QUERY]);
    }

    #[test]
    fn levels_2_to_the_build_s_are_finalized_and_no_other() {
        assert_eq!(
            finalize_op(METADATA_LEVEL_FORMED),
            Some(MetaOp::FinalizeLevel { level: 2 })
        );
        assert_eq!(finalize_op(METADATA_LEVEL_MIN), None);
        assert_eq!(finalize_op(METADATA_LEVEL_MAX + 1), None);
    }
}
