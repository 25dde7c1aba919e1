//! Cluster system tests: three (or five) real `entrepot serve` processes, a reconnecting
//! producer with many unsettled transfers in flight, and the oracle "every accepted message
//! is consumed" (see `cluster_support`). Each node runs in its own network namespace
//! (`Cluster::isolated`: root required; on loopback when not root and
//! `ENTREPOT_TEST_ALLOW_SKIP=1`, on ports reserved for the cluster's life, see `ports`).
//!
//! * the leader is SIGKILLed under load: a survivor leads within a second, producers
//!   resume, nothing accepted is lost;
//! * all three nodes are SIGKILLed and restarted: everything accepted is still there;
//! * two nodes are added and two original ones (the leader among them) removed while the
//!   producer runs: nothing accepted is lost;
//! * with store snapshots every 20 Raft entries: a new member catches up by installing a
//!   snapshot and, once the three original nodes are gone, delivers exactly the messages
//!   nobody consumed, on a queue and on a durable topic subscription; a node SIGKILLed
//!   after several snapshots restarts from its snapshot and nothing is lost or comes back;
//! * every node serves amqps with the same certificate: a TLS client reaches the leader
//!   through a follower (passthrough) or directly, and plain text on an amqps port fails;
//! * the nodes talk to each other over mutually authenticated TLS (`--cluster-tls-*`, a
//!   test CA): they elect a leader and a producer's messages are accepted and drained.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use fe2o3_amqp::types::messaging::{
    Data, Header, Message, Outcome, Source, TerminusDurability, TerminusExpiryPolicy,
};
use fe2o3_amqp::types::primitives::{Binary, Symbol};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};

use crate::cluster_support::{
    assert_none_lost, consume, drain, drain_from, Accepted, Cluster, Load, LoadConfig,
};

/// Longest a fresh cluster may take to elect its first leader.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on each load phase and on each drain.
const PHASE_TIMEOUT: Duration = Duration::from_secs(40);
/// Liveness bound: a new leader serves within this long after the old one is killed.
/// Issue 7's speed bar (1 s; 0.48–0.90 s measured on a loaded 2-core machine) is a
/// figure for benches/cluster.sh, not a timed assertion here: the test prints the time.
const NEW_LEADER_MAX: Duration = Duration::from_secs(5);

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn load(cluster: &Cluster, queue: &str, via: &[u64], messages: u64) -> LoadConfig {
    LoadConfig {
        queue: queue.into(),
        urls: cluster.urls(via),
        seqs: 0..messages,
        producers: 2,
        in_flight: 200,
    }
}

#[test]
fn leader_sigkill_under_load() {
    let rt = runtime();
    let mut cluster = Cluster::isolated(3);
    let leader = cluster.start(&[0, 1, 2], START_TIMEOUT);
    let load = Load::start(&rt, load(&cluster, "failover", &[0, 1, 2], 4_000));
    load.wait_accepted(1_000, PHASE_TIMEOUT);

    let killed = Instant::now();
    cluster.kill(leader);
    // Elected (Raft state Leader), then serving (broker active: role leader).
    cluster.wait_status(|_, s| s.state == "Leader", Duration::from_secs(10));
    let to_elected = killed.elapsed();
    let new_leader = cluster.wait_leader(|id| id != leader, Duration::from_secs(10));
    let to_new_leader = killed.elapsed();
    let deadline = Instant::now() + PHASE_TIMEOUT;
    let first_acceptance = loop {
        if let Some(at) = load.first_acceptance_after(killed) {
            break at - killed;
        }
        assert!(Instant::now() < deadline, "no acceptance after the kill");
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "leader {leader} SIGKILLed (nodes {}): a survivor elected after {to_elected:?}, \
         node {new_leader} serves after {to_new_leader:?}, first acceptance after the kill at \
         {first_acceptance:?}",
        cluster.network()
    );

    let accepted = load.finish(&rt, PHASE_TIMEOUT);
    let url = &cluster.urls(&[new_leader])[0];
    let received = rt.block_on(drain(url, "failover", &accepted.seqs, PHASE_TIMEOUT));
    assert_none_lost(&accepted, &received);
    eprintln!("new leader served {to_new_leader:?} after the kill");
    assert!(
        to_new_leader <= NEW_LEADER_MAX,
        "a new leader served only {to_new_leader:?} after the kill (bar: {NEW_LEADER_MAX:?})"
    );
}

