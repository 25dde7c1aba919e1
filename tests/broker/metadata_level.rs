//! Goal: a rolling upgrade of a groups-mode cluster is safe across metadata level 2
//! (op kinds 9–11, snapshot versions 2–3: `metadata_level.rs`). (a) With one member
//! running at level 1 (standing in for a build from before session 19), no node proposes
//! a level-2 op — no group is ever marked formed, every replica of group 0 stays at level
//! 1 and writes snapshot version 1 — while every group goes on committing;
//! once that member is restarted at the build's level, the level rises to 2 by itself and
//! every group gets marked formed by its leader, nothing committed lost. (b) Once the
//! level is 2, a node at level 1 is refused as a member, naming both levels: as an older
//! build asks (an `AddMember` through the seeds), as this build's joiner asks (it refuses
//! itself), and as an operator's `cluster add` does (the node is asked its level); the
//! same node at level 2 joins.
//! Method: the balancer tests' harness (`balancer.rs`): real hosts in this process on
//! loopback TCP, each with group 0, an opener, a balancer and a level controller, one
//! node started with `--metadata-level-max 1`'s equivalent; producers propose to every
//! group through its leader throughout (a). Every wait is bounded.
//! Mutation-checked: (a) fails with the controller taking its own level for the effective
//! one (the level rose to 2 with node 2 at level 1); (b) fails without the machine's
//! level check on a joiner (the level-1 node became a member).

use std::time::Duration;

use entrepot::raft::groups_membership::{cluster_level, join_request, Joiner};
use entrepot::raft::meta_machine::{
    Member, MetaError, MetaOp, MetaRefusal, METADATA_LEVEL_FORMED, METADATA_LEVEL_MIN,
};
use entrepot::raft::metadata_level::{self, LEVEL_POLL_INTERVAL};
use entrepot_cluster::{GroupMachine, NodeId};

use crate::balancer::{first_messages, trace, wait_until, Cluster, Producers, TEST_TIMEOUT};
use crate::meta_hosts::amqp_addr;

/// The node standing in for an older build.
const OLD: NodeId = 2;
/// How long the cluster is watched holding level 1: several of the controller's polls
/// and many opener rounds.
const HELD_FOR: Duration = Duration::from_secs(4);

fn member(c: &Cluster, n: NodeId) -> Member {
    Member {
        peer: c.addrs[&n].clone(),
        amqp: amqp_addr(n),
    }
}

