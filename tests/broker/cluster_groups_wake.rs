//! Goal: in `cluster-mode: groups` with `--hibernate-groups`, the loss of a node wakes the
//! hibernated groups it led in bounded batches, and everything sleeps again afterwards
//! (issue 12: a loaded cluster of 10,000 hibernated groups collapsed when every group of
//! a slow node woke at once — benches/RESULTS.md, session 15). And a node that was
//! itself stopped does not blame its peers for its own silence.
//! Method: three `entrepot serve --hibernate-groups` processes on loopback; [`GROUPS`]
//! addresses declared through node 0 (a sender attached to each, a redirect counting as
//! placed); once every group sleeps, node 2 is SIGSTOPped for [`FROZEN`] (well past the
//! liveness timeout) while nodes 0 and 1 are polled; then SIGCONT. Asserted from
//! `/metrics`: nodes 0 and 1 found node 2 lost, took its groups from the queue, and never
//! had more than `MAX_LOST_PEER_WAKES` settling at once (the most ever seen,
//! `entrepot_groups_lost_peer_wakes_settling_max`, and every poll); node 2 found no peer
//! lost (its own lag stretched the timeout); within [`SLEEP_AGAIN`] every group sleeps
//! again on every node and no wake is queued or settling.
//! Mutation-checked: the bound lifted (`WakeQueue::new(usize::MAX)`: node 2's ~40 groups
//! settle at once, the bound assertion fails); the timeout not stretched (node 2 finds
//! both peers lost after SIGCONT and wakes their groups: in the run that checked it, the
//! three nodes then held elections whose vote requests kept timing out and the groups
//! did not sleep again within [`SLEEP_AGAIN`]).

use std::time::{Duration, Instant};

use crate::cluster::runtime;
use crate::cluster_groups::{start_groups_cluster, try_sender, wait_until, Attached};
use crate::cluster_support::Cluster;

/// Addresses declared: about a third led by node 2, well above the bound.
const GROUPS: usize = 120;
/// `MAX_LOST_PEER_WAKES` of the cluster crate (the broker does not re-export it).
const BOUND: f64 = 16.0;
/// How long node 2 stays stopped.
const FROZEN: Duration = Duration::from_secs(6);
/// Longest for every group to sleep (after the declaration, and after the freeze).
const SLEEP_AGAIN: Duration = Duration::from_secs(90);
/// Longest the declaration may take.
const DECLARE_WITHIN: Duration = Duration::from_secs(120);

fn metric(cluster: &Cluster, id: u64, series: &str) -> f64 {
    cluster.metric(id, series).unwrap_or(-1.0)
}

/// Attaches a sender to each address through node 0 (a connection each), again after a
/// pause while the attach is refused other than by a redirect (its group electing, the
/// node busy).
fn declare(cluster: &Cluster) {
    let rt = runtime();
    let at = cluster.amqp(0).to_string();
    let deadline = Instant::now() + DECLARE_WITHIN;
    rt.block_on(async {
        for i in 0..GROUPS {
            let address = format!("wake-{i}");
            loop {
                match try_sender(&at, &address).await {
                    Attached::Served(sender, mut conn, mut s) => {
                        let _ = sender.close().await;
                        let _ = s.end().await;
                        let _ = conn.close().await;
                        break;
                    }
                    Attached::Redirected(..) => break,
                    Attached::Refused(why) => {
                        assert!(Instant::now() < deadline, "{address} not declared: {why}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    });
}

/// Every node has opened every group and runs none but the metadata group.
fn all_asleep(cluster: &Cluster) -> bool {
    (0..3).all(|id| {
        metric(cluster, id, "entrepot_groups_open") >= GROUPS as f64
            && metric(cluster, id, "entrepot_groups_running") <= 1.0
            && metric(cluster, id, "entrepot_groups_lost_peer_wakes_queued") == 0.0
            && metric(cluster, id, "entrepot_groups_lost_peer_wakes_settling") == 0.0
    })
}

#[test]
fn a_frozen_nodes_groups_wake_in_bounded_batches_and_sleep_again() {
    let mut cluster = start_groups_cluster(3, &["--hibernate-groups"], Duration::from_secs(30));
    declare(&cluster);
    wait_until(
        "every group asleep after the declaration",
        SLEEP_AGAIN,
        || all_asleep(&cluster),
    );
    let led_by_2 = metric(&cluster, 2, "entrepot_groups_led");
    assert!(
        led_by_2 > BOUND,
        "node 2 leads {led_by_2} groups, more than the bound"
    );

    cluster.freeze(2, true);
    let frozen_at = Instant::now();
    let mut most = [0.0f64; 2];
    while frozen_at.elapsed() < FROZEN {
        for id in 0..2 {
            let now = metric(&cluster, id, "entrepot_groups_lost_peer_wakes_settling");
            most[id as usize] = most[id as usize].max(now);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.freeze(2, false);

    for id in 0..2u64 {
        let lost = metric(&cluster, id, "entrepot_cluster_peers_lost_total");
        let started = metric(&cluster, id, "entrepot_groups_lost_peer_wakes_total");
        let max = metric(&cluster, id, "entrepot_groups_lost_peer_wakes_settling_max");
        eprintln!(
            "node {id}: peers lost {lost}, groups of node 2 taken {started}, settling at \
             most {max} (polled {})",
            most[id as usize]
        );
        assert!(lost >= 1.0, "node {id} found node 2 lost");
        assert!(started >= 1.0, "node {id} woke node 2's groups");
        assert!(
            (1.0..=BOUND).contains(&max),
            "node {id}: {max} settling at once"
        );
        assert!(most[id as usize] <= BOUND, "node {id}: {most:?} polled");
    }
    wait_until("every group asleep again", SLEEP_AGAIN, || {
        all_asleep(&cluster)
    });
    let blamed = metric(&cluster, 2, "entrepot_cluster_peers_lost_total");
    assert_eq!(blamed, 0.0, "node 2 blamed its peers for its own stop");
    for id in 0..3 {
        assert!(
            metric(&cluster, id, "entrepot_groups_lost_peer_wakes_settling_max") <= BOUND,
            "node {id}"
        );
    }
    cluster.kill(2);
}
