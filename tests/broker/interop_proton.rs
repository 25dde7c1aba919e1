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

use std::time::Duration;

use crate::harness::{run_proton_script, BrokerProcess};

/// Longest the script may run; it bounds its own waits at 60 s per phase.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);
const MESSAGES: &str = "1000";

#[test]
fn proton_messages_round_trip_field_and_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let stdout = run_proton_script(
        &broker,
        "proton_interop.py",
        &["proton-interop", MESSAGES],
        SCRIPT_TIMEOUT,
    );
    assert!(
        stdout.contains("ok: 1000 messages"),
        "unexpected output: {stdout}"
    );
}
