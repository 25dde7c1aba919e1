//! Topics: publish-subscribe over the shared message log.
//!
//! A message sent to a topic is stored once, as one record of the shared log. Each
//! subscription is a [`Queue`] of its own (so credit, outcomes, dead-lettering and
//! redelivery work exactly as on queues) holding `QueuedMessage`s whose bodies are the
//! same `Bytes` slice of the mapping: fanning out to 1,000 subscribers adds 1,000 small
//! entries, never 1,000 copies of the body.
//!
//! Durable subscriptions record what they consumed in a consumer group of the ack log
//! (one group per subscription, see `entrepot_storage::AckLog`); the topic counts, per
//! record, how many durable subscriptions still hold it and acknowledges the record in the
//! store's default group — letting its segment be deleted — once none does and it left
//! the topic's retention window.
//!
//! The subscription list is a copy-on-write snapshot (`Arc<[Arc<Subscription>]>`):
//! subscribing and unsubscribing are rare and rebuild it, while publishing — once per
//! message — clones one `Arc` instead of collecting a `Vec` of targets.
//!
//! Invariants:
//! * A record is acknowledged in the default group only when no durable subscription
//!   holds it and retention no longer keeps it.
//! * A subscription only receives messages that match its selector.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::limits::{AddressLimits, SpaceUsage};
use super::queue::{now_ms, Queue, QueueOwner, QueuedMessage};
use super::selector::Selector;
use super::Broker;

/// Where a new subscription starts reading (our `entrepot:offset-spec` source filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Messages published after the subscription is created (the default).
    Next,
    /// The oldest message the topic retains.
    First,
    /// The newest retained message, then everything after it.
    Last,
    /// The first retained message at or after this log offset.
    Offset(u64),
    /// The first retained message stored at or after this time (ms since the epoch).
    Timestamp(i64),
}

/// What happens when a subscription's backlog reaches its limit: a setting, so it lives
/// in the configuration (the core depends on `config`, never the reverse).
pub use crate::config::BacklogPolicy;

/// How long and how much a topic keeps after every subscription consumed it, for replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicRetention {
    pub bytes_max: u64,
    pub age_max: Option<Duration>,
}

/// One subscription of a topic.
#[derive(Debug)]
pub struct Subscription {
    /// Identity: `container-id:link-name` (or the shared/global name).
    pub id: String,
    /// Consumer group in the ack log (0 for non-durable subscriptions).
    pub group: u32,
    pub durable: bool,
    pub queue: Arc<Queue>,
    pub selector: Option<Selector>,
    /// The selector's text, as persisted.
    pub selector_text: Option<String>,
}

#[derive(Debug, Clone)]
struct Retained {
    msg: QueuedMessage,
    stored_at_ms: i64,
}

#[derive(Debug, Default)]
struct TopicState {
    /// Replaced as a whole, never mutated in place: a snapshot taken by `publish` stays
    /// valid after the lock is released.
    subscriptions: Arc<[Arc<Subscription>]>,
    retained: VecDeque<Retained>,
    retained_bytes: u64,
    /// Durable subscriptions still holding each record.
    refs: HashMap<u64, u32>,
    /// The address plan's limits: each subscription's backlog, and retention.
    limits: AddressLimits,
    space: Option<Arc<SpaceUsage>>,
}

/// Counters exported as metrics.
#[derive(Debug, Default)]
pub struct TopicStats {
    pub published: AtomicU64,
}

/// A topic; see the module docs.
#[derive(Debug)]
pub struct Topic {
    name: String,
    retention: TopicRetention,
    backlog_max: usize,
    backlog_policy: BacklogPolicy,
    state: Mutex<TopicState>,
    pub stats: TopicStats,
}

