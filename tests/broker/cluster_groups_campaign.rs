//! Issue 12's fault campaign in `cluster-mode: groups` (a Raft group per address): while
//! producers and consumers of six queues run through every node of a three-node cluster,
//! a node that leads at least one address's group is SIGKILLed or SIGSTOPped again and
//! again; no accepted message is lost, none a consumer had accepted comes again, and
//! after every fault each address the node led accepts and delivers again within the
//! election timeout + 1 s of its new leader.
//!
//! Method: a [`Cluster`] of real `entrepot serve --cluster-mode groups --sync always`
//! processes on loopback; per address one load of the one-group campaign's clients and
//! ledger (`elasticity::load` with a [`LoadSpec`]): one windowed producer (persistent
//! 1 KiB), one settle-mode-second consumer that watches its connection with an AMQP
//! idle-time-out of [`IDLE_TIME_OUT`] and one *patient* consumer with none. Every client
//! starts on a different node (address i's on node i, i + 1, …) and follows
//! `amqp:link:redirect` to the address's leader; whenever its connection ends it starts
//! again at the next ready node (a faulted node leaves the list, as a Kubernetes Service
//! drops a pod whose readiness fails, and comes back after). A plain successful attach
//! on a non-leader (link forwarding) serves the client just as well. Rounds alternate the
//! two faults; each picks, in turn, a node that leads at least one address (the leaders
//! read from every node's `/status`, once each address is led by exactly one node):
//! * *kill*: SIGKILL, down for [`DOWN_FOR`], restarted on its data directory;
//! * *stop*: SIGSTOP for [`STOPPED_FOR`] (a hung or partitioned node: its sockets stay
//!   open and silent), then SIGCONT. Watching clients leave it after their idle-time-out;
//!   the patient consumer stays on it until it resumes, when the deposed leader must not
//!   deliver from its stale queue (its delivery lease) and detaches it.
//!
//! The clock: for each address the stopped or killed node led, the round notes when a
//! survivor's `/status` first names it among its led addresses (polled every
//! [`POLL`]: the group has a new leader, the first moment the address *can* be served),
//! then the first message of that address accepted and the first delivery of it consumed
//! after that moment; "served again" is the later of the two, from the new leader. A
//! survivor's leadership can only start once the old leader's election timeout has
//! passed, so this is the one-group campaign's clock, per address. The time from the
//! fault is printed too.
//!
//! Asserted: lost = 0, duplicates = 0 (delivered again after a consumer's accepted was
//! settled), no refused message delivered, and every affected address of every round
//! served again within [`SERVED_AGAIN_LIMIT`] (the election timeout + 1 s). The longest
//! stall of any one client is printed, not judged (the patient consumer waits out every
//! stop on its node).
//!
//! Found (session 14): an `accepted` a consumer sent just before its queue was retired
//! (the leadership here ended) was settled back with no acknowledgement recorded, and the
//! next leader delivered the message again — 1 to 6 duplicates in 3 of 4 runs, around a
//! stopped node's resume; fixed in `Queue::settle` (a retired queue refuses).
//! Mutation-checked: the consumer's settlement sent before its acknowledgement commits
//! (`connection/session.rs`, the durable handle ignored): 67 duplicates in 4 kill rounds.
//! Not caught: a delivery lease that always holds (`DeliveryLease::holds` true): 0
//! duplicates in 6 stop rounds — a stale delivery needs the patient consumer to get
//! credit on the resumed node before it learns of the new term, which these rounds did
//! not produce; `group_driver::a_leader_cut_off_from_its_followers_delivers_nothing_once_its_lease_ran_out`
//! is the deterministic guard of the lease.
//!
//! Length: [`ROUNDS_DEFAULT`] rounds (CI, ~30–45 s); `ENTREPOT_GROUPS_CAMPAIGN_ROUNDS=N` (at
//! most 500) for a longer campaign, `ENTREPOT_GROUPS_CAMPAIGN_FAULTS` (`kill`, `stop`,
//! or both comma-separated; default both, alternated),
//! `ENTREPOT_GROUPS_CAMPAIGN_VERBOSE=1` prints every client reconnect. Ends with the line
//! `groups campaign: rounds=R kills=K stops=S sent=N accepted=A delivered=D lost=L
//! duplicates=U worst_served_again_ms=W`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

