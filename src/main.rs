//! The `entrepot` command line: `entrepot serve` runs a broker node (see the library
//! crate docs in `lib.rs` for what the node is made of). `entrepot bench` hands over to
//! the load generator, the separate `entrepot-bench` binary (`bench/`), which the broker
//! does not link.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use entrepot::{config, server};

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::config::BrokerConfig;

#[derive(Parser)]
#[command(
    name = "entrepot",
    version,
    about = "Persistent store-and-forward AMQP 1.0 message broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker node.
    Serve(Box<ServeArgs>),
    /// Check a manifest directory offline; exit 1 with `file:line: reason` on error.
    Validate {
        /// Directory of manifests (*.yaml, *.yml).
        dir: PathBuf,
    },
    /// Print a salted SCRAM-SHA-256 hash of a password for a MessagingUser's
    /// `passwordHash` (reads the password from stdin when not given).
    HashPassword {
        /// The password; prefer stdin, so it stays out of shell history.
        password: Option<String>,
    },
    /// Print what a running node holds (queues, topics, subscriptions, connections, and
    /// addresses the last manifest apply refused to delete), from its HTTP endpoint.
    Status {
        /// The node's HTTP address.
        #[arg(long, env = "ENTREPOT_HTTP", default_value = "127.0.0.1:8080")]
        http: SocketAddr,
    },
    /// Print a ConfigMap with what clients of an address space need to connect (host,
    /// ports, CA certificate), like EnMasse's exports.
    Export {
        /// The address space.
        #[arg(long)]
        address_space: String,
        /// Directory of manifests.
        #[arg(long, env = "ENTREPOT_MANIFESTS", default_value = "manifests")]
        manifests: PathBuf,
        /// Host clients connect to [default: the space's first hostname, else its name].
        #[arg(long)]
        host: Option<String>,
        /// AMQP port.
        #[arg(long, default_value_t = 5672)]
        amqp_port: u16,
        /// AMQPS port (omitted when no certificate is given).
        #[arg(long, default_value_t = 5671)]
        amqps_port: u16,
        /// PEM certificate clients should trust (the CA, or the server's self-signed one).
        #[arg(long, env = "ENTREPOT_TLS_CERT")]
        ca: Option<PathBuf>,
    },
    /// Inspect or change a cluster's membership through a node's HTTP admin API. Changes
    /// go to the leader: every `--http` address is tried until one leads.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
        /// HTTP addresses of the cluster's nodes (comma-separated).
        #[arg(
            long,
            env = "ENTREPOT_HTTP",
            default_value = "127.0.0.1:8080",
            value_delimiter = ',',
            global = true
        )]
        http: Vec<String>,
    },
    /// Drain this node before a scale-down removes it (the preStop hook of a StatefulSet):
    /// unless its ordinal is within the desired replicas (then it is only restarting and
    /// nothing changes), it leaves the Raft membership — handing its leadership over first
    /// — and closes its clients' connections (amqp:connection:forced) so they reconnect
    /// to another node. Exits 0 when drained or not draining, 1 with the reason otherwise.
    Drain(DrainArgs),
    /// Load-test an AMQP 1.0 broker (or NATS JetStream) and check nothing was lost: runs
    /// the separate `entrepot-bench` binary (next to this one, else on PATH) with these
    /// arguments; `entrepot bench --help` shows its flags.
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Bench {
        /// Arguments of `entrepot-bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Draw the throughput-versus-p99 PNG from the per-run JSON files of benches/compare.sh:
    /// runs `entrepot-bench plot` (built with its feature `plot`) with these arguments.
    #[command(disable_help_flag = true, disable_version_flag = true)]
    BenchPlot {
        /// Arguments of `entrepot-bench plot`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// The flags of `entrepot drain`.
#[derive(clap::Args)]
struct DrainArgs {
    /// The node's HTTP address.
    #[arg(long, env = "ENTREPOT_HTTP", default_value = "127.0.0.1:8080")]
    http: String,
    /// Replicas the cluster is being scaled to: a node whose ordinal is below it is only
    /// restarting and is not drained. Without this flag or --desired-replicas-file the
    /// node is drained whatever its ordinal.
    #[arg(long, conflicts_with = "desired_replicas_file")]
    desired_replicas: Option<u64>,
    /// File holding the desired replica count (a ConfigMap key mounted in the pod, edited
    /// by the operator before `kubectl scale`; see examples/kubernetes/README.md). An
    /// unreadable file drains nothing and fails.
    #[arg(long, env = "ENTREPOT_DESIRED_REPLICAS_FILE")]
    desired_replicas_file: Option<PathBuf>,
    /// This node's id [default: the ordinal of the hostname, `entrepot-3` → 3]
    #[arg(long, env = "ENTREPOT_NODE_ID")]
    node_id: Option<u64>,
    /// Only say whether this node would drain (e.g. to check that a pod sees the edited
    /// ConfigMap before scaling down); change nothing
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Print the node's view: role, term, leader, members and how far each has caught up.
    Status,
    /// Add a node: it joins as a learner, catches up, then becomes a voter.
    Add {
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// Its member address: `host:peer_port/amqp_port[/amqps_port]`.
        #[arg(long)]
        addr: String,
    },
    /// Remove a node (a leader commits the change, then steps down).
    Remove {
        /// The node's id.
        #[arg(long)]
        id: u64,
    },
}

/// `entrepot serve`: the node's settings — one [`BrokerConfig`], read from the `--config`
/// file with the flags and `ENTREPOT_*` variables given laid over it by the struct's own
/// clap derive — and, for a clustered node, [`ClusterArgs`].
struct ServeArgs {
    /// `--config`, and the cluster's flags.
    flags: ServeFlags,
    /// Every flag and variable given, for [`BrokerConfig::apply_args`].
    given: clap::ArgMatches,
}

/// The flags of `entrepot serve` that are not settings of [`BrokerConfig`].
#[derive(clap::Args)]
struct ServeFlags {
    /// YAML configuration file; flags and ENTREPOT_* variables override it.
    #[arg(long, env = "ENTREPOT_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Ok(ServeArgs {
            flags: ServeFlags::from_arg_matches(matches)?,
            given: matches.clone(),
        })
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = ServeArgs::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        // The settings are all optional here: one not given keeps the file's value.
        BrokerConfig::augment_args_for_update(ServeFlags::augment_args(cmd))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        ServeArgs::augment_args(cmd)
    }
}

