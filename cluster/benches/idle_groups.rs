//! What one Raft group costs while idle, today (issue 12: "thousands of groups must be
//! cheap"; goals ≤ 64 KiB per idle group replica, idle CPU < 5 % of a core at 10,000
//! addresses on 3 nodes). A design measurement for the split into a group per address,
//! run before writing it.
//!
//! Method: `IDLE_GROUPS` groups (default 30; `IDLE_GROUPS=3334` gives 10,000 replicas;
//! not `GROUPS`, which bash reserves) of three replicas each, all in this process — three
//! "nodes" of openraft 0.9 instances, each replica with its own [`LogStore`] (its own
//! segment log, as a group per address would have with today's crate) and the cluster
//! tests' minimal state machine, talking through the tests' in-process network
//! (`tests/support/router.rs`) that calls the target `Raft` directly (no sockets, no
//! encoding: the CPU figures are a lower bound of what the TCP network would cost). Every
//! group is formed, elects a leader and commits one entry. Then, from /proc/self:
//! * resident memory and threads per replica (VmRSS, Threads, before and after);
//! * idle CPU (utime+stime over `IDLE_SECS`) with heartbeats on, as today;
//! * idle CPU with every group quiesced through openraft's runtime switches
//!   (`heartbeat(false)`, `elect(false)`, `tick(false)`): what is left is the per-instance
//!   timers openraft 0.9 keeps running.
//!
//! `IDLE_LOG` chooses the replicas' Raft log: `group` (the default) a [`LogStore`] per
//! replica as above; `node` one [`NodeLog`] per node shared by all its groups (issue 12
//! step 4: one segment log, one group commit, a [`GroupLog`] per group); `both` runs the
//! two in turn, each in a child process of its own so one's memory does not count in the
//! other's.
//!
//! `IDLE_NET` chooses the network: `mem` (the default) the in-process router above; `tcp`
//! the real inter-node transport (issue 12 step 2) — per node a `PeerServer` on
//! `127.0.0.1` over a `GroupRegistry` of its replicas and one `TcpNetwork` pool, so every
//! group's heartbeats go through the node's one multiplexed connection to each peer,
//! encoded, over loopback TCP. The closing line then also gives the connections opened.
//!
//! `IDLE_HIBERNATE=1` measures hibernated groups instead (issue 12 step 5): three nodes
//! over the TCP transport, one `NodeLog` each, each with a `Hibernation` (quiesce after
//! `HIB_QUIESCE_AFTER`). Groups are formed in waves of `HIB_WAVE` (each group started
//! through the registry's starter, formed by node `g mod 3`, one entry committed); each
//! wave is left to hibernate before the next, so at most a wave's instances run at once.
//! Once every group is stopped on every node: resident memory per group replica (after
//! giving free heap back to the OS, over the process with three empty nodes), idle CPU of
//! the whole process (liveness pings included) per 1,000 groups, the group RPCs received
//! meanwhile (should be 0); then `HIB_SAMPLE` hibernated groups are written to one at a
//! time on their former leader (`Hibernation::propose`): wake → election → commit, over
//! TCP. Bounded by `HIB_TIMEOUT`, progress on stderr.
//!
//! Prints one line per figure and a closing `idle groups: …` (or `hibernated groups: …`)
//! line. Bounded: group formation and the commit wait at most `FORM_TIMEOUT`.
//! `cargo test --bench idle_groups` (CI) runs both paths with three groups.
//!
//! Run: `IDLE_GROUPS=300 IDLE_LOG=both cargo bench -p entrepot-cluster --bench idle_groups`,
//! or with `IDLE_NET=tcp` over sockets;
//! `IDLE_HIBERNATE=1 IDLE_GROUPS=3000 cargo bench -p entrepot-cluster --bench idle_groups`.

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
use entrepot_cluster::{
    ClusterError, GroupRegistry, Hibernation, HibernationConfig, HostState, LogStore, NodeId,
    NodeLog, PeerServer, PeerServerOptions, Request, Stopped, TcpNetwork, TypeConfig,
};
use entrepot_storage::LogConfig;
use machine::MessageMachine;
use openraft::network::RaftNetworkFactory;
use openraft::{BasicNode, Config, Raft};

