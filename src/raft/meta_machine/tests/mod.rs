//! The metadata machine alone: placement of declared addresses, member changes, typed
//! refusals that change nothing, what stops it, snapshot round trips and bounds, and a
//! property: replicas applying the same random ops (one of them through a snapshot)
//! hold the same state, and every placement keeps its invariants.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{BufMut, Bytes, BytesMut};
use entrepot_cluster::{GroupMachine, NodeId, Position};

use super::*;

fn member(n: NodeId) -> Member {
    Member {
        peer: format!("127.0.0.1:{}", 7000 + n),
        amqp: format!("127.0.0.1:{}", 5672 + n),
    }
}

fn add(n: NodeId) -> MetaOp {
    MetaOp::AddMember {
        node: n,
        member: member(n),
    }
}

fn declare(name: &str) -> MetaOp {
    MetaOp::DeclareAddress {
        name: name.into(),
        partitions: 1,
    }
}

/// A machine and the next position to apply at.
struct Replica {
    m: MetaMachine,
    next: Position,
}

impl Replica {
    fn new() -> Replica {
        Replica {
            m: MetaMachine::new(),
            next: Position::new(1, 0),
        }
    }

    fn apply_bytes(&mut self, payload: Bytes) -> Result<MetaOutcome, MetaRefusal> {
        let at = self.next;
        self.m.apply(at, payload).unwrap();
        self.next = Position::new(at.index + 1, 0);
        self.m.outcome(at).unwrap()
    }

    fn apply(&mut self, op: &MetaOp) -> Result<MetaOutcome, MetaRefusal> {
        self.apply_bytes(encode_op(op).unwrap())
    }
}

fn with_members(n: u64) -> Replica {
    let mut r = Replica::new();
    for id in 0..n {
        r.apply(&add(id)).unwrap();
    }
    r
}

fn leads(m: &MetaMachine) -> BTreeMap<NodeId, usize> {
    let mut out: BTreeMap<NodeId, usize> = m.members().keys().map(|n| (*n, 0)).collect();
    for r in m.placement().values() {
        *out.entry(r.leader).or_default() += 1;
    }
    out
}

fn replicas_per_member(m: &MetaMachine) -> BTreeMap<NodeId, usize> {
    let mut out: BTreeMap<NodeId, usize> = m.members().keys().map(|n| (*n, 0)).collect();
    for r in m.placement().values() {
        for n in &r.nodes {
            *out.entry(*n).or_default() += 1;
        }
    }
    out
}

fn within_one(counts: &BTreeMap<NodeId, usize>) -> bool {
    let (lo, hi) = (counts.values().min(), counts.values().max());
    matches!((lo, hi), (Some(lo), Some(hi)) if hi - lo <= 1)
}

#[test]
fn eight_addresses_on_three_members_get_groups_one_to_eight_and_two_or_three_leads_each() {
    let mut r = with_members(3);
    for i in 0..8u64 {
        let out = r.apply(&declare(&format!("q{i}"))).unwrap();
        assert_eq!(
            out,
            MetaOutcome::Declared {
                group: i + 1,
                created: true
            }
        );
    }
    let state = r.m.state();
    for (g, e) in state.groups() {
        assert_eq!(e.replicas.nodes.len(), 3, "group {g}");
        assert!(e.founders.contains(&e.founder));
    }
    let leads = leads(&r.m);
    assert!(leads.values().all(|c| (2..=3).contains(c)), "{leads:?}");
    assert_eq!(r.m.next_group(), 9);
    // Declaring again answers the same group and changes nothing.
    let before = r.m.state();
    let again = r.apply(&declare("q3")).unwrap();
    assert_eq!(
        again,
        MetaOutcome::Declared {
            group: 4,
            created: false
        }
    );
    assert_eq!(r.m.state(), before);
}

#[test]
fn a_new_group_is_founded_by_its_preferred_leader_and_one_member_holds_every_replica() {
    let mut r = with_members(1);
    let out = r.apply(&declare("a")).unwrap();
    assert!(matches!(out, MetaOutcome::Declared { group: 1, .. }));
    let a = r.m.address("a").unwrap();
    assert_eq!(a.replicas, BTreeSet::from([0]));
    assert_eq!((a.leader, a.partitions), (0, 1));
    let e = r.m.group(1).unwrap();
    assert_eq!((e.founder, e.address.as_str()), (0, "a"));
}

