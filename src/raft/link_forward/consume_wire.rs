//! The consumer half of the link-forwarding payload (`cluster/FORMAT.md`,
//! "link-forwarding payload, version 1", ops 2–5): checkout, fetch, settle and cancel
//! requests and their replies, encoded and decoded with every count and length bounded
//! before anything is allocated.
//!
//! Does not: decide anything (the forwarder in `consume.rs` and the leader in
//! `serve_consume.rs` do).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{
    cut, get_str, get_u32, get_u64, get_u8, put_str, Reply, Rest, LINK_FORWARD_VERSION,
    MAX_FORWARD_ADDRESS_BYTES, MAX_REASON_BYTES, REST_FAILED, REST_NONE, REST_NOT_SERVED,
};
use crate::broker::queue::{Outcome, QueuedMessage};

pub(super) const OP_CHECKOUT: u8 = 2;
pub(super) const OP_FETCH: u8 = 3;
pub(super) const OP_SETTLE: u8 = 4;
pub(super) const OP_CANCEL: u8 = 5;

/// Most deliveries one fetch reply carries.
pub const MAX_FETCH_MESSAGES: usize = 256;
/// Most message bytes one fetch reply carries (a single larger message goes alone).
pub const MAX_FETCH_BYTES: usize = 1 << 20;
/// Most outcomes one settle request carries, and most offsets one cancel carries.
pub const MAX_SETTLE_BATCH: usize = 1024;
/// Longest selector text on the wire.
pub const MAX_SELECTOR_BYTES: usize = crate::broker::forwarding::MAX_FORWARDED_SELECTOR_BYTES;
/// Longest link name or rejection text on the wire.
const MAX_NAME_BYTES: usize = 1024;

/// A forwarded consumer's checkout of the leader's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Checkout {
    pub address: String,
    pub forwarder: u64,
    pub link: String,
    pub selector: Option<String>,
}

/// A long poll: "I have taken `fetched` deliveries so far and have room for `room`
/// more; answer as soon as there is one, or after `wait_ms`".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fetch {
    pub consumer: u64,
    pub fetched: u32,
    pub room: u32,
    pub wait_ms: u32,
}

/// Deliveries the leader handed to a forwarded consumer.
#[derive(Debug, Clone)]
pub(super) struct Fetched {
    /// The leader parked the request (waited for a delivery); false when it answered at
    /// once because too many fetches were parked (`MAX_PARKED_FETCHES`).
    pub waited: bool,
    pub messages: Vec<QueuedMessage>,
}

/// Answers of a checkout or a fetch.
#[derive(Debug, Clone)]
pub(super) enum Answer<T> {
    Ok(T),
    Refused(Rest),
}

// Format: { version: u8 | op: u8 = 2 | address: str | forwarder: u64 | link: str |
//           has_selector: u8 | selector: str if has_selector }
pub(super) fn encode_checkout(c: &Checkout) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(64 + c.address.len());
    b.put_u8(LINK_FORWARD_VERSION);
    b.put_u8(OP_CHECKOUT);
    put_str(&mut b, &c.address);
    b.put_u64_le(c.forwarder);
    put_str(&mut b, cut(&c.link));
    match &c.selector {
        Some(s) => {
            b.put_u8(1);
            put_str(&mut b, s);
        }
        None => b.put_u8(0),
    }
    b.to_vec()
}

/// `b` past its version and op bytes.
pub(super) fn decode_checkout(mut b: Bytes) -> Result<Checkout, String> {
    let address = get_str(&mut b, MAX_FORWARD_ADDRESS_BYTES)?;
    let forwarder = get_u64(&mut b)?;
    let link = get_str(&mut b, MAX_NAME_BYTES)?;
    let selector = match get_u8(&mut b)? {
        0 => None,
        _ => Some(get_str(&mut b, MAX_SELECTOR_BYTES)?),
    };
    done(&b)?;
    Ok(Checkout {
        address,
        forwarder,
        link,
        selector,
    })
}

