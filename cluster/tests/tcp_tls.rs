//! Goal: with TLS on the inter-node port, nodes whose certificates come from the cluster CA
//! form a cluster and replicate (with the cluster secret still checked inside TLS), while
//! a peer with a certificate from another CA, a server certificate that does not name the
//! dialled host, or a plain-TCP peer are all refused — and the server keeps serving; a
//! certificate renewed in place is served from the next connection on.
//! Method: a CA and node certificates generated with rcgen into a temporary directory and
//! loaded with `PeerTls::load`; `Raft`s served by `PeerServer::start_with` on
//! `127.0.0.1:0`; `PeerClient`s from `TcpNetwork::with_tls` called directly, as openraft
//! would. Every wait is bounded by a timeout.

// openraft's error types are large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use entrepot_cluster::{
    NodeId, PeerClient, PeerSecret, PeerServer, PeerServerOptions, PeerTls, Request, Response,
    TcpNetwork, TypeConfig,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::VoteRequest;
use openraft::{BasicNode, Config, Raft, Vote};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::net::TcpListener;

const TEST_TIMEOUT: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A certificate authority that signs node certificates into a directory.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem, issuer.pem()).unwrap();
        Ca { issuer, pem }
    }

    /// A node certificate for `names` (DNS names or IPs), usable as server and client.
    fn node(&self, dir: &Path, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        let (cert_file, key_file) = (
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}-key.pem")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }

    /// A loaded [`PeerTls`] for a node certificate of `names`, trusting `trust`.
    fn tls(&self, dir: &Path, file: &str, names: &[&str], trust: &Ca) -> Arc<PeerTls> {
        let (cert, key) = self.node(dir, file, names);
        Arc::new(PeerTls::load(&cert, &key, &trust.pem).unwrap())
    }
}

struct Node {
    raft: Raft<TypeConfig>,
    sm: support::MessageMachine,
    server: PeerServer,
    _dir: tempfile::TempDir,
}

async fn start_node(
    id: NodeId,
    listener: TcpListener,
    config: Arc<Config>,
    options: PeerServerOptions,
) -> Node {
    let (log, sm, dir) = support::open_stores();
    let network = TcpNetwork::new(id)
        .with_tls(options.tls.clone())
        .with_secret(options.secret.clone());
    let raft = Raft::new(id, config, network, log, sm.clone())
        .await
        .unwrap();
    let server = PeerServer::start_with(listener, raft.clone(), options).unwrap();
    Node {
        raft,
        sm,
        server,
        _dir: dir,
    }
}

async fn shut(nodes: impl IntoIterator<Item = Node>) {
    for node in nodes {
        node.server.shutdown().await;
        node.raft.shutdown().await.unwrap();
    }
}

fn secret() -> Option<Arc<PeerSecret>> {
    Some(Arc::new(
        PeerSecret::new(b"the-cluster-secret-inside-tls").unwrap(),
    ))
}

async fn tls_cluster_replicates(certs: &Path) {
    let ca = Ca::new(certs, "cluster");
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 300,
        election_timeout_max: 600,
        ..Config::default()
    };
    let config = Arc::new(config.validate().unwrap());
    let mut nodes = BTreeMap::new();
    let mut addrs = BTreeMap::new();
    for id in 0..3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.insert(id, listener.local_addr().unwrap().to_string());
        // Hand-run rule: the certificate names the IP peers dial.
        let options = PeerServerOptions {
            secret: secret(),
            tls: Some(ca.tls(certs, &format!("node-{id}"), &["127.0.0.1"], &ca)),
        };
        let node = start_node(id, listener, Arc::clone(&config), options).await;
        nodes.insert(id, node);
    }
    let members: BTreeMap<NodeId, BasicNode> = addrs
        .iter()
        .map(|(id, addr)| (*id, BasicNode::new(addr)))
        .collect();
    nodes[&0].raft.initialize(members).await.unwrap();
    let metrics = nodes[&0]
        .raft
        .wait(Some(WAIT))
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .unwrap_or_else(|e| panic!("no leader over TLS within {WAIT:?}: {e}; {addrs:?}"));
    let leader = metrics.current_leader.unwrap();

    let mut acked = Vec::new();
    for b in 0..20 {
        let messages: Vec<Bytes> = (0..8)
            .map(|m| Bytes::from(format!("batch {b} message {m}")))
            .collect();
        let request = Request::Produce {
            address: "orders".into(),
            messages: messages.clone(),
        };
        let reply = tokio::time::timeout(WRITE_TIMEOUT, nodes[&leader].raft.client_write(request))
            .await
            .unwrap_or_else(|_| panic!("batch {b} not committed within {WRITE_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("batch {b} failed: {e}; {addrs:?}"));
        assert!(
            matches!(reply.data, Response::Produced { count: 8, .. }),
            "batch {b}: {:?}",
            reply.data
        );
        acked.extend(messages);
    }
    let last = nodes[&leader].raft.metrics().borrow().last_log_index;
    let ctx = format!("TLS nodes {addrs:?}, leader {leader}");
    for (id, node) in &nodes {
        support::assert_holds_exactly(*id, &node.raft, &node.sm, last, &acked, WAIT, &ctx).await;
    }
    shut(nodes.into_values()).await;
}

/// Goal: three nodes with certificates from one CA (and the cluster secret) elect a
/// leader over TLS and every node holds every acknowledged message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_elects_a_leader_and_replicates() {
    let certs = tempfile::tempdir().unwrap();
    tokio::time::timeout(TEST_TIMEOUT, tls_cluster_replicates(certs.path()))
        .await
        .unwrap_or_else(|_| panic!("TLS cluster scenario not done within {TEST_TIMEOUT:?}"));
}

