//! A simulated inter-node network for deterministic tests (feature `sim-net`): the
//! hosts of one process talk over in-memory streams that the test can partition, slow
//! down and cut, on tokio's paused clock.
//!
//! A [`SimNet`] is a switch. [`SimNet::listen`] gives an address a [`SimListener`]
//! (handed to `Host::start` in place of a `TcpListener`); a host started on one dials
//! its peers through the same switch. A dial from `a` to `b` fails with
//! `ConnectionRefused` when nobody listens on `b` (the node is down) and with
//! `TimedOut` after [`DIAL_TIMEOUT`] when `a` and `b` are on different sides of a
//! partition (a dropped SYN); otherwise it makes a *link*: two in-memory pipes joined by
//! a pump task that forwards each chunk after the switch's latency. Partitioning aborts
//! the pumps of every link that crosses it: both ends see the connection end (EOF, or a
//! broken pipe on write), as when a TCP connection is reset — a stream never loses or
//! reorders bytes in the middle, it breaks.
//!
//! # Invariants
//! * Bytes on a link arrive in the order written, each chunk after the latency, or the
//!   link ends; nothing is lost while the link lives.
//! * No link crosses a partition: dials across fail, links across are cut when it is set.
//! * An unplugged address has no link and makes none until it listens again.
//! * Every choice is the test's (latency, partitions): the switch draws no randomness,
//!   and on a current-thread runtime a run is a function of the tasks' inputs.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// Bytes each in-memory pipe buffers (a pipe is one direction's socket buffer).
pub const PIPE_BYTES: usize = 256 * 1024;
/// How long a dial across a partition hangs before it fails (a dropped SYN).
pub const DIAL_TIMEOUT: Duration = Duration::from_millis(500);
/// Dials a listener queues before it accepts them (its backlog).
pub const BACKLOG: usize = 64;

/// An accepted simulated connection and the dialer's address.
pub type Accepted = (DuplexStream, SocketAddr);

/// The switch every simulated host of a test is plugged into.
#[derive(Debug, Clone, Default)]
pub struct SimNet {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    listeners: BTreeMap<SocketAddr, mpsc::Sender<Accepted>>,
    /// Addresses unplugged ([`SimNet::unplug`]) until they listen again.
    unplugged: std::collections::BTreeSet<SocketAddr>,
    /// Side of each address; two addresses on different sides cannot talk. Absent: side 0.
    sides: BTreeMap<SocketAddr, u8>,
    latency: Duration,
    links: Vec<Link>,
    /// Links made and cut so far.
    made: u64,
    cut: u64,
}

#[derive(Debug)]
struct Link {
    a: SocketAddr,
    b: SocketAddr,
    pump: AbortHandle,
}

/// What the switch did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimNetStats {
    pub links_made: u64,
    pub links_cut: u64,
}

