//! The metadata group's two formats: its ops (one proposal each) and its snapshot, both
//! versioned and bounded before anything is allocated (`cluster/FORMAT.md`, "metadata
//! group"). Integers are little-endian; a string is `{ len: u16 | UTF-8 bytes }`.
//!
//! ```text
//! // Format: metadata op, version 1
//! { version: u8 = 1 | kind: u8 | body }
//!   kind 1 add member     { node: u64 | peer: str | amqp: str }
//!   kind 2 remove member  { node: u64 }
//!   kind 3 declare        { partitions: u16 | name: str }
//!   kind 4 drop           { name: str }
//!   kinds 5..=8 reserved (subscription definitions, manifests/plans, replica moves)
//!   kind 9 mark formed    { count: u16 | count × group: u64 }      (count ≤ 1024)
//!   kind 10 add member at { node: u64 | peer: str | amqp: str | level: u8 }   (level ≥ 1)
//!   kind 11 finalize level { level: u8 }                  (1 ≤ level; above this build's: stop)
//!   kinds 12..=15 reserved
//! // Format: metadata snapshot, version 3 at a finalized level ≥ 2; version 2 (no level)
//! // at level 1 with a group formed; version 1 (no level, no flags) otherwise
//! { version: u8 = 3 | next_group: u64 | replication: u8 | level: u8 (v3 only)
//!   | members: u32 × { node: u64 | peer: str | amqp: str }
//!   | addresses: u32 × { name: str | partitions: u16 × { group: u64 | leader: u64
//!       | founder: u64 | replicas: u8 × node: u64 | founders: u8 × node: u64
//!       | flags: u8 (bit 0: formed; the others 0) } } }
//! ```

use std::collections::BTreeSet;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use entrepot_cluster::placement::{GroupId, Replicas};
use entrepot_cluster::NodeId;

use super::{
    AddressEntry, GroupEntry, Member, MetaMachineError, MetaOp, MetaRefusal, MetaState,
    MAX_ADDRESSES, MAX_ADDRESS_NAME_BYTES, MAX_FORMED_PER_OP, MAX_MEMBERS, MAX_MEMBER_ADDR_BYTES,
    MAX_PARTITIONS, MAX_REPLICAS,
};

/// Version byte of a metadata op.
pub const META_OPS_VERSION: u8 = 1;
/// Version byte of the metadata snapshot this build writes once the metadata level is
/// finalized at 2 or more (below it, the oldest version that holds the state: 1, or 2
/// when a group is formed — what the members' builds read).
pub const META_SNAPSHOT_VERSION: u8 = 3;
/// The snapshot version of session 19: groups carry their flags, no level (read as 1).
const META_SNAPSHOT_VERSION_2: u8 = 2;
/// The snapshot version before groups carried their flags (read as not formed, level 1).
const META_SNAPSHOT_VERSION_1: u8 = 1;
/// The lowest metadata level: the ops (kinds 1–4) and the snapshot (version 1) of every
/// build since session 12. A node that advertises no level is at this one.
pub const METADATA_LEVEL_MIN: u8 = 1;
/// The level of op kinds 9 (mark formed), 10 (add member at a level) and 11 (finalize
/// level) and of snapshot versions 2 and 3, proposed and written by this build only once
/// the cluster's level is finalized at 2 (session 20).
pub const METADATA_LEVEL_FORMED: u8 = 2;
/// The highest metadata level this build reads and writes (a node may be told to
/// advertise a lower one: `--metadata-level-max`, for tests and upgrades).
pub const METADATA_LEVEL_MAX: u8 = METADATA_LEVEL_FORMED;
const _: () = assert!(METADATA_LEVEL_MIN <= METADATA_LEVEL_FORMED);
const _: () = assert!(METADATA_LEVEL_FORMED <= METADATA_LEVEL_MAX);
/// Bit 0 of a group's flags in the snapshot: [`GroupEntry::formed`].
const GROUP_FLAG_FORMED: u8 = 1;

