//! Goal: with `--link-routing forward`, a consumer that does not follow redirects attaches
//! on a node that does not lead its address and is served there from the leader's queue:
//! every message in order, exactly once, with a small credit and a large one; never more
//! deliveries than its credit; what it left unsettled comes again when its link closes,
//! and — from the leader's idle release — when its node vanishes (SIGKILL). When the
//! leader is SIGKILLed or SIGSTOPped mid-run, the forwarded consumer link is detached
//! `amqp:link:detach-forced` within the producer side's bounds, attaching again on the
//! same node is served (by the new leader), no accepted message is lost, and a message
//! comes twice only if the consumer was never told it was settled. An acceptance recorded
//! while its link was being detached is *in doubt* (never settled back, never delivered
//! again): the fault phase ends on every message received and an empty drain, not on
//! every settlement.
//! Method: three `entrepot serve --cluster-mode groups --link-routing forward` processes
//! on loopback (`cluster_support::Cluster`), fe2o3 clients; the consumer never follows a
//! redirect and settles second (`accept` returns once the broker settled back). Every
//! wait is bounded; detach latencies are printed and held to liveness bounds only.
//! Mutation-checked: see ARCHITECTURE.md ("Link-level forwarding", consumer links).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::definitions::ReceiverSettleMode;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, DistributionMode, Message, Outcome, Source,
};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::Receiver;
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;

use crate::cluster::runtime;
use crate::cluster_groups::{
    follow, leader_of, led, send, session, start_groups_cluster, try_sender, wait_until, Attached,
    MAX_HOPS, READY_TIMEOUT, STEP,
};
use crate::cluster_support::Cluster;
use crate::raw_client::Client;

const NODES: u64 = 3;
/// Messages of each in-order phase.
const BATCH: u32 = 60;
/// Messages of the fault phase.
const FAULT_MESSAGES: u32 = 1000;
/// Accepted in the fault phase before the leader fails.
const FAULT_AFTER: usize = 40;
/// Longest the fault phase may take in all.
const PHASE_MAX: Duration = Duration::from_secs(60);
/// Liveness bound on the detach after a SIGKILL (as for forwarded producers).
const KILL_DETACH_MAX: Duration = Duration::from_secs(5);
/// Bound on the detach after a SIGSTOP: below the reply timeout, so only the replica's
/// leadership watch meets it (as for forwarded producers).
const STOP_DETACH_MAX: Duration = Duration::from_millis(3500);
const _: () = assert!(
    STOP_DETACH_MAX.as_millis()
        < entrepot::raft::link_forward::FORWARD_REPLY_TIMEOUT_WATCHED.as_millis()
);
/// Longest the fault phase's consumer waits for a frame after attaching again: a liveness
/// bound of the groups failover, not of the forward.
const SERVED_AGAIN_MAX: Duration = Duration::from_secs(25);
/// Bound on the return of a vanished forwarder's deliveries: the leader's idle release
/// plus a loaded machine's slack.
const VANISH_MAX: Duration = Duration::from_secs(
    entrepot::raft::link_forward::FORWARDED_CONSUMER_IDLE_TIMEOUT.as_secs() + 15,
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
}

/// Three forward-mode nodes and `address` led by its preferred leader:
/// `(cluster, leader, a node that does not lead it)`.
fn cluster_with(address: &str) -> (Cluster, u64, u64) {
    let rt = runtime();
    let cluster = start_groups_cluster(NODES, &["--link-routing", "forward"], READY_TIMEOUT);
    let all: Vec<u64> = (0..NODES).collect();
    rt.block_on(async {
        let (_, sender, mut c, _s) = follow!(try_sender, cluster.amqp(0).to_string(), address);
        let _ = sender.close().await;
        let _ = c.close().await;
    });
    wait_until(
        "the address led by its preferred leader",
        READY_TIMEOUT,
        || {
            let leaders = led(&cluster);
            leaders.values().flatten().any(|a| a == address)
                && crate::cluster_forward::preferred_leader(&cluster, &all, address)
                    == Some(leader_of(&leaders, address))
        },
    );
    let leader = leader_of(&led(&cluster), address);
    let other = all.iter().copied().find(|&n| n != leader).unwrap();
    (cluster, leader, other)
}

/// Sends `from..to` to `address` through `at` (forwarded when `at` does not lead it).
async fn produce(at: String, address: &str, from: u32, to: u32) {
    let (_, mut sender, mut c, _s) = follow!(try_sender, at, address);
    send(&mut sender, from, to).await;
    let _ = sender.close().await;
    let _ = c.close().await;
}