/// Replicas per group.
const REPLICAS: u64 = 3;
/// Longest the formation of every group, or the commit of their first entries, may take.
const FORM_TIMEOUT: Duration = Duration::from_secs(300);
/// Each idle CPU measurement's length (one second in a smoke run).
const IDLE_SECS: u64 = 5;
/// Segment size of each replica's log: small, as an address with little traffic would
/// start with.
const SEGMENT_BYTES: u64 = 1 << 20;

/// Which Raft log the replicas use (`IDLE_LOG`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LogKind {
    /// A `LogStore` (its own segment log) per replica.
    PerGroup,
    /// One `NodeLog` per node, shared by the node's groups.
    PerNode,
}

/// Which network the replicas talk through (`IDLE_NET`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum NetKind {
    /// The tests' in-process router: no sockets, no encoding.
    Mem,
    /// The inter-node TCP transport: one multiplexed connection per node pair.
    Tcp,
}

/// One node's end of the TCP transport.
struct TcpNode {
    network: TcpNetwork,
    groups: GroupRegistry,
    server: PeerServer,
}

/// Runs this bench again in a child process for each kind of log, with the same arguments.
fn run_both() {
    let exe = std::env::current_exe().expect("the bench's own path");
    for kind in ["group", "node"] {
        let status = std::process::Command::new(&exe)
            .args(std::env::args().skip(1))
            .env("IDLE_LOG", kind)
            .status()
            .expect("run the bench in a child process");
        assert!(status.success(), "IDLE_LOG={kind} failed: {status}");
    }
}

