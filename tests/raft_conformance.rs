//! Goal: a broker node's real Raft storage — the cluster crate's `LogStore` and the broker's
//! `StoreMachine` over its store — keeps openraft's storage contract, and keeps what a
//! broker node relies on beyond it: a replicated `Request::Ops` batch applied on a follower
//! leaves the leader's messages, acknowledgements, delivery counts and registry; applying
//! again (openraft re-applies the committed log after a restart) changes nothing; a
//! snapshot built on one node and installed on a fresh one gives the same store.
//! Method: openraft's conformance suite (`openraft::testing::Suite::test_all`) on a fresh
//! store and Raft log per case, with 64 KiB segments (the smallest the storage crate
//! allows, so purges and truncations cross segment boundaries), once per sync policy. The
//! suite applies only blank and membership entries, so the rest is driven here: real ops
//! batches come from a leader's `Store` recording into a `Replication`, as a broker's do.

// openraft's error types are large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use entrepot::broker::replication::Replication;
use entrepot::broker::store::Store;
use entrepot::broker::subscriptions::REGISTRY_FILE;
use entrepot::raft::state_machine::StoreMachine;
use entrepot_cluster::{
    LogId, LogStore, NodeId, RaftStorageError, Request, Response, SnapshotData, TypeConfig,
};
use entrepot_storage::{LogConfig, SyncPolicy};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    AnyError, BasicNode, CommittedLeaderId, Entry, EntryPayload, Membership, RaftSnapshotBuilder,
    StorageIOError, StoredMembership,
};

/// Segment size of the store and the Raft log: the storage crate's minimum.
const SEGMENT_BYTES: u64 = entrepot_storage::MIN_SEGMENT_BYTES;
/// Largest record of either log.
const RECORD_BYTES_MAX: u32 = 32 * 1024;
/// Address the messages of these tests go to.
const ADDRESS: &str = "orders";
/// Consumer group of the subscription these tests move.
const GROUP: u32 = 7;

/// A node's store, its state machine and its Raft log in a fresh temporary directory.
struct RealStores {
    sync: SyncPolicy,
}

fn storage_err(e: impl std::fmt::Display) -> RaftStorageError {
    StorageIOError::write(AnyError::error(e.to_string())).into()
}

/// Opens the state machine over the store in `dir`, as a broker node does at start.
fn open_machine(dir: &Path, sync: SyncPolicy) -> Result<StoreMachine, RaftStorageError> {
    let (log, acks) =
        Store::open_parts(dir, sync, SEGMENT_BYTES, RECORD_BYTES_MAX).map_err(storage_err)?;
    StoreMachine::new(dir.to_path_buf(), log, Arc::new(acks)).map_err(storage_err)
}

impl StoreBuilder<TypeConfig, LogStore, StoreMachine, tempfile::TempDir> for RealStores {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StoreMachine), RaftStorageError> {
        let dir = tempfile::tempdir().map_err(storage_err)?;
        let machine = open_machine(dir.path(), self.sync)?;
        let config = LogConfig {
            segment_bytes: SEGMENT_BYTES,
            record_bytes_max: RECORD_BYTES_MAX,
            sync: self.sync,
            ..LogConfig::default()
        };
        let raft_dir = entrepot::raft::raft_dir(dir.path());
        let log = LogStore::open(&raft_dir, config).map_err(storage_err)?;
        Ok((dir, log, machine))
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_test_writer()
        .try_init();
}

#[test]
fn openraft_storage_suite_passes_on_the_real_machine_with_fsync_on_every_group_commit(
) -> Result<(), RaftStorageError> {
    init_tracing();
    Suite::test_all(RealStores {
        sync: SyncPolicy::Always,
    })
}

#[test]
fn openraft_storage_suite_passes_on_the_real_machine_without_fsync() -> Result<(), RaftStorageError>
{
    init_tracing();
    Suite::test_all(RealStores {
        sync: SyncPolicy::Never,
    })
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 0), index)
}

fn voters() -> Membership<NodeId, BasicNode> {
    Membership::new(vec![BTreeSet::from([0, 1, 2])], None)
}