/// Longest a client forwarded by a follower may stay connected to a leader that stopped
/// answering: the election timeout plus a second is the goal (issue 12.4, measured and
/// printed); the bar is wider for a loaded 2-core CI machine, and still tells "let go"
/// from "hangs until the leader resumes", which was the defect.
const FORWARD_RELEASE_MAX: Duration = Duration::from_secs(5);

/// Sends the AMQP protocol header on `stream` and reads the answer's: proof that a live
/// broker (a leader, directly or through the follower's forwarding) is at the other end.
fn amqp_header_round_trip(stream: &mut std::net::TcpStream) -> std::io::Result<[u8; 8]> {
    use std::io::{Read, Write};
    stream.write_all(b"AMQP\x00\x01\x00\x00")?;
    let mut header = [0u8; 8];
    stream.read_exact(&mut header)?;
    Ok(header)
}

/// A leader that stops answering (SIGSTOP: hung, or partitioned) releases the clients a
/// follower forwards to it once the follower sees an election, and the same follower
/// then takes the client to the new leader.
#[test]
fn a_stopped_leader_releases_the_clients_a_follower_forwards_to_it() {
    use std::io::Read;
    let mut cluster = Cluster::on_loopback(3);
    let leader = cluster.start(&[0, 1, 2], START_TIMEOUT);
    let via = (leader + 1) % 3;
    let mut client = std::net::TcpStream::connect(cluster.amqp(via)).expect("connect");
    client
        .set_read_timeout(Some(FORWARD_RELEASE_MAX))
        .expect("read timeout");
    let header = amqp_header_round_trip(&mut client).expect("forwarded to the leader");
    assert_eq!(&header, b"AMQP\x00\x01\x00\x00");

    cluster.freeze(leader, true);
    let stopped = Instant::now();
    let mut rest = [0u8; 64];
    let released = match client.read(&mut rest) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{n} unexpected bytes from a stopped leader")),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => Err(format!(
            "still connected after {:?}: {e}",
            stopped.elapsed()
        )),
    };
    let took = stopped.elapsed();
    let new_leader = cluster.wait_leader(|id| id != leader, START_TIMEOUT);
    let mut again = std::net::TcpStream::connect(cluster.amqp(via)).expect("reconnect");
    again
        .set_read_timeout(Some(START_TIMEOUT))
        .expect("read timeout");
    let reached = amqp_header_round_trip(&mut again);
    cluster.freeze(leader, false);
    eprintln!(
        "leader {leader} SIGSTOPped: the client forwarded by node {via} was let go after \
         {took:?} (goal: election timeout + 1 s); node {new_leader} leads now"
    );
    released.unwrap_or_else(|e| panic!("the forwarded client was not let go: {e}"));
    assert!(took <= FORWARD_RELEASE_MAX, "let go only after {took:?}");
    reached.expect("the follower takes a new client to the new leader");
}

#[test]
fn restart_all_nodes_keeps_everything() {
    let rt = runtime();
    let mut cluster = Cluster::isolated(3);
    cluster.start(&[0, 1, 2], START_TIMEOUT);
    let load = Load::start(&rt, load(&cluster, "restart", &[0, 1, 2], 2_000));
    let accepted = load.finish(&rt, PHASE_TIMEOUT);

    for id in [0, 1, 2] {
        cluster.kill(id);
    }
    for id in [0, 1, 2] {
        cluster.restart(id);
    }
    let leader = cluster.wait_leader(|_| true, START_TIMEOUT);
    // Through a follower when there is one: the forwarding path as well.
    let via = (leader + 1) % 3;
    let url = &cluster.urls(&[via])[0];
    let received = rt.block_on(drain(url, "restart", &accepted.seqs, PHASE_TIMEOUT));
    assert_none_lost(&accepted, &received);
}