/// Every running node's finalized level, by node.
fn levels(c: &Cluster) -> Vec<(NodeId, u8)> {
    c.nodes
        .iter()
        .map(|(n, node)| (*n, node.meta.machine.level()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_level_1_member_holds_every_node_below_marks_until_it_runs_level_2() {
    trace();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = Cluster::start_at_levels(3, 3, true, &[(OLD, METADATA_LEVEL_MIN)]).await;
        let groups = c.declare().await;
        first_messages(&c, &groups).await;
        let producers = Producers::start(&c, &groups);
        tokio::time::sleep(HELD_FOR.max(LEVEL_POLL_INTERVAL * 3)).await;
        for (n, level) in levels(&c) {
            assert_eq!(level, METADATA_LEVEL_MIN, "node {n} left level 1");
        }
        for node in c.nodes.values() {
            let state = node.meta.machine.state();
            assert!(
                state.groups().values().all(|e| !e.formed),
                "a group marked formed at level 1"
            );
            assert_eq!(node.opener.counters().marked_formed, 0);
            let snapshot = node.meta.machine.snapshot().unwrap();
            assert_eq!(snapshot[0], 1, "group 0's snapshot at level 1 is version 1");
        }
        // What group 0's leader heard (unless the level-1 node leads it: it then polls
        // nobody, its own level being reached).
        let leader = c.meta_leader().await;
        let leader_id = leader.handle.leadership().borrow().leader.unwrap();
        if let Some(poll) = c.nodes[&leader_id].level.progress().last() {
            println!("level poll on node {leader_id}: {poll:?}");
            assert_eq!(poll.levels.get(&OLD), Some(&METADATA_LEVEL_MIN));
            assert_eq!(poll.effective, METADATA_LEVEL_MIN);
        }
        // The level-1 node upgraded: restarted at the build's level.
        c.stop(OLD).await;
        c.levels.insert(OLD, METADATA_LEVEL_FORMED);
        c.start_again(OLD).await;
        let meta = c.meta_leader().await;
        wait_until("level 2 on every node", || {
            levels(&c).iter().all(|(_, l)| *l == METADATA_LEVEL_FORMED)
        })
        .await;
        wait_until("every group marked formed", || {
            meta.machine.state().groups().values().all(|e| e.formed)
        })
        .await;
        // A mark is counted once its proposer heard its outcome, a moment after it
        // applied: waited for too.
        let marked = || -> u64 {
            c.nodes
                .values()
                .map(|n| n.opener.counters().marked_formed)
                .sum()
        };
        wait_until("the marks counted", || marked() >= groups.len() as u64).await;
        assert_eq!(marked(), groups.len() as u64, "each group marked once");
        assert_eq!(
            meta.machine.snapshot().unwrap()[0],
            3,
            "version 3 at level 2"
        );
        let confirmed = producers.stop().await;
        println!("confirmed per group: {confirmed:?}");
        for (&g, &n) in &confirmed {
            assert!(n > 0, "group {g} committed nothing while held at level 1");
            c.check_messages(g, n).await;
        }
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_level_1_node_is_refused_as_a_member_once_the_level_is_2() {
    trace();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let joiner = 3;
        let mut c = Cluster::start_at_levels(4, 3, true, &[(joiner, METADATA_LEVEL_MIN)]).await;
        let meta = c.meta_leader().await;
        wait_until("level 2", || meta.machine.level() == METADATA_LEVEL_FORMED).await;
        let refused = MetaRefusal::LevelBelowFinalized {
            node: joiner,
            level: METADATA_LEVEL_MIN,
            finalized: METADATA_LEVEL_FORMED,
        };
        let seeds: Vec<(NodeId, String)> = (0..3).map(|n| (n, c.addrs[&n].clone())).collect();
        // As an older build asks: an `AddMember` (no level) through the seeds.
        let new = &c.nodes[&joiner];
        let old_op = MetaOp::AddMember {
            node: joiner,
            member: member(&c, joiner),
        };
        let at = new.meta.propose_via(&seeds, &old_op).await.unwrap();
        let mut outcome = None;
        wait_until("the old build's join applied on the leader", || {
            outcome = meta.machine.outcome(at);
            outcome.is_some()
        })
        .await;
        assert_eq!(outcome.unwrap(), Err(refused.clone()));
        // As this build's joiner asks at level 1: it learns level 2 from a seed and
        // refuses itself.
        let asking = Joiner {
            node: joiner,
            member_addr: c.addrs[&joiner].clone(),
            seeds: seeds.clone(),
            level_max: METADATA_LEVEL_MIN,
        };
        assert_eq!(
            cluster_level(&new.host, &new.meta, &seeds).await,
            METADATA_LEVEL_FORMED
        );
        let refusal = join_request(&new.host, &new.meta, &asking).await;
        assert_eq!(refusal, Err(refused.clone()));
        println!("refused: {refused}");
        // As an operator's `cluster add` does: the node is asked its level.
        let leader_host = &c.nodes[&meta.handle.leadership().borrow().leader.unwrap()].host;
        let advertised = metadata_level::ask(leader_host, joiner, &c.addrs[&joiner])
            .await
            .unwrap();
        assert_eq!(advertised.supported, METADATA_LEVEL_MIN);
        let added = meta
            .add_member_at(joiner, member(&c, joiner), advertised.supported)
            .await;
        assert!(
            matches!(&added, Err(MetaError::Refused(r)) if *r == refused),
            "{added:?}"
        );
        assert!(!meta.machine.members().contains_key(&joiner));
        // The same node at level 2 joins.
        c.stop(joiner).await;
        c.levels.insert(joiner, METADATA_LEVEL_FORMED);
        c.start_again(joiner).await;
        let new = &c.nodes[&joiner];
        let asking = Joiner {
            level_max: METADATA_LEVEL_FORMED,
            ..asking
        };
        let op = join_request(&new.host, &new.meta, &asking).await.unwrap();
        assert!(matches!(op, MetaOp::AddMemberAt { level: 2, .. }), "{op:?}");
        new.meta.propose_via(&seeds, &op).await.unwrap();
        wait_until("the level-2 node a member", || {
            meta.machine.members().contains_key(&joiner)
        })
        .await;
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}
