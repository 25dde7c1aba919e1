//! Issue 13, point 5: scaling a StatefulSet of brokers 3 → 4 → 5 → 4 → 3 and a rolling
//! restart of the three, under load, lose no accepted message, duplicate none a consumer
//! had accepted, and stall no client.
//!
//! Method: the project's image (docker/build.sh, shared with `container`) runs as a
//! StatefulSet reproduced with Docker (`statefulset`: ordinal hostnames, a DNS alias per
//! pod under the headless service, one volume per ordinal, ordered start, ordered stop
//! through `entrepot drain` then `docker stop`). Four producers (persistent 1 KiB, 64
//! unsettled each) and four settle-mode-second consumers, the fault campaign's clients
//! and ledger (`load`), start on different pods and move to the next pod whenever their
//! connection ends. A client connects only to ready pods (the client Service), but follows
//! a redirect to any pod whose container runs, ready or not: the headless Service
//! publishes not-ready addresses, so a pod's DNS name resolves from its start (a
//! restarted pod that takes its groups back before it is ready is reached). Steps: scale up to 4 and 5 (a pod starts, joins, is ready), down to 4
//! and 3 (the highest pod drains and stops), then restart pods 2, 1, 0 in turn (the drain
//! must be a no-op: ordinal < desired replicas). After each step: the leader's membership
//! is exactly the running pods, leaderships are balanced (every node leads within ±1 of
//! G/N groups; G = 1 with today's single Raft group), and the test holds until
//! throughput is back. At the end the producers stop, the consumers take what is left,
//! and the ledger judges every message.
//!
//! Asserted: lost = 0 (accepted by the broker, never received); duplicates = 0
//! (delivered again after a consumer's accepted was settled); no client went more than
//! [`MAX_STALL_S`] without progress while it had work; after each step throughput is back
//! to 90 % of its pre-step rate within [`RECOVERY_LIMIT_S`] (`timeline`; judged in the
//! full run, measured and printed in the short one, see `Length`); balanced
//! leaders and exact membership after each step (groups mode: above); every drain exits 0 and every broker
//! exits 0 on SIGTERM. Prints the timeline per second with step markers while it runs,
//! writes it as text and PNG (`plot`) to target/tmp/elasticity/<pid>/ with every
//! container's log, and ends with `elasticity: lost=L duplicates=D max_stall_s=S
//! worst_recovery_s=R`.
//!
//! Every pod here shares the host's cores and disk (each voter fsyncs every Raft entry):
//! a scale-up adds work to the same machine, so on a small host throughput after `4>5`
//! can settle below 90 % of the three-node rate — the recovery check then measures the
//! host, and the step table shows it (per-second rates, pre-step rate, recovery).
//!
//! Groups mode (`scaling_groups_…`, `run.sh --groups`): the pods run
//! `--cluster-mode groups` (a Raft group per address, group 0 the metadata) and the load
//! is eight queues ([`GROUPS_ADDRESSES`], G = 8), one producer and one consumer each (8
//! and 8, 32 unsettled per producer), every client following `amqp:link:redirect` to its
//! address's leader (the redirect names the pod's DNS name, mapped to where this process
//! reaches it). After each step the pods' `groups:` sections must show it settled
//! (`groups`: members exactly the running pods on every pod, one metadata leader, no
//! replica move in flight, every address group led with voters = its placement) within
//! [`GROUPS_SETTLE`], and both the groups each node leads and those it is the preferred
//! leader of must be within ±1 of G/N; the table of both per step is printed. The plan is
//! the same: 3 is the floor (a drain below the replication factor 3 is refused).
//!
//! Length: short by default (CI, about 2 minutes); `ENTREPOT_ELASTICITY=full` holds each
//! step longer (`bash tests/elasticity/run.sh`). Membership changes are the broker's own
//! (auto-join, `entrepot drain`) when the image has `entrepot drain`; otherwise this test
//! makes them through the admin API (`ENTREPOT_ELASTICITY_MEMBERSHIP=admin|drain`
//! forces one). `ENTREPOT_ELASTICITY_VERBOSE=1` prints every client reconnect. Fails
//! where Docker is not usable, unless `ENTREPOT_TEST_ALLOW_SKIP=1`.

