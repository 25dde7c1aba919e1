//! Framing of the inter-node port: one length-prefixed frame per RPC request or reply.
//!
//! ```text
//! // Format: { len: u32 | kind: u8 | body: [u8; len] }   (len counts the body only, LE)
//! ```
//! The length is checked against [`MAX_RPC_FRAME_BYTES`] *before* the body is allocated,
//! so a hostile or confused peer costs at most one bounded buffer. What a body holds is
//! `rpc.rs`'s business; this file only moves bytes.
//!
//! Does not: time out, retry or reconnect — the caller (`network.rs`, `peer_server.rs`)
//! decides that, because only it knows which RPC is in flight.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::types::MAX_MESSAGE_BYTES;

/// Largest frame body on the inter-node port. An `append_entries` that would be larger is
/// answered locally with openraft's `PayloadTooLarge`, so openraft sends fewer entries.
pub const MAX_RPC_FRAME_BYTES: usize = 256 << 20;

// One entry carrying one message of the largest allowed size must still fit in a frame.
const _: () = assert!(MAX_RPC_FRAME_BYTES > MAX_MESSAGE_BYTES + (1 << 20));
const _: () = assert!(MAX_RPC_FRAME_BYTES <= u32::MAX as usize);

/// Bytes before the body: `len` and `kind`.
pub const FRAME_HEADER_LEN: usize = 4 + 1;
/// Longest a frame may take to arrive once its first byte has: a peer that starts a frame
/// and stalls must not hold a connection (and its buffer) forever. Idle time *between*
/// frames is not bounded here.
pub const FRAME_TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// The body buffer grows with the bytes that actually arrive, from this much, so a
/// header claiming a large body costs nothing until the body is sent.
const BODY_INITIAL_CAPACITY: usize = 64 << 10;

/// Reads one frame. `Ok(None)` is a clean end of stream *between* frames; an end of
/// stream inside a frame, or a length over [`MAX_RPC_FRAME_BYTES`], is an error.
pub(crate) async fn read_frame<R>(r: &mut R) -> io::Result<Option<(u8, Bytes)>>
where
    R: AsyncReadExt + Unpin,
{
    let mut header = [0u8; FRAME_HEADER_LEN];
    match r.read_exact(&mut header[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    match tokio::time::timeout(FRAME_TRANSFER_TIMEOUT, read_rest(r, &mut header)).await {
        Ok(frame) => frame.map(Some),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "frame not complete within FRAME_TRANSFER_TIMEOUT",
        )),
    }
}

/// The rest of a frame whose first byte is in `header[0]`.
async fn read_rest<R>(r: &mut R, header: &mut [u8; FRAME_HEADER_LEN]) -> io::Result<(u8, Bytes)>
where
    R: AsyncReadExt + Unpin,
{
    r.read_exact(&mut header[1..]).await?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let kind = header[4];
    if len > MAX_RPC_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds MAX_RPC_FRAME_BYTES ({MAX_RPC_FRAME_BYTES})"),
        ));
    }
    let mut body = Vec::with_capacity(len.min(BODY_INITIAL_CAPACITY));
    r.take(len as u64).read_to_end(&mut body).await?;
    if body.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside a frame",
        ));
    }
    Ok((kind, Bytes::from(body)))
}

/// Writes one frame and flushes it. The caller has bounded `body` by
/// [`MAX_RPC_FRAME_BYTES`]; a larger one is refused here rather than sent.
pub(crate) async fn write_frame<W>(w: &mut W, kind: u8, body: &[u8]) -> io::Result<()>
where
    W: AsyncWriteExt + Unpin,
{
    if body.len() > MAX_RPC_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame body exceeds MAX_RPC_FRAME_BYTES",
        ));
    }
    let mut header = [0u8; FRAME_HEADER_LEN];
    header[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    header[4] = kind;
    w.write_all(&header).await?;
    w.write_all(body).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversize_lengths_are_refused_before_allocating() {
        let mut buf = Vec::new();
        write_frame(&mut buf, 7, b"hello").await.unwrap();
        write_frame(&mut buf, 8, b"").await.unwrap();
        let mut r = &buf[..];
        let (k, b) = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((k, &b[..]), (7, &b"hello"[..]));
        let (k, b) = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((k, b.len()), (8, 0));
        assert!(read_frame(&mut r).await.unwrap().is_none());

        let mut hostile = (u32::MAX).to_le_bytes().to_vec();
        hostile.push(1);
        let err = read_frame(&mut &hostile[..]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        // A frame cut short is an error, not a clean end.
        let cut = &buf[..buf.len() - 6];
        let mut r = cut;
        let err = read_frame(&mut r).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
