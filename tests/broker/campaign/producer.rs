//! The campaign's producers. Each message gets a fresh sequence number, is recorded as
//! sent before it goes out, and as confirmed (the broker's `accepted`) or refused (any
//! other outcome) when its outcome comes back; one whose outcome never comes has an
//! unknown fate.
//!
//! - [`steady`]: the background producers, fe2o3-amqp senders with a window of unsettled
//!   sends, reconnecting after every fault, holding back while the backlog is large; each
//!   connection is one [`windowed`] (which the elasticity test drives with its own shape
//!   and node).
//! - [`fill`]: the full-disk fault's producer, large messages until the broker refuses
//!   one with `amqp:resource-limit-exceeded`.
//! - [`early_close`]: raw transfers, then the connection is closed or reset before any
//!   outcome can arrive.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::link::SenderAttachError;
use fe2o3_amqp::types::definitions::{ReceiverSettleMode, Role};
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Data, DeliveryState, Header, Message, Outcome,
};
use fe2o3_amqp::types::performatives::Performative;
use fe2o3_amqp::types::primitives::Binary;
use fe2o3_amqp::{Connection, Sender, Session};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};

use super::ledger::Origin;
use super::wire::{self, Wire};
use super::{Ctx, Dial, Left, Progress, OP_TIMEOUT, QUEUE};

/// Body bytes of a background message.
pub const BODY_BYTES: usize = 256;
/// Body bytes of a disk-filling message.
const FILL_BODY_BYTES: usize = 16 * 1024;
/// Unsettled sends per background producer.
const IN_FLIGHT: usize = 32;
/// Confirmed-but-not-consumed messages above which background producers wait.
const BACKLOG_MAX: u64 = 1500;
/// Longest a send's outcome may take before its fate is called unknown.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// What a [`windowed`] producer sends, where, and how many sends it keeps unsettled.
pub struct Shape {
    pub address: &'static str,
    pub body_bytes: usize,
    /// Header `durable` (persistent messages).
    pub durable: bool,
    pub in_flight: usize,
}

/// The background producers' traffic.
const STEADY: Shape = Shape {
    address: QUEUE,
    body_bytes: BODY_BYTES,
    durable: false,
    in_flight: IN_FLIGHT,
};

fn message(seq: u64, len: usize) -> Message<Data> {
    Message::builder()
        .application_properties(ApplicationProperties::builder().insert("seq", seq).build())
        .data(Binary::from(wire::body(seq, len)))
        .build()
}

fn persistent_message(seq: u64, len: usize) -> Message<Data> {
    Message::builder()
        .header(Header {
            durable: true,
            ..Default::default()
        })
        .application_properties(ApplicationProperties::builder().insert("seq", seq).build())
        .data(Binary::from(wire::body(seq, len)))
        .build()
}

/// Background producer `k`: one connection per broker epoch until the campaign stops.
pub async fn steady(ctx: Arc<Ctx>, k: usize) {
    while !ctx.stopping() {
        let epoch = ctx.epoch();
        if let Err(e) = steady_connection(&ctx, epoch, k).await {
            if ctx.verbose() {
                eprintln!("campaign: producer {k}: {e}");
            }
            ctx.wait_epoch_after(epoch, Duration::from_millis(200))
                .await;
        }
    }
}

async fn steady_connection(ctx: &Arc<Ctx>, epoch: u32, k: usize) -> Result<(), String> {
    let name = format!("campaign-producer-{k}-{epoch}");
    let live = || ctx.epoch() == epoch;
    let progress = super::no_progress();
    windowed(ctx, ctx.addr().into(), &name, &STEADY, &live, &progress)
        .await
        .map_err(|e| e.to_string())
}

