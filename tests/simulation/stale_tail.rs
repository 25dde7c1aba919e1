//! Goal: a leader cuts the uncommitted tail of its store even when no message was ever
//! committed — otherwise its next message gets an offset the followers cannot apply.
//!
//! Method (one scripted schedule on the simulated cluster, no randomness in the faults):
//! the first leader is isolated and writes three messages that never commit; another node
//! takes over and the partition heals, so the old leader's Raft log loses those entries
//! but its store keeps the three records (no committed message arrives to cut them). The
//! old leader is then elected again and writes one message, which must commit at offset 0
//! on every node, with every node still running.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cluster::Cluster;
use crate::fabric::Fabric;
use crate::rng::Rng;
use crate::workload::{message_of, ADDRESS};

#[test]
fn a_new_leader_cuts_a_stale_tail_even_before_any_message_committed() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(scenario());
}

async fn wait_for_leader(cluster: &Cluster, not: Option<u64>) -> u64 {
    for _ in 0..500 {
        if let Some(l) = cluster.leaders().iter().find(|l| Some(l.node) != not) {
            return l.node;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no leader other than {not:?} within 10 s");
}

async fn scenario() {
    crate::start_clock();
    entrepot_cluster::runtime::seed_thread_rng(0);
    let dir = tempfile::tempdir().expect("temporary directory");
    let fabric = Fabric::new(Rng::new(7));
    let cluster = Cluster::form(3, dir.path(), fabric.clone()).await;
    let old = wait_for_leader(&cluster, None).await;

    // The old leader, cut off, stores three messages that will never commit.
    fabric.partition(
        cluster
            .ids
            .iter()
            .map(|id| (*id, u8::from(*id == old)))
            .collect(),
    );
    let stale = cluster
        .leaders()
        .into_iter()
        .find(|l| l.node == old)
        .expect("old leader");
    for i in 0..3 {
        stale
            .store
            .append(ADDRESS, &[format!("stale {i}").as_bytes()])
            .expect("append");
    }
    drop(stale);
    let new = wait_for_leader(&cluster, Some(old)).await;
    fabric.partition(BTreeMap::new());
    let converged = cluster.converge(Duration::from_secs(30)).await;
    assert_eq!(
        converged,
        Ok(new),
        "the new leader keeps leading after the heal"
    );
    let (old_log, _) = cluster.machine(old).expect("up").logs();
    assert_eq!(
        old_log.next_offset(),
        3,
        "precondition: the old leader's store kept its tail"
    );

    // Elect the old leader again and write through it.
    let mut leader = None;
    for _ in 0..20 {
        let raft = cluster.raft(old).expect("up");
        raft.trigger().elect().await.expect("elect");
        tokio::time::sleep(Duration::from_secs(1)).await;
        leader = cluster.leaders().into_iter().find(|l| l.node == old);
        if leader.is_some() {
            break;
        }
    }
    let leader = leader.expect("the old leader is elected again");
    let (appended, offset, _, _) = leader.store.append(ADDRESS, &[b"fresh"]).expect("append");
    let committed = tokio::time::timeout(Duration::from_secs(10), appended.durable.wait()).await;
    assert!(matches!(committed, Ok(Ok(()))), "the fresh message commits");
    drop(leader);
    let converged = cluster.converge(Duration::from_secs(30)).await;
    assert_eq!(converged, Ok(old), "every node applies the fresh message");
    assert_eq!(
        offset, 0,
        "the fresh message takes the first committed offset"
    );
    for id in cluster.ids.clone() {
        let (log, _) = cluster.machine(id).expect("up").logs();
        let first = log.read(0).expect("offset 0");
        assert_eq!(message_of(&first.payload), Some(&b"fresh"[..]), "node {id}");
    }
    cluster.shutdown().await;
}
