//! Selectors the way real clients send them (issue 14.6): python-qpid-proton's own
//! `Selector` option (key `selector`) and the qpid-jms convention (key `jms-selector`,
//! descriptor as a code), on a queue and on a topic, matched by descriptor; the broker's
//! attach echoes the filters it applied; messages a selector passes over keep their
//! place in the queue. The checks live in `proton_selector.py` (see its docstring);
//! proton missing is a failure, not a skip.

use std::time::Duration;

use crate::harness::{run_proton_script, BrokerProcess};

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn proton_and_jms_selectors_filter_queues_and_topics_by_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let stdout = run_proton_script(
        &broker,
        "proton_selector.py",
        &["selected", "topic.selected"],
        SCRIPT_TIMEOUT,
    );
    assert!(
        stdout.contains("ok: proton Selector and jms-selector"),
        "unexpected output: {stdout}"
    );
}