/// One producer connection to `dial.addr`, keeping up to `shape.in_flight` sends
/// unsettled, until the campaign stops, `live()` turns false or the connection fails (an
/// error; a redirected attach is [`Left::Redirected`]). `progress` is called on every
/// accepted send, and while the producer holds back for the backlog (then it waits for
/// consumers, not for the broker).
pub async fn windowed(
    ctx: &Arc<Ctx>,
    dial: Dial,
    name: &str,
    shape: &Shape,
    live: &(dyn Fn() -> bool + Sync),
    progress: &Progress,
) -> Result<(), Left> {
    let url = format!("amqp://{}", dial.addr);
    let mut builder = Connection::builder().container_id(name.to_owned());
    if let Some(idle) = dial.idle_time_out {
        builder = builder.idle_time_out(idle.as_millis() as u32);
    }
    let mut conn = timeout(dial.open_timeout(), builder.open(url.as_str()))
        .await
        .map_err(|_| "open timed out".to_string())?
        .map_err(|e| format!("open: {e}"))?;
    let mut session = timeout(OP_TIMEOUT, Session::begin(&mut conn))
        .await
        .map_err(|_| "begin timed out".to_string())?
        .map_err(|e| format!("begin: {e}"))?;
    let attach = Sender::attach(&mut session, name, shape.address);
    let mut sender = match timeout(OP_TIMEOUT, attach)
        .await
        .map_err(|_| "attach timed out".to_string())?
    {
        Ok(sender) => sender,
        Err(SenderAttachError::RemoteClosedWithError(e)) => {
            let _ = timeout(Duration::from_secs(1), conn.close()).await;
            return Err(Left::from_refusal("attach", &e));
        }
        Err(e) => return Err(Left::Failed(format!("attach: {e}"))),
    };
    let mut outcomes = JoinSet::new();
    let result = loop {
        if ctx.stopping() || !live() {
            break Ok(());
        }
        // fe2o3 may leave the outcomes of a dead connection pending for good: with the
        // window full this loop would wait for them (OUTCOME_TIMEOUT) instead of leaving.
        if conn.is_closed() {
            break Err(Left::Failed("connection closed".to_string()));
        }
        let held = ctx.ledger().backlog() > BACKLOG_MAX;
        if held {
            progress();
        }
        if held || outcomes.len() >= shape.in_flight {
            let _ = timeout(Duration::from_millis(100), ctx.progress.notified()).await;
            while outcomes.try_join_next().is_some() {}
            continue;
        }
        let seq = ctx.next_seq(Origin::Producer);
        let message = if shape.durable {
            persistent_message(seq, shape.body_bytes)
        } else {
            message(seq, shape.body_bytes)
        };
        let fut = match timeout(OP_TIMEOUT, sender.send_batchable(message)).await {
            Ok(Ok(fut)) => fut,
            Ok(Err(e)) => break Err(Left::Failed(format!("send: {e}"))),
            Err(_) => break Err(Left::Failed("send timed out".to_string())),
        };
        let ctx = Arc::clone(ctx);
        let progress = Arc::clone(progress);
        outcomes.spawn(async move {
            if let Ok(Ok(outcome)) = timeout(OUTCOME_TIMEOUT, fut).await {
                record(&ctx, seq, &outcome);
                if matches!(outcome, Outcome::Accepted(_)) {
                    progress();
                }
            }
        });
    };
    // Outcomes still owed: a bounded wait (short on a dead connection, or after a send
    // failed — the broker ended the session, say, after a detach raced a transfer: only
    // outcomes already received are still to be recorded, and a real client reconnects at
    // once; the 3 s wait there was a 3.2 s stall of the elasticity run), then their fate
    // stays unknown.
    let owed = if conn.is_closed() || result.is_err() {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(3)
    };
    let _ = timeout(owed, async {
        while outcomes.join_next().await.is_some() {}
    })
    .await;
    outcomes.abort_all();
    // A failed connection has nothing to close politely (and waiting on it would hold
    // up the reconnect).
    if live() && result.is_ok() {
        let _ = timeout(Duration::from_secs(2), sender.close()).await;
        let _ = timeout(Duration::from_secs(2), conn.close()).await;
    }
    result
}

fn record(ctx: &Ctx, seq: u64, outcome: &Outcome) {
    let mut ledger = ctx.ledger();
    match outcome {
        Outcome::Accepted(_) => ledger.confirmed(seq),
        other => ledger.refused(seq, format!("{other:?}")),
    }
}

