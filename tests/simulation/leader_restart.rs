//! Goal: a leader that restarts without losing its term (openraft restores it as leader at
//! once) never hands out offsets that entries of its previous incarnation still hold.
//!
//! Method (scripted, on the simulated cluster): the leader stops hearing replies, so its
//! followers store its next two messages (`A`) while it never learns they are committed;
//! it crashes and restarts at once, still leader of the same term. openraft confirms such a
//! leadership against the *first* entry of the term, not the last, so the broker may
//! activate before `A` is applied and cut `A`'s records from its store. It then writes
//! three messages (`B`); `A` commits and is applied under it; it writes one more (`C`).
//! Every acknowledged message must be on every node at the offset its producer was told,
//! and no node may stop. Whether the activation wins the race against `A`'s commit
//! depends on the network's delays, so the scenario runs over a few network seeds and
//! requires that the race happened at least once.

use std::sync::Arc;
use std::time::Duration;

use entrepot_storage::Durable;

use crate::cluster::Cluster;
use crate::fabric::Fabric;
use crate::node::Leader;
use crate::rng::Rng;
use crate::workload::{message_of, ADDRESS};

/// Network seeds tried; the race is won on some of them.
const NETWORK_SEEDS: u64 = 8;

#[test]
#[ignore = "fails: activation after a same-term restart cuts entries not yet applied (see the module docs); run with --run-ignored once fixed"]
fn a_leader_restarted_in_its_term_keeps_its_acknowledged_offsets() {
    let mut raced = 0;
    for seed in 1..=NETWORK_SEEDS {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        if let Err(e) = runtime.block_on(scenario(seed)) {
            panic!("network seed {seed}: {e}");
        }
        raced += u32::from(runtime.block_on(async { RACED.with(|r| r.get()) }));
    }
    assert!(
        raced > 0,
        "precondition: the activation never cut an entry not yet applied"
    );
}

thread_local! {
    static RACED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

async fn leader(cluster: &Cluster) -> Arc<Leader> {
    // Any node: the cluster just formed.
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

async fn scenario(seed: u64) -> Result<(), String> {
    RACED.with(|r| r.set(false));
    crate::start_clock();
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

    fabric.set_deaf(Some(id));
    let a = append(&first, "A", 2);
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let last = cluster
        .raft(id)
        .expect("up")
        .metrics()
        .borrow()
        .last_log_index;
    for f in cluster.ids.iter().filter(|f| **f != id) {
        let theirs = cluster
            .raft(*f)
            .expect("up")
            .metrics()
            .borrow()
            .last_log_index;
        if theirs != last {
            return Err(format!("precondition: follower {f} did not store A"));
        }
    }
    cluster.crash(id).await;
    fabric.set_deaf(None);
    // Replies race: the leadership check may finish before A's commit is learnt.
    fabric.set_delay(1, 200);
    cluster.restart(id).await?;

    // Write the moment the broker is active, as a waiting producer would.
    let mut watch = cluster.leader_watch(id).expect("up");
    let active =
        tokio::time::timeout(Duration::from_secs(10), watch.wait_for(|l| l.is_some())).await;
    let again = match active {
        Ok(Ok(l)) => l.clone().expect("active"),
        _ => {
            // Another node won an election first: no same-term restart on this seed.
            cluster.shutdown().await;
            return Ok(());
        }
    };
    let a_end = a.last().map(|x| x.0 + 1).unwrap_or(0);
    let machine = cluster.machine(id).expect("up");
    let b = append(&again, "B", 3);
    let cut = b.first().is_some_and(|x| x.0 < a_end);
    RACED.with(|r| r.set(cut));
    for _ in 0..100 {
        if machine.applied_message_end() >= Some(a_end) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let c = append(&again, "C", 1);
    drop(again);
    let mut acknowledged = Vec::new();
    for (offset, body, durable) in b.into_iter().chain(c) {
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(10), durable.wait()).await {
            acknowledged.push((offset, body));
        }
    }
    crate::sim_trace!(
        "raced {cut}, acknowledged {:?}",
        acknowledged
            .iter()
            .map(|x| (x.0, String::from_utf8_lossy(&x.1).into_owned()))
            .collect::<Vec<_>>()
    );
    let converged = cluster.converge(Duration::from_secs(30)).await;
    let result = check(&cluster, converged, &acknowledged);
    cluster.shutdown().await;
    result
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
