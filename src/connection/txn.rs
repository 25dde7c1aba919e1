//! Local transactions (AMQP 1.0 part 4), as qpid-jms transacted sessions and proton's
//! `Container.declare_transaction` use them: a coordinator link, `declare` and
//! `discharge`, transactional posting (a producer's transfer) and transactional
//! retirement (a consumer's outcome).
//!
//! **What a transaction holds.** A transaction belongs to its connection: its id is an
//! 8-byte counter of the connection ([`TXN_ID_BYTES`]), any link of any session of the
//! connection may work in it (so `multi-txns-per-ssn` and `multi-ssns-per-txn` hold), and
//! it lives until discharged or until the coordinator link that declared it goes away
//! (detach, session end, connection close), which rolls it back.
//! * A transactional transfer is validated, admitted by its target's plan (the
//!   reservation is kept), copied out of the read buffer and **staged in memory**: it is
//!   not in the store and no consumer sees it. The producer gets
//!   `transactional-state{txn, accepted}`, settled.
//! * A consumer's outcome in a transaction moves the delivery from the consumer to the
//!   transaction ([`crate::broker::queue::Queue::assign_to_txn`]): the message stays out
//!   of its queue, the consumer's link may close without giving it back.
//!
//! **Commit** (`discharge`, fail=false): the staged messages are appended in one batch
//! under one writer lock ([`crate::broker::store::Store::append_txn_batch`]) and so share
//! one group commit; the outcomes are settled in their queues (acceptances go to the ack
//! log). The discharge is answered `accepted` only when the batch and every outcome's
//! record are durable; the committed messages enter their queues at that moment, through
//! the connection's pending FIFO like any produced message.
//! **Rollback** (fail=true, the coordinator going away, a failed commit): staged messages
//! are dropped, and every message the transaction acquired goes back to its queue in its
//! place with delivery-count + 1, as when a consumer leaves without settling — a JMS
//! consumer sees it again with `JMSRedelivered` set, as after a rollback on Artemis, and
//! `max-delivery-attempts` rollbacks dead-letter it.
//!
//! **Crash safety.** Nothing of a transaction is in the store before its commit. Each
//! record of a commit's batch carries the batch's random id and how many records follow
//! it; recovery shows a batch only when it finds all of it, so a crash in the middle of
//! the append leaves none of it visible. A crash after the batch is durable but before
//! the discharge's answer left is the spec's in-doubt case: the commit stands. The
//! acknowledgements of a commit are separate ack-log records: a crash between them
//! redelivers the messages whose acknowledgement was not yet recorded (at least once),
//! it never loses one.
//!
//! **Bounds.** [`MAX_TRANSACTIONS_PER_CONNECTION`] open at once; per transaction
//! [`MAX_TRANSACTION_MESSAGES`] staged messages, [`MAX_TRANSACTION_OUTCOMES`] outcomes,
//! and the staged bytes charged to the budgets of incomplete deliveries
//! (`max-incomplete-bytes-per-connection`, `max-incomplete-bytes`); a transaction older
//! than [`TRANSACTION_TIMEOUT`] is rolled back at its discharge (`amqp:transaction:timeout`).
//! Work refused inside a transaction (a limit, a wrong address) is refused to its
//! sender and marks the transaction rollback-only: its commit is answered
//! `amqp:transaction:rollback` naming the reason, so a transaction is never committed
//! with part of its work missing.
//!
//! **Not supported.** Distributed and promotable transactions (a coordinator requiring
//! them is refused at attach with `amqp:not-implemented`, as is a `declare` with a
//! global id); transactional acquisition through `flow` (a txn-id in a flow's
//! properties is ignored: credit is plain credit, and only the outcome is
//! transactional); transactions on a clustered node (refused at attach: the batch's
//! atomicity is not carried through Raft yet); in-memory (anycast/multicast) addresses
//! inside a transaction (the message is rejected).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fe2o3_amqp_types::definitions::{AmqpError, Error as AmqpErrorBody, ErrorCondition, Role};
use fe2o3_amqp_types::messaging::{
    Accepted, AmqpValue, DeliveryState, Outcome as AmqpOutcome, Rejected,
};
use fe2o3_amqp_types::performatives::{Disposition, Performative};
use fe2o3_amqp_types::primitives::Binary;
use fe2o3_amqp_types::transaction::{
    Coordinator, Declare, Declared, Discharge, TransactionError, TransactionalState, TxnCapability,
};

