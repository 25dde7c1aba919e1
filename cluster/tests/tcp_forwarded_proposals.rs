//! Goal: a replica that does not lead its group can still propose — `propose_anywhere`
//! forwards the payload to the leader over the node's peer connection (`KIND_PROPOSE`,
//! `cluster/src/forward.rs`) and answers the committed position, which the forwarder then
//! reads from its own replica; a proposal sent to a node that does not lead is refused
//! with `NotLeader` naming the leader and its address, over the wire; a payload over the
//! limit is a typed `TooLarge`; and right after the leader dies, a forwarded proposal
//! reaches the new leader.
//! Method: three `Host`s in this process over real TCP and real node logs (fsync), one
//! group; the leader is stopped with `Host::shutdown` (its port closes, as on a crash).
//! Every wait is bounded.
//! Mutation-checked: the `Connect` retry in `propose_anywhere` removed (the proposal right
//! after the leader's death fails with `GroupError::Forward`); the leader address left out
//! of the `NotLeader` reply (the assertion on the hand-sent forward fails).

mod support;

use std::time::Duration;

use entrepot_cluster::{GroupError, NodeId, TcpNetwork, MAX_PROPOSAL_BYTES};
use support::host::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_proposes_through_the_leader_and_follows_a_leader_change() {
    bounded(async {
        let g = 1;
        let mut c = Cluster::start(&[g], u64::MAX).await;
        let leader = c.leader(g).await;
        let followers: Vec<NodeId> = (0..NODES).filter(|&n| n != leader).collect();

        // From each follower: committed, and readable on the forwarder's own replica.
        for (i, &f) in followers.iter().enumerate() {
            let h = c.handle(f, g);
            let body = message(format!("from follower {f}, {i}").as_bytes());
            let at = h.propose_anywhere(body.clone()).await.unwrap();
            applied_at_least(&h, at).await;
            assert_eq!(h.read(at).unwrap(), Some(body.clone()), "node {f}");
            let on_leader = c.handle(leader, g);
            applied_at_least(&on_leader, at).await;
            assert_eq!(on_leader.read(at).unwrap(), Some(body));
        }
        // On the leader itself it is a local proposal.
        let at = c
            .handle(leader, g)
            .propose_anywhere(message(b"local"))
            .await
            .unwrap();
        assert_eq!(c.handle(leader, g).read(at).unwrap(), Some(message(b"local")));

        // Sent by hand to a follower: refused, naming the leader and its member address.
        let net = TcpNetwork::new(99).group(g);
        let f = followers[0];
        let answer = net
            .forward_proposal(f, &c.addrs[&f], b"to a follower", Duration::from_secs(4))
            .await
            .unwrap();
        assert!(
            matches!(&answer, Err(GroupError::NotLeader { leader: Some(l), leader_addr: Some(a), .. })
                if *l == leader && *a == c.addrs[&leader]),
            "{answer:?}"
        );

        // Too large: typed, nothing sent.
        let big = bytes::Bytes::from(vec![b'M'; MAX_PROPOSAL_BYTES + 1]);
        let refused = c.handle(f, g).propose_anywhere(big).await;
        assert!(matches!(refused, Err(GroupError::TooLarge { .. })), "{refused:?}");

        // The leader dies; at once, a follower's proposal goes to whoever leads next. The
        // survivor's pooled connection to the dead leader may still look open: the first
        // write on it fails (`Forward`: outcome unknown to the caller, who resends — here
        // safely, nothing reached a live leader); the resend goes to the new leader.
        c.stop(leader).await;
        let survivor = followers[1];
        let body = message(b"after the leader died");
        let h = c.handle(survivor, g);
        let at = match h.propose_anywhere(body.clone()).await {
            Err(GroupError::Forward { leader: to, .. }) if to == leader => {
                h.propose_anywhere(body.clone()).await.unwrap()
            }
            answer => answer.unwrap(),
        };
        let new_leader = c.leader(g).await;
        assert_ne!(new_leader, leader);
        for &n in &followers {
            let h = c.handle(n, g);
            applied_at_least(&h, at).await;
            assert_eq!(h.read(at).unwrap(), Some(body.clone()), "node {n}");
        }
    })
    .await
}
