//! The rounds and the judge of issue 12's fault campaign in `cluster-mode: groups`,
//! whatever runs the nodes: processes (`cluster_groups_campaign`) or containers of the
//! project's image (`container_campaign`). Each says how it faults and restores a node
//! ([`Nodes`]); the load, the choice of the node, the clock and the verdict are this
//! module's, so both campaigns make the same promises, measured the same way.
//!
//! - The load: per address of [`ADDRESSES`] one load of the one-group campaign's clients
//!   and ledger (`elasticity::load`): one windowed producer (persistent 1 KiB), one
//!   settle-mode-second consumer that watches its connection with an AMQP idle-time-out
//!   of [`IDLE_TIME_OUT`] and one *patient* consumer with none. Address i's clients start
//!   on nodes i, i + 1, … and follow `amqp:link:redirect` to the address's leader; a
//!   client whose connection ends starts again at the next ready node of the
//!   [`Endpoints`] (a faulted node leaves them, as a Kubernetes Service drops a pod whose
//!   readiness fails, and comes back after).
//! - The node: each round asks every running node which addresses it leads (its
//!   `/status` `led-addresses`) until each address is led by exactly one node, and picks
//!   in turn one that leads at least one.
//! - The clock: for each address the faulted node led, the round notes when a survivor
//!   first names it among its led addresses (polled every [`POLL`]: the group has a new
//!   leader, the first moment the address *can* be served), then the first message of
//!   that address accepted and the first delivery of it consumed after that moment;
//!   "served again" is the later of the two, from the new leader. A survivor's
//!   leadership can only start once the old leader's election timeout has passed, so
//!   this is the one-group campaign's clock, per address. The time from the fault is
//!   printed too.
//! - The verdict ([`judge`]): lost = 0, duplicates = 0 (delivered again after a
//!   consumer's accepted was settled), no refused message delivered, every address
//!   accepted and consumed something, and every affected address of every round served
//!   again within [`SERVED_AGAIN_LIMIT`] (the election timeout + 1 s). The longest stall
//!   of any one client is printed, not judged (the patient consumer waits out every stop
//!   on its node). The last line: `<name>: rounds=R kills=K stops=S addresses_faulted=F
//!   sent=N accepted=A delivered=D lost=L duplicates=U worst_served_again_ms=W`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

// The campaign's timings are the one-group campaign's (cluster_campaign.rs).
use crate::cluster_campaign::{
    served_again_ms, Fault, CALM, DOWN_FOR, DRAIN_LIMIT, DRAIN_QUIET, ROUND_LIMIT,
    SERVED_AGAIN_LIMIT, STOPPED_FOR,
};
use crate::elasticity::load::{Endpoints, Load, LoadSpec};

/// The queues, each its own Raft group (six on three nodes: every node leads two).
pub(crate) const ADDRESSES: [&str; 6] = ["gc-a", "gc-b", "gc-c", "gc-d", "gc-e", "gc-f"];
/// Sequence numbers of address i start at 1 + i × this.
const SEQ_SPAN: u64 = 1_000_000_000;
/// The idle-time-out of the watching clients: a node silent this long is left.
const IDLE_TIME_OUT: Duration = Duration::from_millis(600);
/// Redirects a client follows in a row.
const MAX_HOPS: usize = 4;
/// Unsettled sends per producer (six producers share two cores with three nodes).
const IN_FLIGHT: usize = 16;
/// Longest the addresses may take to be led by exactly one node each.
const LEADERS_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a round looks at the survivors' leaderships.
const POLL: Duration = Duration::from_millis(10);

/// What runs the nodes, and how a fault is done to one and undone.
pub(crate) trait Nodes {
    /// The nodes that run now (a stopped one included).
    fn running(&self) -> Vec<u64>;
    /// Where clients reach node `id` (it runs).
    fn amqp(&self, id: u64) -> std::net::SocketAddr;
    /// The addresses each of `ids` says it leads (a node that does not answer leads none).
    fn led_addresses(&self, ids: &[u64]) -> BTreeMap<u64, Vec<String>>;
    /// Does `fault` to node `id`, which already left the ready `endpoints`.
    fn fault(&mut self, id: u64, fault: Fault, endpoints: &Endpoints);
    /// Undoes it (restarts a killed node on its data, resumes a stopped one) and puts the
    /// node back among the ready `endpoints`.
    fn restore(&mut self, id: u64, fault: Fault, endpoints: &Endpoints);
    /// Where a failure's evidence is kept, for the report (empty: the failure prints it).
    fn evidence(&self) -> String {
        String::new()
    }
}

