//! Cluster system tests on loopback: three (or five) real `entrepot serve` processes, a
//! reconnecting producer with many unsettled transfers in flight, and the oracle "every
//! accepted message is consumed" (see `cluster_support`).
//!
//! * the leader is SIGKILLed under load: a survivor leads within a second, producers
//!   resume, nothing accepted is lost;
//! * all three nodes are SIGKILLed and restarted: everything accepted is still there;
//! * two nodes are added and two original ones (the leader among them) removed while the
//!   producer runs: nothing accepted is lost.

use std::time::{Duration, Instant};

use crate::cluster_support::{assert_none_lost, drain, Cluster, Load, LoadConfig};

/// Longest a fresh cluster may take to elect its first leader.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on each load phase and on each drain.
const PHASE_TIMEOUT: Duration = Duration::from_secs(40);
/// The bar: a new leader serves within this long after the old one is killed.
const NEW_LEADER_MAX: Duration = Duration::from_secs(1);

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn load(cluster: &Cluster, queue: &str, via: &[u64], messages: u64) -> LoadConfig {
    LoadConfig {
        queue: queue.into(),
        urls: cluster.urls(via),
        seqs: 0..messages,
        producers: 2,
        in_flight: 200,
    }
}

#[test]
fn leader_sigkill_under_load() {
    let rt = runtime();
    let mut cluster = Cluster::on_loopback(3);
    let leader = cluster.start(&[0, 1, 2], START_TIMEOUT);
    let load = Load::start(&rt, load(&cluster, "failover", &[0, 1, 2], 4_000));
    load.wait_accepted(1_000, PHASE_TIMEOUT);

    let killed = Instant::now();
    cluster.kill(leader);
    // Elected (Raft state Leader), then serving (broker active: role leader).
    cluster.wait_status(|_, s| s.state == "Leader", Duration::from_secs(10));
    let to_elected = killed.elapsed();
    let new_leader = cluster.wait_leader(|id| id != leader, Duration::from_secs(10));
    let to_new_leader = killed.elapsed();
    let deadline = Instant::now() + PHASE_TIMEOUT;
    let first_acceptance = loop {
        if let Some(at) = load.first_acceptance_after(killed) {
            break at - killed;
        }
        assert!(Instant::now() < deadline, "no acceptance after the kill");
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "leader {leader} SIGKILLed: a survivor elected after {to_elected:?}, node {new_leader} \
         serves after {to_new_leader:?}, first acceptance after the kill at {first_acceptance:?}"
    );

    let accepted = load.finish(&rt, PHASE_TIMEOUT);
    let url = &cluster.urls(&[new_leader])[0];
    let received = rt.block_on(drain(url, "failover", &accepted.seqs, PHASE_TIMEOUT));
    assert_none_lost(&accepted, &received);
    assert!(
        to_new_leader <= NEW_LEADER_MAX,
        "a new leader served only {to_new_leader:?} after the kill (bar: {NEW_LEADER_MAX:?})"
    );
}

#[test]
fn restart_all_nodes_keeps_everything() {
    let rt = runtime();
    let mut cluster = Cluster::on_loopback(3);
    cluster.start(&[0, 1, 2], START_TIMEOUT);
    let load = Load::start(&rt, load(&cluster, "restart", &[0, 1, 2], 2_000));
    let accepted = load.finish(&rt, PHASE_TIMEOUT);

    for id in [0, 1, 2] {
        cluster.kill(id);
    }
    for id in [0, 1, 2] {
        cluster.restart(id);
    }
    let leader = cluster.wait_leader(|_| true, START_TIMEOUT);
    // Through a follower when there is one: the forwarding path as well.
    let via = (leader + 1) % 3;
    let url = &cluster.urls(&[via])[0];
    let received = rt.block_on(drain(url, "restart", &accepted.seqs, PHASE_TIMEOUT));
    assert_none_lost(&accepted, &received);
}

#[test]
fn add_two_remove_two_under_load() {
    let rt = runtime();
    let mut cluster = Cluster::on_loopback(5);
    let leader = cluster.start(&[0, 1, 2], START_TIMEOUT);
    let load = Load::start(&rt, load(&cluster, "membership", &[0, 1, 2, 3, 4], 6_000));
    load.wait_accepted(500, PHASE_TIMEOUT);

    for id in [3, 4] {
        cluster.start_node(id, &[0, 1, 2]);
        cluster.add(id);
    }
    // The leader and one other original node go; a follower is removed first so the
    // leader commits that change before it removes itself.
    let other = [0, 1, 2].into_iter().find(|&id| id != leader).unwrap_or(0);
    let keep = [0, 1, 2]
        .into_iter()
        .find(|&id| id != leader && id != other)
        .unwrap_or(0);
    cluster.remove(other);
    cluster.remove(leader);
    let removed_at = load.accepted_count();
    for id in [other, leader] {
        cluster.kill(id);
    }
    let leader = cluster.wait_leader(|_| true, Duration::from_secs(10));
    let voters = cluster.status(leader).map(|s| s.voters).unwrap_or_default();
    let mut expected = vec![keep, 3, 4];
    expected.sort_unstable();
    assert_eq!(voters, expected, "voters after the changes");

    let accepted = load.finish(&rt, PHASE_TIMEOUT);
    eprintln!(
        "{removed_at} accepted when the removals were done, {} in the end",
        accepted.seqs.len()
    );
    assert!(
        accepted.seqs.len() > removed_at,
        "the producer was done before the membership changes: not under load"
    );
    let url = &cluster.urls(&[leader])[0];
    let received = rt.block_on(drain(url, "membership", &accepted.seqs, PHASE_TIMEOUT));
    assert_none_lost(&accepted, &received);
}