#[test]
fn add_two_remove_two_under_load() {
    let rt = runtime();
    let mut cluster = Cluster::isolated(5);
    let leader = cluster.start(&[0, 1, 2], START_TIMEOUT);
    let load = Load::start(&rt, load(&cluster, "membership", &[0, 1, 2, 3, 4], 6_000));
    load.wait_accepted(500, PHASE_TIMEOUT);

    for id in [3, 4] {
        cluster.start_node(id, &[0, 1, 2]);
        cluster.add(id);
    }
    // The leader and one other original node go; a follower is removed first so the
    // leader commits that change before it removes itself.
    let other = [0, 1, 2].into_iter().find(|&id| id != leader).unwrap_or(0);
    let keep = [0, 1, 2]
        .into_iter()
        .find(|&id| id != leader && id != other)
        .unwrap_or(0);
    cluster.remove(other);
    cluster.remove(leader);
    let removed_at = load.accepted_count();
    for id in [other, leader] {
        cluster.kill(id);
    }
    let leader = cluster.wait_leader(|_| true, Duration::from_secs(10));
    let voters = cluster.status(leader).map(|s| s.voters).unwrap_or_default();
    let mut expected = vec![keep, 3, 4];
    expected.sort_unstable();
    assert_eq!(voters, expected, "voters after the changes");

    let accepted = load.finish(&rt, PHASE_TIMEOUT);
    eprintln!(
        "{removed_at} accepted when the removals were done, {} in the end",
        accepted.seqs.len()
    );
    assert!(
        accepted.seqs.len() > removed_at,
        "the producer was done before the membership changes: not under load"
    );
    let url = &cluster.urls(&[leader])[0];
    let received = rt.block_on(drain(url, "membership", &accepted.seqs, PHASE_TIMEOUT));
    assert_none_lost(&accepted, &received);
}

/// Raft entries between two store snapshots in the snapshot tests (the process flag).
const SNAPSHOT_EVERY: &str = "20";
/// Bound on each step of the snapshot tests (their whole run stays under 30 s).
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// The durable subscription of the snapshot test: container id, link name, source.
const SUB_CONTAINER: &str = "snapshot-audit";
const SUB_LINK: &str = "audit";

fn durable_subscription(topic: &str) -> Source {
    Source::builder()
        .address(topic)
        .durable(TerminusDurability::UnsettledState)
        .expiry_policy(TerminusExpiryPolicy::Never)
        .capabilities(vec![Symbol::from("topic")])
        .build()
}

fn queue_source(queue: &str) -> Source {
    Source::builder().address(queue).build()
}

/// The oracle after a partial consumption: every accepted message nobody consumed was
/// received (none lost), no consumed one came back (unless it was stored twice: a resend,
/// or the leadership changed while it was consumed: `exact` false, see
/// [`Cluster::settle_consumption`]), and nothing was received twice that was sent once.
fn assert_exactly_unconsumed(
    what: &str,
    accepted: &Accepted,
    consumed: &HashSet<u64>,
    received: &HashMap<u64, u32>,
    exact: bool,
) {
    let back: Vec<u64> = received
        .keys()
        .filter(|s| consumed.contains(s) && !accepted.resent.contains(s))
        .copied()
        .collect();
    if !exact {
        eprintln!("{what}: {} consumed messages came back once", back.len());
        let twice: Vec<u64> = back.iter().filter(|s| received[s] > 1).copied().collect();
        assert!(
            twice.is_empty(),
            "{what}: consumed messages came back twice: {twice:?}"
        );
    }
    assert!(
        !exact || back.is_empty(),
        "{what}: {} consumed messages came back, e.g. {:?}",
        back.len(),
        &back[..back.len().min(20)]
    );
    let unconsumed = Accepted {
        seqs: accepted.seqs.difference(consumed).copied().collect(),
        resent: accepted.resent.clone(),
    };
    let received: HashMap<u64, u32> = received
        .iter()
        .filter(|(s, _)| !consumed.contains(s))
        .map(|(s, n)| (*s, *n))
        .collect();
    eprintln!(
        "{what}: {} accepted, {} consumed before, {} received after",
        accepted.seqs.len(),
        consumed.len(),
        received.len()
    );
    assert_none_lost(&unconsumed, &received);
}

