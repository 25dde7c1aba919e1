//! Consume-only runs (`entrepot-bench --producers 0 --count N`): consumers drain N
//! messages already waiting at `--address` (a backlog left by an earlier produce-only run),
//! accepting each, and the tool reports the receive rate — the delivery path alone, with
//! the consumer never waiting for a producer — and its own CPU time and voluntary context
//! switches (threads gone idle) per message. With `--broker-pid`, it also reports the
//! broker process's CPU time per message (utime + stime from `/proc/<pid>/stat`), the
//! figure that holds on a noisy machine.
//!
//! Messages of any run are counted: there is no loss check here (the producing run made
//! its own), only a bound on time (`--timeout`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Receiver, Session};
use tokio::sync::watch;

use super::amqp::{connect, CreditKeeper};
use super::args::BenchArgs;
use super::cpu::ProcessCpu;

/// Runs a consume-only bench; an error when fewer than `--count` messages arrived in time.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let Some(count) = args.count else {
        bail!("--producers 0 (consume only) needs --count");
    };
    if args.consumers == 0 || args.credit == 0 {
        bail!("--producers 0 needs --consumers and --credit of at least 1");
    }
    let received = Arc::new(AtomicU64::new(0));
    let (done_tx, done) = watch::channel(false);
    let cpu_before = args.broker_pid.map(ProcessCpu::read).transpose()?;
    let own_before = super::tally::cpu_secs_self();
    let switches_before = super::tally::idle_switches_self();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.consumers {
        let (args, received, done) = (args.clone(), Arc::clone(&received), done.clone());
        let done_tx = done_tx.clone();
        tasks.push(tokio::spawn(async move {
            let r = consume(&args, i, count, &received, done).await;
            let _ = done_tx.send(true);
            r
        }));
    }
    drop(done_tx);
    let deadline = Duration::from_secs_f64(args.timeout);
    let mut errors = Vec::new();
    for t in tasks {
        match tokio::time::timeout_at((started + deadline).into(), t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => errors.push(format!("{e:#}")),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(_) => errors.push("timed out".into()),
        }
    }
    let wall = started.elapsed();
    let n = received.load(Ordering::Relaxed);
    println!(
        "entrepot bench: consume only {} -> {} consumer(s), credit {}",
        args.url, args.consumers, args.credit
    );
    println!(
        "received {n} in {:.2} s: {:.0} msgs/s",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64()
    );
    let own = super::tally::cpu_secs_self() - own_before;
    println!(
        "generator cpu: {own:.3} s over the run, {:.2} us per message, {:.3} idle switches per message",
        own * 1e6 / n.max(1) as f64,
        (super::tally::idle_switches_self() - switches_before) as f64 / n.max(1) as f64
    );
    if let (Some(pid), Some(before)) = (args.broker_pid, cpu_before) {
        let used = ProcessCpu::read(pid)?.since(&before);
        println!(
            "broker cpu: {:.3} s over the run, {:.2} us per message",
            used.as_secs_f64(),
            used.as_secs_f64() * 1e6 / n.max(1) as f64
        );
    }
    if n < count || !errors.is_empty() {
        bail!("received {n} of {count}: {}", errors.join("; "));
    }
    Ok(())
}

async fn consume(
    args: &BenchArgs,
    i: u32,
    count: u64,
    received: &AtomicU64,
    mut done: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut conn = connect(args, args.url_for(i), &format!("bench-drain-c{i}")).await?;
    let mut session = Session::begin(&mut conn).await.context("begin")?;
    let mut receiver = Receiver::builder()
        .name(format!("bench-drain-c{i}"))
        .source(args.address.as_str())
        .credit_mode(CreditKeeper::mode(args))
        .attach(&mut session)
        .await
        .context("attach receiver")?;
    let mut credit = CreditKeeper::grant(&mut receiver, args).await?;
    while received.load(Ordering::Relaxed) < count {
        let delivery = tokio::select! {
            d = receiver.recv::<Body<Value>>() => d.context("receive")?,
            _ = done.wait_for(|d| *d) => break,
        };
        receiver.accept(&delivery).await.context("accept")?;
        credit.settled_one(&mut receiver).await?;
        received.fetch_add(1, Ordering::Relaxed);
    }
    receiver.close().await.ok();
    session.end().await.ok();
    conn.close().await.ok();
    Ok(())
}
