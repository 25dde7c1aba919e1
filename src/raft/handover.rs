//! Handing this node's leaderships over before it goes away (issue 13), so its clients
//! are served again by the next leader within a round trip or two instead of after an
//! election: at the start of a drain (`groups_membership::Membership::drain`) and on
//! SIGTERM before a planned restart ([`super::groups_node::GroupsNode::hand_over`],
//! called by `main` before the shutdown).
//!
//! For every group this node leads (group 0 and the address groups), all at once and
//! bounded by [`HAND_OVER_TIMEOUT`] in all:
//! 1. The target ([`choose_target`]): the placement's preferred leader when it is another
//!    voter of the group — for a drain the placement *after* this node's removal, so the
//!    leadership lands where the balancer and the campaigns will leave it — else the
//!    other voter that matched the most of the log.
//! 2. An address group's driver stands down first ([`GroupDriver::stand_down`]): its
//!    queue and store are retired (links detached `amqp:link:detach-forced`; the clients
//!    attach again and are redirected to the new leader once it leads) and its delivery
//!    lease ends. This must come before the target campaigns: the lease counts on a
//!    quorum of voters refusing every candidate, and the target does not refuse itself.
//! 3. `GroupHandle::hand_over` (`cluster/src/host/handover.rs`): hold the group's batcher,
//!    wait until the target matched the last entry, ask it to campaign, wait to be
//!    deposed — openraft 0.9 has no leader transfer; see that module for why the
//!    campaign wins at once.
//! 4. The stand-down ends: after a hand-over the driver waits to lead again; after a
//!    failed one it serves again (the group is still led here) and, if this node then
//!    stops, the group takes the election path as before.
//!
//! The opener's campaigns are held first (`GroupOpener::hold_campaigns`): this node is
//! usually the preferred leader of what it leads and would campaign for it right back.
//!
//! The other way round, [`HandOverServer`]: a group's preferred leader (a restarted pod, a
//! joiner) asks the leader to hand the group over to it (`GroupHandle::ask_hand_over`,
//! from the opener) instead of campaigning — a campaign from a replica whose log is
//! behind under traffic is lost, and still deposes the leader.
//!
//! Does not: hand over a group hibernated here (it is not led while stopped).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use entrepot_cluster::host::handover::{HandOverFuture, HandOverHandler};
use entrepot_cluster::{GroupHandle, NodeId};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::group_driver::StandDownHandle;
use super::group_opener::GroupOpener;
use super::group_router::Drivers;
use super::meta_machine::{MetaGroup, MetaState};

/// Longest the hand-over of every group led here may take in all: far below the election
/// path it replaces under load (1–4 s), and well inside the drain's `DRAIN_TIMEOUT` and
/// the pod's grace period.
pub const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a hand-over a voter asked for may take (below its `ASK_TIMEOUT`).
pub const REQUESTED_HAND_OVER_TIMEOUT: Duration = Duration::from_secs(2);
const _: () = assert!(
    REQUESTED_HAND_OVER_TIMEOUT.as_millis()
        < entrepot_cluster::host::handover::ASK_TIMEOUT.as_millis()
);

/// What one hand-over round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HandOverReport {
    /// Groups handed over, with the node that leads them now.
    pub moved: BTreeMap<u64, NodeId>,
    /// Groups still led here, and why.
    pub failed: BTreeMap<u64, String>,
    /// How long it took.
    pub took: Duration,
}

impl fmt::Display for HandOverReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "handed {} leadership(s) over in {:.2} s {:?}",
            self.moved.len(),
            self.took.as_secs_f64(),
            self.moved
        )?;
        if !self.failed.is_empty() {
            write!(f, "; still led here: {:?}", self.failed)?;
        }
        Ok(())
    }
}

/// What a hand-over round works with.
pub struct HandOver<'a> {
    pub node: NodeId,
    pub meta: &'a MetaGroup,
    pub opener: &'a GroupOpener,
    pub drivers: &'a Drivers,
}

impl HandOver<'_> {
    /// Hands every group led here over (see the module docs); `placement` names the
    /// preferred leaders to aim for.
    pub async fn run(&self, placement: &MetaState) -> HandOverReport {
        let started = Instant::now();
        let deadline = started + HAND_OVER_TIMEOUT;
        self.opener.hold_campaigns(true);
        let mut tasks = JoinSet::new();
        for (group, handle, driver, preferred) in self.led(placement) {
            let st = handle.status();
            let Some(target) = choose_target(self.node, &st.voters, preferred, &handle.matched())
            else {
                continue;
            };
            tasks.spawn(async move {
                // The address stops being served here before anyone else may lead it.
                let stood_down = match &driver {
                    Some(d) => Some(d.stand_down(deadline).await),
                    None => None,
                };
                let result = handle.hand_over(target, deadline).await;
                drop(stood_down);
                (group, target, result)
            });
        }
        let mut report = HandOverReport::default();
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((group, target, Ok(()))) => {
                    report.moved.insert(group, target);
                }
                Ok((group, _, Err(e))) => {
                    report.failed.insert(group, e.to_string());
                }
                Err(e) => tracing::warn!(error = %e, "a hand-over task failed"),
            }
        }
        report.took = started.elapsed();
        tracing::info!(node = self.node, "{report}");
        report
    }

    /// Every group led here: id, handle, its address's driver (none for group 0), and
    /// its preferred leader in `placement`.
    fn led(
        &self,
        placement: &MetaState,
    ) -> Vec<(u64, GroupHandle, Option<StandDownHandle>, Option<NodeId>)> {
        let leads = |h: &GroupHandle| h.leadership().borrow().leads;
        let mut led = Vec::new();
        if leads(&self.meta.handle) {
            led.push((
                entrepot_cluster::METADATA_GROUP,
                self.meta.handle.clone(),
                None,
                None,
            ));
        }
        let drivers = self.drivers.lock().unwrap_or_else(|e| e.into_inner());
        for (group, opened) in self.opener.opened() {
            if !leads(&opened.handle) {
                continue;
            }
            let driver = drivers.get(&opened.address).map(|d| d.stand_down_handle());
            let preferred = placement.groups().get(&group).map(|e| e.replicas.leader);
            led.push((group, opened.handle, driver, preferred));
        }
        led
    }
}

