//! Goal: with `--link-routing forward`, a producer that does not follow redirects attaches
//! on a node that does not lead its address and is served there: each message is stored
//! by the address's leader (over the nodes' peer connection) before the client hears
//! `accepted`; a consumer receives them all, in order, exactly once. When the leader is
//! SIGKILLed — or SIGSTOPped, a hung node whose sockets stay open — mid-run, the
//! forwarded link is detached `amqp:link:detach-forced` (the client never hangs; after a
//! SIGSTOP within the election timeout and below the reply timeout, so by the replica's
//! leadership watch), attaching again on the same node is served (forwarded to the new
//! leader), and no accepted message is lost; a message sent twice is only one whose
//! outcome the client never learned. A forwarded link with nothing in flight is detached
//! the same way, without sending anything.
//! Method: three `entrepot serve --cluster-mode groups --link-routing forward` processes
//! on loopback (`cluster_support::Cluster`), fe2o3 clients; the producer never follows a
//! redirect, the consumer does (consumer links are redirected in this mode). Every wait
//! is bounded; the time from the SIGKILL to the detach is printed and held to a
//! liveness bound only.
//! Mutation-checked: the carrier confirming a batch before the leader's answer
//! (`link_forward::carry_batches`: accepted messages are lost across the kill, the
//! "accepted lost" assertion fails, 3 runs of 3; with the metric assertions on, they fail
//! first); the carrier's give-up removed (`intake.fail` in `link_forward::carry`: the send
//! after the kill hangs, "an outcome or a detach" fails); the leadership watch removed
//! (`link_forward::leader_moved` never completing: after the SIGSTOP the link is
//! detached only by the reply timeout, past `STOP_DETACH_MAX`); the carrier's
//! notification removed (`ProducerIntake::fail` not calling it: the idle link is never
//! detached, "the idle link detached in time" fails).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::Sender;

use crate::cluster::runtime;
use crate::cluster_groups::{
    follow, leader_of, led, send, session, start_groups_cluster, take, try_receiver, wait_until,
    Attached, MAX_HOPS, READY_TIMEOUT, STEP,
};
use crate::cluster_support::Cluster;

const NODES: u64 = 3;
const ADDRESS: &str = "fw-a";
/// Messages sent before the kill phase, through the node that does not lead.
const FIRST: u32 = 40;
/// Messages sent in the kill phase.
const SECOND: u32 = 150;
/// Accepted messages of the kill phase before the leader is killed.
const KILL_AFTER: usize = 30;
/// Longest the kill phase may take in all.
const PHASE_MAX: Duration = Duration::from_secs(60);
/// Liveness bound on the detach after a SIGKILL (the peer connection fails at once; the
/// issue's goal is the election timeout + 1 s; the measured time is printed).
const KILL_DETACH_MAX: Duration = Duration::from_secs(5);
/// Bound on the detach after a SIGSTOP: generous for a loaded machine, yet below the
/// reply timeout, so only the replica's leadership watch can meet it.
const STOP_DETACH_MAX: Duration = Duration::from_millis(3500);
const _: () = assert!(
    STOP_DETACH_MAX.as_millis()
        < entrepot::raft::link_forward::FORWARD_REPLY_TIMEOUT_WATCHED.as_millis()
);

/// How the leader fails in the middle of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
}

/// What the producer of the kill phase saw.
#[derive(Default)]
struct Produced {
    accepted: Vec<u32>,
    /// Messages whose outcome never came (their link was detached): sent again.
    unknown: BTreeSet<u32>,
    /// When each detach came, and its error.
    detaches: Vec<(Instant, String)>,
}

