//! Scale up and scale down of a StatefulSet, with real processes on loopback: a node beyond
//! the initial members joins by itself, and `entrepot drain` takes a node out before it
//! goes — all while a reconnecting producer sends, with the oracle "no accepted message
//! lost" at the end (see `cluster_support`).
//!
//! One scenario, in order (the steps build on each other and share one cluster, which
//! keeps the whole under ~30 s):
//! 1. nodes 0–2 form the cluster and take traffic; node 3 starts beyond them with
//!    `--auto-join` (processes have no StatefulSet DNS, so its member address comes from
//!    `--cluster-advertise`; the DNS path is the Docker test's) and becomes a voter by
//!    itself; its `/readyz` is 503 until it has joined and caught up, then 200, and it
//!    serves a client;
//! 2. `entrepot drain --desired-replicas 3` on node 3: it leaves the membership, the client
//!    connected through it is closed with `amqp:connection:forced` (a description naming
//!    the drain), the producer reconnects elsewhere;
//! 3. `entrepot drain --desired-replicas 3` on node 0: a restart, not a scale-down — exits
//!    0 saying so, and the membership and the term stay as they were;
//! 4. node 3, drained, is killed and started again on its old data directory: it finds it
//!    is no member and joins again, as a voter;
//! 5. the leader is drained: another node leads, the producer goes on;
//! 6. every accepted message is received.
//!
//! Then, as a StatefulSet with `podManagementPolicy: Parallel` scales 3 → 5 → 3: two nodes
//! join at once and drain at once (the leader makes one change at a time, the other asks
//! again), over inter-node TLS; and a joiner that does not hold the cluster secret is refused by the peer
//! port's authentication and never becomes a member.

use std::time::{Duration, Instant};

use fe2o3_amqp::connection::Error as ConnectionError;
use fe2o3_amqp::types::definitions::{ConnectionError as Condition, ErrorCondition};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};

use crate::cluster::runtime;
use crate::cluster_support::{assert_none_lost, drain, Cluster, Load, LoadConfig, POLL};

/// Longest the initial members may take to elect a leader.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a joining node may take to become a ready voter (snapshot install included).
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the load and on the final consumption.
const PHASE_TIMEOUT: Duration = Duration::from_secs(40);
/// Messages the producer sends over the whole scenario.
const MESSAGES: u64 = 12_000;
/// Acceptances the producer must make after a drain (it reconnected and goes on).
const AFTER_DRAIN: usize = 300;

/// Polls node `id` until `/readyz` answers 200 and returns whether a 503 was seen before
/// (at all, and while the node was a learner in its own view).
fn wait_ready(cluster: &Cluster, id: u64) -> (bool, bool) {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let (mut not_ready, mut not_ready_as_learner) = (false, false);
    loop {
        let code = cluster.readyz(id);
        if code == Some(200) {
            return (not_ready, not_ready_as_learner);
        }
        if code == Some(503) {
            not_ready = true;
            let status = cluster.status(id);
            not_ready_as_learner |= status.is_some_and(|s| s.state == "Learner");
        }
        assert!(
            Instant::now() < deadline,
            "node {id} not ready within {JOIN_TIMEOUT:?}: {:?}",
            cluster.status(id)
        );
        std::thread::sleep(POLL);
    }
}

/// The voters in the leader's view (waits, bounded, for a leader).
fn voters(cluster: &Cluster) -> Vec<u64> {
    let leader = cluster.wait_leader(|_| true, START_TIMEOUT);
    cluster.status(leader).map(|s| s.voters).unwrap_or_default()
}

/// Waits until the leader's voters are `expected`.
fn wait_voters(cluster: &Cluster, expected: &[u64]) {
    cluster.wait_status(
        |_, s| s.role == "leader" && s.voters == expected,
        JOIN_TIMEOUT,
    );
}