impl Topic {
    pub fn new(
        name: String,
        retention: TopicRetention,
        backlog_max: usize,
        backlog_policy: BacklogPolicy,
    ) -> Topic {
        Topic {
            name,
            retention,
            backlog_max,
            backlog_policy,
            state: Mutex::new(TopicState::default()),
            stats: TopicStats::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, TopicState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies an address plan: `depth_max`/`bytes_max` bound every subscription's
    /// backlog (producers are held back by credit), `retention_secs` keeps messages for
    /// replay (within `bytes_max`, else the configured `topic-retention-bytes`, if any).
    pub fn set_limits(&self, limits: AddressLimits, space: Option<Arc<SpaceUsage>>) {
        let mut s = self.lock();
        s.limits = limits;
        s.space = space.clone();
        let subs = Arc::clone(&s.subscriptions);
        drop(s);
        for sub in subs.iter() {
            sub.queue.set_limits(queue_limits(limits), space.clone());
        }
    }

    pub fn limits(&self) -> AddressLimits {
        self.lock().limits
    }

    /// The space this topic's subscriptions count against.
    pub fn space(&self) -> Option<Arc<SpaceUsage>> {
        self.lock().space.clone()
    }

    /// The retention window in force: the plan's, else the broker's configuration.
    fn retention_of(&self, s: &TopicState) -> TopicRetention {
        match s.limits.retention_secs {
            None => self.retention,
            Some(secs) => TopicRetention {
                bytes_max: s
                    .limits
                    .bytes_max
                    .unwrap_or(match self.retention.bytes_max {
                        0 => u64::MAX,
                        b => b,
                    }),
                age_max: Some(Duration::from_secs(secs)),
            },
        }
    }

    /// How many more messages producers may be granted credit for: `None` when no
    /// subscription limits them, 0 while any subscription is full (see [`Self::is_blocked`]).
    pub fn room(&self) -> Option<u64> {
        let subs = Arc::clone(&self.lock().subscriptions);
        let mut least: Option<u64> = None;
        for sub in subs.iter() {
            let room = sub.queue.room();
            let (ready, unsettled) = sub.queue.depth();
            let backlog_full = self.backlog_policy == BacklogPolicy::Block
                && ready + unsettled >= self.backlog_max;
            if backlog_full || room == Some(0) {
                return Some(0);
            }
            least = match (least, room) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        least
    }

    pub fn subscriptions(&self) -> Vec<Arc<Subscription>> {
        self.lock().subscriptions.to_vec()
    }

    pub fn subscription(&self, id: &str) -> Option<Arc<Subscription>> {
        self.lock()
            .subscriptions
            .iter()
            .find(|s| s.id == id)
            .cloned()
    }

    /// Builds a subscription (not yet added).
    pub fn make_subscription(
        self: &Arc<Self>,
        id: String,
        group: u32,
        durable: bool,
        selector: Option<(Selector, String)>,
    ) -> Arc<Subscription> {
        let owner = QueueOwner::Subscription {
            topic: Arc::downgrade(self),
            group,
            durable,
        };
        let queue = Arc::new(Queue::owned(format!("{}::{}", self.name, id), owner));
        let (limits, space) = {
            let s = self.lock();
            (s.limits, s.space.clone())
        };
        queue.set_limits(queue_limits(limits), space);
        let (selector, selector_text) = selector.map_or((None, None), |(s, t)| (Some(s), Some(t)));
        Arc::new(Subscription {
            id,
            group,
            durable,
            queue,
            selector,
            selector_text,
        })
    }

    /// Adds a subscription and hands it the retained messages `start` asks for.
    pub fn add_subscription(
        self: &Arc<Self>,
        broker: &Broker,
        sub: Arc<Subscription>,
        start: StartAt,
    ) {
        let mut s = self.lock();
        let replay: Vec<QueuedMessage> = match start {
            StartAt::Next => Vec::new(),
            StartAt::First => s.retained.iter().map(|r| r.msg.clone()).collect(),
            StartAt::Last => s
                .retained
                .back()
                .map(|r| r.msg.clone())
                .into_iter()
                .collect(),
            StartAt::Offset(o) => s
                .retained
                .iter()
                .filter(|r| r.msg.offset >= o)
                .map(|r| r.msg.clone())
                .collect(),
            StartAt::Timestamp(t) => s
                .retained
                .iter()
                .filter(|r| r.stored_at_ms >= t)
                .map(|r| r.msg.clone())
                .collect(),
        };
        let replay: Vec<QueuedMessage> = replay.into_iter().filter(|m| matches(&sub, m)).collect();
        if sub.durable {
            for m in &replay {
                *s.refs.entry(m.offset).or_insert(0) += 1;
            }
        }
        s.subscriptions = s
            .subscriptions
            .iter()
            .cloned()
            .chain([Arc::clone(&sub)])
            .collect();
        drop(s);
        sub.queue.enqueue_all(broker, replay);
    }

    /// Removes a subscription; what it still held is released.
    pub fn remove_subscription(&self, broker: &Broker, id: &str) -> Option<Arc<Subscription>> {
        let mut s = self.lock();
        let pos = s.subscriptions.iter().position(|x| x.id == id)?;
        let sub = Arc::clone(&s.subscriptions[pos]);
        s.subscriptions = s
            .subscriptions
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != pos)
            .map(|(_, x)| Arc::clone(x))
            .collect();
        drop(s);
        if sub.durable {
            for offset in sub.queue.held_offsets() {
                self.release(broker, offset, true);
            }
        }
        Some(sub)
    }

    /// Fans a durable message out to every matching subscription.
    pub fn publish(&self, broker: &Broker, msg: QueuedMessage, stored_at_ms: i64) {
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        let mut s = self.lock();
        // Selectors are evaluated once, under the lock, so a subscription added
        // concurrently either gets this message here or from retention, never both.
        let subs = Arc::clone(&s.subscriptions);
        let mut matched = Matched::new(subs.len());
        let mut durable_refs = 0u32;
        for (i, sub) in subs.iter().enumerate() {
            if matches(sub, &msg) {
                matched.set(i);
                durable_refs += u32::from(sub.durable);
            }
        }
        if durable_refs > 0 {
            s.refs.insert(msg.offset, durable_refs);
        }
        let retain = self.retention_of(&s).bytes_max > 0;
        if retain {
            s.retained_bytes += msg.message.len() as u64;
            s.retained.push_back(Retained {
                msg: msg.clone(),
                stored_at_ms,
            });
        }
        let done = durable_refs == 0 && !retain;
        let trimmed = self.trim_locked(&mut s, now_ms());
        drop(s);
        let targets = subs
            .iter()
            .enumerate()
            .filter(|(i, _)| matched.get(*i))
            .map(|(_, sub)| sub);
        for sub in targets {
            sub.queue.enqueue(broker, msg.clone());
            if self.backlog_policy == BacklogPolicy::DropOldest
                && sub.queue.depth().0 > self.backlog_max
            {
                let n = sub.queue.drop_oldest_beyond(broker, self.backlog_max);
                tracing::warn!(topic = %self.name, subscription = %sub.id, dropped = n, "subscription backlog over its limit, dropped oldest");
            }
        }
        if done {
            ack_default(broker, msg.offset);
        }
        for offset in trimmed {
            ack_default(broker, offset);
        }
    }

    /// True while producers must be held back: the policy is `block` and a subscription's
    /// backlog is at its limit, or a subscription is at its plan's limit.
    pub fn is_blocked(&self) -> bool {
        self.room() == Some(0)
    }

    /// Re-adds a stored, not fully consumed message after a restart.
    pub fn recover(&self, broker: &Broker, msg: QueuedMessage, stored_at_ms: i64) {
        let mut s = self.lock();
        let holders: Vec<Arc<Subscription>> = s
            .subscriptions
            .iter()
            .filter(|sub| {
                sub.durable
                    && !broker.store().group_acked(sub.group, msg.offset)
                    && matches(sub, &msg)
            })
            .cloned()
            .collect();
        if !holders.is_empty() {
            s.refs.insert(msg.offset, holders.len() as u32);
        }
        let retain = self.retention_of(&s).bytes_max > 0;
        if retain {
            s.retained_bytes += msg.message.len() as u64;
            s.retained.push_back(Retained {
                msg: msg.clone(),
                stored_at_ms,
            });
        }
        let done = holders.is_empty() && !retain;
        drop(s);
        for sub in holders {
            let mut msg = msg.clone();
            let failed = broker.store().delivery_count(sub.group, msg.offset);
            msg.delivery_count = msg.delivery_count.max(failed);
            sub.queue.enqueue_all(broker, [msg]);
        }
        if done {
            ack_default(broker, msg.offset);
        }
    }

    /// A durable subscription finished with `offset` (or a non-durable one, which holds
    /// no reference).
    pub fn release(&self, broker: &Broker, offset: u64, durable: bool) {
        if !durable {
            return;
        }
        let mut s = self.lock();
        let Some(n) = s.refs.get_mut(&offset) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        s.refs.remove(&offset);
        let retained = s.retained.iter().any(|r| r.msg.offset == offset);
        drop(s);
        if !retained {
            ack_default(broker, offset);
        }
    }

    /// Drops retained messages beyond the retention limits (housekeeping).
    pub fn apply_retention(&self, broker: &Broker) {
        let mut s = self.lock();
        let trimmed = self.trim_locked(&mut s, now_ms());
        drop(s);
        for offset in trimmed {
            ack_default(broker, offset);
        }
    }

    /// Trims the retention window; returns offsets no durable subscription holds.
    fn trim_locked(&self, s: &mut TopicState, now: i64) -> Vec<u64> {
        let mut out = Vec::new();
        let retention = self.retention_of(s);
        while let Some(front) = s.retained.front() {
            let too_big = s.retained_bytes > retention.bytes_max;
            let too_old = retention
                .age_max
                .is_some_and(|a| front.stored_at_ms < now - a.as_millis() as i64);
            if !(too_big || too_old) {
                break;
            }
            let Some(r) = s.retained.pop_front() else {
                break;
            };
            s.retained_bytes -= r.msg.message.len() as u64;
            if !s.refs.contains_key(&r.msg.offset) {
                out.push(r.msg.offset);
            }
        }
        out
    }
}

/// Subscriptions a publish can remember matches for without allocating
/// (`MATCHED_INLINE_WORDS` × 64); larger topics spill to one `Vec` per message.
const MATCHED_INLINE_WORDS: usize = 4;

/// Which subscriptions of a snapshot (by index) one message matched: a bit set kept on
/// the stack for topics of up to `MATCHED_INLINE_WORDS * 64` subscriptions.
struct Matched {
    inline: [u64; MATCHED_INLINE_WORDS],
    /// Used instead of `inline` when the snapshot is larger.
    spill: Vec<u64>,
}

impl Matched {
    fn new(len: usize) -> Matched {
        let words = len.div_ceil(64);
        let spill = if words > MATCHED_INLINE_WORDS {
            vec![0; words]
        } else {
            Vec::new()
        };
        Matched {
            inline: [0; MATCHED_INLINE_WORDS],
            spill,
        }
    }

    fn words(&self) -> &[u64] {
        if self.spill.is_empty() {
            &self.inline
        } else {
            &self.spill
        }
    }

    fn set(&mut self, i: usize) {
        let words = if self.spill.is_empty() {
            &mut self.inline[..]
        } else {
            &mut self.spill[..]
        };
        words[i / 64] |= 1 << (i % 64);
    }

    fn get(&self, i: usize) -> bool {
        self.words()[i / 64] & (1 << (i % 64)) != 0
    }
}

/// A subscription's queue limits under the topic's plan (retention is the topic's).
fn queue_limits(limits: AddressLimits) -> AddressLimits {
    AddressLimits {
        retention_secs: None,
        ..limits
    }
}

fn matches(sub: &Subscription, msg: &QueuedMessage) -> bool {
    match &sub.selector {
        None => true,
        Some(sel) => super::selector_matches(sel, &msg.message),
    }
}

fn ack_default(broker: &Broker, offset: u64) {
    if let Err(e) = broker.store().ack(&[offset]) {
        tracing::error!(offset, error = %e, "could not acknowledge a consumed topic record");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matched_remembers_every_index_inline_and_spilled() {
        for len in [0, 1, 63, 64, 65, 256, 257, 1_000] {
            let mut matched = Matched::new(len);
            assert_eq!(matched.spill.is_empty(), len <= 64 * MATCHED_INLINE_WORDS);
            for i in (0..len).filter(|i| i % 3 == 0) {
                matched.set(i);
            }
            for i in 0..len {
                assert_eq!(matched.get(i), i % 3 == 0, "len {len} index {i}");
            }
        }
    }
}
