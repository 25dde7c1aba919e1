//! `entrepot-bench declare`: declares many addresses on a broker or cluster the way a
//! client does — by attaching a sender to each (auto-create) — and optionally sends one
//! persistent message to each, for the memory and idle-CPU figures of many addresses
//! (`benches/many_groups.sh`).
//!
//! `--connections` workers share the addresses (worker w takes every address i with
//! i mod connections = w), each starting on URL w mod n of `--url`. An attach refused with
//! `amqp:link:redirect` (a clustered node that does not lead the address) is followed to
//! the node it names (one connection per node and worker, opened once); without `--send`
//! the redirect alone counts as declared (the address is placed: its group exists). Any
//! other refusal (`amqp:link:detach-forced`: the group still electing, or its leadership
//! just moved, or "busy": a loaded node declares nothing new for a while) or a broken
//! session is tried again after a pause that doubles from [`RETRY_PAUSE`] up to
//! [`RETRY_PAUSE_MAX`] (with jitter, so workers refused together do not come back
//! together), at most [`ATTEMPTS_MAX`] times: a loaded cluster is given room rather than
//! a pile of attaches. Progress goes to stderr
//! every [`PROGRESS_EVERY`]; the last line on stdout reads `declared N of M, sent S,
//! errors E in T s`. Bounded by `--timeout`.
//!
//! `--receive` reads back instead: one message taken from each address (at its leader)
//! and accepted; `--every N` picks a sample.
//!
//! Does not: measure latency, or check anything beyond each send's `accepted` (and, with
//! `--receive`, that a message came).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{ReceiverAttachError, SenderAttachError};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{self, ErrorCondition, LinkError};
use fe2o3_amqp::types::messaging::{Body, Data, Header, Message, Outcome};
use fe2o3_amqp::types::primitives::{Binary, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};

use super::args::{url_host_port, URLS_MAX};

/// Most addresses one run declares.
pub const COUNT_MAX: u32 = 1_000_000;
/// Most worker connections.
pub const CONNECTIONS_MAX: u32 = 256;
/// Tries of one address (refused other than by a redirect, or its session broken).
const ATTEMPTS_MAX: u32 = 20;
/// Pause before the first such try; it doubles with each one.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Longest pause between two tries (20 tries: about 80 s of pauses in all).
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(5);
/// Redirects one attach follows.
const MAX_REDIRECTS: u32 = 4;
/// Longest one step (open, attach, send) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Body bytes of the message sent with `--send`.
const BODY_BYTES: usize = 1024;

#[derive(clap::Args, Debug, Clone)]
pub struct DeclareArgs {
    /// AMQP 1.0 broker(s), `amqp://host:port`, comma-separated.
    #[arg(long, default_value = "amqp://127.0.0.1:5672")]
    pub url: String,
    /// Addresses are `<prefix>-0` … `<prefix>-(count-1)`.
    #[arg(long, default_value = "many")]
    pub prefix: String,
    /// Addresses to declare: `<prefix>-from` … `<prefix>-(count-1)`.
    #[arg(long)]
    pub count: u32,
    /// The first address's number: a declaration in batches runs `--from 0 --count
    /// 2000`, then `--from 2000 --count 4000`, …
    #[arg(long, default_value_t = 0)]
    pub from: u32,
    /// Worker connections (each declares its share in turn).
    #[arg(long, default_value_t = 16)]
    pub connections: u32,
    /// Send one persistent 1 KiB message to each address (at its leader), waiting for
    /// `accepted`.
    #[arg(long)]
    pub send: bool,
    /// Instead of declaring, take one message from each address (a receiver attached at
    /// its leader, redirects followed) and accept it: reads back what `--send` left.
    #[arg(long, conflicts_with = "send")]
    pub receive: bool,
    /// Only every `every`-th address (`<prefix>-0`, `<prefix>-every`, …): a sample.
    #[arg(long, default_value_t = 1)]
    pub every: u32,
    /// Hard limit of the whole run, in seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
}

#[derive(Default)]
struct Counters {
    declared: AtomicU64,
    redirected: AtomicU64,
    sent: AtomicU64,
    errors: AtomicU64,
}

/// Runs the declaration; an error when any address failed or the timeout passed.
pub fn run(args: DeclareArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=COUNT_MAX).contains(&args.count),
        "--count must be 1..={COUNT_MAX}"
    );
    anyhow::ensure!(args.every >= 1, "--every must be at least 1");
    anyhow::ensure!(args.from < args.count, "--from must be below --count");
    anyhow::ensure!(
        (1..=CONNECTIONS_MAX).contains(&args.connections),
        "--connections must be 1..={CONNECTIONS_MAX}"
    );
    let urls: Vec<String> = args.url.split(',').map(str::to_owned).collect();
    anyhow::ensure!(urls.len() <= URLS_MAX, "at most {URLS_MAX} URLs");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(declare_all(args, urls))
}

