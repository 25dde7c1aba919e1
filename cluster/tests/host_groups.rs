//! Goal: the node-level host (`cluster/src/host/`) is what the broker can build on — a
//! proposal resolves only once a majority has the entry (and fails with a typed error
//! when there is none, or when this node does not lead), reads return the exact bytes as
//! slices of the node log's mapping, the leadership watch follows a leader change, a
//! restarted host recovers its groups and its machines from snapshot + log, a lagging
//! member installs a snapshot that carries the payloads its machine still reads (and
//! keeps them across a restart), and the log is purged only below the machine's lowest
//! needed index.
//! Method: three `Host`s in this process, each on its own temporary directory (real node
//! log, fsync on every commit) and its own `127.0.0.1:0` peer port, several groups each,
//! with a toy queue as the state machine: a proposal is a message (`M` + body) or an ack
//! range (`A` + from + to, message positions), its snapshot the set of live message
//! positions (never their bytes). The host packs proposals submitted together into one
//! entry: a message's position is (entry index, slot). Stopping a node is `Host::shutdown` (its port closes as on a
//! crash); restarting is `Host::start` on the same directory and port. Every wait is
//! bounded; no timing is asserted beyond generous bounds.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use entrepot_cluster::{
    ClusterError, GroupError, GroupHandle, GroupMachine, Host, HostConfig, MachineError, NodeId,
    Position,
};
use entrepot_storage::LogConfig;
use tokio::net::TcpListener;

const NODES: u64 = 3;
const WAIT: Duration = Duration::from_secs(20);
const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// A proposal's bound in these tests: long against a loaded debug build's commit, short
/// enough for the test that waits it out.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// The toy queue machine.

#[derive(Clone, Default)]
struct Queue {
    state: Arc<Mutex<QueueState>>,
}

#[derive(Default, Debug)]
struct QueueState {
    live: BTreeSet<Position>,
    next: u64,
    /// `last_index` of every restore, in order.
    restores: Vec<u64>,
    /// Positions applied since start (after any restore).
    applied: Vec<Position>,
}

fn message(body: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(1 + body.len());
    b.push(b'M');
    b.extend_from_slice(body);
    Bytes::from(b)
}

/// Acknowledges the messages at `from..to`.
fn ack(from: Position, to: Position) -> Bytes {
    let mut b = Vec::with_capacity(ACK_LEN);
    b.push(b'A');
    for p in [from, to] {
        b.put_u64_le(p.index);
        b.put_u32_le(p.slot);
    }
    Bytes::from(b)
}

const ACK_LEN: usize = 1 + 2 * 12;

fn get_position(r: &mut &[u8]) -> Position {
    Position::new(r.get_u64_le(), r.get_u32_le())
}

