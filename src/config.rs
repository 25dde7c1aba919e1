//! Broker settings: defaults, a YAML file (`--config`), `ENTREPOT_*` environment
//! variables and command-line flags, in rising order of precedence.
//!
//! One struct, [`BrokerConfig`], is all three: serde reads the file (kebab-case keys, an
//! unknown key refused by name), clap reads the flags and variables of `entrepot serve`
//! (the same names: `--data-dir`, `ENTREPOT_DATA_DIR`, `data-dir:`) and lays only those
//! given over the file's values ([`BrokerConfig::apply_args`]). A setting means the same on
//! a single node and on a clustered one; the few a cluster bounds say so in their docs.
//! The cluster's own flags (peers, inter-node port and its TLS) are `entrepot serve`'s,
//! in `main.rs`.
//!
//! Every limit has a named default here and a check in [`BrokerConfig::validate`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use entrepot_storage::SyncPolicy;
use serde::Deserialize;

/// Default AMQP listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:5672";
/// Default AMQPS listener, used when a TLS certificate is configured.
pub const DEFAULT_LISTEN_TLS: &str = "0.0.0.0:5671";
/// Default HTTP listener (metrics, health).
pub const DEFAULT_HTTP: &str = "0.0.0.0:8080";
/// Default largest message: 100 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 100 * 1024 * 1024;
/// Default max-frame-size announced in `open`: 1 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 1024 * 1024;
/// Default failed deliveries before a message is dead-lettered.
pub const DEFAULT_MAX_DELIVERY_ATTEMPTS: u32 = 10;
/// Default link credit granted to a producer (refilled at half).
pub const DEFAULT_LINK_CREDIT: u32 = 1000;
/// Default most unsettled deliveries a consumer link may hold.
pub const DEFAULT_UNSETTLED_PER_LINK: usize = 5000;
/// Default cap on concurrent connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Sessions per connection (channel-max + 1).
pub const DEFAULT_MAX_SESSIONS: u16 = 256;
/// Links per session (handle-max + 1).
pub const DEFAULT_MAX_LINKS: u32 = 4096;
/// Idle time-out announced in `open`: the peer must send something this often.
pub const DEFAULT_IDLE_TIMEOUT_MS: u32 = 60_000;
/// Default longest a client may take from connecting to its `open` (header exchange,
/// SASL and open, as one deadline), like RabbitMQ's `handshake_timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u32 = 10_000;
/// Default bytes of multi-frame deliveries still arriving that one connection may hold.
pub const DEFAULT_MAX_INCOMPLETE_BYTES_PER_CONNECTION: u64 = 128 * 1024 * 1024;
/// Default bytes of multi-frame deliveries still arriving, broker-wide.
pub const DEFAULT_MAX_INCOMPLETE_BYTES: u64 = 1024 * 1024 * 1024;
/// Default most queues and topics the broker holds before auto-creation is refused.
pub const DEFAULT_MAX_AUTO_CREATED_ADDRESSES: usize = 10_000;
/// Default segment size of the message log: 128 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 128 * 1024 * 1024;
/// Largest record of a groups-mode node log: one entry of a group (a batch of proposals
/// of up to `MAX_BATCH_BYTES`, or one message of up to the cluster's 4 MiB, plus
/// framing). Here, not in `raft::groups_node`, because the node-log segment setting is
/// bounded by it and `config` sits below `raft`.
pub const NODE_LOG_RECORD_MAX: u32 = 16 << 20;
/// Default segment size of a groups-mode node log (`node-log-segment-bytes`): 256 MiB.
pub const DEFAULT_NODE_LOG_SEGMENT_BYTES: u64 = 256 * 1024 * 1024;
/// Smallest node-log segment: two of the node log's largest records
/// ([`NODE_LOG_RECORD_MAX`], 16 MiB), so the largest entry of a group always fits a
/// segment with its framing and a segment is not rolled after every large entry.
pub const MIN_NODE_LOG_SEGMENT_BYTES: u64 = 2 * NODE_LOG_RECORD_MAX as u64;
/// Default most messages one subscription holds before dropping the oldest.
pub const DEFAULT_SUBSCRIPTION_BACKLOG: usize = 1_000_000;
/// Bytes of store header and slack on top of the message in one log record.
pub const RECORD_OVERHEAD_BYTES: u64 = 64 * 1024;

