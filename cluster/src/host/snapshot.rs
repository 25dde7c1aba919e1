//! A group's snapshot as the host keeps and ships it: the state machine's own opaque state
//! plus the payloads of the entries the machine still reads that the receiver cannot find
//! in its node log ("carried" entries).
//!
//! ```text
//! // Format: host snapshot data, version 2 (inside the snapshot file of snapshot_file.rs,
//! // and, the same bytes, on the wire in openraft's snapshot chunks)
//! { version: u8 | lowest_needed: u64 | state: { len: u32 | bytes }
//!   | n: u32 | n × { index: u64 | kind: u8 | len: u32 | body } }  integers little-endian
//! // kind 1: one payload (an `Ops` entry); kind 2: a batch body (`batch.rs`)
//! // version 1 (read, no longer written): entries without `kind`, each one payload
//! ```
//! * `lowest_needed` is the machine's [`GroupMachine::lowest_needed`] when the snapshot
//!   was built: the log is purged only below it, so entries `lowest_needed..=last` stay
//!   readable on the node that built it.
//! * Persisted (`groups/<g>/snapshot`), the entries are only those the node log no longer
//!   holds (the ones a snapshot install brought, still needed). Sent, they are every
//!   payload entry `lowest_needed..=last`, taken as zero-copy slices of the node log when
//!   the sender generates the chunks ([`PartsSource`]): the receiver's log holds none of
//!   them.
//! * Entries are in increasing index order; an unknown version is
//!   [`ClusterError::UnsupportedVersion`], a count or length past its bound
//!   [`ClusterError::LimitExceeded`].
//!
//! [`GroupMachine::lowest_needed`]: super::GroupMachine::lowest_needed

use std::collections::BTreeMap;

use bytes::Bytes;

use super::batch::Slots;
use crate::codec::{check_limit, Decoder, Encoder};
use crate::error::{ClusterError, Result};
use crate::snapshot_data::SnapshotSource;
use crate::snapshot_file::MAX_SNAPSHOT_BYTES;

/// Version byte of the host snapshot data.
pub const HOST_SNAPSHOT_VERSION: u8 = 2;
/// The version before batches: entries are single payloads, without a kind byte.
const HOST_SNAPSHOT_V1: u8 = 1;
const KIND_ONE: u8 = 1;
const KIND_BATCH: u8 = 2;
/// Most entries one host snapshot carries.
pub const MAX_CARRIED_ENTRIES: usize = 16 << 20;

/// A decoded host snapshot; payloads are slices of the decoded buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HostSnapshot {
    pub lowest_needed: u64,
    pub state: Bytes,
    pub entries: BTreeMap<u64, Slots>,
}

/// The encoding as parts to concatenate: small headers plus the payloads themselves, so
/// that payloads are never copied to build it.
pub(crate) fn encode_parts(
    lowest_needed: u64,
    state: &Bytes,
    entries: &BTreeMap<u64, Slots>,
) -> Result<Vec<Bytes>> {
    check_limit(
        "host snapshot state (MAX_SNAPSHOT_BYTES)",
        state.len(),
        MAX_SNAPSHOT_BYTES,
    )?;
    check_limit(
        "host snapshot entries (MAX_CARRIED_ENTRIES)",
        entries.len(),
        MAX_CARRIED_ENTRIES,
    )?;
    let mut parts = Vec::with_capacity(2 + 2 * entries.len());
    let mut head = Encoder::with_capacity(1 + 8 + 4);
    head.u8(HOST_SNAPSHOT_VERSION);
    head.u64(lowest_needed);
    head.u32(state.len() as u32);
    parts.push(Bytes::from(head.buf));
    parts.push(state.clone());
    let mut count = Encoder::with_capacity(4);
    count.u32(entries.len() as u32);
    parts.push(Bytes::from(count.buf));
    for (index, slots) in entries {
        let (kind, payload) = match slots {
            Slots::One(b) => (KIND_ONE, b),
            Slots::Batch(b) => (KIND_BATCH, b),
        };
        check_limit(
            "host snapshot entry (MAX_SNAPSHOT_BYTES)",
            payload.len(),
            MAX_SNAPSHOT_BYTES,
        )?;
        let mut e = Encoder::with_capacity(13);
        e.u64(*index);
        e.u8(kind);
        e.u32(payload.len() as u32);
        parts.push(Bytes::from(e.buf));
        parts.push(payload.clone());
    }
    let total: usize = parts.iter().map(Bytes::len).sum();
    check_limit(
        "host snapshot (MAX_SNAPSHOT_BYTES)",
        total,
        MAX_SNAPSHOT_BYTES,
    )?;
    Ok(parts)
}

/// The parts of [`encode_parts`] in one buffer (the persisted file's data).
pub(crate) fn concat(parts: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(Bytes::len).sum());
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

