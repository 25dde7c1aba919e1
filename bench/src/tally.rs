//! The raw figures of a run in a form that adds up: from this process's tasks, or summed
//! over the `--processes` children, which each write one as JSON. Latencies travel as HDR
//! V2 histograms and the loss check's trackers as sequence ranges, so the merged summary
//! is exactly what one process seeing everything would have printed.
//!
//! Indices are global: `sent` and `refused` have one entry per producer of the whole run,
//! `groups` one per receiver group; a child leaves the entries of others' slices empty.

use serde::{Deserialize, Serialize};

use super::stats::{ConsumerStats, Latency, ProducerStats, Tracker, TrackerFigures};
use super::Ctx;

#[derive(Default, Serialize, Deserialize)]
pub struct Tally {
    /// Per global producer: messages sent, and sequence numbers the broker did not accept.
    pub sent: Vec<u64>,
    pub refused: Vec<Vec<u64>>,
    pub accepted: u64,
    pub delivered: u64,
    pub foreign: u64,
    /// After the warm-up: messages accepted and delivered, and when the last of each was
    /// (wall-clock ns, comparable between processes on one machine).
    pub measured_accepted: u64,
    pub measured_delivered: u64,
    pub measure_from_unix_ns: u64,
    pub last_ack_unix_ns: Option<u64>,
    pub last_delivery_unix_ns: Option<u64>,
    pub ack_latency: Latency,
    /// Scheduled send time → handed to the client library (see `Ctx::count_sent`).
    #[serde(default)]
    pub send_lag: Latency,
    pub e2e_latency: Latency,
    /// Per global receiver group: which sequence numbers arrived.
    pub groups: Vec<TrackerFigures>,
    pub errors: Vec<String>,
    /// CPU seconds the generator process(es) used.
    pub cpu_secs: f64,
    pub timed_out: bool,
}

impl Tally {
    /// This process's figures.
    pub fn local(
        ctx: &Ctx,
        producers: &[ProducerStats],
        consumers: &[ConsumerStats],
        timed_out: bool,
    ) -> Tally {
        let slice = ctx.workload.slice;
        let total = slice.producers_total as usize;
        let mut sent = vec![0; total];
        let mut refused = vec![Vec::new(); total];
        for (i, p) in producers.iter().enumerate() {
            let g = slice.producer_offset as usize + i;
            if g < total {
                sent[g] = p.sent;
                refused[g] = p.refused.clone();
            }
        }
        let mut ack_latency = Latency::default();
        producers
            .iter()
            .for_each(|p| ack_latency.merge(&p.ack_latency));
        let mut send_lag = Latency::default();
        producers.iter().for_each(|p| send_lag.merge(&p.send_lag));
        let mut e2e_latency = Latency::default();
        consumers
            .iter()
            .for_each(|c| e2e_latency.merge(&c.e2e_latency));
        let unix = |t| ctx.clock.unix_ns(t);
        Tally {
            sent,
            refused,
            accepted: producers.iter().map(|p| p.accepted).sum(),
            delivered: consumers.iter().map(|c| c.delivered).sum(),
            foreign: consumers.iter().map(|c| c.foreign).sum(),
            measured_accepted: producers.iter().map(|p| p.measured).sum(),
            measured_delivered: consumers.iter().map(|c| c.measured).sum(),
            measure_from_unix_ns: unix(ctx.measure_from()),
            last_ack_unix_ns: producers.iter().filter_map(|p| p.last_ack).max().map(unix),
            last_delivery_unix_ns: consumers
                .iter()
                .filter_map(|c| c.last_delivery)
                .max()
                .map(unix),
            ack_latency,
            send_lag,
            e2e_latency,
            groups: ctx
                .groups
                .iter()
                .map(|g| g.lock().map(|t| t.figures()).unwrap_or_default())
                .collect(),
            errors: producers
                .iter()
                .filter_map(|p| p.error.clone())
                .chain(consumers.iter().filter_map(|c| c.error.clone()))
                .collect(),
            cpu_secs: cpu_secs_self(),
            timed_out,
        }
    }

    /// Adds another process's figures of the same run.
    pub fn add(&mut self, other: Tally, producers_total: u32) {
        grow(&mut self.sent, other.sent.len());
        for (a, b) in self.sent.iter_mut().zip(&other.sent) {
            *a += b;
        }
        grow(&mut self.refused, other.refused.len());
        for (a, b) in self.refused.iter_mut().zip(other.refused) {
            a.extend(b);
        }
        self.accepted += other.accepted;
        self.delivered += other.delivered;
        self.foreign += other.foreign;
        self.measured_accepted += other.measured_accepted;
        self.measured_delivered += other.measured_delivered;
        self.measure_from_unix_ns = match self.measure_from_unix_ns {
            0 => other.measure_from_unix_ns,
            t => t.min(other.measure_from_unix_ns),
        };
        self.last_ack_unix_ns = self.last_ack_unix_ns.max(other.last_ack_unix_ns);
        self.last_delivery_unix_ns = self.last_delivery_unix_ns.max(other.last_delivery_unix_ns);
        self.ack_latency.merge(&other.ack_latency);
        self.send_lag.merge(&other.send_lag);
        self.e2e_latency.merge(&other.e2e_latency);
        grow(&mut self.groups, other.groups.len());
        for (a, b) in self.groups.iter_mut().zip(&other.groups) {
            if b.ranges.is_empty() && b.duplicates == 0 {
                continue;
            }
            let mut t = Tracker::default();
            t.merge(a, producers_total);
            t.merge(b, producers_total);
            *a = t.figures();
        }
        self.errors.extend(other.errors);
        self.cpu_secs += other.cpu_secs;
        self.timed_out |= other.timed_out;
    }

    /// Messages per second from the measurement start to the last event.
    pub fn rate(&self, count: u64, last_unix_ns: Option<u64>) -> f64 {
        match last_unix_ns {
            Some(t) if t > self.measure_from_unix_ns => {
                count as f64 / ((t - self.measure_from_unix_ns) as f64 / 1e9)
            }
            _ => 0.0,
        }
    }
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// Voluntary context switches of this process so far (threads that went idle).
pub fn idle_switches_self() -> u64 {
    // SAFETY: getrusage fills the struct we pass; no pointers are kept.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) == 0 {
            u.ru_nvcsw as u64
        } else {
            0
        }
    }
}

/// CPU time (user + system) this process has used.
pub fn cpu_secs_self() -> f64 {
    // SAFETY: getrusage fills the struct we pass; no pointers are kept.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) == 0 {
            let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
            t(u.ru_utime) + t(u.ru_stime)
        } else {
            0.0
        }
    }
}
