//! Goal: the metadata group's snapshot (`cluster/FORMAT.md`, "Metadata group") keeps
//! reading what earlier builds wrote — version 1, before the groups' flags, read with
//! every group not formed — with the exact content, and today's encoder still writes
//! versions 1, 2 and 3 byte for byte, each where it is the oldest that holds the state
//! (3 once the metadata level is finalized at 2, session 20).
//!
//! Method: `tests/fixtures/cluster/meta-snapshot-v{1,2,3}.bin` were written once by
//! [`generate_meta_fixtures`] (ignored) from one small state: three members, four
//! addresses declared, one dropped (its group id is never handed out again), two groups
//! marked formed; version 3 the same state after the level was finalized at 2. Versions 2
//! and 3 are what the machine's snapshot wrote; version 1 is spelled out
//! by hand from the table in FORMAT.md (a build of today cannot write it). Each is restored
//! into a fresh machine and checked field by field against values written out here.
//!
//! Regenerate only when adding a *new* format version, never to make a test pass:
//! `cargo test --test broker -- --ignored meta_fixtures::generate_meta_fixtures` (refuses
//! to overwrite an existing file).

use std::collections::BTreeSet;
use std::fs;

use bytes::{BufMut, Bytes, BytesMut};
use entrepot::raft::meta_machine::{encode_op, Member, MetaMachine, MetaOp};
use entrepot_cluster::{GroupMachine, NodeId, Position};

use crate::format_fixtures::{fixture, write_new};

fn member(n: NodeId) -> Member {
    Member {
        peer: format!("10.0.0.{n}:5673"),
        amqp: format!("10.0.0.{n}:5672"),
    }
}

/// The state every fixture holds: members 1–3; "orders", "audit", "gone", "topic.prices"
/// declared (groups 1–4), "gone" (group 3) dropped; groups 1 and 4 marked formed.
fn build() -> MetaMachine {
    let mut m = MetaMachine::new();
    let ops = [
        MetaOp::AddMember {
            node: 1,
            member: member(1),
        },
        MetaOp::AddMember {
            node: 2,
            member: member(2),
        },
        MetaOp::AddMember {
            node: 3,
            member: member(3),
        },
        MetaOp::DeclareAddress {
            name: "orders".into(),
            partitions: 1,
        },
        MetaOp::DeclareAddress {
            name: "audit".into(),
            partitions: 1,
        },
        MetaOp::DeclareAddress {
            name: "gone".into(),
            partitions: 1,
        },
        MetaOp::DeclareAddress {
            name: "topic.prices".into(),
            partitions: 1,
        },
        MetaOp::DropAddress {
            name: "gone".into(),
        },
        MetaOp::MarkFormed { groups: vec![1, 4] },
    ];
    for (i, op) in ops.iter().enumerate() {
        let at = Position::new(i as u64 + 1, 0);
        m.apply(at, encode_op(op).unwrap()).unwrap();
        assert!(m.outcome(at).unwrap().is_ok(), "op {i}");
    }
    m
}

/// Version 1 of `m`'s state, written field by field from FORMAT.md's table.
fn v1_by_hand(m: &MetaMachine) -> Vec<u8> {
    let s = m.state();
    let mut b = BytesMut::new();
    let str_ = |b: &mut BytesMut, s: &str| {
        b.put_u16_le(s.len() as u16);
        b.put_slice(s.as_bytes());
    };
    let nodes = |b: &mut BytesMut, set: &BTreeSet<NodeId>| {
        b.put_u8(set.len() as u8);
        for n in set {
            b.put_u64_le(*n);
        }
    };
    b.put_u8(1);
    b.put_u64_le(s.next_group());
    b.put_u8(s.replication() as u8);
    b.put_u32_le(s.members().len() as u32);
    for (n, mem) in s.members() {
        b.put_u64_le(*n);
        str_(&mut b, &mem.peer);
        str_(&mut b, &mem.amqp);
    }
    // Addresses in name order, one partition each.
    let mut addresses: Vec<(&String, u64)> =
        s.groups().iter().map(|(g, e)| (&e.address, *g)).collect();
    addresses.sort();
    b.put_u32_le(addresses.len() as u32);
    for (name, g) in addresses {
        let e = &s.groups()[&g];
        str_(&mut b, name);
        b.put_u16_le(1);
        b.put_u64_le(g);
        b.put_u64_le(e.replicas.leader);
        b.put_u64_le(e.founder);
        nodes(&mut b, &e.replicas.nodes);
        nodes(&mut b, &e.founders);
    }
    b.to_vec()
}

