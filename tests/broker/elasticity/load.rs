//! The load that runs through every step: the fault campaign's windowed producers and
//! settle-mode-second consumers (`campaign::producer::windowed`,
//! `campaign::consumer::run_at`) and its ledger, here pointed at the pods of the set.
//!
//! - [`Endpoints`] is the client Service: the pods that are ready and not terminating.
//!   Client k starts on pod k mod N; when its connection ends (its pod drained or
//!   stopped, the leader moved) it reconnects to the next pod of the Service.
//! - [`LoadSpec`] says who the clients are: by default ([`LoadSpec::one_queue`]) four
//!   producers and four consumers on the campaign's queue; the groups campaign runs one
//!   load per address, and the groups-mode elasticity run one load over several
//!   addresses ([`Load::start_many`]: one [`Ctx`] and ledger per address under one meter);
//!   their clients also follow `amqp:link:redirect` (straight to the node it names — an
//!   IP address, or a pod's DNS name the [`Endpoints`] know — at most
//!   [`LoadSpec::max_hops`] in a row) and may watch their connection with an AMQP
//!   idle-time-out (a stopped node is left, not waited for).
//! - Each client has a progress clock: producers tick on every accepted send (and while
//!   they hold back for the backlog: waiting for consumers, not the broker), consumers on
//!   every delivery and settlement. The [`Meter`] samples every clock every
//!   [`SAMPLE_EVERY`] and keeps the longest time any client went without progress while
//!   it had work (a producer always has; a consumer while messages wait: confirmed and
//!   not yet settled), and the ledger's counters for the timeline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::campaign::consumer::{self, Plan, Style};
use crate::campaign::producer::{self, Shape};
use crate::campaign::{Ctx, Dial, Left, Progress};

/// Producers and consumers (each at least 4, the floor).
pub const PRODUCERS: usize = 4;
pub const CONSUMERS: usize = 4;
/// Persistent 1 KiB messages, many unsettled in flight per producer.
const SHAPE: Shape = Shape {
    address: crate::campaign::QUEUE,
    body_bytes: 1024,
    durable: true,
    in_flight: 64,
};
/// Who the clients of one [`Load`] are and how they behave.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub address: &'static str,
    pub producers: usize,
    /// Consumers that watch their connection with [`LoadSpec::idle_time_out`].
    pub consumers: usize,
    /// Consumers that do not (an idle-time-out of none, as many clients run): a stopped
    /// node holds them until it resumes, which is what a deposed leader's delivery lease
    /// must be safe against.
    pub patient_consumers: usize,
    /// Unsettled sends per producer.
    pub in_flight: usize,
    /// Client k starts on endpoint k + `first_endpoint` (loads side by side start apart).
    pub first_endpoint: usize,
    /// The load's first message sequence number (loads side by side keep theirs apart).
    pub first_seq: u64,
    /// The idle-time-out of the producers and the watching consumers.
    pub idle_time_out: Option<Duration>,
    /// Redirects followed in a row before going back to the endpoints; 0: a redirect is
    /// a failure like any other.
    pub max_hops: usize,
}

impl LoadSpec {
    /// The one-group tests' load: [`PRODUCERS`] and [`CONSUMERS`] on the campaign queue.
    pub fn one_queue() -> LoadSpec {
        LoadSpec {
            address: crate::campaign::QUEUE,
            producers: PRODUCERS,
            consumers: CONSUMERS,
            patient_consumers: 0,
            in_flight: SHAPE.in_flight,
            first_endpoint: 0,
            first_seq: 1,
            idle_time_out: None,
            max_hops: 0,
        }
    }
}

/// Credit of each consumer.
const CREDIT: u32 = 100;
/// How often the meter samples the clocks and counters.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Pause before a client reconnects after its connection ended.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// Stalls at least this long are kept one by one, for the report.
const EPISODE_MIN_MS: u64 = 1000;
/// Clients get this long to stop politely before they are aborted.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// The client Service (ready pods, by ordinal) and the pods' own DNS names.
#[derive(Default)]
pub struct Endpoints(Mutex<Pods>);

