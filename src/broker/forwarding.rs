//! Link forwarding, the broker's side of the seam: a producer link attached to this node
//! for an address another node leads ([`super::routing::Route::Forward`]) hands its
//! messages to a [`ForwardedProducer`]; whatever carries them to the leader (in
//! `cluster-mode: groups`, `raft::link_forward` over the inter-node connection) drains
//! the matching [`ProducerIntake`] and reports, in order, up to which message the leader
//! stored them (committed and queued there, exactly as a local producer's message).
//!
//! What it owns: numbering a link's messages (its sequence), the bounds on what one link
//! has in flight ([`MAX_FORWARDED_TRANSFERS_PER_LINK`], [`MAX_FORWARDED_BYTES_PER_LINK`]),
//! and the [`Durable`] handle of each message, which completes once the leader confirmed
//! it — the connection sends the client `accepted` from that completion only, the same
//! rule as for a local message — or fails once the carrier gave up (the link is then
//! detached `amqp:link:detach-forced`, the client resends).
//!
//! Invariants:
//! * Confirmation is a prefix: message `seq` is accepted only once every earlier message
//!   of the link is; a failure fails every message not confirmed yet, never one that is.
//! * A refusal names its limit.
//! * A carrier that gives up calls the link's [`ForwardedProducer::on_failure`] once, so
//!   the connection detaches a link with nothing in flight too.
//!
//! A consumer link goes the same way the other direction ([`RemoteAddress::open_consumer`]):
//! the link consumes a local *shadow* queue whose owner ([`ForwardedSource`]) is the
//! carrier that fetches the leader's deliveries and carries the outcomes back.
//!
//! Does not: talk to another node, name the cluster layer, or resend (a carrier that
//! loses a reply fails the rest of the link: at-least-once, the client resends what was
//! not accepted).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use entrepot_storage::{Durable, DurableState};
use tokio::sync::{mpsc, watch};

use super::queue::{Outcome, Queue};
use super::Broker;

/// Most messages one forwarded producer link has on their way to the leader (not yet
/// confirmed): above the default link credit, so a client within its credit never meets
/// it unless the leader is slow to answer.
pub const MAX_FORWARDED_TRANSFERS_PER_LINK: usize = 4096;
/// Most message bytes one forwarded producer link has on their way to the leader.
pub const MAX_FORWARDED_BYTES_PER_LINK: u64 = 64 << 20;

/// An address another node leads, that this node carries links to.
pub trait RemoteAddress: Send + Sync + std::fmt::Debug {
    /// Who leads it, for logs and descriptions (`"node 2"`).
    fn leader(&self) -> String;
    /// Starts carrying one producer link's messages to the leader; `Err`: why not now
    /// (the attach is detached `amqp:link:detach-forced` with it).
    fn open_producer(&self) -> Result<ForwardedProducer, String>;
    /// Starts serving one consumer link from the leader's queue: the answer is the link's
    /// *shadow*, a queue owned by a [`ForwardedSource`] (`QueueOwner::Forwarded`) that
    /// the carrier fills with the leader's deliveries and that the link consumes like a
    /// local queue; `Err`: why not now (the attach is detached `detach-forced`).
    fn open_consumer(
        &self,
        broker: &Arc<Broker>,
        request: ConsumerRequest,
    ) -> Result<Arc<Queue>, String> {
        let _ = (broker, request);
        Err("this router carries no consumer links".into())
    }
}

/// Longest selector a forwarded consumer link carries to its leader.
pub const MAX_FORWARDED_SELECTOR_BYTES: usize = 4096;

/// What a forwarded consumer link asks of the leader's queue.
#[derive(Debug, Clone, Default)]
pub struct ConsumerRequest {
    /// The link's name (logs).
    pub link: String,
    /// Its JMS selector (validated here), applied by the leader's queue.
    pub selector: Option<String>,
}

