//! Goal: what released builds wrote in a Raft group's directory keeps opening with today's
//! code, with the exact content it held, and today's encoders still write those bytes —
//! the layouts of `cluster/FORMAT.md` are a contract, not just a round trip.
//!
//! Method: `tests/fixtures/` holds files written once by [`generate_fixtures`] (ignored):
//! * `v1-entries/*.bin` — one Raft entry payload (entry version 1) of every kind;
//! * `v1-group/` — a whole group directory: `log/` (the same entries as records, flags
//!   `0x10`), `raft-state` (a vote and a purge point), `raft-committed`, `sm/snapshot`
//!   (state-file envelope version 1 around opaque data, [`SNAPSHOT_DATA`]);
//! * `v1-damaged/` — a `raft-state` with a flipped body byte (bad CRC), one cut short
//!   (torn), and an `sm/snapshot` cut short.
//!
//! Each fixture is decoded with today's code and compared field by field with values
//! written out below (not with a re-encoding); then the current version's encoder must
//! produce the fixture's bytes exactly, so a layout change without a version bump fails
//! here. A few small layouts are also spelled out byte by byte from FORMAT.md.
//!
//! Regenerate only when adding a *new* format version, never to make a test pass:
//! `cargo test -p entrepot-cluster --test format_fixtures -- --ignored generate_fixtures`
//! (refuses to overwrite an existing fixture directory).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use entrepot_cluster::entry::{decode_entry, encode_entry, ENTRY_VERSION};
use entrepot_cluster::{
    read_snapshot_file, write_snapshot_file, ClusterError, Entry, LogId, LogStore, Request,
    LOG_DIR, RAFT_ENTRY_FLAG, STATE_FILE_VERSION,
};
use entrepot_storage::{Log, LogConfig, SyncPolicy, MIN_SEGMENT_BYTES};
use openraft::storage::RaftLogStorage;
use openraft::{
    BasicNode, CommittedLeaderId, EntryPayload, Membership, RaftLogReader, SnapshotMeta,
    StoredMembership, Vote,
};

/// Names of the entry fixtures, in Raft index order (index = position + 1).
const ENTRY_FILES: [&str; 7] = [
    "1-blank",
    "2-membership",
    "3-produce",
    "4-settle",
    "5-cursor",
    "6-ops",
    "7-joint-membership",
];

fn log_id(term: u64, node: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

fn three_nodes() -> Membership<u64, BasicNode> {
    let nodes = BTreeMap::from([
        (0, BasicNode::new("entrepot-0:5673")),
        (1, BasicNode::new("entrepot-1:5673/5672")),
        (2, BasicNode::new("entrepot-2:5673/5672/5671")),
    ]);
    Membership::new(vec![BTreeSet::from([0, 1, 2])], nodes)
}

/// 300 bytes of a known pattern.
fn pattern() -> Bytes {
    (0..300u32).map(|i| (i * 7 + 3) as u8).collect()
}

/// An ops batch as a broker node replicates it: version 1, op 5 "drop group 9".
const OPS: &[u8] = &[1, 5, 9, 0, 0, 0];

/// The entries of the fixtures, in Raft index order (see [`ENTRY_FILES`]).
fn entries() -> Vec<Entry> {
    let joint_nodes = BTreeMap::from([
        (0, BasicNode::new("entrepot-0:5673")),
        (1, BasicNode::new("entrepot-1:5673/5672")),
        (2, BasicNode::new("entrepot-2:5673/5672/5671")),
        (3, BasicNode::new("entrepot-3:5673")),
        (4, BasicNode::new("learner:5673")),
    ]);
    let joint = Membership::new(
        vec![BTreeSet::from([0, 1, 2]), BTreeSet::from([1, 2, 3])],
        joint_nodes,
    );
    let payloads = vec![
        (log_id(1, 0, 1), EntryPayload::Blank),
        (log_id(1, 0, 2), EntryPayload::Membership(three_nodes())),
        (
            log_id(2, 1, 3),
            EntryPayload::Normal(Request::Produce {
                address: "orders".into(),
                messages: vec![Bytes::from_static(b"a"), Bytes::new(), pattern()],
            }),
        ),
        (
            log_id(2, 1, 4),
            EntryPayload::Normal(Request::Settle {
                address: "orders".into(),
                message_ids: vec![0, 2],
            }),
        ),
        (
            log_id(2, 1, 5),
            EntryPayload::Normal(Request::Cursor {
                subscription: "prices::audit".into(),
                floor: 42,
            }),
        ),
        (
            log_id(2, 1, 6),
            EntryPayload::Normal(Request::Ops(Bytes::from_static(OPS))),
        ),
        (log_id(3, 2, 7), EntryPayload::Membership(joint)),
    ];
    payloads
        .into_iter()
        .map(|(log_id, payload)| Entry { log_id, payload })
        .collect()
}

/// What `raft-state` holds: a committed vote for node 2 in term 3, purged up to index 1.
fn vote() -> Vote<u64> {
    Vote::new_committed(3, 2)
}
fn purged() -> LogId {
    log_id(1, 0, 1)
}
/// What `raft-committed` holds.
fn committed() -> LogId {
    log_id(2, 1, 6)
}

/// The data of `sm/snapshot`, opaque to this crate (a broker node's is its store state,
/// `src/raft/snapshot.rs`): what the retired stand-in state machine wrote after entries
/// 3..=5 — one address "orders" (next id 3, message 1 empty), cursor "prices::audit" at 42.
const SNAPSHOT_DATA: &[u8] =
    b"\x01\x01\0\0\0\x06\0orders\x03\0\0\0\0\0\0\0\x01\0\0\0\x01\0\0\0\0\0\0\0\
    \0\0\0\0\x01\0\0\0\x0d\0prices::audit\x2a\0\0\0\0\0\0\0";

fn snapshot_meta() -> SnapshotMeta<u64, BasicNode> {
    SnapshotMeta {
        last_log_id: Some(log_id(2, 1, 5)),
        last_membership: StoredMembership::new(Some(log_id(1, 0, 2)), three_nodes()),
        snapshot_id: "2-5-1".into(),
    }
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: MIN_SEGMENT_BYTES,
        record_bytes_max: 16 * 1024,
        sync: SyncPolicy::Always,
        ..LogConfig::default()
    }
}

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

