//! TLS on the inter-node port (rustls, ring provider): every connection between two nodes
//! is encrypted and *mutually* authenticated against one cluster CA.
//!
//! Each node is given three PEM files (`--cluster-tls-cert`, `--cluster-tls-key`,
//! `--cluster-tls-ca`): its certificate chain, its private key, and the CA certificates
//! that sign every node's certificate. One certificate serves both directions — it is the
//! server certificate a dialling peer checks and the client certificate this node shows
//! when it dials.
//!
//! The verification rule:
//! * **Accepting** a connection: the peer must present a client certificate whose chain
//!   ends at the CA (and is valid now). Its names are not checked: any holder of a
//!   certificate from the cluster CA is a member.
//! * **Dialling** a peer: the server's chain must end at the CA *and* the certificate must
//!   name the host part of the peer's member address (`host:port` → `host`): a DNS name
//!   in its DNS SANs, or an IP address in its IP SANs. On Kubernetes, put the headless
//!   service names (`*.entrepot.<ns>.svc`, `*.entrepot.<ns>.svc.cluster.local`) in the
//!   SANs; in a hand-run cluster, the IPs or host names given in `--peers`.
//! * A certificate that restricts extended key usage must allow both `serverAuth` and
//!   `clientAuth`.
//!
//! The files are re-read when one of them changes (by modification time, checked at each
//! new connection), so a renewed certificate is used from the next connection on; a reload
//! that fails keeps the previous configuration and logs why (as the amqps listener does).
//!
//! Invariants: a TLS handshake never takes longer than [`PEER_TLS_HANDSHAKE_TIMEOUT`], so a
//! silent peer cannot hold a connection slot; TLS 1.3 or 1.2 only (rustls' safe defaults).
//!
//! Does not: check revocation (CRLs), pin certificates, or name which node a certificate
//! belongs to — the cluster secret (`auth.rs`), if configured, still runs inside the TLS
//! stream.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::error::ClusterError;

/// Longest a TLS handshake on the inter-node port may take, either side. Loopback and LAN
/// handshakes take milliseconds; past this the peer is stalled or not speaking TLS.
pub const PEER_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the inter-node TLS files cannot be used, or a handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerTlsError {
    /// A PEM file that cannot be read or parsed.
    #[error("reading {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    /// A certificate or CA file without a single certificate in it.
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    /// A CA certificate that cannot be a trust anchor.
    #[error("CA certificate in {path} is unusable: {reason}")]
    BadCa { path: PathBuf, reason: String },
    /// The key does not suit the certificate, or another configuration error.
    #[error("building the inter-node TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The peer verifiers could not be built from the CA.
    #[error("building the inter-node certificate verifier: {0}")]
    Verifier(String),
    /// A member address whose host part is neither a DNS name nor an IP address.
    #[error("member address {addr:?} has no host usable as a TLS server name")]
    ServerName { addr: String },
    /// The handshake did not complete within [`PEER_TLS_HANDSHAKE_TIMEOUT`].
    #[error("TLS handshake not complete within {0:?}")]
    HandshakeTimeout(Duration),
    /// The handshake failed: a certificate refused, not TLS at all, or the connection lost.
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] io::Error),
}

impl PeerTlsError {
    /// The peer closed or reset the connection before the handshake completed: a dialer
    /// that gave up (openraft drops an RPC past its timeout, a node restarting), not a
    /// certificate or protocol refusal.
    pub fn is_peer_gone(&self) -> bool {
        use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        matches!(self, PeerTlsError::Handshake(e)
            if matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe))
    }
}

/// The inter-node TLS configuration: a connector for dialling peers and an acceptor for
/// the peer server, both built from the same three PEM files.
pub struct PeerTls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    state: Mutex<Loaded>,
}