pub(super) const KIND_ADD_MEMBER: u8 = 1;
pub(super) const KIND_REMOVE_MEMBER: u8 = 2;
pub(super) const KIND_DECLARE: u8 = 3;
pub(super) const KIND_DROP: u8 = 4;
pub(super) const KIND_MARK_FORMED: u8 = 9;
pub(super) const KIND_ADD_MEMBER_AT: u8 = 10;
pub(super) const KIND_FINALIZE_LEVEL: u8 = 11;
/// Kinds kept for what moves into the metadata group later: 5 subscription definition,
/// 6 subscription removal, 7 manifest/plan, 8 replica move recorded by the balancer
/// (12..=15 are unassigned). A build that meets one stops the group (it cannot follow it).
pub const META_RESERVED_KINDS: std::ops::RangeInclusive<u8> = 5..=8;

/// Encodes `op` as one proposal; a string past its bound is refused here, before it is
/// proposed (the machine would refuse it the same way).
pub fn encode_op(op: &MetaOp) -> Result<Bytes, MetaRefusal> {
    let mut b = BytesMut::new();
    b.put_u8(META_OPS_VERSION);
    match op {
        MetaOp::AddMember { node, member } => {
            b.put_u8(KIND_ADD_MEMBER);
            put_member(&mut b, *node, member)?;
        }
        MetaOp::AddMemberAt {
            node,
            member,
            level,
        } => {
            b.put_u8(KIND_ADD_MEMBER_AT);
            put_member(&mut b, *node, member)?;
            b.put_u8(*level);
        }
        MetaOp::FinalizeLevel { level } => {
            b.put_u8(KIND_FINALIZE_LEVEL);
            b.put_u8(*level);
        }
        MetaOp::RemoveMember { node } => {
            b.put_u8(KIND_REMOVE_MEMBER);
            b.put_u64_le(*node);
        }
        MetaOp::DeclareAddress { name, partitions } => {
            b.put_u8(KIND_DECLARE);
            b.put_u16_le(*partitions);
            put_str(&mut b, name, MAX_ADDRESS_NAME_BYTES, "address")?;
        }
        MetaOp::DropAddress { name } => {
            b.put_u8(KIND_DROP);
            put_str(&mut b, name, MAX_ADDRESS_NAME_BYTES, "address")?;
        }
        MetaOp::MarkFormed { groups } => {
            if groups.len() > MAX_FORMED_PER_OP {
                return Err(MetaRefusal::TooManyGroups {
                    count: groups.len(),
                    max: MAX_FORMED_PER_OP,
                });
            }
            b.put_u8(KIND_MARK_FORMED);
            b.put_u16_le(groups.len() as u16);
            for g in groups {
                b.put_u64_le(*g);
            }
        }
    }
    Ok(b.freeze())
}

fn put_member(b: &mut BytesMut, node: NodeId, member: &Member) -> Result<(), MetaRefusal> {
    b.put_u64_le(node);
    put_str(b, &member.peer, MAX_MEMBER_ADDR_BYTES, "member address")?;
    put_str(b, &member.amqp, MAX_MEMBER_ADDR_BYTES, "AMQP address")
}

fn put_str(b: &mut BytesMut, s: &str, max: usize, what: &'static str) -> Result<(), MetaRefusal> {
    if s.len() > max {
        return Err(MetaRefusal::TooLong {
            what,
            len: s.len(),
            max,
        });
    }
    if s.is_empty() {
        return Err(MetaRefusal::Empty { what });
    }
    b.put_u16_le(s.len() as u16);
    b.put_slice(s.as_bytes());
    Ok(())
}

