//! The persisted snapshot of a Raft group's state machine: the file `sm/snapshot`, which
//! holds what the snapshot covers (last log id, membership, id) and the state machine's
//! data, opaque here (a broker node's is its store state, `src/raft/snapshot.rs` in the
//! broker crate). A purged log prefix is never the only copy of applied state.
//!
//! ```text
//! // Format (file `snapshot`, envelope of state_file.rs, magic "ENTRPSNP"):
//! //   body = { last_log_id: opt<log_id> | membership_log_id: opt<log_id> | membership
//! //          | snapshot_id: str | data: bytes }
//! ```
//! Invariant: [`write_snapshot_file`] replaces the file (tmp, fsync, rename, dir fsync)
//! before it returns, so a state machine may let openraft purge the log up to the snapshot
//! right after.
//!
//! Does not: build, send or install snapshots (the state machine does), or bound a
//! snapshot's size beyond [`MAX_SNAPSHOT_BYTES`].

use std::path::Path;

use bytes::Bytes;
use openraft::{BasicNode, SnapshotMeta, StoredMembership};

use crate::codec::{Decoder, Encoder};
use crate::entry::{decode_membership, encode_membership};
use crate::error::{ClusterError, Result};
use crate::state_file::{self, decode_opt_log_id, encode_opt_log_id};
use crate::types::{NodeId, MAX_ADDRESS_BYTES};

/// Largest persisted or received snapshot: 4 GiB − 1 (the envelope's length is a u32).
pub const MAX_SNAPSHOT_BYTES: usize = u32::MAX as usize;
const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_MAGIC: &[u8; 8] = b"ENTRPSNP";

/// Persists a snapshot as `dir/snapshot` (the format above, tmp + fsync + rename).
pub fn write_snapshot_file(
    dir: &Path,
    meta: &SnapshotMeta<NodeId, BasicNode>,
    data: &[u8],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ClusterError::io("creating", dir, e))?;
    let body = encode_snapshot_file(meta, data)?;
    state_file::write(dir, SNAPSHOT_FILE, SNAPSHOT_MAGIC, &body, true)
}

/// A persisted snapshot: what it covers, and its data.
pub type SnapshotFile = (SnapshotMeta<NodeId, BasicNode>, Vec<u8>);

/// Reads the snapshot [`write_snapshot_file`] persisted in `dir`, if any.
pub fn read_snapshot_file(dir: &Path) -> Result<Option<SnapshotFile>> {
    match state_file::read_bounded(dir, SNAPSHOT_FILE, SNAPSHOT_MAGIC, MAX_SNAPSHOT_BYTES)? {
        Some(body) => decode_snapshot_file(body).map(Some),
        None => Ok(None),
    }
}

fn encode_snapshot_file(meta: &SnapshotMeta<NodeId, BasicNode>, data: &[u8]) -> Result<Vec<u8>> {
    crate::codec::check_limit("snapshot", data.len(), MAX_SNAPSHOT_BYTES - 4096)?;
    let mut e = Encoder::with_capacity(data.len() + 256);
    encode_opt_log_id(&mut e, &meta.last_log_id);
    encode_opt_log_id(&mut e, meta.last_membership.log_id());
    encode_membership(&mut e, meta.last_membership.membership())?;
    crate::codec::check_limit("snapshot id", meta.snapshot_id.len(), MAX_ADDRESS_BYTES)?;
    e.str(&meta.snapshot_id);
    e.bytes(data);
    Ok(e.buf)
}

fn decode_snapshot_file(body: Bytes) -> Result<SnapshotFile> {
    let mut d = Decoder::new(body, "snapshot file");
    let last_log_id = decode_opt_log_id(&mut d)?;
    let membership_log_id = decode_opt_log_id(&mut d)?;
    let membership = decode_membership(&mut d)?;
    let snapshot_id = d.str("snapshot id", MAX_ADDRESS_BYTES)?;
    let data = d.bytes("snapshot data", MAX_SNAPSHOT_BYTES)?.to_vec();
    d.finish()?;
    let meta = SnapshotMeta {
        last_log_id,
        last_membership: StoredMembership::new(membership_log_id, membership),
        snapshot_id,
    };
    Ok((meta, data))
}