#[derive(Default)]
struct Pods {
    /// Ready and not terminating: where a client (re)connects.
    ready: BTreeMap<u64, SocketAddr>,
    /// Every running pod, ready or not: where a redirect naming `entrepot-K.…` goes (a
    /// pod's DNS name resolves whether or not the Service lists it).
    running: BTreeMap<u64, SocketAddr>,
}

impl Endpoints {
    /// Pod `k` runs at `addr` and is ready.
    pub fn set(&self, k: u64, addr: SocketAddr) {
        let mut pods = self.0.lock().expect("endpoints");
        pods.ready.insert(k, addr);
        pods.running.insert(k, addr);
    }

    /// Pod `k` runs at `addr`, not ready yet: its name resolves (the headless Service
    /// publishes not-ready addresses, `examples/kubernetes/entrepot-services.yaml`), so a
    /// redirect to it is followed, but no client picks it to connect to.
    pub fn resolvable(&self, k: u64, addr: SocketAddr) {
        self.0.lock().expect("endpoints").running.insert(k, addr);
    }

    /// Pod `k` leaves the Service (terminating); its name still resolves.
    pub fn remove(&self, k: u64) {
        self.0.lock().expect("endpoints").ready.remove(&k);
    }

    /// Pod `k` is deleted: its name no longer resolves.
    pub fn forget(&self, k: u64) {
        let mut pods = self.0.lock().expect("endpoints");
        pods.ready.remove(&k);
        pods.running.remove(&k);
    }

    /// The pod serving at `addr`, when it is ready.
    fn pod_at(&self, addr: SocketAddr) -> Option<u64> {
        let pods = self.0.lock().expect("endpoints");
        pods.ready
            .iter()
            .find(|(_, a)| **a == addr)
            .map(|(k, _)| *k)
    }

    /// Where a redirect's `host:port` goes: an IP address as it is, a pod's DNS name
    /// (`entrepot-K.<service>:port`) to that pod's address as this process reaches it
    /// (the pods' AMQP port is the same everywhere). `None`: no such pod runs.
    pub fn resolve(&self, to: &str) -> Option<(u64, SocketAddr)> {
        if let Ok(addr) = to.parse::<SocketAddr>() {
            return Some((self.pod_at(addr).unwrap_or(NO_POD), addr));
        }
        let k = to
            .split('.')
            .next()?
            .strip_prefix("entrepot-")?
            .parse::<u64>()
            .ok()?;
        let addr = *self.0.lock().expect("endpoints").running.get(&k)?;
        Some((k, addr))
    }

    /// The `i`-th ready pod, round robin.
    fn pick(&self, i: usize) -> Option<(u64, SocketAddr)> {
        let pods = self.0.lock().expect("endpoints");
        if pods.ready.is_empty() {
            return None;
        }
        let n = pods.ready.len();
        pods.ready.iter().nth(i % n).map(|(k, a)| (*k, *a))
    }
}

/// One client's progress clock.
struct Clock {
    name: String,
    /// Its address's index in [`Load::ctxs`].
    ctx: usize,
    consumer: bool,
    /// Watches its connection with the load's idle-time-out.
    watches: bool,
    /// Milliseconds since the load started, at the last progress.
    last_ms: AtomicU64,
    reconnects: AtomicU64,
    /// The pod of its current (or last) connection; [`NO_POD`] before the first.
    pod: AtomicU64,
}

/// [`Clock::pod`] of a client that has not connected yet.
const NO_POD: u64 = u64::MAX;

/// One sample of the ledger's counters.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at_ms: u64,
    pub confirmed: u64,
    pub consumed: u64,
}

/// The longest stall seen: how long, which client, when it ended (ms since the start).
#[derive(Clone, Debug, Default)]
pub struct Stall {
    pub ms: u64,
    pub client: String,
    pub at_ms: u64,
}