/// Sends `m0..m<to>` to `address` through `at`, one outcome at a time; a link detached
/// under it (its leadership moved on a loaded machine) is attached again and the message
/// without an outcome sent again. Returns the messages sent again: the detach says "not
/// stored (or their outcome is unknown)", so each may be stored twice.
async fn produce_resending(at: String, address: &str, to: u32) -> BTreeSet<u32> {
    const ATTEMPTS: u32 = 10;
    let mut next = 0;
    let mut resent = BTreeSet::new();
    for attempt in 1..=ATTEMPTS {
        let (_, mut sender, mut c, _s) = follow!(try_sender, at.clone(), address);
        while next < to {
            match tokio::time::timeout(STEP, sender.send(format!("m{next}"))).await {
                Ok(Ok(Outcome::Accepted(_))) => next += 1,
                Ok(Ok(other)) => panic!("m{next}: {other:?}"),
                Ok(Err(e)) if attempt < ATTEMPTS => {
                    println!("m{next}: {e:?}; attaching again");
                    resent.insert(next);
                    break;
                }
                Ok(Err(e)) => panic!("m{next}: {e:?} (attempt {attempt})"),
                Err(_) => panic!("m{next}: no outcome within {STEP:?}"),
            }
        }
        let _ = sender.close().await;
        let _ = c.close().await;
        if next == to {
            break;
        }
    }
    resent
}

/// A receiver on `at` that settles second; `Err`: the attach's refusal.
async fn receiver_at(
    at: &str,
    address: &str,
    name: &str,
    credit: CreditMode,
) -> Result<
    (
        Receiver,
        fe2o3_amqp::connection::ConnectionHandle<()>,
        fe2o3_amqp::session::SessionHandle<()>,
    ),
    String,
> {
    let (c, mut s) = session(at).await;
    let attach = Receiver::builder()
        .name(name)
        .source(address)
        .receiver_settle_mode(ReceiverSettleMode::Second)
        .credit_mode(credit)
        .attach(&mut s);
    match tokio::time::timeout(STEP, attach)
        .await
        .expect("attach in time")
    {
        Ok(r) => Ok((r, c, s)),
        Err(e) => Err(format!("{e:?}")),
    }
}

fn number(body: &str) -> u32 {
    body.trim_start_matches('m')
        .parse()
        .expect("a test message")
}

/// Receives and accepts `from..to` in order on `r`, then nothing more.
async fn consume_in_order(r: &mut Receiver, from: u32, to: u32) {
    for i in from..to {
        let d = tokio::time::timeout(STEP, r.recv::<String>())
            .await
            .unwrap_or_else(|_| panic!("m{i} not received in time"))
            .expect("recv");
        assert_eq!(d.body(), &format!("m{i}"), "in order, exactly once");
        tokio::time::timeout(STEP, r.accept(&d))
            .await
            .expect("accept in time")
            .expect("accept");
    }
    let extra = tokio::time::timeout(Duration::from_millis(500), r.recv::<String>()).await;
    assert!(extra.is_err(), "each message once: {extra:?}");
}

