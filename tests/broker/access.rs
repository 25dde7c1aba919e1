//! Manifests in force on a running broker: SASL PLAIN and SCRAM-SHA-256 against
//! MessagingUsers, authorization on attach, tenants chosen by hostname, and live re-apply.
//!
//! Goal: good passwords log in with PLAIN and SCRAM, wrong ones get a SASL auth failure;
//! a user attaches only where its rules allow, and a refusal is `amqp:unauthorized-access`
//! naming the address; the same address in two spaces is two queues; editing the
//! manifest directory adds addresses and revokes rights without a restart, a broken
//! edit changes nothing, and an address that still holds messages is not deleted.
//!
//! Method: the real binary with `--manifests` on a temporary directory, fe2o3-amqp
//! clients (its `scram` feature provides the SCRAM client). Waits for a re-apply poll
//! the metrics (bounded), never sleep for a fixed time and assume.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{ReceiverAttachError, SenderAttachError};
use fe2o3_amqp::sasl_profile::{SaslProfile, SaslScramSha256};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{AmqpError, ErrorCondition};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::time::timeout;

use crate::harness::BrokerProcess;

const WAIT: Duration = Duration::from_secs(10);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

fn hash(password: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .args(["hash-password", password])
        .output()
        .expect("hash-password");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn user(space: &str, name: &str, password: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: user.enmasse.io/v1beta1\nkind: MessagingUser\nmetadata: {{name: {space}.{name}}}\nspec:\n  username: {name}\n  authentication: {{type: password, passwordHash: \"{}\"}}\n  authorization: {rules}\n",
        hash(password)
    )
}

fn space(name: &str, anonymous: bool) -> String {
    format!("---\napiVersion: enmasse.io/v1beta1\nkind: AddressSpace\nmetadata: {{name: {name}}}\nspec: {{type: standard, plan: small, allowAnonymous: {anonymous}}}\n")
}

fn address(space: &str, address: &str) -> String {
    format!("---\napiVersion: enmasse.io/v1beta1\nkind: Address\nmetadata: {{name: {space}.{address}}}\nspec: {{address: {address}, type: queue, plan: small-queue}}\n")
}

const PLANS: &str = "\
apiVersion: admin.enmasse.io/v1beta2
kind: AddressSpacePlan
metadata: {name: small}
spec: {maxConnections: 100}
---
apiVersion: admin.enmasse.io/v1beta2
kind: AddressPlan
metadata: {name: small-queue}
spec: {maxDepth: 1000}
";

/// Space `app` (alice: send+recv on orders*, bob: send on orders) and space `other`
/// (carol: everything), both with an address `orders`.
fn base_users(bob_rules: &str) -> String {
    [
        user(
            "app",
            "alice",
            "alice-pw",
            "[{addresses: [\"orders*\"], operations: [send, recv]}]",
        ),
        user("app", "bob", "bob-pw", bob_rules),
        user(
            "other",
            "carol",
            "carol-pw",
            "[{addresses: [\"*\"], operations: [send, recv]}]",
        ),
    ]
    .concat()
}

fn write_manifests(dir: &Path, extra: &str, bob_rules: &str) {
    let text = [
        PLANS.to_owned(),
        space("app", false),
        space("other", false),
        address("app", "orders"),
        address("other", "orders"),
        base_users(bob_rules),
        extra.to_owned(),
    ]
    .concat();
    // Write beside and rename, as a git checkout or ConfigMap swap does.
    let tmp = dir.join(".manifests.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("manifests.yaml")).unwrap();
}

const BOB_SENDS: &str = "[{addresses: [orders], operations: [send]}]";

pub(crate) fn start(root: &Path) -> BrokerProcess {
    let manifests = root.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    write_manifests(&manifests, "", BOB_SENDS);
    let manifests = manifests.to_str().unwrap().to_owned();
    BrokerProcess::start(
        &root.join("data"),
        &["--manifests", &manifests, "--default-address-space", "app"],
    )
}

async fn open_as(
    broker: &BrokerProcess,
    host: &str,
    profile: impl Into<SaslProfile>,
) -> Result<ConnectionHandle<()>, fe2o3_amqp::connection::OpenError> {
    let url = broker.url();
    within(
        "open",
        Connection::builder()
            .container_id("access-test")
            .hostname(host)
            .sasl_hostname(host)
            .sasl_profile(profile)
            .open(url.as_str()),
    )
    .await
}

/// Sends `body` to `address` on a link of its own, waits for `accepted`, closes the link.
async fn send_one(s: &mut SessionHandle<()>, address: &str, body: &str) {
    let mut sender = within("attach", Sender::attach(s, "s", address))
        .await
        .unwrap();
    within("send", sender.send(body.to_owned()))
        .await
        .unwrap()
        .accepted_or_else(|o| o)
        .unwrap();
    within("close sender", sender.close()).await.unwrap();
}

fn plain(user: &str, password: &str) -> SaslProfile {
    SaslProfile::Plain {
        username: user.into(),
        password: password.into(),
    }
}

fn unauthorized() -> ErrorCondition {
    ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess)
}

/// Asserts that an open failed with the SASL outcome `auth` (code 1: wrong credentials),
/// not with some other failure that `is_err()` would accept just as well.
fn assert_sasl_auth_failed(
    opened: Result<ConnectionHandle<()>, fe2o3_amqp::connection::OpenError>,
    what: &str,
) {
    match opened {
        Ok(_) => panic!("{what}: the login succeeded"),
        Err(e) => assert!(
            matches!(
                e,
                fe2o3_amqp::connection::OpenError::SaslError {
                    code: fe2o3_amqp::types::sasl::SaslCode::Auth,
                    ..
                }
            ),
            "{what}: expected the SASL outcome auth, got {e:?}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_scram_logins_succeed_and_wrong_passwords_fail() {
    let root = tempfile::tempdir().unwrap();
    let broker = start(root.path());
    let mut conn = open_as(&broker, "app", plain("alice", "alice-pw"))
        .await
        .expect("PLAIN login");
    conn.close().await.unwrap();
    let mut conn = open_as(&broker, "app", SaslScramSha256::new("alice", "alice-pw"))
        .await
        .expect("SCRAM login");
    conn.close().await.unwrap();

    assert_sasl_auth_failed(
        open_as(&broker, "app", plain("alice", "wrong")).await,
        "PLAIN with a wrong password",
    );
    assert_sasl_auth_failed(
        open_as(&broker, "app", SaslScramSha256::new("alice", "wrong")).await,
        "SCRAM with a wrong password",
    );
    assert_sasl_auth_failed(
        open_as(&broker, "app", SaslScramSha256::new("nobody", "x")).await,
        "SCRAM unknown user",
    );
    // carol exists only in `other`.
    assert_sasl_auth_failed(
        open_as(&broker, "app", plain("carol", "carol-pw")).await,
        "user of another space",
    );
    // ANONYMOUS is not allowed in either space: the broker does not offer it among its
    // sasl-mechanisms, so fe2o3 gives up before sending an init.
    match open_as(&broker, "app", SaslProfile::Anonymous).await {
        Ok(_) => panic!("anonymous: the login succeeded"),
        Err(e) => assert!(
            matches!(&e, fe2o3_amqp::connection::OpenError::NotImplemented(Some(m))
                if m.contains("ANONYMOUS")),
            "anonymous: expected ANONYMOUS not to be offered, got {e:?}"
        ),
    }
    let logs = broker.drain_logs().join("\n");
    assert!(logs.contains("SASL authentication failed"), "{logs}");
    assert!(
        !logs.contains("alice-pw") && !logs.contains("wrong"),
        "a password was logged:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_allows_and_denies_send_and_recv_naming_the_address() {
    let root = tempfile::tempdir().unwrap();
    let broker = start(root.path());
    let mut conn = open_as(&broker, "app", plain("bob", "bob-pw"))
        .await
        .unwrap();
    let mut session = within("begin", Session::begin(&mut conn)).await.unwrap();
    let mut sender = within("attach", Sender::attach(&mut session, "s", "orders"))
        .await
        .expect("bob may send");
    within("send", sender.send("from bob"))
        .await
        .unwrap()
        .accepted_or_else(|o| o)
        .unwrap();
    let mut session2 = within("begin", Session::begin(&mut conn)).await.unwrap();
    let refused = within("attach", Receiver::attach(&mut session2, "r", "orders")).await;
    assert!(
        matches!(&refused, Err(ReceiverAttachError::RemoteClosedWithError(e))
            if e.condition == unauthorized() && e.description.as_deref().is_some_and(|d| d.contains("\"orders\""))),
        "{refused:?}"
    );
    let mut session3 = within("begin", Session::begin(&mut conn)).await.unwrap();
    let refused = within("attach", Sender::attach(&mut session3, "s2", "invoices")).await;
    assert!(
        matches!(&refused, Err(SenderAttachError::RemoteClosedWithError(e)) if e.condition == unauthorized()),
        "{refused:?}"
    );

    let mut conn = open_as(&broker, "app", plain("alice", "alice-pw"))
        .await
        .unwrap();
    let mut session = within("begin", Session::begin(&mut conn)).await.unwrap();
    let mut receiver = within("attach", Receiver::attach(&mut session, "r", "orders"))
        .await
        .expect("alice may recv");
    let d = within("recv", receiver.recv::<String>()).await.unwrap();
    assert_eq!(d.body(), "from bob");
    receiver.accept(&d).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_address_in_two_spaces_is_two_queues() {
    let root = tempfile::tempdir().unwrap();
    let broker = start(root.path());
    let mut app = open_as(&broker, "app", plain("alice", "alice-pw"))
        .await
        .unwrap();
    let mut s = within("begin", Session::begin(&mut app)).await.unwrap();
    send_one(&mut s, "orders", "for app").await;

    // carol logs in to `other` by hostname (and a host whose first label names it).
    let mut other = open_as(&broker, "other.example.com", plain("carol", "carol-pw"))
        .await
        .unwrap();
    let mut s = within("begin", Session::begin(&mut other)).await.unwrap();
    send_one(&mut s, "orders", "for other").await;
    let mut receiver = within("attach", Receiver::attach(&mut s, "r", "orders"))
        .await
        .unwrap();
    let d = within("recv", receiver.recv::<String>()).await.unwrap();
    assert_eq!(d.body(), "for other");
    receiver.accept(&d).await.unwrap();
    let nothing = timeout(Duration::from_millis(500), receiver.recv::<String>()).await;
    assert!(nothing.is_err(), "a message of space app leaked into other");
    let depth = broker.metric("entrepot_queue_depth{queue=\"app/orders\"}");
    assert_eq!(depth, Some(1.0));

    // carol's login is for `other`; opening `app` with it is refused.
    assert_sasl_auth_failed(
        open_as(&broker, "app", plain("carol", "carol-pw")).await,
        "carol in app",
    );
}

async fn wait_for_applies(broker: &BrokerProcess, series: &str, at_least: f64) {
    for _ in 0..100 {
        if broker.metric(series).is_some_and(|v| v >= at_least) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{series} never reached {at_least}; logs:\n{}",
        broker.drain_logs().join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_apply_live_and_broken_edits_change_nothing() {
    let root = tempfile::tempdir().unwrap();
    let broker = start(root.path());
    let dir = root.path().join("manifests");
    assert_eq!(broker.metric("entrepot_manifest_applies_total"), Some(1.0));

    // Add an address; alice's `orders*` covers it.
    write_manifests(&dir, &address("app", "orders-eu"), BOB_SENDS);
    wait_for_applies(&broker, "entrepot_manifest_applies_total", 2.0).await;
    let mut conn = open_as(&broker, "app", plain("alice", "alice-pw"))
        .await
        .unwrap();
    let mut s = within("begin", Session::begin(&mut conn)).await.unwrap();
    let mut sender = within("attach", Sender::attach(&mut s, "s", "orders-eu"))
        .await
        .expect("new address");
    within("send", sender.send("eu"))
        .await
        .unwrap()
        .accepted_or_else(|o| o)
        .unwrap();

    // A broken edit is rejected whole: bob keeps his right.
    std::fs::write(dir.join("broken.yaml"), "kind: Nonsense\n").unwrap();
    wait_for_applies(&broker, "entrepot_manifest_rejections_total", 1.0).await;
    let mut bob = open_as(&broker, "app", plain("bob", "bob-pw"))
        .await
        .unwrap();
    let mut s = within("begin", Session::begin(&mut bob)).await.unwrap();
    within("attach", Sender::attach(&mut s, "s", "orders"))
        .await
        .expect("unchanged after a broken edit");
    std::fs::remove_file(dir.join("broken.yaml")).unwrap();

    // Revoke bob's right: his next attach is refused, on the same connection.
    let applied = broker.metric("entrepot_manifest_applies_total").unwrap();
    write_manifests(&dir, &address("app", "orders-eu"), "[]");
    wait_for_applies(&broker, "entrepot_manifest_applies_total", applied + 1.0).await;
    let mut s = within("begin", Session::begin(&mut bob)).await.unwrap();
    let refused = within("attach", Sender::attach(&mut s, "s2", "orders")).await;
    assert!(
        matches!(&refused, Err(SenderAttachError::RemoteClosedWithError(e)) if e.condition == unauthorized()),
        "{refused:?}"
    );

    // Removing orders-eu while it holds a message is refused: the address stays.
    let applied = broker.metric("entrepot_manifest_applies_total").unwrap();
    write_manifests(&dir, "", "[]");
    wait_for_applies(&broker, "entrepot_manifest_applies_total", applied + 1.0).await;
    assert_eq!(
        broker.metric("entrepot_manifest_deletions_refused_total"),
        Some(1.0)
    );
    // The refusal is visible in `entrepot status` too.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .args(["status", "--http", &broker.http.to_string()])
        .output()
        .expect("run entrepot status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(text.contains("app/orders-eu (1 messages)"), "{text}");
    assert!(text.contains("deletions_refused: 1"), "{text}");
    let mut s = within("begin", Session::begin(&mut conn)).await.unwrap();
    let mut receiver = within("attach", Receiver::attach(&mut s, "r", "orders-eu"))
        .await
        .expect("kept");
    let d = within("recv", receiver.recv::<String>()).await.unwrap();
    assert_eq!(d.body(), "eu");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serviceaccount_user_logs_in_with_its_bearer_token_only() {
    let root = tempfile::tempdir().unwrap();
    let manifests = root.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let robot = "---\napiVersion: user.enmasse.io/v1beta1\nkind: MessagingUser\nmetadata: {name: app.robot}\nspec:\n  username: robot\n  authentication: {type: serviceaccount}\n  authorization: [{addresses: [orders], operations: [send, recv]}]\n";
    write_manifests(&manifests, robot, BOB_SENDS);
    let tokens = root.path().join("tokens.yaml");
    std::fs::write(&tokens, "\"s3cr3t-token\": robot\n").unwrap();
    let broker = BrokerProcess::start(
        &root.path().join("data"),
        &[
            "--manifests",
            manifests.to_str().unwrap(),
            "--default-address-space",
            "app",
            "--token-file",
            tokens.to_str().unwrap(),
        ],
    );
    let mut conn = open_as(&broker, "app", plain("robot", "s3cr3t-token"))
        .await
        .expect("the token logs in");
    let mut session = within("begin", Session::begin(&mut conn)).await.unwrap();
    let mut sender = within("attach", Sender::attach(&mut session, "s", "orders"))
        .await
        .expect("robot may send");
    within("send", sender.send("beep"))
        .await
        .unwrap()
        .accepted_or_else(|o| o)
        .unwrap();
    sender.close().await.unwrap();
    conn.close().await.unwrap();
    assert_sasl_auth_failed(
        open_as(&broker, "app", plain("robot", "wrong-token")).await,
        "a wrong token is refused",
    );
    assert_sasl_auth_failed(
        open_as(&broker, "app", plain("robot", "")).await,
        "an empty token is refused",
    );
}

/// Goal: a tenant's dead letters stay in its address space. A message rejected in space
/// `other` goes to `other/DLQ` — which carol reads by declaring `DLQ` in her space — with
/// the original address she knows (`orders`, not the internal `other/orders`), and never
/// to a broker-wide queue no tenant can reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_dead_letters_stay_in_its_space() {
    use fe2o3_amqp::types::messaging::annotations::OwnedKey;
    use fe2o3_amqp::types::primitives::{Symbol, Value};

    let root = tempfile::tempdir().unwrap();
    let manifests = root.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    write_manifests(&manifests, &address("other", "DLQ"), BOB_SENDS);
    let manifests = manifests.to_str().unwrap().to_owned();
    let broker = BrokerProcess::start(
        &root.path().join("data"),
        &["--manifests", &manifests, "--default-address-space", "app"],
    );
    let mut other = open_as(&broker, "other", plain("carol", "carol-pw"))
        .await
        .unwrap();
    let mut s = within("begin", Session::begin(&mut other)).await.unwrap();
    send_one(&mut s, "orders", "unprocessable").await;
    let mut receiver = within("attach", Receiver::attach(&mut s, "r", "orders"))
        .await
        .unwrap();
    let d = within("recv", receiver.recv::<String>()).await.unwrap();
    within("reject", receiver.reject(&d, None)).await.unwrap();

    let mut dlq = within("attach", Receiver::attach(&mut s, "dlq", "DLQ"))
        .await
        .unwrap();
    let dead = within("recv dead letter", dlq.recv::<String>())
        .await
        .unwrap();
    assert_eq!(dead.body(), "unprocessable");
    let original = dead.message().message_annotations.as_ref().and_then(|a| {
        a.0.get(&OwnedKey::Symbol(Symbol::from("x-opt-original-address")))
            .cloned()
    });
    assert_eq!(original, Some(Value::String("orders".into())));
    within("accept", dlq.accept(&dead)).await.unwrap();
    assert_eq!(
        broker.metric("entrepot_queue_depth{queue=\"DLQ\"}"),
        None,
        "the broker-wide dead-letter queue was used"
    );
}

/// The broker of [`start`], also serving amqps with one certificate for both spaces'
/// hostnames (`app.example.com`, `other.example.com`); returns the certificate.
fn start_with_tls(root: &Path) -> (BrokerProcess, CertificateDer<'static>) {
    let manifests = root.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    write_manifests(&manifests, "", BOB_SENDS);
    let names = vec!["app.example.com".to_owned(), "other.example.com".to_owned()];
    let ck = rcgen::generate_simple_self_signed(names).unwrap();
    let (cert, key) = (root.join("cert.pem"), root.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let broker = BrokerProcess::start(
        &root.join("data"),
        &[
            "--manifests",
            manifests.to_str().unwrap(),
            "--default-address-space",
            "app",
            "--listen-tls",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    (broker, ck.cert.der().clone())
}

/// Opens an AMQP connection over TLS whose SNI is `sni`, logging in as carol of space
/// `other` (the sasl-init hostname picks the space whose users are checked), with no
/// hostname in `open`: only the SNI can choose the connection's address space.
async fn open_over_tls_as_carol(
    broker: &BrokerProcess,
    cert: &CertificateDer<'static>,
    sni: &str,
) -> Result<ConnectionHandle<()>, fe2o3_amqp::connection::OpenError> {
    open_over_tls(broker, cert, sni, Some("other.example.com")).await
}

/// [`open_over_tls_as_carol`], with `sasl_host` as the sasl-init hostname (`None`: none).
async fn open_over_tls(
    broker: &BrokerProcess,
    cert: &CertificateDer<'static>,
    sni: &str,
    sasl_host: Option<&str>,
) -> Result<ConnectionHandle<()>, fe2o3_amqp::connection::OpenError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = within(
        "connect",
        tokio::net::TcpStream::connect(broker.amqps.expect("amqps listener")),
    )
    .await
    .unwrap();
    let tls = within(
        "TLS handshake",
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp),
    )
    .await
    .expect("TLS handshake");
    let builder = Connection::builder().container_id("sni-test");
    let builder = match sasl_host {
        Some(host) => builder.sasl_hostname(host),
        None => builder,
    };
    within(
        "open",
        builder
            .sasl_profile(plain("carol", "carol-pw"))
            .open_with_stream(tls),
    )
    .await
}

/// Goal: a client that names its space only by TLS SNI — no sasl-init hostname, no
/// `open` hostname — logs in against that space's users and works in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_sni_alone_chooses_the_space_of_the_login_too() {
    let root = tempfile::tempdir().unwrap();
    let (broker, cert) = start_with_tls(root.path());
    let mut conn = open_over_tls(&broker, &cert, "other.example.com", None)
        .await
        .expect("carol logs in to space other by SNI alone");
    let mut s = within("begin", Session::begin(&mut conn)).await.unwrap();
    send_one(&mut s, "orders", "by sni alone").await;
    within("end", s.end()).await.unwrap();
    within("close", conn.close()).await.unwrap();
    assert_eq!(
        broker.metric("entrepot_queue_depth{queue=\"other/orders\"}"),
        Some(1.0)
    );
}

/// Goal: with no hostname in `open`, the TLS SNI chooses the address space. carol (of
/// `other`) connecting with SNI `other.example.com` lands in `other` — her message goes
/// to `other/orders`; with SNI `app.example.com` the same login is refused with
/// `amqp:unauthorized-access`, because the SNI chose `app` (where she is no user).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_open_hostname_the_tls_sni_chooses_the_address_space() {
    let root = tempfile::tempdir().unwrap();
    let (broker, cert) = start_with_tls(root.path());
    let mut conn = open_over_tls_as_carol(&broker, &cert, "other.example.com")
        .await
        .expect("carol opens space other by SNI");
    let mut s = within("begin", Session::begin(&mut conn)).await.unwrap();
    send_one(&mut s, "orders", "by sni").await;
    within("end", s.end()).await.unwrap();
    within("close", conn.close()).await.unwrap();
    assert_eq!(
        broker.metric("entrepot_queue_depth{queue=\"other/orders\"}"),
        Some(1.0),
        "the message went to space other"
    );
    assert_ne!(
        broker.metric("entrepot_queue_depth{queue=\"app/orders\"}"),
        Some(1.0),
        "the message went to the default space app"
    );

    // The space is chosen after the broker's open, so the refusal is its close.
    let refusal = match open_over_tls_as_carol(&broker, &cert, "app.example.com").await {
        Ok(mut conn) => match within("close", conn.close()).await {
            Ok(()) => panic!("carol opened space app (chosen by SNI) and closed cleanly"),
            Err(fe2o3_amqp::connection::Error::RemoteClosedWithError(e)) => e,
            Err(e) => panic!("SNI app.example.com: expected a close with an error, got {e:?}"),
        },
        Err(fe2o3_amqp::connection::OpenError::RemoteClosedWithError(e)) => e,
        Err(e) => panic!("SNI app.example.com: expected a close with an error, got {e:?}"),
    };
    assert_eq!(
        refusal.condition,
        unauthorized(),
        "SNI app.example.com: {refusal:?}"
    );
}
