//! Mutual authentication of the inter-node port with a shared cluster secret.
//!
//! Every node of a cluster is given the same secret (`--cluster-secret-file`). Before any
//! RPC, both ends of a new connection prove they know it, without sending it:
//!
//! ```text
//! client → server  HELLO     { version: u8 = 1 | client_nonce: [u8; 32] }
//! server → client  CHALLENGE { server_nonce: [u8; 32] | server_proof: [u8; 32] }
//! client → server  PROOF     { client_proof: [u8; 32] }
//! server → client  WELCOME   {}          (or ERROR "authentication failed", then close)
//! server_proof = HMAC-SHA256(secret, "entrepot-peer-server" | client_nonce | server_nonce)
//! client_proof = HMAC-SHA256(secret, "entrepot-peer-client" | client_nonce | server_nonce)
//! ```
//! Fresh nonces on both sides make a recorded exchange useless; proofs are compared in
//! constant time (ring). Without a secret there is no handshake at all. A node with a
//! secret refuses every request from one without (its first frame is not a HELLO), and a
//! node without a secret closes on a HELLO: a misconfigured member is turned away with a
//! logged reason, never let in.
//!
//! Does not: encrypt the traffic (`tls.rs` does, when configured; this handshake then runs
//! inside the TLS stream).

use std::path::Path;

use bytes::Bytes;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{ClusterError, Result};
use crate::frame::{read_frame, write_frame};

/// Version byte of the handshake.
pub const AUTH_VERSION: u8 = 1;
/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;
/// Longest secret file read, in bytes.
pub const MAX_SECRET_BYTES: usize = 4096;
const NONCE: usize = 32;
const PROOF: usize = 32;

pub(crate) const KIND_HELLO: u8 = 0x10;
pub(crate) const KIND_CHALLENGE: u8 = 0x90;
pub(crate) const KIND_PROOF: u8 = 0x11;
pub(crate) const KIND_WELCOME: u8 = 0x91;

/// The shared cluster secret, as an HMAC key.
pub struct PeerSecret {
    key: hmac::Key,
}

impl std::fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerSecret(..)")
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("peer did not prove it knows the cluster secret")]
    BadProof,
    #[error("unexpected frame kind {0:#x} during the handshake (is --cluster-secret-file set on every node?)")]
    Unexpected(u8),
    #[error("malformed handshake frame")]
    Malformed,
    #[error("handshake version {0} is not supported (this build speaks {AUTH_VERSION})")]
    Version(u8),
    #[error("connection closed during the handshake")]
    Closed,
    #[error("handshake i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("no system randomness for a nonce")]
    Random,
}

impl PeerSecret {
    /// A secret from raw bytes (at least [`MIN_SECRET_BYTES`]).
    pub fn new(secret: &[u8]) -> Result<PeerSecret> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(ClusterError::Identity {
                what: "cluster secret",
                value: format!("{} bytes", secret.len()),
                reason: "too short: use at least 16 random bytes",
            });
        }
        Ok(PeerSecret {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }

    /// Reads a secret file; surrounding whitespace (a trailing newline) is not part of it.
    pub fn from_file(path: &Path) -> Result<PeerSecret> {
        let bytes = std::fs::read(path).map_err(|e| ClusterError::io("reading", path, e))?;
        if bytes.len() > MAX_SECRET_BYTES {
            return Err(ClusterError::LimitExceeded {
                what: "cluster secret file",
                len: bytes.len() as u64,
                max: MAX_SECRET_BYTES as u64,
            });
        }
        PeerSecret::new(bytes.trim_ascii())
    }

    fn proof(&self, side: &[u8], client: &[u8], server: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(side);
        ctx.update(client);
        ctx.update(server);
        ctx.sign()
    }

    fn verify(&self, side: &[u8], client: &[u8], server: &[u8], proof: &[u8]) -> bool {
        let mut msg = Vec::with_capacity(side.len() + 2 * NONCE);
        msg.extend_from_slice(side);
        msg.extend_from_slice(client);
        msg.extend_from_slice(server);
        hmac::verify(&self.key, &msg, proof).is_ok()
    }
}

const SERVER_SIDE: &[u8] = b"entrepot-peer-server";
const CLIENT_SIDE: &[u8] = b"entrepot-peer-client";

fn nonce() -> std::result::Result<[u8; NONCE], AuthError> {
    let mut n = [0u8; NONCE];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| AuthError::Random)?;
    Ok(n)
}

