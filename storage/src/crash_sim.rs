//! A simulated power cut, and injected sync failures, for tests (feature `crash-sim`).
//!
//! A process crash keeps the page cache, so killing a process never tests that a log waits
//! for the disk. This module keeps, beside the real files of a directory tree, the image
//! a power cut would leave: every sync that goes through [`crate::fsync`] under an
//! installed root copies the bytes it made durable into a shadow image of that file (keyed
//! by device, inode and birth time, so renames follow the file), and every directory sync
//! records which names pointed at which file. [`CrashSim::crash_into`] then freezes the
//! tree — every later sync under the root fails, so nothing completes after the cut — and
//! writes the crashed tree into another directory:
//!
//! * a byte whose current value is the value its last sync saw is durable and kept;
//! * any other byte was written after its last sync: per 4 KiB page, chosen by a seeded
//!   generator, the page keeps its old bytes, takes the new ones, is torn between the two
//!   at a random point, or turns to garbage (old ≠ new bytes only);
//! * a name created, renamed or unlinked since its directory's last sync may or may not
//!   have reached the disk: seeded, the old or the new entry survives (an unlinked file
//!   may come back, from its durable image); a file whose size changed since its last
//!   sync keeps either size;
//! * directories under the root that were never synced through this crate (the broker's
//!   own files) are copied as they are and listed in [`CrashReport::unmodelled`].
//!
//! The same seam injects failures: [`CrashSim::inject`] makes the next syncs return EIO or
//! ENOSPC, or stall before they run; [`CrashSim::set_disk_full`] makes every preallocation
//! of a new segment under the root fail with ENOSPC, as a full file system does (what is
//! preallocated already is still written); and [`hold_releases_for`] makes the release of
//! deleted segments (`retire.rs`) come late.
//!
//! Not a file system: writes through the mapping are not seen one by one, only their
//! result at the crash, and nothing here is compiled into a production build.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// Granularity of torn writes: one page.
pub const PAGE_BYTES: usize = 4096;
/// Deepest directory tree a crash walks (the logs are two levels down).
const MAX_DEPTH: usize = 8;

/// What the next sync under a root does instead of succeeding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncFault {
    /// The sync returns EIO (the device failed the write-back).
    Eio,
    /// The sync returns ENOSPC (a thin-provisioned or network disk ran out of blocks).
    Enospc,
    /// The sync waits this long, then runs.
    Stall(Duration),
}

/// What a simulated power cut did to the tree.
#[derive(Debug, Default, Clone)]
pub struct CrashReport {
    /// Files written into the crashed tree.
    pub files: usize,
    /// Successful syncs recorded before the cut.
    pub syncs: u64,
    /// Pages with bytes written after their last sync, by what the cut left of them.
    pub pages_old: u64,
    pub pages_new: u64,
    pub pages_torn: u64,
    pub pages_garbage: u64,
    /// Directory entries changed since the last directory sync, by which side survived.
    pub entries_old: u64,
    pub entries_new: u64,
    /// Directories copied as they are: nothing in them was synced through this crate.
    pub unmodelled: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    born_ns: i128,
}

impl FileKey {
    fn of(meta: &fs::Metadata) -> FileKey {
        let born_ns = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i128);
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            born_ns,
        }
    }
}

/// The bytes of one file as its last syncs left them; zeros past `data`.
#[derive(Debug, Default, Clone)]
struct Image {
    data: Vec<u8>,
    len: u64,
}

impl Image {
    fn byte(&self, at: usize) -> u8 {
        self.data.get(at).copied().unwrap_or(0)
    }
}

#[derive(Debug, Default)]
struct State {
    crashed: bool,
    /// Preallocations fail with ENOSPC ([`CrashSim::set_disk_full`]).
    disk_full: bool,
    faults: VecDeque<SyncFault>,
    images: HashMap<FileKey, Image>,
    /// Durable entries (regular files) of each directory synced under the root.
    dirs: HashMap<PathBuf, BTreeMap<OsString, FileKey>>,
    syncs: u64,
}

/// A directory tree whose syncs are recorded, and which can lose power.
#[derive(Debug)]
pub struct CrashSim {
    root: PathBuf,
    state: Mutex<State>,
}

