//! The binary encoding of a Raft entry, as stored in one segment-log record.
//!
//! ```text
//! // Format: { version: u8 | term: u64 | leader_node: u64 | index: u64 | kind: u8 | body }
//! kind 0 blank       body = {}
//! kind 1 request     body = request
//! kind 2 membership  body = { sets: u8 | sets × { n: u32 | n × node_id: u64 }
//!                            | nodes: u32 | nodes × { node_id: u64 | addr: str } }
//! request: tag 1 Produce { address: str | n: u32 | n × { len: u32 | bytes } }
//!          tag 2 Settle  { address: str | n: u32 | n × id: u64 }
//!          tag 3 Cursor  { subscription: str | floor: u64 }
//!          tag 4 Ops     { len: u32 | bytes }   (broker store operations, opaque here)
//!          tag 5 Batch   { len: u32 | bytes }   (the host's proposals, `host/batch.rs`)
//! str = { len: u16 | utf8 }; integers little-endian
//! ```
//! The segment log's record frame already carries a CRC, so there is none here. An
//! unknown version is [`ClusterError::UnsupportedVersion`], never a guess.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership};

use crate::codec::{check_limit, Decoder, Encoder};
use crate::error::{ClusterError, Result};
use crate::types::*;

/// Version byte of the entry encoding.
pub const ENTRY_VERSION: u8 = 1;
/// Bytes before the body: version, term, leader node, index, kind.
pub const ENTRY_HEADER_LEN: usize = 1 + 8 + 8 + 8 + 1;

const KIND_BLANK: u8 = 0;
const KIND_REQUEST: u8 = 1;
const KIND_MEMBERSHIP: u8 = 2;
const TAG_PRODUCE: u8 = 1;
const TAG_SETTLE: u8 = 2;
const TAG_CURSOR: u8 = 3;
const TAG_OPS: u8 = 4;
const TAG_BATCH: u8 = 5;

/// Encodes an entry, checking every length against its limit.
pub fn encode_entry(entry: &Entry) -> Result<Vec<u8>> {
    let mut e = Encoder::with_capacity(ENTRY_HEADER_LEN + body_size_hint(&entry.payload));
    encode_entry_into(&mut e, entry)?;
    Ok(e.buf)
}

/// The encoding of an entry as parts to write one after the other, so that a broker's
/// operation batch (the bulk of every entry) is copied once, into the log, not first into
/// a buffer: `(head, Some(body))` for [`Request::Ops`] and [`Request::Batch`], `(whole,
/// None)` otherwise. The bytes are exactly [`encode_entry`]'s.
pub(crate) fn entry_parts(entry: &Entry) -> Result<(Vec<u8>, Option<&Bytes>)> {
    match &entry.payload {
        EntryPayload::Normal(Request::Ops(ops)) => {
            Ok((opaque_head(entry, TAG_OPS, ops)?, Some(ops)))
        }
        EntryPayload::Normal(Request::Batch(batch)) => {
            Ok((opaque_head(entry, TAG_BATCH, batch)?, Some(batch)))
        }
        _ => Ok((encode_entry(entry)?, None)),
    }
}

/// The bytes of an `Ops` or `Batch` entry before its body.
fn opaque_head(entry: &Entry, tag: u8, body: &Bytes) -> Result<Vec<u8>> {
    check_limit("ops", body.len(), MAX_OPS_BYTES)?;
    let mut e = Encoder::with_capacity(ENTRY_HEADER_LEN + 5);
    e.u8(ENTRY_VERSION);
    encode_log_id(&mut e, &entry.log_id);
    e.u8(KIND_REQUEST);
    e.u8(tag);
    e.u32(body.len() as u32);
    Ok(e.buf)
}

/// [`encode_entry`] appending to `e` (an RPC frame being built).
pub(crate) fn encode_entry_into(e: &mut Encoder, entry: &Entry) -> Result<()> {
    e.u8(ENTRY_VERSION);
    encode_log_id(e, &entry.log_id);
    match &entry.payload {
        EntryPayload::Blank => e.u8(KIND_BLANK),
        EntryPayload::Normal(req) => {
            e.u8(KIND_REQUEST);
            encode_request(e, req)?;
        }
        EntryPayload::Membership(m) => {
            e.u8(KIND_MEMBERSHIP);
            encode_membership(e, m)?;
        }
    }
    Ok(())
}

/// Decodes an entry; message bodies are zero-copy slices of `payload`.
pub fn decode_entry(payload: Bytes) -> Result<Entry> {
    let mut d = Decoder::new(payload, "raft entry");
    let log_id = decode_header(&mut d)?;
    let payload = match d.u8()? {
        KIND_BLANK => EntryPayload::Blank,
        KIND_REQUEST => EntryPayload::Normal(decode_request(&mut d)?),
        KIND_MEMBERSHIP => EntryPayload::Membership(decode_membership(&mut d)?),
        _ => return Err(d.fail("unknown entry kind")),
    };
    d.finish()?;
    Ok(Entry { log_id, payload })
}

