//! Hostile frames from issue 14, each on its own raw connection, and the liveness probe
//! that must succeed after each: a fresh fe2o3-amqp client's round trip within
//! [`LIVENESS`].
//!
//! - a `disposition` with first=1, last=0 (a range wrapping around 2^32), as a receiver
//!   and as a sender;
//! - multi-frame transfers with `more=true` on several links, never finished (on the
//!   campaign queue, so a broker that stored one would show a foreign delivery);
//! - the protocol header and `open` written one byte at a time;
//! - a transfer whose delivery-tag is longer than 32 bytes, carrying a real campaign
//!   message (recorded in the ledger like any other).

use std::time::Duration;

use fe2o3_amqp::types::definitions::{ReceiverSettleMode, Role};
use fe2o3_amqp::types::messaging::{Accepted, DeliveryState, Message, Outcome};
use fe2o3_amqp::types::performatives::{Begin, Disposition, Performative};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use tokio::time::{timeout, Instant};

use super::ledger::Origin;
use super::wire::{self, Wire};
use super::{Ctx, QUEUE};

/// A fresh client's round trip must finish within this after any fault.
pub const LIVENESS: Duration = Duration::from_secs(5);
/// The address of the probe's round trips (never the campaign queue).
const PROBE: &str = "campaign-probe";
/// The address the wrapping dispositions' receiver attaches to (never gets credit).
const HOSTILE: &str = "campaign-hostile";

/// One round trip on a fresh connection: attach a receiver and a sender, send one message
/// and, if the broker accepts it, receive and accept it. Returns how long it took and the
/// send's outcome (a full disk refuses it, which still proves the broker answers).
pub async fn probe(ctx: &Ctx) -> Result<(Duration, bool), String> {
    let started = Instant::now();
    let url = format!("amqp://{}", ctx.addr());
    let round_trip = async {
        let mut conn = Connection::open("campaign-probe", url.as_str())
            .await
            .map_err(|e| format!("open: {e}"))?;
        let mut session = Session::begin(&mut conn)
            .await
            .map_err(|e| format!("begin: {e}"))?;
        let mut receiver = Receiver::attach(&mut session, "probe-r", PROBE)
            .await
            .map_err(|e| format!("attach receiver: {e}"))?;
        let mut sender = Sender::attach(&mut session, "probe-s", PROBE)
            .await
            .map_err(|e| format!("attach sender: {e}"))?;
        let outcome = sender
            .send(Message::builder().value("ping").build())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let accepted = matches!(outcome, Outcome::Accepted(_));
        if accepted {
            let d = receiver
                .recv::<String>()
                .await
                .map_err(|e| format!("recv: {e}"))?;
            receiver
                .accept(&d)
                .await
                .map_err(|e| format!("accept: {e}"))?;
        }
        let _ = sender.close().await;
        let _ = receiver.close().await;
        let _ = conn.close().await;
        Ok::<bool, String>(accepted)
    };
    match timeout(LIVENESS, round_trip).await {
        Ok(Ok(accepted)) => Ok((started.elapsed(), accepted)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no round trip within {LIVENESS:?}")),
    }
}

/// A raw connection with session 0 begun (window 100).
async fn begun(ctx: &Ctx, container: &str) -> Result<(Wire, Begin), String> {
    let mut w = Wire::connect(ctx.addr(), container)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let begin = w.begin(0, 100).await.map_err(|e| format!("begin: {e}"))?;
    Ok((w, begin))
}

/// Sends an attach of link `handle` on session 0 (first-settling receiver side).
async fn attach(
    w: &mut Wire,
    handle: u32,
    name: &str,
    role: Role,
    address: &str,
) -> Result<(), String> {
    let attach = wire::attach(handle, name, role, address, ReceiverSettleMode::First);
    w.send(0, &Performative::Attach(attach), &[])
        .await
        .map_err(|e| format!("attach: {e}"))
}

/// Dispositions whose range wraps around 2^32 (first=1, last=0); returns the broker's
/// answer (an error ending the session or connection is right).
pub async fn wrapping_disposition(ctx: &Ctx) -> Result<String, String> {
    let (mut w, _) = begun(ctx, "campaign-wrap").await?;
    attach(&mut w, 0, "wrap", Role::Receiver, HOSTILE).await?;
    w.expect(|_, p| matches!(p, Performative::Attach(_)).then_some(()))
        .await
        .map_err(|e| format!("attach answer: {e}"))?;
    for role in [Role::Receiver, Role::Sender] {
        let d = Disposition {
            role,
            first: 1,
            last: Some(0),
            settled: true,
            state: Some(DeliveryState::Accepted(Accepted {})),
            batchable: false,
        };
        if let Err(e) = w.send(0, &Performative::Disposition(d), &[]).await {
            return Ok(format!("connection gone after the first disposition: {e}"));
        }
    }
    Ok(answer(&mut w, Duration::from_millis(500)).await)
}

/// What the broker says within `limit`: the first end, detach or close, or silence.
async fn answer(w: &mut Wire, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, w.next_frame()).await {
            Err(_) => return format!("no answer within {limit:?}"),
            Ok(Err(e)) => return format!("socket: {e}"),
            Ok(Ok(f)) => match f.performative {
                Performative::End(e) => return format!("end {:?}", e.error.map(|e| e.condition)),
                Performative::Close(c) => {
                    return format!("close {:?}", c.error.map(|e| e.condition))
                }
                Performative::Detach(d) => {
                    return format!("detach {:?}", d.error.map(|e| e.condition))
                }
                _ => {}
            },
        }
    }
}

