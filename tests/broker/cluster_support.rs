//! The harness of the cluster system tests: a [`Cluster`] of real `entrepot serve`
//! processes, on loopback or each in its own network namespace (see `netns`), with leader
//! discovery through `GET /cluster`, SIGKILL and restart on the same data directory,
//! membership changes through `entrepot cluster add|remove` and partitions (namespaces
//! only); a reconnecting producer [`Load`] and a [`drain`] consumer, plus the oracle "no
//! accepted message lost".
//!
//! The producer sends unique, sequence-numbered persistent 1 KiB messages with many
//! unsettled in flight. When its connection breaks (leader killed, leadership lost, node
//! cut off) it reconnects to the next node of its list and resends everything not yet
//! accepted; a resent message may then be stored twice, which is the one duplicate the
//! oracle allows. Every wait here is bounded.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Data, Header, Message, Outcome};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::harness::BrokerProcess;
use crate::netns::{self, Netns};
use crate::ports::ReservedPort;

/// Body size of every test message.
pub const BODY_BYTES: usize = 1024;
/// Longest a client connect, attach, send or outcome may take before the producer treats
/// its connection as broken (a peer cut off by a partition never answers).
pub const CLIENT_OP_TIMEOUT: Duration = Duration::from_secs(3);
/// How often leader discovery polls `GET /cluster`.
pub const POLL: Duration = Duration::from_millis(20);
/// Longest a membership change through the CLI may take (catch-up included).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(70);

/// How one node is started and reached.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Member address `host:peer_port/amqp_port`, as the other nodes dial it.
    pub member: String,
    /// The listener flags: `--listen`, `--http`, `--cluster-listen`.
    pub listen: Vec<String>,
    /// A command the broker runs under (e.g. `ip netns exec ns`); empty: none.
    pub wrapper: Vec<String>,
    /// Where the test reaches AMQP and HTTP when not at the logged listen addresses (a
    /// node listening on 0.0.0.0 inside a namespace).
    pub reach: Option<(SocketAddr, SocketAddr)>,
}

/// A node's `GET /cluster` answer (the fields the tests look at).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub role: String,
    /// openraft's server state: `Leader`, `Follower`, `Candidate`, `Learner`.
    pub state: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub last_log_index: i64,
    pub last_applied: i64,
    /// The index of the snapshot the node holds, -1 for none.
    pub snapshot_index: i64,
    /// How far the node's Raft log is purged, -1 for not at all.
    pub purged_index: i64,
    /// On the leader: store operations recorded and not committed yet.
    pub uncommitted_ops: Option<u64>,
    pub voters: Vec<u64>,
}

impl Status {
    fn parse(yaml: &str) -> Option<Status> {
        let field = |key: &str| {
            yaml.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
                .map(str::trim)
        };
        let voters = yaml
            .lines()
            .filter(|l| l.contains("kind: voter"))
            .filter_map(|l| l.split("id: ").nth(1)?.split(',').next()?.parse().ok())
            .collect();
        Some(Status {
            role: field("role")?.to_owned(),
            state: field("state")?.to_owned(),
            term: field("term")?.parse().ok()?,
            leader: field("leader")?.parse().ok(),
            last_log_index: field("last_log_index")?.parse().ok()?,
            last_applied: field("last_applied")?.parse().ok()?,
            snapshot_index: field("snapshot_index")?.parse().ok()?,
            purged_index: field("purged_index")?.parse().ok()?,
            uncommitted_ops: field("uncommitted_ops").and_then(|v| v.parse().ok()),
            voters,
        })
    }
}

/// Real `entrepot serve` processes forming one cluster, each on its own data directory.
pub struct Cluster {
    root: tempfile::TempDir,
    layouts: BTreeMap<u64, Layout>,
    /// The `--peers` each node was started with, kept for restarts.
    peers: BTreeMap<u64, String>,
    nodes: BTreeMap<u64, BrokerProcess>,
    /// Extra `entrepot serve` flags every node is started with.
    serve_args: Vec<String>,
    /// Extra `entrepot serve` flags of one node (kept for its restarts).
    node_args: BTreeMap<u64, Vec<String>>,
    /// What each node's current process logged so far (see [`Cluster::log_lines`]).
    logs: Mutex<BTreeMap<u64, Vec<String>>>,
    /// What each node's earlier processes logged (kept for [`Cluster::dump_logs`]).
    earlier_logs: BTreeMap<u64, Vec<String>>,
    /// The namespaces the nodes run in (none on loopback); dropped after the nodes.
    net: Option<Netns>,
    /// The loopback ports of the member addresses, held until the nodes are gone so that
    /// nobody else takes one before its node binds it, or between a kill and a restart.
    ports: Vec<ReservedPort>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        // The processes go before their namespaces and data directories (on panic too).
        self.nodes.clear();
    }
}

