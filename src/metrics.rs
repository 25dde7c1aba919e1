//! Prometheus text exposition of the broker's counters, and the HTTP endpoint that serves
//! it with `/healthz` and `/readyz`.
//!
//! `/readyz` is 503 while the broker shuts down, while a cluster node has no leader to
//! serve, and while the store is out of disk space (`disk full: <reason>`, until the
//! housekeeping sees a new segment fit above the reserve again).
//!
//! The HTTP server is deliberately tiny (three GET routes, one request per connection,
//! bounded request size): it is an operator's probe, not an API.
//!
//! Invariants: metric names and help texts are what dashboards read, so every family is
//! written through [`family`], [`gauge`] and [`counter`] (the cluster's too,
//! `raft::admin`), never by hand. Does not: name the Raft layer (a cluster node is read
//! through [`ClusterView`]) or change what it reports on.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use entrepot_storage::SYNC_LATENCY_BUCKETS_US;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use crate::broker::latency::LatencyHistogram;
use crate::broker::Broker;

/// Largest HTTP request head read.
pub const MAX_HTTP_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client gets to send its request.
pub const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Renders every metric in the Prometheus text format.
pub fn render(broker: &Broker) -> String {
    let mut out = String::with_capacity(4096);
    let s = &broker.stats;
    gauge(
        &mut out,
        "entrepot_connections",
        "Open AMQP connections",
        s.connections.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "entrepot_connections_total",
        "AMQP connections accepted",
        s.connections_total.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "entrepot_connection_errors_total",
        "Connections ended by an error",
        s.connection_errors.load(Ordering::Relaxed),
    );
    gauge(
        &mut out,
        "entrepot_links",
        "Attached links",
        s.links.load(Ordering::Relaxed),
    );
    gauge(
        &mut out,
        "entrepot_incomplete_delivery_bytes",
        "Bytes of multi-frame deliveries still arriving, held broker-wide",
        broker.intake.used(),
    );
    gauge(
        &mut out,
        "entrepot_incomplete_delivery_bytes_limit",
        "max-incomplete-bytes: the broker-wide bound on incomplete deliveries",
        broker.intake.limit(),
    );
    counter(
        &mut out,
        "entrepot_incomplete_delivery_refusals_total",
        "Incomplete deliveries refused at max-incomplete-bytes(-per-connection)",
        broker.intake.refused(),
    );
    store_metrics(&mut out, broker);
    queue_metrics(&mut out, broker);
    manifest_metrics(&mut out, broker);
    topic_metrics(&mut out, broker);
    out
}

/// The message log, the disk and the ack log: what was appended and deleted, whether
/// the store refuses, and how long its group-commit syncs take.
fn store_metrics(out: &mut String, broker: &Broker) {
    let log = broker.store().log();
    let st = log.stats();
    counter(
        out,
        "entrepot_store_records_total",
        "Records appended to the message log",
        st.records_appended.load(Ordering::Relaxed),
    );
    counter(
        out,
        "entrepot_store_bytes_total",
        "Bytes appended to the message log",
        st.bytes_appended.load(Ordering::Relaxed),
    );
    counter(
        out,
        "entrepot_store_recovered_torn_bytes",
        "Bytes cut from a torn tail at start-up",
        st.recovered_torn_bytes.load(Ordering::Relaxed),
    );
    counter(
        out,
        "entrepot_store_segments_deleted_total",
        "Segments deleted",
        st.segments_deleted.load(Ordering::Relaxed),
    );
    counter(
        out,
        "entrepot_store_segments_recycled_total",
        "Deleted segments whose file was kept for a later segment",
        st.segments_recycled.load(Ordering::Relaxed),
    );
    gauge(
        out,
        "entrepot_store_segments",
        "Segments in the message log",
        log.segments().len() as u64,
    );
    let store = broker.store();
    gauge(
        out,
        "entrepot_disk_full",
        "1 while the store refuses messages for lack of disk space (see /readyz), else 0",
        u64::from(store.out_of_space().is_some()),
    );
    gauge(
        out,
        "entrepot_store_failed",
        "1 once a sync of the message or ack log failed: the store accepts nothing until a restart (see /readyz), else 0",
        u64::from(store.failed().is_some()),
    );
    if let Ok(free) = store.free_bytes() {
        gauge(
            out,
            "entrepot_disk_free_bytes",
            "Free bytes on the data directory's file system",
            free,
        );
    }
    gauge(
        out,
        "entrepot_disk_reserve_bytes",
        "Free bytes the message log leaves for the ack log",
        store.reserve_bytes(),
    );
    counter(
        out,
        "entrepot_acks_refused_total",
        "Acknowledgements the ack log could not record (the messages were not consumed)",
        store.acks_refused(),
    );
    render_histogram(
        out,
        "entrepot_fsync_seconds",
        "Latency of group-commit syncs of the message log",
        |i| st.sync_latency_buckets[i].load(Ordering::Relaxed),
        st.sync_nanos_total.load(Ordering::Relaxed),
        st.syncs.load(Ordering::Relaxed),
    );
    render_latency(
        out,
        "entrepot_produce_accept_seconds",
        "From the socket read that brought a transfer to the encoding of its accepted: the broker's share of produce-to-accepted",
        &broker.stats.produce_accept,
    );
}