fn read(path: &str) -> Vec<u8> {
    fs::read(fixture(path)).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            fs::copy(&path, &target).unwrap();
        }
    }
}

/// A writable copy of `v1-group` (opening may repair or rewrite files).
fn copy_of_group() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("v1-group"), dir.path());
    dir
}

fn le(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

#[test]
fn every_v1_entry_decodes_to_its_exact_content() {
    let expected = entries();
    for (name, want) in ENTRY_FILES.iter().zip(&expected) {
        let bytes = read(&format!("v1-entries/{name}.bin"));
        assert_eq!(bytes[0], 1, "{name}: entry version");
        let got = decode_entry(Bytes::from(bytes)).unwrap();
        assert_eq!(got.log_id, want.log_id, "{name}: log id");
        assert_eq!(got.payload, want.payload, "{name}: payload");
    }
    // The membership entries' voters and nodes, spelled out.
    let joint = decode_entry(Bytes::from(read("v1-entries/7-joint-membership.bin"))).unwrap();
    let EntryPayload::Membership(m) = joint.payload else {
        panic!("7-joint-membership is not a membership entry");
    };
    let sets: Vec<Vec<u64>> = m
        .get_joint_config()
        .iter()
        .map(|s| s.iter().copied().collect())
        .collect();
    assert_eq!(sets, [vec![0, 1, 2], vec![1, 2, 3]]);
    let nodes: Vec<(u64, String)> = m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
    assert_eq!(nodes.len(), 5);
    assert_eq!(nodes[2], (2, "entrepot-2:5673/5672/5671".to_string()));
    assert_eq!(nodes[4], (4, "learner:5673".to_string()));
}

#[test]
fn small_entries_match_the_layout_in_format_md_byte_for_byte() {
    // version | term | leader node | index | kind 0
    let mut blank = vec![1u8];
    blank.extend(le(1));
    blank.extend(le(0));
    blank.extend(le(1));
    blank.push(0);
    assert_eq!(read("v1-entries/1-blank.bin"), blank);
    // ... kind 1 | tag 3 cursor { subscription: str (u16 len) | floor: u64 }
    let mut cursor = vec![1u8];
    cursor.extend(le(2));
    cursor.extend(le(1));
    cursor.extend(le(5));
    cursor.extend([1, 3, 13, 0]);
    cursor.extend(b"prices::audit");
    cursor.extend(le(42));
    assert_eq!(read("v1-entries/5-cursor.bin"), cursor);
    // ... kind 1 | tag 4 ops { len: u32 | bytes }
    let mut ops = vec![1u8];
    ops.extend(le(2));
    ops.extend(le(1));
    ops.extend(le(6));
    ops.extend([1, 4, OPS.len() as u8, 0, 0, 0]);
    ops.extend(OPS);
    assert_eq!(read("v1-entries/6-ops.bin"), ops);
}

#[test]
fn todays_encoder_writes_every_v1_entry_fixture_byte_for_byte() {
    assert_eq!(
        ENTRY_VERSION, 1,
        "a new entry version needs its own fixtures"
    );
    for (name, entry) in ENTRY_FILES.iter().zip(entries()) {
        let bytes = read(&format!("v1-entries/{name}.bin"));
        assert_eq!(encode_entry(&entry).unwrap(), bytes, "{name}");
    }
}

#[tokio::test]
async fn a_v1_group_directory_opens_with_its_entries_vote_and_purge_point() {
    let dir = copy_of_group();
    // The records of `log/` are the entry fixtures, flagged as Raft entries, dense.
    {
        let log = Log::open(dir.path().join(LOG_DIR), config()).unwrap();
        let records: Vec<_> = log.reader(0).map(|r| r.unwrap()).collect();
        assert_eq!(records.len(), ENTRY_FILES.len());
        for (offset, (record, name)) in records.iter().zip(ENTRY_FILES).enumerate() {
            assert_eq!(record.offset, offset as u64);
            assert_eq!(record.flags, RAFT_ENTRY_FLAG, "{name}");
            assert_eq!(
                record.payload,
                read(&format!("v1-entries/{name}.bin")),
                "{name}"
            );
        }
    }
    let mut store = LogStore::open(dir.path(), config()).unwrap();
    assert_eq!(
        store.read_vote().await.unwrap(),
        Some(Vote::new_committed(3, 2))
    );
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 0, 1)));
    assert_eq!(state.last_log_id, Some(log_id(3, 2, 7)));
    assert_eq!(store.read_committed().await.unwrap(), Some(log_id(2, 1, 6)));
    // Index 1 is purged: never returned although its record is still in the segment.
    let got = store.try_get_log_entries(0..100).await.unwrap();
    let indexes: Vec<u64> = got.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, [2, 3, 4, 5, 6, 7]);
    assert_eq!(got, entries()[1..]);
}

