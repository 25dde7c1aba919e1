//! CPU time of another process (the broker under test), from `/proc/<pid>/stat`: utime +
//! stime, in clock ticks of `sysconf(_SC_CLK_TCK)`. Per message, this is the figure that
//! holds on a noisy machine, where rates do not.

use std::time::Duration;

use anyhow::{bail, Context};

/// utime + stime of a process at one moment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessCpu(Duration);

impl ProcessCpu {
    /// Reads the process's CPU time so far.
    pub fn read(pid: u32) -> anyhow::Result<ProcessCpu> {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // The command name (field 2) may hold spaces and parentheses: fields are counted
        // after its closing parenthesis, where field 3 (state) starts.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            bail!("{path}: no command field");
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15: indexes 11 and 12 after field 2.
        let ticks = |i: usize| -> anyhow::Result<u64> {
            fields
                .get(i)
                .with_context(|| format!("{path}: field {} missing", i + 3))?
                .parse::<u64>()
                .with_context(|| format!("{path}: field {} not a number", i + 3))
        };
        let total = ticks(11)? + ticks(12)?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let hz = u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
        Ok(ProcessCpu(Duration::from_nanos(total * 1_000_000_000 / hz)))
    }

    /// CPU time used between `earlier` and this reading.
    pub fn since(&self, earlier: &ProcessCpu) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_grows_with_work() {
        // Spins until the reading shows 20 ms of CPU, bounded in wall time: on a loaded
        // machine 60 ms of wall time may hold far less CPU (this failed once at 10 ms).
        let me = std::process::id();
        let before = ProcessCpu::read(me).unwrap();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        let mut used = Duration::ZERO;
        while used < Duration::from_millis(20) && started.elapsed() < Duration::from_secs(20) {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            used = ProcessCpu::read(me).unwrap().since(&before);
        }
        std::hint::black_box(x);
        assert!(
            used >= Duration::from_millis(20),
            "used {used:?} in {:?}",
            started.elapsed()
        );
    }
}
