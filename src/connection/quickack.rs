//! Prompt TCP acknowledgements for clients that leave Nagle's algorithm on.
//!
//! A client without TCP_NODELAY (fe2o3-amqp's own `Connection::open`, many hand-rolled
//! clients) holds each small write — a disposition, the `flow` that renews a consumer's
//! credit — until its previous small segment is acknowledged. When the broker has nothing
//! to send back (a consumer that has used up its credit), Linux delays that ACK by up to
//! 40 ms, and the consumer stalls: about credit/2 messages per delay (6.3k msg/s at credit
//! 250, 125k at 4000, measured with `entrepot bench --producers 0 --nagle`).
//!
//! So after a read that leaves the broker nothing to write, the connection sets
//! TCP_QUICKACK: the kernel sends the pending ACK at once and the client's held segment
//! leaves. A read that produces a reply needs nothing: the reply carries the ACK. One
//! `setsockopt` per such read; a failure (not a TCP socket, a closed one) is ignored —
//! this only changes timing, never what is delivered.

use std::os::fd::{AsRawFd, RawFd};

/// The TCP socket of a connection, for [`QuickAck::now`].
#[derive(Debug, Clone, Copy)]
pub struct QuickAck {
    /// Owned by the connection's reader and writer halves, which live as long as the
    /// connection that holds this: the number is never used after the socket closes.
    fd: RawFd,
}

impl QuickAck {
    /// The socket under a stream (plain TCP, or the TCP under TLS).
    pub fn of(socket: &impl AsRawFd) -> QuickAck {
        QuickAck {
            fd: socket.as_raw_fd(),
        }
    }

    /// Acknowledges what was read so far without waiting for the delayed-ACK timer.
    pub fn now(&self) {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes at a valid pointer; the fd
        // is this connection's socket (see the field's doc), and an error is harmless.
        unsafe {
            libc::setsockopt(
                self.fd,
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}
