//! Goal: our Raft log storage and state machine satisfy openraft's own storage contract.
//! Method: openraft's conformance suite (`openraft::testing::Suite::test_all`) against a
//! `LogStore` + `StateMachineStore` in a fresh temporary directory per case, with small
//! segments so purges and truncations cross segment boundaries.

// openraft's error types are large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

use entrepot_cluster::{LogStore, RaftStorageError, StateMachineStore, TypeConfig};
use entrepot_storage::{LogConfig, SyncPolicy};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{AnyError, StorageIOError};

struct TempStores {
    sync: SyncPolicy,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for TempStores {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), RaftStorageError> {
        let io = |e: &dyn std::error::Error| -> RaftStorageError {
            StorageIOError::write(AnyError::error(e.to_string())).into()
        };
        let dir = tempfile::tempdir().map_err(|e| io(&e))?;
        let config = LogConfig {
            segment_bytes: 64 * 1024,
            record_bytes_max: 32 * 1024,
            sync: self.sync,
            ..LogConfig::default()
        };
        let log = LogStore::open(dir.path(), config).map_err(|e| io(&e))?;
        let sm = StateMachineStore::open(dir.path().join("sm")).map_err(|e| io(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes_with_fsync_on_every_group_commit() -> Result<(), RaftStorageError>
{
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_test_writer()
        .try_init();
    Suite::test_all(TempStores {
        sync: SyncPolicy::Always,
    })
}
