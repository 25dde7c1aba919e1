//! A fault campaign: every message the broker accepted is accepted by a consumer exactly
//! once or sits in the DLQ, and nothing else appears — across SIGKILLs, a full disk, slow
//! and vanishing consumers, early-closing producers and hostile frames (issue 14, 9).
//!
//! Method: one real broker on a small tmpfs (so the disk can really fill) with small
//! segments and `--max-delivery-attempts 3`. Two fe2o3 producers send numbered messages
//! (`producer`), two raw consumers in receiver-settle-mode `second` take them from the
//! queue — rejecting one in 97, which must land in the DLQ — and one drains the DLQ
//! (`consumer`). Meanwhile a seeded RNG picks faults from shuffled cycles of every kind
//! (`Fault`), one per round; after each, a fresh client must complete a round trip within
//! `hostile::LIVENESS`, or the broker is recorded as unresponsive and SIGKILLed to go on.
//! At the end everything stops, the broker restarts once more (SIGTERM), the queue and
//! the DLQ are drained until quiet, and the `ledger` judges every sequence number.
//!
//! Size: `ENTREPOT_CAMPAIGN_SECS` of faults (default [`DEFAULT_SECS`], at least one whole
//! cycle); `ENTREPOT_CAMPAIGN_SEED` replays a fault sequence (timing still varies);
//! `ENTREPOT_CAMPAIGN_VERBOSE=1` prints every client reconnect. Without a tmpfs (`mount`
//! needs root) the test fails unless `ENTREPOT_TEST_ALLOW_SKIP=1`, which skips only the
//! full-disk fault. A failure prints the history of each offending message and the fault
//! timeline.

pub mod consumer;
mod hostile;
pub mod ledger;
pub mod producer;
mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};

use crate::disk_full::SmallFs;
use crate::harness::BrokerProcess;
use consumer::{Plan, Style};
use ledger::{Ledger, Origin, Verdict};

pub const QUEUE: &str = "campaign";
pub const DLQ: &str = "DLQ";
/// Longest one client operation (open, attach, send) may take.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Seconds of faults by default: with the final drain, well under a minute on 2 cores.
const DEFAULT_SECS: u64 = 20;
/// Hard cap on rounds, whatever the time budget.
const MAX_ROUNDS: usize = 2_000;
const BROKER_FLAGS: &[&str] = &[
    "--segment-bytes",
    "524288",
    "--max-delivery-attempts",
    "3",
    "--max-message-bytes",
    "393216",
];
/// The data directory's file system: small enough to fill in a couple of seconds.
const TMPFS_SIZE: &str = "16m";
/// Bounds of the full-disk fault: sends until refused, then time until space is back.
const FILL_SENDS_MAX: usize = 4_000;
const FILL_LIMIT: Duration = Duration::from_secs(20);
const DISK_RECOVERY_LIMIT: Duration = Duration::from_secs(30);
/// After each fault, traffic runs until this many more settlements (or the limit).
const ROUND_SETTLEMENTS: u64 = 100;
const ROUND_LIMIT: Duration = Duration::from_secs(2);
/// The final drain ends after this long without a delivery, or at the limit.
const DRAIN_QUIET: Duration = Duration::from_secs(2);
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// Distinct broker warnings kept for a failure report.
const WARNINGS_KEPT: usize = 30;
/// Workers (producers and consumers) get this long to stop before they are aborted.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// Called by a client each time it makes progress (an accepted send, a delivery, a
/// settlement): the elasticity test measures how long a client goes without; the
/// campaign passes [`no_progress`].
pub type Progress = Arc<dyn Fn() + Send + Sync>;

/// A [`Progress`] that nobody watches.
pub fn no_progress() -> Progress {
    Arc::new(|| {})
}

/// Where a client connects, and how it watches the connection.
#[derive(Clone, Copy, Debug)]
pub struct Dial {
    pub addr: SocketAddr,
    /// Our AMQP idle-time-out: a broker that sends nothing (not even a heartbeat) for
    /// this long is taken for gone — a stopped or partitioned node keeps its sockets open
    /// and silent, and nothing else would tell. `None`: no such watch (one broker that
    /// dies only by SIGKILL). Also bounds the opening handshake.
    pub idle_time_out: Option<Duration>,
}

