//! The forwarding node's end of a forwarded consumer link: the link consumes a local
//! *shadow* queue (`Queue::forwarded`), and one carrier task per link ([`feed`]) checks
//! out the leader's queue, keeps the shadow supplied with the leader's deliveries by long
//! polls (fetches), and carries the consumer's outcomes back (settles).
//!
//! Invariants:
//! * Credit end to end: a fetch asks for at most the shadow's demand (its consumer's
//!   credit within its unsettled room, less what it holds ready), capped by
//!   [`FORWARDED_CONSUMER_PREFETCH`]; the leader grants its own consumer exactly that,
//!   and the shadow hands the client no more than its credit (the local dispatch).
//! * An outcome completes (the client's settled-back, for a receiver settling second)
//!   only from the leader's answer that recorded it — for an acceptance, after its
//!   acknowledgement committed. Outcomes are carried in the order given, one settle in
//!   flight; a carrier that gives up fails every outcome not answered (never reported
//!   settled: the message comes again).
//! * At most two requests in flight per link (one fetch, one settle), each bounded by a
//!   reply timeout; a request at least every [`FORWARDED_CONSUMER_KEEPALIVE`], so the
//!   leader never mistakes a quiet link for a vanished one.
//! * A link never hangs on a dead or stopped leader: the carrier gives up — the shadow is
//!   retired, so the link is detached `amqp:link:detach-forced` naming why — when a
//!   request fails or times out, or when this node's replica sees another leader or an
//!   election; what the link held goes back to the queue on the leader (cancel, or the
//!   leader's release after `FORWARDED_CONSUMER_IDLE_TIMEOUT`).
//!
//! A drain (the client's flow with `drain`) is answered after one fetch that does not
//! park: what the leader holds for the link within its credit is delivered first, then
//! the rest of the credit is used up — within `FETCH_WAIT` when a parked fetch was in
//! flight.
//!
//! Does not: resend to a new leader (the client attaches again), or browse.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use entrepot_storage::{Durable, DurableState};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use super::consume_wire::{
    decode_checked_out, decode_fetched, encode_cancel, encode_checkout, encode_fetch,
    encode_settle, Answer, Checkout, Fetch, MAX_SETTLE_BATCH,
};
use super::{decode_reply, leader_moved, RemoteLeader, NEXT_FORWARDER};
use crate::broker::forwarding::{ConsumerRequest, ForwardedSource};
use crate::broker::queue::{Outcome, Queue};
use crate::broker::Broker;

/// Most deliveries a shadow asks the leader for beyond those it handed on: the bound
/// on what a forwarded consumer holds out of the leader's queue ahead of its client.
pub const FORWARDED_CONSUMER_PREFETCH: u32 = 256;
/// Longest the leader parks one fetch waiting for a delivery.
pub const FETCH_WAIT: Duration = Duration::from_millis(1000);
/// Longest a quiet forwarded link goes without a request to its leader (a fetch with no
/// room serves as its heartbeat).
pub const FORWARDED_CONSUMER_KEEPALIVE: Duration = Duration::from_secs(2);
/// Pause after a fetch the leader answered empty without parking it (it parks at most
/// `MAX_PARKED_FETCHES`): the next one does not spin.
const FETCH_RETRY_PAUSE: Duration = Duration::from_millis(50);
const _: () = assert!(
    FETCH_WAIT.as_millis() + 2000 <= entrepot_cluster::APP_TIMEOUT_MAX.as_millis(),
    "a parked fetch leaves the leader time to answer within the call's bound"
);

/// The shadow's owner on this node: hands outcomes to the carrier (see the module docs).
#[derive(Debug)]
struct Source {
    /// Numbers the outcomes in the order they are sent (the handle's position).
    settles: Mutex<(u64, mpsc::UnboundedSender<PendingSettle>)>,
    progress: watch::Receiver<DurableState>,
    wake: Arc<Notify>,
    closed: Mutex<Option<oneshot::Sender<Vec<u64>>>>,
}

#[derive(Debug)]
struct PendingSettle {
    seq: u64,
    offset: u64,
    outcome: Outcome,
}

impl ForwardedSource for Source {
    fn settle(&self, offset: u64, outcome: Outcome) -> Durable {
        let mut s = self.settles.lock().unwrap_or_else(|e| e.into_inner());
        let seq = s.0;
        s.0 += 1;
        // A carrier that ended failed `progress` first: the handle fails, never hangs.
        let _ = s.1.send(PendingSettle {
            seq,
            offset,
            outcome,
        });
        Durable::watching(self.progress.clone(), seq)
    }

    fn closed(&self, undelivered: Vec<u64>) {
        let closed = self.closed.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = closed {
            let _ = tx.send(undelivered);
        }
    }

    fn wake(&self) {
        self.wake.notify_one();
    }
}

