//! Goal: in `cluster-mode: groups` a node that is drained, or stopped with SIGTERM (a
//! planned restart), hands every group it leads to another voter before it goes
//! (`src/raft/handover.rs`, openraft 0.9 has no leader transfer): each leadership moves
//! by the hand-over — the leader asks a caught-up voter to campaign, which wins with the
//! leader's own vote — not by an election after the followers' lease, and the producers
//! of those addresses are served again by the new leader.
//! Method: four `entrepot serve --cluster-mode groups` processes (`cluster_support::
//! Cluster`; four, so that a drain leaves the replication factor's three), eight queues,
//! one producer per queue (fe2o3, following `amqp:link:redirect`, reconnecting after a
//! broken link or a closed connection, one message at a time, every acceptance time kept,
//! and what it did between them: a gap's assertion names it). Then `entrepot drain` on a
//! node leading at least one queue: its answer must report every leadership handed
//! over and none still led, each target must have logged its campaign on request, and
//! the node leads nothing afterwards. Then SIGTERM to another node leading at least one
//! queue: its log must report the same before it stops. Started again, it is the
//! preferred leader of what it led and must get a group back by asking its leader to
//! hand it over (`handed the group over on request`), not by a campaign. Every producer
//! of a queue the node led must accept again; its longest gap between two acceptances around each step
//! is printed and bounded by [`STALL_MAX`], a liveness bound — the speed is shown by the
//! elasticity run (benches/RESULTS.md), not asserted on a loaded machine here.
//! Mutation-checked: the drain's hand-over removed (the answer reports none, the
//! targets log no campaign), the SIGTERM hand-over removed (the log reports none), the
//! batcher's hold removed (see ARCHITECTURE.md, session 16).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fe2o3_amqp::link::SenderAttachError;
use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::{Connection, Sender, Session};

use crate::cluster::runtime;
use crate::cluster_groups::{led, start_groups_cluster, wait_until};
use crate::cluster_support::Cluster;
use crate::redirect::redirect_of;

const NODES: u64 = 4;
const QUEUES: [&str; 8] = ["h-a", "h-b", "h-c", "h-d", "h-e", "h-f", "h-g", "h-h"];
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one client step (connect, attach, one send) may take.
const STEP: Duration = Duration::from_secs(5);
/// Most redirects one attach follows.
const MAX_HOPS: usize = 4;
/// Pause between two messages of one producer.
const PRODUCE_PAUSE: Duration = Duration::from_millis(10);
/// Pause before a producer connects again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(20);
/// Liveness bound on a producer's longest gap around a step (the 2 s, plus room
/// for a loaded machine).
const STALL_MAX: Duration = Duration::from_secs(3);
/// How long after a step its gaps are looked at, and the producers must have accepted.
const AFTER_STEP: Duration = Duration::from_secs(6);
/// What the hand-over logs on the node that hands over, and on a target.
const HANDED: &str = "leadership(s) over";
const CAMPAIGNED: &str = "campaigning: the leader hands its group over";
const HANDED_ON_REQUEST: &str = "handed the group over on request";
/// Longest a restarted node may take to ask for one of its groups back (the opener's
/// campaign backoff and rounds, on a loaded machine).
const TAKE_BACK_MAX: Duration = Duration::from_secs(30);

/// Every acceptance time of each queue's producer.
type Accepted = Arc<Mutex<BTreeMap<&'static str, Vec<Instant>>>>;
/// What each queue's producer did besides a plain acceptance (where it attached, each
/// redirect, each failed step), with when: a gap's assertion names what filled it.
type Trail = Arc<Mutex<BTreeMap<&'static str, Vec<(Instant, String)>>>>;

fn note(trail: &Trail, queue: &'static str, what: String) {
    let mut t = trail.lock().unwrap();
    t.entry(queue).or_default().push((Instant::now(), what));
}

