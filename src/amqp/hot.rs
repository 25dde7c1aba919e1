//! The performatives of the message path — `transfer`, `disposition`, `flow` — decoded
//! by hand.
//!
//! Every message costs the broker a transfer from its producer and a disposition from its
//! consumer, and credit comes back in flows; through serde_amqp's generic deserializer
//! these three were 12 % of the broker's CPU at p1k-8x8 (perf, benches/RESULTS.md session
//! 22). Here each is read in one pass over its flat list of primitives.
//!
//! Owns: [`decode`], the fast path that `frame::split_performative` tries first.
//!
//! Invariants:
//! * Whatever [`decode`] returns is exactly what serde_amqp decodes from the same bytes,
//!   and the length it returns is the performative's encoded length (the tests compare
//!   both on generated, re-encoded and randomly damaged frames).
//! * It understands a strict subset — the encodings the AMQP type system allows for each
//!   field's type, a list whose size and count match its items, a `ulong` descriptor, a
//!   delivery state that is `accepted` or `released` — and answers `None` for anything
//!   else, valid or not: the caller then takes the checked serde_amqp path, which decodes
//!   the rest or names what is wrong. So no error is decided here.
//! * Nothing reads past the list's end or the slice; nothing nests (no recursion).

use fe2o3_amqp_types::definitions::{DeliveryTag, Handle, Role};
use fe2o3_amqp_types::messaging::{Accepted, DeliveryState, Released};
use fe2o3_amqp_types::performatives::{Disposition, Flow, Performative, Transfer};

use super::encoding::DESCRIBED;

/// Descriptor codes (spec 2.7).
const FLOW: u64 = 0x13;
const TRANSFER: u64 = 0x14;
const DISPOSITION: u64 = 0x15;
const ACCEPTED: u64 = 0x24;
const RELEASED: u64 = 0x26;

/// Fields of each performative's list.
const TRANSFER_FIELDS: usize = 11;
const DISPOSITION_FIELDS: usize = 6;
const FLOW_FIELDS: usize = 11;

/// The performative at the start of `body` and its encoded length, when it is a
/// transfer, disposition or flow this module reads whole; `None` otherwise.
pub fn decode(body: &[u8]) -> Option<(Performative, usize)> {
    let (code, at) = descriptor(body, 0)?;
    let mut list = List::open(body, at)?;
    let performative = match code {
        TRANSFER if list.count <= TRANSFER_FIELDS => Performative::Transfer(transfer(&mut list)?),
        DISPOSITION if list.count <= DISPOSITION_FIELDS => {
            Performative::Disposition(disposition(&mut list)?)
        }
        FLOW if list.count <= FLOW_FIELDS => Performative::Flow(flow(&mut list)?),
        _ => return None,
    };
    Some((performative, list.finish()?))
}

fn transfer(l: &mut List<'_>) -> Option<Transfer> {
    Some(Transfer {
        handle: Handle(l.uint()??),
        delivery_id: l.uint()?,
        delivery_tag: l.binary()?.map(|t| DeliveryTag::from(t.to_vec())),
        message_format: l.uint()?,
        settled: l.boolean()?,
        more: l.boolean()?.unwrap_or(false),
        rcv_settle_mode: l.null()?,
        state: l.null()?,
        resume: l.boolean()?.unwrap_or(false),
        aborted: l.boolean()?.unwrap_or(false),
        batchable: l.boolean()?.unwrap_or(false),
    })
}

fn disposition(l: &mut List<'_>) -> Option<Disposition> {
    Some(Disposition {
        role: match l.boolean()?? {
            true => Role::Receiver,
            false => Role::Sender,
        },
        first: l.uint()??,
        last: l.uint()?,
        settled: l.boolean()?.unwrap_or(false),
        state: l.state()?,
        batchable: l.boolean()?.unwrap_or(false),
    })
}

fn flow(l: &mut List<'_>) -> Option<Flow> {
    Some(Flow {
        next_incoming_id: l.uint()?,
        incoming_window: l.uint()??,
        next_outgoing_id: l.uint()??,
        outgoing_window: l.uint()??,
        handle: l.uint()?.map(Handle),
        delivery_count: l.uint()?,
        link_credit: l.uint()?,
        available: l.uint()?,
        drain: l.boolean()?.unwrap_or(false),
        echo: l.boolean()?.unwrap_or(false),
        properties: l.null()?,
    })
}

