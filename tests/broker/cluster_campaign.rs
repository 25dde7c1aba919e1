//! Issue 12's fault campaign on processes: while producers and consumers run through
//! every node of a three-node cluster, the Raft leader is SIGKILLed or SIGSTOPped again
//! and again; no accepted message is lost, none a consumer had accepted comes again, and
//! after every fault the cluster accepts and delivers again within the election timeout
//! + 1 s of a new leader being possible.
//!
//! Method: a [`Cluster`] of real `entrepot serve` processes on loopback; the elasticity
//! test's load (`elasticity::load`: the fault campaign's windowed producers and
//! settle-mode-second consumers with its ledger), client k on node k mod 3, moving to the
//! next node whenever its connection ends. The nodes in the client list are the "ready"
//! ones: a faulted node leaves the list (as a Kubernetes Service drops a pod whose
//! readiness fails) and comes back after it. Rounds alternate the two faults on whoever
//! leads then:
//! * *kill*: SIGKILL, down for [`DOWN_FOR`], restarted on its data directory;
//! * *stop*: SIGSTOP for [`STOPPED_FOR`] (a hung or partitioned leader: its sockets stay
//!   open and silent), then SIGCONT — it finds itself deposed and rejoins.
//!
//! Per round, measured from the fault: the time until a survivor leads, and until the
//! first message is accepted and the first delivery consumed *after* that new leader
//! appeared ("served again"). At the end the producers stop, the consumers take what is
//! left, and the ledger judges every message.
//!
//! Asserted: lost = 0, duplicates = 0 (delivered again after a consumer's accepted was
//! settled), no refused message delivered, and every round served again within
//! [`SERVED_AGAIN_LIMIT`] of the new leader (the election timeout + 1 s). The longest
//! stall of any one client is printed, not judged: a client whose own connection is to
//! the stopped node hears nothing until that node resumes (nothing on the server side
//! can reach it), so its stall is about [`STOPPED_FOR`]; clients on the other nodes are
//! covered by "served again". So a stop round in which every producer, or every
//! consumer, was connected to the stopped leader itself cannot be served again before the
//! resume: its served-again time is printed, not judged, and the node resumes after
//! [`STOPPED_FOR`] as in any stop round (clients gather on the leader over the rounds:
//! one whose leader is killed moves to the next node, which may be the new leader. In
//! session 10, 3 of 8 `kill,stop` runs failed on such a round — the resumed leader's log
//! showed all four producers' connections on it; such rounds occur without the gate too).
//!
//! Length: [`ROUNDS_DEFAULT`] rounds (CI, ~25 s); `ENTREPOT_CLUSTER_CAMPAIGN_ROUNDS=N`
//! (at most [`ROUNDS_MAX`]) for a longer campaign.
//!
//! Faults: `ENTREPOT_CLUSTER_CAMPAIGN_FAULTS` (`kill`, `stop`, or both comma-separated);
//! the default alternates both. The stop round is what the delivery lease
//! (`src/raft/lease.rs`) is for: a SIGSTOPped leader, once resumed, still believes it
//! leads for a moment, and its stale in-memory queues would deliver to the consumers
//! connected to it messages the new leader had meanwhile delivered and had settled
//! (session 9: 26 such duplicates in one CI run; with the lease's gate disabled, 79 in a
//! stop-only run of 4 rounds, but 0 in three `kill,stop` runs of 4: a duplicate needs a
//! consumer on the stopped leader and another elsewhere, which two stop rounds rarely
//! give — `cluster_lease.rs` is the deterministic guard). Ends with the line
//! `cluster campaign: rounds=R kills=K stops=S lost=L duplicates=D
//! worst_served_again_ms=W max_stall_s=M`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use entrepot::raft::ELECTION_TIMEOUT_MS;

use crate::cluster_support::Cluster;
use crate::elasticity::load::{Endpoints, Load, CONSUMERS, PRODUCERS};

/// Faults of the default (CI) campaign, alternated round by round.
const FAULTS_DEFAULT: &str = "kill,stop";
/// Rounds of the default (CI) campaign.
pub(crate) const ROUNDS_DEFAULT: usize = 4;
/// Most rounds `ENTREPOT_CLUSTER_CAMPAIGN_ROUNDS` may ask for.
const ROUNDS_MAX: usize = 500;
/// Load without faults before the first round and after each.
pub(crate) const CALM: Duration = Duration::from_secs(2);
/// How long a killed node stays down before it is restarted.
pub(crate) const DOWN_FOR: Duration = Duration::from_secs(1);
/// How long a stopped node stays stopped.
pub(crate) const STOPPED_FOR: Duration = Duration::from_secs(3);
/// After a new leader appears, the cluster accepts and delivers again within this: the
/// longest election timeout plus one second (issue 12, point 4).
pub(crate) const SERVED_AGAIN_LIMIT: Duration = Duration::from_millis(ELECTION_TIMEOUT_MS.1 + 1000);
/// Longest wait for a new leader or for the cluster to serve again before the round is
/// recorded as failed (the campaign goes on).
pub(crate) const ROUND_LIMIT: Duration = Duration::from_secs(20);
/// Draining at the end: stop when nothing moved for this long, or at the limit.
pub(crate) const DRAIN_QUIET: Duration = Duration::from_secs(3);
pub(crate) const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// What a round does to its node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Fault {
    Kill,
    Stop,
}

