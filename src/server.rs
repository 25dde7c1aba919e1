//! The AMQP listener: accepts sockets, caps their number, and hands each to its own
//! connection task. On shutdown it stops accepting, tells every connection to close,
//! waits for them (bounded), and lets the store finish its last sync.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::{connection, metrics};

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

/// A running node: the broker, its AMQP and HTTP listeners and housekeeping.
pub struct Node {
    pub broker: Arc<Broker>,
    pub amqp_addr: SocketAddr,
    pub http_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Opens the store, binds both listeners and starts serving until `shutdown` is true.
    pub async fn start(
        config: BrokerConfig,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Node> {
        let broker = tokio::task::block_in_place(|| Broker::open(config.clone()))
            .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
        let amqp = bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let http = TcpListener::bind(config.http)
            .await
            .with_context(|| format!("binding {}", config.http))?;
        let (amqp_addr, http_addr) = (amqp.local_addr()?, http.local_addr()?);
        tracing::info!(amqp = %amqp_addr, http = %http_addr, data_dir = %config.data_dir.display(), "entrepot listening");
        let tasks = vec![
            tokio::spawn(Arc::clone(&broker).housekeeping(shutdown.clone())),
            tokio::spawn(metrics::serve_http(
                http,
                Arc::clone(&broker),
                shutdown.clone(),
            )),
            tokio::spawn(serve(amqp, Arc::clone(&broker), shutdown)),
        ];
        Ok(Node {
            broker,
            amqp_addr,
            http_addr,
            tasks,
        })
    }

    /// Waits for every task to end after shutdown, then makes the store durable.
    pub async fn stopped(self) -> anyhow::Result<()> {
        for t in self.tasks {
            let _ = t.await;
        }
        self.broker.store().log().flush().context("final sync")?;
        tracing::info!("stopped");
        Ok(())
    }
}