/// One node served over TLS with a certificate for `names`, from `ca`.
async fn serve_tls(ca: &Ca, dir: &Path, names: &[&str]) -> Node {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Arc::new(Config::default().validate().unwrap());
    let options = PeerServerOptions {
        secret: None,
        tls: Some(ca.tls(dir, "server", names, ca)),
    };
    start_node(1, listener, config, options).await
}

async fn client(addr: String, tls: Option<Arc<PeerTls>>) -> PeerClient {
    TcpNetwork::new(9)
        .with_tls(tls)
        .new_client(1, &BasicNode::new(addr))
        .await
}

async fn vote(client: &mut PeerClient, term: u64) -> Result<(), String> {
    let request = VoteRequest::new(Vote::new(term, 9), None);
    match tokio::time::timeout(WAIT, client.vote(request, RPCOption::new(WAIT))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            eprintln!("vote refused: {e}");
            Err(e.to_string())
        }
        Err(_) => panic!("vote not answered nor refused within {WAIT:?}"),
    }
}

/// Goal: the server refuses a client certificate from another CA; a client refuses a
/// server from another CA and a server certificate that does not name the dialled host;
/// the server keeps serving a right peer throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_another_ca_or_for_another_host_are_refused() {
    let logs = capture_logs();
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let (ca, other) = (Ca::new(dir, "cluster"), Ca::new(dir, "other"));
    let node = serve_tls(&ca, dir, &["127.0.0.1", "localhost"]).await;
    let addr = node.server.local_addr().to_string();

    let mut right = client(
        addr.clone(),
        Some(ca.tls(dir, "right", &["127.0.0.1"], &ca)),
    )
    .await;
    assert_eq!(
        vote(&mut right, 1).await,
        Ok(()),
        "right certificate ({addr})"
    );

    // Trusts the server, but shows a certificate the server's CA did not sign. With TLS
    // 1.3 the client's handshake completes before the server checks the certificate, so
    // the client sees the server's alert or, if it was already writing, a cut connection;
    // the server's log names the reason either way.
    let stranger = other.tls(dir, "stranger", &["127.0.0.1"], &ca);
    let mut stranger = client(addr.clone(), Some(stranger)).await;
    let err = vote(&mut stranger, 2).await.unwrap_err();
    if !err.contains("UnknownCA") {
        assert!(
            ["Broken pipe", "reset", "connection closed"]
                .iter()
                .any(|cut| err.contains(cut)),
            "foreign client certificate: {err} ({addr})"
        );
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
            if logged.contains("TLS handshake failed") && logged.contains("UnknownIssuer") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "foreign client certificate cut the connection ({err}) but the server did \
                 not log why:\n{logged}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    // Shows a right certificate, but trusts only another CA: the server is refused.
    let wary = ca.tls(dir, "wary", &["127.0.0.1"], &other);
    let mut wary = client(addr.clone(), Some(wary)).await;
    let err = vote(&mut wary, 3).await.unwrap_err();
    assert!(
        err.contains("UnknownIssuer"),
        "server from another CA: {err} ({addr})"
    );

    // The name rule: a server certificate for `localhost` only, dialled at 127.0.0.1.
    let named = serve_tls(&ca, dir, &["localhost"]).await;
    let port = named.server.local_addr().port();
    let tls = ca.tls(dir, "dialler", &["127.0.0.1"], &ca);
    let mut by_ip = client(format!("127.0.0.1:{port}"), Some(Arc::clone(&tls))).await;
    let err = vote(&mut by_ip, 4).await.unwrap_err();
    assert!(
        err.contains("not valid for name"),
        "host not in the SANs: {err}"
    );
    let mut by_name = client(format!("localhost:{port}"), Some(tls)).await;
    assert_eq!(vote(&mut by_name, 5).await, Ok(()), "host in the SANs");

    assert_eq!(vote(&mut right, 6).await, Ok(()), "still serving ({addr})");
    shut([node, named]).await;
}