pub struct Load {
    /// One per address (its sequence numbers and ledger), in the order of the specs.
    pub ctxs: Vec<Arc<Ctx>>,
    pub endpoints: Arc<Endpoints>,
    pub started: Instant,
    producers_stop: Arc<AtomicBool>,
    clocks: Vec<Arc<Clock>>,
    pub samples: Arc<Mutex<Vec<Sample>>>,
    pub stall: Arc<Mutex<Stall>>,
    /// Every stall of at least [`EPISODE_MIN_MS`], when it ended.
    pub episodes: Arc<Mutex<Vec<Stall>>>,
    /// Set when the meter should stop judging stalls (producers stopped).
    measuring: Arc<AtomicBool>,
    clients: JoinSet<()>,
    meter: JoinSet<()>,
}

impl Load {
    /// Starts the clients and the meter on `rt`; client k starts on the k-th endpoint.
    pub fn start(rt: &tokio::runtime::Runtime, endpoints: Arc<Endpoints>, verbose: bool) -> Load {
        Load::start_with(rt, endpoints, LoadSpec::one_queue(), verbose)
    }

    /// [`Load::start`] with clients as `spec` says.
    pub fn start_with(
        rt: &tokio::runtime::Runtime,
        endpoints: Arc<Endpoints>,
        spec: LoadSpec,
        verbose: bool,
    ) -> Load {
        Load::start_many(rt, endpoints, vec![spec], verbose)
    }