/// A `0x00` constructor and a `ulong` descriptor at `at`: the code and where the described
/// value starts.
fn descriptor(buf: &[u8], at: usize) -> Option<(u64, usize)> {
    if *buf.get(at)? != DESCRIBED {
        return None;
    }
    match *buf.get(at + 1)? {
        0x53 => Some((u64::from(*buf.get(at + 2)?), at + 3)),
        0x80 => Some((u64::from_be_bytes(take(buf, at + 2)?), at + 10)),
        0x44 => Some((0, at + 2)),
        _ => None,
    }
}

/// `N` bytes at `at`, if present.
fn take<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// The items of one list, read in order; an item past the list's count reads as null.
struct List<'a> {
    buf: &'a [u8],
    /// The next item.
    pos: usize,
    /// The list's end (its size prefix), within `buf`.
    end: usize,
    count: usize,
    read: usize,
}

impl<'a> List<'a> {
    /// The list whose constructor is at `at` (`list0`, `list8` or `list32`).
    fn open(buf: &'a [u8], at: usize) -> Option<List<'a>> {
        let (pos, end, count) = match *buf.get(at)? {
            0x45 => (at + 1, at + 1, 0),
            0xc0 => {
                let [size, count] = take(buf, at + 1)?;
                let end = (at + 2).checked_add(usize::from(size))?;
                (at + 3, end, usize::from(count))
            }
            0xd0 => {
                let size = u32::from_be_bytes(take(buf, at + 1)?);
                let count = u32::from_be_bytes(take(buf, at + 5)?);
                let end = (at + 5).checked_add(usize::try_from(size).ok()?)?;
                (at + 9, end, usize::try_from(count).ok()?)
            }
            _ => return None,
        };
        (pos <= end && end <= buf.len()).then_some(List {
            buf,
            pos,
            end,
            count,
            read: 0,
        })
    }

    /// The next item's format code; `Some(None)` past the count.
    fn code(&mut self) -> Option<Option<u8>> {
        if self.read == self.count {
            return Some(None);
        }
        self.read += 1;
        let code = *self.bytes(1)?.first()?;
        Some(Some(code))
    }

    /// The next `n` bytes of the list.
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        if end > self.end {
            return None;
        }
        let b = &self.buf[self.pos..end];
        self.pos = end;
        Some(b)
    }

    /// A `uint` (or null).
    fn uint(&mut self) -> Option<Option<u32>> {
        match self.code()? {
            None | Some(0x40) => Some(None),
            Some(0x43) => Some(Some(0)),
            Some(0x52) => Some(Some(u32::from(*self.bytes(1)?.first()?))),
            Some(0x70) => Some(Some(u32::from_be_bytes(self.bytes(4)?.try_into().ok()?))),
            Some(_) => None,
        }
    }

    /// A `boolean` (or null).
    fn boolean(&mut self) -> Option<Option<bool>> {
        match self.code()? {
            None | Some(0x40) => Some(None),
            Some(0x41) => Some(Some(true)),
            Some(0x42) => Some(Some(false)),
            Some(0x56) => match *self.bytes(1)?.first()? {
                0 => Some(Some(false)),
                1 => Some(Some(true)),
                _ => None,
            },
            Some(_) => None,
        }
    }

