//! The address machine alone: apply, snapshot and restore round trips, dense offsets and
//! positions, `lowest_needed`, compact ranges under random acknowledgements, and typed
//! errors for what it must refuse.

use std::collections::BTreeSet;

use bytes::{BufMut, Bytes, BytesMut};
use entrepot_cluster::{GroupMachine, Position};

use super::*;
use crate::broker::replication::{
    encode_ack, encode_delivery_count, encode_drop_group, encode_file, encode_group_floor,
    encode_message, OPS_VERSION,
};

fn ops(f: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(OPS_VERSION);
    f(&mut b);
    b.freeze()
}

fn message(offset: u64, body: &[u8]) -> Bytes {
    ops(|b| encode_message(b, offset, body))
}

fn ack(group: Option<u32>, offsets: &[u64]) -> Bytes {
    ops(|b| encode_ack(b, group, offsets))
}

fn at(index: u64, slot: u32) -> Position {
    Position::new(index, slot)
}

/// Applies `n` messages as entries of `per_entry` slots from entry `first`; returns the
/// next free entry index.
fn messages(m: &mut AddressMachine, first: u64, n: u64, per_entry: u32) -> u64 {
    let mut index = first;
    let mut slot = 0;
    for _ in 0..n {
        let next = m.next_offset();
        m.apply(at(index, slot), message(next, b"body")).unwrap();
        slot += 1;
        if slot == per_entry {
            slot = 0;
            index += 1;
        }
    }
    if slot == 0 {
        index
    } else {
        index + 1
    }
}

use crate::test_rng::Rng;

#[test]
fn offsets_are_dense_in_log_order_and_runs_follow_the_slots() {
    let mut m = AddressMachine::new();
    // 1,000 messages, 250 per entry, from entry 5: four runs.
    let end = messages(&mut m, 5, 1000, 250);
    assert_eq!(end, 9);
    assert_eq!(m.next_offset(), 1000);
    assert_eq!(m.size(), (4, 0));
    assert_eq!(m.position(0), Some(at(5, 0)));
    assert_eq!(m.position(251), Some(at(6, 1)));
    assert_eq!(m.position(999), Some(at(8, 249)));
    assert_eq!(m.position(1000), None);
    assert_eq!(m.offset_at(at(7, 10)), Some(510));
    assert_eq!(m.offset_at(at(9, 0)), None);
    // A non-message slot between two messages splits the run.
    m.apply(at(9, 0), message(1000, b"a")).unwrap();
    m.apply(at(9, 1), ack(None, &[0])).unwrap();
    m.apply(at(9, 2), message(1001, b"b")).unwrap();
    assert_eq!(m.offset_at(at(9, 1)), None);
    assert_eq!(m.offset_at(at(9, 2)), Some(1001));
    // The log's order wins over a proposer's numbering.
    m.apply(at(10, 0), message(7, b"stale leader")).unwrap();
    assert_eq!(m.offset_at(at(10, 0)), Some(1002));
    assert_eq!(m.renumbered(), 1);
    assert_eq!(
        m.live(0, 3),
        vec![(1, at(5, 1)), (2, at(5, 2)), (3, at(5, 3))]
    );
}

#[test]
fn lowest_needed_is_the_entry_of_the_oldest_live_message() {
    let mut m = AddressMachine::new();
    assert_eq!(m.lowest_needed(), 0);
    let end = messages(&mut m, 1, 30, 10); // entries 1, 2, 3
    assert_eq!(m.lowest_needed(), 1);
    m.apply(at(end, 0), ack(None, &(0..10).collect::<Vec<_>>()))
        .unwrap();
    assert_eq!(m.lowest_needed(), 2);
    // A later message acknowledged first changes nothing: the oldest still pins.
    m.apply(at(end + 1, 0), ack(None, &[25])).unwrap();
    assert_eq!(m.lowest_needed(), 2);
    // Another group's acks do not free anything: the default group decides.
    m.apply(at(end + 2, 0), ack(Some(3), &(0..30).collect::<Vec<_>>()))
        .unwrap();
    assert_eq!(m.lowest_needed(), 2);
    m.apply(at(end + 3, 0), ops(|b| encode_group_floor(b, 0, 30)))
        .unwrap();
    assert_eq!(
        m.lowest_needed(),
        end + 4,
        "none live: after the last entry"
    );
    assert_eq!(m.size(), (0, 2), "one range per group, no run");
    assert!(m.live(0, 100).is_empty());
}