/// The carrier's ends of one link.
struct Ends {
    progress: watch::Sender<DurableState>,
    settles: mpsc::UnboundedReceiver<PendingSettle>,
    closed: oneshot::Receiver<Vec<u64>>,
    wake: Arc<Notify>,
}

/// What one consumer link's carrier works with.
struct ConsumerCarrier {
    address: String,
    leader: entrepot_cluster::NodeId,
    peer: String,
    host: entrepot_cluster::Host,
    forwarder: u64,
    request: ConsumerRequest,
    stats: Arc<super::ForwardStats>,
    shadow: Weak<Queue>,
    broker: Weak<Broker>,
    /// The leader's number for this consumer, once checked out.
    consumer: Option<u64>,
    timeout: Duration,
}

/// Opens a forwarded consumer link to `remote`'s queue: its shadow, and the carrier task.
pub(super) fn open(
    remote: &RemoteLeader,
    broker: &Arc<Broker>,
    request: ConsumerRequest,
) -> Result<Arc<Queue>, String> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "no runtime to carry the link".to_owned())?;
    let (progress, progress_rx) = watch::channel(DurableState::default());
    let (settle_tx, settles) = mpsc::unbounded_channel();
    let (closed_tx, closed) = oneshot::channel();
    let wake = Arc::new(Notify::new());
    let source = Arc::new(Source {
        settles: Mutex::new((0, settle_tx)),
        progress: progress_rx,
        wake: Arc::clone(&wake),
        closed: Mutex::new(Some(closed_tx)),
    });
    let shadow = Arc::new(Queue::forwarded(remote.address.clone(), source));
    let timeout = match remote.leadership {
        Some(_) => super::FORWARD_REPLY_TIMEOUT_WATCHED,
        None => super::FORWARD_REPLY_TIMEOUT,
    };
    let carrier = ConsumerCarrier {
        address: remote.address.clone(),
        leader: remote.leader,
        peer: remote.peer.clone(),
        host: remote.host.clone(),
        forwarder: NEXT_FORWARDER.fetch_add(1, Ordering::Relaxed),
        request,
        stats: Arc::clone(&remote.stats),
        shadow: Arc::downgrade(&shadow),
        broker: Arc::downgrade(broker),
        consumer: None,
        timeout,
    };
    tracing::debug!(address = %carrier.address, leader = carrier.leader,
        forwarder = carrier.forwarder, link = %carrier.request.link, "forwarding a consumer link");
    let ends = Ends {
        progress,
        settles,
        closed,
        wake,
    };
    runtime.spawn(feed(carrier, ends, remote.leadership.clone()));
    Ok(shadow)
}

/// Carries one consumer link until it goes or the carrier gives up (see the module docs).
async fn feed(
    mut c: ConsumerCarrier,
    mut ends: Ends,
    mut leadership: Option<watch::Receiver<entrepot_cluster::Leadership>>,
) {
    c.stats.consumer_links.fetch_add(1, Ordering::Relaxed);
    let ended = feed_loop(&mut c, &mut ends, &mut leadership).await;
    c.stats.consumer_links.fetch_sub(1, Ordering::Relaxed);
    // Outcomes not answered by now never will be: their handles fail (never hang).
    let why = match &ended {
        Ok(_) => "the link's carrier ended".to_owned(),
        Err(why) => why.clone(),
    };
    ends.progress.send_modify(|s| {
        if s.failed.is_none() {
            s.failed = Some(why.clone().into());
        }
    });
    let undelivered = match ended {
        Ok(undelivered) => undelivered,
        Err(why) => {
            c.stats.failed_links.fetch_add(1, Ordering::Relaxed);
            tracing::info!(address = %c.address, leader = c.leader, forwarder = c.forwarder,
                reason = %why, "forwarded consumer link given up");
            if let Some(shadow) = c.shadow.upgrade() {
                shadow.retire(&format!(
                    "{why}; attach again: deliveries not settled will come again"
                ));
            }
            Vec::new()
        }
    };
    // Hand back what the link held at once (best effort: the leader also releases it
    // after FORWARDED_CONSUMER_IDLE_TIMEOUT without a request).
    if let Some(consumer) = c.consumer {
        let request = encode_cancel(consumer, &undelivered);
        let call = c.host.app_request(c.leader, &c.peer, &request, c.timeout);
        if let Err(e) = call.await {
            tracing::debug!(address = %c.address, consumer, error = %e, "cancel not answered");
        }
    }
}

/// A request in flight.
type Call = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<bytes::Bytes, entrepot_cluster::AppCallError>>
            + Send,
    >,
>;