pub(crate) fn decode(data: Bytes) -> Result<HostSnapshot> {
    let mut d = Decoder::new(data, "host snapshot");
    let version = d.u8()?;
    if version != HOST_SNAPSHOT_VERSION && version != HOST_SNAPSHOT_V1 {
        return Err(ClusterError::UnsupportedVersion {
            what: "host snapshot",
            found: u16::from(version),
            supported: u16::from(HOST_SNAPSHOT_VERSION),
        });
    }
    let lowest_needed = d.u64()?;
    let state = d.bytes(
        "host snapshot state (MAX_SNAPSHOT_BYTES)",
        MAX_SNAPSHOT_BYTES,
    )?;
    let n = d.count(
        "host snapshot entries (MAX_CARRIED_ENTRIES)",
        MAX_CARRIED_ENTRIES,
        12,
    )?;
    let mut entries = BTreeMap::new();
    let mut last = None;
    for _ in 0..n {
        let index = d.u64()?;
        if last.is_some_and(|l| l >= index) {
            return Err(d.fail("host snapshot entries out of order"));
        }
        last = Some(index);
        let kind = match version {
            HOST_SNAPSHOT_V1 => KIND_ONE,
            _ => d.u8()?,
        };
        let body = d.bytes(
            "host snapshot entry (MAX_SNAPSHOT_BYTES)",
            MAX_SNAPSHOT_BYTES,
        )?;
        let slots = match kind {
            KIND_ONE => Slots::One(body),
            KIND_BATCH => Slots::Batch(body),
            _ => return Err(d.fail("unknown host snapshot entry kind")),
        };
        entries.insert(index, slots);
    }
    d.finish()?;
    Ok(HostSnapshot {
        lowest_needed,
        state,
        entries,
    })
}

/// Snapshot bytes generated from parts on read: what the sender ships, without building
/// it in one buffer.
pub(crate) struct PartsSource {
    parts: Vec<Bytes>,
    /// Start position of each part.
    starts: Vec<u64>,
    len: u64,
}

impl PartsSource {
    pub(crate) fn new(parts: Vec<Bytes>) -> PartsSource {
        let mut starts = Vec::with_capacity(parts.len());
        let mut len = 0u64;
        for p in &parts {
            starts.push(len);
            len += p.len() as u64;
        }
        PartsSource { parts, starts, len }
    }
}

impl SnapshotSource for PartsSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, pos: u64, buf: &mut [u8]) -> usize {
        if pos >= self.len {
            return 0;
        }
        let mut i = match self.starts.binary_search(&pos) {
            Ok(i) => i,
            Err(i) => i - 1, // pos < len, so some part starts before it
        };
        let mut at = pos;
        let mut written = 0;
        while written < buf.len() && i < self.parts.len() {
            let part = &self.parts[i];
            // `at` lies in part i: starts[i] <= at < starts[i] + len.
            let within = (at - self.starts[i]) as usize;
            let n = (part.len() - within).min(buf.len() - written);
            buf[written..written + n].copy_from_slice(&part[within..within + n]);
            written += n;
            at += n as u64;
            i += 1;
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_read_at_any_position() {
        let batch = super::super::batch::encode(&[Bytes::from_static(b"x"), Bytes::new()]);
        let entries: BTreeMap<u64, Slots> = [
            (3, Slots::One(Bytes::from_static(b"abc"))),
            (9, Slots::One(Bytes::new())),
            (11, Slots::Batch(batch)),
        ]
        .into_iter()
        .collect();
        let parts = encode_parts(3, &Bytes::from_static(b"state"), &entries).unwrap();
        let whole = concat(&parts);
        let back = decode(Bytes::from(whole.clone())).unwrap();
        assert_eq!(back.lowest_needed, 3);
        assert_eq!(&back.state[..], b"state");
        assert_eq!(back.entries, entries);
        let source = PartsSource::new(parts);
        assert_eq!(source.len(), whole.len() as u64);
        for pos in 0..whole.len() {
            for step in [1, 2, 7, 100] {
                let mut buf = vec![0; step];
                let n = source.read_at(pos as u64, &mut buf);
                let want = &whole[pos..(pos + step).min(whole.len())];
                assert_eq!(&buf[..n], want, "pos {pos} step {step}");
            }
        }
        assert_eq!(source.read_at(whole.len() as u64, &mut [0; 4]), 0);
    }

    #[test]
    fn bad_version_and_disorder_are_typed_errors() {
        let parts = encode_parts(0, &Bytes::new(), &BTreeMap::new()).unwrap();
        let mut whole = concat(&parts);
        whole[0] = 9;
        assert!(matches!(
            decode(Bytes::from(whole)),
            Err(ClusterError::UnsupportedVersion { found: 9, .. })
        ));
        let mut e = Encoder::with_capacity(64);
        e.u8(HOST_SNAPSHOT_VERSION);
        e.u64(0);
        e.u32(0);
        e.u32(2);
        for index in [5, 5] {
            e.u64(index);
            e.u8(KIND_ONE);
            e.u32(0);
        }
        assert!(matches!(
            decode(Bytes::from(e.buf)),
            Err(ClusterError::Decode { .. })
        ));
        let mut e = Encoder::with_capacity(64);
        e.u8(HOST_SNAPSHOT_VERSION);
        e.u64(0);
        e.u32(0);
        e.u32(1);
        e.u64(1);
        e.u8(7);
        e.u32(0);
        assert!(matches!(
            decode(Bytes::from(e.buf)),
            Err(ClusterError::Decode { .. })
        ));
    }

    /// What a build before batching persisted (version 1: entries without a kind) reads
    /// as single payloads.
    #[test]
    fn version_1_reads_as_single_payloads() {
        let mut e = Encoder::with_capacity(64);
        e.u8(HOST_SNAPSHOT_V1);
        e.u64(4);
        e.bytes(b"st");
        e.u32(2);
        for (index, body) in [(4u64, &b"four"[..]), (6, b"six")] {
            e.u64(index);
            e.bytes(body);
        }
        let back = decode(Bytes::from(e.buf)).unwrap();
        assert_eq!(back.lowest_needed, 4);
        assert_eq!(&back.state[..], b"st");
        assert_eq!(
            back.entries.into_iter().collect::<Vec<_>>(),
            vec![
                (4, Slots::One(Bytes::from_static(b"four"))),
                (6, Slots::One(Bytes::from_static(b"six")))
            ]
        );
    }
}
