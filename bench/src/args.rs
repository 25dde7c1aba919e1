//! The flags of `entrepot-bench` and the checked workload they describe.
//!
//! Every run is bounded: either `--count` messages or `--duration` seconds (default
//! [`DEFAULT_COUNT`] messages), and always a hard `--timeout`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

/// Messages sent when neither `--count` nor `--duration` is given.
pub const DEFAULT_COUNT: u64 = 100_000;
/// Bytes of the header every message body starts with (run id, producer, sequence, time).
pub const STAMP_BYTES: usize = 24;
/// Largest body the tool builds: 64 MiB.
pub const SIZE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most producer or consumer connections of one run.
pub const CLIENTS_MAX: u32 = 10_000;
/// Most `--processes` of one run.
pub const PROCESSES_MAX: u32 = 64;
/// Most `--queues` of one run.
pub const QUEUES_MAX: u32 = 1024;
/// Most broker URLs in one `--url` list.
pub const URLS_MAX: usize = 64;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// AMQP 1.0 broker, `amqp://[user:password@]host:port` (user and password: SASL PLAIN);
    /// several, comma-separated (the nodes of a cluster), spread the connections over them:
    /// producer and consumer `i` connect to URL `i mod n`. A link refused with
    /// `amqp:link:redirect` follows it to the node named (at most 4 times).
    #[arg(long, default_value = "amqp://127.0.0.1:5672")]
    pub url: String,
    /// Target address of the producers and source address of the consumers.
    #[arg(long, default_value = "bench")]
    pub address: String,
    /// Spread the run over this many queues, `<address>-0` … `<address>-(n-1)`: producer
    /// and consumer `i` use queue `i mod n` (every queue needs a consumer). 1: `--address`
    /// itself.
    #[arg(long, default_value_t = 1)]
    pub queues: u32,
    /// Source address of the consumers, if it differs from --address (for example a
    /// RabbitMQ `/exchange/amq.fanout/x` binding for fan-out runs).
    #[arg(long)]
    pub consumer_address: Option<String>,
    /// Producer connections; 0 with `--count N`: consume only, N messages already waiting.
    #[arg(long, default_value_t = 1)]
    pub producers: u32,
    /// Competing consumer connections on the address (together they must see every message;
    /// 0: nobody receives and nothing is checked, e.g. against `serve --sink`).
    #[arg(long, default_value_t = 1)]
    pub consumers: u32,
    /// Subscribers that must each see every message (fan-out). Each is counted separately.
    /// Replaces --consumers when given.
    #[arg(long)]
    pub topic_subscribers: Option<u32>,
    /// Body bytes per message (at least 24: run id, producer, sequence and send time).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Mark messages durable (header.durable = true).
    #[arg(long)]
    pub persistent: bool,
    /// Unsettled deliveries in flight per producer.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Link credit each consumer keeps granted.
    #[arg(long, default_value_t = 1000)]
    pub credit: u32,
    /// Total messages per second over all producers (0: as fast as acknowledgements allow).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Total messages to send over all producers [default: 100000 unless --duration].
    #[arg(long, conflicts_with = "duration")]
    pub count: Option<u64>,
    /// Seconds to send for, after the warm-up.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds at the start whose messages are checked but not measured.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Seconds the consumers wait for stragglers once producers are done.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// Hard limit on the whole run in seconds; what is missing then is reported missing.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Drive NATS JetStream instead of AMQP: `nats://host:port`; --address is then the
    /// subject prefix: messages go to `<address>.<run id>` (needs the `nats` feature).
    #[arg(long)]
    pub nats_url: Option<String>,
    /// JetStream stream the NATS driver publishes to (created, file storage, when missing).
    #[arg(long, default_value = "BENCH")]
    pub nats_stream: String,
    /// Spread the producers and consumers over this many processes (this program run
    /// again), so one process's CPU is not the ceiling; their figures are merged.
    #[arg(long, default_value_t = 1)]
    pub processes: u32,
    /// Leave Nagle's algorithm on in the clients' sockets, as fe2o3-amqp's own
    /// `Connection::open` does: shows what such clients get from the broker.
    #[arg(long)]
    pub nagle: bool,
    /// Consume-only runs: let fe2o3-amqp grant credit (`CreditMode::Auto`: again only once
    /// half is used) instead of topping it up every eighth (`amqp::CREDIT_TOP_UP_PARTS`).
    #[arg(long)]
    pub half_credit: bool,
    /// Write each frame to the socket when fe2o3-amqp flushes it (one `writev` per frame,
    /// as before session 11) instead of batching a connection's writes (`socket.rs`):
    /// for before/after comparisons of the generator's own CPU.
    #[arg(long)]
    pub direct_writes: bool,
    /// The broker's process id: report its CPU time per message (from /proc).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Internal: this process is one of `--processes`; `RUN:P0:PTOTAL:C0:CTOTAL` (shared run
    /// id, first global producer and consumer index, totals over all processes).
    #[arg(long, hide = true)]
    pub child: Option<ChildSpec>,
}

