//! The leader's end of forwarded consumer links: each checkout adds one consumer to the
//! served, group-backed queue whose deliveries wait in its inbox until the forwarding
//! node fetches them; settles apply the client's outcomes as a local consumer's
//! (answered once recorded — an acceptance once its acknowledgement committed); a cancel
//! or [`FORWARDED_CONSUMER_IDLE_TIMEOUT`] without a request gives back what it held.
//!
//! Invariants:
//! * Every value a peer sends is bounded: at most [`MAX_FORWARDED_CONSUMERS`] checked out
//!   per node, a fetch's room by `FORWARDED_CONSUMER_PREFETCH`, a reply by
//!   `MAX_FETCH_MESSAGES` / `MAX_FETCH_BYTES`, a wait by `FETCH_WAIT`.
//! * Long polls never starve the node's request bound (`MAX_APP_REQUESTS_IN_FLIGHT`): at
//!   most [`MAX_PARKED_FETCHES`] fetches wait at once; beyond them a fetch is answered at
//!   once (`waited: false`, and the forwarder pauses).
//! * An outcome is applied only to a delivery the consumer still holds; once its holdings
//!   were given back (cancel, idle release, the queue retired) an outcome for them is
//!   refused, so a delivery is never settled twice.
//! * What a vanished forwarder held goes back to the queue after
//!   [`FORWARDED_CONSUMER_IDLE_TIMEOUT`] (unsettled deliveries with a raised delivery
//!   count, as for a local link that closes): at-least-once.
//!
//! Does not: browse, or keep a forwarded consumer across a leadership change (the queue
//! retires it; the forwarding node detaches its link).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use super::consume::{FETCH_WAIT, FORWARDED_CONSUMER_KEEPALIVE, FORWARDED_CONSUMER_PREFETCH};
use super::consume_wire::{
    decode_cancel, decode_checkout, decode_fetch, decode_settle, encode_checked_out,
    encode_fetched, settled_reply, Answer, Checkout, Fetch, Fetched, MAX_FETCH_BYTES,
    MAX_FETCH_MESSAGES, OP_CANCEL, OP_CHECKOUT, OP_FETCH, OP_SETTLE,
};
use super::{encode_reply, ForwardStats, Rest, SERVE_COMMIT_WAIT};
use crate::broker::queue::{
    ConsumerId, ConsumerSpec, LinkKey, Outbound, Outcome, Queue, QueuedMessage, Recorded,
};
use crate::broker::Broker;

/// Most forwarded consumers one node serves at once (from all its peers).
pub const MAX_FORWARDED_CONSUMERS: usize = 4096;
/// Most fetches one node parks at once: well below the node's request bound, so the
/// enqueues, settles and Raft-side requests always find room.
pub const MAX_PARKED_FETCHES: usize = 256;
const _: () = assert!(MAX_PARKED_FETCHES * 4 <= entrepot_cluster::MAX_APP_REQUESTS_IN_FLIGHT);
/// How long a forwarded consumer may go without a request before the leader gives back
/// what it held (its node or connection vanished without a cancel).
pub const FORWARDED_CONSUMER_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const _: () = assert!(
    FORWARDED_CONSUMER_KEEPALIVE.as_millis() + entrepot_cluster::APP_TIMEOUT_MAX.as_millis()
        < FORWARDED_CONSUMER_IDLE_TIMEOUT.as_millis(),
    "a live forwarder's heartbeat always comes in time"
);
/// How often the leader looks for vanished forwarders.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// The forwarded consumers this node serves (see the module docs).
#[derive(Debug)]
pub(super) struct RemoteConsumers {
    map: Mutex<HashMap<u64, Arc<RemoteConsumer>>>,
    next: AtomicU64,
    parked: Arc<Semaphore>,
    reaping: AtomicBool,
}

impl Default for RemoteConsumers {
    fn default() -> RemoteConsumers {
        RemoteConsumers {
            map: Mutex::default(),
            next: AtomicU64::new(1),
            parked: Arc::new(Semaphore::new(MAX_PARKED_FETCHES)),
            reaping: AtomicBool::new(false),
        }
    }
}