/// The flags of a clustered node (none of them: a single node). Giving `--peers` or
/// `--peers-dns` runs the node clustered; the others need one of them.
#[derive(clap::Args)]
struct ClusterArgs {
    /// Cluster: this node's id [default: the ordinal of the hostname, `entrepot-2` → 2]
    #[arg(long, env = "ENTREPOT_NODE_ID")]
    node_id: Option<u64>,
    /// Cluster: initial members `id=host:peer_port/amqp_port[/amqps_port],…` (this node
    /// among them); giving peers (or --peers-dns) runs the node clustered
    #[arg(long, env = "ENTREPOT_PEERS")]
    peers: Option<String>,
    /// Cluster: a StatefulSet's headless service (`entrepot.ns.svc.cluster.local`); peers
    /// are `<set>-0 … <set>-(N-1)` under it, with N = --cluster-size
    #[arg(long, env = "ENTREPOT_PEERS_DNS")]
    peers_dns: Option<String>,
    /// Cluster: initial members when peers come from DNS [default: 3]
    #[arg(long, env = "ENTREPOT_CLUSTER_SIZE", default_value_t = 3)]
    cluster_size: u32,
    /// Cluster: Raft entries between two snapshots of the store (after one, the Raft log
    /// before it may be purged) [default: 16384]
    #[arg(long, env = "ENTREPOT_RAFT_SNAPSHOT_EVERY")]
    raft_snapshot_every: Option<u64>,
    /// Cluster: file holding the secret (at least 16 bytes) every node shares; peers prove
    /// they know it before any Raft traffic (strongly recommended)
    #[arg(long, env = "ENTREPOT_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<PathBuf>,
    /// Cluster: PEM certificate chain of this node on the inter-node port, shown to peers
    /// in both directions; it must name the host part of this node's member address
    /// (with --cluster-tls-key and --cluster-tls-ca: all three or none)
    #[arg(long, env = "ENTREPOT_CLUSTER_TLS_CERT")]
    cluster_tls_cert: Option<PathBuf>,
    /// Cluster: PEM private key of --cluster-tls-cert
    #[arg(long, env = "ENTREPOT_CLUSTER_TLS_KEY")]
    cluster_tls_key: Option<PathBuf>,
    /// Cluster: PEM CA certificate(s) every node's certificate must chain to; inter-node
    /// traffic is then TLS, mutually authenticated
    #[arg(long, env = "ENTREPOT_CLUSTER_TLS_CA")]
    cluster_tls_ca: Option<PathBuf>,
    /// Cluster: inter-node listen address [default: 0.0.0.0:5673]
    #[arg(long, env = "ENTREPOT_CLUSTER_LISTEN")]
    cluster_listen: Option<SocketAddr>,
    /// Cluster: at start, ask the leader to make this node a voter (learner first, until
    /// it has caught up); a member is told so and nothing changes. The default with
    /// --peers-dns; with --peers it needs --cluster-advertise unless this node is among
    /// the peers
    #[arg(long, env = "ENTREPOT_AUTO_JOIN", conflicts_with = "no_auto_join")]
    auto_join: bool,
    /// Cluster: never join by itself: a node outside the membership waits for `entrepot
    /// cluster add`
    #[arg(long, env = "ENTREPOT_NO_AUTO_JOIN")]
    no_auto_join: bool,
    /// Cluster: this node's member address `host:peer_port/amqp_port[/amqps_port]`, as
    /// the others dial it, announced when it joins [default: with --peers-dns
    /// `<hostname>.<service>:<ports>`, with --peers its own entry]
    #[arg(long, env = "ENTREPOT_CLUSTER_ADVERTISE")]
    cluster_advertise: Option<String>,
    /// Cluster (groups mode), for tests and upgrades only: the highest metadata level this
    /// node advertises and runs at, 1 to the build's own (2) [default: the build's]. At 1
    /// the node acts as a build from before session 19: while it is a member, no node
    /// proposes metadata op kind 9 or writes snapshot version 2
    #[arg(long, env = "ENTREPOT_METADATA_LEVEL_MAX", hide = true)]
    metadata_level_max: Option<u8>,
}

