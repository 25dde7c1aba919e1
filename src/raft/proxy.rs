//! Forwarding a client connection to the leader: the follower that accepted it connects
//! to the leader's port of the same kind (AMQP, or amqps for a connection on the amqps
//! listener) and copies bytes both ways until either side closes. The client never needs
//! to know which node leads; TLS and SASL happen at the leader.
//!
//! A forwarded connection lives only as long as the leader it goes to: when this node
//! learns of another leader, or of none (the leader stopped answering heartbeats and an
//! election began — a SIGSTOPped, hung or partitioned leader), it closes the client's
//! connection, so the client reconnects and reaches the new leader within the election
//! timeout instead of hanging on a leader that may never answer again.
//!
//! When this node is drained (`drain.rs`) its forwarded connections end too. A plain one
//! that has reached the AMQP layer gets a `close` with `amqp:connection:forced` and a
//! description naming the drain, written at a frame boundary of the leader → client
//! stream ([`FrameTracker`] follows the frame sizes in that direction, nothing more), so
//! the client reads a clean close and reconnects elsewhere; what the client sends until
//! its own close (dispositions, then the close) still goes to the leader, for at most
//! [`CLIENT_CLOSE_GRACE`]. An amqps connection (still encrypted here) or one in its SASL
//! exchange is closed at the TCP level.
//!
//! Does not: decode the bytes beyond protocol headers and frame sizes. An amqps connection
//! passes through still encrypted (its SNI reaches the leader untouched), which is why
//! every node serves the same certificate.

use std::time::Duration;

use bytes::BytesMut;
use entrepot_cluster::NodeId;
use fe2o3_amqp_types::definitions::{ConnectionError, Error as AmqpError};
use fe2o3_amqp_types::performatives::{Close, Performative};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::amqp::frame::{encode_frame, PROTOCOL_HEADER_LEN};

/// Longest a follower waits to connect to the leader.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a drained node waits for the leader to finish the frame it is sending before
/// it writes its `close` (after that the connection is cut at the TCP level).
pub const FRAME_FINISH_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a drained node keeps passing a client's frames on to the leader after its
/// `close` (until the client's own close and EOF).
pub const CLIENT_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Bytes read from the leader at a time.
const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// How a forwarded connection ends when this node is drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDrain {
    /// Plain AMQP: a `close` (`amqp:connection:forced`) at a frame boundary, then EOF.
    Close,
    /// amqps (encrypted here): EOF.
    Cut,
}

