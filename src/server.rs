//! A single node, and what every node serves alike: the listeners (AMQP, AMQPS, HTTP),
//! the accept loop that caps connections and hands each socket to its own connection
//! task, the gatekeeper built before any listener opens, and [`StartError`].
//!
//! Invariants: one semaphore caps the plain and TLS connections together; on shutdown the
//! node stops accepting, tells every connection to close, waits for them at most
//! [`SHUTDOWN_GRACE`], and [`Node::stopped`] returns only after the store's final sync.
//!
//! Does not: replicate (a clustered node is `raft::ClusterNode`, which uses the same
//! listeners and gatekeeper) or speak AMQP (that is `connection`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use tokio::task::JoinHandle;

use crate::auth::Gatekeeper;
use crate::broker::{Broker, BrokerError};
use crate::config::BrokerConfig;
use crate::connection::Accepted;
use crate::tls::TlsFiles;
use crate::{connection, manifest, metrics};

/// Longest a graceful shutdown waits for connections to close.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why a node (single or clustered) could not start or stop cleanly: the step that failed
/// and, as its source, the cause. Nothing here reaches a client; `main` prints the chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("creating {}", path.display())]
    CreateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the store in {}", path.display())]
    OpenStore {
        path: std::path::PathBuf,
        #[source]
        source: BrokerError,
    },
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The amqps certificate or key does not load.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The token file does not load (its message names the file).
    #[error("{0}")]
    Tokens(String),
    /// The manifests do not apply; one line per problem.
    #[error("invalid manifests:\n{}", .0.join("\n"))]
    Manifests(Vec<String>),
    /// A listener's own address could not be read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The last sync at shutdown failed (`log`: the store's message log or ack log).
    #[error("final sync of the {log}")]
    FinalSync {
        log: &'static str,
        #[source]
        source: entrepot_storage::StorageError,
    },
}

