//! Goal: the broker-side layouts of `cluster/FORMAT.md` — the ops batch a node replicates
//! in a Raft entry, the store snapshot sent to a lagging member (wire v1 and v2) and the
//! store state persisted in `raft/sm/snapshot` (v3), whose ack-set and delivery-count
//! parts are the ack log's snapshot encodings (`storage/FORMAT.md`, flags 4 and 7) — keep
//! reading what earlier builds wrote, with the exact content, and today's encoders still
//! write the current versions byte for byte.
//!
//! Method: `tests/fixtures/cluster/` holds files written once by [`generate_fixtures`]
//! (ignored) from one small store (six committed records, acknowledgements in two
//! groups, two delivery counts, a registry). Each is applied or installed into a fresh
//! store with today's code and the store's content is checked record by record, set by
//! set; the current versions are also rebuilt and compared byte for byte, and the small
//! ones are spelled out from FORMAT.md. A torn wire snapshot must be refused before the
//! store is touched.
//!
//! Regenerate only when adding a *new* format version, never to make a test pass:
//! `cargo test --test broker -- --ignored format_fixtures::generate_fixtures` (refuses to
//! overwrite an existing file).

use std::fs;
use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use entrepot::broker::replication::{
    self, apply, encode_ack, encode_delivery_count, encode_drop_group, encode_file,
    encode_group_floor, encode_message, Applied, OPS_VERSION,
};
use entrepot::broker::subscriptions::REGISTRY_FILE;
use entrepot::raft::snapshot::{
    install_from, SnapshotError, StoreSource, StoreState, STORE_SNAPSHOT_VERSION,
    STORE_STATE_VERSION,
};
use entrepot_storage::{AckLog, Log, LogConfig, SyncPolicy, MIN_SEGMENT_BYTES};

const REGISTRY: &[u8] = b"version: 1\nsubscriptions: []\n";
/// Records below this are committed; the store holds one more (an uncommitted tail).
const MESSAGE_END: u64 = 6;
/// A consumer group of a topic subscription.
const GROUP: u32 = 7;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: MIN_SEGMENT_BYTES,
        record_bytes_max: 16 * 1024,
        sync: SyncPolicy::Never,
        ..LogConfig::default()
    }
}

/// The store record at `offset` (opaque to both formats): short, except a 300-byte one.
fn record(offset: u64) -> Vec<u8> {
    match offset {
        4 => (0..300u32).map(|i| (i * 7 + 3) as u8).collect(),
        _ => format!("rec-{offset}").into_bytes(),
    }
}

fn open_store(dir: &Path) -> (Log, AckLog) {
    (
        Log::open(dir.join("messages"), config()).unwrap(),
        AckLog::open(dir.join("acks"), config()).unwrap(),
    )
}

/// The store every snapshot fixture was taken from.
fn build_store(dir: &Path) -> (Log, AckLog) {
    let (log, acks) = open_store(dir);
    for offset in 0..=MESSAGE_END {
        log.append_view(0, &[&record(offset)]).unwrap();
    }
    acks.ack(&[0, 2]).unwrap();
    acks.ack_group(GROUP, &[0, 1]).unwrap();
    acks.raise_group_floor(GROUP, 3).unwrap();
    acks.set_delivery_count(0, 3, 2).unwrap();
    acks.set_delivery_count(GROUP, 4, 5).unwrap();
    replication::write_file(dir, REGISTRY_FILE, REGISTRY).unwrap();
    (log, acks)
}

/// The ops batch fixture: every op of version 1, op 7 (delivery count) included.
fn encode_ops() -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(OPS_VERSION);
    encode_message(&mut b, 0, b"rec-0");
    encode_message(&mut b, 1, b"rec-1");
    encode_ack(&mut b, None, &[0]);
    encode_ack(&mut b, Some(9), &[1]);
    encode_group_floor(&mut b, GROUP, 2);
    encode_drop_group(&mut b, 9);
    encode_file(&mut b, REGISTRY_FILE, REGISTRY);
    encode_delivery_count(&mut b, 0, 1, 3);
    b.freeze()
}

pub(crate) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cluster")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    fs::read(fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// `snapshot` installed into a fresh store in `dir` (written to a file first, as a
/// receiver does).
fn install(dir: &Path, snapshot: &[u8]) -> Result<(Log, AckLog, StoreState), SnapshotError> {
    let (log, acks) = open_store(dir);
    let path = dir.join("received");
    fs::write(&path, snapshot).unwrap();
    let state = install_from(fs::File::open(&path).unwrap(), &log, &acks, dir)?;
    Ok((log, acks, state))
}

