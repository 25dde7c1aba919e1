//! Goal: `entrepot serve --cluster-mode groups` runs a real cluster with a Raft group per
//! address: addresses declared by attaching (auto-create) through any node get groups
//! whose leaders are spread over the nodes; a producer on an address's leader is
//! accepted and a consumer there receives everything in order; a link attached on a
//! node that does not lead its address is refused with `amqp:link:redirect` whose `info`
//! names the leader's AMQP listener (`network-host`, `port`, `address`), and a client
//! that follows it is served; after the leader of an address is SIGKILLed, the address is
//! served again by its new leader (the redirect points there), every accepted message is
//! delivered and none the consumer settled comes again.
//! Method: three `entrepot serve` processes on loopback (`cluster_support::Cluster`),
//! fe2o3 clients that follow redirects by hand (at most `MAX_HOPS`), the leaders read
//! from each node's `/status` (`groups:` section). Every wait is bounded; the time from
//! the SIGKILL to the first attach served by the new leader is printed, not asserted
//! beyond a liveness bound.
//! Mutation-checked: the router answering `Here` for every placed address (no redirect:
//! the attach at a non-leader is not refused, the test fails), the redirect's `port`
//! taken from the wrong member (the followed redirect lands on a non-leader again and
//! runs out of hops).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fe2o3_amqp::link::{ReceiverAttachError, SenderAttachError};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{self, ReceiverSettleMode};
use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};

use crate::cluster::runtime;
use crate::cluster_support::Cluster;

const NODES: u64 = 3;
const ADDRESSES: [&str; 6] = ["g-a", "g-b", "g-c", "g-d", "g-e", "g-f"];
/// Longest the three nodes may take to be ready.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest one client step (connect, attach, send, receive) may take.
pub(crate) const STEP: Duration = Duration::from_secs(8);
/// Most redirects one attach follows.
pub(crate) const MAX_HOPS: usize = 4;
/// Liveness bound on the failover (the goal is the election timeout + 1 s; the
/// measured time is printed).
const FAILOVER_MAX: Duration = Duration::from_secs(10);
/// Messages sent to the address that fails over.
const MESSAGES: u32 = 20;
/// Of which the consumer settles this many before the leader is killed.
const SETTLED: u32 = 8;

/// Where a refused attach was sent: `(host:port, address)` from a redirect's info, or
/// the refusal itself.
pub(crate) fn redirect_of(e: &definitions::Error) -> Result<(String, String), String> {
    crate::redirect::redirect_of(e).map(|r| (r.to, r.address))
}

pub(crate) async fn session(
    at: &str,
) -> (
    fe2o3_amqp::connection::ConnectionHandle<()>,
    SessionHandle<()>,
) {
    let url = format!("amqp://{at}");
    let mut conn = tokio::time::timeout(STEP, Connection::open("groups-test", url.as_str()))
        .await
        .expect("open in time")
        .expect("open");
    let session = tokio::time::timeout(STEP, Session::begin(&mut conn))
        .await
        .expect("begin in time")
        .expect("begin");
    (conn, session)
}

/// What one attach at one node got.
pub(crate) enum Attached<L> {
    Served(
        L,
        fe2o3_amqp::connection::ConnectionHandle<()>,
        SessionHandle<()>,
    ),
    Redirected(String, String),
    Refused(String),
}

pub(crate) async fn try_sender(at: &str, address: &str) -> Attached<Sender> {
    let (conn, mut s) = session(at).await;
    let attach = Sender::attach(&mut s, format!("s-{address}"), address);
    match tokio::time::timeout(STEP, attach)
        .await
        .expect("attach in time")
    {
        Ok(l) => Attached::Served(l, conn, s),
        Err(SenderAttachError::RemoteClosedWithError(e)) => match redirect_of(&e) {
            Ok((to, a)) => Attached::Redirected(to, a),
            Err(why) => Attached::Refused(why),
        },
        Err(e) => Attached::Refused(format!("{e:?}")),
    }
}

pub(crate) async fn try_receiver(at: &str, address: &str) -> Attached<Receiver> {
    let (conn, mut s) = session(at).await;
    let attach = Receiver::builder()
        .name(format!("r-{address}"))
        .source(address)
        .receiver_settle_mode(ReceiverSettleMode::Second)
        .attach(&mut s);
    match tokio::time::timeout(STEP, attach)
        .await
        .expect("attach in time")
    {
        Ok(l) => Attached::Served(l, conn, s),
        Err(ReceiverAttachError::RemoteClosedWithError(e)) => match redirect_of(&e) {
            Ok((to, a)) => Attached::Redirected(to, a),
            Err(why) => Attached::Refused(why),
        },
        Err(e) => Attached::Refused(format!("{e:?}")),
    }
}

