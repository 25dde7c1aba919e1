//! Group commit: one background thread turns many appends into one `msync`.
//!
//! Appenders never sync. They bump the log's write position and wake this thread; the
//! thread snapshots how far the log is written, syncs everything up to there in one call
//! per segment (and the directory after a roll), and only then publishes the new durable
//! offset through a `watch` channel; segments completed since the last round are sealed
//! after the publication, so their appenders do not wait for the seal. While one sync runs, new appends pile up and share
//! the next one, so the cost of a flush is spread over every record that arrived during
//! the previous flush.
//!
//! Invariant: the published durable offset only ever covers bytes that a successful sync
//! returned for. A failed sync poisons the log (see [`crate::StorageError::SyncFailed`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::error::{Result, StorageError};
use crate::log::{Inner, SyncRound};
use crate::prepare::Preparer;
use crate::segment::Segment;

/// Upper bounds (µs) of the sync-latency histogram buckets; the last bucket is open.
pub const SYNC_LATENCY_BUCKETS_US: [u64; 10] = [
    100, 250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 64_000, 256_000,
];

/// What the durability watch channel carries.
#[derive(Debug, Clone, Default)]
pub struct DurableState {
    /// Every offset below this is durable under the log's sync policy.
    pub durable: u64,
    /// Set once a sync failed; no later offset will ever become durable.
    pub failed: Option<Arc<str>>,
}

/// Completes once a record is durable. Waiting costs no allocation: the handle holds a
/// clone of the log's watch receiver.
#[derive(Debug, Clone)]
pub struct Durable {
    pub(crate) rx: Option<watch::Receiver<DurableState>>,
    pub(crate) offset: u64,
    /// The sync thread of a log that syncs lazily (`LogConfig::lazy_sync`): waiting for
    /// the record asks it for a sync at once instead of at its deadline.
    pub(crate) demand: Option<Arc<SyncSignal>>,
}

impl Durable {
    /// A handle that is already complete (sync policy `Never`).
    pub(crate) fn ready(offset: u64) -> Durable {
        Durable {
            rx: None,
            offset,
            demand: None,
        }
    }

    /// A handle on someone else's durability watch: complete once `state.durable` passes
    /// `position`. A replicated store hands these out for "committed by a majority".
    pub fn watching(rx: watch::Receiver<DurableState>, position: u64) -> Durable {
        Durable {
            rx: Some(rx),
            offset: position,
            demand: None,
        }
    }

    /// The offset this handle waits for.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// True once the record is durable (does not wait).
    pub fn is_durable(&self) -> bool {
        self.rx
            .as_ref()
            .is_none_or(|rx| rx.borrow().durable > self.offset)
    }

    /// True once durability can no longer come: the log's sync (or the replication it
    /// watches) failed before reaching this record.
    pub fn has_failed(&self) -> bool {
        self.rx.as_ref().is_some_and(|rx| {
            let s = rx.borrow();
            s.durable <= self.offset && s.failed.is_some()
        })
    }

    /// Waits until the record is durable, or fails if the log's sync failed. On a log
    /// that syncs lazily, a wait for a record not yet durable asks for a sync at once.
    pub async fn wait(self) -> Result<()> {
        let Some(mut rx) = self.rx else { return Ok(()) };
        let offset = self.offset;
        if let Some(signal) = &self.demand {
            if rx.borrow().durable <= offset {
                signal.notify();
            }
        }
        let state = rx
            .wait_for(|s| s.durable > offset || s.failed.is_some())
            .await
            .map_err(|_| StorageError::Closed)?;
        match (&state.failed, state.durable > offset) {
            (_, true) => Ok(()),
            (Some(reason), false) => Err(StorageError::SyncFailed {
                path: Default::default(),
                reason: reason.to_string(),
            }),
            (None, false) => Err(StorageError::Closed),
        }
    }
}

