//! What the load generator counts: latency histograms, per-task counters, the message
//! stamp and the sequence tracker behind the loss check.
//!
//! Latencies are kept in microseconds in HDR histograms (3 significant digits, any
//! value from 1 µs up), so percentiles are exact to 0.1 % with no sampling.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::args::STAMP_BYTES;

/// Highest sequence number a producer may use; a stamp past it is foreign, not ours
/// (bounds the tracker's bitmap before it grows).
pub const SEQ_MAX: u64 = 1 << 32;

/// Format: { run: u32 | producer: u32 | seq: u64 | sent_unix_ns: u64 } big-endian, then padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub run: u32,
    pub producer: u32,
    pub seq: u64,
    pub sent_unix_ns: u64,
}

impl Stamp {
    pub fn write(&self, body: &mut [u8]) {
        body[0..4].copy_from_slice(&self.run.to_be_bytes());
        body[4..8].copy_from_slice(&self.producer.to_be_bytes());
        body[8..16].copy_from_slice(&self.seq.to_be_bytes());
        body[16..24].copy_from_slice(&self.sent_unix_ns.to_be_bytes());
    }

    pub fn read(body: &[u8]) -> Option<Stamp> {
        let b = body.get(..STAMP_BYTES)?;
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(a)
        };
        Some(Stamp {
            run: u32_at(0),
            producer: u32_at(4),
            seq: u64_at(8),
            sent_unix_ns: u64_at(16),
        })
    }
}

/// Monotonic time with a fixed mapping to wall-clock nanoseconds, so a send time
/// carried in a message means the same in every process on this machine.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub t0: Instant,
    t0_unix_ns: u64,
}

impl Clock {
    pub fn start() -> Clock {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        Clock {
            t0: Instant::now(),
            t0_unix_ns: unix,
        }
    }

    pub fn unix_ns(&self, at: Instant) -> u64 {
        self.t0_unix_ns + at.saturating_duration_since(self.t0).as_nanos() as u64
    }

    /// The instant of a wall-clock time (another process's [`Clock::unix_ns`]), clamped to
    /// now: a start in the future would hold every send.
    pub fn instant_of_unix_ns(&self, unix_ns: u64) -> Instant {
        let since_t0 = Duration::from_nanos(unix_ns.saturating_sub(self.t0_unix_ns));
        let before_t0 = Duration::from_nanos(self.t0_unix_ns.saturating_sub(unix_ns));
        let at = (self.t0 + since_t0)
            .checked_sub(before_t0)
            .unwrap_or(self.t0);
        at.min(Instant::now())
    }

    /// Time since a wall-clock stamp taken by [`Clock::unix_ns`].
    pub fn since_unix_ns(&self, at: Instant, unix_ns: u64) -> Duration {
        Duration::from_nanos(self.unix_ns(at).saturating_sub(unix_ns))
    }
}

/// A latency histogram in microseconds.
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        // 3 significant digits, auto-resizing: never fails to record a large value.
        let mut h = Histogram::new(3).unwrap_or_else(|_| unreachable!("3 sigfig is valid"));
        h.auto(true);
        Latency(h)
    }
}