/// How a payload decodes: an op, a refusal every replica makes the same way (a malformed
/// body), or a version/kind/level this build cannot follow (the group stops here).
pub(super) fn decode_op(mut p: Bytes) -> Result<Result<MetaOp, MetaRefusal>, MetaMachineError> {
    if p.remaining() < 2 {
        return Ok(Err(MetaRefusal::Malformed("shorter than its header")));
    }
    let version = p.get_u8();
    if version != META_OPS_VERSION {
        return Err(MetaMachineError::UnsupportedOpVersion { found: version });
    }
    let kind = p.get_u8();
    let op = match kind {
        KIND_ADD_MEMBER => add_member(&mut p),
        KIND_REMOVE_MEMBER => take_u64(&mut p).map(|node| MetaOp::RemoveMember { node }),
        KIND_DECLARE => declare(&mut p),
        KIND_DROP => take_str(&mut p, MAX_ADDRESS_NAME_BYTES, "address")
            .map(|name| MetaOp::DropAddress { name }),
        KIND_MARK_FORMED => mark_formed(&mut p),
        KIND_ADD_MEMBER_AT => add_member_at(&mut p),
        KIND_FINALIZE_LEVEL => finalize_level(&mut p)?,
        _ => return Err(MetaMachineError::UnknownOpKind { kind }),
    };
    Ok(op.and_then(|op| {
        if p.has_remaining() {
            Err(MetaRefusal::Malformed("trailing bytes after the op"))
        } else {
            Ok(op)
        }
    }))
}

/// A level above this build's is not a refusal but a stop: the replicas that know it
/// apply it, so this one cannot follow them.
fn finalize_level(p: &mut Bytes) -> Result<Result<MetaOp, MetaRefusal>, MetaMachineError> {
    if !p.has_remaining() {
        return Ok(Err(MetaRefusal::Malformed("finalize level cut short")));
    }
    let level = p.get_u8();
    if level < METADATA_LEVEL_MIN {
        return Ok(Err(MetaRefusal::Malformed("finalize level: level 0")));
    }
    if level > METADATA_LEVEL_MAX {
        return Err(MetaMachineError::UnsupportedLevel {
            level,
            max: METADATA_LEVEL_MAX,
        });
    }
    Ok(Ok(MetaOp::FinalizeLevel { level }))
}

fn take_member(p: &mut Bytes) -> Result<(NodeId, Member), MetaRefusal> {
    let node = take_u64(p)?;
    let peer = take_str(p, MAX_MEMBER_ADDR_BYTES, "member address")?;
    let amqp = take_str(p, MAX_MEMBER_ADDR_BYTES, "AMQP address")?;
    Ok((node, Member { peer, amqp }))
}

fn add_member(p: &mut Bytes) -> Result<MetaOp, MetaRefusal> {
    let (node, member) = take_member(p)?;
    Ok(MetaOp::AddMember { node, member })
}

fn add_member_at(p: &mut Bytes) -> Result<MetaOp, MetaRefusal> {
    let (node, member) = take_member(p)?;
    if !p.has_remaining() {
        return Err(MetaRefusal::Malformed("add member at: level cut short"));
    }
    let level = p.get_u8();
    if level < METADATA_LEVEL_MIN {
        return Err(MetaRefusal::Malformed("add member at: level 0"));
    }
    Ok(MetaOp::AddMemberAt {
        node,
        member,
        level,
    })
}

fn declare(p: &mut Bytes) -> Result<MetaOp, MetaRefusal> {
    if p.remaining() < 2 {
        return Err(MetaRefusal::Malformed("declare cut short"));
    }
    let partitions = p.get_u16_le();
    let name = take_str(p, MAX_ADDRESS_NAME_BYTES, "address")?;
    Ok(MetaOp::DeclareAddress { name, partitions })
}

fn mark_formed(p: &mut Bytes) -> Result<MetaOp, MetaRefusal> {
    if p.remaining() < 2 {
        return Err(MetaRefusal::Malformed("mark formed cut short"));
    }
    let count = usize::from(p.get_u16_le());
    if count > MAX_FORMED_PER_OP {
        return Err(MetaRefusal::TooManyGroups {
            count,
            max: MAX_FORMED_PER_OP,
        });
    }
    if p.remaining() < 8 * count {
        return Err(MetaRefusal::Malformed("mark formed cut short"));
    }
    let groups = (0..count).map(|_| p.get_u64_le()).collect();
    Ok(MetaOp::MarkFormed { groups })
}

fn take_u64(p: &mut Bytes) -> Result<u64, MetaRefusal> {
    if p.remaining() < 8 {
        return Err(MetaRefusal::Malformed("integer cut short"));
    }
    Ok(p.get_u64_le())
}