#[test]
fn a_consumer_on_a_node_that_does_not_lead_its_address_is_served_there() {
    const ADDRESS: &str = "fwc-order";
    let rt = runtime();
    let (cluster, leader, other) = cluster_with(ADDRESS);
    let other_amqp = cluster.amqp(other).to_string();
    let leader_amqp = cluster.amqp(leader).to_string();
    rt.block_on(async {
        // A small credit, then a large one: in order, exactly once, no redirect.
        for (i, credit) in [(0, 10), (1, 500)] {
            produce(leader_amqp.clone(), ADDRESS, i * BATCH, (i + 1) * BATCH).await;
            let (mut r, mut c, _s) = receiver_at(
                &other_amqp,
                ADDRESS,
                &format!("fwc-{i}"),
                CreditMode::Auto(credit),
            )
            .await
            .expect("attached on a node that does not lead the address");
            consume_in_order(&mut r, i * BATCH, (i + 1) * BATCH).await;
            let _ = r.close().await;
            let _ = c.close().await;
        }
    });
    let delivered = cluster.metric(other, "entrepot_forwarded_deliveries_total");
    assert_eq!(
        delivered,
        Some(f64::from(2 * BATCH)),
        "node {other} fetched them"
    );
    wait_until("closed links given back on the leader", STEP, || {
        cluster.metric(leader, "entrepot_forwarded_consumers_served") == Some(0.0)
    });

    // Credit honoured end to end; what the link held unsettled comes again after it closes.
    rt.block_on(produce(leader_amqp.clone(), ADDRESS, 2 * BATCH, 3 * BATCH));
    rt.block_on(async {
        let (mut r, mut c, _s) =
            receiver_at(&other_amqp, ADDRESS, "fwc-credit", CreditMode::Manual)
                .await
                .expect("attached");
        r.set_credit(10).await.expect("credit");
        let mut held = Vec::new();
        for _ in 0..10 {
            let d = tokio::time::timeout(STEP, r.recv::<String>())
                .await
                .expect("within credit in time")
                .expect("recv");
            held.push(number(d.body()));
        }
        assert_eq!(held, (2 * BATCH..2 * BATCH + 10).collect::<Vec<_>>());
        let more = tokio::time::timeout(Duration::from_secs(1), r.recv::<String>()).await;
        assert!(more.is_err(), "a delivery beyond the credit: {more:?}");
        assert_eq!(
            cluster.metric(other, "entrepot_forwarded_consumer_links"),
            Some(1.0)
        );
        // Closed with ten deliveries unsettled: they come again, first, in order.
        let _ = r.close().await;
        let _ = c.close().await;
        let (mut r, mut c, _s) =
            receiver_at(&other_amqp, ADDRESS, "fwc-again", CreditMode::Auto(10))
                .await
                .expect("attached");
        consume_in_order(&mut r, 2 * BATCH, 3 * BATCH).await;
        let _ = r.close().await;
        let _ = c.close().await;
    });

    // A selector is applied by the leader's queue; browsing is refused, naming why.
    rt.block_on(async {
        publish_colored(&leader_amqp, ADDRESS, 6).await;
        let (_c, mut s) = session(&other_amqp).await;
        let selector = Described {
            descriptor: Descriptor::Code(0x0000_468C_0000_0004),
            value: Value::String("color = 'red'".into()),
        };
        let source = Source::builder()
            .address(ADDRESS)
            .add_to_filter("apache.org:selector-filter:string", selector)
            .build();
        let attach = Receiver::builder()
            .name("fwc-red")
            .source(source)
            .attach(&mut s);
        let mut r = tokio::time::timeout(STEP, attach)
            .await
            .expect("in time")
            .expect("a selective consumer attached through the forward");
        for expected in ["c0", "c2", "c4"] {
            let d = tokio::time::timeout(STEP, r.recv::<String>())
                .await
                .expect("in time")
                .expect("recv");
            assert_eq!(d.body(), expected, "only the red ones, in order");
            r.accept(&d).await.expect("accept");
        }
        let extra = tokio::time::timeout(Duration::from_millis(500), r.recv::<String>()).await;
        assert!(extra.is_err(), "a blue one through the selector: {extra:?}");
        let _ = r.close().await;
        let browse = Source::builder()
            .address(ADDRESS)
            .distribution_mode(DistributionMode::Copy)
            .build();
        let attach = Receiver::builder()
            .name("fwc-browse")
            .source(browse)
            .attach(&mut s);
        let refused = tokio::time::timeout(STEP, attach)
            .await
            .expect("in time")
            .expect_err("browsing through a forward is refused");
        let refused = format!("{refused:?}");
        assert!(
            refused.contains("NotImplemented") && refused.contains("browsing"),
            "{refused}"
        );
    });

    // A drain is answered from the leader's queue, not from the empty shadow: the three
    // blue ones the selector left, then the rest of the credit used up.
    rt.block_on(async {
        use fe2o3_amqp::types::performatives::Performative;
        let mut c = Client::open(cluster.amqp(other))
            .await
            .expect("raw connect");
        let answer = c.attach_receiver(0, "fwc-drain", ADDRESS).await;
        assert!(answer.source.is_some(), "attached");
        c.flow(0, 0, 5, true).await;
        let mut transfers = 0;
        let drained = loop {
            let f = tokio::time::timeout(STEP, c.next_frame())
                .await
                .expect("deliveries and the drain's flow in time");
            match f.performative {
                Performative::Transfer(_) => transfers += 1,
                Performative::Flow(fl) if fl.handle.is_some() && fl.drain => break fl,
                _ => {}
            }
        };
        assert_eq!(transfers, 3, "the leader's messages before the drain ends");
        assert_eq!(drained.delivery_count, Some(5), "the credit used up");
    });
}