/// The node (by AMQP address) that serves `address` after following redirects from
/// `start`, with the served link; panics after [`MAX_HOPS`] or any other refusal.
macro_rules! follow {
    ($try:ident, $start:expr, $address:expr) => {{
        let mut at: String = $start;
        let address: &str = $address;
        let mut hops = 0;
        loop {
            match $try(&at, address).await {
                Attached::Served(l, c, s) => break (at, l, c, s),
                Attached::Redirected(to, a) => {
                    assert_eq!(a, address, "the redirect names the address");
                    hops += 1;
                    assert!(
                        hops <= MAX_HOPS,
                        "{address} redirected {hops} times, last to {to}"
                    );
                    at = to;
                }
                Attached::Refused(why) => panic!("attach {address} at {at} refused: {why}"),
            }
        }
    }};
}
pub(crate) use follow;

/// The addresses each running node's `/status` says it leads.
pub(crate) fn led(cluster: &Cluster) -> BTreeMap<u64, Vec<String>> {
    cluster.led_addresses(&cluster.running())
}

/// The node that `leaders` (from [`led`]) says leads `address`.
pub(crate) fn leader_of(leaders: &BTreeMap<u64, Vec<String>>, address: &str) -> u64 {
    *leaders
        .iter()
        .find(|(_, a)| a.iter().any(|x| x == address))
        .unwrap_or_else(|| panic!("nobody leads {address}: {leaders:?}"))
        .0
}

/// A groups-mode cluster of `nodes` processes on loopback (`--cluster-mode groups
/// --sync always`, then `extra` arguments), every node started with all as peers and
/// ready (`/readyz` 200) within `ready_within`.
pub(crate) fn start_groups_cluster(nodes: u64, extra: &[&str], ready_within: Duration) -> Cluster {
    start_groups_cluster_on(Cluster::on_loopback(nodes), extra, ready_within)
}

/// [`start_groups_cluster`] on `cluster` (e.g. [`Cluster::on_loopback_with_amqps`]).
pub(crate) fn start_groups_cluster_on(
    mut cluster: Cluster,
    extra: &[&str],
    ready_within: Duration,
) -> Cluster {
    let nodes = cluster.node_count();
    let mut args = vec!["--cluster-mode", "groups", "--sync", "always"];
    args.extend_from_slice(extra);
    cluster.serve_args(&args);
    let all: Vec<u64> = (0..nodes).collect();
    for &id in &all {
        cluster.start_node(id, &all);
    }
    wait_until("every node ready", ready_within, || {
        all.iter().all(|&id| cluster.readyz(id) == Some(200))
    });
    cluster
}

pub(crate) fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) async fn send(sender: &mut Sender, from: u32, to: u32) {
    for i in from..to {
        let outcome = tokio::time::timeout(STEP, sender.send(format!("m{i}")))
            .await
            .expect("outcome in time")
            .expect("send");
        assert!(matches!(outcome, Outcome::Accepted(_)), "m{i}: {outcome:?}");
    }
}

pub(crate) async fn take(receiver: &mut Receiver, expected: u32) {
    let d = tokio::time::timeout(STEP, receiver.recv::<String>())
        .await
        .unwrap_or_else(|_| panic!("m{expected} not received in time"))
        .expect("recv");
    assert_eq!(
        d.body(),
        &format!("m{expected}"),
        "in order, nothing settled again"
    );
    tokio::time::timeout(STEP, receiver.accept(&d))
        .await
        .expect("accept in time")
        .expect("accept");
}