#[test]
fn members_joining_spread_replicas_and_leaders_and_keep_the_founders() {
    let mut r = with_members(1);
    for i in 0..9 {
        r.apply(&declare(&format!("q{i}"))).unwrap();
    }
    let founders: BTreeMap<_, _> = (1..=9)
        .map(|g| (g, r.m.group(g).unwrap().founders))
        .collect();
    for n in 1..4 {
        r.apply(&add(n)).unwrap();
    }
    for (g, e) in r.m.state().groups() {
        assert_eq!(e.replicas.nodes.len(), 3, "group {g}");
        assert_eq!(e.founders, founders[g], "founders never change");
    }
    assert!(within_one(&replicas_per_member(&r.m)));
    assert!(within_one(&leads(&r.m)), "{:?}", leads(&r.m));
    // A member leaves: its replicas go elsewhere.
    r.apply(&MetaOp::RemoveMember { node: 2 }).unwrap();
    for (g, e) in r.m.state().groups() {
        assert!(!e.replicas.nodes.contains(&2), "group {g}");
        assert_eq!(e.replicas.nodes.len(), 3, "group {g}");
    }
    assert!(within_one(&leads(&r.m)));
}

#[test]
fn refusals_are_typed_and_change_nothing() {
    let mut r = Replica::new();
    assert_eq!(r.apply(&declare("a")), Err(MetaRefusal::NoMembers));
    r.apply(&add(0)).unwrap();
    r.apply(&declare("a")).unwrap();
    let before = r.m.state();
    let cases: Vec<(MetaOp, MetaRefusal)> = vec![
        (
            MetaOp::AddMember {
                node: 0,
                member: member(9),
            },
            MetaRefusal::MemberConflict { node: 0 },
        ),
        (
            MetaOp::RemoveMember { node: 5 },
            MetaRefusal::UnknownMember { node: 5 },
        ),
        (
            MetaOp::RemoveMember { node: 0 },
            MetaRefusal::LastMember { node: 0 },
        ),
        (
            MetaOp::DropAddress { name: "b".into() },
            MetaRefusal::UnknownAddress { name: "b".into() },
        ),
        (
            MetaOp::DeclareAddress {
                name: "b".into(),
                partitions: 2,
            },
            MetaRefusal::Partitions {
                partitions: 2,
                max: MAX_PARTITIONS,
            },
        ),
    ];
    for (op, refusal) in cases {
        assert_eq!(r.apply(&op), Err(refusal), "{op:?}");
        assert_eq!(r.m.state(), before, "{op:?} changed the state");
    }
    // Malformed bodies: refused alike on every replica, the group goes on.
    let mut cut = encode_op(&declare("abc")).unwrap().to_vec();
    cut.pop();
    let mut trailing = encode_op(&declare("abc")).unwrap().to_vec();
    trailing.push(0);
    let mut zero_len = BytesMut::new();
    zero_len.put_slice(&[META_OPS_VERSION, 4, 0, 0]);
    for bad in [
        Bytes::from(cut),
        Bytes::from(trailing),
        zero_len.freeze(),
        Bytes::from_static(&[META_OPS_VERSION]),
    ] {
        assert!(r.apply_bytes(bad.clone()).is_err(), "{bad:?}");
        assert_eq!(r.m.state(), before);
    }
    // The proposer's encoder refuses what the machine would.
    let long = "x".repeat(MAX_ADDRESS_NAME_BYTES + 1);
    assert!(matches!(
        encode_op(&declare(&long)),
        Err(MetaRefusal::TooLong { .. })
    ));
    assert!(matches!(
        encode_op(&declare("")),
        Err(MetaRefusal::Empty { .. })
    ));
}

#[test]
fn an_unknown_version_or_a_reserved_kind_stops_the_machine() {
    let mut m = MetaMachine::new();
    let at = Position::new(1, 0);
    assert!(m.apply(at, Bytes::from_static(&[2, 3, 0, 0])).is_err());
    for kind in META_RESERVED_KINDS.chain(12..=16).chain([0, 255]) {
        assert!(
            m.apply(at, Bytes::from(vec![META_OPS_VERSION, kind]))
                .is_err(),
            "kind {kind}"
        );
    }
}