static REGISTRY: Mutex<Vec<Weak<CrashSim>>> = Mutex::new(Vec::new());

fn lock_registry() -> MutexGuard<'static, Vec<Weak<CrashSim>>> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

fn sim_for(path: &Path) -> Option<Arc<CrashSim>> {
    let mut sims = lock_registry();
    sims.retain(|w| w.strong_count() > 0);
    sims.iter()
        .filter_map(Weak::upgrade)
        .find(|s| path.starts_with(&s.root))
}

/// Held while the segment release thread (`retire.rs`) must not release anything.
static RELEASE_HOLD: Mutex<()> = Mutex::new(());

/// Holds the segment release thread for `hold` (at most [`RELEASE_HOLD_MAX`]): segments
/// deleted meanwhile keep their blocks until it ends, as when the thread is busy releasing
/// a large segment of another log. Returns once the hold is in place.
pub fn hold_releases_for(hold: Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _held = RELEASE_HOLD.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(());
        std::thread::sleep(hold.min(RELEASE_HOLD_MAX));
    });
    let _ = rx.recv();
}

/// Longest [`hold_releases_for`] holds the release thread.
pub const RELEASE_HOLD_MAX: Duration = Duration::from_secs(1);

/// Called by the release thread before each release: waits while a test holds it.
pub(crate) fn before_release() {
    drop(RELEASE_HOLD.lock().unwrap_or_else(|p| p.into_inner()));
}

fn power_lost() -> io::Error {
    io::Error::other("simulated power loss: the disk is gone")
}

/// Called before every sync: the injected fault, if any. Errors once the tree crashed.
pub(crate) fn before_sync(path: &Path) -> io::Result<()> {
    let Some(sim) = sim_for(path) else {
        return Ok(());
    };
    let fault = {
        let mut state = sim.lock();
        if state.crashed {
            return Err(power_lost());
        }
        state.faults.pop_front()
    };
    match fault {
        None => Ok(()),
        Some(SyncFault::Eio) => Err(io::Error::from_raw_os_error(libc::EIO)),
        Some(SyncFault::Enospc) => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        Some(SyncFault::Stall(d)) => {
            std::thread::sleep(d);
            Ok(())
        }
    }
}

/// Called before a new file's blocks are preallocated: ENOSPC while the tree's disk is
/// full ([`CrashSim::set_disk_full`]).
pub(crate) fn before_allocate(path: &Path) -> io::Result<()> {
    match sim_for(path) {
        Some(sim) if sim.lock().disk_full => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        _ => Ok(()),
    }
}

/// Called after a successful range sync: `bytes` at `from` of `file` are durable.
pub(crate) fn synced_range(file: &File, path: &Path, from: u64, bytes: &[u8]) -> io::Result<()> {
    let Some(sim) = sim_for(path) else {
        return Ok(());
    };
    let key = FileKey::of(&file.metadata()?);
    let mut state = sim.lock();
    if state.crashed {
        return Err(power_lost());
    }
    let image = state.images.entry(key).or_default();
    let (start, end) = (from as usize, from as usize + bytes.len());
    if image.data.len() < end {
        image.data.resize(end, 0);
    }
    image.data[start..end].copy_from_slice(bytes);
    image.len = image.len.max(end as u64);
    state.syncs += 1;
    Ok(())
}

/// Called after a successful whole-file sync: the file's bytes and size are durable.
pub(crate) fn synced_file(file: &File, path: &Path) -> io::Result<()> {
    let Some(sim) = sim_for(path) else {
        return Ok(());
    };
    let meta = file.metadata()?;
    let image = image_of(&fs::read(path)?, meta.len());
    let mut state = sim.lock();
    if state.crashed {
        return Err(power_lost());
    }
    state.images.insert(FileKey::of(&meta), image);
    state.syncs += 1;
    Ok(())
}

/// Called after a successful directory sync: its entries are durable.
pub(crate) fn synced_dir(dir: &Path) -> io::Result<()> {
    let Some(sim) = sim_for(dir) else {
        return Ok(());
    };
    let entries = list_files(dir)?;
    let mut state = sim.lock();
    if state.crashed {
        return Err(power_lost());
    }
    let durable = entries.into_iter().map(|(n, (k, _))| (n, k)).collect();
    state.dirs.insert(dir.to_path_buf(), durable);
    state.syncs += 1;
    Ok(())
}

