//! The first bytes of a connection: protocol header exchange and SASL.
//!
//! The server answers every header with the header it supports; a client that asks for
//! something else (TLS on the plain port, a wrong version, garbage) gets our header and a
//! closed socket. SASL runs to an outcome before the AMQP header is exchanged. Every read
//! here is bounded by one deadline, set when the connection was accepted
//! (`handshake-timeout-ms`): it also covers the client's `open`, so a client dribbling
//! its bytes one at a time is cut off however slowly they come.
//!
//! With manifests, `sasl-init`'s hostname picks the address space whose users are checked
//! (else the default space); ANONYMOUS is offered if any space allows it and accepted only
//! if the chosen one does. A failed login is answered after a delay that grows with each
//! failure from the same peer address.

use std::net::IpAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ConnError;
use crate::amqp::frame::SaslFrame;
use crate::amqp::frame::{
    classify_protocol_header, decode_sasl, encode_sasl_frame, FrameDecoder, FrameKind,
    ProtocolHeader, AMQP_HEADER, PROTOCOL_HEADER_LEN, SASL_HEADER,
};
use crate::amqp::sasl::{Authenticator, Identity, SaslConfig, SaslResult, SaslServer};
use crate::auth::users::SpaceUsers;
use crate::auth::Gatekeeper;
use crate::manifest::Catalog;

/// Longest a TLS handshake may take before the AMQP handshake starts (whose own deadline
/// is the `handshake-timeout-ms` setting).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest SASL frame accepted.
pub const SASL_MAX_FRAME_SIZE: u32 = 4096;

/// Checks PLAIN credentials against the configured static users.
pub struct StaticUsers<'a>(pub &'a [crate::config::StaticUser]);

impl Authenticator for StaticUsers<'_> {
    fn check_plain(&self, _authzid: Option<&str>, authcid: &str, passwd: &str) -> bool {
        self.0
            .iter()
            .any(|u| u.username == authcid && u.password == passwd)
    }
}

/// What the handshake needs to know to let a client in.
pub struct Admission<'a> {
    pub gate: &'a Gatekeeper,
    /// Users of the broker config, used without manifests.
    pub static_users: &'a [crate::config::StaticUser],
    /// ANONYMOUS without manifests.
    pub allow_anonymous: bool,
    pub peer: Option<IpAddr>,
    /// The TLS server name the client asked for (amqps), when no SASL hostname says more.
    pub sni: Option<&'a str>,
}

/// Who logged in, and in which address space (with manifests).
#[derive(Debug, Clone)]
pub struct Login {
    pub identity: Identity,
    /// The space whose users authenticated the client; `None` without manifests or for
    /// a client that skipped SASL.
    pub space: Option<String>,
}

impl Admission<'_> {
    fn sasl_config(&self, catalog: Option<&Catalog>) -> SaslConfig {
        match catalog {
            None => SaslConfig {
                allow_anonymous: self.allow_anonymous,
                scram: false,
            },
            Some(c) => SaslConfig {
                allow_anonymous: c.spaces.values().any(|s| s.allow_anonymous),
                scram: true,
            },
        }
    }
}

async fn read_header<R: AsyncRead + Unpin>(
    rd: &mut R,
) -> Result<[u8; PROTOCOL_HEADER_LEN], ConnError> {
    let mut header = [0u8; PROTOCOL_HEADER_LEN];
    rd.read_exact(&mut header).await?;
    Ok(header)
}

/// Runs the header exchange and SASL; returns who the client is and any bytes that
/// arrived after the AMQP header.
pub async fn handshake<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    rbuf: &mut BytesMut,
    admission: &Admission<'_>,
    deadline: tokio::time::Instant,
) -> Result<Login, ConnError> {
    tokio::time::timeout_at(deadline, handshake_inner(rd, wr, rbuf, admission))
        .await
        .map_err(|_| ConnError::Handshake("handshake-timeout-ms expired before SASL ended"))?
}