// The field docs (also `entrepot serve --help`) state these defaults as numbers.
const _: () = assert!(DEFAULT_SEGMENT_BYTES == 134_217_728);
const _: () = assert!(DEFAULT_MAX_MESSAGE_BYTES == 104_857_600);
const _: () = assert!(DEFAULT_MAX_AUTO_CREATED_ADDRESSES == 10_000);
const _: () = assert!(DEFAULT_MAX_INCOMPLETE_BYTES_PER_CONNECTION == 134_217_728);
const _: () = assert!(DEFAULT_MAX_INCOMPLETE_BYTES == 1_073_741_824);
const _: () = assert!(DEFAULT_MAX_DELIVERY_ATTEMPTS == 10);
const _: () = assert!(DEFAULT_HANDSHAKE_TIMEOUT_MS == 10_000);
const _: () = assert!(DEFAULT_NODE_LOG_SEGMENT_BYTES == 268_435_456);
const _: () = assert!(MIN_NODE_LOG_SEGMENT_BYTES == 33_554_432);
// The largest node-log record fits the smallest segment with its headers, and every
// allowed size is one the storage crate accepts.
const _: () = assert!(
    MIN_NODE_LOG_SEGMENT_BYTES
        >= NODE_LOG_RECORD_MAX as u64
            + entrepot_storage::SEGMENT_HEADER_LEN as u64
            + entrepot_storage::RECORD_HEADER_LEN as u64
);
const _: () = assert!(MIN_NODE_LOG_SEGMENT_BYTES >= entrepot_storage::MIN_SEGMENT_BYTES);
const _: () = assert!(DEFAULT_NODE_LOG_SEGMENT_BYTES <= entrepot_storage::MAX_SEGMENT_BYTES);

/// Reads `sync:` in the YAML file through [`SyncPolicy`]'s `FromStr` (`always`, `never`,
/// `interval:<ms>`), so a bad value fails the file with the value named, once, at load.
fn deserialize_sync<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SyncPolicy, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// A user for SASL PLAIN until address-space manifests provide real ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticUser {
    /// The SASL PLAIN authentication identity.
    pub username: String,
    /// Its password, in clear (a development convenience; manifests hold hashes).
    pub password: String,
}

