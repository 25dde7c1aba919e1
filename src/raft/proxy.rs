//! Forwarding a client connection to the leader: the follower that accepted it connects
//! to the leader's port of the same kind (AMQP, or amqps for a connection on the amqps
//! listener) and copies bytes both ways until either side closes. The client never needs
//! to know which node leads; TLS and SASL happen at the leader.
//!
//! Does not: look at the bytes. An amqps connection passes through still encrypted (its
//! SNI reaches the leader untouched), which is why every node serves the same certificate.

use std::time::Duration;

use entrepot_cluster::NodeId;
use tokio::net::TcpStream;

/// Longest a follower waits to connect to the leader.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Copies `client` ↔ the leader at `amqp` (its AMQP or amqps address) until one side
/// closes.
pub async fn forward(mut client: TcpStream, leader: NodeId, amqp: &str) {
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
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => tracing::debug!(leader, up, down, "forwarded connection ended"),
        Err(e) => tracing::debug!(leader, error = %e, "forwarded connection failed"),
    }
}
