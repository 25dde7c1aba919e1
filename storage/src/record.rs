//! The record frame: how one appended payload is laid out inside a segment.
//!
//! A record is self-describing and self-checking, so recovery can walk a segment from its
//! header and stop at the first frame that does not verify. The CRC covers every header
//! field and the payload; a zeroed region never verifies (the CRC of zeros is not zero),
//! so preallocated space past the last record reads as "end of log".
//!
//! Since segment format v2 the CRC starts from the segment's *salt* (a random `u32` in
//! its header, drawn anew each time a file becomes a segment): a segment file reused for
//! a later segment (`prepare.rs`, recycling) still holds the frames of its earlier life
//! past the written end, and those never verify under the new salt — nor does a frame a
//! client hid inside a message body, since the salt is drawn after that body was written.
//! Salt 0 is the plain CRC-32, so v1 segments read as before.

use bytes::Bytes;

/// Bytes of the record header that precede the payload.
pub const RECORD_HEADER_LEN: usize = 28;

/// Record flag bits reserved by the storage crate. Callers use the low 8 bits.
pub const FLAGS_USER_MASK: u16 = 0x00ff;

// Format: { len: u32 LE | crc: u32 LE | offset: u64 LE | timestamp_ms: i64 LE | flags: u16 LE | reserved: u16 = 0 | payload: [u8; len] }
// crc = CRC-32 (IEEE, crc32fast) of bytes [0..4) ++ [8..28 + len), started from the
// segment's salt (format v2; 0 in v1 segments, which is the plain CRC-32).

/// One record read back from the log. `payload` is a slice of the segment's mapping:
/// no copy was made, and the memory stays valid for as long as the `Bytes` lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub timestamp_ms: i64,
    pub flags: u16,
    pub payload: Bytes,
}

/// The decoded fixed-size part of a record frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub len: u32,
    pub crc: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub flags: u16,
}

impl RecordHeader {
    /// Total length of the frame on disk.
    pub fn frame_len(&self) -> usize {
        RECORD_HEADER_LEN + self.len as usize
    }
}

/// Why a frame failed to verify. Recovery treats any of these as the end of the log
/// (in the unsealed tail) or as corruption (in a sealed segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameFault {
    Truncated,
    Empty,
    TooLarge,
    BadOffset,
    BadChecksum,
}

impl FrameFault {
    pub fn reason(self) -> &'static str {
        match self {
            FrameFault::Truncated => "frame runs past the end of the written data",
            FrameFault::Empty => "zeroed frame where a record was expected",
            FrameFault::TooLarge => "length field exceeds record_bytes_max",
            FrameFault::BadOffset => "record carries the wrong offset",
            FrameFault::BadChecksum => "CRC mismatch",
        }
    }
}