// The campaign's timings are the one-group campaign's (cluster_campaign.rs).
use crate::cluster_campaign::{
    faults_from_env, rounds_from_env, Fault, CALM, DOWN_FOR, DRAIN_LIMIT, DRAIN_QUIET,
    ROUNDS_DEFAULT, ROUND_LIMIT, SERVED_AGAIN_LIMIT, STOPPED_FOR,
};
use crate::cluster_groups::start_groups_cluster;
use crate::cluster_support::Cluster;
use crate::elasticity::load::{Endpoints, Load, LoadSpec};

const NODES: u64 = 3;
/// The queues, each its own Raft group (six on three nodes: every node leads two).
const ADDRESSES: [&str; 6] = ["gc-a", "gc-b", "gc-c", "gc-d", "gc-e", "gc-f"];
/// Sequence numbers of address i start at 1 + i × this.
const SEQ_SPAN: u64 = 1_000_000_000;
/// The idle-time-out of the watching clients: a node silent this long is left.
const IDLE_TIME_OUT: Duration = Duration::from_millis(600);
/// Redirects a client follows in a row.
const MAX_HOPS: usize = 4;
/// Unsettled sends per producer (six producers share two cores with three nodes).
const IN_FLIGHT: usize = 16;
/// Longest the nodes may take to be ready, and the addresses to be led.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a round looks at the survivors' leaderships.
const POLL: Duration = Duration::from_millis(10);

/// One affected address in one round (ms since the fault; `None`: not within
/// [`ROUND_LIMIT`]).
#[derive(Debug)]
struct Served {
    address: &'static str,
    new_leader: Option<u64>,
    elected_ms: Option<u64>,
    accepted_ms: Option<u64>,
    consumed_ms: Option<u64>,
    /// The address's ledger counters (accepted, consumed) when its new leader appeared.
    base: (u64, u64),
}

impl Served {
    /// From the new leader to the later of the first acceptance and the first delivery
    /// consumed after it.
    fn again_ms(&self) -> Option<u64> {
        let elected = self.elected_ms?;
        Some(
            self.accepted_ms?
                .max(self.consumed_ms?)
                .saturating_sub(elected),
        )
    }

    fn done(&self) -> bool {
        self.accepted_ms.is_some() && self.consumed_ms.is_some()
    }
}

#[derive(Debug)]
struct Round {
    fault: Fault,
    node: u64,
    addresses: Vec<Served>,
}