/// All broker settings. The YAML file uses the kebab-case field names (`data-dir:`); a key
/// that is not one of them fails the load, naming it (`deny_unknown_fields`). The settings
/// with a flag take it from clap under the same name, with an `ENTREPOT_*` variable; the
/// others are file-only (`#[arg(skip)]`).
#[derive(Debug, Clone, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct BrokerConfig {
    /// AMQP listener (clustered: the front door of this node). Default `0.0.0.0:5672`.
    #[arg(long, env = "ENTREPOT_LISTEN")]
    pub listen: SocketAddr,
    /// HTTP listener of /metrics, /healthz, /readyz, /status (and /cluster when
    /// clustered). Default `0.0.0.0:8080`.
    #[arg(long, env = "ENTREPOT_HTTP")]
    pub http: SocketAddr,
    /// Directory of the message store, the ack log, the subscription registry and, when
    /// clustered, the Raft log (`raft/`). Default `./data`.
    #[arg(long, env = "ENTREPOT_DATA_DIR")]
    pub data_dir: PathBuf,
    /// When a producer's message counts as stored, i.e. what survives a power cut
    /// (`always` | `never` | `interval:<ms>`, default `always`); the same meaning on one
    /// node and clustered. `always`: `accepted` is sent only after the record was synced
    /// (fdatasync) — on one node to its message log, clustered to the Raft log of a
    /// majority (each node syncs its own before acknowledging the append). `interval:<ms>`:
    /// syncs happen at most every `<ms>` and `accepted` still waits for the sync that
    /// covers the message, so a power cut loses only unaccepted messages; the interval
    /// trades latency for fewer syncs. `never`: nothing is synced, `accepted` comes at
    /// once; survives a process crash, not a power cut (tests and benchmarks only).
    #[serde(deserialize_with = "deserialize_sync")]
    #[arg(long, env = "ENTREPOT_SYNC")]
    pub sync: SyncPolicy,
    /// Segment size of the message log in bytes. Default 134217728 (128 MiB).
    #[arg(long, env = "ENTREPOT_SEGMENT_BYTES")]
    pub segment_bytes: u64,
    /// In `cluster-mode: groups`, segment size of the node log (`<data-dir>/host`, every
    /// group's Raft entries) in bytes: each segment is preallocated whole, and a node whose
    /// disk cannot hold the next one stops (see `GroupsNode::failed`). Between 33554432
    /// (32 MiB, twice the largest node-log record) and 1073741824 (1 GiB). Default
    /// 268435456 (256 MiB). Ignored in other modes.
    #[arg(long, env = "ENTREPOT_NODE_LOG_SEGMENT_BYTES")]
    pub node_log_segment_bytes: u64,
    /// Create a queue (or, under a `topic-prefixes` prefix, a topic) when a client first
    /// attaches to an unknown address. Default true; always false with `manifests`.
    #[arg(long, env = "ENTREPOT_AUTO_CREATE", action = clap::ArgAction::Set)]
    pub auto_create: bool,
    /// Auto-creation is refused (`amqp:resource-limit-exceeded`) once the broker holds
    /// this many queues and topics; declared (manifest) addresses are not limited.
    /// Default 10000.
    #[arg(long, env = "ENTREPOT_MAX_AUTO_CREATED_ADDRESSES")]
    pub max_auto_created_addresses: usize,
    /// Largest message in bytes (clustered: at most 4 MiB, the replication limit).
    /// Default 104857600 (100 MiB).
    #[arg(long, env = "ENTREPOT_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: u64,
    /// Bytes of deliveries still arriving in several frames (`more=true`) that one
    /// connection may hold; a delivery that would go beyond is refused (its link detached
    /// with `amqp:resource-limit-exceeded`). At least `max-message-bytes`. Default
    /// 134217728 (128 MiB).
    #[arg(long, env = "ENTREPOT_MAX_INCOMPLETE_BYTES_PER_CONNECTION")]
    pub max_incomplete_bytes_per_connection: u64,
    /// The same, broker-wide: a connection whose delivery does not fit is not read until
    /// room frees up, for at most `INCOMPLETE_BUDGET_WAIT` (2 s), then refused likewise.
    /// Default 1073741824 (1 GiB).
    #[arg(long, env = "ENTREPOT_MAX_INCOMPLETE_BYTES")]
    pub max_incomplete_bytes: u64,
    /// max-frame-size announced in `open`, at least 4096. Default [`DEFAULT_MAX_FRAME_BYTES`].
    #[arg(skip)]
    pub max_frame_bytes: u32,
    /// Failed deliveries (released with delivery-failed, or modified) before a message
    /// is moved to `dead-letter-address`. Default 10.
    #[arg(long, env = "ENTREPOT_MAX_DELIVERY_ATTEMPTS")]
    pub max_delivery_attempts: u32,
    /// Queue that receives dead-lettered messages. Default `DLQ`.
    #[arg(skip)]
    pub dead_letter_address: String,
    /// Queue that receives expired messages. Default `ExpiryQueue`.
    #[arg(skip)]
    pub expiry_address: String,
    /// Link credit granted to a producer, refilled at half. Default [`DEFAULT_LINK_CREDIT`].
    #[arg(skip)]
    pub link_credit: u32,
    /// Most unsettled deliveries a consumer link holds. Default
    /// [`DEFAULT_UNSETTLED_PER_LINK`].
    #[arg(skip)]
    pub unsettled_per_link: usize,
    /// Concurrent client connections (plain and TLS together); more wait to be accepted.
    /// Default [`DEFAULT_MAX_CONNECTIONS`].
    #[arg(skip)]
    pub max_connections: usize,
    /// Sessions per connection (channel-max + 1). Default [`DEFAULT_MAX_SESSIONS`].
    #[arg(skip)]
    pub max_sessions: u16,
    /// Links per session (handle-max + 1). Default [`DEFAULT_MAX_LINKS`].
    #[arg(skip)]
    pub max_links: u32,
    /// Idle time-out announced in `open`: a peer silent for longer is disconnected.
    /// Default [`DEFAULT_IDLE_TIMEOUT_MS`].
    #[arg(skip)]
    pub idle_timeout_ms: u32,
    /// Milliseconds a client has from connecting to its `open`: protocol header, SASL
    /// and open under one deadline, however slowly the bytes come. Default 10000.
    #[arg(long, env = "ENTREPOT_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: u32,
    /// Allow SASL ANONYMOUS and connections without SASL. Default true.
    #[arg(long, env = "ENTREPOT_ALLOW_ANONYMOUS", action = clap::ArgAction::Set)]
    pub allow_anonymous: bool,
    /// SASL PLAIN users when no manifests declare MessagingUsers.
    #[arg(skip)]
    pub users: Vec<StaticUser>,
    /// Addresses starting with one of these are topics (unless they exist already).
    #[arg(skip)]
    pub topic_prefixes: Vec<String>,
    /// Bytes a topic keeps after its subscriptions consumed them, for replay (0: none).
    #[arg(skip)]
    pub topic_retention_bytes: u64,
    /// Seconds a topic keeps messages for replay (within the byte limit).
    #[arg(skip)]
    pub topic_retention_secs: Option<u64>,
    /// Messages a subscription may hold; beyond it the oldest are dropped and counted.
    #[arg(skip)]
    pub subscription_backlog_max: usize,
    /// `drop-oldest` (default) or `block` (hold producers back by credit).
    #[arg(skip)]
    pub subscription_backlog_policy: BacklogPolicy,
    /// Directory of AddressSpace/Address/MessagingUser/plan manifests; when set, only
    /// declared addresses exist and clients authenticate as MessagingUsers.
    #[arg(long, env = "ENTREPOT_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Address space of clients whose hostname selects none (default: the only space).
    #[arg(long, env = "ENTREPOT_DEFAULT_ADDRESS_SPACE")]
    pub default_address_space: Option<String>,
    /// YAML map `token: username` for `serviceaccount` users.
    #[arg(long, env = "ENTREPOT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// AMQPS listener; defaults to 0.0.0.0:5671 when `tls-cert` is set.
    #[arg(long, env = "ENTREPOT_LISTEN_TLS")]
    pub listen_tls: Option<SocketAddr>,
    /// PEM certificate chain of the AMQPS listener (with `tls-key`); reloaded on change.
    #[arg(long, env = "ENTREPOT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls-cert` (the two go together).
    #[arg(long, env = "ENTREPOT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// How a clustered node (`--peers`) replicates: `one-group` (the default) runs one
    /// Raft group over the whole store, served by its leader (followers proxy clients to
    /// it); `groups` runs a Raft group per address over one node log per node, leaders
    /// spread over the nodes, a link attached where its address is not led redirected
    /// (`amqp:link:redirect`) to its leader. Ignored on a single node.
    #[arg(long, env = "ENTREPOT_CLUSTER_MODE", value_enum)]
    pub cluster_mode: ClusterMode,
    /// In `cluster-mode: groups`, what happens to a link attached to a node that does not
    /// lead its address: `redirect` (the default) refuses it with `amqp:link:redirect`
    /// naming the leader; `forward` keeps a producer link here and stores each message
    /// through the leader over the inter-node connection (consumer links are still
    /// redirected). Ignored in other modes.
    #[arg(long, env = "ENTREPOT_LINK_ROUTING", value_enum)]
    pub link_routing: LinkRouting,
    /// In `cluster-mode: groups`: hibernate idle groups — a group without writes for a
    /// while stops its Raft instance on every replica (no heartbeats; ~10 KiB per group
    /// replica instead of ~80) and a write, a vote or its leader's loss wakes it (~1 ms).
    /// What makes thousands of addresses cheap. Default false.
    #[arg(long, env = "ENTREPOT_HIBERNATE_GROUPS", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub hibernate_groups: bool,
    /// Benchmark-only sink (`serve --sink`): every producer transfer is accepted at once and
    /// dropped, nothing is stored or delivered, so `entrepot bench` can show its own ceiling.
    /// Never for real traffic: an accepted message is lost. Default false.
    #[arg(long, env = "ENTREPOT_SINK", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub sink: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 5672))),
            http: DEFAULT_HTTP
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 8080))),
            data_dir: PathBuf::from("./data"),
            sync: SyncPolicy::Always,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            node_log_segment_bytes: DEFAULT_NODE_LOG_SEGMENT_BYTES,
            auto_create: true,
            max_auto_created_addresses: DEFAULT_MAX_AUTO_CREATED_ADDRESSES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_incomplete_bytes_per_connection: DEFAULT_MAX_INCOMPLETE_BYTES_PER_CONNECTION,
            max_incomplete_bytes: DEFAULT_MAX_INCOMPLETE_BYTES,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_delivery_attempts: DEFAULT_MAX_DELIVERY_ATTEMPTS,
            dead_letter_address: "DLQ".into(),
            expiry_address: "ExpiryQueue".into(),
            link_credit: DEFAULT_LINK_CREDIT,
            unsettled_per_link: DEFAULT_UNSETTLED_PER_LINK,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_links: DEFAULT_MAX_LINKS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            allow_anonymous: true,
            users: Vec::new(),
            topic_prefixes: vec!["topic.".into()],
            topic_retention_bytes: 0,
            topic_retention_secs: None,
            subscription_backlog_max: DEFAULT_SUBSCRIPTION_BACKLOG,
            subscription_backlog_policy: Default::default(),
            cluster_mode: ClusterMode::default(),
            link_routing: LinkRouting::default(),
            hibernate_groups: false,
            manifests: None,
            default_address_space: None,
            token_file: None,
            listen_tls: None,
            tls_cert: None,
            tls_key: None,
            sink: false,
        }
    }
}

