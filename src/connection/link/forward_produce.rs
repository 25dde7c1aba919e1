//! A producer link whose address another node leads, carried there
//! ([`Route::Forward`](crate::broker::routing::Route), `link-routing: forward`): the link is
//! attached here like any producer link, each whole message is validated here and handed
//! to the link's [`ForwardedProducer`], and its `accepted` waits in the connection's
//! `pending_forwards` until the leader confirmed it (`Connection::complete_forwards`).
//!
//! Invariants: `accepted` only from the leader's confirmation (the handle's completion),
//! in the link's order; when the carrier gives up, the link is detached
//! `amqp:link:detach-forced` naming why, and its messages not accepted stay unsettled
//! for the client to send again (after attaching again, routed anew).
//!
//! Does not: store anything on this node, take a message in a transaction (refused, as
//! for a local clustered address), or apply a plan's limits (the address is the leader's).

use fe2o3_amqp_types::definitions::{AmqpError, LinkError, ReceiverSettleMode};
use fe2o3_amqp_types::performatives::Attach;
use std::sync::Arc;
use std::time::Instant;

use super::{mirror, Incoming, Link, ProducerLink, Session};
use crate::amqp::message::MessageView;
use crate::broker::forwarding::{ForwardRefused, RemoteAddress};
use crate::broker::queue::{now_ms, Outbound};
use crate::connection::{ConnError, Connection};
use entrepot_storage::Durable;

/// A forwarded message waiting for its leader's confirmation.
pub(in crate::connection) struct PendingForward {
    pub durable: Durable,
    /// `(channel, delivery id)` to accept once confirmed; `None` if pre-settled.
    pub ack: Option<(u16, u32)>,
    /// The producer link (channel, handle), detached if the carrier gives up.
    pub link: (u16, u32),
    /// When the read that brought its transfer returned.
    pub read_at: Instant,
}

impl Session {
    /// Attaches a producer link to an address `remote` leads: answered like a local one,
    /// its messages carried there.
    pub(in crate::connection) fn attach_forwarded_producer(
        &mut self,
        conn: &mut Connection,
        attach: Attach,
        remote: Arc<dyn RemoteAddress>,
    ) -> Result<(), ConnError> {
        let handle = attach.handle.0;
        let producer = match remote.open_producer() {
            Ok(p) => p,
            Err(why) => {
                let d = format!(
                    "cannot forward to its leader ({}): {why}; attach again",
                    remote.leader()
                );
                return self.refuse(conn, attach, (LinkError::DetachForced.into(), d));
            }
        };
        tracing::debug!(link = %attach.name, leader = %remote.leader(), "producer link forwarded");
        // Told even when nothing is in flight: the link goes when its carrier does.
        let (tx, channel) = (conn.outbound_tx.clone(), self.remote_channel());
        producer.on_failure(move || {
            let _ = tx.send(Outbound::ForwardEnded { channel, handle });
        });
        let reply = Attach {
            rcv_settle_mode: ReceiverSettleMode::First,
            max_message_size: Some(conn.broker.config().max_message_bytes),
            ..mirror(&attach)
        };
        let link = ProducerLink {
            forward: Some(Box::new(producer)),
            ..ProducerLink::without_target(conn, &attach)
        };
        self.open_producer(conn, reply, link)
    }

    /// The carrier of producer link `handle` gave up: the link is detached with its
    /// reason (unless the handle now names another link, whose carrier did not).
    pub(in crate::connection) fn on_forward_ended(
        &mut self,
        conn: &mut Connection,
        handle: u32,
    ) -> Result<(), ConnError> {
        let why = match self.links.get(&handle) {
            Some(Link::Producer(ProducerLink {
                forward: Some(f), ..
            })) => f.failure(),
            _ => None,
        };
        match why {
            Some(why) => self.detach_producer_forced(conn, handle, format!("{why}; attach again")),
            None => Ok(()),
        }
    }

    /// A whole message on a forwarded link: validated, handed to the carrier, its
    /// acceptance queued for the leader's confirmation.
    pub(super) fn forward_message(
        &mut self,
        conn: &mut Connection,
        incoming: &Incoming<'_>,
        in_txn: bool,
    ) -> Result<(), ConnError> {
        let Incoming {
            handle,
            delivery_id,
            settled,
            chunks,
        } = *incoming;
        self.top_up_credit(conn, handle)?;
        if in_txn {
            let why = "transactions are not available on a clustered address".to_owned();
            let condition = AmqpError::NotAllowed.into();
            return self.refuse_message(conn, handle, delivery_id, settled, condition, why);
        }
        let whole = super::address_produce::contiguous(chunks);
        if let Err(e) = MessageView::parse(whole.clone()) {
            let why = format!("malformed message: {e}");
            return self.reject(
                conn,
                delivery_id,
                settled,
                AmqpError::DecodeError.into(),
                why,
            );
        }
        let sent = match self.links.get_mut(&handle) {
            Some(Link::Producer(ProducerLink {
                forward: Some(f), ..
            })) => f.send(whole, now_ms()),
            _ => return Ok(()),
        };
        match sent {
            Ok(durable) => {
                let channel = self.remote_channel();
                conn.pending_forwards.push_back(PendingForward {
                    durable,
                    ack: (!settled)
                        .then_some(delivery_id)
                        .flatten()
                        .map(|id| (channel, id)),
                    link: (channel, handle),
                    read_at: conn.last_read,
                });
                Ok(())
            }
            Err(ForwardRefused::Failed(why)) => {
                self.detach_producer_forced(conn, handle, format!("{why}; attach again"))
            }
            Err(e) => {
                let condition = AmqpError::ResourceLimitExceeded.into();
                self.refuse_message(conn, handle, delivery_id, settled, condition, e.to_string())
            }
        }
    }
}

impl Connection {
    /// Accepts the forwarded messages their leader confirmed, in order; detaches the
    /// link of one its carrier gave up on (once: later ones of that link find it gone).
    pub(in crate::connection) fn complete_forwards(&mut self) -> Result<(), ConnError> {
        let mut accepted: Vec<(u16, u32)> = Vec::new();
        while let Some(front) = self.pending_forwards.front() {
            if front.durable.has_failed() {
                if let Some(p) = self.pending_forwards.pop_front() {
                    self.detach_forwarded(p.link)?;
                }
                continue;
            }
            if !front.durable.is_durable() {
                break;
            }
            let Some(p) = self.pending_forwards.pop_front() else {
                break;
            };
            if let Some(ack) = p.ack {
                accepted.push(ack);
                self.broker.stats.produce_accept.record(p.read_at.elapsed());
            }
        }
        for (channel, id) in accepted {
            if let Some(mut session) = self.sessions.remove(&channel) {
                let result = session.send_accepted(self, id, id);
                self.sessions.insert(channel, session);
                result?;
            }
        }
        Ok(())
    }

    fn detach_forwarded(&mut self, (channel, handle): (u16, u32)) -> Result<(), ConnError> {
        let Some(mut session) = self.sessions.remove(&channel) else {
            return Ok(());
        };
        let why = match session.links.get(&handle) {
            Some(Link::Producer(ProducerLink {
                forward: Some(f), ..
            })) => f.failure(),
            _ => None,
        };
        let why = why.unwrap_or_else(|| "its leader did not store the messages".to_owned());
        let description = format!(
            "{why}; messages not yet accepted were not stored (or their outcome is unknown): \
             attach again and send them again"
        );
        let result = session.detach_producer_forced(self, handle, description);
        self.sessions.insert(channel, session);
        result
    }
}