#[derive(Debug)]
struct RemoteConsumer {
    number: u64,
    address: String,
    forwarder: u64,
    queue: Arc<Queue>,
    id: ConsumerId,
    inbox: tokio::sync::Mutex<Inbox>,
    last_seen: Mutex<Instant>,
    /// True once its holdings were given back; held across an ownership check and the
    /// outcome it guards, and by the release, so the two never interleave.
    released: Mutex<bool>,
}

#[derive(Debug)]
struct Inbox {
    rx: mpsc::UnboundedReceiver<Outbound>,
    /// Delivered by the queue, not fetched yet (beyond the last reply's bounds).
    held: VecDeque<QueuedMessage>,
    /// The queue is no longer served here: why.
    retired: Option<String>,
}

impl Inbox {
    /// Moves what the queue sent into `held`.
    fn take_sent(&mut self) {
        while let Ok(event) = self.rx.try_recv() {
            self.on_event(event);
        }
    }

    fn on_event(&mut self, event: Outbound) {
        match event {
            Outbound::Deliver { msg, .. } => self.held.push_back(msg),
            Outbound::Retired { description, .. } => self.retired = Some(description),
            Outbound::Drained { .. } | Outbound::ForwardEnded { .. } => {}
        }
    }

    /// The held deliveries within one reply's bounds (a single larger one goes alone).
    fn reply_batch(&mut self) -> Vec<QueuedMessage> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(m) = self.held.front() {
            let full = out.len() >= MAX_FETCH_MESSAGES
                || (!out.is_empty() && bytes + m.message.len() > MAX_FETCH_BYTES);
            if full {
                break;
            }
            bytes += m.message.len();
            out.extend(self.held.pop_front());
        }
        out
    }
}

impl RemoteConsumer {
    fn touch(&self) {
        *self.last_seen.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Gives back everything it holds (once): unsettled deliveries go back to the queue
    /// with a raised delivery count.
    fn release(&self, broker: &Broker) {
        let mut released = self.released.lock().unwrap_or_else(|e| e.into_inner());
        if !*released {
            *released = true;
            self.queue.remove_consumer(broker, self.id);
        }
    }

    /// Applies `outcome` if this consumer still holds the delivery of `offset`.
    fn settle(
        &self,
        broker: &Broker,
        offset: u64,
        outcome: Outcome,
    ) -> Result<Option<Recorded>, Rest> {
        let released = self.released.lock().unwrap_or_else(|e| e.into_inner());
        if *released || !self.queue.holds(self.id, offset) {
            return Err(Rest::Failed(format!(
                "delivery {offset} of {} is no longer held by forwarded consumer {} (given back: \
                 the link closed, or no request for FORWARDED_CONSUMER_IDLE_TIMEOUT)",
                self.address, self.number
            )));
        }
        self.queue
            .settle(broker, self.id, offset, outcome)
            .map_err(|e| Rest::NotServed(e.to_string()))
    }
}

impl RemoteConsumers {
    fn get(&self, number: u64) -> Result<Arc<RemoteConsumer>, Rest> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&number) {
            Some(rc) => {
                rc.touch();
                Ok(Arc::clone(rc))
            }
            None => Err(Rest::NotServed(format!(
                "forwarded consumer {number} is not checked out here (given back after \
                 FORWARDED_CONSUMER_IDLE_TIMEOUT without a request, or this node restarted)"
            ))),
        }
    }

    fn remove(&self, number: u64) -> Option<Arc<RemoteConsumer>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&number)
    }

    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Serves one consumer request (`op` 2–5; `body` past the version and op bytes).
