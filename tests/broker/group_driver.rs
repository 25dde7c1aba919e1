//! Goal: the leadership driver (`raft::group_driver`) serves a clustered address exactly
//! while its node leads the address's group and a majority confirms it: a new leader
//! serves every committed message, a leader cut off from its followers stops delivering
//! within its lease although it still believes it leads, deactivating one address leaves
//! another's links on the same connection working, and a re-elected node activates afresh
//! without redelivering what a consumer settled.
//! Method: three real hosts in this process (`three_hosts.rs`), one in-process broker per
//! host (`Broker::open` on a temporary directory, `server::serve` on `127.0.0.1:0`) with a
//! `GroupDriver` per address, as the group opener will start them; fe2o3 clients. A host
//! "fails" by `Host::shutdown` (its port closes) or `close_group`. Every wait is bounded;
//! the only time bound asserted is the lease's (a delivery after it would break safety).
//! A producer whose address stops being served here has its link detached
//! (`detach-forced`) and its transfer never accepted, so it resends elsewhere. With
//! hibernation on, a consumed group stays awake while an idle one sleeps.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use entrepot::auth::Gatekeeper;
use entrepot::broker::Broker;
use entrepot::config::BrokerConfig;
use entrepot::raft::group_driver::GroupDriver;
use entrepot::raft::group_store::GroupStore;
use entrepot::raft::lease::LeaseTiming;
use entrepot::server::{serve, Serving};
use entrepot_cluster::{HibernationConfig, NodeId};
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::{DetachError, LinkStateError, RecvError, SendError};
use fe2o3_amqp::types::definitions::{ErrorCondition, LinkError, ReceiverSettleMode};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::client::{within, within_for};
use crate::three_hosts::{Cluster, GROUP, NODES, WAIT};

const ADDRESS: &str = "orders";
const TEST_TIMEOUT: Duration = Duration::from_secs(150);
/// Leader changes tried before giving up on electing a given node again (each has about
/// even odds between the two survivors).
const MAX_ELECTION_CYCLES: usize = 8;