#[test]
fn new_member_installs_a_snapshot_and_serves_after_the_originals_leave() {
    let started = Instant::now();
    let rt = runtime();
    let mut cluster = Cluster::isolated(4);
    cluster.serve_args(&["--raft-snapshot-every", SNAPSHOT_EVERY]);
    cluster.start(&[0, 1, 2], START_TIMEOUT);
    let via = cluster.urls(&[0, 1, 2]);

    // A durable subscription, detached, before anything is published to its topic.
    let topic = "topic.snapshot";
    let none = rt.block_on(consume(
        &via[0],
        SUB_CONTAINER,
        SUB_LINK,
        durable_subscription(topic),
        0,
        &HashSet::new(),
        STEP_TIMEOUT,
    ));
    assert!(none.is_empty());
    let term = cluster.leader_term(STEP_TIMEOUT);
    let queue_load = Load::start(&rt, load(&cluster, "snap.q", &[0, 1, 2], 2_000));
    let topic_load = Load::start(&rt, load(&cluster, topic, &[0, 1, 2], 600));
    let queued = queue_load.finish(&rt, STEP_TIMEOUT);
    let published = topic_load.finish(&rt, STEP_TIMEOUT);
    let from_queue = rt.block_on(consume(
        &via[1],
        "snapshot-consumer",
        "part",
        queue_source("snap.q"),
        1_500,
        &queued.resent,
        STEP_TIMEOUT,
    ));
    let from_topic = rt.block_on(consume(
        &via[2],
        SUB_CONTAINER,
        SUB_LINK,
        durable_subscription(topic),
        400,
        &published.resent,
        STEP_TIMEOUT,
    ));
    // Every ack committed everywhere before the membership changes.
    let exact = cluster.settle_consumption(term, STEP_TIMEOUT);
    let produced_at = started.elapsed();

    cluster.start_node(3, &[0, 1, 2]);
    cluster.add(3);
    cluster.wait_log(3, "store snapshot installed", 1, STEP_TIMEOUT);
    let statuses = cluster.wait_converged(STEP_TIMEOUT);
    assert!(
        cluster.log_count(3, "store snapshot installed") >= 1,
        "node 3 caught up without installing a snapshot: {statuses:?}"
    );
    let added_at = started.elapsed();

    // The originals leave one by one, followers first, each killed once removed.
    let leader = cluster.wait_leader(|id| id < 3, STEP_TIMEOUT);
    let mut order: Vec<u64> = [0, 1, 2].into_iter().filter(|&id| id != leader).collect();
    order.push(leader);
    for id in order {
        cluster.remove(id);
        cluster.kill(id);
    }
    let leader = cluster.wait_leader(|id| id == 3, STEP_TIMEOUT);
    let voters = cluster.status(leader).map(|s| s.voters).unwrap_or_default();
    assert_eq!(voters, vec![3], "voters once the originals left");
    let removed_at = started.elapsed();

    let url = &cluster.urls(&[3])[0];
    let rest_of_queue = rt.block_on(drain(
        url,
        "snap.q",
        &queued.seqs.difference(&from_queue).copied().collect(),
        STEP_TIMEOUT,
    ));
    let rest_of_topic = rt.block_on(drain_from(
        url,
        SUB_CONTAINER,
        SUB_LINK,
        durable_subscription(topic),
        &published.seqs.difference(&from_topic).copied().collect(),
        STEP_TIMEOUT,
    ));
    assert_exactly_unconsumed("queue", &queued, &from_queue, &rest_of_queue, exact);
    assert_exactly_unconsumed(
        "subscription",
        &published,
        &from_topic,
        &rest_of_topic,
        exact,
    );
    eprintln!(
        "produced and partly consumed after {produced_at:?}, node 3 caught up after \
         {added_at:?}, originals removed after {removed_at:?}, drained after {:?}",
        started.elapsed()
    );
}