// Format: { version: u8 | op: u8 = 3 | consumer: u64 | fetched: u32 | room: u32 | wait_ms: u32 }
pub(super) fn encode_fetch(f: &Fetch) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(24);
    b.put_u8(LINK_FORWARD_VERSION);
    b.put_u8(OP_FETCH);
    b.put_u64_le(f.consumer);
    b.put_u32_le(f.fetched);
    b.put_u32_le(f.room);
    b.put_u32_le(f.wait_ms);
    b.to_vec()
}

pub(super) fn decode_fetch(mut b: Bytes) -> Result<Fetch, String> {
    let f = Fetch {
        consumer: get_u64(&mut b)?,
        fetched: get_u32(&mut b)?,
        room: get_u32(&mut b)?,
        wait_ms: get_u32(&mut b)?,
    };
    done(&b)?;
    Ok(f)
}

// Format: { version: u8 | op: u8 = 4 | consumer: u64 | n: u32 × { offset: u64 |
//           outcome: u8 (0 accepted, 1 released, 2 modified, 3 rejected) |
//           flags: u8 (modified: 1 delivery-failed, 2 undeliverable-here) |
//           condition: str | description: str (empty: none) } }
pub(super) fn encode_settle(consumer: u64, batch: &[(u64, Outcome)]) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(16 + batch.len() * 14);
    b.put_u8(LINK_FORWARD_VERSION);
    b.put_u8(OP_SETTLE);
    b.put_u64_le(consumer);
    b.put_u32_le(batch.len() as u32);
    for (offset, outcome) in batch {
        b.put_u64_le(*offset);
        let (tag, flags, condition, description) = match outcome {
            Outcome::Accepted => (0, 0, "", ""),
            Outcome::Released => (1, 0, "", ""),
            Outcome::Modified {
                delivery_failed,
                undeliverable_here,
            } => (
                2,
                u8::from(*delivery_failed) | (u8::from(*undeliverable_here) << 1),
                "",
                "",
            ),
            Outcome::Rejected {
                condition,
                description,
            } => (
                3,
                0,
                condition.as_str(),
                description.as_deref().unwrap_or(""),
            ),
        };
        b.put_u8(tag);
        b.put_u8(flags);
        put_str(&mut b, cut(condition));
        put_str(&mut b, cut(description));
    }
    b.to_vec()
}

pub(super) fn decode_settle(mut b: Bytes) -> Result<(u64, Vec<(u64, Outcome)>), String> {
    let consumer = get_u64(&mut b)?;
    let n = bounded_count(&mut b, MAX_SETTLE_BATCH, "MAX_SETTLE_BATCH")?;
    let mut batch = Vec::with_capacity(n);
    for _ in 0..n {
        let offset = get_u64(&mut b)?;
        let (tag, flags) = (get_u8(&mut b)?, get_u8(&mut b)?);
        let condition = get_str(&mut b, MAX_REASON_BYTES)?;
        let description = get_str(&mut b, MAX_REASON_BYTES)?;
        let outcome = match tag {
            0 => Outcome::Accepted,
            1 => Outcome::Released,
            2 => Outcome::Modified {
                delivery_failed: flags & 1 != 0,
                undeliverable_here: flags & 2 != 0,
            },
            3 => Outcome::Rejected {
                condition,
                description: (!description.is_empty()).then_some(description),
            },
            other => return Err(format!("unknown outcome {other}")),
        };
        batch.push((offset, outcome));
    }
    done(&b)?;
    Ok((consumer, batch))
}

// Format: { version: u8 | op: u8 = 5 | consumer: u64 | n: u32 × offset: u64 }
//         (the offsets fetched but never delivered: released without a failed attempt)
pub(super) fn encode_cancel(consumer: u64, undelivered: &[u64]) -> Vec<u8> {
    let undelivered = &undelivered[..undelivered.len().min(MAX_SETTLE_BATCH)];
    let mut b = BytesMut::with_capacity(16 + 8 * undelivered.len());
    b.put_u8(LINK_FORWARD_VERSION);
    b.put_u8(OP_CANCEL);
    b.put_u64_le(consumer);
    b.put_u32_le(undelivered.len() as u32);
    for o in undelivered {
        b.put_u64_le(*o);
    }
    b.to_vec()
}