/// Serves a voter's request that this node hand a group it leads over to it (the
/// opener of a group's preferred leader asks instead of campaigning): only to the
/// placement's preferred leader, only while this node is not handing over itself, with
/// the address's driver stood down first, as in [`HandOver::run`].
pub struct HandOverServer {
    pub node: NodeId,
    pub meta: MetaGroup,
    pub opener: Arc<GroupOpener>,
    pub drivers: Drivers,
    /// Hand over to any voter (this node's balancer, leaving a group's voters), not only
    /// to the placement's preferred leader (a peer's request).
    pub any_voter: bool,
}

impl HandOverServer {
    async fn serve(
        node: NodeId,
        handle: GroupHandle,
        driver: Option<StandDownHandle>,
        to: NodeId,
    ) -> Result<(), String> {
        let deadline = Instant::now() + REQUESTED_HAND_OVER_TIMEOUT;
        let stood_down = match &driver {
            Some(d) => Some(d.stand_down(deadline).await),
            None => None,
        };
        let result = handle.hand_over(to, deadline).await;
        drop(stood_down);
        match result {
            Ok(()) => {
                tracing::info!(
                    node,
                    group = handle.group(),
                    to,
                    "handed the group over on request"
                );
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

impl HandOverHandler for HandOverServer {
    fn hand_over(&self, group: u64, to: NodeId) -> HandOverFuture {
        let refuse = |why: String| -> HandOverFuture { Box::pin(async move { Err(why) }) };
        if self.opener.campaigns_held() {
            return refuse("this node is handing its groups over itself".into());
        }
        let preferred = self.meta.machine.group(group).map(|e| e.replicas.leader);
        if !self.any_voter && preferred != Some(to) {
            return refuse(format!(
                "node {to} is not the group's preferred leader ({preferred:?})"
            ));
        }
        let Some(opened) = self.opener.get(group) else {
            return refuse(format!("group {group} is not open here"));
        };
        if !opened.handle.leadership().borrow().leads {
            return refuse(format!("node {} does not lead group {group}", self.node));
        }
        let driver = {
            let drivers = self.drivers.lock().unwrap_or_else(|e| e.into_inner());
            drivers.get(&opened.address).map(|d| d.stand_down_handle())
        };
        Box::pin(Self::serve(self.node, opened.handle, driver, to))
    }
}

/// Whom `me` hands a group with `voters` over to: `preferred` when it is another voter,
/// else the other voter that matched the most (the lowest id among equals); `None` when
/// `me` is the only voter.
pub fn choose_target(
    me: NodeId,
    voters: &BTreeSet<NodeId>,
    preferred: Option<NodeId>,
    matched: &BTreeMap<NodeId, Option<u64>>,
) -> Option<NodeId> {
    if let Some(p) = preferred.filter(|p| *p != me && voters.contains(p)) {
        return Some(p);
    }
    let others = voters.iter().copied().filter(|v| *v != me);
    // max_by_key keeps the last of equals: iterate from the highest id down.
    others
        .rev()
        .max_by_key(|v| matched.get(v).copied().flatten())
}

#[cfg(test)]
mod tests {
    use super::choose_target;
    use std::collections::{BTreeMap, BTreeSet};

    /// Goal: the preferred leader wins when it is another voter; otherwise the most
    /// caught-up other voter, the lowest id among equals; never this node itself.
    #[test]
    fn the_target_is_the_preferred_voter_else_the_most_caught_up() {
        let voters: BTreeSet<u64> = [0, 1, 2].into();
        let matched: BTreeMap<u64, Option<u64>> = [(1, Some(10)), (2, Some(12))].into();
        assert_eq!(choose_target(0, &voters, Some(1), &matched), Some(1));
        assert_eq!(choose_target(0, &voters, Some(0), &matched), Some(2));
        assert_eq!(choose_target(0, &voters, Some(7), &matched), Some(2));
        assert_eq!(choose_target(0, &voters, None, &matched), Some(2));
        let even: BTreeMap<u64, Option<u64>> = [(1, Some(12)), (2, Some(12))].into();
        assert_eq!(choose_target(0, &voters, None, &even), Some(1));
        assert_eq!(choose_target(0, &[0].into(), None, &BTreeMap::new()), None);
    }
}