#[test]
fn a_leader_hands_its_groups_over_when_drained_and_when_stopped() {
    let rt = runtime();
    let mut cluster = start_groups_cluster(NODES, &[], READY_TIMEOUT);
    let starts: Vec<String> = (0..NODES).map(|id| cluster.amqp(id).to_string()).collect();
    let accepted: Accepted = Arc::default();
    let trail: Trail = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = QUEUES
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let (starts, accepted, stop) =
                (starts.clone(), Arc::clone(&accepted), Arc::clone(&stop));
            rt.spawn(produce(starts, i, q, accepted, Arc::clone(&trail), stop))
        })
        .collect();
    wait_until("every queue led by one node", READY_TIMEOUT, || {
        led(&cluster).values().map(Vec::len).sum::<usize>() == QUEUES.len()
    });
    wait_until("every producer accepted", READY_TIMEOUT, || {
        let a = accepted.lock().unwrap();
        QUEUES
            .iter()
            .all(|q| a.get(q).is_some_and(|t| !t.is_empty()))
    });

    // A drain of a node leading at least one queue (not node 0, the others' first peer).
    let leaders = led(&cluster);
    println!("queues led per node before the drain: {leaders:?}");
    let (&drained, queues) = leaders
        .iter()
        .filter(|(id, q)| **id != 0 && !q.is_empty())
        .max_by_key(|(_, q)| q.len())
        .expect("a node other than 0 leads a queue");
    let queues = queues.clone();
    let campaigns_before = campaigns(&cluster, drained);
    let step = Instant::now();
    let (ok, out, err) = cluster.drain_cli(drained, &[]);
    println!(
        "drain of node {drained} in {:?}:\n{out}{err}",
        step.elapsed()
    );
    assert!(ok, "drain of node {drained} failed: {out}{err}");
    let report = out
        .lines()
        .find(|l| l.contains(HANDED))
        .unwrap_or_else(|| panic!("the drain reports no hand-over: {out}"));
    assert!(!report.contains("still led here"), "{report}");
    let moved = handed_count(report);
    assert!(
        moved >= queues.len(),
        "{moved} handed over, led {queues:?}: {report}"
    );
    let campaigned = campaigns(&cluster, drained) - campaigns_before;
    assert!(
        campaigned >= moved,
        "{moved} handed over, but the targets logged {campaigned} campaigns on request"
    );
    judge(&accepted, &trail, &queues, step, "the drain");
    assert!(
        led(&cluster).get(&drained).is_none_or(Vec::is_empty),
        "node {drained} still leads after its drain"
    );

    // SIGTERM (a planned restart) to another node leading at least one queue.
    let leaders = led(&cluster);
    println!("queues led per node before the stop: {leaders:?}");
    let (&stopped, queues) = leaders
        .iter()
        .filter(|(id, q)| **id != drained && !q.is_empty())
        .max_by_key(|(_, q)| q.len())
        .expect("another node leads a queue");
    let queues = queues.clone();
    let campaigns_before = campaigns(&cluster, stopped);
    let step = Instant::now();
    cluster.terminate(stopped);
    println!("node {stopped} stopped (SIGTERM) in {:?}", step.elapsed());
    let log = cluster.log_lines(stopped);
    let report = log
        .iter()
        .find(|l| l.contains("before stopping") && l.contains(HANDED))
        .unwrap_or_else(|| panic!("node {stopped} logged no hand-over before stopping"));
    assert!(!report.contains("still led here"), "{report}");
    let moved = handed_count(report);
    assert!(
        moved >= queues.len(),
        "{moved} handed over, led {queues:?}: {report}"
    );
    let campaigned = campaigns(&cluster, stopped) - campaigns_before;
    assert!(
        campaigned >= moved,
        "{moved} handed over, but the targets logged {campaigned} campaigns on request"
    );
    judge(&accepted, &trail, &queues, step, "the stop");

    // Started again: it is the preferred leader of what it led, and takes it back by
    // asking the leaders to hand over (`GroupHandle::ask_hand_over`), not by campaigns.
    let requested_before = requested(&cluster);
    let step = Instant::now();
    cluster.restart(stopped);
    wait_until("the restarted node ready", READY_TIMEOUT, || {
        cluster.readyz(stopped) == Some(200)
    });
    wait_until("a leadership handed back on request", TAKE_BACK_MAX, || {
        requested(&cluster) > requested_before
    });
    println!(
        "node {stopped} back: {} hand-over(s) on request so far, queues led per node {:?}",
        requested(&cluster) - requested_before,
        led(&cluster)
    );
    judge(&accepted, &trail, &queues, step, "the return");

    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for p in producers {
            let _ = tokio::time::timeout(STEP * 2, p).await;
        }
    });
}

/// Hand-overs done on a peer's request, logged by every running node.
fn requested(cluster: &Cluster) -> usize {
    cluster
        .running()
        .into_iter()
        .map(|id| cluster.log_count(id, HANDED_ON_REQUEST))
        .sum()
}

/// Campaigns on request logged by every running node but `except`.
fn campaigns(cluster: &Cluster, except: u64) -> usize {
    cluster
        .running()
        .into_iter()
        .filter(|id| *id != except)
        .map(|id| cluster.log_count(id, CAMPAIGNED))
        .sum()
}

/// The N of "handed N leadership(s) over".
fn handed_count(report: &str) -> usize {
    let before = &report[..report.find(HANDED).expect("report")];
    let n = before.split_whitespace().last().expect("a count");
    n.parse()
        .unwrap_or_else(|_| panic!("no count in {report:?}"))
}

