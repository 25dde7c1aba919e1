//! `--processes K`: one run spread over K processes of this same program, so a single
//! process's CPU is not the generator's ceiling.
//!
//! The parent runs no connection itself. It starts each child with a slice of the
//! producers and consumers (global indices and one shared run id in the hidden `--child`
//! flag, so stamps from any child are recognised by every other), and steers them over
//! their stdin/stdout:
//!
//! 1. each child attaches its consumers and prints `@bench ready`;
//! 2. once all are ready (or gone) the parent writes `go UNIX_NS`, and producers start
//!    together: every child takes that wall-clock time as the run's start, so the warm-up
//!    ends at one moment for all (a child that started its own clock later skipped the
//!    end-to-end latency of the other children's first messages);
//! 3. every [`TICK`] each child prints `@bench status {json}` (producers done, accepted,
//!    distinct messages per receiver group); the parent adds them up and, when every group
//!    has every accepted message or nothing arrived for `--drain`, writes `stop` (`abort`
//!    past `--timeout`);
//! 4. each child writes its [`Tally`] to its `--json` file and exits; the parent merges
//!    them (histograms, loss trackers) into one summary.
//!
//! Bounded: every wait has a deadline, and a child that has not exited by then is killed;
//! every child is waited for (reaped) before the parent returns.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::args::{BenchArgs, ChildSpec, Limit, Workload};
use super::schedule::share;
use super::tally::Tally;
use super::{finish, run_id, Ctx, ATTACH_TIMEOUT, TICK};

/// Marks the lines a child prints for its parent (everything else is passed through).
const LINE_PREFIX: &str = "@bench ";
/// Time for children to start and print `ready`, on top of attaching their consumers.
const START_GRACE: Duration = Duration::from_secs(30);
/// Time for children to write their figures and exit after `stop`.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// What a child reports every tick.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Status {
    producers_done: bool,
    accepted: u64,
    delivered: u64,
    /// (global receiver group, distinct messages of this run it received here).
    unique: Vec<(usize, u64)>,
}

/// What the parent tells a child, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Order {
    Wait,
    Go,
    Stop,
    Abort,
}

// --- the child's side -------------------------------------------------------------------

/// A child's line to its parent: orders arrive on stdin, reports go to stdout.
pub struct Parent {
    orders: watch::Receiver<Order>,
    /// The run's start as the parent's `go` gave it (wall-clock ns; 0 until then).
    go_unix_ns: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Parent {
    /// Starts reading the parent's orders from stdin (EOF: the parent is gone, stop).
    pub fn listen() -> Parent {
        let (tx, orders) = watch::channel(Order::Wait);
        let go_unix_ns = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let go_at = std::sync::Arc::clone(&go_unix_ns);
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let order = match line.as_deref().map(str::trim) {
                    Ok(go) if go == "go" || go.starts_with("go ") => {
                        let at = go[2..].trim().parse().unwrap_or(0);
                        go_at.store(at, std::sync::atomic::Ordering::Release);
                        Order::Go
                    }
                    Ok("stop") => Order::Stop,
                    Ok("abort") => Order::Abort,
                    Ok(_) => continue,
                    Err(_) => break,
                };
                tx.send_modify(|o| *o = (*o).max(order));
            }
            tx.send_modify(|o| *o = (*o).max(Order::Stop));
        });
        Parent { orders, go_unix_ns }
    }

    /// Says ready, waits for `go`; returns the run's start (wall-clock ns) it carried.
    pub async fn ready_then_wait_for_go(&mut self) -> Option<u64> {
        println!("{LINE_PREFIX}ready");
        let _ = self.orders.wait_for(|o| *o >= Order::Go).await;
        Some(self.go_unix_ns.load(std::sync::atomic::Ordering::Acquire)).filter(|t| *t > 0)
    }

    /// Reports every tick until the parent says stop; true when it said abort.
    pub async fn report_until_stopped(
        &mut self,
        ctx: &Ctx,
        producers: &[JoinHandle<super::ProducerStats>],
    ) -> bool {
        loop {
            let status = status(ctx, producers);
            if let Ok(json) = serde_json::to_string(&status) {
                println!("{LINE_PREFIX}status {json}");
            }
            let order = tokio::time::timeout(TICK, self.orders.wait_for(|o| *o >= Order::Stop));
            if let Ok(Ok(o)) = order.await {
                return *o == Order::Abort;
            }
        }
    }
}