/// The owner of a forwarded consumer link's shadow queue: carries the consumer's outcomes
/// to the leader and hears when the shadow's demand changes or its consumer leaves.
///
/// Invariants kept with the shadow (`Queue` with `QueueOwner::Forwarded`): a delivery
/// leaves the shadow once, when its outcome is handed to [`ForwardedSource::settle`]; the
/// shadow never dead-letters, expires or requeues on its own — every message it holds is
/// the leader's, unsettled there, and goes back there.
pub trait ForwardedSource: Send + Sync + std::fmt::Debug {
    /// Carries `outcome` for the delivery of the leader's `offset`; the handle completes
    /// once the leader recorded it (an acceptance: once its acknowledgement committed),
    /// and fails if the carrier gives up first (the outcome is then unknown: the link is
    /// detached and the message comes again, never reported settled).
    fn settle(&self, offset: u64, outcome: Outcome) -> Durable;
    /// The shadow's consumer is gone: the leader takes back what it held; `undelivered`
    /// (fetched, never sent to the client) without a raised delivery count.
    fn closed(&self, undelivered: Vec<u64>);
    /// The shadow's demand may have grown (credit granted, deliveries left it).
    fn wake(&self);
}

/// One message of a forwarded producer link, numbered in the link's order.
#[derive(Debug, Clone)]
pub struct ForwardedMessage {
    pub seq: u64,
    pub message: Bytes,
    /// When this node received it (the producer's side of `stored_at_ms`).
    pub stored_at_ms: i64,
}

/// Why a message was not handed to the carrier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardRefused {
    /// The carrier gave up (the leader moved or stopped answering): the link must go.
    #[error("{0}")]
    Failed(String),
    #[error(
        "{limit} messages of this link wait for the address's leader (MAX_FORWARDED_TRANSFERS_PER_LINK)"
    )]
    TooManyMessages { limit: usize },
    #[error(
        "{limit} bytes of this link wait for the address's leader (MAX_FORWARDED_BYTES_PER_LINK)"
    )]
    TooManyBytes { limit: u64 },
}

/// The link's end: numbers its messages and hands them to the carrier.
pub struct ForwardedProducer {
    tx: mpsc::Sender<ForwardedMessage>,
    next: u64,
    progress: watch::Receiver<DurableState>,
    bytes: Arc<AtomicU64>,
    notify: Notify,
}

/// Called once when the carrier gives up (the connection detaches the link then).
type Notify = Arc<std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>>;

impl std::fmt::Debug for ForwardedProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardedProducer")
            .field("next", &self.next)
            .finish()
    }
}

/// The carrier's end: the messages to carry, in order, and where it reports.
pub struct ProducerIntake {
    pub rx: mpsc::Receiver<ForwardedMessage>,
    progress: watch::Sender<DurableState>,
    bytes: Arc<AtomicU64>,
    notify: Notify,
}

impl std::fmt::Debug for ProducerIntake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerIntake").finish_non_exhaustive()
    }
}

/// A new forwarded producer link and its carrier's end.
pub fn producer_channel() -> (ForwardedProducer, ProducerIntake) {
    let (tx, rx) = mpsc::channel(MAX_FORWARDED_TRANSFERS_PER_LINK);
    let (progress, watch_rx) = watch::channel(DurableState::default());
    let bytes = Arc::new(AtomicU64::new(0));
    let notify = Notify::default();
    let producer = ForwardedProducer {
        tx,
        next: 0,
        progress: watch_rx,
        bytes: Arc::clone(&bytes),
        notify: Arc::clone(&notify),
    };
    let intake = ProducerIntake {
        rx,
        progress,
        bytes,
        notify,
    };
    (producer, intake)
}

impl ForwardedProducer {
    /// Calls `f` once when the carrier gives up (at once if it already did).
    pub fn on_failure(&self, f: impl FnOnce() + Send + 'static) {
        let mut slot = self.notify.lock().unwrap_or_else(|e| e.into_inner());
        match self.progress.borrow().failed.is_some() {
            true => f(),
            false => *slot = Some(Box::new(f)),
        }
    }