#[test]
fn groups_leaders_killed_and_stopped_under_load_lose_nothing_and_serve_again() {
    let rounds = rounds_from_env("ENTREPOT_GROUPS_CAMPAIGN_ROUNDS", ROUNDS_DEFAULT);
    let faults = faults_from_env("ENTREPOT_GROUPS_CAMPAIGN_FAULTS");
    let verbose = std::env::var("ENTREPOT_GROUPS_CAMPAIGN_VERBOSE").as_deref() == Ok("1");
    let mut cluster = start_groups_cluster(NODES, &[], READY_TIMEOUT);
    let all: Vec<u64> = (0..NODES).collect();
    let endpoints = Arc::new(Endpoints::default());
    for &id in &all {
        endpoints.set(id, cluster.amqp(id));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The first attaches declare the addresses (through group 0, from whichever node).
    let mut loads: Vec<Load> = ADDRESSES
        .iter()
        .enumerate()
        .map(|(i, &address)| {
            let spec = LoadSpec {
                address,
                producers: 1,
                consumers: 1,
                patient_consumers: 1,
                in_flight: IN_FLIGHT,
                first_endpoint: i,
                first_seq: 1 + i as u64 * SEQ_SPAN,
                idle_time_out: Some(IDLE_TIME_OUT),
                max_hops: MAX_HOPS,
            };
            Load::start_with(&rt, Arc::clone(&endpoints), spec, verbose)
        })
        .collect();
    let leaders = agreed_leaders(&cluster, &all, None);
    eprintln!("groups campaign: leaders {leaders:?}");
    std::thread::sleep(CALM);
    let mut done = Vec::new();
    for r in 0..rounds {
        let fault = faults[r % faults.len()];
        let round = run_round(&mut cluster, &endpoints, &loads, fault, r);
        for s in &round.addresses {
            eprintln!(
                "groups campaign: round {} {:?} of node {}: {} led by {:?} after {:?} ms, \
                 served again {:?} ms after it (accepted at {:?} ms, consumed at {:?} ms)",
                r + 1,
                round.fault,
                round.node,
                s.address,
                s.new_leader,
                s.elected_ms,
                s.again_ms(),
                s.accepted_ms,
                s.consumed_ms
            );
        }
        done.push(round);
        std::thread::sleep(CALM);
    }
    for load in &mut loads {
        load.finish(&rt, DRAIN_QUIET, DRAIN_LIMIT);
    }
    judge(&loads, &done);
}

/// Address → the node leading it, once every address is led by exactly one of `ids`
/// (a resumed node may still call itself leader until it hears of the new term);
/// `excluded` (a stopped node) is not asked.
fn agreed_leaders(
    cluster: &Cluster,
    ids: &[u64],
    excluded: Option<u64>,
) -> BTreeMap<&'static str, u64> {
    let asked: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|&i| Some(i) != excluded)
        .collect();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let led = cluster.led_addresses(&asked);
        let mut leaders = BTreeMap::new();
        let mut unique = true;
        for address in ADDRESSES {
            let by: Vec<u64> = led
                .iter()
                .filter(|(_, a)| a.iter().any(|x| x == address))
                .map(|(id, _)| *id)
                .collect();
            match by[..] {
                [one] => {
                    leaders.insert(address, one);
                }
                _ => unique = false,
            }
        }
        if unique {
            return leaders;
        }
        assert!(
            Instant::now() < deadline,
            "not every address led by exactly one node within {READY_TIMEOUT:?}: {led:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One fault on a node leading at least one address, measured per address it led, and
/// the node brought back.
fn run_round(
    cluster: &mut Cluster,
    endpoints: &Endpoints,
    loads: &[Load],
    fault: Fault,
    r: usize,
) -> Round {
    let running = cluster.running();
    let leaders = agreed_leaders(cluster, &running, None);
    let mut candidates: Vec<u64> = leaders.values().copied().collect();
    candidates.sort_unstable();
    candidates.dedup();
    let node = candidates[r % candidates.len()];
    let mut round = Round {
        fault,
        node,
        addresses: ADDRESSES
            .iter()
            .filter(|a| leaders[*a] == node)
            .map(|&address| Served {
                address,
                new_leader: None,
                elected_ms: None,
                accepted_ms: None,
                consumed_ms: None,
                base: (0, 0),
            })
            .collect(),
    };
    let survivors: Vec<u64> = running.iter().copied().filter(|&i| i != node).collect();
    let t0 = Instant::now();
    endpoints.remove(node);
    match fault {
        Fault::Kill => cluster.kill(node),
        Fault::Stop => cluster.freeze(node, true),
    }
    let ms = |t: Instant| t.duration_since(t0).as_millis() as u64;
    let counters = |address: &str| {
        let i = ADDRESSES.iter().position(|a| *a == address).expect("known");
        let ledger = loads[i].ctx().ledger();
        (ledger.confirmed_total(), ledger.finals())
    };
    let deadline = t0 + ROUND_LIMIT;
    while Instant::now() < deadline && !round.addresses.iter().all(Served::done) {
        let led = cluster.led_addresses(&survivors);
        let now = Instant::now();
        for s in round.addresses.iter_mut() {
            if s.elected_ms.is_none() {
                let by = led.iter().find(|(_, a)| a.iter().any(|x| x == s.address));
                if let Some((id, _)) = by {
                    s.new_leader = Some(*id);
                    s.elected_ms = Some(ms(now));
                    // Neither a killed nor a stopped node can confirm or deliver: what
                    // moves from now on is the new leader's work.
                    s.base = counters(s.address);
                }
                continue;
            }
            let (accepted, consumed) = counters(s.address);
            if s.accepted_ms.is_none() && accepted > s.base.0 {
                s.accepted_ms = Some(ms(now));
            }
            if s.consumed_ms.is_none() && consumed > s.base.1 {
                s.consumed_ms = Some(ms(now));
            }
        }
        std::thread::sleep(POLL);
    }
    match fault {
        Fault::Kill => {
            std::thread::sleep(DOWN_FOR.saturating_sub(t0.elapsed()));
            cluster.restart(node);
        }
        Fault::Stop => {
            std::thread::sleep(STOPPED_FOR.saturating_sub(t0.elapsed()));
            cluster.freeze(node, false);
        }
    }
    endpoints.set(node, cluster.amqp(node));
    round
}

fn judge(loads: &[Load], rounds: &[Round]) {
    let verdicts: Vec<_> = loads.iter().map(|l| l.ctx().ledger().verdict()).collect();
    let sum = |f: fn(&crate::campaign::ledger::Verdict) -> u64| verdicts.iter().map(f).sum::<u64>();
    let lost: usize = verdicts.iter().map(|v| v.lost.len()).sum();
    let duplicates: usize = verdicts.iter().map(|v| v.duplicated.len()).sum();
    let kills = rounds.iter().filter(|r| r.fault == Fault::Kill).count();
    let served: Vec<&Served> = rounds.iter().flat_map(|r| &r.addresses).collect();
    let worst = served
        .iter()
        .map(|s| s.again_ms().unwrap_or(u64::MAX))
        .max();
    let worst_from_fault = served
        .iter()
        .map(|s| s.accepted_ms.max(s.consumed_ms).unwrap_or(u64::MAX))
        .max();
    let stall = loads
        .iter()
        .map(|l| l.stall.lock().expect("stall").clone())
        .max_by_key(|s| s.ms)
        .unwrap_or_default();
    let reconnects: Vec<_> = loads.iter().flat_map(Load::reconnects).collect();
    eprintln!(
        "groups campaign: refused {} unconfirmed {}; reconnects {reconnects:?}; longest stall \
         of one client {:.2} s ({} at {:.1} s); worst served again from the fault {}",
        sum(|v| v.refused),
        sum(|v| v.unconfirmed),
        stall.ms as f64 / 1000.0,
        stall.client,
        stall.at_ms as f64 / 1000.0,
        show_ms(worst_from_fault)
    );
    println!(
        "groups campaign: rounds={} kills={kills} stops={} addresses_faulted={} sent={} \
         accepted={} delivered={} lost={lost} duplicates={duplicates} \
         worst_served_again_ms={}",
        rounds.len(),
        rounds.len() - kills,
        served.len(),
        sum(|v| v.sent),
        sum(|v| v.confirmed),
        sum(|v| v.consumed),
        show_ms(worst)
    );
    let mut failures = Vec::new();
    for (v, address) in verdicts.iter().zip(ADDRESSES) {
        if v.confirmed == 0 || v.consumed == 0 {
            failures.push(format!("{address}: nothing was accepted or consumed"));
        }
        failures.extend(
            v.broken_promises()
                .into_iter()
                .map(|b| format!("{address}: {b}")),
        );
    }
    for (i, r) in rounds.iter().enumerate() {
        for s in &r.addresses {
            match s.again_ms() {
                Some(ms) if ms <= SERVED_AGAIN_LIMIT.as_millis() as u64 => {}
                got => failures.push(format!(
                    "round {} ({:?} of node {}): {} served again {got:?} ms after its new \
                     leader (limit {SERVED_AGAIN_LIMIT:?}); {s:?}",
                    i + 1,
                    r.fault,
                    r.node,
                    s.address
                )),
            }
        }
    }
    if failures.is_empty() {
        return;
    }
    let mut report = String::new();
    for ((load, v), address) in loads.iter().zip(&verdicts).zip(ADDRESSES) {
        if !v.broken_promises().is_empty() {
            let title = format!("{address} broke its promises");
            report += &load.ctx().ledger().failure_report(&title, &[], v, 4);
        }
    }
    panic!(
        "the groups campaign failed:\n  - {}\n{report}",
        failures.join("\n  - ")
    );
}

fn show_ms(ms: Option<u64>) -> String {
    match ms {
        None => "none".to_owned(),
        Some(u64::MAX) => "never".to_owned(),
        Some(ms) => ms.to_string(),
    }
}