impl ClusterArgs {
    /// The cluster settings, when the flags ask for a cluster.
    fn cluster(
        &self,
        config: &BrokerConfig,
    ) -> anyhow::Result<Option<entrepot::raft::ClusterConfig>> {
        use entrepot_cluster::identity;
        if self.peers.is_none() && self.peers_dns.is_none() {
            // Cluster-only settings on a single node are a mistake worth stopping for: an
            // operator who set them believes the node is clustered (and protected).
            let cluster_only = [
                ("--cluster-secret-file", self.cluster_secret_file.is_some()),
                ("--cluster-tls-cert", self.cluster_tls_cert.is_some()),
                ("--cluster-tls-key", self.cluster_tls_key.is_some()),
                ("--cluster-tls-ca", self.cluster_tls_ca.is_some()),
                ("--cluster-listen", self.cluster_listen.is_some()),
            ];
            if let Some((flag, _)) = cluster_only.iter().find(|(_, set)| *set) {
                anyhow::bail!("{flag} needs a cluster: give --peers or --peers-dns as well");
            }
            return Ok(None);
        }
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let node_id = identity::resolve_node_id(self.node_id, &hostname)?;
        let listen = self
            .cluster_listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 5673)));
        let peers = match (&self.peers, &self.peers_dns) {
            (Some(list), _) => identity::parse_peers(list)?,
            (None, Some(service)) => identity::statefulset_peers(
                &hostname,
                service,
                self.cluster_size,
                listen.port(),
                config.listen.port(),
                config.tls_listen().map(|a| a.port()),
            )?,
            (None, None) => Vec::new(),
        };
        let auto_join = self.auto_join_addr(&hostname, node_id, &peers, listen, config)?;
        Ok(Some(entrepot::raft::ClusterConfig {
            node_id,
            peers,
            listen,
            snapshot_every: self
                .raft_snapshot_every
                .unwrap_or(entrepot::raft::SNAPSHOT_EVERY_ENTRIES),
            secret: self
                .cluster_secret_file
                .as_deref()
                .map(entrepot_cluster::PeerSecret::from_file)
                .transpose()?
                .map(std::sync::Arc::new),
            tls: self.cluster_tls()?,
            auto_join,
            metadata_level_max: self.metadata_level_max()?,
        }))
    }

    /// `--metadata-level-max`, checked against the levels this build knows.
    fn metadata_level_max(&self) -> anyhow::Result<u8> {
        use entrepot::raft::meta_machine::{METADATA_LEVEL_MAX, METADATA_LEVEL_MIN};
        let level = self.metadata_level_max.unwrap_or(METADATA_LEVEL_MAX);
        if !(METADATA_LEVEL_MIN..=METADATA_LEVEL_MAX).contains(&level) {
            anyhow::bail!(
                "--metadata-level-max {level}: this build knows metadata levels \
                 {METADATA_LEVEL_MIN} to {METADATA_LEVEL_MAX} (METADATA_LEVEL_MAX)"
            );
        }
        Ok(level)
    }

    /// The member address this node announces when it auto-joins, or `None` when it does
    /// not (`--no-auto-join`, or `--peers` without `--auto-join`).
    fn auto_join_addr(
        &self,
        hostname: &str,
        node_id: u64,
        peers: &[entrepot_cluster::identity::Peer],
        listen: SocketAddr,
        config: &BrokerConfig,
    ) -> anyhow::Result<Option<String>> {
        use entrepot_cluster::identity;
        let on = !self.no_auto_join && (self.auto_join || self.peers.is_none());
        if !on {
            return Ok(None);
        }
        if let Some(addr) = &self.cluster_advertise {
            identity::parse_peers(&format!("{node_id}={addr}")).context("--cluster-advertise")?;
            return Ok(Some(addr.clone()));
        }
        if let Some(own) = peers.iter().find(|p| p.id == node_id) {
            return Ok(Some(own.addr.clone()));
        }
        match (&self.peers, &self.peers_dns) {
            (None, Some(service)) => Ok(Some(identity::statefulset_member_addr(
                hostname,
                service,
                listen.port(),
                config.listen.port(),
                config.tls_listen().map(|a| a.port()),
            )?)),
            _ => anyhow::bail!(
                "--auto-join: node {node_id} is not among --peers; give its member address \
                 with --cluster-advertise host:peer_port/amqp_port[/amqps_port]"
            ),
        }
    }

    /// The inter-node TLS files: all three flags, or none.
    fn cluster_tls(&self) -> anyhow::Result<Option<std::sync::Arc<entrepot_cluster::PeerTls>>> {
        let files = (
            &self.cluster_tls_cert,
            &self.cluster_tls_key,
            &self.cluster_tls_ca,
        );
        match files {
            (Some(cert), Some(key), Some(ca)) => {
                let tls = entrepot_cluster::PeerTls::load(cert, key, ca)
                    .context("loading the inter-node TLS files (--cluster-tls-*)")?;
                Ok(Some(std::sync::Arc::new(tls)))
            }
            (None, None, None) => Ok(None),
            _ => anyhow::bail!(
                "--cluster-tls-cert, --cluster-tls-key and --cluster-tls-ca go together: \
                 give all three (TLS between nodes) or none"
            ),
        }
    }
}