async fn handshake_inner<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    rbuf: &mut BytesMut,
    admission: &Admission<'_>,
) -> Result<Login, ConnError> {
    let catalog = admission.gate.manifests.current();
    let config = admission.sasl_config(catalog.as_deref());
    let first = read_header(rd).await?;
    match classify_protocol_header(&first) {
        ProtocolHeader::Sasl => {}
        ProtocolHeader::Amqp if config.allow_anonymous => {
            wr.write_all(&AMQP_HEADER).await?;
            return Ok(Login {
                identity: Identity::Anonymous,
                space: None,
            });
        }
        ProtocolHeader::Amqp => {
            wr.write_all(&SASL_HEADER).await?;
            return Err(ConnError::Handshake("authentication required: use SASL"));
        }
        ProtocolHeader::Tls | ProtocolHeader::Invalid => {
            let reply = if config.allow_anonymous {
                AMQP_HEADER
            } else {
                SASL_HEADER
            };
            wr.write_all(&reply).await?;
            return Err(ConnError::Handshake("unsupported protocol header"));
        }
    }
    wr.write_all(&SASL_HEADER).await?;
    let login = sasl_exchange(rd, wr, rbuf, config, admission, catalog.as_deref()).await?;
    // The AMQP header follows the SASL outcome; it may already be in the buffer.
    while rbuf.len() < PROTOCOL_HEADER_LEN {
        if rd.read_buf(rbuf).await? == 0 {
            return Err(ConnError::PeerClosed);
        }
    }
    let second = rbuf.split_to(PROTOCOL_HEADER_LEN);
    let mut header = [0u8; PROTOCOL_HEADER_LEN];
    header.copy_from_slice(&second);
    if classify_protocol_header(&header) != ProtocolHeader::Amqp {
        wr.write_all(&AMQP_HEADER).await?;
        return Err(ConnError::Handshake("expected the AMQP header after SASL"));
    }
    wr.write_all(&AMQP_HEADER).await?;
    Ok(login)
}

async fn sasl_exchange<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    rbuf: &mut BytesMut,
    config: SaslConfig,
    admission: &Admission<'_>,
    catalog: Option<&Catalog>,
) -> Result<Login, ConnError> {
    let mut server = SaslServer::new(config);
    let mut out = BytesMut::new();
    encode_sasl_frame(&mut out, &server.mechanisms())?;
    wr.write_all(&out).await?;
    let mut decoder = FrameDecoder::new(SASL_MAX_FRAME_SIZE);
    let static_users = StaticUsers(admission.static_users);
    let mut space = None;
    loop {
        let frame = loop {
            if let Some(frame) = decoder.decode(rbuf)? {
                break frame;
            }
            if rd.read_buf(rbuf).await? == 0 {
                return Err(ConnError::PeerClosed);
            }
        };
        if frame.kind != FrameKind::Sasl {
            return Err(ConnError::Handshake("expected a SASL frame"));
        }
        let frame = decode_sasl(&frame.body)?;
        if let (SaslFrame::Init(init), Some(c)) = (&frame, catalog) {
            let default = admission.gate.manifests.default_space.as_deref();
            // The SASL hostname names the space; without one, the TLS SNI does (as it
            // does for the connection's `open`), so a client that sends only SNI is
            // checked against the users of the space it will work in.
            let host = init.hostname.as_deref().or(admission.sni);
            space = c.space_for_host(host, default);
            server.set_allow_anonymous(space.is_some_and(|s| s.allow_anonymous));
        }
        let step = match (catalog, space) {
            (None, _) => server.on_frame(frame, &static_users),
            (Some(_), Some(s)) => {
                let tokens = admission.gate.tokens.as_deref();
                server.on_frame(frame, &SpaceUsers { space: s, tokens })
            }
            (Some(_), None) => server.on_frame(frame, &NoUsers),
        }
        .map_err(|_| ConnError::Handshake("SASL frame out of turn"))?;
        if let Some(SaslResult::Rejected(reason)) = &step.result {
            let delay = admission.gate.failures.failed(admission.peer);
            tracing::info!(?reason, peer = ?admission.peer, space = ?space.map(|s| &s.name), ?delay, "SASL authentication failed");
            tokio::time::sleep(delay).await;
        }
        out.clear();
        encode_sasl_frame(&mut out, &step.reply)?;
        wr.write_all(&out).await?;
        match step.result {
            None => continue,
            Some(SaslResult::Authenticated(identity)) => {
                admission.gate.failures.succeeded(admission.peer);
                let space = space.map(|s| s.name.clone());
                return Ok(Login { identity, space });
            }
            Some(SaslResult::Rejected(_)) => {
                return Err(ConnError::Handshake("authentication failed"));
            }
        }
    }
}

/// No address space matched the client's hostname: nobody can log in.
struct NoUsers;

impl Authenticator for NoUsers {
    fn check_plain(&self, _authzid: Option<&str>, _authcid: &str, _passwd: &str) -> bool {
        false
    }
}