#[test]
#[ignore]
fn generate_meta_fixtures() {
    let m = build();
    let all = [
        ("meta-snapshot-v2.bin", m.snapshot().unwrap().to_vec()),
        ("meta-snapshot-v1.bin", v1_by_hand(&m)),
        (
            "meta-snapshot-v3.bin",
            finalized().snapshot().unwrap().to_vec(),
        ),
    ];
    // Only the versions not written yet (a released one is never rewritten).
    for (name, bytes) in all {
        if !fixture(name).exists() {
            write_new(name, &bytes);
        }
    }
}

/// [`build`]'s state once the metadata level is finalized at 2.
fn finalized() -> MetaMachine {
    let mut m = build();
    let at = Position::new(10, 0);
    let op = MetaOp::FinalizeLevel { level: 2 };
    m.apply(at, encode_op(&op).unwrap()).unwrap();
    m
}

/// Version 3 (session 20): version 2 with the finalized level after `replication`; read
/// back with its content and level, written byte for byte.
#[test]
fn the_version_3_fixture_reads_back_with_its_level() {
    let v3 = restore("meta-snapshot-v3.bin");
    check(&v3, &[1, 4]);
    assert_eq!(v3.level(), 2);
    let written = fs::read(fixture("meta-snapshot-v3.bin")).unwrap();
    assert_eq!((written[0], written[10]), (3, 2));
    assert_eq!(v3.snapshot().unwrap().to_vec(), written);
    assert_eq!(finalized().snapshot().unwrap().to_vec(), written);
    let v2 = fs::read(fixture("meta-snapshot-v2.bin")).unwrap();
    let mut without_level = written.clone();
    without_level.remove(10);
    without_level[0] = 2;
    assert_eq!(without_level, v2, "version 2 plus the level byte");
}

fn restore(name: &str) -> MetaMachine {
    let bytes = fs::read(fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"));
    let mut m = MetaMachine::new();
    m.restore(9, Bytes::from(bytes))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    m
}

/// The content both versions hold, spelled out; `formed` the groups marked formed.
fn check(m: &MetaMachine, formed: &[u64]) {
    let s = m.state();
    assert_eq!(s.next_group(), 5, "group 3's id is not handed out again");
    assert_eq!(s.replication(), 3);
    let members: Vec<(NodeId, Member)> = s.members().clone().into_iter().collect();
    assert_eq!(
        members,
        vec![(1, member(1)), (2, member(2)), (3, member(3))]
    );
    let all: BTreeSet<NodeId> = [1, 2, 3].into();
    let groups: Vec<(u64, &str, bool)> = s
        .groups()
        .iter()
        .map(|(g, e)| (*g, e.address.as_str(), e.formed))
        .collect();
    let want: Vec<(u64, &str, bool)> = [(1, "orders"), (2, "audit"), (4, "topic.prices")]
        .into_iter()
        .map(|(g, a)| (g, a, formed.contains(&g)))
        .collect();
    assert_eq!(groups, want);
    for (g, e) in s.groups() {
        assert_eq!(
            e.replicas.nodes, all,
            "group {g}: three members, three replicas"
        );
        assert_eq!(e.founders, all, "group {g}");
        assert_eq!(e.partition, 0);
    }
    // Leaders spread as declared: one group each on three members (the preferred leaders
    // of groups 1, 2 and 4, whatever their order).
    let leaders: BTreeSet<NodeId> = s.groups().values().map(|e| e.replicas.leader).collect();
    assert_eq!(leaders, all);
    assert_eq!(m.address("gone"), None);
    assert_eq!(m.address("audit").map(|a| a.group), Some(2));
}

#[test]
fn the_metadata_snapshot_fixtures_read_back_with_their_exact_content() {
    let v2 = restore("meta-snapshot-v2.bin");
    check(&v2, &[1, 4]);
    let v1 = restore("meta-snapshot-v1.bin");
    check(&v1, &[]);
    // Today's encoder writes the oldest version that holds a state (`metadata_level.rs`):
    // these are at metadata level 1, so version 2 byte for byte while groups are formed,
    // and version 1 byte for byte when none is — what the older builds read.
    let written = fs::read(fixture("meta-snapshot-v2.bin")).unwrap();
    assert_eq!(written[0], 2);
    assert_eq!((v2.level(), v1.level()), (1, 1));
    assert_eq!(build().snapshot().unwrap().to_vec(), written);
    assert_eq!(v2.snapshot().unwrap().to_vec(), written);
    // Version 1 is version 2 without the flag byte after each group's founders.
    let v1_bytes = fs::read(fixture("meta-snapshot-v1.bin")).unwrap();
    assert_eq!(v1.snapshot().unwrap().to_vec(), v1_bytes);
    assert_eq!(v1_bytes.len() + 3, written.len(), "one flag byte per group");
    assert_eq!(v1_bytes, v1_by_hand(&v1));
}