/// What every wire snapshot fixture holds, checked in the store it was installed into.
fn assert_installed_store(log: &Log, acks: &AckLog, dir: &Path) {
    // Live records 1, 3, 4, 5 at their offsets; 2 (acknowledged) an empty placeholder;
    // nothing from the uncommitted tail (6).
    assert_eq!((log.first_offset(), log.next_offset()), (1, MESSAGE_END));
    for offset in [1, 3, 4, 5] {
        assert_eq!(
            log.read(offset).unwrap().payload,
            record(offset),
            "{offset}"
        );
    }
    assert!(log.read(2).unwrap().payload.is_empty());
    // Default group: 0 and 2 acknowledged. Group 7: everything below 3.
    let default: Vec<bool> = (0..6).map(|o| acks.is_acked(o)).collect();
    assert_eq!(default, [true, false, true, false, false, false]);
    let group: Vec<bool> = (0..6).map(|o| acks.is_group_acked(GROUP, o)).collect();
    assert_eq!(group, [true, true, true, false, false, false]);
    let mut groups = acks.groups();
    groups.sort_unstable();
    assert_eq!(groups, [0, GROUP]);
    assert_eq!(fs::read(dir.join(REGISTRY_FILE)).unwrap(), REGISTRY);
}

/// The ack-set part (ack log group snapshot, flags 4): `groups: varint | groups ×
/// { group: varint | len: varint | floor: u64 | chunks: u32 | chunks × { index: u64 |
/// bits: [u64; 64] } }`, spelled out.
fn expected_acks_part() -> Vec<u8> {
    // Bits are kept below a floor: the set is encoded as it was built, not normalized.
    let set = |floor: u64, word0: u64| {
        let mut set = floor.to_le_bytes().to_vec();
        set.extend(1u32.to_le_bytes());
        set.extend(0u64.to_le_bytes()); // chunk 0
        let mut bits = [0u64; 64];
        bits[0] = word0;
        bits.iter().for_each(|w| set.extend(w.to_le_bytes()));
        set
    };
    let set0 = set(1, 0b101); // 0 and 2 acknowledged
    let set7 = set(3, 0b011); // 0 and 1 acknowledged, then the floor raised to 3
    assert_eq!(set0.len(), 532);
    let mut part = vec![2u8]; // groups
    part.extend([0, 0x94, 0x04]); // group 0, len 532 as a varint
    part.extend(&set0);
    part.extend([GROUP as u8, 0x94, 0x04]);
    part.extend(&set7);
    part
}

/// The delivery-counts part (ack log counts snapshot, flags 7): `n: varint | n × { group:
/// varint | offset: varint | count: varint }`.
const EXPECTED_COUNTS_PART: &[u8] = &[2, 0, 3, 2, GROUP as u8, 4, 5];

fn part(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u32).to_le_bytes().to_vec();
    out.extend(bytes);
    out
}

#[test]
fn the_v1_ops_batch_applies_every_op_to_its_exact_effect() {
    let ops = Bytes::from(read("ops-v1.bin"));
    let dir = tempfile::tempdir().unwrap();
    let (log, acks) = open_store(dir.path());
    let mut applied = Applied::default();
    apply(&ops, &log, &acks, dir.path(), &mut applied).unwrap();
    assert_eq!(applied.message_end, Some(2));
    assert_eq!(log.next_offset(), 2);
    assert_eq!(&log.read(0).unwrap().payload[..], b"rec-0");
    assert_eq!(&log.read(1).unwrap().payload[..], b"rec-1");
    assert!(acks.is_acked(0) && !acks.is_acked(1));
    assert!(acks.is_group_acked(GROUP, 1) && !acks.is_group_acked(GROUP, 2));
    let mut groups = acks.groups();
    groups.sort_unstable();
    assert_eq!(groups, [0, GROUP], "group 9 was dropped");
    assert_eq!(acks.delivery_count(0, 1), 3);
    assert_eq!(fs::read(dir.path().join(REGISTRY_FILE)).unwrap(), REGISTRY);
}