    /// A `binary` (or null).
    fn binary(&mut self) -> Option<Option<&'a [u8]>> {
        let len = match self.code()? {
            None | Some(0x40) => return Some(None),
            Some(0xa0) => usize::from(*self.bytes(1)?.first()?),
            Some(0xb0) => {
                usize::try_from(u32::from_be_bytes(self.bytes(4)?.try_into().ok()?)).ok()?
            }
            Some(_) => return None,
        };
        Some(Some(self.bytes(len)?))
    }

    /// A field read here only when null (anything else: the serde path).
    fn null<T>(&mut self) -> Option<Option<T>> {
        match self.code()? {
            None | Some(0x40) => Some(None),
            Some(_) => None,
        }
    }

    /// A delivery state: null, `accepted` or `released` with no fields.
    fn state(&mut self) -> Option<Option<DeliveryState>> {
        let start = self.pos;
        match self.code()? {
            None | Some(0x40) => return Some(None),
            Some(DESCRIBED) => {}
            Some(_) => return None,
        }
        let (code, at) = descriptor(self.buf, start)?;
        let empty = List::open(&self.buf[..self.end], at)?;
        if empty.count != 0 {
            return None;
        }
        self.pos = empty.finish()?;
        match code {
            ACCEPTED => Some(Some(DeliveryState::Accepted(Accepted {}))),
            RELEASED => Some(Some(DeliveryState::Released(Released {}))),
            _ => None,
        }
    }

    /// The list's end, once every item was read and nothing is left over.
    fn finish(self) -> Option<usize> {
        (self.read == self.count && self.pos == self.end).then_some(self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;
    use fe2o3_amqp_types::definitions::ReceiverSettleMode;
    use fe2o3_amqp_types::messaging::Modified;

    /// serde_amqp's answer for the same bytes: the performative and its length.
    fn serde(body: &[u8]) -> Option<(Performative, usize)> {
        crate::amqp::frame::decode_performative(body).ok()
    }

    /// Small values (smalluint, uint0) as often as large ones.
    fn u32_of(r: &mut Rng) -> u32 {
        match r.below(3) {
            0 => 0,
            1 => r.below(256) as u32,
            _ => r.next() as u32,
        }
    }

    fn opt_u32(r: &mut Rng) -> Option<u32> {
        (r.below(4) != 0).then(|| u32_of(r))
    }

    fn transfer_of(r: &mut Rng) -> Transfer {
        Transfer {
            handle: Handle(u32_of(r)),
            delivery_id: opt_u32(r),
            delivery_tag: (r.below(4) != 0)
                .then(|| DeliveryTag::from((0..r.below(40)).map(|i| i as u8).collect::<Vec<u8>>())),
            message_format: opt_u32(r),
            settled: (r.coin()).then(|| r.coin()),
            more: r.coin(),
            rcv_settle_mode: None,
            state: None,
            resume: r.below(8) == 0,
            aborted: r.below(8) == 0,
            batchable: r.coin(),
        }
    }

    fn disposition_of(r: &mut Rng) -> Disposition {
        Disposition {
            role: if r.coin() {
                Role::Receiver
            } else {
                Role::Sender
            },
            first: u32_of(r),
            last: opt_u32(r),
            settled: r.coin(),
            state: match r.below(3) {
                0 => None,
                1 => Some(DeliveryState::Accepted(Accepted {})),
                _ => Some(DeliveryState::Released(Released {})),
            },
            batchable: r.coin(),
        }
    }

    fn flow_of(r: &mut Rng) -> Flow {
        Flow {
            next_incoming_id: opt_u32(r),
            incoming_window: u32_of(r),
            next_outgoing_id: u32_of(r),
            outgoing_window: u32_of(r),
            handle: opt_u32(r).map(Handle),
            delivery_count: opt_u32(r),
            link_credit: opt_u32(r),
            available: opt_u32(r),
            drain: r.coin(),
            echo: r.below(8) == 0,
            properties: None,
        }
    }

    fn performative_of(r: &mut Rng) -> Performative {
        match r.below(3) {
            0 => Performative::Transfer(transfer_of(r)),
            1 => Performative::Disposition(disposition_of(r)),
            _ => Performative::Flow(flow_of(r)),
        }
    }

    /// Frames the fast path read (each checked against serde_amqp) and left to it.
    #[derive(Default)]
    struct Tally {
        read: u32,
        refused: u32,
    }

    impl Tally {
        /// Whatever the fast path reads from `body` is what serde_amqp reads, length
        /// included.
        fn check(&mut self, body: &[u8]) {
            match decode(body) {
                Some(fast) => {
                    self.read += 1;
                    assert_eq!(Some(&fast), serde(body).as_ref(), "{body:02x?}");
                }
                None => self.refused += 1,
            }
        }

        /// The run exercised both sides.
        fn both_sides_seen(&self) {
            let (read, refused) = (self.read, self.refused);
            assert!(
                read > 1_000 && refused > 1_000,
                "read {read}, refused {refused}"
            );
        }
    }

    /// A frame body: the performative as fe2o3-amqp (serde_amqp) encodes it, then a payload.
    fn body_of(p: &Performative, payload: &[u8]) -> Vec<u8> {
        let mut b = serde_amqp::to_vec(p).expect("encodes");
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn what_fe2o3_encodes_decodes_as_serde_amqp_decodes_it() {
        let mut r = Rng(0x5eed_1234_abcd_0001);
        for _ in 0..5_000 {
            let p = performative_of(&mut r);
            let body = body_of(&p, b"payload after the performative");
            let fast = decode(&body).expect("the fast path reads what fe2o3 encodes");
            assert_eq!(Some(&fast), serde(&body).as_ref(), "{p:?}");
            assert_eq!(fast.0, p);
        }
    }

    /// Hand-built encodings other clients use (proton-c writes `list32` for long lists,
    /// `uint` where a `smalluint` would do, explicit trailing nulls, `0x56` booleans), and a
    /// `ulong` descriptor: decoded exactly as serde_amqp decodes them.
    #[test]
    fn other_encodings_of_the_same_fields_decode_as_serde_amqp_decodes_them() {
        let uint = |v: u32| [&[0x70u8][..], &v.to_be_bytes()].concat();
        let fields: Vec<Vec<u8>> = vec![
            uint(7),                   // handle
            vec![0x52, 9],             // delivery-id
            vec![0xa0, 2, 0xab, 0xcd], // delivery-tag
            vec![0x43],                // message-format
            vec![0x56, 0x01],          // settled
            vec![0x40],                // more (null: false)
            vec![0x40],                // rcv-settle-mode
            vec![0x40],                // state
            vec![0x56, 0x00],          // resume
            vec![0x42],                // aborted
            vec![0x41],                // batchable
        ];
        let items: Vec<u8> = fields.concat();
        let list32 = |items: &[u8], count: u32| {
            let size = (items.len() + 4) as u32;
            [
                &[0xd0u8][..],
                &size.to_be_bytes(),
                &count.to_be_bytes(),
                items,
            ]
            .concat()
        };
        let list8 = |items: &[u8], count: u8| {
            [&[0xc0u8, (items.len() + 1) as u8, count][..], items].concat()
        };
        let ulong = [0x00u8, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x14];
        let small = [0x00u8, 0x53, 0x14];
        for body in [
            [&small[..], &list32(&items, 11)].concat(),
            [&ulong[..], &list8(&items, 11)].concat(),
            [&small[..], &list8(&fields[..2].concat(), 2), b"body"].concat(),
        ] {
            let fast = decode(&body).expect("read by hand");
            assert_eq!(Some(fast), serde(&body), "{body:02x?}");
        }
        // A disposition with `accepted` as list8 with no items and a ulong descriptor.
        let accepted = [0x00u8, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x24, 0xc0, 0x01, 0x00];
        let d = [
            vec![0x41],
            vec![0x43],
            vec![0x40],
            vec![0x41],
            accepted.to_vec(),
        ]
        .concat();
        let body = [&[0x00u8, 0x53, 0x15][..], &list8(&d, 5)].concat();
        let fast = decode(&body).expect("read by hand");
        assert_eq!(Some(fast), serde(&body));
    }

    /// What the fast path leaves to serde_amqp: valid performatives it does not read whole
    /// (a state other than accepted/released, a settle mode, flow properties, a symbolic
    /// descriptor, another performative).
    #[test]
    fn what_it_does_not_read_whole_is_left_to_serde_amqp() {
        let mut transfer = transfer_of(&mut Rng(3));
        transfer.rcv_settle_mode = Some(ReceiverSettleMode::Second);
        let mut modified = disposition_of(&mut Rng(4));
        modified.state = Some(DeliveryState::Modified(Modified {
            delivery_failed: Some(true),
            undeliverable_here: None,
            message_annotations: None,
        }));
        let mut flow = flow_of(&mut Rng(5));
        let mut props = fe2o3_amqp_types::definitions::Fields::new();
        props.insert("k".into(), 1u32.into());
        flow.properties = Some(props);
        for p in [
            Performative::Transfer(transfer),
            Performative::Disposition(modified),
            Performative::Flow(flow),
            Performative::End(fe2o3_amqp_types::performatives::End { error: None }),
        ] {
            let body = body_of(&p, &[]);
            assert!(serde(&body).is_some());
            assert!(decode(&body).is_none(), "{p:?}");
        }
        let symbolic = [
            &[0x00u8, 0xa3, 18][..],
            b"amqp:transfer:list",
            &[0xc0, 2, 1, 0x43],
        ]
        .concat();
        assert!(serde(&symbolic).is_some());
        assert!(decode(&symbolic).is_none());
    }

    /// One encoded item of the field-wise test: a value of any type the fields of these
    /// performatives might carry, valid for the field or not.
    fn item_of(r: &mut Rng) -> Vec<u8> {
        let byte = |r: &mut Rng| [0u8, 1, 2, 0x7f, 0xff][r.below(5) as usize];
        match r.below(16) {
            0 => vec![0x40],
            1 => vec![0x41],
            2 => vec![0x42],
            3 => vec![0x56, byte(r)],
            4 => vec![0x43],
            5 => vec![0x52, byte(r)],
            6 => [&[0x70u8][..], &(r.next() as u32).to_be_bytes()].concat(),
            7 => vec![0x50, byte(r)],
            8 => vec![0x44],
            9 => {
                let n = r.below(4) as u8;
                [&[0xa0u8, n][..], &vec![7u8; usize::from(n)]].concat()
            }
            10 => [&[0xb0u8][..], &2u32.to_be_bytes(), &[1, 2]].concat(),
            11 => vec![0x00, 0x53, 0x24, 0x45],
            12 => vec![0x00, 0x53, 0x26, 0xc0, 0x01, 0x00],
            13 => vec![0x00, 0x53, [0x25, 0x27, 0x23][r.below(3) as usize], 0x45],
            14 => vec![0x00, 0x53, 0x24, 0xc0, 0x02, 0x01, 0x40],
            _ => vec![0xc0, 0x01, 0x00],
        }
    }

    /// Lists built field by field from [`item_of`] (every position any type, any count,
    /// `list8` or `list32`, sizes right): whatever the fast path reads is what serde_amqp
    /// reads. This is where a field's encoding the fast path wrongly accepts shows.
    #[test]
    fn lists_of_any_items_decode_as_serde_amqp_decodes_them_or_not_at_all() {
        let mut r = Rng(0x00dd_ba11_5eed_7777);
        let mut tally = Tally::default();
        for _ in 0..60_000 {
            let (code, fields) = [(0x14u8, 11u64), (0x15, 6), (0x13, 11)][r.below(3) as usize];
            let count = r.below(fields + 2);
            // Mostly the right kind of value in each place, so that whole lists get read.
            let items: Vec<u8> = (0..count)
                .flat_map(|_| match r.below(3) {
                    0 => item_of(&mut r),
                    1 => vec![0x52, r.below(3) as u8],
                    _ => vec![[0x40u8, 0x41, 0x42, 0x43][r.below(4) as usize]],
                })
                .collect();
            let list = match r.below(2) {
                0 => [&[0xc0u8, (items.len() + 1) as u8, count as u8][..], &items].concat(),
                _ => {
                    let size = (items.len() + 4) as u32;
                    [
                        &[0xd0u8][..],
                        &size.to_be_bytes(),
                        &(count as u32).to_be_bytes(),
                        &items,
                    ]
                    .concat()
                }
            };
            let body = [&[0x00u8, 0x53, code][..], &list, b"tail"].concat();
            tally.check(&body);
        }
        tally.both_sides_seen();
    }

    /// Format codes the damage writes (spec 1.6).
    const CODES: [u8; 16] = [
        0x00, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x50, 0x52, 0x53, 0x56, 0x70, 0x80, 0xa0, 0xc0,
        0xd0,
    ];

    /// Damaged frames (bytes changed, inserted, cut): whatever the fast path reads is what
    /// serde_amqp reads, length included — it never accepts what serde_amqp refuses.
    #[test]
    fn damaged_frames_decode_as_serde_amqp_decodes_them_or_not_at_all() {
        let mut r = Rng(0xdead_beef_0bad_cafe);
        let mut tally = Tally::default();
        for _ in 0..40_000 {
            let p = performative_of(&mut r);
            let mut body = body_of(&p, &[]);
            for _ in 0..=r.below(3) {
                let at = r.below(body.len() as u64) as usize;
                match r.below(5) {
                    0 => body.truncate(at),
                    1 => body.insert(at, r.next() as u8),
                    // A format code of the type system, then a random byte: a field
                    // re-encoded, often wrongly (`0x56 0x02`, a `smalluint` cut short).
                    2 => {
                        body[at] = CODES[r.below(CODES.len() as u64) as usize];
                        body.insert(at + 1, r.next() as u8);
                    }
                    _ => body[at] = r.next() as u8,
                }
                if body.is_empty() {
                    break;
                }
            }
            tally.check(&body);
        }
        tally.both_sides_seen();
    }
}