/// What a leader's broker replicates, as Raft entries from index 1: a blank entry (a new
/// leader's first), the membership, then the leader's store changes as `Request::Ops`
/// batches — messages, acknowledgements of two of them, a subscription's group floor and
/// acknowledgement, a delivery count, the registry file. Also returns the messages the
/// leader's store holds unacknowledged, by offset.
fn leader_entries() -> (Vec<Entry<TypeConfig>>, BTreeMap<u64, Bytes>) {
    let dir = tempfile::tempdir().unwrap();
    let (log, acks) = Store::open_parts(
        dir.path(),
        SyncPolicy::Never,
        SEGMENT_BYTES,
        RECORD_BYTES_MAX,
    )
    .unwrap();
    let replication = Arc::new(Replication::new());
    let store = Store::replicated(dir.path(), log, Arc::new(acks), Arc::clone(&replication));
    let mut batches = Vec::new();
    let mut offsets = Vec::new();
    // Enough messages that the store's log spans several 64 KiB segments.
    for i in 0..40u32 {
        let body = vec![(i % 251) as u8; 3000 + i as usize];
        let (_, offset, _, _) = store.append(ADDRESS, &[&body]).unwrap();
        offsets.push(offset);
        if i % 10 == 9 {
            batches.push(replication.take().unwrap().ops);
        }
    }
    store.ack(&[offsets[1], offsets[3], offsets[25]]).unwrap();
    store.start_group(GROUP, offsets[2]).unwrap();
    store.ack_group(GROUP, &[offsets[5]]).unwrap();
    store.set_delivery_count(0, offsets[4], 3).unwrap();
    store
        .put_file(REGISTRY_FILE, b"version: 1\nsubscriptions: []\n")
        .unwrap();
    batches.push(replication.take().unwrap().ops);
    assert!(replication.take().is_none());

    let mut entries = vec![
        Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(1, 2),
            payload: EntryPayload::Membership(voters()),
        },
    ];
    for (i, ops) in batches.into_iter().enumerate() {
        entries.push(Entry {
            log_id: log_id(1, 3 + i as u64),
            payload: EntryPayload::Normal(Request::Ops(ops)),
        });
    }
    // The leader's own store does not hold its acks yet (they wait for the commit); its
    // unacknowledged messages are those the followers must keep.
    let acked = [offsets[1], offsets[3], offsets[25]];
    let live = store
        .recover()
        .unwrap()
        .into_iter()
        .filter(|m| !acked.contains(&m.offset))
        .map(|m| (m.offset, m.message))
        .collect();
    (entries, live)
}

/// Everything of a node's store a broker reads back: live messages by offset, what the
/// default and the subscription's groups acknowledged, delivery counts, the registry.
#[derive(PartialEq, Eq)]
struct Content {
    live: BTreeMap<u64, (String, Bytes)>,
    acked: Vec<u64>,
    group_acked: Vec<u64>,
    counts: Vec<(u64, u32)>,
    registry: Option<Vec<u8>>,
    message_end: u64,
}

/// Bodies are shown by length: a failure prints offsets, not megabytes.
impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let live: Vec<(u64, usize)> = self.live.iter().map(|(o, (_, m))| (*o, m.len())).collect();
        f.debug_struct("Content")
            .field("live (offset, bytes)", &live)
            .field("acked", &self.acked)
            .field("group_acked", &self.group_acked)
            .field("counts", &self.counts)
            .field(
                "registry",
                &self.registry.as_ref().map(|r| String::from_utf8_lossy(r)),
            )
            .field("message_end", &self.message_end)
            .finish()
    }
}

fn content(machine: &StoreMachine) -> Content {
    let (log, acks) = machine.logs();
    let message_end = log.next_offset();
    let store = Store::replicated(machine.dir(), log, acks, Arc::new(Replication::new()));
    let live = store
        .recover()
        .unwrap()
        .into_iter()
        .map(|m| (m.offset, (m.address, m.message)))
        .collect();
    Content {
        live,
        acked: (0..message_end)
            .filter(|o| store.acks().is_acked(*o))
            .collect(),
        group_acked: (0..message_end)
            .filter(|o| store.group_acked(GROUP, *o))
            .collect(),
        counts: (0..message_end)
            .map(|o| (o, store.delivery_count(0, o)))
            .filter(|(_, c)| *c > 0)
            .collect(),
        registry: std::fs::read(machine.dir().join(REGISTRY_FILE)).ok(),
        message_end,
    }
}