    /// Why the carrier gave up, once it did.
    pub fn failure(&self) -> Option<String> {
        self.progress.borrow().failed.as_deref().map(str::to_owned)
    }

    /// Hands `message` to the carrier: its handle completes once the leader confirmed it.
    pub fn send(&mut self, message: Bytes, stored_at_ms: i64) -> Result<Durable, ForwardRefused> {
        if let Some(why) = self.progress.borrow().failed.clone() {
            return Err(ForwardRefused::Failed(why.to_string()));
        }
        let len = message.len() as u64;
        let held = self.bytes.load(Ordering::Relaxed);
        if held > 0 && held + len > MAX_FORWARDED_BYTES_PER_LINK {
            return Err(ForwardRefused::TooManyBytes {
                limit: MAX_FORWARDED_BYTES_PER_LINK,
            });
        }
        let seq = self.next;
        let m = ForwardedMessage {
            seq,
            message,
            stored_at_ms,
        };
        match self.tx.try_send(m) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(ForwardRefused::TooManyMessages {
                    limit: MAX_FORWARDED_TRANSFERS_PER_LINK,
                })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                let why = self.progress.borrow().failed.clone();
                let why =
                    why.map_or_else(|| "the link's carrier stopped".into(), |w| w.to_string());
                return Err(ForwardRefused::Failed(why));
            }
        }
        self.bytes.fetch_add(len, Ordering::Relaxed);
        self.next += 1;
        Ok(Durable::watching(self.progress.clone(), seq))
    }
}

impl ProducerIntake {
    /// Every message below `seq_end` is stored by the leader (a prefix: never lowers it).
    pub fn confirm(&self, seq_end: u64) {
        self.progress
            .send_modify(|s| s.durable = s.durable.max(seq_end));
    }

    /// The carrier gives up: every message not confirmed fails, and so does any later.
    pub fn fail(&self, reason: String) {
        self.progress.send_modify(|s| {
            if s.failed.is_none() {
                s.failed = Some(reason.into());
            }
        });
        let notify = self.notify.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = notify {
            f();
        }
    }

    /// `bytes` of messages taken off the channel are no longer in flight.
    pub fn release_bytes(&self, bytes: u64) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: confirmation completes a prefix of the link's messages, a failure fails the
    /// rest (never a confirmed one) and refuses later sends; the channel bound is named.
    #[tokio::test]
    async fn confirmation_is_a_prefix_and_failure_ends_the_link() {
        let (mut p, mut intake) = producer_channel();
        let handles: Vec<Durable> = (0..3)
            .map(|i| p.send(Bytes::from(vec![i as u8; 10]), 0).unwrap())
            .collect();
        assert!(handles.iter().all(|h| !h.is_durable()));
        for _ in 0..3 {
            let m = intake.rx.recv().await.unwrap();
            intake.release_bytes(m.message.len() as u64);
        }
        intake.confirm(2);
        assert!(handles[0].is_durable() && handles[1].is_durable());
        assert!(!handles[2].is_durable() && !handles[2].has_failed());
        let told = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&told);
        p.on_failure(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        intake.fail("leader moved".into());
        intake.fail("again".into());
        assert_eq!(told.load(Ordering::SeqCst), 1, "told once");
        assert!(handles[2].has_failed() && !handles[1].has_failed());
        assert!(
            matches!(p.send(Bytes::new(), 0), Err(ForwardRefused::Failed(w)) if w == "leader moved")
        );

        let (mut p, _intake) = producer_channel();
        for _ in 0..MAX_FORWARDED_TRANSFERS_PER_LINK {
            p.send(Bytes::from_static(b"m"), 0).unwrap();
        }
        assert!(matches!(
            p.send(Bytes::from_static(b"m"), 0),
            Err(ForwardRefused::TooManyMessages {
                limit: MAX_FORWARDED_TRANSFERS_PER_LINK
            })
        ));
    }
}