fn call(c: &ConsumerCarrier, request: Vec<u8>, timeout: Duration) -> Call {
    let (host, peer, leader) = (c.host.clone(), c.peer.clone(), c.leader);
    let timeout = timeout.min(entrepot_cluster::APP_TIMEOUT_MAX);
    Box::pin(async move { host.app_request(leader, &peer, &request, timeout).await })
}

/// Completes with the call's answer; never while there is none in flight.
async fn answer(call: Option<&mut Call>) -> Result<bytes::Bytes, entrepot_cluster::AppCallError> {
    match call {
        Some(c) => c.await,
        None => std::future::pending().await,
    }
}

/// The carrier's loop; `Ok`: the link closed (with the offsets it never delivered),
/// `Err`: why it gave up.
async fn feed_loop(
    c: &mut ConsumerCarrier,
    ends: &mut Ends,
    leadership: &mut Option<watch::Receiver<entrepot_cluster::Leadership>>,
) -> Result<Vec<u64>, String> {
    let checkout = Checkout {
        address: c.address.clone(),
        forwarder: c.forwarder,
        link: c.request.link.clone(),
        selector: c.request.selector.clone(),
    };
    let mut pending = Some(call(c, encode_checkout(&checkout), c.timeout));
    let consumer = tokio::select! {
        a = answer(pending.as_mut()) => checked_out(c, a)?,
        closed = &mut ends.closed => return Ok(closed.unwrap_or_default()),
        why = leader_moved(leadership, c.leader, &c.address) => return Err(why),
    };
    c.consumer = Some(consumer);
    let mut loop_state = Feeding {
        fetched: 0,
        fetch: None,
        settle: None,
        queued: VecDeque::new(),
        last_call: Instant::now(),
        quiet_until: Instant::now(),
        closing: None,
        settles_open: true,
        draining: false,
    };
    loop {
        let s = &mut loop_state;
        while let Ok(p) = ends.settles.try_recv() {
            s.queued.push_back(p);
        }
        s.start_settle(c, consumer);
        if let Some(undelivered) = &s.closing {
            if s.settle.is_none() && s.queued.is_empty() {
                return Ok(undelivered.clone());
            }
        } else {
            s.start_fetch(c, consumer)?;
        }
        let tick = s.next_tick();
        tokio::select! {
            a = answer(s.fetch.as_mut()) => {
                s.fetch = None;
                s.on_fetched(c, a)?;
            }
            a = answer(s.settle.as_mut().map(|(call, _, _)| call)) => {
                s.on_settled(c, ends, a)?;
            }
            p = ends.settles.recv(), if s.settles_open => match p {
                Some(p) => s.queued.push_back(p),
                None => s.settles_open = false,
            },
            closed = &mut ends.closed, if s.closing.is_none() => {
                s.closing = Some(closed.unwrap_or_default());
            }
            _ = ends.wake.notified() => {}
            _ = tokio::time::sleep_until(tick) => {}
            why = leader_moved(leadership, c.leader, &c.address) => return Err(why),
        }
    }
}

/// The leader's answer to a checkout: its number for the consumer, or why not.
fn checked_out(
    c: &ConsumerCarrier,
    a: Result<bytes::Bytes, entrepot_cluster::AppCallError>,
) -> Result<u64, String> {
    let no_answer = |e: String| {
        format!(
            "no answer from node {} for address {}: {e}",
            c.leader, c.address
        )
    };
    let b = a.map_err(|e| no_answer(e.to_string()))?;
    match decode_checked_out(b).map_err(|e| no_answer(format!("undecodable answer: {e}")))? {
        Answer::Ok(consumer) => Ok(consumer),
        Answer::Refused(rest) => Err(format!(
            "node {} did not serve the consumer: {rest}",
            c.leader
        )),
    }
}

/// The feeding loop's state (see [`feed_loop`]).
struct Feeding {
    /// Deliveries taken from the leader so far (wrapping, the fetch's credit base).
    fetched: u32,
    fetch: Option<Call>,
    /// The settle in flight: its call, the first outcome's number and how many.
    settle: Option<(Call, u64, u32)>,
    queued: VecDeque<PendingSettle>,
    last_call: Instant,
    quiet_until: Instant,
    /// The link closed: the offsets it never delivered, once the outcomes are carried.
    closing: Option<Vec<u64>>,
    /// The shadow's source still exists (outcomes may come).
    settles_open: bool,
    /// The fetch in flight was started for a drain (it completes the drain).
    draining: bool,
}

impl Feeding {
    fn start_settle(&mut self, c: &ConsumerCarrier, consumer: u64) {
        if self.settle.is_some() || self.queued.is_empty() {
            return;
        }
        let n = self.queued.len().min(MAX_SETTLE_BATCH);
        let batch: Vec<PendingSettle> = self.queued.drain(..n).collect();
        let first = batch[0].seq;
        let outcomes: Vec<(u64, Outcome)> =
            batch.into_iter().map(|p| (p.offset, p.outcome)).collect();
        let request = encode_settle(consumer, &outcomes);
        self.settle = Some((call(c, request, c.timeout), first, n as u32));
        self.last_call = Instant::now();
    }

