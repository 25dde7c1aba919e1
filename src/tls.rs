//! TLS for the `amqps` listener (rustls with the `ring` provider): the certificate chain
//! and key come from PEM files and are reloaded when either file changes.
//!
//! Reload is checked at each accepted connection by the files' modification times, so a
//! renewed certificate (cert-manager, a manual copy) is served from the next connection
//! on; a reload that fails keeps the previous certificate and logs why.
//!
//! Does not: verify client certificates (SASL EXTERNAL is not offered) or negotiate ALPN.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("reading {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The certificate files and the acceptor built from them.
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<(Option<SystemTime>, Option<SystemTime>, TlsAcceptor)>,
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn build(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let pem = |path: &Path, e: rustls::pki_types::pem::Error| TlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl TlsFiles {
    /// Loads the certificate chain and key; fails if they cannot be used.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsFiles, TlsError> {
        let stamps = (modified(cert), modified(key));
        let acceptor = build(cert, key)?;
        Ok(TlsFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            state: Mutex::new((stamps.0, stamps.1, acceptor)),
        })
    }

    /// The acceptor for a new connection, rebuilt first if a file changed.
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let stamps = (modified(&self.cert), modified(&self.key));
        if (stamps.0, stamps.1) != (state.0, state.1) {
            match build(&self.cert, &self.key) {
                Ok(acceptor) => {
                    tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    *state = (stamps.0, stamps.1, acceptor);
                }
                Err(e) => {
                    // Half-written files are common mid-renewal: keep serving the old
                    // certificate, and retry at the next connection.
                    tracing::warn!(error = %e, "TLS certificate reload failed; keeping the previous one");
                }
            }
        }
        state.2.clone()
    }
}
