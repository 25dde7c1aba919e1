//! Goal: a full disk is the producer's clear error, not the broker's end: a send that
//! cannot be stored is `rejected` with `amqp:resource-limit-exceeded`, every message
//! accepted before it is still delivered, and once consumers free space (acknowledged
//! segments are deleted) sends are accepted again.
//!
//! Method: the broker's data directory is a 3 MiB tmpfs (needs root and a container that
//! allows `mount`; otherwise the test says why it is skipped and passes) with 256 KiB
//! segments; a producer sends 16 KiB messages until one is rejected.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fe2o3_amqp::types::messaging::{Message, Outcome};
use fe2o3_amqp::types::primitives::Binary;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};

use crate::harness::BrokerProcess;

const BODY: usize = 16 * 1024;
const MAX_SENDS: usize = 400;

struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(size: &str) -> Result<SmallFs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(SmallFs(dir))
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).output();
    }
}

fn message(i: usize) -> Message<fe2o3_amqp::types::messaging::Data> {
    let mut body = vec![(i % 251) as u8; BODY];
    body[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Message::builder().data(Binary::from(body)).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_rejects_sends_keeps_what_was_accepted_and_recovers_when_space_is_freed() {
    let fs = match SmallFs::mount("3m") {
        Ok(fs) => fs,
        Err(reason) => {
            eprintln!("skipped: cannot create a size-limited file system: {reason}");
            return;
        }
    };
    let data = fs.path().join("data");
    let mut broker = BrokerProcess::start(
        &data,
        &["--segment-bytes", "262144", "--max-message-bytes", "65536"],
    );
    let mut conn = Connection::open("disk-full", broker.url().as_str())
        .await
        .unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut sender = Sender::attach(&mut session, "s", "q").await.unwrap();
    let mut accepted = 0;
    let mut refusal = None;
    for i in 0..MAX_SENDS {
        let outcome = tokio::time::timeout(Duration::from_secs(10), sender.send(message(i)))
            .await
            .unwrap()
            .unwrap();
        match outcome {
            Outcome::Accepted(_) => accepted += 1,
            Outcome::Rejected(r) => {
                refusal = Some(format!("{:?}", r.error));
                break;
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    let refusal = refusal.expect("the disk filled up within the bounded number of sends");
    assert!(
        refusal.contains("ResourceLimitExceeded") || refusal.contains("resource-limit-exceeded"),
        "{refusal}"
    );
    assert!(
        accepted > 20,
        "some messages fit before the disk filled: {accepted}"
    );

    let mut receiver = Receiver::attach(&mut session, "r", "q").await.unwrap();
    for i in 0..accepted {
        let d = tokio::time::timeout(
            Duration::from_secs(10),
            receiver
                .recv::<fe2o3_amqp::types::messaging::Body<fe2o3_amqp::types::primitives::Value>>(),
        )
        .await
        .expect("accepted message delivered")
        .unwrap();
        let fe2o3_amqp::types::messaging::Body::Data(batch) = d.body() else {
            panic!("data body expected")
        };
        assert_eq!(
            &batch[0].0[..8],
            &(i as u64).to_be_bytes(),
            "in order, intact"
        );
        receiver.accept(&d).await.unwrap();
    }

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut again = false;
    while std::time::Instant::now() < deadline {
        let outcome = sender.send(message(MAX_SENDS)).await.unwrap();
        if matches!(outcome, Outcome::Accepted(_)) {
            again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        again,
        "sends are accepted again once acknowledged segments are deleted"
    );
    let d = tokio::time::timeout(
        Duration::from_secs(10),
        receiver.recv::<fe2o3_amqp::types::messaging::Body<fe2o3_amqp::types::primitives::Value>>(),
    )
    .await
    .unwrap()
    .unwrap();
    receiver.accept(&d).await.unwrap();
    receiver.close().await.unwrap();
    sender.close().await.unwrap();
    conn.close().await.unwrap();
    broker.kill();
}