/// What one round measured (ms since its fault); `None`: not within [`ROUND_LIMIT`].
#[derive(Debug)]
struct Round {
    fault: Fault,
    leader: u64,
    elected_ms: Option<u64>,
    accepted_ms: Option<u64>,
    consumed_ms: Option<u64>,
    /// Some producer and some consumer were connected elsewhere than to the stopped
    /// leader (always, for a kill: its clients' connections break at once).
    servable: bool,
}

impl Round {
    /// From the new leader to the later of the first acceptance and the first delivery
    /// consumed after it.
    fn served_again_ms(&self) -> Option<u64> {
        served_again_ms(self.elected_ms, self.accepted_ms, self.consumed_ms)
    }
}

/// From a new leader (`elected_ms`) to the later of the first acceptance and the first
/// delivery consumed after it; `None` while any of the three has not happened.
pub(crate) fn served_again_ms(
    elected_ms: Option<u64>,
    accepted_ms: Option<u64>,
    consumed_ms: Option<u64>,
) -> Option<u64> {
    Some(accepted_ms?.max(consumed_ms?).saturating_sub(elected_ms?))
}

#[test]
fn leaders_killed_and_stopped_under_load_lose_nothing_and_serve_again() {
    let rounds = rounds_from_env("ENTREPOT_CLUSTER_CAMPAIGN_ROUNDS", ROUNDS_DEFAULT);
    let mut cluster = Cluster::on_loopback(3);
    cluster.start(&[0, 1, 2], Duration::from_secs(30));
    let endpoints = Arc::new(Endpoints::default());
    for id in 0..3 {
        endpoints.set(id, cluster.amqp(id));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let verbose = std::env::var("ENTREPOT_CLUSTER_CAMPAIGN_VERBOSE").as_deref() == Ok("1");
    let mut load = Load::start(&rt, Arc::clone(&endpoints), verbose);
    std::thread::sleep(CALM);
    let faults = faults_from_env("ENTREPOT_CLUSTER_CAMPAIGN_FAULTS");
    let mut done = Vec::new();
    for r in 0..rounds {
        let fault = faults[r % faults.len()];
        let round = run_round(&mut cluster, &endpoints, &load, fault);
        eprintln!(
            "cluster campaign: round {} {:?} of leader {}: new leader after {:?} ms, served \
             again {:?} ms after it (accepted at {:?} ms, consumed at {:?} ms){}",
            r + 1,
            round.fault,
            round.leader,
            round.elected_ms,
            round.served_again_ms(),
            round.accepted_ms,
            round.consumed_ms,
            if round.servable {
                ""
            } else {
                "; every producer or consumer was on the stopped leader: not judged"
            }
        );
        done.push(round);
        std::thread::sleep(CALM);
    }
    load.finish(&rt, DRAIN_QUIET, DRAIN_LIMIT);
    judge(&load, &done);
}

/// The number of rounds: `var` (1..=[`ROUNDS_MAX`]), `default` when unset.
pub(crate) fn rounds_from_env(var: &str, default: usize) -> usize {
    match std::env::var(var) {
        Ok(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=ROUNDS_MAX).contains(n))
            .unwrap_or_else(|| panic!("{var} must be 1..={ROUNDS_MAX}")),
        Err(_) => default,
    }
}

/// The faults to alternate: `var` (`kill`, `stop`, or both comma-separated),
/// [`FAULTS_DEFAULT`] when unset.
pub(crate) fn faults_from_env(var: &str) -> Vec<Fault> {
    let spec = std::env::var(var).unwrap_or_else(|_| FAULTS_DEFAULT.to_owned());
    let faults: Vec<Fault> = spec
        .split(',')
        .map(|f| match f.trim() {
            "kill" => Fault::Kill,
            "stop" => Fault::Stop,
            other => panic!("{var}: unknown fault {other:?} (kill, stop)"),
        })
        .collect();
    eprintln!("faults {faults:?} ({var}={spec})");
    faults
}

