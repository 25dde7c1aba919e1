//! The bytes of a snapshot as openraft moves them: read in chunks by the sender, written
//! chunk by chunk by the receiver, then handed to the state machine.
//!
//! Three shapes, one type ([`SnapshotData`], openraft's `SnapshotData`):
//! * **Memory** — the whole snapshot in a buffer (small snapshots: the cluster tests'
//!   state machine).
//! * **Source** — generated on read from a [`SnapshotSource`], which pages in only what a
//!   chunk asks for. The broker's store snapshot is a source over its own mmap'd segments,
//!   so sending a snapshot of gigabytes costs neither a copy in memory nor a second file.
//! * **File** — a snapshot being received (or read back) in a file: a receiver never holds
//!   a whole snapshot in memory either.
//!
//! Invariants: a source is immutable once made (every read of a position returns the same
//! bytes), so openraft may seek back and resend a chunk; a source cannot be written.

use std::io::{Cursor, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// Most bytes initialized for one [`SnapshotSource::read_at`] call.
const SOURCE_STEP_BYTES: usize = 64 * 1024;

/// Snapshot bytes generated on demand (see the module docs).
pub trait SnapshotSource: Send + Sync + 'static {
    /// Total length in bytes.
    fn len(&self) -> u64;

    /// True when the snapshot has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the bytes at `pos` into `buf`; returns how many (0 only at or past the end).
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> usize;
}

/// openraft's snapshot data for this cluster; see the module docs.
pub enum SnapshotData {
    Memory(Cursor<Vec<u8>>),
    Source {
        source: Box<dyn SnapshotSource>,
        pos: u64,
    },
    File(tokio::fs::File),
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotData::Memory(c) => {
                write!(f, "SnapshotData::Memory({} bytes)", c.get_ref().len())
            }
            SnapshotData::Source { source, pos } => {
                write!(f, "SnapshotData::Source({} bytes, at {pos})", source.len())
            }
            SnapshotData::File(_) => write!(f, "SnapshotData::File"),
        }
    }
}

impl SnapshotData {
    pub fn memory(data: Vec<u8>) -> SnapshotData {
        SnapshotData::Memory(Cursor::new(data))
    }

    pub fn source(source: impl SnapshotSource) -> SnapshotData {
        SnapshotData::Source {
            source: Box::new(source),
            pos: 0,
        }
    }

    /// An empty file at `path` (created, or truncated) to receive a snapshot into.
    pub async fn receiving_file(path: &std::path::Path) -> std::io::Result<SnapshotData> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .await?;
        Ok(SnapshotData::File(file))
    }

    /// The bytes of a memory snapshot; `None` for the other shapes.
    pub fn into_memory(self) -> Option<Vec<u8>> {
        match self {
            SnapshotData::Memory(c) => Some(c.into_inner()),
            _ => None,
        }
    }

    /// A received file, flushed and rewound, as a std file for a blocking reader; `None`
    /// for the other shapes.
    pub async fn into_std_file(self) -> std::io::Result<Option<std::fs::File>> {
        use tokio::io::{AsyncSeekExt, AsyncWriteExt};
        match self {
            SnapshotData::File(mut f) => {
                f.flush().await?;
                f.seek(SeekFrom::Start(0)).await?;
                Ok(Some(f.into_std().await))
            }
            _ => Ok(None),
        }
    }
}

fn unwritable() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "a generated snapshot cannot be written",
    )
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            SnapshotData::Memory(c) => Pin::new(c).poll_read(cx, buf),
            SnapshotData::File(f) => Pin::new(f).poll_read(cx, buf),
            SnapshotData::Source { source, pos } => {
                // Fill what the caller offers in steps, initializing only what is read
                // (a chunk buffer is megabytes; a record is often a kilobyte).
                while buf.remaining() > 0 {
                    let want = buf.remaining().min(SOURCE_STEP_BYTES);
                    let n = source.read_at(*pos, buf.initialize_unfilled_to(want));
                    if n == 0 {
                        break;
                    }
                    buf.advance(n);
                    *pos += n as u64;
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            SnapshotData::Memory(c) => Pin::new(c).poll_write(cx, data),
            SnapshotData::File(f) => Pin::new(f).poll_write(cx, data),
            SnapshotData::Source { .. } => Poll::Ready(Err(unwritable())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            SnapshotData::Memory(c) => Pin::new(c).poll_flush(cx),
            SnapshotData::File(f) => Pin::new(f).poll_flush(cx),
            SnapshotData::Source { .. } => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            SnapshotData::Memory(c) => Pin::new(c).poll_shutdown(cx),
            SnapshotData::File(f) => Pin::new(f).poll_shutdown(cx),
            SnapshotData::Source { .. } => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        match self.get_mut() {
            SnapshotData::Memory(c) => Pin::new(c).start_seek(position),
            SnapshotData::File(f) => Pin::new(f).start_seek(position),
            SnapshotData::Source { source, pos } => {
                let target = match position {
                    SeekFrom::Start(n) => Some(n),
                    SeekFrom::End(d) => source.len().checked_add_signed(d),
                    SeekFrom::Current(d) => pos.checked_add_signed(d),
                };
                *pos = target.ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "seek before the start of the snapshot",
                    )
                })?;
                Ok(())
            }
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        match self.get_mut() {
            SnapshotData::Memory(c) => Pin::new(c).poll_complete(cx),
            SnapshotData::File(f) => Pin::new(f).poll_complete(cx),
            SnapshotData::Source { pos, .. } => Poll::Ready(Ok(*pos)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    /// Byte `i` is `i % 251`.
    struct Counting(u64);

    impl SnapshotSource for Counting {
        fn len(&self) -> u64 {
            self.0
        }
        fn read_at(&self, pos: u64, buf: &mut [u8]) -> usize {
            let n = (self.0.saturating_sub(pos) as usize).min(buf.len()).min(7);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = ((pos + i as u64) % 251) as u8;
            }
            n
        }
    }

    #[tokio::test]
    async fn a_source_reads_like_a_file_from_any_position_and_refuses_writes() {
        let mut data = SnapshotData::source(Counting(1000));
        assert_eq!(data.seek(SeekFrom::End(0)).await.unwrap(), 1000);
        data.seek(SeekFrom::Start(990)).await.unwrap();
        let mut tail = Vec::new();
        data.read_to_end(&mut tail).await.unwrap();
        assert_eq!(
            tail,
            (990..1000u64).map(|i| (i % 251) as u8).collect::<Vec<_>>()
        );
        data.seek(SeekFrom::Start(0)).await.unwrap();
        let mut all = Vec::new();
        data.read_to_end(&mut all).await.unwrap();
        assert_eq!(all.len(), 1000);
        assert!(all.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        assert!(data.seek(SeekFrom::Current(-2000)).await.is_err());
        assert!(data.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn a_received_file_reads_back_what_was_written_at_its_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("receiving");
        let mut data = SnapshotData::receiving_file(&path).await.unwrap();
        data.write_all(b"hello ").await.unwrap();
        data.seek(SeekFrom::Start(6)).await.unwrap();
        data.write_all(b"world").await.unwrap();
        data.shutdown().await.unwrap();
        let mut file = data.into_std_file().await.unwrap().unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).unwrap();
        assert_eq!(text, "hello world");
    }
}
