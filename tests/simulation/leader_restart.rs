//! Goal: a leader that restarts without losing its term (openraft restores it as leader at
//! once) never hands out offsets that entries of its previous incarnation still hold.
//!
//! Method (scripted, on the simulated cluster): the leader, cut off, stores two messages
//! (`A`): their entry is in its own Raft log only. It crashes and restarts at once —
//! before its followers' election timeout — and the network heals, with appends that
//! carry entries slowed down, so `A` commits only after the broker is active again.
//! openraft confirms a restored leadership against the *first* entry of the term, not the
//! last, so activation does not wait for `A`. The broker then writes three messages (`B`)
//! and, once `A` is applied, one more (`C`). Every acknowledged message must be on every
//! node at the offset its producer was told, and no node may stop. The delays are chosen
//! so the outcome does not depend on openraft's election timeouts: every run fails the
//! same way on network seed 1 while the bug is there.

use std::sync::Arc;
use std::time::Duration;

use entrepot_storage::Durable;

use crate::cluster::Cluster;
use crate::fabric::Fabric;
use crate::node::Leader;
use crate::rng::Rng;
use crate::workload::{message_of, ADDRESS};

/// Network seeds tried (the restarted node must win its term back on at least one).
const NETWORK_SEEDS: u64 = 4;
/// After the restart: extra delay of appends that carry entries, each way.
const ENTRIES_DELAY: Duration = Duration::from_millis(20);
/// After the restart: extra delay of everything to and from the follower holding A.
const F1_DELAY: Duration = Duration::from_millis(10);

#[test]
fn a_leader_restarted_in_its_term_keeps_its_acknowledged_offsets() {
    let mut restored = 0;
    for seed in 1..=NETWORK_SEEDS {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        match runtime.block_on(scenario(seed)) {
            Ok(same_term) => restored += u32::from(same_term),
            Err(e) => panic!("network seed {seed}: {e}"),
        }
    }
    assert!(
        restored > 0,
        "precondition: the restarted node never led its term again"
    );
}

async fn leader(cluster: &Cluster) -> Arc<Leader> {
    for _ in 0..500 {
        if let Some(l) = cluster.leaders().into_iter().next() {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no active leader within 10 s");
}

/// Appends `n` messages named `tag`; returns (offset, body, commit handle) of each.
fn append(leader: &Leader, tag: &str, n: usize) -> Vec<(u64, Vec<u8>, Durable)> {
    (0..n)
        .map(|i| {
            let body = format!("{tag} {i}").into_bytes();
            let (appended, offset, _, _) = leader.store.append(ADDRESS, &[&body]).expect("append");
            (offset, body, appended.durable)
        })
        .collect()
}

/// Runs the scenario; `Ok(false)` when the restarted node did not lead its term again
/// (another node won an election first), so nothing was tested.
async fn scenario(seed: u64) -> Result<bool, String> {
    crate::start_clock();
    entrepot_cluster::runtime::seed_thread_rng(0);
    let dir = tempfile::tempdir().expect("temporary directory");
    let fabric = Fabric::new(Rng::new(seed));
    let cluster = Cluster::form(3, dir.path(), fabric.clone()).await;
    let first = leader(&cluster).await;
    let id = first.node;
    for (_, _, d) in append(&first, "before", 3) {
        d.wait()
            .await
            .map_err(|e| format!("a healthy cluster commits: {e}"))?;
    }

    // A reaches one follower (`f1`) only, and the leader never hears that it did.
    let (f1, f2) = ((id + 1) % 3, (id + 2) % 3);
    fabric.partition([(f2, 1)].into_iter().collect());
    fabric.set_deaf(Some(id));
    let a = append(&first, "A", 2);
    drop(first);
    // Long enough for the stream to time out a lost reply and resend, short of an election.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let raft = cluster.raft(id).expect("up");
    let term = raft.metrics().borrow().current_term;
    let last = raft.metrics().borrow().last_log_index;
    let stored = |n: u64| {
        cluster
            .raft(n)
            .expect("up")
            .metrics()
            .borrow()
            .last_log_index
    };
    if stored(f1) != last || stored(f2) >= last {
        return Err(format!(
            "precondition: A's entry on the leader and {f1} only (logs end at {last:?}, {:?}, {:?})",
            stored(f1),
            stored(f2)
        ));
    }
    cluster.crash(id).await;
    fabric.heal();
    fabric.set_deaf(None);
    // After the restart: `f2` confirms the leadership quickly but receives entries slowly;
    // `f1`, which holds A, answers slowly — so A commits after the broker is active and
    // before B does.
    fabric.set_slow(f1, F1_DELAY);
    fabric.set_entries_delay(ENTRIES_DELAY);
    cluster.restart(id).await?;

    // Write the moment the broker is active, as a waiting producer would.
    let mut watch = cluster.leader_watch(id).expect("up");
    let active =
        tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|l| l.is_some())).await;
    let again = match active {
        Ok(Ok(l)) => l.clone().expect("active"),
        _ => {
            cluster.shutdown().await;
            return Ok(false);
        }
    };
    let same_term = cluster
        .raft(id)
        .expect("up")
        .metrics()
        .borrow()
        .current_term
        == term;
    let a_end = a.last().map_or(0, |x| x.0 + 1);
    let machine = cluster.machine(id).expect("up");
    let b = append(&again, "B", 3);
    for _ in 0..300 {
        if machine.applied_message_end() >= Some(a_end) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let c = append(&again, "C", 1);
    drop(again);
    fabric.set_entries_delay(Duration::ZERO);
    fabric.set_slow(f1, Duration::ZERO);
    let mut acknowledged = Vec::new();
    for (offset, body, durable) in b.into_iter().chain(c) {
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(10), durable.wait()).await {
            acknowledged.push((offset, body));
        }
    }
    crate::sim_trace!(
        "same term {same_term}, acknowledged {:?}",
        acknowledged
            .iter()
            .map(|x| (x.0, String::from_utf8_lossy(&x.1).into_owned()))
            .collect::<Vec<_>>()
    );
    let converged = cluster.converge(Duration::from_secs(30)).await;
    let result = check(&cluster, converged, &acknowledged);
    cluster.shutdown().await;
    result.map(|()| same_term)
}

fn check(
    cluster: &Cluster,
    converged: Result<u64, String>,
    acknowledged: &[(u64, Vec<u8>)],
) -> Result<(), String> {
    converged.map_err(|e| format!("the cluster does not converge: {e}"))?;
    for node in cluster.ids.clone() {
        let (log, _) = cluster.machine(node).expect("up").logs();
        for (offset, body) in acknowledged {
            let record = log.read(*offset).ok();
            let held = record.as_ref().and_then(|r| message_of(&r.payload));
            if held != Some(&body[..]) {
                return Err(format!(
                    "node {node}: acknowledged {:?} at offset {offset} holds {:?}",
                    String::from_utf8_lossy(body),
                    held.map(String::from_utf8_lossy)
                ));
            }
        }
    }
    Ok(())
}