/// Sends large messages until the broker refuses one with `resource-limit-exceeded`, at
/// most `max_sends` or `limit`; returns the number accepted and the refusal.
pub async fn fill(
    ctx: &Arc<Ctx>,
    max_sends: usize,
    limit: Duration,
) -> Result<(usize, String), String> {
    let url = format!("amqp://{}", ctx.addr());
    let deadline = Instant::now() + limit;
    let mut conn = timeout(OP_TIMEOUT, Connection::open("campaign-fill", url.as_str()))
        .await
        .map_err(|_| "open timed out".to_string())?
        .map_err(|e| format!("open: {e}"))?;
    let mut session = timeout(OP_TIMEOUT, Session::begin(&mut conn))
        .await
        .map_err(|_| "begin timed out".to_string())?
        .map_err(|e| format!("begin: {e}"))?;
    let mut sender = timeout(
        OP_TIMEOUT,
        Sender::attach(&mut session, "campaign-fill", QUEUE),
    )
    .await
    .map_err(|_| "attach timed out".to_string())?
    .map_err(|e| format!("attach: {e}"))?;
    let mut accepted = 0;
    let mut refusal = None;
    for _ in 0..max_sends {
        if Instant::now() > deadline {
            break;
        }
        let seq = ctx.next_seq(Origin::Fill);
        let send = sender.send(message(seq, FILL_BODY_BYTES));
        match tokio::time::timeout_at(deadline, send).await {
            Ok(Ok(outcome)) => {
                record(ctx, seq, &outcome);
                match outcome {
                    Outcome::Accepted(_) => accepted += 1,
                    other => {
                        refusal = Some(format!("{other:?}"));
                        break;
                    }
                }
            }
            Ok(Err(e)) => return Err(format!("send: {e}")),
            Err(_) => break,
        }
    }
    let _ = timeout(Duration::from_secs(2), sender.close()).await;
    let _ = timeout(Duration::from_secs(2), conn.close()).await;
    match refusal {
        Some(r) => Ok((accepted, r)),
        None => Err(format!(
            "no refusal after {accepted} accepted {FILL_BODY_BYTES}-byte messages"
        )),
    }
}

/// How an early-closing producer leaves.
#[derive(Clone, Copy, Debug)]
pub enum Leave {
    /// A `close` frame right after the transfers (any answer read for a second).
    Close,
    /// A TCP reset right after the transfers.
    Reset,
}

/// Sends up to `count` messages on a raw link and leaves at once; returns what happened.
pub async fn early_close(ctx: &Ctx, count: u32, leave: Leave) -> Result<String, String> {
    let mut w = Wire::connect(ctx.addr(), "campaign-early-close")
        .await
        .map_err(|e| format!("connect: {e}"))?;
    w.begin(0, 100).await.map_err(|e| format!("begin: {e}"))?;
    let attach = wire::attach(0, "early", Role::Sender, QUEUE, ReceiverSettleMode::First);
    w.send(0, &Performative::Attach(attach), &[])
        .await
        .map_err(|e| format!("attach: {e}"))?;
    let credit = w
        .expect(|_, p| match p {
            Performative::Flow(f) if f.handle.is_some() => f.link_credit,
            _ => None,
        })
        .await
        .map_err(|e| format!("credit: {e}"))?;
    let n = count.min(credit);
    let mut seqs = Vec::new();
    for id in 0..n {
        let seq = ctx.next_seq(Origin::EarlyClose);
        seqs.push(seq);
        let t = wire::transfer(0, id, id.to_be_bytes().to_vec(), false);
        w.send(0, &t, &wire::message(seq, BODY_BYTES))
            .await
            .map_err(|e| format!("transfer: {e}"))?;
    }
    let mut confirmed = 0;
    match leave {
        Leave::Reset => w.reset(),
        Leave::Close => {
            let close = fe2o3_amqp::types::performatives::Close { error: None };
            let _ = w.send(0, &Performative::Close(close), &[]).await;
            confirmed = read_outcomes(ctx, &mut w, &seqs).await;
        }
    }
    Ok(format!(
        "{n} transfers then {leave:?} ({confirmed} accepted before the close)"
    ))
}

/// Reads the broker's answers for a second, recording outcomes of `seqs` (delivery id =
/// index); returns how many were accepted.
async fn read_outcomes(ctx: &Ctx, w: &mut Wire, seqs: &[u64]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut accepted = 0;
    while let Ok(Ok(f)) = tokio::time::timeout_at(deadline, w.next_frame()).await {
        match f.performative {
            Performative::Disposition(d) if d.role == Role::Receiver => {
                let last = d.last.unwrap_or(d.first);
                let mut ledger = ctx.ledger();
                for (id, seq) in seqs.iter().enumerate() {
                    let id = id as u32;
                    if id < d.first || id > last {
                        continue;
                    }
                    match &d.state {
                        Some(DeliveryState::Accepted(_)) => {
                            ledger.confirmed(*seq);
                            accepted += 1;
                        }
                        other => ledger.refused(*seq, format!("{other:?}")),
                    }
                }
            }
            Performative::Close(_) => break,
            _ => {}
        }
    }
    accepted
}