#[test]
fn a_snapshot_restores_the_same_index_and_never_holds_a_body() {
    let mut m = AddressMachine::new();
    let body = vec![0xab; 4096];
    let mut index = 1;
    for i in 0..20 {
        m.apply(at(index, 0), message(i, &body)).unwrap();
        index += 1;
    }
    let steps = [
        ack(None, &[0, 1, 2, 5]),
        ack(Some(7), &[3, 4]),
        ops(|b| encode_group_floor(b, 9, 12)),
        ops(|b| encode_delivery_count(b, 0, 6, 2)),
        ops(|b| encode_delivery_count(b, 7, 8, 1)),
        ops(|b| encode_delivery_count(b, 7, 3, 4)), // acknowledged by 7: ignored
        ops(|b| encode_drop_group(b, 9)),
        ops(|b| encode_drop_group(b, 0)), // the address's own group stays
    ];
    for s in steps {
        m.apply(at(index, 0), s).unwrap();
        index += 1;
    }
    assert_eq!(m.delivery_count(0, 6), 2);
    assert_eq!(m.delivery_count(7, 3), 0);
    assert!(m.is_acked(9, 100), "a dropped group has nothing pending");
    assert_eq!(m.acked(0), vec![0..3, 5..6]);
    let state = m.snapshot().unwrap();
    assert!(
        state.len() < body.len(),
        "{} bytes: the snapshot holds no body",
        state.len()
    );
    let mut back = AddressMachine::new();
    back.restore(index - 1, state.clone()).unwrap();
    assert_eq!(back.index(), m.index());
    assert_eq!(back.snapshot().unwrap(), state);
    assert_eq!(back.lowest_needed(), m.lowest_needed());
    // Both go on alike.
    for x in [&mut m, &mut back] {
        x.apply(at(index, 0), message(20, b"more")).unwrap();
        x.apply(at(index, 1), ack(None, &[3, 4])).unwrap();
    }
    assert_eq!(back.index(), m.index());
    assert_eq!(m.position(6), Some(at(7, 0)));
    assert_eq!(m.lowest_needed(), 7);
}

#[test]
fn ranges_stay_compact_under_random_acknowledgements() {
    for seed in [1u64, 7, 42, 0x5eed, 0xdead_beef] {
        let mut rng = Rng(seed);
        let mut m = AddressMachine::new();
        const N: u64 = 2000;
        let mut index = messages(&mut m, 1, N, 16);
        let mut model: BTreeSet<u64> = BTreeSet::new();
        let mut group_model: BTreeSet<u64> = BTreeSet::new();
        let mut order: Vec<u64> = (0..N).collect();
        // Mostly in order, with a window of competing consumers (up to 64 behind).
        for i in (1..order.len()).rev() {
            let j = i.saturating_sub(rng.below(64) as usize);
            order.swap(i, j);
        }
        for chunk in order.chunks(1 + rng.below(8) as usize) {
            m.apply(at(index, 0), ack(None, chunk)).unwrap();
            model.extend(chunk);
            if rng.below(2) == 0 {
                m.apply(at(index, 1), ack(Some(5), chunk)).unwrap();
                group_model.extend(chunk);
            }
            index += 1;
            // The set is exact, and as compact as it can be: one range per run of
            // consecutive acknowledged offsets.
            let ranges = m.acked(0);
            let live_from = (0..N).find(|o| !model.contains(o)).unwrap_or(N);
            let mut runs_in_model = 0;
            let mut prev: Option<u64> = None;
            for &o in model.range(live_from..) {
                if prev != Some(o.wrapping_sub(1)) {
                    runs_in_model += 1;
                }
                prev = Some(o);
            }
            let expected = runs_in_model + usize::from(live_from > 0);
            assert_eq!(ranges.len(), expected, "seed {seed}: {ranges:?}");
            for o in (0..N).step_by(7) {
                assert_eq!(
                    m.is_acked(0, o),
                    model.contains(&o),
                    "seed {seed} offset {o}"
                );
                // A group the machine has not seen yet has nothing pending.
                let gone = o < live_from || group_model.is_empty();
                assert_eq!(m.is_acked(5, o), gone || group_model.contains(&o));
            }
            if rng.below(50) == 0 {
                let mut back = AddressMachine::new();
                back.restore(index - 1, m.snapshot().unwrap()).unwrap();
                assert_eq!(back.index(), m.index(), "seed {seed}");
            }
        }
        assert_eq!(m.acked(0), vec![0..N], "seed {seed}");
        assert_eq!(m.acked(5), vec![0..N], "seed {seed}");
        assert_eq!(m.size(), (0, 2), "seed {seed}");
        assert_eq!(m.lowest_needed(), index);
    }
}