    /// One load over several addresses: each spec's clients on its address with a
    /// ledger of their own (a consumer has work while *its* address has a backlog), all
    /// under one meter, whose samples add up every address's counters.
    pub fn start_many(
        rt: &tokio::runtime::Runtime,
        endpoints: Arc<Endpoints>,
        specs: Vec<LoadSpec>,
        verbose: bool,
    ) -> Load {
        let started = Instant::now();
        let first = endpoints.pick(0).expect("an endpoint").1;
        let ctxs: Vec<Arc<Ctx>> = specs
            .iter()
            .map(|spec| Arc::new(Ctx::new(started, first, verbose).with_first_seq(spec.first_seq)))
            .collect();
        let mut clocks = Vec::new();
        // (spec index, clock)
        let mut owners = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let clock = |name: String, consumer, watches| {
                Arc::new(Clock {
                    name,
                    ctx: i,
                    consumer,
                    watches,
                    last_ms: AtomicU64::new(0),
                    reconnects: AtomicU64::new(0),
                    pod: AtomicU64::new(NO_POD),
                })
            };
            let a = spec.address;
            for k in 0..spec.producers {
                clocks.push(clock(format!("{a}-producer-{k}"), false, true));
            }
            for k in 0..spec.consumers {
                clocks.push(clock(format!("{a}-consumer-{k}"), true, true));
            }
            for k in 0..spec.patient_consumers {
                clocks.push(clock(format!("{a}-patient-consumer-{k}"), true, false));
            }
            owners.resize(clocks.len(), i);
        }
        let specs: Vec<Arc<LoadSpec>> = specs.into_iter().map(Arc::new).collect();
        let mut load = Load {
            ctxs,
            endpoints,
            started,
            producers_stop: Arc::new(AtomicBool::new(false)),
            clocks,
            samples: Arc::default(),
            stall: Arc::default(),
            episodes: Arc::default(),
            measuring: Arc::new(AtomicBool::new(true)),
            clients: JoinSet::new(),
            meter: JoinSet::new(),
        };
        let _guard = rt.enter();
        // Client k of an address starts on endpoint k + its spec's first_endpoint.
        let mut index_in_spec = vec![0usize; specs.len()];
        for (clock, &i) in load.clocks.clone().into_iter().zip(&owners) {
            let spec = Arc::clone(&specs[i]);
            let k = index_in_spec[i];
            index_in_spec[i] += 1;
            let client = Client {
                index: k + spec.first_endpoint,
                spec,
                ctx: Arc::clone(&load.ctxs[i]),
                endpoints: Arc::clone(&load.endpoints),
                producers_stop: Arc::clone(&load.producers_stop),
                started,
                clock,
            };
            load.clients.spawn(client.run());
        }
        load.meter.spawn(meter(Meter {
            ctxs: load.ctxs.clone(),
            clocks: load.clocks.clone(),
            started,
            samples: Arc::clone(&load.samples),
            stall: Arc::clone(&load.stall),
            episodes: Arc::clone(&load.episodes),
            measuring: Arc::clone(&load.measuring),
        }));
        load
    }

    /// The context of the first (for one-address loads, the only) address.
    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctxs[0]
    }

    /// Messages confirmed and not yet settled by a consumer, over every address.
    pub fn backlog(&self) -> u64 {
        self.ctxs.iter().map(|c| c.ledger().backlog()).sum()
    }

    /// Milliseconds since the load started.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Stops the producers, lets the consumers take what is left (until nothing is
    /// waiting or nothing moved for `quiet`, at most `limit`), then stops everything.
    pub fn finish(&mut self, rt: &tokio::runtime::Runtime, quiet: Duration, limit: Duration) {
        self.producers_stop.store(true, Ordering::Relaxed);
        self.measuring.store(false, Ordering::Relaxed);
        let deadline = Instant::now() + limit;
        let finals = |ctxs: &[Arc<Ctx>]| ctxs.iter().map(|c| c.ledger().finals()).sum::<u64>();
        let mut last = (finals(&self.ctxs), Instant::now());
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let (finals, backlog) = (finals(&self.ctxs), self.backlog());
            if backlog == 0 && finals == last.0 && last.1.elapsed() > Duration::from_secs(1) {
                break;
            }
            if finals != last.0 {
                last = (finals, Instant::now());
            } else if last.1.elapsed() > quiet {
                break;
            }
        }
        for ctx in &self.ctxs {
            ctx.stop();
        }
        rt.block_on(async {
            let all = async { while self.clients.join_next().await.is_some() {} };
            let _ = tokio::time::timeout(STOP_LIMIT, all).await;
            self.clients.abort_all();
            while self.clients.join_next().await.is_some() {}
            self.meter.abort_all();
            while self.meter.join_next().await.is_some() {}
        });
    }

    /// How many producers (`consumers` false) or consumers are connected to `pod` itself
    /// (not forwarded through another pod).
    pub fn connected_to(&self, pod: u64, consumers: bool) -> usize {
        self.clocks
            .iter()
            .filter(|c| c.consumer == consumers && c.pod.load(Ordering::Relaxed) == pod)
            .count()
    }

    /// Reconnects per client, for the summary.
    pub fn reconnects(&self) -> Vec<(String, u64)> {
        self.clocks
            .iter()
            .map(|c| (c.name.clone(), c.reconnects.load(Ordering::Relaxed)))
            .collect()
    }
}

/// One client task: a producer or a consumer, reconnecting to the next pod until stopped.
struct Client {
    spec: Arc<LoadSpec>,
    ctx: Arc<Ctx>,
    endpoints: Arc<Endpoints>,
    producers_stop: Arc<AtomicBool>,
    started: Instant,
    clock: Arc<Clock>,
    index: usize,
}