pub(super) fn decode_cancel(mut b: Bytes) -> Result<(u64, Vec<u64>), String> {
    let consumer = get_u64(&mut b)?;
    let n = bounded_count(&mut b, MAX_SETTLE_BATCH, "MAX_SETTLE_BATCH")?;
    let mut offsets = Vec::with_capacity(n);
    for _ in 0..n {
        offsets.push(get_u64(&mut b)?);
    }
    done(&b)?;
    Ok((consumer, offsets))
}

// Format: { version: u8 | tag: u8 } 0 checked out { consumer: u64 }
//         | 1 not served { reason: str } | 2 failed { reason: str }
pub(super) fn encode_checked_out(answer: &Answer<u64>) -> Bytes {
    let mut b = answer_head(answer);
    if let Answer::Ok(consumer) = answer {
        b.put_u64_le(*consumer);
    }
    b.freeze()
}

pub(super) fn decode_checked_out(b: Bytes) -> Result<Answer<u64>, String> {
    let mut b = match decode_answer_head(b)? {
        Err(rest) => return Ok(Answer::Refused(rest)),
        Ok(b) => b,
    };
    let consumer = get_u64(&mut b)?;
    done(&b)?;
    Ok(Answer::Ok(consumer))
}

// Format: { version: u8 | tag: u8 } 0 deliveries { waited: u8 | n: u32 × { offset: u64 |
//           delivery_count: u32 | expires_at_ms: i64 (i64::MIN: none) | message: bytes } }
//         | 1 not served { reason: str } | 2 failed { reason: str }
pub(super) fn encode_fetched(answer: &Answer<Fetched>) -> Bytes {
    let mut b = answer_head(answer);
    if let Answer::Ok(f) = answer {
        b.put_u8(u8::from(f.waited));
        b.put_u32_le(f.messages.len() as u32);
        for m in &f.messages {
            b.put_u64_le(m.offset);
            b.put_u32_le(m.delivery_count);
            b.put_i64_le(m.expires_at_ms.unwrap_or(i64::MIN));
            b.put_u32_le(m.message.len() as u32);
            b.put_slice(&m.message);
        }
    }
    b.freeze()
}

pub(super) fn decode_fetched(b: Bytes) -> Result<Answer<Fetched>, String> {
    let mut b = match decode_answer_head(b)? {
        Err(rest) => return Ok(Answer::Refused(rest)),
        Ok(b) => b,
    };
    let waited = get_u8(&mut b)? != 0;
    let n = bounded_count(&mut b, MAX_FETCH_MESSAGES, "MAX_FETCH_MESSAGES")?;
    let mut messages = Vec::with_capacity(n);
    for _ in 0..n {
        let offset = get_u64(&mut b)?;
        let delivery_count = get_u32(&mut b)?;
        let expires = get_u64(&mut b)? as i64;
        let len = get_u32(&mut b)? as usize;
        if len > b.remaining() {
            return Err("delivery cut short".into());
        }
        messages.push(QueuedMessage {
            offset,
            message: b.split_to(len),
            delivery_count,
            expires_at_ms: (expires != i64::MIN).then_some(expires),
            excluded: None,
        });
    }
    done(&b)?;
    Ok(Answer::Ok(Fetched { waited, messages }))
}

fn answer_head<T>(answer: &Answer<T>) -> BytesMut {
    let mut b = BytesMut::with_capacity(64);
    b.put_u8(LINK_FORWARD_VERSION);
    match answer {
        Answer::Ok(_) => b.put_u8(REST_NONE),
        Answer::Refused(Rest::NotServed(why)) => {
            b.put_u8(REST_NOT_SERVED);
            put_str(&mut b, cut(why));
        }
        Answer::Refused(Rest::Failed(why)) => {
            b.put_u8(REST_FAILED);
            put_str(&mut b, cut(why));
        }
    }
    b
}

/// The body after an `ok` head, or the refusal.
fn decode_answer_head(mut b: Bytes) -> Result<Result<Bytes, Rest>, String> {
    let version = get_u8(&mut b)?;
    if version != LINK_FORWARD_VERSION {
        return Err(format!("link-forwarding reply version {version}"));
    }
    match get_u8(&mut b)? {
        REST_NONE => Ok(Ok(b)),
        REST_NOT_SERVED => Ok(Err(Rest::NotServed(get_str(&mut b, MAX_REASON_BYTES)?))),
        REST_FAILED => Ok(Err(Rest::Failed(get_str(&mut b, MAX_REASON_BYTES)?))),
        tag => Err(format!("unknown link-forwarding reply tag {tag}")),
    }
}