/// Copies `client` ↔ the leader at `amqp` (its AMQP or amqps address) until one side
/// closes, `leader_gone` completes (this node no longer follows `leader`) or `drained`
/// completes (this node was drained: the connection ends as `on_drain` says).
pub async fn forward(
    mut client: TcpStream,
    leader: NodeId,
    amqp: &str,
    leader_gone: impl std::future::Future<Output = ()>,
    drained: impl std::future::Future<Output = ()>,
    on_drain: OnDrain,
) {
    let _ = client.set_nodelay(true);
    tokio::pin!(leader_gone);
    // A stopped leader's address may not answer at all (its container is gone): a new
    // leader ends the wait at once, so the client reconnects to it instead of waiting
    // out CONNECT_TIMEOUT.
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(amqp));
    let connected = tokio::select! {
        connected = connect => connected,
        () = &mut leader_gone => {
            tracing::info!(leader, amqp, "the leader changed while connecting to it; closing the client");
            return;
        }
    };
    let upstream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(leader, amqp, error = %e, "cannot reach the leader; closing the client");
            return;
        }
        Err(_) => {
            tracing::info!(
                leader,
                amqp,
                "leader did not answer in time; closing the client"
            );
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let mut upstream = upstream;
    let (mut client_rd, mut client_wr) = client.split();
    let (mut up_rd, mut up_wr) = upstream.split();
    // The client's end of its stream is passed on (half-close), and the leader's answer
    // still flows back until the leader closes.
    let up = async {
        let copied = tokio::io::copy(&mut client_rd, &mut up_wr).await;
        if copied.is_ok() {
            let _ = up_wr.shutdown().await;
        }
        copied
    };
    tokio::pin!(up, drained);
    let mut client_done = false;
    let mut tracker = FrameTracker::default();
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    loop {
        tokio::select! {
            copied = &mut up, if !client_done => {
                tracing::debug!(leader, ?copied, "forwarded connection: the client's side ended");
                if copied.is_err() {
                    return;
                }
                client_done = true;
            }
            () = &mut leader_gone => {
                tracing::info!(leader, "no longer following this leader: closing a forwarded client connection");
                return;
            }
            () = &mut drained => break,
            read = up_rd.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                tracker.feed(&buf[..n]);
                // Not cancelled by the other branches: a frame is never half written.
                if client_wr.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    if on_drain == OnDrain::Cut {
        tracing::info!(leader, "node drained: cutting a forwarded amqps connection");
        return;
    }
    let finish = finish_frame(&mut tracker, &mut up_rd, &mut client_wr, &mut buf);
    let at_boundary = matches!(
        tokio::time::timeout(FRAME_FINISH_TIMEOUT, finish).await,
        Ok(true)
    );
    if at_boundary && tracker.amqp_open() {
        let _ = client_wr.write_all(&drain_close_frame()).await;
        let _ = client_wr.shutdown().await;
        // What the client sent before it read the close (a consumer's `accepted`
        // dispositions) still reaches the leader, then its own close does, so the leader
        // settles what was settled and ends the connection cleanly.
        if !client_done {
            let _ = tokio::time::timeout(CLIENT_CLOSE_GRACE, &mut up).await;
        }
        tracing::info!(
            leader,
            "node drained: closed a forwarded connection with amqp:connection:forced"
        );
    } else {
        tracing::info!(
            leader,
            "node drained: cutting a forwarded connection (not in the AMQP layer)"
        );
    }
}

/// Copies from the leader exactly up to the end of the frame (or protocol header) in
/// progress; returns whether the stream then stands at a boundary.
async fn finish_frame(
    tracker: &mut FrameTracker,
    up: &mut (impl AsyncReadExt + Unpin),
    client: &mut (impl AsyncWriteExt + Unpin),
    buf: &mut [u8],
) -> bool {
    loop {
        let want = tracker.to_boundary();
        if want == 0 {
            return !tracker.broken;
        }
        let len = want.min(buf.len());
        let n = match up.read(&mut buf[..len]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        tracker.feed(&buf[..n]);
        if client.write_all(&buf[..n]).await.is_err() {
            return false;
        }
    }
}

/// The `close` a drained node writes to a forwarded client.
fn drain_close_frame() -> BytesMut {
    let error = AmqpError::new(
        ConnectionError::ConnectionForced,
        "this node is draining (scale-down): reconnect to another node".to_string(),
        None,
    );
    let close = Performative::Close(Close { error: Some(error) });
    let mut buf = BytesMut::new();
    if encode_frame(&mut buf, 0, &close, b"").is_err() {
        buf.clear();
    }
    buf
}

/// Follows the leader → client byte stream: protocol headers (`AMQP` + 4 bytes) and
/// frames (`size: u32` big-endian, header included); knows where the next boundary is and
/// whether the AMQP layer (not SASL) has begun with at least one frame (the `open`).
#[derive(Debug, Default)]
pub struct FrameTracker {
    /// Bytes of the current frame still to come (after its 8-byte head).
    remaining: usize,
    /// The head being read (protocol header or frame header).
    head: [u8; PROTOCOL_HEADER_LEN],
    have: usize,
    /// The last protocol header was plain AMQP (id 0), not SASL.
    amqp: bool,
    /// Frames since that header.
    frames: u64,
    /// A frame size under 8: not an AMQP stream, never at a usable boundary.
    broken: bool,
}

impl FrameTracker {
    /// Accounts for `bytes` that went to the client.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.broken {
            if self.remaining > 0 {
                let n = self.remaining.min(bytes.len());
                self.remaining -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (PROTOCOL_HEADER_LEN - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < PROTOCOL_HEADER_LEN {
                continue;
            }
            self.have = 0;
            if &self.head[..4] == b"AMQP" {
                self.amqp = self.head[4] == 0;
                self.frames = 0;
                continue;
            }
            let size = u32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]]);
            match (size as usize).checked_sub(PROTOCOL_HEADER_LEN) {
                Some(rest) => self.remaining = rest,
                None => self.broken = true,
            }
            self.frames += 1;
        }
    }

    /// Bytes still to come before the next boundary (0: at one).
    pub fn to_boundary(&self) -> usize {
        if self.broken {
            return 0;
        }
        if self.remaining > 0 {
            self.remaining
        } else if self.have > 0 {
            PROTOCOL_HEADER_LEN - self.have
        } else {
            0
        }
    }

    /// At a boundary of an AMQP-layer stream whose `open` has gone by: a `close` fits here.
    pub fn amqp_open(&self) -> bool {
        !self.broken && self.amqp && self.frames > 0 && self.to_boundary() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: usize) -> Vec<u8> {
        let mut f = ((body + 8) as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&[2, 0, 0, 0]);
        f.extend(std::iter::repeat_n(7u8, body));
        f
    }

    #[test]
    fn boundaries_are_found_across_any_split() {
        let mut stream = b"AMQP\x03\x01\x00\x00".to_vec();
        stream.extend(frame(20)); // sasl-mechanisms
        stream.extend(frame(5)); // sasl-outcome
        let sasl_end = stream.len();
        stream.extend(b"AMQP\x00\x01\x00\x00");
        let header_end = stream.len();
        stream.extend(frame(40)); // open
        stream.extend(frame(0)); // heartbeat
        for cut in 0..stream.len() {
            let mut t = FrameTracker::default();
            t.feed(&stream[..cut]);
            let boundary = [
                0,
                8,
                36,
                sasl_end,
                header_end,
                header_end + 48,
                stream.len(),
            ]
            .contains(&cut);
            assert_eq!(t.to_boundary() == 0, boundary, "cut at {cut}");
            t.feed(&stream[cut..]);
            assert!(t.amqp_open());
        }
        let mut t = FrameTracker::default();
        t.feed(&stream[..sasl_end]);
        assert!(!t.amqp_open(), "in SASL: no AMQP close");
        t.feed(&stream[sasl_end..header_end]);
        assert!(!t.amqp_open(), "before the open: no close");
    }

    #[test]
    fn the_drain_close_is_one_amqp_frame() {
        let close = drain_close_frame();
        let mut t = FrameTracker::default();
        t.feed(b"AMQP\x00\x01\x00\x00");
        t.feed(&close);
        assert!(t.amqp_open());
        assert!(close.windows(16).any(|w| w == b"connection:force"));
    }
}
