//! The broker core's own error: why the broker could not open, recover its state, or move
//! a message to its dead-letter or expiry address.
//!
//! It owns the *what* and *which operation* of a failure, never its AMQP condition: the
//! errors a client may hear (this one's parts, [`AddressError`](super::AddressError),
//! [`SubscriptionError`](super::subscriptions::SubscriptionError), the limits, the store's
//! refusals) are mapped to conditions in one place, `connection/errors.rs`. Every variant
//! keeps its cause as a [`source`](std::error::Error::source), so the process's last
//! message (`main`) prints the whole chain.

use std::path::PathBuf;

use entrepot_storage::StorageError;

use super::store::StoreError;
use super::subscriptions::SubscriptionError;
use crate::amqp::message::MessageError;

/// Why the broker could not open, recover or move a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The message log or the ack log failed (opening, recovering, appending, syncing).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The store refused a record (its format's limits, or a storage failure).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The subscription registry could not be read.
    #[error("reading {}", path.display())]
    RegistryRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The subscription registry is not valid YAML of its format.
    #[error("reading {}", path.display())]
    RegistryParse {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    /// The subscription registry was written by a build with another format version.
    #[error("{} has version {found}, this build reads {supported}", path.display())]
    RegistryVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// A subscription of the registry could not be re-created (its selector).
    #[error("subscription {id}: {reason}")]
    RegistrySubscription {
        id: String,
        reason: SubscriptionError,
    },
    /// A stored message to move (dead-letter, expiry) does not parse or re-encode.
    #[error(transparent)]
    Message(#[from] MessageError),
}
