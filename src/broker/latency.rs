//! A latency histogram the core records into without a lock, for metrics to read.
//!
//! Owns the counts only; rendering them (Prometheus text) is `crate::metrics`'s job, so
//! the core names nothing above it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use entrepot_storage::SYNC_LATENCY_BUCKETS_US;

/// A latency histogram with the [`SYNC_LATENCY_BUCKETS_US`] bounds; recording is two
/// atomic adds, no lock.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// One count per bound of [`SYNC_LATENCY_BUCKETS_US`], then the overflow (`+Inf`).
    buckets: [AtomicU64; SYNC_LATENCY_BUCKETS_US.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, took: Duration) {
        let us = took.as_micros() as u64;
        let i = SYNC_LATENCY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(SYNC_LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Samples in bucket `i` alone (not cumulative); `i == SYNC_LATENCY_BUCKETS_US.len()`
    /// is the overflow bucket.
    pub fn bucket(&self, i: usize) -> u64 {
        self.buckets[i].load(Ordering::Relaxed)
    }

    /// The sum of every recorded latency, in nanoseconds.
    pub fn sum_nanos(&self) -> u64 {
        self.sum_nanos.load(Ordering::Relaxed)
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}