#[test]
fn the_v1_ops_batch_matches_format_md_and_todays_encoders_byte_for_byte() {
    assert_eq!(OPS_VERSION, 1, "a new ops version needs its own fixture");
    let mut want = vec![1u8];
    for (offset, rec) in [(0u64, b"rec-0"), (1, b"rec-1")] {
        want.push(1);
        want.extend(offset.to_le_bytes());
        want.extend(5u32.to_le_bytes());
        want.extend(rec);
    }
    want.extend([2, 1, 0, 0, 0]);
    want.extend(0u64.to_le_bytes());
    want.extend([3, 9, 0, 0, 0, 1, 0, 0, 0]);
    want.extend(1u64.to_le_bytes());
    want.extend([4, GROUP as u8, 0, 0, 0]);
    want.extend(2u64.to_le_bytes());
    want.extend([5, 9, 0, 0, 0]);
    want.extend([6, REGISTRY_FILE.len() as u8, 0]);
    want.extend(REGISTRY_FILE.as_bytes());
    want.extend(part(REGISTRY));
    want.extend([7, 0, 0, 0, 0]);
    want.extend(1u64.to_le_bytes());
    want.extend(3u32.to_le_bytes());
    let fixture = read("ops-v1.bin");
    assert_eq!(fixture, want);
    assert_eq!(encode_ops(), fixture);
}

#[test]
fn the_v2_wire_snapshot_installs_with_its_records_acks_counts_and_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (log, acks, state) = install(dir.path(), &read("store-snapshot-v2.bin")).unwrap();
    assert_eq!(state.message_end, MESSAGE_END);
    assert_installed_store(&log, &acks, dir.path());
    assert_eq!(acks.delivery_count(0, 3), 2);
    assert_eq!(acks.delivery_count(GROUP, 4), 5);
    assert_eq!(acks.delivery_count(0, 4), 0);
}

#[test]
fn the_v1_wire_snapshot_of_earlier_builds_installs_without_delivery_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (log, acks, state) = install(dir.path(), &read("store-snapshot-v1.bin")).unwrap();
    assert_eq!(state.message_end, MESSAGE_END);
    assert_installed_store(&log, &acks, dir.path());
    assert_eq!(acks.delivery_count(0, 3), 0);
    assert_eq!(acks.delivery_count(GROUP, 4), 0);
}

#[test]
fn a_torn_wire_snapshot_is_refused_before_the_store_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let (log, acks) = open_store(dir.path());
    log.append_view(0, &[b"kept"]).unwrap();
    let path = dir.path().join("received");
    fs::write(&path, read("store-snapshot-v2-torn.bin")).unwrap();
    let r = install_from(fs::File::open(&path).unwrap(), &log, &acks, dir.path());
    assert!(
        matches!(r, Err(SnapshotError::Malformed("truncated"))),
        "{r:?}"
    );
    assert_eq!((log.first_offset(), log.next_offset()), (0, 1));
    assert_eq!(&log.read(0).unwrap().payload[..], b"kept");
    assert!(!dir.path().join(REGISTRY_FILE).exists());
}

#[test]
fn persisted_store_states_and_wire_heads_read_as_the_same_state() {
    let v3 = StoreState::decode(&read("store-state-v3.bin")).unwrap();
    assert_eq!(v3.message_end, MESSAGE_END);
    // A v1 file (earlier builds persisted the whole wire snapshot): its head is read.
    let v1 = StoreState::decode(&read("store-snapshot-v1.bin")).unwrap();
    assert_eq!(v1.message_end, MESSAGE_END);
    // The v3 state holds exactly the parts of the v2 wire head, spelled out.
    let mut want = vec![3u8];
    want.extend(MESSAGE_END.to_le_bytes());
    want.extend(part(&expected_acks_part()));
    want.extend(part(REGISTRY));
    want.extend(part(EXPECTED_COUNTS_PART));
    assert_eq!(read("store-state-v3.bin"), want);
}

#[test]
fn the_wire_snapshots_match_format_md_byte_for_byte() {
    let head = |version: u8, counts: bool| {
        let mut h = vec![version];
        h.extend(MESSAGE_END.to_le_bytes());
        h.extend(1u64.to_le_bytes()); // base: the first live record
        h.extend(part(&expected_acks_part()));
        h.extend(part(REGISTRY));
        if counts {
            h.extend(part(EXPECTED_COUNTS_PART));
        }
        h.extend(4u64.to_le_bytes());
        for offset in [1u64, 3, 4, 5] {
            h.extend(offset.to_le_bytes());
            h.extend(part(&record(offset)));
        }
        h
    };
    assert_eq!(read("store-snapshot-v2.bin"), head(2, true));
    assert_eq!(read("store-snapshot-v1.bin"), head(1, false));
}