use super::errors::{ClientError, Refusal};
use super::session::Session;
use super::{ConnError, Connection, PendingProduce};
use crate::amqp::message::{MessageView, SectionKind};
use crate::broker::intake::Charge;
use crate::broker::limits::Reservation;
use crate::broker::queue::{ConsumerId, Outcome, Queue, Recorded};
use crate::broker::{Address, Broker};
use entrepot_storage::Durable;

/// Transactions a connection may have open at once (declared, not yet discharged).
pub const MAX_TRANSACTIONS_PER_CONNECTION: usize = 64;
/// Messages one transaction may stage; a commit is one batch of the message log.
pub const MAX_TRANSACTION_MESSAGES: usize = 10_000;
/// Consumer outcomes one transaction may hold.
pub const MAX_TRANSACTION_OUTCOMES: usize = 10_000;
/// Length of the transaction ids we issue (a big-endian counter); any other length
/// names no transaction of ours.
pub const TXN_ID_BYTES: usize = 8;
/// A transaction discharged later than this after its declare is rolled back
/// (`amqp:transaction:timeout`); Artemis's default transaction timeout.
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(300);

const _: () = assert!(MAX_TRANSACTION_MESSAGES <= entrepot_storage::MAX_BATCH_RECORDS);

/// The coordinator capabilities we answer with (a transaction is the connection's).
pub const TXN_CAPABILITIES: [TxnCapability; 3] = [
    TxnCapability::LocalTransactions,
    TxnCapability::MultiTxnsPerSsn,
    TxnCapability::MultiSsnsPerTxn,
];

/// Why a coordinator attach is refused: a capability it asks for that we lack.
pub fn txn_capability_refused(coordinator: &Coordinator) -> Option<String> {
    let asked = coordinator.capabilities.as_ref()?;
    let missing: Vec<String> = asked
        .0
        .iter()
        .filter(|c| !TXN_CAPABILITIES.contains(c))
        .map(|c| fe2o3_amqp_types::primitives::Symbol::from(c).0)
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "the coordinator supports amqp:local-transactions (with multi-txns-per-ssn and \
             multi-ssns-per-txn) only, not {}",
            missing.join(", ")
        )
    })
}

/// A message staged by a transaction: not stored, not visible.
struct Staged {
    target: Address,
    message: Bytes,
    /// Room held in the target under its plan until commit or rollback.
    reservation: Option<Reservation>,
}

/// A consumer's outcome given in a transaction: the message belongs to the transaction.
struct TxnOutcome {
    queue: Arc<Queue>,
    consumer: ConsumerId,
    offset: u64,
    outcome: Outcome,
    /// The consumer left the delivery unsettled (receiver-settle-mode `second`): our
    /// channel, its delivery id and the state it sent, settled back once the commit is
    /// durable.
    settle_back: Option<SettleBack>,
}

/// A delivery settled back to its consumer when its transaction's commit is durable.
struct SettleBack {
    channel: u16,
    delivery_id: u32,
    state: DeliveryState,
}

struct Txn {
    /// `(our channel, handle)` of the coordinator link that declared it.
    coordinator: (u16, u32),
    /// The owner of the messages it acquired, in their queues.
    owner: ConsumerId,
    staged: Vec<Staged>,
    /// The staged bytes, charged to the budgets of incomplete deliveries.
    charge: Charge,
    outcomes: Vec<TxnOutcome>,
    /// Why its commit must fail (work refused inside it).
    rollback_only: Option<String>,
    declared_at: Instant,
}