impl From<SocketAddr> for Dial {
    fn from(addr: SocketAddr) -> Dial {
        Dial {
            addr,
            idle_time_out: None,
        }
    }
}

impl Dial {
    /// The longest the opening handshake may take.
    pub fn open_timeout(&self) -> Duration {
        self.idle_time_out.unwrap_or(OP_TIMEOUT)
    }
}

/// Why a client connection ended early.
#[derive(Debug)]
pub enum Left {
    /// The attach was refused with `amqp:link:redirect` naming this node, as
    /// `host:port` (`network-host` an IP address on loopback, a pod's DNS name in the
    /// elasticity test: the caller resolves it).
    Redirected(String),
    /// Anything else: a refusal, a dead or silent broker, a timeout.
    Failed(String),
}

impl std::fmt::Display for Left {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Left::Redirected(to) => write!(f, "redirected to {to}"),
            Left::Failed(why) => f.write_str(why),
        }
    }
}

impl From<String> for Left {
    fn from(why: String) -> Left {
        Left::Failed(why)
    }
}

impl Left {
    /// What a refused attach's error means to a client: a redirect it can follow, or a
    /// failure.
    pub fn from_refusal(what: &str, e: &fe2o3_amqp::types::definitions::Error) -> Left {
        match crate::redirect::redirect_of(e) {
            Ok(r) => Left::Redirected(r.to),
            Err(_) => Left::Failed(format!("{what}: refused: {e:?}")),
        }
    }
}

/// What every task of the campaign shares.
pub struct Ctx {
    ledger: Mutex<Ledger>,
    next_seq: AtomicU64,
    /// The broker's (epoch, AMQP address); the epoch counts restarts.
    endpoint: watch::Sender<(u32, SocketAddr)>,
    stop: AtomicBool,
    /// Consumers grant no more credit while set (the disk is being filled).
    pause: AtomicBool,
    /// Notified on every settlement a consumer sees.
    pub progress: Notify,
    verbose: bool,
}

impl Ctx {
    /// Sequence numbers start at `first` (several contexts side by side keep their
    /// messages apart: the groups campaign has one per address).
    pub fn with_first_seq(self, first: u64) -> Ctx {
        self.next_seq.store(first, Ordering::Relaxed);
        self
    }

    /// A context whose clients' default broker is `addr` (for tests that point each client
    /// at a node of their own and never restart through the epoch: the elasticity test).
    pub fn new(started: std::time::Instant, addr: SocketAddr, verbose: bool) -> Ctx {
        Ctx {
            ledger: Mutex::new(Ledger::new(started)),
            next_seq: AtomicU64::new(1),
            endpoint: watch::Sender::new((0, addr)),
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            progress: Notify::new(),
            verbose,
        }
    }

