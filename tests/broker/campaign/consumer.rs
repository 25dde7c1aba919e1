//! The campaign's consumers: raw AMQP receivers in receiver-settle-mode `second`, so a
//! delivery counts as consumed only once the broker settled our outcome back — it has
//! then made the acknowledgement durable, and the message must never come again.
//!
//! One loop serves every style: steady (the background consumers), accepting (the
//! elasticity test's: steady without rejections, on a node of its choosing), slow (sleeps before
//! each outcome, little credit), vanishing (takes some deliveries, sends outcomes for a
//! few without waiting, and resets the socket) and draining (the final phase: accepts
//! everything until the queue is quiet). Every wait is bounded; a dead broker ends the
//! loop with an error and the caller decides whether to reconnect.

use std::collections::HashMap;
use std::time::Duration;

use fe2o3_amqp::types::definitions::{ReceiverSettleMode, Role};
use fe2o3_amqp::types::messaging::{Accepted, DeliveryState, Rejected};
use fe2o3_amqp::types::performatives::{Disposition, Performative, Transfer};
use tokio::time::{timeout, Instant};

use super::ledger::Disposal;
use super::wire::{self, Wire};
use super::{Ctx, Dial, Left, Progress, DLQ, QUEUE};

/// The session incoming window we announce (and reopen with every flow).
const WINDOW: u32 = 4096;
/// How often a waiting consumer looks at the stop, pause and epoch flags.
const TICK: Duration = Duration::from_millis(100);
/// How long a stopping consumer waits for the settlements of outcomes it already sent.
const SETTLE_GRACE: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug)]
pub enum Style {
    /// Accepts everything, rejects one message in 97 (by sequence number) on the queue.
    Steady,
    /// Accepts everything until the campaign stops (nothing goes to the DLQ).
    Accepting,
    /// Sleeps `delay` before each outcome; stops after `lifetime`.
    Slow { delay: Duration, lifetime: Duration },
    /// After `after` deliveries (or `lifetime`), accepts every other one without waiting
    /// and resets the socket.
    Vanish { after: usize, lifetime: Duration },
    /// Accepts everything; stops after `quiet` without a delivery or a pending settlement.
    Drain { quiet: Duration },
}

pub struct Plan {
    pub address: &'static str,
    pub credit: u32,
    pub style: Style,
}

/// Why a consumer stopped without an error.
#[derive(Debug)]
pub enum End {
    Stopped,
    Vanished,
    Quiet,
    Lifetime,
}

/// One delivery taken and not yet settled back by the broker.
struct Unsettled {
    seq: Option<u64>,
    sent: Option<Disposal>,
}

struct Link {
    wire: Wire,
    dlq: bool,
    /// The broker's next-outgoing-id plus the transfer frames we received.
    next_incoming_id: u32,
    delivery_count: u32,
    credit: u32,
    unsettled: HashMap<u32, Unsettled>,
    /// The delivery being assembled from multi-frame transfers: (id, bytes so far).
    partial: Option<(u32, Vec<u8>)>,
}

/// Runs one consumer connection against the broker of `epoch`.
pub async fn run(ctx: &Ctx, epoch: u32, plan: &Plan, name: &str) -> Result<End, Left> {
    let live = || ctx.epoch() == epoch;
    run_at(
        ctx,
        ctx.addr().into(),
        &live,
        plan,
        name,
        &super::no_progress(),
    )
    .await
}

