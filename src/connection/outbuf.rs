//! A connection's output: frames waiting to be written to the socket, as one growing
//! buffer for what the engine encodes and, between its parts, shared slices of message
//! bodies that are written as they are — never copied into the buffer.
//!
//! Small frames (performatives, flows, dispositions, the transfers of small messages) are
//! encoded into `head`; copying a 1 KiB body once is cheaper than another I/O vector.
//! A body chunk of [`SHARED_BODY_MIN_BYTES`] or more is not copied: the frame's header and
//! transfer performative go into `head`, `head` is frozen into the chain, and the chunk
//! (a `Bytes` slice of the store's mapping) follows it. [`OutBuf::write_to`] hands the
//! chain to the socket with vectored writes, so a large body goes from the segment's
//! mapping to the kernel's socket buffer with no copy in between, and the connection's
//! own buffer stays small whatever the message size.
//!
//! Invariant: the bytes written are exactly the concatenation of the chain in order, then
//! `head`; [`OutBuf::len`] counts both, so the flush thresholds see shared bytes too.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::ops::{Deref, DerefMut};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Body chunks at least this long are written from their own `Bytes`, not copied.
pub const SHARED_BODY_MIN_BYTES: usize = 16 * 1024;
/// Most I/O vectors handed to one `writev` (Linux allows 1,024; a few dozen already
/// cover the 256 KiB flush threshold several times).
pub const MAX_IO_VECTORS: usize = 64;
/// Why a gated write stopped (see [`OutBuf::write_while`]).
pub const WRITE_REFUSED: &str = "write refused: the delivery lease lapsed";
/// The encoding buffer's starting capacity.
const HEAD_CAPACITY: usize = 64 * 1024;

/// Frames waiting for the socket (see the module docs).
pub struct OutBuf {
    /// Where frames are encoded; frozen into `chain` before a shared body part.
    head: BytesMut,
    /// Encoded frame parts and shared body parts, in write order, before `head`.
    chain: VecDeque<Bytes>,
    /// Bytes in `chain`.
    chain_len: usize,
}

impl Default for OutBuf {
    fn default() -> Self {
        OutBuf {
            head: BytesMut::with_capacity(HEAD_CAPACITY),
            chain: VecDeque::new(),
            chain_len: 0,
        }
    }
}

impl OutBuf {
    /// Bytes waiting: encoded and shared.
    pub fn len(&self) -> usize {
        self.chain_len + self.head.len()
    }

    /// Nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `part` after what is encoded so far, without copying it when it is at
    /// least [`SHARED_BODY_MIN_BYTES`] long.
    pub fn put_shared(&mut self, part: Bytes) {
        if part.len() < SHARED_BODY_MIN_BYTES {
            self.head.extend_from_slice(&part);
            return;
        }
        self.freeze_head();
        self.chain_len += part.len();
        self.chain.push_back(part);
    }

    fn freeze_head(&mut self) {
        if !self.head.is_empty() {
            let encoded = self.head.split().freeze();
            self.chain_len += encoded.len();
            self.chain.push_back(encoded);
        }
    }