    /// Tells every client to stop (politely: consumers settle what they hold).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().expect("ledger lock")
    }

    /// A fresh sequence number, recorded as sent by `origin`.
    pub fn next_seq(&self, origin: Origin) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.ledger().sent(seq, origin);
        seq
    }

    pub fn epoch(&self) -> u32 {
        self.endpoint.borrow().0
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.borrow().1
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn paused(&self) -> bool {
        self.pause.load(Ordering::Relaxed)
    }

    pub fn verbose(&self) -> bool {
        self.verbose
    }

    /// Waits until the broker is restarted after `epoch`, at most `limit`.
    pub async fn wait_epoch_after(&self, epoch: u32, limit: Duration) {
        let mut rx = self.endpoint.subscribe();
        let _ = timeout(limit, rx.wait_for(|(e, _)| *e != epoch)).await;
    }

    /// Waits until consumers settled `n` more deliveries, at most `limit`.
    async fn wait_settlements(&self, n: u64, limit: Duration) {
        let target = self.ledger().finals() + n;
        let deadline = Instant::now() + limit;
        while self.ledger().finals() < target && Instant::now() < deadline {
            let _ = timeout(Duration::from_millis(100), self.progress.notified()).await;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    DiskFull,
    SlowConsumer,
    VanishingConsumer,
    EarlyClose,
    WrapDisposition,
    UnfinishedTransfers,
    Dribble,
    LongTag,
}

impl Fault {
    /// One cycle: every kind once, SIGKILL twice.
    const CYCLE: [Fault; 10] = [
        Fault::Kill,
        Fault::Kill,
        Fault::DiskFull,
        Fault::SlowConsumer,
        Fault::VanishingConsumer,
        Fault::EarlyClose,
        Fault::WrapDisposition,
        Fault::UnfinishedTransfers,
        Fault::Dribble,
        Fault::LongTag,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::DiskFull => "disk",
            Fault::SlowConsumer => "slow",
            Fault::VanishingConsumer => "vanish",
            Fault::EarlyClose => "early-close",
            Fault::WrapDisposition => "wrap",
            Fault::UnfinishedTransfers => "unfinished",
            Fault::Dribble => "dribble",
            Fault::LongTag => "long-tag",
        }
    }
}

/// SplitMix64: seeded, so a run's fault sequence can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.next() as usize % (i + 1));
        }
    }
}

/// Where the broker keeps its data: a tmpfs, or (full-disk fault skipped) a plain
/// directory.
enum Storage {
    Tmpfs(SmallFs),
    Plain(tempfile::TempDir),
}

impl Storage {
    fn prepare() -> Storage {
        match SmallFs::mount(TMPFS_SIZE) {
            Ok(fs) => Storage::Tmpfs(fs),
            Err(reason) if std::env::var("ENTREPOT_TEST_ALLOW_SKIP").as_deref() == Ok("1") => {
                eprintln!(
                    "campaign: full-disk fault skipped: cannot mount a {TMPFS_SIZE} tmpfs: {reason}"
                );
                Storage::Plain(tempfile::tempdir().expect("tempdir"))
            }
            Err(reason) => panic!(
                "the campaign's full-disk fault needs a {TMPFS_SIZE} tmpfs, and mount failed: \
                 {reason}. Run as root where mount is allowed, or set \
                 ENTREPOT_TEST_ALLOW_SKIP=1 to skip only that fault."
            ),
        }
    }

    fn data_dir(&self) -> PathBuf {
        match self {
            Storage::Tmpfs(fs) => fs.path().join("data"),
            Storage::Plain(dir) => dir.path().join("data"),
        }
    }
}

/// The broker under test, restarted on the same data directory.
struct Node {
    broker: BrokerProcess,
    dir: PathBuf,
    /// Warnings and errors the broker logged across restarts (the first
    /// [`WARNINGS_KEPT`] distinct kinds, the first text of each) and how often each came.
    warnings: Vec<(String, usize)>,
}

impl Node {
    fn start(dir: &Path) -> Node {
        Node {
            broker: start_broker(dir),
            dir: dir.to_path_buf(),
            warnings: Vec::new(),
        }
    }

    /// SIGKILL, then a new broker on the same directory; returns how long it took.
    fn kill_and_restart(&mut self, ctx: &Ctx) -> Duration {
        let started = std::time::Instant::now();
        self.broker.kill();
        self.restart(ctx);
        started.elapsed()
    }

    fn restart(&mut self, ctx: &Ctx) {
        self.keep_warnings();
        self.broker = start_broker(&self.dir);
        let epoch = ctx.epoch() + 1;
        ctx.ledger().set_epoch(epoch);
        ctx.endpoint.send_replace((epoch, self.broker.amqp));
    }