/// A commit waiting for durability before its discharge is answered.
struct Discharging {
    channel: u16,
    /// `None`: the discharge came pre-settled, nothing to answer.
    delivery_id: Option<u32>,
    durable: Vec<Durable>,
    recorded: Vec<Recorded>,
    /// Set when part of the commit was refused (see [`Transactions::commit`]).
    refused: Option<Refusal>,
    /// The committed outcomes whose deliveries the consumers await our settlement of.
    settle_back: Vec<SettleBack>,
}

/// A connection's transactions (see the module docs).
#[derive(Default)]
pub(super) struct Transactions {
    last_id: u64,
    open: HashMap<u64, Txn>,
    discharging: VecDeque<Discharging>,
}

/// Our transaction id for `id`, or `None` when it cannot be one of ours.
fn txn_number(id: &Binary) -> Option<u64> {
    let bytes: [u8; TXN_ID_BYTES] = id.as_slice().try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// `amqp:transaction:unknown-id`'s description: the id in hex when it has our length,
/// else only its length (a peer's id may be as long as a frame; it is not echoed).
fn unknown_txn(id: &Binary) -> String {
    match txn_number(id) {
        Some(n) => format!("no open transaction {n:016x} on this connection"),
        None => format!(
            "no transaction has a {}-byte id here (ours are TXN_ID_BYTES = {TXN_ID_BYTES})",
            id.len()
        ),
    }
}

fn txn_binary(n: u64) -> Binary {
    Binary::from(n.to_be_bytes().to_vec())
}

/// The txn-id of a transfer's transactional state, if it has one.
pub(super) fn txn_of_transfer(state: Option<&DeliveryState>) -> Option<Binary> {
    match state {
        Some(DeliveryState::TransactionalState(ts)) => Some(ts.txn_id.clone()),
        _ => None,
    }
}

/// A control message on the coordinator link.
enum Control {
    Declare(Declare),
    Discharge(Discharge),
}

fn parse_control(chunks: &[Bytes]) -> Result<Control, String> {
    let whole = match chunks {
        [one] => one.clone(),
        many => Bytes::from(many.concat()),
    };
    let view = MessageView::parse(whole).map_err(|e| format!("malformed message: {e}"))?;
    let section = view
        .section(SectionKind::AmqpValue)
        .ok_or("a coordinator message is an amqp-value holding declare or discharge")?;
    crate::amqp::encoding::check_nesting(&section, 0).map_err(|e| e.to_string())?;
    if let Ok(AmqpValue(d)) = serde_amqp::from_slice::<AmqpValue<Declare>>(&section) {
        return Ok(Control::Declare(d));
    }
    serde_amqp::from_slice::<AmqpValue<Discharge>>(&section)
        .map(|AmqpValue(d)| Control::Discharge(d))
        .map_err(|_| "the amqp-value is neither declare nor discharge".to_owned())
}

fn rejected(condition: impl Into<ErrorCondition>, description: String) -> DeliveryState {
    DeliveryState::Rejected(Rejected {
        error: Some(AmqpErrorBody::new(condition.into(), description, None)),
    })
}

/// Settles an incoming delivery (we are its receiver) with `state`.
fn answer(
    conn: &mut Connection,
    channel: u16,
    delivery_id: Option<u32>,
    state: DeliveryState,
) -> Result<(), ConnError> {
    let Some(id) = delivery_id else {
        return Ok(());
    };
    let d = Disposition {
        role: Role::Receiver,
        first: id,
        last: None,
        settled: true,
        state: Some(state),
        batchable: false,
    };
    conn.send(channel, &Performative::Disposition(d), &[])
}

impl Transactions {
    /// Opens a transaction for the coordinator link `(channel, handle)`; `charge` will
    /// hold its staged bytes.
    fn declare(&mut self, coordinator: (u16, u32), charge: Charge) -> Result<u64, Refusal> {
        if self.open.len() >= MAX_TRANSACTIONS_PER_CONNECTION {
            let d = format!(
                "{} transactions are open on this connection: \
                 MAX_TRANSACTIONS_PER_CONNECTION ({MAX_TRANSACTIONS_PER_CONNECTION})",
                self.open.len()
            );
            return Err((AmqpError::ResourceLimitExceeded.into(), d));
        }
        self.last_id += 1;
        self.open.insert(
            self.last_id,
            Txn {
                coordinator,
                owner: ConsumerId::next(),
                staged: Vec::new(),
                charge,
                outcomes: Vec::new(),
                rollback_only: None,
                declared_at: Instant::now(),
            },
        );
        Ok(self.last_id)
    }

    /// Work of transaction `txn_id` (if any) was refused: it can no longer commit.
    pub(super) fn refused_in_txn(&mut self, txn_id: Option<&Binary>, why: &str) {
        if let Some(txn) = txn_id
            .and_then(txn_number)
            .and_then(|n| self.open.get_mut(&n))
        {
            txn.rollback_only.get_or_insert_with(|| why.to_owned());
        }
    }

    /// Rolls back every transaction declared on the coordinator link `(channel, handle)`.
    pub(super) fn rollback_coordinator(&mut self, broker: &Broker, channel: u16, handle: u32) {
        let ids: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, t)| t.coordinator == (channel, handle))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(txn) = self.open.remove(&id) {
                tracing::debug!(txn = id, "coordinator gone: rolling back");
                rollback(broker, txn);
            }
        }
    }

    /// Rolls back every open transaction (the connection is going away); commits already
    /// under way complete (their messages are in the pending FIFO, handed over).
    pub(super) fn rollback_all(&mut self, broker: &Broker) {
        for (_, txn) in self.open.drain() {
            rollback(broker, txn);
        }
        self.discharging.clear();
    }

    /// Completes when the oldest commit's records are all durable or one has failed.
    pub(super) fn discharge_wait(&self) -> Option<impl std::future::Future<Output = ()>> {
        let front = self.discharging.front()?;
        let durable = front.durable.clone();
        let recorded = front.recorded.clone();
        Some(async move {
            for d in durable {
                let _ = d.wait().await;
            }
            for r in recorded {
                r.wait().await;
            }
        })
    }
}