/// Sends `c0..c<n>` to `address` through `at`, the even ones `color = 'red'`.
async fn publish_colored(at: &str, address: &str, n: u32) {
    let (_, mut sender, mut c, _s) = follow!(try_sender, at.to_owned(), address);
    for i in 0..n {
        let color = if i % 2 == 0 { "red" } else { "blue" };
        let msg = Message::builder()
            .application_properties(
                ApplicationProperties::builder()
                    .insert("color", color)
                    .build(),
            )
            .value(format!("c{i}"))
            .build();
        let outcome = tokio::time::timeout(STEP, sender.send(msg))
            .await
            .expect("outcome in time")
            .expect("send");
        assert!(matches!(outcome, Outcome::Accepted(_)), "c{i}: {outcome:?}");
    }
    let _ = sender.close().await;
    let _ = c.close().await;
}

#[test]
fn a_vanished_forwarding_node_s_deliveries_go_back_to_the_leader_s_queue() {
    const ADDRESS: &str = "fwc-vanish";
    let rt = runtime();
    let (mut cluster, leader, other) = cluster_with(ADDRESS);
    let third = (0..NODES).find(|&n| n != leader && n != other).unwrap();
    let leader_amqp = cluster.amqp(leader).to_string();
    rt.block_on(produce(leader_amqp.clone(), ADDRESS, 0, 20));
    let (held, _keep) = rt.block_on(async {
        let (mut r, c, s) = receiver_at(
            &cluster.amqp(other).to_string(),
            ADDRESS,
            "fwc-v",
            CreditMode::Manual,
        )
        .await
        .expect("attached");
        r.set_credit(5).await.expect("credit");
        let mut held = Vec::new();
        for _ in 0..5 {
            let d = tokio::time::timeout(STEP, r.recv::<String>())
                .await
                .expect("in time")
                .expect("recv");
            held.push(number(d.body()));
        }
        (held, (r, c, s))
    });
    assert_eq!(held, vec![0, 1, 2, 3, 4]);
    // The forwarding node dies without a word: only the leader's idle release returns them.
    let killed = Instant::now();
    cluster.kill(other);
    let got = rt.block_on(async {
        let (mut r, mut c, _s) = receiver_at(
            &cluster.amqp(third).to_string(),
            ADDRESS,
            "fwc-v2",
            CreditMode::Auto(20),
        )
        .await
        .expect("attached on the third node");
        let mut got = Vec::new();
        while got.len() < 20 {
            let d = tokio::time::timeout(VANISH_MAX, r.recv::<String>())
                .await
                .unwrap_or_else(|_| panic!("only {got:?} within {VANISH_MAX:?}"))
                .expect("recv");
            tokio::time::timeout(STEP, r.accept(&d))
                .await
                .expect("accept in time")
                .expect("accept");
            got.push(number(d.body()));
        }
        let _ = r.close().await;
        let _ = c.close().await;
        got
    });
    println!(
        "a vanished forwarder's deliveries back {:?} after its SIGKILL",
        killed.elapsed()
    );
    let all: BTreeSet<u32> = got.iter().copied().collect();
    assert_eq!(
        all,
        (0..20).collect::<BTreeSet<_>>(),
        "each message once: {got:?}"
    );
    assert_eq!(
        cluster.metric(leader, "entrepot_forwarded_consumers_released_total"),
        Some(1.0)
    );
}

#[test]
fn a_forwarded_consumer_is_detached_and_served_again_across_a_leader_kill() {
    across(Fault::Kill, "fwc-kill");
}

#[test]
fn a_forwarded_consumer_is_detached_and_served_again_when_its_leader_hangs() {
    across(Fault::Stop, "fwc-stop");
}

/// What the consumer of the fault phase saw.
#[derive(Default)]
struct Consumed {
    /// Messages the broker settled back (accepted, its acknowledgement committed).
    settled: BTreeSet<u32>,
    /// Every message received, in order.
    received: Vec<u32>,
    /// Messages received again after the broker had settled them.
    after_settled: Vec<u32>,
    detaches: Vec<(Instant, String)>,
    /// A drain, after every message was received, found nothing left on the queue.
    drained_empty: bool,
}

impl Consumed {
    /// Different messages received.
    fn distinct_received(&self) -> usize {
        self.received.iter().collect::<BTreeSet<_>>().len()
    }
}

