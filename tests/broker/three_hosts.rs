//! Three real `entrepot_cluster::Host`s in this process with one address group whose
//! machine is the broker's `AddressMachine`: the setup that `address_group.rs` and
//! `group_store.rs` share. Each host has its own temporary directory (node log with an
//! fsync per commit) and its own `127.0.0.1:0` peer port; a restart is
//! `Host::shutdown` then `Host::start` on the same directory and port. Every wait is
//! bounded by [`WAIT`]; nothing is timed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use entrepot::raft::address_machine::AddressMachine;
use entrepot_cluster::{GroupHandle, HibernationConfig, Host, HostConfig, NodeId};
use entrepot_storage::{LogConfig, SyncPolicy};
use tokio::net::TcpListener;

pub const NODES: u64 = 3;
pub const GROUP: u64 = 1;
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Node {
    pub host: Host,
    /// The machine of [`GROUP`].
    pub machine: AddressMachine,
    /// Every open group's machine ([`GROUP`]'s too).
    pub machines: BTreeMap<u64, AddressMachine>,
}

pub struct Cluster {
    pub nodes: BTreeMap<NodeId, Node>,
    pub addrs: BTreeMap<NodeId, String>,
    pub dirs: BTreeMap<NodeId, tempfile::TempDir>,
    /// The groups every host opens (`[GROUP]` unless started with others).
    pub groups: Vec<u64>,
    /// The hosts' hibernation (`None`, the host's default: off).
    pub hibernation: Option<HibernationConfig>,
}

pub fn config(node: NodeId, dir: &Path) -> HostConfig {
    let mut c = HostConfig::new(node, dir);
    c.log = LogConfig {
        segment_bytes: 1 << 20,
        record_bytes_max: 512 << 10,
        sync: SyncPolicy::Always,
        ..LogConfig::default()
    };
    // Slower than the broker's: nine replicas share two busy cores in a debug build.
    c.heartbeat = Duration::from_millis(100);
    c.election_timeout = Duration::from_millis(800)..Duration::from_millis(1600);
    c.snapshot_every = u64::MAX;
    c.purge_keep = 0;
    c.propose_timeout = Duration::from_secs(10);
    c
}

/// A host with `groups` open, each with a fresh `AddressMachine`.
pub async fn start_node_with(
    id: NodeId,
    dir: &Path,
    listener: TcpListener,
    groups: &[u64],
    hibernation: Option<HibernationConfig>,
) -> Node {
    let mut config = config(id, dir);
    config.hibernation = hibernation;
    let host = Host::start(config, listener).unwrap();
    let mut machines = BTreeMap::new();
    for &g in groups {
        let machine = AddressMachine::new();
        host.open_group(g, machine.clone()).await.unwrap();
        machines.insert(g, machine);
    }
    let machine = machines.get(&GROUP).cloned().unwrap_or_default();
    Node {
        host,
        machine,
        machines,
    }
}

impl Cluster {
    pub async fn start() -> Cluster {
        Cluster::start_with(&[GROUP]).await
    }

    /// Three hosts with `groups` open on each, every group formed by node 0.
    pub async fn start_with(groups: &[u64]) -> Cluster {
        Cluster::start_hibernating(groups, None).await
    }

