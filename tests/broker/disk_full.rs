//! Goal: a full disk is the producer's clear error, not the broker's end, and never costs
//! a consumer's acknowledgement.
//!
//! * A send that cannot be stored is `rejected` with `amqp:resource-limit-exceeded`, every
//!   message accepted before it is still delivered, `/readyz` says `disk full` until
//!   consumers free space (acknowledged segments are deleted), then sends are accepted again.
//! * The message log stops at a reserve it leaves for the ack log, so the acknowledgements
//!   that free space can always be recorded. When something else takes that reserve too,
//!   an acknowledgement the broker cannot record is never reported as settled: the
//!   consumer's link is detached with `amqp:resource-limit-exceeded`, the message is
//!   delivered again, and after a SIGKILL nothing the broker settled comes back and
//!   nothing unacknowledged is lost.
//! * A rejection whose move to the dead-letter address the full disk refuses is treated
//!   the same way: the link is detached with the reason, the message delivered again.
//!
//! Method: the broker's data directory is a small tmpfs (needs root and a container that
//! allows `mount`; otherwise the test fails with the reason, unless
//! `ENTREPOT_TEST_ALLOW_SKIP=1` is set for a local run, when it says why and returns). The
//! raw client fills it with small messages until one is rejected, a filler file then takes
//! every block left (another process eating the disk), and a raw consumer drains — in
//! receiver-settle-mode `second`, and once settling first — while holding back a few
//! messages in every segment, so no segment is freed before the ack log needs its next
//! segment.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fe2o3_amqp::types::definitions::{AmqpError, ErrorCondition, ReceiverSettleMode, Role};
use fe2o3_amqp::types::messaging::{
    Accepted as AcceptedState, DeliveryState, Message, Outcome, Rejected,
};
use fe2o3_amqp::types::performatives::{Disposition, Performative};
use fe2o3_amqp::types::primitives::Binary;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};

use crate::harness::BrokerProcess;
use crate::raw_client::{data_message, Client};

const BODY: usize = 16 * 1024;
const MAX_SENDS: usize = 400;
/// Every wait on the broker is bounded by this.
const STEP: Duration = Duration::from_secs(20);

/// Broker flags of the acknowledgement scenario: 128 KiB segments, so the reserve is
/// 3 × 128 KiB + 1 MiB and one ack segment holds ~4,200 acknowledgements.
const SMALL_SEGMENTS: [&str; 4] = ["--segment-bytes", "131072", "--max-message-bytes", "16384"];
/// Body of each message of the acknowledgement scenario (its first 8 bytes are its seq).
const SMALL_BODY: usize = 256;
/// The consumer holds back every message whose seq is a multiple of this (a few in every
/// segment) until the ack log has refused, so no segment can be reclaimed before.
const HOLD_EVERY: u64 = 64;
/// The last messages produced are never accepted: they must survive the SIGKILL.
const NEVER_ACCEPTED: u64 = 5;
/// Credit the raw consumer keeps open.
const CREDIT: u32 = 200;

/// A size-limited tmpfs, unmounted on drop (also used by the fault campaign and by
/// `cluster_groups_disk_full`, which mounts one at a cluster node's data directory).
pub(crate) struct SmallFs {
    path: PathBuf,
    /// The temporary mount point, when [`SmallFs::mount`] made one (removed after the
    /// unmount); `None` for [`SmallFs::mount_at`], whose directory is the caller's.
    _dir: Option<tempfile::TempDir>,
}