/// Undoes a transaction: staged messages (with their plan reservations and budget
/// charges) are dropped, acquired messages go back to their queues with delivery-count
/// + 1 (given back as if their transaction were a consumer that left).
fn rollback(broker: &Broker, txn: Txn) {
    give_back(broker, txn.owner, &txn.outcomes);
}

/// Gives the messages `owner` (a transaction) acquired back to their queues.
fn give_back(broker: &Broker, owner: ConsumerId, outcomes: &[TxnOutcome]) {
    let mut queues: Vec<&Arc<Queue>> = Vec::new();
    for o in outcomes {
        if !queues.iter().any(|q| Arc::ptr_eq(q, &o.queue)) {
            queues.push(&o.queue);
        }
    }
    for q in queues {
        q.remove_consumer(broker, owner);
    }
}

impl Connection {
    /// Answers the commits whose records are durable, in order.
    pub(super) fn complete_txn_discharges(&mut self) -> Result<(), ConnError> {
        while let Some(front) = self.txns.discharging.front() {
            let failed = front.durable.iter().any(Durable::has_failed)
                || front.recorded.iter().any(Recorded::has_failed);
            let done = front.durable.iter().all(Durable::is_durable)
                && front.recorded.iter().all(Recorded::is_done);
            if !failed && !done {
                break;
            }
            let Some(d) = self.txns.discharging.pop_front() else {
                break;
            };
            let state = match (failed, d.refused) {
                (true, _) => rejected(
                    AmqpError::InternalError,
                    "the commit's records could not be made durable".into(),
                ),
                (false, Some((condition, description))) => rejected(condition, description),
                (false, None) => DeliveryState::Accepted(Accepted {}),
            };
            if !failed {
                // The acknowledgements are durable: the consumers that wait for our
                // settlement (mode `second`) get it now, with the state they sent.
                for b in d.settle_back {
                    if self.sessions.contains_key(&b.channel) {
                        Session::send_settled(self, b.channel, b.delivery_id, Some(b.state))?;
                    }
                }
            }
            if self
                .sessions
                .values()
                .any(|s| s.local_channel() == d.channel)
            {
                answer(self, d.channel, d.delivery_id, state)?;
            }
        }
        Ok(())
    }
}

