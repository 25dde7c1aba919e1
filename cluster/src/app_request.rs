//! Application requests: a generic request/reply between nodes, carried on the node's
//! multiplexed peer connection (`peer_connection.rs`, one per node pair, authenticated
//! and TLS when configured) next to the Raft RPCs, whose payloads this crate never reads.
//!
//! The broker registers one [`AppHandler`] per node ([`crate::Host::set_app_handler`])
//! and sends with [`crate::Host::app_request`]; it builds its own protocol inside the
//! payloads (link forwarding: a producer's message stored by the address's leader, in
//! the broker's `raft::link_forward`), so this crate knows no AMQP and the broker names
//! no peer connection.
//!
//! ```text
//! // Format: KIND_APP       { header | payload: bytes (≤ MAX_APP_PAYLOAD_BYTES) }
//! // Format: KIND_APP_REPLY { header | tag: u8 } 0 answered { payload: bytes (≤ MAX_APP_PAYLOAD_BYTES) }
//! //   | 1 busy { limit: u64 } | 2 refused { reason: str } | 3 no handler {}
//! ```
//!
//! Invariants:
//! * At most [`MAX_APP_REQUESTS_IN_FLIGHT`] requests are served at once per node (from
//!   all peers together); one more is answered `busy` at once, before the handler sees
//!   it, so a flood from peers costs bounded memory and never holds the connection's
//!   request slots that Raft's heartbeats need.
//! * Every payload is bounded by [`MAX_APP_PAYLOAD_BYTES`] before it is sent and before
//!   it is read.
//! * A call is bounded by the caller's timeout, itself capped at [`APP_TIMEOUT_MAX`]
//!   (below the shared connection's silence limit, so a slow handler never closes the
//!   connection under the Raft traffic). A reply that never comes leaves the outcome
//!   unknown ([`AppCallError::Call`]): the payload's protocol must tolerate a resend or
//!   give up.
//!
//! Does not: retry, deduplicate, route to a group's leader (the caller names the node),
//! or order requests (replies come in any order, like every RPC on the connection).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::error::Result;
use crate::network::PeerCallError;
use crate::rpc::{self, Header, MAX_RPC_STRING_BYTES};

/// Most application requests a node serves at once, from all its peers together.
pub const MAX_APP_REQUESTS_IN_FLIGHT: usize = 1024;
/// Largest payload of a request or a reply: a broker message (its own limit is lower)
/// with room for the protocol's framing.
pub const MAX_APP_PAYLOAD_BYTES: usize = crate::host::MAX_PROPOSAL_BYTES + 64 * 1024;
/// Longest one call waits for its reply.
pub const APP_TIMEOUT_MAX: Duration = Duration::from_secs(4);
const _: () = assert!(APP_TIMEOUT_MAX.as_millis() < crate::SILENT_CONNECTION_TIMEOUT.as_millis());
const _: () = assert!(MAX_APP_PAYLOAD_BYTES + 64 < crate::MAX_RPC_FRAME_BYTES);

const REPLY_ANSWERED: u8 = 0;
const REPLY_BUSY: u8 = 1;
const REPLY_REFUSED: u8 = 2;
const REPLY_NO_HANDLER: u8 = 3;

/// What a handler answers: a reply payload, or why it refused (sent as a string; the
/// protocol's own errors belong in the reply payload).
pub type AppFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::result::Result<Bytes, String>> + Send>>;

/// Serves the application requests peers send to this node.
pub trait AppHandler: Send + Sync + 'static {
    fn handle(&self, payload: Bytes) -> AppFuture;
}

/// Why an application request got no answer from the peer's handler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppCallError {
    /// The peer serves [`MAX_APP_REQUESTS_IN_FLIGHT`] already: nothing was handled.
    #[error("peer serves {limit} application requests already (MAX_APP_REQUESTS_IN_FLIGHT)")]
    Busy { limit: usize },
    /// The peer's handler refused the request.
    #[error("peer refused the request: {reason}")]
    Refused { reason: String },
    /// The peer has no handler (not started yet, or another mode): nothing was handled.
    #[error("peer serves no application requests")]
    NoHandler,
    /// Too large to send ([`MAX_APP_PAYLOAD_BYTES`]): nothing was sent.
    #[error("payload of {len} bytes exceeds {max} (MAX_APP_PAYLOAD_BYTES)")]
    TooLarge { len: usize, max: usize },
    /// No reply (connection failed, timeout, undecodable): the outcome is unknown, unless
    /// the error says nothing was sent ([`PeerCallError::Connect`]).
    #[error(transparent)]
    Call(#[from] PeerCallError),
}

/// The server side: the handler and the bound on what it serves at once.
#[derive(Clone)]
pub(crate) struct AppServer {
    handler: Arc<dyn AppHandler>,
    slots: Arc<Semaphore>,
}

impl AppServer {
    pub(crate) fn new(handler: Arc<dyn AppHandler>) -> AppServer {
        AppServer {
            handler,
            slots: Arc::new(Semaphore::new(MAX_APP_REQUESTS_IN_FLIGHT)),
        }
    }

    /// Serves one request: the reply frame.
    pub(crate) async fn serve(&self, h: Header, payload: Bytes) -> (u8, Vec<u8>) {
        let Ok(_slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            let busy = Err(AppCallError::Busy {
                limit: MAX_APP_REQUESTS_IN_FLIGHT,
            });
            return (rpc::KIND_APP_REPLY, encode_reply(h, &busy));
        };
        let answer = self
            .handler
            .handle(payload)
            .await
            .map_err(|reason| AppCallError::Refused { reason });
        (rpc::KIND_APP_REPLY, encode_reply(h, &answer))
    }
}

