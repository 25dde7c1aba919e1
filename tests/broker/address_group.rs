//! Goal: the per-address machine (`entrepot::raft::address_machine`) on three real hosts
//! keeps the same index on every member — message offsets and positions, acknowledged
//! ranges per consumer group, delivery counts — serves each message's record back as a
//! slice of the node log, recovers after every host restarts, and lets the log be purged
//! only below the oldest live message.
//! Method: three `entrepot_cluster::Host`s in this process, each on its own temporary
//! directory (node log with an fsync per commit) and its own `127.0.0.1:0` peer port, one
//! address group; the broker's own ops (`broker::replication` encoders) are proposed
//! through the leader's handle, many at once (the host batches them). Restarting is
//! `Host::shutdown` then `Host::start` on the same directory and port. Every wait is
//! bounded; nothing is timed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use entrepot::broker::replication::{
    encode_ack, encode_delivery_count, encode_group_floor, encode_message, OPS_VERSION,
};
use entrepot::raft::address_machine::{message_record, AddressMachine};
use entrepot_cluster::{ClusterError, GroupHandle, Host, HostConfig, NodeId, Position};
use entrepot_storage::{LogConfig, SyncPolicy};
use tokio::net::TcpListener;

const NODES: u64 = 3;
const GROUP: u64 = 1;
const WAIT: Duration = Duration::from_secs(20);
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

fn ops(f: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(OPS_VERSION);
    f(&mut b);
    b.freeze()
}

fn record(i: u64) -> Vec<u8> {
    format!("record {i} of the address").into_bytes()
}

struct Node {
    host: Host,
    machine: AddressMachine,
}

struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    addrs: BTreeMap<NodeId, String>,
    dirs: BTreeMap<NodeId, tempfile::TempDir>,
}

