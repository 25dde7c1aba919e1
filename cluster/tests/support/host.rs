//! What the host tests share (`host_groups.rs`, `host_hibernation.rs`): a toy queue as the
//! groups' state machine and three `Host`s in this process, each on its own temporary
//! directory (real node log, fsync on every commit) and its own `127.0.0.1:0` peer port.
//!
//! The queue: a proposal is a message (`M` + body) or an ack range (`A` + from + to,
//! message positions), its snapshot the set of live message positions (never their
//! bytes). Stopping a node is `Host::shutdown` (its port closes as on a crash);
//! restarting is `Host::start` on the same directory and port. Every wait is bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use entrepot_cluster::{
    GroupHandle, GroupMachine, HibernationConfig, Host, HostConfig, MachineError, NodeId, Position,
};
use entrepot_storage::LogConfig;
use tokio::net::TcpListener;

pub const NODES: u64 = 3;
pub const WAIT: Duration = Duration::from_secs(20);
pub const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// A proposal's bound in these tests: long against a loaded debug build's commit, short
/// enough for the test that waits it out.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// The toy queue machine.

#[derive(Clone, Default)]
pub struct Queue {
    pub state: Arc<Mutex<QueueState>>,
}

#[derive(Default, Debug)]
pub struct QueueState {
    pub live: BTreeSet<Position>,
    pub next: u64,
    /// `last_index` of every restore, in order.
    pub restores: Vec<u64>,
    /// Positions applied since start (after any restore).
    pub applied: Vec<Position>,
}

pub fn message(body: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(1 + body.len());
    b.push(b'M');
    b.extend_from_slice(body);
    Bytes::from(b)
}

/// Acknowledges the messages at `from..to`.
pub fn ack(from: Position, to: Position) -> Bytes {
    let mut b = Vec::with_capacity(ACK_LEN);
    b.push(b'A');
    for p in [from, to] {
        b.put_u64_le(p.index);
        b.put_u32_le(p.slot);
    }
    Bytes::from(b)
}

pub const ACK_LEN: usize = 1 + 2 * 12;

pub fn get_position(r: &mut &[u8]) -> Position {
    Position::new(r.get_u64_le(), r.get_u32_le())
}

impl Queue {
    pub fn live(&self) -> BTreeSet<Position> {
        self.state.lock().unwrap().live.clone()
    }
    pub fn restores(&self) -> Vec<u64> {
        self.state.lock().unwrap().restores.clone()
    }
    pub fn applied(&self) -> Vec<Position> {
        self.state.lock().unwrap().applied.clone()
    }
}

impl GroupMachine for Queue {
    fn apply(&mut self, at: Position, payload: Bytes) -> Result<(), MachineError> {
        let mut s = self.state.lock().unwrap();
        match payload.first() {
            Some(b'M') => {
                s.live.insert(at);
            }
            Some(b'A') if payload.len() == ACK_LEN => {
                let mut r = &payload[1..];
                let (from, to) = (get_position(&mut r), get_position(&mut r));
                s.live.retain(|p| !(from..to).contains(p));
            }
            _ => return Err(MachineError::msg(format!("bad proposal at {at:?}"))),
        }
        s.next = at.index + 1;
        s.applied.push(at);
        Ok(())
    }

    fn snapshot(&self) -> Result<Bytes, MachineError> {
        let s = self.state.lock().unwrap();
        let mut b = Vec::new();
        b.put_u64_le(s.next);
        for p in &s.live {
            b.put_u64_le(p.index);
            b.put_u32_le(p.slot);
        }
        Ok(Bytes::from(b))
    }

    fn restore(&mut self, last_index: u64, state: Bytes) -> Result<(), MachineError> {
        let mut s = self.state.lock().unwrap();
        let mut r = &state[..];
        if r.len() < 8 || (r.len() - 8) % 12 != 0 {
            return Err(MachineError::msg("bad queue snapshot"));
        }
        s.next = r.get_u64_le();
        s.live =
            std::iter::from_fn(|| (r.remaining() >= 12).then(|| get_position(&mut r))).collect();
        s.restores.push(last_index);
        s.next = s.next.max(last_index + 1);
        Ok(())
    }

    fn lowest_needed(&self) -> u64 {
        let s = self.state.lock().unwrap();
        s.live.first().map_or(s.next, |p| p.index)
    }
}

// ---------------------------------------------------------------------------------------
// Three hosts.

pub struct Node {
    pub host: Host,
    pub queues: BTreeMap<u64, Queue>,
}

pub struct Cluster {
    pub nodes: BTreeMap<NodeId, Node>,
    pub addrs: BTreeMap<NodeId, String>,
    pub dirs: BTreeMap<NodeId, tempfile::TempDir>,
    pub groups: Vec<u64>,
    pub snapshot_every: u64,
    /// The hosts' hibernation (`None`: off, the host's default).
    pub hibernation: Option<HibernationConfig>,
}

pub fn config(
    node: NodeId,
    dir: &Path,
    snapshot_every: u64,
    hibernation: Option<HibernationConfig>,
) -> HostConfig {
    let mut c = HostConfig::new(node, dir);
    c.log = LogConfig {
        segment_bytes: 1 << 20,
        record_bytes_max: 512 << 10,
        ..LogConfig::default()
    };
    // Slower than the broker's: nine replicas share two busy cores in a debug build.
    c.heartbeat = Duration::from_millis(100);
    c.election_timeout = Duration::from_millis(800)..Duration::from_millis(1600);
    c.snapshot_every = snapshot_every;
    c.purge_keep = 0;
    c.propose_timeout = PROPOSE_TIMEOUT;
    c.hibernation = hibernation;
    c
}