/// Goal: a node's inter-node certificate renewed in place (files replaced by rename, as a
/// cert-manager secret or an ACME client does) is served from the next connection on,
/// without a restart. The first certificate names only `localhost`, so a peer dialling
/// 127.0.0.1 is refused; the renewed one names 127.0.0.1 too, and the same dial succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_from_the_next_connection_without_a_restart() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let ca = Ca::new(dir, "cluster");
    let node = serve_tls(&ca, dir, &["localhost"]).await;
    let addr = format!("127.0.0.1:{}", node.server.local_addr().port());
    let tls = ca.tls(dir, "dialler", &["127.0.0.1"], &ca);
    let mut before = client(addr.clone(), Some(Arc::clone(&tls))).await;
    let err = vote(&mut before, 1).await.unwrap_err();
    assert!(
        err.contains("not valid for name"),
        "before renewal, 127.0.0.1 is not in the SANs: {err} ({addr})"
    );

    let renewed = dir.join("renewed");
    std::fs::create_dir(&renewed).unwrap();
    let (cert, key) = ca.node(&renewed, "server", &["127.0.0.1", "localhost"]);
    replace_by_rename(&cert, &dir.join("server.pem"));
    replace_by_rename(&key, &dir.join("server-key.pem"));
    let mut after = client(addr.clone(), Some(tls)).await;
    assert_eq!(
        vote(&mut after, 2).await,
        Ok(()),
        "the renewed certificate names 127.0.0.1 ({addr})"
    );
    shut([node]).await;
}

/// Moves `new` over `old`, with a modification time one second past `old`'s so the
/// change is visible however coarse the file system's timestamps are.
fn replace_by_rename(new: &Path, old: &Path) {
    let stamp = std::fs::metadata(old).unwrap().modified().unwrap() + Duration::from_secs(1);
    let file = std::fs::File::options().write(true).open(new).unwrap();
    file.set_modified(stamp).unwrap();
    drop(file);
    std::fs::rename(new, old).unwrap();
}

/// Log lines, as the fmt subscriber writes them.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures this process's log lines (installed once; every test's lines land in it).
fn capture_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<LogBuffer> = OnceLock::new();
    let logs = LOGS.get_or_init(|| {
        let logs = LogBuffer::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        logs
    });
    Arc::clone(&logs.0)
}

/// Goal: a peer speaking plain TCP to a TLS peer server is refused, and the server keeps
/// serving TLS peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_tcp_peer_is_refused_by_a_tls_server_which_keeps_serving() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let ca = Ca::new(dir, "cluster");
    let node = serve_tls(&ca, dir, &["127.0.0.1"]).await;
    let addr = node.server.local_addr().to_string();

    let logs = capture_logs();
    let mut plain = client(addr.clone(), None).await;
    let err = vote(&mut plain, 1).await.unwrap_err();
    // The server drops the connection: seen as a close, or as a reset when the frame
    // was not read to its end.
    assert!(
        ["connection closed", "reset", "Broken pipe"]
            .iter()
            .any(|cut| err.contains(cut)),
        "plain TCP to a TLS server: {err} ({addr})"
    );
    // Again: the refusal does not depend on the server's state.
    assert!(
        vote(&mut plain, 2).await.is_err(),
        "plain TCP, twice ({addr})"
    );
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logged.contains("inter-node peer refused: TLS handshake failed")
            && logged.contains("peer=Some(127.0.0.1:"),
        "the refusal is logged with who and why:\n{logged}"
    );

    let tls = ca.tls(dir, "peer", &["127.0.0.1"], &ca);
    let mut peer = client(addr.clone(), Some(tls)).await;
    assert_eq!(vote(&mut peer, 3).await, Ok(()), "TLS peer after ({addr})");
    shut([node]).await;
}

