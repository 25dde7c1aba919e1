//! Goal: in `cluster-mode: groups` a node whose disk fills up stops — its process exits
//! non-zero, logging that a group's Raft failed and that the disk is full — instead of
//! staying a member that cannot write; the other two keep serving the address (after a
//! failover when the full node led it), nothing accepted is lost or delivered twice; and
//! once space is freed the node starts again on its data, turns ready and is a voter of
//! the address's group again.
//!
//! Method: three real `entrepot serve --cluster-mode groups --sync always` processes on
//! loopback (`cluster_support::Cluster`) with 32 MiB node-log segments
//! (`--node-log-segment-bytes`, the smallest allowed) and a 1 MiB local store; node 2's
//! data directory is a tmpfs of [`TMPFS_SIZE`] (`disk_full::SmallFs::mount_at`; root
//! needed, see `requirement`): room for its started node (measured and printed: ~34 MiB,
//! the first node-log segment preallocated whole and the local store) plus one more
//! segment, and too little for the node log to prepare its next segment ahead (the
//! preparer keeps two segments free). Addresses are declared through node 0 until one is
//! led as the scenario wants: by node 0 or 1 (node 2 a follower) or by node 2. Once every
//! node is ready a filler takes every free block of the tmpfs
//! (`disk_full::take_every_block`); an fe2o3 producer then sends persistent 64 KiB
//! messages to the address through nodes 0 and 1, following `amqp:link:redirect` by
//! hand, [`WINDOW`] unsettled at a time, until node 2's node log needs its next segment,
//! cannot preallocate it (ENOSPC: `DiskFull`, fatal to the group's Raft) and the process
//! exits. A message whose outcome a broken connection hid is never resent, so the oracle
//! allows no duplicate at all: every accepted message is received exactly once, an unsure
//! one at most once, nothing else. After the exit [`AFTER_EXIT`] more messages must be
//! accepted, then a consumer drains the address. Then the fillers are deleted and node 2
//! restarted: `/readyz` 200, and the address's group lists it as a voter on its own
//! `/status` and on its leader's. Every wait is bounded; the fill → exit, restart → ready
//! and drain times are printed, not asserted. Measured (debug build, 2 cores): ~1.1–1.5 s
//! from the fill to the exit (~510–620 messages), 0.3–1.0 s from the restart to ready,
//! ~6–8 s per test.
//!
//! Mutation-checked: without the `node.failed()` branch of `serve_groups` (`main.rs`)
//! node 2 keeps running with its group's Raft stopped and the follower scenario fails
//! waiting for its exit (still running 40 s after the fill, all 1,024 messages accepted by
//! the other two); the leader scenario waits for the same exit.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{ReceiverAttachError, SenderAttachError};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{Data, Header, Message, Outcome};
use fe2o3_amqp::types::primitives::Binary;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};

use crate::cluster::runtime;
use crate::cluster_groups::{
    leader_of, led, redirect_of, start_groups_cluster_on, wait_until, MAX_HOPS, READY_TIMEOUT, STEP,
};
use crate::cluster_groups_membership::groups_on;
use crate::cluster_support::Cluster;
use crate::disk_full::{take_every_block, SmallFs};

const TEST: &str = "cluster_groups_disk_full";
const NODES: u64 = 3;
/// The node whose disk fills.
const FULL: u64 = 2;
/// Addresses declared until one is led as the scenario wants (see [`fill_node_2`]).
const ADDRESSES: [&str; 3] = ["g-disk-full-a", "g-disk-full-b", "g-disk-full-c"];
/// Node-log segment size of every node: the smallest allowed (twice the largest record).
const NODE_LOG_SEGMENT_BYTES: u64 = 32 << 20;
/// Node 2's tmpfs: its started node (~33 MiB, measured) and one more node-log segment
/// (for the restart once the fillers are gone), under the two free segments the node log
/// wants before it prepares one ahead.
const TMPFS_SIZE: &str = "72m";
/// Body of every message: 512 of them fill a node-log segment.
const BODY: usize = 64 * 1024;
/// Messages sent before their outcomes are awaited.
const WINDOW: usize = 8;
/// Most messages sent before node 2 must have exited (two segments' worth).
const MESSAGES_MAX: u64 = 1024;
/// Longest from the fill to node 2's exit (the sends included).
const EXIT_MAX: Duration = Duration::from_secs(40);
/// Messages that must be accepted after node 2 exited.
const AFTER_EXIT: usize = 16;
/// Longest the producer may take for them (a failover included when node 2 led).
const AFTER_EXIT_MAX: Duration = Duration::from_secs(15);
/// Longest the consumer may take to receive everything.
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// Longest one attach may take, redirects followed.
const FOLLOW_MAX: Duration = Duration::from_secs(10);
/// The consumer stops once everything came and nothing more for this long.
const QUIET: Duration = Duration::from_secs(2);