fn status(ctx: &Ctx, producers: &[JoinHandle<super::ProducerStats>]) -> Status {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &ctx.counters;
    Status {
        producers_done: producers.iter().all(JoinHandle::is_finished),
        accepted: c.accepted.load(Relaxed),
        delivered: c.delivered.load(Relaxed),
        unique: ctx
            .unique_per_group()
            .into_iter()
            .enumerate()
            .filter(|&(_, n)| n > 0)
            .collect(),
    }
}

pub fn write_tally(tally: &Tally, path: Option<&Path>) -> anyhow::Result<()> {
    let path = path.context("a --processes child needs --json")?;
    let text = serde_json::to_string(tally)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

// --- the parent's side ------------------------------------------------------------------

struct Kid {
    index: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    json: PathBuf,
    ready: bool,
    gone: bool,
    status: Status,
}

impl Kid {
    fn order(&mut self, order: &str) {
        if let Some(stdin) = &mut self.stdin {
            if writeln!(stdin, "{order}")
                .and_then(|_| stdin.flush())
                .is_err()
            {
                self.stdin = None;
            }
        }
    }
}

enum Event {
    Ready,
    Status(Status),
    Gone,
}

/// Runs `args` over `--processes` children and prints the merged summary.
pub async fn parent(args: BenchArgs) -> anyhow::Result<()> {
    let workload = args.into_workload()?;
    tokio::task::spawn_blocking(move || steer(&workload))
        .await
        .context("the --processes parent panicked")?
}

fn steer(w: &Workload) -> anyhow::Result<()> {
    let started = Instant::now();
    let run = run_id();
    let dir = std::env::temp_dir().join(format!("entrepot-bench-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (tx, events) = std_mpsc::channel();
    let mut kids = Vec::new();
    let spawned = spawn_all(w, run, &dir, &tx, &mut kids);
    drop(tx);
    let timed_out = match spawned {
        Ok(()) => drive(w, started, &mut kids, &events),
        Err(_) => true,
    };
    for k in &mut kids {
        k.order(if timed_out { "abort" } else { "stop" });
    }
    reap(&mut kids, Instant::now() + EXIT_GRACE);
    let merged = merge(w, &kids, timed_out);
    let _ = std::fs::remove_dir_all(&dir);
    spawned?;
    finish(w, &merged, started.elapsed())
}

fn spawn_all(
    w: &Workload,
    run: u32,
    dir: &Path,
    events: &std_mpsc::Sender<(usize, Event)>,
    kids: &mut Vec<Kid>,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this program to run it again")?;
    let k = w.args.processes;
    let (ptotal, ctotal) = (w.slice.producers_total, w.delivery.connections());
    let (mut p0, mut c0) = (0, 0);
    for i in 0..k {
        let (p, c) = (
            share(u64::from(ptotal), k, i) as u32,
            share(u64::from(ctotal), k, i) as u32,
        );
        let spec = ChildSpec {
            run_id: run,
            producer_offset: p0,
            producers_total: ptotal,
            consumer_offset: c0,
            consumers_total: ctotal,
        };
        (p0, c0) = (p0 + p, c0 + c);
        if p == 0 && c == 0 {
            continue;
        }
        let json = dir.join(format!("child-{i}.json"));
        let mut child = Command::new(&exe)
            .args(child_args(&w.args, p, c, spec, &json))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting process {i} of {k}"))?;
        let stdout = child.stdout.take();
        let slot = kids.len();
        let tx = events.clone();
        std::thread::spawn(move || {
            if let Some(out) = stdout {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let event = match line.strip_prefix(LINE_PREFIX) {
                        Some("ready") => Event::Ready,
                        Some(rest) => match rest.strip_prefix("status ") {
                            Some(json) => match serde_json::from_str(json) {
                                Ok(s) => Event::Status(s),
                                Err(_) => continue,
                            },
                            None => continue,
                        },
                        None => {
                            eprintln!("[process {i}] {line}");
                            continue;
                        }
                    };
                    if tx.send((slot, event)).is_err() {
                        return;
                    }
                }
            }
            let _ = tx.send((slot, Event::Gone));
        });
        kids.push(Kid {
            index: i,
            stdin: child.stdin.take(),
            child,
            json,
            ready: false,
            gone: false,
            status: Status::default(),
        });
    }
    Ok(())
}

/// The flags of one child: the run's own, with its slice, `--quiet`, its `--json` file
/// and the `--child` spec. Every flag of [`BenchArgs`] must be passed on here.
fn child_args(a: &BenchArgs, p: u32, c: u32, spec: ChildSpec, json: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = Vec::new();
    let mut flag = |name: &str, value: String| {
        v.push(format!("--{name}").into());
        v.push(value.into());
    };
    flag("url", a.url.clone());
    flag("address", a.address.clone());
    flag("queues", a.queues.to_string());
    if let Some(ca) = &a.consumer_address {
        flag("consumer-address", ca.clone());
    }
    flag("producers", p.to_string());
    match a.topic_subscribers {
        Some(_) => flag("topic-subscribers", c.to_string()),
        None => flag("consumers", c.to_string()),
    }
    flag("size", a.size.to_string());
    flag("window", a.window.to_string());
    flag("credit", a.credit.to_string());
    flag("rate", a.rate.to_string());
    if let Some(n) = a.count {
        flag("count", n.to_string());
    }
    if let Some(d) = a.duration {
        flag("duration", d.to_string());
    }
    flag("warmup", a.warmup.to_string());
    flag("drain", a.drain.to_string());
    flag("timeout", a.timeout.to_string());
    if let Some(n) = &a.nats_url {
        flag("nats-url", n.clone());
    }
    flag("nats-stream", a.nats_stream.clone());
    flag("child", spec.to_string());
    v.push("--json".into());
    v.push(json.as_os_str().to_owned());
    v.push("--quiet".into());
    if a.persistent {
        v.push("--persistent".into());
    }
    if a.nagle {
        v.push("--nagle".into());
    }
    if a.half_credit {
        v.push("--half-credit".into());
    }
    if a.direct_writes {
        v.push("--direct-writes".into());
    }
    v
}

/// Steps 1–3 of the module doc; true when the run hit `--timeout`.
fn drive(
    w: &Workload,
    started: Instant,
    kids: &mut [Kid],
    events: &std_mpsc::Receiver<(usize, Event)>,
) -> bool {
    let deadline = started + w.timeout;
    let attach_by = (Instant::now() + ATTACH_TIMEOUT + START_GRACE).min(deadline);
    while !kids.iter().all(|k| k.ready || k.gone) {
        match events.recv_timeout(TICK) {
            Ok(e) => apply(kids, e),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            Err(_) if Instant::now() >= attach_by => break,
            Err(_) => {}
        }
    }
    let go = format!(
        "go {}",
        super::stats::Clock::start().unix_ns(Instant::now())
    );
    kids.iter_mut().for_each(|k| k.order(&go));
    let bar = progress_bar(w);
    let mut last_change = (Instant::now(), 0);
    loop {
        match events.recv_timeout(TICK) {
            Ok(e) => apply(kids, e),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            Err(_) => {}
        }
        while let Ok(e) = events.try_recv() {
            apply(kids, e);
        }
        if Instant::now() >= deadline {
            bar.finish_and_clear();
            return true;
        }
        let (accepted, delivered) = kids.iter().fold((0, 0), |(a, d), k| {
            (a + k.status.accepted, d + k.status.delivered)
        });
        bar.set_position(accepted);
        bar.set_message(format!("accepted {accepted}, delivered {delivered}"));
        if delivered != last_change.1 {
            last_change = (Instant::now(), delivered);
        }
        if !kids.iter().all(|k| k.gone || k.status.producers_done) {
            continue;
        }
        let complete = unique_per_group(w, kids).iter().all(|&u| u >= accepted);
        if complete || last_change.0.elapsed() >= w.drain || kids.iter().all(|k| k.gone) {
            break;
        }
    }
    bar.finish_and_clear();
    false
}

fn apply(kids: &mut [Kid], (slot, event): (usize, Event)) {
    let Some(k) = kids.get_mut(slot) else { return };
    match event {
        Event::Ready => k.ready = true,
        Event::Status(s) => k.status = s,
        Event::Gone => k.gone = true,
    }
}

/// Distinct messages per receiver group, summed over the children (a message two
/// children both received would count twice: only the final merge is exact).
fn unique_per_group(w: &Workload, kids: &[Kid]) -> Vec<u64> {
    let mut sum = vec![0; w.delivery.groups() as usize];
    for (g, n) in kids.iter().flat_map(|k| &k.status.unique) {
        if let Some(s) = sum.get_mut(*g) {
            *s += n;
        }
    }
    sum
}

fn progress_bar(w: &Workload) -> indicatif::ProgressBar {
    if w.args.quiet {
        return indicatif::ProgressBar::hidden();
    }
    let len = match w.limit {
        Limit::Count(n) => n,
        Limit::Duration(_) => 0,
    };
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    let template = format!(
        "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} msgs, {} processes {{msg}}",
        w.args.processes
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Waits for every child until `deadline`, then kills those still running; all reaped.
fn reap(kids: &mut [Kid], deadline: Instant) {
    for k in kids.iter_mut() {
        k.stdin = None;
        loop {
            match k.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    tracing::warn!(process = k.index, "did not exit in time: killing it");
                    let _ = k.child.kill();
                    let _ = k.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

fn merge(w: &Workload, kids: &[Kid], timed_out: bool) -> Tally {
    let mut total = Tally {
        timed_out,
        ..Tally::default()
    };
    for k in kids {
        let read = std::fs::read_to_string(&k.json)
            .map_err(anyhow::Error::from)
            .and_then(|text| Ok(serde_json::from_str::<Tally>(&text)?));
        match read {
            Ok(t) => total.add(t, w.slice.producers_total),
            Err(e) => total
                .errors
                .push(format!("process {}: no figures ({e:#})", k.index)),
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    #[test]
    fn child_args_parse_back_to_the_same_run() {
        let a = Cli::parse_from([
            "x",
            "--url",
            "amqp://u:p@h:1",
            "--address",
            "q",
            "--producers",
            "5",
            "--topic-subscribers",
            "3",
            "--size",
            "100",
            "--persistent",
            "--rate",
            "7",
            "--duration",
            "2.5",
            "--warmup",
            "1",
            "--processes",
            "2",
        ])
        .args;
        let spec = ChildSpec {
            run_id: 9,
            producer_offset: 3,
            producers_total: 5,
            consumer_offset: 2,
            consumers_total: 3,
        };
        let args = child_args(&a, 2, 1, spec, Path::new("/tmp/c.json"));
        let c = Cli::parse_from(std::iter::once(OsString::from("x")).chain(args)).args;
        assert_eq!((&c.url, &c.address, c.producers), (&a.url, &a.address, 2));
        assert_eq!(c.topic_subscribers, Some(1));
        assert_eq!((c.size, c.persistent, c.rate), (100, true, 7));
        assert_eq!((c.duration, c.warmup, c.processes), (Some(2.5), 1.0, 1));
        assert_eq!(c.child, Some(spec));
        let w = c.into_workload().unwrap();
        assert_eq!((w.slice.producer_offset, w.slice.producers_total), (3, 5));
        assert_eq!(w.delivery.groups(), 3);
    }
}
