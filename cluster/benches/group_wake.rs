//! What it costs to *stop* an idle Raft group and start it again when it is needed — the
//! measurement behind issue 12's quiescing design (ARCHITECTURE.md, "Where the cluster
//! goes next", step 5). `idle_groups.rs` showed that openraft 0.9's runtime switches leave
//! each instance's tick task waking every 60 ms (5 % of a core per 1,000 replicas), so an
//! idle group must stop its instance; this bench measures whether that is affordable:
//! * what a stopped group still costs: resident memory per replica while every instance is
//!   shut down and only the node logs (`NodeLog`, one per node) keep the groups' state;
//! * idle CPU with every group stopped;
//! * the *wake*: a stopped group's three instances start again over their node logs (the
//!   state read back from the shared log), the replica that led before campaigns at once
//!   (`trigger().elect()`, as a wake on a write or on a peer's message would), and one
//!   entry commits. Wake latency = from the first `Raft::new` to that commit, per group,
//!   one group at a time: what a client writing to a hibernated address waits.
//!
//! Everything in this process: three "nodes", each a `NodeLog` in a temporary directory
//! (real files, real fsync under `SyncPolicy::Always`), openraft 0.9 instances with the
//! cluster tests' minimal state machine, talking through the tests' in-process network
//! (`tests/support/router.rs`: no sockets, so the wake latency is a lower bound of the
//! TCP one by the RPC round trips of one election and one append, ~4 loopback RTTs).
//! The state machine restarts empty and openraft re-applies the group's log on start, as
//! a broker's would from its last snapshot.
//!
//! Prints one line per figure and a closing `group wake: …` line. Bounded: formation and
//! every wake wait at most `WAIT`.
//!
//! Run: `WAKE_GROUPS=300 WAKE_SAMPLE=100 cargo bench -p entrepot-cluster --bench group_wake`.

#[path = "../tests/support/machine.rs"]
#[allow(dead_code)] // the tests read the messages back; this bench does not
mod machine;
#[path = "support/process.rs"]
mod process;
#[path = "support/raft_config.rs"]
mod raft_config;
#[path = "../tests/support/router.rs"]
#[allow(dead_code)] // the tests also take replicas down; this bench does not
mod router;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use entrepot_cluster::node_log::GROUP_STATE_BYTES;
use entrepot_cluster::{NodeId, NodeLog, Request, TypeConfig};
use entrepot_storage::{LogConfig, SyncPolicy};
use machine::MessageMachine;
use openraft::{BasicNode, Config, Raft, ServerState};

/// Replicas per group.
const REPLICAS: u64 = 3;
/// Longest the formation of all groups, or one wake, may take.
const WAIT: Duration = Duration::from_secs(300);
/// Idle CPU measurement length (one second in a smoke run).
const IDLE_SECS: u64 = 5;
/// Segment size of each node log.
const SEGMENT_BYTES: u64 = 8 << 20;

type Node = Raft<TypeConfig>;

fn rss_kib() -> u64 {
    process::rss_and_threads().0
}

fn main() {
    // `cargo test --bench` (CI) runs this without `--bench`: a smoke run.
    let benching = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: u32| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let groups = env("WAKE_GROUPS", if benching { 300 } else { 3 }).max(1);
    let sample = env("WAKE_SAMPLE", if benching { 100 } else { 2 }).clamp(1, groups);
    let idle_secs = if benching { IDLE_SECS } else { 1 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(groups, sample, idle_secs));
}

async fn start(
    node_log: &NodeLog,
    router: &router::Router,
    config: &Arc<Config>,
    g: u32,
    node: NodeId,
) -> Node {
    let log = node_log.group(u64::from(g)).expect("group log");
    let raft = Raft::new(
        node,
        Arc::clone(config),
        router.group(g),
        log,
        MessageMachine::default(),
    )
    .await
    .expect("raft");
    router.group(g).add(node, raft.clone());
    raft
}