impl ServeArgs {
    /// The node's settings: the file's (or the defaults), with the flags and variables
    /// given over them, validated.
    fn to_config(&self) -> anyhow::Result<BrokerConfig> {
        let mut c = match &self.flags.config {
            Some(path) => BrokerConfig::from_file(path).map_err(anyhow::Error::msg)?,
            None => BrokerConfig::default(),
        };
        c.apply_args(&self.given)?;
        c.validate().map_err(anyhow::Error::msg)?;
        Ok(c)
    }
}

/// Raises this process's open-files limit (RLIMIT_NOFILE) to its hard limit and logs
/// the figure: every connection and every segment is a descriptor, and the soft default
/// (often 1024) would refuse clients long before `max-connections`.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-files limit");
        return;
    }
    let soft = limit.rlim_cur;
    if soft < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            tracing::warn!(soft, hard = limit.rlim_max, error = %std::io::Error::last_os_error(), "cannot raise the open-files limit");
            return;
        }
    }
    tracing::info!(
        open_files = limit.rlim_cur,
        was = soft,
        "open-files limit (RLIMIT_NOFILE)"
    );
}

/// Fetches `/status` from a running node and prints it.
fn status(http: SocketAddr) -> anyhow::Result<()> {
    let (status, body) = http_request(&http.to_string(), "GET", "/status")?;
    anyhow::ensure!(status.starts_with("200"), "{http} answered: {status}");
    print!("{body}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            raise_open_files_limit();
            let config = args.to_config()?;
            let cluster = args.flags.cluster.cluster(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting runtime")?;
            runtime.block_on(serve(config, cluster))
        }
        Command::Cluster { action, http } => cluster_command(action, &http),
        Command::Drain(args) => drain(&args),
        Command::Validate { dir } => validate(&dir),
        Command::HashPassword { password } => hash_password(password),
        Command::Status { http } => status(http),
        Command::Export {
            address_space,
            manifests,
            host,
            amqp_port,
            amqps_port,
            ca,
        } => {
            let ca_pem = ca
                .map(|p| {
                    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
                })
                .transpose()?;
            let opts = entrepot::manifest::export::ExportOptions {
                host: host.as_deref(),
                amqp_port,
                amqps_port: ca_pem.as_ref().map(|_| amqps_port),
                ca_pem,
            };
            let text = entrepot::manifest::export::export(&manifests, &address_space, &opts)
                .map_err(anyhow::Error::msg)?;
            print!("{text}");
            Ok(())
        }
        Command::Bench { args } => run_bench(args),
        Command::BenchPlot { args } => run_bench(
            std::iter::once(OsString::from("plot"))
                .chain(args)
                .collect(),
        ),
    }
}