/// The counters of manifest applies to this broker.
fn manifest_metrics(out: &mut String, broker: &Broker) {
    let d = &broker.stats.declarations;
    for (name, help, v) in [
        (
            "entrepot_manifest_applies_total",
            "Manifest sets applied",
            &d.applied,
        ),
        (
            "entrepot_manifest_rejections_total",
            "Manifest sets rejected for errors (nothing applied)",
            &d.rejected,
        ),
        (
            "entrepot_manifest_deletions_refused_total",
            "Address removals refused because the address held messages",
            &d.deletions_refused,
        ),
    ] {
        counter(out, name, help, v.load(Ordering::Relaxed));
    }
}

fn topic_metrics(out: &mut String, broker: &Broker) {
    let mut topics = broker.topics();
    topics.sort_by(|a, b| a.name().cmp(b.name()));
    family(
        out,
        "entrepot_topic_published_total",
        "Messages published to a topic",
        "counter",
    );
    for t in &topics {
        let _ = writeln!(
            out,
            "entrepot_topic_published_total{{topic=\"{}\"}} {}",
            escape(t.name()),
            t.stats.published.load(Ordering::Relaxed)
        );
    }
    let families: [(&str, &str, &str); 5] = [
        (
            "entrepot_subscription_backlog",
            "gauge",
            "Messages a subscription holds (ready + unsettled)",
        ),
        (
            "entrepot_subscription_delivered_total",
            "counter",
            "Deliveries made to a subscription's consumers",
        ),
        (
            "entrepot_subscription_acknowledged_total",
            "counter",
            "Messages a subscription's consumers accepted",
        ),
        (
            "entrepot_subscription_dropped_total",
            "counter",
            "Messages dropped because the backlog was over its limit",
        ),
        (
            "entrepot_subscription_consumers",
            "gauge",
            "Consumers attached to a subscription",
        ),
    ];
    for (i, (name, kind, help)) in families.iter().enumerate() {
        family(out, name, help, kind);
        for t in &topics {
            for sub in t.subscriptions() {
                let q = &sub.queue;
                let value = match i {
                    0 => {
                        let (r, u) = q.depth();
                        (r + u) as u64
                    }
                    1 => q.stats.delivered.load(Ordering::Relaxed),
                    2 => q.stats.acknowledged.load(Ordering::Relaxed),
                    3 => q.stats.dropped.load(Ordering::Relaxed),
                    _ => q.consumer_count() as u64,
                };
                let _ = writeln!(
                    out,
                    "{name}{{topic=\"{}\",subscription=\"{}\",durable=\"{}\"}} {value}",
                    escape(t.name()),
                    escape(&sub.id),
                    sub.durable
                );
            }
        }
    }
}

