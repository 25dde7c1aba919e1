//! Forwarding a client connection to the leader: the follower that accepted it connects
//! to the leader's port of the same kind (AMQP, or amqps for a connection on the amqps
//! listener) and copies bytes both ways until either side closes. The client never needs
//! to know which node leads; TLS and SASL happen at the leader.
//!
//! A forwarded connection lives only as long as the leader it goes to: when this node
//! learns of another leader, or of none (the leader stopped answering heartbeats and an
//! election began — a SIGSTOPped, hung or partitioned leader), it closes the client's
//! connection, so the client reconnects and reaches the new leader within the election
//! timeout instead of hanging on a leader that may never answer again.
//!
//! Does not: look at the bytes. An amqps connection passes through still encrypted (its
//! SNI reaches the leader untouched), which is why every node serves the same certificate.

use std::time::Duration;

use entrepot_cluster::NodeId;
use tokio::net::TcpStream;

/// Longest a follower waits to connect to the leader.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Copies `client` ↔ the leader at `amqp` (its AMQP or amqps address) until one side
/// closes or `leader_gone` completes (this node no longer follows `leader`).
pub async fn forward(
    mut client: TcpStream,
    leader: NodeId,
    amqp: &str,
    leader_gone: impl std::future::Future<Output = ()>,
) {
    let _ = client.set_nodelay(true);
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(amqp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(leader, amqp, error = %e, "cannot reach the leader; closing the client");
            return;
        }
        Err(_) => {
            tracing::info!(
                leader,
                amqp,
                "leader did not answer in time; closing the client"
            );
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let mut upstream = upstream;
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
            Ok((up, down)) => tracing::debug!(leader, up, down, "forwarded connection ended"),
            Err(e) => tracing::debug!(leader, error = %e, "forwarded connection failed"),
        },
        () = leader_gone => tracing::info!(
            leader,
            "no longer following this leader: closing a forwarded client connection"
        ),
    }
}