/// Runs one consumer connection against the broker at `dial.addr` until its style ends
/// it, `live()` turns false (an error), the connection fails or the broker stays silent
/// past `dial.idle_time_out`; a redirected attach is [`Left::Redirected`]. `progress` is
/// called on every whole delivery and every settlement the broker sends back.
pub async fn run_at(
    ctx: &Ctx,
    dial: Dial,
    live: &(dyn Fn() -> bool + Sync),
    plan: &Plan,
    name: &str,
    progress: &Progress,
) -> Result<End, Left> {
    let mut link = timeout(super::OP_TIMEOUT, open(dial, name, plan))
        .await
        .map_err(|_| format!("{name}: attach timed out"))??;
    let started = Instant::now();
    let mut last_activity = Instant::now();
    let mut taken = 0usize;
    loop {
        if !live() {
            return Err(format!("{name}: the broker restarted").into());
        }
        let stopping = ctx.stopping() && !matches!(plan.style, Style::Drain { .. });
        match plan.style {
            _ if stopping => return Ok(link.finish(ctx).await),
            Style::Slow { lifetime, .. } if started.elapsed() > lifetime => {
                link.finish(ctx).await;
                return Ok(End::Lifetime);
            }
            Style::Vanish { after, lifetime } if taken >= after || started.elapsed() > lifetime => {
                link.vanish(ctx).await;
                return Ok(End::Vanished);
            }
            Style::Drain { quiet }
                if link.unsettled.is_empty() && last_activity.elapsed() > quiet =>
            {
                link.wire.close(Duration::from_secs(1)).await;
                return Ok(End::Quiet);
            }
            _ => {}
        }
        if !ctx.paused() && link.credit <= plan.credit / 2 {
            link.top_up(plan.credit)
                .await
                .map_err(|e| format!("{name}: flow: {e}"))?;
        }
        let frame = match timeout(TICK, link.wire.next_frame()).await {
            Err(_) => match dial.idle_time_out {
                Some(idle) if link.wire.silent_for() > idle => {
                    return Err(format!("{name}: the broker was silent for {idle:?}").into());
                }
                _ => continue,
            },
            Ok(Err(e)) => return Err(format!("{name}: {e}").into()),
            Ok(Ok(f)) => f,
        };
        last_activity = Instant::now();
        match frame.performative {
            Performative::Transfer(t) => {
                let Some((id, seq)) = link
                    .on_transfer(ctx, &t, &frame.payload)
                    .map_err(|e| Left::Failed(format!("{name}: {e}")))?
                else {
                    continue;
                };
                progress();
                if let Some(seq) = seq {
                    ctx.ledger()
                        .note(seq, format!("taken by {name} as delivery {id}"));
                }
                taken += 1;
                let disposal = match (plan.style, seq) {
                    (Style::Vanish { .. }, _) => continue,
                    (Style::Steady, Some(seq)) if !link.dlq && seq % 97 == 13 => Disposal::Rejected,
                    _ => Disposal::Accepted,
                };
                if let Style::Slow { delay, .. } = plan.style {
                    tokio::time::sleep(delay).await;
                }
                link.dispose(ctx, id, disposal)
                    .await
                    .map_err(|e| Left::Failed(format!("{name}: disposition: {e}")))?;
            }
            Performative::Disposition(d) if d.role == Role::Sender => {
                link.on_settled(ctx, &d);
                progress();
            }
            Performative::Detach(d) => {
                return Err(format!("{name}: detached: {:?}", d.error).into())
            }
            Performative::End(e) => {
                return Err(format!("{name}: session ended: {:?}", e.error).into())
            }
            Performative::Close(c) => return Err(format!("{name}: closed: {:?}", c.error).into()),
            _ => {}
        }
    }
}