/// One node's broker, its AMQP listener, and a driver per address.
struct BrokerNode {
    broker: Arc<Broker>,
    url: String,
    drivers: BTreeMap<String, GroupDriver>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl BrokerNode {
    async fn start(c: &Cluster, n: NodeId, addresses: &[(&str, u64)]) -> BrokerNode {
        let dir = tempfile::tempdir().unwrap();
        let config = BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            ..BrokerConfig::default()
        };
        let broker = Broker::open(config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("amqp://{}", listener.local_addr().unwrap());
        let (stop, shutdown) = watch::channel(false);
        let serving = Serving {
            broker: Arc::clone(&broker),
            gate: Arc::new(Gatekeeper::default()),
            permits: Arc::new(Semaphore::new(16)),
            tls: None,
            door: None,
        };
        let server = tokio::spawn(serve(listener, serving, shutdown));
        let mut node = BrokerNode {
            broker,
            url,
            drivers: BTreeMap::new(),
            stop,
            server,
            _dir: dir,
        };
        for &(address, g) in addresses {
            node.drive(c, n, address, g).await;
        }
        node
    }

    /// (Re)starts the driver of `address` over host `n`'s replica of group `g` (what the
    /// group opener does when it opens the group).
    async fn drive(&mut self, c: &Cluster, n: NodeId, address: &str, g: u64) {
        if let Some(old) = self.drivers.remove(address) {
            old.stop().await;
        }
        let driver = GroupDriver::spawn(
            Arc::clone(&self.broker),
            address.to_owned(),
            c.handle_of(n, g),
            c.machine_of(n, g),
        );
        self.drivers.insert(address.to_owned(), driver);
    }

    /// Waits until the driver of `address` serves it; the term.
    async fn serving(&self, address: &str) -> u64 {
        let mut serving = self.drivers[address].serving();
        let term = within_for(WAIT, "serving", serving.wait_for(|t| t.is_some()))
            .await
            .unwrap();
        term.unwrap_or_default()
    }

    async fn shutdown(self) {
        for (_, d) in self.drivers {
            d.stop().await;
        }
        let _ = self.stop.send(true);
        let _ = within("server", self.server).await;
    }
}

async fn connect(
    url: &str,
) -> (
    fe2o3_amqp::connection::ConnectionHandle<()>,
    fe2o3_amqp::session::SessionHandle<()>,
) {
    let mut conn = within("open", Connection::open("group-driver", url))
        .await
        .unwrap();
    let session = within("begin", Session::begin(&mut conn)).await.unwrap();
    (conn, session)
}

async fn brokers(c: &Cluster, addresses: &[(&str, u64)]) -> BTreeMap<NodeId, BrokerNode> {
    let mut out = BTreeMap::new();
    for n in 0..NODES {
        out.insert(n, BrokerNode::start(c, n, addresses).await);
    }
    out
}

async fn attach_sender(
    session: &mut fe2o3_amqp::session::SessionHandle<()>,
    name: &str,
    address: &str,
) -> Sender {
    within("attach", Sender::attach(session, name, address))
        .await
        .unwrap()
}

async fn attach_receiver(
    session: &mut fe2o3_amqp::session::SessionHandle<()>,
    name: &str,
    address: &str,
) -> Receiver {
    within("attach", Receiver::attach(session, name, address))
        .await
        .unwrap()
}

/// A receiver that grants credit only when told: nothing is prefetched past what is
/// received.
async fn attach_manual(
    session: &mut fe2o3_amqp::session::SessionHandle<()>,
    name: &str,
    address: &str,
) -> Receiver {
    within(
        "attach",
        Receiver::builder()
            .name(name)
            .source(address)
            .credit_mode(CreditMode::Manual)
            .attach(session),
    )
    .await
    .unwrap()
}

/// Receives the next delivery, checks its body and accepts it.
async fn take(receiver: &mut Receiver, body: &str, why: &str) {
    let d = within("recv", receiver.recv::<String>()).await.unwrap();
    assert_eq!(d.body(), body, "{why}");
    within("accept", receiver.accept(&d)).await.unwrap();
}

async fn shutdown_all(nodes: BTreeMap<NodeId, BrokerNode>, c: Cluster) {
    for (_, n) in nodes {
        n.shutdown().await;
    }
    c.shutdown().await;
}

/// The link was detached by the broker with `amqp:link:detach-forced`.
fn forced(e: &LinkStateError) -> bool {
    let forced = ErrorCondition::LinkError(LinkError::DetachForced);
    matches!(e, LinkStateError::RemoteClosedWithError(err)
        | LinkStateError::RemoteDetachedWithError(err) if err.condition == forced)
}

fn recv_forced(e: &RecvError) -> bool {
    matches!(e, RecvError::LinkStateError(s) if forced(s))
}

fn send_forced(e: &SendError) -> bool {
    let condition = ErrorCondition::LinkError(LinkError::DetachForced);
    match e {
        SendError::LinkStateError(s) => forced(s),
        SendError::Detached(DetachError::RemoteDetachedWithError(err)) => {
            err.condition == condition
        }
        _ => false,
    }
}

async fn send_all(sender: &mut Sender, bodies: impl IntoIterator<Item = String>) {
    for body in bodies {
        let outcome = within("send", sender.send(body)).await.unwrap();
        assert!(outcome.is_accepted(), "{outcome:?}");
    }
}

/// Waits until every running replica of `g` has `offsets` acknowledged.
async fn acked_everywhere(c: &Cluster, g: u64, offsets: &[u64]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    for &n in c.nodes.keys() {
        let replica = GroupStore::new(ADDRESS, c.handle_of(n, g), c.machine_of(n, g));
        while !offsets.iter().all(|&o| replica.is_acked(o)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {n}: acks {offsets:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leaders_host_closes_the_new_leader_serves_every_committed_message() {
    within_for(TEST_TIMEOUT, "test", async {
        let mut c = Cluster::start().await;
        let old = c.leader_id().await;
        let mut nodes = brokers(&c, &[(ADDRESS, GROUP)]).await;
        nodes[&old].serving(ADDRESS).await;
        let (_conn, mut session) = connect(&nodes[&old].url).await;
        let mut sender = attach_sender(&mut session, "s", ADDRESS).await;
        send_all(&mut sender, (0..6).map(|i| format!("m{i}"))).await;
        let mut receiver = attach_manual(&mut session, "r", ADDRESS).await;
        for i in 0..2 {
            within("credit", receiver.set_credit(1)).await.unwrap();
            take(&mut receiver, &format!("m{i}"), "in order").await;
        }
        acked_everywhere(&c, GROUP, &[0, 1]).await;
        // m2 is out, unsettled, when the host goes.
        within("credit", receiver.set_credit(1)).await.unwrap();
        let unsettled = within("recv", receiver.recv::<String>()).await.unwrap();
        assert_eq!(unsettled.body(), "m2");
        c.stop(old).await;
        // The consumer on the old node is detached once its lease cannot be renewed;
        // until then it receives nothing (the lease lapsed with the quorum).
        let detached = within_for(WAIT, "detached", receiver.recv::<String>()).await;
        assert!(
            matches!(&detached, Err(e) if recv_forced(e)),
            "{:?}",
            detached.map(|d| d.body().clone())
        );
        let new = c.leader_id().await;
        assert_ne!(new, old);
        nodes[&new].serving(ADDRESS).await;
        let (_conn2, mut session2) = connect(&nodes[&new].url).await;
        let mut receiver2 = attach_receiver(&mut session2, "r2", ADDRESS).await;
        for i in 2..6 {
            take(&mut receiver2, &format!("m{i}"), "in order").await;
        }
        acked_everywhere(&c, GROUP, &[2, 3, 4, 5]).await;
        let old_node = nodes.remove(&old).unwrap();
        let old_driver = &old_node.drivers[ADDRESS];
        assert_eq!(old_driver.stats().activations.load(Ordering::Relaxed), 1);
        assert_eq!(old_driver.stats().deactivations.load(Ordering::Relaxed), 1);
        old_node.shutdown().await;
        shutdown_all(nodes, c).await;
    })
    .await
}

/// openraft keeps a leader cut off from both followers Leader; its lease runs out within
/// LEASE, and from then on its consumers receive nothing, even with credit and messages
/// ready — until the driver gives up and detaches them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_followers_delivers_nothing_once_its_lease_ran_out() {
    within_for(TEST_TIMEOUT, "test", async {
        let mut c = Cluster::start().await;
        let leader = c.leader_id().await;
        let nodes = brokers(&c, &[(ADDRESS, GROUP)]).await;
        nodes[&leader].serving(ADDRESS).await;
        let timing = LeaseTiming::for_vote_refusal(c.handle(leader).leader_lease());
        let (_conn, mut session) = connect(&nodes[&leader].url).await;
        let mut sender = attach_sender(&mut session, "s", ADDRESS).await;
        send_all(&mut sender, (0..10).map(|i| format!("m{i}"))).await;
        let mut receiver = attach_manual(&mut session, "r", ADDRESS).await;
        within("credit", receiver.set_credit(1)).await.unwrap();
        take(&mut receiver, "m0", "in order").await;
        // Its ack committed: no proposal is left to fail (a failed store also deactivates).
        acked_everywhere(&c, GROUP, &[0]).await;
        for n in (0..NODES).filter(|&n| n != leader) {
            c.stop(n).await;
        }
        let cut = tokio::time::Instant::now();
        // Past the lease (plus a margin for the last round's answer): it still believes
        // it leads, and the driver has not given up yet (it waits two leases).
        tokio::time::sleep_until(cut + timing.lease + Duration::from_millis(150)).await;
        assert!(c.handle(leader).leadership().borrow().leads, "still Leader");
        within("credit", receiver.set_credit(5)).await.unwrap();
        // Nothing comes; the link is detached once the driver gives up.
        let after = within_for(WAIT, "detached", receiver.recv::<String>()).await;
        let got = after.as_ref().map(|d| d.body().clone());
        assert!(matches!(&after, Err(e) if recv_forced(e)), "{got:?}");
        let lapses = nodes[&leader].drivers[ADDRESS]
            .stats()
            .lease_lapses
            .load(Ordering::Relaxed);
        assert!(lapses >= 1, "the lapse is counted");
        shutdown_all(nodes, c).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivating_one_address_leaves_the_other_addresses_links_on_the_connection_working() {
    within_for(TEST_TIMEOUT, "test", async {
        let (ga, gb) = (1, 2);
        let c = Cluster::start_with(&[ga, gb]).await;
        let leader = c.leader_of(ga).await;
        assert_eq!(
            c.leader_of(gb).await,
            leader,
            "both groups formed by node 0"
        );
        let nodes = brokers(&c, &[("a", ga), ("b", gb)]).await;
        nodes[&leader].serving("a").await;
        nodes[&leader].serving("b").await;
        let (_conn, mut session) = connect(&nodes[&leader].url).await;
        let mut to_a = attach_sender(&mut session, "sa", "a").await;
        let mut to_b = attach_sender(&mut session, "sb", "b").await;
        let mut from_a = attach_receiver(&mut session, "ra", "a").await;
        let mut from_b = attach_receiver(&mut session, "rb", "b").await;
        send_all(&mut to_b, ["b0".to_owned()]).await;
        take(&mut from_b, "b0", "in order").await;
        // Group a's replica leaves this host: a's lease cannot be renewed here any more.
        assert!(c.nodes[&leader].host.close_group(ga).await);
        // A's producer is told to go elsewhere: its transfer is never accepted here.
        let late = within_for(WAIT, "late send", to_a.send("a-late".to_owned())).await;
        assert!(matches!(&late, Err(e) if send_forced(e)), "{late:?}");
        let detached = within_for(WAIT, "detached", from_a.recv::<String>()).await;
        assert!(
            matches!(&detached, Err(e) if recv_forced(e)),
            "{:?}",
            detached.map(|_| ())
        );
        // b's producer and consumer, on the same session, go on.
        send_all(&mut to_b, ["b1".to_owned()]).await;
        take(&mut from_b, "b1", "in order").await;
        let b = &nodes[&leader].drivers["b"];
        assert_eq!(b.stats().deactivations.load(Ordering::Relaxed), 0);
        shutdown_all(nodes, c).await;
    })
    .await
}

/// A node deposed and elected again serves the address from a fresh activation (a new
/// store and queue on the same broker): what its consumer settled before is not
/// delivered again, what it left unsettled is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_elected_node_activates_afresh_and_redelivers_nothing_settled() {
    within_for(TEST_TIMEOUT, "test", async {
        let mut c = Cluster::start().await;
        let first = c.leader_id().await;
        let mut nodes = brokers(&c, &[(ADDRESS, GROUP)]).await;
        let term = nodes[&first].serving(ADDRESS).await;
        {
            let (_conn, mut session) = connect(&nodes[&first].url).await;
            let mut sender = attach_sender(&mut session, "s", ADDRESS).await;
            send_all(&mut sender, (0..6).map(|i| format!("m{i}"))).await;
            let mut receiver = within(
                "attach",
                Receiver::builder()
                    .name("r")
                    .source(ADDRESS)
                    .receiver_settle_mode(ReceiverSettleMode::Second)
                    .attach(&mut session),
            )
            .await
            .unwrap();
            for i in 0..3 {
                take(&mut receiver, &format!("m{i}"), "in order").await;
            }
            // Settled: its acknowledgements are committed (fe2o3's `accept` does not wait
            // for the broker's settlement).
            acked_everywhere(&c, GROUP, &[0, 1, 2]).await;
        }
        // Depose `first`, then move the leadership until `first` is elected again. A
        // stopped leader is restarted only once another leads in a higher term (openraft
        // 0.9 restores a node with its own committed vote as Leader of that old term).
        let (mut leader, mut elected_in) = (first, term);
        let mut again = false;
        for _ in 0..MAX_ELECTION_CYCLES {
            c.stop(leader).await;
            let (next, next_term) = c.agreed_leader(elected_in).await;
            c.start_again(leader).await;
            nodes
                .get_mut(&leader)
                .unwrap()
                .drive(&c, leader, ADDRESS, GROUP)
                .await;
            elected_in = next_term;
            if next == first {
                again = true;
                break;
            }
            leader = next;
        }
        assert!(
            again,
            "node {first} not elected again in {MAX_ELECTION_CYCLES} changes"
        );
        let new_term = nodes[&first].serving(ADDRESS).await;
        assert_eq!(
            new_term, elected_in,
            "a new leadership: {term} -> {new_term}"
        );
        let (_conn, mut session) = connect(&nodes[&first].url).await;
        let mut receiver = attach_receiver(&mut session, "r2", ADDRESS).await;
        for i in 3..6 {
            take(
                &mut receiver,
                &format!("m{i}"),
                "nothing settled comes again",
            )
            .await;
        }
        acked_everywhere(&c, GROUP, &[0, 1, 2, 3, 4, 5]).await;
        shutdown_all(nodes, c).await;
    })
    .await
}

/// With hibernation on, a group whose queue has a consumer stays awake (each lease round
/// touches it) while an idle group beside it, served by the same node, sleeps; a message
/// to the sleeping one wakes it and is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumed_group_stays_awake_while_an_idle_one_hibernates() {
    within_for(TEST_TIMEOUT, "test", async {
        let quiesce_after = Duration::from_millis(300);
        let hibernation = HibernationConfig {
            quiesce_after,
            check_interval: Duration::from_millis(100),
            liveness_interval: Duration::from_millis(100),
            // Raised by the host to its longest election timeout.
            liveness_timeout: Duration::from_millis(100),
        };
        let (ga, gb) = (1, 2);
        let c = Cluster::start_hibernating(&[ga, gb], Some(hibernation)).await;
        let leader = c.leader_of(ga).await;
        assert_eq!(
            c.leader_of(gb).await,
            leader,
            "both groups formed by node 0"
        );
        let nodes = brokers(&c, &[("a", ga), ("b", gb)]).await;
        nodes[&leader].serving("a").await;
        nodes[&leader].serving("b").await;
        let (_conn, mut session) = connect(&nodes[&leader].url).await;
        let mut from_a = attach_receiver(&mut session, "ra", "a").await;
        // Idle b sleeps on every host; consumed a never stops on its leader.
        let deadline = tokio::time::Instant::now() + WAIT;
        while c.nodes.keys().any(|&n| c.handle_of(n, gb).is_running()) {
            assert!(tokio::time::Instant::now() < deadline, "b never slept");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(quiesce_after * 10).await;
        assert!(
            c.handle_of(leader, ga).is_running(),
            "a consumed group stays awake"
        );
        let stops = c.nodes[&leader].host.hibernation_counters().stops;
        assert_eq!(stops, 1, "only b stopped on the leader");
        // A message to the sleeping b wakes it; one to a is delivered as ever.
        let mut to_b = attach_sender(&mut session, "sb", "b").await;
        send_all(&mut to_b, ["b0".to_owned()]).await;
        let mut to_a = attach_sender(&mut session, "sa", "a").await;
        send_all(&mut to_a, ["a0".to_owned()]).await;
        take(&mut from_a, "a0", "in order").await;
        let mut from_b = attach_receiver(&mut session, "rb", "b").await;
        take(&mut from_b, "b0", "in order").await;
        shutdown_all(nodes, c).await;
    })
    .await
}
