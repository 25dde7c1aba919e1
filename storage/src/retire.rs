//! Releasing deleted segments off the caller's path: one process-wide thread drops them.
//!
//! Dropping the last handle of a deleted segment unmaps it and closes its file, and the
//! close of an unlinked file is when the kernel evicts its page cache and frees its
//! blocks: for a 128 MiB segment that `close` took 122 ms under `strace -T`, and the drop
//! took 89–152 ms in the `roll_latency` bench (issue 15, `benches/RESULTS.md`). Done where
//! the log deleted the segment, it ran under the log's `io` lock, so the group-commit
//! thread — and every appender waiting for durability — waited behind it: the latency
//! tail attributed to the segment roll (a roll is followed within one housekeeping period
//! by the reclaim of the fully acknowledged segment it closed).
//!
//! Invariants:
//! * A segment handed to [`retire`] is already unlinked and out of the log's map: no
//!   append, sync, seal or reader lookup reaches it again. Payload `Bytes` a reader still
//!   holds own the mapping on their own (see `segment.rs`), so the release never changes a
//!   byte anyone reads.
//! * Space comes back late, not never: the blocks are free once the thread dropped the
//!   segment (or the last reader let go of it). [`wait_idle`] waits for that, bounded, and
//!   a roll that finds no space calls it before it gives up (see `log.rs`).
//! * At most [`RETIRE_QUEUE_MAX`] segments wait; past it, or if the thread cannot start,
//!   the caller drops the segment itself (after releasing its locks, as before the queue).
//!
//! Does not delete files or decide what to delete: the log unlinks before handing over.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::segment::Segment;

/// Most deleted segments waiting for the thread; a caller past it releases its own.
pub const RETIRE_QUEUE_MAX: usize = 64;
/// Longest a roll that found no disk space waits for released segments before it reports
/// the disk full (releasing a 128 MiB segment took 0.1 s on the loaded test machine).
pub const RETIRE_WAIT_MAX: Duration = Duration::from_secs(2);

/// Segments handed over and not yet dropped, with a condvar for [`wait_idle`].
struct Pending {
    count: Mutex<usize>,
    idle: Condvar,
}

struct Retirer {
    tx: SyncSender<Arc<Segment>>,
    pending: Arc<Pending>,
}

static RETIRER: OnceLock<Option<Retirer>> = OnceLock::new();

fn retirer() -> Option<&'static Retirer> {
    RETIRER
        .get_or_init(|| {
            let (tx, rx) = sync_channel::<Arc<Segment>>(RETIRE_QUEUE_MAX);
            let pending = Arc::new(Pending {
                count: Mutex::new(0),
                idle: Condvar::new(),
            });
            let shared = Arc::clone(&pending);
            let spawned = std::thread::Builder::new()
                .name("entrepot-retire".into())
                .spawn(move || {
                    for seg in rx {
                        #[cfg(feature = "crash-sim")]
                        crate::crash_sim::before_release();
                        drop(seg);
                        if let Ok(mut n) = shared.count.lock() {
                            *n = n.saturating_sub(1);
                            if *n == 0 {
                                shared.idle.notify_all();
                            }
                        }
                    }
                });
            match spawned {
                Ok(_) => Some(Retirer { tx, pending }),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the segment release thread, deleting callers release segments themselves");
                    None
                }
            }
        })
        .as_ref()
}

/// Hands a deleted segment to the release thread (does not wait). Call it after releasing
/// the log's locks: when the queue is full (or there is no thread) the segment is dropped
/// here, by the caller.
pub(crate) fn retire(seg: Arc<Segment>) {
    let Some(r) = retirer() else {
        drop(seg);
        return;
    };
    if let Ok(mut n) = r.pending.count.lock() {
        *n += 1;
    }
    match r.tx.try_send(seg) {
        Ok(()) => {}
        Err(TrySendError::Full(seg) | TrySendError::Disconnected(seg)) => {
            if let Ok(mut n) = r.pending.count.lock() {
                *n = n.saturating_sub(1);
            }
            drop(seg);
        }
    }
}

/// Waits until every segment handed over so far is dropped, at most `timeout`; returns
/// whether none is left. For a caller about to give up for lack of disk space.
pub(crate) fn wait_idle(timeout: Duration) -> bool {
    let Some(r) = retirer() else { return true };
    let deadline = Instant::now() + timeout;
    let Ok(mut n) = r.pending.count.lock() else {
        return false;
    };
    while *n > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        n = match r.pending.idle.wait_timeout(n, left) {
            Ok((g, _)) => g,
            Err(_) => return false,
        };
    }
    true
}

/// True when segments handed over are still waiting to be dropped.
pub(crate) fn is_busy() -> bool {
    RETIRER
        .get()
        .and_then(|r| r.as_ref())
        .and_then(|r| r.pending.count.lock().ok().map(|n| *n > 0))
        .unwrap_or(false)
}