/// Writes a frame for `parts` (concatenated) into `dst`, which is exactly
/// `RECORD_HEADER_LEN + sum(parts)` bytes long.
pub(crate) fn encode(
    dst: &mut [u8],
    salt: u32,
    offset: u64,
    timestamp_ms: i64,
    flags: u16,
    parts: &[&[u8]],
) {
    let len = dst.len() - RECORD_HEADER_LEN;
    debug_assert_eq!(len, parts.iter().map(|p| p.len()).sum::<usize>());
    dst[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    dst[8..16].copy_from_slice(&offset.to_le_bytes());
    dst[16..24].copy_from_slice(&timestamp_ms.to_le_bytes());
    dst[24..26].copy_from_slice(&flags.to_le_bytes());
    dst[26..28].copy_from_slice(&0u16.to_le_bytes());
    let mut at = RECORD_HEADER_LEN;
    for part in parts {
        dst[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    let crc = checksum(dst, salt);
    dst[4..8].copy_from_slice(&crc.to_le_bytes());
}

fn checksum(frame: &[u8], salt: u32) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(salt);
    hasher.update(&frame[0..4]);
    hasher.update(&frame[8..]);
    hasher.finalize()
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes and verifies the frame that starts at the beginning of `data` (which ends at
/// the segment's written length). `expected_offset` and the segment's `salt` guard
/// against stale frames.
pub(crate) fn decode(
    data: &[u8],
    salt: u32,
    expected_offset: u64,
    record_bytes_max: u32,
) -> Result<RecordHeader, FrameFault> {
    if data.len() < RECORD_HEADER_LEN {
        return Err(FrameFault::Truncated);
    }
    let header = peek_header(data);
    if header.len == 0 && header.crc == 0 && header.offset == 0 {
        return Err(FrameFault::Empty);
    }
    if header.len > record_bytes_max {
        return Err(FrameFault::TooLarge);
    }
    let frame_len = header.frame_len();
    if data.len() < frame_len {
        return Err(FrameFault::Truncated);
    }
    if header.offset != expected_offset {
        return Err(FrameFault::BadOffset);
    }
    if checksum(&data[..frame_len], salt) != header.crc {
        return Err(FrameFault::BadChecksum);
    }
    Ok(header)
}

/// Reads the header fields without verifying anything; `data` has at least
/// [`RECORD_HEADER_LEN`] bytes.
pub(crate) fn peek_header(data: &[u8]) -> RecordHeader {
    let mut flags = [0u8; 2];
    flags.copy_from_slice(&data[24..26]);
    RecordHeader {
        len: read_u32(data, 0),
        crc: read_u32(data, 4),
        offset: read_u64(data, 8),
        timestamp_ms: read_u64(data, 16) as i64,
        flags: u16::from_le_bytes(flags),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(offset: u64, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; RECORD_HEADER_LEN + payload.len()];
        encode(&mut buf, 0, offset, 7, 3, &[payload]);
        buf
    }

    #[test]
    fn round_trip() {
        let buf = frame(42, b"hello");
        let h = decode(&buf, 0, 42, 1024).unwrap();
        assert_eq!(h.len, 5);
        assert_eq!(h.offset, 42);
        assert_eq!(h.timestamp_ms, 7);
        assert_eq!(h.flags, 3);
        assert_eq!(&buf[RECORD_HEADER_LEN..], b"hello");
    }

    #[test]
    fn parts_are_concatenated() {
        let mut a = vec![0u8; RECORD_HEADER_LEN + 6];
        encode(&mut a, 0, 1, 0, 0, &[b"ab", b"", b"cdef"]);
        assert_eq!(a, frame_with_ts(1, 0, 0, b"abcdef"));
    }

    fn frame_with_ts(offset: u64, ts: i64, flags: u16, p: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; RECORD_HEADER_LEN + p.len()];
        encode(&mut buf, 0, offset, ts, flags, &[p]);
        buf
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let buf = frame(9, b"payload bytes");
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                assert!(decode(&bad, 0, 9, 1024).is_err(), "flip at {byte}:{bit}");
            }
        }
    }

    #[test]
    fn zeros_truncation_and_wrong_offset() {
        assert_eq!(decode(&[0u8; 64], 0, 0, 1024), Err(FrameFault::Empty));
        let buf = frame(5, b"abc");
        assert_eq!(decode(&buf[..10], 0, 5, 1024), Err(FrameFault::Truncated));
        assert_eq!(
            decode(&buf[..buf.len() - 1], 0, 5, 1024),
            Err(FrameFault::Truncated)
        );
        assert_eq!(decode(&buf, 0, 6, 1024), Err(FrameFault::BadOffset));
        assert_eq!(decode(&buf, 0, 5, 2), Err(FrameFault::TooLarge));
    }

    #[test]
    fn salt_zero_is_the_plain_crc_and_another_salt_rejects_the_frame() {
        let buf = frame(3, b"abc");
        let mut plain = crc32fast::Hasher::new();
        plain.update(&buf[0..4]);
        plain.update(&buf[8..]);
        assert_eq!(
            read_u32(&buf, 4),
            plain.finalize(),
            "v1 frames keep their CRC"
        );
        let mut salted = vec![0u8; buf.len()];
        encode(&mut salted, 0x5eed_0001, 3, 7, 3, &[b"abc"]);
        assert!(decode(&salted, 0x5eed_0001, 3, 1024).is_ok());
        for other in [0, 0x5eed_0000, 0x5eed_0003, u32::MAX] {
            assert_eq!(
                decode(&salted, other, 3, 1024),
                Err(FrameFault::BadChecksum),
                "salt {other:#x}"
            );
        }
    }
}
