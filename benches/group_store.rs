//! What the broker's store over a Raft group (`raft::group_store::GroupStore`, issue 12
//! step 4.2) costs on top of the host it proposes through: one address group on three
//! hosts in this process over loopback TCP, each with its own node log on real files and
//! a real fsync per group commit (`SyncPolicy::Always`), the `AddressMachine` applying
//! on every host. Both cases keep [`IN_FLIGHT`] messages of [`MESSAGE_BYTES`] submitted
//! and not yet committed (pipelined, as producers would) and count a message once it is
//! committed and applied on the leader (the producer's `accepted`):
//! * `host` — the message ops (the payload a `GroupStore` builds) submitted straight to
//!   the leader's `GroupHandle`, each `Proposal` awaited in order;
//! * `store` — `GroupStore::append`, each durable handle awaited in order, then the
//!   message's offset and body read back from the node log (`try_committed`), as the
//!   connection does: the resolver task and one watch between the caller and the host.
//!
//! When leadership moves (an election on a loaded machine) the rest goes to the new
//! leader (a message whose outcome was lost is sent again), so a run never fails on it.
//!
//! Run: `cargo bench --bench group_store` (CI runs it once, as a test).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use entrepot::broker::replication::{encode_message, OPS_VERSION};
use entrepot::raft::address_machine::AddressMachine;
use entrepot::raft::group_store::{GroupAppended, GroupStore};
use entrepot_cluster::{GroupHandle, Host, HostConfig, NodeId};
use entrepot_storage::{LogConfig, SyncPolicy};
use tokio::net::TcpListener;

const NODES: u64 = 3;
const GROUP: u64 = 1;
const ADDRESS: &str = "orders";
const MESSAGE_BYTES: usize = 1024;
/// Messages submitted and not yet committed.
const IN_FLIGHT: usize = 64;
/// Messages per measured iteration.
const PER_ITERATION: u64 = 2048;
/// Longest the cluster may take to elect a leader.
const WAIT: Duration = Duration::from_secs(30);

struct Cluster {
    hosts: BTreeMap<NodeId, (Host, AddressMachine)>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn start() -> Cluster {
    let mut listeners = BTreeMap::new();
    for id in 0..NODES {
        listeners.insert(id, TcpListener::bind("127.0.0.1:0").await.expect("bind"));
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
        let machine = AddressMachine::new();
        host.open_group(GROUP, machine.clone())
            .await
            .expect("open group");
        hosts.insert(id, (host, machine));
        dirs.push(dir);
    }
    let first = hosts[&0].0.group(GROUP).expect("group");
    first.bootstrap(&addrs).await.expect("bootstrap");
    Cluster { hosts, _dirs: dirs }
}

impl Cluster {
    /// The leader's handle and machine, waiting up to [`WAIT`] for one.
    async fn leader(&self) -> (GroupHandle, AddressMachine) {
        let deadline = Instant::now() + WAIT;
        loop {
            for (host, machine) in self.hosts.values() {
                let h = host.group(GROUP).expect("group");
                if h.leadership().borrow().leads {
                    return (h, machine.clone());
                }
            }
            assert!(Instant::now() < deadline, "no leader within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The payload a `GroupStore` proposes for one message (timed record: the prefix is
/// what `store.rs` writes before the message).
fn message_op(message: &[u8]) -> Bytes {
    let mut record = Vec::with_capacity(4 + ADDRESS.len() + 8 + message.len());
    record.extend_from_slice(&[1, 3]);
    record.extend_from_slice(&(ADDRESS.len() as u16).to_le_bytes());
    record.extend_from_slice(ADDRESS.as_bytes());
    record.extend_from_slice(&0i64.to_le_bytes());
    record.extend_from_slice(message);
    let mut b = BytesMut::with_capacity(16 + record.len());
    b.put_u8(OPS_VERSION);
    encode_message(&mut b, 0, &record);
    b.freeze()
}

/// `count` message ops straight through the leader's handle, [`IN_FLIGHT`] at a time.
async fn through_host(c: &Cluster, count: u64) {
    let payload = message_op(&[0x5a; MESSAGE_BYTES]);
    let mut committed = 0;
    'leaders: while committed < count {
        let (h, _) = c.leader().await;
        let mut pending = VecDeque::with_capacity(IN_FLIGHT);
        let mut submitted = committed;
        while committed < count {
            if pending.len() == IN_FLIGHT || submitted == count {
                let Some(p) = pending.pop_front() else { break };
                match p.await {
                    Ok(_) => committed += 1,
                    Err(e) => {
                        eprintln!("host: {e}; going on with the leader");
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
                    eprintln!("host: {e}; going on with the leader");
                    continue 'leaders;
                }
            }
        }
    }
}

/// `count` messages through a `GroupStore` on the leader, [`IN_FLIGHT`] at a time.
async fn through_store(c: &Cluster, count: u64) {
    let message = [0x5a; MESSAGE_BYTES];
    let mut committed = 0;
    'leaders: while committed < count {
        let (h, machine) = c.leader().await;
        let store = GroupStore::new(ADDRESS, h, machine);
        let mut pending = VecDeque::with_capacity(IN_FLIGHT);
        let mut submitted = committed;
        while committed < count {
            if pending.len() == IN_FLIGHT || submitted == count {
                let Some(a): Option<GroupAppended> = pending.pop_front() else {
                    break;
                };
                let mut p = a.pending;
                // Accepted, and its offset and body read back: what a connection does.
                match a.durable.wait().await.map(|()| p.try_committed()) {
                    Ok(Some(Ok(_))) => committed += 1,
                    Ok(other) => panic!("durable, but no message: {other:?}"),
                    Err(e) => {
                        eprintln!("store: {e}; going on with the leader");
                        continue 'leaders;
                    }
                }
                continue;
            }
            match store.append(&[&message]) {
                Ok(a) => {
                    pending.push_back(a);
                    submitted += 1;
                }
                Err(e) => {
                    eprintln!("store: {e}; going on with the leader");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue 'leaders;
                }
            }
        }
    }
}

fn group_store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = rt.block_on(start());
    rt.block_on(cluster.leader());
    let mut g = c.benchmark_group("group_store");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(PER_ITERATION));
    g.bench_function("host", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            rt.block_on(through_host(&cluster, iters * PER_ITERATION));
            start.elapsed()
        })
    });
    g.bench_function("store", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            rt.block_on(through_store(&cluster, iters * PER_ITERATION));
            start.elapsed()
        })
    });
    g.finish();
    rt.block_on(async {
        for (_, (host, _)) in cluster.hosts {
            host.shutdown().await;
        }
    });
}

criterion_group!(benches, group_store);
criterion_main!(benches);