/// The load generator's binary: its own crate (`bench/`), so the broker links no AMQP
/// client, progress bar, histograms or plotting.
const BENCH_BINARY: &str = "entrepot-bench";

/// `entrepot bench ARGS`: replaces this process with `entrepot-bench ARGS`, found next to
/// this executable (where cargo builds and installs put it), else on PATH. Its exit status,
/// signals and output are then the bench's own. Returns only when it cannot be started.
fn run_bench(args: Vec<OsString>) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(BENCH_BINARY)))
        .filter(|path| path.is_file());
    let program = sibling
        .as_deref()
        .unwrap_or_else(|| Path::new(BENCH_BINARY));
    let error = std::process::Command::new(program).args(args).exec();
    if error.kind() == std::io::ErrorKind::NotFound {
        anyhow::bail!(
            "`entrepot bench` runs the separate `{BENCH_BINARY}` binary, found neither next \
             to this executable nor on PATH: build it with `cargo build --release -p \
             entrepot-bench` (add `--features plot,nats` for `bench-plot` and NATS) and keep \
             it next to `entrepot`"
        );
    }
    Err(anyhow::Error::new(error).context(format!("starting {}", program.display())))
}

fn validate(dir: &std::path::Path) -> anyhow::Result<()> {
    match entrepot::manifest::load::load_dir(dir) {
        Ok(c) => {
            let addresses: usize = c.spaces.values().map(|s| s.addresses.len()).sum();
            let users: usize = c.spaces.values().map(|s| s.users.len()).sum();
            println!(
                "{}: ok ({} address spaces, {addresses} addresses, {users} users)",
                dir.display(),
                c.spaces.len()
            );
            Ok(())
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            std::process::exit(1);
        }
    }
}