    /// Starts a fetch when the shadow wants deliveries (and no pause holds), or a
    /// heartbeat fetch with no room when the link was quiet too long.
    fn start_fetch(&mut self, c: &ConsumerCarrier, consumer: u64) -> Result<(), String> {
        if self.fetch.is_some() {
            return Ok(());
        }
        let shadow = c
            .shadow
            .upgrade()
            .ok_or_else(|| "the link's shadow is gone".to_owned())?;
        let room = (shadow.forward_demand() as u32).min(FORWARDED_CONSUMER_PREFETCH);
        let now = Instant::now();
        // A drain asks the leader for what it has now, without parking, and completes
        // once that is handed on (`on_fetched`).
        self.draining = shadow.drain_requested();
        let wanted = (room > 0 && now >= self.quiet_until) || self.draining;
        if !wanted && now < self.last_call + FORWARDED_CONSUMER_KEEPALIVE {
            return Ok(());
        }
        let wait = match wanted && !self.draining {
            true => FETCH_WAIT,
            false => Duration::ZERO,
        };
        let f = Fetch {
            consumer,
            fetched: self.fetched,
            room: if wanted { room } else { 0 },
            wait_ms: wait.as_millis() as u32,
        };
        tracing::trace!(address = %c.address, forwarder = c.forwarder, fetched = f.fetched,
            room = f.room, wait_ms = f.wait_ms, "fetch sent");
        self.fetch = Some(call(c, encode_fetch(&f), c.timeout + wait));
        self.last_call = now;
        Ok(())
    }

    fn next_tick(&self) -> Instant {
        let keepalive = self.last_call + FORWARDED_CONSUMER_KEEPALIVE;
        match self.quiet_until > Instant::now() {
            true => self.quiet_until.min(keepalive),
            false => keepalive,
        }
    }

    /// Hands fetched deliveries to the shadow (whose dispatch honours the client's credit).
    fn on_fetched(
        &mut self,
        c: &ConsumerCarrier,
        a: Result<bytes::Bytes, entrepot_cluster::AppCallError>,
    ) -> Result<(), String> {
        let no_answer = |e: String| {
            format!(
                "no answer from node {} for address {}: {e}",
                c.leader, c.address
            )
        };
        let b = a.map_err(|e| no_answer(e.to_string()))?;
        let fetched =
            match decode_fetched(b).map_err(|e| no_answer(format!("undecodable answer: {e}")))? {
                Answer::Ok(f) => f,
                Answer::Refused(rest) => {
                    return Err(format!(
                        "node {} no longer serves the consumer: {rest}",
                        c.leader
                    ))
                }
            };
        let n = fetched.messages.len();
        tracing::trace!(address = %c.address, forwarder = c.forwarder, fetched = self.fetched,
            answered = n, waited = fetched.waited, "fetched");
        self.fetched = self.fetched.wrapping_add(n as u32);
        if n == 0 && !fetched.waited && !self.draining {
            self.quiet_until = Instant::now() + FETCH_RETRY_PAUSE;
        }
        c.stats.deliveries.fetch_add(n as u64, Ordering::Relaxed);
        let (Some(shadow), Some(broker)) = (c.shadow.upgrade(), c.broker.upgrade()) else {
            return Err("the link's shadow is gone".into());
        };
        if n > 0 {
            shadow.enqueue_all(&broker, fetched.messages);
        }
        if std::mem::take(&mut self.draining) {
            shadow.complete_drains(&broker);
        }
        Ok(())
    }

    /// Completes the outcomes the leader recorded (a prefix of the batch).
    fn on_settled(
        &mut self,
        c: &ConsumerCarrier,
        ends: &Ends,
        a: Result<bytes::Bytes, entrepot_cluster::AppCallError>,
    ) -> Result<(), String> {
        let Some((_, first, n)) = self.settle.take() else {
            return Ok(());
        };
        let no_answer = |e: String| {
            format!(
                "no answer from node {} for address {}: {e}",
                c.leader, c.address
            )
        };
        let b = a.map_err(|e| no_answer(e.to_string()))?;
        let reply = decode_reply(b).map_err(|e| no_answer(format!("undecodable answer: {e}")))?;
        let done = u64::from(reply.stored.min(n));
        // Only now — the leader recorded them (an acceptance: committed) — do they complete.
        ends.progress
            .send_modify(|s| s.durable = s.durable.max(first + done));
        match reply.rest {
            Some(why) => Err(format!(
                "node {} did not record every outcome: {why}",
                c.leader
            )),
            None => Ok(()),
        }
    }
}