    /// Writes everything to `wr`, with vectored writes over the chain; empty afterwards
    /// (also when the write fails: the connection is then closing).
    pub async fn write_to<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        wr: &mut W,
    ) -> std::io::Result<()> {
        self.write_while(wr, || true).await
    }

    /// [`OutBuf::write_to`], asking `may_write` before every write system call: once it
    /// says no, nothing more is written and the write fails with [`WRITE_REFUSED`] (a frame
    /// cut short cannot be resumed later; the connection ends). A clustered leader passes
    /// its delivery lease here.
    pub async fn write_while<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        wr: &mut W,
        may_write: impl Fn() -> bool,
    ) -> std::io::Result<()> {
        let result = if self.chain.is_empty() {
            self.write_head(wr, &may_write).await
        } else {
            self.freeze_head();
            self.write_chain(wr, &may_write).await
        };
        self.head.clear();
        self.chain.clear();
        self.chain_len = 0;
        result
    }

    async fn write_head<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        wr: &mut W,
        may_write: &impl Fn() -> bool,
    ) -> std::io::Result<()> {
        let mut at = 0;
        while at < self.head.len() {
            if !may_write() {
                return Err(std::io::Error::other(WRITE_REFUSED));
            }
            let written = wr.write(&self.head[at..]).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            at += written;
        }
        Ok(())
    }

    async fn write_chain<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        wr: &mut W,
        may_write: &impl Fn() -> bool,
    ) -> std::io::Result<()> {
        while !self.chain.is_empty() {
            if !may_write() {
                return Err(std::io::Error::other(WRITE_REFUSED));
            }
            let written = {
                let slices: Vec<IoSlice<'_>> = self
                    .chain
                    .iter()
                    .take(MAX_IO_VECTORS)
                    .map(|b| IoSlice::new(b))
                    .collect();
                wr.write_vectored(&slices).await?
            };
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.consume(written);
        }
        Ok(())
    }

    /// Drops the first `n` written bytes of the chain.
    fn consume(&mut self, mut n: usize) {
        self.chain_len -= n;
        while n > 0 {
            let Some(front) = self.chain.front_mut() else {
                return;
            };
            if front.len() <= n {
                n -= front.len();
                self.chain.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

/// Encoders write into the head.
impl Deref for OutBuf {
    type Target = BytesMut;
    fn deref(&self) -> &BytesMut {
        &self.head
    }
}

impl DerefMut for OutBuf {
    fn deref_mut(&mut self) -> &mut BytesMut {
        &mut self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A writer that takes at most `step` bytes per call, vectored.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            self.calls += 1;
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut left = self.step;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(left);
                self.out.extend_from_slice(&b[..take]);
                left -= take;
                n += take;
                if left == 0 {
                    break;
                }
            }
            self.calls += 1;
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn shared_parts_are_written_in_order_and_not_copied_into_the_head() {
        let big = Bytes::from(vec![7u8; 3 * SHARED_BODY_MIN_BYTES + 5]);
        let mut out = OutBuf::default();
        out.extend_from_slice(b"frame-1|");
        out.put_shared(big.slice(..SHARED_BODY_MIN_BYTES + 1));
        out.extend_from_slice(b"|frame-2|");
        out.put_shared(Bytes::from_static(b"small"));
        out.put_shared(big.slice(SHARED_BODY_MIN_BYTES + 1..));
        out.extend_from_slice(b"|end");
        // The head holds only what was encoded since the last shared part.
        assert_eq!(&out[..], b"|end");
        let total = 8 + big.len() + 9 + 5 + 4;
        assert_eq!(out.len(), total);

        let mut expected = b"frame-1|".to_vec();
        expected.extend_from_slice(&big[..SHARED_BODY_MIN_BYTES + 1]);
        expected.extend_from_slice(b"|frame-2|small");
        expected.extend_from_slice(&big[SHARED_BODY_MIN_BYTES + 1..]);
        expected.extend_from_slice(b"|end");

        let mut w = Trickle {
            out: Vec::new(),
            step: 1000,
            calls: 0,
        };
        out.write_to(&mut w).await.unwrap();
        assert_eq!(w.out, expected);
        assert!(out.is_empty());
        assert_eq!(w.calls, total.div_ceil(1000));

        // Reusable afterwards, on the plain path.
        out.extend_from_slice(b"again");
        out.write_to(&mut w).await.unwrap();
        assert!(w.out.ends_with(b"again"));
    }

    #[tokio::test]
    async fn a_zero_write_is_an_error_not_a_spin() {
        let mut out = OutBuf::default();
        out.put_shared(Bytes::from(vec![1u8; SHARED_BODY_MIN_BYTES]));
        let mut w = Trickle {
            out: Vec::new(),
            step: 0,
            calls: 0,
        };
        let err = out.write_to(&mut w).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WriteZero);
        assert!(out.is_empty());
    }

    /// A gate that says yes `yes` times, then no.
    fn gate(yes: usize) -> impl Fn() -> bool {
        let asked = std::cell::Cell::new(0);
        move || {
            asked.set(asked.get() + 1);
            asked.get() <= yes
        }
    }

    #[tokio::test]
    async fn a_gated_write_stops_at_the_first_refusal_on_both_paths() {
        // The plain path (head only), written 1,000 bytes per call: the gate allows two.
        let mut out = OutBuf::default();
        out.extend_from_slice(&[3u8; 5000]);
        let mut w = Trickle {
            out: Vec::new(),
            step: 1000,
            calls: 0,
        };
        let err = out.write_while(&mut w, gate(2)).await.unwrap_err();
        assert_eq!(err.to_string(), WRITE_REFUSED);
        assert_eq!(
            (w.calls, w.out.len()),
            (2, 2000),
            "nothing after the refusal"
        );
        assert!(out.is_empty(), "the rest is dropped: the connection ends");

        // The chain path (a shared body part): refused before the first call.
        out.extend_from_slice(b"head|");
        out.put_shared(Bytes::from(vec![1u8; SHARED_BODY_MIN_BYTES]));
        let mut w = Trickle {
            out: Vec::new(),
            step: 1000,
            calls: 0,
        };
        let err = out.write_while(&mut w, gate(0)).await.unwrap_err();
        assert_eq!(err.to_string(), WRITE_REFUSED);
        assert_eq!(w.calls, 0, "no write system call once refused");
        assert!(out.is_empty());

        // A gate that always says yes writes everything, as write_to does.
        out.put_shared(Bytes::from(vec![2u8; SHARED_BODY_MIN_BYTES]));
        out.write_while(&mut w, gate(usize::MAX)).await.unwrap();
        assert_eq!(w.out.len(), SHARED_BODY_MIN_BYTES);
    }
}
