//! Goal: the store of one clustered address over its Raft group
//! (`entrepot::raft::group_store::GroupStore`, issue 12 step 4.2) accepts a message only
//! once a majority holds it, refuses every change on a follower, keeps acknowledgements,
//! consumer-group floors and delivery counts identical on every replica, serves bodies
//! byte-exact as slices of each node's log, and recovers exactly the live messages after
//! all three hosts restart and after its leader's host is closed.
//! Method: three real hosts in this process (`three_hosts.rs`: TCP between them, a node
//! log with an fsync per commit each), one address group; a `GroupStore` over the
//! leader's handle writes, one over every member's handle reads. Every wait is bounded;
//! nothing is timed.

use std::time::Duration;

use bytes::Bytes;
use entrepot::broker::queue::now_ms;
use entrepot::raft::group_store::{GroupMessage, GroupStore, GroupStoreError};
use entrepot_cluster::{GroupError, NodeId};

use crate::three_hosts::{mapped_under, Cluster, NODES, WAIT};

const ADDRESS: &str = "orders";
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Message `i` as the producer sent it (two chunks on the wire).
fn body(i: u64) -> Vec<u8> {
    format!("message {i}: {}", "x".repeat((i as usize * 37) % 300)).into_bytes()
}

fn store(c: &Cluster, n: NodeId) -> GroupStore {
    GroupStore::new(ADDRESS, c.handle(n), c.machine(n))
}

/// Appends messages `range` on `s`, waits for each to be durable; their committed form.
async fn append_all(s: &GroupStore, range: std::ops::Range<u64>) -> Vec<GroupMessage> {
    let mut pending = Vec::new();
    for i in range {
        let b = body(i);
        let (head, tail) = b.split_at(b.len() / 2);
        pending.push(s.append(&[head, tail]).unwrap());
    }
    let mut out = Vec::new();
    for a in pending {
        tokio::time::timeout(WAIT, a.durable.wait())
            .await
            .expect("durable in time")
            .unwrap();
        out.push(a.pending.committed().await.unwrap());
    }
    out
}

