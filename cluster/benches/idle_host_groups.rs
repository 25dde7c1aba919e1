//! What an idle *host* group costs, hibernated or not (issue 12: ≤ 64 KiB per idle group
//! replica, idle CPU < 5 % of a core at 10,000 addresses on 3 nodes): the host variant of
//! `idle_groups.rs`, measuring the path the broker will run — `Host`, `GroupHandle`, the
//! batcher, a machine per group — rather than bare openraft instances.
//!
//! Method: three `Host`s in one process (real node logs, fsync on every commit, the
//! broker's Raft timing: heartbeat 40 ms, elections 120–240 ms), over loopback TCP. For
//! each count in `HOST_GROUPS` (default `1000,3000`) and each mode (`awake`: no
//! hibernation; `hibernated`: `HostConfig::hibernation`, quiesce after
//! `HOST_QUIESCE_AFTER_MS`), a child process of its own (so one run's memory does not
//! count in the next's) opens that many groups on all three hosts in waves of
//! `HOST_WAVE`, bootstraps each on node `g mod 3` and commits one proposal; in `hibernated`
//! mode each wave is left to hibernate before the next. Then, from /proc/self: resident
//! memory per group replica over three empty hosts (after giving free heap back to the
//! OS), idle CPU of the whole process over `IDLE_SECS` (liveness pings included), the
//! group RPCs received meanwhile; in `hibernated` mode also `HOST_SAMPLE` submits, one
//! at a time, on the former leaders of hibernated groups (wake + commit over TCP).
//! Every phase is bounded (`FORM_TIMEOUT`, the host's propose timeout per write); a run
//! that cannot form its groups (an `awake` run whose heartbeats saturate the machine, so
//! a first write times out) says so and ends.
//!
//! `HOST_PROCESSES=1`: hibernated only, one process per node instead
//! (`support/host_node.rs`): each node's own resident memory and idle CPU.
//!
//! Prints one line per figure and a closing `host groups: …` line per run (per node:
//! `host groups per node: …`). `cargo test --bench idle_host_groups` (CI) runs both modes
//! and the per-node variant with three groups.
//!
//! Run: `cargo bench -p entrepot-cluster --bench idle_host_groups`, or
//! `HOST_GROUPS=1000 HOST_MODES=hibernated cargo bench -p entrepot-cluster --bench idle_host_groups`.

#[path = "support/host_node.rs"]
mod host_node;
#[path = "support/process.rs"]
mod process;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use entrepot_cluster::{
    GroupError, GroupHandle, GroupMachine, HibernationConfig, Host, HostConfig, MachineError,
    NodeId, Position,
};
use entrepot_storage::LogConfig;

/// Replicas per group (one per host).
const REPLICAS: u64 = 3;
/// Longest forming every group (and hibernating them) may take before the run gives up.
const FORM_TIMEOUT: Duration = Duration::from_secs(600);
/// The idle CPU measurement's length (one second in a smoke run).
const IDLE_SECS: u64 = 10;
/// Attempts to find a group's leader for its first proposal.
const LEADER_ATTEMPTS: usize = 50;

/// The smallest machine: counts what it applied; its snapshot is the count.
#[derive(Default)]
struct Counter {
    applied: u64,
    next: u64,
}

impl GroupMachine for Counter {
    fn apply(&mut self, at: Position, _payload: Bytes) -> Result<(), MachineError> {
        self.applied += 1;
        self.next = at.index + 1;
        Ok(())
    }
    fn snapshot(&self) -> Result<Bytes, MachineError> {
        Ok(Bytes::copy_from_slice(&self.applied.to_le_bytes()))
    }
    fn restore(&mut self, last_index: u64, state: Bytes) -> Result<(), MachineError> {
        let bytes: [u8; 8] = state[..]
            .try_into()
            .map_err(|_| MachineError::msg("bad counter snapshot"))?;
        self.applied = u64::from_le_bytes(bytes);
        self.next = last_index + 1;
        Ok(())
    }
    fn lowest_needed(&self) -> u64 {
        self.next
    }
}

