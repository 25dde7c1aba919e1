//! The node log on real files with real fsync: many groups through a restart, segments
//! freed only when no group needs them, a torn tail, hostile records, threads per node.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use entrepot_storage::{LogConfig, SyncPolicy, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use openraft::storage::RaftLogStorage;
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader};

use super::*;
use crate::types::Request;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 * 1024,
        record_bytes_max: 32 * 1024,
        ..LogConfig::default()
    }
}

fn id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64, bytes: usize) -> Entry {
    Entry {
        log_id: id(term, index),
        payload: EntryPayload::Normal(Request::Produce {
            address: format!("a{index}"),
            messages: vec![Bytes::from(vec![index as u8; bytes])],
        }),
    }
}

async fn append(node: &NodeLog, group: GroupId, entry: Entry) {
    node.group(group).unwrap();
    node.append_entry(group, &entry)
        .unwrap()
        .wait()
        .await
        .unwrap();
}

/// What openraft sees of every group, and the node's whole in-memory state.
async fn observed(node: &NodeLog) -> (Vec<String>, HashMap<GroupId, GroupState>) {
    let mut ids = node.group_ids().unwrap();
    ids.sort_unstable();
    let mut seen = Vec::new();
    for g in ids {
        let mut log = node.group(g).unwrap();
        let state = log.get_log_state().await.unwrap();
        let vote = log.read_vote().await.unwrap();
        let entries = log.try_get_log_entries(..).await.unwrap();
        let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
        seen.push(format!("{g}: {state:?} {vote:?} {indexes:?}"));
    }
    (seen, node.shared.lock().unwrap().clone())
}

#[tokio::test]
async fn many_groups_survive_a_reopen_with_identical_state() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeLog::open(dir.path(), config()).unwrap();
    const GROUPS: u64 = 40;
    // Round-robin appends: every group's records are interleaved with all the others'.
    for index in 1..=12 {
        for g in 0..GROUPS {
            append(&node, g, entry(1, index, 100 + (g as usize * 37) % 900)).await;
        }
    }
    for g in 0..GROUPS {
        let mut log = node.group(g).unwrap();
        log.save_vote(&Vote::new(g + 1, g % 3)).await.unwrap();
        match g % 4 {
            0 => log.truncate(id(1, 9)).await.unwrap(),
            1 => log.purge(id(1, 5)).await.unwrap(),
            2 => {
                log.truncate(id(1, 7)).await.unwrap();
                append(&node, g, entry(2, 7, 50)).await;
                log.purge(id(1, 3)).await.unwrap();
            }
            _ => {}
        }
    }
    node.remove_group(GROUPS - 1).await.unwrap();
    let before = observed(&node).await;
    assert_eq!(before.1.len() as u64, GROUPS - 1);
    drop(node);

    let node = NodeLog::open(dir.path(), config()).unwrap();
    let after = observed(&node).await;
    assert_eq!(after.0, before.0, "what openraft reads of every group");
    assert!(after.1 == before.1, "the node's state of every group");
    let mut g2 = node.group(2).unwrap();
    let entries = g2.try_get_log_entries(4..=7).await.unwrap();
    assert_eq!(
        entries,
        vec![
            entry(1, 4, 174),
            entry(1, 5, 174),
            entry(1, 6, 174),
            entry(2, 7, 50)
        ]
    );
    assert_eq!(
        node.group(0)
            .unwrap()
            .get_log_state()
            .await
            .unwrap()
            .last_log_id,
        Some(id(1, 8))
    );
}

#[tokio::test]
async fn a_segment_goes_only_when_no_group_needs_it_and_votes_and_purge_points_survive_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeLog::open(dir.path(), config()).unwrap();
    // Group 1: a vote, a purge point and one entry at the very start of the log.
    let mut lagging = node.group(1).unwrap();
    lagging.save_vote(&Vote::new_committed(4, 2)).await.unwrap();
    append(&node, 1, entry(1, 1, 10)).await;
    append(&node, 1, entry(1, 2, 10)).await;
    lagging.purge(id(1, 1)).await.unwrap();
    // Group 2 fills several segments, then purges nearly all of it.
    for index in 1..=60 {
        append(&node, 2, entry(1, index, 4000)).await;
    }
    assert!(node.log().segments().len() >= 4);
    let mut busy = node.group(2).unwrap();
    busy.purge(id(1, 55)).await.unwrap();
    assert_eq!(
        node.log().first_offset(),
        0,
        "group 1's entry 2 pins the first segment"
    );
    assert_eq!(busy.try_get_log_entries(..).await.unwrap().len(), 5);

    lagging.purge(id(1, 2)).await.unwrap();
    let first = node.log().first_offset();
    assert!(first > 0, "no group needs the first segments any more");
    let held = busy.try_get_log_entries(..).await.unwrap();
    assert_eq!(
        held.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        (56..=60).collect::<Vec<_>>()
    );
    drop((lagging, busy, node));

    let node = NodeLog::open(dir.path(), config()).unwrap();
    assert_eq!(node.log().first_offset(), first);
    let mut lagging = node.group(1).unwrap();
    assert_eq!(
        lagging.read_vote().await.unwrap(),
        Some(Vote::new_committed(4, 2))
    );
    let state = lagging.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(id(1, 2)));
    assert_eq!(state.last_log_id, Some(id(1, 2)));
    let state = node.group(2).unwrap().get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(id(1, 55)));
    assert_eq!(state.last_log_id, Some(id(1, 60)));
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_every_group_recovers_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeLog::open(dir.path(), config()).unwrap();
    for index in 1..=5 {
        for g in 0..3 {
            append(&node, g, entry(1, index, 200)).await;
        }
    }
    let records: Vec<usize> = node
        .log()
        .reader(0)
        .map(|r| r.unwrap().payload.len())
        .collect();
    assert_eq!(node.log().segments().len(), 1);
    drop(node);
    // A power cut in the middle of the last record (group 2's entry 5).
    let last_start = SEGMENT_HEADER_LEN
        + records[..records.len() - 1]
            .iter()
            .map(|len| RECORD_HEADER_LEN + len)
            .sum::<usize>();
    let path = dir.path().join(format!("{:020}.seg", 0));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[last_start + RECORD_HEADER_LEN + 50] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let node = NodeLog::open(dir.path(), config()).unwrap();
    assert!(
        node.log()
            .stats()
            .recovered_torn_bytes
            .load(Ordering::Relaxed)
            > 0
    );
    for g in 0..3 {
        let state = node.group(g).unwrap().get_log_state().await.unwrap();
        let want = if g == 2 { 4 } else { 5 };
        assert_eq!(state.last_log_id, Some(id(1, want)), "group {g}");
    }
    append(&node, 2, entry(1, 5, 10)).await;
}