impl Session {
    /// A message on a coordinator link: `declare` or `discharge`.
    pub(super) fn on_txn_control(
        &mut self,
        conn: &mut Connection,
        handle: u32,
        delivery_id: Option<u32>,
        chunks: &[Bytes],
    ) -> Result<(), ConnError> {
        let channel = self.local_channel();
        let state = match parse_control(chunks) {
            Err(d) => rejected(AmqpError::DecodeError, d),
            Ok(Control::Declare(d)) if d.global_id.is_some() => rejected(
                AmqpError::NotImplemented,
                "distributed transactions (declare with a global-id) are not supported".into(),
            ),
            Ok(Control::Declare(_)) => {
                let charge = Charge::new(Arc::clone(&conn.broker.intake), Arc::clone(&conn.intake));
                match conn.txns.declare((channel, handle), charge) {
                    Ok(id) => {
                        tracing::debug!(txn = id, "declared");
                        DeliveryState::Declared(Declared {
                            txn_id: txn_binary(id),
                        })
                    }
                    Err((c, d)) => rejected(c, d),
                }
            }
            Ok(Control::Discharge(d)) => {
                match self.discharge(conn, delivery_id, &d.txn_id, d.fail.unwrap_or(false)) {
                    Some(state) => state,
                    // A commit: answered once durable (complete_txn_discharges).
                    None => return Ok(()),
                }
            }
        };
        answer(conn, channel, delivery_id, state)
    }

    /// Discharges a transaction: the answer now (unknown id, rollback, a commit that
    /// cannot be made), or `None` for a commit under way.
    fn discharge(
        &mut self,
        conn: &mut Connection,
        delivery_id: Option<u32>,
        txn_id: &Binary,
        fail: bool,
    ) -> Option<DeliveryState> {
        let Some(txn) = txn_number(txn_id).and_then(|n| conn.txns.open.remove(&n)) else {
            let d = unknown_txn(txn_id);
            return Some(rejected(TransactionError::UnknownId, d));
        };
        let age = txn.declared_at.elapsed();
        let refusal = match (&txn.rollback_only, fail) {
            (_, true) => None,
            _ if age > TRANSACTION_TIMEOUT => Some((
                TransactionError::Timeout,
                format!(
                    "transaction open for {} s, longer than TRANSACTION_TIMEOUT ({} s): rolled back",
                    age.as_secs(),
                    TRANSACTION_TIMEOUT.as_secs()
                ),
            )),
            (Some(why), false) => Some((
                TransactionError::Rollback,
                format!("rolled back: {why}"),
            )),
            (None, false) => return self.commit(conn, delivery_id, txn),
        };
        rollback(&conn.broker, txn);
        Some(match refusal {
            None => DeliveryState::Accepted(Accepted {}),
            Some((c, d)) => rejected(c, d),
        })
    }

