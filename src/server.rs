//! The AMQP listener: accepts sockets, caps their number, and hands each to its own
//! connection task. On shutdown it stops accepting, tells every connection to close,
//! waits for them (bounded), and lets the store finish its last sync.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::auth::Gatekeeper;
use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::connection::Accepted;
use crate::tls::TlsFiles;
use crate::{connection, manifest, metrics};

/// Longest a graceful shutdown waits for connections to close.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Binds the AMQP port; separate from [`serve`] so the caller can report the bound address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// What a listener serves: the broker, the gatekeeper, and the connection cap shared by
/// the plain and TLS listeners.
#[derive(Clone)]
pub struct Serving {
    pub broker: Arc<Broker>,
    pub gate: Arc<Gatekeeper>,
    pub permits: Arc<Semaphore>,
    /// Set for the amqps listener.
    pub tls: Option<Arc<TlsFiles>>,
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(listener: TcpListener, serving: Serving, shutdown: watch::Receiver<bool>) {
    let Serving {
        broker,
        gate,
        permits,
        tls,
    } = serving;
    let closing = shutdown.clone();
    accept_loop(listener, permits, shutdown, move |stream| {
        let broker = Arc::clone(&broker);
        let gate = Arc::clone(&gate);
        let shutdown = closing.clone();
        let tls = tls.clone();
        async move {
            let accepted = match tls {
                None => Some(Accepted::tcp(stream)),
                Some(tls) => accept_tls(stream, &tls).await,
            };
            if let Some(accepted) = accepted {
                connection::serve(accepted, broker, gate, shutdown).await;
            }
        }
    })
    .await
}

/// Accepts connections until `shutdown` turns true, each handled by `handle` in its own
/// task holding one of `permits` (refused when none is left); then waits, at most
/// [`SHUTDOWN_GRACE`], for the handlers to end, and aborts the rest.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
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
                let handled = handle(stream);
                tasks.spawn(async move {
                    handled.await;
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

/// The TLS handshake of an amqps connection, bounded like the AMQP handshake; `None`
/// (logged) when it fails or times out.
pub(crate) async fn accept_tls(stream: tokio::net::TcpStream, tls: &TlsFiles) -> Option<Accepted> {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let quickack = Some(connection::QuickAck::of(&stream));
    let handshake = tls.acceptor().accept(stream);
    match tokio::time::timeout(connection::TLS_HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(stream)) => {
            let sni = stream.get_ref().1.server_name().map(str::to_owned);
            let (rd, wr) = tokio::io::split(stream);
            Some(Accepted {
                rd: Box::new(rd),
                wr: Box::new(wr),
                peer,
                sni,
                quickack,
            })
        }
        Ok(Err(e)) => {
            tracing::info!(?peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(?peer, "TLS handshake timed out");
            None
        }
    }
}

/// The amqps certificate, when `config` names one; loaded (and checked) before anything
/// binds, so a bad file fails the start.
pub(crate) fn load_tls(config: &BrokerConfig) -> anyhow::Result<Option<Arc<TlsFiles>>> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(Arc::new(TlsFiles::load(cert, key)?))),
        _ => Ok(None),
    }
}

/// Binds the amqps listener ([`BrokerConfig::tls_listen`]) when a certificate is
/// configured.
pub(crate) async fn bind_tls(config: &BrokerConfig) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = config.tls_listen() else {
        return Ok(None);
    };
    let listener = bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    Ok(Some(listener))
}

/// Builds the gatekeeper and applies the manifests once, before any listener opens.
pub(crate) fn admit(config: &BrokerConfig, broker: &Broker) -> anyhow::Result<Arc<Gatekeeper>> {
    let tokens = match &config.token_file {
        Some(path) => Some(Box::new(
            crate::auth::tokens::FileTokens::load(path).map_err(anyhow::Error::msg)?,
        )
            as Box<dyn crate::auth::tokens::TokenAuthenticator>),
        None => None,
    };
    let gate = Gatekeeper::new(
        manifest::Live::new(config.default_address_space.clone()),
        tokens,
    );
    if let Some(dir) = &config.manifests {
        manifest::watch::apply(dir, broker, &gate.manifests).map_err(|errors| {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("invalid manifests:\n{}", lines.join("\n"))
        })?;
    }
    Ok(Arc::new(gate))
}

/// A running node: the broker, its AMQP and HTTP listeners and housekeeping.
pub struct Node {
    pub broker: Arc<Broker>,
    pub gate: Arc<Gatekeeper>,
    /// The amqps listener, when a certificate is configured.
    pub amqps_addr: Option<SocketAddr>,
    pub amqp_addr: SocketAddr,
    pub http_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Opens the store, binds both listeners and starts serving until `shutdown` is true.
    pub async fn start(
        mut config: BrokerConfig,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Node> {
        if config.manifests.is_some() {
            // Only declared addresses exist when manifests are in charge.
            config.auto_create = false;
        }
        let tls = load_tls(&config)?;
        let broker = tokio::task::block_in_place(|| Broker::open(config.clone()))
            .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
        let amqp = bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let http = TcpListener::bind(config.http)
            .await
            .with_context(|| format!("binding {}", config.http))?;
        let gate = tokio::task::block_in_place(|| admit(&config, &broker))?;
        let serving = Serving {
            broker: Arc::clone(&broker),
            gate: Arc::clone(&gate),
            permits: Arc::new(Semaphore::new(config.max_connections)),
            tls: None,
        };
        let amqps = bind_tls(&config).await?;
        let amqps_addr = amqps.as_ref().map(TcpListener::local_addr).transpose()?;
        let (amqp_addr, http_addr) = (amqp.local_addr()?, http.local_addr()?);
        let amqps_shown = amqps_addr.map_or_else(|| "-".to_owned(), |a| a.to_string());
        tracing::info!(amqp = %amqp_addr, http = %http_addr, amqps = %amqps_shown, data_dir = %config.data_dir.display(), "entrepot listening");
        let mut tasks = vec![
            tokio::spawn(Arc::clone(&broker).housekeeping(shutdown.clone())),
            tokio::spawn(metrics::serve_http(
                http,
                Arc::clone(&broker),
                shutdown.clone(),
            )),
            tokio::spawn(serve(amqp, serving.clone(), shutdown.clone())),
        ];
        if let Some(listener) = amqps {
            let serving = Serving { tls, ..serving };
            tasks.push(tokio::spawn(serve(listener, serving, shutdown.clone())));
        }
        if let Some(dir) = config.manifests.clone() {
            let watch =
                manifest::watch::watch_dir(dir, Arc::clone(&broker), Arc::clone(&gate), shutdown);
            tasks.push(tokio::spawn(watch));
        }
        Ok(Node {
            broker,
            gate,
            amqps_addr,
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
