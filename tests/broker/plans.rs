//! Plans' limits in force on a running broker.
//!
//! Goal: an AddressPlan's `maxDepth` holds a producer back by credit until a consumer
//! makes room; `maxBytes` and the space plan's `maxStoredBytes` refuse what does not fit
//! with `amqp:resource-limit-exceeded` and a description; `maxMessageBytes` rejects one
//! message and the link keeps working; `maxConnections` closes the next connection with
//! `amqp:resource-limit-exceeded`; `maxAddresses` refuses the manifest set; a topic's
//! `retentionSecs` keeps messages for replay. Nothing is dropped silently: every message
//! sent is either accepted (and received) or refused with a reason.
//!
//! Method: the real binary with `--manifests` on a temporary directory holding one
//! address space (anonymous allowed) with small plans; fe2o3-amqp clients. "Held back"
//! is a send that has not completed after a quiet period and completes once room is
//! made. Every wait is bounded.

use std::path::Path;
use std::time::Duration;

use fe2o3_amqp::types::definitions::{AmqpError, ErrorCondition};
use fe2o3_amqp::types::messaging::{Outcome, Source};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use tokio::time::timeout;

use crate::harness::BrokerProcess;

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(700);

type Conn = fe2o3_amqp::connection::ConnectionHandle<()>;
type Sess = fe2o3_amqp::session::SessionHandle<()>;

/// Plans: `deep3` (3 messages), `bytes3k` (3000 bytes), `small-msg` (1000-byte
/// messages), `retained` (a topic kept an hour), `free` (no limits); space `app` on plan
/// `tight` (2 connections, 2500 stored bytes) unless `space_plan` says otherwise.
fn manifests(space_plan: &str, addresses: &[(&str, &str, &str)]) -> String {
    let mut text = String::from(
        "\
apiVersion: admin.enmasse.io/v1beta2
kind: AddressSpacePlan
metadata: {name: tight}
spec: {maxConnections: 2, maxStoredBytes: 2500, maxAddresses: 10}
---
apiVersion: admin.enmasse.io/v1beta2
kind: AddressSpacePlan
metadata: {name: roomy}
spec: {maxAddresses: 10}
---
apiVersion: admin.enmasse.io/v1beta2
kind: AddressPlan
metadata: {name: deep3}
spec: {maxDepth: 3}
---
apiVersion: admin.enmasse.io/v1beta2
kind: AddressPlan
metadata: {name: bytes3k}
spec: {maxBytes: 3000}
---
apiVersion: admin.enmasse.io/v1beta2
kind: AddressPlan
metadata: {name: small-msg}
spec: {maxMessageBytes: 1000}
---
apiVersion: admin.enmasse.io/v1beta2
kind: AddressPlan
metadata: {name: retained}
spec: {retentionSecs: 3600}
---
apiVersion: admin.enmasse.io/v1beta2
kind: AddressPlan
metadata: {name: free}
spec: {}
",
    );
    text.push_str(&format!(
        "---\napiVersion: enmasse.io/v1beta1\nkind: AddressSpace\nmetadata: {{name: app}}\nspec: {{type: standard, plan: {space_plan}, allowAnonymous: true}}\n"
    ));
    for (address, kind, plan) in addresses {
        text.push_str(&format!(
            "---\napiVersion: enmasse.io/v1beta1\nkind: Address\nmetadata: {{name: app.{address}}}\nspec: {{address: {address}, type: {kind}, plan: {plan}}}\n"
        ));
    }
    text
}

fn start(root: &Path, space_plan: &str, addresses: &[(&str, &str, &str)]) -> BrokerProcess {
    let dir = root.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("app.yaml"), manifests(space_plan, addresses)).unwrap();
    BrokerProcess::start(&root.join("data"), &["--manifests", dir.to_str().unwrap()])
}

async fn open(broker: &BrokerProcess) -> Result<Conn, fe2o3_amqp::connection::OpenError> {
    timeout(
        WAIT,
        Connection::builder()
            .container_id("plans-test")
            .hostname("app")
            .open(broker.url().as_str()),
    )
    .await
    .expect("open in time")
}

async fn connect(broker: &BrokerProcess) -> (Conn, Sess) {
    let mut conn = open(broker).await.expect("open");
    let session = timeout(WAIT, Session::begin(&mut conn))
        .await
        .expect("begin in time")
        .expect("begin");
    (conn, session)
}

async fn sender(s: &mut Sess, address: &str) -> Sender {
    timeout(WAIT, Sender::attach(s, format!("to-{address}"), address))
        .await
        .expect("attach in time")
        .expect("attach sender")
}

async fn receiver(s: &mut Sess, address: &str) -> Receiver {
    timeout(
        WAIT,
        Receiver::attach(s, format!("from-{address}"), address),
    )
    .await
    .expect("attach in time")
    .expect("attach receiver")
}