impl Cluster {
    /// Nodes `0..count` on loopback, on ports reserved for the cluster's life (none
    /// started yet).
    pub fn on_loopback(count: u64) -> Cluster {
        let mut ports = Vec::new();
        let mut reserve = || {
            let reserved = ReservedPort::new();
            let port = reserved.port();
            ports.push(reserved);
            port
        };
        let layouts = (0..count)
            .map(|id| {
                let (peer, amqp) = (reserve(), reserve());
                let layout = Layout {
                    member: format!("127.0.0.1:{peer}/{amqp}"),
                    listen: [
                        "--listen",
                        &format!("127.0.0.1:{amqp}"),
                        "--http",
                        "127.0.0.1:0",
                        "--cluster-listen",
                        &format!("127.0.0.1:{peer}"),
                    ]
                    .map(String::from)
                    .to_vec(),
                    wrapper: Vec::new(),
                    reach: None,
                };
                (id, layout)
            })
            .collect();
        let mut cluster = Cluster::with_layouts(layouts, None);
        cluster.ports = ports;
        cluster
    }

    /// [`Cluster::on_loopback`] with an amqps listener too: each member address gains a
    /// third part (`127.0.0.1:peer/amqp/amqps`) and each node `--listen-tls` on that port.
    /// The certificate comes with [`Cluster::serve_args`] (`--tls-cert`, `--tls-key`), the
    /// same for every node; [`Cluster::amqps`] says where a running node serves amqps.
    pub fn on_loopback_with_amqps(count: u64) -> Cluster {
        let mut cluster = Cluster::on_loopback(count);
        for layout in cluster.layouts.values_mut() {
            let reserved = ReservedPort::new();
            let amqps = reserved.port();
            cluster.ports.push(reserved);
            layout.member.push_str(&format!("/{amqps}"));
            layout
                .listen
                .extend(["--listen-tls".to_owned(), format!("127.0.0.1:{amqps}")]);
        }
        cluster
    }

    /// How many nodes the cluster was laid out for.
    pub fn node_count(&self) -> u64 {
        self.layouts.len() as u64
    }

    /// Where running node `id` serves amqps, as it logged it (started with a certificate).
    pub fn amqps(&self, id: u64) -> SocketAddr {
        self.nodes[&id]
            .amqps
            .unwrap_or_else(|| panic!("node {id} logged no amqps listener"))
    }

    /// Nodes `0..count` (those added later included), each in its own network namespace
    /// with its own address and the same ports, linked to the others through a bridge (see
    /// `netns`; root required). None started yet.
    pub fn in_namespaces(count: u64) -> Cluster {
        let net = Netns::create(count);
        Cluster::with_layouts(net.layouts(), Some(net))
    }

    /// [`Cluster::in_namespaces`] when namespaces can be made; on loopback when not root
    /// and `ENTREPOT_TEST_ALLOW_SKIP=1` is set (the scenario still runs, without a network
    /// of its own per node); panics when not root otherwise.
    pub fn isolated(count: u64) -> Cluster {
        if netns::available() {
            return Cluster::in_namespaces(count);
        }
        eprintln!("not root and ENTREPOT_TEST_ALLOW_SKIP=1: on loopback instead of namespaces");
        Cluster::on_loopback(count)
    }

    fn with_layouts(layouts: BTreeMap<u64, Layout>, net: Option<Netns>) -> Cluster {
        Cluster {
            root: tempfile::tempdir().expect("tempdir"),
            layouts,
            peers: BTreeMap::new(),
            nodes: BTreeMap::new(),
            serve_args: Vec::new(),
            node_args: BTreeMap::new(),
            logs: Mutex::default(),
            earlier_logs: BTreeMap::new(),
            net,
            ports: Vec::new(),
        }
    }