impl Latency {
    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).max(1);
        let _ = self.0.record(us);
    }

    pub fn merge(&mut self, other: &Latency) {
        let _ = self.0.add(&other.0);
    }

    /// The histogram in HdrHistogram's V2 encoding, base64: how `--processes` children
    /// hand their latencies to the parent without losing precision.
    pub fn to_base64(&self) -> anyhow::Result<String> {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(&self.0, &mut bytes)
            .map_err(|e| anyhow::anyhow!("serializing a histogram: {e:?}"))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn from_base64(text: &str) -> anyhow::Result<Latency> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .context("histogram base64")?;
        let mut h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut &bytes[..])
            .map_err(|e| anyhow::anyhow!("deserializing a histogram: {e:?}"))?;
        h.auto(true);
        Ok(Latency(h))
    }

    pub fn summary(&self) -> LatencySummary {
        let h = &self.0;
        LatencySummary {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self.to_base64().map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Latency::from_base64(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// What one producer did.
#[derive(Default)]
pub struct ProducerStats {
    pub sent: u64,
    /// Deliveries the broker settled with `accepted` (or a JetStream ack).
    pub accepted: u64,
    /// Sequence numbers with any other outcome, or never settled: not expected at the
    /// consumers.
    pub refused: Vec<u64>,
    /// Of `refused`, those never settled because the run was aborted.
    pub unconfirmed: u64,
    /// Accepted messages sent after the warm-up, and when the last was accepted.
    pub measured: u64,
    pub last_ack: Option<Instant>,
    pub ack_latency: Latency,
    /// Scheduled send time → handed to the client library, after the warm-up.
    pub send_lag: Latency,
    pub error: Option<String>,
}

impl ProducerStats {
    /// Adds what the settling task counted (sent and errors stay the producer's).
    pub fn absorb(&mut self, other: ProducerStats) {
        self.accepted += other.accepted;
        self.refused.extend(other.refused);
        self.unconfirmed += other.unconfirmed;
        self.measured += other.measured;
        self.last_ack = self.last_ack.max(other.last_ack);
        self.ack_latency.merge(&other.ack_latency);
        self.send_lag.merge(&other.send_lag);
    }
}

/// What one consumer did.
#[derive(Default)]
pub struct ConsumerStats {
    pub delivered: u64,
    /// Deliveries of other runs or without our stamp (left in the queue earlier).
    pub foreign: u64,
    /// Deliveries that arrived after the warm-up, and when the last arrived.
    pub measured: u64,
    pub last_delivery: Option<Instant>,
    pub e2e_latency: Latency,
    pub error: Option<String>,
}

/// Which sequence numbers of which producers one receiver group has seen.
#[derive(Default)]
pub struct Tracker {
    seen: Vec<Vec<u64>>,
    pub unique: u64,
    pub duplicates: u64,
}

impl Tracker {
    /// Records a delivery; false for a stamp outside the run (bad producer or sequence).
    pub fn record(&mut self, producer: u32, seq: u64, producers: u32) -> bool {
        if producer >= producers || seq >= SEQ_MAX {
            return false;
        }
        let p = producer as usize;
        if self.seen.len() <= p {
            self.seen.resize_with(p + 1, Vec::new);
        }
        let bits = &mut self.seen[p];
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
        } else {
            bits[word] |= 1 << bit;
            self.unique += 1;
        }
        true
    }

    /// What this tracker saw, as half-open sequence ranges per producer (runs of
    /// consecutive numbers are the common case, so this stays small).
    pub fn figures(&self) -> TrackerFigures {
        let ranges = self
            .seen
            .iter()
            .map(|bits| {
                let mut out: Vec<[u64; 2]> = Vec::new();
                for (w, &word) in bits.iter().enumerate() {
                    for b in 0..64 {
                        if word & (1 << b) == 0 {
                            continue;
                        }
                        let seq = w as u64 * 64 + b;
                        match out.last_mut() {
                            Some(r) if r[1] == seq => r[1] += 1,
                            _ => out.push([seq, seq + 1]),
                        }
                    }
                }
                out
            })
            .collect();
        TrackerFigures {
            ranges,
            duplicates: self.duplicates,
        }
    }

    /// Adds what another process's tracker of the same receiver group saw; a number both
    /// saw counts as a duplicate.
    pub fn merge(&mut self, other: &TrackerFigures, producers: u32) {
        self.duplicates += other.duplicates;
        for (p, ranges) in other.ranges.iter().enumerate() {
            for &[from, to] in ranges {
                for seq in from..to.min(SEQ_MAX) {
                    self.record(p as u32, seq, producers);
                }
            }
        }
    }

    pub fn has(&self, producer: u32, seq: u64) -> bool {
        let Some(bits) = self.seen.get(producer as usize) else {
            return false;
        };
        bits.get((seq / 64) as usize)
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    /// Accepted messages this group never saw: (count, first few as (producer, seq)).
    pub fn missing(&self, sent: &[u64], refused: &[Vec<u64>]) -> (u64, Vec<(u32, u64)>) {
        let mut count = 0;
        let mut examples = Vec::new();
        for (p, &n) in sent.iter().enumerate() {
            let mut refused = refused.get(p).cloned().unwrap_or_default();
            refused.sort_unstable();
            for seq in 0..n {
                if !self.has(p as u32, seq) && refused.binary_search(&seq).is_err() {
                    count += 1;
                    if examples.len() < 5 {
                        examples.push((p as u32, seq));
                    }
                }
            }
        }
        (count, examples)
    }
}

/// A [`Tracker`] in JSON: per producer, the sequence ranges seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrackerFigures {
    pub ranges: Vec<Vec<[u64; 2]>>,
    pub duplicates: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wall-clock time from one process's clock maps back to the same instant in
    /// another's (how `--processes` children share the parent's start), and a time in
    /// the future is clamped to now.
    #[test]
    fn wall_clock_times_map_back_to_instants_across_clocks() {
        let parent = Clock::start();
        std::thread::sleep(Duration::from_millis(5));
        let at = Instant::now();
        let unix = parent.unix_ns(at);
        std::thread::sleep(Duration::from_millis(50));
        let child = Clock::start();
        let back = child.instant_of_unix_ns(unix);
        let err = if back > at { back - at } else { at - back };
        assert!(err < Duration::from_millis(2), "mapped {err:?} away");
        let future = child.instant_of_unix_ns(parent.unix_ns(Instant::now()) + 10_000_000_000);
        assert!(future <= Instant::now());
    }

    #[test]
    fn stamp_round_trips() {
        let s = Stamp {
            run: 7,
            producer: 3,
            seq: 1 << 40,
            sent_unix_ns: 123_456_789,
        };
        let mut body = vec![0u8; 32];
        s.write(&mut body);
        assert_eq!(Stamp::read(&body), Some(s));
        assert_eq!(Stamp::read(&body[..10]), None);
    }

    #[test]
    fn tracker_counts_duplicates_and_missing() {
        let mut t = Tracker::default();
        assert!(t.record(0, 0, 2));
        assert!(t.record(0, 2, 2));
        assert!(t.record(0, 2, 2));
        assert!(t.record(1, 0, 2));
        assert!(!t.record(2, 0, 2));
        assert_eq!((t.unique, t.duplicates), (3, 1));
        let (n, ex) = t.missing(&[4, 1], &[vec![3], vec![]]);
        assert_eq!((n, ex), (1, vec![(0, 1)]));
    }

    #[test]
    fn tracker_figures_merge_across_processes() {
        let (mut a, mut b) = (Tracker::default(), Tracker::default());
        for seq in [0, 1, 2, 5] {
            a.record(0, seq, 2);
        }
        for seq in [3, 4, 5] {
            b.record(0, seq, 2);
        }
        b.record(1, 70, 2);
        let fa = a.figures();
        assert_eq!(fa.ranges, vec![vec![[0, 3], [5, 6]]]);
        let mut merged = Tracker::default();
        merged.merge(&fa, 2);
        merged.merge(&b.figures(), 2);
        assert_eq!((merged.unique, merged.duplicates), (7, 1));
        assert_eq!(merged.missing(&[6, 71], &[vec![], vec![]]).0, 70);
    }

    #[test]
    fn latency_round_trips_through_v2() {
        let mut l = Latency::default();
        for us in [5u64, 50, 500, 5_000, 5_000_000] {
            l.record(Duration::from_micros(us));
        }
        let back = Latency::from_base64(&l.to_base64().unwrap()).unwrap();
        let (x, y) = (l.summary(), back.summary());
        assert_eq!(
            (x.count, x.p50_us, x.p99_us, x.max_us),
            (y.count, y.p50_us, y.p99_us, y.max_us)
        );
        let mut sum = Latency::default();
        sum.merge(&l);
        sum.merge(&back);
        assert_eq!(sum.summary().count, 10);
    }
}
