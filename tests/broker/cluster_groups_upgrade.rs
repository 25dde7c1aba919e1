//! Goal: a groups-mode cluster upgraded one node at a time never writes group 0's level-2
//! formats while a member cannot follow them (`metadata_level.rs`), seen from outside:
//! with node 2 started `--metadata-level-max 1` (standing in for a build from before
//! session 19), every node's `/status` shows the finalized metadata level 1 and no group
//! formed while producers and consumers are served through the three nodes; node 2
//! restarted without the flag (upgraded), the level turns 2 on every node and every
//! address group is marked formed, and new addresses are served; a fourth node
//! started `--metadata-level-max 1 --auto-join` is refused as a member, logging the
//! refusal naming both levels, and no member lists it.
//! Method: four `entrepot serve --cluster-mode groups` processes on loopback
//! (`cluster_support::Cluster`; the fourth not in the others' `--peers`), fe2o3 clients
//! following redirects, every node's `/status` (`metadata-level:` and the `formed:` of
//! each `groups-here` line). Every wait is bounded.
//! Mutation-checked (session 20): the flag ignored (node 2 ran level 2: `finalized: 2`
//! at the first check, 6 runs of 6), the level controller taking its own level for the
//! effective one and the opener marking below level 2 (the first check fails), the
//! joiner's own level check removed (no refusal logged: the wait times out). An attach
//! refused right after the start (once in eleven runs, at level 2, reason not kept) is
//! tried again, bounded.

use std::time::Duration;

use crate::cluster::runtime;
use crate::cluster_groups::{
    send, take, try_receiver, try_sender, wait_until, Attached, READY_TIMEOUT,
};
use crate::cluster_support::Cluster;

/// Addresses served while node 2 runs level 1, and declared after its upgrade.
const BEFORE: [&str; 3] = ["u-a", "u-b", "u-c"];
const AFTER: [&str; 2] = ["v-a", "v-b"];
/// Messages sent to (and received from) each address.
const MESSAGES: u32 = 5;
/// How long the cluster is watched holding level 1 (several level polls, 1 s apart).
const HELD_FOR: Duration = Duration::from_secs(4);
/// Longest the level may take to rise and every group to be marked after the upgrade.
const RISE_WITHIN: Duration = Duration::from_secs(30);
/// Longest the refused joiner may take to log its refusal.
const REFUSAL_WITHIN: Duration = Duration::from_secs(30);

/// Node `id`'s `metadata-level:` line and its address groups' `formed:` values.
fn level_view(c: &Cluster, id: u64) -> Option<(String, Vec<bool>)> {
    let (_, body) = c.get(id, "/status")?;
    let level = body
        .lines()
        .find(|l| l.trim_start().starts_with("metadata-level: "))?
        .trim()
        .to_owned();
    let formed = body
        .lines()
        .filter(|l| l.trim_start().starts_with("- { group: ") && !l.contains("group: 0,"))
        .map(|l| l.contains("formed: true"))
        .collect();
    Some((level, formed))
}

fn finalized(view: &(String, Vec<bool>), level: u8) -> bool {
    view.0.contains(&format!("finalized: {level},"))
}

/// Most attaches (redirects followed, or refusals tried again) for one link.
const ATTACH_TRIES: u32 = 20;
/// Pause before an attach refused (not redirected) is tried again.
const ATTACH_PAUSE: Duration = Duration::from_millis(200);

/// Like `cluster_groups::follow!`, but a refused attach (a group declared a moment ago
/// may still be electing its first leader) is tried again from the start, at most
/// [`ATTACH_TRIES`] attaches in all; `(link, connection, session)`.
macro_rules! attach {
    ($try:ident, $start:expr, $address:expr) => {{
        let start: String = $start;
        let address: &str = $address;
        let mut at = start.clone();
        let mut tries = 0;
        loop {
            tries += 1;
            assert!(
                tries <= ATTACH_TRIES,
                "{address}: {ATTACH_TRIES} attaches, last at {at}"
            );
            match $try(&at, address).await {
                Attached::Served(l, c, s) => break (l, c, s),
                Attached::Redirected(to, a) => {
                    assert_eq!(a, address, "the redirect names the address");
                    at = to;
                }
                Attached::Refused(why) => {
                    println!("attach {address} at {at} refused, tried again: {why}");
                    tokio::time::sleep(ATTACH_PAUSE).await;
                    at = start.clone();
                }
            }
        }
    }};
}

/// Declares each of `addresses` by attaching through node 0 (following redirects), sends
/// [`MESSAGES`] to it and receives them in order.
fn serve(c: &Cluster, addresses: &[&str]) {
    let rt = runtime();
    for &address in addresses {
        let start = c.amqp(0).to_string();
        rt.block_on(async {
            let (mut sender, _c, _s) = attach!(try_sender, start.clone(), address);
            send(&mut sender, 0, MESSAGES).await;
            let (mut receiver, _rc, _rs) = attach!(try_receiver, start, address);
            for i in 0..MESSAGES {
                take(&mut receiver, i).await;
            }
        });
    }
}

#[test]
fn a_level_1_node_holds_a_groups_cluster_below_level_2_until_it_is_upgraded() {
    let mut c = Cluster::on_loopback(4);
    c.serve_args(&["--cluster-mode", "groups", "--sync", "always"]);
    c.node_args(2, &["--metadata-level-max", "1"]);
    let members = [0, 1, 2];
    for id in members {
        c.start_node(id, &members);
    }
    wait_until("every node ready", READY_TIMEOUT, || {
        members.iter().all(|&id| c.readyz(id) == Some(200))
    });
    serve(&c, &BEFORE);
    std::thread::sleep(HELD_FOR);
    for id in members {
        let view = level_view(&c, id).expect("status");
        println!("node {id} at level 1: {view:?}");
        assert!(finalized(&view, 1), "node {id}: {view:?}");
        assert!(!view.1.is_empty(), "node {id} hosts address groups");
        assert!(
            view.1.iter().all(|f| !f),
            "node {id}: a group formed: {view:?}"
        );
    }
    // Upgraded: node 2 restarted at the build's level.
    c.terminate(2);
    c.node_args(2, &[]);
    c.restart(2);
    wait_until("level 2 and every group formed", RISE_WITHIN, || {
        members.iter().all(|&id| {
            level_view(&c, id).is_some_and(|v| finalized(&v, 2) && v.1.iter().all(|f| *f))
        })
    });
    wait_until("node 2 ready again", READY_TIMEOUT, || {
        c.readyz(2) == Some(200)
    });
    serve(&c, &AFTER);
    // A level-1 node asking to join is refused, naming both levels.
    c.node_args(3, &["--metadata-level-max", "1"]);
    c.start_joining(3, &members);
    c.wait_log(
        3,
        "supports metadata level 1, below the cluster's finalized level 2",
        1,
        REFUSAL_WITHIN,
    );
    for id in members {
        let (_, body) = c.get(id, "/status").expect("status");
        let line = body
            .lines()
            .find(|l| l.trim_start().starts_with("members: "))
            .expect("members line");
        assert!(line.contains("[0, 1, 2]"), "node {id}: {line}");
    }
}
