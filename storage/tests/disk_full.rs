//! Goal: a full disk is a retryable condition, not a crash or a corruption: appends fail
//! with `StorageError::DiskFull` once a new segment cannot be preallocated, everything
//! durable before stays readable, no half-created segment is left behind, and appends work
//! again once space is freed.
//!
//! Method: mount a 2 MiB tmpfs (needs root and a container that allows `mount`; otherwise
//! the test prints why it is skipped and passes), put a filler file and a log with 256 KiB
//! segments on it, append until the file system is full, then delete the filler.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use entrepot_storage::{Log, LogConfig, StorageError, SyncPolicy};

const FILLER_BYTES: usize = 512 * 1024;
const RECORD_BYTES: usize = 4096;

/// A size-limited tmpfs, unmounted when dropped (also when the test panics).
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Result<SmallFs, String> {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(SmallFs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let out = Command::new("umount").arg(self.dir.path()).output();
        if !out.is_ok_and(|o| o.status.success()) {
            eprintln!("warning: could not unmount {}", self.dir.path().display());
        }
    }
}

fn payload(i: u64) -> Vec<u8> {
    (0..RECORD_BYTES)
        .map(|j| (i as usize * 17 + j) as u8)
        .collect()
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 256 * 1024,
        record_bytes_max: 64 * 1024,
        sync: SyncPolicy::Always,
        ..LogConfig::default()
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn check_all(log: &Log, durable: u64) {
    for i in 0..durable {
        assert_eq!(log.read(i).unwrap().payload, payload(i), "record {i}");
    }
}

/// Appends until the first error; returns how many records became durable and the error.
async fn fill(log: &Log, from: u64) -> (u64, StorageError) {
    let mut next = from;
    for _ in 0..10_000 {
        match log.append(&payload(next)) {
            Ok(a) => {
                assert_eq!(a.first, next);
                a.durable
                    .wait()
                    .await
                    .unwrap_or_else(|e| panic!("sync of record {next} failed: {e}"));
                next += 1;
            }
            Err(e) => return (next, e),
        }
    }
    panic!("the file system never filled up");
}

#[tokio::test]
async fn full_disk_refuses_appends_keeps_data_and_recovers_when_space_is_freed() {
    let fs_guard = match SmallFs::mount("2m") {
        Ok(m) => m,
        Err(reason) => {
            println!("skipped: cannot create a size-limited file system: {reason}");
            return;
        }
    };
    let filler: PathBuf = fs_guard.path().join("filler");
    fs::write(&filler, vec![0xAAu8; FILLER_BYTES]).unwrap();
    let dir = fs_guard.path().join("log");
    let log = Log::open(&dir, config()).unwrap();

    let (durable, err) = fill(&log, 0).await;
    assert!(
        matches!(err, StorageError::DiskFull { .. }),
        "expected DiskFull, got {err}"
    );
    assert!(durable > 100, "only {durable} records fit");
    assert!(!err.is_fatal());
    println!(
        "disk full after {durable} records in {} segments: {err}",
        log.segments().len()
    );

    // No partial segment: every .seg file on disk is a segment of the log, no temporaries.
    let files = names(&dir);
    assert!(files.iter().all(|n| !n.ends_with(".tmp")), "{files:?}");
    assert_eq!(
        files.iter().filter(|n| n.ends_with(".seg")).count(),
        log.segments().len(),
        "{files:?}"
    );
    check_all(&log, durable);
    assert!(
        matches!(
            log.append(&payload(durable)),
            Err(StorageError::DiskFull { .. })
        ),
        "still full, still retryable"
    );

    fs::remove_file(&filler).unwrap();
    let (more, err) = fill(&log, durable).await;
    assert!(
        more > durable + 50,
        "appends resume after space is freed ({durable} → {more})"
    );
    assert!(matches!(err, StorageError::DiskFull { .. }), "{err}");
    check_all(&log, more);
    drop(log);

    let log = Log::open(&dir, config()).unwrap();
    assert_eq!(log.next_offset(), more);
    check_all(&log, more);
    drop(log);
    drop(fs_guard);
}

/// Sealing a segment also writes its index files. When the new segment took the last free
/// block, those small writes fail — that must not poison the log, because index files are
/// a cache rebuilt on open.
#[tokio::test]
async fn index_files_that_do_not_fit_do_not_poison_the_log() {
    let fs_guard = match SmallFs::mount("2m") {
        Ok(m) => m,
        Err(reason) => {
            println!("skipped: cannot create a size-limited file system: {reason}");
            return;
        }
    };
    let reserve = fs_guard.path().join("reserve");
    fs::write(&reserve, vec![0x55u8; config().segment_bytes as usize]).unwrap();
    let dir = fs_guard.path().join("log");
    let log = Log::open(&dir, config()).unwrap();
    let (durable, err) = fill(&log, 0).await;
    assert!(matches!(err, StorageError::DiskFull { .. }), "{err}");
    // Take every block that is left, then free exactly one segment's worth.
    for i in 0.. {
        if fs::write(fs_guard.path().join(format!("crumb{i}")), [0u8; 4096]).is_err() {
            break;
        }
    }
    fs::remove_file(&reserve).unwrap();

    let appended = log
        .append(&payload(durable))
        .expect("a new segment fits in the freed space");
    appended
        .durable
        .wait()
        .await
        .expect("the record is durable even though index files could not be written");
    check_all(&log, durable + 1);
    drop(log);
    let log = Log::open(&dir, config()).unwrap();
    check_all(&log, durable + 1);
}