#[test]
fn restart_from_snapshot() {
    let started = Instant::now();
    let rt = runtime();
    let mut cluster = Cluster::isolated(3);
    cluster.serve_args(&["--raft-snapshot-every", SNAPSHOT_EVERY]);
    let leader = cluster.start(&[0, 1, 2], START_TIMEOUT);
    // Few messages in flight: small batches, many Raft entries, several snapshots.
    let mut first = load(&cluster, "snap.restart", &[0, 1, 2], 1_500);
    first.in_flight = 8;
    let first = Load::start(&rt, first).finish(&rt, STEP_TIMEOUT);
    let url = &cluster.urls(&[leader])[0];
    let term = cluster.leader_term(STEP_TIMEOUT);
    let consumed = rt.block_on(consume(
        url,
        "restart-consumer",
        "part",
        queue_source("snap.restart"),
        500,
        &first.resent,
        STEP_TIMEOUT,
    ));
    let exact = cluster.settle_consumption(term, STEP_TIMEOUT);

    // The leader goes down hard once it built several snapshots.
    let victim = leader;
    cluster.wait_log(victim, "store snapshot built", 3, STEP_TIMEOUT);
    let snapshot_file = cluster.data_dir(victim).join("raft/sm/snapshot");
    let persisted = std::fs::metadata(&snapshot_file)
        .unwrap_or_else(|e| panic!("no persisted snapshot at {}: {e}", snapshot_file.display()))
        .len();
    // Its 1,000 live messages of 1 KiB stay in the store: the snapshot file holds only
    // the state around them (ack sets, registry, where messages end).
    assert!(
        persisted < 64 * 1024,
        "the persisted snapshot is {persisted} bytes: it copies the messages"
    );
    let built = cluster.log_count(victim, "store snapshot built");
    cluster.kill(victim);
    // More messages while it is down: it comes back behind the others.
    let survivors: Vec<u64> = [0, 1, 2].into_iter().filter(|&id| id != victim).collect();
    cluster.wait_leader(|id| id != victim, STEP_TIMEOUT);
    let mut second = load(&cluster, "snap.restart", &survivors, 2_000);
    second.seqs = 1_500..2_000;
    second.in_flight = 8;
    let second = Load::start(&rt, second).finish(&rt, STEP_TIMEOUT);

    cluster.restart(victim);
    // It runs with its Raft log purged below a snapshot (GET /cluster): no replay of the
    // whole log can have rebuilt its store — a snapshot did, its own or the leader's.
    cluster.wait_status(
        |id, s| id == victim && s.snapshot_index >= 0 && s.purged_index >= 0,
        STEP_TIMEOUT,
    );
    cluster.wait_converged(STEP_TIMEOUT);
    let installed = cluster.log_count(victim, "store snapshot installed");
    // The restarted node is needed now: one of the others goes.
    cluster.kill(survivors[0]);
    cluster.wait_leader(|_| true, STEP_TIMEOUT);
    let accepted = Accepted {
        seqs: first.seqs.union(&second.seqs).copied().collect(),
        resent: first.resent.union(&second.resent).copied().collect(),
    };
    let url = &cluster.urls(&[victim])[0];
    let rest = rt.block_on(drain(
        url,
        "snap.restart",
        &accepted.seqs.difference(&consumed).copied().collect(),
        STEP_TIMEOUT,
    ));
    assert_exactly_unconsumed("queue", &accepted, &consumed, &rest, exact);
    eprintln!(
        "node {victim} built {built} snapshots before SIGKILL, installed {installed} after \
         its restart; done after {:?}",
        started.elapsed()
    );
}