#[test]
fn groups_mode_spreads_leaders_redirects_and_fails_over() {
    let rt = runtime();
    let mut cluster = start_groups_cluster(NODES, &[], READY_TIMEOUT);
    let all: Vec<u64> = (0..NODES).collect();

    // Six addresses, each declared by attaching through another node.
    for (i, address) in ADDRESSES.iter().enumerate() {
        let start = cluster.amqp(i as u64 % NODES).to_string();
        rt.block_on(async {
            let (_, sender, mut c, _) = follow!(try_sender, start, address);
            let _ = sender.close().await;
            let _ = c.close().await;
        });
    }
    wait_until("every address led by one node", READY_TIMEOUT, || {
        led(&cluster).values().map(Vec::len).sum::<usize>() == ADDRESSES.len()
    });
    let leaders = led(&cluster);
    println!("addresses led per node: {leaders:?}");
    for (id, addresses) in &leaders {
        assert!(
            (1..=3).contains(&addresses.len()),
            "node {id} leads {addresses:?}: not spread ({leaders:?})"
        );
    }

    // The first address: its leader and a node that does not lead it.
    let address = ADDRESSES[0];
    let leader = leader_of(&leaders, address);
    let other = all.iter().copied().find(|&n| n != leader).unwrap();
    let leader_amqp = cluster.amqp(leader).to_string();
    rt.block_on(async {
        match try_sender(&cluster.amqp(other).to_string(), address).await {
            Attached::Redirected(to, a) => {
                assert_eq!((to.as_str(), a.as_str()), (leader_amqp.as_str(), address));
            }
            Attached::Served(..) => panic!("node {other} served {address}, led by {leader}"),
            Attached::Refused(why) => panic!("not a redirect: {why}"),
        }
        // Followed by hand: produced on the leader, consumed there in order.
        let (at, mut sender, mut c, _s) =
            follow!(try_sender, cluster.amqp(other).to_string(), address);
        assert_eq!(at, leader_amqp);
        send(&mut sender, 0, MESSAGES).await;
        let _ = sender.close().await;
        let _ = c.close().await;
        let (_, mut receiver, mut c, _s) =
            follow!(try_receiver, cluster.amqp(other).to_string(), address);
        for i in 0..SETTLED {
            take(&mut receiver, i).await;
        }
        let _ = receiver.close().await;
        let _ = c.close().await;
    });
    // The consumer's settlements commit through the group (not observable to a client).
    std::thread::sleep(Duration::from_secs(1));

    let killed = Instant::now();
    cluster.kill(leader);
    let survivor = all.iter().copied().find(|&n| n != leader).unwrap();
    rt.block_on(async {
        let deadline = Instant::now() + FAILOVER_MAX;
        let (at, mut receiver, _c, _s) = loop {
            let start = cluster.amqp(survivor).to_string();
            let mut at = start;
            let mut served = None;
            for _ in 0..=MAX_HOPS {
                match try_receiver(&at, address).await {
                    Attached::Served(l, c, s) => {
                        served = Some((at.clone(), l, c, s));
                        break;
                    }
                    Attached::Redirected(to, _) if to != leader_amqp => at = to,
                    Attached::Redirected(..) | Attached::Refused(_) => break,
                }
            }
            if let Some(s) = served {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "{address} not served within {FAILOVER_MAX:?} of the SIGKILL"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        println!(
            "{address} served again by {at} {:?} after its leader's SIGKILL",
            killed.elapsed()
        );
        assert_ne!(at, leader_amqp);
        for i in SETTLED..MESSAGES {
            take(&mut receiver, i).await;
        }
        let extra =
            tokio::time::timeout(Duration::from_millis(500), receiver.recv::<String>()).await;
        assert!(
            extra.is_err(),
            "nothing more: {:?}",
            extra.map(|d| d.map(|d| d.body().clone()))
        );
    });
}

/// Goal: a redirect keeps the client's transport — one that came in over amqps is sent to
/// the leader's amqps port (never from TLS to plain text, where a TLS client would fail or
/// send its credentials in the clear), a plain client to the leader's AMQP port.
/// Method: three groups-mode processes with amqps listeners (member addresses
/// `host:peer/amqp/amqps`), a sender attached over TLS and over TCP at a node that does not
/// lead the address; the redirect's `network-host`/`port` compared with where the leader
/// logged its listeners.
#[test]
fn a_redirect_names_the_leader_s_port_of_the_client_s_transport() {
    const ADDRESS: &str = "g-tls";
    let rt = runtime();
    let certs = tempfile::tempdir().unwrap();
    let cert = crate::tls::write_cert(certs.path());
    let (cert_file, key_file) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let tls_args = [
        "--tls-cert",
        cert_file.to_str().unwrap(),
        "--tls-key",
        key_file.to_str().unwrap(),
    ];
    let cluster = start_groups_cluster_on(
        Cluster::on_loopback_with_amqps(NODES),
        &tls_args,
        READY_TIMEOUT,
    );
    let all: Vec<u64> = (0..NODES).collect();
    rt.block_on(async {
        let (_, sender, mut c, _s) = follow!(try_sender, cluster.amqp(0).to_string(), ADDRESS);
        let _ = sender.close().await;
        let _ = c.close().await;
    });
    wait_until("the address led", READY_TIMEOUT, || {
        led(&cluster).values().flatten().any(|a| a == ADDRESS)
    });
    let leader = leader_of(&led(&cluster), ADDRESS);
    let other = all.iter().copied().find(|&n| n != leader).unwrap();

    rt.block_on(async {
        let tls = crate::tls::connect_tls(cluster.amqps(other), &cert).await;
        let mut conn = Connection::builder()
            .container_id("groups-amqps")
            .open_with_stream(tls)
            .await
            .expect("AMQP open over TLS");
        let mut session = Session::begin(&mut conn).await.expect("begin");
        let attach = Sender::attach(&mut session, "s-tls", ADDRESS);
        let refused = match tokio::time::timeout(STEP, attach).await.expect("in time") {
            Err(SenderAttachError::RemoteClosedWithError(e)) => e,
            other => panic!("not redirected over amqps: {other:?}"),
        };
        let (to, address) = redirect_of(&refused).expect("a redirect");
        assert_eq!(address, ADDRESS);
        assert_eq!(
            to,
            cluster.amqps(leader).to_string(),
            "an amqps client is sent to the leader's amqps port (its AMQP port is {})",
            cluster.amqp(leader)
        );
        let _ = conn.close().await;

        match try_sender(&cluster.amqp(other).to_string(), ADDRESS).await {
            Attached::Redirected(to, _) => assert_eq!(
                to,
                cluster.amqp(leader).to_string(),
                "a plain client is sent to the leader's AMQP port"
            ),
            Attached::Served(..) => panic!("served at node {other}, which does not lead"),
            Attached::Refused(why) => panic!("refused: {why}"),
        }
    });
}
