//! Raft snapshots of a deep backlog: what sending and installing one costs.
//!
//! A store (real files under `target/`, sync `never`: the bench measures the snapshot
//! paths, not fsync) holds `LIVE` unacknowledged 1 KiB messages and as many acknowledged
//! ones interleaved. Three cases, each reporting bytes of snapshot per second:
//! * `source` — index the live records (`StoreSource::new`), what a leader does before it
//!   sends a snapshot; throughput is the snapshot's size over that time;
//! * `read` — generate the whole wire snapshot in openraft's 3 MiB chunks from the source
//!   (`Bytes` slices of the mapping: the sender's path);
//! * `install` — a follower's install of the received file (`install_from`: check, then
//!   rewrite the records at their offsets), into a fresh store each iteration.
//!
//! Compare with the machine's sequential read (storage bench, ~9 GiB/s) and buffered write
//! bandwidth; the old design copied the whole backlog into one buffer and a file on every
//! snapshot build.

use std::io::Write;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use entrepot::broker::store::Store;
use entrepot::raft::snapshot::{install_from, StoreSource, StoreState};
use entrepot_cluster::SnapshotSource;
use entrepot_storage::SyncPolicy;

/// Unacknowledged messages in the store (as many acknowledged ones sit between them).
const LIVE: u64 = 50_000;
const BODY: usize = 1024;
/// openraft's default snapshot chunk.
const CHUNK: usize = 3 << 20;
const SEGMENT_BYTES: u64 = 64 << 20;
const RECORD_MAX: u32 = 1 << 20;

fn store_dir(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    dir
}

fn bench(c: &mut Criterion) {
    let dir = store_dir("snapshot-bench-source");
    let (log, acks) =
        Store::open_parts(&dir, SyncPolicy::Never, SEGMENT_BYTES, RECORD_MAX).expect("store");
    let body = vec![0x5a; BODY];
    let mut acked = Vec::new();
    for i in 0..LIVE * 2 {
        log.append_view(0, &[&body]).expect("append");
        if i % 2 == 1 {
            acked.push(i);
        }
    }
    for chunk in acked.chunks(4096) {
        acks.ack(chunk).expect("ack");
    }
    let state = StoreState::capture(&acks, &dir, LIVE * 2).expect("state");
    let source = StoreSource::new(&state, &log, &acks).expect("source");
    let size = source.len();
    eprintln!(
        "snapshot of {} live records: {:.1} MiB on the wire, {} bytes persisted",
        source.records(),
        size as f64 / (1 << 20) as f64,
        state.encode().len()
    );
    let wire = dir.join("wire");
    std::fs::File::create(&wire)
        .and_then(|mut f| f.write_all(&source.read_all()))
        .expect("wire file");

    let mut group = c.benchmark_group("snapshot");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Bytes(size));
    group.bench_function("source", |b| {
        b.iter(|| StoreSource::new(&state, &log, &acks).expect("source"))
    });
    group.bench_function("read", |b| {
        let mut buf = vec![0u8; CHUNK];
        b.iter(|| {
            let mut pos = 0u64;
            while pos < size {
                let mut filled = 0;
                while filled < CHUNK {
                    let n = source.read_at(pos + filled as u64, &mut buf[filled..]);
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                pos += filled as u64;
            }
            pos
        })
    });
    group.bench_function("install", |b| {
        let target = store_dir("snapshot-bench-install");
        b.iter_batched(
            || {
                let _ = std::fs::remove_dir_all(&target);
                std::fs::create_dir_all(&target).expect("install dir");
                Store::open_parts(&target, SyncPolicy::Never, SEGMENT_BYTES, RECORD_MAX)
                    .expect("fresh store")
            },
            |(log, acks)| {
                let file = std::fs::File::open(&wire).expect("wire file");
                install_from(file, &log, &acks, &target).expect("install")
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