/// Builds b1c80cf..d269f7d persisted `{ version: u8 = 2 | message_end: u64 | acks_len: u32
/// | acks | registry_len: u32 | registry }`: a node upgraded from them opens its saved
/// state with today's code (no delivery counts: that build kept none); a damaged one is
/// refused by name.
#[test]
fn the_persisted_state_v2_of_a_short_lived_build_still_opens() {
    let v2 = StoreState::decode(&read("store-state-v2.bin")).unwrap();
    assert_eq!(v2.message_end, MESSAGE_END);
    // Saved again it is today's v3 with the same acks and registry and no counts.
    let mut want = vec![3u8];
    want.extend(MESSAGE_END.to_le_bytes());
    want.extend(part(&expected_acks_part()));
    want.extend(part(REGISTRY));
    want.extend(part(&[]));
    assert_eq!(v2.encode(), want);
    let bytes = read("store-state-v2.bin");
    let torn = StoreState::decode(&bytes[..bytes.len() - 3]);
    assert!(
        matches!(torn, Err(SnapshotError::Malformed("truncated"))),
        "{torn:?}"
    );
    let mut longer = bytes.clone();
    longer.push(0);
    let trailing = StoreState::decode(&longer);
    assert!(
        matches!(trailing, Err(SnapshotError::Malformed("trailing bytes"))),
        "{trailing:?}"
    );
}

#[test]
fn todays_code_writes_the_current_snapshot_versions_byte_for_byte() {
    assert_eq!(
        STORE_SNAPSHOT_VERSION, 2,
        "a new wire version needs its own fixture"
    );
    assert_eq!(
        STORE_STATE_VERSION, 3,
        "a new state version needs its own fixture"
    );
    let dir = tempfile::tempdir().unwrap();
    let (log, acks) = build_store(dir.path());
    let state = StoreState::capture(&acks, dir.path(), MESSAGE_END).unwrap();
    assert_eq!(state.encode(), read("store-state-v3.bin"));
    let source = StoreSource::new(&state, &log, &acks).unwrap();
    assert_eq!(source.read_all(), read("store-snapshot-v2.bin"));
}

/// Writes fixture `name`, refusing to overwrite one (shared by `meta_fixtures`).
pub(crate) fn write_new(name: &str, bytes: &[u8]) {
    let path = fixture(name);
    assert!(
        !path.exists(),
        "{} exists; fixtures of a released format are never rewritten",
        path.display()
    );
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

/// The parts of a v2 wire snapshot or v3 state after `at`: (start of the counts part,
/// its end).
fn counts_part_span(bytes: &[u8], at: usize) -> (usize, usize) {
    let len = |p: usize| u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
    let registry = at + 4 + len(at);
    let counts = registry + 4 + len(registry);
    (counts, counts + 4 + len(counts))
}

/// Writes the fixtures. Ignored: run by hand (see the module docs) when a new version is
/// released. The v1 wire snapshot is what builds before delivery counts (d269f7d) sent:
/// the v2 bytes without the counts part, version byte 1.
#[test]
#[ignore]
fn generate_fixtures() {
    write_new("ops-v1.bin", &encode_ops());
    let dir = tempfile::tempdir().unwrap();
    let (log, acks) = build_store(dir.path());
    let state = StoreState::capture(&acks, dir.path(), MESSAGE_END).unwrap();
    let v3 = state.encode();
    write_new("store-state-v3.bin", &v3);
    // What builds between b1c80cf and d269f7d persisted: state v2, without counts.
    let (from, to) = counts_part_span(&v3, 9);
    assert_eq!(to, v3.len());
    let mut v2_state = v3[..from].to_vec();
    v2_state[0] = 2;
    write_new("store-state-v2.bin", &v2_state);
    let v2 = StoreSource::new(&state, &log, &acks).unwrap().read_all();
    write_new("store-snapshot-v2.bin", &v2);
    write_new("store-snapshot-v2-torn.bin", &v2[..v2.len() - 100]);
    let (from, to) = counts_part_span(&v2, 17);
    let mut v1 = [&v2[..from], &v2[to..]].concat();
    v1[0] = 1;
    write_new("store-snapshot-v1.bin", &v1);
}