/// Connects, begins and attaches; a refused attach whose detach redirects is
/// [`Left::Redirected`].
async fn open(dial: Dial, name: &str, plan: &Plan) -> Result<Link, Left> {
    let failed = |e: std::io::Error| Left::Failed(format!("{name}: attach: {e}"));
    // Half our idle-time-out is announced (as fe2o3 does): the broker's heartbeats then
    // come at least twice within the time we allow it.
    let idle = dial.idle_time_out.map(|t| (t.as_millis() / 2) as u32);
    let wire = timeout(
        dial.open_timeout(),
        Wire::connect_with(dial.addr, name, idle),
    )
    .await
    .map_err(|_| Left::Failed(format!("{name}: open timed out")))?;
    let mut wire = wire.map_err(failed)?;
    let begin = wire.begin(0, WINDOW).await.map_err(failed)?;
    let attach = wire::attach(
        0,
        name,
        Role::Receiver,
        plan.address,
        ReceiverSettleMode::Second,
    );
    wire.send(0, &Performative::Attach(attach), &[])
        .await
        .map_err(failed)?;
    let answer = wire
        .expect(|_, p| match p {
            Performative::Attach(a) => Some(a),
            _ => None,
        })
        .await
        .map_err(failed)?;
    if answer.source.is_none() {
        // A refusal: the detach that follows says why (and where to go).
        let detach = wire
            .expect(|_, p| match p {
                Performative::Detach(d) => Some(d),
                _ => None,
            })
            .await
            .map_err(failed)?;
        wire.close(Duration::from_millis(200)).await;
        return Err(match detach.error {
            Some(e) => Left::from_refusal(name, &e),
            None => Left::Failed(format!("{name}: attach refused without an error")),
        });
    }
    if answer.rcv_settle_mode != ReceiverSettleMode::Second {
        return Err(Left::Failed(format!(
            "{name}: attach not in settle mode second: {answer:?}"
        )));
    }
    Ok(Link {
        wire,
        dlq: plan.address == DLQ,
        next_incoming_id: begin.next_outgoing_id,
        delivery_count: answer.initial_delivery_count.unwrap_or(0),
        credit: 0,
        unsettled: HashMap::new(),
        partial: None,
    })
}

impl Link {
    async fn top_up(&mut self, credit: u32) -> std::io::Result<()> {
        self.credit = credit;
        let flow = wire::flow(
            self.next_incoming_id,
            WINDOW,
            0,
            self.delivery_count,
            credit,
        );
        self.wire.send(0, &flow, &[]).await
    }

    /// Takes one transfer frame; once a delivery is whole, records it and returns its
    /// delivery id and sequence number (`None` for a foreign message).
    fn on_transfer(
        &mut self,
        ctx: &Ctx,
        t: &Transfer,
        payload: &[u8],
    ) -> Result<Option<(u32, Option<u64>)>, String> {
        self.next_incoming_id = self.next_incoming_id.wrapping_add(1);
        if let Some(id) = t.delivery_id {
            self.partial = Some((id, Vec::new()));
        }
        let Some((_, bytes)) = self.partial.as_mut() else {
            return Err("a continuation without a first transfer".into());
        };
        bytes.extend_from_slice(payload);
        if t.more {
            return Ok(None);
        }
        let (id, bytes) = self.partial.take().expect("checked above");
        self.delivery_count = self.delivery_count.wrapping_add(1);
        self.credit = self.credit.saturating_sub(1);
        let seq = self.record_delivery(ctx, &bytes);
        self.unsettled.insert(id, Unsettled { seq, sent: None });
        Ok(Some((id, seq)))
    }

    /// Records a delivery in the ledger; `None` when it names no message we sent.
    fn record_delivery(&self, ctx: &Ctx, message: &[u8]) -> Option<u64> {
        let mut ledger = ctx.ledger();
        match wire::sequence_of(message) {
            Ok(seq) => {
                let count = delivery_count(message);
                ledger.delivered(seq, self.dlq, count).then_some(seq)
            }
            Err(what) => {
                ledger.foreign(format!("{} delivered {what}", self.address_name()));
                None
            }
        }
    }

