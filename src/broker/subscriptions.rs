//! The registry of durable subscriptions: which exist, on which topic, with which
//! consumer group and selector — persisted in `subscriptions.yaml` in the data directory.
//!
//! The file is rewritten whole (temporary file, fsync, rename, directory fsync) on every
//! create and delete, before the attach that caused it is answered: a subscription the
//! client saw created exists after any crash. What each subscription consumed lives in
//! its consumer group of the ack log, not here.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::selector;
use super::store::Store;
use super::topic::{StartAt, Subscription, Topic};
use super::{Broker, BrokerError};

/// File name of the registry inside the data directory.
pub const REGISTRY_FILE: &str = "subscriptions.yaml";
/// The registry format this build writes and reads.
const REGISTRY_VERSION: u32 = 1;
/// Most durable subscriptions one broker keeps.
pub const MAX_DURABLE_SUBSCRIPTIONS: usize = 100_000;

// Format (subscriptions.yaml, v1): { version: 1, subscriptions: [ { topic, id, group, selector? } ] }

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Entry {
    topic: String,
    id: String,
    group: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    selector: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RegistryFile {
    version: u32,
    subscriptions: Vec<Entry>,
}

/// In-memory copy of the file, and the next free consumer group.
#[derive(Debug, Default)]
pub struct Registry {
    entries: Mutex<Vec<Entry>>,
    next_group: AtomicU32,
}

/// Why a subscription could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscriptionError {
    #[error("invalid selector: {0}")]
    Selector(String),
    #[error("too many durable subscriptions (limit {MAX_DURABLE_SUBSCRIPTIONS})")]
    TooMany,
    #[error("subscription {id:?} exists on topic {topic:?}")]
    OtherTopic { id: String, topic: String },
    #[error("could not persist the subscription: {0}")]
    Persist(String),
}

fn registry_path(dir: &Path) -> PathBuf {
    dir.join(REGISTRY_FILE)
}

/// Rewrites the registry file whole; the refusal names the file, as a client is told.
fn write_atomically(store: &Store, entries: &[Entry]) -> Result<(), SubscriptionError> {
    let file = RegistryFile {
        version: REGISTRY_VERSION,
        subscriptions: entries.to_vec(),
    };
    let text =
        serde_yaml::to_string(&file).map_err(|e| SubscriptionError::Persist(e.to_string()))?;
    store
        .put_file(REGISTRY_FILE, text.as_bytes())
        .map_err(|_| SubscriptionError::Persist(format!("writing {REGISTRY_FILE}")))
}

/// Parses a selector for a subscription, keeping its text for the registry.
pub fn parse_selector(
    text: Option<&str>,
) -> Result<Option<(selector::Selector, String)>, SubscriptionError> {
    match text {
        None => Ok(None),
        Some(t) => selector::parse(t)
            .map(|s| Some((s, t.to_owned())))
            .map_err(|e| SubscriptionError::Selector(e.to_string())),
    }
}

