//! Goal: a broker `Queue` runs over a clustered address's store (`QueueOwner::Group` over
//! a `GroupStore`, issue 12 step 4.2): a consumer on a real AMQP connection receives the
//! committed messages, and what it does — accept, modify as failed — is recorded in the
//! address's Raft group, identically on all three replicas.
//! Method: three real hosts in this process (`three_hosts.rs`); the leader's `GroupStore`
//! appends the messages and, once each is committed, the test enqueues it (the producer
//! path is not wired yet); an in-process broker (`Broker::open` on a temporary directory,
//! `server::serve` on `127.0.0.1:0`) serves the queue; an fe2o3 receiver consumes. Every
//! wait is bounded; nothing is timed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use entrepot::auth::Gatekeeper;
use entrepot::broker::queue::{Queue, QueueOwner};
use entrepot::broker::{queued, Broker};
use entrepot::config::BrokerConfig;
use entrepot::raft::group_queue::activate;
use entrepot::raft::group_store::GroupStore;
use entrepot::server::{serve, Serving};
use entrepot_cluster::NodeId;
use entrepot_storage::RECORD_HEADER_LEN;
use fe2o3_amqp::types::messaging::Modified;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::client::{within, within_for, QUIET};
use crate::three_hosts::{Cluster, NODES, WAIT};
use crate::transactions::{declared, rejection, send_in_txn, with_coordinator_at};

const ADDRESS: &str = "orders";
const MESSAGES: u64 = 5;
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// An AMQP message whose body is the string `s` (amqp-value, str8).
fn string_message(s: &str) -> Vec<u8> {
    let mut m = vec![0x00, 0x53, 0x77, 0xa1, s.len() as u8];
    m.extend_from_slice(s.as_bytes());
    m
}