fn image_of(bytes: &[u8], len: u64) -> Image {
    let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    Image {
        data: bytes[..used].to_vec(),
        len,
    }
}

/// Regular files of `dir`: name → (identity, path).
fn list_files(dir: &Path) -> io::Result<BTreeMap<OsString, (FileKey, PathBuf)>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => {
                out.insert(entry.file_name(), (FileKey::of(&meta), path));
            }
            _ => {}
        }
    }
    Ok(out)
}

fn list_dirs(root: &Path) -> Vec<PathBuf> {
    let mut found = vec![root.to_path_buf()];
    let mut next = 0;
    while next < found.len() {
        let dir = found[next].clone();
        next += 1;
        if dir.components().count() > root.components().count() + MAX_DEPTH {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                found.push(entry.path());
            }
        }
    }
    found
}

/// splitmix64: small, seedable, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

impl CrashSim {
    /// Starts recording syncs under `root` (created if missing). What is there already
    /// counts as durable. Recording stops when the returned handle is dropped.
    pub fn install(root: &Path) -> io::Result<Arc<CrashSim>> {
        fs::create_dir_all(root)?;
        let mut state = State::default();
        for dir in list_dirs(root) {
            let files = list_files(&dir)?;
            for (key, path) in files.values() {
                let bytes = fs::read(path)?;
                state
                    .images
                    .insert(*key, image_of(&bytes, bytes.len() as u64));
            }
            let durable = files.into_iter().map(|(n, (k, _))| (n, k)).collect();
            state.dirs.insert(dir, durable);
        }
        let sim = Arc::new(CrashSim {
            root: root.to_path_buf(),
            state: Mutex::new(state),
        });
        lock_registry().push(Arc::downgrade(&sim));
        Ok(sim)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tree this simulation covers.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Makes the next `times` syncs under the root fail (or stall) with `fault`.
    pub fn inject(&self, fault: SyncFault, times: u32) {
        let mut state = self.lock();
        state.faults.extend((0..times).map(|_| fault));
    }

    /// Fills the disk (`true`: every later preallocation of a segment under the root
    /// fails with ENOSPC) or frees it again.
    pub fn set_disk_full(&self, full: bool) {
        self.lock().disk_full = full;
    }

    /// Successful syncs recorded so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// True once [`CrashSim::crash_into`] ran: every sync under the root fails.
    pub fn is_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Cuts the power: from now on every sync under the root fails, and `dest` (created,
    /// must not be under the root) receives the tree as the disk holds it, damaged as the
    /// module doc describes with choices drawn from `seed`. The live tree is not touched,
    /// so threads still using it cannot change the crashed copy.
    pub fn crash_into(&self, dest: &Path, seed: u64) -> io::Result<CrashReport> {
        let mut state = self.lock();
        state.crashed = true;
        let mut report = CrashReport {
            syncs: state.syncs,
            ..CrashReport::default()
        };
        let mut rng = Rng(seed);
        let mut dirs: BTreeSet<PathBuf> = list_dirs(&self.root).into_iter().collect();
        dirs.extend(state.dirs.keys().cloned());
        for dir in dirs {
            let Ok(rel) = dir.strip_prefix(&self.root) else {
                continue;
            };
            let out = dest.join(rel);
            fs::create_dir_all(&out)?;
            let live = if dir.is_dir() {
                list_files(&dir)?
            } else {
                BTreeMap::new()
            };
            match state.dirs.get(&dir) {
                None => copy_unmodelled(&live, &out, &dir, &mut report)?,
                Some(durable) => {
                    let plan = EntryPlan {
                        durable,
                        live: &live,
                        images: &state.images,
                    };
                    plan.write(&out, &mut rng, &mut report)?;
                }
            }
        }
        Ok(report)
    }
}

fn copy_unmodelled(
    live: &BTreeMap<OsString, (FileKey, PathBuf)>,
    out: &Path,
    dir: &Path,
    report: &mut CrashReport,
) -> io::Result<()> {
    for (name, (_, path)) in live {
        if let Ok(bytes) = fs::read(path) {
            fs::write(out.join(name), bytes)?;
            report.files += 1;
        }
    }
    if !live.is_empty() {
        report.unmodelled.push(dir.to_path_buf());
    }
    Ok(())
}

/// One synced directory's entries at the crash: which survive, with what bytes.
struct EntryPlan<'a> {
    durable: &'a BTreeMap<OsString, FileKey>,
    live: &'a BTreeMap<OsString, (FileKey, PathBuf)>,
    images: &'a HashMap<FileKey, Image>,
}

impl EntryPlan<'_> {
    fn write(&self, out: &Path, rng: &mut Rng, report: &mut CrashReport) -> io::Result<()> {
        let names: BTreeSet<&OsString> = self.durable.keys().chain(self.live.keys()).collect();
        for name in names {
            let old = self.durable.get(name).copied();
            let new = self.live.get(name);
            let survivor = match (old, new) {
                (Some(k), Some((l, path))) if k == *l => Some((k, Some(path))),
                (old, new) => {
                    // Changed since the directory's last sync: either side may be on disk.
                    if rng.below(2) == 0 {
                        report.entries_old += 1;
                        old.map(|k| (k, None))
                    } else {
                        report.entries_new += 1;
                        new.map(|(k, path)| (*k, Some(path)))
                    }
                }
            };
            let Some((key, path)) = survivor else {
                continue;
            };
            let image = self.images.get(&key).cloned().unwrap_or_default();
            let current = path.and_then(|p| fs::read(p).ok());
            let bytes = crashed_bytes(&image, current.as_deref(), rng, report);
            fs::write(out.join(name), bytes)?;
            report.files += 1;
        }
        Ok(())
    }
}