fn hash_password(password: Option<String>) -> anyhow::Result<()> {
    let password = match password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    anyhow::ensure!(!password.is_empty(), "the password must not be empty");
    let credential = entrepot::amqp::scram::ScramCredential::generate(&password)
        .map_err(|_| anyhow::anyhow!("no system randomness for the salt"))?;
    println!("{credential}");
    Ok(())
}

/// How long `entrepot cluster` keeps looking for a leader among the given nodes.
const CLUSTER_LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// One HTTP request to a node's admin API; returns the status line and the body.
fn http_request(http: &str, method: &str, path: &str) -> anyhow::Result<(String, String)> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let timeout = std::time::Duration::from_secs(5);
    let addr = http
        .to_socket_addrs()
        .with_context(|| format!("resolving {http}"))?
        .next()
        .with_context(|| format!("{http} resolves to nothing"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {http}"))?;
    stream.set_read_timeout(Some(entrepot::raft::admin::CHANGE_TIMEOUT + timeout))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {http}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or((response.as_str(), ""));
    let status = head.lines().next().unwrap_or_default();
    let status = status.split_once(' ').map_or(status, |(_, s)| s).to_owned();
    Ok((status, body.to_owned()))
}

/// `entrepot cluster …`: status from the first node that answers; changes on the leader.
fn cluster_command(action: ClusterAction, http: &[String]) -> anyhow::Result<()> {
    let (method, path) = match &action {
        ClusterAction::Status => ("GET", "/cluster".to_owned()),
        ClusterAction::Add { id, addr } => ("POST", format!("/cluster/add?id={id}&addr={addr}")),
        ClusterAction::Remove { id } => ("POST", format!("/cluster/remove?id={id}")),
    };
    let mut last = anyhow::anyhow!("no --http address given");
    // During an election no node leads: keep asking, for a bounded time.
    let deadline = std::time::Instant::now() + CLUSTER_LEADER_WAIT;
    loop {
        for node in http {
            match http_request(node, method, &path) {
                Ok((status, body)) if status.starts_with("200") => {
                    print!("{body}");
                    return Ok(());
                }
                // Not the leader: try the next node.
                Ok((status, body)) if status.starts_with("421") => {
                    last = anyhow::anyhow!("{node}: {}", body.trim());
                }
                Ok((status, body)) => anyhow::bail!("{node} answered {status}: {}", body.trim()),
                Err(e) => last = e,
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Largest desired-replicas file read (a number and a newline).
const DESIRED_REPLICAS_FILE_MAX_BYTES: u64 = 64;
// The drain's HTTP request waits as long as any membership change (`http_request`).
const _: () = assert!(
    entrepot::raft::drain::DRAIN_TIMEOUT.as_secs()
        <= entrepot::raft::admin::CHANGE_TIMEOUT.as_secs()
);

/// The desired replica count in `path` (a ConfigMap key: digits, maybe a newline).
fn read_desired_replicas(path: &Path) -> anyhow::Result<u64> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(DESIRED_REPLICAS_FILE_MAX_BYTES)
                .read_to_string(&mut text)
        })
        .with_context(|| format!("reading the desired replicas from {}", path.display()))?;
    text.trim().parse().with_context(|| {
        format!(
            "{}: expected a replica count, found {:?}",
            path.display(),
            text.trim()
        )
    })
}

/// `entrepot drain`: see [`Command::Drain`].
fn drain(args: &DrainArgs) -> anyhow::Result<()> {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let node = entrepot_cluster::identity::resolve_node_id(args.node_id, &hostname)?;
    let desired = match (&args.desired_replicas, &args.desired_replicas_file) {
        (Some(n), _) => Some(*n),
        (None, Some(path)) => Some(read_desired_replicas(path)?),
        (None, None) => None,
    };
    if let Some(desired) = desired {
        if node < desired {
            println!(
                "not draining: node {node} is within the desired {desired} replicas (a restart)"
            );
            return Ok(());
        }
        println!("draining node {node}: beyond the desired {desired} replicas (a scale-down)");
    } else {
        println!("draining node {node} (no desired replica count given)");
    }
    if args.dry_run {
        println!("dry run: not draining");
        return Ok(());
    }
    println!(
        "asking {} to leave the cluster (POST /cluster/drain)",
        args.http
    );
    let (status, body) = http_request(&args.http, "POST", "/cluster/drain")?;
    if status.starts_with("200") {
        print!("{body}");
        return Ok(());
    }
    eprint!("{body}");
    anyhow::bail!("drain of node {node} failed: {status}")
}

async fn serve(
    config: BrokerConfig,
    cluster: Option<entrepot::raft::ClusterConfig>,
) -> anyhow::Result<()> {
    if let Some(cluster) = cluster {
        if config.cluster_mode == entrepot::config::ClusterMode::Groups {
            return serve_groups(config, cluster).await;
        }
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let node = entrepot::raft::ClusterNode::start(config, cluster, shutdown_rx).await?;
        tokio::select! {
            _ = wait_for_signal() => {}
            reason = node.failed() => {
                tracing::error!(%reason, "Raft failed: exiting so that this node is restarted");
                let _ = shutdown_tx.send(true);
                let _ = node.stopped().await;
                anyhow::bail!("Raft failed: {reason}");
            }
        }
        tracing::info!("shutting down: closing connections, stopping Raft");
        let _ = shutdown_tx.send(true);
        return Ok(node.stopped().await?);
    }
    if config.sink {
        tracing::warn!(
            "SINK MODE: this node accepts every message and DROPS it; nothing is stored or \
             delivered. For measuring `entrepot bench` only, never for real traffic"
        );
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let node = server::Node::start(config, shutdown_rx).await?;
    wait_for_signal().await;
    tracing::info!("shutting down: closing connections, finishing syncs");
    let _ = shutdown_tx.send(true);
    Ok(node.stopped().await?)
}

/// A clustered node in `cluster-mode: groups` (a Raft group per address).
async fn serve_groups(
    config: BrokerConfig,
    cluster: entrepot::raft::ClusterConfig,
) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let node = entrepot::raft::groups_node::GroupsNode::start(config, cluster, shutdown_rx).await?;
    tokio::select! {
        _ = wait_for_signal() => {}
        reason = node.failed() => {
            // No hand-over: the groups here cannot write. Exiting non-zero gets the node
            // restarted (Kubernetes, systemd); it replays its node log then.
            tracing::error!(%reason, "a group's Raft failed: exiting so that this node is restarted");
            let _ = shutdown_tx.send(true);
            let _ = node.stopped().await;
            anyhow::bail!("a group's Raft failed: {reason}");
        }
    }
    // A planned stop (a restart, a rolling update): the groups led here move to another
    // voter now rather than after an election once this node is gone.
    let report = node.hand_over().await;
    tracing::info!("before stopping: {report}");
    tracing::info!("shutting down: closing connections, stopping the groups");
    let _ = shutdown_tx.send(true);
    Ok(node.stopped().await?)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use entrepot_storage::SyncPolicy;

    /// The settings `entrepot serve ARGS` would run with.
    fn serve_config(args: &[&str]) -> BrokerConfig {
        let argv = ["entrepot", "serve"].iter().chain(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(serve) => serve.to_config().unwrap(),
            _ => unreachable!("not serve"),
        }
    }

    /// The cluster flags `entrepot serve ARGS` would run with.
    fn cluster_flags(args: &[&str]) -> ClusterArgs {
        let argv = ["entrepot", "serve"].iter().chain(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(serve) => serve.flags.cluster,
            _ => unreachable!("not serve"),
        }
    }

    #[test]
    fn auto_join_is_on_with_dns_peers_and_its_switches_read_true_and_false() {
        let c = cluster_flags(&["--peers-dns", "entrepot.ns.svc"]);
        assert!(!c.auto_join && !c.no_auto_join);
        assert!(cluster_flags(&["--no-auto-join"]).no_auto_join);
        assert!(
            Cli::try_parse_from(["entrepot", "serve", "--auto-join", "--no-auto-join"]).is_err()
        );
        // Only this test sets the variable (nextest runs each test in its own process).
        std::env::set_var("ENTREPOT_NO_AUTO_JOIN", "false");
        assert!(
            !cluster_flags(&[]).no_auto_join,
            "ENTREPOT_NO_AUTO_JOIN=false"
        );
        std::env::set_var("ENTREPOT_NO_AUTO_JOIN", "true");
        assert!(
            cluster_flags(&[]).no_auto_join,
            "ENTREPOT_NO_AUTO_JOIN=true"
        );
        std::env::remove_var("ENTREPOT_NO_AUTO_JOIN");
    }

    #[test]
    fn a_drain_reads_the_desired_replicas_from_a_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replicas");
        std::fs::write(&path, "3\n").unwrap();
        assert_eq!(read_desired_replicas(&path).unwrap(), 3);
        std::fs::write(&path, "three").unwrap();
        assert!(read_desired_replicas(&path).is_err());
        assert!(read_desired_replicas(&dir.path().join("missing")).is_err());
        std::fs::write(&path, "1".repeat(1000)).unwrap();
        assert!(
            read_desired_replicas(&path).is_err(),
            "read bounded, then not a count"
        );
    }

    #[test]
    fn flags_given_override_the_file_and_flags_not_given_keep_its_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entrepot.yaml");
        let file = "auto-create: false\nsink: true\nmax-delivery-attempts: 4\nsync: never\n";
        std::fs::write(&path, file).unwrap();
        let path = path.to_str().unwrap();

        let c = serve_config(&["--config", path, "--max-delivery-attempts", "7"]);
        assert!(
            !c.auto_create && c.sink,
            "booleans not given keep the file's values"
        );
        assert_eq!(c.max_delivery_attempts, 7);
        assert_eq!(c.sync, SyncPolicy::Never);

        let c = serve_config(&[
            "--config",
            path,
            "--auto-create",
            "true",
            "--sink",
            "false",
            "--sync",
            "interval:5",
        ]);
        assert!(c.auto_create && !c.sink);
        assert_eq!(
            c.sync,
            SyncPolicy::Interval(std::time::Duration::from_millis(5))
        );
        assert_eq!(c.max_delivery_attempts, 4);

        let defaults = BrokerConfig::default();
        let c = serve_config(&[]);
        assert_eq!(
            (c.auto_create, c.sink),
            (defaults.auto_create, defaults.sink)
        );
        assert_eq!((c.listen, c.sync), (defaults.listen, defaults.sync));
        assert!(
            serve_config(&["--sink"]).sink,
            "--sink alone turns the sink on"
        );
    }
}