#[test]
fn a_v1_snapshot_file_opens_with_its_meta_and_data() {
    let dir = copy_of_group();
    let (meta, data) = read_snapshot_file(&dir.path().join("sm")).unwrap().unwrap();
    assert_eq!(meta.last_log_id, Some(log_id(2, 1, 5)));
    assert_eq!(meta.last_membership.log_id(), &Some(log_id(1, 0, 2)));
    let voters: Vec<u64> = meta.last_membership.membership().voter_ids().collect();
    assert_eq!(voters, [0, 1, 2]);
    assert_eq!(meta.snapshot_id, "2-5-1");
    assert_eq!(data, SNAPSHOT_DATA);
}

#[test]
fn state_file_envelopes_match_the_layout_in_format_md() {
    let committed = read("v1-group/raft-committed");
    let mut body = vec![1u8];
    body.extend(le(2));
    body.extend(le(1));
    body.extend(le(6));
    let mut want = b"ENTRPCMT".to_vec();
    want.extend(1u16.to_le_bytes());
    want.extend([0, 0]);
    want.extend(crc32fast::hash(&body).to_le_bytes());
    want.extend((body.len() as u32).to_le_bytes());
    want.extend(&body);
    assert_eq!(committed, want);

    let state = read("v1-group/raft-state");
    assert_eq!(&state[..8], b"ENTRPRFT");
    assert_eq!(&state[8..12], [1, 0, 0, 0]);
    // vote { present | term | node | committed } | purged { present | log_id }
    let mut body = vec![1u8];
    body.extend(le(3));
    body.extend(le(2));
    body.push(1);
    body.push(1);
    body.extend(le(1));
    body.extend(le(0));
    body.extend(le(1));
    assert_eq!(&state[12..16], crc32fast::hash(&body).to_le_bytes());
    assert_eq!(&state[16..20], (body.len() as u32).to_le_bytes());
    assert_eq!(&state[20..], body);

    let snapshot = read("v1-group/sm/snapshot");
    assert_eq!(&snapshot[..12], b"ENTRPSNP\x01\0\0\0");
}

