//! A producer's message to an address with its own store (a clustered address's Raft
//! group: `broker::store::AddressStore`, issue 12 step 4.2): validated here, proposed,
//! and queued for acceptance like any other — but its offset and stored body come from
//! the store only once it is committed, so the connection fills them in then
//! (`Connection::complete_durable`) and enqueues it after its commit, never before.
//!
//! Does not: take a message inside a transaction (its batch would need one proposal —
//! refused with `amqp:not-allowed`), or drop a malformed message from the store (it is
//! validated before it is proposed, as a committed entry cannot be taken back).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use fe2o3_amqp_types::definitions::{AmqpError, ErrorCondition};

use super::{Incoming, Session};
use crate::amqp::message::MessageView;
use crate::broker::limits::Reservation;
use crate::broker::queue::now_ms;
use crate::broker::store::{AddressStore, AddressStoreError};
use crate::broker::Address;
use crate::connection::{ConnError, Connection, PendingProduce};

impl Session {
    /// Detaches producer link `handle` with `amqp:link:detach-forced` (its address is
    /// no longer served here), unless it is gone already.
    pub(in crate::connection) fn detach_producer_forced(
        &mut self,
        conn: &mut Connection,
        handle: u32,
        description: String,
    ) -> Result<(), ConnError> {
        if !matches!(self.links.get(&handle), Some(super::Link::Producer(_))) {
            return Ok(());
        }
        let forced = fe2o3_amqp_types::definitions::LinkError::DetachForced.into();
        self.detach_with_error(conn, handle, forced, description)
    }

    /// Proposes a whole message to `store`, the store of `target`, and queues its
    /// acceptance for when it is committed; a malformed message, one in a transaction,
    /// or one the store refuses is rejected.
    pub(super) fn store_in_address(
        &mut self,
        conn: &mut Connection,
        incoming: &Incoming<'_>,
        in_txn: bool,
        target: Address,
        store: Arc<dyn AddressStore>,
        reservation: Option<Reservation>,
    ) -> Result<(), ConnError> {
        let Incoming {
            handle,
            delivery_id,
            settled,
            chunks,
        } = *incoming;
        if in_txn {
            let why = format!(
                "{}: transactions are not available on a clustered address",
                target.name()
            );
            return self.refuse_message(
                conn,
                handle,
                delivery_id,
                settled,
                AmqpError::NotAllowed.into(),
                why,
            );
        }
        let whole = contiguous(chunks);
        let parsed = match MessageView::parse(whole.clone()) {
            Ok(parsed) => parsed,
            Err(e) => {
                let why = format!("malformed message: {e}");
                return self.reject(
                    conn,
                    delivery_id,
                    settled,
                    AmqpError::DecodeError.into(),
                    why,
                );
            }
        };
        let stored_at_ms = now_ms();
        let appended = match store.append(&[&whole[..]], stored_at_ms) {
            Ok(appended) => appended,
            Err(e @ (AddressStoreError::NotLeader { .. } | AddressStoreError::Retired { .. })) => {
                // Not served here (any more): the link goes, the client resends where
                // the address is served. The transfer stays unsettled.
                let why = format!("{e}: send to the node that serves the address");
                return self.detach_producer_forced(conn, handle, why);
            }
            Err(e) => {
                tracing::warn!(address = target.name(), error = %e, "address store refused a message");
                let why = format!("message not stored: {e}");
                return self.reject(conn, delivery_id, settled, condition_of(&e), why);
            }
        };
        // Offset and body are the store's, filled in once committed.
        let msg = crate::broker::queued_view(u64::MAX, &parsed, stored_at_ms);
        let ack = match (settled, delivery_id) {
            (false, Some(id)) => Some((self.remote_channel(), id)),
            _ => None,
        };
        conn.pending.push_back(PendingProduce {
            durable: appended.durable,
            target,
            msg,
            stored_at_ms,
            read_at: conn.last_read,
            ack,
            reservation,
            committed: Some(appended.committed),
            link: Some((self.local_channel(), handle)),
        });
        Ok(())
    }
}

/// The message in one piece (one copy when it came in several frames).
pub(super) fn contiguous(chunks: &[Bytes]) -> Bytes {
    match chunks {
        [one] => one.clone(),
        _ => {
            let mut b = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            chunks.iter().for_each(|c| b.extend_from_slice(c));
            b.freeze()
        }
    }
}

/// Too busy is the client's to wait out; anything else is ours.
fn condition_of(e: &AddressStoreError) -> ErrorCondition {
    match e {
        AddressStoreError::Busy { .. } => AmqpError::ResourceLimitExceeded.into(),
        _ => AmqpError::InternalError.into(),
    }
}