fn queue_metrics(out: &mut String, broker: &Broker) {
    let mut queues = broker.queues();
    queues.sort_by(|a, b| a.name().cmp(b.name()));
    let families: [(&str, &str, &str); 7] = [
        (
            "entrepot_queue_depth",
            "gauge",
            "Messages held (ready + unsettled)",
        ),
        (
            "entrepot_queue_unsettled",
            "gauge",
            "Messages delivered and not yet settled",
        ),
        ("entrepot_queue_consumers", "gauge", "Consumers attached"),
        (
            "entrepot_queue_enqueued_total",
            "counter",
            "Messages enqueued",
        ),
        (
            "entrepot_queue_acknowledged_total",
            "counter",
            "Messages accepted by consumers",
        ),
        (
            "entrepot_queue_dead_lettered_total",
            "counter",
            "Messages moved to the dead-letter address",
        ),
        (
            "entrepot_queue_expired_total",
            "counter",
            "Messages moved to the expiry address",
        ),
    ];
    for (i, (name, kind, help)) in families.iter().enumerate() {
        family(out, name, help, kind);
        for q in &queues {
            let (ready, unsettled) = q.depth();
            let value = match i {
                0 => (ready + unsettled) as u64,
                1 => unsettled as u64,
                2 => q.consumer_count() as u64,
                3 => q.stats.enqueued.load(Ordering::Relaxed),
                4 => q.stats.acknowledged.load(Ordering::Relaxed),
                5 => q.stats.dead_lettered.load(Ordering::Relaxed),
                _ => q.stats.expired.load(Ordering::Relaxed),
            };
            let _ = writeln!(out, "{name}{{queue=\"{}\"}} {value}", escape(q.name()));
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes the `# HELP` and `# TYPE` lines of metric family `name` (`kind`: `gauge`,
/// `counter`, `histogram`); its samples follow.
pub fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes one gauge without labels: its family lines and its value.
pub fn gauge(out: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    family(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {v}");
}

/// Writes one counter without labels: its family lines and its value.
pub fn counter(out: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    family(out, name, help, "counter");
    let _ = writeln!(out, "{name} {v}");
}

/// Renders a latency histogram whose bucket bounds are [`SYNC_LATENCY_BUCKETS_US`]
/// (`bucket(i)`: the count in bucket `i`, the last one open).
pub fn render_histogram(
    out: &mut String,
    name: &str,
    help: &str,
    bucket: impl Fn(usize) -> u64,
    sum_nanos: u64,
    count: u64,
) {
    family(out, name, help, "histogram");
    let mut cumulative = 0;
    for (i, bound) in SYNC_LATENCY_BUCKETS_US.iter().enumerate() {
        cumulative += bucket(i);
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    cumulative += bucket(SYNC_LATENCY_BUCKETS_US.len());
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum {}", sum_nanos as f64 / 1e9);
    let _ = writeln!(out, "{name}_count {count}");
}

/// Appends `histogram` in the Prometheus text format as `name`.
pub fn render_latency(out: &mut String, name: &str, help: &str, histogram: &LatencyHistogram) {
    render_histogram(
        out,
        name,
        help,
        |i| histogram.bucket(i),
        histogram.sum_nanos(),
        histogram.count(),
    );
}

/// What the HTTP endpoint reports on: a single broker, or a cluster node (whose broker
/// exists only while it leads).
#[derive(Clone)]
pub enum Source {
    Broker(Arc<Broker>),
    Cluster(Arc<dyn ClusterView>),
}

/// An HTTP answer: status line, body.
pub type Reply = (&'static str, String);

/// What a cluster node shows over HTTP, implemented by `raft::admin::ClusterHandle`: the
/// endpoint reads the node through this view, so metrics never names the Raft layer.
pub trait ClusterView: Send + Sync {
    /// The broker, while this node leads.
    fn broker(&self) -> Option<Arc<Broker>>;
    /// Why the node cannot serve clients now (no leader, draining, catching up), or
    /// `None` when it can.
    fn unready(&self) -> Option<String>;
    /// `/status` while the node does not lead (YAML).
    fn status(&self) -> String;
    /// YAML appended to the broker's `/status` when there is a broker (the groups led
    /// here, in `cluster-mode: groups`); nothing by default.
    fn status_extra(&self) -> String {
        String::new()
    }
    /// The node's own metrics, appended to the broker's.
    fn metrics(&self) -> String;
    /// True while a new client connection is to be closed at once (a node draining in
    /// `cluster-mode: groups`: its clients go to another node); false by default.
    fn refuses_connections(&self) -> bool {
        false
    }
    /// Answers a `/cluster…` request.
    fn http<'a>(
        &'a self,
        method: &'a str,
        target: &'a str,
    ) -> Pin<Box<dyn Future<Output = Reply> + Send + 'a>>;
}

/// Serves `/metrics`, `/healthz` and `/readyz` until shutdown.
pub async fn serve_http(
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
) {
    serve_http_source(listener, Source::Broker(broker), shutdown).await
}

/// Serves `/metrics`, `/status`, `/healthz`, `/readyz` (and `/cluster…` on a cluster node)
/// until shutdown.
pub async fn serve_http_source(
    listener: TcpListener,
    source: Source,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let source = source.clone();
                let shutting_down = *shutdown.borrow();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &source, shutting_down).await {
                        tracing::debug!(error = %e, "http request failed");
                    }
                });
            }
            _ = shutdown.changed() => return,
        }
    }
}

