//! `entrepot-bench`: a load generator for any AMQP 1.0 broker (and, with the `nats`
//! feature, NATS JetStream), so speed claims come from one honest tool. `entrepot bench`
//! runs this binary with the same arguments (the broker itself links no AMQP client).
//!
//! A run: consumers attach first, then producers send `--count` messages or for
//! `--duration` seconds. Every body starts with a [`stats::Stamp`] (run id, producer,
//! sequence number, send time), which gives end-to-end latency and the loss check: at the
//! end every message the broker accepted must have reached every receiver group (the
//! competing consumers together, or each fan-out subscriber), else the run fails.
//! `entrepot-bench plot` (feature `plot`) draws the throughput-versus-p99 PNG of
//! `benches/compare.sh` from the runs' `--json` files.
//!
//! It does not start or configure brokers (that is `benches/compare.sh`), and it keeps no
//! state between runs: messages of other runs left in a queue are counted as foreign
//! and accepted, never mistaken for ours.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod amqp;
mod args;
mod cpu;
mod declare;
mod drain;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "plot")]
mod plot;
mod processes;
mod report;
mod schedule;
mod socket;
mod stats;
mod tally;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use args::{BenchArgs, Delivery, Limit, Workload};
use schedule::{share, Schedule};
use stats::{Clock, ConsumerStats, ProducerStats, Stamp, Tracker};
use tally::Tally;

/// The generator's allocator: mimalloc's thread-local free lists instead of glibc's
/// arenas, whose consolidation ran on every allocation of a 1 KiB+ frame (see Cargo.toml).
/// The broker under test keeps its own allocator; only the load generator's CPU changes.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Longest the consumers may take to attach before producers start anyway.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest tasks get to return their figures after the hard timeout.
const ABORT_GRACE: Duration = Duration::from_secs(10);
/// How often the progress bar and the drain check look at the counters.
const TICK: Duration = Duration::from_millis(200);

/// Live counters for the progress bar (the per-task stats are the figures of record).
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub accepted: AtomicU64,
    pub delivered: AtomicU64,
}

/// What every producer and consumer task of one run shares.
pub struct Ctx {
    pub workload: Workload,
    pub clock: Clock,
    /// Tells this run's messages from leftovers of earlier runs.
    pub run_id: u32,
    /// When the producers started; measurement begins `--warmup` later.
    started: OnceLock<Instant>,
    pub counters: Counters,
    /// One tracker per receiver group (see [`args::Delivery::groups`]).
    pub groups: Vec<Mutex<Tracker>>,
    pub stop_sending: watch::Receiver<bool>,
    pub stop_receiving: watch::Receiver<bool>,
    /// The hard timeout struck: everyone returns what they have.
    pub abort: watch::Receiver<bool>,
}

impl Ctx {
    /// Counts one accepted delivery (or JetStream ack) of a message sent at `sent_at`, and
    /// its produce→accepted latency once the warm-up is over.
    fn count_accepted(&self, stats: &mut stats::ProducerStats, sent_at: std::time::Instant) {
        stats.accepted += 1;
        self.counters
            .accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if sent_at >= self.measure_from() {
            let now = std::time::Instant::now();
            stats.measured += 1;
            stats.last_ack = Some(now);
            stats.ack_latency.record(now - sent_at);
        }
    }

    /// Counts one message handed to the client library, and once the warm-up is over how
    /// long after its scheduled time that was (the generator's own share of its latency:
    /// the timer's tick, a full window, a descheduled thread).
    fn count_sent(&self, stats: &mut stats::ProducerStats, scheduled: Instant) {
        stats.sent += 1;
        self.counters
            .sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if scheduled >= self.measure_from() {
            stats.send_lag.record(Instant::now() - scheduled);
        }
    }

    pub fn measure_from(&self) -> Instant {
        self.started.get().copied().unwrap_or(self.clock.t0) + self.workload.warmup
    }

    /// Counts one stamped delivery of this run for receiver group `group`.
    pub fn delivered(&self, group: usize, s: Stamp, now: Instant, stats: &mut ConsumerStats) {
        stats.delivered += 1;
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        let producers = self.workload.slice.producers_total;
        let ours = match self.groups.get(group).map(|g| g.lock()) {
            Some(Ok(mut t)) => t.record(s.producer, s.seq, producers),
            _ => false,
        };
        if !ours {
            stats.foreign += 1;
            return;
        }
        let from = self.measure_from();
        if now >= from {
            stats.measured += 1;
            stats.last_delivery = Some(now);
        }
        if s.sent_unix_ns >= self.clock.unix_ns(from) {
            stats
                .e2e_latency
                .record(self.clock.since_unix_ns(now, s.sent_unix_ns));
        }
    }

