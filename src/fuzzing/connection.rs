//! The connection target: the real connection engine ([`crate::connection::serve`]) fed a
//! sequence of frames over an in-memory stream, against a fresh broker per input.
//!
//! Each input gets its own store directory, broker and single-threaded runtime, all
//! dropped when the input ends: no state carries over, so a crash replays from the input
//! alone, and memory is bounded by what one input can make the broker hold.
//!
//! The harness sends the AMQP header and an `open` itself, so the fuzzer starts at
//! sessions and links; the input supplies the frames after it, framed by the harness so
//! that mutations of a performative do not have to keep a frame size in step.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use fe2o3_amqp_types::performatives::{ChannelMax, MaxFrameSize, Open, Performative};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::take_record;
use crate::amqp::frame::{encode_frame, AMQP_HEADER, FRAME_HEADER_LEN};
use crate::auth::Gatekeeper;
use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::connection::{serve, Accepted};

/// Longest one input may keep the connection busy before it counts as stalled. Far above
/// what any input needs (milliseconds), far below libFuzzer's `-timeout`.
pub const CONNECTION_INPUT_DEADLINE: Duration = Duration::from_millis(900);
/// Bytes buffered in each direction of the in-memory stream.
const STREAM_BUFFER_BYTES: usize = 64 * 1024;
/// Segment size of the throw-away store: small, since an input stores little and each
/// segment is preallocated (most of an input's time, at 1 MiB).
const FUZZ_SEGMENT_BYTES: u64 = 256 * 1024;
/// Largest message the throw-away broker accepts: far above any input's, and fits a
/// segment with the record overhead.
const FUZZ_MAX_MESSAGE_BYTES: u64 = 128 * 1024;
const _: () =
    assert!(FUZZ_MAX_MESSAGE_BYTES + crate::config::RECORD_OVERHEAD_BYTES <= FUZZ_SEGMENT_BYTES);
/// Credit granted to producers: small, so credit refills happen within one input.
const FUZZ_LINK_CREDIT: u32 = 8;
/// Unsettled deliveries per consumer link: small, so the limit is reached.
const FUZZ_UNSETTLED_PER_LINK: usize = 16;
/// Where throw-away stores go when it exists (a tmpfs on Linux).
const SHARED_MEMORY_DIR: &str = "/dev/shm";
/// Scheduler turns the harness yields after each frame: enough for the connection task
/// to read the frame, complete durable produces and send queued deliveries.
const YIELDS_PER_FRAME: usize = 8;
/// Smallest max-frame-size the harness announces for the client (the spec's minimum).
const FUZZ_MIN_PEER_FRAME: u32 = 512;

/// The connection did not end within [`CONNECTION_INPUT_DEADLINE`] after its input ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection still running {CONNECTION_INPUT_DEADLINE:?} after its input ended")]
pub struct Stalled;

/// The connection engine on a sequence of frames from one client.
///
/// Layout: `{ frame_size: u8 | record* | tail }`. The client's `open` announces a
/// max-frame-size of `512 + 256 * frame_size` (small ones make the broker split its
/// deliveries). Each record `{ channel: u8 | len: u16 BE | body: len }` becomes one AMQP
/// frame on that channel; `tail`, the bytes after the last whole record, is sent raw.
/// The input ends with end-of-stream; the broker's output is read and discarded.
pub fn connection(data: &[u8]) -> Result<(), Stalled> {
    let Some((&frame_size, records)) = data.split_first() else {
        return Ok(());
    };
    let peer_frame = FUZZ_MIN_PEER_FRAME + 256 * u32::from(frame_size);
    let stream = client_bytes(peer_frame, records);
    let dir = StoreDir::new();
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return Ok(());
    };
    let Ok(broker) = Broker::open(fuzz_config(dir.0.clone())) else {
        return Ok(());
    };
    let result = runtime.block_on(run(broker, stream));
    drop(runtime);
    result
}