    /// Commits: the staged messages as one batch, then the outcomes. `Some` answer when
    /// the commit fails before anything of it is applied (rolled back).
    fn commit(
        &mut self,
        conn: &mut Connection,
        delivery_id: Option<u32>,
        txn: Txn,
    ) -> Option<DeliveryState> {
        let Txn {
            staged,
            outcomes,
            owner,
            charge,
            ..
        } = txn;
        let mut durable = Vec::new();
        if !staged.is_empty() {
            let batch: Vec<(&str, &Bytes)> = staged
                .iter()
                .map(|s| (s.target.name(), &s.message))
                .collect();
            let stored = match conn.broker.store().append_txn_batch(&batch) {
                Ok(stored) => stored,
                Err(e) => {
                    tracing::warn!(error = %e, "transaction commit not stored: rolled back");
                    give_back(&conn.broker, owner, &outcomes);
                    let d = format!("rolled back: the commit's messages were not stored: {e}");
                    return Some(rejected(TransactionError::Rollback, d));
                }
            };
            let (batch_durable, records) = stored;
            durable.push(batch_durable.clone());
            for (s, stored) in staged.into_iter().zip(records) {
                let (offset, ts) = (stored.offset, stored.timestamp_ms);
                let Ok(parsed) = MessageView::parse(stored.message) else {
                    // Validated when staged, the same bytes: cannot happen.
                    tracing::error!(offset, "a committed message no longer parses");
                    continue;
                };
                conn.pending.push_back(PendingProduce {
                    link: None,
                    durable: batch_durable.clone(),
                    target: s.target,
                    msg: crate::broker::queued_view(offset, &parsed, ts),
                    stored_at_ms: ts,
                    read_at: conn.last_read,
                    ack: None,
                    reservation: s.reservation,
                    committed: None,
                });
            }
        }
        // The staged bytes are in the log now: the budget has them back.
        drop(charge);
        let (recorded, refused, settle_back) = settle_outcomes(&conn.broker, outcomes);
        conn.txns.discharging.push_back(Discharging {
            channel: self.local_channel(),
            delivery_id,
            durable,
            recorded,
            refused,
            settle_back,
        });
        None
    }

    /// A transactional transfer on a producer link: staged in its transaction (see the
    /// module docs) and answered `transactional-state{txn, accepted}`; refused work marks
    /// the transaction rollback-only.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn stage_txn_message(
        &mut self,
        conn: &mut Connection,
        handle: u32,
        txn_id: &Binary,
        delivery_id: Option<u32>,
        settled: bool,
        target: Address,
        reservation: Option<Reservation>,
        chunks: &[Bytes],
    ) -> Result<(), ConnError> {
        let message = Bytes::from(chunks.concat());
        let txn = txn_number(txn_id).and_then(|n| conn.txns.open.get_mut(&n));
        let refusal: Option<Refusal> = match txn {
            None => Some((TransactionError::UnknownId.into(), unknown_txn(txn_id))),
            Some(txn) => {
                let refused = stage_refusal(txn, &target, &message);
                match refused {
                    Some((c, d)) => {
                        txn.rollback_only.get_or_insert_with(|| d.clone());
                        Some((c, d))
                    }
                    None => {
                        txn.staged.push(Staged {
                            target,
                            message,
                            reservation,
                        });
                        None
                    }
                }
            }
        };
        let channel = self.local_channel();
        match (refusal, settled) {
            (None, _) => {
                let state = DeliveryState::TransactionalState(TransactionalState {
                    txn_id: txn_id.clone(),
                    outcome: Some(AmqpOutcome::Accepted(Accepted {})),
                });
                answer(conn, channel, delivery_id.filter(|_| !settled), state)
            }
            (Some((c, d)), false) if delivery_id.is_some() => {
                answer(conn, channel, delivery_id, rejected(c, d))
            }
            // Pre-settled: no outcome can carry the refusal, so the link is detached.
            (Some((c, d)), _) => self.detach_with_error(conn, handle, c, d),
        }
    }

    /// A consumer's disposition whose state is transactional: the outcome joins the
    /// transaction (applied at commit); an unknown transaction detaches the links of the
    /// deliveries named (they stay unsettled, and come back to their queues).
    pub(super) fn on_txn_disposition(
        &mut self,
        conn: &mut Connection,
        ids: Vec<u32>,
        ts: &TransactionalState,
        settled: bool,
    ) -> Result<(), ConnError> {
        let Some(outcome) = ts.outcome.clone().map(DeliveryState::from) else {
            return Ok(()); // no outcome yet: nothing to retire
        };
        let Some(outcome) = super::session::outcome_of(&outcome) else {
            return Ok(());
        };
        let Some(txn) = txn_number(&ts.txn_id).and_then(|n| conn.txns.open.get_mut(&n)) else {
            let handles: Vec<u32> = ids
                .iter()
                .filter_map(|id| self.unsettled_out.get(id).map(|d| d.handle))
                .collect();
            for handle in handles {
                if matches!(
                    self.links.get(&handle),
                    Some(super::link::Link::Consumer(_))
                ) {
                    let d = unknown_txn(&ts.txn_id);
                    self.detach_with_error(conn, handle, TransactionError::UnknownId.into(), d)?;
                }
            }
            return Ok(());
        };
        for id in ids {
            if !self.unsettled_out.contains_key(&id) {
                continue;
            }
            if txn.outcomes.len() >= MAX_TRANSACTION_OUTCOMES {
                // The delivery stays the consumer's; the transaction cannot commit.
                txn.rollback_only.get_or_insert_with(|| {
                    format!(
                        "more than MAX_TRANSACTION_OUTCOMES ({MAX_TRANSACTION_OUTCOMES}) outcomes"
                    )
                });
                break;
            }
            let Some(out) = self.unsettled_out.remove(&id) else {
                continue;
            };
            if out
                .queue
                .assign_to_txn(&conn.broker, out.consumer, out.offset, txn.owner)
            {
                txn.outcomes.push(TxnOutcome {
                    queue: out.queue,
                    consumer: out.consumer,
                    offset: out.offset,
                    outcome: outcome.clone(),
                    settle_back: (!settled).then(|| SettleBack {
                        channel: self.local_channel(),
                        delivery_id: id,
                        state: DeliveryState::TransactionalState(ts.clone()),
                    }),
                });
            }
        }
        Ok(())
    }
}