/// Sends `from..to` through `at`, attaching again (on the same node) after a detach.
async fn produce_through(at: String, from: u32, to: u32, seen: Arc<Mutex<Produced>>) {
    let deadline = Instant::now() + PHASE_MAX;
    let mut next = from;
    while next < to {
        assert!(
            Instant::now() < deadline,
            "kill phase not done within {PHASE_MAX:?}"
        );
        let (mut c, mut s) = session(&at).await;
        let attach = Sender::attach(&mut s, format!("fwd-p-{next}"), ADDRESS);
        let Ok(mut sender) = tokio::time::timeout(STEP, attach)
            .await
            .expect("attach answered in time")
        else {
            // Refused while the address has no leader: attach again.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while next < to {
            let outcome = tokio::time::timeout(STEP, sender.send(format!("m{next}")))
                .await
                .expect("an outcome or a detach, never a hang");
            let mut p = seen.lock().unwrap();
            match outcome {
                Ok(Outcome::Accepted(_)) => {
                    p.accepted.push(next);
                    next += 1;
                }
                Ok(other) => panic!("m{next}: {other:?}"),
                Err(e) => {
                    p.detaches.push((Instant::now(), format!("{e:?}")));
                    p.unknown.insert(next);
                    break;
                }
            }
        }
        let _ = c.close().await;
    }
}

/// The preferred leader of `address` as the first answering node's `/status` lists it
/// (`preferred: N` on the address's group line).
pub(crate) fn preferred_leader(cluster: &Cluster, nodes: &[u64], address: &str) -> Option<u64> {
    let name = format!("name: {address:?}");
    nodes.iter().find_map(|&id| {
        let (_, yaml) = cluster.get(id, "/status")?;
        let line = yaml.lines().find(|l| l.contains(&name))?;
        line.split("preferred: ")
            .nth(1)?
            .split(',')
            .next()?
            .trim()
            .parse()
            .ok()
    })
}

#[test]
fn a_producer_on_a_node_that_does_not_lead_its_address_is_forwarded_across_a_leader_kill() {
    forwarded_across(Fault::Kill);
}

#[test]
fn a_forwarded_producer_is_detached_when_its_leader_hangs() {
    forwarded_across(Fault::Stop);
}