#[derive(Clone, Copy, Debug)]
struct Options {
    groups: u64,
    hibernate: bool,
    wave: u64,
    sample: u64,
    idle_secs: u64,
    quiesce_after: Duration,
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo test --bench` (CI) runs this without `--bench`: a smoke run of three groups.
    let benching = std::env::args().any(|a| a == "--bench");
    if let Ok(one) = std::env::var("HOST_RUN") {
        // A child: one count, one mode.
        let (groups, mode) = one.split_once(':').expect("HOST_RUN=groups:mode");
        let options = Options {
            groups: groups.parse().expect("a group count"),
            hibernate: mode == "hibernated",
            wave: env("HOST_WAVE", 250).max(1),
            sample: env("HOST_SAMPLE", if benching { 50 } else { 2 }),
            idle_secs: if benching { IDLE_SECS } else { 1 },
            quiesce_after: Duration::from_millis(env(
                "HOST_QUIESCE_AFTER_MS",
                if benching { 1000 } else { 300 },
            )),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        match std::env::var("HOST_NODE") {
            Ok(node) => {
                let addrs = std::env::var("HOST_ADDRS").expect("HOST_ADDRS");
                let addrs = addrs.split(',').map(String::from).collect();
                let node = node.parse().expect("HOST_NODE");
                runtime.block_on(host_node::run_node(node, addrs, options));
            }
            Err(_) => runtime.block_on(run(options)),
        }
        return;
    }
    // One process per node: hibernated only (awake runs cannot form thousands here).
    let processes = std::env::var("HOST_PROCESSES").is_ok_and(|v| v == "1");
    let counts = std::env::var("HOST_GROUPS")
        .unwrap_or_else(|_| if benching { "1000,3000" } else { "3" }.into());
    let modes = std::env::var("HOST_MODES").unwrap_or_else(|_| "hibernated,awake".into());
    let exe = std::env::current_exe().expect("the bench's own path");
    for count in counts.split(',') {
        if processes || !benching {
            host_node::run_parent(count.parse().expect("a group count"));
            if processes {
                continue;
            }
        }
        for mode in modes.split(',') {
            let status = std::process::Command::new(&exe)
                .args(std::env::args().skip(1))
                .env("HOST_RUN", format!("{count}:{mode}"))
                .status()
                .expect("run the bench in a child process");
            assert!(status.success(), "{count} groups {mode} failed: {status}");
        }
    }
}

fn config(node: NodeId, dir: &std::path::Path, o: &Options) -> HostConfig {
    let mut c = HostConfig::new(node, dir);
    c.log = LogConfig {
        segment_bytes: 8 << 20,
        record_bytes_max: 64 << 10,
        ..LogConfig::default()
    };
    c.hibernation = o.hibernate.then(|| HibernationConfig {
        quiesce_after: o.quiesce_after,
        check_interval: Duration::from_millis(200),
        ..HibernationConfig::default()
    });
    c
}

fn running(hosts: &[Host]) -> usize {
    hosts.iter().map(|h| h.hibernation_counters().running).sum()
}

/// Submits one proposal to `g` on its leader (found from the `NotLeader` answers);
/// `Err` after [`LEADER_ATTEMPTS`] refusals, or at the first other error.
async fn first_write(hosts: &[Host], g: u64) -> Result<Position, String> {
    let mut at = g % REPLICAS;
    for _ in 0..LEADER_ATTEMPTS {
        let handle: GroupHandle = hosts[at as usize].group(g).expect("open");
        match handle.propose(Bytes::from_static(b"first")).await {
            Ok(p) => return Ok(p),
            Err(GroupError::NotLeader { leader, .. }) => {
                at = leader.unwrap_or((at + 1) % REPLICAS);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!(
        "no leader after {LEADER_ATTEMPTS} attempts (LEADER_ATTEMPTS)"
    ))
}

/// Waits (bounded by `deadline`) until no host runs an instance; false when it did not.
async fn until_all_stopped(hosts: &[Host], deadline: Instant) -> bool {
    while running(hosts) > 0 {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Opens, forms and writes to every group, in waves; `Err` says why it stopped (a
/// first write that failed, or [`FORM_TIMEOUT`]).
async fn form(hosts: &[Host], addrs: &BTreeMap<NodeId, String>, o: &Options) -> Result<(), String> {
    let deadline = Instant::now() + FORM_TIMEOUT;
    let began = Instant::now();
    let mut first = 0;
    while first < o.groups {
        let last = (first + o.wave).min(o.groups);
        for g in first..last {
            for h in hosts {
                h.open_group(g, Counter::default()).await.expect("open");
            }
            let former = hosts[(g % REPLICAS) as usize].group(g).expect("open");
            former.bootstrap(addrs).await.expect("bootstrap");
        }
        for g in first..last {
            if let Err(e) = first_write(hosts, g).await {
                return Err(format!("group {g}: no first write ({e})"));
            }
            if Instant::now() > deadline {
                return Err(format!("not formed within {FORM_TIMEOUT:?}"));
            }
        }
        if o.hibernate && !until_all_stopped(hosts, deadline).await {
            return Err(format!("not hibernated within {FORM_TIMEOUT:?}"));
        }
        eprintln!(
            "  groups 0..{last} formed ({:.1} s, {} instances running)",
            began.elapsed().as_secs_f64(),
            running(hosts)
        );
        first = last;
    }
    Ok(())
}

async fn run(o: Options) {
    let mode = if o.hibernate { "hibernated" } else { "awake" };
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut hosts = Vec::new();
    let mut addrs = BTreeMap::new();
    for node in 0..REPLICAS {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let host_dir = dir.path().join(format!("node-{node}"));
        let host = Host::start(config(node, &host_dir, &o), listener).expect("host");
        addrs.insert(node, host.local_addr().to_string());
        hosts.push(host);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    process::release_free_heap();
    let (rss0, _) = process::rss_and_threads();
    println!(
        "host groups, {mode}: {} groups × {REPLICAS} replicas on 3 hosts over TCP; three empty hosts resident {rss0} KiB",
        o.groups
    );
    let began = Instant::now();
    if let Err(why) = form(&hosts, &addrs, &o).await {
        println!(
            "host groups: groups={} mode={mode} formed=no ({why}; after {:.0} s, {} instances running)",
            o.groups,
            began.elapsed().as_secs_f64(),
            running(&hosts)
        );
        std::process::exit(0);
    }
    println!(
        "  formed, one proposal committed each{} in {:.1} s",
        if o.hibernate { ", hibernated" } else { "" },
        began.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    process::release_free_heap();
    let (rss1, threads) = process::rss_and_threads();
    let replicas = o.groups * REPLICAS;
    let per_replica = rss1.saturating_sub(rss0) as f64 / replicas as f64;
    let rpcs = |hosts: &[Host]| -> u64 {
        hosts
            .iter()
            .map(|h| h.hibernation_counters().group_rpcs_received)
            .sum()
    };
    let rpcs0 = rpcs(&hosts);
    let idle = process::idle_cpu_percent(o.idle_secs).await;
    let idle_rpcs = rpcs(&hosts) - rpcs0;
    let still = running(&hosts);
    println!(
        "  resident {rss0} -> {rss1} KiB = {per_replica:.2} KiB per group replica; {threads} threads; idle CPU {idle:.2} % of a core; group RPCs while idle {idle_rpcs}; instances running {still}"
    );
    let (p50, p99) = if o.hibernate {
        sample_wakes(&hosts, &o).await
    } else {
        (0.0, 0.0)
    };
    println!(
        "host groups: groups={} mode={mode} rss_kib_per_replica={per_replica:.2} idle_cpu_pct={idle:.2} group_rpcs_while_idle={idle_rpcs} running={still} wake_write_p50_ms={p50:.2} wake_write_p99_ms={p99:.2}",
        o.groups
    );
    for h in hosts {
        h.shutdown().await;
    }
}

/// Submits to `o.sample` hibernated groups, one at a time, on their former leaders:
/// p50 and p99 of wake + commit, in ms.
async fn sample_wakes(hosts: &[Host], o: &Options) -> (f64, f64) {
    let mut took = Vec::new();
    for g in 0..o.sample.min(o.groups) {
        let leader = hosts
            .iter()
            .find_map(|h| h.group(g).filter(|gh| gh.leadership().borrow().leads))
            .unwrap_or_else(|| hosts[(g % REPLICAS) as usize].group(g).expect("open"));
        let t = Instant::now();
        leader
            .propose(Bytes::from_static(b"after the wake"))
            .await
            .unwrap_or_else(|e| panic!("write to hibernated group {g}: {e}"));
        took.push(t.elapsed());
    }
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99))
}
