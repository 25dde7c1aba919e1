//! How late this node's own timers fire — its event loop's lag — and how far that
//! stretches the peer-liveness timeout.
//!
//! A node starved of CPU (a loaded machine, a stop-the-world pause, SIGSTOP) runs its
//! tasks late: the ping it sent is read late, its timeout fires late, its liveness loop
//! wakes late. Measured from inside, every peer then looks silent for as long as this
//! node itself did not run. So the liveness verdict is taken against a timeout stretched
//! by this node's own recent lag ([`stretched_timeout`]): a peer is blamed only for
//! silence this node cannot explain by its own lateness. A node that is not late keeps
//! the plain timeout, so a dead peer is found as fast as before.
//!
//! [`LagMeter`] keeps the largest lag seen over the last one to two [`LAG_WINDOW`]s
//! (two windows: the current one and the one before), fed by a probe task
//! ([`probe`]: a sleep of [`LAG_PROBE_INTERVAL`] and how much longer it took) and by the
//! liveness loops themselves (a ping's timeout that fired late, a sleep that overran).
//!
//! Does not: know the peer's own lag (a peer starved on another machine still looks
//! silent; the timeout covers it only as far as the two share a machine's load).

use std::sync::Mutex;
use std::time::Duration;

// tokio's clock, not std's: the lag is of tokio's timers (a simulation pauses it).
use tokio::time::Instant;

/// How often the probe measures the event loop's lag.
pub const LAG_PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// A lag sample counts for between one and two of these.
pub const LAG_WINDOW: Duration = Duration::from_secs(10);
/// The liveness timeout grows by this many times this node's recent lag.
pub const LAG_TIMEOUT_FACTOR: u32 = 4;
/// The stretched liveness timeout never exceeds this (a peer really gone is still found,
/// late, on a node that stays lagging).
pub const LIVENESS_TIMEOUT_MAX: Duration = Duration::from_secs(30);

/// The liveness timeout for a node whose recent lag is `lag`: `base` plus
/// [`LAG_TIMEOUT_FACTOR`] × `lag`, at most [`LIVENESS_TIMEOUT_MAX`] (or `base` if larger).
pub fn stretched_timeout(base: Duration, lag: Duration) -> Duration {
    base.saturating_add(lag.saturating_mul(LAG_TIMEOUT_FACTOR))
        .min(LIVENESS_TIMEOUT_MAX.max(base))
}

/// The largest lag of the current and the previous [`LAG_WINDOW`].
#[derive(Debug, Default)]
pub struct LagMeter {
    windows: Mutex<Windows>,
}

#[derive(Debug, Default)]
struct Windows {
    /// When the current window began; `None` before the first sample.
    began: Option<Instant>,
    current: Duration,
    previous: Duration,
}

impl Windows {
    /// Moves the windows forward to `now`.
    fn roll(&mut self, now: Instant) {
        let began = *self.began.get_or_insert(now);
        let elapsed = now.saturating_duration_since(began);
        let windows = elapsed.as_nanos() / LAG_WINDOW.as_nanos();
        if windows == 0 {
            return;
        }
        self.previous = if windows == 1 {
            self.current
        } else {
            Duration::ZERO
        };
        self.current = Duration::ZERO;
        let moved = u32::try_from(windows).unwrap_or(u32::MAX);
        self.began = Some(began + LAG_WINDOW.saturating_mul(moved));
    }
}

impl LagMeter {
    /// One observation at `now`: something due was run `lag` late.
    pub fn record(&self, now: Instant, lag: Duration) {
        let mut w = self.lock();
        w.roll(now);
        w.current = w.current.max(lag);
    }

    /// The largest lag observed in the current and the previous window, as of `now`.
    pub fn recent(&self, now: Instant) -> Duration {
        let mut w = self.lock();
        w.roll(now);
        w.current.max(w.previous)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Measures the event loop's lag for good: sleeps [`LAG_PROBE_INTERVAL`] and records how
/// much longer that took.
pub(crate) async fn probe(meter: std::sync::Arc<LagMeter>) {
    loop {
        let before = Instant::now();
        tokio::time::sleep(LAG_PROBE_INTERVAL).await;
        let late = before.elapsed().saturating_sub(LAG_PROBE_INTERVAL);
        meter.record(Instant::now(), late);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_node_that_is_not_late_keeps_the_plain_timeout() {
        assert_eq!(stretched_timeout(500 * MS, Duration::ZERO), 500 * MS);
        assert_eq!(stretched_timeout(500 * MS, 250 * MS), 1500 * MS);
        assert_eq!(
            stretched_timeout(500 * MS, Duration::from_secs(60)),
            LIVENESS_TIMEOUT_MAX
        );
        let long = LIVENESS_TIMEOUT_MAX * 2;
        assert_eq!(stretched_timeout(long, Duration::from_secs(1)), long);
    }

    #[test]
    fn a_lag_counts_for_one_to_two_windows_then_is_forgotten() {
        let meter = LagMeter::default();
        let t0 = Instant::now();
        assert_eq!(meter.recent(t0), Duration::ZERO);
        meter.record(t0, 3 * MS);
        meter.record(t0 + 100 * MS, 2_000 * MS);
        meter.record(t0 + 200 * MS, 5 * MS);
        assert_eq!(
            meter.recent(t0 + 300 * MS),
            2_000 * MS,
            "the largest is kept"
        );
        // The next window still remembers it (as the previous one)...
        let next = t0 + LAG_WINDOW + 100 * MS;
        meter.record(next, 7 * MS);
        assert_eq!(meter.recent(next), 2_000 * MS);
        // ...the one after that no longer does.
        let after = t0 + LAG_WINDOW * 2 + 100 * MS;
        assert_eq!(meter.recent(after), 7 * MS);
        // A long gap with no sample forgets everything.
        assert_eq!(meter.recent(t0 + LAG_WINDOW * 10), Duration::ZERO);
    }
}