async fn handle(
    mut stream: tokio::net::TcpStream,
    source: &Source,
    shutting_down: bool,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_HTTP_REQUEST_BYTES];
    let mut len = 0;
    let read = tokio::time::timeout(HTTP_READ_TIMEOUT, async {
        while len < buf.len() {
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("GET");
    let path = words.next().unwrap_or("/");
    let (broker, cluster) = match source {
        Source::Broker(b) => (Some(Arc::clone(b)), None),
        Source::Cluster(c) => (c.broker(), Some(c)),
    };
    let unready = match cluster {
        _ if shutting_down => Some("shutting down".to_owned()),
        Some(c) => c.unready(),
        None => None,
    };
    let disk_full = broker.as_ref().and_then(|b| b.store().out_of_space());
    let store_failed = broker.as_ref().and_then(|b| b.store().failed());
    let (status, body, kind) = match (path, &broker, cluster) {
        (p, _, Some(c)) if p.starts_with("/cluster") => {
            let (status, body) = c.http(method, p).await;
            (status, body, "application/yaml")
        }
        ("/status", Some(b), c) => {
            let mut text = crate::status::render(b);
            if let Some(c) = c {
                text.push_str(&c.status_extra());
            }
            ("200 OK", text, "application/yaml")
        }
        ("/status", None, Some(c)) => ("200 OK", c.status(), "application/yaml"),
        ("/metrics", b, c) => {
            let mut text = b.as_deref().map(render).unwrap_or_default();
            if let Some(c) = c {
                text.push_str(&c.metrics());
            }
            ("200 OK", text, "text/plain; version=0.0.4")
        }
        ("/healthz", _, _) => ("200 OK", "ok\n".to_owned(), "text/plain"),
        ("/readyz", _, _) if store_failed.is_some() => (
            "503 Service Unavailable",
            format!("store failed: {}\n", store_failed.unwrap_or_default()),
            "text/plain",
        ),
        ("/readyz", _, _) if unready.is_none() && disk_full.is_some() => (
            "503 Service Unavailable",
            format!("disk full: {}\n", disk_full.unwrap_or_default()),
            "text/plain",
        ),
        ("/readyz", _, _) => match unready {
            None => ("200 OK", "ready\n".to_owned(), "text/plain"),
            Some(why) => ("503 Service Unavailable", format!("{why}\n"), "text/plain"),
        },
        _ => ("404 Not Found", "not found\n".to_owned(), "text/plain"),
    };
    let response = format!("HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
