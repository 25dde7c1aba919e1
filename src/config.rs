//! Broker settings: defaults, a YAML file (`--config`), `ENTREPOT_*` environment
//! variables and command-line flags, in rising order of precedence.
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
/// Default most messages one subscription holds before dropping the oldest.
pub const DEFAULT_SUBSCRIPTION_BACKLOG: usize = 1_000_000;
/// Bytes of store header and slack on top of the message in one log record.
pub const RECORD_OVERHEAD_BYTES: u64 = 64 * 1024;

/// How `sync` is written in the config: `always`, `never` or `interval:<ms>`.
fn parse_sync(s: &str) -> Result<SyncPolicy, String> {
    match s {
        "always" => Ok(SyncPolicy::Always),
        "never" => Ok(SyncPolicy::Never),
        other => other
            .strip_prefix("interval:")
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(|ms| SyncPolicy::Interval(Duration::from_millis(ms)))
            .ok_or_else(|| format!("sync must be always, never or interval:<ms>, not {other:?}")),
    }
}

/// A user for SASL PLAIN until address-space manifests provide real ones.
#[derive(Debug, Clone, Deserialize)]
pub struct StaticUser {
    pub username: String,
    pub password: String,
}

/// All broker settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    /// `always` | `never` | `interval:<ms>`.
    pub sync: String,
    pub segment_bytes: u64,
    pub auto_create: bool,
    /// Auto-creation is refused (`amqp:resource-limit-exceeded`) once the broker holds
    /// this many queues and topics; declared (manifest) addresses are not limited.
    pub max_auto_created_addresses: usize,
    pub max_message_bytes: u64,
    /// Bytes of deliveries still arriving in several frames (`more=true`) that one
    /// connection may hold; a delivery that would go beyond is refused (its link detached
    /// with `amqp:resource-limit-exceeded`). At least `max-message-bytes`.
    pub max_incomplete_bytes_per_connection: u64,
    /// The same, broker-wide: a connection whose delivery does not fit is not read until
    /// room frees up, for at most `INCOMPLETE_BUDGET_WAIT`, then refused likewise.
    pub max_incomplete_bytes: u64,
    pub max_frame_bytes: u32,
    pub max_delivery_attempts: u32,
    pub dead_letter_address: String,
    pub expiry_address: String,
    pub link_credit: u32,
    pub unsettled_per_link: usize,
    pub max_connections: usize,
    pub max_sessions: u16,
    pub max_links: u32,
    pub idle_timeout_ms: u32,
    /// Milliseconds a client has from connecting to its `open`: protocol header, SASL
    /// and open under one deadline, however slowly the bytes come.
    pub handshake_timeout_ms: u32,
    pub allow_anonymous: bool,
    pub users: Vec<StaticUser>,
    /// Addresses starting with one of these are topics (unless they exist already).
    pub topic_prefixes: Vec<String>,
    /// Bytes a topic keeps after its subscriptions consumed them, for replay (0: none).
    pub topic_retention_bytes: u64,
    /// Seconds a topic keeps messages for replay (within the byte limit).
    pub topic_retention_secs: Option<u64>,
    /// Messages a subscription may hold; beyond it the oldest are dropped and counted.
    pub subscription_backlog_max: usize,
    /// `drop-oldest` (default) or `block` (hold producers back by credit).
    pub subscription_backlog_policy: crate::broker::topic::BacklogPolicy,
    /// Directory of AddressSpace/Address/MessagingUser/plan manifests; when set, only
    /// declared addresses exist and clients authenticate as MessagingUsers.
    pub manifests: Option<PathBuf>,
    /// Address space of clients whose hostname selects none (default: the only space).
    pub default_address_space: Option<String>,
    /// YAML map `token: username` for `serviceaccount` users.
    pub token_file: Option<PathBuf>,
    /// AMQPS listener; defaults to 0.0.0.0:5671 when `tls-cert` is set.
    pub listen_tls: Option<SocketAddr>,
    /// PEM certificate chain and private key of the AMQPS listener; reloaded on change.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Benchmark-only sink (`serve --sink`): every producer transfer is accepted at once and
    /// dropped, nothing is stored or delivered, so `entrepot bench` can show its own ceiling.
    /// Never for real traffic: an accepted message is lost. Default false.
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
            sync: "always".into(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
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
    /// The sync policy named by `sync`.
    pub fn sync_policy(&self) -> Result<SyncPolicy, String> {
        parse_sync(&self.sync)
    }

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
        self.sync_policy()?;
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

    /// Reads a YAML config file.
    pub fn from_file(path: &std::path::Path) -> Result<BrokerConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_yaml_overrides() {
        BrokerConfig::default().validate().unwrap();
        let c: BrokerConfig =
            serde_yaml::from_str("auto-create: false\nsync: interval:5\n").unwrap();
        assert!(!c.auto_create);
        assert_eq!(
            c.sync_policy().unwrap(),
            SyncPolicy::Interval(Duration::from_millis(5))
        );
        assert!(serde_yaml::from_str::<BrokerConfig>("no-such-key: 1").is_err());
        let bad = BrokerConfig {
            sync: "sometimes".into(),
            ..BrokerConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("sync"));
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
}