#[test]
fn what_it_must_refuse_is_a_typed_error() {
    let mut m = AddressMachine::new();
    let two = ops(|b| {
        encode_message(b, 0, b"a");
        encode_ack(b, None, &[0]);
    });
    let refused = m.lock().apply(at(1, 0), &two);
    assert!(matches!(
        refused,
        Err(AddressMachineError::MessageNotAlone { index: 1, slot: 0 })
    ));
    let file = ops(|b| encode_file(b, "subscriptions.yaml", b"x"));
    assert!(matches!(
        m.lock().apply(at(1, 0), &file),
        Err(AddressMachineError::FileOp { .. })
    ));
    assert!(matches!(
        m.lock().apply(at(1, 0), &Bytes::from_static(&[9])),
        Err(AddressMachineError::Ops { .. })
    ));
    assert!(m.apply(at(1, 0), Bytes::from_static(&[9])).is_err());
    // Snapshots: version, truncation, order, bounds.
    messages(&mut m, 2, 10, 4);
    m.apply(at(9, 0), ack(None, &[3, 5])).unwrap();
    let good = m.snapshot().unwrap().to_vec();
    let mut bad = good.clone();
    bad[0] = 2;
    assert!(matches!(
        AddressIndex::decode(Bytes::from(bad)),
        Err(AddressMachineError::UnsupportedVersion { found: 2 })
    ));
    for cut in [1, 10, good.len() - 1] {
        assert!(AddressIndex::decode(Bytes::copy_from_slice(&good[..cut])).is_err());
    }
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(AddressIndex::decode(Bytes::from(trailing)).is_err());
    let mut huge = good[..25].to_vec();
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        AddressIndex::decode(Bytes::from(huge)),
        Err(AddressMachineError::LimitExceeded { what: "runs", .. })
    ));
    // Two runs swapped.
    let mut swapped = good.clone();
    let first = 29;
    let (a, b) = swapped[first..first + 2 * RUN_BYTES].split_at_mut(RUN_BYTES);
    a.swap_with_slice(b);
    assert!(matches!(
        AddressIndex::decode(Bytes::from(swapped)),
        Err(AddressMachineError::Malformed(_))
    ));
    assert!(AddressIndex::decode(Bytes::from(good)).is_ok());
}

#[test]
fn a_message_record_is_a_slice_of_its_payload() {
    let payload = message(3, b"the record");
    let record = message_record(&payload).unwrap();
    assert_eq!(&record[..], b"the record");
    assert_eq!(record.as_ptr(), payload[MESSAGE_RECORD_AT..].as_ptr());
    assert_eq!(message_record(&ack(None, &[1])), None);
}

/// The layout of `cluster/FORMAT.md` ("address index"), byte by byte: two messages in
/// entry 7 (slots 0 and 1), offset 0 acknowledged, one delivery count.
#[test]
fn the_snapshot_layout_is_the_documented_one() {
    let mut m = AddressMachine::new();
    m.apply(at(7, 0), message(0, b"a")).unwrap();
    m.apply(at(7, 1), message(1, b"b")).unwrap();
    m.apply(at(8, 0), ack(None, &[0])).unwrap();
    m.apply(at(9, 0), ops(|b| encode_delivery_count(b, 0, 1, 3)))
        .unwrap();
    let mut want = vec![1u8]; // version
    want.extend_from_slice(&2u64.to_le_bytes()); // next_offset
    want.extend_from_slice(&10u64.to_le_bytes()); // applied_end
    want.extend_from_slice(&0u64.to_le_bytes()); // renumbered
    want.extend_from_slice(&1u32.to_le_bytes()); // runs
    want.extend_from_slice(&0u64.to_le_bytes()); //   offset
    want.extend_from_slice(&7u64.to_le_bytes()); //   index
    want.extend_from_slice(&0u32.to_le_bytes()); //   slot
    want.extend_from_slice(&2u32.to_le_bytes()); //   count
    want.extend_from_slice(&1u32.to_le_bytes()); // groups
    want.extend_from_slice(&0u32.to_le_bytes()); //   group 0
    want.extend_from_slice(&1u32.to_le_bytes()); //   ranges
    want.extend_from_slice(&0u64.to_le_bytes()); //     start
    want.extend_from_slice(&1u64.to_le_bytes()); //     end
    want.extend_from_slice(&1u32.to_le_bytes()); // counts
    want.extend_from_slice(&0u32.to_le_bytes()); //   group
    want.extend_from_slice(&1u64.to_le_bytes()); //   offset
    want.extend_from_slice(&3u32.to_le_bytes()); //   count
    assert_eq!(&m.snapshot().unwrap()[..], &want[..]);
    let mut back = AddressMachine::new();
    back.restore(9, Bytes::from(want)).unwrap();
    assert_eq!(back.index(), m.index());
}