fn across(fault: Fault, address: &str) {
    let rt = runtime();
    let (mut cluster, leader, other) = cluster_with(address);
    let resent = rt.block_on(produce_resending(
        cluster.amqp(leader).to_string(),
        address,
        FAULT_MESSAGES,
    ));
    // A loaded machine may have moved the leadership meanwhile: fault whoever leads now,
    // consume through a node that does not.
    wait_until("the address led", READY_TIMEOUT, || {
        led(&cluster).values().flatten().any(|a| a == address)
    });
    let leader = leader_of(&led(&cluster), address);
    let other = match other == leader {
        false => other,
        true => (0..NODES).find(|&n| n != leader).expect("another node"),
    };
    let other_amqp = cluster.amqp(other);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Consumed::default()));
    let consumer = rt.spawn(consume_through(
        other_amqp,
        address.to_owned(),
        seen.clone(),
    ));
    wait_until("messages settled before the fault", PHASE_MAX, || {
        seen.lock().unwrap().settled.len() >= FAULT_AFTER
    });
    let faulted = Instant::now();
    match fault {
        Fault::Kill => cluster.kill(leader),
        Fault::Stop => cluster.freeze(leader, true),
    }
    rt.block_on(async {
        tokio::time::timeout(PHASE_MAX, consumer)
            .await
            .expect("fault phase in time")
            .expect("consumer");
    });
    let c = std::mem::take(&mut *seen.lock().unwrap());
    let (at, error) = c
        .detaches
        .iter()
        .find(|(at, _)| *at >= faulted)
        .cloned()
        .expect("the forwarded consumer was detached after the fault");
    let took = at - faulted;
    println!("forwarded consumer detached {took:?} after its leader's {fault:?}: {error}");
    let max = match fault {
        Fault::Kill => KILL_DETACH_MAX,
        Fault::Stop => STOP_DETACH_MAX,
    };
    assert!(took < max, "detached only after {took:?} (bound {max:?})");
    assert!(error.contains("DetachForced"), "{error}");
    // (A message sent twice by the producer may be received twice: not counted.)
    let again: Vec<u32> = c
        .after_settled
        .iter()
        .copied()
        .filter(|n| !resent.contains(n))
        .collect();
    assert!(
        again.is_empty(),
        "received again though the broker had settled them: {again:?}"
    );
    // Nothing lost: every message came (the queue was drained empty in the end).
    let received: BTreeSet<u32> = c.received.iter().copied().collect();
    let lost: Vec<u32> = (0..FAULT_MESSAGES)
        .filter(|n| !received.contains(n))
        .collect();
    assert!(lost.is_empty(), "never received: {lost:?}");
    assert!(c.drained_empty, "the queue drained empty");
    println!(
        "{} accepted but in doubt (recorded while their link was detached: never settled \
         back, never delivered again)",
        FAULT_MESSAGES as usize - c.settled.len()
    );
    let mut first = BTreeSet::new();
    let order: Vec<u32> = c
        .received
        .iter()
        .copied()
        .filter(|n| first.insert(*n))
        .collect();
    println!(
        "{} deliveries again (not settled at the fault)",
        c.received.len() - order.len()
    );
    assert!(order.windows(2).all(|w| w[0] < w[1]), "in order: {order:?}");
    if fault == Fault::Stop {
        cluster.kill(leader);
    }
}

/// The number of a test message (`m<n>` in an amqp-value string) in raw message bytes.
fn raw_number(payload: &[u8]) -> u32 {
    let at = payload
        .windows(4)
        .position(|w| w == b"\x00\x53\x77\xa1")
        .expect("an amqp-value str8 body");
    let len = usize::from(payload[at + 4]);
    let body = std::str::from_utf8(&payload[at + 5..at + 5 + len]).expect("UTF-8 body");
    number(body)
}

/// Credit the raw consumer keeps granted.
const RAW_CREDIT: u32 = 10;