#[test]
fn a_node_joins_by_itself_and_drained_nodes_leave_without_losing_a_message() {
    let rt = runtime();
    let mut cluster = Cluster::on_loopback(4);
    // Snapshots every 20 entries: the joining node installs one instead of replaying all.
    cluster.serve_args(&["--raft-snapshot-every", "20"]);
    cluster.start(&[0, 1, 2], START_TIMEOUT);
    let load = Load::start(
        &rt,
        LoadConfig {
            queue: "elastic".into(),
            urls: cluster.urls(&[0, 1, 2, 3]),
            seqs: 0..MESSAGES,
            producers: 2,
            in_flight: 100,
        },
    );
    load.wait_accepted(500, PHASE_TIMEOUT);

    // 1. Node 3 joins by itself, and is ready only once it votes and has caught up.
    let joining = Instant::now();
    cluster.start_joining(3, &[0, 1, 2]);
    let (not_ready, not_ready_as_learner) = wait_ready(&cluster, 3);
    eprintln!(
        "node 3: started to ready (a voter, caught up) in {:?}",
        joining.elapsed()
    );
    assert!(not_ready, "node 3 answered 200 before it had joined");
    eprintln!("node 3: 503 seen while a learner: {not_ready_as_learner}");
    let s3 = cluster.status(3).expect("node 3 status");
    assert_eq!(s3.state, "Follower", "a ready node 3 votes: {s3:?}");
    assert_eq!(voters(&cluster), [0, 1, 2, 3]);
    cluster.wait_log(3, "joined the cluster as a voter", 1, JOIN_TIMEOUT);
    for id in [0, 1, 2] {
        assert!(
            cluster.log_count(id, "joined the cluster") == 0,
            "node {id} was a member from the start and joined nothing"
        );
    }
    let url3 = cluster.urls(&[3])[0].clone();
    let mut via3 = rt.block_on(async {
        let mut conn = Connection::open("via-node-3", url3.as_str())
            .await
            .expect("connect through node 3");
        let mut session = Session::begin(&mut conn).await.expect("session");
        let mut sender = Sender::attach(&mut session, "probe", "via-3")
            .await
            .expect("attach through node 3");
        let outcome = sender.send("served through node 3").await.expect("send");
        outcome.accepted_or_else(|o| o).expect("accepted");
        let receiver = Receiver::attach(&mut session, "idle", "idle")
            .await
            .expect("attach receiver");
        (conn, session, sender, receiver)
    });

    // 2. Scale-down: node 3 is beyond the desired 3 replicas, so it drains.
    let before = load.accepted_count();
    eprintln!("{before} of {MESSAGES} accepted when node 3 drains");
    let (ok, out, err) = cluster.drain_cli(3, &["--desired-replicas", "3"]);
    assert!(ok, "drain of node 3 failed: {out}{err}");
    assert!(out.contains("drained"), "drain output: {out}");
    eprintln!("drain of node 3:\n{out}");
    assert_eq!(voters(&cluster), [0, 1, 2]);
    let leader = cluster.wait_leader(|_| true, START_TIMEOUT);
    let members = cluster.status(leader).expect("leader status");
    assert!(!members.voters.contains(&3));
    let (code, why) = cluster.readyz_said(3).expect("node 3 answers /readyz");
    assert_eq!(code, 503, "a drained node is not ready");
    assert!(
        why.contains("draining"),
        "/readyz names the reason: {why:?}"
    );
    // It left as a learner: its own copy of the membership does not make it a voter, so
    // it never campaigns (restarted below, it must not depose the leader).
    let own = cluster.status(3).expect("node 3 status");
    assert!(
        own.state == "Learner" && !own.voters.contains(&3),
        "node 3's own view after the drain: {own:?}"
    );
    let closed = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), via3.0.on_close()).await });
    match closed {
        Ok(Err(ConnectionError::RemoteClosedWithError(e))) => {
            assert!(
                matches!(
                    e.condition,
                    ErrorCondition::ConnectionError(Condition::ConnectionForced)
                ),
                "closed with {e:?}"
            );
            let description = e.description.unwrap_or_default();
            assert!(
                description.contains("draining"),
                "description: {description}"
            );
        }
        other => panic!("expected a close with amqp:connection:forced, got {other:?}"),
    }
    drop(via3);
    load.wait_accepted((before + AFTER_DRAIN).min(MESSAGES as usize), PHASE_TIMEOUT);

    // 3. A restart within the desired replicas drains nothing.
    let term = cluster.leader_term(START_TIMEOUT);
    let (ok, out, err) = cluster.drain_cli(0, &["--desired-replicas", "3"]);
    assert!(ok, "drain within the desired replicas failed: {out}{err}");
    assert!(
        out.contains("not draining: node 0 is within the desired 3 replicas (a restart)"),
        "output: {out}"
    );
    assert_eq!(voters(&cluster), [0, 1, 2]);
    assert_eq!(
        cluster.leader_term(START_TIMEOUT),
        term,
        "the leadership moved"
    );
    assert_eq!(cluster.readyz(0), Some(200));

    // 4. Node 3 comes back on its old volume (stale Raft state) and joins again, without
    // disturbing the leadership.
    cluster.kill(3);
    cluster.restart(3);
    wait_ready(&cluster, 3);
    wait_voters(&cluster, &[0, 1, 2, 3]);
    cluster.wait_log(3, "joined the cluster as a voter", 1, JOIN_TIMEOUT);
    assert_eq!(
        cluster.leader_term(START_TIMEOUT),
        term,
        "the rejoining node moved the term"
    );

    // 5. The leader drains (told its ordinal is beyond the desired count): another leads.
    let old = cluster.wait_leader(|_| true, START_TIMEOUT);
    // A client of the leader itself hears why its connection closes.
    let mut direct = rt
        .block_on(crate::raw_client::Client::open(cluster.amqp(old)))
        .expect("a raw client opens on the leader");
    let before = load.accepted_count();
    eprintln!("{before} of {MESSAGES} accepted when the leader drains");
    let draining = Instant::now();
    let (ok, out, err) = cluster.drain_cli(old, &["--desired-replicas", &old.to_string()]);
    let drained = draining.elapsed();
    assert!(ok, "drain of the leader {old} failed: {out}{err}");
    let close = rt.block_on(async {
        tokio::time::timeout(START_TIMEOUT, async {
            loop {
                let frame = direct.next_frame().await;
                if let fe2o3_amqp::types::performatives::Performative::Close(c) = frame.performative
                {
                    return c;
                }
            }
        })
        .await
        .expect("the drained leader closes its own clients")
    });
    let said = close.error.and_then(|e| e.description).unwrap_or_default();
    assert!(
        said.contains("stopped leading"),
        "the leader's client is told why its connection closes: {said:?}"
    );
    eprintln!("drain of the leader {old}:\n{out}");
    let new = cluster.wait_leader(|id| id != old, START_TIMEOUT);
    eprintln!(
        "leader {old}: drained in {drained:?}, node {new} leads {:?} after the drain began",
        draining.elapsed()
    );
    let mut expected: Vec<u64> = [0, 1, 2, 3].into_iter().filter(|&id| id != old).collect();
    expected.sort_unstable();
    wait_voters(&cluster, &expected);
    eprintln!("node {new} leads after node {old} drained");
    load.wait_accepted((before + AFTER_DRAIN).min(MESSAGES as usize), PHASE_TIMEOUT);

    // 6. Nothing accepted is lost.
    let accepted = load.finish(&rt, PHASE_TIMEOUT);
    let url = &cluster.urls(&[new])[0];
    let received = rt.block_on(drain(url, "elastic", &accepted.seqs, PHASE_TIMEOUT));
    assert_none_lost(&accepted, &received);
}

