//! Small files replaced atomically: the Raft vote and purge point (`raft-state`, durable)
//! and the committed-index hint (`raft-committed`).
//!
//! ```text
//! // Format: { magic: [u8; 8] | version: u16 | reserved: u16 | crc: u32 | len: u32 | body }
//! // crc = CRC-32 of body; len ≤ MAX_STATE_FILE_BYTES
//! raft-state     magic "ENTRPRFT", body = { vote: opt<{ term: u64 | node: u64 | committed: u8 }>
//!                                         | purged: opt<log_id> }
//! raft-committed magic "ENTRPCMT", body = { committed: opt<log_id> }
//! opt<T> = { present: u8 | T if present };  log_id = { term: u64 | node: u64 | index: u64 }
//! ```
//! A write goes to `<name>.tmp`, is fsynced (when durable), renamed over the old file, and
//! the directory is fsynced — both syncs through `entrepot_storage::fsync`, so a simulated
//! power cut keeps only what was synced: a reader sees the old or the new file, never a
//! mix. A missing file is "nothing saved yet"; a damaged one is [`ClusterError::BadFile`].
//!
//! Does not: cache or batch writes — each save is one file write (votes and purges are
//! rare; the committed hint skips the fsyncs, see `log_store.rs`).

use std::fs;
use std::io::Write;
use std::path::Path;

use bytes::Bytes;
use openraft::{LeaderId, Vote};

use crate::codec::{Decoder, Encoder};
use crate::entry::{decode_log_id_fields, encode_log_id};
use crate::error::{ClusterError, Result};
use crate::types::{LogId, NodeId};

/// Version of the state-file envelope.
pub const STATE_FILE_VERSION: u16 = 1;
/// Largest body a state file may have (they hold a few dozen bytes).
pub const MAX_STATE_FILE_BYTES: usize = 4096;
const HEADER_LEN: usize = 8 + 2 + 2 + 4 + 4;

pub(crate) const STATE_MAGIC: &[u8; 8] = b"ENTRPRFT";
pub(crate) const COMMITTED_MAGIC: &[u8; 8] = b"ENTRPCMT";
pub(crate) const STATE_FILE: &str = "raft-state";
pub(crate) const COMMITTED_FILE: &str = "raft-committed";

/// What must survive a power cut before openraft is told it was saved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DurableState {
    pub vote: Option<Vote<NodeId>>,
    pub purged: Option<LogId>,
}

impl DurableState {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        match &self.vote {
            None => e.u8(0),
            Some(v) => {
                e.u8(1);
                e.u64(v.leader_id.term);
                e.u64(v.leader_id.node_id);
                e.u8(u8::from(v.committed));
            }
        }
        encode_opt_log_id(&mut e, &self.purged);
        e.buf
    }

    pub(crate) fn decode(body: Bytes) -> Result<DurableState> {
        let mut d = Decoder::new(body, "raft-state file");
        let vote = match d.bool()? {
            false => None,
            true => {
                let term = d.u64()?;
                let node = d.u64()?;
                let committed = d.bool()?;
                Some(Vote {
                    leader_id: LeaderId::new(term, node),
                    committed,
                })
            }
        };
        let purged = decode_opt_log_id(&mut d)?;
        d.finish()?;
        Ok(DurableState { vote, purged })
    }
}

pub(crate) fn encode_opt_log_id(e: &mut Encoder, id: &Option<LogId>) {
    match id {
        None => e.u8(0),
        Some(id) => {
            e.u8(1);
            encode_log_id(e, id);
        }
    }
}

pub(crate) fn decode_opt_log_id(d: &mut Decoder) -> Result<Option<LogId>> {
    match d.bool()? {
        false => Ok(None),
        true => decode_log_id_fields(d).map(Some),
    }
}

