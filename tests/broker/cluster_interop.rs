//! Issue 17 on a 3-node cluster, as a client of a follower sees it: a temporary queue
//! (request/reply through the anonymous relay), browsing and the anonymous relay work,
//! and a transaction is refused clearly (transactions are not replicated yet, so a
//! clustered node refuses the coordinator link).
//!
//! Method: the proton scripts of the single-node tests (interop.rs) run unchanged against
//! a follower's AMQP port of a loopback cluster (`Cluster::on_loopback`), which passes
//! the connection through to the leader.

use std::time::Duration;

use crate::cluster_support::Cluster;

/// Longest a fresh cluster may take to elect its first leader.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest one proton script may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `tests/broker/<script> <url> <args>` (bounded) and returns its stdout.
fn run_script(url: &str, script: &str, args: &[&str]) -> String {
    crate::harness::run_proton_script_at(url, script, args, SCRIPT_TIMEOUT, String::new)
}

#[test]
fn temporary_queues_browsing_and_the_relay_work_through_a_follower_and_transactions_are_refused() {
    let mut cluster = Cluster::on_loopback(3);
    let leader = cluster.start(&[0, 1, 2], START_TIMEOUT);
    let follower = (0..3).find(|&id| id != leader).unwrap();
    cluster.wait_status(
        |id, s| id == follower && s.role == "follower" && s.leader == Some(leader),
        START_TIMEOUT,
    );
    let url = cluster.urls(&[follower]).remove(0);

    let out = run_script(&url, "proton_request_reply.py", &["requests", "5"]);
    assert!(out.trim().starts_with("ok: $tmp."), "{out}");
    let out = run_script(&url, "proton_browse.py", &["browsed"]);
    assert!(out.contains("ok: browsed 10 and 3, consumed 10"), "{out}");
    let out = run_script(
        &url,
        "proton_relay.py",
        &[
            "-",
            "-",
            "relay-a=accepted",
            "=amqp:invalid-field",
            "relay-b=accepted",
        ],
    );
    assert!(out.contains("routed 2 messages"), "{out}");
    let out = run_script(&url, "proton_tx_refused.py", &[]);
    assert!(
        out.contains(
            "ok: amqp:not-implemented: transactions are not available on a clustered node"
        ),
        "{out}"
    );
}