pub async fn start_node(
    id: NodeId,
    dir: &Path,
    listener: TcpListener,
    groups: &[u64],
    snapshot_every: u64,
) -> Node {
    start_node_with(id, dir, listener, groups, snapshot_every, None).await
}

/// [`start_node`] with a hibernation.
pub async fn start_node_with(
    id: NodeId,
    dir: &Path,
    listener: TcpListener,
    groups: &[u64],
    snapshot_every: u64,
    hibernation: Option<HibernationConfig>,
) -> Node {
    let host = Host::start(config(id, dir, snapshot_every, hibernation), listener).unwrap();
    let mut queues = BTreeMap::new();
    for &g in groups {
        let q = Queue::default();
        host.open_group(g, q.clone()).await.unwrap();
        queues.insert(g, q);
    }
    Node { host, queues }
}

impl Cluster {
    /// Three hosts with `groups` each, every group formed by node `g % 3`; returns once
    /// every group has a leader.
    pub async fn start(groups: &[u64], snapshot_every: u64) -> Cluster {
        Cluster::start_with(groups, snapshot_every, None).await
    }

    /// [`Cluster::start`] with every host hibernating idle groups as `hibernation` says.
    pub async fn start_with(
        groups: &[u64],
        snapshot_every: u64,
        hibernation: Option<HibernationConfig>,
    ) -> Cluster {
        let (listeners, addrs) = super::bind_nodes(NODES).await;
        let mut nodes = BTreeMap::new();
        let mut dirs = BTreeMap::new();
        for (id, listener) in listeners {
            let dir = tempfile::tempdir().unwrap();
            let node = start_node_with(
                id,
                dir.path(),
                listener,
                groups,
                snapshot_every,
                hibernation,
            )
            .await;
            nodes.insert(id, node);
            dirs.insert(id, dir);
        }
        let cluster = Cluster {
            nodes,
            addrs,
            dirs,
            groups: groups.to_vec(),
            snapshot_every,
            hibernation,
        };
        for &g in groups {
            cluster
                .handle(g % NODES, g)
                .bootstrap(&cluster.addrs)
                .await
                .unwrap();
        }
        for &g in groups {
            cluster.leader(g).await;
        }
        cluster
    }

    pub fn handle(&self, node: NodeId, g: u64) -> GroupHandle {
        self.nodes[&node].host.group(g).unwrap()
    }

    pub fn queue(&self, node: NodeId, g: u64) -> Queue {
        self.nodes[&node].queues[&g].clone()
    }

    /// The node that leads `g`, as every running replica agrees.
    pub async fn leader(&self, g: u64) -> NodeId {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let views: Vec<_> = self
                .nodes
                .keys()
                .map(|&n| *self.handle(n, g).leadership().borrow())
                .collect();
            let leaders: BTreeSet<NodeId> = self
                .nodes
                .keys()
                .filter(|&&n| self.handle(n, g).leadership().borrow().leads)
                .copied()
                .collect();
            if leaders.len() == 1 {
                let l = *leaders.first().unwrap();
                if views.iter().all(|v| v.leader == Some(l)) {
                    return l;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "group {g}: no agreed leader within {WAIT:?}: {views:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(&mut self, id: NodeId) {
        let node = self.nodes.remove(&id).unwrap();
        node.host.shutdown().await;
    }

    pub async fn restart(&mut self, id: NodeId) {
        let listener = TcpListener::bind(&self.addrs[&id]).await.unwrap();
        let dir = self.dirs[&id].path().to_path_buf();
        let node = start_node_with(
            id,
            &dir,
            listener,
            &self.groups,
            self.snapshot_every,
            self.hibernation,
        )
        .await;
        assert_eq!(node.host.recovered_groups().unwrap(), self.groups);
        self.nodes.insert(id, node);
    }

    pub fn log_dir(&self, id: NodeId) -> PathBuf {
        self.dirs[&id]
            .path()
            .join(entrepot_cluster::host::HOST_LOG_DIR)
    }
}

/// Waits until `h` applied the entry of `at`.
pub async fn applied_at_least(h: &GroupHandle, at: Position) {
    let index = at.index;
    let mut applied = h.applied();
    tokio::time::timeout(WAIT, applied.wait_for(|a| a.is_some_and(|a| a >= index)))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "group {} not applied up to {index}: {:?}",
                h.group(),
                h.status()
            )
        })
        .unwrap();
}

/// Proposes `payloads` pipelined (all submitted before any is awaited); their positions.
pub async fn propose_all(h: &GroupHandle, payloads: &[Bytes]) -> Vec<Position> {
    let mut pending = Vec::new();
    for p in payloads {
        pending.push(h.submit(p.clone()).await.unwrap());
    }
    let mut out = Vec::new();
    for p in pending {
        out.push(p.await.unwrap());
    }
    out
}

/// Proposes `payloads` in waves of `wave` (each wave submitted together, then awaited):
/// many entries, some with several proposals — a log long enough to snapshot and purge.
pub async fn propose_in_waves(h: &GroupHandle, payloads: &[Bytes], wave: usize) -> Vec<Position> {
    let mut out = Vec::new();
    for chunk in payloads.chunks(wave) {
        out.extend(propose_all(h, chunk).await);
    }
    out
}

/// Whether `ptr..ptr+len` lies in a file mapping of this process under `dir`: the
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

pub async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    if std::env::var_os("HOST_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_max_level(if std::env::var_os("HOST_TEST_DEBUG").is_some() {
                tracing::Level::DEBUG
            } else {
                tracing::Level::INFO
            })
            .with_test_writer()
            .try_init();
    }
    super::bounded(TEST_TIMEOUT, f).await
}
