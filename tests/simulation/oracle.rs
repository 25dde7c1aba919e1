//! The safety checks run after each seed, once the cluster converged: what every node's
//! store holds against what the clients were told ([`History`]).
//!
//! On every node:
//! * the message log reaches the committed end, and every record it holds below it is
//!   byte-identical to the leader's record at that offset where the leader holds one
//!   (offsets are the same on every node). After a snapshot install a node holds nothing
//!   below the snapshot's first live offset, and an empty placeholder at each offset
//!   acknowledged before the snapshot: an empty record must be an acknowledged offset;
//! * every acknowledged message that is not acked on the node is at its offset with its
//!   bytes (none lost); one acked on the node was consumed or its ack is in doubt, and
//!   every consumed offset is acked (none comes back); every node agrees on the ack state
//!   of every committed offset;
//! * every record is a message some producer sent, byte for byte (none invented), and no
//!   message sits at two offsets of the committed log (none duplicated);
//! * `Store::recover()` — what a broker rebuilds its queues from — returns no message
//!   whose ack committed (no consumed message comes back) and every acknowledged message
//!   nobody consumed (none lost to a stray ack). Messages and acks in doubt may go either
//!   way.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use entrepot::broker::replication::Replication;
use entrepot::broker::store::Store;
use entrepot_cluster::NodeId;

use crate::cluster::Cluster;
use crate::workload::{id_of, message_of, History, ADDRESS};

/// Figures of one check, for the run's summary line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Checked {
    /// Offsets below the committed end.
    pub committed: u64,
    /// Records beyond it on some node (an old leader's uncommitted tail).
    pub tails: u64,
    /// Offsets whose ack state differs between nodes (all of them acks in doubt).
    pub ack_divergence: u64,
    /// Offsets below the committed end that some node holds no message for (below its
    /// installed snapshot's first live offset, or an empty placeholder), summed over nodes.
    pub not_held: u64,
}

/// Checks every node of a converged cluster led by `leader`; `Err` says what broke.
pub fn check(cluster: &Cluster, leader: NodeId, h: &History) -> Result<Checked, String> {
    let reference = cluster.machine(leader).ok_or("leader is down")?;
    let end = reference.applied_message_end().unwrap_or(0);
    let (ref_log, _) = reference.logs();
    let mut checked = Checked {
        committed: end,
        ..Checked::default()
    };
    let mut acked_on: BTreeMap<u64, Vec<bool>> = BTreeMap::new();
    for id in cluster.ids.iter().copied() {
        let machine = cluster.machine(id).ok_or(format!("node {id} is down"))?;
        let (log, acks) = machine.logs();
        if log.next_offset() < end {
            return Err(format!(
                "node {id}: log ends at {} but {end} offsets are committed",
                log.next_offset()
            ));
        }
        checked.not_held += log.first_offset().min(end);
        let mut seen = BTreeSet::new();
        for offset in log.first_offset()..log.next_offset() {
            let record = log
                .read(offset)
                .map_err(|e| format!("node {id} @{offset}: {e}"))?;
            if record.payload.is_empty() {
                checked.not_held += 1;
                // A snapshot's placeholder for a message acknowledged before it was taken.
                if offset >= end || !acks.is_acked(offset) {
                    return Err(format!(
                        "node {id} @{offset}: an empty record that is not an acknowledged \
                         offset below the committed end {end}"
                    ));
                }
                continue;
            }
            let message = message_of(&record.payload).unwrap_or_default();
            let msg_id = id_of(message)
                .filter(|i| h.sent.get(*i as usize).is_some_and(|b| b[..] == *message))
                .ok_or(format!("node {id} @{offset}: a message nobody sent"))?;
            if offset < end {
                // The leader may hold nothing (below its snapshot's first live offset) or a
                // placeholder there; what both hold must be the same record.
                if let Ok(theirs) = ref_log.read(offset) {
                    if !theirs.payload.is_empty() && theirs.payload != record.payload {
                        return Err(format!("node {id} @{offset}: differs from leader {leader}"));
                    }
                }
                if !seen.insert(msg_id) {
                    return Err(format!("node {id}: message {msg_id} stored twice"));
                }
            } else {
                checked.tails += 1;
                if h.acked.contains_key(&msg_id) {
                    return Err(format!(
                        "node {id} @{offset}: acknowledged message {msg_id} beyond the committed end {end}"
                    ));
                }
            }
        }
        // Ack state of every committed offset, held as a record here or not.
        for offset in 0..end {
            acked_on
                .entry(offset)
                .or_default()
                .push(acks.is_acked(offset));
        }
        for (msg_id, offset) in &h.acked {
            if *offset >= end {
                return Err(format!(
                    "node {id}: acknowledged message {msg_id} at offset {offset} is beyond \
                     the committed end {end}"
                ));
            }
            if acks.is_acked(*offset) {
                // Consumed (or an ack in doubt that committed): its record may be gone.
                if !h.consumed.contains(offset) && !h.ack_in_doubt.contains(offset) {
                    return Err(format!(
                        "node {id}: acknowledged message {msg_id} at offset {offset} is \
                         acked but nobody consumed it (lost)"
                    ));
                }
                continue;
            }
            let ok = log
                .read(*offset)
                .is_ok_and(|r| message_of(&r.payload) == Some(&h.sent[*msg_id as usize][..]));
            if !ok {
                return Err(format!(
                    "node {id}: acknowledged message {msg_id} at offset {offset} is lost"
                ));
            }
        }
        for offset in &h.consumed {
            if !acks.is_acked(*offset) {
                return Err(format!(
                    "node {id}: consumed offset {offset} is not acked (it would come back)"
                ));
            }
        }
        let store = Store::replicated(machine.dir(), log, acks, Arc::new(Replication::new()));
        check_recovered(id, &store, h)?;
    }
    checked.ack_divergence = acked_on
        .iter()
        .filter(|(_, v)| v.iter().any(|a| *a != v[0]))
        .count() as u64;
    // Acknowledgements are persisted only when applied, after the commit, so every node
    // agrees on every offset, in doubt or not.
    if let Some((o, _)) = acked_on.iter().find(|(_, v)| v.iter().any(|a| *a != v[0])) {
        return Err(format!("offset {o}: nodes disagree on whether it is acked"));
    }
    Ok(checked)
}

/// What a broker on this node would rebuild its queue from.
fn check_recovered(id: NodeId, store: &Store, h: &History) -> Result<(), String> {
    let live: BTreeMap<u64, Bytes> = store
        .recover()
        .map_err(|e| format!("node {id}: recover: {e}"))?
        .into_iter()
        .filter(|m| m.address == ADDRESS)
        .map(|m| (m.offset, m.message))
        .collect();
    if let Some(o) = h.consumed.iter().find(|o| live.contains_key(o)) {
        return Err(format!(
            "node {id}: consumed message at offset {o} comes back"
        ));
    }
    for (msg_id, offset) in &h.acked {
        if h.consumed.contains(offset) || h.ack_in_doubt.contains(offset) {
            continue;
        }
        if live.get(offset) != Some(&h.sent[*msg_id as usize]) {
            return Err(format!(
                "node {id}: acknowledged, unconsumed message {msg_id} (offset {offset}) is not recovered"
            ));
        }
    }
    Ok(())
}
