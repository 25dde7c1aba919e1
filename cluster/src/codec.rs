//! A small bounded binary codec: fixed-width little-endian integers, length-prefixed
//! byte strings, and counts checked against a named limit *before* anything is allocated.
//!
//! Every structure this crate writes (Raft entries, the state file, snapshots) is built
//! from these primitives; their byte layouts are documented next to their encoders and
//! in `cluster/FORMAT.md`. Decoding never panics: short input, trailing bytes, unknown
//! tags and oversize lengths are [`ClusterError::Decode`] / [`ClusterError::LimitExceeded`].

use bytes::Bytes;

use crate::error::{ClusterError, Result};

/// Appends little-endian values to a buffer.
#[derive(Debug, Default)]
pub(crate) struct Encoder {
    pub(crate) buf: Vec<u8>,
}

impl Encoder {
    pub(crate) fn with_capacity(n: usize) -> Encoder {
        Encoder {
            buf: Vec::with_capacity(n),
        }
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// `len: u32 | bytes`; the caller has checked `len` against its limit.
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }
    /// `len: u16 | utf8`; the caller has checked `len` against its limit.
    pub(crate) fn str(&mut self, v: &str) {
        self.u16(v.len() as u16);
        self.buf.extend_from_slice(v.as_bytes());
    }
}

/// Reads what [`Encoder`] wrote, from a `Bytes` so byte strings come out as zero-copy slices.
#[derive(Debug)]
pub(crate) struct Decoder {
    buf: Bytes,
    pos: usize,
    what: &'static str,
}

impl Decoder {
    /// `what` names the structure in errors ("raft entry", "snapshot", …).
    pub(crate) fn new(buf: Bytes, what: &'static str) -> Decoder {
        Decoder { buf, pos: 0, what }
    }

    pub(crate) fn fail(&self, reason: &'static str) -> ClusterError {
        ClusterError::Decode {
            what: self.what,
            position: self.pos,
            reason,
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.buf.len() - self.pos < n {
            return Err(self.fail("truncated"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16> {
        let mut b = [0; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(b))
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    pub(crate) fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.fail("boolean is neither 0 nor 1")),
        }
    }

    /// A `len: u32 | bytes` string of at most `max` bytes, as a slice of the input.
    pub(crate) fn bytes(&mut self, what: &'static str, max: usize) -> Result<Bytes> {
        let len = self.u32()? as usize;
        check_limit(what, len, max)?;
        if self.buf.len() - self.pos < len {
            return Err(self.fail("truncated"));
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// A `len: u16 | utf8` string of at most `max` bytes.
    pub(crate) fn str(&mut self, what: &'static str, max: usize) -> Result<String> {
        let len = usize::from(self.u16()?);
        check_limit(what, len, max)?;
        let raw = self.take(len)?.to_vec();
        String::from_utf8(raw).map_err(|_| self.fail("string is not UTF-8"))
    }

    /// A `count: u32` of items at least `item_min_bytes` long each: bounded by `max` and by
    /// what the remaining input could hold, so `Vec::with_capacity(count)` is safe.
    pub(crate) fn count(
        &mut self,
        what: &'static str,
        max: usize,
        item_min_bytes: usize,
    ) -> Result<usize> {
        let count = self.u32()? as usize;
        check_limit(what, count, max)?;
        if count.saturating_mul(item_min_bytes.max(1)) > self.buf.len() - self.pos {
            return Err(self.fail("count larger than the remaining input"));
        }
        Ok(count)
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(&self) -> Result<()> {
        if self.pos != self.buf.len() {
            return Err(self.fail("trailing bytes"));
        }
        Ok(())
    }
}

pub(crate) fn check_limit(what: &'static str, len: usize, max: usize) -> Result<()> {
    if len > max {
        return Err(ClusterError::LimitExceeded {
            what,
            len: len as u64,
            max: max as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_primitive() {
        let mut e = Encoder::default();
        e.u8(7);
        e.u16(0xbeef);
        e.u32(123_456);
        e.u64(u64::MAX);
        e.bytes(b"body");
        e.str("queue.a");
        let mut d = Decoder::new(Bytes::from(e.buf), "test");
        assert_eq!(d.u8().unwrap(), 7);
        assert_eq!(d.u16().unwrap(), 0xbeef);
        assert_eq!(d.u32().unwrap(), 123_456);
        assert_eq!(d.u64().unwrap(), u64::MAX);
        assert_eq!(&d.bytes("body", 16).unwrap()[..], b"body");
        assert_eq!(d.str("name", 16).unwrap(), "queue.a");
        d.finish().unwrap();
    }

    #[test]
    fn rejects_oversize_and_truncated_input_without_allocating() {
        let mut e = Encoder::default();
        e.u32(u32::MAX); // a count no input could hold
        let mut d = Decoder::new(Bytes::from(e.buf.clone()), "test");
        assert!(matches!(
            d.count("items", usize::MAX, 8),
            Err(ClusterError::Decode { .. })
        ));
        let mut d = Decoder::new(Bytes::from(e.buf), "test");
        assert!(matches!(
            d.bytes("body", 10),
            Err(ClusterError::LimitExceeded { .. })
        ));
        let mut d = Decoder::new(Bytes::from_static(&[1, 2]), "test");
        assert!(matches!(
            d.u64(),
            Err(ClusterError::Decode {
                reason: "truncated",
                ..
            })
        ));
    }
}
