//! Shared by the broker benches: an in-process broker node on loopback with its data
//! under `target/` (on the real disk, not a tmpfs), and fe2o3-amqp client connections
//! over sockets with TCP_NODELAY (fe2o3-amqp does not set it, and Nagle's algorithm then
//! holds back its small disposition and flow frames).

#![allow(dead_code)]

pub mod counting;

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

/// Sends `count` persistent messages of `body_bytes` to `queue`, keeping `window` unsettled
/// in flight, each waited for until `accepted`; returns every send→accepted latency in µs.
pub async fn produce(
    addr: SocketAddr,
    queue: String,
    count: u64,
    body_bytes: usize,
    window: usize,
) -> Vec<u32> {
    let mut conn = connect(addr, "bench-producer").await;
    let mut session = fe2o3_amqp::Session::begin(&mut conn).await.expect("begin");
    let mut sender = fe2o3_amqp::Sender::attach(&mut session, "p", queue)
        .await
        .expect("attach");
    let latencies = send_window(&mut sender, count, body_bytes, window).await;
    sender.close().await.ok();
    session.end().await.ok();
    conn.close().await.ok();
    latencies
}

/// Sends `count` persistent messages of `body_bytes` on an attached `sender`, keeping
/// `window` unsettled in flight, each waited for until `accepted`; returns every
/// send→accepted latency in µs.
pub async fn send_window(
    sender: &mut fe2o3_amqp::Sender,
    count: u64,
    body_bytes: usize,
    window: usize,
) -> Vec<u32> {
    use fe2o3_amqp::types::messaging::{Header, Message};
    use fe2o3_amqp::types::primitives::Binary;
    let body = vec![0x5au8; body_bytes];
    let mut inflight = std::collections::VecDeque::with_capacity(window);
    let mut latencies = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if inflight.len() >= window {
            let (t, fut) = inflight.pop_front().expect("inflight");
            latencies.push(accepted_after(t, fut).await);
        }
        let msg = Message::builder()
            .header(Header {
                durable: true,
                ..Default::default()
            })
            .data(Binary::from(body.clone()))
            .build();
        let fut = sender.send_batchable(msg).await.expect("send");
        inflight.push_back((std::time::Instant::now(), fut));
    }
    for (t, fut) in inflight {
        latencies.push(accepted_after(t, fut).await);
    }
    latencies
}

/// Receives and accepts `count` messages from `queue` with link credit `credit`.
pub async fn consume(addr: SocketAddr, queue: String, count: u64, credit: u32) {
    use fe2o3_amqp::types::messaging::Body;
    use fe2o3_amqp::types::primitives::Value;
    let mut conn = connect(addr, "bench-consumer").await;
    let mut session = fe2o3_amqp::Session::begin(&mut conn).await.expect("begin");
    let mut receiver = fe2o3_amqp::Receiver::builder()
        .name("c")
        .source(queue)
        .credit_mode(fe2o3_amqp::link::receiver::CreditMode::Auto(credit))
        .attach(&mut session)
        .await
        .expect("attach");
    for _ in 0..count {
        let d = receiver.recv::<Body<Value>>().await.expect("recv");
        receiver.accept(&d).await.expect("accept");
    }
    receiver.close().await.ok();
    session.end().await.ok();
    conn.close().await.ok();
}

/// Waits for one delivery's outcome, which must be `accepted`; returns µs since `sent`.
async fn accepted_after(
    sent: std::time::Instant,
    fut: fe2o3_amqp::link::delivery::DeliveryFut<
        Result<fe2o3_amqp::types::messaging::Outcome, fe2o3_amqp::link::SendError>,
    >,
) -> u32 {
    fut.await
        .expect("outcome")
        .accepted_or_else(|o| o)
        .expect("accepted");
    sent.elapsed().as_micros() as u32
}
