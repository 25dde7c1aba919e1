//! Who a client is and what it may do: SASL credential checks against the MessagingUsers
//! of an address space ([`users`]), authorization rules ([`authz`], declared with the
//! manifests and kept in `manifest::authz`), bearer tokens of
//! service accounts ([`tokens`]), and the growing delay after failed logins.
//!
//! Invariants: passwords and tokens are never logged or kept beyond the check; a failed
//! login is answered only after [`LoginFailures::delay`], which doubles per failure from
//! the same peer address up to [`LOGIN_DELAY_MAX`].
//!
//! Does not: speak SASL (that is [`crate::amqp::sasl`]) or read manifests
//! ([`crate::manifest`]).

/// The rules live with the manifests that declare them; re-exported where they are checked.
pub use crate::manifest::authz;
pub mod tokens;
pub mod users;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::manifest::Live;

/// Delay after the first failed login from an address.
pub const LOGIN_DELAY_MIN: Duration = Duration::from_millis(100);
/// Longest delay after repeated failures.
pub const LOGIN_DELAY_MAX: Duration = Duration::from_secs(5);
/// Peers remembered; past it the table is cleared (an attacker rotating addresses gets
/// the minimum delay, never unbounded memory).
pub const MAX_TRACKED_PEERS: usize = 10_000;

/// Failed logins per peer address.
#[derive(Debug, Default)]
pub struct LoginFailures {
    by_peer: Mutex<HashMap<IpAddr, u32>>,
}

impl LoginFailures {
    /// Records a failure and returns how long to wait before answering it.
    pub fn failed(&self, peer: Option<IpAddr>) -> Duration {
        let Some(peer) = peer else {
            return LOGIN_DELAY_MIN;
        };
        let mut map = self.by_peer.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED_PEERS && !map.contains_key(&peer) {
            map.clear();
        }
        let n = map.entry(peer).or_insert(0);
        *n = n.saturating_add(1);
        Self::delay(*n)
    }

    /// Forgets the failures of a peer that logged in.
    pub fn succeeded(&self, peer: Option<IpAddr>) {
        if let Some(peer) = peer {
            self.by_peer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&peer);
        }
    }

    /// The delay after the `n`-th consecutive failure: 100 ms, 200 ms, 400 ms … 5 s.
    pub fn delay(n: u32) -> Duration {
        let factor = 1u32 << n.saturating_sub(1).min(16);
        LOGIN_DELAY_MIN.saturating_mul(factor).min(LOGIN_DELAY_MAX)
    }
}

/// Everything the connections consult to let a client in: the manifests in force, the
/// token authenticator of service accounts, and the failure table.
#[derive(Default)]
pub struct Gatekeeper {
    pub manifests: Live,
    pub tokens: Option<Box<dyn tokens::TokenAuthenticator>>,
    pub failures: LoginFailures,
}

/// What the manifest watch re-applies into (see `manifest::watch::watch_dir`).
impl AsRef<Live> for Gatekeeper {
    fn as_ref(&self) -> &Live {
        &self.manifests
    }
}

impl Gatekeeper {
    pub fn new(manifests: Live, tokens: Option<Box<dyn tokens::TokenAuthenticator>>) -> Gatekeeper {
        Gatekeeper {
            manifests,
            tokens,
            failures: LoginFailures::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_grows_per_failure_and_resets_on_success() {
        assert_eq!(LoginFailures::delay(1), LOGIN_DELAY_MIN);
        assert_eq!(LoginFailures::delay(3), LOGIN_DELAY_MIN * 4);
        assert_eq!(LoginFailures::delay(40), LOGIN_DELAY_MAX);
        let f = LoginFailures::default();
        let peer = Some(IpAddr::from([127, 0, 0, 1]));
        f.failed(peer);
        assert_eq!(f.failed(peer), LOGIN_DELAY_MIN * 2);
        f.succeeded(peer);
        assert_eq!(f.failed(peer), LOGIN_DELAY_MIN);
    }
}