    fn address_name(&self) -> &'static str {
        if self.dlq {
            DLQ
        } else {
            QUEUE
        }
    }

    /// Sends our outcome unsettled: the broker settles it back once it is durable.
    async fn dispose(&mut self, ctx: &Ctx, id: u32, disposal: Disposal) -> std::io::Result<()> {
        let state = match disposal {
            Disposal::Rejected => DeliveryState::Rejected(Rejected { error: None }),
            _ => DeliveryState::Accepted(Accepted {}),
        };
        if let Some(u) = self.unsettled.get_mut(&id) {
            u.sent = Some(disposal);
            if let Some(seq) = u.seq {
                ctx.ledger().outcome_sent(seq, self.dlq, disposal);
            }
        }
        let d = Disposition {
            role: Role::Receiver,
            first: id,
            last: None,
            settled: false,
            state: Some(state),
            batchable: false,
        };
        self.wire.send(0, &Performative::Disposition(d), &[]).await
    }

    /// The broker settled deliveries back: final, whatever it says. Work is bounded by
    /// what we hold, not by the width of the range.
    fn on_settled(&mut self, ctx: &Ctx, d: &Disposition) {
        if !d.settled {
            return;
        }
        let span = d.last.unwrap_or(d.first).wrapping_sub(d.first);
        let ids: Vec<u32> = self
            .unsettled
            .keys()
            .copied()
            .filter(|id| id.wrapping_sub(d.first) <= span)
            .collect();
        let disposal = Disposal::from_state(wire::state_name(&d.state));
        let mut ledger = ctx.ledger();
        for id in ids {
            let u = self.unsettled.remove(&id).expect("listed above");
            if let (Some(seq), Some(_)) = (u.seq, u.sent) {
                ledger.settled(seq, self.dlq, disposal);
            }
        }
        drop(ledger);
        ctx.progress.notify_waiters();
    }

    /// A polite stop: outcomes for what we hold, their settlements (bounded), close.
    async fn finish(mut self, ctx: &Ctx) -> End {
        let held: Vec<u32> = self
            .unsettled
            .iter()
            .filter(|(_, u)| u.sent.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in held {
            if self.dispose(ctx, id, Disposal::Accepted).await.is_err() {
                return End::Stopped;
            }
        }
        let deadline = Instant::now() + SETTLE_GRACE;
        while self.unsettled.values().any(|u| u.sent.is_some()) && Instant::now() < deadline {
            match tokio::time::timeout_at(deadline, self.wire.next_frame()).await {
                Ok(Ok(f)) => {
                    if let Performative::Disposition(d) = f.performative {
                        self.on_settled(ctx, &d);
                    }
                }
                _ => break,
            }
        }
        self.wire.close(Duration::from_secs(1)).await;
        End::Stopped
    }

    /// Accepts every other delivery held without waiting, then resets the socket.
    async fn vanish(mut self, ctx: &Ctx) {
        let mut held: Vec<u32> = self.unsettled.keys().copied().collect();
        held.sort_unstable();
        for id in held.into_iter().step_by(2) {
            if self.dispose(ctx, id, Disposal::Accepted).await.is_err() {
                break;
            }
        }
        self.wire.reset();
    }
}

/// The header's delivery-count (0 when there is no header), for the history.
fn delivery_count(message: &[u8]) -> u32 {
    // header: 0x00 0x53 0x70, list8 or list32; delivery-count is its fifth field.
    let Some(rest) = message.strip_prefix(&[0x00, 0x53, 0x70]) else {
        return 0;
    };
    let (count, value) = match rest.first() {
        Some(0xc0) => (rest.get(2).map(|&c| u32::from(c)), rest.get(3..)),
        Some(0xd0) => (
            rest.get(5..9)
                .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes"))),
            rest.get(9..),
        ),
        _ => (None, None),
    };
    if count.unwrap_or(0) < 5 {
        return 0;
    }
    let mut fields = value.unwrap_or_default();
    for _ in 0..4 {
        let Some(len) = field_len(fields) else {
            return 0;
        };
        fields = &fields[len..];
    }
    match fields {
        [0x43, ..] => 0,
        [0x52, n, ..] => u32::from(*n),
        [0x70, a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]),
        _ => 0,
    }
}

/// Length of the few encodings a header's first four fields use.
fn field_len(v: &[u8]) -> Option<usize> {
    match v.first()? {
        0x40..=0x43 => Some(1),
        0x50..=0x56 => Some(2),
        0x70 => Some(5),
        _ => None,
    }
}