/// Where a producer's or consumer's attach at one node went.
enum Hop<T> {
    Served(T),
    To(String),
}

/// A link with the connection and session it lives on.
type Link<L> = (L, ConnectionHandle<()>, SessionHandle<()>);

/// What the producer learned of each message it sent.
#[derive(Default, Debug)]
struct Produced {
    /// The next sequence number to send.
    next: u64,
    accepted: BTreeSet<u64>,
    /// Sent, but the connection broke before the outcome came: stored at most once.
    unsure: BTreeSet<u64>,
    /// Answered with an outcome other than `accepted`: never stored.
    refused: BTreeSet<u64>,
    /// Connections that broke under the producer.
    broken: u32,
}

/// Node 2 holds a follower replica of the address: the leader keeps its majority.
#[test]
fn a_follower_whose_disk_fills_exits_the_others_serve_and_it_returns_once_space_is_freed() {
    fill_node_2(false);
}

/// Node 2 leads the address: its exit ends the leadership, the producer's outcomes in
/// flight are unsure and the address fails over to another node.
#[test]
fn a_leader_whose_disk_fills_exits_the_address_fails_over_and_it_returns_once_space_is_freed() {
    fill_node_2(true);
}

/// The scenario of the module docs, with node 2 leading the address or not.
fn fill_node_2(node_2_leads: bool) {
    let rt = runtime();
    let layout = Cluster::on_loopback(NODES);
    let Some(tmpfs) = SmallFs::mount_at_or_skip(TEST, &layout.data_dir(FULL), TMPFS_SIZE) else {
        return;
    };
    let segment = NODE_LOG_SEGMENT_BYTES.to_string();
    let args = [
        "--node-log-segment-bytes",
        &segment,
        "--segment-bytes",
        "1048576",
        "--max-message-bytes",
        "524288",
    ];
    let mut cluster = start_groups_cluster_on(layout, &args, READY_TIMEOUT);
    // Dropped before the cluster: a failing test unmounts (lazily, the node still runs)
    // before the cluster's directory is removed.
    let tmpfs = tmpfs;
    let used = tmpfs_bytes() - free(tmpfs.path());
    println!(
        "node {FULL} started on {TMPFS_SIZE} of tmpfs, using {} KiB",
        used >> 10
    );

    // Addresses declared through node 0 (each placed on all three nodes, leaders spread)
    // until one is led as the scenario wants.
    let entries: Vec<String> = [0, 1].map(|id| cluster.amqp(id).to_string()).to_vec();
    let (address, leader) = ADDRESSES
        .iter()
        .find_map(|&address| {
            rt.block_on(async {
                let (link, _) = follow(&entries[0], |at| sender_at(at, address))
                    .await
                    .expect("declare the address");
                drop(link);
            });
            wait_until("the address led", READY_TIMEOUT, || {
                led(&cluster).values().flatten().any(|a| a == address)
            });
            let leader = leader_of(&led(&cluster), address);
            ((leader == FULL) == node_2_leads).then_some((address, leader))
        })
        .unwrap_or_else(|| panic!("none of {ADDRESSES:?} led as wanted: {:?}", led(&cluster)));
    wait_until("the address's group on every node", READY_TIMEOUT, || {
        (0..NODES).all(|id| groups_on(&cluster, id).iter().any(|g| g.name == address))
    });
    println!("{address} led by node {leader}");

    // Something else takes every free block of node 2's disk.
    let fillers = take_every_block(tmpfs.path());
    let filled = Instant::now();
    println!(
        "fillers took {} KiB; {} bytes left",
        (tmpfs_bytes() - used - free(tmpfs.path())) >> 10,
        free(tmpfs.path())
    );

    // Produce until node 2 has exited.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (entries, stop) = (entries.clone(), Arc::clone(&stop));
        rt.spawn(async move {
            let until = move |p: &Produced| stop.load(Ordering::Relaxed) || p.next >= MESSAGES_MAX;
            produce(&entries, address, Produced::default(), until, EXIT_MAX).await
        })
    };
    let status = cluster.wait_exit(FULL, EXIT_MAX);
    let exited = filled.elapsed();
    stop.store(true, Ordering::Relaxed);
    let before = rt.block_on(producer).expect("producer task");
    let status = status.unwrap_or_else(|| {
        panic!(
            "node {FULL} still runs {EXIT_MAX:?} after its disk filled; producer: {} sent, {} \
             accepted, {} unsure, {} refused",
            before.next,
            before.accepted.len(),
            before.unsure.len(),
            before.refused.len()
        )
    });
    println!(
        "node {FULL} exited {exited:?} after the fill ({status}); by then {} sent, {} accepted, \
         {} unsure, {} refused, {} broken connections",
        before.next,
        before.accepted.len(),
        before.unsure.len(),
        before.refused.len(),
        before.broken
    );
    assert!(
        status.code().is_some_and(|c| c != 0),
        "node {FULL} exits by itself with a non-zero status: {status}"
    );
    let log = cluster.log_lines(FULL);
    let failed = log
        .iter()
        .find(|l| l.contains("a group's Raft failed"))
        .unwrap_or_else(|| panic!("node {FULL} did not log the group's failure"));
    assert!(
        failed.contains("disk full"),
        "the reason names the full disk: {failed}"
    );
    println!("node {FULL} said: {failed}");

    // The two left keep serving the address.
    let after_exit = Instant::now();
    let accepted_before = before.accepted.len();
    let produced = rt.block_on(produce(
        &entries,
        address,
        before,
        move |p: &Produced| p.accepted.len() >= accepted_before + AFTER_EXIT,
        AFTER_EXIT_MAX,
    ));
    let accepted_after = produced.accepted.len() - accepted_before;
    assert!(
        accepted_after >= AFTER_EXIT,
        "only {accepted_after} of {AFTER_EXIT} messages accepted within {AFTER_EXIT_MAX:?} \
         of node {FULL}'s exit: {produced:?}"
    );
    println!(
        "{accepted_after} accepted by the two left within {:?}",
        after_exit.elapsed()
    );

    // Every accepted message exactly once, an unsure one at most once, nothing else.
    let draining = Instant::now();
    let received = rt.block_on(drain(&entries, address, &produced.accepted));
    println!(
        "drained {} messages in {:?}",
        received.len(),
        draining.elapsed()
    );
    check_exactly_once(&produced, &received);

    // The operator frees the space; node 2 starts again and rejoins its group.
    for filler in &fillers {
        std::fs::remove_file(filler).expect("remove a filler");
    }
    let restarted = Instant::now();
    cluster.restart(FULL);
    wait_until("node 2 ready again", READY_TIMEOUT, || {
        cluster.readyz(FULL) == Some(200)
    });
    println!(
        "node {FULL} ready {:?} after its restart",
        restarted.elapsed()
    );
    wait_until(
        "node 2 a voter of the address's group again",
        READY_TIMEOUT,
        || {
            let Some(leader) = groups_on(&cluster, FULL)
                .into_iter()
                .find(|g| g.name == address)
                .filter(|g| g.voters.contains(&FULL))
                .and_then(|g| g.leader)
            else {
                return false;
            };
            groups_on(&cluster, leader)
                .iter()
                .any(|g| g.name == address && g.leader == Some(leader) && g.voters.contains(&FULL))
        },
    );

    // The nodes go before the tmpfs, so it unmounts at once.
    for id in cluster.running() {
        cluster.kill(id);
    }
    drop(tmpfs);
}