impl SmallFs {
    /// A tmpfs of `size` (`mount -o size=`, e.g. `3m`) on a new temporary directory.
    pub(crate) fn mount(size: &str) -> Result<SmallFs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut fs = SmallFs::mount_at(dir.path(), size)?;
        fs._dir = Some(dir);
        Ok(fs)
    }

    /// A tmpfs of `size` on `path` (created if missing; left in place after the unmount).
    pub(crate) fn mount_at(path: &Path, size: &str) -> Result<SmallFs, String> {
        fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(SmallFs {
            path: path.to_path_buf(),
            _dir: None,
        })
    }

    /// The tmpfs, or `None` when it cannot be mounted and `ENTREPOT_TEST_ALLOW_SKIP=1`
    /// allows a skip (a local run without root). CI runs as root: there a failed mount
    /// fails the test instead of passing it unseen.
    fn mount_or_skip(size: &str) -> Option<SmallFs> {
        SmallFs::or_skip("disk_full", SmallFs::mount(size))
    }

    /// [`SmallFs::mount_at`], or `None` as [`SmallFs::mount_or_skip`] says, for `test`.
    pub(crate) fn mount_at_or_skip(test: &str, path: &Path, size: &str) -> Option<SmallFs> {
        SmallFs::or_skip(test, SmallFs::mount_at(path, size))
    }

    fn or_skip(test: &str, mounted: Result<SmallFs, String>) -> Option<SmallFs> {
        match mounted {
            Ok(fs) => Some(fs),
            Err(reason) => {
                crate::requirement::skip_or_fail(
                    test,
                    &format!("cannot mount a size-limited tmpfs (needs root): {reason}"),
                );
                None
            }
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// Tries of a plain unmount, [`UMOUNT_PAUSE`] apart, before a lazy one.
const UMOUNT_TRIES: u32 = 20;
const UMOUNT_PAUSE: Duration = Duration::from_millis(50);

impl Drop for SmallFs {
    /// Unmounts, waiting out a broker process that still holds a file open on it (a
    /// plain `umount` then fails "target is busy" and left the tmpfs mounted under
    /// `target/tmp`, which a later `rm -rf` of the tree cannot remove); a lazy unmount
    /// if it stays busy.
    fn drop(&mut self) {
        let unmounted = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(&self.path)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        for _ in 0..UMOUNT_TRIES {
            if unmounted(false) {
                return;
            }
            std::thread::sleep(UMOUNT_PAUSE);
        }
        let _ = unmounted(true);
    }
}

fn message(i: usize) -> Message<fe2o3_amqp::types::messaging::Data> {
    let mut body = vec![(i % 251) as u8; BODY];
    body[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Message::builder().data(Binary::from(body)).build()
}

/// `/readyz`: (ready, body).
fn readyz(broker: &BrokerProcess) -> (bool, String) {
    let (status, body) = broker.http_get("/readyz");
    (status.contains("200"), body)
}

/// Polls `/readyz` until it reports `ready`; panics with its last body after [`STEP`].
fn wait_ready(broker: &BrokerProcess, ready: bool) -> String {
    let deadline = Instant::now() + STEP;
    loop {
        let (now, body) = readyz(broker);
        if now == ready {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz still {now} ({body:?})");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_rejects_sends_keeps_what_was_accepted_and_recovers_when_space_is_freed() {
    let Some(fs) = SmallFs::mount_or_skip("3m") else {
        return;
    };
    let data = fs.path().join("data");
    let mut broker = BrokerProcess::start(
        &data,
        &["--segment-bytes", "262144", "--max-message-bytes", "65536"],
    );
    assert!(readyz(&broker).0, "ready before the disk fills");
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
    let (ready, body) = readyz(&broker);
    assert!(!ready && body.contains("disk full"), "/readyz: {body:?}");
    assert_eq!(broker.metric("entrepot_disk_full "), Some(1.0));

    // fe2o3's receiver settles first: the settle-first drain.
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
    wait_ready(&broker, true);
    assert_eq!(broker.metric("entrepot_disk_full "), Some(0.0));

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_the_broker_cannot_record_is_never_settled_and_the_message_comes_back() {
    ack_scenario(ReceiverSettleMode::Second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blind_ack_the_broker_cannot_record_brings_the_message_back() {
    ack_scenario(ReceiverSettleMode::First).await;
}

/// A rejection the broker cannot move to the dead-letter address (the disk is full) is
/// neither reported settled nor left hanging: the consumer's link is detached with
/// `amqp:resource-limit-exceeded` naming the failed move, and the message is delivered
/// again on the consumer's next link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_that_cannot_be_dead_lettered_detaches_the_consumer_and_comes_back() {
    let Some(tmpfs) = SmallFs::mount_or_skip("4m") else {
        return;
    };
    let data = tmpfs.path().join("data");
    let broker = BrokerProcess::start(&data, &SMALL_SEGMENTS);
    let mut producer = Client::open(broker.amqp).await.expect("connect");
    let produced = step(produce_until_refused(&mut producer)).await;
    assert!(produced > 0, "some messages stored before the disk filled");

    let mut client = Client::open(broker.amqp).await.expect("connect");
    client
        .attach_receiver_settling(0, 0, "reject", QUEUE, ReceiverSettleMode::Second)
        .await;
    client.flow(0, 0, 1, false).await;
    let (id, seq) = step(next_delivery(&mut client)).await;
    let reject = Disposition {
        role: Role::Receiver,
        first: id,
        last: None,
        settled: false,
        state: Some(DeliveryState::Rejected(Rejected { error: None })),
        batchable: false,
    };
    client
        .send_on(0, &Performative::Disposition(reject), &[])
        .await;
    let detach = step(async {
        loop {
            match client.next_frame().await.performative {
                Performative::Detach(d) if d.handle.0 == 0 => return d,
                Performative::Disposition(d) if d.role == Role::Sender => {
                    panic!("a rejection the broker could not dead-letter was settled: {d:?}")
                }
                _ => {}
            }
        }
    })
    .await;
    let error = detach.error.expect("a detach with the reason");
    let text = format!("{error:?}");
    assert!(
        matches!(
            error.condition,
            ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded)
        ) && text.contains("dead-letter"),
        "the consumer learns why: {text}"
    );
    eprintln!(
        "rejection of seq {seq} refused: {}",
        error.description.unwrap_or_default()
    );

    client
        .attach_receiver_settling(0, 1, "reject-again", QUEUE, ReceiverSettleMode::Second)
        .await;
    client.flow(1, 0, 1, false).await;
    let (_, again) = step(next_delivery(&mut client)).await;
    assert_eq!(
        again, seq,
        "the message whose move failed is delivered again first"
    );
}

/// The next transfer's delivery id and seq.
async fn next_delivery(client: &mut Client) -> (u32, u64) {
    loop {
        let f = client.next_frame().await;
        if let Performative::Transfer(t) = f.performative {
            return (
                t.delivery_id.expect("a first transfer frame"),
                seq_of(&f.payload),
            );
        }
    }
}

/// See the module docs; `mode` is the consumer's receiver-settle-mode.
async fn ack_scenario(mode: ReceiverSettleMode) {
    let Some(tmpfs) = SmallFs::mount_or_skip("4m") else {
        return;
    };
    let data = tmpfs.path().join("data");
    let mut broker = BrokerProcess::start(&data, &SMALL_SEGMENTS);
    assert!(readyz(&broker).0, "ready before the disk fills");

    // 1. Fill the disk with messages until the store refuses one.
    let mut producer = Client::open(broker.amqp).await.expect("connect");
    let produced = step(produce_until_refused(&mut producer)).await;
    assert!(
        produced > 5_000,
        "more messages than one ack segment has acknowledgements: {produced}"
    );
    let body = wait_ready(&broker, false);
    assert!(body.contains("disk full"), "/readyz: {body:?}");
    assert_eq!(broker.metric("entrepot_disk_full "), Some(1.0));
    eprintln!("{produced} messages stored; /readyz: {}", body.trim());

    // 2. Something else takes every block left, the reserve included.
    let crumbs = take_every_block(tmpfs.path());
    let never: HashSet<u64> = (produced - NEVER_ACCEPTED..produced).collect();
    let mut consumer = Consumer::attach(broker.amqp, 0, mode.clone()).await;
    let held = |seq: u64| seq % HOLD_EVERY == 0 || never.contains(&seq);
    let detach = tokio::time::timeout(STEP * 3, consumer.drain_until_detached(&held))
        .await
        .expect("the broker detaches a consumer whose acknowledgement it cannot record");
    let text = format!("{detach:?}");
    assert!(
        matches!(
            detach.condition,
            ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded)
        ) && text.contains("disk full"),
        "the consumer learns why: {text}"
    );
    let refused = broker
        .metric("entrepot_acks_refused_total ")
        .expect("refusals are counted");
    assert!(refused >= 1.0, "{refused} refused acks");
    eprintln!(
        "{} settled, {} delivered before the ack log refused ({refused} refused): {}",
        consumer.settled.len(),
        consumer.received,
        detach.description.unwrap_or_default()
    );
    // Settlements of acceptances recorded before the refusal still come, after the detach.
    step(consumer.drain_until_quiet(&held)).await;
    consumer.client.detach(0).await;

    // 3. The operator frees the space; a new link drains everything but the last few.
    for c in &crumbs {
        fs::remove_file(c).expect("remove filler");
    }
    consumer.reattach(1).await;
    let want = produced - NEVER_ACCEPTED;
    let all_settled =
        |c: &Consumer| c.settled.len() as u64 >= want && (0..want).all(|s| c.settled.contains(&s));
    let drained = consumer
        .drain_until(&all_settled, &|s| never.contains(&s))
        .await;
    let missing: Vec<u64> = (0..want)
        .filter(|s| !consumer.settled.contains(s))
        .collect();
    assert!(
        drained,
        "{} messages never settled, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    // Late settlements and redeliveries of what the first link left unsettled.
    step(consumer.drain_until_quiet(&|s| never.contains(&s))).await;
    assert_eq!(consumer.settled.len() as u64, want, "nothing else consumed");
    if mode == ReceiverSettleMode::First {
        // The consumer's blind acknowledgement the broker refused did not stick: that
        // message came again (at least once).
        assert!(
            !consumer.again.is_empty(),
            "the message of the refused blind ack came back"
        );
        eprintln!(
            "{} messages delivered again after a blind ack",
            consumer.again.len()
        );
    }
    wait_ready(&broker, true);
    assert_eq!(broker.metric("entrepot_disk_full "), Some(0.0));

    // 4. Producers are accepted again.
    let mut producer = Client::open(broker.amqp).await.expect("connect");
    producer.attach_sender_on(0, 0, "again", QUEUE).await;
    producer
        .transfer(0, 0, &data_message(&body_of(produced)))
        .await;
    let outcome = step(producer.expect(broker_outcome)).await;
    assert!(
        matches!(outcome, DeliveryState::Accepted(_)),
        "accepted again: {outcome:?}"
    );

    // 5. SIGKILL: nothing settled comes back, nothing unacknowledged is lost.
    broker.kill();
    let broker = BrokerProcess::start(&data, &SMALL_SEGMENTS);
    let mut after = Consumer::attach(broker.amqp, 0, ReceiverSettleMode::Second).await;
    let back = step(after.collect_until_quiet()).await;
    let mut expected = never.clone();
    expected.insert(produced);
    assert_eq!(
        back, expected,
        "after the restart exactly the unacknowledged messages are there"
    );
}

const QUEUE: &str = "disk.acks";

async fn step<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP * 3, f)
        .await
        .expect("step within its time bound")
}

fn body_of(seq: u64) -> Vec<u8> {
    let mut body = vec![(seq % 251) as u8; SMALL_BODY];
    body[..8].copy_from_slice(&seq.to_be_bytes());
    body
}

/// The seq of a delivered message: the first 8 bytes of its data section (a header may
/// precede it once the delivery count is raised).
fn seq_of(payload: &[u8]) -> u64 {
    let at = payload
        .windows(4)
        .position(|w| w == [0x00, 0x53, 0x75, 0xb0])
        .expect("a data section")
        + 8;
    u64::from_be_bytes(payload[at..at + 8].try_into().expect("8 bytes of seq"))
}

/// The broker's outcome of a message we sent.
fn broker_outcome(p: Performative) -> Option<DeliveryState> {
    match p {
        Performative::Disposition(d) if d.role == Role::Receiver => d.state,
        _ => None,
    }
}

/// Sends messages in batches until the store refuses one; returns how many it accepted
/// (seqs `0..n`, in order).
async fn produce_until_refused(c: &mut Client) -> u64 {
    let flow = c.attach_sender_on(0, 0, "fill", QUEUE).await;
    let batch = flow.link_credit.unwrap_or(0).min(100);
    assert!(batch > 0, "the broker grants credit");
    let mut accepted = 0u64;
    loop {
        for k in 0..batch {
            let seq = accepted + u64::from(k);
            c.transfer(0, seq as u32, &data_message(&body_of(seq)))
                .await;
        }
        // Refusals go out at once, acceptances once durable: collect the whole batch.
        let mut outcomes: HashMap<u32, bool> = HashMap::new();
        while outcomes.len() < batch as usize {
            let d = c
                .expect(|p| match p {
                    Performative::Disposition(d) if d.role == Role::Receiver => Some(d),
                    _ => None,
                })
                .await;
            for id in d.first..=d.last.unwrap_or(d.first) {
                let ok = match &d.state {
                    Some(DeliveryState::Accepted(_)) => true,
                    Some(DeliveryState::Rejected(r)) => {
                        let e = format!("{:?}", r.error);
                        assert!(e.contains("ResourceLimitExceeded"), "{e}");
                        false
                    }
                    other => panic!("unexpected outcome {other:?}"),
                };
                outcomes.insert(id, ok);
            }
        }
        let first = accepted as u32;
        let fit = (first..first + batch).take_while(|id| outcomes[id]).count() as u64;
        accepted += fit;
        if fit < u64::from(batch) {
            assert!(
                (accepted as u32..first + batch).all(|id| !outcomes[&id]),
                "once one is refused, the rest of the batch is too: {outcomes:?}"
            );
            return accepted;
        }
    }
}

/// Takes every free block of the file system under `root`; returns the files.
pub(crate) fn take_every_block(root: &Path) -> Vec<PathBuf> {
    let mut taken = Vec::new();
    for size in [64 * 1024, 4096] {
        for i in 0.. {
            let path = root.join(format!("filler-{size}-{i}"));
            if fs::write(&path, vec![0u8; size]).is_err() {
                let _ = fs::remove_file(&path);
                break;
            }
            taken.push(path);
        }
    }
    taken
}

/// A raw consumer that sees every settlement the broker sends; one link at a time.
struct Consumer {
    client: Client,
    handle: u32,
    mode: ReceiverSettleMode,
    /// Transfers received on the current link (its delivery-count, for flows).
    received: u32,
    /// Credit granted on the current link and not yet used.
    credit: u32,
    seq_of_delivery: HashMap<u32, u64>,
    /// Seqs whose acceptance is final: settled back by the broker (mode second), or
    /// settled by us (mode first).
    settled: HashSet<u64>,
    /// Seqs delivered again after their acceptance was final (mode first only).
    again: HashSet<u64>,
}

impl Consumer {
    async fn attach(addr: SocketAddr, handle: u32, mode: ReceiverSettleMode) -> Consumer {
        let client = Client::open(addr).await.expect("connect");
        let mut c = Consumer {
            client,
            handle,
            mode,
            received: 0,
            credit: 0,
            seq_of_delivery: HashMap::new(),
            settled: HashSet::new(),
            again: HashSet::new(),
        };
        c.reattach(handle).await;
        c
    }

    /// Attaches a (new) receiving link with `handle` on the same session and grants credit.
    async fn reattach(&mut self, handle: u32) {
        let name = format!("drain-{handle}");
        let answer = self
            .client
            .attach_receiver_settling(0, handle, &name, QUEUE, self.mode.clone())
            .await;
        assert_eq!(
            answer.rcv_settle_mode, self.mode,
            "the broker keeps the mode"
        );
        (self.handle, self.received, self.credit) = (handle, 0, 0);
        self.top_up().await;
    }

    async fn top_up(&mut self) {
        if self.credit < CREDIT / 2 {
            self.credit = CREDIT;
            self.client
                .flow(self.handle, self.received, CREDIT, false)
                .await;
        }
    }

    /// Accepts every delivery except those `held`, until the broker detaches the link;
    /// returns the detach's error.
    async fn drain_until_detached(
        &mut self,
        held: &dyn Fn(u64) -> bool,
    ) -> fe2o3_amqp::types::definitions::Error {
        loop {
            let f = self.client.next_frame().await;
            match f.performative {
                Performative::Detach(d) if d.handle.0 == self.handle => {
                    return d.error.expect("a detach with the reason");
                }
                p => self.on_frame(p, &f.payload, held).await,
            }
        }
    }

    /// Accepts every delivery except those `held`, until `done`; false if the broker
    /// went quiet for [`STEP`] first.
    async fn drain_until(
        &mut self,
        done: &dyn Fn(&Consumer) -> bool,
        held: &dyn Fn(u64) -> bool,
    ) -> bool {
        while !done(self) {
            let Ok(f) = tokio::time::timeout(STEP, self.client.next_frame()).await else {
                return false;
            };
            self.on_frame(f.performative, &f.payload, held).await;
        }
        true
    }

    /// Accepts every delivery except those `held`, until the broker is quiet for a second.
    async fn drain_until_quiet(&mut self, held: &dyn Fn(u64) -> bool) {
        while let Ok(f) =
            tokio::time::timeout(Duration::from_secs(1), self.client.next_frame()).await
        {
            self.on_frame(f.performative, &f.payload, held).await;
        }
    }

    /// Every seq delivered until the broker is quiet for two seconds; none accepted.
    async fn collect_until_quiet(&mut self) -> HashSet<u64> {
        let mut seqs = HashSet::new();
        for f in self.client.frames_until_quiet(Duration::from_secs(2)).await {
            if matches!(f.performative, Performative::Transfer(_)) {
                assert!(seqs.insert(seq_of(&f.payload)), "delivered twice");
            }
        }
        seqs
    }

    async fn on_frame(&mut self, p: Performative, payload: &[u8], held: &dyn Fn(u64) -> bool) {
        match p {
            Performative::Transfer(t) => {
                let id = t.delivery_id.expect("one frame per delivery");
                let seq = seq_of(payload);
                if self.settled.contains(&seq) {
                    assert_eq!(
                        self.mode,
                        ReceiverSettleMode::First,
                        "message {seq} delivered again after the broker settled its acceptance"
                    );
                    self.again.insert(seq);
                }
                self.received += 1;
                self.credit = self.credit.saturating_sub(1);
                self.seq_of_delivery.insert(id, seq);
                if !held(seq) {
                    self.accept(id, seq).await;
                }
                self.top_up().await;
            }
            Performative::Disposition(d) if d.role == Role::Sender => {
                assert_eq!(
                    self.mode,
                    ReceiverSettleMode::Second,
                    "nothing is settled back to a consumer settling first"
                );
                assert!(d.settled, "the broker's answer settles");
                assert!(matches!(d.state, Some(DeliveryState::Accepted(_))));
                for id in d.first..=d.last.unwrap_or(d.first) {
                    let seq = self.seq_of_delivery[&id];
                    assert!(self.settled.insert(seq), "{seq} settled twice");
                }
            }
            Performative::Flow(_) => {}
            other => panic!("unexpected frame while consuming: {other:?}"),
        }
    }

    async fn accept(&mut self, id: u32, seq: u64) {
        let settled = self.mode == ReceiverSettleMode::First;
        let accept = Disposition {
            role: Role::Receiver,
            first: id,
            last: None,
            settled,
            state: Some(DeliveryState::Accepted(AcceptedState {})),
            batchable: false,
        };
        self.client
            .send_on(0, &Performative::Disposition(accept), &[])
            .await;
        if settled {
            self.settled.insert(seq);
        }
    }
}