    fn unique_per_group(&self) -> Vec<u64> {
        self.groups
            .iter()
            .map(|g| g.lock().map(|t| t.unique).unwrap_or(0))
            .collect()
    }
}

#[derive(Parser)]
#[command(
    name = "entrepot-bench",
    version,
    about = "Load-test an AMQP 1.0 broker (or NATS JetStream) and check nothing was lost \
             (also run as `entrepot bench`)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    run: BenchArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Declare many addresses (a sender attached to each, redirects followed), optionally
    /// sending one message to each: `benches/many_groups.sh`.
    Declare(declare::DeclareArgs),
    /// Draw the throughput-versus-p99 PNG from the per-run JSON files of
    /// benches/compare.sh (feature `plot`).
    #[cfg(feature = "plot")]
    Plot(plot::PlotArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        #[cfg(feature = "plot")]
        Some(Command::Plot(args)) => plot::run(args),
        Some(Command::Declare(args)) => declare::run(args),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(run(cli.run)),
    }
}

/// Runs the benchmark; an error if any accepted message was not received.
async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.producers == 0 && args.child.is_none() {
        return drain::run(args).await;
    }
    if args.processes > 1 && args.child.is_none() {
        return processes::parent(args).await;
    }
    let workload = args.into_workload()?;
    let child = workload.args.child;
    let (stop_send_tx, stop_sending) = watch::channel(false);
    let (stop_recv_tx, stop_receiving) = watch::channel(false);
    let (abort_tx, abort) = watch::channel(false);
    let clock = Clock::start();
    let ctx = Arc::new(Ctx {
        groups: (0..workload.delivery.groups())
            .map(|_| Mutex::default())
            .collect(),
        workload,
        clock,
        run_id: child.map_or_else(run_id, |c| c.run_id),
        started: OnceLock::new(),
        counters: Counters::default(),
        stop_sending,
        stop_receiving,
        abort,
    });
    let deadline = ctx.clock.t0 + ctx.workload.timeout;
    let mut tasks = Tasks::default();
    let mut parent = child.map(|_| processes::Parent::listen());
    let mut aborted = false;
    let timed_out = tokio::time::timeout_at(deadline.into(), async {
        start_consumers(&ctx, &mut tasks).await;
        let mut start = Instant::now();
        if let Some(p) = &mut parent {
            if let Some(go) = p.ready_then_wait_for_go().await {
                start = ctx.clock.instant_of_unix_ns(go);
            }
        }
        start_producers(&ctx, &mut tasks, &stop_send_tx, start);
        if let Some(p) = &mut parent {
            aborted = p.report_until_stopped(&ctx, &tasks.producers).await;
            return;
        }
        let mut progress = report::Progress::new(&ctx);
        progress.until_sent(&ctx, &tasks.producers).await;
        progress.until_drained(&ctx).await;
        progress.finish();
    })
    .await
    .is_err()
        || aborted;
    let _ = stop_send_tx.send(true);
    let _ = stop_recv_tx.send(true);
    if timed_out {
        let _ = abort_tx.send(true);
    }
    let (producers, consumers) = tasks.join().await;
    let wall = ctx.clock.t0.elapsed();
    let tally = Tally::local(&ctx, &producers, &consumers, timed_out);
    if child.is_some() {
        // A --processes child: its parent merges the figures and gives the verdict.
        return processes::write_tally(&tally, ctx.workload.args.json.as_deref());
    }
    finish(&ctx.workload, &tally, wall)
}

/// Prints the summary of a run's figures, writes `--json`, and fails the run when an
/// accepted message was not received (or nothing was accepted, or it timed out).
fn finish(workload: &Workload, tally: &Tally, wall: Duration) -> anyhow::Result<()> {
    let summary = report::Summary::build(workload, tally, wall);
    summary.print();
    if let Some(path) = &workload.args.json {
        summary.write_json(path)?;
    }
    let failed = summary.loss.missing > 0 || summary.accepted == 0;
    if failed || summary.timed_out || !summary.errors.is_empty() {
        bail!("{}", summary.verdict_line());
    }
    Ok(())
}

#[derive(Default)]
struct Tasks {
    producers: Vec<JoinHandle<ProducerStats>>,
    consumers: Vec<JoinHandle<ConsumerStats>>,
}

