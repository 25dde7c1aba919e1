//! Propose throughput of the node-level host (`cluster/src/host/`): what one Raft group
//! commits per second, and what eight groups commit together, on three hosts in this
//! process over loopback TCP, each with its own node log on real files and a real fsync
//! per group commit (`SyncPolicy::Always`): a proposal resolves once a majority of the
//! three has it on disk and it is applied on the leader — the broker's "accepted".
//!
//! Messages are 1 KiB, one proposal each; each group's leader keeps [`IN_FLIGHT`]
//! proposals submitted and not yet committed (pipelined, as the broker's producers
//! would), and the host packs whatever is queued into one entry (`host/batch.rs`):
//! `one_group` and `eight_groups` from one submitting task per group,
//! `one_group_concurrent` from [`SUBMITTERS`] tasks on one group (many producers on one
//! address). `one_group_batched` proposes [`BATCH_MESSAGES`] messages as one payload (what
//! the broker had to do before the host batched). Groups are formed on node `g % 3`, so
//! the eight leaders spread 3/3/2.
//!
//! Besides criterion's figures it prints, per bench, the bytes each node's log wrote
//! (records with their 28-byte frames; under `Always` every one is fsync'd) per message — issue 12's
//! goal is about 1× the message plus framing — the fsyncs per message per node, and the
//! records per message (entries, plus the odd vote or purge: 1.0 without batching).
//!
//! Run: `cargo bench -p entrepot-cluster --bench host_propose` (CI runs it once, as a
//! test: `cargo test --bench host_propose`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use entrepot_cluster::{
    GroupHandle, GroupMachine, Host, HostConfig, MachineError, NodeId, Position,
};
use entrepot_storage::{LogConfig, SyncPolicy, RECORD_HEADER_LEN};
use tokio::net::TcpListener;

const NODES: u64 = 3;
const GROUPS: u64 = 8;
const MESSAGE_BYTES: usize = 1024;
/// Proposals one group's leader keeps submitted and not yet committed.
const IN_FLIGHT: usize = 64;
/// Messages per payload in `one_group_batched`.
const BATCH_MESSAGES: u64 = 16;
/// Submitting tasks on one group in `one_group_concurrent`.
const SUBMITTERS: u64 = 16;
/// Longest the cluster may take to elect every group's leader.
const WAIT: Duration = Duration::from_secs(30);

/// A machine that only counts: the bench measures the host, not a queue.
struct Count(u64);

impl GroupMachine for Count {
    fn apply(&mut self, _at: Position, _payload: Bytes) -> Result<(), MachineError> {
        self.0 += 1;
        Ok(())
    }
    fn snapshot(&self) -> Result<Bytes, MachineError> {
        Ok(Bytes::copy_from_slice(&self.0.to_le_bytes()))
    }
    fn restore(&mut self, _last_index: u64, _state: Bytes) -> Result<(), MachineError> {
        Ok(())
    }
    fn lowest_needed(&self) -> u64 {
        u64::MAX
    }
}

