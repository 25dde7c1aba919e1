//! Goal: a sealed segment does not stay in the process's resident memory (issue 15's
//! peak-RSS goal for large messages), and its records read back unchanged afterwards.
//!
//! Method: a real log with 1 MiB segments and policy `Always`; append until three
//! segments are sealed, flush, then read this process's own `/proc/self/smaps` for each
//! segment file's mapping: a sealed one keeps at most a few pages resident (its header,
//! written by the seal), the active one holds what was just written. Every record then
//! reads back byte for byte (faulted back in from the file), and the periodic
//! `Log::release_resident` drops the pages the reads mapped again.

use std::path::Path;

use entrepot_storage::{Log, LogConfig, SyncPolicy};

const SEGMENT_BYTES: u64 = 1024 * 1024;
const PAYLOAD_LEN: usize = 16 * 1024;
/// Most resident KiB a sealed segment's mapping may keep: its header page, and the pages
/// a look at its last record maps (`Log::segments` reads its timestamp; the kernel's
/// fault-around maps up to 64 KiB around a faulting page). Unreleased, it keeps 1 MiB.
const SEALED_RESIDENT_MAX_KIB: u64 = 160;

fn payload(i: u64) -> Vec<u8> {
    (0..PAYLOAD_LEN)
        .map(|j| (i as usize * 31 + j * 7 + 1) as u8)
        .collect()
}

/// Resident KiB of this process's mapping of `file`, from /proc/self/smaps.
fn resident_kib(file: &Path) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let name = file.to_str()?;
    let mut lines = smaps.lines();
    while let Some(line) = lines.next() {
        if !line.ends_with(name) {
            continue;
        }
        for field in lines.by_ref() {
            if let Some(rest) = field.strip_prefix("Rss:") {
                return rest.trim().trim_end_matches("kB").trim().parse().ok();
            }
        }
    }
    None
}

/// Reads every record and checks it byte for byte (faulting released pages back in).
fn read_back_all(log: &Log) {
    for r in log.reader(0) {
        let r = r.unwrap();
        assert_eq!(
            &r.payload[..],
            &payload(r.offset)[..],
            "record {}",
            r.offset
        );
    }
}

#[test]
fn sealed_segments_leave_resident_memory_and_still_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: SEGMENT_BYTES,
        record_bytes_max: 64 * 1024,
        sync: SyncPolicy::Always,
        ..LogConfig::default()
    };
    let log = Log::open(dir.path(), config).unwrap();
    let mut n = 0;
    while log.segments().len() < 4 {
        log.append(&payload(n)).unwrap();
        n += 1;
        assert!(n < 10_000, "segments never rolled: {:?}", log.segments());
    }
    // The sync seals every rolled segment.
    log.flush().unwrap();
    assert_eq!(
        log.segments().iter().filter(|s| s.sealed).count(),
        3,
        "{:?}",
        log.segments()
    );
    let segments = log.segments();
    let path_of = |base: u64| dir.path().join(format!("{base:020}.seg"));
    for span in &segments {
        let rss = resident_kib(&path_of(span.base))
            .unwrap_or_else(|| panic!("no mapping of segment {} in smaps", span.base));
        if span.sealed {
            assert!(
                rss <= SEALED_RESIDENT_MAX_KIB,
                "sealed segment {} keeps {rss} KiB resident",
                span.base
            );
        } else {
            assert!(
                rss >= (PAYLOAD_LEN / 1024) as u64,
                "active segment: {rss} KiB"
            );
        }
    }
    read_back_all(&log);
    assert_eq!(log.next_offset(), n);
    // Reading faulted the sealed pages back in; the periodic release drops them again.
    let read_back = resident_kib(&path_of(segments[0].base)).unwrap_or(0);
    assert!(
        read_back > SEALED_RESIDENT_MAX_KIB,
        "reading maps pages: {read_back} KiB"
    );
    log.release_resident();
    for span in segments.iter().filter(|s| s.sealed) {
        let rss = resident_kib(&path_of(span.base)).unwrap_or(0);
        assert!(
            rss <= SEALED_RESIDENT_MAX_KIB,
            "sealed segment {} keeps {rss} KiB resident after release_resident",
            span.base
        );
    }
}

#[test]
fn an_active_segment_keeps_only_its_synced_tail_resident() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 32 * SEGMENT_BYTES,
        record_bytes_max: 64 * 1024,
        sync: SyncPolicy::Always,
        ..LogConfig::default()
    };
    let log = Log::open(dir.path(), config).unwrap();
    // 12 MiB into a 32 MiB segment, synced as it goes.
    let records = 12 * SEGMENT_BYTES / PAYLOAD_LEN as u64;
    for i in 0..records {
        log.append(&payload(i)).unwrap();
        if i % 64 == 0 {
            log.flush().unwrap();
        }
    }
    log.flush().unwrap();
    let spans = log.segments();
    assert_eq!(spans.len(), 1, "still one active segment: {spans:?}");
    let rss = resident_kib(&dir.path().join(format!("{:020}.seg", spans[0].base)))
        .expect("the active segment is mapped");
    let most = (entrepot_storage::RESIDENT_TAIL_BYTES + 2 * SEGMENT_BYTES) / 1024;
    assert!(
        rss <= most,
        "active segment keeps {rss} KiB resident after 12 MiB written (at most {most})"
    );
    read_back_all(&log);
}