impl Tasks {
    /// Waits (bounded) for every task's figures; a task that does not return is aborted.
    async fn join(self) -> (Vec<ProducerStats>, Vec<ConsumerStats>) {
        let deadline = tokio::time::Instant::now() + ABORT_GRACE;
        let mut producers = Vec::new();
        for t in self.producers {
            producers.push(
                join_bounded(t, deadline)
                    .await
                    .unwrap_or_else(|| ProducerStats {
                        error: Some("producer did not return".into()),
                        ..Default::default()
                    }),
            );
        }
        let mut consumers = Vec::new();
        for t in self.consumers {
            consumers.push(
                join_bounded(t, deadline)
                    .await
                    .unwrap_or_else(|| ConsumerStats {
                        error: Some("consumer did not return".into()),
                        ..Default::default()
                    }),
            );
        }
        (producers, consumers)
    }
}

async fn join_bounded<T>(mut task: JoinHandle<T>, deadline: tokio::time::Instant) -> Option<T> {
    match tokio::time::timeout_at(deadline, &mut task).await {
        Ok(Ok(v)) => Some(v),
        _ => {
            task.abort();
            None
        }
    }
}

async fn start_consumers(ctx: &Arc<Ctx>, tasks: &mut Tasks) {
    let slice = ctx.workload.slice;
    let fan_out = matches!(ctx.workload.delivery, Delivery::FanOut(_));
    let (ready_tx, mut ready_rx) = mpsc::channel(slice.consumers.max(1) as usize);
    for local in 0..slice.consumers {
        // Global index: names the link and, under fan-out, the receiver group.
        let i = slice.consumer_offset + local;
        let group = if fan_out { i as usize } else { 0 };
        let (ctx, ready) = (Arc::clone(ctx), ready_tx.clone());
        tasks
            .consumers
            .push(tokio::spawn(match &ctx.workload.args.nats_url {
                #[cfg(feature = "nats")]
                Some(_) => Box::pin(nats::consume(ctx, i, group, ready))
                    as std::pin::Pin<Box<dyn std::future::Future<Output = ConsumerStats> + Send>>,
                _ => Box::pin(amqp::consume(ctx, i, group, ready)),
            }));
    }
    drop(ready_tx);
    // Each consumer signals once attached, or drops its sender when it failed.
    let _ = tokio::time::timeout(ATTACH_TIMEOUT, async {
        while ready_rx.recv().await.is_some() {}
    })
    .await;
}

/// Starts this process's producers; `start` is the run's (a `--processes` child's: the
/// parent's `go`, the same moment in every child).
fn start_producers(
    ctx: &Arc<Ctx>,
    tasks: &mut Tasks,
    stop_sending: &watch::Sender<bool>,
    start: Instant,
) {
    let args = &ctx.workload.args;
    let slice = ctx.workload.slice;
    let _ = ctx.started.set(start);
    let interval = (args.rate > 0)
        .then(|| Duration::from_secs_f64(f64::from(slice.producers_total) / args.rate as f64));
    for local in 0..slice.producers {
        // Global index: carried in every stamp, so the loss check works across processes.
        let i = slice.producer_offset + local;
        let count = match ctx.workload.limit {
            Limit::Count(n) => Some(share(n, slice.producers_total, i)),
            Limit::Duration(_) => None,
        };
        let schedule = match Schedule::new(count, interval, start, &ctx.stop_sending) {
            Ok(s) => s,
            Err(e) => {
                // Reported like any producer's failure: the run's errors, a failed exit.
                let error = Some(format!("producer {i}: no pacing thread: {e}"));
                let stats = ProducerStats {
                    error,
                    ..ProducerStats::default()
                };
                tasks.producers.push(tokio::spawn(async move { stats }));
                continue;
            }
        };
        let ctx = Arc::clone(ctx);
        tasks
            .producers
            .push(tokio::spawn(match &ctx.workload.args.nats_url {
                #[cfg(feature = "nats")]
                Some(_) => Box::pin(nats::produce(ctx, i, schedule))
                    as std::pin::Pin<Box<dyn std::future::Future<Output = ProducerStats> + Send>>,
                _ => Box::pin(amqp::produce(ctx, i, schedule)),
            }));
    }
    if let Limit::Duration(d) = ctx.workload.limit {
        let stop = stop_sending.clone();
        let until = start + ctx.workload.warmup + d;
        tokio::spawn(async move {
            tokio::time::sleep_until(until.into()).await;
            let _ = stop.send(true);
        });
    }
}

/// Distinct enough per run: wall-clock nanoseconds mixed with the process id.
fn run_id() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    (nanos as u32) ^ (nanos >> 32) as u32 ^ std::process::id().rotate_left(16)
}