/// The bytes a power cut leaves of one file: durable bytes as synced, the others per page
/// old, new, torn or garbage.
fn crashed_bytes(
    image: &Image,
    current: Option<&[u8]>,
    rng: &mut Rng,
    report: &mut CrashReport,
) -> Vec<u8> {
    let old_len = image.len as usize;
    let new_len = current.map_or(old_len, <[u8]>::len);
    let len = if old_len == new_len || rng.below(2) == 0 {
        old_len
    } else {
        new_len
    };
    let new_byte = |at: usize| current.map_or(image.byte(at), |c| c.get(at).copied().unwrap_or(0));
    let mut out = vec![0u8; len];
    for start in (0..len).step_by(PAGE_BYTES) {
        let end = (start + PAGE_BYTES).min(len);
        let dirty = (start..end).any(|i| image.byte(i) != new_byte(i));
        if !dirty {
            for (i, b) in out[start..end].iter_mut().enumerate() {
                *b = image.byte(start + i);
            }
            continue;
        }
        let mode = rng.below(4);
        let cut = start + rng.below((end - start) as u64) as usize;
        for (i, slot) in out.iter_mut().enumerate().take(end).skip(start) {
            let (o, n) = (image.byte(i), new_byte(i));
            *slot = match mode {
                _ if o == n => o,
                0 => o,
                1 => n,
                2 if i < cut => n,
                2 => o,
                _ => rng.next() as u8,
            };
        }
        match mode {
            0 => report.pages_old += 1,
            1 => report.pages_new += 1,
            2 => report.pages_torn += 1,
            _ => report.pages_garbage += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_bytes_stay_and_the_others_follow_the_seed() {
        let image = Image {
            data: vec![1; 100],
            len: 2 * PAGE_BYTES as u64,
        };
        let mut current = vec![1u8; 2 * PAGE_BYTES];
        current[PAGE_BYTES + 7] = 9;
        let mut seen_modes = BTreeSet::new();
        for seed in 0..64 {
            let mut report = CrashReport::default();
            let out = crashed_bytes(&image, Some(&current), &mut Rng(seed), &mut report);
            assert_eq!(out.len(), 2 * PAGE_BYTES);
            assert_eq!(&out[..100], &[1; 100][..], "durable bytes kept");
            seen_modes.insert((report.pages_old, report.pages_new, report.pages_torn));
        }
        assert!(seen_modes.len() > 2, "the seed chooses among modes");
    }
}
