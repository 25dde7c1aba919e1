//! The Raft timing the cluster benches run with: the broker's (`src/raft/mod.rs`), so an
//! idle or waking group here costs what it would in a broker node.

use std::sync::Arc;

use openraft::Config;

/// Heartbeat interval, ms (the broker's `HEARTBEAT_MS`).
pub const HEARTBEAT_MS: u64 = 40;
/// Election timeout range, ms (the broker's `ELECTION_TIMEOUT_MS`).
pub const ELECTION_TIMEOUT_MS: (u64, u64) = (120, 240);

/// openraft's configuration with the broker's heartbeat and election timeouts.
pub fn broker_timing() -> Arc<Config> {
    Arc::new(
        Config {
            heartbeat_interval: HEARTBEAT_MS,
            election_timeout_min: ELECTION_TIMEOUT_MS.0,
            election_timeout_max: ELECTION_TIMEOUT_MS.1,
            ..Config::default()
        }
        .validate()
        .expect("raft config"),
    )
}