async fn expect<S: AsyncRead + Unpin>(
    s: &mut S,
    kind: u8,
) -> std::result::Result<Bytes, AuthError> {
    match read_frame(s).await? {
        Some((k, body)) if k == kind => Ok(body),
        Some((k, _)) => Err(AuthError::Unexpected(k)),
        None => Err(AuthError::Closed),
    }
}

/// The connecting side's half of the handshake.
pub(crate) async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: &PeerSecret,
) -> std::result::Result<(), AuthError> {
    let client = nonce()?;
    let mut hello = vec![AUTH_VERSION];
    hello.extend_from_slice(&client);
    write_frame(s, KIND_HELLO, &hello).await?;
    let challenge = match read_frame(s).await? {
        Some((KIND_CHALLENGE, body)) => body,
        // A peer with the secret refuses a request without one with an ERROR frame; a
        // peer without a secret closes on our HELLO.
        Some((k, _)) => return Err(AuthError::Unexpected(k)),
        None => return Err(AuthError::Closed),
    };
    if challenge.len() != NONCE + PROOF {
        return Err(AuthError::Malformed);
    }
    let (server, server_proof) = challenge.split_at(NONCE);
    if !secret.verify(SERVER_SIDE, &client, server, server_proof) {
        return Err(AuthError::BadProof);
    }
    let proof = secret.proof(CLIENT_SIDE, &client, server);
    write_frame(s, KIND_PROOF, proof.as_ref()).await?;
    expect(s, KIND_WELCOME).await.map(drop)
}

/// The accepting side's half: `first` is the connection's first frame.
pub(crate) async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: &PeerSecret,
    first: (u8, Bytes),
) -> std::result::Result<(), AuthError> {
    let (kind, hello) = first;
    if kind != KIND_HELLO {
        return Err(AuthError::Unexpected(kind));
    }
    match hello.first() {
        Some(&AUTH_VERSION) if hello.len() == 1 + NONCE => {}
        Some(&v) if v != AUTH_VERSION => return Err(AuthError::Version(v)),
        _ => return Err(AuthError::Malformed),
    }
    let client = &hello[1..];
    let server = nonce()?;
    let mut challenge = server.to_vec();
    challenge.extend_from_slice(secret.proof(SERVER_SIDE, client, &server).as_ref());
    write_frame(s, KIND_CHALLENGE, &challenge).await?;
    let proof = expect(s, KIND_PROOF).await?;
    if !secret.verify(CLIENT_SIDE, client, &server, &proof) {
        return Err(AuthError::BadProof);
    }
    write_frame(s, KIND_WELCOME, &[]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(
        client: &PeerSecret,
        server: &PeerSecret,
    ) -> (
        std::result::Result<(), AuthError>,
        std::result::Result<(), AuthError>,
    ) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let srv = async move {
            let first = read_frame(&mut b).await?.ok_or(AuthError::Closed)?;
            server_handshake(&mut b, server, first).await
        };
        // A failing side hangs up, as a real connection does.
        let cli = async move { client_handshake(&mut a, client).await };
        tokio::join!(cli, srv)
    }

    #[tokio::test]
    async fn the_same_secret_passes_and_a_different_one_fails_on_both_sides() {
        let s1 = PeerSecret::new(b"0123456789abcdef-one").unwrap();
        let s1b = PeerSecret::new(b"0123456789abcdef-one").unwrap();
        let s2 = PeerSecret::new(b"0123456789abcdef-two").unwrap();
        let (c, s) = pair(&s1, &s1b).await;
        assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
        let (c, _) = pair(&s1, &s2).await;
        assert!(matches!(c, Err(AuthError::BadProof)), "{c:?}");
        assert!(PeerSecret::new(b"short").is_err());
    }

    #[tokio::test]
    async fn a_request_without_a_handshake_is_refused() {
        let s = PeerSecret::new(b"0123456789abcdef").unwrap();
        let (_a, mut b) = tokio::io::duplex(64);
        let r = server_handshake(&mut b, &s, (1, Bytes::new())).await;
        assert!(matches!(r, Err(AuthError::Unexpected(1))));
        let r = server_handshake(&mut b, &s, (KIND_HELLO, Bytes::from_static(&[9]))).await;
        assert!(matches!(r, Err(AuthError::Version(9))));
    }
}
