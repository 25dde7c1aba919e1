//! Goal: the per-address machine (`entrepot::raft::address_machine`) on three real hosts
//! keeps the same index on every member — message offsets and positions, acknowledged
//! ranges per consumer group, delivery counts — serves each message's record back as a
//! slice of the node log, recovers after every host restarts, and lets the log be purged
//! only below the oldest live message.
//! Method: three `entrepot_cluster::Host`s in this process (`three_hosts.rs`, shared with
//! `group_store.rs`), one address group; the broker's own ops (`broker::replication`
//! encoders) are proposed through the leader's handle, many at once (the host batches
//! them). Every wait is bounded; nothing is timed.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use entrepot::broker::replication::{
    encode_ack, encode_delivery_count, encode_group_floor, encode_message, OPS_VERSION,
};
use entrepot::raft::address_machine::message_record;
use entrepot_cluster::{ClusterError, GroupHandle, NodeId, Position};

use crate::three_hosts::{Cluster, NODES, WAIT};

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
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}
