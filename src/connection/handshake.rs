//! The first bytes of a connection: protocol header exchange and SASL.
//!
//! The server answers every header with the header it supports; a client that asks for
//! something else (TLS on the plain port, a wrong version, garbage) gets our header and a
//! closed socket. SASL runs to an outcome before the AMQP header is exchanged. Every read
//! here is bounded in time by [`HANDSHAKE_TIMEOUT`].

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::ConnError;
use crate::amqp::frame::{
    classify_protocol_header, decode_sasl, encode_sasl_frame, FrameDecoder, FrameKind,
    ProtocolHeader, AMQP_HEADER, PROTOCOL_HEADER_LEN, SASL_HEADER,
};
use crate::amqp::sasl::{Authenticator, Identity, SaslConfig, SaslResult, SaslServer};

/// Longest a client may take for the header exchange and SASL.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
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

async fn read_header(rd: &mut OwnedReadHalf) -> Result<[u8; PROTOCOL_HEADER_LEN], ConnError> {
    let mut header = [0u8; PROTOCOL_HEADER_LEN];
    rd.read_exact(&mut header).await?;
    Ok(header)
}

/// Runs the header exchange and SASL; returns who the client is and any bytes that
/// arrived after the AMQP header.
pub async fn handshake(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    rbuf: &mut BytesMut,
    config: SaslConfig,
    users: &[crate::config::StaticUser],
) -> Result<Identity, ConnError> {
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake_inner(rd, wr, rbuf, config, users),
    )
    .await
    .map_err(|_| ConnError::Handshake("handshake timed out"))?
}

async fn handshake_inner(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    rbuf: &mut BytesMut,
    config: SaslConfig,
    users: &[crate::config::StaticUser],
) -> Result<Identity, ConnError> {
    let first = read_header(rd).await?;
    match classify_protocol_header(&first) {
        ProtocolHeader::Sasl => {}
        ProtocolHeader::Amqp if config.allow_anonymous => {
            wr.write_all(&AMQP_HEADER).await?;
            return Ok(Identity::Anonymous);
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
    let identity = sasl_exchange(rd, wr, rbuf, config, users).await?;
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
    Ok(identity)
}

async fn sasl_exchange(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    rbuf: &mut BytesMut,
    config: SaslConfig,
    users: &[crate::config::StaticUser],
) -> Result<Identity, ConnError> {
    let mut server = SaslServer::new(config);
    let mut out = BytesMut::new();
    encode_sasl_frame(&mut out, &server.mechanisms())?;
    wr.write_all(&out).await?;
    let mut decoder = FrameDecoder::new(SASL_MAX_FRAME_SIZE);
    let auth = StaticUsers(users);
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
        let step = server
            .on_frame(decode_sasl(&frame.body)?, &auth)
            .map_err(|_| ConnError::Handshake("SASL frame out of turn"))?;
        out.clear();
        encode_sasl_frame(&mut out, &step.reply)?;
        wr.write_all(&out).await?;
        match step.result {
            None => continue,
            Some(SaslResult::Authenticated(identity)) => return Ok(identity),
            Some(SaslResult::Rejected(reason)) => {
                tracing::info!(?reason, "SASL authentication failed");
                return Err(ConnError::Handshake("authentication failed"));
            }
        }
    }
}
