//! Goal: with `HostConfig::hibernation`, a `Host`'s idle groups stop their Raft instance
//! on every node and exchange no RPC while they sleep; `GroupHandle::submit` on the
//! former leader wakes the group (as leader, no election) and commits, and every replica
//! applies it; a submit on a node where the group sleeps led by another node is refused
//! `NotLeader` naming it, without waking the group; reads and the leadership watch work
//! while stopped; a hibernated group whose leader host closes elects a new leader among
//! the survivors, which accepts a submit; a restarted host opens the groups of its node
//! log stopped, and a write wakes them; writes racing the stops and wakes all commit once,
//! in order; a membership change wakes a hibernated group, which sleeps again with the
//! new member; a write to a group reopened with no known leader waits for its election;
//! a touched group stays awake.
//! Method: three `Host`s in this process over real TCP with real node logs (fsync), as
//! `host_groups.rs` (`support/host.rs`), every host hibernating with short timings.
//! Every wait is bounded; no speed is asserted.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use entrepot_cluster::{ClusterError, GroupError, HibernationConfig, Leadership, NodeId, Position};
use support::host::*;

/// A group idle this long hibernates (short: the tests wait for it).
const QUIESCE_AFTER: Duration = Duration::from_millis(400);

fn hibernation() -> Option<HibernationConfig> {
    Some(HibernationConfig {
        quiesce_after: QUIESCE_AFTER,
        check_interval: Duration::from_millis(100),
        liveness_interval: Duration::from_millis(100),
        // Raised by the host to its longest election timeout.
        liveness_timeout: Duration::from_millis(100),
    })
}

/// Waits until no host runs an instance of any group, then a little longer (a heartbeat
/// sent while the last instance stopped may still arrive).
async fn all_stopped(c: &Cluster) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let running: Vec<usize> = c
            .nodes
            .values()
            .map(|n| n.host.hibernation_counters().running)
            .collect();
        if running.iter().all(|r| *r == 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "groups still running per node after {WAIT:?}: {running:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
}

fn group_rpcs(c: &Cluster) -> BTreeMap<NodeId, u64> {
    c.nodes
        .iter()
        .map(|(id, n)| (*id, n.host.hibernation_counters().group_rpcs_received))
        .collect()
}

fn leaderships(c: &Cluster, g: u64) -> BTreeMap<NodeId, Leadership> {
    c.nodes
        .keys()
        .map(|&n| (n, *c.handle(n, g).leadership().borrow()))
        .collect()
}

/// Every host's replica of `g` applied `at` and its machine holds it live.
async fn applied_everywhere(c: &Cluster, g: u64, at: Position) {
    for (&n, _) in c.nodes.iter() {
        applied_at_least(&c.handle(n, g), at).await;
        assert!(c.queue(n, g).live().contains(&at), "node {n} group {g}");
    }
}

/// Goal: idle host groups stop everywhere and are silent; leadership and reads hold while
/// stopped; a submit on the former leader wakes its group without an election and
/// commits on all three; a submit where the group sleeps led elsewhere is `NotLeader`
/// and wakes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_host_groups_stop_everywhere_and_a_submit_on_the_former_leader_wakes_them() {
    bounded(async {
        let groups = [1, 2, 3, 4, 5, 6];
        let c = Cluster::start_with(&groups, u64::MAX, hibernation()).await;
        let g = 4;
        let leader = c.leader(g).await;
        let first = c.handle(leader, g).propose(message(b"before")).await.unwrap();
        applied_everywhere(&c, g, first).await;
        let mut awake = BTreeMap::new();
        for &g in &groups {
            c.leader(g).await;
            awake.insert(g, leaderships(&c, g));
        }
        // Watchers see nothing change while the groups stop (no flip through "not led").
        let watches: Vec<_> = groups
            .iter()
            .flat_map(|&g| c.nodes.keys().map(move |&n| (g, n)))
            .map(|(g, n)| (g, n, c.handle(n, g).leadership()))
            .collect();

        all_stopped(&c).await;
        for (g, n, w) in &watches {
            assert!(!w.has_changed().unwrap(), "group {g} node {n}: {:?}", *w.borrow());
        }
        let before = group_rpcs(&c);
        tokio::time::sleep(QUIESCE_AFTER * 3).await;
        assert_eq!(before, group_rpcs(&c), "RPCs received while every group slept");
        for &g in &groups {
            assert_eq!(leaderships(&c, g), awake[&g], "group {g}: leadership after the stop");
        }
        for (&n, _) in c.nodes.iter() {
            let h = c.handle(n, g);
            assert!(!h.is_running());
            assert_eq!(h.read(first).unwrap().unwrap(), message(b"before"));
            assert!(h.status().voters.len() == 3, "{:?}", h.status());
        }

        // Led elsewhere: refused here, naming the leader, and the group stays asleep.
        let other = (leader + 1) % NODES;
        let refused = c.handle(other, g).propose(message(b"wrong node")).await;
        assert!(
            matches!(&refused, Err(GroupError::NotLeader { leader: Some(l), leader_addr: Some(a), .. })
                if *l == leader && *a == c.addrs[&leader]),
            "{refused:?}"
        );
        assert!(!c.handle(other, g).is_running());

        let term = awake[&g][&leader].term;
        let during_wake: Vec<_> = c
            .nodes
            .keys()
            .map(|&n| (n, c.handle(n, g).leadership()))
            .collect();
        let second = c.handle(leader, g).propose(message(b"after")).await.unwrap();
        applied_everywhere(&c, g, second).await;
        // Nor while it wakes: the same leader and term on every replica throughout.
        for (n, w) in &during_wake {
            assert!(!w.has_changed().unwrap(), "node {n}: {:?}", *w.borrow());
        }
        assert_eq!(
            c.handle(leader, g).leadership().borrow().term,
            term,
            "the former leader wakes as leader, without an election"
        );
        for (&n, node) in c.nodes.iter() {
            assert!(node.host.hibernation_counters().wakes >= 1, "node {n}");
            for &other in groups.iter().filter(|&&o| o != g) {
                assert!(!c.handle(n, other).is_running(), "node {n} group {other} woke");
            }
        }
        // And it sleeps again.
        all_stopped(&c).await;
    })
    .await
}

