//! A python-qpid-proton durable topic subscriber keeps its subscription across a detach
//! and loses it on close.
//!
//! Method: start a broker and run `proton_durable.py` against it with `python3`. The
//! script subscribes to `topic.proton` with a fixed container-id and link name, a durable
//! source (unsettled-state, expiry-policy never) and the `topic` capability; receives five
//! messages, accepts four, DETACHES the link (closed=false) and disconnects; publishes ten
//! more; reconnects and reattaches — the unaccepted one comes back first, then the ten in
//! order, and nothing else. Then it CLOSES the link, publishes five more and reattaches:
//! nothing old arrives, only what is published afterwards. Here we check the script's
//! verdict and that no subscription is left behind. proton missing is a failure, not a
//! skip (CI installs it with `pip install python-qpid-proton`).

use std::time::Duration;

use crate::harness::{run_proton_script, BrokerProcess};

/// Longest the script may run; each of its waits is bounded by 10 s.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
const TOPIC: &str = "topic.proton";

#[test]
fn proton_durable_subscriber_resumes_after_detach_and_close_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let stdout = run_proton_script(&broker, "proton_durable.py", &[TOPIC], SCRIPT_TIMEOUT);
    assert!(
        stdout.contains("ok: detach kept 11 messages in order"),
        "unexpected output: {stdout}"
    );
    // The script closed its last link too, so the topic has no subscription left.
    let (_, metrics) = broker.http_get("/metrics");
    let left: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("entrepot_subscription_consumers{"))
        .collect();
    assert!(left.is_empty(), "subscriptions left behind: {left:?}");
}
