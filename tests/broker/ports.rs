//! Loopback ports reserved for the whole life of a test, for brokers that must be told
//! their ports before they start: a cluster member's address is in every other node's
//! `--peers`, and a restarted node must come back on the same one.
//!
//! The usual "bind port 0, read the port, close the socket" leaves a window in which the
//! kernel may hand that port to anyone else (another test's outgoing connection or
//! listener) before the broker binds it: a node then fails to start, or its peers dial a
//! stranger. A [`ReservedPort`] instead stays bound, with `SO_REUSEADDR` and never
//! listening, until it is dropped. Linux then never picks it as an ephemeral port
//! (`connect` skips explicitly bound ports; `bind` to port 0 skips them while any other
//! is free), yet the broker, which binds with `SO_REUSEADDR` too (tokio sets it), may
//! listen on it — again after a SIGKILL and restart, while nobody else can take it in
//! between. This module does not start anything; it only holds ports.

use std::net::{Ipv4Addr, SocketAddr};

use socket2::{Domain, Socket, Type};

/// A loopback port bound by this process (not listening) until dropped.
pub struct ReservedPort {
    /// Held only to keep the port bound.
    _socket: Socket,
    port: u16,
}

impl ReservedPort {
    /// A port on 127.0.0.1 the OS picked and nobody else gets while this lives.
    pub fn new() -> ReservedPort {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        socket.bind(&any.into()).expect("bind 127.0.0.1:0");
        let port = socket
            .local_addr()
            .expect("local address")
            .as_socket()
            .expect("an IPv4 address")
            .port();
        ReservedPort {
            _socket: socket,
            port,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

#[test]
fn a_reserved_port_is_free_for_a_reusing_listener_only() {
    let reserved = ReservedPort::new();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, reserved.port()));
    // What the broker does (tokio sets SO_REUSEADDR): listen, stop, listen again.
    for _ in 0..2 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr));
        assert!(
            listener.is_ok(),
            "the broker cannot bind {addr}: {listener:?}"
        );
    }
    // Still held: a socket that does not ask to share the address cannot have it.
    let other = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let taken = other.bind(&addr.into());
    assert!(
        matches!(&taken, Err(e) if e.kind() == std::io::ErrorKind::AddrInUse),
        "{addr} was not held: {taken:?}"
    );
}