/// Reads only the log id of an encoded entry (recovery needs no more).
pub fn decode_log_id(payload: Bytes) -> Result<LogId> {
    decode_header(&mut Decoder::new(payload, "raft entry"))
}

fn decode_header(d: &mut Decoder) -> Result<LogId> {
    let version = d.u8()?;
    if version != ENTRY_VERSION {
        return Err(ClusterError::UnsupportedVersion {
            what: "raft entry",
            found: u16::from(version),
            supported: u16::from(ENTRY_VERSION),
        });
    }
    decode_log_id_fields(d)
}

pub(crate) fn encode_log_id(e: &mut Encoder, id: &LogId) {
    e.u64(id.leader_id.term);
    e.u64(id.leader_id.node_id);
    e.u64(id.index);
}

pub(crate) fn decode_log_id_fields(d: &mut Decoder) -> Result<LogId> {
    let term = d.u64()?;
    let node = d.u64()?;
    let index = d.u64()?;
    Ok(LogId::new(CommittedLeaderId::new(term, node), index))
}

fn body_size_hint(payload: &EntryPayload<TypeConfig>) -> usize {
    match payload {
        EntryPayload::Normal(Request::Produce { address, messages }) => {
            3 + address.len() + 4 + messages.iter().map(|m| 4 + m.len()).sum::<usize>()
        }
        EntryPayload::Normal(Request::Ops(ops) | Request::Batch(ops)) => 5 + ops.len(),
        _ => 64,
    }
}

fn encode_request(e: &mut Encoder, req: &Request) -> Result<()> {
    match req {
        Request::Produce { address, messages } => {
            check_limit("address", address.len(), MAX_ADDRESS_BYTES)?;
            check_limit("produce batch", messages.len(), MAX_BATCH_MESSAGES)?;
            e.u8(TAG_PRODUCE);
            e.str(address);
            e.u32(messages.len() as u32);
            for m in messages {
                check_limit("message", m.len(), MAX_MESSAGE_BYTES)?;
                e.bytes(m);
            }
        }
        Request::Settle {
            address,
            message_ids,
        } => {
            check_limit("address", address.len(), MAX_ADDRESS_BYTES)?;
            check_limit("settle batch", message_ids.len(), MAX_SETTLE_IDS)?;
            e.u8(TAG_SETTLE);
            e.str(address);
            e.u32(message_ids.len() as u32);
            message_ids.iter().for_each(|id| e.u64(*id));
        }
        Request::Cursor {
            subscription,
            floor,
        } => {
            check_limit("subscription", subscription.len(), MAX_ADDRESS_BYTES)?;
            e.u8(TAG_CURSOR);
            e.str(subscription);
            e.u64(*floor);
        }
        Request::Ops(ops) => {
            check_limit("ops", ops.len(), MAX_OPS_BYTES)?;
            e.u8(TAG_OPS);
            e.bytes(ops);
        }
        Request::Batch(batch) => {
            check_limit("ops", batch.len(), MAX_OPS_BYTES)?;
            e.u8(TAG_BATCH);
            e.bytes(batch);
        }
    }
    Ok(())
}

fn decode_request(d: &mut Decoder) -> Result<Request> {
    match d.u8()? {
        TAG_PRODUCE => {
            let address = d.str("address", MAX_ADDRESS_BYTES)?;
            let n = d.count("produce batch", MAX_BATCH_MESSAGES, 4)?;
            let messages = (0..n)
                .map(|_| d.bytes("message", MAX_MESSAGE_BYTES))
                .collect::<Result<_>>()?;
            Ok(Request::Produce { address, messages })
        }
        TAG_SETTLE => {
            let address = d.str("address", MAX_ADDRESS_BYTES)?;
            let n = d.count("settle batch", MAX_SETTLE_IDS, 8)?;
            let message_ids = (0..n).map(|_| d.u64()).collect::<Result<_>>()?;
            Ok(Request::Settle {
                address,
                message_ids,
            })
        }
        TAG_CURSOR => {
            let subscription = d.str("subscription", MAX_ADDRESS_BYTES)?;
            let floor = d.u64()?;
            Ok(Request::Cursor {
                subscription,
                floor,
            })
        }
        TAG_OPS => Ok(Request::Ops(d.bytes("ops", MAX_OPS_BYTES)?)),
        TAG_BATCH => Ok(Request::Batch(d.bytes("batch", MAX_OPS_BYTES)?)),
        _ => Err(d.fail("unknown request tag")),
    }
}

pub(crate) fn encode_membership(e: &mut Encoder, m: &Membership<NodeId, BasicNode>) -> Result<()> {
    let sets = m.get_joint_config();
    check_limit("membership configs", sets.len(), MAX_JOINT_CONFIGS)?;
    e.u8(sets.len() as u8);
    for set in sets {
        check_limit("voter set", set.len(), MAX_MEMBERS)?;
        e.u32(set.len() as u32);
        set.iter().for_each(|id| e.u64(*id));
    }
    let nodes: Vec<_> = m.nodes().collect();
    check_limit("membership nodes", nodes.len(), MAX_MEMBERS)?;
    e.u32(nodes.len() as u32);
    for (id, node) in nodes {
        check_limit("node address", node.addr.len(), MAX_NODE_ADDR_BYTES)?;
        e.u64(*id);
        e.str(&node.addr);
    }
    Ok(())
}