/// The snapshot is written in the oldest version that holds the state — 1 at level 1
/// with no group formed, 2 at level 1 with a group formed (session 19's marks), 3 once
/// the level is finalized — and each is read back as it was.
#[test]
fn the_snapshot_is_written_in_the_oldest_version_that_holds_the_state() {
    let mut r = with_members(1);
    r.apply(&declare("one")).unwrap();
    assert_eq!(r.m.state().level(), METADATA_LEVEL_MIN);
    let v1 = r.m.snapshot().unwrap();
    assert_eq!(v1[0], 1, "level 1, nothing formed: version 1");
    let mut m = MetaMachine::new();
    m.restore(5, v1.clone()).unwrap();
    assert_eq!(m.state(), r.m.state());
    r.apply(&MetaOp::MarkFormed { groups: vec![1] }).unwrap();
    let v2 = r.m.snapshot().unwrap();
    assert_eq!(v2[0], 2, "a group formed at level 1: version 2");
    assert_eq!(v2.len(), v1.len() + 1, "one flag byte");
    assert_eq!(*v2.last().unwrap(), 1, "the one group's flags");
    let mut m = MetaMachine::new();
    m.restore(6, v2.clone()).unwrap();
    assert_eq!(m.state(), r.m.state());
    assert_eq!(m.level(), METADATA_LEVEL_MIN);
    r.apply(&MetaOp::FinalizeLevel { level: 2 }).unwrap();
    let v3 = r.m.snapshot().unwrap();
    assert_eq!(v3[0], META_SNAPSHOT_VERSION);
    assert_eq!(v3[10], 2, "the level after next_group and replication");
    assert_eq!(v3.len(), v2.len() + 1, "one level byte");
    let mut m = MetaMachine::new();
    m.restore(7, v3.clone()).unwrap();
    assert_eq!(m.state(), r.m.state());
    assert_eq!(m.level(), METADATA_LEVEL_FORMED);
    // A level this build does not know, or below 2, is refused.
    for (level, what) in [(METADATA_LEVEL_MAX + 1, "unsupported"), (1, "malformed")] {
        let mut bad = v3.to_vec();
        bad[10] = level;
        let mut m = MetaMachine::new();
        assert!(m.restore(7, Bytes::from(bad)).is_err(), "{what}");
    }
}

/// The finalized level rises only by a finalize op (never falls, marks leave it); one
/// above this build's stops the machine; a bad body is a refusal.
#[test]
fn the_level_rises_only_by_a_finalize_op_and_never_falls() {
    let mut r = with_members(2);
    r.apply(&declare("a")).unwrap();
    r.apply(&MetaOp::MarkFormed { groups: vec![1] }).unwrap();
    r.apply(&MetaOp::AddMemberAt {
        node: 4,
        member: member(4),
        level: 2,
    })
    .unwrap();
    assert_eq!(r.m.level(), METADATA_LEVEL_MIN, "marks and adds leave it");
    assert_eq!(
        r.apply(&MetaOp::FinalizeLevel { level: 2 }),
        Ok(MetaOutcome::Finalized { level: 2 })
    );
    assert_eq!(
        r.apply(&MetaOp::FinalizeLevel { level: 1 }),
        Ok(MetaOutcome::Finalized { level: 2 })
    );
    assert_eq!(r.m.level(), METADATA_LEVEL_FORMED);
    for bad in [
        vec![META_OPS_VERSION, 11],
        vec![META_OPS_VERSION, 11, 0],
        vec![META_OPS_VERSION, 11, 2, 0],
    ] {
        assert!(matches!(
            r.apply_bytes(Bytes::from(bad)),
            Err(MetaRefusal::Malformed(_))
        ));
    }
    let above = Bytes::from(vec![META_OPS_VERSION, 11, METADATA_LEVEL_MAX + 1]);
    assert!(
        r.m.apply(r.next, above).is_err(),
        "a level above the build's stops it"
    );
}