fn config(node: NodeId, dir: &Path) -> HostConfig {
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

async fn start_node(id: NodeId, dir: &Path, listener: TcpListener) -> Node {
    let host = Host::start(config(id, dir), listener).unwrap();
    let machine = AddressMachine::new();
    host.open_group(GROUP, machine.clone()).await.unwrap();
    Node { host, machine }
}

impl Cluster {
    async fn start() -> Cluster {
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
            nodes.insert(id, start_node(id, dir.path(), listener).await);
            dirs.insert(id, dir);
        }
        let c = Cluster { nodes, addrs, dirs };
        c.handle(0).bootstrap(&c.addrs).await.unwrap();
        c
    }

    fn handle(&self, n: NodeId) -> GroupHandle {
        self.nodes[&n].host.group(GROUP).unwrap()
    }

    fn machine(&self, n: NodeId) -> AddressMachine {
        self.nodes[&n].machine.clone()
    }

    async fn leader(&self) -> GroupHandle {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(n) = (0..NODES).find(|&n| self.handle(n).leadership().borrow().leads) {
                return self.handle(n);
            }
            assert!(tokio::time::Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every member applied `index`.
    async fn applied_everywhere(&self, index: u64) {
        for n in 0..NODES {
            let mut applied = self.handle(n).applied();
            tokio::time::timeout(WAIT, applied.wait_for(|a| a.is_some_and(|a| a >= index)))
                .await
                .unwrap_or_else(|_| panic!("node {n} did not apply {index}"))
                .unwrap();
        }
    }

    /// Every member's index equals node 0's.
    fn agree(&self, when: &str) {
        let index = self.machine(0).index();
        for n in 1..NODES {
            assert_eq!(self.machine(n).index(), index, "node {n} {when}");
        }
    }

    async fn restart_all(&mut self) {
        for n in 0..NODES {
            let node = self.nodes.remove(&n).unwrap();
            node.host.shutdown().await;
        }
        for n in 0..NODES {
            let listener = TcpListener::bind(&self.addrs[&n]).await.unwrap();
            let dir = self.dirs[&n].path().to_path_buf();
            self.nodes.insert(n, start_node(n, &dir, listener).await);
        }
    }
}

/// Proposes every payload at once (the host batches them); their positions.
async fn propose_all(h: &GroupHandle, payloads: Vec<Bytes>) -> Vec<Position> {
    let mut pending = Vec::new();
    for p in payloads {
        pending.push(h.submit(p).await.unwrap());
    }
    let mut out = Vec::new();
    for p in pending {
        out.push(p.await.unwrap());
    }
    out
}

/// Every live message of `n` reads back its record from `n`'s own node log.
fn records_read_back(c: &Cluster, n: NodeId, live: &[u64]) {
    let (m, h) = (c.machine(n), c.handle(n));
    for &o in live {
        let at = m
            .position(o)
            .unwrap_or_else(|| panic!("node {n}: {o} not live"));
        let payload = h.read(at).unwrap().expect("a proposal");
        assert_eq!(
            message_record(&payload).unwrap(),
            record(o),
            "node {n} offset {o}"
        );
    }
}

async fn snapshot_and_purge(c: &Cluster, to: u64) {
    for n in 0..NODES {
        let h = c.handle(n);
        h.snapshot_now().await.unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while h.status().purged != Some(to) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {n}: not purged to {to}: {:?}",
                h.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_group_keeps_one_index_on_every_member_and_purges_below_the_oldest_live_message()
{
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = Cluster::start().await;
        let h = c.leader().await;
        // 60 messages in waves of 20: several entries, several messages each.
        let mut positions = Vec::new();
        for wave in 0..3u64 {
            let payloads = (wave * 20..wave * 20 + 20)
                .map(|i| ops(|b| encode_message(b, i, &record(i))))
                .collect();
            positions.extend(propose_all(&h, payloads).await);
        }
        let m = c.machine(h.leadership().borrow().leader.unwrap());
        for (i, at) in positions.iter().enumerate() {
            assert_eq!(m.offset_at(*at), Some(i as u64), "dense, in log order");
        }
        assert!(
            positions.iter().any(|p| p.slot > 0),
            "batched: {positions:?}"
        );
        // The consumers: the first 20 acknowledged (out of order), a subscription's
        // group, a floor, a failed delivery.
        let mut first: Vec<u64> = (0..20).collect();
        first.reverse();
        let acks = vec![
            ops(|b| encode_ack(b, None, &first[..12])),
            ops(|b| encode_ack(b, None, &first[12..])),
            ops(|b| encode_ack(b, Some(3), &[20, 21, 25])),
            ops(|b| encode_group_floor(b, 4, 30)),
            ops(|b| encode_delivery_count(b, 0, 25, 2)),
            ops(|b| encode_ack(b, None, &[22, 40])),
        ];
        let last = *propose_all(&h, acks).await.last().unwrap();
        c.applied_everywhere(last.index).await;
        c.agree("after the acks");
        let live: Vec<u64> = (20..60).filter(|o| ![22, 40].contains(o)).collect();
        for n in 0..NODES {
            let m = c.machine(n);
            assert_eq!(
                m.live(0, 100).iter().map(|(o, _)| *o).collect::<Vec<_>>(),
                live,
                "node {n}"
            );
            assert_eq!(m.acked(0), vec![0..20, 22..23, 40..41]);
            assert_eq!(m.delivery_count(0, 25), 2);
            assert!(m.is_acked(4, 29) && !m.is_acked(4, 30) && m.is_acked(3, 25));
            records_read_back(&c, n, &live);
        }
        // Purged exactly below the entry of the oldest live message (offset 20).
        let oldest = m.position(20).unwrap();
        snapshot_and_purge(&c, oldest.index - 1).await;
        for n in 0..NODES {
            assert!(matches!(
                c.handle(n).read(Position::new(oldest.index - 1, 0)),
                Err(ClusterError::Purged { .. })
            ));
            records_read_back(&c, n, &live);
        }
        // Every host restarts: the index comes back from snapshot + log, and the records
        // are still where the index says.
        let acked_before = c.machine(0).acked(0);
        c.restart_all().await;
        let h = c.leader().await;
        let more = h
            .propose(ops(|b| encode_message(b, 60, &record(60))))
            .await
            .unwrap();
        c.applied_everywhere(more.index).await;
        c.agree("after the restart");
        let mut live = live;
        live.push(60);
        for n in 0..NODES {
            let m = c.machine(n);
            assert_eq!(m.offset_at(more), Some(60), "node {n}");
            assert_eq!(m.acked(0), c.machine(0).acked(0));
            assert_eq!(m.delivery_count(0, 25), 2);
            records_read_back(&c, n, &live);
        }
        assert_eq!(c.machine(0).acked(0), acked_before);
        // Everything acknowledged: the log may go up to the last entry.
        let all: Vec<u64> = live.clone();
        let done = h.propose(ops(|b| encode_ack(b, None, &all))).await.unwrap();
        c.applied_everywhere(done.index).await;
        c.agree("after the last ack");
        for n in 0..NODES {
            assert!(c.machine(n).live(0, 100).is_empty());
            assert_eq!(c.machine(n).size(), (0, 3), "one range per group (0, 3, 4)");
        }
        snapshot_and_purge(&c, done.index).await;
        for (_, node) in std::mem::take(&mut c.nodes) {
            node.host.shutdown().await;
        }
    })
    .await
    .expect("test timed out");
}