/// Starts a delivery with `more=true` on each of `links` links and adds `frames` frames
/// of [`wire::CHUNK`] bytes to each, never finishing; returns the open connection (the
/// caller keeps it open through the liveness probe) and the bytes left pending.
pub async fn unfinished_transfers(
    ctx: &Ctx,
    links: u32,
    frames: u32,
) -> Result<(Wire, usize), String> {
    let (mut w, begin) = begun(ctx, "campaign-unfinished").await?;
    // Stay inside the broker's session window: a session error is not what we test.
    let frames = frames.min(begin.incoming_window.saturating_sub(1) / links.max(1));
    for handle in 0..links {
        let name = format!("unfinished-{handle}");
        attach(&mut w, handle, &name, Role::Sender, QUEUE).await?;
        w.expect(|_, p| match p {
            Performative::Flow(f) if f.handle.as_ref().map(|h| h.0) == Some(handle) => Some(()),
            _ => None,
        })
        .await
        .map_err(|e| format!("credit: {e}"))?;
    }
    // A data section announcing more bytes than will ever come.
    let mut first = vec![0x00, 0x53, 0x75, 0xb0];
    first.extend_from_slice(&(u32::MAX / 2).to_be_bytes());
    first.resize(wire::CHUNK, 0xee);
    let filler = vec![0xee; wire::CHUNK];
    let mut pending = 0;
    for k in 0..frames {
        for handle in 0..links {
            let (t, payload) = if k == 0 {
                (wire::transfer(handle, handle, vec![0xee; 8], true), &first)
            } else {
                (wire::continuation(handle, true), &filler)
            };
            w.send(0, &t, payload)
                .await
                .map_err(|e| format!("transfer: {e} after {pending} bytes"))?;
            pending += payload.len();
        }
    }
    Ok((w, pending))
}

/// Writes the header and `open` one byte per `gap` for at most `limit`; returns what the
/// broker did meanwhile.
pub async fn dribble(ctx: &Ctx, gap: Duration, limit: Duration) -> Result<String, String> {
    let started = Instant::now();
    let mut w = tokio::net::TcpStream::connect(ctx.addr())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let bytes = wire::handshake_bytes("campaign-dribble");
    let mut buf = [0u8; 256];
    for (i, b) in bytes.iter().enumerate() {
        if started.elapsed() > limit {
            return Ok(format!(
                "{i} of {} bytes in {limit:?}, still open",
                bytes.len()
            ));
        }
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if let Err(e) = w.write_all(&[*b]).await {
            return Ok(format!(
                "cut off after {i} bytes, {:?}: {e}",
                started.elapsed()
            ));
        }
        // Listen for a close while waiting out the gap.
        if let Ok(Ok(0) | Err(_)) = timeout(gap, w.read(&mut buf)).await {
            return Ok(format!("cut off after {i} bytes, {:?}", started.elapsed()));
        }
    }
    Ok(format!(
        "whole handshake dribbled in {:?}",
        started.elapsed()
    ))
}

/// One transfer with a 40-byte delivery-tag carrying a campaign message; returns the
/// broker's answer (the message's outcome is in the ledger).
pub async fn long_tag(ctx: &Ctx) -> Result<String, String> {
    let (mut w, _) = begun(ctx, "campaign-long-tag").await?;
    attach(&mut w, 0, "long-tag", Role::Sender, QUEUE).await?;
    w.expect(|_, p| match p {
        Performative::Flow(f) if f.handle.is_some() => Some(()),
        _ => None,
    })
    .await
    .map_err(|e| format!("credit: {e}"))?;
    let seq = ctx.next_seq(Origin::LongTag);
    let t = wire::transfer(0, 0, vec![0x7a; 40], false);
    w.send(0, &t, &wire::message(seq, super::producer::BODY_BYTES))
        .await
        .map_err(|e| format!("transfer: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let said = loop {
        match tokio::time::timeout_at(deadline, w.next_frame()).await {
            Err(_) => break "no answer within 2 s".to_string(),
            Ok(Err(e)) => break format!("socket: {e}"),
            Ok(Ok(f)) => match f.performative {
                Performative::Disposition(d) if d.role == Role::Receiver => {
                    let state = wire::state_name(&d.state);
                    if state == "accepted" {
                        ctx.ledger().confirmed(seq);
                    } else {
                        ctx.ledger().refused(seq, format!("{:?}", d.state));
                    }
                    break format!("seq {seq}: {state}");
                }
                Performative::Detach(d) => {
                    break format!("seq {seq}: detach {:?}", d.error.map(|e| e.condition))
                }
                Performative::End(e) => {
                    break format!("seq {seq}: end {:?}", e.error.map(|e| e.condition))
                }
                Performative::Close(c) => {
                    break format!("seq {seq}: close {:?}", c.error.map(|e| e.condition))
                }
                _ => {}
            },
        }
    };
    w.close(Duration::from_secs(1)).await;
    Ok(said)
}
