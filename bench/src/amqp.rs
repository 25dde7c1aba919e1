//! The AMQP 1.0 driver of `entrepot-bench`, on fe2o3-amqp: one connection, session and
//! link per producer or consumer.
//!
//! Producers keep `--window` unsettled deliveries in flight and count a message as sent
//! only when the broker settles it `accepted`; consumers keep `--credit` granted
//! (fe2o3-amqp's `Auto`; consume-only drains top it up, [`CreditKeeper`]) and accept
//! every delivery. Sockets are
//! opened here with TCP_NODELAY, because fe2o3-amqp does not set it and Nagle's algorithm
//! then delays its small disposition and flow frames by up to 40 ms.
//!
//! An attach refused with `amqp:link:redirect` (a clustered node that does not lead the
//! address) is tried again at the node its `info` names (`network-host`, `port`), at most
//! [`MAX_REDIRECTS`] times; any other refusal ends that producer or consumer.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::{ReceiverAttachError, SendError, SenderAttachError};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::definitions::{self, ErrorCondition, LinkError};
use fe2o3_amqp::types::messaging::{Data, Header, Message, Outcome};
use fe2o3_amqp::types::primitives::{Binary, Symbol, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::args::{url_host_port, BenchArgs};
use super::socket::{BatchedStream, Writes};
use super::stats::{ConsumerStats, ProducerStats, Stamp};
use super::{Ctx, Schedule};

/// A consumer grants its credit again each time this share of it has been used (every
/// 31 deliveries at credit 250). fe2o3-amqp's `CreditMode::Auto` grants only when half is
/// used, so its window swings between half and all of the credit; proton's
/// `FlowController` (the default of most clients) tops the credit up after every delivery,
/// one flow per I/O batch, and keeps the window full. Ours stays within an eighth of it:
/// a window of 250 then stands for 250, at one flow per 31 deliveries. Only consume-only
/// drains (`drain.rs`, compare.sh's credit case) use it: the mixed runs keep `Auto`, since
/// with it their 8/8 run against RabbitMQ QQ hit the hard timeout (a producer did not
/// return, the generator at 0.9 cores instead of 0.2), not yet understood.
pub const CREDIT_TOP_UP_PARTS: u32 = 8;

/// Keeps a receiver's credit near `credit` (see [`CREDIT_TOP_UP_PARTS`]), or leaves it
/// to fe2o3-amqp (`--half-credit`).
pub struct CreditKeeper {
    credit: u32,
    /// Settled deliveries between two flows; `None`: fe2o3-amqp's `Auto` grants.
    every: Option<u32>,
    used: u32,
}

impl CreditKeeper {
    /// The credit mode to attach a receiver with.
    pub fn mode(args: &BenchArgs) -> CreditMode {
        if args.half_credit {
            CreditMode::Auto(args.credit)
        } else {
            CreditMode::Manual
        }
    }

    /// Grants the first credit to a receiver attached with [`CreditKeeper::mode`].
    pub async fn grant(receiver: &mut Receiver, args: &BenchArgs) -> anyhow::Result<CreditKeeper> {
        let every = (!args.half_credit).then(|| (args.credit / CREDIT_TOP_UP_PARTS).max(1));
        if every.is_some() {
            receiver
                .set_credit(args.credit)
                .await
                .context("first flow")?;
        }
        Ok(CreditKeeper {
            credit: args.credit,
            every,
            used: 0,
        })
    }

    /// One delivery was settled: tops the credit up once a share is used.
    pub async fn settled_one(&mut self, receiver: &mut Receiver) -> anyhow::Result<()> {
        let Some(every) = self.every else {
            return Ok(());
        };
        self.used += 1;
        if self.used >= every {
            self.used = 0;
            receiver.set_credit(self.credit).await.context("flow")?;
        }
        Ok(())
    }
}

/// Opens a connection over our own socket with TCP_NODELAY (unless `--nagle`), its writes
/// batched unless `--direct-writes` or `--nagle` ([`Writes`]), with SASL PLAIN when the URL
/// carries `user:password@`.
pub async fn connect(
    args: &BenchArgs,
    url: &str,
    container_id: &str,
) -> anyhow::Result<ConnectionHandle<()>> {
    let host_port = url_host_port(url)?;
    let stream = tokio::net::TcpStream::connect(&host_port)
        .await
        .with_context(|| format!("connecting to {host_port}"))?;
    stream.set_nodelay(!args.nagle)?;
    let host = host_port
        .rsplit_once(':')
        .map_or(host_port.as_str(), |(h, _)| h);
    let mut builder = Connection::builder()
        .container_id(container_id)
        .hostname(host);
    if let Some((user, password)) = credentials(url) {
        builder = builder.sasl_profile(SaslProfile::Plain {
            username: user,
            password,
        });
    }
    let opened = match args.writes() {
        Writes::Batched => builder.open_with_stream(BatchedStream::new(stream)).await,
        Writes::Direct => builder.open_with_stream(stream).await,
    };
    opened.with_context(|| format!("AMQP open to {host_port}"))
}

/// Most `amqp:link:redirect`s one link follows before its attach counts as failed (a
/// cluster whose leaders move while it attaches may send it round once or twice; more
/// is a loop).
pub const MAX_REDIRECTS: u32 = 4;

/// Where an attach refused with `error` should go next: for `amqp:link:redirect`, the
/// node its `info` names (`network-host` and `port`, the AMQP 1.0 / Qpid Dispatch
/// convention; credentials of `url` kept); any other refusal is the attach's error.
pub(crate) fn follow(
    url: &str,
    error: &definitions::Error,
    hops: &mut u32,
) -> anyhow::Result<String> {
    let refused = || anyhow::anyhow!("attach refused: {error:?}");
    if error.condition != ErrorCondition::LinkError(LinkError::Redirect) {
        return Err(refused());
    }
    *hops += 1;
    if *hops > MAX_REDIRECTS {
        anyhow::bail!("attach redirected more than {MAX_REDIRECTS} times (last: {error:?})");
    }
    let info = error.info.as_ref().ok_or_else(refused)?;
    let field = |name: &str| info.get(&Symbol::from(name));
    let host = match field("network-host") {
        Some(Value::String(h)) => h.clone(),
        Some(Value::Symbol(h)) => h.0.clone(),
        _ => return Err(refused()).context("redirect without network-host"),
    };
    let port = match field("port") {
        Some(Value::Ushort(p)) => u64::from(*p),
        Some(Value::Uint(p)) => u64::from(*p),
        Some(Value::Ulong(p)) => *p,
        Some(Value::Int(p)) => u64::try_from(*p).unwrap_or(0),
        Some(Value::Long(p)) => u64::try_from(*p).unwrap_or(0),
        Some(Value::String(p)) => p.parse().unwrap_or(0),
        _ => 0,
    };
    let port = u16::try_from(port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(refused)
        .context("redirect without a valid port")?;
    let credentials = credentials(url)
        .map(|(user, password)| format!("{user}:{password}@"))
        .unwrap_or_default();
    let next = format!("amqp://{credentials}{host}:{port}");
    tracing::debug!(from = url, to = %next, "attach redirected");
    Ok(next)
}

/// `amqp://user:password@host:port` → (user, password).
fn credentials(url: &str) -> Option<(String, String)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let (cred, _) = authority.rsplit_once('@')?;
    let (user, password) = cred.split_once(':').unwrap_or((cred, ""));
    Some((user.to_owned(), password.to_owned()))
}

/// Sends this producer's share of the run; returns what it counted.
pub async fn produce(ctx: Arc<Ctx>, producer: u32, schedule: Schedule) -> ProducerStats {
    let mut stats = ProducerStats::default();
    if let Err(e) = produce_inner(&ctx, producer, schedule, &mut stats).await {
        stats.error = Some(format!("producer {producer}: {e:#}"));
    }
    stats
}

/// An unsettled delivery on its way to the settling task.
type InFlight = (
    u64,
    Instant,
    DeliveryFut<Result<Outcome, SendError>>,
    OwnedSemaphorePermit,
);

async fn produce_inner(
    ctx: &Arc<Ctx>,
    producer: u32,
    mut schedule: Schedule,
    stats: &mut ProducerStats,
) -> anyhow::Result<()> {
    let args = &ctx.workload.args;
    let container = format!("bench-p{producer}-{}", ctx.run_id);
    let mut url = args.url_for(producer).to_owned();
    let mut hops = 0;
    let (mut conn, mut session, mut sender) = loop {
        let mut conn = connect(args, &url, &container).await?;
        let mut session = Session::begin(&mut conn).await.context("begin")?;
        let attached = Sender::attach(
            &mut session,
            format!("bench-p{producer}"),
            args.target_for(producer),
        )
        .await;
        match attached {
            Ok(sender) => break (conn, session, sender),
            Err(SenderAttachError::RemoteClosedWithError(e)) => {
                url = follow(&url, &e, &mut hops)?;
                conn.close().await.ok();
            }
            Err(e) => return Err(e).context("attach sender"),
        }
    };
    // One body, stamped in place and lent to each send: fe2o3-amqp encodes a borrowed
    // body (`SerializableBody for &T`) without a copy of its own, so no per-message clone.
    let mut body = Data(Binary::from(vec![0x5au8; args.size]));
    // Outcomes are awaited by their own task, in send order, so produce->accepted is
    // measured when the outcome arrives, not when the window next needs a slot.
    let window = Arc::new(Semaphore::new(args.window));
    let (tx, rx) = mpsc::unbounded_channel::<InFlight>();
    let settler = tokio::spawn(settle_all(Arc::clone(ctx), rx));
    let mut abort = ctx.abort.clone();
    while let Some((seq, scheduled)) = schedule.next(&ctx.stop_sending).await {
        let permit = tokio::select! {
            p = Arc::clone(&window).acquire_owned() => p.context("window")?,
            _ = abort.wait_for(|a| *a) => break,
        };
        Stamp {
            run: ctx.run_id,
            producer,
            seq,
            sent_unix_ns: ctx.clock.unix_ns(scheduled),
        }
        .write(&mut body.0);
        let msg = Message {
            header: Some(Header {
                durable: args.persistent,
                ..Default::default()
            }),
            delivery_annotations: None,
            message_annotations: None,
            properties: None,
            application_properties: None,
            body: &body,
            footer: None,
        };
        let fut = tokio::select! {
            f = sender.send_batchable(msg) => f.context("send")?,
            _ = abort.wait_for(|a| *a) => break,
        };
        ctx.count_sent(stats, scheduled);
        if tx.send((seq, scheduled, fut, permit)).is_err() {
            break;
        }
    }
    drop(tx);
    let settled = settler.await.context("settling task")?;
    stats.absorb(settled);
    sender.close().await.ok();
    session.end().await.ok();
    conn.close().await.ok();
    Ok(())
}

/// Awaits outcomes in send order until the producer is done; on abort, what is still
/// unsettled is counted as never confirmed (not owed by the broker).
async fn settle_all(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<InFlight>) -> ProducerStats {
    let mut stats = ProducerStats::default();
    let mut abort = ctx.abort.clone();
    while let Some((seq, t, fut, permit)) = rx.recv().await {
        tokio::select! {
            outcome = fut => settle(&ctx, &mut stats, seq, t, outcome),
            _ = abort.wait_for(|a| *a) => {
                stats.unconfirmed += 1;
                stats.refused.push(seq);
                while let Ok((seq, ..)) = rx.try_recv() {
                    stats.unconfirmed += 1;
                    stats.refused.push(seq);
                }
                break;
            }
        }
        drop(permit);
    }
    stats
}

fn settle<E: std::fmt::Display>(
    ctx: &Ctx,
    stats: &mut ProducerStats,
    seq: u64,
    sent_at: Instant,
    outcome: Result<Outcome, E>,
) {
    let accepted = matches!(&outcome, Ok(o) if o.is_accepted());
    if !accepted {
        if stats.refused.is_empty() {
            let what = match outcome {
                Ok(o) => format!("{o:?}"),
                Err(e) => e.to_string(),
            };
            tracing::warn!(seq, outcome = %what, "delivery not accepted");
        }
        stats.refused.push(seq);
        return;
    }
    ctx.count_accepted(stats, sent_at);
}

/// Receives and accepts until told to stop; `ready` is signalled once the link is attached.
pub async fn consume(
    ctx: Arc<Ctx>,
    consumer: u32,
    group: usize,
    ready: mpsc::Sender<()>,
) -> ConsumerStats {
    let mut stats = ConsumerStats::default();
    if let Err(e) = consume_inner(&ctx, consumer, group, ready, &mut stats).await {
        stats.error = Some(format!("consumer {consumer}: {e:#}"));
    }
    stats
}

async fn consume_inner(
    ctx: &Ctx,
    consumer: u32,
    group: usize,
    ready: mpsc::Sender<()>,
    stats: &mut ConsumerStats,
) -> anyhow::Result<()> {
    let args = &ctx.workload.args;
    let source = args.source_for(consumer);
    let container = format!("bench-c{consumer}-{}", ctx.run_id);
    let mut url = args.url_for(consumer).to_owned();
    let mut hops = 0;
    let (mut conn, mut session, mut receiver) = loop {
        let mut conn = connect(args, &url, &container).await?;
        let mut session = Session::begin(&mut conn).await.context("begin")?;
        let attached = Receiver::builder()
            .name(format!("bench-c{consumer}"))
            .source(source.clone())
            .credit_mode(CreditMode::Auto(args.credit))
            .attach(&mut session)
            .await;
        match attached {
            Ok(receiver) => break (conn, session, receiver),
            Err(ReceiverAttachError::RemoteClosedWithError(e)) => {
                url = follow(&url, &e, &mut hops)?;
                conn.close().await.ok();
            }
            Err(e) => return Err(e).context("attach receiver"),
        }
    };
    let _ = ready.send(()).await;
    drop(ready);
    let mut stop = ctx.stop_receiving.clone();
    loop {
        let delivery = tokio::select! {
            d = receiver.recv::<Data>() => d.context("receive")?,
            _ = stop.wait_for(|s| *s) => break,
        };
        let now = Instant::now();
        match Stamp::read(&delivery.body().0) {
            Some(s) if s.run == ctx.run_id => ctx.delivered(group, s, now, stats),
            _ => stats.foreign += 1,
        }
        receiver.accept(&delivery).await.context("accept")?;
    }
    receiver.close().await.ok();
    session.end().await.ok();
    conn.close().await.ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_from_url() {
        assert_eq!(
            credentials("amqp://guest:pw@127.0.0.1:5682/x"),
            Some(("guest".into(), "pw".into()))
        );
        assert_eq!(credentials("amqp://127.0.0.1:5682"), None);
    }

    fn redirect(info: &[(&str, Value)]) -> definitions::Error {
        let mut fields = fe2o3_amqp::types::definitions::Fields::default();
        for (k, v) in info {
            fields.insert(Symbol::from(*k), v.clone());
        }
        definitions::Error::new(LinkError::Redirect, None, fields)
    }

    #[test]
    fn a_redirect_goes_to_the_named_host_and_port_with_the_same_credentials() {
        let e = redirect(&[
            ("network-host", Value::String("10.0.0.7".into())),
            ("port", Value::Ushort(5741)),
            ("address", Value::String("q".into())),
        ]);
        let mut hops = 0;
        let next = follow("amqp://u:p@127.0.0.1:5740", &e, &mut hops).unwrap();
        assert_eq!(next, "amqp://u:p@10.0.0.7:5741");
        assert_eq!(hops, 1);
        let e = redirect(&[
            ("network-host", Value::String("n2".into())),
            ("port", Value::Int(5742)),
        ]);
        assert_eq!(
            follow("amqp://127.0.0.1:5740", &e, &mut hops).unwrap(),
            "amqp://n2:5742"
        );
    }

    #[test]
    fn other_refusals_bad_info_and_loops_are_errors() {
        let mut hops = 0;
        // Not a redirect, even with a redirect's info.
        let mut not_found = redirect(&[
            ("network-host", Value::String("n".into())),
            ("port", Value::Uint(1)),
        ]);
        not_found.condition = fe2o3_amqp::types::definitions::AmqpError::NotFound.into();
        assert!(follow("amqp://h:1", &not_found, &mut hops).is_err());
        assert!(follow("amqp://h:1", &redirect(&[]), &mut hops).is_err());
        let no_port = redirect(&[("network-host", Value::String("n".into()))]);
        assert!(follow("amqp://h:1", &no_port, &mut hops).is_err());
        let ok = redirect(&[
            ("network-host", Value::String("n".into())),
            ("port", Value::Uint(1)),
        ]);
        let mut hops = 0;
        for _ in 0..MAX_REDIRECTS {
            follow("amqp://h:1", &ok, &mut hops).unwrap();
        }
        let looped = follow("amqp://h:1", &ok, &mut hops).unwrap_err();
        assert!(looped.to_string().contains("more than"), "{looped}");
    }
}