/// The size of node 2's tmpfs in bytes.
fn tmpfs_bytes() -> u64 {
    let digits = TMPFS_SIZE.trim_end_matches('m');
    digits.parse::<u64>().expect("a size in MiB") << 20
}

fn free(path: &Path) -> u64 {
    entrepot_storage::free_bytes(path).expect("statvfs of the tmpfs")
}

/// The oracle (see the module docs).
fn check_exactly_once(produced: &Produced, received: &HashMap<u64, u32>) {
    let lost: Vec<u64> = produced
        .accepted
        .iter()
        .filter(|s| !received.contains_key(s))
        .copied()
        .collect();
    assert!(
        lost.is_empty(),
        "{} accepted messages lost (of {}), e.g. {:?}",
        lost.len(),
        produced.accepted.len(),
        &lost[..lost.len().min(20)]
    );
    let twice: Vec<(u64, u32)> = received
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, n)| (*s, *n))
        .collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let unknown: Vec<u64> = received
        .keys()
        .filter(|s| !produced.accepted.contains(s) && !produced.unsure.contains(s))
        .copied()
        .collect();
    assert!(
        unknown.is_empty(),
        "received but never accepted nor sent unsure: {unknown:?} (refused: {:?})",
        produced.refused
    );
    let unsure_stored = produced
        .unsure
        .iter()
        .filter(|s| received.contains_key(s))
        .count();
    println!(
        "oracle: {} accepted, each received once; {unsure_stored} of {} unsure received",
        produced.accepted.len(),
        produced.unsure.len()
    );
}

