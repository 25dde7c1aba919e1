//! `idle_host_groups` with one process per node (`HOST_PROCESSES=1`): the per-node
//! figures issue 12 asks for (resident memory and idle CPU of *each* node), where the
//! default run sums three hosts in one process.
//!
//! The parent picks three loopback ports and starts one child per node
//! (`HOST_NODE=i`, `HOST_ADDRS=a0,a1,a2`), each a `Host` with hibernation. A child opens
//! every group in waves, bootstraps the groups `g mod 3 == i` and writes one proposal to
//! each it then leads, waits after each wave until it runs no instance, and prints
//! `READY`; once all three are ready the parent writes `GO` to each, every child measures
//! over the same seconds (resident memory over its empty host, idle CPU, group RPCs
//! received) and prints one `RESULT` line, then waits for `EXIT` (so no node leaves while
//! the others measure). Every wait is bounded (`FORM_TIMEOUT`, `CHILD_TIMEOUT`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use entrepot_cluster::{GroupError, Host, NodeId};

use super::{config, process, Counter, Options, FORM_TIMEOUT, LEADER_ATTEMPTS, REPLICAS};

/// Longest the parent waits for a child's next line.
const CHILD_TIMEOUT: Duration = Duration::from_secs(900);
/// A node counts as settled once it ran no instance for this long.
const SETTLED: Duration = Duration::from_secs(2);

/// The parent: three children for `groups` groups; prints each node's figures.
pub fn run_parent(groups: u64) {
    let addrs: Vec<String> = (0..REPLICAS)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("address").to_string()
        })
        .collect();
    let exe = std::env::current_exe().expect("the bench's own path");
    let (lines, from_children) = mpsc::channel::<(u64, String)>();
    let mut children = Vec::new();
    for node in 0..REPLICAS {
        let mut child = Command::new(&exe)
            .args(std::env::args().skip(1))
            .env("HOST_NODE", node.to_string())
            .env("HOST_ADDRS", addrs.join(","))
            .env("HOST_RUN", format!("{groups}:hibernated"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a node process");
        let out = child.stdout.take().expect("stdout");
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if lines.send((node, line)).is_err() {
                    return;
                }
            }
        });
        children.push(child);
    }
    let next = |what: &str| {
        from_children
            .recv_timeout(CHILD_TIMEOUT)
            .unwrap_or_else(|_| panic!("no {what} from a node within {CHILD_TIMEOUT:?}"))
    };
    let mut ready = 0;
    while ready < REPLICAS {
        let (node, line) = next("READY");
        eprintln!("  node {node}: {line}");
        ready += u64::from(line == "READY");
    }
    for c in &mut children {
        let stdin = c.stdin.as_mut().expect("stdin");
        stdin.write_all(b"GO\n").expect("GO");
    }
    let mut results = 0;
    while results < REPLICAS {
        let (node, line) = next("RESULT");
        if let Some(result) = line.strip_prefix("RESULT ") {
            println!("host groups per node: groups={groups} node={node} {result}");
            results += 1;
        }
    }
    for mut c in children {
        let _ = c.stdin.as_mut().map(|s| s.write_all(b"EXIT\n"));
        let status = c.wait().expect("a node process");
        assert!(status.success(), "a node process failed: {status}");
    }
}

/// A child: node `node` of three at `addrs`.
pub async fn run_node(node: NodeId, addrs: Vec<String>, o: Options) {
    let members: BTreeMap<NodeId, String> = (0..REPLICAS).zip(addrs.iter().cloned()).collect();
    let dir = tempfile::tempdir().expect("temporary directory");
    let listener = tokio::net::TcpListener::bind(&members[&node])
        .await
        .expect("bind the port the parent picked");
    let host = Host::start(config(node, dir.path(), &o), listener).expect("host");
    tokio::time::sleep(Duration::from_millis(500)).await;
    process::release_free_heap();
    let (rss0, _) = process::rss_and_threads();
    let deadline = Instant::now() + FORM_TIMEOUT;
    let mut first = 0;
    while first < o.groups {
        let last = (first + o.wave).min(o.groups);
        form_wave(&host, &members, first..last).await;
        settle(&host, deadline).await;
        eprintln!("node {node}: groups 0..{last} formed");
        first = last;
    }
    println!("READY");
    let mut stdin = BufReader::new(std::io::stdin()).lines();
    assert_eq!(stdin.next().and_then(|l| l.ok()).as_deref(), Some("GO"));
    process::release_free_heap();
    let (rss1, threads) = process::rss_and_threads();
    let rpcs0 = host.hibernation_counters().group_rpcs_received;
    let idle = process::idle_cpu_percent(o.idle_secs).await;
    let counters = host.hibernation_counters();
    let per_group = rss1.saturating_sub(rss0) as f64 / o.groups as f64;
    println!(
        "RESULT rss_kib={rss1} rss_empty_kib={rss0} rss_kib_per_group_replica={per_group:.2} threads={threads} idle_cpu_pct={idle:.2} group_rpcs_while_idle={} running={} peers_lost={}",
        counters.group_rpcs_received - rpcs0,
        counters.running,
        counters.peers_lost
    );
    // Stay up until every node measured.
    let _ = stdin.next();
    host.shutdown().await;
}

/// Opens `groups` here, bootstraps this node's share and writes once to each it leads.
async fn form_wave(host: &Host, members: &BTreeMap<NodeId, String>, groups: std::ops::Range<u64>) {
    let node = host.node();
    for g in groups.clone() {
        host.open_group(g, Counter::default()).await.expect("open");
    }
    for g in groups.clone().filter(|g| g % REPLICAS == node) {
        let h = host.group(g).expect("open");
        h.bootstrap(members).await.expect("bootstrap");
    }
    for g in groups.filter(|g| g % REPLICAS == node) {
        let h = host.group(g).expect("open");
        for _ in 0..LEADER_ATTEMPTS {
            match h.propose(Bytes::from_static(b"first")).await {
                Ok(_) => break,
                // Another node leads it: the group is formed, its write is not needed.
                Err(GroupError::NotLeader {
                    leader: Some(l), ..
                }) if l != node => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// Waits until this host ran no instance for [`SETTLED`], or `deadline`.
async fn settle(host: &Host, deadline: Instant) {
    let mut quiet_since: Option<Instant> = None;
    while Instant::now() < deadline {
        if host.hibernation_counters().running == 0 {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= SETTLED {
                return;
            }
        } else {
            quiet_since = None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
