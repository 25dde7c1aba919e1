//! A session: transfer numbering and windows in both directions, and its links.
//!
//! Incoming: we grant a fixed incoming window and top it up with a `flow` when half is
//! used. Outgoing: we never send more transfer frames than the peer's incoming window
//! allows; deliveries that do not fit wait in `blocked` until the peer's next `flow`, and
//! a drain's closing flow waits behind the last of its link's blocked deliveries.
//! Outgoing unsettled deliveries are remembered by delivery id until the consumer's
//! disposition settles them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use fe2o3_amqp_types::definitions::{AmqpError, ErrorCondition, LinkError, Role, SessionError};
use fe2o3_amqp_types::messaging::{Accepted, DeliveryState};
use fe2o3_amqp_types::performatives::{Begin, Disposition, Flow, Performative};

use super::errors::ClientError;
use super::link::Link;
use super::outbuf::SHARED_BODY_MIN_BYTES;
use super::{ConnError, Connection, PendingSettle};
use crate::amqp::frame::{encode_transfer, encode_transfer_head, TransferHeader, FRAME_HEADER_LEN};
use crate::amqp::message::MessageView;
use crate::broker::queue::{ConsumerId, Outbound, Outcome, Queue, QueuedMessage};
use crate::config::BrokerConfig;

/// Transfer frames the peer may send before we top the window up.
pub const INCOMING_WINDOW: u32 = 8192;
/// Our outgoing window as announced (we are limited by the peer's incoming window).
pub const OUTGOING_WINDOW: u32 = u32::MAX;
/// Delivery ids are serial numbers (RFC 1982): a disposition's `last` at this distance
/// or more from its `first` precedes it, and the range is refused.
pub const MAX_DISPOSITION_SPAN: u32 = 1 << 31;

/// A delivery we sent and the consumer has not settled.
pub(super) struct OutDelivery {
    pub handle: u32,
    pub consumer: ConsumerId,
    pub queue: Arc<Queue>,
    pub offset: u64,
}

/// A delivery waiting for the peer's incoming window.
pub(super) struct Blocked {
    handle: u32,
    consumer: ConsumerId,
    queue: Arc<Queue>,
    msg: QueuedMessage,
    settled: bool,
    /// A drain of this link ended with this delivery: the drained flow's delivery-count,
    /// sent right after it so the flow never overtakes the deliveries it accounts for.
    then_drained: Option<u32>,
}

pub(super) struct Session {
    local_channel: u16,
    remote_channel: u16,
    next_incoming_id: u32,
    incoming_window: u32,
    next_outgoing_id: u32,
    remote_incoming_window: u32,
    next_delivery_id: u32,
    handle_max: u32,
    pub(super) links: HashMap<u32, Link>,
    pub(super) unsettled_out: HashMap<u32, OutDelivery>,
    blocked: VecDeque<Blocked>,
}