/// Goal: a hibernated group whose leader host closes is woken on the survivors by the
/// per-peer liveness, elects one of them, and commits a submit there; a group led by a
/// survivor stays asleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hibernated_group_whose_leader_host_closes_elects_a_survivor() {
    bounded(async {
        let groups = [3, 4, 5];
        let mut c = Cluster::start_with(&groups, u64::MAX, hibernation()).await;
        let g = 3;
        let old = c.leader(g).await;
        let old_term = c.handle(old, g).leadership().borrow().term;
        let mut led_by_survivor = Vec::new();
        for &o in groups.iter().filter(|&&o| o != g) {
            if c.leader(o).await != old {
                led_by_survivor.push(o);
            }
        }
        all_stopped(&c).await;

        c.stop(old).await;
        let new = c.leader(g).await;
        assert_ne!(new, old);
        assert!(c.handle(new, g).leadership().borrow().term > old_term);
        let at = c.handle(new, g).propose(message(b"after")).await.unwrap();
        applied_everywhere(&c, g, at).await;
        for (&n, node) in c.nodes.iter() {
            assert!(node.host.hibernation_counters().peers_lost >= 1, "node {n}");
            for &o in &led_by_survivor {
                assert!(!c.handle(n, o).is_running(), "node {n}: group {o} woke");
            }
        }
    })
    .await
}

/// Goal: a host restarted with hibernation opens the groups of its node log stopped — no
/// instance, no RPC, the leadership its vote names, reads above the snapshot `NotApplied`
/// — and a submit on the former leader wakes the group: it commits, and every replica
/// applies the old entries and the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_host_opens_its_groups_stopped_and_a_write_wakes_them() {
    bounded(async {
        let groups = [1, 2];
        let mut c = Cluster::start_with(&groups, u64::MAX, hibernation()).await;
        let mut before = BTreeMap::new();
        for &g in &groups {
            let l = c.leader(g).await;
            let at = c.handle(l, g).propose(message(b"old")).await.unwrap();
            applied_everywhere(&c, g, at).await;
            before.insert(g, (l, at, leaderships(&c, g)));
        }
        all_stopped(&c).await;
        for id in 0..NODES {
            c.stop(id).await;
        }
        for id in 0..NODES {
            c.restart(id).await;
        }
        for (&n, node) in c.nodes.iter() {
            assert_eq!(node.host.hibernation_counters().running, 0, "node {n}");
        }
        tokio::time::sleep(QUIESCE_AFTER * 2).await;
        for (&n, node) in c.nodes.iter() {
            let counters = node.host.hibernation_counters();
            assert_eq!(counters.running, 0, "node {n}: {counters:?}");
            assert_eq!(counters.group_rpcs_received, 0, "node {n}: {counters:?}");
        }
        for &g in &groups {
            let (leader, old, ref awake) = before[&g];
            for (&n, view) in leaderships(&c, g).iter() {
                assert_eq!(view.leader, Some(leader), "node {n} group {g}");
                assert_eq!(view.term, awake[&n].term, "node {n} group {g}");
                assert_eq!(view.leads, n == leader, "node {n} group {g}");
            }
            assert!(matches!(
                c.handle(leader, g).read(old),
                Err(ClusterError::NotApplied { .. })
            ));
        }

        let g = 1;
        let (leader, old, _) = before[&g];
        let new = c.handle(leader, g).propose(message(b"new")).await.unwrap();
        applied_everywhere(&c, g, new).await;
        for (&n, _) in c.nodes.iter() {
            assert!(c.queue(n, g).live().contains(&old), "node {n}");
            assert_eq!(c.handle(n, g).read(old).unwrap().unwrap(), message(b"old"));
            assert!(!c.handle(n, 2).is_running(), "node {n}: group 2 woke");
        }
    })
    .await
}