    /// [`Cluster::start_with`] with every host hibernating idle groups as `hibernation`
    /// says.
    pub async fn start_hibernating(
        groups: &[u64],
        hibernation: Option<HibernationConfig>,
    ) -> Cluster {
        let mut listeners = BTreeMap::new();
        for id in 0..NODES {
            listeners.insert(id, TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs: BTreeMap<NodeId, String> = listeners
            .iter()
            .map(|(id, l)| (*id, l.local_addr().unwrap().to_string()))
            .collect();
        let mut nodes = BTreeMap::new();
        let mut dirs = BTreeMap::new();
        for (id, listener) in listeners {
            let dir = tempfile::tempdir().unwrap();
            let node = start_node_with(id, dir.path(), listener, groups, hibernation).await;
            nodes.insert(id, node);
            dirs.insert(id, dir);
        }
        let c = Cluster {
            nodes,
            addrs,
            dirs,
            groups: groups.to_vec(),
            hibernation,
        };
        for &g in groups {
            c.handle_of(0, g).bootstrap(&c.addrs).await.unwrap();
        }
        c
    }

    /// Host `n`'s handle of group `g`.
    pub fn handle_of(&self, n: NodeId, g: u64) -> GroupHandle {
        self.nodes[&n].host.group(g).unwrap()
    }

    /// Host `n`'s machine of group `g`.
    pub fn machine_of(&self, n: NodeId, g: u64) -> AddressMachine {
        self.nodes[&n].machines[&g].clone()
    }

    /// Waits for a leader of group `g` among the running hosts; its id.
    pub async fn leader_of(&self, g: u64) -> NodeId {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let leads = |n: &NodeId| self.handle_of(*n, g).leadership().borrow().leads;
            if let Some(n) = self.nodes.keys().copied().find(leads) {
                return n;
            }
            assert!(tokio::time::Instant::now() < deadline, "no leader of {g}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn handle(&self, n: NodeId) -> GroupHandle {
        self.nodes[&n].host.group(GROUP).unwrap()
    }

    pub fn machine(&self, n: NodeId) -> AddressMachine {
        self.nodes[&n].machine.clone()
    }

    /// The handle of the leader among the running hosts, once there is one.
    pub async fn leader(&self) -> GroupHandle {
        self.handle(self.leader_id().await)
    }

    /// Waits for a leader among the running hosts; its id.
    pub async fn leader_id(&self) -> NodeId {
        self.agreed_leader(0).await.0
    }

    /// A leader in a term above `above` that the others agree on: every running member
    /// whose group instance runs names it in that term, and at least one other member does
    /// (when another is running). Returns its id and term. Not just any node that believes
    /// it leads: a restarted host may for a moment believe it still leads its old term, and
    /// a follower may not have heard of a new leader yet.
    pub async fn agreed_leader(&self, above: u64) -> (NodeId, u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let views: BTreeMap<NodeId, _> = self
                .nodes
                .keys()
                .map(|&n| {
                    let h = self.handle(n);
                    let view = *h.leadership().borrow();
                    (n, (view, h.is_running()))
                })
                .collect();
            let agreed = views.iter().find(|(n, (l, _))| {
                let follows = |m: &NodeId, o: &entrepot_cluster::Leadership| {
                    m != *n && o.leader == Some(**n) && o.term == l.term
                };
                l.leads
                    && l.term > above
                    && views
                        .iter()
                        .all(|(m, (o, running))| m == *n || !running || follows(m, o))
                    && (views.len() == 1 || views.iter().any(|(m, (o, _))| follows(m, o)))
            });
            if let Some((n, (l, _))) = agreed {
                return (*n, l.term);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no agreed leader above term {above}: {views:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every running member applied `index`.
    pub async fn applied_everywhere(&self, index: u64) {
        for &n in self.nodes.keys() {
            let mut applied = self.handle(n).applied();
            tokio::time::timeout(WAIT, applied.wait_for(|a| a.is_some_and(|a| a >= index)))
                .await
                .unwrap_or_else(|_| panic!("node {n} did not apply {index}"))
                .unwrap();
        }
    }

    /// Every running member's index equals the first one's.
    pub fn agree(&self, when: &str) {
        let mut running = self.nodes.keys().copied();
        let Some(first) = running.next() else { return };
        let index = self.machine(first).index();
        for n in running {
            assert_eq!(self.machine(n).index(), index, "node {n} {when}");
        }
    }

    pub async fn restart_all(&mut self) {
        for n in 0..NODES {
            let node = self.nodes.remove(&n).unwrap();
            node.host.shutdown().await;
        }
        for n in 0..NODES {
            let listener = TcpListener::bind(&self.addrs[&n]).await.unwrap();
            let dir = self.dirs[&n].path().to_path_buf();
            let node = start_node_with(n, &dir, listener, &self.groups, self.hibernation).await;
            self.nodes.insert(n, node);
        }
    }
}

impl Cluster {
    /// Shuts host `n` down (its directory and port stay for [`Cluster::start_again`]).
    pub async fn stop(&mut self, n: NodeId) {
        if let Some(node) = self.nodes.remove(&n) {
            node.host.shutdown().await;
        }
    }

    /// Starts host `n` again on its directory and port.
    pub async fn start_again(&mut self, n: NodeId) {
        let listener = TcpListener::bind(&self.addrs[&n]).await.unwrap();
        let dir = self.dirs[&n].path().to_path_buf();
        let node = start_node_with(n, &dir, listener, &self.groups, self.hibernation).await;
        self.nodes.insert(n, node);
    }

    pub async fn shutdown(mut self) {
        for (_, node) in std::mem::take(&mut self.nodes) {
            node.host.shutdown().await;
        }
    }
}

/// True when `bytes` lie inside a file mapping under `dir` (`/proc/self/maps`): the
/// payload is a slice of a node-log segment's mapping, not a copy.
pub fn mapped_under(bytes: &Bytes, dir: &Path) -> bool {
    let start = bytes.as_ptr() as usize;
    let end = start + bytes.len();
    let dir = dir.canonicalize().unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let range = fields.next().unwrap_or("");
        let path = line.split_whitespace().nth(5).unwrap_or("");
        let Some((lo, hi)) = range.split_once('-') else {
            return false;
        };
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).unwrap(),
            usize::from_str_radix(hi, 16).unwrap(),
        );
        lo <= start && end <= hi && Path::new(path).starts_with(&dir)
    })
}