/// Why a message cannot join `txn` (its limits; in-memory targets), or `None`.
fn stage_refusal(txn: &mut Txn, target: &Address, message: &Bytes) -> Option<Refusal> {
    if matches!(target, Address::Memory(_)) {
        let d = format!(
            "address {:?} is in memory (anycast/multicast): it cannot take part in a transaction",
            target.name()
        );
        return Some((AmqpError::NotImplemented.into(), d));
    }
    if txn.staged.len() >= MAX_TRANSACTION_MESSAGES {
        let d = format!(
            "the transaction holds MAX_TRANSACTION_MESSAGES ({MAX_TRANSACTION_MESSAGES}) messages"
        );
        return Some((AmqpError::ResourceLimitExceeded.into(), d));
    }
    if let Err(e) = txn.charge.grow(message.len()) {
        let d = format!("the transaction's staged messages: {e}");
        return Some((e.condition(), d));
    }
    if let Err(e) = MessageView::parse(message.clone()) {
        return Some((
            AmqpError::DecodeError.into(),
            format!("malformed message: {e}"),
        ));
    }
    None
}

/// What a commit's outcomes became: the records to wait for, the refusal when the store
/// refused an acknowledgement (the disk is full: those messages are back in their queues
/// and the discharge says so), and the deliveries to settle back once it is durable.
type Settled = (Vec<Recorded>, Option<Refusal>, Vec<SettleBack>);

/// Applies a committed transaction's outcomes in their queues (see [`Settled`]).
fn settle_outcomes(broker: &Broker, outcomes: Vec<TxnOutcome>) -> Settled {
    let mut recorded = Vec::new();
    let mut refused = Vec::new();
    let mut settle_back = Vec::new();
    for o in outcomes {
        match o.queue.settle(broker, o.consumer, o.offset, o.outcome) {
            Ok(r) => {
                recorded.extend(r);
                settle_back.extend(o.settle_back);
            }
            Err(e) => refused.push(e),
        }
    }
    let refusal = refused.first().map(|e| {
        let d = format!(
            "committed except {} acknowledgement(s), refused ({e}); those messages will be \
             delivered again",
            refused.len()
        );
        (e.condition(), d)
    });
    (recorded, refusal, settle_back)
}