/// Consumes with receiver-settle-mode second through `at` (raw client: it sees the
/// broker's settlements), attaching again on the same node after a detach (never
/// following a redirect), until it received every message and then a drain found nothing
/// left: every delivery of the last link settled back and the address's queue empty.
///
/// Why not "until the broker settled every message": an acceptance whose acknowledgement
/// committed while its link was being detached (the leader died or deposed mid-answer) is
/// recorded but its settlement never reaches the client — *in doubt*, as in every broker
/// without link recovery — and is not delivered again. Waiting for its settlement would
/// wait for ever; it was received, and the final empty drain shows nothing is left.
async fn consume_through(
    at: std::net::SocketAddr,
    address: String,
    seen: std::sync::Arc<std::sync::Mutex<Consumed>>,
) {
    use fe2o3_amqp::types::definitions::Role;
    use fe2o3_amqp::types::messaging::{Accepted, DeliveryState};
    use fe2o3_amqp::types::performatives::{Disposition, Performative};
    let deadline = Instant::now() + PHASE_MAX;
    while !seen.lock().unwrap().drained_empty {
        assert!(
            Instant::now() < deadline,
            "fault phase not done within {PHASE_MAX:?}"
        );
        let Ok(Ok(mut c)) = tokio::time::timeout(STEP, Client::open(at)).await else {
            panic!("node {at} does not answer");
        };
        let answer = tokio::time::timeout(
            STEP,
            c.attach_receiver_settling(0, 0, "fwc-f", &address, ReceiverSettleMode::Second),
        )
        .await
        .expect("attach answered in time");
        if answer.source.is_none() {
            // Refused while the address has no leader: attach again.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        // Delivery id → message number, and the ids not settled back yet, on this link.
        let mut numbers: std::collections::HashMap<u32, u32> = Default::default();
        let mut outstanding: BTreeSet<u32> = BTreeSet::new();
        let (mut count, mut credit) = (0u32, RAW_CREDIT);
        // `Some(n)`: a drain is out, `n` transfers came since it was sent.
        let mut draining: Option<u32> = None;
        c.flow(0, 0, RAW_CREDIT, false).await;
        loop {
            let Ok(f) = tokio::time::timeout(SERVED_AGAIN_MAX, c.next_frame()).await else {
                let s = seen.lock().unwrap();
                panic!(
                    "neither a delivery, a settlement, a drain's answer nor a detach within \
                     {SERVED_AGAIN_MAX:?} ({} of {FAULT_MESSAGES} received, {} on this link \
                     not settled back, drain out: {draining:?})",
                    s.distinct_received(),
                    outstanding.len()
                );
            };
            match f.performative {
                Performative::Transfer(t) => {
                    let id = t.delivery_id.expect("a delivery id");
                    let n = raw_number(&f.payload);
                    numbers.insert(id, n);
                    outstanding.insert(id);
                    {
                        let mut s = seen.lock().unwrap();
                        if s.settled.contains(&n) {
                            s.after_settled.push(n);
                        }
                        s.received.push(n);
                    }
                    let accept = Disposition {
                        role: Role::Receiver,
                        first: id,
                        last: None,
                        settled: false,
                        state: Some(DeliveryState::Accepted(Accepted {})),
                        batchable: false,
                    };
                    c.send_on(0, &Performative::Disposition(accept), &[]).await;
                    count = count.wrapping_add(1);
                    credit = credit.saturating_sub(1);
                    match draining.as_mut() {
                        Some(since) => *since += 1,
                        None if credit <= RAW_CREDIT / 2 => {
                            credit = RAW_CREDIT;
                            c.flow(0, count, RAW_CREDIT, false).await;
                        }
                        None => {}
                    }
                }
                Performative::Disposition(d) if d.role == Role::Sender && d.settled => {
                    let mut s = seen.lock().unwrap();
                    for id in d.first..=d.last.unwrap_or(d.first) {
                        outstanding.remove(&id);
                        if let Some(n) = numbers.get(&id) {
                            s.settled.insert(*n);
                        }
                    }
                }
                Performative::Flow(fl) if fl.handle.is_some() && fl.drain => {
                    // The drain's answer: the credit used up, by deliveries or not.
                    let since = draining.take().unwrap_or(0);
                    if since == 0 && outstanding.is_empty() {
                        seen.lock().unwrap().drained_empty = true;
                        break;
                    }
                    count = fl.delivery_count.unwrap_or(count);
                    credit = RAW_CREDIT;
                    c.flow(0, count, RAW_CREDIT, false).await;
                }
                Performative::Detach(d) => {
                    let why = format!("{:?}", d.error);
                    seen.lock().unwrap().detaches.push((Instant::now(), why));
                    // Not a tight loop while this node still names the dead leader.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
                _ => {}
            }
            // Every message received and this link's settled back: is anything left?
            let received_all = seen.lock().unwrap().distinct_received() == FAULT_MESSAGES as usize;
            if received_all && outstanding.is_empty() && draining.is_none() {
                draining = Some(0);
                c.flow(0, count, RAW_CREDIT, true).await;
            }
        }
    }
}
