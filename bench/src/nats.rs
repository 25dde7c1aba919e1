//! The NATS JetStream driver of `entrepot-bench` (feature `nats`), so the NATS figures
//! in `benches/compare.sh` come from the same tool, stamps and histograms as the AMQP ones.
//!
//! Producers publish to the subject `<address>.<run id>` of the stream `--nats-stream`
//! (created with subjects `<first token of address>.>` and file storage when missing) and keep
//! `--window` publish acks in flight; a message counts as accepted when JetStream acks it.
//! Each receiver group is one durable pull consumer filtered on that subject (competing
//! consumers share it; fan-out subscribers get one each), acking every message explicitly. The consumers are deleted at the end.
//!
//! Note: nats-server 2.9 acks a publish before it fsyncs (see `../shared/peers/README.md`).

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::stats::{ConsumerStats, ProducerStats, Stamp};
use super::{Ctx, Schedule};

/// Size limit of the stream when the driver creates it (as `peers/nats_probe.py setup` does).
const STREAM_BYTES_MAX: i64 = 4 << 30;

/// The stream covers `<first token of the address>.>` (`bench.>` for `bench.p1k`), so runs
/// with different addresses share one stream.
fn stream_prefix(address: &str) -> &str {
    address.split('.').next().unwrap_or(address)
}

fn subject(ctx: &Ctx) -> String {
    format!("{}.{}", ctx.workload.args.address, ctx.run_id)
}

fn consumer_name(ctx: &Ctx, group: usize) -> String {
    format!("bench_{}_{group}", ctx.run_id)
}

async fn connect(ctx: &Ctx) -> anyhow::Result<jetstream::Context> {
    let url = ctx.workload.args.nats_url.as_deref().unwrap_or_default();
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(jetstream::new(client))
}

pub async fn produce(ctx: Arc<Ctx>, producer: u32, schedule: Schedule) -> ProducerStats {
    let mut stats = ProducerStats::default();
    if let Err(e) = produce_inner(&ctx, producer, schedule, &mut stats).await {
        stats.error = Some(format!("producer {producer}: {e:#}"));
    }
    stats
}

async fn produce_inner(
    ctx: &Ctx,
    producer: u32,
    mut schedule: Schedule,
    stats: &mut ProducerStats,
) -> anyhow::Result<()> {
    let args = &ctx.workload.args;
    let js = connect(ctx).await?;
    let subject = subject(ctx);
    let mut body = vec![0x5au8; args.size];
    let mut inflight = VecDeque::with_capacity(args.window);
    let mut abort = ctx.abort.clone();
    'run: {
        while let Some((seq, scheduled)) = schedule.next(&ctx.stop_sending).await {
            while inflight.len() >= args.window {
                let Some((seq, t, ack)) = inflight.pop_front() else {
                    break;
                };
                tokio::select! {
                    r = ack => settle(ctx, stats, seq, t, r),
                    _ = abort.wait_for(|a| *a) => break 'run,
                }
            }
            Stamp {
                run: ctx.run_id,
                producer,
                seq,
                sent_unix_ns: ctx.clock.unix_ns(scheduled),
            }
            .write(&mut body);
            let payload = bytes::Bytes::copy_from_slice(&body);
            let ack = tokio::select! {
                a = js.publish(subject.clone(), payload) => a.context("publish")?,
                _ = abort.wait_for(|a| *a) => break 'run,
            };
            ctx.count_sent(stats, scheduled);
            inflight.push_back((seq, scheduled, ack.into_future()));
        }
        while let Some((seq, t, ack)) = inflight.pop_front() {
            tokio::select! {
                r = ack => settle(ctx, stats, seq, t, r),
                _ = abort.wait_for(|a| *a) => break 'run,
            }
        }
    }
    for (seq, _, _) in inflight {
        stats.unconfirmed += 1;
        stats.refused.push(seq);
    }
    Ok(())
}

fn settle<T, E: std::fmt::Display>(
    ctx: &Ctx,
    stats: &mut ProducerStats,
    seq: u64,
    sent_at: Instant,
    ack: Result<T, E>,
) {
    if let Err(e) = ack {
        if stats.refused.is_empty() {
            tracing::warn!(seq, error = %e, "publish not acknowledged");
        }
        stats.refused.push(seq);
        return;
    }
    ctx.count_accepted(stats, sent_at);
}

pub async fn consume(
    ctx: Arc<Ctx>,
    consumer: u32,
    group: usize,
    ready: mpsc::Sender<()>,
) -> ConsumerStats {
    let mut stats = ConsumerStats::default();
    if let Err(e) = consume_inner(&ctx, group, ready, &mut stats).await {
        stats.error = Some(format!("consumer {consumer}: {e:#}"));
    }
    stats
}

async fn consume_inner(
    ctx: &Ctx,
    group: usize,
    ready: mpsc::Sender<()>,
    stats: &mut ConsumerStats,
) -> anyhow::Result<()> {
    let args = &ctx.workload.args;
    let js = connect(ctx).await?;
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: args.nats_stream.clone(),
            subjects: vec![format!("{}.>", stream_prefix(&args.address))],
            storage: jetstream::stream::StorageType::File,
            max_bytes: STREAM_BYTES_MAX,
            ..Default::default()
        })
        .await
        .with_context(|| format!("stream {}", args.nats_stream))?;
    let name = consumer_name(ctx, group);
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: subject(ctx),
                ack_policy: AckPolicy::Explicit,
                max_ack_pending: i64::from(args.credit) * 4,
                ..Default::default()
            },
        )
        .await
        .context("creating the pull consumer")?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(args.credit as usize)
        .messages()
        .await
        .context("pulling")?;
    let _ = ready.send(()).await;
    drop(ready);
    let mut stop = ctx.stop_receiving.clone();
    loop {
        let m = tokio::select! {
            m = messages.next() => match m {
                Some(m) => m.map_err(|e| anyhow::anyhow!("{e}"))?,
                None => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let now = Instant::now();
        match Stamp::read(&m.payload) {
            Some(s) if s.run == ctx.run_id => ctx.delivered(group, s, now, stats),
            _ => stats.foreign += 1,
        }
        m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
    }
    // Several consumers of a group share the durable; the first to get here removes it.
    let _ = stream.delete_consumer(&name).await;
    Ok(())
}