/// Goal: amqps on a cluster, by TLS passthrough. Every node serves amqps with the same
/// certificate; a client that trusts it completes TLS through a follower (which forwards
/// the still-encrypted bytes to the leader's amqps port) and directly at the leader, and
/// either way gets back byte-identical messages; a plain-text client on an amqps port
/// (follower's or leader's) is refused.
///
/// Method: three nodes on loopback, each with `--listen-tls` on the port its member
/// address names third, and one self-signed `localhost` certificate (rcgen); fe2o3 over a
/// tokio-rustls stream that sends SNI `localhost`, trusts only that certificate and checks
/// it is the one served.
#[test]
fn amqps_reaches_the_leader_through_a_follower_and_directly() {
    let rt = runtime();
    let certs = tempfile::tempdir().unwrap();
    let cert = crate::tls::write_cert(certs.path());
    let (cert_file, key_file) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let mut cluster = Cluster::on_loopback_with_amqps(3);
    cluster.serve_args(&[
        "--tls-cert",
        cert_file.to_str().unwrap(),
        "--tls-key",
        key_file.to_str().unwrap(),
    ]);
    let leader = cluster.start(&[0, 1, 2], START_TIMEOUT);
    let follower = (0..3).find(|&id| id != leader).unwrap();
    cluster.wait_status(
        |id, s| id == follower && s.role == "follower" && s.leader == Some(leader),
        START_TIMEOUT,
    );

    for (via, role) in [(follower, "follower"), (leader, "leader")] {
        let sent = amqps_bodies(via);
        let queue = format!("amqps.via-{role}");
        let addr = cluster.amqps(via);
        let received = rt.block_on(async {
            tokio::time::timeout(PHASE_TIMEOUT, amqps_round_trip(addr, &cert, &queue, &sent)).await
        });
        let received = received.unwrap_or_else(|_| panic!("amqps via the {role} timed out"));
        assert!(
            received == sent,
            "amqps via the {role} (node {via}): bodies differ ({} sent, {} received)",
            sent.len(),
            received.len()
        );
    }

    for id in [follower, leader] {
        let url = format!("amqp://{}", cluster.amqps(id));
        let plain = rt.block_on(async {
            let open = Connection::builder()
                .container_id("plain-on-amqps")
                .open(url.as_str());
            tokio::time::timeout(PHASE_TIMEOUT, open).await
        });
        assert!(
            matches!(plain, Ok(Err(_))),
            "plain AMQP on node {id}'s amqps port was not refused: {:?}",
            plain.map(|r| r.map(|_| "opened"))
        );
    }
    // Passthrough: both refusals were the leader's TLS handshake; the follower never
    // looked at the bytes.
    cluster.wait_log(leader, "TLS handshake failed", 2, Duration::from_secs(10));
    assert_eq!(cluster.log_count(follower, "TLS handshake"), 0);
    eprintln!(
        "amqps through follower {follower} and leader {leader}: byte-identical; plain text \
         refused on both amqps ports, by the leader"
    );
}

/// Message bodies for the amqps test: empty-ish to larger than a TLS record (16 KiB)
/// and an AMQP frame, distinct per node.
fn amqps_bodies(via: u64) -> Vec<Vec<u8>> {
    [1usize, 37, 1024, 16 * 1024 + 3, 200_000]
        .iter()
        .enumerate()
        .map(|(n, &len)| {
            (0..len)
                .map(|i| (i as u64 * 31 + n as u64 * 7 + via) as u8)
                .collect()
        })
        .collect()
}