pub(super) async fn serve(
    broker: Arc<Broker>,
    consumers: Arc<RemoteConsumers>,
    stats: Arc<ForwardStats>,
    op: u8,
    body: Bytes,
) -> Result<Bytes, String> {
    match op {
        OP_CHECKOUT => {
            let answer = checkout(&broker, &consumers, &stats, decode_checkout(body)?);
            Ok(encode_checked_out(&answer))
        }
        OP_FETCH => {
            let answer = fetch(&broker, &consumers, &stats, decode_fetch(body)?).await;
            Ok(encode_fetched(&answer))
        }
        OP_SETTLE => {
            let (number, batch) = decode_settle(body)?;
            Ok(encode_reply(
                &settle(&broker, &consumers, number, batch).await,
            ))
        }
        OP_CANCEL => {
            let (number, undelivered) = decode_cancel(body)?;
            cancel(&broker, &consumers, &stats, number, &undelivered);
            Ok(encode_reply(&settled_reply(undelivered.len() as u32, None)))
        }
        other => Err(format!("unknown link-forwarding op {other}")),
    }
}

fn checkout(
    broker: &Arc<Broker>,
    consumers: &Arc<RemoteConsumers>,
    stats: &Arc<ForwardStats>,
    c: Checkout,
) -> Answer<u64> {
    let refuse = |rest| Answer::Refused(rest);
    if consumers.len() >= MAX_FORWARDED_CONSUMERS {
        return refuse(Rest::Failed(format!(
            "this node serves {MAX_FORWARDED_CONSUMERS} forwarded consumers already \
             (MAX_FORWARDED_CONSUMERS)"
        )));
    }
    // Looked up, never created (see `serve_enqueue`).
    let queue = match broker.existing_queue(&c.address) {
        Some(q) if q.address_store().is_some() && !q.is_retired() => q,
        _ => {
            return refuse(Rest::NotServed(format!(
                "address {} is not served here",
                c.address
            )))
        }
    };
    let selector = match c.selector.as_deref().map(crate::broker::selector::parse) {
        None => None,
        Some(Ok(s)) => Some(Arc::new(s)),
        Some(Err(e)) => return refuse(Rest::Failed(format!("invalid selector: {e}"))),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let id = ConsumerId::next();
    let number = consumers.next.fetch_add(1, Ordering::Relaxed);
    queue.add_consumer(ConsumerSpec {
        link: LinkKey {
            channel: 0,
            handle: 0,
            consumer: id,
        },
        tx,
        presettled: false,
        // What the client may hold unsettled, plus what waits in the shadow.
        unsettled_max: broker.config().unsettled_per_link + FORWARDED_CONSUMER_PREFETCH as usize,
        selector,
    });
    let rc = RemoteConsumer {
        number,
        address: c.address.clone(),
        forwarder: c.forwarder,
        queue,
        id,
        inbox: tokio::sync::Mutex::new(Inbox {
            rx,
            held: VecDeque::new(),
            retired: None,
        }),
        last_seen: Mutex::new(Instant::now()),
        released: Mutex::new(false),
    };
    consumers
        .map
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(number, Arc::new(rc));
    stats.consumers_served.fetch_add(1, Ordering::Relaxed);
    tracing::info!(address = %c.address, consumer = number, forwarder = c.forwarder,
        link = %c.link, "serving a forwarded consumer");
    if !consumers.reaping.swap(true, Ordering::Relaxed) {
        tokio::spawn(reap(
            Arc::clone(consumers),
            Arc::downgrade(broker),
            Arc::clone(stats),
        ));
    }
    Answer::Ok(number)
}

async fn fetch(
    broker: &Broker,
    consumers: &RemoteConsumers,
    stats: &ForwardStats,
    f: Fetch,
) -> Answer<Fetched> {
    let rc = match consumers.get(f.consumer) {
        Ok(rc) => rc,
        Err(rest) => return Answer::Refused(rest),
    };
    let room = f.room.min(FORWARDED_CONSUMER_PREFETCH);
    rc.queue.flow(broker, rc.id, Some(f.fetched), room, false);
    let mut inbox = rc.inbox.lock().await;
    inbox.take_sent();
    let mut waited = false;
    if inbox.held.is_empty() && inbox.retired.is_none() && f.wait_ms > 0 && room > 0 {
        if let Ok(_parked) = consumers.parked.try_acquire() {
            waited = true;
            let wait = Duration::from_millis(u64::from(f.wait_ms)).min(FETCH_WAIT);
            if let Ok(Some(event)) = tokio::time::timeout(wait, inbox.rx.recv()).await {
                inbox.on_event(event);
                inbox.take_sent();
            }
        }
    }
    if let Some(why) = inbox.retired.clone() {
        drop(inbox);
        if let Some(rc) = consumers.remove(f.consumer) {
            rc.release(broker);
            stats.consumers_served.fetch_sub(1, Ordering::Relaxed);
        }
        return Answer::Refused(Rest::NotServed(why));
    }
    rc.touch();
    let messages = inbox.reply_batch();
    tracing::trace!(address = %rc.address, consumer = f.consumer, fetched = f.fetched, room,
        waited, answered = messages.len(), depth = ?rc.queue.depth(),
        lease = ?rc.queue.lease_holds(), "fetch answered");
    Answer::Ok(Fetched { waited, messages })
}

/// Applies the outcomes in order; answers how many (a prefix) are recorded.
async fn settle(
    broker: &Broker,
    consumers: &RemoteConsumers,
    number: u64,
    batch: Vec<(u64, Outcome)>,
) -> super::Reply {
    let rc = match consumers.get(number) {
        Ok(rc) => rc,
        Err(rest) => return settled_reply(0, Some(rest)),
    };
    let mut recorded = Vec::with_capacity(batch.len());
    let mut rest = None;
    for (offset, outcome) in batch {
        match rc.settle(broker, offset, outcome) {
            Ok(r) => recorded.push(r),
            Err(why) => {
                rest = Some(why);
                break;
            }
        }
    }
    let deadline = Instant::now() + SERVE_COMMIT_WAIT;
    let mut done = 0u32;
    for r in recorded {
        if let Some(r) = r {
            let _ = tokio::time::timeout_at(deadline, r.clone().wait()).await;
            if !r.is_done() {
                rest = Some(Rest::Failed(format!(
                    "outcome not recorded (failed: {}, or not committed within {SERVE_COMMIT_WAIT:?})",
                    r.has_failed()
                )));
                break;
            }
        }
        done += 1;
    }
    rc.touch();
    settled_reply(done, rest)
}

fn cancel(
    broker: &Broker,
    consumers: &RemoteConsumers,
    stats: &ForwardStats,
    number: u64,
    undelivered: &[u64],
) {
    let Some(rc) = consumers.remove(number) else {
        return;
    };
    for offset in undelivered {
        // Fetched, never sent to the client: back unchanged (no failed attempt).
        let _ = rc.settle(broker, *offset, Outcome::Released);
    }
    rc.release(broker);
    stats.consumers_served.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(address = %rc.address, consumer = number, "forwarded consumer cancelled");
}

/// Gives back what vanished forwarders held (no request for
/// [`FORWARDED_CONSUMER_IDLE_TIMEOUT`]); ends with the broker.
async fn reap(consumers: Arc<RemoteConsumers>, broker: Weak<Broker>, stats: Arc<ForwardStats>) {
    loop {
        tokio::time::sleep(REAP_EVERY).await;
        let Some(broker) = broker.upgrade() else {
            return;
        };
        let idle: Vec<Arc<RemoteConsumer>> = {
            let mut map = consumers.map.lock().unwrap_or_else(|e| e.into_inner());
            let gone: Vec<u64> = map
                .iter()
                .filter(|(_, rc)| {
                    let seen = *rc.last_seen.lock().unwrap_or_else(|e| e.into_inner());
                    seen.elapsed() > FORWARDED_CONSUMER_IDLE_TIMEOUT
                })
                .map(|(n, _)| *n)
                .collect();
            gone.iter().filter_map(|n| map.remove(n)).collect()
        };
        for rc in idle {
            rc.release(&broker);
            stats.consumers_served.fetch_sub(1, Ordering::Relaxed);
            stats.consumers_released.fetch_add(1, Ordering::Relaxed);
            tracing::info!(address = %rc.address, consumer = rc.number, forwarder = rc.forwarder,
                timeout = ?FORWARDED_CONSUMER_IDLE_TIMEOUT,
                "forwarded consumer given back: no request from its node (vanished?)");
        }
    }
}
