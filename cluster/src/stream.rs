//! One inter-node connection's byte stream: plain TCP, or TLS over TCP (`tls.rs`), or
//! (feature `sim-net`) an in-memory stream of the simulated network (`sim_net.rs`).
//!
//! Both ends of the port (`network.rs`, `peer_server.rs`) read and write frames through
//! [`PeerStream`] without knowing which it is. The plain variant forwards every call
//! straight to the `TcpStream` — no buffer, no copy — so a cluster without TLS pays one
//! branch per call; the TLS stream is boxed so the enum stays the size of a `TcpStream`.
//!
//! Invariant: `TCP_NODELAY` is set on the socket before it is wrapped (RPCs are small and
//! latency-bound), for both variants.
//!
//! Does not: buffer, time out or reconnect (the callers do).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A connection to or from a peer.
#[derive(Debug)]
pub(crate) enum PeerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    #[cfg(feature = "sim-net")]
    Sim(tokio::io::DuplexStream),
}

impl From<tokio_rustls::client::TlsStream<TcpStream>> for PeerStream {
    fn from(s: tokio_rustls::client::TlsStream<TcpStream>) -> Self {
        PeerStream::Tls(Box::new(s.into()))
    }
}

impl From<tokio_rustls::server::TlsStream<TcpStream>> for PeerStream {
    fn from(s: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        PeerStream::Tls(Box::new(s.into()))
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            #[cfg(feature = "sim-net")]
            PeerStream::Sim(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            #[cfg(feature = "sim-net")]
            PeerStream::Sim(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            #[cfg(feature = "sim-net")]
            PeerStream::Sim(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PeerStream::Plain(s) => s.is_write_vectored(),
            PeerStream::Tls(s) => s.is_write_vectored(),
            #[cfg(feature = "sim-net")]
            PeerStream::Sim(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(feature = "sim-net")]
            PeerStream::Sim(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(feature = "sim-net")]
            PeerStream::Sim(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
