//! Shared by the broker benches: an in-process broker node on loopback with its data
//! under `target/` (on the real disk, not a tmpfs), and fe2o3-amqp client connections
//! over sockets with TCP_NODELAY (fe2o3-amqp does not set it, and Nagle's algorithm then
//! holds back its small disposition and flow frames).

#![allow(dead_code)]

use std::net::SocketAddr;

use entrepot::config::BrokerConfig;
use entrepot::server::Node;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::Connection;
use tokio::sync::watch;

/// A running in-process broker; dropping it stops nothing (benches run to the end).
pub struct BenchNode {
    pub amqp: SocketAddr,
    _dir: tempfile::TempDir,
    _stop: watch::Sender<bool>,
}

/// Starts a broker on `rt` with sync policy `sync` (`always`, `never`, …).
pub fn start_node(rt: &tokio::runtime::Runtime, sync: &str) -> BenchNode {
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").into());
    std::fs::create_dir_all(&target).expect("target dir");
    let dir = tempfile::tempdir_in(target).expect("tempdir");
    let config = BrokerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        http: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_path_buf(),
        sync: sync.parse().expect("sync policy"),
        ..BrokerConfig::default()
    };
    let (stop, rx) = watch::channel(false);
    let node = rt.block_on(Node::start(config, rx)).expect("node");
    let amqp = node.amqp_addr;
    std::mem::forget(node);
    BenchNode {
        amqp,
        _dir: dir,
        _stop: stop,
    }
}

/// Opens a client connection to `addr` over a TCP_NODELAY socket.
pub async fn connect(addr: SocketAddr, container_id: &str) -> ConnectionHandle<()> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    Connection::builder()
        .container_id(container_id)
        .hostname("127.0.0.1")
        .open_with_stream(stream)
        .await
        .expect("open")
}
