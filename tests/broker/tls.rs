//! The amqps listener: TLS with certificates from files, reloaded when they change.
//!
//! Goal: a client that trusts the broker's certificate completes TLS and the AMQP header
//! exchange on the amqps port; python-qpid-proton sends and receives over it; after the
//! certificate files are replaced, the next connection is served the new certificate
//! without a restart.
//!
//! Method: self-signed certificates for `localhost` generated in the test with rcgen; a
//! tokio-rustls client (ring provider) for the raw checks, and a short proton script.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::harness::BrokerProcess;

const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";

/// Writes a fresh self-signed certificate and key for `localhost` (`cert.pem`, `key.pem`
/// in `dir`); returns the cert DER. Also used by the cluster's amqps test.
pub fn write_cert(dir: &Path) -> CertificateDer<'static> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    // Write beside and rename so the broker never reads a half-written file.
    std::fs::write(dir.join("key.tmp"), ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("cert.tmp"), ck.cert.pem()).unwrap();
    std::fs::rename(dir.join("key.tmp"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.tmp"), dir.join("cert.pem")).unwrap();
    ck.cert.der().clone()
}

fn start(root: &Path) -> BrokerProcess {
    let (cert, key) = (root.join("cert.pem"), root.join("key.pem"));
    BrokerProcess::start(
        &root.join("data"),
        &[
            "--listen-tls",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
}

/// Completes TLS with the amqps listener at `addr` as `localhost` (the SNI), trusting
/// only `cert`; bounded by 5 s. Also used by the cluster's amqps test.
pub async fn connect_tls(
    addr: std::net::SocketAddr,
    cert: &CertificateDer<'static>,
) -> TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connect = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp);
    tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .unwrap()
        .expect("TLS handshake")
}

/// Connects over TLS trusting `cert`, swaps AMQP headers, returns the server's cert.
async fn tls_header_exchange(
    broker: &BrokerProcess,
    cert: &CertificateDer<'static>,
) -> CertificateDer<'static> {
    let mut tls = connect_tls(broker.amqps.expect("amqps listener"), cert).await;
    tls.write_all(&AMQP_HEADER).await.unwrap();
    let mut reply = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, AMQP_HEADER);
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_serves_the_certificate_and_reloads_it_when_the_files_change() {
    let root = tempfile::tempdir().unwrap();
    let first = write_cert(root.path());
    let broker = start(root.path());
    assert_eq!(tls_header_exchange(&broker, &first).await, first);

    // mtime granularity: make sure the replacement is seen as a change.
    std::thread::sleep(Duration::from_millis(20));
    let second = write_cert(root.path());
    assert_ne!(first, second);
    assert_eq!(
        tls_header_exchange(&broker, &second).await,
        second,
        "certificate not reloaded"
    );
}

const PROTON_TLS: &str = r#"
import sys
from proton import Message, SSLDomain
from proton.utils import BlockingConnection
url, ca = sys.argv[1], sys.argv[2]
domain = SSLDomain(SSLDomain.MODE_CLIENT)
domain.set_trusted_ca_db(ca)
domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
conn = BlockingConnection(url, ssl_domain=domain, timeout=20, allowed_mechs="ANONYMOUS")
sender = conn.create_sender("tls-q")
sender.send(Message(body="over tls"))
receiver = conn.create_receiver("tls-q")
msg = receiver.receive(timeout=20)
receiver.accept()
assert msg.body == "over tls", msg.body
conn.close()
print("ok")
"#;

#[test]
fn proton_sends_and_receives_over_amqps() {
    let root = tempfile::tempdir().unwrap();
    write_cert(root.path());
    let broker = start(root.path());
    let port = broker.amqps.expect("amqps listener").port();
    let out = Command::new("python3")
        .args(["-c", PROTON_TLS, &format!("amqps://localhost:{port}")])
        .arg(root.path().join("cert.pem"))
        .output()
        .expect("run python3");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "proton over TLS failed:\nstdout: {}\nstderr: {}\nbroker:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        broker.drain_logs().join("\n")
    );
}
