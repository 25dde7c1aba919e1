//! Goal: the node-level host (`cluster/src/host/`) is what the broker can build on — a
//! proposal resolves only once a majority has the entry (and fails with a typed error
//! when there is none, or when this node does not lead), reads return the exact bytes as
//! slices of the node log's mapping, the leadership watch follows a leader change, a
//! restarted host recovers its groups and its machines from snapshot + log, a lagging
//! member installs a snapshot that carries the payloads its machine still reads (and
//! keeps them across a restart), and the log is purged only below the machine's lowest
//! needed index.
//! Method: three `Host`s in this process, each on its own temporary directory (real node
//! log, fsync on every commit) and its own `127.0.0.1:0` peer port, several groups each,
//! with a toy queue as the state machine: a proposal is a message (`M` + body) or an ack
//! range (`A` + from + to, message positions), its snapshot the set of live message
//! positions (never their bytes). The host packs proposals submitted together into one
//! entry: a message's position is (entry index, slot). Stopping a node is `Host::shutdown` (its port closes as on a
//! crash); restarting is `Host::start` on the same directory and port. Every wait is
//! bounded; no timing is asserted beyond generous bounds.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use entrepot_cluster::{ClusterError, GroupError, GroupHandle, Host, NodeId, Position};
use support::host::*;
use tokio::net::TcpListener;
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_resolves_on_a_majority_and_reads_are_slices_of_the_log() {
    bounded(async {
        let mut c = Cluster::start(&[1, 2, 3], u64::MAX).await;
        let g = 2;
        let leader = c.leader(g).await;
        let h = c.handle(leader, g);
        let bodies: Vec<Bytes> = (0..50)
            .map(|i| message(format!("m{i}").as_bytes()))
            .collect();
        let indexes = propose_all(&h, &bodies).await;
        assert!(indexes.windows(2).all(|w| w[0] < w[1]), "{indexes:?}");
        // Every replica reads back exactly the bytes, from its node log's mapping.
        let last = *indexes.last().unwrap();
        for (&n, _) in c.nodes.iter() {
            let r = c.handle(n, g);
            applied_at_least(&r, last).await;
            for (i, body) in indexes.iter().zip(&bodies) {
                let got = r.read(*i).unwrap().expect("a payload entry");
                assert_eq!(got, *body, "node {n} index {i}");
                assert!(
                    mapped_under(&got, &c.log_dir(n)),
                    "node {n}: a copy, not the log"
                );
            }
            assert!(
                r.committed() >= Some(last.index),
                "node {n}: {:?}",
                r.status()
            );
            let range = r.read_range(indexes[0].index..last.index + 1).unwrap();
            assert_eq!(range.len(), bodies.len());
            assert!(range.iter().map(|(p, _)| p).eq(indexes.iter()));
            assert!(range.iter().map(|(_, b)| b).eq(bodies.iter()));
            assert!(matches!(
                r.read(Position::new(last.index + 100, 0)),
                Err(ClusterError::NotApplied { .. })
            ));
        }
        // A follower refuses, naming the leader.
        let follower = (0..NODES).find(|&n| n != leader).unwrap();
        let refused = c.handle(follower, g).propose(message(b"x")).await;
        assert!(
            matches!(refused, Err(GroupError::NotLeader { leader: Some(l), .. }) if l == leader),
            "{refused:?}"
        );
        // One follower stopped: still a majority.
        let followers: Vec<NodeId> = (0..NODES).filter(|&n| n != leader).collect();
        c.stop(followers[0]).await;
        let i = h.propose(message(b"two of three")).await.unwrap();
        assert!(i > last);
        assert_eq!(h.read(i).unwrap().unwrap(), message(b"two of three"));
        // Two stopped: no majority; the proposal never resolves Ok.
        c.stop(followers[1]).await;
        let started = tokio::time::Instant::now();
        let lost = h.propose(message(b"one of three")).await;
        assert!(matches!(lost, Err(GroupError::Timeout { .. })), "{lost:?}");
        assert!(started.elapsed() >= PROPOSE_TIMEOUT);
        assert_eq!(
            *h.applied().borrow(),
            Some(i.index),
            "nothing applied without a quorum"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leadership_watch_follows_a_leader_change() {
    bounded(async {
        let mut c = Cluster::start(&[4, 5], u64::MAX).await;
        let g = 4;
        let old = c.leader(g).await;
        let old_term = c.handle(old, g).leadership().borrow().term;
        let survivors: Vec<NodeId> = (0..NODES).filter(|&n| n != old).collect();
        let mut watches: Vec<_> = survivors
            .iter()
            .map(|&n| c.handle(n, g).leadership())
            .collect();
        c.stop(old).await;
        for w in &mut watches {
            let seen = tokio::time::timeout(
                WAIT,
                w.wait_for(|l| l.leader.is_some() && l.leader != Some(old) && l.term > old_term),
            )
            .await
            .expect("a new leader within WAIT")
            .unwrap()
            .to_owned();
            assert!(seen.leader.is_some());
        }
        let new = c.leader(g).await;
        assert_ne!(new, old);
        let leads: Vec<bool> = survivors
            .iter()
            .map(|&n| c.handle(n, g).leadership().borrow().leads)
            .collect();
        assert_eq!(leads.iter().filter(|l| **l).count(), 1, "{leads:?}");
        c.handle(new, g)
            .propose(message(b"after the change"))
            .await
            .unwrap();
        let other = c.leader(5).await;
        c.handle(other, 5)
            .propose(message(b"other group"))
            .await
            .unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_host_recovers_its_groups_from_snapshot_and_log() {
    bounded(async {
        let groups = [6, 7];
        let mut c = Cluster::start(&groups, u64::MAX).await;
        let mut expected = BTreeMap::new();
        let mut snapshot_at = BTreeMap::new();
        let mut last = BTreeMap::new();
        for &g in &groups {
            let h = c.handle(c.leader(g).await, g);
            let bodies: Vec<Bytes> = (0..30)
                .map(|i| message(format!("g{g} m{i}").as_bytes()))
                .collect();
            let idx = propose_all(&h, &bodies).await;
            let acked = h.propose(ack(idx[0], idx[10])).await.unwrap();
            // A snapshot on every replica (each at what it applied), then more after it.
            for n in 0..NODES {
                let r = c.handle(n, g);
                applied_at_least(&r, acked).await;
                r.snapshot_now().await.unwrap();
                snapshot_at.insert((g, n), r.status().snapshot.unwrap());
            }
            let more: Vec<Bytes> = (30..40)
                .map(|i| message(format!("g{g} m{i}").as_bytes()))
                .collect();
            let idx2 = propose_all(&h, &more).await;
            let l = h.propose(ack(idx[10], idx[20])).await.unwrap();
            last.insert(g, l);
            let mut want = BTreeMap::new();
            for (i, b) in idx
                .iter()
                .zip(&bodies)
                .skip(20)
                .chain(idx2.iter().zip(&more))
            {
                want.insert(*i, b.clone());
            }
            for n in 0..NODES {
                applied_at_least(&c.handle(n, g), l).await;
                assert_eq!(c.queue(n, g).live(), want.keys().copied().collect());
            }
            expected.insert(g, want);
        }
        for n in 0..NODES {
            c.stop(n).await;
        }
        for n in 0..NODES {
            c.restart(n).await;
        }
        for &g in &groups {
            c.leader(g).await;
            for n in 0..NODES {
                let h = c.handle(n, g);
                applied_at_least(&h, last[&g]).await;
                let q = c.queue(n, g);
                assert_eq!(
                    q.restores(),
                    vec![snapshot_at[&(g, n)]],
                    "node {n} group {g}"
                );
                assert!(
                    q.applied()
                        .first()
                        .is_some_and(|&p| p.index > snapshot_at[&(g, n)]),
                    "node {n} group {g}: re-applied only after the snapshot"
                );
                assert_eq!(q.live(), expected[&g].keys().copied().collect(), "node {n}");
                for (i, body) in &expected[&g] {
                    assert_eq!(
                        h.read(*i).unwrap().as_ref(),
                        Some(body),
                        "node {n} index {i}"
                    );
                }
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_member_installs_a_snapshot_carrying_the_payloads_it_needs() {
    bounded(async {
        let g = 8;
        // Snapshots every 16 entries: the stopped member falls behind the purge.
        let mut c = Cluster::start(&[g], 16).await;
        let leader = c.leader(g).await;
        let lagging = (0..NODES).find(|&n| n != leader).unwrap();
        c.stop(lagging).await;
        let h = c.handle(leader, g);
        let bodies: Vec<Bytes> = (0..100)
            .map(|i| message(format!("late {i}").as_bytes()))
            .collect();
        let idx = propose_in_waves(&h, &bodies, 4).await;
        let l = h.propose(ack(idx[0], idx[60])).await.unwrap();
        h.snapshot_now().await.unwrap();
        // The leader purged past everything the lagging member holds, but not past the
        // oldest live message.
        let deadline = tokio::time::Instant::now() + WAIT;
        while h.status().purged < Some(idx[59].index) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no purge: {:?}",
                h.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(h.status().purged < Some(idx[60].index), "{:?}", h.status());
        c.restart(lagging).await;
        let r = c.handle(lagging, g);
        applied_at_least(&r, l).await;
        let q = c.queue(lagging, g);
        assert!(
            !q.restores().is_empty(),
            "caught up without a snapshot install"
        );
        assert_eq!(q.live(), c.queue(leader, g).live());
        assert_eq!(q.live(), idx[60..].iter().copied().collect());
        for (i, body) in idx.iter().zip(&bodies).skip(60) {
            assert_eq!(r.read(*i).unwrap().as_ref(), Some(body), "index {i}");
        }
        let range = r.read_range(idx[60].index..l.index).unwrap();
        assert!(range.iter().map(|(_, b)| b).eq(bodies[60..].iter()));
        // It goes on following.
        let next = h.propose(message(b"after the install")).await.unwrap();
        applied_at_least(&r, next).await;
        assert_eq!(
            r.read(next).unwrap().unwrap(),
            message(b"after the install")
        );
        // The carried payloads were persisted with the installed snapshot: after a
        // restart they are read from there (its log never held them).
        c.stop(lagging).await;
        c.restart(lagging).await;
        let r = c.handle(lagging, g);
        let q = c.queue(lagging, g);
        applied_at_least(&r, next).await;
        assert_eq!(q.live(), c.queue(leader, g).live());
        for (i, body) in idx.iter().zip(&bodies).skip(60) {
            assert_eq!(
                r.read(*i).unwrap().as_ref(),
                Some(body),
                "after restart, index {i}"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_purged_only_below_the_lowest_needed_index() {
    bounded(async {
        let g = 9;
        let c = Cluster::start(&[g], u64::MAX).await;
        let leader = c.leader(g).await;
        let h = c.handle(leader, g);
        let bodies: Vec<Bytes> = (0..40)
            .map(|i| message(format!("p{i}").as_bytes()))
            .collect();
        let idx = propose_all(&h, &bodies).await;
        let a = h.propose(ack(idx[0], idx[10])).await.unwrap();
        let low = idx[10];
        for n in 0..NODES {
            let r = c.handle(n, g);
            applied_at_least(&r, a).await;
            r.snapshot_now().await.unwrap();
            assert_eq!(r.status().snapshot, Some(a.index));
            let deadline = tokio::time::Instant::now() + WAIT;
            while r.status().purged != Some(low.index - 1) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "node {n}: {:?}",
                    r.status()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(matches!(
                r.read(Position::new(low.index - 1, 0)),
                Err(ClusterError::Purged { .. })
            ));
            for (i, body) in idx.iter().zip(&bodies).skip(10) {
                assert_eq!(
                    r.read(*i).unwrap().as_ref(),
                    Some(body),
                    "node {n} index {i}"
                );
            }
        }
        // Everything acknowledged: the next snapshot lets the log go up to it.
        let after_last = Position::new(idx[39].index, idx[39].slot + 1);
        let b = h.propose(ack(idx[10], after_last)).await.unwrap();
        for n in 0..NODES {
            let r = c.handle(n, g);
            applied_at_least(&r, b).await;
            r.snapshot_now().await.unwrap();
            let deadline = tokio::time::Instant::now() + WAIT;
            while r.status().purged != Some(b.index) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "node {n}: {:?}",
                    r.status()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_replica_reopens_from_the_node_log_and_catches_up_and_a_removed_one_is_gone() {
    bounded(async {
        let g = 10;
        let mut c = Cluster::start(&[g, 11], u64::MAX).await;
        let leader = c.leader(g).await;
        let h = c.handle(leader, g);
        let first = propose_all(
            &h,
            &[
                message(b"before"),
                ack(Position::default(), Position::default()),
            ],
        )
        .await;
        let closed = (0..NODES).find(|&n| n != leader).unwrap();
        applied_at_least(&c.handle(closed, g), first[1]).await;
        let node = c.nodes.get_mut(&closed).unwrap();
        assert!(node.host.close_group(g).await);
        assert!(node.host.group(g).is_none());
        assert!(!node.host.close_group(g).await, "closed twice");
        // The other group of that node is untouched; this one commits on two of three.
        let other = c.leader(11).await;
        c.handle(other, 11)
            .propose(message(b"other"))
            .await
            .unwrap();
        let later = h.propose(message(b"while closed")).await.unwrap();
        // Reopened with a fresh machine: the log is re-applied and it catches up.
        let q = Queue::default();
        let node = c.nodes.get_mut(&closed).unwrap();
        let r = node.host.open_group(g, q.clone()).await.unwrap();
        node.queues.insert(g, q.clone());
        applied_at_least(&r, later).await;
        assert_eq!(q.live(), [first[0], later].into_iter().collect());
        assert_eq!(r.read(later).unwrap().unwrap(), message(b"while closed"));
        assert!(matches!(
            node.host.open_group(g, Queue::default()).await,
            Err(ClusterError::GroupAlreadyOpen { .. })
        ));
        // Removed for good: its records no longer count in the node log, its snapshot
        // directory is gone, and the node's other group goes on.
        r.snapshot_now().await.unwrap();
        let snapshot_dir = c.dirs[&closed]
            .path()
            .join(entrepot_cluster::host::HOST_GROUPS_DIR)
            .join(g.to_string());
        assert!(snapshot_dir.exists());
        let node = &c.nodes[&closed];
        node.host.remove_group(g).await.unwrap();
        assert!(node.host.group(g).is_none());
        assert_eq!(node.host.recovered_groups().unwrap(), vec![11]);
        assert!(!snapshot_dir.exists());
        let other = c.leader(11).await;
        c.handle(other, 11)
            .propose(message(b"after the removal"))
            .await
            .unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_joins_through_a_snapshot_and_becomes_a_voter() {
    bounded(async {
        let g = 12;
        let c = Cluster::start(&[g], 16).await;
        let leader = c.leader(g).await;
        let h = c.handle(leader, g);
        let bodies: Vec<Bytes> = (0..40)
            .map(|i| message(format!("new {i}").as_bytes()))
            .collect();
        let idx = propose_in_waves(&h, &bodies, 4).await;
        let a = h.propose(ack(idx[0], idx[30])).await.unwrap();
        h.snapshot_now().await.unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while h.status().purged < Some(idx[30].index - 1) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no purge: {:?}",
                h.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A fourth node, empty: it can only catch up by installing the snapshot.
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let new = start_node(3, dir.path(), listener, &[g], 16).await;
        let r = new.host.group(g).unwrap();
        let q = new.queues[&g].clone();
        h.add_learner(3, &addr).await.unwrap();
        applied_at_least(&r, a).await;
        assert!(!q.restores().is_empty(), "caught up without a snapshot");
        assert_eq!(q.live(), idx[30..].iter().copied().collect());
        for (i, body) in idx.iter().zip(&bodies).skip(30) {
            assert_eq!(r.read(*i).unwrap().as_ref(), Some(body), "index {i}");
        }
        let voters: BTreeSet<NodeId> = [0, 1, 2, 3].into_iter().collect();
        h.change_voters(voters.clone()).await.unwrap();
        assert_eq!(h.status().voters, voters);
        // A follower that applied the new membership refuses a change, naming the leader.
        let follower = c.handle((0..NODES).find(|&n| n != leader).unwrap(), g);
        applied_at_least(&follower, Position::new(h.status().applied.unwrap(), 0)).await;
        let refused = follower.add_learner(4, "127.0.0.1:1").await;
        assert!(
            matches!(refused, Err(GroupError::NotLeader { .. })),
            "{refused:?}"
        );
        let next = h.propose(message(b"four voters")).await.unwrap();
        applied_at_least(&r, next).await;
        assert_eq!(r.read(next).unwrap().unwrap(), message(b"four voters"));
        new.host.shutdown().await;
    })
    .await
}

/// Many producers on one address: what they submit while earlier entries are in flight
/// shares entries, each producer's proposals keep their order, every replica applies
/// the same positions in the same order and reads back the exact bytes (slices of its
/// node log), also after all three restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_share_entries_in_order_and_positions_survive_a_restart() {
    bounded(async {
        let g = 13;
        let mut c = Cluster::start(&[g], u64::MAX).await;
        let h = c.handle(c.leader(g).await, g);
        const TASKS: usize = 8;
        const EACH: usize = 50;
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let h = h.clone();
                tokio::spawn(async move {
                    let bodies: Vec<Bytes> = (0..EACH)
                        .map(|i| message(format!("t{t} m{i}").as_bytes()))
                        .collect();
                    let positions = propose_all(&h, &bodies).await;
                    (bodies, positions)
                })
            })
            .collect();
        let mut all: BTreeMap<Position, Bytes> = BTreeMap::new();
        for t in tasks {
            let (bodies, positions) = t.await.unwrap();
            assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "one producer's order: {positions:?}"
            );
            all.extend(positions.into_iter().zip(bodies));
        }
        assert_eq!(all.len(), TASKS * EACH, "every position distinct");
        let entries: BTreeSet<u64> = all.keys().map(|p| p.index).collect();
        assert!(
            entries.len() * 4 <= all.len(),
            "{} messages in {} entries: not batched",
            all.len(),
            entries.len()
        );
        let last = *all.keys().last().unwrap();
        let check = |c: &Cluster, when: &str| {
            for n in 0..NODES {
                let r = c.handle(n, g);
                let applied = c.queue(n, g).applied();
                assert_eq!(
                    applied,
                    all.keys().copied().collect::<Vec<_>>(),
                    "node {n} {when}: applied in position order"
                );
                for (at, body) in &all {
                    let got = r.read(*at).unwrap().expect("a proposal");
                    assert_eq!(&got, body, "node {n} {when} at {at}");
                    assert!(mapped_under(&got, &c.log_dir(n)), "node {n}: a copy");
                }
                let past = Position::new(last.index, last.slot + 1);
                assert_eq!(r.read(past).unwrap(), None, "no slot past the last");
                let range = r.read_range(0..last.index + 1).unwrap();
                assert!(range.iter().map(|(p, _)| p).eq(all.keys()), "node {n}");
                let entry = r.read_entry(last.index).unwrap();
                assert_eq!(entry.len() as u32, last.slot + 1);
            }
        };
        for n in 0..NODES {
            applied_at_least(&c.handle(n, g), last).await;
        }
        check(&c, "before the restart");
        for n in 0..NODES {
            c.stop(n).await;
        }
        for n in 0..NODES {
            c.restart(n).await;
        }
        c.leader(g).await;
        for n in 0..NODES {
            applied_at_least(&c.handle(n, g), last).await;
        }
        check(&c, "after the restart");
    })
    .await
}

/// An entry that fails fails every proposal in it, with the same typed error: proposals
/// submitted together to a follower all name the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_entry_fails_every_proposal_in_it() {
    bounded(async {
        let g = 14;
        let c = Cluster::start(&[g], u64::MAX).await;
        let leader = c.leader(g).await;
        let follower = c.handle((0..NODES).find(|&n| n != leader).unwrap(), g);
        let mut pending = Vec::new();
        for i in 0..40 {
            let p = follower.submit(message(format!("f{i}").as_bytes())).await;
            pending.push(p.unwrap());
        }
        for p in pending {
            let refused = p.await;
            assert!(
                matches!(refused, Err(GroupError::NotLeader { leader: Some(l), .. }) if l == leader),
                "{refused:?}"
            );
        }
        assert!(matches!(
            follower.submit(Bytes::from(vec![0; entrepot_cluster::MAX_PROPOSAL_BYTES + 1])).await,
            Err(GroupError::TooLarge { .. })
        ));
    })
    .await
}

/// A leader without a quorum stops draining its queue; a submitter then waits at most the
/// propose timeout for room, and is told `Timeout`, never held forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_times_the_submitter_out() {
    bounded(async {
        let g = 16;
        let mut c = Cluster::start(&[g], u64::MAX).await;
        let leader = c.leader(g).await;
        let h = c.handle(leader, g);
        for n in (0..NODES).filter(|&n| n != leader) {
            c.stop(n).await;
        }
        // What the queue holds, plus what the entries in flight took out of it.
        let room = entrepot_cluster::host::MAX_QUEUED_PROPOSALS
            + entrepot_cluster::MAX_ENTRIES_IN_FLIGHT * entrepot_cluster::MAX_BATCH_SLOTS;
        let mut pending = Vec::with_capacity(room);
        let started = tokio::time::Instant::now();
        let refused = loop {
            match h.submit(Bytes::from_static(b"M")).await {
                Ok(p) => pending.push(p),
                Err(e) => break e,
            }
            assert!(pending.len() <= room, "more queued than the bound");
        };
        assert!(
            matches!(refused, GroupError::Timeout { .. }),
            "{refused:?} after {}",
            pending.len()
        );
        assert!(started.elapsed() >= PROPOSE_TIMEOUT);
        assert!(pending.len() >= entrepot_cluster::host::MAX_QUEUED_PROPOSALS);
    })
    .await
}

/// An entry always fits in one node-log record (512 KiB here): a larger proposal is
/// refused before it is queued, and proposals that together pass a record go in more
/// than one entry — the group keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_stay_within_a_node_log_record() {
    bounded(async {
        let g = 15;
        let c = Cluster::start(&[g], u64::MAX).await;
        let h = c.handle(c.leader(g).await, g);
        let refused = h.submit(Bytes::from(vec![1; 512 << 10])).await;
        assert!(
            matches!(refused, Err(GroupError::TooLarge { max, .. }) if max < 512 << 10),
            "{:?}",
            refused.map(|_| ())
        );
        let big: Vec<Bytes> = (0..6u8)
            .map(|i| {
                let mut m = vec![i; 200 << 10];
                m[0] = b'M';
                Bytes::from(m)
            })
            .collect();
        let at = propose_all(&h, &big).await;
        let entries: BTreeSet<u64> = at.iter().map(|p| p.index).collect();
        assert!(
            entries.len() >= 3,
            "two of 200 KiB at most per entry: {at:?}"
        );
        for (p, body) in at.iter().zip(&big) {
            assert_eq!(h.read(*p).unwrap().as_ref(), Some(body));
        }
        h.propose(message(b"still going")).await.unwrap();
    })
    .await
}

/// The broker shares handles between connection tasks and awaits proposals in them.
#[test]
fn handles_are_shared_between_tasks() {
    fn shared<T: Send + Sync + Clone + 'static>() {}
    fn sent<T: Send + 'static>() {}
    shared::<Host>();
    shared::<GroupHandle>();
    sent::<entrepot_cluster::Proposal>();
    sent::<GroupError>();
}

/// A lease round (`GroupHandle::lease_round`) succeeds on the leader only while a quorum
/// answers it: a follower is told `NotLeader` naming the leader; with both followers
/// stopped the leader still believes it leads (openraft keeps it Leader without a
/// quorum) but its rounds fail within the leader lease; one follower back and they
/// succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_round_needs_a_quorum_and_the_leadership() {
    bounded(async {
        let g = 18;
        let mut c = Cluster::start(&[g], u64::MAX).await;
        let leader = c.leader(g).await;
        let h = c.handle(leader, g);
        h.lease_round().await.unwrap();
        assert_eq!(h.leader_lease(), Duration::from_millis(1600));
        let followers: Vec<NodeId> = (0..NODES).filter(|&n| n != leader).collect();
        let refused = c.handle(followers[0], g).lease_round().await;
        assert!(
            matches!(refused, Err(GroupError::NotLeader { leader: Some(l), .. }) if l == leader),
            "{refused:?}"
        );
        for &n in &followers {
            c.stop(n).await;
        }
        // Every round from now on fails, each within the lease (the round's own bound).
        for _ in 0..3 {
            let started = tokio::time::Instant::now();
            let failed = h.lease_round().await;
            assert!(
                matches!(
                    failed,
                    Err(GroupError::Timeout { .. } | GroupError::NoQuorum { .. })
                ),
                "{failed:?}"
            );
            assert!(started.elapsed() < h.leader_lease() + Duration::from_secs(1));
        }
        assert!(
            h.leadership().borrow().leads,
            "openraft keeps a leader without a quorum Leader: only the round tells"
        );
        c.restart(followers[0]).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while h.lease_round().await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no round within WAIT"
            );
        }
    })
    .await
}