fn forwarded_across(fault: Fault) {
    let rt = runtime();
    let mut cluster = start_groups_cluster(NODES, &["--link-routing", "forward"], READY_TIMEOUT);
    let all: Vec<u64> = (0..NODES).collect();
    // Declared by a first attach (auto-create), wherever its group's leader lands.
    rt.block_on(async {
        let (mut c, mut s) = session(&cluster.amqp(0).to_string()).await;
        let attach = Sender::attach(&mut s, "declare", ADDRESS);
        let sender = tokio::time::timeout(STEP, attach).await.expect("in time");
        let _ = sender.expect("attach through any node").close().await;
        let _ = c.close().await;
    });
    // Led by its preferred leader: until then that node's opener campaigns for it, and a
    // leadership moving on its own in mid-test would fault the wrong node.
    wait_until(
        "the address led by its preferred leader",
        READY_TIMEOUT,
        || {
            let leaders = led(&cluster);
            leaders.values().flatten().any(|a| a == ADDRESS)
                && preferred_leader(&cluster, &all, ADDRESS) == Some(leader_of(&leaders, ADDRESS))
        },
    );
    let leader = leader_of(&led(&cluster), ADDRESS);
    let other = all.iter().copied().find(|&n| n != leader).unwrap();
    let other_amqp = cluster.amqp(other).to_string();

    // A producer that does not follow redirects, on a node that does not lead.
    rt.block_on(async {
        let (mut c, mut s) = session(&other_amqp).await;
        let attach = Sender::attach(&mut s, "fwd-p", ADDRESS);
        let mut sender = tokio::time::timeout(STEP, attach)
            .await
            .expect("in time")
            .expect("attached on a node that does not lead the address");
        send(&mut sender, 0, FIRST).await;
        let _ = sender.close().await;
        let _ = c.close().await;
    });
    let forwarded = cluster.metric(other, "entrepot_forwarded_transfers_total");
    let served = cluster.metric(leader, "entrepot_forwarded_served_total");
    assert_eq!(
        forwarded,
        Some(f64::from(FIRST)),
        "node {other} forwarded them"
    );
    assert_eq!(
        served,
        Some(f64::from(FIRST)),
        "leader {leader} stored them"
    );
    rt.block_on(async {
        let (_, mut receiver, mut c, _s) = follow!(try_receiver, other_amqp.clone(), ADDRESS);
        for i in 0..FIRST {
            take(&mut receiver, i).await;
        }
        let extra =
            tokio::time::timeout(Duration::from_millis(500), receiver.recv::<String>()).await;
        assert!(extra.is_err(), "each message once");
        let _ = receiver.close().await;
        let _ = c.close().await;
    });

    // An idle forwarded link (nothing in flight) is told too, without sending.
    let idle = rt.block_on(async {
        let (c, mut s) = session(&other_amqp).await;
        let attach = Sender::attach(&mut s, "fwd-idle", ADDRESS);
        let sender = tokio::time::timeout(STEP, attach).await.expect("in time");
        (c, s, sender.expect("the idle link attached"))
    });
    let idle = rt.spawn(async move {
        let (c, s, mut sender) = idle;
        let detached = sender.on_detach().await;
        (Instant::now(), format!("{detached:?}"), c, s)
    });

    // The kill phase: the leader dies while the producer sends through `other`.
    let seen = Arc::new(Mutex::new(Produced::default()));
    let producer = rt.spawn(produce_through(
        other_amqp.clone(),
        FIRST,
        FIRST + SECOND,
        Arc::clone(&seen),
    ));
    wait_until("messages accepted before the kill", PHASE_MAX, || {
        seen.lock().unwrap().accepted.len() >= KILL_AFTER
    });
    let killed = Instant::now();
    match fault {
        Fault::Kill => cluster.kill(leader),
        Fault::Stop => cluster.freeze(leader, true),
    }
    rt.block_on(async {
        tokio::time::timeout(PHASE_MAX, producer)
            .await
            .expect("kill phase in time")
            .expect("producer");
    });
    let p = std::mem::take(&mut *seen.lock().unwrap());
    let (detached_at, error) = p
        .detaches
        .iter()
        .find(|(at, _)| *at >= killed)
        .cloned()
        .expect("the forwarded link was detached after the kill");
    let took = detached_at - killed;
    println!("forwarded link detached {took:?} after its leader's {fault:?}: {error}");
    let max = match fault {
        Fault::Kill => KILL_DETACH_MAX,
        Fault::Stop => STOP_DETACH_MAX,
    };
    assert!(took < max, "detached only after {took:?} (bound {max:?})");
    assert!(error.contains("DetachForced"), "{error}");
    let (idle_at, idle_error, _c, _s) = rt
        .block_on(async { tokio::time::timeout(max, idle).await })
        .expect("the idle link detached in time")
        .expect("idle link task");
    let took = idle_at.saturating_duration_since(killed);
    println!("idle forwarded link detached {took:?} after the {fault:?}: {idle_error}");
    assert!(
        took < max,
        "idle link detached only after {took:?} (bound {max:?})"
    );
    assert!(idle_error.contains("DetachForced"), "{idle_error}");
    assert_eq!(
        p.accepted.len() as u32,
        SECOND,
        "every message accepted in the end"
    );

    // Everything accepted is there, in order; a message twice only if its outcome was
    // unknown to the producer.
    let survivor = all.iter().copied().find(|&n| n != leader).unwrap();
    let received = rt.block_on(async {
        let (_, mut receiver, mut c, _s) =
            follow!(try_receiver, cluster.amqp(survivor).to_string(), ADDRESS);
        let mut got = Vec::new();
        while let Ok(d) =
            tokio::time::timeout(Duration::from_secs(2), receiver.recv::<String>()).await
        {
            let d = d.expect("recv");
            let n: u32 = d
                .body()
                .trim_start_matches('m')
                .parse()
                .expect("a test message");
            tokio::time::timeout(STEP, receiver.accept(&d))
                .await
                .expect("accept in time")
                .expect("accept");
            got.push(n);
            assert!(got.len() < 4 * SECOND as usize, "bounded");
        }
        let _ = receiver.close().await;
        let _ = c.close().await;
        got
    });
    let got: BTreeSet<u32> = received.iter().copied().collect();
    let lost: Vec<u32> = p
        .accepted
        .iter()
        .filter(|n| !got.contains(n))
        .copied()
        .collect();
    assert!(lost.is_empty(), "accepted messages lost: {lost:?}");
    let mut first_seen = BTreeSet::new();
    let mut order = Vec::new();
    for n in &received {
        if !first_seen.insert(*n) {
            assert!(p.unknown.contains(n), "m{n} twice, though accepted once");
        } else {
            order.push(*n);
        }
    }
    assert!(order.windows(2).all(|w| w[0] < w[1]), "in order: {order:?}");
    if fault == Fault::Stop {
        cluster.kill(leader);
    }
}