    /// Keeps the broker's warnings and errors so far, repeats folded into a count.
    fn keep_warnings(&mut self) {
        for line in self.broker.drain_logs() {
            if !(line.contains("WARN") || line.contains("ERROR")) {
                continue;
            }
            // Drop the timestamp, so repeats of one warning fold together; so do warnings
            // that differ only in numbers (offsets, free bytes), or one noisy kind would
            // take every slot and hide the rare one that explains a failure.
            let text = line
                .split_once(' ')
                .map_or(line.as_str(), |(_, t)| t)
                .to_owned();
            let kind = |t: &str| -> String {
                t.chars()
                    .map(|c| if c.is_ascii_digit() { '#' } else { c })
                    .collect()
            };
            let key = kind(&text);
            if let Some((_, n)) = self.warnings.iter_mut().find(|(t, _)| kind(t) == key) {
                *n += 1;
            } else if self.warnings.len() < WARNINGS_KEPT {
                self.warnings.push((text, 1));
            }
        }
    }

    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.broker.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

fn start_broker(dir: &Path) -> BrokerProcess {
    tokio::task::block_in_place(|| BrokerProcess::start(dir, BROKER_FLAGS))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_message_is_consumed_once_or_dead_lettered_across_faults() {
    let seed = env_u64("ENTREPOT_CAMPAIGN_SEED").unwrap_or_else(random_seed);
    let secs = env_u64("ENTREPOT_CAMPAIGN_SECS").unwrap_or(DEFAULT_SECS);
    eprintln!("campaign: seed {seed}, {secs} s of faults (ENTREPOT_CAMPAIGN_SEED / _SECS)");
    let storage = Storage::prepare();
    let mut node = Node::start(&storage.data_dir());
    let started = std::time::Instant::now();
    let verbose = std::env::var("ENTREPOT_CAMPAIGN_VERBOSE").as_deref() == Ok("1");
    let ctx = Arc::new(Ctx::new(started, node.broker.amqp, verbose));
    let mut workers = spawn_workers(&ctx);
    let mut helpers = JoinSet::new();
    let mut rng = Rng(seed);
    let mut cycle: Vec<Fault> = Fault::CYCLE.to_vec();
    if matches!(storage, Storage::Plain(_)) {
        cycle.retain(|f| *f != Fault::DiskFull);
    }
    let budget = Duration::from_secs(secs);
    let mut injected: Vec<Fault> = Vec::new();
    let mut order = Vec::new();
    while injected.len() < MAX_ROUNDS && (started.elapsed() < budget || !order.is_empty()) {
        if order.is_empty() {
            if started.elapsed() >= budget {
                break;
            }
            order = cycle.clone();
            rng.shuffle(&mut order);
        }
        let fault = order.pop().expect("refilled above");
        injected.push(fault);
        let round = injected.len();
        let detail = inject(fault, &ctx, &mut node, &mut rng, &mut helpers).await;
        ctx.ledger()
            .fault(format!("fault {round} {}: {detail}", fault.name()));
        ctx.wait_settlements(ROUND_SETTLEMENTS, ROUND_LIMIT).await;
    }

    ctx.stop();
    join_bounded(&mut workers, STOP_LIMIT).await;
    join_bounded(&mut helpers, STOP_LIMIT).await;
    node.keep_warnings();
    if node.broker.terminate().is_none() {
        ctx.ledger()
            .problem("SIGTERM not honoured within 15 s (SIGKILLed)".into());
    }
    node.restart(&ctx);
    ctx.ledger()
        .fault("final restart (SIGTERM), draining".into());
    drain(&ctx, &node).await;
    node.keep_warnings();
    judge(&ctx, &node, seed, &injected);
}

/// Two producers, two queue consumers, one DLQ consumer, each reconnecting after faults.
fn spawn_workers(ctx: &Arc<Ctx>) -> JoinSet<()> {
    let mut workers = JoinSet::new();
    for k in 0..2 {
        workers.spawn(producer::steady(Arc::clone(ctx), k));
    }
    for (k, address) in [QUEUE, QUEUE, DLQ].into_iter().enumerate() {
        let ctx = Arc::clone(ctx);
        workers.spawn(async move {
            let plan = Plan {
                address,
                credit: 20,
                style: Style::Steady,
            };
            while !ctx.stopping() {
                let epoch = ctx.epoch();
                let name = format!("campaign-consumer-{k}-{epoch}");
                if let Err(e) = consumer::run(&ctx, epoch, &plan, &name).await {
                    if ctx.verbose() {
                        eprintln!("campaign: {e}");
                    }
                    ctx.wait_epoch_after(epoch, Duration::from_millis(200))
                        .await;
                }
            }
        });
    }
    workers
}

/// Injects one fault and checks the broker still serves a fresh client; returns what
/// happened, for the timeline.
async fn inject(
    fault: Fault,
    ctx: &Arc<Ctx>,
    node: &mut Node,
    rng: &mut Rng,
    helpers: &mut JoinSet<()>,
) -> String {
    let detail = match fault {
        Fault::Kill => {
            let took = node.kill_and_restart(ctx);
            format!("SIGKILL, restarted in {} ms", took.as_millis())
        }
        Fault::DiskFull => fill_disk(ctx).await,
        Fault::SlowConsumer => slow_consumer(ctx, rng, helpers),
        Fault::VanishingConsumer => vanishing_consumer(ctx, rng).await,
        Fault::EarlyClose => {
            let count = rng.range(1, 50) as u32;
            let leave = if rng.next() % 2 == 0 {
                producer::Leave::Close
            } else {
                producer::Leave::Reset
            };
            bounded(producer::early_close(ctx, count, leave)).await
        }
        Fault::WrapDisposition => bounded(hostile::wrapping_disposition(ctx)).await,
        Fault::UnfinishedTransfers => return unfinished(ctx, node).await,
        Fault::Dribble => {
            let gap = Duration::from_millis(50);
            let dribble = hostile::dribble(ctx, gap, Duration::from_secs(4));
            let (dribbled, alive) = tokio::join!(dribble, hostile::probe(ctx));
            let dribbled = dribbled.unwrap_or_else(|e| e);
            return match alive {
                Ok((took, _)) => format!("{dribbled}; meanwhile a round trip took {took:?}"),
                Err(e) => recover(ctx, node, Fault::Dribble, &e),
            };
        }
        Fault::LongTag => bounded(hostile::long_tag(ctx)).await,
    };
    match hostile::probe(ctx).await {
        Ok(_) => detail,
        Err(e) => format!("{detail}; {}", recover(ctx, node, fault, &e)),
    }
}

/// Starts a consumer that sleeps before each outcome; it runs on while the rounds go on.
fn slow_consumer(ctx: &Arc<Ctx>, rng: &mut Rng, helpers: &mut JoinSet<()>) -> String {
    let delay = Duration::from_millis(rng.range(50, 300));
    let plan = Plan {
        address: QUEUE,
        credit: 4,
        style: Style::Slow {
            delay,
            lifetime: Duration::from_secs(3),
        },
    };
    let ctx = Arc::clone(ctx);
    let epoch = ctx.epoch();
    helpers.spawn(async move {
        let _ = consumer::run(&ctx, epoch, &plan, "campaign-slow").await;
    });
    format!(
        "a consumer taking {} ms per message for 3 s",
        delay.as_millis()
    )
}

/// A consumer that takes some deliveries, accepts half without waiting, and resets.
async fn vanishing_consumer(ctx: &Ctx, rng: &mut Rng) -> String {
    let after = rng.range(1, 20) as usize;
    let lifetime = Duration::from_secs(3);
    let plan = Plan {
        address: QUEUE,
        credit: 20,
        style: Style::Vanish { after, lifetime },
    };
    let run = consumer::run(ctx, ctx.epoch(), &plan, "campaign-vanish");
    match timeout(lifetime + OP_TIMEOUT, run).await {
        Ok(r) => format!("a consumer resetting after {after} deliveries: {r:?}"),
        Err(_) => "a vanishing consumer that never finished".into(),
    }
}

/// Bounds a fault's own client work and flattens its result into the timeline text.
async fn bounded(f: impl std::future::Future<Output = Result<String, String>>) -> String {
    match timeout(OP_TIMEOUT * 2, f).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => format!("client error: {e}"),
        Err(_) => format!("client gave up after {:?}", OP_TIMEOUT * 2),
    }
}

/// The broker failed the liveness probe after `fault`: a problem; SIGKILL it to go on.
fn recover(ctx: &Ctx, node: &mut Node, fault: Fault, why: &str) -> String {
    ctx.ledger().problem(format!(
        "after a {} fault the broker did not serve a fresh client: {why}",
        fault.name()
    ));
    let took = node.kill_and_restart(ctx);
    format!(
        "unresponsive ({why}); SIGKILLed and restarted in {} ms",
        took.as_millis()
    )
}

/// Fills the disk with consumers paused until the broker refuses a send, then lets them
/// drain until a send is accepted again.
async fn fill_disk(ctx: &Arc<Ctx>) -> String {
    ctx.pause.store(true, Ordering::Relaxed);
    let filled = producer::fill(ctx, FILL_SENDS_MAX, FILL_LIMIT).await;
    ctx.pause.store(false, Ordering::Relaxed);
    let filled = match filled {
        Ok((accepted, refusal)) if refusal.contains("ResourceLimitExceeded") => {
            format!("{accepted} large messages accepted, then refused")
        }
        Ok((accepted, refusal)) => {
            let text = format!("after {accepted} accepted, the refusal was {refusal}");
            ctx.ledger().problem(format!("full disk: {text}"));
            text
        }
        Err(e) => {
            ctx.ledger().problem(format!("full disk: {e}"));
            return e;
        }
    };
    let started = Instant::now();
    while started.elapsed() < DISK_RECOVERY_LIMIT {
        if let Ok((_, true)) = hostile::probe(ctx).await {
            return format!(
                "{filled}; sends accepted again after {:?}",
                started.elapsed()
            );
        }
        ctx.wait_settlements(50, Duration::from_millis(250)).await;
    }
    let text = format!("sends still refused {DISK_RECOVERY_LIMIT:?} after consumers resumed");
    ctx.ledger().problem(format!("full disk: {text}"));
    format!("{filled}; {text}")
}

/// Unfinished multi-frame transfers held open through the liveness probe.
async fn unfinished(ctx: &Ctx, node: &mut Node) -> String {
    let before = node.rss_kib();
    // Each delivery stays below --max-message-bytes: the defect is the sum of them.
    let (links, frames) = (8, 6);
    let held = timeout(
        OP_TIMEOUT * 2,
        hostile::unfinished_transfers(ctx, links, frames),
    )
    .await;
    let (wire, detail) = match held {
        Ok(Ok((wire, pending))) => (
            Some(wire),
            format!("{links} links, {} KiB pending", pending / 1024),
        ),
        Ok(Err(e)) => (None, format!("client error: {e}")),
        Err(_) => (None, "client gave up".into()),
    };
    let alive = hostile::probe(ctx).await;
    let rss = format!(
        "broker RSS {} -> {} KiB",
        before.unwrap_or(0),
        node.rss_kib().unwrap_or(0)
    );
    if let Some(wire) = wire {
        wire.reset();
    }
    match alive {
        Ok(_) => format!("{detail}; {rss}"),
        Err(e) => format!(
            "{detail}; {rss}; {}",
            recover(ctx, node, Fault::UnfinishedTransfers, &e)
        ),
    }
}

/// Drains the queue and the DLQ until both are quiet; leftovers are a problem.
async fn drain(ctx: &Ctx, node: &Node) {
    let run = |address| async move {
        let plan = Plan {
            address,
            credit: 100,
            style: Style::Drain { quiet: DRAIN_QUIET },
        };
        let name = format!("campaign-drain-{address}");
        timeout(DRAIN_LIMIT, consumer::run(ctx, ctx.epoch(), &plan, &name)).await
    };
    let (queue, dlq) = tokio::join!(run(QUEUE), run(DLQ));
    for (address, result) in [(QUEUE, queue), (DLQ, dlq)] {
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => ctx.ledger().problem(format!("drain of {address}: {e}")),
            Err(_) => ctx.ledger().problem(format!(
                "drain of {address} not quiet within {DRAIN_LIMIT:?}"
            )),
        }
        let series = format!("entrepot_queue_depth{{queue=\"{address}\"}}");
        let depth = tokio::task::block_in_place(|| node.broker.metric(&series));
        if depth.unwrap_or(0.0) > 0.0 {
            ctx.ledger().problem(format!(
                "{depth:?} messages left in {address} after the drain"
            ));
        }
    }
}