/// What a `--processes` child is given by its parent: its slice of the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChildSpec {
    pub run_id: u32,
    pub producer_offset: u32,
    pub producers_total: u32,
    pub consumer_offset: u32,
    pub consumers_total: u32,
}

impl std::str::FromStr for ChildSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let n: Vec<u32> = s
            .split(':')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--child {s:?}: {e}"))?;
        let [run_id, producer_offset, producers_total, consumer_offset, consumers_total] = n[..]
        else {
            return Err(format!("--child {s:?}: want RUN:P0:PTOTAL:C0:CTOTAL"));
        };
        Ok(ChildSpec {
            run_id,
            producer_offset,
            producers_total,
            consumer_offset,
            consumers_total,
        })
    }
}

impl std::fmt::Display for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}:{}",
            self.run_id,
            self.producer_offset,
            self.producers_total,
            self.consumer_offset,
            self.consumers_total
        )
    }
}

/// This process's part of the run: global indices of its producers and consumers (all of
/// them unless it is a `--processes` child).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slice {
    pub producer_offset: u32,
    pub producers: u32,
    pub producers_total: u32,
    pub consumer_offset: u32,
    pub consumers: u32,
}

/// How the run ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    Count(u64),
    Duration(Duration),
}

/// How consumers share the messages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Delivery {
    /// `n` competing consumers; together they must receive every message.
    Competing(u32),
    /// `n` subscribers; each must receive every message.
    FanOut(u32),
}

impl Delivery {
    pub fn connections(self) -> u32 {
        match self {
            Delivery::Competing(n) | Delivery::FanOut(n) => n,
        }
    }
    /// Independent receiver groups, each of which must see every message (none when
    /// nobody receives).
    pub fn groups(self) -> u32 {
        match self {
            Delivery::Competing(0) => 0,
            Delivery::Competing(_) => 1,
            Delivery::FanOut(n) => n,
        }
    }
}

/// The checked form of [`BenchArgs`].
#[derive(Debug, Clone)]
pub struct Workload {
    pub args: BenchArgs,
    pub limit: Limit,
    /// Over all processes of the run.
    pub delivery: Delivery,
    pub slice: Slice,
    pub warmup: Duration,
    pub drain: Duration,
    pub timeout: Duration,
}

impl BenchArgs {
    pub fn into_workload(self) -> anyhow::Result<Workload> {
        if self.size < STAMP_BYTES || self.size > SIZE_BYTES_MAX {
            bail!("--size must be {STAMP_BYTES}..={SIZE_BYTES_MAX} bytes");
        }
        // A --processes child may be handed no producers, only consumers.
        let producers_min = u32::from(self.child.is_none());
        if self.producers < producers_min || self.producers > CLIENTS_MAX {
            bail!("--producers must be 1..={CLIENTS_MAX}");
        }
        if self.processes == 0 || self.processes > PROCESSES_MAX {
            bail!("--processes must be 1..={PROCESSES_MAX}");
        }
        if self.window == 0 || self.credit == 0 {
            bail!("--window and --credit must be at least 1");
        }
        let local = self.topic_subscribers.unwrap_or(self.consumers);
        let slice = match self.child {
            Some(c) => Slice {
                producer_offset: c.producer_offset,
                producers: self.producers,
                producers_total: c.producers_total,
                consumer_offset: c.consumer_offset,
                consumers: local,
            },
            None => Slice {
                producer_offset: 0,
                producers: self.producers,
                producers_total: self.producers,
                consumer_offset: 0,
                consumers: local,
            },
        };
        let total = self.child.map_or(local, |c| c.consumers_total);
        if slice.producer_offset + slice.producers > slice.producers_total
            || slice.consumer_offset + local > total
        {
            bail!("--child: the slice lies outside the run");
        }
        let delivery = match self.topic_subscribers {
            Some(_) => Delivery::FanOut(total),
            None => Delivery::Competing(total),
        };
        if delivery.connections() > CLIENTS_MAX {
            bail!("at most {CLIENTS_MAX} consumers");
        }
        let limit = match (self.count, self.duration) {
            (Some(0), _) => bail!("--count must be at least 1"),
            (Some(n), _) => Limit::Count(n),
            (None, Some(s)) => Limit::Duration(secs(s, "--duration")?),
            (None, None) => Limit::Count(DEFAULT_COUNT),
        };
        let warmup = secs_or_zero(self.warmup, "--warmup")?;
        let drain = secs_or_zero(self.drain, "--drain")?;
        let timeout = secs(self.timeout, "--timeout")?;
        if cfg!(not(feature = "nats")) && self.nats_url.is_some() {
            bail!("--nats-url: this build has no NATS driver (build with --features nats)");
        }
        if let Some(nats) = &self.nats_url {
            url_host_port(nats).context("--nats-url")?;
        } else {
            let urls: Vec<&str> = self.urls().collect();
            if urls.len() > URLS_MAX {
                bail!("--url lists {} brokers; at most {URLS_MAX}", urls.len());
            }
            for url in urls {
                url_host_port(url).with_context(|| format!("--url {url:?}"))?;
            }
        }
        if self.queues == 0 || self.queues > QUEUES_MAX {
            bail!("--queues must be 1..={QUEUES_MAX}");
        }
        if self.queues > 1 {
            if self.nats_url.is_some() || self.topic_subscribers.is_some() {
                bail!("--queues > 1 is for competing AMQP consumers only");
            }
            if total != 0 && total < self.queues {
                bail!(
                    "--queues {}: every queue needs a consumer, but there are {total}",
                    self.queues
                );
            }
        }
        Ok(Workload {
            args: self,
            limit,
            delivery,
            slice,
            warmup,
            drain,
            timeout,
        })
    }
}

