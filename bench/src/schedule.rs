//! When each producer sends its next message: as soon as the window allows, or on a
//! fixed timetable for `--rate`.
//!
//! Under `--rate` the send time carried in a message is the *scheduled* time, not the
//! moment the send happened, so a stalled broker shows up in the latency instead of
//! silently lowering the offered load (coordinated omission).
//!
//! The timetable is kept by a pacing thread per producer, not by tokio's timer: tokio's
//! timer wheel ticks once a millisecond, so a producer sleeping on it sent every message
//! of a millisecond in one burst at the tick, up to 1 ms late (the `send lag` p50 of ~1 ms
//! at 10–20k msgs/s in RESULTS.md, session 11) — a cost of the generator that counted as
//! the broker's latency. The thread sleeps with a timer slack of [`PACE_SLACK_NS`], at
//! least [`PACE_QUANTUM`] at a time, and hands each message over once its time has come,
//! never before. It ends when the
//! producer's share is sent, when sending stops, or when the producer drops its end.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

/// Timer slack of a pacing thread (`PR_SET_TIMERSLACK`): how late the kernel may wake it
/// to batch wake-ups (Linux's default is 50 µs).
pub const PACE_SLACK_NS: u64 = 10_000;

/// Shortest sleep of a pacing thread: a wake-up releases every send due by then, so at
/// most one wake-up (of the thread, and of its producer) per quantum — at 20k msgs/s one
/// per message cost the generator 31–34 µs/msg against 13 on tokio's timer. Sends wait
/// at most about this long past their time.
pub const PACE_QUANTUM: Duration = Duration::from_micros(250);

/// Scheduled sends a pacing thread may have handed over ahead of a producer that waits
/// (for its window): they keep their scheduled times, so the wait counts as latency.
const PACE_QUEUE_MAX: usize = 64;

pub struct Schedule {
    next_seq: u64,
    /// This producer's share of `--count`; `None` under `--duration`.
    count: Option<u64>,
    /// Under `--rate`: the sends as the pacing thread releases them.
    paced: Option<mpsc::Receiver<(u64, Instant)>>,
}

impl Schedule {
    /// A schedule from `start`; with an `interval` (under `--rate`) it starts the pacing
    /// thread, which watches `stop`.
    pub fn new(
        count: Option<u64>,
        interval: Option<Duration>,
        start: Instant,
        stop: &watch::Receiver<bool>,
    ) -> std::io::Result<Schedule> {
        let paced = match interval {
            Some(interval) => {
                let (tx, rx) = mpsc::channel(PACE_QUEUE_MAX);
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name("bench-pacer".into())
                    .spawn(move || pace(tx, count, interval, start, &stop))?;
                Some(rx)
            }
            None => None,
        };
        Ok(Schedule {
            next_seq: 0,
            count,
            paced,
        })
    }

    /// The next sequence number and its send time, or `None` when this producer is done.
    pub async fn next(&mut self, stop: &watch::Receiver<bool>) -> Option<(u64, Instant)> {
        if self.count.is_some_and(|c| self.next_seq >= c) || *stop.borrow() {
            return None;
        }
        let next = match &mut self.paced {
            Some(rx) => rx.recv().await.filter(|_| !*stop.borrow())?,
            None => (self.next_seq, Instant::now()),
        };
        self.next_seq = next.0 + 1;
        Some(next)
    }
}

/// The pacing thread: releases send `seq` at `start + seq × interval`, never earlier.
fn pace(
    tx: mpsc::Sender<(u64, Instant)>,
    count: Option<u64>,
    interval: Duration,
    start: Instant,
    stop: &watch::Receiver<bool>,
) {
    // SAFETY: prctl(PR_SET_TIMERSLACK) changes this thread's timer slack only; no pointers.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, PACE_SLACK_NS as libc::c_ulong);
    }
    let mut seq = 0u64;
    while count.is_none_or(|c| seq < c) && !*stop.borrow() {
        let at = start + interval.mul_f64(seq as f64);
        let now = Instant::now();
        if at > now {
            std::thread::sleep((at - now).max(PACE_QUANTUM));
        }
        if tx.blocking_send((seq, at)).is_err() {
            return;
        }
        seq += 1;
    }
}

/// Splits `total` over `parts` as evenly as possible; part `i` gets this many.
pub fn share(total: u64, parts: u32, i: u32) -> u64 {
    let parts = u64::from(parts.max(1));
    total / parts + u64::from(u64::from(i) < total % parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        let sum: u64 = (0..7).map(|i| share(100, 7, i)).sum();
        assert_eq!(sum, 100);
        assert_eq!(share(3, 8, 7), 0);
    }

    /// A paced schedule releases every send in order, none before its time, and ends
    /// after its count.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paced_sends_come_in_order_and_never_early() {
        let (_stop_tx, stop) = watch::channel(false);
        let interval = Duration::from_micros(200);
        let start = Instant::now();
        let mut s = Schedule::new(Some(50), Some(interval), start, &stop).unwrap();
        let mut seen = 0u64;
        while let Some((seq, at)) = s.next(&stop).await {
            assert_eq!(seq, seen);
            assert_eq!(at, start + interval.mul_f64(seq as f64));
            assert!(Instant::now() >= at, "send {seq} released before its time");
            seen += 1;
        }
        assert_eq!(seen, 50);
    }

    /// Stopping ends a paced schedule (the thread too: its channel closes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_paced_schedule_ends() {
        let (stop_tx, stop) = watch::channel(false);
        let mut s =
            Schedule::new(None, Some(Duration::from_millis(1)), Instant::now(), &stop).unwrap();
        assert!(s.next(&stop).await.is_some());
        stop_tx.send(true).unwrap();
        assert!(s.next(&stop).await.is_none());
        let rx = s.paced.as_mut().unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            while rx.recv().await.is_some() {}
        })
        .await;
        assert!(closed.is_ok(), "the pacing thread did not end after stop");
    }
}