fn take_str(p: &mut Bytes, max: usize, what: &'static str) -> Result<String, MetaRefusal> {
    if p.remaining() < 2 {
        return Err(MetaRefusal::Malformed("string length cut short"));
    }
    let len = usize::from(p.get_u16_le());
    if len > max {
        return Err(MetaRefusal::TooLong { what, len, max });
    }
    if len == 0 {
        return Err(MetaRefusal::Empty { what });
    }
    if p.remaining() < len {
        return Err(MetaRefusal::Malformed("string cut short"));
    }
    let bytes = p.split_to(len);
    String::from_utf8(bytes.to_vec()).map_err(|_| MetaRefusal::Malformed("string not UTF-8"))
}

/// The snapshot of `s` (see the module's format), in the oldest version that holds it:
/// version 3 once the level is finalized at 2 or more (every member's build reads it),
/// else version 2 when a group is formed (marks proposed by session-19 builds, which read
/// it), else version 1 (what every build since session 12 reads).
pub(super) fn encode_snapshot(s: &MetaState) -> Bytes {
    let version = if s.level >= METADATA_LEVEL_FORMED {
        META_SNAPSHOT_VERSION
    } else if s.groups.values().any(|e| e.formed) {
        META_SNAPSHOT_VERSION_2
    } else {
        META_SNAPSHOT_VERSION_1
    };
    let flags = version >= META_SNAPSHOT_VERSION_2;
    let mut b = BytesMut::new();
    b.put_u8(version);
    b.put_u64_le(s.next_group);
    b.put_u8(s.replication);
    if version >= META_SNAPSHOT_VERSION {
        b.put_u8(s.level);
    }
    b.put_u32_le(s.members.len() as u32);
    for (node, m) in &s.members {
        b.put_u64_le(*node);
        raw_str(&mut b, &m.peer);
        raw_str(&mut b, &m.amqp);
    }
    b.put_u32_le(s.addresses.len() as u32);
    for (name, a) in &s.addresses {
        raw_str(&mut b, name);
        b.put_u16_le(a.groups.len() as u16);
        for g in &a.groups {
            let Some(e) = s.groups.get(g) else { continue };
            b.put_u64_le(*g);
            b.put_u64_le(e.replicas.leader);
            b.put_u64_le(e.founder);
            nodes(&mut b, &e.replicas.nodes);
            nodes(&mut b, &e.founders);
            if flags {
                b.put_u8(if e.formed { GROUP_FLAG_FORMED } else { 0 });
            }
        }
    }
    b.freeze()
}

fn raw_str(b: &mut BytesMut, s: &str) {
    b.put_u16_le(s.len() as u16);
    b.put_slice(s.as_bytes());
}

fn nodes(b: &mut BytesMut, set: &BTreeSet<NodeId>) {
    b.put_u8(set.len() as u8);
    for n in set {
        b.put_u64_le(*n);
    }
}

