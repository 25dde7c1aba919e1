//! Issue 17 on a 3-node cluster, as a client of a follower sees it: a temporary queue
//! (request/reply through the anonymous relay), browsing and the anonymous relay work,
//! and a transaction is refused clearly (transactions are not replicated yet, so a
//! clustered node refuses the coordinator link).
//!
//! Method: the proton scripts of the single-node tests (interop.rs) run unchanged against
//! a follower's AMQP port of a loopback cluster (`Cluster::on_loopback`), which passes
//! the connection through to the leader.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster_support::Cluster;

/// Longest a fresh cluster may take to elect its first leader.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest one proton script may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `tests/broker/<script> <url> <args>` (bounded) and returns its stdout; panics
/// with its output when it fails.
fn run_script(url: &str, script: &str, args: &[&str]) -> String {
    let path = format!("{}/tests/broker/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new("python3")
        .arg(&path)
        .arg(url)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    while child.try_wait().expect("poll python3").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap python3");
            panic!(
                "{script} did not finish within {SCRIPT_TIMEOUT:?}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("python3 output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
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