/// Over TLS to `addr` (checking the served certificate is `cert`): sends `bodies` to
/// `queue`, each accepted, then receives as many back (accepting each); returns their
/// bodies in delivery order.
async fn amqps_round_trip(
    addr: std::net::SocketAddr,
    cert: &rustls::pki_types::CertificateDer<'static>,
    queue: &str,
    bodies: &[Vec<u8>],
) -> Vec<Vec<u8>> {
    let tls = crate::tls::connect_tls(addr, cert).await;
    let served = tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone();
    assert!(served == *cert, "{addr} served another certificate");
    let mut conn = Connection::builder()
        .container_id("amqps-client")
        .open_with_stream(tls)
        .await
        .expect("AMQP open over TLS");
    let mut session = Session::begin(&mut conn).await.expect("begin");
    let mut sender = Sender::attach(&mut session, "amqps-sender", queue)
        .await
        .expect("attach sender");
    for body in bodies {
        let message = Message::builder()
            .header(Header::builder().durable(true).build())
            .data(Binary::from(body.clone()))
            .build();
        let outcome = sender.send(message).await.expect("send");
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    }
    let mut receiver = Receiver::attach(&mut session, "amqps-receiver", queue)
        .await
        .expect("attach receiver");
    let mut received = Vec::new();
    while received.len() < bodies.len() {
        let delivery = receiver.recv::<Data>().await.expect("receive");
        receiver.accept(&delivery).await.expect("accept");
        received.push(delivery.body().0.to_vec());
    }
    let _ = sender.close().await;
    let _ = receiver.close().await;
    let _ = session.end().await;
    let _ = conn.close().await;
    received
}

/// Goal: with `--cluster-tls-cert/-key/-ca` every node talks to its peers over TLS, and the
/// cluster works as without: a leader is elected, a producer's messages are accepted
/// (committed through TLS-carried AppendEntries) and all of them are drained.
/// Method: three nodes on loopback; a test CA (rcgen) signs one node certificate naming
/// `127.0.0.1`, the host of every member address (the hand-run SAN rule). No node may log
/// the plain-text warning or a refused TLS handshake.
#[test]
fn inter_node_tls_cluster_elects_a_leader_and_commits() {
    let rt = runtime();
    let certs = tempfile::tempdir().unwrap();
    let [cert, key, ca] = write_peer_certificates(certs.path());
    let mut cluster = Cluster::on_loopback(3);
    cluster.serve_args(&[
        "--cluster-tls-cert",
        cert.to_str().unwrap(),
        "--cluster-tls-key",
        key.to_str().unwrap(),
        "--cluster-tls-ca",
        ca.to_str().unwrap(),
    ]);
    let leader = cluster.start(&[0, 1, 2], START_TIMEOUT);
    let load = Load::start(&rt, load(&cluster, "peers.tls", &[0, 1, 2], 2_000));
    let accepted = load.finish(&rt, PHASE_TIMEOUT);
    let url = &cluster.urls(&[leader])[0];
    let received = rt.block_on(drain(url, "peers.tls", &accepted.seqs, PHASE_TIMEOUT));
    assert_none_lost(&accepted, &received);
    for id in [0, 1, 2] {
        assert_eq!(cluster.log_count(id, "not encrypted"), 0, "node {id}");
        assert_eq!(
            cluster.log_count(id, "TLS handshake failed"),
            0,
            "node {id}"
        );
    }
    eprintln!(
        "inter-node TLS: leader {leader}, {} messages accepted and drained",
        accepted.seqs.len()
    );
}

/// A test CA and one node certificate for `127.0.0.1` signed by it, usable as server and
/// client: `[cert, key, ca]` PEM files in `dir`.
pub fn write_peer_certificates(dir: &std::path::Path) -> [std::path::PathBuf; 3] {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &*ca).unwrap();
    let files = ["peer.pem", "peer-key.pem", "ca.pem"].map(|f| dir.join(f));
    std::fs::write(&files[0], cert.pem()).unwrap();
    std::fs::write(&files[1], key.serialize_pem()).unwrap();
    std::fs::write(&files[2], ca.pem()).unwrap();
    files
}

/// Goal: cluster-only settings on a node without peers stop it with a clear error, instead
/// of a single node the operator believes clustered and protected.
#[test]
fn cluster_only_flags_without_peers_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a shared secret of enough length").expect("secret");
    for (flag, value) in [
        (
            "--cluster-secret-file",
            secret.to_str().expect("utf-8 path"),
        ),
        ("--cluster-listen", "127.0.0.1:0"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_entrepot"))
            .args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args([flag, value])
            .output()
            .expect("run entrepot serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(
            stderr.contains(&format!("{flag} needs a cluster")),
            "{flag}: {stderr}"
        );
    }
}