impl Queue {
    fn live(&self) -> BTreeSet<Position> {
        self.state.lock().unwrap().live.clone()
    }
    fn restores(&self) -> Vec<u64> {
        self.state.lock().unwrap().restores.clone()
    }
    fn applied(&self) -> Vec<Position> {
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

struct Node {
    host: Host,
    queues: BTreeMap<u64, Queue>,
}

struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    addrs: BTreeMap<NodeId, String>,
    dirs: BTreeMap<NodeId, tempfile::TempDir>,
    groups: Vec<u64>,
    snapshot_every: u64,
}

fn config(node: NodeId, dir: &Path, snapshot_every: u64) -> HostConfig {
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
    c
}

async fn start_node(
    id: NodeId,
    dir: &Path,
    listener: TcpListener,
    groups: &[u64],
    snapshot_every: u64,
) -> Node {
    let host = Host::start(config(id, dir, snapshot_every), listener).unwrap();
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
    async fn start(groups: &[u64], snapshot_every: u64) -> Cluster {
        let (listeners, addrs) = support::bind_nodes(NODES).await;
        let mut nodes = BTreeMap::new();
        let mut dirs = BTreeMap::new();
        for (id, listener) in listeners {
            let dir = tempfile::tempdir().unwrap();
            nodes.insert(
                id,
                start_node(id, dir.path(), listener, groups, snapshot_every).await,
            );
            dirs.insert(id, dir);
        }
        let cluster = Cluster {
            nodes,
            addrs,
            dirs,
            groups: groups.to_vec(),
            snapshot_every,
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

    fn handle(&self, node: NodeId, g: u64) -> GroupHandle {
        self.nodes[&node].host.group(g).unwrap()
    }

    fn queue(&self, node: NodeId, g: u64) -> Queue {
        self.nodes[&node].queues[&g].clone()
    }

    /// The node that leads `g`, as every running replica agrees.
    async fn leader(&self, g: u64) -> NodeId {
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

    async fn stop(&mut self, id: NodeId) {
        let node = self.nodes.remove(&id).unwrap();
        node.host.shutdown().await;
    }

    async fn restart(&mut self, id: NodeId) {
        let listener = TcpListener::bind(&self.addrs[&id]).await.unwrap();
        let dir = self.dirs[&id].path().to_path_buf();
        let node = start_node(id, &dir, listener, &self.groups, self.snapshot_every).await;
        assert_eq!(node.host.recovered_groups().unwrap(), self.groups);
        self.nodes.insert(id, node);
    }

    fn log_dir(&self, id: NodeId) -> PathBuf {
        self.dirs[&id]
            .path()
            .join(entrepot_cluster::host::HOST_LOG_DIR)
    }
}

/// Waits until `h` applied the entry of `at`.
async fn applied_at_least(h: &GroupHandle, at: Position) {
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
async fn propose_all(h: &GroupHandle, payloads: &[Bytes]) -> Vec<Position> {
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
async fn propose_in_waves(h: &GroupHandle, payloads: &[Bytes], wave: usize) -> Vec<Position> {
    let mut out = Vec::new();
    for chunk in payloads.chunks(wave) {
        out.extend(propose_all(h, chunk).await);
    }
    out
}

/// Whether `ptr..ptr+len` lies in a file mapping of this process under `dir`: the
/// payload is a slice of a node-log segment's mapping, not a copy.
fn mapped_under(bytes: &Bytes, dir: &Path) -> bool {
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

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
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
    support::bounded(TEST_TIMEOUT, f).await
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_resolves_on_a_majority_and_reads_are_slices_of_the_log() {
    bounded(async {
        let mut c = Cluster::start(&[1, 2, 3], u64::MAX).await;
        let g = 2;
        let leader = c.leader(g).await;
        let h = c.handle(leader, g);
        let bodies: Vec<Bytes> = (0..50)
            .map(|i| message(format!("m{i}").as_bytes()))
            .collect();
        let indexes = propose_all(&h, &bodies).await;
        assert!(indexes.windows(2).all(|w| w[0] < w[1]), "{indexes:?}");
        // Every replica reads back exactly the bytes, from its node log's mapping.
        let last = *indexes.last().unwrap();
        for (&n, _) in c.nodes.iter() {
            let r = c.handle(n, g);
            applied_at_least(&r, last).await;
            for (i, body) in indexes.iter().zip(&bodies) {
                let got = r.read(*i).unwrap().expect("a payload entry");
                assert_eq!(got, *body, "node {n} index {i}");
                assert!(
                    mapped_under(&got, &c.log_dir(n)),
                    "node {n}: a copy, not the log"
                );
            }
            assert!(
                r.committed() >= Some(last.index),
                "node {n}: {:?}",
                r.status()
            );
            let range = r.read_range(indexes[0].index..last.index + 1).unwrap();
            assert_eq!(range.len(), bodies.len());
            assert!(range.iter().map(|(p, _)| p).eq(indexes.iter()));
            assert!(range.iter().map(|(_, b)| b).eq(bodies.iter()));
            assert!(matches!(
                r.read(Position::new(last.index + 100, 0)),
                Err(ClusterError::NotApplied { .. })
            ));
        }
        // A follower refuses, naming the leader.
        let follower = (0..NODES).find(|&n| n != leader).unwrap();
        let refused = c.handle(follower, g).propose(message(b"x")).await;
        assert!(
            matches!(refused, Err(GroupError::NotLeader { leader: Some(l), .. }) if l == leader),
            "{refused:?}"
        );
        // One follower stopped: still a majority.
        let followers: Vec<NodeId> = (0..NODES).filter(|&n| n != leader).collect();
        c.stop(followers[0]).await;
        let i = h.propose(message(b"two of three")).await.unwrap();
        assert!(i > last);
        assert_eq!(h.read(i).unwrap().unwrap(), message(b"two of three"));
        // Two stopped: no majority; the proposal never resolves Ok.
        c.stop(followers[1]).await;
        let started = tokio::time::Instant::now();
        let lost = h.propose(message(b"one of three")).await;
        assert!(matches!(lost, Err(GroupError::Timeout { .. })), "{lost:?}");
        assert!(started.elapsed() >= PROPOSE_TIMEOUT);
        assert_eq!(
            *h.applied().borrow(),
            Some(i.index),
            "nothing applied without a quorum"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leadership_watch_follows_a_leader_change() {
    bounded(async {
        let mut c = Cluster::start(&[4, 5], u64::MAX).await;
        let g = 4;
        let old = c.leader(g).await;
        let old_term = c.handle(old, g).leadership().borrow().term;
        let survivors: Vec<NodeId> = (0..NODES).filter(|&n| n != old).collect();
        let mut watches: Vec<_> = survivors
            .iter()
            .map(|&n| c.handle(n, g).leadership())
            .collect();
        c.stop(old).await;
        for w in &mut watches {
            let seen = tokio::time::timeout(
                WAIT,
                w.wait_for(|l| l.leader.is_some() && l.leader != Some(old) && l.term > old_term),
            )
            .await
            .expect("a new leader within WAIT")
            .unwrap()
            .to_owned();
            assert!(seen.leader.is_some());
        }
        let new = c.leader(g).await;
        assert_ne!(new, old);
        let leads: Vec<bool> = survivors
            .iter()
            .map(|&n| c.handle(n, g).leadership().borrow().leads)
            .collect();
        assert_eq!(leads.iter().filter(|l| **l).count(), 1, "{leads:?}");
        c.handle(new, g)
            .propose(message(b"after the change"))
            .await
            .unwrap();
        let other = c.leader(5).await;
        c.handle(other, 5)
            .propose(message(b"other group"))
            .await
            .unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_host_recovers_its_groups_from_snapshot_and_log() {
    bounded(async {
        let groups = [6, 7];
        let mut c = Cluster::start(&groups, u64::MAX).await;
        let mut expected = BTreeMap::new();
        let mut snapshot_at = BTreeMap::new();
        let mut last = BTreeMap::new();
        for &g in &groups {
            let h = c.handle(c.leader(g).await, g);
            let bodies: Vec<Bytes> = (0..30)
                .map(|i| message(format!("g{g} m{i}").as_bytes()))
                .collect();
            let idx = propose_all(&h, &bodies).await;
            let acked = h.propose(ack(idx[0], idx[10])).await.unwrap();
            // A snapshot on every replica (each at what it applied), then more after it.
            for n in 0..NODES {
                let r = c.handle(n, g);
                applied_at_least(&r, acked).await;
                r.snapshot_now().await.unwrap();
                snapshot_at.insert((g, n), r.status().snapshot.unwrap());
            }
            let more: Vec<Bytes> = (30..40)
                .map(|i| message(format!("g{g} m{i}").as_bytes()))
                .collect();
            let idx2 = propose_all(&h, &more).await;
            let l = h.propose(ack(idx[10], idx[20])).await.unwrap();
            last.insert(g, l);
            let mut want = BTreeMap::new();
            for (i, b) in idx
                .iter()
                .zip(&bodies)
                .skip(20)
                .chain(idx2.iter().zip(&more))
            {
                want.insert(*i, b.clone());
            }
            for n in 0..NODES {
                applied_at_least(&c.handle(n, g), l).await;
                assert_eq!(c.queue(n, g).live(), want.keys().copied().collect());
            }
            expected.insert(g, want);
        }
        for n in 0..NODES {
            c.stop(n).await;
        }
        for n in 0..NODES {
            c.restart(n).await;
        }
        for &g in &groups {
            c.leader(g).await;
            for n in 0..NODES {
                let h = c.handle(n, g);
                applied_at_least(&h, last[&g]).await;
                let q = c.queue(n, g);
                assert_eq!(
                    q.restores(),
                    vec![snapshot_at[&(g, n)]],
                    "node {n} group {g}"
                );
                assert!(
                    q.applied()
                        .first()
                        .is_some_and(|&p| p.index > snapshot_at[&(g, n)]),
                    "node {n} group {g}: re-applied only after the snapshot"
                );
                assert_eq!(q.live(), expected[&g].keys().copied().collect(), "node {n}");
                for (i, body) in &expected[&g] {
                    assert_eq!(
                        h.read(*i).unwrap().as_ref(),
                        Some(body),
                        "node {n} index {i}"
                    );
                }
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_member_installs_a_snapshot_carrying_the_payloads_it_needs() {
    bounded(async {
        let g = 8;
        // Snapshots every 16 entries: the stopped member falls behind the purge.
        let mut c = Cluster::start(&[g], 16).await;
        let leader = c.leader(g).await;
        let lagging = (0..NODES).find(|&n| n != leader).unwrap();
        c.stop(lagging).await;
        let h = c.handle(leader, g);
        let bodies: Vec<Bytes> = (0..100)
            .map(|i| message(format!("late {i}").as_bytes()))
            .collect();
        let idx = propose_in_waves(&h, &bodies, 4).await;
        let l = h.propose(ack(idx[0], idx[60])).await.unwrap();
        h.snapshot_now().await.unwrap();
        // The leader purged past everything the lagging member holds, but not past the
        // oldest live message.
        let deadline = tokio::time::Instant::now() + WAIT;
        while h.status().purged < Some(idx[59].index) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no purge: {:?}",
                h.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(h.status().purged < Some(idx[60].index), "{:?}", h.status());
        c.restart(lagging).await;
        let r = c.handle(lagging, g);
        applied_at_least(&r, l).await;
        let q = c.queue(lagging, g);
        assert!(
            !q.restores().is_empty(),
            "caught up without a snapshot install"
        );
        assert_eq!(q.live(), c.queue(leader, g).live());
        assert_eq!(q.live(), idx[60..].iter().copied().collect());
        for (i, body) in idx.iter().zip(&bodies).skip(60) {
            assert_eq!(r.read(*i).unwrap().as_ref(), Some(body), "index {i}");
        }
        let range = r.read_range(idx[60].index..l.index).unwrap();
        assert!(range.iter().map(|(_, b)| b).eq(bodies[60..].iter()));
        // It goes on following.
        let next = h.propose(message(b"after the install")).await.unwrap();
        applied_at_least(&r, next).await;
        assert_eq!(
            r.read(next).unwrap().unwrap(),
            message(b"after the install")
        );
        // The carried payloads were persisted with the installed snapshot: after a
        // restart they are read from there (its log never held them).
        c.stop(lagging).await;
        c.restart(lagging).await;
        let r = c.handle(lagging, g);
        let q = c.queue(lagging, g);
        applied_at_least(&r, next).await;
        assert_eq!(q.live(), c.queue(leader, g).live());
        for (i, body) in idx.iter().zip(&bodies).skip(60) {
            assert_eq!(
                r.read(*i).unwrap().as_ref(),
                Some(body),
                "after restart, index {i}"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_purged_only_below_the_lowest_needed_index() {
    bounded(async {
        let g = 9;
        let c = Cluster::start(&[g], u64::MAX).await;
        let leader = c.leader(g).await;
        let h = c.handle(leader, g);
        let bodies: Vec<Bytes> = (0..40)
            .map(|i| message(format!("p{i}").as_bytes()))
            .collect();
        let idx = propose_all(&h, &bodies).await;
        let a = h.propose(ack(idx[0], idx[10])).await.unwrap();
        let low = idx[10];
        for n in 0..NODES {
            let r = c.handle(n, g);
            applied_at_least(&r, a).await;
            r.snapshot_now().await.unwrap();
            assert_eq!(r.status().snapshot, Some(a.index));
            let deadline = tokio::time::Instant::now() + WAIT;
            while r.status().purged != Some(low.index - 1) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "node {n}: {:?}",
                    r.status()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(matches!(
                r.read(Position::new(low.index - 1, 0)),
                Err(ClusterError::Purged { .. })
            ));
            for (i, body) in idx.iter().zip(&bodies).skip(10) {
                assert_eq!(
                    r.read(*i).unwrap().as_ref(),
                    Some(body),
                    "node {n} index {i}"
                );
            }
        }
        // Everything acknowledged: the next snapshot lets the log go up to it.
        let after_last = Position::new(idx[39].index, idx[39].slot + 1);
        let b = h.propose(ack(idx[10], after_last)).await.unwrap();
        for n in 0..NODES {
            let r = c.handle(n, g);
            applied_at_least(&r, b).await;
            r.snapshot_now().await.unwrap();
            let deadline = tokio::time::Instant::now() + WAIT;
            while r.status().purged != Some(b.index) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "node {n}: {:?}",
                    r.status()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_replica_reopens_from_the_node_log_and_catches_up_and_a_removed_one_is_gone() {
    bounded(async {
        let g = 10;
        let mut c = Cluster::start(&[g, 11], u64::MAX).await;
        let leader = c.leader(g).await;
        let h = c.handle(leader, g);
        let first = propose_all(
            &h,
            &[
                message(b"before"),
                ack(Position::default(), Position::default()),
            ],
        )
        .await;
        let closed = (0..NODES).find(|&n| n != leader).unwrap();
        applied_at_least(&c.handle(closed, g), first[1]).await;
        let node = c.nodes.get_mut(&closed).unwrap();
        assert!(node.host.close_group(g).await);
        assert!(node.host.group(g).is_none());
        assert!(!node.host.close_group(g).await, "closed twice");
        // The other group of that node is untouched; this one commits on two of three.
        let other = c.leader(11).await;
        c.handle(other, 11)
            .propose(message(b"other"))
            .await
            .unwrap();
        let later = h.propose(message(b"while closed")).await.unwrap();
        // Reopened with a fresh machine: the log is re-applied and it catches up.
        let q = Queue::default();
        let node = c.nodes.get_mut(&closed).unwrap();
        let r = node.host.open_group(g, q.clone()).await.unwrap();
        node.queues.insert(g, q.clone());
        applied_at_least(&r, later).await;
        assert_eq!(q.live(), [first[0], later].into_iter().collect());
        assert_eq!(r.read(later).unwrap().unwrap(), message(b"while closed"));
        assert!(matches!(
            node.host.open_group(g, Queue::default()).await,
            Err(ClusterError::GroupAlreadyOpen { .. })
        ));
        // Removed for good: its records no longer count in the node log, its snapshot
        // directory is gone, and the node's other group goes on.
        r.snapshot_now().await.unwrap();
        let snapshot_dir = c.dirs[&closed]
            .path()
            .join(entrepot_cluster::host::HOST_GROUPS_DIR)
            .join(g.to_string());
        assert!(snapshot_dir.exists());
        let node = &c.nodes[&closed];
        node.host.remove_group(g).await.unwrap();
        assert!(node.host.group(g).is_none());
        assert_eq!(node.host.recovered_groups().unwrap(), vec![11]);
        assert!(!snapshot_dir.exists());
        let other = c.leader(11).await;
        c.handle(other, 11)
            .propose(message(b"after the removal"))
            .await
            .unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_joins_through_a_snapshot_and_becomes_a_voter() {
    bounded(async {
        let g = 12;
        let c = Cluster::start(&[g], 16).await;
        let leader = c.leader(g).await;
        let h = c.handle(leader, g);
        let bodies: Vec<Bytes> = (0..40)
            .map(|i| message(format!("new {i}").as_bytes()))
            .collect();
        let idx = propose_in_waves(&h, &bodies, 4).await;
        let a = h.propose(ack(idx[0], idx[30])).await.unwrap();
        h.snapshot_now().await.unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while h.status().purged < Some(idx[30].index - 1) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no purge: {:?}",
                h.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A fourth node, empty: it can only catch up by installing the snapshot.
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let new = start_node(3, dir.path(), listener, &[g], 16).await;
        let r = new.host.group(g).unwrap();
        let q = new.queues[&g].clone();
        h.add_learner(3, &addr).await.unwrap();
        applied_at_least(&r, a).await;
        assert!(!q.restores().is_empty(), "caught up without a snapshot");
        assert_eq!(q.live(), idx[30..].iter().copied().collect());
        for (i, body) in idx.iter().zip(&bodies).skip(30) {
            assert_eq!(r.read(*i).unwrap().as_ref(), Some(body), "index {i}");
        }
        let voters: BTreeSet<NodeId> = [0, 1, 2, 3].into_iter().collect();
        h.change_voters(voters.clone()).await.unwrap();
        assert_eq!(h.status().voters, voters);
        // A follower that applied the new membership refuses a change, naming the leader.
        let follower = c.handle((0..NODES).find(|&n| n != leader).unwrap(), g);
        applied_at_least(&follower, Position::new(h.status().applied.unwrap(), 0)).await;
        let refused = follower.add_learner(4, "127.0.0.1:1").await;
        assert!(
            matches!(refused, Err(GroupError::NotLeader { .. })),
            "{refused:?}"
        );
        let next = h.propose(message(b"four voters")).await.unwrap();
        applied_at_least(&r, next).await;
        assert_eq!(r.read(next).unwrap().unwrap(), message(b"four voters"));
        new.host.shutdown().await;
    })
    .await
}

/// Many producers on one address: what they submit while earlier entries are in flight
/// shares entries, each producer's proposals keep their order, every replica applies
/// the same positions in the same order and reads back the exact bytes (slices of its
/// node log), also after all three restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_share_entries_in_order_and_positions_survive_a_restart() {
    bounded(async {
        let g = 13;
        let mut c = Cluster::start(&[g], u64::MAX).await;
        let h = c.handle(c.leader(g).await, g);
        const TASKS: usize = 8;
        const EACH: usize = 50;
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let h = h.clone();
                tokio::spawn(async move {
                    let bodies: Vec<Bytes> = (0..EACH)
                        .map(|i| message(format!("t{t} m{i}").as_bytes()))
                        .collect();
                    let positions = propose_all(&h, &bodies).await;
                    (bodies, positions)
                })
            })
            .collect();
        let mut all: BTreeMap<Position, Bytes> = BTreeMap::new();
        for t in tasks {
            let (bodies, positions) = t.await.unwrap();
            assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "one producer's order: {positions:?}"
            );
            all.extend(positions.into_iter().zip(bodies));
        }
        assert_eq!(all.len(), TASKS * EACH, "every position distinct");
        let entries: BTreeSet<u64> = all.keys().map(|p| p.index).collect();
        assert!(
            entries.len() * 4 <= all.len(),
            "{} messages in {} entries: not batched",
            all.len(),
            entries.len()
        );
        let last = *all.keys().last().unwrap();
        let check = |c: &Cluster, when: &str| {
            for n in 0..NODES {
                let r = c.handle(n, g);
                let applied = c.queue(n, g).applied();
                assert_eq!(
                    applied,
                    all.keys().copied().collect::<Vec<_>>(),
                    "node {n} {when}: applied in position order"
                );
                for (at, body) in &all {
                    let got = r.read(*at).unwrap().expect("a proposal");
                    assert_eq!(&got, body, "node {n} {when} at {at}");
                    assert!(mapped_under(&got, &c.log_dir(n)), "node {n}: a copy");
                }
                let past = Position::new(last.index, last.slot + 1);
                assert_eq!(r.read(past).unwrap(), None, "no slot past the last");
                let range = r.read_range(0..last.index + 1).unwrap();
                assert!(range.iter().map(|(p, _)| p).eq(all.keys()), "node {n}");
                let entry = r.read_entry(last.index).unwrap();
                assert_eq!(entry.len() as u32, last.slot + 1);
            }
        };
        for n in 0..NODES {
            applied_at_least(&c.handle(n, g), last).await;
        }
        check(&c, "before the restart");
        for n in 0..NODES {
            c.stop(n).await;
        }
        for n in 0..NODES {
            c.restart(n).await;
        }
        c.leader(g).await;
        for n in 0..NODES {
            applied_at_least(&c.handle(n, g), last).await;
        }
        check(&c, "after the restart");
    })
    .await
}

/// An entry that fails fails every proposal in it, with the same typed error: proposals
/// submitted together to a follower all name the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_entry_fails_every_proposal_in_it() {
    bounded(async {
        let g = 14;
        let c = Cluster::start(&[g], u64::MAX).await;
        let leader = c.leader(g).await;
        let follower = c.handle((0..NODES).find(|&n| n != leader).unwrap(), g);
        let mut pending = Vec::new();
        for i in 0..40 {
            let p = follower.submit(message(format!("f{i}").as_bytes())).await;
            pending.push(p.unwrap());
        }
        for p in pending {
            let refused = p.await;
            assert!(
                matches!(refused, Err(GroupError::NotLeader { leader: Some(l), .. }) if l == leader),
                "{refused:?}"
            );
        }
        assert!(matches!(
            follower.submit(Bytes::from(vec![0; entrepot_cluster::MAX_PROPOSAL_BYTES + 1])).await,
            Err(GroupError::TooLarge { .. })
        ));
    })
    .await
}

/// A leader without a quorum stops draining its queue; a submitter then waits at most the
/// propose timeout for room, and is told `Timeout`, never held forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_times_the_submitter_out() {
    bounded(async {
        let g = 16;
        let mut c = Cluster::start(&[g], u64::MAX).await;
        let leader = c.leader(g).await;
        let h = c.handle(leader, g);
        for n in (0..NODES).filter(|&n| n != leader) {
            c.stop(n).await;
        }
        // What the queue holds, plus what the entries in flight took out of it.
        let room = entrepot_cluster::host::MAX_QUEUED_PROPOSALS
            + entrepot_cluster::MAX_ENTRIES_IN_FLIGHT * entrepot_cluster::MAX_BATCH_SLOTS;
        let mut pending = Vec::with_capacity(room);
        let started = tokio::time::Instant::now();
        let refused = loop {
            match h.submit(Bytes::from_static(b"M")).await {
                Ok(p) => pending.push(p),
                Err(e) => break e,
            }
            assert!(pending.len() <= room, "more queued than the bound");
        };
        assert!(
            matches!(refused, GroupError::Timeout { .. }),
            "{refused:?} after {}",
            pending.len()
        );
        assert!(started.elapsed() >= PROPOSE_TIMEOUT);
        assert!(pending.len() >= entrepot_cluster::host::MAX_QUEUED_PROPOSALS);
    })
    .await
}

/// An entry always fits in one node-log record (512 KiB here): a larger proposal is
/// refused before it is queued, and proposals that together pass a record go in more
/// than one entry — the group keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_stay_within_a_node_log_record() {
    bounded(async {
        let g = 15;
        let c = Cluster::start(&[g], u64::MAX).await;
        let h = c.handle(c.leader(g).await, g);
        let refused = h.submit(Bytes::from(vec![1; 512 << 10])).await;
        assert!(
            matches!(refused, Err(GroupError::TooLarge { max, .. }) if max < 512 << 10),
            "{:?}",
            refused.map(|_| ())
        );
        let big: Vec<Bytes> = (0..6u8)
            .map(|i| {
                let mut m = vec![i; 200 << 10];
                m[0] = b'M';
                Bytes::from(m)
            })
            .collect();
        let at = propose_all(&h, &big).await;
        let entries: BTreeSet<u64> = at.iter().map(|p| p.index).collect();
        assert!(
            entries.len() >= 3,
            "two of 200 KiB at most per entry: {at:?}"
        );
        for (p, body) in at.iter().zip(&big) {
            assert_eq!(h.read(*p).unwrap().as_ref(), Some(body));
        }
        h.propose(message(b"still going")).await.unwrap();
    })
    .await
}

/// The broker shares handles between connection tasks and awaits proposals in them.
#[test]
fn handles_are_shared_between_tasks() {
    fn shared<T: Send + Sync + Clone + 'static>() {}
    fn sent<T: Send + 'static>() {}
    shared::<Host>();
    shared::<GroupHandle>();
    sent::<entrepot_cluster::Proposal>();
    sent::<GroupError>();
}