/// At level 2 a node not yet a member joins only declaring a level at least the
/// finalized one: an `AddMember` (what an older build sends) declares none and is
/// refused naming both levels, an `AddMemberAt` below it too; a member asking again
/// is not refused. The refusal changes nothing.
#[test]
fn a_joiner_below_the_finalized_level_is_refused_naming_both_levels() {
    let mut r = with_members(3);
    r.apply(&declare("a")).unwrap();
    // Level 1: an `AddMember` joins as before.
    r.apply(&add(3)).unwrap();
    r.apply(&MetaOp::FinalizeLevel { level: 2 }).unwrap();
    let before = r.m.state();
    let refused = MetaRefusal::LevelBelowFinalized {
        node: 4,
        level: 1,
        finalized: 2,
    };
    assert_eq!(r.apply(&add(4)), Err(refused.clone()));
    let low = MetaOp::AddMemberAt {
        node: 4,
        member: member(4),
        level: 1,
    };
    assert_eq!(r.apply(&low), Err(refused.clone()));
    assert_eq!(r.m.state(), before, "a refusal changes nothing");
    let text = refused.to_string();
    assert!(
        text.contains("metadata level 1") && text.contains("finalized level 2"),
        "{text}"
    );
    // Members asking again (a restart) are not refused, whatever they send.
    r.apply(&add(0)).unwrap();
    r.apply(&MetaOp::AddMemberAt {
        node: 1,
        member: member(1),
        level: 1,
    })
    .unwrap();
    assert_eq!(r.m.state(), before);
    // A joiner at level 2 joins.
    r.apply(&MetaOp::AddMemberAt {
        node: 4,
        member: member(4),
        level: 2,
    })
    .unwrap();
    assert!(r.m.members().contains_key(&4));
    // The join op follows the proposer's view of the level.
    assert_eq!(join_op(5, member(5), 2, 1), add(5));
    assert_eq!(
        join_op(5, member(5), 1, 2),
        MetaOp::AddMemberAt {
            node: 5,
            member: member(5),
            level: 1
        }
    );
}

/// The opener's barrier changes nothing, whether an address of its name exists or not,
/// and is a level-1 op.
#[test]
fn the_barrier_changes_nothing_at_level_1() {
    let mut r = with_members(3);
    r.apply(&declare("a")).unwrap();
    let before = r.m.state();
    assert!(matches!(
        r.apply(&barrier_op()),
        Err(MetaRefusal::Partitions { partitions: 0, .. })
    ));
    assert_eq!(r.m.state(), before);
    assert_eq!(r.m.level(), METADATA_LEVEL_MIN);
    r.apply(&declare(BARRIER_ADDRESS)).unwrap();
    let before = r.m.state();
    assert!(matches!(
        r.apply(&barrier_op()),
        Ok(MetaOutcome::Declared { created: false, .. })
    ));
    assert_eq!(r.m.state(), before);
}

/// Kind 10's body: cut short, a level 0 or trailing bytes are refusals.
#[test]
fn an_add_member_at_round_trips_and_a_bad_body_is_refused() {
    let op = MetaOp::AddMemberAt {
        node: 7,
        member: member(7),
        level: 2,
    };
    let bytes = encode_op(&op).unwrap();
    assert_eq!(bytes[1], 10);
    assert_eq!(codec::decode_op(bytes.clone()).unwrap(), Ok(op));
    let mut cut = bytes.to_vec();
    cut.pop();
    let mut zero = bytes.to_vec();
    *zero.last_mut().unwrap() = 0;
    let mut trailing = bytes.to_vec();
    trailing.push(2);
    for bad in [cut, zero, trailing] {
        let decoded = codec::decode_op(Bytes::from(bad)).unwrap();
        assert!(matches!(decoded, Err(MetaRefusal::Malformed(_))));
    }
}