/// Waits [`AFTER_STEP`], then: every producer of `queues` accepted after the step, and
/// its longest gap between acceptances from just before the step on stays within
/// [`STALL_MAX`] (printed; a longer one fails with the producer's trail through it).
fn judge(accepted: &Accepted, trail: &Trail, queues: &[String], step: Instant, what: &str) {
    std::thread::sleep(AFTER_STEP);
    let a = accepted.lock().unwrap();
    for q in queues {
        let times = a.get(q.as_str()).expect("a producer per queue");
        let from = times.partition_point(|t| *t < step).saturating_sub(1);
        let window = &times[from..];
        assert!(
            window.last().is_some_and(|t| *t > step),
            "{q}: nothing accepted after {what}"
        );
        let (gap, from) = window
            .windows(2)
            .map(|w| (w[1] - w[0], w[0]))
            .max()
            .unwrap_or((Duration::ZERO, step));
        println!("{q}: longest gap between acceptances around {what}: {gap:?}");
        if gap > STALL_MAX {
            let t = trail.lock().unwrap();
            let through: Vec<String> = t
                .get(q.as_str())
                .into_iter()
                .flatten()
                .filter(|(at, _)| *at >= from && *at <= from + gap)
                .map(|(at, e)| format!("+{:?} {e}", *at - from))
                .collect();
            panic!(
                "{q}: a gap of {gap:?} around {what} (step at +{:?}); the producer meanwhile: {through:#?}",
                step.saturating_duration_since(from)
            );
        }
    }
}

/// One producer: attach at a node (following redirects), send one message at a time,
/// note each acceptance; connect again after any failure.
async fn produce(
    starts: Vec<String>,
    first: usize,
    queue: &'static str,
    accepted: Accepted,
    trail: Trail,
    stop: Arc<AtomicBool>,
) {
    let mut attempt = first;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut at = starts[attempt % starts.len()].clone();
        attempt += 1;
        for _ in 0..=MAX_HOPS {
            match attach(&at, queue).await {
                Ok((mut sender, mut conn, _session)) => {
                    note(&trail, queue, format!("attached at {at}"));
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let send =
                            tokio::time::timeout(STEP, sender.send(format!("{queue}-{seq}")));
                        // fe2o3-amqp leaves a send unanswered when the broker closes its
                        // connection (a stopping node closes with connection:forced), so
                        // the client watches the connection itself, as proton and
                        // qpid-jms tell their senders of a closed connection.
                        let sent = tokio::select! {
                            sent = send => Some(sent),
                            closed = conn.on_close() => {
                                note(&trail, queue, format!("{seq} at {at}: connection closed: {closed:?}"));
                                None
                            }
                        };
                        let Some(sent) = sent else {
                            break;
                        };
                        match sent {
                            Ok(Ok(Outcome::Accepted(_))) => {
                                let mut a = accepted.lock().unwrap();
                                a.entry(queue).or_default().push(Instant::now());
                            }
                            Ok(Ok(other)) => {
                                note(&trail, queue, format!("{seq} at {at}: {other:?}"));
                                break;
                            }
                            Ok(Err(e)) => {
                                note(&trail, queue, format!("{seq} at {at}: {e}"));
                                break;
                            }
                            Err(_) => {
                                note(
                                    &trail,
                                    queue,
                                    format!("{seq} at {at}: no outcome in {STEP:?}"),
                                );
                                break;
                            }
                        }
                        tokio::time::sleep(PRODUCE_PAUSE).await;
                    }
                    let _ = tokio::time::timeout(STEP, conn.close()).await;
                    break;
                }
                Err(NotServed::Redirect(to)) => {
                    note(&trail, queue, format!("redirected from {at} to {to}"));
                    at = to;
                }
                Err(NotServed::Failed(why)) => {
                    note(&trail, queue, format!("at {at}: {why}"));
                    break;
                }
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// A served sender with its connection and session (kept open while it sends).
type Served = (
    Sender,
    fe2o3_amqp::connection::ConnectionHandle<()>,
    fe2o3_amqp::session::SessionHandle<()>,
);

/// Why [`attach`] gave no sender.
enum NotServed {
    /// Redirected to this address.
    Redirect(String),
    /// Failed: which step, and how.
    Failed(String),
}

/// A sender on `queue` at `at`.
async fn attach(at: &str, queue: &str) -> Result<Served, NotServed> {
    let failed = |step: &str, e: String| NotServed::Failed(format!("{step}: {e}"));
    let url = format!("amqp://{at}");
    let open = Connection::open("handover-test", url.as_str());
    let mut conn = match tokio::time::timeout(STEP, open).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(failed("open", e.to_string())),
        Err(_) => return Err(failed("open", format!("nothing in {STEP:?}"))),
    };
    let mut session = match tokio::time::timeout(STEP, Session::begin(&mut conn)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(failed("begin", e.to_string())),
        Err(_) => return Err(failed("begin", format!("nothing in {STEP:?}"))),
    };
    let attach = Sender::attach(&mut session, format!("p-{queue}"), queue);
    let attached = tokio::time::timeout(STEP, attach).await;
    let why = match attached {
        Ok(Ok(sender)) => return Ok((sender, conn, session)),
        Ok(Err(SenderAttachError::RemoteClosedWithError(e))) => match redirect_of(&e) {
            Ok(r) => NotServed::Redirect(r.to),
            Err(_) => failed("attach", format!("{e:?}")),
        },
        Ok(Err(e)) => failed("attach", e.to_string()),
        Err(_) => failed("attach", format!("nothing in {STEP:?}")),
    };
    let _ = conn.close().await;
    Err(why)
}