/// Goal: writes that race the group's stops and wakes all commit, once each, in order on
/// every replica: submits on the leader at varied moments around the hibernate handshake
/// (quiesce after 60 ms, checked every 10 ms) never meet an instance stopped under them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_stops_and_wakes_all_commit_once_in_order() {
    bounded(async {
        let quick = HibernationConfig {
            quiesce_after: Duration::from_millis(60),
            check_interval: Duration::from_millis(10),
            liveness_interval: Duration::from_millis(100),
            liveness_timeout: Duration::from_millis(100),
        };
        let g = 7;
        let c = Cluster::start_with(&[g], u64::MAX, Some(quick)).await;
        let mut positions = Vec::new();
        let mut stops_seen = 0;
        for round in 0..ROUNDS {
            // From "just committed" to "asleep for a while", in steps of 7 ms.
            let delay = Duration::from_millis(7 * (round % 20));
            tokio::time::sleep(delay).await;
            let leader = c.handle(0, g).leadership().borrow().leader.unwrap();
            let body = format!("round {round}");
            let at = c.handle(leader, g).propose(message(body.as_bytes())).await;
            positions.push(at.unwrap_or_else(|e| panic!("round {round}: {e}")));
            stops_seen = c.nodes[&leader].host.hibernation_counters().stops;
        }
        println!("the group stopped {stops_seen} times over {ROUNDS} writes");
        assert!(stops_seen >= 2, "the group stopped only {stops_seen} times");
        for (&n, _) in c.nodes.iter() {
            applied_at_least(&c.handle(n, g), *positions.last().unwrap()).await;
            let applied = c.queue(n, g).applied();
            let mine: Vec<Position> = applied
                .into_iter()
                .filter(|p| positions.contains(p))
                .collect();
            assert_eq!(mine, positions, "node {n}: applied once each, in order");
            for (round, at) in positions.iter().enumerate() {
                let body = format!("round {round}");
                assert_eq!(
                    c.handle(n, g).read(*at).unwrap().unwrap(),
                    message(body.as_bytes())
                );
            }
        }
    })
    .await
}