async fn run(broker: Arc<Broker>, stream: Vec<Vec<u8>>) -> Result<(), Stalled> {
    let (client, server) = tokio::io::duplex(STREAM_BUFFER_BYTES);
    let (rd, wr) = tokio::io::split(server);
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let writer = tokio::spawn(async move {
        for frame in stream {
            // A broker that closed early makes the write fail: the rest is not needed.
            if client_wr.write_all(&frame).await.is_err() {
                break;
            }
            // Let the connection act on the frame (durable produces enter their queue,
            // queued deliveries go out) before the next arrives, as over a network.
            for _ in 0..YIELDS_PER_FRAME {
                tokio::task::yield_now().await;
            }
        }
        let _ = client_wr.shutdown().await;
        // Keep our half open until the broker is done reading.
        std::future::pending::<()>().await;
    });
    let reader = tokio::spawn(async move {
        let mut sink = vec![0u8; STREAM_BUFFER_BYTES];
        while matches!(client_rd.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let accepted = Accepted {
        rd: Box::new(rd),
        wr: Box::new(wr),
        peer: None,
        sni: None,
        tls: false,
        quickack: None,
    };
    let (_shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    let gate = Arc::new(Gatekeeper::default());
    let served = serve(accepted, broker, gate, shutdown);
    let result = tokio::time::timeout(CONNECTION_INPUT_DEADLINE, served).await;
    writer.abort();
    reader.abort();
    result.map_err(|_| Stalled)
}

/// The header and the harness's `open`, then the input's frames, one write each.
fn client_bytes(peer_frame: u32, mut records: &[u8]) -> Vec<Vec<u8>> {
    let mut first = BytesMut::new();
    first.extend_from_slice(&AMQP_HEADER);
    let open = Open {
        container_id: "fuzz".into(),
        hostname: None,
        max_frame_size: MaxFrameSize(peer_frame),
        channel_max: ChannelMax(u16::MAX),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    // Encoding a fixed open cannot fail; if it did, the broker would see garbage, which
    // is a valid input too.
    let _ = encode_frame(&mut first, 0, &Performative::Open(open), &[]);
    let mut writes = vec![first.to_vec()];
    while let Some((&channel, rest)) = records.split_first() {
        let Some((body, next)) = take_record(rest) else {
            break;
        };
        records = next;
        let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
        frame.put_u32((FRAME_HEADER_LEN + body.len()) as u32);
        frame.put_u8(2); // doff: no extended header
        frame.put_u8(0); // AMQP frame
        frame.put_u16(u16::from(channel));
        frame.extend_from_slice(body);
        writes.push(frame);
    }
    if !records.is_empty() {
        writes.push(records.to_vec());
    }
    writes
}

fn fuzz_config(data_dir: PathBuf) -> BrokerConfig {
    BrokerConfig {
        data_dir,
        sync: entrepot_storage::SyncPolicy::Never,
        segment_bytes: FUZZ_SEGMENT_BYTES,
        max_message_bytes: FUZZ_MAX_MESSAGE_BYTES,
        link_credit: FUZZ_LINK_CREDIT,
        unsettled_per_link: FUZZ_UNSETTLED_PER_LINK,
        allow_anonymous: true,
        ..BrokerConfig::default()
    }
}

/// A store directory of its own under [`SHARED_MEMORY_DIR`] (else the system temp dir),
/// removed when dropped.
struct StoreDir(PathBuf);

impl StoreDir {
    fn new() -> StoreDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("entrepot-fuzz-{}-{n}", std::process::id());
        // Memory-backed when there is one: a store's fsyncs and preallocations on a real
        // disk would cost more than the input itself.
        let shm = std::path::Path::new(SHARED_MEMORY_DIR);
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = base.join(name);
        let _ = std::fs::remove_dir_all(&path);
        StoreDir(path)
    }
}

impl Drop for StoreDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