fn bounded_count(b: &mut Bytes, max: usize, name: &str) -> Result<usize, String> {
    let n = get_u32(b)? as usize;
    match n <= max {
        true => Ok(n),
        false => Err(format!(
            "{n} entries in one request or reply (at most {max}, {name})"
        )),
    }
}

fn done(b: &Bytes) -> Result<(), String> {
    match b.has_remaining() {
        true => Err("trailing bytes after the link-forwarding payload".into()),
        false => Ok(()),
    }
}

/// A settle or cancel answer reuses the enqueue reply: `stored` counts the prefix done.
pub(super) fn settled_reply(done: u32, rest: Option<Rest>) -> Reply {
    Reply { stored: done, rest }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: every consumer request and answer survives the wire; forged counts are
    /// refused naming their limit before allocating.
    #[test]
    fn consumer_payloads_round_trip_and_are_bounded() {
        let c = Checkout {
            address: "q".into(),
            forwarder: 3,
            link: "l".into(),
            selector: Some("color = 'red'".into()),
        };
        let wire = Bytes::from(encode_checkout(&c));
        assert_eq!(decode_checkout(wire.slice(2..)).unwrap(), c);
        let f = Fetch {
            consumer: 9,
            fetched: u32::MAX,
            room: 10,
            wait_ms: 1000,
        };
        assert_eq!(
            decode_fetch(Bytes::from(encode_fetch(&f)).slice(2..)).unwrap(),
            f
        );
        let batch = vec![
            (1, Outcome::Accepted),
            (2, Outcome::Released),
            (
                3,
                Outcome::Modified {
                    delivery_failed: true,
                    undeliverable_here: false,
                },
            ),
            (
                4,
                Outcome::Rejected {
                    condition: "amqp:x".into(),
                    description: None,
                },
            ),
        ];
        let (consumer, back) =
            decode_settle(Bytes::from(encode_settle(7, &batch)).slice(2..)).unwrap();
        assert_eq!(consumer, 7);
        assert_eq!(format!("{back:?}"), format!("{batch:?}"));
        let (_, offsets) =
            decode_cancel(Bytes::from(encode_cancel(7, &[5, 6])).slice(2..)).unwrap();
        assert_eq!(offsets, vec![5, 6]);

        let m = QueuedMessage {
            offset: 42,
            message: Bytes::from_static(b"body"),
            delivery_count: 2,
            expires_at_ms: Some(99),
            excluded: None,
        };
        let answer = Answer::Ok(Fetched {
            waited: true,
            messages: vec![m],
        });
        match decode_fetched(encode_fetched(&answer)).unwrap() {
            Answer::Ok(f) => {
                assert!(f.waited);
                assert_eq!(f.messages[0].offset, 42);
                assert_eq!(f.messages[0].delivery_count, 2);
                assert_eq!(f.messages[0].expires_at_ms, Some(99));
                assert_eq!(&f.messages[0].message[..], b"body");
            }
            other => panic!("{other:?}"),
        }
        let refused = Answer::<u64>::Refused(Rest::NotServed("gone".into()));
        assert!(matches!(
            decode_checked_out(encode_checked_out(&refused)).unwrap(),
            Answer::Refused(Rest::NotServed(w)) if w == "gone"
        ));
        let mut forged = BytesMut::new();
        forged.put_u8(LINK_FORWARD_VERSION);
        forged.put_u8(REST_NONE);
        forged.put_u8(0);
        forged.put_u32_le(u32::MAX);
        let e = decode_fetched(forged.freeze()).unwrap_err();
        assert!(e.contains("MAX_FETCH_MESSAGES"), "{e}");
        let mut forged = BytesMut::new();
        forged.put_u64_le(1);
        forged.put_u32_le(u32::MAX);
        let e = decode_settle(forged.freeze()).unwrap_err();
        assert!(e.contains("MAX_SETTLE_BATCH"), "{e}");
    }
}