pub(crate) fn decode_membership(d: &mut Decoder) -> Result<Membership<NodeId, BasicNode>> {
    let sets = usize::from(d.u8()?);
    check_limit("membership configs", sets, MAX_JOINT_CONFIGS)?;
    let mut configs = Vec::with_capacity(sets);
    for _ in 0..sets {
        let n = d.count("voter set", MAX_MEMBERS, 8)?;
        let set = (0..n).map(|_| d.u64()).collect::<Result<BTreeSet<_>>>()?;
        configs.push(set);
    }
    let n = d.count("membership nodes", MAX_MEMBERS, 10)?;
    let mut nodes = BTreeMap::new();
    for _ in 0..n {
        let id = d.u64()?;
        let addr = d.str("node address", MAX_NODE_ADDR_BYTES)?;
        nodes.insert(id, BasicNode { addr });
    }
    Ok(Membership::new(configs, nodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 2), index)
    }

    fn round_trip(entry: Entry) {
        let bytes = encode_entry(&entry).unwrap();
        // The parts the log store writes are the same bytes, and so is an in-place encoding.
        let (head, tail) = entry_parts(&entry).unwrap();
        let mut parts = head.clone();
        parts.extend_from_slice(tail.map_or(&[][..], |t| &t[..]));
        assert_eq!(parts, bytes);
        let mut into = Encoder::with_capacity(0);
        encode_entry_into(&mut into, &entry).unwrap();
        assert_eq!(into.buf, bytes);
        let back = decode_entry(Bytes::from(bytes.clone())).unwrap();
        assert_eq!(back, entry);
        assert_eq!(decode_log_id(Bytes::from(bytes)).unwrap(), entry.log_id);
    }

    #[test]
    fn every_payload_kind_round_trips() {
        round_trip(Entry {
            log_id: log_id(1, 0),
            payload: EntryPayload::Blank,
        });
        let messages = vec![
            Bytes::from_static(b"a"),
            Bytes::from(vec![7u8; 1024]),
            Bytes::new(),
        ];
        round_trip(Entry {
            log_id: log_id(3, 9),
            payload: EntryPayload::Normal(Request::Produce {
                address: "q1".into(),
                messages,
            }),
        });
        round_trip(Entry {
            log_id: log_id(3, 11),
            payload: EntryPayload::Normal(Request::Ops(Bytes::from(vec![1u8; 3000]))),
        });
        round_trip(Entry {
            log_id: log_id(3, 12),
            payload: EntryPayload::Normal(Request::Batch(Bytes::from(vec![2u8; 2000]))),
        });
        round_trip(Entry {
            log_id: log_id(3, 10),
            payload: EntryPayload::Normal(Request::Settle {
                address: "q1".into(),
                message_ids: vec![0, 5, 9],
            }),
        });
        round_trip(Entry {
            log_id: log_id(3, 11),
            payload: EntryPayload::Normal(Request::Cursor {
                subscription: "c:l".into(),
                floor: 42,
            }),
        });
        let nodes = BTreeMap::from([
            (0, BasicNode::new("entrepot-0:5673")),
            (1, BasicNode::new("entrepot-1:5673")),
            (7, BasicNode::new("learner:5673")),
        ]);
        let m = Membership::new(vec![BTreeSet::from([0, 1]), BTreeSet::from([1])], nodes);
        round_trip(Entry {
            log_id: log_id(4, 12),
            payload: EntryPayload::Membership(m),
        });
    }

    #[test]
    fn a_batch_of_1kib_messages_costs_4_bytes_each_in_framing() {
        let messages = vec![Bytes::from(vec![1u8; 1024]); 64];
        let entry = Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Normal(Request::Produce {
                address: "q".into(),
                messages,
            }),
        };
        let len = encode_entry(&entry).unwrap().len();
        assert_eq!(len, ENTRY_HEADER_LEN + 1 + 2 + 1 + 4 + 64 * (4 + 1024));
    }

    #[test]
    fn unknown_version_is_a_typed_error() {
        let mut bytes = encode_entry(&Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Blank,
        })
        .unwrap();
        bytes[0] = 9;
        assert!(matches!(
            decode_entry(Bytes::from(bytes)),
            Err(ClusterError::UnsupportedVersion { found: 9, .. })
        ));
    }

    #[test]
    fn every_truncation_of_an_entry_is_an_error_not_a_panic() {
        let entry = Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Normal(Request::Produce {
                address: "addr".into(),
                messages: vec![Bytes::from_static(b"hello"), Bytes::from_static(b"world")],
            }),
        };
        let bytes = encode_entry(&entry).unwrap();
        for cut in 0..bytes.len() {
            assert!(
                decode_entry(Bytes::copy_from_slice(&bytes[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode_entry(Bytes::from(longer)),
            Err(ClusterError::Decode { .. })
        ));
    }
}
