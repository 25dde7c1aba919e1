//! When each producer sends its next message: as soon as the window allows, or on a
//! fixed timetable for `--rate`.
//!
//! Under `--rate` the send time carried in a message is the *scheduled* time, not the
//! moment the send happened, so a stalled broker shows up in the latency instead of
//! silently lowering the offered load (coordinated omission).

use std::time::{Duration, Instant};

use tokio::sync::watch;

pub struct Schedule {
    next_seq: u64,
    /// This producer's share of `--count`; `None` under `--duration`.
    count: Option<u64>,
    /// Time between two sends of this producer under `--rate`.
    interval: Option<Duration>,
    start: Instant,
}

impl Schedule {
    pub fn new(count: Option<u64>, interval: Option<Duration>, start: Instant) -> Schedule {
        Schedule {
            next_seq: 0,
            count,
            interval,
            start,
        }
    }

    /// The next sequence number and its send time, or `None` when this producer is done.
    pub async fn next(&mut self, stop: &watch::Receiver<bool>) -> Option<(u64, Instant)> {
        if self.count.is_some_and(|c| self.next_seq >= c) || *stop.borrow() {
            return None;
        }
        let at = match self.interval {
            Some(i) => {
                let at = self.start + i.mul_f64(self.next_seq as f64);
                tokio::time::sleep_until(at.into()).await;
                if *stop.borrow() {
                    return None;
                }
                at
            }
            None => Instant::now(),
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        Some((seq, at))
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
}