/// Counters a caller can export as metrics.
#[derive(Debug, Default)]
pub struct LogStats {
    pub records_appended: AtomicU64,
    pub bytes_appended: AtomicU64,
    pub syncs: AtomicU64,
    pub sync_nanos_total: AtomicU64,
    /// Counts per bucket of [`SYNC_LATENCY_BUCKETS_US`], plus one open bucket.
    pub sync_latency_buckets: [AtomicU64; SYNC_LATENCY_BUCKETS_US.len() + 1],
    /// Bytes cut from a torn or corrupt tail during recovery.
    pub recovered_torn_bytes: AtomicU64,
    /// Segments deleted by purge, truncation, retention or acknowledgement.
    pub segments_deleted: AtomicU64,
    /// Of those, the ones whose file was kept for a later segment (`LogConfig::recycle_segments`).
    pub segments_recycled: AtomicU64,
    /// Rolls to a new segment, and how many of them took a file prepared ahead.
    pub rolls: AtomicU64,
    pub rolls_prepared: AtomicU64,
    /// Time appenders spent in rolls (under the writer lock), in total and the longest.
    pub roll_nanos_total: AtomicU64,
    pub roll_nanos_max: AtomicU64,
}

impl LogStats {
    pub(crate) fn observe_sync(&self, took: Duration) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_nanos_total
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        let us = took.as_micros() as u64;
        let bucket = SYNC_LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(SYNC_LATENCY_BUCKETS_US.len());
        self.sync_latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn observe_roll(&self, took: Duration, prepared: bool) {
        self.rolls.fetch_add(1, Ordering::Relaxed);
        if prepared {
            self.rolls_prepared.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = took.as_nanos() as u64;
        self.roll_nanos_total.fetch_add(nanos, Ordering::Relaxed);
        self.roll_nanos_max.fetch_max(nanos, Ordering::Relaxed);
    }
}

/// Wakes the sync thread; shared by the log and the thread.
#[derive(Debug, Default)]
pub(crate) struct SyncSignal {
    pending: Mutex<SignalState>,
    cond: Condvar,
    /// A lazy log has appends not yet covered by a round (`arm`).
    armed: AtomicBool,
}

#[derive(Debug, Default)]
struct SignalState {
    dirty: bool,
    closed: bool,
}

impl SyncSignal {
    /// A lazy log's append ([`crate::LogConfig::lazy_sync`]): starts the thread's
    /// deadline. Only the first append since the last round takes the lock and wakes the
    /// thread; the others cost one atomic load.
    pub fn arm(&self) {
        if !self.armed.load(Ordering::Acquire) && !self.armed.swap(true, Ordering::AcqRel) {
            // Under the lock, so the thread cannot miss it between its check and its wait.
            if let Ok(_s) = self.pending.lock() {
                self.cond.notify_one();
            }
        }
    }

    /// A lazy log's wait: sleeps until an append arms the deadline (or a waiter asks),
    /// then until `delay` has passed or a waiter asks. Returns false once closed.
    fn wait_lazy(&self, delay: Duration) -> bool {
        let Ok(mut s) = self.pending.lock() else {
            return false;
        };
        while !s.dirty && !s.closed && !self.armed.load(Ordering::Acquire) {
            s = match self.cond.wait(s) {
                Ok(g) => g,
                Err(_) => return false,
            };
        }
        let Some(mut s) = self.wait_until(s, Instant::now() + delay, |s| s.dirty || s.closed)
        else {
            return false;
        };
        s.dirty = false;
        // Appends from here on arm the next round (the coming sync may cover them too:
        // one sync too many at worst, never one too few).
        self.armed.store(false, Ordering::Release);
        !s.closed
    }