struct Cluster {
    hosts: BTreeMap<NodeId, Host>,
    /// Each group's leader's handle.
    leaders: BTreeMap<u64, GroupHandle>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn start() -> Cluster {
    let mut listeners = BTreeMap::new();
    for id in 0..NODES {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listeners.insert(id, l);
    }
    let addrs: BTreeMap<NodeId, String> = listeners
        .iter()
        .map(|(id, l)| (*id, l.local_addr().expect("addr").to_string()))
        .collect();
    let mut hosts = BTreeMap::new();
    let mut dirs = Vec::new();
    for (id, listener) in listeners {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let mut config = HostConfig::new(id, dir.path());
        config.log = LogConfig {
            segment_bytes: 64 << 20,
            record_bytes_max: 1 << 20,
            sync: SyncPolicy::Always,
            ..LogConfig::default()
        };
        let host = Host::start(config, listener).expect("host");
        for g in 0..GROUPS {
            host.open_group(g, Count(0)).await.expect("open group");
        }
        hosts.insert(id, host);
        dirs.push(dir);
    }
    for g in 0..GROUPS {
        let first = hosts[&(g % NODES)].group(g).expect("group");
        first.bootstrap(&addrs).await.expect("bootstrap");
    }
    let mut leaders = BTreeMap::new();
    for g in 0..GROUPS {
        let deadline = Instant::now() + WAIT;
        let leader = loop {
            let lead = hosts
                .values()
                .filter_map(|h| h.group(g))
                .find(|h| h.leadership().borrow().leads);
            if let Some(h) = lead {
                break h;
            }
            assert!(Instant::now() < deadline, "group {g}: no leader");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        leaders.insert(g, leader);
    }
    Cluster {
        hosts,
        leaders,
        _dirs: dirs,
    }
}

/// The handle of group `g` on the host that leads it, waiting up to [`WAIT`] for one.
async fn leader(hosts: &[Host], g: u64) -> GroupHandle {
    let deadline = Instant::now() + WAIT;
    loop {
        let lead = hosts
            .iter()
            .filter_map(|h| h.group(g))
            .find(|h| h.leadership().borrow().leads);
        if let Some(h) = lead {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "group {g}: no leader within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Proposes `count` messages to group `g`, [`IN_FLIGHT`] at a time.
async fn propose(hosts: Vec<Host>, g: u64, count: u64) {
    propose_entries(hosts, g, count, MESSAGE_BYTES).await
}

/// Proposes `count` entries of `bytes` each to group `g` through its leader,
/// [`IN_FLIGHT`] at a time; when leadership moves (elections on a loaded machine), the
/// rest goes to the new leader (entries whose outcome was lost are proposed again).
async fn propose_entries(hosts: Vec<Host>, g: u64, count: u64, bytes: usize) {
    propose_entries_with(hosts, g, count, bytes, IN_FLIGHT).await
}

/// [`propose_entries`] with `in_flight` proposals at a time.
async fn propose_entries_with(
    hosts: Vec<Host>,
    g: u64,
    count: u64,
    bytes: usize,
    in_flight: usize,
) {
    let payload = Bytes::from(vec![0x5a; bytes]);
    let mut committed = 0;
    'leaders: while committed < count {
        let h = leader(&hosts, g).await;
        let mut pending = VecDeque::with_capacity(in_flight);
        let mut submitted = committed;
        while committed < count {
            if pending.len() == in_flight || submitted == count {
                let p: entrepot_cluster::Proposal = match pending.pop_front() {
                    Some(p) => p,
                    None => break,
                };
                match p.await {
                    Ok(_) => committed += 1,
                    Err(e) => {
                        eprintln!("host propose: group {g}: {e}; going on with its leader");
                        continue 'leaders;
                    }
                }
                continue;
            }
            match h.submit(payload.clone()).await {
                Ok(p) => {
                    pending.push_back(p);
                    submitted += 1;
                }
                Err(e) => {
                    eprintln!("host propose: group {g}: {e}; going on with its leader");
                    continue 'leaders;
                }
            }
        }
    }
}

/// Bytes written (records with their frames), fsyncs and records of each node's log so
/// far.
fn disk(c: &Cluster) -> Vec<(u64, u64, u64)> {
    c.hosts
        .values()
        .map(|h| {
            let s = h.node_log().log().stats();
            // Payload bytes plus each record's frame header: what the log wrote.
            let frames = s.records_appended.load(Ordering::Relaxed) * RECORD_HEADER_LEN as u64;
            (
                s.bytes_appended.load(Ordering::Relaxed) + frames,
                s.syncs.load(Ordering::Relaxed),
                s.records_appended.load(Ordering::Relaxed),
            )
        })
        .collect()
}

fn report(name: &str, c: &Cluster, before: &[(u64, u64, u64)], messages: u64, wall: Duration) {
    let after = disk(c);
    let per_node: Vec<String> = before
        .iter()
        .zip(&after)
        .enumerate()
        .map(|(n, (b, a))| {
            let m = messages.max(1) as f64;
            format!(
                "node {n} {:.0} B/msg {:.3} fsync/msg {:.3} records/msg",
                (a.0 - b.0) as f64 / m,
                (a.1 - b.1) as f64 / m,
                (a.2 - b.2) as f64 / m
            )
        })
        .collect();
    println!(
        "host propose {name}: {messages} messages of {MESSAGE_BYTES} B in {wall:.2?} \
         ({:.0} msg/s); bytes fsync'd per message: {}",
        messages as f64 / wall.as_secs_f64().max(1e-9),
        per_node.join(", ")
    );
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = rt.block_on(start());
    let leaders: Vec<NodeId> = cluster
        .leaders
        .values()
        .map(|h| h.leadership().borrow().leader.unwrap_or(u64::MAX))
        .collect();
    println!("host propose: leaders of the {GROUPS} groups on nodes {leaders:?}");

    let mut group = c.benchmark_group("host_propose");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));

    group.bench_function("one_group", |b| {
        b.iter_custom(|iters| {
            let before = disk(&cluster);
            let hosts: Vec<Host> = cluster.hosts.values().cloned().collect();
            let started = Instant::now();
            rt.block_on(propose(hosts, 0, iters));
            let wall = started.elapsed();
            report("one_group", &cluster, &before, iters, wall);
            wall
        })
    });

    // Many producers on one address: SUBMITTERS tasks, each IN_FLIGHT / SUBMITTERS in
    // flight, one message per proposal; the host batches.
    group.bench_function("one_group_concurrent", |b| {
        b.iter_custom(|iters| {
            let before = disk(&cluster);
            let per_task = iters.div_ceil(SUBMITTERS);
            let started = Instant::now();
            rt.block_on(async {
                let hosts: Vec<Host> = cluster.hosts.values().cloned().collect();
                let tasks: Vec<_> = (0..SUBMITTERS)
                    .map(|_| {
                        let hosts = hosts.clone();
                        tokio::spawn(async move {
                            let each = (IN_FLIGHT as u64 / SUBMITTERS).max(1) as usize;
                            propose_entries_with(hosts, 0, per_task, MESSAGE_BYTES, each).await
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("submitter");
                }
            });
            let wall = started.elapsed();
            let messages = per_task * SUBMITTERS;
            report("one_group_concurrent", &cluster, &before, messages, wall);
            wall.mul_f64(iters as f64 / messages as f64)
        })
    });

    // Before the host batched, the broker's way for one hot address: several messages in
    // one payload (its own encoding).
    group.bench_function("one_group_batched", |b| {
        b.iter_custom(|iters| {
            let before = disk(&cluster);
            let hosts: Vec<Host> = cluster.hosts.values().cloned().collect();
            let entries = iters.div_ceil(BATCH_MESSAGES);
            let started = Instant::now();
            let bytes = BATCH_MESSAGES as usize * MESSAGE_BYTES;
            rt.block_on(propose_entries(hosts, 0, entries, bytes));
            let wall = started.elapsed();
            let messages = entries * BATCH_MESSAGES;
            report("one_group_batched", &cluster, &before, messages, wall);
            wall.mul_f64(iters as f64 / messages as f64)
        })
    });

    group.bench_function("eight_groups", |b| {
        b.iter_custom(|iters| {
            let before = disk(&cluster);
            let per_group = iters.div_ceil(GROUPS);
            let started = Instant::now();
            rt.block_on(async {
                let hosts: Vec<Host> = cluster.hosts.values().cloned().collect();
                let tasks: Vec<_> = (0..GROUPS)
                    .map(|g| tokio::spawn(propose(hosts.clone(), g, per_group)))
                    .collect();
                for t in tasks {
                    t.await.expect("proposer");
                }
            });
            let wall = started.elapsed();
            report("eight_groups", &cluster, &before, per_group * GROUPS, wall);
            // Criterion's per-iteration time: scaled to the messages it asked for.
            wall.mul_f64(iters as f64 / (per_group * GROUPS) as f64)
        })
    });
    group.finish();
    rt.block_on(async {
        for (_, h) in cluster.hosts {
            h.shutdown().await;
        }
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