impl BrokerConfig {
    /// The deadline a client has from connecting to its `open`.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.handshake_timeout_ms))
    }

    /// Where the amqps listener binds: `listen-tls`, or [`DEFAULT_LISTEN_TLS`]; `None` when
    /// no certificate is configured (then there is no amqps listener).
    pub fn tls_listen(&self) -> Option<SocketAddr> {
        if self.tls_cert.is_none() || self.tls_key.is_none() {
            return None;
        }
        Some(self.listen_tls.unwrap_or_else(|| {
            DEFAULT_LISTEN_TLS
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 5671)))
        }))
    }

    /// Rejects settings that cannot work, with a message naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_frame_bytes < 4096 {
            return Err("max-frame-bytes must be at least 4096".into());
        }
        // The store also needs its segment and record headers around the largest record.
        let framing = RECORD_OVERHEAD_BYTES
            + entrepot_storage::SEGMENT_HEADER_LEN as u64
            + entrepot_storage::RECORD_HEADER_LEN as u64;
        if self.max_message_bytes == 0
            || self.max_message_bytes.saturating_add(framing) > self.segment_bytes
        {
            return Err(format!(
                "max-message-bytes ({}) must be positive and fit in a segment (segment-bytes {} minus {framing})",
                self.max_message_bytes, self.segment_bytes
            ));
        }
        let node_log = MIN_NODE_LOG_SEGMENT_BYTES..=entrepot_storage::MAX_SEGMENT_BYTES;
        if !node_log.contains(&self.node_log_segment_bytes) {
            return Err(format!(
                "node-log-segment-bytes ({}) must be between {} (twice the node log's largest \
                 record, NODE_LOG_RECORD_MAX {NODE_LOG_RECORD_MAX}) and {} (the storage's \
                 MAX_SEGMENT_BYTES)",
                self.node_log_segment_bytes,
                node_log.start(),
                node_log.end()
            ));
        }
        if self.link_credit == 0 || self.unsettled_per_link == 0 || self.max_connections == 0 {
            return Err(
                "link-credit, unsettled-per-link and max-connections must be positive".into(),
            );
        }
        if self.subscription_backlog_max == 0 {
            return Err("subscription-backlog-max must be positive".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("tls-cert and tls-key must be given together".into());
        }
        if self.max_incomplete_bytes_per_connection < self.max_message_bytes
            || self.max_incomplete_bytes < self.max_incomplete_bytes_per_connection
        {
            return Err(format!(
                "max-incomplete-bytes ({}) >= max-incomplete-bytes-per-connection ({}) >= \
                 max-message-bytes ({}) must hold: a largest message must fit",
                self.max_incomplete_bytes,
                self.max_incomplete_bytes_per_connection,
                self.max_message_bytes
            ));
        }
        if self.handshake_timeout_ms == 0 {
            return Err("handshake-timeout-ms must be positive".into());
        }
        if self.max_delivery_attempts == 0 {
            return Err("max-delivery-attempts must be at least 1".into());
        }
        if self.dead_letter_address.is_empty() || self.expiry_address.is_empty() {
            return Err("dead-letter-address and expiry-address must not be empty".into());
        }
        Ok(())
    }

    /// Lays the flags and `ENTREPOT_*` variables given in `args` (parsed by this struct's
    /// clap derive, see `entrepot serve`) over these settings: only those given replace a
    /// value; the file's and the defaults stay otherwise.
    pub fn apply_args(&mut self, args: &clap::ArgMatches) -> Result<(), clap::Error> {
        clap::FromArgMatches::update_from_arg_matches(self, args)
    }

    /// Reads a YAML config file.
    pub fn from_file(path: &std::path::Path) -> Result<BrokerConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// How a cluster replicates (`cluster-mode`): one Raft group for everything, or one per