/// Goal: a membership change wakes a hibernated group: a fourth host joins as a learner,
/// catches up and becomes a voter; then the four-member group hibernates on every host,
/// and a submit wakes it and reaches the new member too; every host pings the members of
/// its groups, and stops pinging the fourth once it is removed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hibernated_group_grows_a_member_and_sleeps_again_with_four() {
    bounded(async {
        let g = 9;
        let c = Cluster::start_with(&[g], u64::MAX, hibernation()).await;
        let leader = c.leader(g).await;
        let h = c.handle(leader, g);
        let before = h.propose(message(b"three")).await.unwrap();
        applied_everywhere(&c, g, before).await;
        all_stopped(&c).await;

        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let new = start_node_with(3, dir.path(), listener, &[g], u64::MAX, hibernation()).await;
        let r = new.host.group(g).unwrap();
        h.add_learner(3, &addr).await.unwrap();
        let voters: std::collections::BTreeSet<NodeId> = (0..=3).collect();
        h.change_voters(voters.clone()).await.unwrap();
        assert_eq!(h.status().voters, voters);
        applied_at_least(&r, before).await;
        assert_eq!(r.read(before).unwrap().unwrap(), message(b"three"));

        all_stopped(&c).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while new.host.hibernation_counters().running > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the new member never slept"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(r.status().voters, voters, "members known while stopped");
        let after = h.propose(message(b"four")).await.unwrap();
        applied_everywhere(&c, g, after).await;
        applied_at_least(&r, after).await;
        assert!(new.queues[&g].live().contains(&after));
        let watched = |c: &Cluster| -> Vec<usize> {
            c.nodes
                .values()
                .map(|n| n.host.hibernation_counters().peers_watched)
                .collect()
        };
        assert_eq!(
            watched(&c),
            vec![3, 3, 3],
            "every host pings the three others"
        );

        // Back to three: the hosts stop pinging the member that left.
        let three: std::collections::BTreeSet<NodeId> = (0..NODES).collect();
        h.change_voters(three.clone()).await.unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while watched(&c) != vec![2, 2, 2] {
            assert!(
                tokio::time::Instant::now() < deadline,
                "peers pinged after the removal: {:?}",
                watched(&c)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(h.status().voters, three);
        new.host.shutdown().await;
    })
    .await
}

/// Goal: a group reopened stopped with *no known leader* (its host restarted while it
/// campaigned without a quorum: its vote is its own, uncommitted) is woken by a write and
/// given time to elect: the write is not refused `NotLeader` with no leader named — it
/// commits there, or names the elected leader, where it commits — and every replica
/// applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_group_reopened_with_no_known_leader_waits_for_its_election() {
    bounded(async {
        let g = 11;
        let mut c = Cluster::start_with(&[g], u64::MAX, hibernation()).await;
        let leader = c.leader(g).await;
        let old = c.handle(leader, g).propose(message(b"old")).await.unwrap();
        applied_everywhere(&c, g, old).await;
        let lone = (leader + 1) % NODES;
        let old_term = c.handle(lone, g).leadership().borrow().term;
        let mut lone_view = c.handle(lone, g).leadership();
        for id in (0..NODES).filter(|&n| n != lone) {
            c.stop(id).await;
        }
        // Alone, it campaigns without a quorum: leader unknown, a later term.
        tokio::time::timeout(
            WAIT,
            lone_view.wait_for(|l| l.term > old_term && l.leader.is_none()),
        )
        .await
        .expect("a campaign without a quorum")
        .unwrap();
        c.stop(lone).await;
        for id in 0..NODES {
            c.restart(id).await;
        }
        let view = *c.handle(lone, g).leadership().borrow();
        assert!(
            view.leader.is_none() && !c.handle(lone, g).is_running(),
            "{view:?}"
        );

        let first = c.handle(lone, g).propose(message(b"new")).await;
        let at = match first {
            Ok(at) => {
                println!("the waking write committed on node {lone}");
                at
            }
            Err(GroupError::NotLeader {
                leader: Some(l), ..
            }) => {
                println!("the waking write was sent on to node {l}, elected meanwhile");
                c.handle(l, g).propose(message(b"new")).await.unwrap()
            }
            Err(e) => panic!("the waking write: {e:?}"),
        };
        applied_everywhere(&c, g, at).await;
        for (&n, _) in c.nodes.iter() {
            assert!(c.queue(n, g).live().contains(&old), "node {n}");
        }
    })
    .await
}

/// Goal: a group its leader keeps touching (an attach, a consumer's flow) stays awake
/// while an untouched one beside it sleeps; left alone, it sleeps too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_touched_group_stays_awake_and_sleeps_once_left_alone() {
    bounded(async {
        let (touched, left) = (13, 14);
        let c = Cluster::start_with(&[touched, left], u64::MAX, hibernation()).await;
        let leader = c.leader(touched).await;
        let h = c.handle(leader, touched);
        // Touch it until the other group slept everywhere and at least 3 quiesce delays
        // went by.
        let began = tokio::time::Instant::now();
        loop {
            h.touch();
            let left_asleep = c.nodes.keys().all(|&n| !c.handle(n, left).is_running());
            if left_asleep && began.elapsed() >= QUIESCE_AFTER * 3 {
                break;
            }
            assert!(began.elapsed() < WAIT, "the untouched group never slept");
            tokio::time::sleep(QUIESCE_AFTER / 8).await;
        }
        for (&n, _) in c.nodes.iter() {
            assert!(
                !c.handle(n, left).is_running(),
                "node {n}: untouched group awake"
            );
            assert!(
                c.handle(n, touched).is_running(),
                "node {n}: touched group asleep"
            );
        }
        all_stopped(&c).await;
    })
    .await
}

/// Writes in [`writes_racing_stops_and_wakes_all_commit_once_in_order`].
const ROUNDS: u64 = 40;

/// A lease round on a hibernated group wakes it where it was led (in the same term: no
/// election) and succeeds; on a node where it sleeps led by another it is `NotLeader`
/// without a wake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_round_wakes_a_hibernated_group_where_it_is_led_only() {
    bounded(async {
        let g = 13;
        let c = Cluster::start_with(&[g], u64::MAX, hibernation()).await;
        let leader = c.leader(g).await;
        all_stopped(&c).await;
        let follower = (0..NODES).find(|&n| n != leader).unwrap();
        let refused = c.handle(follower, g).lease_round().await;
        assert!(
            matches!(refused, Err(GroupError::NotLeader { leader: Some(l), .. }) if l == leader),
            "{refused:?}"
        );
        assert!(
            !c.handle(follower, g).is_running(),
            "refused without a wake"
        );
        let term = c.handle(leader, g).leadership().borrow().term;
        c.handle(leader, g).lease_round().await.unwrap();
        assert!(c.handle(leader, g).is_running());
        assert_eq!(c.handle(leader, g).leadership().borrow().term, term);
    })
    .await
}
