//! openraft's runtime: tokio, with the one random draw openraft makes — each election
//! timeout, `Config::new_rand_election_timeout` through `AsyncRuntime::thread_rng` — taken
//! from a per-thread generator that a simulation can seed.
//!
//! openraft's own `TokioRuntime` draws from `rand::thread_rng()`, seeded from the OS:
//! two runs of one simulation seed then elect differently, and everything downstream
//! (which node a fault aimed at "the leader" hits, how many RPCs draw from the simulated
//! network's generator) diverges, so a failing seed does not replay exactly.
//! [`SeededTokio`] is `TokioRuntime` in every other respect (spawn, sleep, timeouts,
//! oneshots are tokio's).
//!
//! # Invariants
//! * Outside a simulation nothing changes in substance: each thread's generator is
//!   seeded once from the process's hash-map randomness (itself from the OS), so two
//!   nodes, or two threads of one node, draw independent timeouts.
//! * [`seed_thread_rng`] makes the calling thread's draws a pure function of the seed
//!   until the next call: on a current-thread runtime (the simulation's), every election
//!   timeout of every node in the process comes from that one sequence, in the order
//!   openraft asks for them.
//! * The generator is SplitMix64: enough spread for election jitter; it is no source of
//!   secrets and nothing else draws from it.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use openraft::async_runtime::TokioOneShotSender;
use openraft::{AsyncRuntime, OptionalSend, TokioInstant};

thread_local! {
    /// This thread's generator state; `None` until first used or seeded.
    static STATE: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Makes this thread's election-timeout draws a pure function of `seed` from now on (the
/// simulation calls it at the start of each seed).
pub fn seed_thread_rng(seed: u64) {
    STATE.with(|s| s.set(Some(seed)));
}

/// A seed from the process's hash-map keys (random per process and per call).
fn entropy() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish()
}

/// The next SplitMix64 output of this thread's generator.
fn next() -> u64 {
    STATE.with(|s| {
        let state = s
            .get()
            .unwrap_or_else(entropy)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(Some(state));
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A handle on this thread's generator (what `AsyncRuntime::thread_rng` returns).
#[derive(Debug, Clone, Copy, Default)]
pub struct ThreadRng;

impl rand_core::RngCore for ThreadRng {
    fn next_u32(&mut self) -> u32 {
        (next() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        next()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        rand_core::impls::fill_bytes_via_next(self, dest)
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// tokio, with election timeouts drawn from [`ThreadRng`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SeededTokio;

impl AsyncRuntime for SeededTokio {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = ThreadRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        ThreadRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(tx), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::RngCore;

    #[test]
    fn a_seeded_thread_draws_the_same_sequence_again() {
        seed_thread_rng(42);
        let a: Vec<u64> = (0..8).map(|_| ThreadRng.next_u64()).collect();
        seed_thread_rng(42);
        let b: Vec<u64> = (0..8).map(|_| ThreadRng.next_u64()).collect();
        assert_eq!(a, b);
        seed_thread_rng(43);
        let c: Vec<u64> = (0..8).map(|_| ThreadRng.next_u64()).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn election_timeouts_follow_the_seed_and_stay_in_range() {
        let config = openraft::Config {
            election_timeout_min: 150,
            election_timeout_max: 300,
            ..Default::default()
        };
        seed_thread_rng(7);
        let a: Vec<u64> = (0..16)
            .map(|_| config.new_rand_election_timeout::<SeededTokio>())
            .collect();
        seed_thread_rng(7);
        let b: Vec<u64> = (0..16)
            .map(|_| config.new_rand_election_timeout::<SeededTokio>())
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|t| (150..300).contains(t)), "{a:?}");
        assert!(a.iter().any(|t| *t != a[0]), "no spread: {a:?}");
    }

    #[test]
    fn unseeded_threads_draw_differently() {
        let draw = || std::thread::spawn(|| ThreadRng.next_u64()).join().unwrap();
        assert_ne!(draw(), draw());
    }
}
