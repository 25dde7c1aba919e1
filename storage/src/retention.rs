//! Retention of a topic's log by size and by age: whole sealed segments are deleted from
//! the oldest on while the log is over its byte limit or their last record is too old.
//! The active segment is never deleted.

use std::time::Duration;

use crate::error::Result;
use crate::log::Log;

/// Limits a log is trimmed to; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub bytes_max: Option<u64>,
    pub age_max: Option<Duration>,
}

impl Log {
    /// Deletes the oldest sealed segments while the log is over `retention` (total bytes, or
    /// age of a segment's newest record at `now_ms`). Returns the number deleted.
    pub fn apply_retention(&self, retention: Retention, now_ms: i64) -> Result<usize> {
        let spans = self.segments();
        let mut total: u64 = spans.iter().map(|s| s.bytes).sum();
        let mut deleted = 0;
        for span in spans.iter().filter(|s| s.sealed) {
            let too_big = retention.bytes_max.is_some_and(|max| total > max);
            let too_old = retention
                .age_max
                .is_some_and(|age| span.last_timestamp_ms < now_ms - age.as_millis() as i64);
            if !(too_big || too_old) {
                break;
            }
            if self.delete_segment(span.base)? {
                total -= span.bytes;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}