    /// Where the nodes run: `"in namespaces"` or `"on loopback"`.
    pub fn network(&self) -> &'static str {
        match self.net {
            Some(_) => "in namespaces",
            None => "on loopback",
        }
    }

    fn namespaces(&self) -> &Netns {
        self.net
            .as_ref()
            .expect("a partition needs the nodes in namespaces (Cluster::in_namespaces)")
    }

    /// Cuts node `id` off its peers (the test still reaches it). Namespaces only.
    pub fn cut(&self, id: u64) {
        self.namespaces().cut(id);
    }

    /// Reconnects node `id` to its peers after [`Cluster::cut`].
    pub fn heal(&self, id: u64) {
        self.namespaces().heal(id);
    }

    /// Starts every node from now on with these extra `entrepot serve` flags too.
    pub fn serve_args(&mut self, args: &[&str]) {
        self.serve_args = args.iter().map(|a| a.to_string()).collect();
    }

    /// Starts `ids` as the initial members, then waits (bounded) for a leader.
    pub fn start(&mut self, ids: &[u64], timeout: Duration) -> u64 {
        for &id in ids {
            self.start_node(id, ids);
        }
        self.wait_leader(|_| true, timeout)
    }

    /// Starts node `id` with `--peers` naming `members` (without `id`, the node waits to
    /// be added).
    pub fn start_node(&mut self, id: u64, members: &[u64]) {
        let peers = members
            .iter()
            .map(|m| format!("{m}={}", self.layouts[m].member))
            .collect::<Vec<_>>()
            .join(",");
        self.peers.insert(id, peers);
        self.launch(id);
    }

    /// Starts node `id` beyond the initial `members`, joining by itself: `--auto-join`
    /// with its member address as `--cluster-advertise` (kept for its restarts).
    pub fn start_joining(&mut self, id: u64, members: &[u64]) {
        let member = self.layouts[&id].member.clone();
        let args = ["--auto-join", "--cluster-advertise", &member];
        self.node_args
            .entry(id)
            .or_default()
            .extend(args.iter().map(|a| a.to_string()));
        self.start_node(id, members);
    }

    /// Starts node `id` from now on with these extra `entrepot serve` flags too.
    pub fn node_args(&mut self, id: u64, args: &[&str]) {
        self.node_args
            .insert(id, args.iter().map(|a| a.to_string()).collect());
    }

    /// Where running node `id` serves HTTP (`/readyz`, `/cluster…`).
    pub fn http(&self, id: u64) -> SocketAddr {
        self.nodes[&id].http
    }

    /// The value of metric `series` on running node `id` (see `BrokerProcess::metric`).
    pub fn metric(&self, id: u64, series: &str) -> Option<f64> {
        self.nodes.get(&id)?.metric(series)
    }

    /// One HTTP GET of `path` on running node `id`: (status line, body); None when it
    /// does not answer.
    pub fn get(&self, id: u64, path: &str) -> Option<(String, String)> {
        self.nodes.get(&id)?.http_request("GET", path).ok()
    }

    /// The status code of node `id`'s `/readyz`, or None when it does not answer.
    pub fn readyz(&self, id: u64) -> Option<u16> {
        self.readyz_said(id).map(|(code, _)| code)
    }

    /// The status code and body (the reason, when not ready) of node `id`'s `/readyz`.
    pub fn readyz_said(&self, id: u64) -> Option<(u16, String)> {
        let (line, body) = self.nodes.get(&id)?.http_request("GET", "/readyz").ok()?;
        Some((line.split_whitespace().nth(1)?.parse().ok()?, body))
    }

    /// Runs `entrepot drain --http <node id's HTTP> --node-id <id> ARGS` (bounded by the
    /// membership change timeout); returns its exit success, stdout and stderr.
    pub fn drain_cli(&self, id: u64, args: &[&str]) -> (bool, String, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_entrepot"))
            .arg("drain")
            .args([
                "--http",
                &self.http(id).to_string(),
                "--node-id",
                &id.to_string(),
            ])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn entrepot drain");
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        while child.try_wait().expect("poll drain").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("entrepot drain {args:?} did not finish within {CHANGE_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("drain output");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts a killed node again on its data directory, with its first `--peers`.
    pub fn restart(&mut self, id: u64) {
        assert!(!self.nodes.contains_key(&id), "node {id} is still running");
        self.launch(id);
    }

    fn launch(&mut self, id: u64) {
        let layout = &self.layouts[&id];
        let dir = self.data_dir(id);
        let (program, wrapper_args) = match layout.wrapper.split_first() {
            Some((program, rest)) => (program.as_str(), rest),
            None => (env!("CARGO_BIN_EXE_entrepot"), &[][..]),
        };
        let mut command = Command::new(program);
        command.args(wrapper_args);
        if !layout.wrapper.is_empty() {
            command.arg(env!("CARGO_BIN_EXE_entrepot"));
        }
        command
            .arg("serve")
            .args(&layout.listen)
            .args(["--node-id", &id.to_string(), "--peers", &self.peers[&id]])
            .arg("--data-dir")
            .arg(&dir)
            .args(&self.serve_args)
            .args(self.node_args.get(&id).into_iter().flatten());
        let mut node = BrokerProcess::launch(command, &dir);
        let old = self.logs.lock().unwrap().insert(id, Vec::new());
        self.earlier_logs.entry(id).or_default().extend(
            old.into_iter()
                .flatten()
                .chain(["--- restarted ---".to_owned()]),
        );
        if let Some((amqp, http)) = layout.reach {
            (node.amqp, node.http) = (amqp, http);
        }
        self.nodes.insert(id, node);
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    /// Where running node `id` serves plain AMQP.
    pub fn amqp(&self, id: u64) -> SocketAddr {
        self.nodes[&id].amqp
    }

    /// SIGSTOP (`stop`) or SIGCONT: a hung node, alive to the kernel (its sockets stay
    /// open, nothing is refused) and silent to everyone.
    pub fn freeze(&self, id: u64, stop: bool) {
        let signal = if stop { "-STOP" } else { "-CONT" };
        let pid = self.nodes[&id].pid().to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
        if stop {
            // `kill` returns once the signal is sent, not once every thread stopped: a
            // thread on another core may still run (and write to its sockets) for a moment.
            // Wait until each of the process's threads is in state T (stopped).
            let deadline = Instant::now() + Duration::from_secs(5);
            while !all_threads_stopped(&pid) {
                assert!(Instant::now() < deadline, "process {pid} did not stop");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// SIGTERM, and waits (bounded) for the node's exit: a planned stop; its log is kept.
    pub fn terminate(&mut self, id: u64) -> Option<i32> {
        self.stop_with(id, BrokerProcess::terminate)
    }

    /// SIGKILL: the node gets no chance to sync or close anything.
    pub fn kill(&mut self, id: u64) {
        self.stop_with(id, |node| node.kill());
    }

    /// Waits (bounded by `timeout`) for node `id`'s process to exit by itself; once it
    /// has, the node counts as stopped (its log kept, [`Cluster::restart`] starts it
    /// again) and its exit status is returned. `None` when it still runs after `timeout`.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let node = self.nodes.get_mut(&id).expect("node running");
            if let Some(status) = node.exit_status() {
                return Some(self.stop_with(id, |_| status));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Ends node `id`'s process with `stop`, keeping everything it logged.
    fn stop_with<T>(&mut self, id: u64, stop: impl FnOnce(&mut BrokerProcess) -> T) -> T {
        let _ = self.log_lines(id);
        let mut node = self.nodes.remove(&id).expect("node running");
        let out = stop(&mut node);
        std::thread::sleep(Duration::from_millis(20));
        let lines: Vec<String> = node.drain_logs();
        self.logs
            .lock()
            .unwrap()
            .entry(id)
            .or_default()
            .extend(lines);
        out
    }

    /// Every line node `id`'s current process logged so far (empty when not running).
    pub fn log_lines(&self, id: u64) -> Vec<String> {
        let mut logs = self.logs.lock().unwrap();
        let lines = logs.entry(id).or_default();
        if let Some(node) = self.nodes.get(&id) {
            lines.extend(node.drain_logs());
        }
        lines.clone()
    }

    /// On a failed test: every node's log (all its processes) into
    /// `$CARGO_TARGET_TMPDIR/cluster-logs/<test>/node-<id>.log`, named on stderr with the
    /// last lines of each.
    fn dump_logs(&self) {
        const TAIL: usize = 15;
        let test = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .replace("::", "-");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("cluster-logs")
            .join(test);
        let _ = std::fs::create_dir_all(&dir);
        let ids: Vec<u64> = self.layouts.keys().copied().collect();
        for id in ids {
            let mut lines = self.earlier_logs.get(&id).cloned().unwrap_or_default();
            lines.extend(self.log_lines(id));
            let file = dir.join(format!("node-{id}.log"));
            let _ = std::fs::write(&file, lines.join("\n"));
            eprintln!(
                "--- node {id}: {} lines in {}; the last:",
                lines.len(),
                file.display()
            );
            for line in &lines[lines.len().saturating_sub(TAIL)..] {
                eprintln!("  {line}");
            }
        }
    }

    /// How many lines node `id`'s current process logged that contain `needle`.
    pub fn log_count(&self, id: u64, needle: &str) -> usize {
        self.log_lines(id)
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits (bounded) until node `id` logged `needle` at least `n` times; panics with the
    /// count after `timeout`.
    pub fn wait_log(&self, id: u64, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.log_count(id, needle);
            if count >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} logged {needle:?} {count} times within {timeout:?}, expected {n}; \
                 status: {:?}",
                self.status(id)
            );
            std::thread::sleep(POLL);
        }
    }

    pub fn running(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// AMQP URLs of `ids`, in order (running or not: a producer skips dead ones).
    pub fn urls(&self, ids: &[u64]) -> Vec<String> {
        ids.iter()
            .map(|id| match (self.nodes.get(id), self.layouts[id].reach) {
                (Some(n), _) => n.url(),
                (None, Some((amqp, _))) => format!("amqp://{amqp}"),
                (None, None) => {
                    let amqp_port = self.layouts[id].member.split('/').nth(1).unwrap_or("0");
                    format!("amqp://127.0.0.1:{amqp_port}")
                }
            })
            .collect()
    }

    /// Node `id`'s `GET /cluster`, or None when it does not answer.
    pub fn status(&self, id: u64) -> Option<Status> {
        let (line, body) = self.nodes.get(&id)?.http_request("GET", "/cluster").ok()?;
        line.contains("200").then(|| Status::parse(&body)).flatten()
    }

    /// Polls the running nodes every [`POLL`] until one of them reports `role: leader` and
    /// `accept(id)`; returns its id.
    pub fn wait_leader(&self, accept: impl Fn(u64) -> bool, timeout: Duration) -> u64 {
        self.wait_status(|id, s| accept(id) && s.role == "leader", timeout)
    }

    /// Polls the running nodes every [`POLL`] until one's status satisfies `pred`; returns
    /// its id.
    pub fn wait_status(&self, pred: impl Fn(u64, &Status) -> bool, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            for id in self.running() {
                if self.status(id).is_some_and(|s| pred(id, &s)) {
                    return id;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no node as expected within {timeout:?}; statuses: {:?}",
                self.statuses()
            );
            std::thread::sleep(POLL);
        }
    }

    /// The current leader's term (waits, bounded, for a leader).
    pub fn leader_term(&self, timeout: Duration) -> u64 {
        let leader = self.wait_leader(|_| true, timeout);
        self.status(leader).map_or(0, |s| s.term)
    }

    /// After a consumer settled its deliveries: waits until every node converged with
    /// nothing left uncommitted, and tells whether the leadership stayed in `term` all
    /// along. If it did, every acknowledgement is committed and no consumed message may
    /// come back; if not, the acknowledgements a deposed leader held may be lost with it
    /// (the consumer settled first, so it was never told), and consumed messages may come
    /// back once — at-least-once, as the issue allows.
    pub fn settle_consumption(&self, term: u64, timeout: Duration) -> bool {
        let all = self.wait_converged(timeout);
        let kept = all.values().flatten().all(|s| s.term == term);
        if !kept {
            eprintln!(
                "the leadership changed while consuming (term {term} → {:?}): consumed \
                 messages may come back once",
                all.values().flatten().map(|s| s.term).max()
            );
        }
        kept
    }
    /// In `cluster-mode: groups`: the addresses each of `ids` says it leads (the
    /// `led-addresses` of its `/status`; a node that does not answer leads none here).
    pub fn led_addresses(&self, ids: &[u64]) -> BTreeMap<u64, Vec<String>> {
        ids.iter()
            .map(|&id| {
                let yaml = self.get(id, "/status").map(|(_, b)| b).unwrap_or_default();
                (id, led_addresses_in(&yaml))
            })
            .collect()
    }

    pub fn statuses(&self) -> BTreeMap<u64, Option<Status>> {
        self.running()
            .into_iter()
            .map(|id| (id, self.status(id)))
            .collect()
    }

    /// `entrepot cluster add`: node `id` joins as a learner, catches up, becomes a voter.
    pub fn add(&self, id: u64) {
        let addr = self.layouts[&id].member.clone();
        self.cluster_cli(&["add", "--id", &id.to_string(), "--addr", &addr]);
    }

    /// `entrepot cluster remove`.
    pub fn remove(&self, id: u64) {
        self.cluster_cli(&["remove", "--id", &id.to_string()]);
    }

    fn cluster_cli(&self, args: &[&str]) {
        let http: Vec<String> = self.nodes.values().map(|n| n.http.to_string()).collect();
        let mut child = Command::new(env!("CARGO_BIN_EXE_entrepot"))
            .arg("cluster")
            .args(args)
            .args(["--http", &http.join(",")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn entrepot cluster");
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        while child.try_wait().expect("poll cli").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("entrepot cluster {args:?} did not finish within {CHANGE_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("cli output");
        assert!(
            out.status.success(),
            "entrepot cluster {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until every running node reports the same last log index and last applied
    /// index, and exactly one leads; returns every node's status.
    pub fn wait_converged(&self, timeout: Duration) -> BTreeMap<u64, Option<Status>> {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.statuses();
            let marks: HashSet<Option<(i64, i64)>> = all
                .values()
                .map(|s| s.as_ref().map(|s| (s.last_log_index, s.last_applied)))
                .collect();
            let leaders = all
                .values()
                .flatten()
                .filter(|s| s.role == "leader")
                .count();
            let same = marks.len() == 1 && !marks.contains(&None);
            // Nothing the leader recorded is still waiting for Raft (an acknowledgement
            // the broker took but did not submit yet would otherwise be missed here).
            let drained = all
                .values()
                .flatten()
                .all(|s| s.uncommitted_ops.unwrap_or(0) == 0);
            if same && leaders == 1 && drained {
                return all;
            }
            assert!(
                Instant::now() < deadline,
                "nodes did not converge within {timeout:?}: {all:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What the producers record.
#[derive(Default)]
struct Record {
    /// Sequence number → when it was accepted and when its connection was opened.
    accepted: HashMap<u64, (Instant, Instant)>,
    /// Sequence numbers sent more than once (after a broken connection).
    resent: HashSet<u64>,
}

/// Producers sending `seqs` to a queue through a list of nodes until every one is
/// accepted (or [`Load::stop`]).
pub struct Load {
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What a finished load accepted.
pub struct Accepted {
    pub seqs: HashSet<u64>,
    pub resent: HashSet<u64>,
}

#[derive(Clone)]
pub struct LoadConfig {
    pub queue: String,
    /// Nodes to connect to, tried in turn after each broken connection.
    pub urls: Vec<String>,
    pub seqs: std::ops::Range<u64>,
    pub producers: u64,
    pub in_flight: usize,
}

impl Load {
    pub fn start(rt: &tokio::runtime::Runtime, config: LoadConfig) -> Load {
        let record = Arc::new(Mutex::new(Record::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..config.producers)
            .map(|k| {
                let todo: VecDeque<u64> = config
                    .seqs
                    .clone()
                    .filter(|s| s % config.producers == k)
                    .collect();
                let producer = Producer {
                    config: config.clone(),
                    first_url: k as usize,
                    record: Arc::clone(&record),
                    stop: Arc::clone(&stop),
                };
                rt.spawn(producer.run(todo))
            })
            .collect();
        Load {
            record,
            stop,
            tasks,
        }
    }

    pub fn accepted_count(&self) -> usize {
        self.record.lock().unwrap().accepted.len()
    }

    /// Blocks until at least `n` messages are accepted; panics after `timeout`.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.accepted_count() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} messages accepted within {timeout:?}",
                self.accepted_count()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The first acceptance on a connection opened after `t`.
    pub fn first_acceptance_after(&self, t: Instant) -> Option<Instant> {
        let record = self.record.lock().unwrap();
        record
            .accepted
            .values()
            .filter(|(_, opened)| *opened > t)
            .map(|(at, _)| *at)
            .min()
    }

    /// Asks the producers to stop after their current round.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Waits (bounded) until the producers are done, then returns what was accepted.
    pub fn finish(mut self, rt: &tokio::runtime::Runtime, timeout: Duration) -> Accepted {
        let finished = rt.block_on(async {
            tokio::time::timeout(timeout, async {
                for t in self.tasks.iter_mut() {
                    let _ = t.await;
                }
            })
            .await
        });
        if finished.is_err() {
            self.stop();
            for t in &self.tasks {
                t.abort();
            }
        }
        let record = self.record.lock().unwrap();
        let accepted = Accepted {
            seqs: record.accepted.keys().copied().collect(),
            resent: record.resent.clone(),
        };
        assert!(
            finished.is_ok(),
            "producers not done within {timeout:?} ({} accepted)",
            accepted.seqs.len()
        );
        accepted
    }
}

/// One producer task.
struct Producer {
    config: LoadConfig,
    first_url: usize,
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
}

impl Producer {
    async fn run(self, mut todo: VecDeque<u64>) {
        let mut attempt = self.first_url;
        while !todo.is_empty() && !self.stop.load(Ordering::Relaxed) {
            let url = &self.config.urls[attempt % self.config.urls.len()];
            attempt += 1;
            let opened = Instant::now();
            let Some((conn, session, sender)) = self.attach(url).await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let unaccepted = self.round(&conn, sender, &mut todo, opened).await;
            // Resend first what this connection did not get accepted.
            let mut record = self.record.lock().unwrap();
            for seq in unaccepted.into_iter().rev() {
                record.resent.insert(seq);
                todo.push_front(seq);
            }
            drop(record);
            drop(session);
            drop(conn);
        }
    }

    async fn attach(&self, url: &str) -> Option<(ConnectionHandle<()>, SessionHandle<()>, Sender)> {
        let open = async {
            let mut conn = Connection::open("cluster-producer", url).await.ok()?;
            let mut session = Session::begin(&mut conn).await.ok()?;
            let sender = Sender::attach(&mut session, "producer", self.config.queue.as_str())
                .await
                .ok()?;
            Some((conn, session, sender))
        };
        tokio::time::timeout(CLIENT_OP_TIMEOUT, open)
            .await
            .ok()
            .flatten()
    }

    /// Sends from `todo` until it is empty or the connection breaks; returns the sequence
    /// numbers sent but not accepted (oldest first).
    async fn round(
        &self,
        conn: &ConnectionHandle<()>,
        mut sender: Sender,
        todo: &mut VecDeque<u64>,
        opened: Instant,
    ) -> Vec<u64> {
        let window = Arc::new(Semaphore::new(self.config.in_flight));
        let (broken_tx, mut broken) = watch::channel(false);
        let broken_tx = Arc::new(broken_tx);
        let mut outcomes = JoinSet::new();
        let mut sent = Vec::new();
        while let Some(seq) = todo.pop_front() {
            let permit = tokio::select! {
                p = tokio::time::timeout(CLIENT_OP_TIMEOUT, Arc::clone(&window).acquire_owned()) => p,
                _ = broken_or_closed(&mut broken, conn) => { todo.push_front(seq); break }
            };
            let Ok(Ok(permit)) = permit else {
                todo.push_front(seq);
                break;
            };
            if self.stop.load(Ordering::Relaxed) {
                todo.push_front(seq);
                break;
            }
            let send = tokio::select! {
                s = tokio::time::timeout(CLIENT_OP_TIMEOUT, sender.send_batchable(message(seq))) => s,
                _ = broken_or_closed(&mut broken, conn) => { todo.push_front(seq); break }
            };
            let Ok(Ok(outcome)) = send else {
                todo.push_front(seq);
                break;
            };
            sent.push(seq);
            let (record, broken_tx) = (Arc::clone(&self.record), Arc::clone(&broken_tx));
            outcomes.spawn(async move {
                match tokio::time::timeout(CLIENT_OP_TIMEOUT, outcome).await {
                    Ok(Ok(Outcome::Accepted(_))) => {
                        let mut r = record.lock().unwrap();
                        r.accepted.insert(seq, (Instant::now(), opened));
                    }
                    _ => {
                        broken_tx.send_replace(true);
                    }
                }
                drop(permit);
            });
        }
        // Wait for the outcomes still coming, unless the connection is already broken.
        tokio::select! {
            _ = async { while outcomes.join_next().await.is_some() {} } => {}
            _ = broken_or_closed(&mut broken, conn) => {}
        }
        outcomes.abort_all();
        drop(sender);
        let record = self.record.lock().unwrap();
        sent.retain(|s| !record.accepted.contains_key(s));
        sent
    }
}

/// Returns once an outcome failed or the connection's event loop stopped (fe2o3 may leave
/// outcomes of a dead connection pending; this notices the death at once).
async fn broken_or_closed(broken: &mut watch::Receiver<bool>, conn: &ConnectionHandle<()>) {
    let closed = async {
        while !conn.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        _ = broken.wait_for(|b| *b) => {}
        _ = closed => {}
    }
}

/// Receives from `queue` through `url` until every sequence number of `expected` arrived
/// and the queue stayed quiet for a second (bounded by `timeout`); accepts each message,
/// checks its body, and returns how often each sequence number came.
pub async fn drain(
    url: &str,
    queue: &str,
    expected: &HashSet<u64>,
    timeout: Duration,
) -> HashMap<u64, u32> {
    let source = fe2o3_amqp::types::messaging::Source::builder()
        .address(queue)
        .build();
    drain_from(url, "drain", "drain", source, expected, timeout).await
}

/// [`drain`] from any source (a durable subscription: `container` and `link` name it),
/// through a connection with container id `container`; closes the link at the end.
pub async fn drain_from(
    url: &str,
    container: &str,
    link: &str,
    source: fe2o3_amqp::types::messaging::Source,
    expected: &HashSet<u64>,
    timeout: Duration,
) -> HashMap<u64, u32> {
    let mut received: HashMap<u64, u32> = HashMap::new();
    // Received on a connection that then broke (a leadership change closes it): their
    // acceptance may not have committed, so seeing them again is at-least-once
    // redelivery, not a duplicate in the store.
    let mut before_break: HashSet<u64> = HashSet::new();
    let mut redelivered = 0u32;
    let deadline = tokio::time::Instant::now() + timeout;
    'connections: while tokio::time::Instant::now() < deadline {
        let attached = attach_receiver(url, container, link, &source).await;
        let (mut conn, mut session, mut receiver) = match attached {
            Ok(a) => a,
            Err(e) => {
                eprintln!("drain: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            let complete = expected.iter().all(|s| received.contains_key(s));
            let wait = if complete {
                Duration::from_secs(1)
            } else {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            };
            let Ok(delivery) = tokio::time::timeout(wait, receiver.recv::<Data>()).await else {
                let _ = receiver.close().await;
                let _ = session.end().await;
                let _ = conn.close().await;
                break 'connections;
            };
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("drain: connection lost ({e}); reconnecting");
                    before_break.extend(received.keys().copied());
                    continue 'connections;
                }
            };
            let seq = seq_of(delivery.message());
            assert!(
                delivery.body().0.as_slice() == body(seq).as_slice(),
                "body of message {seq} is corrupt"
            );
            if before_break.remove(&seq) {
                redelivered += 1;
            } else {
                *received.entry(seq).or_default() += 1;
            }
            if let Err(e) = receiver.accept(&delivery).await {
                eprintln!("drain: accept failed ({e}); reconnecting");
                before_break.extend(received.keys().copied());
                continue 'connections;
            }
        }
    }
    if redelivered > 0 {
        eprintln!("drain: {redelivered} redelivered after a broken connection (at-least-once)");
    }
    received
}

/// A receiver on link `link` from `source`, through a connection to `url` with container
/// id `container`; the error says which step failed.
async fn attach_receiver(
    url: &str,
    container: &str,
    link: &str,
    source: &fe2o3_amqp::types::messaging::Source,
) -> Result<(ConnectionHandle<()>, SessionHandle<()>, Receiver), String> {
    let mut conn = tokio::time::timeout(
        CLIENT_OP_TIMEOUT,
        Connection::builder().container_id(container).open(url),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| format!("connect: {e}"))?;
    let mut session = Session::begin(&mut conn)
        .await
        .map_err(|e| format!("begin: {e}"))?;
    let receiver = Receiver::builder()
        .name(link)
        .source(source.clone())
        .attach(&mut session)
        .await
        .map_err(|e| format!("attach: {e}"))?;
    Ok((conn, session, receiver))
}

/// Receives `n` messages from `source` through `url` (connection container id
/// `container`, link `link`), accepts each, then detaches the link (a durable
/// subscription stays); returns the sequence numbers accepted. Deliveries prefetched
/// but not accepted go back to the queue or subscription when the link detaches.
///
/// A broken connection (a leader that stopped hearing its majority closes its clients)
/// is reconnected, bounded by `timeout`; a message consumed before the break may come
/// again (its acceptance may not have committed), and one in `resent` may have been
/// stored twice: either is received again without failing. Any other message delivered
/// twice fails.
pub async fn consume(
    url: &str,
    container: &str,
    link: &str,
    source: fe2o3_amqp::types::messaging::Source,
    n: usize,
    resent: &HashSet<u64>,
    timeout: Duration,
) -> HashSet<u64> {
    let mut consumed = HashSet::new();
    // Consumed on a connection that then broke.
    let mut before_break: HashSet<u64> = HashSet::new();
    let deadline = tokio::time::Instant::now() + timeout;
    'connections: loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "consume: only {} of {n} within {timeout:?}",
            consumed.len()
        );
        let (mut conn, mut session, mut receiver) =
            match attach_receiver(url, container, link, &source).await {
                Ok(attached) => attached,
                Err(e) => {
                    eprintln!("consume: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
        while consumed.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let delivery = match tokio::time::timeout(left, receiver.recv::<Data>()).await {
                Err(_) => panic!("consume: only {} of {n} within {timeout:?}", consumed.len()),
                Ok(Err(e)) => {
                    eprintln!("consume: connection lost ({e}); reconnecting");
                    before_break.extend(consumed.iter().copied());
                    continue 'connections;
                }
                Ok(Ok(delivery)) => delivery,
            };
            let seq = seq_of(delivery.message());
            assert!(
                delivery.body().0.as_slice() == body(seq).as_slice(),
                "body of message {seq} is corrupt"
            );
            assert!(
                consumed.insert(seq) || before_break.contains(&seq) || resent.contains(&seq),
                "message {seq} delivered twice (sent once, no broken connection since)"
            );
            if let Err(e) = receiver.accept(&delivery).await {
                // Whether the broker got the acceptance is unknown: counted as consumed,
                // and seeing it again is redelivery.
                eprintln!("consume: accept failed ({e}); reconnecting");
                before_break.extend(consumed.iter().copied());
                continue 'connections;
            }
        }
        receiver
            .detach()
            .await
            .map_err(|(_, e)| e)
            .expect("consume: detach");
        let _ = session.end().await;
        let _ = conn.close().await;
        return consumed;
    }
}

/// The oracle: every accepted sequence number was received; one received twice was sent
/// twice (at-least-once after a broken connection), never otherwise.
pub fn assert_none_lost(accepted: &Accepted, received: &HashMap<u64, u32>) {
    let mut lost: Vec<u64> = accepted
        .seqs
        .iter()
        .filter(|s| !received.contains_key(s))
        .copied()
        .collect();
    lost.sort_unstable();
    assert!(
        lost.is_empty(),
        "{} accepted messages lost (of {}), e.g. {:?}",
        lost.len(),
        accepted.seqs.len(),
        &lost[..lost.len().min(20)]
    );
    let mut doubled: Vec<u64> = received
        .iter()
        .filter(|(s, n)| **n > 1 && !accepted.resent.contains(s))
        .map(|(s, _)| *s)
        .collect();
    doubled.sort_unstable();
    assert!(
        doubled.is_empty(),
        "sent once but received more than once: {:?}",
        &doubled[..doubled.len().min(20)]
    );
    let extra = received.len() - accepted.seqs.len();
    let duplicates: u32 = received.values().map(|n| n - 1).sum();
    eprintln!(
        "oracle: {} accepted, all received; {extra} received beyond them (sent, outcome \
         lost), {duplicates} duplicates of resent messages",
        accepted.seqs.len()
    );
}

pub fn message(seq: u64) -> Message<Data> {
    Message::builder()
        .header(Header::builder().durable(true).build())
        .application_properties(ApplicationProperties::builder().insert("seq", seq).build())
        .data(Binary::from(body(seq)))
        .build()
}

/// [`BODY_BYTES`] derived from `seq`, so a mixed-up or torn body shows.
fn body(seq: u64) -> Vec<u8> {
    (0..BODY_BYTES)
        .map(|i| (seq.rotate_left(i as u32 % 64) as u8) ^ (i as u8))
        .collect()
}

pub fn seq_of(m: &Message<Data>) -> u64 {
    match m
        .application_properties
        .as_ref()
        .and_then(|p| p.0.get("seq"))
    {
        Some(SimpleValue::Ulong(seq)) => *seq,
        other => panic!("message without a ulong seq property: {other:?}"),
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc/<pid>/task/*/stat`).
fn all_threads_stopped(pid: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        })
    })
}

/// The addresses a groups-mode node's `/status` says it leads (its `led-addresses`).
pub fn led_addresses_in(status: &str) -> Vec<String> {
    status
        .lines()
        .filter_map(|l| l.split("address: \"").nth(1)?.split('"').next())
        .map(str::to_owned)
        .collect()
}
