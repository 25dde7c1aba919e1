//! `entrepot-bench` against a broker it starts: the load generator's loss check passes,
//! it exits 0, and its JSON holds the figures.
//!
//! Method: start the real broker in this test process (the `entrepot` library's node, on
//! loopback ports it picks), run the real `entrepot-bench` binary with a small count (and a
//! hard timeout), then read its stdout and `--json` file. No figure is asserted against a
//! speed: only that it was measured. (The broker's `entrepot bench`, which only hands over
//! to this binary, is tested in the broker's tests/broker/bench_tool.rs.)

use std::net::SocketAddr;
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use entrepot::config::BrokerConfig;
use entrepot::server::Node;
use tokio::sync::watch;

/// Longest the in-process broker may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A broker node on loopback, on its own runtime thread; stopped (and its last syncs
/// finished) on drop.
struct Broker {
    amqp: SocketAddr,
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Broker {
    /// Starts a node on `dir`; `sink`: accept every message and drop it (`serve --sink`).
    fn start(dir: &std::path::Path, sink: bool) -> Broker {
        let config = BrokerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            http: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.to_path_buf(),
            sink,
            ..BrokerConfig::default()
        };
        let (shutdown, stop) = watch::channel(false);
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("broker runtime");
            runtime.block_on(async move {
                let node = Node::start(config, stop).await.expect("start the broker");
                tx.send(node.amqp_addr).expect("report the address");
                node.stopped().await.expect("broker stopped cleanly");
            });
        });
        let amqp = rx.recv_timeout(START_TIMEOUT).expect("broker listening");
        Broker {
            amqp,
            shutdown,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("amqp://{}", self.amqp)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn bench(broker: &Broker, json: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_entrepot-bench"))
        .args(["--url", &broker.url(), "--quiet", "--timeout", "120"])
        .arg("--json")
        .arg(json)
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run entrepot-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), stdout)
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("json file")).expect("json")
}

/// A broker on a temporary directory and where a run's JSON goes.
struct Run {
    broker: Broker,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Run {
    fn start(sink: bool) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(&dir.path().join("data"), sink);
        let path = dir.path().join("result.json");
        Run {
            broker,
            path,
            _dir: dir,
        }
    }

    fn bench(&self, extra: &[&str]) -> (bool, String) {
        bench(&self.broker, &self.path, extra)
    }

    fn json(&self) -> serde_json::Value {
        json(&self.path)
    }
}

#[test]
fn bench_sends_and_receives_every_message_and_writes_json() {
    let run = Run::start(false);
    let (ok, stdout) = run.bench(&[
        "--address",
        "bench-test",
        "--producers",
        "2",
        "--consumers",
        "2",
        "--count",
        "2000",
        "--size",
        "256",
        "--persistent",
        "--window",
        "16",
    ]);
    assert!(ok, "entrepot-bench failed");
    assert!(stdout.contains("all 2000 messages received"), "{stdout}");
    let j = run.json();
    assert_eq!(j["accepted"], 2000);
    assert_eq!(j["size"], 256);
    assert_eq!(j["persistent"], true);
    assert_eq!(j["loss"]["missing"], 0);
    assert!(matches!(
        j["loss"]["verdict"].as_str(),
        Some("exactly-once" | "at-least-once")
    ));
    assert!(j["send_msgs_per_s"].as_f64().unwrap() > 0.0);
    assert!(j["receive_msgs_per_s"].as_f64().unwrap() > 0.0);
    // send_lag: one per message sent after the warm-up, as produce_to_accepted.
    for h in ["produce_to_accepted", "send_lag", "end_to_end"] {
        assert_eq!(j[h]["count"], 2000, "{h}");
        assert!(j[h]["p99_us"].as_u64().unwrap() >= j[h]["p50_us"].as_u64().unwrap());
        assert!(j[h]["max_us"].as_u64().unwrap() >= j[h]["p999_us"].as_u64().unwrap());
    }
}

#[test]
fn bench_exits_non_zero_when_messages_are_missing() {
    // Consumers read a queue nobody sends to: every accepted message is missing.
    let run = Run::start(false);
    let (ok, stdout) = run.bench(&[
        "--address",
        "bench-sent",
        "--consumer-address",
        "bench-elsewhere",
        "--count",
        "50",
        "--drain",
        "1",
    ]);
    assert!(!ok, "a run with missing messages must fail");
    assert!(stdout.contains("MISSING: 50 of 50"), "{stdout}");
    assert_eq!(run.json()["loss"]["verdict"], "missing");
}

#[test]
fn bench_over_two_processes_merges_figures_and_the_loss_check() {
    // A topic with 3 subscribers split over 2 processes: each subscriber must see every
    // message, whichever process sent it; the merged histograms count every delivery.
    let run = Run::start(false);
    let (ok, stdout) = run.bench(&[
        "--address",
        "topic.bench-procs",
        "--producers",
        "2",
        "--topic-subscribers",
        "3",
        "--count",
        "400",
        "--size",
        "128",
        "--processes",
        "2",
    ]);
    assert!(ok, "entrepot-bench --processes 2 failed");
    assert!(
        stdout.contains("all 400 messages received by each of 3 subscribers"),
        "{stdout}"
    );
    let j = run.json();
    assert_eq!(j["processes"], 2);
    assert_eq!(
        (j["producers"].as_u64(), j["consumers"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(j["loss"]["missing"], 0);
    assert_eq!(j["produce_to_accepted"]["count"], 400);
    assert_eq!(
        j["send_lag"]["count"], 400,
        "the children's send lags are merged"
    );
    assert_eq!(j["end_to_end"]["count"], 1200);
}

#[test]
fn bench_against_a_sink_broker_is_accepted_and_not_checked() {
    // A sink broker (`serve --sink`) accepts and drops: with no consumers the run passes, says that
    // nothing was checked, and the broker's queue stays empty.
    let run = Run::start(true);
    let (ok, stdout) = run.bench(&[
        "--address",
        "bench-sink",
        "--consumers",
        "0",
        "--count",
        "300",
    ]);
    assert!(ok, "entrepot-bench against a sink failed");
    assert!(
        stdout.contains("no consumers, so nothing was checked"),
        "{stdout}"
    );
    let j = run.json();
    assert_eq!(j["accepted"], 300);
    assert_eq!(j["loss"]["verdict"], "not-checked");
    // Nothing was stored: a consumer of the same address gets nothing.
    let (ok, stdout) = bench(
        &run.broker,
        &run.path.with_file_name("after.json"),
        &[
            "--address",
            "bench-sink",
            "--consumer-address",
            "bench-sink",
            "--count",
            "1",
            "--drain",
            "1",
        ],
    );
    assert!(
        !ok,
        "a sink delivers nothing, so this run must miss its message"
    );
    assert!(stdout.contains("delivered 0"), "{stdout}");
}