impl BenchArgs {
    /// How the AMQP connections write: batched unless `--direct-writes`, or `--nagle`
    /// (which stands for fe2o3-amqp's own socket, so takes it as it is).
    pub fn writes(&self) -> crate::socket::Writes {
        if self.direct_writes || self.nagle {
            crate::socket::Writes::Direct
        } else {
            crate::socket::Writes::Batched
        }
    }

    /// The brokers of `--url`, in order.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.url.split(',').map(str::trim).filter(|u| !u.is_empty())
    }

    /// The broker client `i` (a producer's or a consumer's global index) connects to.
    pub fn url_for(&self, i: u32) -> &str {
        let urls: Vec<&str> = self.urls().collect();
        match urls.len() {
            0 => self.url.as_str(),
            n => urls[i as usize % n],
        }
    }

    /// The queue producer `i` sends to.
    pub fn target_for(&self, i: u32) -> String {
        self.queue_name(&self.address, i)
    }

    /// The queue consumer `i` receives from.
    pub fn source_for(&self, i: u32) -> String {
        self.queue_name(self.consumer_address.as_deref().unwrap_or(&self.address), i)
    }

    fn queue_name(&self, base: &str, i: u32) -> String {
        match self.queues {
            0 | 1 => base.to_owned(),
            n => format!("{base}-{}", i % n),
        }
    }
}

fn secs(s: f64, flag: &str) -> anyhow::Result<Duration> {
    if !(s > 0.0 && s < 1e7) {
        bail!("{flag} must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(s))
}

fn secs_or_zero(s: f64, flag: &str) -> anyhow::Result<Duration> {
    if s == 0.0 {
        return Ok(Duration::ZERO);
    }
    secs(s, flag)
}

/// `scheme://[user[:password]@]host:port[/...]` → `host:port`.
pub fn url_host_port(url: &str) -> anyhow::Result<String> {
    let (_, rest) = url.split_once("://").context("no scheme:// in the URL")?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if !host_port.contains(':') {
        bail!("the URL needs host:port, got {host_port:?}");
    }
    Ok(host_port.to_owned())
}

/// The URL with any password replaced by `***`, for reports.
pub fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (cred, host) = rest.split_once('@').unwrap_or(("", rest));
            let user = cred.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_and_redaction() {
        assert_eq!(
            url_host_port("amqp://guest:guest@127.0.0.1:5682")
                .ok()
                .as_deref(),
            Some("127.0.0.1:5682")
        );
        assert_eq!(
            url_host_port("amqp://127.0.0.1:5672/x").ok().as_deref(),
            Some("127.0.0.1:5672")
        );
        assert!(url_host_port("127.0.0.1:5672").is_err());
        assert_eq!(redacted("amqp://guest:secret@h:1"), "amqp://guest:***@h:1");
        assert_eq!(redacted("amqp://h:1"), "amqp://h:1");
    }

    fn parse(extra: &[&str]) -> anyhow::Result<Workload> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let argv = std::iter::once("entrepot-bench").chain(extra.iter().copied());
        let cli = <Cli as clap::Parser>::try_parse_from(argv)?;
        cli.bench.into_workload()
    }

    #[test]
    fn urls_and_queues_spread_the_clients() {
        let w = parse(&[
            "--url",
            "amqp://127.0.0.1:5740, amqp://127.0.0.1:5741,amqp://127.0.0.1:5742",
            "--address",
            "q",
            "--queues",
            "8",
            "--producers",
            "8",
            "--consumers",
            "8",
        ])
        .expect("valid");
        let a = &w.args;
        assert_eq!(a.url_for(0), "amqp://127.0.0.1:5740");
        assert_eq!(a.url_for(1), "amqp://127.0.0.1:5741");
        assert_eq!(a.url_for(5), "amqp://127.0.0.1:5742");
        assert_eq!(a.target_for(3), "q-3");
        assert_eq!(a.source_for(11), "q-3");
        let one = parse(&["--address", "q"]).expect("valid");
        assert_eq!(one.args.target_for(7), "q");
        assert_eq!(one.args.url_for(3), "amqp://127.0.0.1:5672");
    }

    #[test]
    fn queues_without_a_consumer_each_are_refused() {
        let err = parse(&["--queues", "4", "--consumers", "2"]).expect_err("refused");
        assert!(
            err.to_string().contains("every queue needs a consumer"),
            "{err}"
        );
        assert!(parse(&["--queues", "0"]).is_err());
        assert!(parse(&["--url", "amqp://a:1,nohost"]).is_err());
    }
}
