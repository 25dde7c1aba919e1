//! This process's resident memory, threads and CPU time, from /proc/self: the figures the
//! cluster benches (`idle_groups`, `group_wake`) report; and giving free heap back to the
//! OS before reading what stopped groups keep. Linux (glibc) only.

use std::time::{Duration, Instant};

/// VmRSS in KiB and Threads, from /proc/self/status (0 when unreadable).
pub fn rss_and_threads() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("Threads:"))
}

/// utime + stime of this process, in clock ticks (100 per second on Linux).
pub fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat; `after` starts at field 3.
    num(11) + num(12)
}

/// Share of one core this process used over `secs` seconds of idling.
pub async fn idle_cpu_percent(secs: u64) -> f64 {
    let before = cpu_ticks();
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let ticks = cpu_ticks() - before;
    ticks as f64 / 100.0 / start.elapsed().as_secs_f64() * 100.0
}

/// glibc's `malloc_trim`: returns free heap pages to the OS, so resident memory shows
/// what is held, not the allocator's cache.
pub fn release_free_heap() {
    extern "C" {
        fn malloc_trim(pad: usize) -> i32;
    }
    // SAFETY: glibc's malloc_trim takes no pointers and may be called at any time; these
    // benches are built for Linux with glibc only (as the broker's release image's builder).
    unsafe {
        malloc_trim(0);
    }
}
