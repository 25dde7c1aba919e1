//! Throughput over time, the steps on it, and what the issue asks of it.
//!
//! Throughput is messages the broker accepted to producers per second, from the ledger's
//! counters sampled every 50 ms (consumer settlements are shown alongside). Around each
//! step [start, end] (end: its last action done, e.g. the pod ready or deleted):
//! - pre-step rate: the median of the one-second rates of the [`PRE_WINDOW_S`] seconds
//!   before the start;
//! - recovery: from the end of the step to the start of the first one-second window
//!   (sliding by the sample period, starting at or after the step's end: the step's own
//!   seconds never count) whose rate is at least [`RECOVERY_FRACTION`] of the pre-step
//!   rate; 0 when the second right after the step already is. Stalls during the step
//!   itself are the stall meter's business.

use std::fmt::Write as _;
use std::path::Path;

use super::load::Sample;
use super::plot;

/// Seconds before a step whose rates make its pre-step rate.
pub const PRE_WINDOW_S: u64 = 5;
/// Throughput is back when at least this fraction of the pre-step rate.
pub const RECOVERY_FRACTION: f64 = 0.9;

/// One step of the run, in ms since the load started.
#[derive(Clone, Debug)]
pub struct Step {
    pub label: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// What the timeline says about one step.
#[derive(Clone, Debug)]
pub struct StepVerdict {
    pub label: String,
    pub took_s: f64,
    pub pre_rate: f64,
    /// None: throughput never came back before `searched_s` ran out.
    pub recovery_s: Option<f64>,
    pub searched_s: f64,
}

/// The count at `at_ms`, interpolated between samples.
fn count_at(samples: &[Sample], at_ms: u64, pick: fn(&Sample) -> u64) -> f64 {
    let i = samples.partition_point(|s| s.at_ms <= at_ms);
    match (i.checked_sub(1).map(|j| &samples[j]), samples.get(i)) {
        (Some(a), Some(b)) if b.at_ms > a.at_ms => {
            let f = (at_ms - a.at_ms) as f64 / (b.at_ms - a.at_ms) as f64;
            pick(a) as f64 + f * (pick(b) as f64 - pick(a) as f64)
        }
        (Some(a), _) => pick(a) as f64,
        (None, Some(b)) => pick(b) as f64,
        (None, None) => 0.0,
    }
}

fn confirmed(s: &Sample) -> u64 {
    s.confirmed
}

fn consumed(s: &Sample) -> u64 {
    s.consumed
}

/// Accepted messages per second over the second ending at `end_ms`.
pub fn rate_ending(samples: &[Sample], end_ms: u64) -> f64 {
    let start = end_ms.saturating_sub(1000);
    let span = (end_ms - start).max(1) as f64 / 1000.0;
    (count_at(samples, end_ms, confirmed) - count_at(samples, start, confirmed)) / span
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The pre-step rate of a step starting at `start_ms`.
pub fn pre_rate(samples: &[Sample], start_ms: u64) -> f64 {
    let rates = (0..PRE_WINDOW_S)
        .filter(|i| start_ms >= (i + 1) * 1000)
        .map(|i| rate_ending(samples, start_ms - i * 1000))
        .collect();
    median(rates)
}

/// Seconds from `end_ms` to the start of the first second whose rate is back to the
/// fraction of `pre`, for seconds that end by `until_ms`; None if there is none.
pub fn recovery(samples: &[Sample], pre: f64, end_ms: u64, until_ms: u64) -> Option<f64> {
    let step = super::load::SAMPLE_EVERY.as_millis() as u64;
    let mut t = end_ms;
    while t + 1000 <= until_ms {
        if rate_ending(samples, t + 1000) >= RECOVERY_FRACTION * pre {
            return Some((t - end_ms) as f64 / 1000.0);
        }
        t += step;
    }
    None
}

/// Judges each step; a step's recovery is searched in the seconds that end within
/// `limit_s` of its end (never past the next step's start, nor the last sample).
pub fn judge(samples: &[Sample], steps: &[Step], limit_s: f64) -> Vec<StepVerdict> {
    let last = samples.last().map_or(0, |s| s.at_ms);
    steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let pre = pre_rate(samples, step.start_ms);
            let next = steps.get(i + 1).map_or(last, |s| s.start_ms);
            let until = (step.end_ms + (limit_s * 1000.0) as u64)
                .min(next)
                .min(last);
            StepVerdict {
                label: step.label.clone(),
                took_s: (step.end_ms - step.start_ms) as f64 / 1000.0,
                pre_rate: pre,
                recovery_s: recovery(samples, pre, step.end_ms, until),
                searched_s: until.saturating_sub(step.end_ms) as f64 / 1000.0,
            }
        })
        .collect()
}

/// Per whole second: (second, accepted/s, consumed/s).
pub fn per_second(samples: &[Sample]) -> Vec<(u64, f64, f64)> {
    let last = samples.last().map_or(0, |s| s.at_ms);
    (1..=last / 1000)
        .map(|s| {
            let (a, b) = ((s - 1) * 1000, s * 1000);
            let acc = count_at(samples, b, confirmed) - count_at(samples, a, confirmed);
            let con = count_at(samples, b, consumed) - count_at(samples, a, consumed);
            (s, acc, con)
        })
        .collect()
}

/// The timeline as text: one line per second, step markers where steps begin and end.
pub fn render(samples: &[Sample], steps: &[Step]) -> String {
    let mut out = String::from("   t  accepted/s  consumed/s  step\n");
    for (s, acc, con) in per_second(samples) {
        let marks: Vec<String> = steps
            .iter()
            .filter_map(|st| {
                let (a, b) = ((s - 1) * 1000, s * 1000);
                let begins = (a..b).contains(&st.start_ms);
                let ends = (a..b).contains(&st.end_ms);
                match (begins, ends) {
                    (true, true) => Some(format!("[{}]", st.label)),
                    (true, false) => Some(format!(">> {}", st.label)),
                    (false, true) => Some(format!("<< {} done", st.label)),
                    _ => None,
                }
            })
            .collect();
        let _ = writeln!(out, "{s:>4}  {acc:>10.0}  {con:>10.0}  {}", marks.join(" "));
    }
    out
}

/// Writes the timeline's PNG to `path`: accepted/s (blue) and consumed/s (grey) per
/// second, each step's span shaded with its label above.
pub fn write_png(samples: &[Sample], steps: &[Step], path: &Path) -> std::io::Result<()> {
    let seconds = per_second(samples);
    let series: Vec<(f64, f64)> = seconds.iter().map(|(_, a, c)| (*a, *c)).collect();
    let spans: Vec<(f64, f64, &str)> = steps
        .iter()
        .map(|s| {
            (
                s.start_ms as f64 / 1000.0,
                s.end_ms as f64 / 1000.0,
                s.label.as_str(),
            )
        })
        .collect();
    plot::timeline(&series, &spans, path)
}