/// Prints the summary and, when the invariant or a promise broke, fails with the evidence.
fn judge(ctx: &Ctx, node: &Node, seed: u64, injected: &[Fault]) {
    let ledger = ctx.ledger();
    let v = ledger.verdict();
    print_summary(&v, &ledger, seed, injected);
    let held = v.lost.is_empty() && v.duplicated.is_empty();
    let clean = v.ghosts.is_empty() && v.foreign.is_empty() && ledger.problems.is_empty();
    if !(held && clean) {
        panic!("{}", failure_report(&v, &ledger, node, seed));
    }
}

fn print_summary(v: &Verdict, ledger: &Ledger, seed: u64, injected: &[Fault]) {
    let by_kind: Vec<String> = Fault::CYCLE
        .iter()
        .enumerate()
        .filter(|(i, f)| !Fault::CYCLE[..*i].contains(f))
        .map(|(_, f)| {
            let n = injected.iter().filter(|g| *g == f).count();
            format!("{} {n}", f.name())
        })
        .collect();
    eprintln!(
        "campaign: seed {seed} faults {} ({}) messages sent {} confirmed {} consumed {} dlq {} \
         lost {} duplicated {}",
        injected.len(),
        by_kind.join(", "),
        v.sent,
        v.confirmed,
        v.consumed,
        v.dlq,
        v.lost.len(),
        v.duplicated.len()
    );
    eprintln!(
        "campaign: refused {} unconfirmed {} (delivered {}) consumed without settlement {} \
         early-close sent {} delivered {} (first in a later epoch {}) ghosts {} foreign {} \
         problems {} dlq copies across a restart {}",
        v.refused,
        v.unconfirmed,
        v.unconfirmed_delivered,
        v.consumed_unsettled,
        v.early_close,
        v.early_close_delivered,
        v.early_close_after_restart,
        v.ghosts.len(),
        v.foreign.len(),
        ledger.problems.len(),
        v.dlq_copies_across_restart.len()
    );
}