fn applied(live: &BTreeMap<u64, Bytes>) -> BTreeMap<u64, (String, Bytes)> {
    live.iter()
        .map(|(o, m)| (*o, (ADDRESS.to_string(), m.clone())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_ops_batch_applies_to_the_store_and_applying_again_after_a_restart_changes_nothing(
) {
    init_tracing();
    let (entries, live) = leader_entries();
    let last = entries.last().unwrap().log_id;
    let dir = tempfile::tempdir().unwrap();
    let mut machine = open_machine(dir.path(), SyncPolicy::Always).unwrap();

    let replies = machine.apply(entries.clone()).await.unwrap();
    // The replicator (`src/raft/replicator.rs`) reads only that an entry applied: every
    // entry, an ops batch included, answers `Response::None`.
    assert_eq!(replies, vec![Response::None; entries.len()]);
    assert_eq!(
        machine.applied_state().await.unwrap(),
        (
            Some(last),
            StoredMembership::new(Some(log_id(1, 2)), voters())
        )
    );
    let first = content(&machine);
    let offsets: Vec<u64> = first.live.keys().copied().collect();
    assert_eq!(offsets, live.keys().copied().collect::<Vec<_>>());
    assert!(first.live == applied(&live), "the leader's live messages");
    assert_eq!(first.acked.len(), 3, "the acknowledged ones: {first:?}");
    assert_eq!(first.counts.len(), 1);
    assert_eq!(
        first.registry.as_deref(),
        Some(&b"version: 1\nsubscriptions: []\n"[..])
    );
    assert!(
        !first.group_acked.is_empty(),
        "the subscription's group moved"
    );
    assert_eq!(machine.applied_message_end(), Some(first.message_end));

    // Applying the same entries again in the same process changes nothing.
    machine.apply(entries.clone()).await.unwrap();
    assert_eq!(content(&machine), first);

    // A restart: no snapshot was built, so the machine starts with nothing applied and
    // openraft re-applies the committed log from its start.
    drop(machine);
    let mut machine = open_machine(dir.path(), SyncPolicy::Always).unwrap();
    assert_eq!(machine.applied_state().await.unwrap().0, None);
    assert_eq!(
        content(&machine),
        first,
        "the store on disk kept everything"
    );
    machine.apply(entries).await.unwrap();
    assert_eq!(content(&machine), first, "re-applying changed nothing");
    assert_eq!(machine.applied_state().await.unwrap().0, Some(last));
}

/// Copies a snapshot the way openraft's chunked transfer does: read from the sender's
/// data, written into what the receiver's `begin_receiving_snapshot` gave.
async fn transfer(
    snapshot: Snapshot<TypeConfig>,
    receiver: &mut StoreMachine,
) -> Box<SnapshotData> {
    let mut from = snapshot.snapshot;
    let mut into = receiver.begin_receiving_snapshot().await.unwrap();
    tokio::io::copy(&mut *from, &mut *into).await.unwrap();
    into
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_installed_on_a_fresh_node_gives_the_same_store() {
    init_tracing();
    let (entries, _) = leader_entries();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut sender = open_machine(a.path(), SyncPolicy::Always).unwrap();
    sender.apply(entries).await.unwrap();
    let built = sender
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let current = sender.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, built.meta);

    let mut receiver = open_machine(b.path(), SyncPolicy::Always).unwrap();
    let meta = current.meta.clone();
    let data = transfer(current, &mut receiver).await;
    receiver.install_snapshot(&meta, data).await.unwrap();
    assert_eq!(
        receiver.applied_state().await.unwrap(),
        sender.applied_state().await.unwrap()
    );
    let sent = content(&sender);
    let installed = content(&receiver);
    let offsets = |c: &Content| c.live.keys().copied().collect::<Vec<_>>();
    assert_eq!(offsets(&installed), offsets(&sent), "live message offsets");
    assert!(
        installed.live == sent.live,
        "live messages differ in content"
    );
    assert_eq!(installed.group_acked, sent.group_acked);
    assert_eq!(installed.counts, sent.counts);
    assert_eq!(installed.registry, sent.registry);
    assert_eq!(installed.message_end, sent.message_end);
    // Acknowledged messages below the first live one are not carried (the receiver's log
    // starts there); from it on, the acknowledgements are the sender's.
    let first_live = *sent.live.keys().next().unwrap();
    let acked_from = |c: &Content| -> Vec<u64> {
        c.acked
            .iter()
            .copied()
            .filter(|o| *o >= first_live)
            .collect()
    };
    assert_eq!(acked_from(&installed), acked_from(&sent));
    assert_eq!(receiver.applied_message_end(), sender.applied_message_end());

    // The receiver serves the same snapshot on, and restarts from it.
    let again = receiver.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(again.meta, meta);
    drop(receiver);
    let mut restarted = open_machine(b.path(), SyncPolicy::Always).unwrap();
    assert_eq!(
        restarted.applied_state().await.unwrap(),
        (meta.last_log_id, meta.last_membership.clone())
    );
    assert!(
        content(&restarted).live == sent.live,
        "restarted from the snapshot"
    );
}