/// A mark names at most `MAX_FORMED_PER_OP` groups; ids no group holds are passed over;
/// with none it changes nothing (a barrier).
#[test]
fn marking_groups_formed_is_bounded_and_idempotent() {
    let mut r = with_members(3);
    for i in 0..3 {
        r.apply(&declare(&format!("a{i}"))).unwrap();
    }
    let before = r.m.state();
    assert_eq!(
        r.apply(&MetaOp::MarkFormed { groups: vec![] }),
        Ok(MetaOutcome::Formed { newly: 0 })
    );
    assert_eq!(r.m.state(), before);
    assert_eq!(
        r.apply(&MetaOp::MarkFormed {
            groups: vec![2, 9, 2]
        }),
        Ok(MetaOutcome::Formed { newly: 1 })
    );
    assert_eq!(
        r.apply(&MetaOp::MarkFormed { groups: vec![2, 3] }),
        Ok(MetaOutcome::Formed { newly: 1 })
    );
    let too_many = MetaOp::MarkFormed {
        groups: vec![1; MAX_FORMED_PER_OP + 1],
    };
    assert!(matches!(
        encode_op(&too_many),
        Err(MetaRefusal::TooManyGroups { .. })
    ));
    let mut raw = BytesMut::new();
    raw.put_slice(&[META_OPS_VERSION, 9]);
    raw.put_u16_le(MAX_FORMED_PER_OP as u16 + 1);
    assert!(matches!(
        r.apply_bytes(raw.freeze()),
        Err(MetaRefusal::TooManyGroups { .. })
    ));
    let mut cut = BytesMut::new();
    cut.put_slice(&[META_OPS_VERSION, 9]);
    cut.put_u16_le(2);
    cut.put_u64_le(1);
    assert!(matches!(
        r.apply_bytes(cut.freeze()),
        Err(MetaRefusal::Malformed(_))
    ));
    let formed: Vec<bool> = r.m.state().groups().values().map(|e| e.formed).collect();
    assert_eq!(formed, vec![false, true, true]);
}

#[test]
fn the_snapshot_round_trips_and_refuses_what_it_cannot_read() {
    let mut r = with_members(4);
    for i in 0..10 {
        r.apply(&declare(&format!("address/{i}"))).unwrap();
    }
    r.apply(&MetaOp::DropAddress {
        name: "address/3".into(),
    })
    .unwrap();
    r.apply(&MetaOp::MarkFormed {
        groups: vec![1, 2, 4, 5],
    })
    .unwrap();
    let snap = r.m.snapshot().unwrap();
    let mut restored = MetaMachine::new();
    restored.restore(40, snap.clone()).unwrap();
    assert_eq!(restored.state(), r.m.state());
    let formed: Vec<GroupId> = restored
        .state()
        .groups()
        .iter()
        .filter(|(_, e)| e.formed)
        .map(|(g, _)| *g)
        .collect();
    assert_eq!(formed, vec![1, 2, 5], "group 4 (address/3) was dropped");
    assert_eq!(restored.lowest_needed(), 41);
    // Group ids are never reused after a restore either.
    let mut again = Replica {
        m: restored,
        next: Position::new(41, 0),
    };
    let out = again.apply(&declare("address/3")).unwrap();
    assert_eq!(
        out,
        MetaOutcome::Declared {
            group: 11,
            created: true
        }
    );
    // Another version, a cut, trailing bytes, a count past its bound.
    let mut versioned = snap.to_vec();
    versioned[0] = 4;
    let mut flags = with_members(1);
    flags.apply(&declare("one")).unwrap();
    flags
        .apply(&MetaOp::MarkFormed { groups: vec![1] })
        .unwrap();
    let mut flags = flags.m.snapshot().unwrap().to_vec();
    *flags.last_mut().unwrap() = 2;
    let mut cut = snap.to_vec();
    cut.truncate(snap.len() - 3);
    let mut trailing = snap.to_vec();
    trailing.push(1);
    let mut members = BytesMut::new();
    members.put_u8(1);
    members.put_u64_le(1);
    members.put_u8(3);
    members.put_u32_le(MAX_MEMBERS as u32 + 1);
    for bad in [versioned, flags, cut, trailing, members.to_vec()] {
        let mut m = MetaMachine::new();
        assert!(m.restore(1, Bytes::from(bad)).is_err());
        assert_eq!(*m.state(), MetaState::default(), "nothing taken");
    }
    assert!(matches!(
        codec::decode_snapshot(members.freeze()),
        Err(MetaMachineError::SnapshotLimit {
            what: "members",
            ..
        })
    ));
}