/// Sends new messages to `address` (never one again) from `p.next` through `entries` in turn, following
/// redirects and reconnecting after a broken connection, until `until` or `within`.
async fn produce(
    entries: &[String],
    address: &str,
    mut p: Produced,
    until: impl Fn(&Produced) -> bool,
    within: Duration,
) -> Produced {
    let deadline = Instant::now() + within;
    let mut turn = 0;
    while !until(&p) && Instant::now() < deadline {
        let start = &entries[turn % entries.len()];
        turn += 1;
        let ((mut sender, _conn, _session), _) =
            match follow(start, |at| sender_at(at, address)).await {
                Ok(served) => served,
                Err(e) => {
                    eprintln!("producer: {e}; again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
        while !until(&p) && Instant::now() < deadline {
            if !send_window(&mut sender, &mut p).await {
                p.broken += 1;
                break;
            }
        }
    }
    p
}

/// Sends [`WINDOW`] messages, then waits for their outcomes; false when the connection
/// broke (the messages without an outcome are then unsure).
async fn send_window(sender: &mut Sender, p: &mut Produced) -> bool {
    let mut pending = Vec::with_capacity(WINDOW);
    let mut intact = true;
    for _ in 0..WINDOW {
        let seq = p.next;
        p.next += 1;
        match tokio::time::timeout(STEP, sender.send_batchable(message(seq))).await {
            Ok(Ok(outcome)) => pending.push((seq, outcome)),
            _ => {
                p.unsure.insert(seq);
                intact = false;
                break;
            }
        }
    }
    for (seq, outcome) in pending {
        match tokio::time::timeout(STEP, outcome).await {
            Ok(Ok(Outcome::Accepted(_))) => {
                p.accepted.insert(seq);
            }
            Ok(Ok(other)) => {
                eprintln!("producer: message {seq} answered {other:?}");
                p.refused.insert(seq);
            }
            _ => {
                p.unsure.insert(seq);
                intact = false;
            }
        }
    }
    intact
}

/// Receives from `address` through `entries` (following redirects, reconnecting after
/// a broken connection) until every `expected` message came and nothing more for
/// [`QUIET`]; accepts each, checks its body, returns how often each came. One received
/// before a broken connection may come again (its acceptance may not have committed):
/// that is redelivery, not counted.
async fn drain(entries: &[String], address: &str, expected: &BTreeSet<u64>) -> HashMap<u64, u32> {
    let deadline = tokio::time::Instant::now() + DRAIN_MAX;
    let mut received: HashMap<u64, u32> = HashMap::new();
    let mut before_break: BTreeSet<u64> = BTreeSet::new();
    let mut turn = 0;
    'connections: loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "drain: {} of {} within {DRAIN_MAX:?}",
            received.len(),
            expected.len()
        );
        let start = &entries[turn % entries.len()];
        turn += 1;
        let ((mut receiver, _conn, _session), _) =
            match follow(start, |at| receiver_at(at, address)).await {
                Ok(served) => served,
                Err(e) => {
                    eprintln!("consumer: {e}; again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
        loop {
            let complete = expected.iter().all(|s| received.contains_key(s));
            let wait = if complete {
                QUIET
            } else {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            };
            let delivery = match tokio::time::timeout(wait, receiver.recv::<Data>()).await {
                Err(_) if complete => return received,
                Err(_) => continue 'connections,
                Ok(Err(e)) => {
                    eprintln!("consumer: connection lost ({e}); again");
                    before_break.extend(received.keys().copied());
                    continue 'connections;
                }
                Ok(Ok(d)) => d,
            };
            let seq = seq_of(&delivery.body().0);
            assert!(
                delivery.body().0.as_slice() == body(seq).as_slice(),
                "body of message {seq} is corrupt"
            );
            if !before_break.remove(&seq) {
                *received.entry(seq).or_default() += 1;
            }
            let accepted = tokio::time::timeout(STEP, receiver.accept(&delivery)).await;
            if let Err(e) = accepted
                .map_err(|_| "timed out".to_owned())
                .and_then(|a| a.map_err(|e| e.to_string()))
            {
                eprintln!("consumer: accept failed ({e}); again");
                before_break.extend(received.keys().copied());
                continue 'connections;
            }
        }
    }
}

/// Attaches with `attach` at `start`, then wherever a redirect sends it (at most
/// [`MAX_HOPS`], within [`FOLLOW_MAX`]); the link and where it is served, or why not.
async fn follow<T, F, Fut>(start: &str, attach: F) -> Result<(T, String), String>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<Hop<T>, String>>,
{
    let hops = async {
        let mut at = start.to_owned();
        for _ in 0..=MAX_HOPS {
            match attach(at.clone()).await? {
                Hop::Served(link) => return Ok((link, at)),
                Hop::To(to) => at = to,
            }
        }
        Err(format!(
            "redirected more than {MAX_HOPS} times, last to {at}"
        ))
    };
    tokio::time::timeout(FOLLOW_MAX, hops)
        .await
        .unwrap_or_else(|_| Err(format!("no link from {start} within {FOLLOW_MAX:?}")))
}

async fn open(at: &str) -> Result<(ConnectionHandle<()>, SessionHandle<()>), String> {
    let url = format!("amqp://{at}");
    let mut conn = tokio::time::timeout(STEP, Connection::open("groups-disk-full", url.as_str()))
        .await
        .map_err(|_| format!("open {at} timed out"))?
        .map_err(|e| format!("open {at}: {e}"))?;
    let session = tokio::time::timeout(STEP, Session::begin(&mut conn))
        .await
        .map_err(|_| format!("begin at {at} timed out"))?
        .map_err(|e| format!("begin at {at}: {e}"))?;
    Ok((conn, session))
}

async fn sender_at(at: String, address: &str) -> Result<Hop<Link<Sender>>, String> {
    let (conn, mut session) = open(&at).await?;
    let attach = Sender::attach(&mut session, "disk-full-producer", address);
    match tokio::time::timeout(STEP, attach).await {
        Err(_) => Err(format!("attach at {at} timed out")),
        Ok(Ok(sender)) => Ok(Hop::Served((sender, conn, session))),
        Ok(Err(SenderAttachError::RemoteClosedWithError(e))) => {
            redirect_of(&e).map(|(to, _)| Hop::To(to))
        }
        Ok(Err(e)) => Err(format!("attach at {at}: {e:?}")),
    }
}

async fn receiver_at(at: String, address: &str) -> Result<Hop<Link<Receiver>>, String> {
    let (conn, mut session) = open(&at).await?;
    let attach = Receiver::attach(&mut session, "disk-full-consumer", address);
    match tokio::time::timeout(STEP, attach).await {
        Err(_) => Err(format!("attach at {at} timed out")),
        Ok(Ok(receiver)) => Ok(Hop::Served((receiver, conn, session))),
        Ok(Err(ReceiverAttachError::RemoteClosedWithError(e))) => {
            redirect_of(&e).map(|(to, _)| Hop::To(to))
        }
        Ok(Err(e)) => Err(format!("attach at {at}: {e:?}")),
    }
}

/// A persistent message whose body starts with its sequence number.
fn message(seq: u64) -> Message<Data> {
    Message::builder()
        .header(Header::builder().durable(true).build())
        .data(Binary::from(body(seq)))
        .build()
}

/// [`BODY`] bytes: `seq` big-endian, then a filler derived from it (a mixed-up or torn
/// body shows).
fn body(seq: u64) -> Vec<u8> {
    let mut body = vec![(seq % 251) as u8; BODY];
    body[..8].copy_from_slice(&seq.to_be_bytes());
    body
}

fn seq_of(body: &[u8]) -> u64 {
    let head: [u8; 8] = body
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .expect("a body of at least 8 bytes");
    u64::from_be_bytes(head)
}