/// Waits until every replica's machine satisfies `ok`.
async fn on_every_replica(c: &Cluster, what: &str, ok: impl Fn(&GroupStore) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    for n in 0..NODES {
        let replica = GroupStore::new(ADDRESS, c.handle(n), c.machine(n));
        while !ok(&replica) {
            assert!(tokio::time::Instant::now() < deadline, "node {n}: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An in-process broker's AMQP listener and one client session on it.
struct Served {
    amqp: std::net::SocketAddr,
    conn: fe2o3_amqp::connection::ConnectionHandle<()>,
    session: fe2o3_amqp::session::SessionHandle<()>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

async fn serve_and_connect(broker: &Arc<Broker>) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let amqp = listener.local_addr().unwrap();
    let url = format!("amqp://{amqp}");
    let (stop, shutdown) = watch::channel(false);
    let serving = Serving {
        broker: Arc::clone(broker),
        gate: Arc::new(Gatekeeper::default()),
        permits: Arc::new(Semaphore::new(8)),
        tls: None,
        door: None,
    };
    let server = tokio::spawn(serve(listener, serving, shutdown));
    let mut conn = within("open", Connection::open("group-queue", url.as_str()))
        .await
        .unwrap();
    let session = within("begin", Session::begin(&mut conn)).await.unwrap();
    Served {
        amqp,
        conn,
        session,
        stop,
        server,
    }
}

impl Served {
    async fn close(mut self, receiver: Option<Receiver>) {
        if let Some(receiver) = receiver {
            within("detach", receiver.close()).await.unwrap();
        }
        within("end", self.session.end()).await.unwrap();
        within("close", self.conn.close()).await.unwrap();
        self.stop.send(true).unwrap();
        within("server", self.server).await.unwrap();
    }
}

fn temp_broker(dir: &tempfile::TempDir) -> Arc<Broker> {
    let config = BrokerConfig {
        data_dir: dir.path().to_path_buf(),
        ..BrokerConfig::default()
    };
    Broker::open(config).unwrap()
}

/// A broker on a temporary directory serving [`ADDRESS`] from a queue over the group
/// store of the current leader (the directory lives as long as the returned guard).
async fn adopted_at_leader(
    c: &Cluster,
) -> (
    NodeId,
    Arc<GroupStore>,
    Arc<Queue>,
    Arc<Broker>,
    tempfile::TempDir,
) {
    let leader = c.leader_id().await;
    let store = Arc::new(GroupStore::new(
        ADDRESS,
        c.handle(leader),
        c.machine(leader),
    ));
    let dir = tempfile::tempdir().unwrap();
    let broker = temp_broker(&dir);
    let queue = broker.adopt_queue(Queue::owned(
        ADDRESS.to_owned(),
        QueueOwner::Group(store.clone()),
    ));
    (leader, store, queue, broker, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_over_a_group_store_records_a_consumers_outcomes_in_the_group() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = Cluster::start().await;
        let (_leader, store, queue, broker, _dir) = adopted_at_leader(&c).await;
        // Each message enters the queue once the group committed it.
        for i in 0..MESSAGES {
            let a = store.append(&[&string_message(&format!("m{i}"))]).unwrap();
            let m = within("commit", a.pending.committed()).await.unwrap();
            assert_eq!(m.offset, i);
            queue.enqueue(&broker, queued(m.offset, m.message, 0));
        }
        let mut served = serve_and_connect(&broker).await;
        let mut receiver = within(
            "attach",
            Receiver::attach(&mut served.session, "r", ADDRESS),
        )
        .await
        .unwrap();
        let mut last = None;
        for i in 0..MESSAGES {
            let d = within("recv", receiver.recv::<String>()).await.unwrap();
            assert_eq!(d.body(), &format!("m{i}"));
            match i {
                3 => {
                    let failed = Modified {
                        delivery_failed: Some(true),
                        undeliverable_here: None,
                        message_annotations: None,
                    };
                    within("modify", receiver.modify(&d, failed)).await.unwrap();
                }
                _ => within("accept", receiver.accept(&d)).await.unwrap(),
            }
            last = Some(i);
        }
        assert_eq!(last, Some(MESSAGES - 1));
        // Accepted ones are acknowledged in the group; the failed one counted there.
        on_every_replica(&c, "acks and the count", |r| {
            [0, 1, 2, 4].iter().all(|&o| r.is_acked(o))
                && !r.is_acked(3)
                && r.delivery_count(0, 3) == 1
        })
        .await;
        // Redelivered with its count, accepted: nothing live is left anywhere.
        let again = within("recv again", receiver.recv::<String>())
            .await
            .unwrap();
        assert_eq!(again.body(), "m3");
        let count = again
            .message()
            .header
            .as_ref()
            .map_or(0, |h| h.delivery_count);
        assert_eq!(count, 1);
        within("accept", receiver.accept(&again)).await.unwrap();
        on_every_replica(&c, "all acknowledged", |r| {
            (0..MESSAGES).all(|o| r.is_acked(o)) && r.read(3).unwrap().is_none()
        })
        .await;
        served.close(Some(receiver)).await;
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_every_host_restarts_the_new_leader_activates_the_queue_with_exactly_the_live_messages(
) {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = Cluster::start().await;
        let first = c.leader_id().await;
        let s = GroupStore::new(ADDRESS, c.handle(first), c.machine(first));
        let mut last = None;
        for i in 0..8 {
            let a = s.append(&[&string_message(&format!("m{i}"))]).unwrap();
            last = Some(a.durable);
        }
        within("durable", last.unwrap().wait()).await.unwrap();
        within("acks", s.ack(&[1, 4]).unwrap().wait())
            .await
            .unwrap();
        let count = s.set_delivery_count(0, 6, 2).unwrap();
        within("count", count.wait()).await.unwrap();
        drop(s);
        c.restart_all().await;
        let leader = c.leader_id().await;
        let dir = tempfile::tempdir().unwrap();
        let broker = temp_broker(&dir);
        let activated = activate(&broker, ADDRESS, c.handle(leader), c.machine(leader))
            .await
            .unwrap();
        assert_eq!(activated.recovered, 6);
        let mut served = serve_and_connect(&broker).await;
        let mut receiver = within(
            "attach",
            Receiver::attach(&mut served.session, "r", ADDRESS),
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        for _ in 0..6 {
            let d = within("recv", receiver.recv::<String>()).await.unwrap();
            let count = d.message().header.as_ref().map_or(0, |h| h.delivery_count);
            got.push((d.body().clone(), count));
            within("accept", receiver.accept(&d)).await.unwrap();
        }
        let want: Vec<(String, u32)> = [0, 2, 3, 5, 6, 7]
            .iter()
            .map(|&i| (format!("m{i}"), if i == 6 { 2 } else { 0 }))
            .collect();
        assert_eq!(got, want);
        on_every_replica(&c, "all acknowledged", |r| (0..8).all(|o| r.is_acked(o))).await;
        served.close(Some(receiver)).await;
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_is_accepted_only_once_the_group_committed_and_its_messages_are_served_from_it()
{
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = Cluster::start().await;
        let (leader, _store, _queue, broker, _dir) = adopted_at_leader(&c).await;
        let mut served = serve_and_connect(&broker).await;
        let mut sender = within("attach", Sender::attach(&mut served.session, "s", ADDRESS))
            .await
            .unwrap();
        // Accepted means committed: the leader's index holds the message already.
        for i in 0..MESSAGES {
            let outcome = within("send", sender.send(format!("p{i}"))).await.unwrap();
            assert!(outcome.is_accepted(), "{outcome:?}");
            assert_eq!(c.machine(leader).next_offset(), i + 1);
        }
        // No majority: the leader logs the next one, but the producer hears nothing.
        let followers: Vec<u64> = (0..NODES).filter(|&n| n != leader).collect();
        for &n in &followers {
            c.stop(n).await;
        }
        let mut waiting = Box::pin(sender.send("after the quorum".to_owned()));
        assert!(tokio::time::timeout(QUIET, &mut waiting).await.is_err());
        c.start_again(followers[0]).await;
        let outcome = within_for(WAIT, "send with a majority", waiting)
            .await
            .unwrap();
        assert!(outcome.is_accepted(), "{outcome:?}");
        // Served from the group, in order; accepted; acknowledged on the running replicas.
        let mut receiver = within(
            "attach",
            Receiver::attach(&mut served.session, "r", ADDRESS),
        )
        .await
        .unwrap();
        let mut want: Vec<String> = (0..MESSAGES).map(|i| format!("p{i}")).collect();
        want.push("after the quorum".into());
        for w in &want {
            let d = within("recv", receiver.recv::<String>()).await.unwrap();
            assert_eq!(d.body(), w);
            within("accept", receiver.accept(&d)).await.unwrap();
        }
        let all = want.len() as u64;
        let deadline = tokio::time::Instant::now() + WAIT;
        for &n in [leader, followers[0]].iter() {
            let replica = GroupStore::new(ADDRESS, c.handle(n), c.machine(n));
            while !(0..all).all(|o| replica.is_acked(o)) {
                assert!(tokio::time::Instant::now() < deadline, "node {n}: acks");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        within("detach", sender.close()).await.unwrap();
        served.close(Some(receiver)).await;
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// Bytes each node's log wrote so far (records with their frames).
fn written(c: &Cluster) -> Vec<u64> {
    (0..NODES)
        .map(|n| {
            let s = c.nodes[&n].host.node_log().log().stats();
            let frames = s.records_appended.load(Ordering::Relaxed) * RECORD_HEADER_LEN as u64;
            s.bytes_appended.load(Ordering::Relaxed) + frames
        })
        .collect()
}

/// Issue 12's "each message written once": a message produced over AMQP to an address
/// with its own store costs every node about one copy in its node log, and nothing in the
/// broker's shared store. The figure is printed (`--nocapture`); the bound is 1.25× (one
/// copy plus framing, far below the two copies of the one-group cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_writes_a_produced_message_once() {
    const COUNT: u64 = 100;
    const BODY_BYTES: usize = 1024;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = Cluster::start().await;
        let (leader, store, _queue, broker, _dir) = adopted_at_leader(&c).await;
        let mut served = serve_and_connect(&broker).await;
        let mut sender = within("attach", Sender::attach(&mut served.session, "s", ADDRESS))
            .await
            .unwrap();
        let body = "x".repeat(BODY_BYTES);
        let before = written(&c);
        for _ in 0..COUNT {
            let outcome = within("send", sender.send(body.clone())).await.unwrap();
            assert!(outcome.is_accepted(), "{outcome:?}");
        }
        let applied = c.handle(leader).applied().borrow().unwrap();
        c.applied_everywhere(applied).await;
        let after = written(&c);
        // The message as the producer encoded it (an amqp-value str32 section: 3 bytes
        // of descriptor, a constructor, a 4-byte length), stored exactly so.
        let message_bytes = BODY_BYTES + 8;
        assert_eq!(store.read(0).unwrap().expect("live").len(), message_bytes);
        for n in 0..NODES {
            let per_message = (after[n as usize] - before[n as usize]) as f64 / COUNT as f64;
            let ratio = per_message / message_bytes as f64;
            eprintln!(
                "node {n}: {per_message:.0} B written per {message_bytes} B message ({ratio:.3}x)"
            );
            assert!((1.0..1.25).contains(&ratio), "node {n}: {ratio:.3}x");
        }
        let shared = broker.store().log().stats();
        assert_eq!(shared.records_appended.load(Ordering::Relaxed), 0);
        within("detach", sender.close()).await.unwrap();
        served.close(None).await;
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// A transaction's message would need its whole batch in one proposal (ARCHITECTURE.md,
/// 4.2 (g)): a transactional transfer to an address with its own store is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_transfer_to_a_group_backed_queue_is_refused() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = Cluster::start().await;
        let (leader, _store, _queue, broker, _dir) = adopted_at_leader(&c).await;
        let served = serve_and_connect(&broker).await;
        let mut raw = with_coordinator_at(served.amqp, ADDRESS).await;
        let txn = declared(&mut raw, 0).await;
        let (condition, description) = rejection(send_in_txn(&mut raw, 1, &txn, b"t").await);
        assert_eq!(condition, "amqp:not-allowed", "{description}");
        assert!(description.contains("clustered address"), "{description}");
        assert_eq!(c.machine(leader).next_offset(), 0, "nothing proposed");
        drop(raw);
        served.close(None).await;
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}