/// Goal (issue 14.7): peers that drop the connection in the middle of the secret
/// handshake — a flaky network, a node restarting — are not logged as authentication
/// failures (that was a warning storm); a peer that skips the handshake still is, and
/// the server keeps serving the right one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_handshakes_are_not_authentication_failures() {
    use tokio::io::AsyncWriteExt;
    let logs = capture_logs();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Arc::new(Config::default().validate().unwrap());
    let options = PeerServerOptions {
        secret: secret(),
        tls: None,
    };
    let node = start_node(1, listener, config, options).await;
    let addr = node.server.local_addr().to_string();
    // Twenty connections cut in the middle of the handshake: a well-formed HELLO
    // (len 33, kind 0x10, version 1, a nonce), then gone before the PROOF.
    let mut hello = vec![33, 0, 0, 0, 0x10, 1];
    hello.extend_from_slice(&[7u8; 32]);
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(&hello).await.unwrap();
        drop(s);
    }
    // A peer that skips the handshake: a whole frame of another kind (len 0, kind 0x7e).
    let mut rogue = tokio::net::TcpStream::connect(&addr).await.unwrap();
    rogue.write_all(&[0, 0, 0, 0, 0x7e]).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut rogue, &mut answer),
    )
    .await;
    let mut good = TcpNetwork::new(9)
        .with_secret(secret())
        .new_client(1, &BasicNode::new(addr.clone()))
        .await;
    assert_eq!(
        vote(&mut good, 2).await,
        Ok(()),
        "the right secret is served"
    );
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let failures = logged
        .lines()
        .filter(|l| l.contains("authentication failed") && l.contains(&addr_port(&addr)))
        .count();
    let any_failures = logged
        .lines()
        .filter(|l| l.contains("inter-node peer refused: authentication failed"))
        .count();
    assert!(
        any_failures >= 1,
        "a peer skipping the handshake is logged as an authentication failure:\n{logged}"
    );
    assert!(
        any_failures <= 2 && failures <= 2,
        "interrupted handshakes logged as authentication failures ({any_failures}):\n{logged}"
    );
    shut([node]).await;
}

/// Goal: a dialer that gives up in the middle of the TLS handshake (openraft drops an RPC
/// past its timeout, 40 ms on a busy machine) is not logged as a refused peer, while a
/// peer that does not speak TLS still is. Method: connections that close their side
/// before or during a ClientHello, each waiting until the server has closed its side too
/// (so the server is done with it and logged), then one plain-text peer; the log lines
/// are told apart by the client's own port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_leaving_mid_handshake_is_not_a_refused_peer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let ca = Ca::new(dir, "cluster");
    let node = serve_tls(&ca, dir, &["127.0.0.1"]).await;
    let addr = node.server.local_addr().to_string();
    let logs = capture_logs();
    // Nothing at all; then the first bytes of a ClientHello record (handshake, TLS 1.0
    // record version, 512 bytes announced, 4 sent).
    let partial_hello: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
    let mut gone_ports = Vec::new();
    for sent in [&[][..], partial_hello] {
        for _ in 0..5 {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            gone_ports.push(s.local_addr().unwrap().port());
            s.write_all(sent).await.unwrap();
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let closed = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
            assert!(
                closed.is_ok(),
                "the server kept a half-closed handshake ({addr})"
            );
        }
    }
    let mut plain = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let plain_port = plain.local_addr().unwrap().port();
    plain.write_all(&[0, 0, 0, 0, 0x7e]).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, plain.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the server kept a plain-text peer ({addr})");

    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let refused = |port: u16| {
        logged.lines().any(|l| {
            l.contains("inter-node peer refused: TLS handshake failed")
                && l.contains(&format!("peer=Some(127.0.0.1:{port})"))
        })
    };
    assert!(
        refused(plain_port),
        "a plain-text peer is logged as refused:\n{logged}"
    );
    let warned: Vec<u16> = gone_ports.into_iter().filter(|&p| refused(p)).collect();
    assert!(
        warned.is_empty(),
        "dialers that left mid-handshake logged as refused peers (ports {warned:?}):\n{logged}"
    );
    shut([node]).await;
}

fn addr_port(addr: &str) -> String {
    addr.rsplit(':').next().unwrap_or_default().to_owned()
}
