//! The TCP socket under each fe2o3-amqp connection, and how its writes reach the kernel.
//!
//! fe2o3-amqp 0.18 flushes its transport after every outgoing frame, so a producer's
//! transfer, a consumer's disposition and every flow each cost one `writev` — a third of
//! the generator's CPU at 8/8 in session 11's profile, more than the broker spends on a
//! message. [`Writes::Batched`] puts an in-memory pipe between fe2o3-amqp and the socket:
//! the engine's flush only copies the frame into the pipe, and one pump task per
//! connection writes whatever has gathered since its last write in one `write` — as
//! proton and qpid-jms write once per I/O batch. At a low rate each frame still leaves on
//! its own, one task wake-up after the flush; under load the frames of many deliveries
//! share a write.
//!
//! Invariants: the bytes reach the socket in the order fe2o3-amqp wrote them; the pipe
//! holds at most [`PIPE_BYTES_MAX`] (fe2o3-amqp's writes wait when it is full); a pump
//! ends when fe2o3-amqp drops or shuts down its end (the socket's write side is then shut
//! down) or when the socket fails (fe2o3-amqp's next write then fails with `BrokenPipe`).
//! What it does not change: the frames themselves, their order, when fe2o3-amqp sends
//! them, and so nothing the generator measures (stamps, latencies, the loss check).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, DuplexStream, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

/// Most bytes waiting in a connection's pipe before fe2o3-amqp's writes wait: 64 transfers
/// of 1 KiB, or one of 256 KiB, so a pump write is never larger than the socket takes at
/// once on loopback.
pub const PIPE_BYTES_MAX: usize = 256 * 1024;

/// How a connection's frames reach the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// Through the pipe and its pump task: frames flushed while the pump was busy leave
    /// in one write (the default).
    Batched,
    /// One write per frame, as fe2o3-amqp does on its own socket (`--direct-writes`, and
    /// `--nagle` runs, which show what fe2o3-amqp's own clients get).
    Direct,
}

/// A connection's stream: reads straight from the socket, writes into the pipe.
#[derive(Debug)]
pub struct BatchedStream {
    read: OwnedReadHalf,
    write: DuplexStream,
}

impl BatchedStream {
    /// Splits `stream` and spawns its pump task (it ends on its own, see the module doc).
    pub fn new(stream: TcpStream) -> BatchedStream {
        let (read, mut socket_write) = stream.into_split();
        let (write, pipe_out) = tokio::io::duplex(PIPE_BYTES_MAX);
        tokio::spawn(async move {
            // One read of the pipe takes everything gathered (up to the buffer), one
            // write sends it; `copy_buf` returns at the pipe's end or a socket error.
            let mut gathered = BufReader::with_capacity(PIPE_BYTES_MAX, pipe_out);
            if tokio::io::copy_buf(&mut gathered, &mut socket_write)
                .await
                .is_ok()
            {
                let _ = socket_write.shutdown().await;
            }
        });
        BatchedStream { read, write }
    }
}

impl AsyncRead for BatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for BatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.write).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.write).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.write.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.write).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.write).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Bound on every wait of these tests (loopback: each takes milliseconds).
    const TEST_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

    /// Bytes written through the pipe arrive in order and whole, the peer sees the end
    /// when the stream shuts down, and the peer's bytes are read through it.
    #[tokio::test]
    async fn bytes_pass_in_order_both_ways() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        let mut stream = BatchedStream::new(client);
        let sent: Vec<u8> = (0..(3 * PIPE_BYTES_MAX)).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(1000) {
                stream.write_all(chunk).await.unwrap();
                stream.flush().await.unwrap();
            }
            stream.shutdown().await.unwrap();
            stream
        });
        let mut got = Vec::new();
        tokio::time::timeout(TEST_WAIT, peer.read_to_end(&mut got))
            .await
            .expect("the peer must see the end once the stream shuts down")
            .unwrap();
        assert_eq!(got.len(), 3 * PIPE_BYTES_MAX);
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        let mut stream = writer.await.unwrap();
        peer.write_all(b"reply").await.unwrap();
        let mut reply = [0u8; 5];
        stream.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");
    }

    /// When the socket is gone, writes into the pipe fail instead of waiting forever.
    #[tokio::test]
    async fn writes_fail_once_the_peer_is_gone() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        drop(peer);
        let mut stream = BatchedStream::new(client);
        let chunk = vec![0u8; 64 * 1024];
        let mut failed = false;
        for _ in 0..1000 {
            let r = tokio::time::timeout(TEST_WAIT, async {
                stream.write_all(&chunk).await?;
                stream.flush().await
            })
            .await
            .expect("a write into a dead connection's pipe must not hang");
            if r.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "writes kept succeeding after the peer closed");
    }
}