async fn run(groups: u32, sample: u32, idle_secs: u64) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let router = router::Router::default();
    let config = raft_config::broker_timing();
    let log_config = LogConfig {
        segment_bytes: SEGMENT_BYTES,
        record_bytes_max: 64 << 10,
        sync: SyncPolicy::Always,
        ..LogConfig::default()
    };
    let replicas = u64::from(groups) * REPLICAS;
    println!("group wake: {groups} groups × {REPLICAS} replicas on 3 node logs, {sample} woken one at a time");
    let node_logs: Vec<NodeLog> = (0..REPLICAS)
        .map(|n| NodeLog::open(dir.path().join(format!("node-{n}")), log_config.clone()))
        .collect::<Result<_, _>>()
        .expect("node log");
    let rss_empty = rss_kib();

    // Form every group (leaders spread: group g led by node g mod 3) and commit an entry.
    let started = Instant::now();
    let mut rafts = Vec::new();
    for g in 0..groups {
        for node in 0..REPLICAS {
            let raft = start(&node_logs[node as usize], &router, &config, g, node).await;
            rafts.push((g, node, raft));
        }
    }
    let members: BTreeMap<NodeId, BasicNode> = (0..REPLICAS)
        .map(|n| (n, BasicNode::new(format!("n{n}"))))
        .collect();
    for (g, node, raft) in &rafts {
        if u64::from(*g) % REPLICAS == *node {
            raft.initialize(members.clone()).await.expect("initialize");
        }
    }
    for (g, node, raft) in &rafts {
        if u64::from(*g) % REPLICAS != *node {
            continue;
        }
        raft.wait(Some(WAIT))
            .state(ServerState::Leader, "formed")
            .await
            .unwrap_or_else(|e| panic!("group {g} elected no leader: {e}"));
        raft.client_write(Request::Produce {
            address: format!("a{g}"),
            messages: vec![Bytes::from_static(b"first")],
        })
        .await
        .unwrap_or_else(|e| panic!("group {g} did not commit: {e}"));
    }
    let rss_running = rss_kib();
    println!(
        "  formed {groups} groups in {:.1} s; resident {rss_empty} -> {rss_running} KiB = {:.1} KiB per running replica",
        started.elapsed().as_secs_f64(),
        rss_running.saturating_sub(rss_empty) as f64 / replicas as f64
    );
    let running_cpu = process::idle_cpu_percent(idle_secs).await;
    println!("  idle CPU, every instance running: {running_cpu:.1} % of a core");

    // Stop every instance: what is left is each group's state in the node logs.
    for (g, node, raft) in rafts.drain(..) {
        router.group(g).remove(node);
        raft.shutdown().await.expect("shutdown");
    }
    // Let openraft's tasks finish dropping what they hold, then give freed heap back to the
    // OS, so that resident memory shows what stopped groups keep, not the allocator's cache.
    tokio::time::sleep(Duration::from_millis(200)).await;
    process::release_free_heap();
    let rss_stopped = rss_kib();
    let state_bytes: usize = node_logs
        .iter()
        .map(|n| {
            n.index_heap_bytes().expect("node log")
                + n.group_ids().expect("node log").len() * GROUP_STATE_BYTES
        })
        .sum();
    let stopped_cpu = process::idle_cpu_percent(idle_secs).await;
    println!(
        "  every instance stopped: resident {rss_stopped} KiB = {:.1} KiB per stopped replica over the empty node logs (node log state and index: {:.0} B per replica); idle CPU {stopped_cpu:.1} % of a core",
        rss_stopped.saturating_sub(rss_empty) as f64 / replicas as f64,
        state_bytes as f64 / replicas as f64
    );

    // Wake `sample` groups, one at a time, through to a committed entry.
    let mut wakes = Vec::with_capacity(sample as usize);
    let mut woken = Vec::new();
    for g in 0..sample {
        let began = Instant::now();
        let leader = u64::from(g) % REPLICAS;
        let mut instances = Vec::new();
        for node in 0..REPLICAS {
            instances.push(start(&node_logs[node as usize], &router, &config, g, node).await);
        }
        let raft = &instances[leader as usize];
        raft.trigger().elect().await.expect("trigger an election");
        raft.wait(Some(WAIT))
            .state(ServerState::Leader, "woken")
            .await
            .unwrap_or_else(|e| panic!("woken group {g} elected no leader: {e}"));
        raft.client_write(Request::Produce {
            address: format!("a{g}"),
            messages: vec![Bytes::from_static(b"after the wake")],
        })
        .await
        .unwrap_or_else(|e| panic!("woken group {g} did not commit: {e}"));
        wakes.push(began.elapsed());
        woken.push((g, instances));
    }
    wakes.sort();
    let at = |q: f64| wakes[((wakes.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    let (p50, p99, max) = (at(0.5), at(0.99), at(1.0));
    println!("  wake (3 instances started, elected, one entry committed): p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms over {sample} groups");
    println!(
        "group wake: groups={groups} replicas={replicas} running_kib_per_replica={:.1} stopped_kib_per_replica={:.1} running_idle_cpu_pct={running_cpu:.1} stopped_idle_cpu_pct={stopped_cpu:.1} wake_p50_ms={p50:.2} wake_p99_ms={p99:.2}",
        rss_running.saturating_sub(rss_empty) as f64 / replicas as f64,
        rss_stopped.saturating_sub(rss_empty) as f64 / replicas as f64,
    );
    for (g, instances) in woken {
        for (node, raft) in instances.into_iter().enumerate() {
            router.group(g).remove(node as NodeId);
            let _ = raft.shutdown().await;
        }
    }
}