impl StartError {
    /// The error of binding `addr`, for `map_err`.
    pub(crate) fn bind(addr: SocketAddr) -> impl FnOnce(std::io::Error) -> StartError {
        move |source| StartError::Bind { addr, source }
    }
}

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
    /// A cluster node whose say closes a new connection at once (a drain), if any.
    pub door: Option<Arc<dyn metrics::ClusterView>>,
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(listener: TcpListener, serving: Serving, shutdown: watch::Receiver<bool>) {
    let Serving {
        broker,
        gate,
        permits,
        tls,
        door,
    } = serving;
    let closing = shutdown.clone();
    accept_loop(listener, permits, shutdown, move |stream| {
        let refused = door.as_ref().is_some_and(|d| d.refuses_connections());
        if refused {
            tracing::debug!(peer = ?stream.peer_addr().ok(), "draining: closing a new connection");
        }
        let broker = Arc::clone(&broker);
        let gate = Arc::clone(&gate);
        let shutdown = closing.clone();
        let tls = tls.clone();
        async move {
            if refused {
                return;
            }
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
                tls: true,
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
pub(crate) fn load_tls(config: &BrokerConfig) -> Result<Option<Arc<TlsFiles>>, StartError> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(Arc::new(TlsFiles::load(cert, key)?))),
        _ => Ok(None),
    }
}

/// Binds the amqps listener ([`BrokerConfig::tls_listen`]) when a certificate is
/// configured.
pub(crate) async fn bind_tls(config: &BrokerConfig) -> Result<Option<TcpListener>, StartError> {
    let Some(addr) = config.tls_listen() else {
        return Ok(None);
    };
    let listener = bind(addr).await.map_err(StartError::bind(addr))?;
    Ok(Some(listener))
}

/// Builds the gatekeeper and applies the manifests once, before any listener opens.
pub(crate) fn admit(config: &BrokerConfig, broker: &Broker) -> Result<Arc<Gatekeeper>, StartError> {
    let tokens = match &config.token_file {
        Some(path) => Some(Box::new(
            crate::auth::tokens::FileTokens::load(path).map_err(StartError::Tokens)?,
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
            StartError::Manifests(errors.iter().map(ToString::to_string).collect())
        })?;
    }
    Ok(Arc::new(gate))
}

/// What every node (single or clustered) makes of its settings before it starts: under
/// manifests only declared addresses exist, so nothing is auto-created.
pub(crate) fn settle_config(config: &mut BrokerConfig) {
    if config.manifests.is_some() {
        config.auto_create = false;
    }
}

/// The client-facing listeners of a node, single or clustered, bound before it serves:
/// AMQP, HTTP and, when a certificate is configured, AMQPS.
pub(crate) struct Listeners {
    pub amqp: TcpListener,
    pub http: TcpListener,
    pub amqps: Option<TcpListener>,
    /// The addresses bound (a port 0 in the settings resolved).
    pub amqp_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub amqps_addr: Option<SocketAddr>,
}

impl Listeners {
    /// Binds the three listeners `config` names; an address in use fails the start.
    pub(crate) async fn bind(config: &BrokerConfig) -> Result<Listeners, StartError> {
        let amqp = bind(config.listen)
            .await
            .map_err(StartError::bind(config.listen))?;
        let http = TcpListener::bind(config.http)
            .await
            .map_err(StartError::bind(config.http))?;
        let amqps = bind_tls(config).await?;
        Ok(Listeners {
            amqp_addr: amqp.local_addr()?,
            http_addr: http.local_addr()?,
            amqps_addr: amqps.as_ref().map(TcpListener::local_addr).transpose()?,
            amqp,
            http,
            amqps,
        })
    }

    /// The AMQPS address for the log line that says where the node listens; `-` without.
    pub(crate) fn amqps_shown(&self) -> String {
        self.amqps_addr
            .map_or_else(|| "-".to_owned(), |a| a.to_string())
    }
}

/// The tasks that tend a serving broker: its housekeeping and, under manifests, the
/// manifest directory's watch; all end with `shutdown`.
pub(crate) fn broker_tasks(
    broker: &Arc<Broker>,
    gate: &Arc<Gatekeeper>,
    config: &BrokerConfig,
    shutdown: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = vec![tokio::spawn(
        Arc::clone(broker).housekeeping(shutdown.clone()),
    )];
    if let Some(dir) = config.manifests.clone() {
        let watch = manifest::watch::watch_dir(dir, Arc::clone(broker), Arc::clone(gate), shutdown);
        tasks.push(tokio::spawn(watch));
    }
    tasks
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
        config: BrokerConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Node, StartError> {
        Node::start_with(config, shutdown, |b| metrics::Source::Broker(Arc::clone(b))).await
    }

    /// [`Node::start`], with `setup` called on the opened broker before any listener
    /// serves (a cluster in `groups` mode sets its router there); what it returns is what
    /// the HTTP endpoint shows.
    pub(crate) async fn start_with(
        mut config: BrokerConfig,
        shutdown: watch::Receiver<bool>,
        setup: impl FnOnce(&Arc<Broker>) -> metrics::Source,
    ) -> Result<Node, StartError> {
        settle_config(&mut config);
        let tls = load_tls(&config)?;
        let broker =
            tokio::task::block_in_place(|| Broker::open(config.clone())).map_err(|source| {
                StartError::OpenStore {
                    path: config.data_dir.clone(),
                    source,
                }
            })?;
        let listeners = Listeners::bind(&config).await?;
        let gate = tokio::task::block_in_place(|| admit(&config, &broker))?;
        let (amqp_addr, http_addr, amqps_addr) = (
            listeners.amqp_addr,
            listeners.http_addr,
            listeners.amqps_addr,
        );
        tracing::info!(amqp = %amqp_addr, http = %http_addr, amqps = %listeners.amqps_shown(), data_dir = %config.data_dir.display(), "entrepot listening");
        let serving = Serving {
            broker: Arc::clone(&broker),
            gate: Arc::clone(&gate),
            permits: Arc::new(Semaphore::new(config.max_connections)),
            tls: None,
            door: None,
        };
        let source = setup(&broker);
        let serving = Serving {
            door: match &source {
                metrics::Source::Cluster(view) => Some(Arc::clone(view)),
                metrics::Source::Broker(_) => None,
            },
            ..serving
        };
        let mut tasks = vec![
            tokio::spawn(metrics::serve_http_source(
                listeners.http,
                source,
                shutdown.clone(),
            )),
            tokio::spawn(serve(listeners.amqp, serving.clone(), shutdown.clone())),
        ];
        if let Some(listener) = listeners.amqps {
            let serving = Serving { tls, ..serving };
            tasks.push(tokio::spawn(serve(listener, serving, shutdown.clone())));
        }
        tasks.extend(broker_tasks(&broker, &gate, &config, shutdown));
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
    pub async fn stopped(self) -> Result<(), StartError> {
        for t in self.tasks {
            let _ = t.await;
        }
        let flushed = self.broker.store().log().flush();
        flushed.map_err(|source| StartError::FinalSync {
            log: "store",
            source,
        })?;
        tracing::info!("stopped");
        Ok(())
    }
}