/// The reply of a node without a handler.
pub(crate) fn no_handler(h: Header) -> (u8, Vec<u8>) {
    (
        rpc::KIND_APP_REPLY,
        encode_reply(h, &Err(AppCallError::NoHandler)),
    )
}

pub(crate) fn encode_request(h: Header, payload: &[u8]) -> Result<Vec<u8>> {
    crate::codec::check_limit("application request", payload.len(), MAX_APP_PAYLOAD_BYTES)?;
    let mut e = rpc::start(h, 4 + payload.len());
    e.bytes(payload);
    Ok(e.buf)
}

pub(crate) fn decode_request(body: Bytes) -> Result<Bytes> {
    let mut d = rpc::open(body, "application request")?;
    let payload = d.bytes("application request", MAX_APP_PAYLOAD_BYTES)?;
    d.finish()?;
    Ok(payload)
}

/// Encodes an answer; a reply payload over the limit is sent as a refusal naming it.
pub(crate) fn encode_reply(h: Header, r: &std::result::Result<Bytes, AppCallError>) -> Vec<u8> {
    let mut e = rpc::start(h, 16);
    match r {
        Ok(p) if p.len() <= MAX_APP_PAYLOAD_BYTES => {
            e.u8(REPLY_ANSWERED);
            e.bytes(p);
        }
        Ok(p) => {
            e.u8(REPLY_REFUSED);
            let why = format!(
                "reply of {} bytes exceeds {MAX_APP_PAYLOAD_BYTES} (MAX_APP_PAYLOAD_BYTES)",
                p.len()
            );
            rpc::encode_cut_str(&mut e, &why);
        }
        Err(AppCallError::Busy { limit }) => {
            e.u8(REPLY_BUSY);
            e.u64(*limit as u64);
        }
        Err(AppCallError::NoHandler) => e.u8(REPLY_NO_HANDLER),
        Err(other) => {
            e.u8(REPLY_REFUSED);
            let reason = match other {
                AppCallError::Refused { reason } => reason.clone(),
                other => other.to_string(),
            };
            rpc::encode_cut_str(&mut e, &reason);
        }
    }
    e.buf
}

pub(crate) fn decode_reply(body: Bytes) -> Result<std::result::Result<Bytes, AppCallError>> {
    let mut d = rpc::open(body, "application reply")?;
    let reply = match d.u8()? {
        REPLY_ANSWERED => Ok(d.bytes("application reply", MAX_APP_PAYLOAD_BYTES)?),
        REPLY_BUSY => Err(AppCallError::Busy {
            limit: usize::try_from(d.u64()?).unwrap_or(usize::MAX),
        }),
        REPLY_REFUSED => Err(AppCallError::Refused {
            reason: d.str("refusal reason", MAX_RPC_STRING_BYTES)?,
        }),
        REPLY_NO_HANDLER => Err(AppCallError::NoHandler),
        _ => return Err(d.fail("unknown application reply tag")),
    };
    d.finish()?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ClusterError;

    fn h() -> Header {
        Header {
            request_id: 9,
            group: 0,
        }
    }

    /// Goal: every reply variant survives the wire; a request is bounded before it is
    /// sent and before it is read; an oversized reply becomes a refusal naming its limit.
    #[test]
    fn replies_round_trip_and_payloads_are_bounded() {
        let ok = decode_reply(encode_reply(h(), &Ok(Bytes::from_static(b"r"))).into());
        assert_eq!(ok.unwrap().unwrap(), &b"r"[..]);
        let busy = decode_reply(encode_reply(h(), &Err(AppCallError::Busy { limit: 3 })).into());
        assert!(matches!(
            busy.unwrap(),
            Err(AppCallError::Busy { limit: 3 })
        ));
        let refused = Err(AppCallError::Refused {
            reason: "no".into(),
        });
        let refused = decode_reply(encode_reply(h(), &refused).into()).unwrap();
        assert!(matches!(refused, Err(AppCallError::Refused { reason }) if reason == "no"));
        let none = decode_reply(encode_reply(h(), &Err(AppCallError::NoHandler)).into());
        assert!(matches!(none.unwrap(), Err(AppCallError::NoHandler)));
        let huge = Ok(Bytes::from(vec![0u8; MAX_APP_PAYLOAD_BYTES + 1]));
        let huge = decode_reply(encode_reply(h(), &huge).into()).unwrap();
        assert!(
            matches!(&huge, Err(AppCallError::Refused { reason }) if reason.contains("MAX_APP_PAYLOAD_BYTES")),
            "{huge:?}"
        );

        let body = encode_request(h(), b"payload").unwrap();
        assert_eq!(decode_request(body.into()).unwrap(), &b"payload"[..]);
        let big = vec![0u8; MAX_APP_PAYLOAD_BYTES + 1];
        assert!(matches!(
            encode_request(h(), &big),
            Err(ClusterError::LimitExceeded { .. })
        ));
        let mut forged = rpc::start(h(), 8);
        forged.u32((MAX_APP_PAYLOAD_BYTES + 1) as u32);
        assert!(matches!(
            decode_request(forged.buf.into()),
            Err(ClusterError::LimitExceeded { .. })
        ));
    }
}