    /// Waits on the condition until `done` holds or `deadline` passes; `None` if the lock
    /// was poisoned.
    fn wait_until<'a>(
        &self,
        mut s: MutexGuard<'a, SignalState>,
        deadline: Instant,
        done: impl Fn(&SignalState) -> bool,
    ) -> Option<MutexGuard<'a, SignalState>> {
        while !done(&s) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self.cond.wait_timeout(s, left).ok()?.0;
        }
        Some(s)
    }

    pub fn notify(&self) {
        if let Ok(mut s) = self.pending.lock() {
            if !s.dirty {
                s.dirty = true;
                self.cond.notify_one();
            }
        }
    }

    pub fn close(&self) {
        if let Ok(mut s) = self.pending.lock() {
            s.closed = true;
            self.cond.notify_one();
        }
    }

    /// Waits for work; `interval` makes the thread wait at least that long between syncs.
    /// Returns false once closed.
    fn wait(&self, interval: Option<Duration>) -> bool {
        let Ok(mut s) = self.pending.lock() else {
            return false;
        };
        if let Some(interval) = interval {
            s = match self.wait_until(s, Instant::now() + interval, |s| s.closed) {
                Some(s) => s,
                None => return false,
            };
        }
        while !s.dirty && !s.closed {
            s = match self.cond.wait(s) {
                Ok(g) => g,
                Err(_) => return false,
            };
        }
        s.dirty = false;
        !s.closed
    }
}

/// Hands the active segment to the prefault thread, which populates the pages appends
/// will copy into next while the sync thread waits for the disk ([`crate::segment`]'s
/// `prefault_ahead`). Best effort: when it lags, appenders fault their own pages. The same
/// thread prepares the log's next segment file when asked (`prepare.rs`, once per
/// segment): a log keeps the threads it had, one sync and one prefault thread.
#[derive(Default)]
pub(crate) struct Prefault {
    state: Mutex<PrefaultState>,
    cond: Condvar,
}

#[derive(Default)]
struct PrefaultState {
    /// The segment to populate ahead of and how far, taken by the thread.
    next: Option<(Arc<Segment>, u64)>,
    /// A preparation of the next segment file asked for, taken by the thread.
    prepare: Option<Arc<Preparer>>,
    /// The kernel refused `MADV_POPULATE_WRITE` (before Linux 5.14): populating stops,
    /// preparations still run.
    refused: bool,
    /// The thread is started by the first request, so a log that is never appended to (an
    /// idle Raft group's, say) costs no thread.
    started: bool,
    closed: bool,
}

impl Prefault {
    /// Asks for `ahead` bytes of pages past `active`'s written end (does not wait). The
    /// first request starts the thread; if it cannot start, appends fault their own pages.
    pub fn request(self: &Arc<Self>, active: &Arc<Segment>, ahead: u64) {
        let Ok(mut s) = self.state.lock() else { return };
        if s.closed || s.refused {
            return;
        }
        if !self.start(&mut s) {
            return;
        }
        if s.next.is_none() {
            s.next = Some((Arc::clone(active), ahead));
            self.cond.notify_one();
        }
    }

    /// Asks the thread to run `preparer`'s preparation (does not wait); false when the
    /// thread is closed or cannot start (the roll then creates its segment).
    pub fn request_prepare(self: &Arc<Self>, preparer: &Arc<Preparer>) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        if s.closed || !self.start(&mut s) {
            return false;
        }
        s.prepare = Some(Arc::clone(preparer));
        self.cond.notify_one();
        true
    }

    /// Starts the thread on the first request; false if it cannot start.
    fn start(self: &Arc<Self>, s: &mut PrefaultState) -> bool {
        if !s.started {
            s.started = true;
            let prefault = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("entrepot-prefault".into())
                .spawn(move || run_prefault(prefault));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the prefault thread, appends fault their own pages");
                s.closed = true;
                return false;
            }
        }
        true
    }

    pub fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.closed = true;
            s.next = None;
            s.prepare = None;
            self.cond.notify_one();
        }
    }

    fn next(&self) -> Option<PrefaultJob> {
        let mut s = self.state.lock().ok()?;
        loop {
            if s.closed {
                return None;
            }
            if let Some(preparer) = s.prepare.take() {
                return Some(PrefaultJob::Prepare(preparer));
            }
            if let Some((seg, ahead)) = s.next.take() {
                return Some(PrefaultJob::Populate(seg, ahead));
            }
            s = self.cond.wait(s).ok()?;
        }
    }

    fn refuse_populate(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.refused = true;
            s.next = None;
        }
    }
}

