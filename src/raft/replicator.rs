//! The replicator of an active leader: store operations → Raft entries → committed watch.
//!
//! One task submits batches with `client_write_ff` strictly in the order they were taken
//! (so the Raft log holds operations in the store's order), keeping at most
//! [`MAX_IN_FLIGHT`] entries unanswered; a second task awaits the answers in the same order
//! and raises the committed watch. While entries are in flight, new operations gather
//! into the next batch: the busier the broker, the more each Raft round trip carries.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use entrepot_cluster::{Request, TypeConfig};
use openraft::Raft;
use tokio::sync::{mpsc, watch};

use crate::broker::replication::Replication;

/// Most Raft entries submitted and not yet answered.
pub const MAX_IN_FLIGHT: usize = 8;

/// What `client_write_ff` hands back: the answer to one entry, once applied.
type Answer =
    <<TypeConfig as openraft::RaftTypeConfig>::Responder as openraft::raft::responder::Responder<
        TypeConfig,
    >>::Receiver;

/// Runs until `shutdown` or until Raft refuses a write (leadership lost); either way every
/// operation not yet committed fails.
pub async fn run(
    raft: Raft<TypeConfig>,
    replication: Arc<Replication>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<(Answer, u64, Instant, usize)>(MAX_IN_FLIGHT);
    let completer = {
        let replication = Arc::clone(&replication);
        tokio::spawn(async move {
            while let Some((answer, end_seq, submitted, bytes)) = rx.recv().await {
                match answer.await {
                    Ok(Ok(_)) => {
                        let stats = &replication.stats;
                        stats.commit_latency.record(submitted.elapsed());
                        stats.batches.fetch_add(1, Ordering::Relaxed);
                        stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                        replication.committed(end_seq)
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "replication refused");
                        replication.fail(&format!("not committed: {e}"));
                        return;
                    }
                    Err(_) => {
                        replication.fail("Raft stopped before committing");
                        return;
                    }
                }
            }
        })
    };
    loop {
        let batch = match replication.take() {
            Some(b) => b,
            None => {
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => break,
                    _ = replication.queued() => continue,
                }
            }
        };
        let permit = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            p = tx.reserve() => p,
        };
        let Ok(permit) = permit else { break };
        let (submitted, bytes) = (Instant::now(), batch.ops.len());
        match raft.client_write_ff(Request::Ops(batch.ops)).await {
            Ok(answer) => permit.send((answer, batch.end_seq, submitted, bytes)),
            Err(e) => {
                replication.fail(&format!("Raft stopped: {e}"));
                break;
            }
        }
    }
    drop(tx);
    replication.fail("replicator stopped");
    let _ = completer.await;
}