async fn send(sender: &mut Sender, body: String) -> Outcome {
    timeout(WAIT, sender.send(body))
        .await
        .expect("send settled in time")
        .expect("send")
}

fn limit_exceeded() -> ErrorCondition {
    ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded)
}

/// The rejection's description, if `outcome` is `rejected` with resource-limit-exceeded.
fn refused(outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::Rejected(r) => r
            .error
            .as_ref()
            .filter(|e| e.condition == limit_exceeded())
            .and_then(|e| e.description.clone()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_holds_its_producer_back_by_credit_until_a_consumer_makes_room() {
    let root = tempfile::tempdir().unwrap();
    let broker = start(root.path(), "roomy", &[("jobs", "queue", "deep3")]);
    let (_c, mut s) = connect(&broker).await;
    let mut tx = sender(&mut s, "jobs").await;
    for i in 0..3 {
        assert!(matches!(
            send(&mut tx, format!("job {i}")).await,
            Outcome::Accepted(_)
        ));
    }
    // The fourth waits for credit: the queue holds its plan's 3 messages.
    let fourth = tokio::spawn(async move {
        let outcome = tx.send("job 3".to_string()).await;
        (tx, outcome)
    });
    tokio::time::sleep(QUIET).await;
    assert!(
        !fourth.is_finished(),
        "a producer to a full queue got credit"
    );
    assert_eq!(
        broker.metric("entrepot_queue_depth{queue=\"app/jobs\"}"),
        Some(3.0)
    );

    let (_c2, mut s2) = connect(&broker).await;
    let mut rx = receiver(&mut s2, "jobs").await;
    let d = timeout(WAIT, rx.recv::<String>()).await.unwrap().unwrap();
    assert_eq!(d.body(), "job 0");
    rx.accept(&d).await.unwrap();
    let (_tx, outcome) = timeout(WAIT, fourth).await.expect("room made").unwrap();
    assert!(matches!(outcome, Ok(Outcome::Accepted(_))), "{outcome:?}");
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = timeout(WAIT, rx.recv::<String>()).await.unwrap().unwrap();
        got.push(d.body().clone());
        rx.accept(&d).await.unwrap();
    }
    assert_eq!(got, ["job 1", "job 2", "job 3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_plans_size_is_rejected_and_the_link_keeps_working() {
    let root = tempfile::tempdir().unwrap();
    let broker = start(root.path(), "roomy", &[("small", "queue", "free")]);
    let (_c, mut s) = connect(&broker).await;
    let mut tx = sender(&mut s, "small").await;
    // The plan changes under an attached sender (a live re-apply), so the client does not
    // know the new max-message-size from the attach and the broker must refuse.
    let dir = root.path().join("manifests");
    let tmp = dir.join(".app.yaml.tmp");
    std::fs::write(&tmp, manifests("roomy", &[("small", "queue", "small-msg")])).unwrap();
    std::fs::rename(&tmp, dir.join("app.yaml")).unwrap();
    for _ in 0..100 {
        if broker.metric("entrepot_manifest_applies_total") == Some(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(broker.metric("entrepot_manifest_applies_total"), Some(2.0));
    let outcome = send(&mut tx, "x".repeat(2000)).await;
    let description = refused(&outcome).unwrap_or_else(|| panic!("{outcome:?}"));
    assert!(
        description.contains("exceeds the maximum of 1000 bytes")
            && description.contains("app/small"),
        "{description}"
    );
    assert!(matches!(
        send(&mut tx, "fits".into()).await,
        Outcome::Accepted(_)
    ));
    let mut rx = receiver(&mut s, "small").await;
    let d = timeout(WAIT, rx.recv::<String>()).await.unwrap().unwrap();
    assert_eq!(d.body(), "fits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_and_max_stored_bytes_refuse_what_does_not_fit() {
    let root = tempfile::tempdir().unwrap();
    let broker = start(
        root.path(),
        "tight",
        &[
            ("blobs", "queue", "bytes3k"),
            ("a", "queue", "free"),
            ("b", "queue", "free"),
        ],
    );
    let (_c, mut s) = connect(&broker).await;
    // The space holds 2500 bytes: two 1000-byte messages fit, the third does not, in
    // whichever queue of the space it is sent to.
    let mut to_a = sender(&mut s, "a").await;
    let mut to_b = sender(&mut s, "b").await;
    assert!(matches!(
        send(&mut to_a, "a".repeat(1000)).await,
        Outcome::Accepted(_)
    ));
    assert!(matches!(
        send(&mut to_b, "b".repeat(1000)).await,
        Outcome::Accepted(_)
    ));
    let outcome = send(&mut to_a, "a".repeat(1000)).await;
    let description = refused(&outcome).unwrap_or_else(|| panic!("{outcome:?}"));
    assert!(
        description.contains("address space \"app\" is full"),
        "{description}"
    );
    // Consuming frees the space's bytes.
    let mut rx = receiver(&mut s, "b").await;
    let d = timeout(WAIT, rx.recv::<String>()).await.unwrap().unwrap();
    rx.accept(&d).await.unwrap();
    let mut accepted = false;
    for _ in 0..50 {
        match send(&mut to_a, "a".repeat(1000)).await {
            Outcome::Accepted(_) => {
                accepted = true;
                break;
            }
            other => assert!(refused(&other).is_some(), "{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted, "the space's bytes were not freed by consuming");
    drop(rx);
    drop(to_a);
    drop(to_b);
    drop(s);
    drop(_c);

    // maxBytes of one queue (3000) with a space of its own.
    let root = tempfile::tempdir().unwrap();
    let broker = start(root.path(), "roomy", &[("blobs", "queue", "bytes3k")]);
    let (_c, mut s) = connect(&broker).await;
    let mut tx = sender(&mut s, "blobs").await;
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        outcomes.push(send(&mut tx, "z".repeat(1000)).await);
    }
    let accepted = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Accepted(_)))
        .count();
    assert_eq!(accepted, 2, "{outcomes:?}");
    let description = refused(&outcomes[2]).unwrap_or_else(|| panic!("{outcomes:?}"));
    assert!(
        description.contains("maximum of 3000 bytes"),
        "{description}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_over_the_space_plans_limit_is_closed_with_resource_limit_exceeded() {
    let root = tempfile::tempdir().unwrap();
    let broker = start(root.path(), "tight", &[("a", "queue", "free")]);
    let (mut first, _s1) = connect(&broker).await;
    let (_second, _s2) = connect(&broker).await;
    let third = open(&broker).await;
    let refused_with = match third {
        Err(fe2o3_amqp::connection::OpenError::RemoteClosedWithError(e)) => Some(e),
        Err(other) => panic!("{other:?}"),
        // The broker's open came first; its close follows at once.
        Ok(mut conn) => match conn.close().await {
            Err(fe2o3_amqp::connection::Error::RemoteClosedWithError(e)) => Some(e),
            other => panic!("third connection was not refused: {other:?}"),
        },
    };
    let e = refused_with.unwrap();
    assert_eq!(e.condition, limit_exceeded());
    assert!(
        e.description
            .as_deref()
            .is_some_and(|d| d.contains("maximum of 2 connections")),
        "{e:?}"
    );
    // Closing one frees its slot.
    first.close().await.unwrap();
    let mut reopened = None;
    for _ in 0..50 {
        if let Ok(mut c) = open(&broker).await {
            if timeout(WAIT, Session::begin(&mut c)).await.unwrap().is_ok() {
                reopened = Some(c);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reopened.is_some(),
        "a closed connection's slot was not freed"
    );
}

#[test]
fn a_set_over_max_addresses_is_refused_naming_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let text = manifests("roomy", &[]).replace("maxAddresses: 10", "maxAddresses: 2")
        + &["one", "two", "three"]
            .iter()
            .map(|a| format!("---\napiVersion: enmasse.io/v1beta1\nkind: Address\nmetadata: {{name: app.{a}}}\nspec: {{address: {a}, type: queue, plan: free}}\n"))
            .collect::<String>();
    std::fs::write(dir.path().join("app.yaml"), text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .arg("validate")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("address \"three\" is over the limit of address space \"app\": its plan \"roomy\" has maxAddresses 2, 3 are declared"),
        "{stderr}"
    );
}

#[test]
fn the_address_types_example_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/address-types");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .arg("validate")
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 address spaces, 4 addresses"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topics_retention_keeps_messages_for_replay() {
    let root = tempfile::tempdir().unwrap();
    let broker = start(root.path(), "roomy", &[("history", "topic", "retained")]);
    let (_c, mut s) = connect(&broker).await;
    let mut tx = sender(&mut s, "history").await;
    for i in 0..3 {
        assert!(matches!(
            send(&mut tx, format!("h{i}")).await,
            Outcome::Accepted(_)
        ));
    }
    let source = Source::builder()
        .address("history")
        .add_to_filter_using_legacy_format("entrepot:offset-spec", Value::String("first".into()))
        .build();
    let mut rx = timeout(
        WAIT,
        Receiver::builder()
            .name("replay")
            .source(source)
            .attach(&mut s),
    )
    .await
    .unwrap()
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = timeout(WAIT, rx.recv::<String>())
            .await
            .expect("replayed")
            .unwrap();
        got.push(d.body().clone());
        rx.accept(&d).await.unwrap();
    }
    assert_eq!(got, ["h0", "h1", "h2"]);
}
