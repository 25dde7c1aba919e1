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

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::BrokerProcess;

/// Longest the script may run; each of its waits is bounded by 10 s.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
const TOPIC: &str = "topic.proton";

#[test]
fn proton_durable_subscriber_resumes_after_detach_and_close_deletes_it() {
    require_proton();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/broker/proton_durable.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .arg(broker.url())
        .arg(TOPIC)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "proton_durable.py did not finish within {SCRIPT_TIMEOUT:?}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "proton_durable.py failed ({}):\nstdout:\n{stdout}\nstderr:\n{}\nbroker log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        broker.drain_logs().join("\n")
    );
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

/// Fails (never skips) when python3 cannot import proton.
fn require_proton() {
    let out = Command::new("python3")
        .args([
            "-c",
            "import proton, proton.handlers, proton.reactor, proton.utils",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 cannot import proton; install it with `pip install python-qpid-proton`:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("python3 is not runnable ({e}); it and python-qpid-proton are required"),
    }
}