impl Session {
    /// Accepts the peer's `begin`; our channel number is the peer's.
    pub fn begin(channel: u16, begin: &Begin, config: &BrokerConfig) -> (Session, Begin) {
        let handle_max = config.max_links.saturating_sub(1);
        let session = Session {
            local_channel: channel,
            remote_channel: channel,
            next_incoming_id: begin.next_outgoing_id,
            incoming_window: INCOMING_WINDOW,
            next_outgoing_id: 0,
            remote_incoming_window: begin.incoming_window,
            next_delivery_id: 0,
            handle_max,
            links: HashMap::new(),
            unsettled_out: HashMap::new(),
            blocked: VecDeque::new(),
        };
        let reply = Begin {
            remote_channel: Some(channel),
            next_outgoing_id: 0,
            incoming_window: INCOMING_WINDOW,
            outgoing_window: OUTGOING_WINDOW,
            handle_max: handle_max.into(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        (session, reply)
    }

    pub fn local_channel(&self) -> u16 {
        self.local_channel
    }

    pub fn remote_channel(&self) -> u16 {
        self.remote_channel
    }

    pub fn handle_max(&self) -> u32 {
        self.handle_max
    }

    pub fn on_performative(
        &mut self,
        conn: &mut Connection,
        p: Performative,
        payload: Bytes,
    ) -> Result<(), ConnError> {
        match p {
            Performative::Attach(attach) => self.on_attach(conn, attach),
            Performative::Detach(detach) => self.on_detach(conn, detach),
            Performative::Flow(flow) => self.on_flow(conn, flow),
            Performative::Transfer(transfer) => {
                self.count_incoming_frame(conn)?;
                self.on_transfer(conn, transfer, payload)
            }
            Performative::Disposition(d) => self.on_disposition(conn, d),
            _ => Err(ConnError::protocol(
                AmqpError::IllegalState,
                "unexpected performative on a session",
            )),
        }
    }

    /// Window bookkeeping for one incoming transfer frame.
    fn count_incoming_frame(&mut self, conn: &mut Connection) -> Result<(), ConnError> {
        if self.incoming_window == 0 {
            return Err(ConnError::session(
                SessionError::WindowViolation,
                "transfer beyond the incoming window",
            ));
        }
        self.incoming_window -= 1;
        self.next_incoming_id = self.next_incoming_id.wrapping_add(1);
        if self.incoming_window < INCOMING_WINDOW / 2 {
            self.incoming_window = INCOMING_WINDOW;
            self.send_flow(conn, None)?;
        }
        Ok(())
    }

    /// Sends a session flow, or a link flow when `link` is `(handle, delivery_count,
    /// link_credit, drain)`.
    pub fn send_flow(
        &mut self,
        conn: &mut Connection,
        link: Option<(u32, u32, Option<u32>, bool)>,
    ) -> Result<(), ConnError> {
        let flow = Flow {
            next_incoming_id: Some(self.next_incoming_id),
            incoming_window: self.incoming_window,
            next_outgoing_id: self.next_outgoing_id,
            outgoing_window: OUTGOING_WINDOW,
            handle: link.map(|l| l.0.into()),
            delivery_count: link.map(|l| l.1),
            link_credit: link.and_then(|l| l.2),
            available: None,
            drain: link.is_some_and(|l| l.3),
            echo: false,
            properties: None,
        };
        conn.send(self.local_channel, &Performative::Flow(flow), &[])
    }

    fn on_flow(&mut self, conn: &mut Connection, flow: Flow) -> Result<(), ConnError> {
        let their_next_incoming = flow.next_incoming_id.unwrap_or(0);
        self.remote_incoming_window = their_next_incoming
            .wrapping_add(flow.incoming_window)
            .wrapping_sub(self.next_outgoing_id);
        if let Some(handle) = flow.handle.as_ref() {
            let handle = handle.0;
            match self.links.get_mut(&handle) {
                Some(Link::Consumer(c)) if c.browse.is_some() => {
                    self.browse_flow(conn, handle, &flow)?;
                }
                Some(Link::Consumer(c)) => {
                    let (queue, id) = (Arc::clone(&c.queue), c.consumer);
                    queue.flow(
                        &conn.broker,
                        id,
                        flow.delivery_count,
                        flow.link_credit.unwrap_or(0),
                        flow.drain,
                    );
                }
                Some(Link::Producer(p)) => {
                    if flow.echo {
                        let (dc, credit) = (p.delivery_count, p.credit);
                        self.send_flow(conn, Some((handle, dc, Some(credit), false)))?;
                    }
                }
                Some(Link::Detached) => {}
                None => {
                    return Err(ConnError::session(
                        SessionError::UnattachedHandle,
                        format!("flow for unattached handle {handle}"),
                    ))
                }
            }
        } else if flow.echo {
            self.send_flow(conn, None)?;
        }
        self.send_blocked(conn)
    }

    /// A flow on a browser's link: as many snapshot messages as the credit allows go out
    /// pre-settled; a drain that finds the snapshot empty ends with a drained flow.
    fn browse_flow(
        &mut self,
        conn: &mut Connection,
        handle: u32,
        flow: &Flow,
    ) -> Result<(), ConnError> {
        let Some(Link::Consumer(c)) = self.links.get_mut(&handle) else {
            return Ok(());
        };
        let (queue, consumer) = (Arc::clone(&c.queue), c.consumer);
        let Some(b) = c.browse.as_mut() else {
            return Ok(());
        };
        let theirs = flow.delivery_count.unwrap_or(b.delivery_count);
        b.credit = theirs
            .wrapping_add(flow.link_credit.unwrap_or(0))
            .wrapping_sub(b.delivery_count);
        let mut out = Vec::new();
        while b.credit > 0 {
            let Some(msg) = b.snapshot.pop_front() else {
                break;
            };
            b.credit -= 1;
            b.delivery_count = b.delivery_count.wrapping_add(1);
            out.push(msg);
        }
        let drained = flow.drain.then(|| {
            b.delivery_count = b.delivery_count.wrapping_add(b.credit);
            b.credit = 0;
            b.delivery_count
        });
        for msg in out {
            self.blocked.push_back(Blocked {
                handle,
                consumer,
                queue: Arc::clone(&queue),
                msg,
                settled: true,
                then_drained: None,
            });
        }
        if let Some(delivery_count) = drained {
            match self.blocked.iter_mut().rev().find(|b| b.handle == handle) {
                Some(last) => last.then_drained = Some(delivery_count),
                None => self.send_flow(conn, Some((handle, delivery_count, None, true)))?,
            }
        }
        Ok(())
    }

    fn on_disposition(&mut self, conn: &mut Connection, d: Disposition) -> Result<(), ConnError> {
        let last = d.last.unwrap_or(d.first);
        check_range(d.first, last)?;
        if d.role != Role::Receiver {
            // The peer settles deliveries it sent us; we settle ours on acceptance already.
            return Ok(());
        }
        if let Some(DeliveryState::TransactionalState(txn_state)) = &d.state {
            let txn_ids = self.settled_ids(d.first, last)?;
            return self.on_txn_disposition(conn, txn_ids, txn_state, d.settled);
        }
        let outcome = match &d.state {
            Some(state) => outcome_of(state),
            None if d.settled => Some(Outcome::Accepted),
            None => None,
        };
        let Some(outcome) = outcome else {
            return Ok(());
        };
        let mut settled_back = Vec::new();
        let mut refused = Vec::new();
        for id in self.settled_ids(d.first, last)? {
            if let Some(out) = self.unsettled_out.remove(&id) {
                let recorded =
                    out.queue
                        .settle(&conn.broker, out.consumer, out.offset, outcome.clone());
                let recorded = match recorded {
                    Ok(recorded) => recorded,
                    Err(e) => {
                        // Not recorded, so not consumed: the message is back in its queue
                        // and nothing is settled back, in either settle mode.
                        refused.push((out.handle, e));
                        continue;
                    }
                };
                if !d.settled {
                    // The consumer waits for our settlement (receiver-settle-mode second):
                    // it comes once its outcome is durable (committed, in a cluster), so a
                    // settled delivery never comes back after a crash or failover.
                    match recorded.filter(|r| !r.is_done()) {
                        Some(durable) => conn.pending_settles.push_back(PendingSettle {
                            durable,
                            channel: self.local_channel,
                            delivery_id: id,
                            handle: out.handle,
                            state: d.state.clone(),
                        }),
                        None => settled_back.push(id),
                    }
                }
            }
        }
        for id in settled_back {
            Session::send_settled(conn, self.local_channel, id, d.state.clone())?;
        }
        self.detach_refused(conn, refused)
    }

    /// Detaches each link whose consumer's acceptance the store refused, with the reason
    /// (`amqp:resource-limit-exceeded` when the disk is full): its deliveries stay unsettled
    /// and their messages are delivered again, so the consumer is never told it consumed
    /// what the broker did not record, and stops acknowledging into a store that refuses.
    fn detach_refused(
        &mut self,
        conn: &mut Connection,
        refused: Vec<(u32, crate::broker::queue::AckRefused)>,
    ) -> Result<(), ConnError> {
        for (handle, e) in refused {
            // A link already detached by an earlier refusal of this disposition is skipped.
            let description = format!("{e}; the message will be delivered again");
            self.detach_consumer_with_error(conn, handle, e.condition(), description)?;
        }
        Ok(())
    }

    /// Detaches consumer link `handle` with an error, unless it is gone already.
    pub(super) fn detach_consumer_with_error(
        &mut self,
        conn: &mut Connection,
        handle: u32,
        condition: ErrorCondition,
        description: String,
    ) -> Result<(), ConnError> {
        if !matches!(self.links.get(&handle), Some(Link::Consumer(_))) {
            return Ok(());
        }
        self.detach_with_error(conn, handle, condition, description)
    }

    /// The delivery ids of `first..=last` (serial numbers, RFC 1982) that we have
    /// unsettled, in delivery order. The work is bounded by what is unsettled, never by
    /// the width of the range a peer wrote.
    pub(super) fn settled_ids(&self, first: u32, last: u32) -> Result<Vec<u32>, ConnError> {
        let span = check_range(first, last)?;
        if (span as usize) < self.unsettled_out.len() {
            return Ok((0..=span).map(|k| first.wrapping_add(k)).collect());
        }
        let mut ids: Vec<u32> = self
            .unsettled_out
            .keys()
            .copied()
            .filter(|id| id.wrapping_sub(first) <= span)
            .collect();
        ids.sort_unstable_by_key(|id| id.wrapping_sub(first));
        Ok(ids)
    }

    /// Settles a delivery we sent, with the consumer's outcome echoed.
    pub fn send_settled(
        conn: &mut Connection,
        channel: u16,
        delivery_id: u32,
        state: Option<DeliveryState>,
    ) -> Result<(), ConnError> {
        let reply = Disposition {
            role: Role::Sender,
            first: delivery_id,
            last: None,
            settled: true,
            state,
            batchable: false,
        };
        conn.send(channel, &Performative::Disposition(reply), &[])
    }

    /// Accepts and settles the incoming deliveries `first..=last`.
    pub fn send_accepted(
        &mut self,
        conn: &mut Connection,
        first: u32,
        last: u32,
    ) -> Result<(), ConnError> {
        let d = Disposition {
            role: Role::Receiver,
            first,
            last: (last != first).then_some(last),
            settled: true,
            state: Some(DeliveryState::Accepted(Accepted {})),
            batchable: false,
        };
        conn.send(self.local_channel, &Performative::Disposition(d), &[])
    }

    pub fn on_outbound(&mut self, conn: &mut Connection, event: Outbound) -> Result<(), ConnError> {
        match event {
            Outbound::Deliver {
                link,
                queue,
                msg,
                settled,
            } => {
                let current = matches!(self.links.get(&link.handle), Some(Link::Consumer(c)) if c.consumer == link.consumer);
                if !current {
                    // The link went away after the queue dispatched; the queue already
                    // took the message back when the consumer was removed.
                    return Ok(());
                }
                self.blocked.push_back(Blocked {
                    handle: link.handle,
                    consumer: link.consumer,
                    queue,
                    msg,
                    settled,
                    then_drained: None,
                });
                self.send_blocked(conn)
            }
            Outbound::Drained {
                link,
                delivery_count,
            } => {
                if !matches!(self.links.get(&link.handle), Some(Link::Consumer(c)) if c.consumer == link.consumer)
                {
                    return Ok(());
                }
                // Deliveries of this drain may still wait for the peer's window.
                let waiting = self
                    .blocked
                    .iter_mut()
                    .rev()
                    .find(|b| b.handle == link.handle && b.consumer == link.consumer);
                match waiting {
                    Some(b) => b.then_drained = Some(delivery_count),
                    // No link-credit field: only the receiving side issues credit.
                    None => {
                        self.send_flow(conn, Some((link.handle, delivery_count, None, true)))?
                    }
                }
                Ok(())
            }
            // The queue is no longer served here: only its links go, the session and the
            // connection's other links stay.
            Outbound::ForwardEnded { handle, .. } => self.on_forward_ended(conn, handle),
            Outbound::Retired { link, description } => {
                if !matches!(self.links.get(&link.handle), Some(Link::Consumer(c)) if c.consumer == link.consumer)
                {
                    return Ok(());
                }
                self.detach_with_error(
                    conn,
                    link.handle,
                    LinkError::DetachForced.into(),
                    description,
                )
            }
        }
    }

    /// Sends waiting deliveries while the peer's incoming window allows.
    fn send_blocked(&mut self, conn: &mut Connection) -> Result<(), ConnError> {
        while let Some(b) = self.blocked.front() {
            let frames = frames_needed(b.msg.message.len(), conn.peer_max_frame);
            if self.remote_incoming_window < frames {
                break;
            }
            let Some(b) = self.blocked.pop_front() else {
                break;
            };
            if !matches!(self.links.get(&b.handle), Some(Link::Consumer(c)) if c.consumer == b.consumer)
            {
                continue;
            }
            let (handle, drained) = (b.handle, b.then_drained);
            self.write_delivery(conn, b)?;
            if let Some(delivery_count) = drained {
                self.send_flow(conn, Some((handle, delivery_count, None, true)))?;
            }
        }
        Ok(())
    }

    /// Writes one delivery as transfer frames of at most the peer's frame size, its
    /// payload the concatenation of `pieces`: copied into the write buffer when small,
    /// otherwise passed on as slices of the stored message, never copied (`outbuf.rs`).
    fn write_transfers(
        &mut self,
        conn: &mut Connection,
        header: &TransferHeader<'_>,
        pieces: &[Bytes],
    ) -> Result<(), ConnError> {
        let total: usize = pieces.iter().map(Bytes::len).sum();
        if total == 0 {
            encode_transfer(&mut conn.wbuf, self.local_channel, header, &[])?;
            self.count_outgoing_frame();
            return Ok(());
        }
        let room = (conn.peer_max_frame as usize)
            .saturating_sub(FRAME_HEADER_LEN + header.encoded_len())
            .max(1);
        let (mut piece, mut at, mut sent) = (0usize, 0usize, 0usize);
        while sent < total {
            let len = room.min(total - sent);
            let h = TransferHeader {
                more: sent + len < total,
                ..*header
            };
            encode_transfer_head(&mut conn.wbuf, self.local_channel, &h, len)?;
            let mut left = len;
            while left > 0 {
                let Some(p) = pieces.get(piece) else {
                    break;
                };
                let take = (p.len() - at).min(left);
                if take >= SHARED_BODY_MIN_BYTES {
                    conn.wbuf.put_shared(p.slice(at..at + take));
                } else {
                    conn.wbuf.extend_from_slice(&p[at..at + take]);
                }
                at += take;
                left -= take;
                if at == p.len() {
                    piece += 1;
                    at = 0;
                }
            }
            sent += len;
            self.count_outgoing_frame();
        }
        Ok(())
    }

    fn write_delivery(&mut self, conn: &mut Connection, b: Blocked) -> Result<(), ConnError> {
        let rewritten;
        let payload: &[Bytes] = if b.msg.delivery_count > 0 {
            let view = MessageView::parse(b.msg.message.clone()).map_err(|e| {
                ConnError::protocol(
                    AmqpError::InternalError,
                    format!("stored message unreadable: {e}"),
                )
            })?;
            rewritten = view
                .with_delivery_count(b.msg.delivery_count)
                .map_err(|e| {
                    ConnError::protocol(
                        AmqpError::InternalError,
                        format!("header rewrite failed: {e}"),
                    )
                })?;
            &rewritten
        } else {
            std::slice::from_ref(&b.msg.message)
        };
        // Its bytes go to the socket only while its queue's lease holds.
        if let Some(lease) = b.queue.delivery_lease() {
            conn.gate_on(lease);
        }
        let delivery_id = self.next_delivery_id;
        self.next_delivery_id = self.next_delivery_id.wrapping_add(1);
        let tag = b.msg.offset.to_be_bytes();
        let header = TransferHeader {
            handle: b.handle,
            delivery_id,
            delivery_tag: &tag,
            message_format: 0,
            settled: b.settled,
            more: false,
        };
        self.write_transfers(conn, &header, payload)?;
        if !b.settled {
            self.unsettled_out.insert(
                delivery_id,
                OutDelivery {
                    handle: b.handle,
                    consumer: b.consumer,
                    queue: b.queue,
                    offset: b.msg.offset,
                },
            );
        }
        Ok(())
    }

    fn count_outgoing_frame(&mut self) {
        self.next_outgoing_id = self.next_outgoing_id.wrapping_add(1);
        self.remote_incoming_window = self.remote_incoming_window.saturating_sub(1);
    }

    /// Forgets every link (session ended or connection closed): consumers are removed
    /// from their queues, which takes back what they left unsettled.
    pub fn detach_all(&mut self, conn: &mut Connection) {
        let handles: Vec<u32> = self.links.keys().copied().collect();
        for h in handles {
            self.forget_link(conn, h, false);
        }
        self.blocked.clear();
    }

    /// Removes a link and its unsettled outgoing deliveries.
    /// `closed` says the peer closed the link (not just detached it), which deletes a
    /// durable subscription.
    pub fn forget_link(&mut self, conn: &mut Connection, handle: u32, closed: bool) {
        // One `remove`, matched once: a producer must not be dropped by a consumer's
        // pattern (its coordinator's transactions and temporary target would outlive it).
        match self.links.remove(&handle) {
            Some(Link::Consumer(c)) => {
                self.unsettled_out.retain(|_, d| d.handle != handle);
                self.blocked.retain(|b| b.handle != handle);
                c.queue.remove_consumer(&conn.broker, c.consumer);
                if c.temporary {
                    conn.broker.delete_temporary_queue(c.queue.name());
                }
                if let Some(sub) = &c.subscription {
                    super::subscribe::unsubscribe(
                        &conn.broker,
                        sub,
                        closed,
                        c.queue.consumer_count(),
                    );
                }
                conn.broker
                    .stats
                    .links
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            Some(Link::Producer(p)) => {
                if p.txn_coordinator {
                    // Its transactions end with it: rolled back (txn.rs).
                    conn.txns
                        .rollback_coordinator(&conn.broker, self.local_channel, handle);
                }
                if p.temporary {
                    if let Some(target) = &p.target {
                        conn.broker.delete_temporary_queue(target.name());
                    }
                }
                conn.broker
                    .stats
                    .links
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            Some(Link::Detached) | None => {}
        }
    }
}

/// Checks a disposition's range `first..=last` (serial numbers, RFC 1982) and returns its
/// span: a `last` that precedes `first` is an `amqp:invalid-field` that ends the session.
fn check_range(first: u32, last: u32) -> Result<u32, ConnError> {
    let span = last.wrapping_sub(first);
    if span >= MAX_DISPOSITION_SPAN {
        return Err(ConnError::session(
            AmqpError::InvalidField,
            format!(
                "disposition range first={first} last={last}: last precedes first \
                 (MAX_DISPOSITION_SPAN: a range spans fewer than {MAX_DISPOSITION_SPAN} ids)"
            ),
        ));
    }
    Ok(span)
}

fn frames_needed(len: usize, max_frame: u32) -> u32 {
    let room = (max_frame as usize)
        .saturating_sub(FRAME_HEADER_LEN + 64)
        .max(1);
    len.div_ceil(room).max(1) as u32
}

/// The broker's outcome for a terminal delivery state from a consumer (also inside a
/// txn's transactional state).
pub(super) fn outcome_of(state: &DeliveryState) -> Option<Outcome> {
    match state {
        DeliveryState::Accepted(_) => Some(Outcome::Accepted),
        DeliveryState::Released(_) => Some(Outcome::Released),
        DeliveryState::Modified(m) => Some(Outcome::Modified {
            delivery_failed: m.delivery_failed.unwrap_or(false),
            undeliverable_here: m.undeliverable_here.unwrap_or(false),
        }),
        DeliveryState::Rejected(r) => Some(Outcome::Rejected {
            condition: r.error.as_ref().map_or_else(
                || "rejected".to_owned(),
                |e| super::condition_name(&e.condition),
            ),
            description: r.error.as_ref().and_then(|e| e.description.clone()),
        }),
        _ => None,
    }
}