/// One campaign: what it is called in its output, and how long and with what it runs.
pub(crate) struct Campaign {
    /// The prefix of every line it prints (`groups campaign`, `container campaign`).
    pub name: &'static str,
    pub rounds: usize,
    /// Alternated round by round.
    pub faults: Vec<Fault>,
    /// Print every client reconnect.
    pub verbose: bool,
}

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
        served_again_ms(self.elected_ms, self.accepted_ms, self.consumed_ms)
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

impl Campaign {
    /// Runs the load and the rounds on `nodes` (every one running and ready), then judges;
    /// panics with the evidence when a promise broke.
    pub fn run(&self, nodes: &mut impl Nodes) {
        let endpoints = Arc::new(Endpoints::default());
        for id in nodes.running() {
            endpoints.set(id, nodes.amqp(id));
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
                Load::start_with(&rt, Arc::clone(&endpoints), spec, self.verbose)
            })
            .collect();
        let leaders = agreed_leaders(nodes, &nodes.running());
        eprintln!("{}: leaders {leaders:?}", self.name);
        std::thread::sleep(CALM);
        let mut done = Vec::new();
        for r in 0..self.rounds {
            let fault = self.faults[r % self.faults.len()];
            let round = run_round(nodes, &endpoints, &loads, fault, r);
            self.print_round(r, &round);
            done.push(round);
            std::thread::sleep(CALM);
        }
        for load in &mut loads {
            load.finish(&rt, DRAIN_QUIET, DRAIN_LIMIT);
        }
        judge(self.name, &loads, &done, &nodes.evidence());
    }

    fn print_round(&self, r: usize, round: &Round) {
        for s in &round.addresses {
            eprintln!(
                "{}: round {} {:?} of node {}: {} led by {:?} after {:?} ms, served again \
                 {:?} ms after it (accepted at {:?} ms, consumed at {:?} ms)",
                self.name,
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
    }
}

/// Address → the node leading it, once every address is led by exactly one of `ids`
/// (a resumed node may still call itself leader until it hears of the new term).
fn agreed_leaders(nodes: &impl Nodes, ids: &[u64]) -> BTreeMap<&'static str, u64> {
    let deadline = Instant::now() + LEADERS_TIMEOUT;
    loop {
        let led = nodes.led_addresses(ids);
        let mut leaders = BTreeMap::new();
        for address in ADDRESSES {
            let by: Vec<u64> = led
                .iter()
                .filter(|(_, a)| a.iter().any(|x| x == address))
                .map(|(id, _)| *id)
                .collect();
            if let [one] = by[..] {
                leaders.insert(address, one);
            }
        }
        if leaders.len() == ADDRESSES.len() {
            return leaders;
        }
        assert!(
            Instant::now() < deadline,
            "not every address led by exactly one node within {LEADERS_TIMEOUT:?}: {led:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One fault on a node leading at least one address, measured per address it led, and
/// the node brought back.
fn run_round(
    nodes: &mut impl Nodes,
    endpoints: &Endpoints,
    loads: &[Load],
    fault: Fault,
    r: usize,
) -> Round {
    let running = nodes.running();
    let leaders = agreed_leaders(nodes, &running);
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
    nodes.fault(node, fault, endpoints);
    let ms = |t: Instant| t.duration_since(t0).as_millis() as u64;
    let counters = |address: &str| {
        let i = ADDRESSES.iter().position(|a| *a == address).expect("known");
        let ledger = loads[i].ctx().ledger();
        (ledger.confirmed_total(), ledger.finals())
    };
    let deadline = t0 + ROUND_LIMIT;
    while Instant::now() < deadline && !round.addresses.iter().all(Served::done) {
        let led = nodes.led_addresses(&survivors);
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
    let away = match fault {
        Fault::Kill => DOWN_FOR,
        Fault::Stop => STOPPED_FOR,
    };
    std::thread::sleep(away.saturating_sub(t0.elapsed()));
    nodes.restore(node, fault, endpoints);
    round
}

/// Prints the counts and the campaign's last line; panics with what broke, if anything.
fn judge(name: &str, loads: &[Load], rounds: &[Round], evidence: &str) {
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
        "{name}: refused {} unconfirmed {}; reconnects {reconnects:?}; longest stall of one \
         client {:.2} s ({} at {:.1} s); worst served again from the fault {}",
        sum(|v| v.refused),
        sum(|v| v.unconfirmed),
        stall.ms as f64 / 1000.0,
        stall.client,
        stall.at_ms as f64 / 1000.0,
        show_ms(worst_from_fault)
    );
    println!(
        "{name}: rounds={} kills={kills} stops={} addresses_faulted={} sent={} accepted={} \
         delivered={} lost={lost} duplicates={duplicates} worst_served_again_ms={}",
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
        "the {name} failed:\n  - {}\n{report}{evidence}",
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