/// Replaces `dir/name` with `body` in the envelope above. With `durable`, returns only
/// after the new content and the rename are on stable storage.
pub(crate) fn write(
    dir: &Path,
    name: &str,
    magic: &[u8; 8],
    body: &[u8],
    durable: bool,
) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut buf = Vec::with_capacity(HEADER_LEN + body.len());
    buf.extend_from_slice(magic);
    buf.extend_from_slice(&STATE_FILE_VERSION.to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(body);
    let mut f = fs::File::create(&tmp).map_err(|e| ClusterError::io("creating", &tmp, e))?;
    f.write_all(&buf)
        .map_err(|e| ClusterError::io("writing", &tmp, e))?;
    if durable {
        entrepot_storage::fsync::sync_file(&f, &tmp)
            .map_err(|e| ClusterError::io("syncing", &tmp, e))?;
    }
    drop(f);
    fs::rename(&tmp, &path).map_err(|e| ClusterError::io("renaming", &path, e))?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Reads the body of `dir/name`, `None` if the file does not exist.
pub(crate) fn read(dir: &Path, name: &str, magic: &[u8; 8]) -> Result<Option<Bytes>> {
    read_bounded(dir, name, magic, MAX_STATE_FILE_BYTES)
}

/// Like [`read`], for a file whose body may be up to `max` bytes (snapshots).
pub(crate) fn read_bounded(
    dir: &Path,
    name: &str,
    magic: &[u8; 8],
    max: usize,
) -> Result<Option<Bytes>> {
    let path = dir.join(name);
    match fs::metadata(&path) {
        Ok(m) if m.len() > (HEADER_LEN + max) as u64 => {
            return Err(ClusterError::LimitExceeded {
                what: "state file",
                len: m.len(),
                max: max as u64,
            })
        }
        _ => {}
    }
    let raw = match fs::read(&path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ClusterError::io("reading", &path, e)),
    };
    let bad = |reason| ClusterError::BadFile {
        path: path.clone(),
        reason,
    };
    if raw.len() < HEADER_LEN || &raw[..8] != magic {
        return Err(bad("bad magic"));
    }
    let version = u16::from_le_bytes([raw[8], raw[9]]);
    if version != STATE_FILE_VERSION {
        return Err(ClusterError::UnsupportedVersion {
            what: "raft state file",
            found: version,
            supported: STATE_FILE_VERSION,
        });
    }
    let crc = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
    let len = u32::from_le_bytes([raw[16], raw[17], raw[18], raw[19]]) as usize;
    if len > max || raw.len() != HEADER_LEN + len {
        return Err(bad("length does not match the file"));
    }
    let body = Bytes::from(raw).slice(HEADER_LEN..);
    if crc32fast::hash(&body) != crc {
        return Err(bad("checksum mismatch"));
    }
    Ok(Some(body))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    entrepot_storage::fsync::sync_dir(dir)
        .map_err(|e| ClusterError::io("syncing directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    #[test]
    fn state_survives_a_reopen_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path(), STATE_FILE, STATE_MAGIC).unwrap().is_none());
        let state = DurableState {
            vote: Some(Vote::new_committed(3, 1)),
            purged: Some(LogId::new(CommittedLeaderId::new(2, 1), 99)),
        };
        write(dir.path(), STATE_FILE, STATE_MAGIC, &state.encode(), true).unwrap();
        let body = read(dir.path(), STATE_FILE, STATE_MAGIC).unwrap().unwrap();
        assert_eq!(DurableState::decode(body).unwrap(), state);

        let path = dir.path().join(STATE_FILE);
        let mut raw = fs::read(&path).unwrap();
        *raw.last_mut().unwrap() ^= 1;
        fs::write(&path, &raw).unwrap();
        assert!(matches!(
            read(dir.path(), STATE_FILE, STATE_MAGIC),
            Err(ClusterError::BadFile {
                reason: "checksum mismatch",
                ..
            })
        ));
        raw[8] = 2;
        fs::write(&path, &raw).unwrap();
        assert!(matches!(
            read(dir.path(), STATE_FILE, STATE_MAGIC),
            Err(ClusterError::UnsupportedVersion { found: 2, .. })
        ));
    }
}
