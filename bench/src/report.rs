//! What `entrepot-bench` shows: the live progress bar while it runs, and the summary at
//! the end (text on stdout, all figures as JSON with `--json`).
//!
//! The summary also says how much CPU the generator itself used, so a reader can tell a
//! broker limit from a generator limit: when the tool uses nearly all cores, the figures
//! are its ceiling, not the broker's.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::task::JoinHandle;

use super::args::{redacted, Delivery, Limit, Workload};
use super::stats::{LatencySummary, Tracker};
use super::tally::Tally;
use super::{Ctx, TICK};

pub struct Progress {
    bar: ProgressBar,
    last: (Instant, u64, u64),
}

impl Progress {
    pub fn new(ctx: &Ctx) -> Progress {
        let len = match ctx.workload.limit {
            Limit::Count(n) => n,
            Limit::Duration(d) => (d + ctx.workload.warmup).as_secs().max(1),
        };
        let bar = if ctx.workload.args.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
        };
        let unit = match ctx.workload.limit {
            Limit::Count(_) => "msgs",
            Limit::Duration(_) => "s",
        };
        let template = format!("{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}}");
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style.progress_chars("=> "));
        }
        Progress {
            bar,
            last: (Instant::now(), 0, 0),
        }
    }

    fn tick(&mut self, ctx: &Ctx) {
        let c = &ctx.counters;
        let (accepted, delivered) = (
            c.accepted.load(Ordering::Relaxed),
            c.delivered.load(Ordering::Relaxed),
        );
        let now = Instant::now();
        let secs = (now - self.last.0).as_secs_f64().max(1e-3);
        let send_rate = (accepted - self.last.1.min(accepted)) as f64 / secs;
        let recv_rate = (delivered - self.last.2.min(delivered)) as f64 / secs;
        self.last = (now, accepted, delivered);
        match ctx.workload.limit {
            Limit::Count(_) => self.bar.set_position(accepted),
            Limit::Duration(_) => self.bar.set_position(ctx.clock.t0.elapsed().as_secs()),
        }
        self.bar.set_message(format!(
            "accepted {send_rate:.0}/s, delivered {recv_rate:.0}/s (total {delivered})"
        ));
    }

    /// Until every producer has returned.
    pub async fn until_sent<T>(&mut self, ctx: &Ctx, producers: &[JoinHandle<T>]) {
        while !producers.iter().all(JoinHandle::is_finished) {
            tokio::time::sleep(TICK).await;
            self.tick(ctx);
        }
    }

    /// Until every receiver group has every accepted message, or nothing new arrived
    /// for `--drain` seconds.
    pub async fn until_drained(&mut self, ctx: &Ctx) {
        let expected = ctx.counters.accepted.load(Ordering::Relaxed);
        let mut last_change = (
            Instant::now(),
            ctx.counters.delivered.load(Ordering::Relaxed),
        );
        loop {
            if ctx.unique_per_group().iter().all(|&u| u >= expected) {
                return;
            }
            tokio::time::sleep(TICK).await;
            self.tick(ctx);
            let delivered = ctx.counters.delivered.load(Ordering::Relaxed);
            if delivered != last_change.1 {
                last_change = (Instant::now(), delivered);
            } else if last_change.0.elapsed() >= ctx.workload.drain {
                return;
            }
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub tool: &'static str,
    pub version: &'static str,
    pub driver: &'static str,
    pub url: String,
    pub address: String,
    pub consumer_address: Option<String>,
    pub producers: u32,
    pub consumers: u32,
    pub topic_subscribers: Option<u32>,
    /// Generator processes the connections were spread over (`--processes`).
    pub processes: u32,
    pub size: usize,
    pub persistent: bool,
    pub window: usize,
    pub credit: u32,
    pub rate_limit: u64,
    pub count: Option<u64>,
    pub duration_s: Option<f64>,
    pub warmup_s: f64,
    pub elapsed_s: f64,
    pub timed_out: bool,
    pub sent: u64,
    pub accepted: u64,
    pub not_accepted: u64,
    pub delivered: u64,
    pub foreign: u64,
    /// Accepted messages per second after the warm-up.
    pub send_msgs_per_s: f64,
    pub send_mb_per_s: f64,
    /// Deliveries per second after the warm-up (all subscribers together under fan-out).
    pub receive_msgs_per_s: f64,
    pub receive_mb_per_s: f64,
    pub produce_to_accepted: LatencySummary,
    /// The part of produce→accepted spent in the generator before the client library had
    /// the message: scheduled send time → the send call returned.
    pub send_lag: LatencySummary,
    pub end_to_end: LatencySummary,
    pub loss: Loss,
    pub generator: Generator,
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Loss {
    /// Receiver groups that must each see every accepted message.
    pub groups: u32,
    /// Accepted messages; `missing` counts over all groups (up to groups × this).
    pub expected_per_group: u64,
    pub missing: u64,
    pub duplicates: u64,
    /// `exactly-once`, `at-least-once`, `missing`, `nothing-accepted`, or `not-checked`
    /// (no consumers, e.g. against `serve --sink`).
    pub verdict: &'static str,
    pub first_missing: Vec<(u32, u64)>,
}

#[derive(Debug, Serialize)]
pub struct Generator {
    /// utime + stime of the generator's processes over the whole run (getrusage, the
    /// figures of `/proc/self/stat`), connection set-up and warm-up included.
    pub cpu_s: f64,
    pub cpu_cores_used: f64,
    pub cores: usize,
    pub note: String,
}

impl Summary {
    /// The summary of a run from its figures (one process's, or merged over all).
    pub fn build(w: &Workload, t: &Tally, wall: Duration) -> Summary {
        let a = &w.args;
        let send_rate = t.rate(t.measured_accepted, t.last_ack_unix_ns);
        let recv_rate = t.rate(t.measured_delivered, t.last_delivery_unix_ns);
        let mb = |msgs: f64| msgs * a.size as f64 / 1e6;
        Summary {
            tool: "entrepot bench",
            version: env!("CARGO_PKG_VERSION"),
            driver: if a.nats_url.is_some() {
                "nats-jetstream"
            } else {
                "amqp"
            },
            url: redacted(a.nats_url.as_deref().unwrap_or(&a.url)),
            address: a.address.clone(),
            consumer_address: a.consumer_address.clone(),
            producers: w.slice.producers_total,
            consumers: w.delivery.connections(),
            topic_subscribers: a.topic_subscribers,
            processes: a.processes,
            size: a.size,
            persistent: a.persistent,
            window: a.window,
            credit: a.credit,
            rate_limit: a.rate,
            count: match w.limit {
                Limit::Count(n) => Some(n),
                Limit::Duration(_) => None,
            },
            duration_s: match w.limit {
                Limit::Duration(d) => Some(d.as_secs_f64()),
                Limit::Count(_) => None,
            },
            warmup_s: w.warmup.as_secs_f64(),
            elapsed_s: wall.as_secs_f64(),
            timed_out: t.timed_out,
            sent: t.sent.iter().sum(),
            accepted: t.accepted,
            not_accepted: t.refused.iter().map(|r| r.len() as u64).sum(),
            delivered: t.delivered,
            foreign: t.foreign,
            send_msgs_per_s: send_rate,
            send_mb_per_s: mb(send_rate),
            receive_msgs_per_s: recv_rate,
            receive_mb_per_s: mb(recv_rate),
            produce_to_accepted: t.ack_latency.summary(),
            send_lag: t.send_lag.summary(),
            end_to_end: t.e2e_latency.summary(),
            loss: loss(t, w.slice.producers_total, w.delivery),
            generator: generator(t.cpu_secs, wall, a.processes),
            errors: t.errors.clone(),
        }
    }

    pub fn verdict_line(&self) -> String {
        let l = &self.loss;
        let who = if l.groups > 1 {
            format!(" by each of {} subscribers", l.groups)
        } else {
            String::new()
        };
        match l.verdict {
            "exactly-once" => format!(
                "all {} messages received{who}: exactly once",
                l.expected_per_group
            ),
            "at-least-once" => format!(
                "all {} messages received{who}: at least once ({} duplicates)",
                l.expected_per_group, l.duplicates
            ),
            "nothing-accepted" => "FAILED: the broker accepted no message".to_owned(),
            "not-checked" => format!(
                "{} messages accepted; no consumers, so nothing was checked for loss",
                l.expected_per_group
            ),
            _ => format!(
                "MISSING: {} of {} accepted messages not received{who} (first as (producer, seq): {:?})",
                l.missing,
                l.expected_per_group * u64::from(l.groups),
                l.first_missing
            ),
        }
    }

    pub fn print(&self) {
        let lat = |name: &str, l: &LatencySummary| {
            println!(
                "{name:<22} p50 {} us  p90 {} us  p99 {} us  p99.9 {} us  max {} us  ({} samples)",
                l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.count
            )
        };
        println!(
            "entrepot bench: {} {} -> {}, {} producers, {} consumers{}, {} B{}, window {}",
            self.driver,
            self.url,
            self.address,
            self.producers,
            self.consumers,
            if self.topic_subscribers.is_some() {
                " (fan-out)"
            } else {
                ""
            },
            self.size,
            if self.persistent { " persistent" } else { "" },
            self.window,
        );
        println!(
            "sent {}  accepted {}  not accepted {}  delivered {}  foreign {}  in {:.2} s",
            self.sent,
            self.accepted,
            self.not_accepted,
            self.delivered,
            self.foreign,
            self.elapsed_s
        );
        println!(
            "throughput: accepted {:.0} msgs/s ({:.2} MB/s), delivered {:.0} msgs/s ({:.2} MB/s)",
            self.send_msgs_per_s,
            self.send_mb_per_s,
            self.receive_msgs_per_s,
            self.receive_mb_per_s
        );
        lat("produce->accepted:", &self.produce_to_accepted);
        lat("send lag:", &self.send_lag);
        lat("end-to-end:", &self.end_to_end);
        println!("generator: {}", self.generator.note);
        for e in &self.errors {
            println!("error: {e}");
        }
        if self.timed_out {
            println!("error: hard timeout reached");
        }
        println!("{}", self.verdict_line());
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

fn loss(t: &Tally, producers: u32, d: Delivery) -> Loss {
    let (mut missing, mut duplicates, mut first_missing) = (0, 0, Vec::new());
    for g in &t.groups {
        let mut tracker = Tracker::default();
        tracker.merge(g, producers);
        let (m, ex) = tracker.missing(&t.sent, &t.refused);
        missing += m;
        duplicates += tracker.duplicates;
        if first_missing.is_empty() {
            first_missing = ex;
        }
    }
    let verdict = match (missing, duplicates) {
        _ if t.accepted == 0 => "nothing-accepted",
        _ if d.groups() == 0 => "not-checked",
        (0, 0) => "exactly-once",
        (0, _) => "at-least-once",
        _ => "missing",
    };
    Loss {
        groups: d.groups(),
        expected_per_group: t.accepted,
        missing,
        duplicates,
        verdict,
        first_missing,
    }
}

/// CPU time the generator used over the run, in cores, and what it means.
fn generator(cpu: f64, wall: Duration, processes: u32) -> Generator {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let used = cpu / wall.as_secs_f64().max(1e-3);
    let note = if used > 0.7 * cores as f64 {
        format!(
            "used {used:.2} of {cores} cores in {processes} process(es): the figures may be this \
             tool's ceiling, not the broker's (spread connections over more processes or machines)"
        )
    } else {
        format!("used {used:.2} of {cores} cores in {processes} process(es)")
    };
    Generator {
        cpu_s: cpu,
        cpu_cores_used: used,
        cores,
        note,
    }
}