mod groups;
pub(crate) mod load;
mod plot;
pub(crate) mod statefulset;
mod timeline;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::campaign::ledger::Verdict;
use crate::container::docker;
use groups::Leaderships;
use load::{Endpoints, Load, LoadSpec, Sample};
use statefulset::{Membership, Mode, StatefulSet, INITIAL_MEMBERS};
use timeline::{Step, StepVerdict};

const TEST: &str =
    "scaling_3_5_3_and_rolling_all_pods_under_load_loses_nothing_and_stalls_no_client";
const TEST_GROUPS: &str =
    "scaling_groups_3_5_3_and_rolling_all_pods_under_load_loses_nothing_and_stalls_no_client";
/// Longest any client may go without progress while it has work.
const MAX_STALL_S: f64 = 2.0;
/// Throughput must be back within this long after each step.
const RECOVERY_LIMIT_S: f64 = 10.0;
/// Raft groups: one today (every node leads 0 or 1 of them).
const GROUPS: u64 = 1;
/// Longest leadership may take to settle after a step before balance is judged.
const LEADER_SETTLE: Duration = Duration::from_secs(10);
/// The same in groups mode, where a step settles once every replica move of the
/// balancer is done (a join moves most groups: learner, catch-up under load, voter, the
/// old replica removed; 8–17 s in the debug-build membership test).
const GROUPS_SETTLE: Duration = Duration::from_secs(30);
/// Groups mode: the queues of the load, each its own Raft group (G = 8: on 3, 4 and 5
/// nodes every node has a share to lead, 2–3, 2 and 1–2).
const GROUPS_ADDRESSES: [&str; 8] = [
    "elastic-a",
    "elastic-b",
    "elastic-c",
    "elastic-d",
    "elastic-e",
    "elastic-f",
    "elastic-g",
    "elastic-h",
];
/// Groups mode: unsettled sends per producer (one producer per address: 8 × 32, the
/// one-group run's 4 × 64 in flight).
const GROUPS_IN_FLIGHT: usize = 32;
/// Groups mode: redirects a client follows in a row before it goes back to the Service.
const GROUPS_MAX_HOPS: usize = 4;
/// Groups mode: sequence numbers of address i start at 1 + i × this.
const GROUPS_SEQ_SPAN: u64 = 1_000_000_000;
/// The final drain ends after this long without a settlement, or at the limit.
const DRAIN_QUIET: Duration = Duration::from_secs(3);
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// Distinct broker warnings kept for a failure report.
const WARNINGS_KEPT: usize = 40;

/// How long the run holds before the first step and after each.
struct Length {
    name: &'static str,
    warmup: Duration,
    hold: Duration,
    /// Whether a step whose throughput is not back within [`RECOVERY_LIMIT_S`] fails the
    /// run. The short (CI) run measures and prints recovery but does not judge it: with
    /// 7 s per step on one 2-core host whose every pod shares the cores and the disk, the
    /// rate after a scale-up measures the host (5 of 9 short runs passed it while the
    /// full run passed every time); loss, duplicates, stalls and membership are judged in
    /// both.
    judge_recovery: bool,
}

const SHORT: Length = Length {
    name: "short",
    warmup: Duration::from_secs(7),
    hold: Duration::from_secs(7),
    judge_recovery: false,
};
const FULL: Length = Length {
    name: "full",
    warmup: Duration::from_secs(15),
    hold: Duration::from_secs(25),
    judge_recovery: true,
};

/// One membership step of the run.
#[derive(Clone, Copy, Debug)]
enum Action {
    /// Start pod k (replicas k → k+1).
    Up(u64),
    /// Drain and stop pod k (replicas k+1 → k).
    Down(u64),
    /// Restart pod k with the replica count unchanged.
    Restart(u64),
}