impl Broker {
    /// Loads the registry and re-creates every durable subscription (before messages are
    /// recovered, so they can be handed out).
    pub(super) fn recover_subscriptions(&self) -> Result<(), BrokerError> {
        let path = registry_path(&self.config.data_dir);
        let entries = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let file: RegistryFile = match serde_yaml::from_str(&text) {
                    Ok(file) => file,
                    Err(source) => return Err(BrokerError::RegistryParse { path, source }),
                };
                if file.version != REGISTRY_VERSION {
                    return Err(BrokerError::RegistryVersion {
                        path,
                        found: file.version,
                        supported: REGISTRY_VERSION,
                    });
                }
                file.subscriptions
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(BrokerError::RegistryRead { path, source }),
        };
        let next = entries.iter().map(|e| e.group).max().unwrap_or(0) + 1;
        self.subscriptions.next_group.store(next, Ordering::Relaxed);
        for e in &entries {
            let selector = parse_selector(e.selector.as_deref()).map_err(|reason| {
                BrokerError::RegistrySubscription {
                    id: e.id.clone(),
                    reason,
                }
            })?;
            let topic = self.topic_or_create(&e.topic);
            let sub = topic.make_subscription(e.id.clone(), e.group, true, selector);
            topic.add_subscription(self, sub, StartAt::Next);
        }
        if let Ok(mut mine) = self.subscriptions.entries.lock() {
            *mine = entries;
        }
        Ok(())
    }

    /// The durable subscription `id` on `topic`: the existing one (a resumed subscriber)
    /// or a new one starting at `start`, persisted before this returns.
    pub fn durable_subscription(
        &self,
        topic: &Arc<Topic>,
        id: &str,
        selector: Option<&str>,
        start: StartAt,
    ) -> Result<Arc<Subscription>, SubscriptionError> {
        let mut entries = self
            .subscriptions
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.iter().find(|e| e.id == id) {
            if e.topic != topic.name() {
                return Err(SubscriptionError::OtherTopic {
                    id: id.to_owned(),
                    topic: e.topic.clone(),
                });
            }
            if let Some(sub) = topic.subscription(id) {
                return Ok(sub);
            }
        }
        if entries.len() >= MAX_DURABLE_SUBSCRIPTIONS {
            return Err(SubscriptionError::TooMany);
        }
        let parsed = parse_selector(selector)?;
        let group = self
            .subscriptions
            .next_group
            .fetch_add(1, Ordering::Relaxed)
            .max(1);
        let floor = match start {
            StartAt::Next => self.store.log().next_offset(),
            _ => 0,
        };
        let persisted = self
            .store
            .start_group(group, floor)
            .map_err(|e| SubscriptionError::Persist(e.to_string()))
            .and_then(|_| {
                let mut next = entries.clone();
                next.push(Entry {
                    topic: topic.name().to_owned(),
                    id: id.to_owned(),
                    group,
                    selector: selector.map(str::to_owned),
                });
                write_atomically(&self.store, &next)?;
                *entries = next;
                Ok(())
            });
        persisted?;
        drop(entries);
        let sub = topic.make_subscription(id.to_owned(), group, true, parsed);
        topic.add_subscription(self, Arc::clone(&sub), start);
        tracing::info!(
            topic = topic.name(),
            subscription = id,
            group,
            "durable subscription created"
        );
        Ok(sub)
    }

    /// A subscription that lives only as long as its links (not persisted). Shared
    /// non-durable subscriptions are found by `id`.
    pub fn volatile_subscription(
        &self,
        topic: &Arc<Topic>,
        id: &str,
        selector: Option<&str>,
        start: StartAt,
    ) -> Result<Arc<Subscription>, SubscriptionError> {
        if let Some(sub) = topic.subscription(id) {
            return Ok(sub);
        }
        let parsed = parse_selector(selector)?;
        let sub = topic.make_subscription(id.to_owned(), 0, false, parsed);
        topic.add_subscription(self, Arc::clone(&sub), start);
        Ok(sub)
    }

    /// Deletes a subscription (durable ones from the registry and the ack log too).
    pub fn delete_subscription(
        &self,
        topic: &Arc<Topic>,
        id: &str,
    ) -> Result<(), SubscriptionError> {
        let Some(sub) = topic.remove_subscription(self, id) else {
            return Ok(());
        };
        if !sub.durable {
            return Ok(());
        }
        let mut entries = self
            .subscriptions
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let next: Vec<Entry> = entries.iter().filter(|e| e.id != id).cloned().collect();
        write_atomically(&self.store, &next)?;
        *entries = next;
        drop(entries);
        self.store
            .drop_group(sub.group)
            .map_err(|e| SubscriptionError::Persist(e.to_string()))?;
        tracing::info!(
            topic = topic.name(),
            subscription = id,
            "durable subscription deleted"
        );
        Ok(())
    }

    /// Finds a durable subscription by identity on any topic (qpid-jms unsubscribes by
    /// attaching with the subscription name and no address).
    pub fn find_durable(&self, id: &str) -> Option<(Arc<Topic>, Arc<Subscription>)> {
        let topic = {
            let entries = self.subscriptions.entries.lock().ok()?;
            entries.iter().find(|e| e.id == id)?.topic.clone()
        };
        let topic = self.topics.read().ok()?.get(&topic).cloned()?;
        let sub = topic.subscription(id)?;
        Some((topic, sub))
    }
}