enum PrefaultJob {
    Populate(Arc<Segment>, u64),
    Prepare(Arc<Preparer>),
}

/// Body of the prefault thread: ends when the log closes. When the kernel refuses the
/// advice (older than Linux 5.14) appends fault their own pages, and the thread only
/// prepares segment files.
fn run_prefault(prefault: Arc<Prefault>) {
    while let Some(job) = prefault.next() {
        match job {
            PrefaultJob::Populate(seg, ahead) => {
                if !seg.prefault_ahead(ahead) {
                    prefault.refuse_populate();
                }
            }
            PrefaultJob::Prepare(preparer) => preparer.run_job(),
        }
    }
}

/// Body of the group-commit thread. Holds only a weak reference, so dropping the last
/// `Log` handle ends it.
/// `gather` false: never wait for more appends before a sync (`LogConfig::gather`).
/// `lazy`: appends do not wake the thread, it syncs that long after the first one (or
/// when a waiter asks; `LogConfig::lazy_sync`).
pub(crate) fn run(
    log: Weak<Inner>,
    signal: Arc<SyncSignal>,
    interval: Option<Duration>,
    gather_appends: bool,
    lazy: Option<Duration>,
) {
    if let Some(delay) = lazy {
        while signal.wait_lazy(delay) {
            let Some(inner) = log.upgrade() else { return };
            if inner.sync_round().is_err() {
                return;
            }
        }
        return;
    }
    let mut last: Option<SyncRound> = None;
    loop {
        // Gather before sleeping: the appenders of a round that covered several are about
        // to append again, and the first of them should not have to wake this thread.
        if let (Some(round), Some(inner)) = (&last, log.upgrade()) {
            if gather_appends && round.covered > 1 && interval.is_none() {
                gather(&inner.stats().records_appended, round);
            }
        }
        if !signal.wait(interval) {
            return;
        }
        let Some(inner) = log.upgrade() else { return };
        match inner.sync_round() {
            Ok(round) => last = Some(round),
            Err(_) => return,
        }
    }
}

/// Longest a sync waits for more appends once the first one arrived.
pub const GATHER_MAX: Duration = Duration::from_micros(200);
/// A sync stops waiting once no append arrived for this long.
pub const GATHER_QUIET: Duration = Duration::from_micros(30);
/// Longest the thread waits, spinning, for the first append after a round before it
/// sleeps until one wakes it.
pub const GATHER_FIRST_MAX: Duration = Duration::from_micros(200);

/// When the previous sync covered several records, their appenders are about to append
/// again (each was waiting for that sync): wait until as many appends as it covered are in
/// (appends that arrived during the sync count), so the next sync covers all of them
/// instead of the first alone — or until appends stop arriving for [`GATHER_QUIET`], or
/// [`GATHER_MAX`] after the first one. Starts right after the publication, so the thread
/// is not asleep when the first append comes (a wake-up costs tens of µs). A lone appender
/// (last round of one) never waits.
fn gather(appended: &AtomicU64, last: &SyncRound) {
    let pending = || {
        appended
            .load(Ordering::Relaxed)
            .saturating_sub(last.appended)
    };
    let started = Instant::now();
    let mut seen = pending();
    let mut first: Option<Instant> = (seen > 0).then_some(started);
    let mut last_change = started;
    while seen < last.covered {
        // Yield rather than sleep: a sleep's timer slack (~50 µs) costs more than it
        // saves, and yielding hands the core to the appenders being woken.
        std::thread::yield_now();
        let now = pending();
        let at = Instant::now();
        if now != seen {
            seen = now;
            last_change = at;
            first.get_or_insert(at);
        }
        let done = match first {
            None => at.duration_since(started) >= GATHER_FIRST_MAX,
            Some(first) => {
                at.duration_since(last_change) >= GATHER_QUIET
                    || at.duration_since(first) >= GATHER_MAX
            }
        };
        if done {
            return;
        }
    }
}
