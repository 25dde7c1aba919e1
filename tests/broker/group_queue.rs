//! Goal: a broker `Queue` runs over a clustered address's store (`QueueOwner::Group` over
//! a `GroupStore`, issue 12 step 4.2): a consumer on a real AMQP connection receives the
//! committed messages, and what it does — accept, modify as failed — is recorded in the
//! address's Raft group, identically on all three replicas.
//! Method: three real hosts in this process (`three_hosts.rs`); the leader's `GroupStore`
//! appends the messages and, once each is committed, the test enqueues it (the producer
//! path is not wired yet); an in-process broker (`Broker::open` on a temporary directory,
//! `server::serve` on `127.0.0.1:0`) serves the queue; an fe2o3 receiver consumes. Every
//! wait is bounded; nothing is timed.

use std::sync::Arc;
use std::time::Duration;

use entrepot::auth::Gatekeeper;
use entrepot::broker::queue::{Queue, QueueOwner};
use entrepot::broker::{queued, Broker};
use entrepot::config::BrokerConfig;
use entrepot::raft::group_store::GroupStore;
use entrepot::server::{serve, Serving};
use fe2o3_amqp::types::messaging::Modified;
use fe2o3_amqp::{Connection, Receiver, Session};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::client::within;
use crate::three_hosts::{Cluster, NODES, WAIT};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_over_a_group_store_records_a_consumers_outcomes_in_the_group() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = Cluster::start().await;
        let leader = c.leader_id().await;
        let store = Arc::new(GroupStore::new(
            ADDRESS,
            c.handle(leader),
            c.machine(leader),
        ));
        let dir = tempfile::tempdir().unwrap();
        let config = BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            ..BrokerConfig::default()
        };
        let broker = Broker::open(config).unwrap();
        let queue = broker.adopt_queue(Queue::owned(
            ADDRESS.to_owned(),
            QueueOwner::Group(store.clone()),
        ));
        // Each message enters the queue once the group committed it.
        for i in 0..MESSAGES {
            let a = store.append(&[&string_message(&format!("m{i}"))]).unwrap();
            let m = within("commit", a.pending.committed()).await.unwrap();
            assert_eq!(m.offset, i);
            queue.enqueue(&broker, queued(m.offset, m.message, 0));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("amqp://{}", listener.local_addr().unwrap());
        let (stop, shutdown) = watch::channel(false);
        let serving = Serving {
            broker: Arc::clone(&broker),
            gate: Arc::new(Gatekeeper::default()),
            permits: Arc::new(Semaphore::new(8)),
            tls: None,
        };
        let server = tokio::spawn(serve(listener, serving, shutdown));
        let mut conn = within("open", Connection::open("group-queue", url.as_str()))
            .await
            .unwrap();
        let mut session = within("begin", Session::begin(&mut conn)).await.unwrap();
        let mut receiver = within("attach", Receiver::attach(&mut session, "r", ADDRESS))
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
        within("detach", receiver.close()).await.unwrap();
        within("end", session.end()).await.unwrap();
        within("close", conn.close()).await.unwrap();
        stop.send(true).unwrap();
        within("server", server).await.unwrap();
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}