/// One build of the configuration, with the file times it was built from.
struct Loaded {
    stamps: [Option<SystemTime>; 3],
    connector: TlsConnector,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Loads the certificate chain, key and CA; fails if they cannot be used together.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<PeerTls, ClusterError> {
        let stamps = stamps(cert, key, ca);
        let (connector, acceptor) = build(cert, key, ca)?;
        Ok(PeerTls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            ca: ca.to_path_buf(),
            state: Mutex::new(Loaded {
                stamps,
                connector,
                acceptor,
            }),
        })
    }

    /// The current connector and acceptor, rebuilt first if a file changed.
    fn current(&self) -> (TlsConnector, TlsAcceptor) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamps(&self.cert, &self.key, &self.ca);
        if now != state.stamps {
            match build(&self.cert, &self.key, &self.ca) {
                Ok((connector, acceptor)) => {
                    tracing::info!(cert = %self.cert.display(), "inter-node TLS files reloaded");
                    *state = Loaded {
                        stamps: now,
                        connector,
                        acceptor,
                    };
                }
                Err(e) => {
                    // Half-written files are common mid-renewal: keep the previous
                    // configuration and retry at the next connection.
                    tracing::warn!(error = %e,
                        "inter-node TLS reload failed; keeping the previous configuration");
                }
            }
        }
        (state.connector.clone(), state.acceptor.clone())
    }

    /// Completes the client side of a handshake with the peer at member address `addr`
    /// (its host part is the server name the certificate must carry).
    pub(crate) async fn connect(
        &self,
        addr: &str,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, PeerTlsError> {
        let name = server_name(addr)?;
        let connector = self.current().0;
        bounded(connector.connect(name, tcp)).await
    }

    /// Completes the server side of a handshake on an accepted connection.
    pub(crate) async fn accept(
        &self,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::server::TlsStream<TcpStream>, PeerTlsError> {
        let acceptor = self.current().1;
        bounded(acceptor.accept(tcp)).await
    }
}

async fn bounded<T>(
    handshake: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, PeerTlsError> {
    match tokio::time::timeout(PEER_TLS_HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(PeerTlsError::Handshake(e)),
        Err(_) => Err(PeerTlsError::HandshakeTimeout(PEER_TLS_HANDSHAKE_TIMEOUT)),
    }
}

/// The host part of a member address (`host:port`, `[v6]:port`) as a TLS server name.
fn server_name(addr: &str) -> Result<ServerName<'static>, PeerTlsError> {
    let host = match addr.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map(|(h, _)| h),
        None => addr.rsplit_once(':').map(|(h, _)| h),
    };
    host.filter(|h| !h.is_empty())
        .and_then(|h| ServerName::try_from(h.to_owned()).ok())
        .ok_or_else(|| PeerTlsError::ServerName {
            addr: addr.to_owned(),
        })
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn stamps(cert: &Path, key: &Path, ca: &Path) -> [Option<SystemTime>; 3] {
    [modified(cert), modified(key), modified(ca)]
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> PeerTlsError {
    PeerTlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PeerTlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(PeerTlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn build(cert: &Path, key: &Path, ca: &Path) -> Result<(TlsConnector, TlsAcceptor), PeerTlsError> {
    let chain = certificates(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
    let mut roots = RootCertStore::empty();
    for anchor in certificates(ca)? {
        roots.add(anchor).map_err(|e| PeerTlsError::BadCa {
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    let roots = Arc::new(roots);
    let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::ring::default_provider());
    let verifier_error =
        |e: rustls::server::VerifierBuilderError| PeerTlsError::Verifier(e.to_string());

    let clients = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider.clone())
        .build()
        .map_err(verifier_error)?;
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain.clone(), key_der.clone_key())?;

    let servers = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(verifier_error)?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_webpki_verifier(servers)
        .with_client_auth_cert(chain, key_der)?;

    Ok((
        TlsConnector::from(Arc::new(client)),
        TlsAcceptor::from(Arc::new(server)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_is_the_host_part_of_the_member_address() {
        let dns = server_name("entrepot-1.entrepot.ns.svc:5673").unwrap();
        assert_eq!(dns.to_str(), "entrepot-1.entrepot.ns.svc");
        let v4 = server_name("10.0.0.7:5673").unwrap();
        assert!(matches!(v4, ServerName::IpAddress(_)), "{v4:?}");
        let v6 = server_name("[::1]:5673").unwrap();
        assert!(matches!(v6, ServerName::IpAddress(_)), "{v6:?}");
        for bad in ["no-port", ":5673", "[::1", "bad host:1"] {
            let err = server_name(bad).unwrap_err();
            assert!(
                matches!(err, PeerTlsError::ServerName { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn missing_or_empty_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let missing = dir.path().join("missing.pem");
        let err = PeerTls::load(&empty, &empty, &empty).unwrap_err();
        assert!(
            matches!(err, ClusterError::Tls(PeerTlsError::NoCertificate { .. })),
            "{err}"
        );
        let err = PeerTls::load(&missing, &empty, &empty).unwrap_err();
        assert!(
            matches!(err, ClusterError::Tls(PeerTlsError::Pem { .. })),
            "{err}"
        );
    }
}
