//! The records of a node log: what one segment-log record says about one Raft group.
//!
//! ```text
//! // Format: { version: u8 | kind: u8 | group: u64 | body }   (record flags NODE_LOG_FLAG)
//! kind 1 entry     body = a Raft entry in the encoding of entry.rs (its own version byte)
//! kind 2 truncate  body = { since: u64 }          entries of the group at index ≥ since are gone
//! kind 3 purge     body = { log_id }               entries at or below log_id.index are purged
//! kind 4 vote      body = { term: u64 | node: u64 | committed: u8 }
//! kind 5 remove    body = {}                       the group left this node; its state is dropped
//! log_id = { term: u64 | leader_node: u64 | index: u64 }; integers little-endian
//! ```
//! The segment log's frame carries the CRC, so there is none here. An unknown version is
//! [`ClusterError::UnsupportedVersion`], an unknown kind or trailing bytes
//! [`ClusterError::Decode`] — never a guess.

use bytes::Bytes;
use openraft::{LeaderId, Vote};

use crate::codec::{Decoder, Encoder};
use crate::entry::{decode_entry, decode_log_id, decode_log_id_fields, encode_log_id};
use crate::error::{ClusterError, Result};
use crate::placement::GroupId;
use crate::types::{Entry, LogId, NodeId};

/// Version byte of the node-log record header.
pub const NODE_RECORD_VERSION: u8 = 1;
/// Bytes before a record's body: version, kind, group.
pub const NODE_RECORD_HEADER_LEN: usize = 1 + 1 + 8;
/// Record flags marking a node-log record (a group's `LogStore` uses
/// [`crate::RAFT_ENTRY_FLAG`]; the two never share a segment log).
pub const NODE_LOG_FLAG: u16 = 0x20;

const KIND_ENTRY: u8 = 1;
const KIND_TRUNCATE: u8 = 2;
const KIND_PURGE: u8 = 3;
const KIND_VOTE: u8 = 4;
const KIND_REMOVE: u8 = 5;

/// What a record says, decoded only as far as recovery needs (an entry's log id, not its
/// payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NodeRecord {
    Entry(LogId),
    Truncate { since: u64 },
    Purge(LogId),
    Vote(Vote<NodeId>),
    Remove,
}

/// The header of a record of `kind` for `group`.
fn header(kind: u8, group: GroupId) -> Encoder {
    let mut e = Encoder::with_capacity(NODE_RECORD_HEADER_LEN + 32);
    e.u8(NODE_RECORD_VERSION);
    e.u8(kind);
    e.u64(group);
    e
}

/// The header to write before an entry's own encoding (`entry_parts`).
pub(crate) fn entry_header(group: GroupId) -> Vec<u8> {
    header(KIND_ENTRY, group).buf
}

pub(crate) fn encode_truncate(group: GroupId, since: u64) -> Vec<u8> {
    let mut e = header(KIND_TRUNCATE, group);
    e.u64(since);
    e.buf
}

pub(crate) fn encode_purge(group: GroupId, log_id: &LogId) -> Vec<u8> {
    let mut e = header(KIND_PURGE, group);
    encode_log_id(&mut e, log_id);
    e.buf
}

pub(crate) fn encode_vote(group: GroupId, vote: &Vote<NodeId>) -> Vec<u8> {
    let mut e = header(KIND_VOTE, group);
    e.u64(vote.leader_id.term);
    e.u64(vote.leader_id.node_id);
    e.u8(u8::from(vote.committed));
    e.buf
}

pub(crate) fn encode_remove(group: GroupId) -> Vec<u8> {
    header(KIND_REMOVE, group).buf
}

/// Decodes a record's header and what recovery needs of its body.
pub(crate) fn decode(payload: Bytes) -> Result<(GroupId, NodeRecord)> {
    let mut d = Decoder::new(payload.clone(), "node-log record");
    let (kind, group) = decode_header(&mut d)?;
    let record = match kind {
        KIND_ENTRY => {
            return Ok((
                group,
                NodeRecord::Entry(decode_log_id(payload.slice(NODE_RECORD_HEADER_LEN..))?),
            ))
        }
        KIND_TRUNCATE => NodeRecord::Truncate { since: d.u64()? },
        KIND_PURGE => NodeRecord::Purge(decode_log_id_fields(&mut d)?),
        KIND_VOTE => {
            let term = d.u64()?;
            let node = d.u64()?;
            let committed = d.bool()?;
            NodeRecord::Vote(Vote {
                leader_id: LeaderId::new(term, node),
                committed,
            })
        }
        KIND_REMOVE => NodeRecord::Remove,
        _ => return Err(d.fail("unknown node-log record kind")),
    };
    d.finish()?;
    Ok((group, record))
}

/// Decodes an entry record of `group` whole (the read path).
pub(crate) fn decode_group_entry(payload: Bytes, group: GroupId) -> Result<Entry> {
    let mut d = Decoder::new(payload.clone(), "node-log record");
    let (kind, found) = decode_header(&mut d)?;
    if kind != KIND_ENTRY || found != group {
        return Err(d.fail("not an entry of this group"));
    }
    decode_entry(payload.slice(NODE_RECORD_HEADER_LEN..))
}

/// Reads `version | kind | group`, leaving the decoder after them.
fn decode_header(d: &mut Decoder) -> Result<(u8, GroupId)> {
    let version = d.u8()?;
    if version != NODE_RECORD_VERSION {
        return Err(ClusterError::UnsupportedVersion {
            what: "node-log record",
            found: u16::from(version),
            supported: u16::from(NODE_RECORD_VERSION),
        });
    }
    let kind = d.u8()?;
    Ok((kind, d.u64()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 2), index)
    }

    #[test]
    fn every_kind_round_trips() {
        let vote = Vote::new_committed(7, 3);
        let cases = [
            (encode_truncate(9, 12), NodeRecord::Truncate { since: 12 }),
            (encode_purge(9, &id(3, 40)), NodeRecord::Purge(id(3, 40))),
            (encode_vote(9, &vote), NodeRecord::Vote(vote)),
            (encode_remove(9), NodeRecord::Remove),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode(Bytes::from(bytes)).unwrap(), (9, want));
        }
    }

    #[test]
    fn unknown_version_kind_and_trailing_bytes_are_typed_errors() {
        let mut bad_version = encode_remove(1);
        bad_version[0] = 2;
        assert!(matches!(
            decode(Bytes::from(bad_version)),
            Err(ClusterError::UnsupportedVersion { found: 2, .. })
        ));
        let mut bad_kind = encode_remove(1);
        bad_kind[1] = 99;
        assert!(matches!(
            decode(Bytes::from(bad_kind)),
            Err(ClusterError::Decode {
                reason: "unknown node-log record kind",
                ..
            })
        ));
        let mut trailing = encode_remove(1);
        trailing.push(0);
        assert!(matches!(
            decode(Bytes::from(trailing)),
            Err(ClusterError::Decode {
                reason: "trailing bytes",
                ..
            })
        ));
        let short = encode_truncate(1, 5);
        assert!(matches!(
            decode(Bytes::from(short[..short.len() - 1].to_vec())),
            Err(ClusterError::Decode {
                reason: "truncated",
                ..
            })
        ));
    }
}