fn main() {
    // `cargo test --bench` (CI) runs this without `--bench`: a smoke run of three groups.
    let benching = std::env::args().any(|a| a == "--bench");
    let kind = match std::env::var("IDLE_LOG").as_deref() {
        Ok("both") => return run_both(),
        Ok("node") => LogKind::PerNode,
        Ok("group") | Err(_) => LogKind::PerGroup,
        Ok(other) => panic!("IDLE_LOG must be group, node or both, not {other}"),
    };
    let groups: u32 = std::env::var("IDLE_GROUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 30 } else { 3 });
    let idle_secs = if benching { IDLE_SECS } else { 1 };
    let net = match std::env::var("IDLE_NET").as_deref() {
        Ok("tcp") => NetKind::Tcp,
        Ok("mem") | Err(_) => NetKind::Mem,
        Ok(other) => panic!("IDLE_NET must be mem or tcp, not {other}"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let hibernate = std::env::var("IDLE_HIBERNATE").is_ok_and(|v| v == "1");
    if !hibernate {
        runtime.block_on(run(groups, idle_secs, kind, net));
    }
    if hibernate || !benching {
        let env = |name: &str, default: u32| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let options = HibOptions {
            groups,
            wave: env("HIB_WAVE", 500).max(1),
            sample: env("HIB_SAMPLE", if benching { 50 } else { 2 }).clamp(1, groups),
            idle_secs: if benching { IDLE_SECS * 2 } else { 1 },
            quiesce_after: Duration::from_millis(u64::from(env(
                "HIB_QUIESCE_AFTER_MS",
                if benching { 1000 } else { 300 },
            ))),
        };
        let limit = Duration::from_secs(u64::from(env("HIB_TIMEOUT", 1800)));
        runtime.block_on(async {
            tokio::time::timeout(limit, run_hibernating(options))
                .await
                .unwrap_or_else(|_| {
                    panic!("hibernation bench not done within {limit:?} (HIB_TIMEOUT)")
                })
        });
    }
}

/// Where replicas keep their Raft logs.
struct Logs<'a> {
    kind: LogKind,
    dir: &'a std::path::Path,
    config: &'a LogConfig,
    /// One per node when `kind` is `PerNode`.
    node_logs: &'a [NodeLog],
}

/// One replica's `Raft` over `net`, with the log `logs.kind` says.
async fn start_replica<N: RaftNetworkFactory<TypeConfig>>(
    node: NodeId,
    g: u32,
    config: &Arc<Config>,
    net: N,
    logs: &Logs<'_>,
) -> Raft<TypeConfig> {
    let machine = MessageMachine::default();
    match logs.kind {
        LogKind::PerGroup => {
            let path = logs.dir.join(format!("g{g}-n{node}"));
            let log = LogStore::open(&path, logs.config.clone()).expect("log store");
            Raft::new(node, Arc::clone(config), net, log, machine).await
        }
        LogKind::PerNode => {
            let log = logs.node_logs[node as usize]
                .group(u64::from(g))
                .expect("group log");
            Raft::new(node, Arc::clone(config), net, log, machine).await
        }
    }
    .expect("raft")
}

async fn run(groups: u32, idle_secs: u64, kind: LogKind, net: NetKind) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let router = router::Router::default();
    let config = raft_config::broker_timing();
    let log_config = LogConfig {
        segment_bytes: SEGMENT_BYTES,
        record_bytes_max: 64 << 10,
        ..LogConfig::default()
    };
    let replicas = u64::from(groups) * REPLICAS;
    let logs = match kind {
        LogKind::PerGroup => "one segment log each",
        LogKind::PerNode => "one segment log per node shared by its groups",
    };
    println!("idle groups: {groups} groups × {REPLICAS} replicas = {replicas} openraft instances, {logs}, network {net:?}");
    let mut tcp = Vec::new();
    if net == NetKind::Tcp {
        for node in 0..REPLICAS {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let groups = GroupRegistry::new();
            let server = PeerServer::serve(listener, groups.clone(), PeerServerOptions::default())
                .expect("peer server");
            let network = TcpNetwork::new(node);
            tcp.push(TcpNode {
                network,
                groups,
                server,
            });
        }
    }
    let (rss0, threads0) = process::rss_and_threads();
    let start = Instant::now();
    let node_logs: Vec<NodeLog> = match kind {
        LogKind::PerGroup => Vec::new(),
        LogKind::PerNode => (0..REPLICAS)
            .map(|n| NodeLog::open(dir.path().join(format!("node-{n}")), log_config.clone()))
            .collect::<Result<_, _>>()
            .expect("node log"),
    };
    let logs = Logs {
        kind,
        dir: dir.path(),
        config: &log_config,
        node_logs: &node_logs,
    };
    let mut rafts = Vec::new();
    for g in 0..groups {
        for node in 0..REPLICAS {
            let raft = match net {
                NetKind::Mem => start_replica(node, g, &config, router.group(g), &logs).await,
                NetKind::Tcp => {
                    let net = tcp[node as usize].network.group(u64::from(g));
                    start_replica(node, g, &config, net, &logs).await
                }
            };
            match net {
                NetKind::Mem => router.group(g).add(node, raft.clone()),
                NetKind::Tcp => {
                    let registry = &tcp[node as usize].groups;
                    registry
                        .insert(u64::from(g), raft.clone())
                        .expect("register");
                }
            }
            rafts.push((g, node, raft));
        }
        if (g + 1) % 500 == 0 {
            eprintln!(
                "  {} groups created ({:.1} s)",
                g + 1,
                start.elapsed().as_secs_f64()
            );
        }
    }
    let members: BTreeMap<NodeId, BasicNode> = (0..REPLICAS)
        .map(|n| {
            let addr = match net {
                NetKind::Mem => format!("n{n}"),
                NetKind::Tcp => tcp[n as usize].server.local_addr().to_string(),
            };
            (n, BasicNode::new(addr))
        })
        .collect();
    // Leaders spread: group g is formed by node g mod 3.
    for (g, node, raft) in &rafts {
        if u64::from(*g) % REPLICAS == *node {
            raft.initialize(members.clone()).await.expect("initialize");
        }
    }
    let deadline = Instant::now() + FORM_TIMEOUT;
    for (g, node, raft) in &rafts {
        if u64::from(*g) % REPLICAS != *node {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        // Usually the node that initialized the group; over a loaded TCP network an
        // election may go to another replica.
        let leader = raft
            .wait(Some(left))
            .metrics(|m| m.current_leader.is_some(), "formed")
            .await
            .unwrap_or_else(|e| panic!("group {g} elected no leader: {e}"))
            .current_leader
            .unwrap_or(*node);
        let leading = rafts
            .iter()
            .find(|(lg, ln, _)| lg == g && *ln == leader)
            .map_or(raft, |(_, _, r)| r);
        leading
            .client_write(Request::Produce {
                address: format!("a{g}"),
                messages: vec![Bytes::from_static(b"first")],
            })
            .await
            .unwrap_or_else(|e| panic!("group {g} did not commit: {e}"));
    }
    println!(
        "  formed and committed one entry in every group in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let (rss1, threads1) = process::rss_and_threads();
    let per_replica_kib = (rss1.saturating_sub(rss0)) as f64 / replicas as f64;
    let threads_per_replica = (threads1.saturating_sub(threads0)) as f64 / replicas as f64;
    println!("  resident: {rss0} -> {rss1} KiB = {per_replica_kib:.1} KiB per replica (goal 64)");
    println!("  threads: {threads0} -> {threads1} = {threads_per_replica:.2} per replica (a segment log's sync and prefault threads)");
    if kind == LogKind::PerNode {
        let index: usize = node_logs
            .iter()
            .map(|n| n.index_heap_bytes().expect("node log"))
            .sum();
        println!(
            "  node logs: {GROUP_STATE_BYTES} B of state per group replica + {:.1} B of index (Raft index -> offset)",
            index as f64 / replicas as f64
        );
    }

    let heartbeating = process::idle_cpu_percent(idle_secs).await;
    println!("  idle CPU, heartbeats on: {heartbeating:.1} % of a core (goal < 5 % at 10,000)");

    for (_, _, raft) in &rafts {
        let switches = raft.runtime_config();
        switches.heartbeat(false);
        switches.elect(false);
        switches.tick(false);
    }
    let quiesced = process::idle_cpu_percent(idle_secs).await;
    println!("  idle CPU, quiesced (heartbeat, elect and tick off): {quiesced:.1} % of a core");
    let connections: u64 = tcp.iter().map(|n| n.network.connections_opened()).sum();
    println!(
        "idle groups: log={kind:?} net={net:?} replicas={replicas} rss_kib_per_replica={per_replica_kib:.1} threads_per_replica={threads_per_replica:.2} idle_cpu_pct={heartbeating:.1} quiesced_cpu_pct={quiesced:.1} connections={connections}"
    );
    for node in tcp {
        node.server.shutdown().await;
    }
    for (_, _, raft) in rafts {
        let _ = raft.shutdown().await;
    }
}

/// What `IDLE_HIBERNATE=1` runs with.
struct HibOptions {
    groups: u32,
    wave: u32,
    sample: u32,
    idle_secs: u64,
    quiesce_after: Duration,
}

/// One node of the hibernation run.
struct HibNode {
    network: TcpNetwork,
    groups: GroupRegistry,
    server: PeerServer,
    hibernation: Option<Hibernation>,
    log: NodeLog,
}

fn running(nodes: &[HibNode]) -> usize {
    nodes.iter().map(|n| n.groups.running_count()).sum()
}

/// Waits until no instance runs on any node, printing progress; panics after `limit`.
async fn until_all_stopped(nodes: &[HibNode], limit: Duration, what: &str) {
    let began = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let left = running(nodes);
        if left == 0 {
            return;
        }
        assert!(
            began.elapsed() < limit,
            "{what}: {left} instances still running after {limit:?}"
        );
        if last_print.elapsed() >= Duration::from_secs(5) {
            let lost: u64 = nodes
                .iter()
                .filter_map(|n| n.hibernation.as_ref().map(|h| h.peers_lost()))
                .sum();
            eprintln!(
                "  {what}: {left} instances still running ({:.0} s; peers found lost so far: {lost})",
                began.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run_hibernating(o: HibOptions) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = raft_config::broker_timing();
    let log_config = LogConfig {
        segment_bytes: SEGMENT_BYTES * 8,
        record_bytes_max: 64 << 10,
        ..LogConfig::default()
    };
    let replicas = u64::from(o.groups) * REPLICAS;
    println!(
        "hibernated groups: {} groups × {REPLICAS} replicas on 3 nodes over TCP (one node log each), quiesce after {:?}, waves of {}",
        o.groups, o.quiesce_after, o.wave
    );
    let mut nodes = Vec::new();
    let mut addrs = BTreeMap::new();
    for node in 0..REPLICAS {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let groups = GroupRegistry::new();
        let log = NodeLog::open(dir.path().join(format!("node-{node}")), log_config.clone())
            .expect("node log");
        let network = TcpNetwork::new(node);
        groups.set_starter({
            let (network, config, log) = (network.clone(), Arc::clone(&config), log.clone());
            move |g: u64| {
                let (network, config, log) = (network.group(g), Arc::clone(&config), log.clone());
                async move {
                    let storage = log.group(g)?;
                    let machine = MessageMachine::default();
                    Raft::new(node, config, network, storage, machine)
                        .await
                        .map_err(|e| ClusterError::GroupStart {
                            group: g,
                            reason: e.to_string(),
                        })
                }
            }
        });
        let server = PeerServer::serve(listener, groups.clone(), PeerServerOptions::default())
            .expect("peer server");
        addrs.insert(node, server.local_addr().to_string());
        nodes.push(HibNode {
            network,
            groups,
            server,
            hibernation: None,
            log,
        });
    }
    let hib_config = HibernationConfig {
        quiesce_after: o.quiesce_after,
        check_interval: Duration::from_millis(200),
        ..HibernationConfig::default()
    };
    for (id, node) in nodes.iter_mut().enumerate() {
        node.hibernation = Some(Hibernation::start(
            id as NodeId,
            node.groups.clone(),
            node.network.clone(),
            addrs.clone(),
            hib_config,
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    process::release_free_heap();
    let (rss0, threads0) = process::rss_and_threads();
    let empty_cpu = process::idle_cpu_percent(o.idle_secs.min(2)).await;
    println!("  three empty nodes: resident {rss0} KiB, {threads0} threads, idle CPU {empty_cpu:.1} % of a core (liveness pings)");

    let members: BTreeMap<NodeId, BasicNode> = addrs
        .iter()
        .map(|(id, addr)| (*id, BasicNode::new(addr)))
        .collect();
    let began = Instant::now();
    let never = Stopped {
        leader: None,
        term: 0,
        last_log_id: None,
    };
    let mut first = 0;
    while first < o.groups {
        let last = (first + o.wave).min(o.groups);
        for g in first..last {
            for node in &nodes {
                node.groups
                    .insert_stopped(u64::from(g), never)
                    .expect("register");
                node.groups.wake(u64::from(g)).await.expect("start");
            }
        }
        for g in first..last {
            let former = &nodes[(u64::from(g) % REPLICAS) as usize];
            let raft = former.groups.raft(u64::from(g)).expect("running");
            raft.initialize(members.clone()).await.expect("initialize");
        }
        eprintln!(
            "  groups {first}..{last} started and initialized ({:.1} s, {} instances running)",
            began.elapsed().as_secs_f64(),
            running(&nodes)
        );
        // Through `propose`: a group formed early in the wave may have hibernated already.
        for g in first..last {
            let mut at = (u64::from(g) % REPLICAS) as usize;
            let mut attempts = 0;
            loop {
                let hibernation = nodes[at].hibernation.as_ref().expect("hibernation");
                let write = Request::Produce {
                    address: format!("a{g}"),
                    messages: vec![Bytes::from_static(b"first")],
                };
                match hibernation.propose(u64::from(g), write).await {
                    Ok(_) => break,
                    Err(ClusterError::NotLeader {
                        leader: Some(l), ..
                    }) if attempts < 10 => at = l as usize,
                    Err(e) => panic!("group {g} did not commit: {e}"),
                }
                attempts += 1;
            }
        }
        until_all_stopped(&nodes, FORM_TIMEOUT, "hibernating").await;
        let lost: u64 = nodes
            .iter()
            .filter_map(|n| n.hibernation.as_ref().map(|h| h.peers_lost()))
            .sum();
        let (rss, _) = process::rss_and_threads();
        eprintln!(
            "  {last} groups formed, committed and hibernated ({:.1} s; resident {rss} KiB; peers found lost so far: {lost})",
            began.elapsed().as_secs_f64()
        );
        first = last;
    }
    println!(
        "  {} groups formed, committed one entry and hibernated in {:.1} s",
        o.groups,
        began.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    process::release_free_heap();
    let (rss1, threads1) = process::rss_and_threads();
    let per_replica_kib = rss1.saturating_sub(rss0) as f64 / replicas as f64;
    let state_bytes: usize = nodes
        .iter()
        .map(|n| {
            n.log.index_heap_bytes().expect("node log")
                + n.log.group_ids().expect("node log").len() * GROUP_STATE_BYTES
        })
        .sum();
    println!(
        "  every group stopped: resident {rss0} -> {rss1} KiB = {per_replica_kib:.2} KiB per group replica (goal 64; node log state and index {:.0} B of it); threads {threads0} -> {threads1}",
        state_bytes as f64 / replicas as f64
    );
    let rpcs0: u64 = nodes.iter().map(|n| n.groups.group_rpcs_received()).sum();
    let idle = process::idle_cpu_percent(o.idle_secs).await;
    let rpcs = nodes
        .iter()
        .map(|n| n.groups.group_rpcs_received())
        .sum::<u64>()
        - rpcs0;
    let per_thousand = idle / (f64::from(o.groups) / 1000.0);
    println!(
        "  idle CPU, every group hibernated: {idle:.2} % of a core ({per_thousand:.3} % per 1,000 groups; goal < 5 % at 10,000); group RPCs meanwhile: {rpcs}"
    );

    // Write to hibernated groups, one at a time, on their former leaders.
    let mut wakes = Vec::new();
    for g in 0..o.sample {
        let led_here = |i: usize| matches!(nodes[i].groups.state(u64::from(g)), Some(HostState::Stopped(st)) if st.leader == Some(i as NodeId));
        let led = (0..nodes.len())
            .find(|&i| led_here(i))
            .unwrap_or((u64::from(g) % REPLICAS) as usize);
        let hibernation = nodes[led].hibernation.as_ref().expect("hibernation");
        let t = Instant::now();
        hibernation
            .propose(
                u64::from(g),
                Request::Produce {
                    address: format!("a{g}"),
                    messages: vec![Bytes::from_static(b"after the wake")],
                },
            )
            .await
            .unwrap_or_else(|e| panic!("write to hibernated group {g}: {e}"));
        wakes.push(t.elapsed());
    }
    wakes.sort();
    let at = |q: f64| wakes[((wakes.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    let (p50, p99, max) = (at(0.5), at(0.99), at(1.0));
    println!(
        "  write to a hibernated group (wake, election, commit over TCP): p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms over {} groups",
        o.sample
    );
    println!(
        "hibernated groups: groups={} replicas={replicas} rss_kib_per_replica={per_replica_kib:.2} idle_cpu_pct={idle:.2} idle_cpu_pct_per_1000_groups={per_thousand:.3} group_rpcs_while_idle={rpcs} wake_write_p50_ms={p50:.2} wake_write_p99_ms={p99:.2}",
        o.groups
    );
    for node in nodes {
        if let Some(h) = node.hibernation {
            h.shutdown().await;
        }
        node.server.shutdown().await;
        for (_, raft) in node.groups.running() {
            let _ = raft.shutdown().await;
        }
    }
}