/// address (issue 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterMode {
    /// One Raft group over the whole store; its leader serves every client.
    #[default]
    OneGroup,
    /// A Raft group per address, leaders spread; the metadata group places addresses.
    Groups,
}

/// What a node does with a link whose address another node leads (`link-routing`,
/// `cluster-mode: groups` only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LinkRouting {
    /// Refuse the link with `amqp:link:redirect` naming the leader's client listener.
    #[default]
    Redirect,
    /// Keep producer links and carry their messages to the leader (`raft::link_forward`);
    /// consumer links are redirected.
    Forward,
}

/// What happens when a subscription's backlog reaches its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BacklogPolicy {
    /// Drop the oldest messages of that subscription and count them
    /// (`entrepot_subscription_dropped_total`).
    #[default]
    DropOldest,
    /// Stop granting credit to the topic's producers until the backlog is below the limit.
    Block,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_mode_reads_from_yaml_and_defaults_to_one_group() {
        assert_eq!(BrokerConfig::default().cluster_mode, ClusterMode::OneGroup);
        let c: BrokerConfig = serde_yaml::from_str("cluster-mode: groups\n").unwrap();
        assert_eq!(c.cluster_mode, ClusterMode::Groups);
        assert!(serde_yaml::from_str::<BrokerConfig>("cluster-mode: many\n").is_err());
        assert_eq!(BrokerConfig::default().link_routing, LinkRouting::Redirect);
        let c: BrokerConfig = serde_yaml::from_str("link-routing: forward\n").unwrap();
        assert_eq!(c.link_routing, LinkRouting::Forward);
    }

    #[test]
    fn defaults_validate_and_yaml_overrides() {
        BrokerConfig::default().validate().unwrap();
        let c: BrokerConfig =
            serde_yaml::from_str("auto-create: false\nsync: interval:5\n").unwrap();
        assert!(!c.auto_create);
        assert_eq!(c.sync, SyncPolicy::Interval(Duration::from_millis(5)));
        assert_eq!(BrokerConfig::default().sync, SyncPolicy::Always);
        // The largest message plus every header must fit a segment, or the store would
        // refuse to open after validation said yes.
        let edge = BrokerConfig {
            segment_bytes: 1 << 20,
            max_message_bytes: (1 << 20) - RECORD_OVERHEAD_BYTES,
            max_incomplete_bytes_per_connection: 1 << 20,
            ..BrokerConfig::default()
        };
        assert!(edge.validate().unwrap_err().contains("max-message-bytes"));
    }

    #[test]
    fn the_node_log_segment_size_reads_from_yaml_and_is_bounded_by_the_largest_record() {
        let default = BrokerConfig::default();
        assert_eq!(default.node_log_segment_bytes, 256 << 20);
        let c: BrokerConfig = serde_yaml::from_str("node-log-segment-bytes: 33554432\n").unwrap();
        assert_eq!(c.node_log_segment_bytes, MIN_NODE_LOG_SEGMENT_BYTES);
        c.validate().unwrap();
        let at = |bytes: u64| BrokerConfig {
            node_log_segment_bytes: bytes,
            ..BrokerConfig::default()
        };
        at(entrepot_storage::MAX_SEGMENT_BYTES).validate().unwrap();
        // One byte short of two largest records, one beyond what a segment may be, none.
        for bad in [
            MIN_NODE_LOG_SEGMENT_BYTES - 1,
            u64::from(NODE_LOG_RECORD_MAX),
            entrepot_storage::MAX_SEGMENT_BYTES + 1,
            0,
        ] {
            let err = at(bad).validate().unwrap_err();
            assert!(err.contains("node-log-segment-bytes"), "{bad}: {err}");
            assert!(err.contains(&format!("({bad})")), "{bad}: {err}");
            assert!(err.contains("NODE_LOG_RECORD_MAX"), "{bad}: {err}");
            assert!(err.contains("MAX_SEGMENT_BYTES"), "{bad}: {err}");
        }
    }

    #[test]
    fn each_sync_policy_parses_and_prints_as_written() {
        for (text, policy) in [
            ("always", SyncPolicy::Always),
            ("never", SyncPolicy::Never),
            ("interval:1", SyncPolicy::Interval(Duration::from_millis(1))),
            (
                "interval:250",
                SyncPolicy::Interval(Duration::from_millis(250)),
            ),
        ] {
            assert_eq!(text.parse::<SyncPolicy>().unwrap(), policy, "{text}");
            assert_eq!(policy.to_string(), text);
            let yaml: BrokerConfig = serde_yaml::from_str(&format!("sync: {text}\n")).unwrap();
            assert_eq!(yaml.sync, policy, "YAML sync: {text}");
        }
    }

    #[test]
    fn a_bad_sync_policy_is_refused_naming_the_value() {
        for bad in [
            "sometimes",
            "Always",
            "interval",
            "interval:",
            "interval:0",
            "interval:-5",
            "interval:5ms",
            "interval: 5",
            "",
        ] {
            let err = bad.parse::<SyncPolicy>().unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{bad:?}: {err}");
            let yaml = serde_yaml::from_str::<BrokerConfig>(&format!("sync: '{bad}'\n"))
                .unwrap_err()
                .to_string();
            assert!(yaml.contains(&format!("{bad:?}")), "YAML {bad:?}: {yaml}");
        }
    }

    #[test]
    fn an_unknown_key_in_the_file_is_refused_naming_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entrepot.yaml");
        std::fs::write(&path, "auto-create: false\nsnyc: never\n").unwrap();
        let err = BrokerConfig::from_file(&path).unwrap_err();
        assert!(err.contains("unknown field `snyc`"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        // The same inside a list of users, and for the snake_case spelling of a real key.
        for yaml in [
            "users:\n  - username: a\n    password: b\n    role: admin\n",
            "data_dir: /tmp\n",
        ] {
            let err = serde_yaml::from_str::<BrokerConfig>(yaml)
                .unwrap_err()
                .to_string();
            let key = if yaml.starts_with("users") {
                "role"
            } else {
                "data_dir"
            };
            assert!(err.contains(&format!("unknown field `{key}`")), "{err}");
        }
        std::fs::write(&path, "data-dir: /tmp/x\nsync: interval:20\n").unwrap();
        let c = BrokerConfig::from_file(&path).unwrap();
        assert_eq!(c.sync, SyncPolicy::Interval(Duration::from_millis(20)));
    }
}
