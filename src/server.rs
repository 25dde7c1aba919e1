//! The AMQP listener: accepts sockets, caps their number, and hands each to its own
//! connection task. On shutdown it stops accepting, tells every connection to close,
//! waits for them (bounded), and lets the store finish its last sync.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::broker::Broker;
use crate::connection;

/// Longest a graceful shutdown waits for connections to close.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Binds the AMQP port; separate from [`serve`] so the caller can report the bound address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(broker.config().max_connections));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                    tracing::warn!(%peer, "connection limit reached, refusing");
                    drop(stream);
                    continue;
                };
                let broker = Arc::clone(&broker);
                let shutdown = shutdown.clone();
                tasks.spawn(async move {
                    connection::serve(stream, broker, shutdown).await;
                    drop(permit);
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(remaining = tasks.len(), "connections did not close in time");
        tasks.abort_all();
    }
}