impl Client {
    async fn run(self) {
        let progress: Progress = {
            let (clock, started) = (Arc::clone(&self.clock), self.started);
            Arc::new(move || {
                let ms = started.elapsed().as_millis() as u64;
                clock.last_ms.fetch_max(ms, Ordering::Relaxed);
            })
        };
        let mut attempt = 0usize;
        // Where the last attach was redirected to, and how many redirects in a row.
        let mut redirected: Option<(u64, SocketAddr)> = None;
        let mut hops = 0usize;
        while !self.done() {
            let picked = redirected
                .take()
                .or_else(|| self.endpoints.pick(self.index + attempt));
            let Some((pod, addr)) = picked else {
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            };
            self.clock.pod.store(pod, Ordering::Relaxed);
            let name = format!("elastic-{}-{attempt}-{hops}", self.clock.name);
            let dial = Dial {
                addr,
                idle_time_out: self.spec.idle_time_out.filter(|_| self.clock.watches),
            };
            let ended = if self.clock.consumer {
                let plan = Plan {
                    address: self.spec.address,
                    credit: CREDIT,
                    style: Style::Accepting,
                };
                let live = || true;
                consumer::run_at(&self.ctx, dial, &live, &plan, &name, &progress)
                    .await
                    .map(|_| ())
            } else {
                let stop = Arc::clone(&self.producers_stop);
                let live = move || !stop.load(Ordering::Relaxed);
                let shape = Shape {
                    address: self.spec.address,
                    in_flight: self.spec.in_flight,
                    ..SHAPE
                };
                producer::windowed(&self.ctx, dial, &name, &shape, &live, &progress).await
            };
            if self.done() {
                break;
            }
            if let Err(Left::Redirected(to)) = &ended {
                if hops < self.spec.max_hops {
                    if let Some(target) = self.endpoints.resolve(to) {
                        hops += 1;
                        redirected = Some(target);
                        continue;
                    }
                }
            }
            hops = 0;
            self.clock.reconnects.fetch_add(1, Ordering::Relaxed);
            if self.ctx.verbose() {
                eprintln!(
                    "elasticity: {} left entrepot-{pod}: {ended:?}",
                    self.clock.name
                );
            }
            attempt += 1;
            tokio::time::sleep(RECONNECT_PAUSE).await;
        }
    }

    fn done(&self) -> bool {
        self.ctx.stopping() || (!self.clock.consumer && self.producers_stop.load(Ordering::Relaxed))
    }
}

/// What the meter reads and where it writes.
struct Meter {
    ctxs: Vec<Arc<Ctx>>,
    clocks: Vec<Arc<Clock>>,
    started: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    stall: Arc<Mutex<Stall>>,
    episodes: Arc<Mutex<Vec<Stall>>>,
    measuring: Arc<AtomicBool>,
}

/// Samples the counters and every clock until aborted; keeps the longest stall and
/// every long one.
async fn meter(m: Meter) {
    // Since when each client has had work without a break (ms), None while it has none;
    // and its gap at the previous sample.
    let mut working_since: Vec<Option<u64>> = vec![None; m.clocks.len()];
    let mut previous_gap = vec![0u64; m.clocks.len()];
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        let now = m.started.elapsed().as_millis() as u64;
        let (mut confirmed, mut consumed) = (0, 0);
        let mut backlogs = Vec::with_capacity(m.ctxs.len());
        for ctx in &m.ctxs {
            let ledger = ctx.ledger();
            confirmed += ledger.confirmed_total();
            consumed += ledger.finals();
            backlogs.push(ledger.backlog());
        }
        m.samples.lock().expect("samples").push(Sample {
            at_ms: now,
            confirmed,
            consumed,
        });
        if !m.measuring.load(Ordering::Relaxed) {
            continue;
        }
        for (i, clock) in m.clocks.iter().enumerate() {
            let has_work = !clock.consumer || backlogs[clock.ctx] > 0;
            let gap = if has_work {
                let since = *working_since[i].get_or_insert(now);
                let last = clock.last_ms.load(Ordering::Relaxed).max(since);
                now.saturating_sub(last)
            } else {
                working_since[i] = None;
                0
            };
            let stall = |ms, at_ms| Stall {
                ms,
                client: clock.name.clone(),
                at_ms,
            };
            // The gap shrank: the stall before it ended at the previous sample.
            if gap < previous_gap[i] && previous_gap[i] >= EPISODE_MIN_MS {
                let at = now - SAMPLE_EVERY.as_millis() as u64;
                m.episodes
                    .lock()
                    .expect("episodes")
                    .push(stall(previous_gap[i], at));
            }
            previous_gap[i] = gap;
            let mut worst = m.stall.lock().expect("stall");
            if gap > worst.ms {
                *worst = stall(gap, now);
            }
        }
    }
}