#[test]
fn the_last_voter_is_never_drained() {
    let mut cluster = Cluster::on_loopback(1);
    cluster.start(&[0], START_TIMEOUT);
    let (ok, out, err) = cluster.drain_cli(0, &[]);
    assert!(!ok, "the last voter drained: {out}");
    assert!(err.contains("last voter"), "the refusal names why: {err}");
    assert_eq!(voters(&cluster), [0]);
    assert_eq!(
        cluster.readyz(0),
        Some(200),
        "a refused drain leaves it serving"
    );
}

/// With inter-node TLS (a test CA), as in the manifests: the join and leave requests
/// travel the mutually authenticated port like Raft traffic.
#[test]
fn two_nodes_join_at_once_and_drain_at_once() {
    let certs = tempfile::tempdir().expect("tempdir");
    let [cert, key, ca] = crate::cluster::write_peer_certificates(certs.path());
    let mut cluster = Cluster::on_loopback(5);
    let path = |p: &std::path::Path| p.display().to_string();
    let (cert, key, ca) = (path(&cert), path(&key), path(&ca));
    cluster.serve_args(&[
        "--cluster-tls-cert",
        &cert,
        "--cluster-tls-key",
        &key,
        "--cluster-tls-ca",
        &ca,
    ]);
    cluster.start(&[0, 1, 2], START_TIMEOUT);
    cluster.start_joining(3, &[0, 1, 2]);
    cluster.start_joining(4, &[0, 1, 2]);
    wait_ready(&cluster, 3);
    wait_ready(&cluster, 4);
    wait_voters(&cluster, &[0, 1, 2, 3, 4]);
    // Both preStop hooks run at once, as Parallel stops both pods together.
    let drains: Vec<_> = [3u64, 4]
        .map(|id| {
            std::process::Command::new(env!("CARGO_BIN_EXE_entrepot"))
                .arg("drain")
                .args(["--http", &cluster.http(id).to_string()])
                .args(["--node-id", &id.to_string(), "--desired-replicas", "3"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn entrepot drain")
        })
        .into_iter()
        .map(|child| child.wait_with_output().expect("drain output"))
        .collect();
    for out in &drains {
        assert!(
            out.status.success(),
            "a concurrent drain failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_voters(&cluster, &[0, 1, 2]);
    for id in [0, 1, 2] {
        assert_eq!(
            cluster.readyz(id),
            Some(200),
            "node {id} ready after the drains"
        );
    }
}

#[test]
fn a_joiner_without_the_cluster_secret_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (good, bad) = (dir.path().join("good"), dir.path().join("bad"));
    std::fs::write(&good, "the cluster's shared secret, long enough").expect("secret");
    std::fs::write(&bad, "somebody else's secret of some length").expect("secret");
    let mut cluster = Cluster::on_loopback(5);
    let secret =
        |p: &std::path::Path| ["--cluster-secret-file".to_owned(), p.display().to_string()];
    for id in [0, 1, 2, 3] {
        cluster.node_args(id, &secret(&good).each_ref().map(String::as_str));
    }
    cluster.node_args(4, &secret(&bad).each_ref().map(String::as_str));
    cluster.start(&[0, 1, 2], START_TIMEOUT);
    cluster.start_joining(4, &[0, 1, 2]);
    cluster.start_joining(3, &[0, 1, 2]);
    // The node with the secret joins (so joins do pass the authentication)...
    wait_ready(&cluster, 3);
    wait_voters(&cluster, &[0, 1, 2, 3]);
    // ...the other is refused at the peer port, and stays out.
    cluster.wait_log(4, "authentication failed", 1, JOIN_TIMEOUT);
    assert_eq!(voters(&cluster), [0, 1, 2, 3]);
    assert_eq!(
        cluster.readyz(4),
        Some(503),
        "a refused joiner is not ready"
    );
    assert_eq!(cluster.log_count(4, "joined the cluster"), 0);
}