/// One fault on the current leader, measured, and the node brought back.
fn run_round(cluster: &mut Cluster, endpoints: &Endpoints, load: &Load, fault: Fault) -> Round {
    let leader = agreed_leader(cluster);
    let servable = fault == Fault::Kill
        || (load.connected_to(leader, false) < PRODUCERS
            && load.connected_to(leader, true) < CONSUMERS);
    let t0 = Instant::now();
    endpoints.remove(leader);
    match fault {
        Fault::Kill => cluster.kill(leader),
        Fault::Stop => cluster.freeze(leader, true),
    }
    let mut round = Round {
        fault,
        leader,
        elected_ms: None,
        accepted_ms: None,
        consumed_ms: None,
        servable,
    };
    let ms = |t: Instant| t.duration_since(t0).as_millis() as u64;
    // A survivor leads: polled without the harness's panicking wait, so a slow round is
    // recorded rather than aborting the campaign.
    let deadline = if servable {
        t0 + ROUND_LIMIT
    } else {
        t0 + STOPPED_FOR
    };
    while Instant::now() < deadline {
        let leads = cluster
            .running()
            .into_iter()
            .filter(|&id| id != leader)
            .any(|id| cluster.status(id).is_some_and(|s| s.role == "leader"));
        if leads {
            round.elected_ms = Some(ms(Instant::now()));
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Counted from the new leader: neither a killed nor a stopped node can confirm or
    // deliver, so whatever moves now is the new leader's work.
    let (confirmed0, consumed0) = {
        let ledger = load.ctx().ledger();
        (ledger.confirmed_total(), ledger.finals())
    };
    while round.elected_ms.is_some()
        && (round.accepted_ms.is_none() || round.consumed_ms.is_none())
        && Instant::now() < deadline
    {
        let (confirmed, consumed) = {
            let ledger = load.ctx().ledger();
            (ledger.confirmed_total(), ledger.finals())
        };
        let now = Instant::now();
        if round.accepted_ms.is_none() && confirmed > confirmed0 {
            round.accepted_ms = Some(ms(now));
        }
        if round.consumed_ms.is_none() && consumed > consumed0 {
            round.consumed_ms = Some(ms(now));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    match fault {
        Fault::Kill => {
            std::thread::sleep(DOWN_FOR.saturating_sub(t0.elapsed()));
            cluster.restart(leader);
        }
        Fault::Stop => {
            std::thread::sleep(STOPPED_FOR.saturating_sub(t0.elapsed()));
            cluster.freeze(leader, false);
        }
    }
    endpoints.set(leader, cluster.amqp(leader));
    round
}

/// The leader a majority of the nodes name (a stopped leader just resumed may still call
/// itself leader until it hears of the new term; the others know better).
fn agreed_leader(cluster: &Cluster) -> u64 {
    let deadline = Instant::now() + ROUND_LIMIT;
    loop {
        let named: Vec<u64> = cluster
            .running()
            .into_iter()
            .filter_map(|id| cluster.status(id)?.leader)
            .collect();
        for &candidate in &named {
            let votes = named.iter().filter(|&&n| n == candidate).count();
            let leads = cluster
                .status(candidate)
                .is_some_and(|s| s.role == "leader");
            if votes >= 2 && leads {
                return candidate;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader named by a majority within {ROUND_LIMIT:?}: {:?}",
            cluster.statuses()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn judge(load: &Load, rounds: &[Round]) {
    let ledger = load.ctx().ledger();
    let v = ledger.verdict();
    let stall = load.stall.lock().expect("stall").clone();
    let kills = rounds.iter().filter(|r| r.fault == Fault::Kill).count();
    let worst = rounds
        .iter()
        .filter(|r| r.servable)
        .map(|r| r.served_again_ms().unwrap_or(u64::MAX))
        .max();
    let unservable = rounds.iter().filter(|r| !r.servable).count();
    if unservable > 0 {
        eprintln!(
            "cluster campaign: {unservable} stop rounds had every producer or every consumer \
             connected to the stopped leader: served again not judged there"
        );
    }
    eprintln!(
        "cluster campaign: sent {} accepted {} consumed {} refused {} unconfirmed {}; \
         reconnects {:?}; longest stall of one client {:.2} s ({} at {:.1} s)",
        v.sent,
        v.confirmed,
        v.consumed,
        v.refused,
        v.unconfirmed,
        load.reconnects(),
        stall.ms as f64 / 1000.0,
        stall.client,
        stall.at_ms as f64 / 1000.0
    );
    println!(
        "cluster campaign: rounds={} kills={kills} stops={} lost={} duplicates={} \
         worst_served_again_ms={} max_stall_s={:.2}",
        rounds.len(),
        rounds.len() - kills,
        v.lost.len(),
        v.duplicated.len(),
        worst.map_or("none".to_owned(), |w| if w == u64::MAX {
            "never".to_owned()
        } else {
            w.to_string()
        }),
        stall.ms as f64 / 1000.0
    );
    let mut failures = Vec::new();
    if v.confirmed == 0 || v.consumed == 0 {
        failures.push("nothing was accepted or consumed".to_owned());
    }
    failures.extend(v.broken_promises());
    for (i, r) in rounds.iter().enumerate() {
        match r.served_again_ms() {
            Some(ms) if ms <= SERVED_AGAIN_LIMIT.as_millis() as u64 => {}
            _ if !r.servable => {}
            got => failures.push(format!(
                "round {} ({:?} of leader {}): served again {got:?} ms after the new leader \
                 (limit {SERVED_AGAIN_LIMIT:?}); {r:?}",
                i + 1,
                r.fault,
                r.leader
            )),
        }
    }
    if failures.is_empty() {
        return;
    }
    let report = ledger.failure_report("the cluster campaign broke its promises", &failures, &v, 8);
    panic!("{report}");
}