async fn declare_all(args: DeclareArgs, urls: Vec<String>) -> anyhow::Result<()> {
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    let args = Arc::new(args);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..args.connections {
        let home = urls[w as usize % urls.len()].clone();
        let (args, counters) = (Arc::clone(&args), Arc::clone(&counters));
        workers.spawn(async move { worker(&args, w, home, &counters).await });
    }
    let progress = {
        let counters = Arc::clone(&counters);
        let count = args.count;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "declare: {} of {count} declared ({} redirected), {} sent, {} errors, {:.0} s",
                    counters.declared.load(Ordering::Relaxed),
                    counters.redirected.load(Ordering::Relaxed),
                    counters.sent.load(Ordering::Relaxed),
                    counters.errors.load(Ordering::Relaxed),
                    started.elapsed().as_secs_f64()
                );
            }
        })
    };
    let all = async { while workers.join_next().await.is_some() {} };
    let timed_out = tokio::time::timeout(Duration::from_secs(args.timeout), all)
        .await
        .is_err();
    progress.abort();
    let declared = counters.declared.load(Ordering::Relaxed);
    let errors = counters.errors.load(Ordering::Relaxed);
    let expected = u64::from((args.count - args.from).div_ceil(args.every));
    println!(
        "declared {declared} of {} ({} redirected), sent {}, errors {errors} in {:.1} s",
        args.count - args.from,
        counters.redirected.load(Ordering::Relaxed),
        counters.sent.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(!timed_out, "timed out after {} s", args.timeout);
    anyhow::ensure!(
        errors == 0 && declared == expected,
        "{errors} addresses failed"
    );
    Ok(())
}

/// One connection and session per node this worker has reached.
type Sessions = HashMap<String, (ConnectionHandle<()>, SessionHandle<()>)>;

async fn worker(args: &DeclareArgs, w: u32, home: String, counters: &Counters) {
    let mut sessions = Sessions::new();
    let picked = (args.from..args.count).step_by(args.every as usize);
    for i in picked.skip(w as usize).step_by(args.connections as usize) {
        let address = format!("{}-{i}", args.prefix);
        match declare_one(args, &mut sessions, &home, &address).await {
            Ok(redirected) => {
                counters.declared.fetch_add(1, Ordering::Relaxed);
                if redirected {
                    counters.redirected.fetch_add(1, Ordering::Relaxed);
                }
                if args.send || args.receive {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("declare: {address}: {e:#}");
            }
        }
    }
    for (_, (mut conn, mut session)) in sessions {
        let _ = session.end().await;
        let _ = conn.close().await;
    }
}

/// Declares `address` (and sends to it with `--send`); true when it was redirected. A
/// refusal other than a redirect (`detach-forced`: not served yet, or no longer) or a
/// broken session is tried again from `home` after [`retry_pause`], at most
/// [`ATTEMPTS_MAX`] times (a broken session is opened anew).
async fn declare_one(
    args: &DeclareArgs,
    sessions: &mut Sessions,
    home: &str,
    address: &str,
) -> anyhow::Result<bool> {
    let mut attempts = 0;
    loop {
        match try_once(args, sessions, home, address).await {
            Ok(redirected) => return Ok(redirected),
            Err((url, e)) if attempts < ATTEMPTS_MAX => {
                attempts += 1;
                tracing::debug!(address, url, error = %format!("{e:#}"), "trying again");
                if let Some((mut conn, _)) = sessions.remove(&url) {
                    let _ = tokio::time::timeout(RETRY_PAUSE, conn.close()).await;
                }
                tokio::time::sleep(retry_pause(attempts, address)).await;
            }
            Err((url, e)) => return Err(e.context(format!("at {url}, {attempts} tries"))),
        }
    }
}

/// The pause before try `attempt` (from 1) of `address`: [`RETRY_PAUSE`] doubled per try
/// up to [`RETRY_PAUSE_MAX`], then between half and all of it (jitter from the address
/// and the try, so that workers refused at once spread out).
fn retry_pause(attempt: u32, address: &str) -> Duration {
    let full = RETRY_PAUSE
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(RETRY_PAUSE_MAX);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&(address, attempt), &mut h);
    let jitter = std::hash::Hasher::finish(&h) % 1000;
    full / 2 + full / 2 * u32::try_from(jitter).unwrap_or(0) / 1000
}

