//! Draining a node before a scale-down removes it (`POST /cluster/drain`, run by
//! `entrepot drain` from the pod's preStop hook).
//!
//! In order:
//! 1. Refuse when this node is the last voter (the cluster would have none): nothing
//!    changes, the answer names the reason.
//! 2. [`DrainState::Leaving`]: `/readyz` turns 503 and the front door closes every new
//!    connection at once (the client's next attempt goes to another node).
//! 3. Leave the membership (`entrepot_cluster::membership::leave`): a leader commits a
//!    membership in which it is a learner and steps down (openraft 0.9 has no leadership
//!    transfer; the others elect a new leader once its lease runs out, and its own
//!    connections are closed with `amqp:connection:forced` as on any leadership loss);
//!    then the leader removes the node. Why a learner first, and why no transfer: the
//!    module docs of `membership.rs`.
//! 4. [`DrainState::Drained`]: the connections this node forwards to the leader are closed
//!    with `amqp:connection:forced` and a description naming the drain (`proxy.rs`).
//! 5. Answer, one line per step.
//!
//! Bounded by [`DRAIN_TIMEOUT`]; on failure the node goes back to serving (a learner or a
//! voter, as far as it got) and the answer says why. A drained node stays out until it is
//! started again: then its joiner asks to join (auto-join), so a scale-up that brings the
//! pod back on its old volume works.
//!
//! Does not: tell a restart from a scale-down (`entrepot drain` does, from the desired
//! replica count), or move messages (every node holds the whole store: one Raft group).

use std::time::{Duration, Instant};

use entrepot_cluster::membership::{self, ChangeError};
use entrepot_cluster::TcpNetwork;
use openraft::Raft;
use tokio::sync::watch;

use super::admin::Reply;
use entrepot_cluster::TypeConfig;

/// Longest a drain may take, a leadership change and two membership changes included.
/// The StatefulSet's terminationGracePeriodSeconds must cover it plus the shutdown after
/// it (SHUTDOWN_GRACE and the last sync): 60 s here, 90 s in the manifest.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a drained node lets its forwarded connections take their `close` before it
/// answers (the proxy writes it within `proxy::FRAME_FINISH_TIMEOUT`).
pub const CLOSE_GRACE: Duration = Duration::from_millis(200);

/// Where this node stands with respect to a drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainState {
    /// Serving as usual.
    Serving,
    /// Leaving the membership: not ready, no new connection.
    Leaving,
    /// Out of the membership: forwarded connections are closed too.
    Drained,
}

/// Drains this node; see the module docs.
pub async fn drain(
    raft: &Raft<TypeConfig>,
    network: &TcpNetwork,
    state: &watch::Sender<DrainState>,
) -> Reply {
    let m = raft.metrics().borrow().clone();
    let id = m.id;
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
    if voters == [id] {
        return (
            "409 Conflict",
            format!("refused: {}\n", ChangeError::LastVoter { node: id }),
        );
    }
    if *state.borrow() == DrainState::Drained {
        return ("200 OK", format!("node {id} is drained already\n"));
    }
    state.send_replace(DrainState::Leaving);
    tracing::info!(node = id, "draining: leaving the membership");
    let mut lines = vec![format!(
        "node {id}: draining (not ready, new connections refused)"
    )];
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    match membership::leave(raft, network, deadline).await {
        Ok(steps) => lines.extend(steps.into_iter().map(|s| format!("node {id}: {s}"))),
        Err(e) => {
            state.send_replace(DrainState::Serving);
            tracing::warn!(node = id, error = %e, "drain failed: serving again");
            let status = match e {
                ChangeError::LastVoter { .. } => "409 Conflict",
                _ => "504 Gateway Timeout",
            };
            lines.push(format!(
                "drain failed within DRAIN_TIMEOUT ({DRAIN_TIMEOUT:?}): {e}"
            ));
            return (status, lines.join("\n") + "\n");
        }
    }
    state.send_replace(DrainState::Drained);
    tokio::time::sleep(CLOSE_GRACE).await;
    tracing::info!(
        node = id,
        "drained: out of the membership, client connections closed"
    );
    lines.push(format!(
        "node {id}: client connections closed (amqp:connection:forced): they reconnect to \
         another node"
    ));
    lines.push(format!("node {id}: drained"));
    ("200 OK", lines.join("\n") + "\n")
}