const PLAN: [Action; 7] = [
    Action::Up(3),
    Action::Up(4),
    Action::Down(4),
    Action::Down(3),
    Action::Restart(2),
    Action::Restart(1),
    Action::Restart(0),
];

impl Action {
    fn label(self) -> String {
        match self {
            Action::Up(k) => format!("{k}>{}", k + 1),
            Action::Down(k) => format!("{}>{k}", k + 1),
            Action::Restart(k) => format!("R{k}"),
        }
    }
}

#[test]
fn scaling_3_5_3_and_rolling_all_pods_under_load_loses_nothing_and_stalls_no_client() {
    scale_and_roll(Mode::OneGroup, TEST);
}

/// The same plan and promises with a Raft group per address (see the module docs).
#[test]
fn scaling_groups_3_5_3_and_rolling_all_pods_under_load_loses_nothing_and_stalls_no_client() {
    scale_and_roll(Mode::Groups, TEST_GROUPS);
}

/// The test, in `mode`; `test` names it where Docker is missing.
fn scale_and_roll(mode: Mode, test: &str) {
    if !docker::usable_for(test) {
        return;
    }
    let length = match std::env::var("ENTREPOT_ELASTICITY").as_deref() {
        Ok("full") => FULL,
        _ => SHORT,
    };
    let image = docker::ensure_image();
    let membership = Membership::detect(image);
    let dir = run_dir("elasticity");
    eprintln!(
        "elasticity: {} run in {} mode, membership changes by {membership:?}, output in {}",
        length.name,
        mode.name(),
        dir.display()
    );
    let began = Instant::now();
    let mut set = StatefulSet::new("elastic", image, mode, membership, dir.join("logs"));
    set.start_initial();
    eprintln!(
        "elasticity: pods 0..{INITIAL_MEMBERS} ready in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    let endpoints = Arc::new(Endpoints::default());
    for (k, pod) in &set.pods {
        endpoints.set(*k, pod.amqp);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let verbose = std::env::var("ENTREPOT_ELASTICITY_VERBOSE").as_deref() == Ok("1");
    let load = match mode {
        Mode::OneGroup => Load::start(&rt, Arc::clone(&endpoints), verbose),
        Mode::Groups => Load::start_many(&rt, Arc::clone(&endpoints), groups_load(), verbose),
    };
    let mut run = Run {
        load,
        endpoints,
        set,
        steps: Arc::default(),
        leaderships: Vec::new(),
        problems: Vec::new(),
        length,
    };
    eprintln!(
        "elasticity: the load began at {} (t = 0 of the timeline; container logs are in UTC)",
        utc_now()
    );
    let printing = Arc::new(AtomicBool::new(true));
    let printer = run.spawn_printer(Arc::clone(&printing));
    std::thread::sleep(run.length.warmup);
    for action in PLAN {
        run.step(action);
    }
    run.load.finish(&rt, DRAIN_QUIET, DRAIN_LIMIT);
    printing.store(false, Ordering::Relaxed);
    let _ = printer.join();
    run.judge(&dir, began);
}

/// The set, the load and what the steps found.
struct Run {
    set: StatefulSet,
    load: Load,
    endpoints: Arc<Endpoints>,
    steps: Arc<Mutex<Vec<Step>>>,
    /// Groups mode: the leaderships each step settled with (None: it did not settle).
    leaderships: Vec<(String, Option<Leaderships>)>,
    /// Broken promises other than the ledger's: failed drains, unclean exits,
    /// membership or balance off after a step.
    problems: Vec<String>,
    length: Length,
}

impl Run {
    /// Runs one step, checks membership and balance, holds until throughput is back.
    fn step(&mut self, action: Action) {
        let label = action.label();
        let start_ms = self.load.now_ms();
        self.steps.lock().expect("steps").push(Step {
            label: label.clone(),
            start_ms,
            end_ms: u64::MAX,
        });
        let epoch = self.steps.lock().expect("steps").len() as u32;
        for ctx in &self.load.ctxs {
            ctx.ledger().set_epoch(epoch);
        }
        let problems = match action {
            Action::Up(k) => {
                let endpoints = Arc::clone(&self.endpoints);
                self.set
                    .scale_up(k, move |addr| endpoints.resolvable(k, addr));
                self.endpoints.set(k, self.set.pods[&k].amqp);
                Vec::new()
            }
            Action::Down(k) => {
                // A terminating pod leaves the Service's endpoints first.
                self.endpoints.remove(k);
                let problems = self.set.scale_down(k, k);
                self.endpoints.forget(k);
                problems
            }
            Action::Restart(k) => {
                self.endpoints.remove(k);
                let desired = self.set.pods.len() as u64;
                let (gone, started) = (Arc::clone(&self.endpoints), Arc::clone(&self.endpoints));
                let problems = self.set.restart(
                    k,
                    desired,
                    move || gone.forget(k),
                    move |addr| started.resolvable(k, addr),
                );
                self.endpoints.set(k, self.set.pods[&k].amqp);
                problems
            }
        };
        let end_ms = self.load.now_ms();
        if let Some(step) = self.steps.lock().expect("steps").last_mut() {
            step.end_ms = end_ms;
        }
        self.problems
            .extend(problems.into_iter().map(|p| format!("{label}: {p}")));
        let checked = match self.set.mode {
            Mode::OneGroup => self.check_cluster(),
            Mode::Groups => self.check_groups(&label),
        };
        match checked {
            Ok(summary) => eprintln!(
                "elasticity: {label} done in {:.1} s; {summary}",
                (end_ms - start_ms) as f64 / 1000.0
            ),
            Err(e) => {
                eprintln!("elasticity: {label}: {e}");
                self.problems.push(format!("{label}: {e}"));
            }
        }
        self.hold(start_ms, end_ms);
    }

    /// Holds for the run's hold time, and longer (up to the recovery limit) while
    /// throughput is not back to the pre-step rate.
    fn hold(&self, start_ms: u64, end_ms: u64) {
        std::thread::sleep(self.length.hold);
        let limit_ms = end_ms + (RECOVERY_LIMIT_S * 1000.0) as u64 + 500;
        loop {
            let samples = self.samples();
            let pre = timeline::pre_rate(&samples, start_ms);
            let now = self.load.now_ms();
            let back = timeline::recovery(&samples, pre, end_ms, now).is_some();
            if back || now > limit_ms {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn samples(&self) -> Vec<Sample> {
        self.load.samples.lock().expect("samples").clone()
    }

    /// Waits until every pod agrees on one leader, then checks that the membership is
    /// exactly the running pods and that leaderships are balanced.
    fn check_cluster(&self) -> Result<String, String> {
        let deadline = Instant::now() + LEADER_SETTLE;
        let mut last = String::new();
        while Instant::now() < deadline {
            let statuses = self.set.statuses();
            match judge_cluster(&statuses) {
                Ok(summary) => return Ok(summary),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(last)
    }

    /// Groups mode: waits until the step settled (`groups::settled`) with balanced
    /// leaderships; records what it settled with. Err: not settled, or settled with
    /// leaderships out of ±1 of G/N (actual or preferred) when time ran out.
    fn check_groups(&mut self, label: &str) -> Result<String, String> {
        let deadline = Instant::now() + GROUPS_SETTLE;
        let started = Instant::now();
        let mut last: Result<Leaderships, String> = Err("not checked".into());
        while Instant::now() < deadline {
            last = groups::settled(&self.set.groups_statuses(), GROUPS_ADDRESSES.len());
            if last
                .as_ref()
                .is_ok_and(|l| l.led_balanced() && l.preferred_balanced())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let took = started.elapsed().as_secs_f64();
        self.leaderships
            .push((label.to_owned(), last.as_ref().ok().cloned()));
        let leads = last?;
        let (g, n) = (GROUPS_ADDRESSES.len(), leads.led.len());
        let summary = format!(
            "settled in {took:.1} s: members {:?}, metadata leader {}, groups led per node              {:?}, preferred {:?} (G={g}, N={n})",
            leads.led.keys().collect::<Vec<_>>(),
            leads.metadata,
            leads.led,
            leads.preferred
        );
        let mut off = Vec::new();
        if !leads.led_balanced() {
            off.push("led");
        }
        if !leads.preferred_balanced() {
            off.push("preferred");
        }
        if off.is_empty() {
            Ok(summary)
        } else {
            Err(format!(
                "leaderships ({}) not within ±1 of G/N after {took:.1} s; {summary}",
                off.join(", ")
            ))
        }
    }

    /// Prints one timeline line per second (with step markers) until `printing` clears.
    fn spawn_printer(&self, printing: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        let samples = Arc::clone(&self.load.samples);
        let steps = Arc::clone(&self.steps);
        let ctxs = self.load.ctxs.clone();
        std::thread::spawn(move || {
            let mut second = 1u64;
            let mut marked = (0usize, 0usize);
            eprintln!("elasticity:    t  accepted/s  consumed/s  waiting  step");
            while printing.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let now = samples
                    .lock()
                    .expect("samples")
                    .last()
                    .map_or(0, |s| s.at_ms);
                if now < second * 1000 {
                    continue;
                }
                let snapshot = samples.lock().expect("samples").clone();
                let (acc, con) = timeline::per_second(&snapshot)
                    .get(second as usize - 1)
                    .map_or((0.0, 0.0), |(_, a, c)| (*a, *c));
                let backlog: u64 = ctxs.iter().map(|c| c.ledger().backlog()).sum();
                let steps = steps.lock().expect("steps").clone();
                let mut marks = Vec::new();
                for (i, s) in steps.iter().enumerate() {
                    if i >= marked.0 && s.start_ms < second * 1000 {
                        marks.push(format!(">> {}", s.label));
                        marked.0 = i + 1;
                    }
                    if i >= marked.1 && s.end_ms < second * 1000 {
                        marks.push(format!("<< {} done", s.label));
                        marked.1 = i + 1;
                    }
                }
                eprintln!(
                    "elasticity: {second:>4}  {acc:>10.0}  {con:>10.0}  {backlog:>7}  {}",
                    marks.join(" ")
                );
                second += 1;
            }
        })
    }

    /// Prints and writes the results; fails with the evidence when a promise broke.
    fn judge(mut self, dir: &Path, began: Instant) {
        let samples = self.samples();
        let steps = self.steps.lock().expect("steps").clone();
        let verdicts = timeline::judge(&samples, &steps, RECOVERY_LIMIT_S);
        let text = timeline::render(&samples, &steps);
        let _ = std::fs::write(dir.join("timeline.txt"), &text);
        let png = dir.join("timeline.png");
        if let Err(e) = timeline::write_png(&samples, &steps, &png) {
            self.problems
                .push(format!("writing {}: {e}", png.display()));
        }
        // Evidence for passing runs too: the last pods' logs beside the deleted ones'.
        self.set.save_logs();
        let mut v = Verdict::default();
        for ctx in &self.load.ctxs {
            v.absorb(ctx.ledger().verdict());
        }
        let stall = self.load.stall.lock().expect("stall").clone();
        let max_stall_s = stall.ms as f64 / 1000.0;
        let worst_recovery_s = verdicts
            .iter()
            .map(|s| s.recovery_s.unwrap_or(s.searched_s))
            .fold(0.0, f64::max);
        eprintln!("elasticity: steps:\n{}", step_table(&verdicts));
        if !self.leaderships.is_empty() {
            eprintln!(
                "elasticity: address groups led (preferred) per node after each step, G={}:\n{}",
                GROUPS_ADDRESSES.len(),
                leadership_table(&self.leaderships)
            );
        }
        eprintln!(
            "elasticity: sent {} accepted {} consumed {} refused {} unconfirmed {} (delivered \
             {}) ghosts {} foreign {}; reconnects {:?}; longest stall {:.2} s ({} at {:.1} s); \
             whole run {:.0} s",
            v.sent,
            v.confirmed,
            v.consumed,
            v.refused,
            v.unconfirmed,
            v.unconfirmed_delivered,
            v.ghosts.len(),
            v.foreign.len(),
            self.load.reconnects(),
            max_stall_s,
            stall.client,
            stall.at_ms as f64 / 1000.0,
            began.elapsed().as_secs_f64()
        );
        for e in self.load.episodes.lock().expect("episodes").iter() {
            let from = e.at_ms.saturating_sub(e.ms);
            eprintln!(
                "elasticity: stall of {:.2} s: {} from {:.1} s to {:.1} s{}",
                e.ms as f64 / 1000.0,
                e.client,
                from as f64 / 1000.0,
                e.at_ms as f64 / 1000.0,
                during(&steps, from, e.at_ms)
            );
        }
        if let Some(seq) = v.late_attempts.first() {
            eprintln!(
                "elasticity: {} deliveries were earlier attempts read late (lower delivery-count \
                 than the settled redelivery, never settled: at-least-once, not a duplicate); \
                 the first:\n{}",
                v.late_attempts.len(),
                self.explain(*seq)
            );
        }
        eprintln!(
            "elasticity: timeline {}",
            dir.join("timeline.txt").display()
        );
        eprintln!("elasticity: plot {}", png.display());
        println!(
            "elasticity: lost={} duplicates={} max_stall_s={max_stall_s:.2} \
             worst_recovery_s={worst_recovery_s:.2}",
            v.lost.len(),
            v.duplicated.len()
        );
        let mut failures = self.problems.clone();
        failures.extend(v.broken_promises());
        if max_stall_s > MAX_STALL_S {
            failures.push(format!(
                "{} made no progress for {max_stall_s:.2} s (until {:.1} s) with work to do \
                 (limit {MAX_STALL_S} s)",
                stall.client,
                stall.at_ms as f64 / 1000.0
            ));
        }
        for s in &verdicts {
            if !self.length.judge_recovery {
                eprintln!(
                    "elasticity: recovery measured, not judged in the {} run (see Length)",
                    self.length.name
                );
                break;
            }
            if s.recovery_s.is_none_or(|r| r > RECOVERY_LIMIT_S) {
                failures.push(format!(
                    "after {}, throughput not back to 90 % of {:.0}/s within {:.1} s",
                    s.label, s.pre_rate, s.searched_s
                ));
            }
        }
        if failures.is_empty() {
            return;
        }
        let mut report = String::new();
        for (i, ctx) in self.load.ctxs.iter().enumerate() {
            let ledger = ctx.ledger();
            let mine = ledger.verdict();
            if i == 0 || !mine.broken_promises().is_empty() {
                let (title, listed) = match i {
                    0 => ("elasticity broke its promises", &failures[..]),
                    _ => ("and on another address", &[][..]),
                };
                report += &ledger.failure_report(title, listed, &mine, 8);
            }
        }
        let _ = writeln!(
            report,
            "steps (ms since the load began; epoch = step number):"
        );
        for s in &steps {
            let _ = writeln!(report, "    {} {}..{}", s.label, s.start_ms, s.end_ms);
        }
        report += &warnings(self.set.logs_dir());
        let _ = writeln!(report, "container logs: {}", self.set.logs_dir().display());
        panic!("{report}");
    }
}

impl Run {
    /// The history of `seq` from the ledger of its address.
    fn explain(&self, seq: u64) -> String {
        let i = ((seq.saturating_sub(1)) / GROUPS_SEQ_SPAN) as usize;
        self.load.ctxs.get(i).map_or_else(
            || format!("seq {seq}: no such address\n"),
            |ctx| ctx.ledger().explain(seq),
        )
    }
}

/// Groups mode: the load, one producer and one consumer per address of
/// [`GROUPS_ADDRESSES`] (8 and 8), client k of address i starting on pod i + k, every
/// client following redirects.
fn groups_load() -> Vec<LoadSpec> {
    GROUPS_ADDRESSES
        .iter()
        .enumerate()
        .map(|(i, &address)| LoadSpec {
            address,
            producers: 1,
            consumers: 1,
            patient_consumers: 0,
            in_flight: GROUPS_IN_FLIGHT,
            first_endpoint: i,
            first_seq: 1 + i as u64 * GROUPS_SEQ_SPAN,
            idle_time_out: None,
            max_hops: GROUPS_MAX_HOPS,
        })
        .collect()
}

/// Groups mode: one line per step, each node's address groups led and (in brackets)
/// preferred.
fn leadership_table(rows: &[(String, Option<Leaderships>)]) -> String {
    let mut out = String::from("    step   metadata  per node: led (preferred)\n");
    for (label, leads) in rows {
        let Some(l) = leads else {
            let _ = writeln!(out, "    {label:<5}  not settled");
            continue;
        };
        let nodes: Vec<String> = l
            .led
            .iter()
            .map(|(k, led)| format!("{k}: {led} ({})", l.preferred.get(k).unwrap_or(&0)))
            .collect();
        let _ = writeln!(
            out,
            "    {label:<5}  {:>8}  {}",
            l.metadata,
            nodes.join("  ")
        );
    }
    out
}

/// Every pod answers, all name the same leader, exactly one leads; the leader's voters
/// are the running pods (no learner left); each node leads within ±1 of G/N groups.
fn judge_cluster(statuses: &BTreeMap<u64, Option<statefulset::Status>>) -> Result<String, String> {
    let pods: Vec<u64> = statuses.keys().copied().collect();
    let mut leads = BTreeMap::new();
    let mut leader = None;
    for (k, s) in statuses {
        let s = s
            .as_ref()
            .ok_or(format!("entrepot-{k} does not answer GET /cluster"))?;
        let named = s.leader.ok_or(format!("entrepot-{k} knows no leader"))?;
        if *leader.get_or_insert(named) != named {
            return Err(format!("pods disagree on the leader: {statuses:?}"));
        }
        leads.insert(*k, u64::from(s.leads));
    }
    let leader = leader.ok_or("no pod")?;
    let status = statuses
        .get(&leader)
        .and_then(Option::as_ref)
        .ok_or(format!("the leader {leader} is not a running pod"))?;
    let voters: Vec<u64> = status.voters.iter().copied().collect();
    if voters != pods || !status.learners.is_empty() {
        return Err(format!(
            "membership {voters:?} (learners {:?}) is not the running pods {pods:?}",
            status.learners
        ));
    }
    let n = pods.len() as u64;
    let total: u64 = leads.values().sum();
    // |leads - G/N| <= 1, in integers.
    let balanced = leads.values().all(|l| (l * n).abs_diff(GROUPS) <= n);
    if total != GROUPS || !balanced {
        return Err(format!(
            "leaderships {leads:?} of {GROUPS} group(s) over {n} nodes are not balanced"
        ));
    }
    Ok(format!(
        "members {pods:?}, leader {leader}, leaderships per node {:?} (G={GROUPS}, N={n})",
        leads.values().collect::<Vec<_>>()
    ))
}

/// " (during/after STEP)" for the step whose span, or the hold after it, holds `from`.
fn during(steps: &[Step], from: u64, to: u64) -> String {
    let Some(step) = steps.iter().rev().find(|s| s.start_ms <= to) else {
        return " (before the first step)".into();
    };
    if from <= step.end_ms {
        format!(" (during {})", step.label)
    } else {
        format!(" (after {})", step.label)
    }
}

fn step_table(verdicts: &[StepVerdict]) -> String {
    let mut out = String::from("    step   took_s  pre_rate/s  recovery_s\n");
    for s in verdicts {
        let recovery = s
            .recovery_s
            .map_or(format!("> {:.1}", s.searched_s), |r| format!("{r:.2}"));
        let _ = writeln!(
            out,
            "    {:<5}  {:>6.1}  {:>10.0}  {recovery:>10}",
            s.label, s.took_s, s.pre_rate
        );
    }
    out
}

/// The brokers' distinct warnings and errors across every saved log, with counts.
pub(crate) fn warnings(logs: &Path) -> String {
    let mut seen: Vec<(String, String, usize)> = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(logs)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
        for line in text
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        {
            let body = line.split_once(' ').map_or(line, |(_, t)| t);
            let key: String = body
                .chars()
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .collect();
            if let Some(entry) = seen.iter_mut().find(|(k, _, _)| *k == key) {
                entry.2 += 1;
            } else if seen.len() < WARNINGS_KEPT {
                let first = format!("{}: {line}", name.clone().unwrap_or_default());
                seen.push((key, first, 1));
            }
        }
    }
    let mut out = String::from("broker warnings and errors (distinct, first occurrence, count):\n");
    for (_, first, n) in seen {
        let _ = writeln!(out, "    {n} x {first}");
    }
    out
}

/// target/tmp/<test>/<pid>: the test's output and container logs (the elasticity test's
/// timeline and plot).
pub(crate) fn run_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(test)
        .join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).expect("run dir");
    dir
}

/// The wall clock as `HH:MM:SS.mmm UTC`, to line the timeline up with container logs.
fn utc_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, ms) = (now.as_secs() % 86_400, now.subsec_millis());
    format!(
        "{:02}:{:02}:{:02}.{ms:03} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod judging {
    use std::collections::{BTreeMap, BTreeSet};

    use super::judge_cluster;
    use super::statefulset::Status;

    fn status(leads: bool, leader: u64, voters: &[u64], learners: &[u64]) -> Option<Status> {
        Some(Status {
            leads,
            leader: Some(leader),
            voters: voters.iter().copied().collect::<BTreeSet<_>>(),
            learners: learners.iter().copied().collect::<BTreeSet<_>>(),
        })
    }

    #[test]
    fn a_step_is_judged_on_membership_agreement_and_balance() {
        let good: BTreeMap<u64, Option<Status>> = (0..3)
            .map(|k| (k, status(k == 1, 1, &[0, 1, 2], &[])))
            .collect();
        assert!(judge_cluster(&good).is_ok());
        // The drained pod is still a voter (a scale-down that skipped the drain).
        let mut stale = good.clone();
        stale.insert(1, status(true, 1, &[0, 1, 2, 3], &[]));
        assert!(judge_cluster(&stale).unwrap_err().contains("membership"));
        // A joiner left as a learner.
        let mut learner = good.clone();
        learner.insert(1, status(true, 1, &[0, 1, 2], &[3]));
        assert!(judge_cluster(&learner).is_err());
        // Two nodes say they lead: more leaderships than groups.
        let mut two = good.clone();
        two.insert(0, status(true, 1, &[0, 1, 2], &[]));
        assert!(judge_cluster(&two).unwrap_err().contains("balanced"));
        // A pod that names another leader, or none.
        let mut split = good.clone();
        split.insert(2, status(false, 0, &[0, 1, 2], &[]));
        assert!(judge_cluster(&split).unwrap_err().contains("disagree"));
        let mut silent = good;
        silent.insert(2, None);
        assert!(judge_cluster(&silent).is_err());
    }

    #[test]
    fn recovery_counts_from_the_end_of_a_step_and_never_its_own_seconds() {
        use super::load::Sample;
        use super::timeline::{judge, Step};
        // 1000/s through the step (10-11 s), nothing for 3 s after it, then 1000/s again:
        // the step's own good second must not count as recovered.
        let mut samples = Vec::new();
        let mut count = 0;
        for at_ms in (0..=20_000).step_by(50) {
            if !(11_050..=14_000).contains(&at_ms) {
                count += 50;
            }
            samples.push(Sample {
                at_ms,
                confirmed: count,
                consumed: count,
            });
        }
        let step = Step {
            label: "x".into(),
            start_ms: 10_000,
            end_ms: 11_000,
        };
        let v = &judge(&samples, &[step], 10.0)[0];
        assert!((v.pre_rate - 1000.0).abs() < 1.0, "{v:?}");
        let r = v.recovery_s.expect("recovered");
        assert!((2.85..=3.0).contains(&r), "{v:?}");
    }
}
