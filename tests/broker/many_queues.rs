//! Many queues cost bounded memory, and each keeps its own messages.
//!
//! Method: [`CONNECTIONS`] concurrent clients attach a sender to each of
//! `ENTREPOT_MANY_QUEUES` queues (default [`DEFAULT_QUEUES`]), send 3 messages to each
//! and detach. The broker's resident set size is then read from `/proc/<pid>/status`,
//! printed and checked against [`RSS_LIMIT_BYTES`]; a sample of queues (first, last and
//! every hundredth) is drained and must hold exactly its 3 messages in order.

use std::time::Duration;

use fe2o3_amqp::{Connection, Receiver, Sender, Session};

use crate::harness::BrokerProcess;

/// Queue count when `ENTREPOT_MANY_QUEUES` is unset.
const DEFAULT_QUEUES: usize = 10_000;
const MESSAGES_PER_QUEUE: usize = 3;
const CONNECTIONS: usize = 8;
const RSS_LIMIT_BYTES: u64 = 1 << 30;
/// Bound on filling all queues and on draining the sample.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_queues_with_three_messages_each_stay_within_bounded_memory() {
    let queues: usize = std::env::var("ENTREPOT_MANY_QUEUES")
        .ok()
        .map(|v| v.parse().expect("ENTREPOT_MANY_QUEUES must be a number"))
        .unwrap_or(DEFAULT_QUEUES);
    let dir = tempfile::tempdir().unwrap();
    // Above the default cap on auto-created addresses (10,000), which this test reaches.
    let broker = BrokerProcess::start(dir.path(), &["--max-auto-created-addresses", "100000"]);
    let rss_before = rss_bytes(broker.pid());

    let started = std::time::Instant::now();
    let mut fillers = Vec::new();
    for c in 0..CONNECTIONS {
        let url = broker.url();
        let mine: Vec<usize> = (c..queues).step_by(CONNECTIONS).collect();
        fillers.push(tokio::spawn(fill(url, c, mine)));
    }
    tokio::time::timeout(PHASE_TIMEOUT, async {
        for f in fillers {
            f.await.unwrap();
        }
    })
    .await
    .expect("filling the queues took too long");
    let fill_time = started.elapsed();

    let rss = rss_bytes(broker.pid());
    eprintln!(
        "{queues} queues x {MESSAGES_PER_QUEUE} messages: filled in {fill_time:?}; \
         broker RSS {} MiB (at start {} MiB)",
        rss >> 20,
        rss_before >> 20
    );
    assert!(
        rss < RSS_LIMIT_BYTES,
        "broker RSS {rss} bytes with {queues} queues"
    );

    let mut sample: Vec<usize> = (0..queues).step_by(100).collect();
    sample.push(queues - 1);
    tokio::time::timeout(PHASE_TIMEOUT, drain_sample(&broker, &sample))
        .await
        .expect("draining the sample took too long");
}

/// Sends 3 messages to each of `queues` over one connection, one sender per queue.
async fn fill(url: String, c: usize, queues: Vec<usize>) {
    let mut conn = Connection::open(format!("fill-{c}"), url.as_str())
        .await
        .unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    for q in queues {
        let mut sender = Sender::attach(&mut session, format!("s{q}"), queue_name(q))
            .await
            .unwrap();
        let mut outcomes = Vec::new();
        for m in 0..MESSAGES_PER_QUEUE {
            outcomes.push(sender.send_batchable(body(q, m)).await.unwrap());
        }
        for o in outcomes {
            o.await.unwrap().accepted_or_else(|o| o).unwrap();
        }
        sender.close().await.unwrap();
    }
    session.end().await.unwrap();
    conn.close().await.unwrap();
}

async fn drain_sample(broker: &BrokerProcess, sample: &[usize]) {
    let mut conn = Connection::open("sample", broker.url().as_str())
        .await
        .unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    for &q in sample {
        let mut receiver = Receiver::attach(&mut session, format!("r{q}"), queue_name(q))
            .await
            .unwrap();
        for m in 0..MESSAGES_PER_QUEUE {
            let d = receiver.recv::<String>().await.unwrap();
            assert_eq!(d.body(), &body(q, m), "queue {q}");
            receiver.accept(&d).await.unwrap();
        }
        receiver.close().await.unwrap();
    }
    session.end().await.unwrap();
    conn.close().await.unwrap();
}

fn queue_name(q: usize) -> String {
    format!("many-{q:05}")
}

fn body(q: usize, m: usize) -> String {
    format!("queue {q} message {m}")
}

/// `VmRSS` from `/proc/<pid>/status`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kb * 1024
}