/// A record's flags and payload, written as they are.
type RawRecord = (u16, Vec<u8>);

/// Opens a node log whose records are `payloads` (each with `flags`), as another build or
/// a corrupt disk could have left them.
fn open_raw(records: &[RawRecord]) -> Result<NodeLog> {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        sync: SyncPolicy::Never,
        ..config()
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    for (flags, payload) in records {
        log.append_parts(*flags, &[payload]).unwrap();
    }
    drop(log);
    NodeLog::open(dir.path(), config)
}

fn entry_record(group: GroupId, term: u64, index: u64) -> RawRecord {
    let mut bytes = record::entry_header(group);
    bytes.extend(crate::entry::encode_entry(&entry(term, index, 3)).unwrap());
    (NODE_LOG_FLAG, bytes)
}

#[test]
fn hostile_or_unreadable_records_stop_the_open_with_a_typed_error_naming_the_offset() {
    let ok = entry_record(3, 1, 1);
    let mut bad_version = record::encode_remove(3);
    bad_version[0] = 9;
    let mut bad_kind = record::encode_remove(3);
    bad_kind[1] = 77;
    let mut short = record::encode_purge(3, &id(1, 1));
    short.truncate(short.len() - 3);
    let cases: Vec<(Vec<RawRecord>, &str)> = vec![
        (vec![ok.clone(), (NODE_LOG_FLAG, bad_version)], "version"),
        (vec![ok.clone(), (NODE_LOG_FLAG, bad_kind)], "kind"),
        (vec![ok.clone(), (NODE_LOG_FLAG, short)], "truncated"),
        (vec![ok.clone(), entry_record(3, 1, 1)], "out of order"),
        (
            vec![ok.clone(), entry_record(3, 1, 3 + MAX_INDEX_GAP)],
            "gap",
        ),
    ];
    for (records, case) in cases {
        let err = open_raw(&records)
            .err()
            .unwrap_or_else(|| panic!("{case}: opened"));
        let ClusterError::NodeLogRecord { offset, source, .. } = err else {
            panic!("{case}: {err}");
        };
        assert_eq!(offset, 1, "{case}");
        let expected = match case {
            "version" => matches!(*source, ClusterError::UnsupportedVersion { found: 9, .. }),
            "kind" | "truncated" => matches!(*source, ClusterError::Decode { .. }),
            "out of order" => {
                matches!(*source, ClusterError::AppendOutOfOrder { last: 1, got: 1 })
            }
            _ => matches!(*source, ClusterError::LimitExceeded { .. }),
        };
        assert!(expected, "{case}: {source}");
    }
    let foreign = open_raw(&[ok, (crate::RAFT_ENTRY_FLAG, vec![1])]);
    assert!(matches!(
        foreign,
        Err(ClusterError::ForeignRecord {
            offset: 1,
            flags: crate::RAFT_ENTRY_FLAG
        })
    ));
}

#[test]
fn a_log_naming_more_groups_than_a_node_holds_is_refused() {
    let records: Vec<RawRecord> = (0..=MAX_GROUPS_PER_NODE as u64)
        .map(|g| (NODE_LOG_FLAG, record::encode_vote(g, &Vote::new(1, 1))))
        .collect();
    let err = open_raw(&records).err().unwrap();
    assert!(
        matches!(
            &err,
            ClusterError::NodeLogRecord { offset, source, .. }
                if *offset == MAX_GROUPS_PER_NODE as u64
                    && matches!(**source, ClusterError::LimitExceeded { .. })
        ),
        "{err}"
    );
}

fn threads() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn hundreds_of_groups_add_no_thread_and_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeLog::open(dir.path(), config()).unwrap();
    append(&node, 0, entry(1, 1, 10)).await; // starts the log's sync and prefault threads
    let before = threads();
    for g in 1..500 {
        let mut log = node.group(g).unwrap();
        log.save_vote(&Vote::new(1, 1)).await.unwrap();
        append(&node, g, entry(1, 1, 10)).await;
    }
    assert_eq!(
        threads(),
        before,
        "threads per node do not grow with its groups"
    );
    // One entry held per group: the index is one slot (8 bytes) each.
    assert!(node.index_heap_bytes().unwrap() <= 500 * 8 * 4);
}