#[tokio::test]
async fn todays_code_writes_the_v1_state_files_byte_for_byte() {
    assert_eq!(
        STATE_FILE_VERSION, 1,
        "a new state-file version needs fixtures"
    );
    let dir = tempfile::tempdir().unwrap();
    write_group_state(dir.path()).await;
    for name in ["raft-state", "raft-committed", "sm/snapshot"] {
        let written = fs::read(dir.path().join(name)).unwrap();
        assert_eq!(written, read(&format!("v1-group/{name}")), "{name}");
    }
}

#[test]
fn a_damaged_state_file_or_snapshot_is_refused_with_a_typed_error() {
    let cases = [
        ("raft-state-bad-crc", "raft-state", "checksum mismatch"),
        (
            "raft-state-torn",
            "raft-state",
            "length does not match the file",
        ),
    ];
    for (fixture_name, name, reason) in cases {
        let dir = copy_of_group();
        fs::copy(
            fixture(&format!("v1-damaged/{fixture_name}")),
            dir.path().join(name),
        )
        .unwrap();
        match LogStore::open(dir.path(), config()) {
            Err(ClusterError::BadFile { reason: r, .. }) => assert_eq!(r, reason, "{fixture_name}"),
            Err(e) => panic!("{fixture_name}: wrong error {e}"),
            Ok(_) => panic!("{fixture_name} was opened"),
        }
    }
    let dir = copy_of_group();
    fs::copy(
        fixture("v1-damaged/snapshot-torn"),
        dir.path().join("sm/snapshot"),
    )
    .unwrap();
    assert!(matches!(
        read_snapshot_file(&dir.path().join("sm")),
        Err(ClusterError::BadFile {
            reason: "length does not match the file",
            ..
        })
    ));
}

/// Writes `raft-state`, `raft-committed` and `sm/snapshot` of the fixture into `dir` with
/// today's code.
async fn write_group_state(dir: &Path) {
    let mut store = LogStore::open(dir, config()).unwrap();
    store.save_vote(&vote()).await.unwrap();
    store.purge(purged()).await.unwrap();
    store.save_committed(Some(committed())).await.unwrap();
    drop(store);
    write_snapshot_file(&dir.join("sm"), &snapshot_meta(), SNAPSHOT_DATA).unwrap();
}

fn new_fixture_dir(path: &Path) {
    assert!(
        !path.exists(),
        "{} exists; fixtures of a released format are never rewritten",
        path.display()
    );
    fs::create_dir_all(path).unwrap();
}

/// Writes the fixtures of the current versions. Ignored: run by hand (see the module
/// docs) when a new format version is released.
#[tokio::test]
#[ignore]
async fn generate_fixtures() {
    let v = ENTRY_VERSION;
    let entries_dir = fixture(&format!("v{v}-entries"));
    new_fixture_dir(&entries_dir);
    for (name, entry) in ENTRY_FILES.iter().zip(entries()) {
        fs::write(
            entries_dir.join(format!("{name}.bin")),
            encode_entry(&entry).unwrap(),
        )
        .unwrap();
    }

    let group = fixture(&format!("v{v}-group"));
    new_fixture_dir(&group);
    // What `LogStore::append` writes: one record per entry, flagged, in index order.
    let log = Log::open(group.join(LOG_DIR), config()).unwrap();
    for entry in entries() {
        log.append_parts(RAFT_ENTRY_FLAG, &[&encode_entry(&entry).unwrap()])
            .unwrap();
    }
    log.flush().unwrap();
    drop(log);
    write_group_state(&group).await;

    let damaged = fixture(&format!("v{STATE_FILE_VERSION}-damaged"));
    new_fixture_dir(&damaged);
    let mut state = fs::read(group.join("raft-state")).unwrap();
    fs::write(damaged.join("raft-state-torn"), &state[..state.len() - 9]).unwrap();
    *state.last_mut().unwrap() ^= 0x01;
    fs::write(damaged.join("raft-state-bad-crc"), &state).unwrap();
    let snapshot = fs::read(group.join("sm/snapshot")).unwrap();
    fs::write(
        damaged.join("snapshot-torn"),
        &snapshot[..snapshot.len() / 2],
    )
    .unwrap();
}
