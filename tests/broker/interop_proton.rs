//! Interoperability with python-qpid-proton, the reference AMQP 1.0 implementation.
//!
//! Method: start a broker and run `proton_interop.py` against it with `python3`. The
//! script sends 1,000 messages with every property set, typed application-properties
//! (string, long, int, double, bool, binary, uuid) and varying bodies, waits for each
//! `accepted`, then receives them back on a raw receiver that reads the delivery bytes
//! itself. It checks every decoded field and that the bare message and the message
//! annotations are byte-identical to what proton encoded (the header may differ only in
//! delivery-count). proton missing is a failure, not a skip: CI installs it with
//! `pip install python-qpid-proton`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::BrokerProcess;

/// Longest the script may run; it bounds its own waits at 60 s per phase.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);
const MESSAGES: &str = "1000";

#[test]
fn proton_messages_round_trip_field_and_byte_identical() {
    require_proton();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/broker/proton_interop.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .arg(broker.url())
        .arg("proton-interop")
        .arg(MESSAGES)
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
                "proton_interop.py did not finish within {SCRIPT_TIMEOUT:?}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "proton_interop.py failed ({}):\nstdout:\n{stdout}\nstderr:\n{}\nbroker log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        broker.drain_logs().join("\n")
    );
    assert!(
        stdout.contains("ok: 1000 messages"),
        "unexpected output: {stdout}"
    );
}

/// Fails (never skips) when python3 cannot import proton.
fn require_proton() {
    let out = Command::new("python3")
        .args(["-c", "import proton, proton.handlers, proton.reactor"])
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