/// The offending sequence numbers with their histories, the problems, the fault timeline
/// and the broker's warnings.
fn failure_report(v: &Verdict, ledger: &Ledger, node: &Node, seed: u64) -> String {
    let mut report = format!(
        "campaign seed {seed} broke its invariant (replay the faults with \
         ENTREPOT_CAMPAIGN_SEED={seed})\n"
    );
    let lost = "lost (confirmed, never consumed, not in the DLQ)";
    section(&mut report, ledger, lost, &v.lost);
    let dups: Vec<u64> = v.duplicated.iter().map(|(s, _)| *s).collect();
    section(&mut report, ledger, "duplicated", &dups);
    for (seq, why) in v.duplicated.iter().take(20) {
        report += &format!("  seq {seq}: {why}\n");
    }
    let ghosts = "ghosts (refused to the producer, delivered)";
    section(&mut report, ledger, ghosts, &v.ghosts);
    for f in v.foreign.iter().take(10) {
        report += &format!("foreign: {f}\n");
    }
    for p in &ledger.problems {
        report += &format!("problem: {p}\n");
    }
    report += &format!("fault timeline:\n{}", ledger.timeline());
    report += "broker warnings and errors (distinct, with counts):\n";
    for (text, n) in &node.warnings {
        report += &format!("    {n} x {text}\n");
    }
    report
}

/// Appends a count, the first sequence numbers and the histories of the first five.
fn section(report: &mut String, ledger: &Ledger, title: &str, seqs: &[u64]) {
    if seqs.is_empty() {
        return;
    }
    *report += &format!(
        "{title}: {} (first {:?})\n",
        seqs.len(),
        &seqs[..seqs.len().min(20)]
    );
    for seq in seqs.iter().take(5) {
        *report += &ledger.explain(*seq);
    }
}

async fn join_bounded(set: &mut JoinSet<()>, limit: Duration) {
    let _ = timeout(limit, async { while set.join_next().await.is_some() {} }).await;
    set.abort_all();
    while set.join_next().await.is_some() {}
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}