impl SimNet {
    pub fn new() -> SimNet {
        SimNet::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Listens on `addr` (a restarted node listens again on its address).
    pub fn listen(&self, addr: SocketAddr) -> SimListener {
        let (tx, rx) = mpsc::channel(BACKLOG);
        let mut inner = self.lock();
        inner.unplugged.remove(&addr);
        inner.listeners.insert(addr, tx);
        drop(inner);
        SimListener {
            net: self.clone(),
            addr,
            incoming: rx,
        }
    }

    /// Each chunk is delivered this long after it was written.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Puts each listed address on its side (unlisted ones on side 0) and cuts every link
    /// between two sides.
    pub fn partition(&self, sides: BTreeMap<SocketAddr, u8>) {
        let mut inner = self.lock();
        inner.sides = sides;
        let Inner {
            sides, links, cut, ..
        } = &mut *inner;
        let side = |a: &SocketAddr| sides.get(a).copied().unwrap_or(0);
        links.retain(|l| {
            if side(&l.a) == side(&l.b) {
                return true;
            }
            l.pump.abort();
            *cut += 1;
            false
        });
    }

    /// Everyone on one side again.
    pub fn heal(&self) {
        self.partition(BTreeMap::new());
    }

    /// Cuts every link to or from `addr` (its process died: the kernel resets them).
    pub fn cut_links_of(&self, addr: SocketAddr) {
        let mut inner = self.lock();
        let Inner { links, cut, .. } = &mut *inner;
        links.retain(|l| {
            if l.a != addr && l.b != addr {
                return true;
            }
            l.pump.abort();
            *cut += 1;
            false
        });
    }

    /// Takes `addr` off the network at once, until it listens again: its links are cut,
    /// and every dial from or to it is refused — a node whose power was cut is not heard
    /// from again, even while its tasks wind down.
    pub fn unplug(&self, addr: SocketAddr) {
        self.lock().unplugged.insert(addr);
        self.cut_links_of(addr);
    }

    pub fn stats(&self) -> SimNetStats {
        let inner = self.lock();
        SimNetStats {
            links_made: inner.made,
            links_cut: inner.cut,
        }
    }

    /// A connection from `from` to `to`, as the switch allows.
    pub async fn dial(&self, from: SocketAddr, to: SocketAddr) -> io::Result<DuplexStream> {
        let (listener, blocked, unplugged) = {
            let inner = self.lock();
            let side = |a: &SocketAddr| inner.sides.get(a).copied().unwrap_or(0);
            let unplugged = inner.unplugged.contains(&from) || inner.unplugged.contains(&to);
            (
                inner.listeners.get(&to).cloned(),
                side(&from) != side(&to),
                unplugged,
            )
        };
        if blocked {
            tokio::time::sleep(DIAL_TIMEOUT).await;
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("simulated partition between {from} and {to}"),
            ));
        }
        let refused = || {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("nothing listens on {to} (simulated)"),
            )
        };
        if unplugged {
            return Err(refused());
        }
        let listener = listener.ok_or_else(refused)?;
        let (client, client_pump) = tokio::io::duplex(PIPE_BYTES);
        let (server, server_pump) = tokio::io::duplex(PIPE_BYTES);
        listener.send((server, from)).await.map_err(|_| refused())?;
        // Checked again: the switch may have changed while the listener's queue was full.
        let mut inner = self.lock();
        let side = |a: &SocketAddr| inner.sides.get(a).copied().unwrap_or(0);
        if side(&from) != side(&to)
            || inner.unplugged.contains(&from)
            || inner.unplugged.contains(&to)
        {
            // Dropping the pipes ends the accepted connection at once.
            return Err(refused());
        }
        let net = self.clone();
        let pump = tokio::spawn(async move {
            let (cr, cw) = tokio::io::split(client_pump);
            let (sr, sw) = tokio::io::split(server_pump);
            tokio::select! {
                () = net.forward(cr, sw) => {}
                () = net.forward(sr, cw) => {}
            }
        });
        inner.made += 1;
        inner.links.retain(|l| !l.pump.is_finished());
        inner.links.push(Link {
            a: from,
            b: to,
            pump: pump.abort_handle(),
        });
        Ok(client)
    }

    /// Copies one direction of a link, each chunk after the latency, until either end
    /// closes.
    async fn forward(&self, mut from: ReadHalf<DuplexStream>, mut to: WriteHalf<DuplexStream>) {
        let mut buf = vec![0u8; PIPE_BYTES];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let latency = self.lock().latency;
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

/// One address's end of the switch: what a host serves its peer port on.
#[derive(Debug)]
pub struct SimListener {
    net: SimNet,
    addr: SocketAddr,
    incoming: mpsc::Receiver<Accepted>,
}

impl SimListener {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The switch this listener is plugged into (its host dials through it).
    pub fn net(&self) -> &SimNet {
        &self.net
    }

    /// The next connection; `None` once the switch listens elsewhere for this address.
    /// (Dropping the listener refuses the dials that follow: the node is down.)
    pub async fn accept(&mut self) -> Option<Accepted> {
        self.incoming.recv().await
    }
}