/// Waits until every running member applied what the leader `n` applied.
async fn settle_on(c: &Cluster, n: NodeId) {
    let applied = c.handle(n).applied().borrow().unwrap();
    c.applied_everywhere(applied).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_accepted_only_once_a_majority_has_it_and_a_follower_refuses_it() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = Cluster::start().await;
        let leader = c.leader_id().await;
        let followers: Vec<NodeId> = (0..NODES).filter(|&n| n != leader).collect();
        let s = store(&c, leader);
        // A follower's store refuses every change at once, naming the leader.
        let f = store(&c, followers[0]);
        let refused = f.append(&[b"no"]).err();
        assert!(
            matches!(refused, Some(GroupStoreError::NotLeader { leader: Some(l), .. }) if l == leader),
            "{refused:?}"
        );
        assert!(matches!(f.ack(&[0]), Err(GroupStoreError::NotLeader { .. })));
        // Dense offsets in log order; bodies exact, slices of each node's own log.
        let committed = append_all(&s, 0..20).await;
        settle_on(&c, leader).await;
        for (i, m) in committed.iter().enumerate() {
            assert_eq!(m.offset, i as u64);
            assert_eq!(m.message, body(i as u64));
            assert!(mapped_under(&m.message, c.dirs[&leader].path()), "{i}");
        }
        for n in 0..NODES {
            let reader = store(&c, n);
            for i in 0..20 {
                let read = reader.read(i).unwrap().expect("live");
                assert_eq!(read, body(i), "node {n} offset {i}");
                assert!(mapped_under(&read, c.dirs[&n].path()), "node {n} offset {i}");
            }
        }
        // Both followers down: the leader writes the entry, but nothing is accepted.
        for &n in &followers {
            c.stop(n).await;
        }
        let h = c.handle(leader);
        let before = h.status().last_log.unwrap();
        let a = s.append(&[b"needs a majority"]).unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while h.status().last_log.unwrap() <= before {
            assert!(tokio::time::Instant::now() < deadline, "not in the leader's log");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!a.durable.is_durable() && !a.durable.has_failed());
        // One follower back: a majority again, and the message is accepted.
        c.start_again(followers[0]).await;
        tokio::time::timeout(WAIT, a.durable.clone().wait())
            .await
            .expect("durable once a majority has it")
            .unwrap();
        let m = a.pending.committed().await.unwrap();
        assert_eq!((m.offset, &m.message[..]), (20, &b"needs a majority"[..]));
        c.applied_everywhere(m.position.index).await;
        let back = store(&c, followers[0]).read(20).unwrap().expect("live");
        assert_eq!(back, Bytes::from_static(b"needs a majority"));
        assert!(s.failed().is_none());
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_group_floors_and_delivery_counts_are_the_same_on_every_replica() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = Cluster::start().await;
        let leader = c.leader_id().await;
        let s = store(&c, leader);
        append_all(&s, 0..40).await;
        let mut first: Vec<u64> = (0..10).collect();
        first.reverse();
        let handles = [
            s.ack(&first).unwrap(),
            s.ack_group(3, &[10, 11, 15]).unwrap(),
            s.start_group(4, 20).unwrap(),
            s.set_delivery_count(0, 15, 2).unwrap(),
            s.set_delivery_count(4, 25, 1).unwrap(),
            s.start_group(5, 30).unwrap(),
            s.drop_group(5).unwrap(),
            s.ack(&[12]).unwrap(),
        ];
        for d in handles {
            tokio::time::timeout(WAIT, d.wait())
                .await
                .expect("durable in time")
                .unwrap();
        }
        settle_on(&c, leader).await;
        c.agree("after the acks");
        for n in 0..NODES {
            let r = store(&c, n);
            let at = format!("node {n}");
            assert!((0..10).all(|o| r.is_acked(o)) && !r.is_acked(10), "{at}");
            assert!(r.is_acked(12) && r.read(12).unwrap().is_none(), "{at}");
            assert_eq!(r.read(10).unwrap().unwrap(), body(10), "{at}");
            assert!(r.group_acked(3, 11) && !r.group_acked(3, 12), "{at}");
            assert!(r.group_acked(4, 19) && !r.group_acked(4, 20), "{at}");
            assert_eq!(r.delivery_count(0, 15), 2, "{at}");
            assert_eq!(r.delivery_count(4, 25), 1, "{at}");
            assert_eq!(r.delivery_count(0, 16), 0, "{at}");
            // A dropped group is unknown again: it has nothing pending.
            assert!(r.group_acked(5, 35), "{at}");
            assert_eq!(c.machine(n).acked(5), vec![], "{at}");
        }
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_messages_come_back_after_a_full_restart_and_on_a_new_leader() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = Cluster::start().await;
        let s = store(&c, c.leader_id().await);
        let before = now_ms();
        append_all(&s, 0..30).await;
        let after = now_ms();
        let acked: Vec<u64> = vec![0, 2, 4, 6, 8, 17, 29];
        tokio::time::timeout(WAIT, s.ack(&acked).unwrap().wait())
            .await
            .expect("durable in time")
            .unwrap();
        drop(s);
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        let want: Vec<(u64, String)> = (0..30)
            .filter(|o| !acked.contains(o))
            .map(|o| (o, text(&body(o))))
            .collect();
        let live = |list: Vec<GroupMessage>| -> Vec<(u64, String)> {
            list.into_iter()
                .map(|m| (m.offset, text(&m.message)))
                .collect()
        };
        // Every host restarts: the new leader's store lists exactly the live messages.
        c.restart_all().await;
        let leader = c.leader_id().await;
        let s = store(&c, leader);
        let recovered = s.recover().await.unwrap();
        assert!(recovered
            .iter()
            .all(|m| mapped_under(&m.message, c.dirs[&leader].path())));
        // Each keeps the time it was stored at, not the time of its recovery.
        assert!(
            recovered
                .iter()
                .all(|m| (before..=after).contains(&m.stored_at_ms)),
            "stored between {before} and {after}"
        );
        assert_eq!(live(recovered), want, "after the restart");
        // More after recovery: numbered on from the log.
        let more = append_all(&s, 30..32).await;
        assert_eq!(more.iter().map(|m| m.offset).collect::<Vec<_>>(), [30, 31]);
        settle_on(&c, leader).await;
        drop(s);
        // The leader's host closes: the new leader recovers the same list.
        c.stop(leader).await;
        let next = c.leader_id().await;
        assert_ne!(next, leader);
        let mut want = want;
        want.extend((30..32).map(|o| (o, text(&body(o)))));
        let recovered = store(&c, next).recover().await.unwrap();
        assert_eq!(live(recovered), want, "on the new leader");
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_proposal_fails_the_store_accepts_nothing_more() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = Cluster::start().await;
        let leader = c.leader_id().await;
        let s = store(&c, leader);
        append_all(&s, 0..3).await;
        // No majority, then the leader's host stops: the pending message fails.
        for n in (0..NODES).filter(|&n| n != leader) {
            c.stop(n).await;
        }
        let a = s.append(&[b"never committed"]).unwrap();
        c.stop(leader).await;
        let failed = tokio::time::timeout(WAIT, a.durable.clone().wait())
            .await
            .expect("answered in time");
        assert!(failed.is_err() && a.durable.has_failed());
        assert!(a.pending.committed().await.is_err());
        assert!(s.failed().is_some(), "the store is failed for good");
        // Whatever comes next is refused at once or never durable.
        match s.ack(&[0]) {
            Err(e) => assert!(
                matches!(
                    e,
                    GroupStoreError::NotLeader { .. } | GroupStoreError::Closed { .. }
                ),
                "{e:?}"
            ),
            Ok(d) => {
                let later = tokio::time::timeout(WAIT, d.clone().wait()).await;
                assert!(matches!(later, Ok(Err(_))) && d.has_failed());
            }
        }
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_for_an_entry_is_refused_alone_and_the_store_goes_on() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = Cluster::start().await;
        let s = store(&c, c.leader_id().await);
        // Past the node log's record size (`three_hosts.rs`: 512 KiB).
        let huge = vec![b'h'; 600 << 10];
        let refused = s.append(&[&huge]).err();
        assert!(
            matches!(
                refused,
                Some(GroupStoreError::Group(GroupError::TooLarge { .. }))
            ),
            "{refused:?}"
        );
        let after = append_all(&s, 0..3).await;
        let offsets: Vec<u64> = after.iter().map(|m| m.offset).collect();
        assert_eq!(
            offsets,
            [0, 1, 2],
            "nothing was numbered for the refused one"
        );
        assert!(s.failed().is_none());
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}
