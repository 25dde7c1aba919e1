//! The simulated clients and what they were told: a producer writing through the leader's
//! store (as a connection does), and a consumer settling committed messages with an ack.
//!
//! A message counts as *acknowledged* only when its operation's durability handle
//! completes (its batch committed); a failed handle leaves it *in doubt* (the entry may
//! still commit under the next leader; the broker tells the producer to resend). An ack
//! counts as *consumed* only when its own operation commits; a failed one is in doubt.
//! Every body is unique (`m<id>:` and filler), so the oracle can tell each record apart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use entrepot_storage::Durable;
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::rng::Rng;

/// The queue every message goes to.
pub const ADDRESS: &str = "orders";

/// Everything the clients did and heard; the oracle's ground truth.
#[derive(Default)]
pub struct History {
    /// Body of every message ever handed to a store, by id.
    pub sent: Vec<Bytes>,
    /// Acknowledged (committed) messages: id → offset.
    pub acked: BTreeMap<u64, u64>,
    /// Messages whose commit failed or never answered.
    pub in_doubt: BTreeSet<u64>,
    /// Offsets whose ack committed (a consumer's `accepted`).
    pub consumed: BTreeSet<u64>,
    /// Offsets whose ack was written but failed (or has no answer yet), and that no
    /// later ack consumed.
    pub ack_in_doubt: BTreeSet<u64>,
    /// Offsets whose ack waits for its answer.
    pub acks_pending: BTreeSet<u64>,
    /// Durability handles not answered yet (messages and acks).
    pub pending: u64,
}

/// The clients' shared record; cheap to clone.
#[derive(Clone, Default)]
pub struct Log {
    inner: Arc<Mutex<History>>,
}

impl Log {
    pub fn lock(&self) -> MutexGuard<'_, History> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The message inside a store record (`store.rs` format: 4-byte header, address, message).
pub fn message_of(payload: &[u8]) -> Option<&[u8]> {
    let len = u16::from_le_bytes([*payload.get(2)?, *payload.get(3)?]) as usize;
    payload.get(4 + len..)
}

/// Parses the id out of a body written by [`body`].
pub fn id_of(body: &[u8]) -> Option<u64> {
    let rest = body.strip_prefix(b"m")?;
    let end = rest.iter().position(|b| *b == b':')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn body(id: u64, rng: &mut Rng) -> Bytes {
    let mut b = format!("m{id}:").into_bytes();
    let filler = rng.between(0, 300) as usize;
    b.extend((0..filler).map(|i| b'a' + ((id as usize + i) % 26) as u8));
    Bytes::from(b)
}

/// Produces and consumes against whichever node leads, until `stop`.
pub async fn run(cluster: Cluster, log: Log, mut rng: Rng, mut stop: watch::Receiver<bool>) {
    loop {
        let pause = Duration::from_millis(rng.between(1, 15));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
        let leaders = cluster.leaders();
        if leaders.is_empty() {
            continue;
        }
        let leader = &leaders[rng.below(leaders.len() as u64) as usize];
        if rng.chance(750) {
            for _ in 0..rng.between(1, 4) {
                produce(leader, &log, &mut rng);
            }
        } else {
            consume(leader, &log, &mut rng);
        }
    }
}

fn produce(leader: &crate::node::Leader, log: &Log, rng: &mut Rng) {
    let id = log.lock().sent.len() as u64;
    let body = body(id, rng);
    let Ok((appended, offset, _, _)) = leader.store.append(ADDRESS, &[&body]) else {
        return; // nothing written, nothing queued
    };
    {
        let mut h = log.lock();
        h.sent.push(body);
        h.pending += 1;
    }
    let log = log.clone();
    tokio::spawn(async move {
        let ok = appended.durable.wait().await.is_ok();
        let mut h = log.lock();
        h.pending -= 1;
        if ok {
            h.acked.insert(id, offset);
        } else {
            h.in_doubt.insert(id);
        }
    });
}

/// Acks one acknowledged, unconsumed message, if this leader holds it unacked (a broker
/// only delivers what its store holds). A message whose ack failed may be consumed again
/// (redelivery).
fn consume(leader: &crate::node::Leader, log: &Log, rng: &mut Rng) {
    let (offset, body) = {
        let h = log.lock();
        let candidates: Vec<(u64, u64)> = h
            .acked
            .iter()
            .filter(|(_, o)| !h.consumed.contains(o) && !h.acks_pending.contains(o))
            .map(|(id, o)| (*id, *o))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let (id, offset) = candidates[rng.below(candidates.len() as u64) as usize];
        (offset, h.sent[id as usize].clone())
    };
    let holds = leader
        .store
        .log()
        .read(offset)
        .is_ok_and(|r| message_of(&r.payload) == Some(&body[..]));
    if !holds || leader.store.acks().is_acked(offset) {
        return;
    }
    let Ok(durable) = leader.store.ack(&[offset]) else {
        return;
    };
    {
        let mut h = log.lock();
        h.ack_in_doubt.insert(offset);
        h.acks_pending.insert(offset);
        h.pending += 1;
    }
    let log = log.clone();
    tokio::spawn(async move {
        let ok = wait(durable).await;
        let mut h = log.lock();
        h.pending -= 1;
        h.acks_pending.remove(&offset);
        if ok {
            h.ack_in_doubt.remove(&offset);
            h.consumed.insert(offset);
        }
    });
}

async fn wait(durable: Durable) -> bool {
    durable.wait().await.is_ok()
}