/// One try of [`declare_one`] from `home`, following redirects; an error names the URL
/// of the session it happened on.
async fn try_once(
    args: &DeclareArgs,
    sessions: &mut Sessions,
    home: &str,
    address: &str,
) -> Result<bool, (String, anyhow::Error)> {
    let mut url = home.to_owned();
    let mut hops = 0;
    loop {
        let at = url.clone();
        let failed = |e: anyhow::Error| (at.clone(), e);
        let session = session_at(sessions, &url).await.map_err(failed)?;
        let refused = if args.receive {
            match receive_one(&mut session.1, address).await.map_err(failed)? {
                None => return Ok(hops > 0),
                Some(e) => e,
            }
        } else {
            let attach = Sender::attach(&mut session.1, format!("declare-{address}"), address);
            match tokio::time::timeout(STEP_TIMEOUT, attach).await {
                Err(_) => return Err(failed(anyhow::anyhow!("attach timed out"))),
                Ok(Ok(mut sender)) => {
                    if args.send {
                        send_one(&mut sender).await.map_err(failed)?;
                    }
                    let _ = tokio::time::timeout(STEP_TIMEOUT, sender.close()).await;
                    return Ok(hops > 0);
                }
                Ok(Err(SenderAttachError::RemoteClosedWithError(e))) => e,
                Ok(Err(e)) => return Err(failed(anyhow::anyhow!("attach: {e}"))),
            }
        };
        let redirect_counts = !args.send && !args.receive;
        match refused.condition {
            ErrorCondition::LinkError(LinkError::Redirect) if redirect_counts => return Ok(true),
            ErrorCondition::LinkError(LinkError::Redirect) if hops < MAX_REDIRECTS => {
                url = crate::amqp::follow(&url, &refused, &mut hops).map_err(failed)?;
            }
            _ => return Err(failed(anyhow::anyhow!("attach refused: {refused:?}"))),
        }
    }
}

/// This worker's session at `url`, opened on first use (TCP_NODELAY: attaches are small
/// round trips).
async fn session_at<'a>(
    sessions: &'a mut Sessions,
    url: &str,
) -> anyhow::Result<&'a mut (ConnectionHandle<()>, SessionHandle<()>)> {
    if !sessions.contains_key(url) {
        let host_port = url_host_port(url)?;
        let stream = tokio::net::TcpStream::connect(&host_port)
            .await
            .with_context(|| format!("connecting to {host_port}"))?;
        stream.set_nodelay(true)?;
        let open = Connection::builder()
            .container_id(format!("declare-{}", std::process::id()))
            .open_with_stream(stream);
        let mut conn = tokio::time::timeout(STEP_TIMEOUT, open)
            .await
            .context("open timed out")?
            .with_context(|| format!("AMQP open to {host_port}"))?;
        let session = tokio::time::timeout(STEP_TIMEOUT, Session::begin(&mut conn))
            .await
            .context("begin timed out")??;
        sessions.insert(url.to_owned(), (conn, session));
    }
    sessions
        .get_mut(url)
        .context("the session was just inserted")
}

/// Takes one message from `address` on `session` and accepts it; `Some(error)` when the
/// attach was refused (a redirect to follow, or the refusal).
async fn receive_one(
    session: &mut SessionHandle<()>,
    address: &str,
) -> anyhow::Result<Option<definitions::Error>> {
    let attach = Receiver::attach(session, format!("read-{address}"), address);
    let mut receiver = match tokio::time::timeout(STEP_TIMEOUT, attach)
        .await
        .context("attach timed out")?
    {
        Ok(r) => r,
        Err(ReceiverAttachError::RemoteClosedWithError(e)) => return Ok(Some(e)),
        Err(e) => anyhow::bail!("attach receiver: {e}"),
    };
    let delivery = tokio::time::timeout(STEP_TIMEOUT, receiver.recv::<Body<Value>>())
        .await
        .with_context(|| format!("no message from {address} within {STEP_TIMEOUT:?}"))??;
    receiver.accept(&delivery).await?;
    let _ = tokio::time::timeout(STEP_TIMEOUT, receiver.close()).await;
    Ok(None)
}

async fn send_one(sender: &mut Sender) -> anyhow::Result<()> {
    let message = Message::builder()
        .header(Header {
            durable: true,
            ..Default::default()
        })
        .data(Binary::from(vec![0x5a; BODY_BYTES]))
        .build();
    let message: Message<Data> = message;
    let outcome = tokio::time::timeout(STEP_TIMEOUT, sender.send(message))
        .await
        .context("send timed out")??;
    anyhow::ensure!(
        matches!(outcome, Outcome::Accepted(_)),
        "not accepted: {outcome:?}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_pauses_double_up_to_the_most_with_jitter() {
        for attempt in 1..=ATTEMPTS_MAX {
            let full = RETRY_PAUSE
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(RETRY_PAUSE_MAX);
            let p = retry_pause(attempt, "many-7");
            assert!(
                p >= full / 2 && p <= full,
                "try {attempt}: {p:?} of {full:?}"
            );
        }
        assert!(retry_pause(ATTEMPTS_MAX, "many-7") >= RETRY_PAUSE_MAX / 2);
        let spread: std::collections::BTreeSet<Duration> = (0..50)
            .map(|i| retry_pause(8, &format!("many-{i}")))
            .collect();
        assert!(spread.len() > 10, "workers refused together spread out");
    }
}