use crate::test_rng::Rng;

fn random_op(rng: &mut Rng) -> MetaOp {
    match rng.below(12) {
        11 => MetaOp::FinalizeLevel {
            level: 1 + rng.below(2) as u8,
        },
        0 | 1 => add(rng.below(6)),
        10 => {
            let node = rng.below(6);
            MetaOp::AddMemberAt {
                node,
                member: member(node),
                level: 1 + rng.below(2) as u8,
            }
        }
        2 => MetaOp::RemoveMember { node: rng.below(6) },
        3 | 4 => MetaOp::DropAddress {
            name: format!("a{}", rng.below(30)),
        },
        5 => MetaOp::MarkFormed {
            groups: (0..rng.below(4)).map(|_| rng.below(40)).collect(),
        },
        _ => declare(&format!("a{}", rng.below(30))),
    }
}

/// The structural promises of every state.
fn check(s: &MetaState, when: &str) {
    let members: BTreeSet<NodeId> = s.members().keys().copied().collect();
    let r = DEFAULT_REPLICATION_FACTOR.min(members.len());
    let mut seen = BTreeSet::new();
    for (g, e) in s.groups() {
        assert!(*g >= 1 && *g < s.next_group(), "{when}: group {g}");
        assert_eq!(e.replicas.nodes.len(), r, "{when}: group {g}");
        assert!(e.replicas.nodes.is_subset(&members), "{when}: group {g}");
        assert!(e.replicas.nodes.contains(&e.replicas.leader), "{when}");
        assert!(e.founders.contains(&e.founder), "{when}");
        let a = s.address(&e.address).unwrap();
        assert_eq!(a.group, *g, "{when}: one partition");
        seen.insert(e.address.clone());
    }
    assert_eq!(
        seen.len(),
        s.groups().len(),
        "{when}: one group per address"
    );
}

#[test]
fn replicas_applying_the_same_ops_hold_the_same_state() {
    for seed in [1u64, 7, 42, 1234, 99_991] {
        let mut rng = Rng(seed);
        let ops: Vec<MetaOp> = (0..400).map(|_| random_op(&mut rng)).collect();
        let cut = 100 + rng.below(200) as usize;
        let (mut a, mut b) = (Replica::new(), Replica::new());
        let mut late = None;
        for (i, op) in ops.iter().enumerate() {
            let (x, y) = (a.apply(op), b.apply(op));
            assert_eq!(x, y, "seed {seed} op {i}: {op:?}");
            check(&a.m.state(), &format!("seed {seed} op {i}"));
            if i + 1 == cut {
                // A third replica joins here from b's snapshot.
                let mut m = MetaMachine::new();
                m.restore(b.next.index - 1, b.m.snapshot().unwrap())
                    .unwrap();
                late = Some(Replica { m, next: b.next });
            } else if let Some(c) = late.as_mut() {
                assert_eq!(c.apply(op), x, "seed {seed} op {i} (restored)");
            }
        }
        assert_eq!(a.m.state(), b.m.state(), "seed {seed}");
        assert_eq!(late.unwrap().m.state(), a.m.state(), "seed {seed} restored");
    }
}

#[test]
fn declarations_alone_keep_replicas_and_leaders_within_one() {
    for n in 1..=6u64 {
        let mut r = with_members(n);
        for i in 0..40 {
            r.apply(&declare(&format!("q{i}"))).unwrap();
            let (reps, leads) = (replicas_per_member(&r.m), leads(&r.m));
            assert!(within_one(&reps), "{n} members, {i}: {reps:?}");
            assert!(within_one(&leads), "{n} members, {i}: {leads:?}");
        }
    }
}

#[test]
fn outcomes_are_kept_for_the_latest_proposals_only() {
    let mut r = with_members(1);
    let first = r.next;
    r.apply(&declare("a")).unwrap();
    for i in 0..MAX_RECENT_OUTCOMES {
        r.apply(&declare(&format!("b{}", i % 3))).unwrap();
    }
    assert!(r.m.outcome(first).is_none());
    assert!(r.m.outcome(Position::new(r.next.index - 1, 0)).is_some());
}