/// Reads a snapshot written by [`encode_snapshot`]; every count is checked against its
/// bound before anything is allocated.
pub(super) fn decode_snapshot(mut p: Bytes) -> Result<MetaState, MetaMachineError> {
    let malformed = MetaMachineError::MalformedSnapshot;
    need(&p, 1 + 8 + 1 + 4)?;
    let version = p.get_u8();
    if !(META_SNAPSHOT_VERSION_1..=META_SNAPSHOT_VERSION).contains(&version) {
        return Err(MetaMachineError::UnsupportedSnapshotVersion { found: version });
    }
    let flags = version >= META_SNAPSHOT_VERSION_2;
    let mut s = MetaState {
        next_group: p.get_u64_le(),
        replication: p.get_u8(),
        ..MetaState::default()
    };
    if version >= META_SNAPSHOT_VERSION {
        need(&p, 1 + 4)?;
        s.level = p.get_u8();
        if s.level > METADATA_LEVEL_MAX {
            return Err(MetaMachineError::UnsupportedLevel {
                level: s.level,
                max: METADATA_LEVEL_MAX,
            });
        }
        if s.level < METADATA_LEVEL_FORMED {
            return Err(MetaMachineError::MalformedSnapshot(
                "a version-3 snapshot below level 2",
            ));
        }
    }
    let members = bounded(p.get_u32_le(), MAX_MEMBERS, "members")?;
    for _ in 0..members {
        need(&p, 8)?;
        let node = p.get_u64_le();
        let peer = snap_str(&mut p, MAX_MEMBER_ADDR_BYTES)?;
        let amqp = snap_str(&mut p, MAX_MEMBER_ADDR_BYTES)?;
        if s.members.insert(node, Member { peer, amqp }).is_some() {
            return Err(malformed("a member twice"));
        }
    }
    need(&p, 4)?;
    let addresses = bounded(p.get_u32_le(), MAX_ADDRESSES, "addresses")?;
    for _ in 0..addresses {
        let name = snap_str(&mut p, MAX_ADDRESS_NAME_BYTES)?;
        need(&p, 2)?;
        let partitions = bounded(u32::from(p.get_u16_le()), MAX_PARTITIONS, "partitions")?;
        let mut groups = Vec::with_capacity(partitions);
        for partition in 0..partitions {
            let (g, entry) = snap_group(&mut p, &name, partition as u16, flags)?;
            if g >= s.next_group || s.groups.insert(g, entry).is_some() {
                return Err(malformed("a group id twice or not yet handed out"));
            }
            groups.push(g);
        }
        if s.addresses.insert(name, AddressEntry { groups }).is_some() {
            return Err(malformed("an address twice"));
        }
    }
    if p.has_remaining() {
        return Err(malformed("trailing bytes"));
    }
    Ok(s)
}

fn snap_group(
    p: &mut Bytes,
    name: &str,
    partition: u16,
    flags: bool,
) -> Result<(GroupId, GroupEntry), MetaMachineError> {
    need(p, 8 * 3)?;
    let group = p.get_u64_le();
    let leader = p.get_u64_le();
    let founder = p.get_u64_le();
    let replicas = snap_nodes(p)?;
    let founders = snap_nodes(p)?;
    if !replicas.contains(&leader) || !founders.contains(&founder) {
        return Err(MetaMachineError::MalformedSnapshot(
            "a leader that is not a replica",
        ));
    }
    let formed = if flags {
        need(p, 1)?;
        match p.get_u8() {
            0 => false,
            GROUP_FLAG_FORMED => true,
            _ => return Err(MetaMachineError::MalformedSnapshot("unknown group flags")),
        }
    } else {
        false
    };
    let entry = GroupEntry {
        address: name.to_owned(),
        partition,
        replicas: Replicas {
            nodes: replicas,
            leader,
        },
        founder,
        founders,
        formed,
    };
    Ok((group, entry))
}

fn snap_nodes(p: &mut Bytes) -> Result<BTreeSet<NodeId>, MetaMachineError> {
    need(p, 1)?;
    let n = bounded(u32::from(p.get_u8()), MAX_REPLICAS, "replicas")?;
    need(p, 8 * n)?;
    let set: BTreeSet<NodeId> = (0..n).map(|_| p.get_u64_le()).collect();
    if set.len() != n || n == 0 {
        return Err(MetaMachineError::MalformedSnapshot(
            "an empty or repeated replica set",
        ));
    }
    Ok(set)
}

fn snap_str(p: &mut Bytes, max: usize) -> Result<String, MetaMachineError> {
    need(p, 2)?;
    let len = bounded(u32::from(p.get_u16_le()), max, "string bytes")?;
    need(p, len)?;
    String::from_utf8(p.split_to(len).to_vec())
        .map_err(|_| MetaMachineError::MalformedSnapshot("a string not UTF-8"))
}

fn need(p: &Bytes, n: usize) -> Result<(), MetaMachineError> {
    if p.remaining() < n {
        return Err(MetaMachineError::MalformedSnapshot("cut short"));
    }
    Ok(())
}

fn bounded(n: u32, max: usize, what: &'static str) -> Result<usize, MetaMachineError> {
    let n = n as usize;
    if n > max {
        return Err(MetaMachineError::SnapshotLimit { what, len: n, max });
    }
    Ok(n)
}
