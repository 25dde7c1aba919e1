//! `GET /status` and `entrepot status`: what a node holds right now, as YAML an operator
//! can read and a script can parse — queues with their depth and consumers, topics with
//! their subscriptions, connections, and what the last manifest apply refused to delete.
//!
//! Reads the broker through its public views and stats only; changes nothing.

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::broker::Broker;

#[derive(Serialize)]
struct Status {
    connections: u64,
    links: u64,
    queues: Vec<QueueStatus>,
    topics: Vec<TopicStatus>,
    manifests: ManifestStatus,
}

#[derive(Serialize)]
struct QueueStatus {
    name: String,
    ready: usize,
    unsettled: usize,
    consumers: usize,
}

#[derive(Serialize)]
struct TopicStatus {
    name: String,
    published: u64,
    subscriptions: Vec<SubscriptionStatus>,
}

#[derive(Serialize)]
struct SubscriptionStatus {
    id: String,
    durable: bool,
    backlog: usize,
    consumers: usize,
}

#[derive(Serialize)]
struct ManifestStatus {
    applied: u64,
    rejected: u64,
    deletions_refused: u64,
    /// Addresses kept although the manifests removed them, because they hold messages.
    kept: Vec<String>,
}

/// Renders the node's status as YAML.
pub fn render(broker: &Broker) -> String {
    let mut queues: Vec<QueueStatus> = broker
        .queues()
        .iter()
        .map(|q| {
            let (ready, unsettled) = q.depth();
            QueueStatus {
                name: q.name().to_owned(),
                ready,
                unsettled,
                consumers: q.consumer_count(),
            }
        })
        .collect();
    queues.sort_by(|a, b| a.name.cmp(&b.name));
    let mut topics: Vec<TopicStatus> = broker
        .topics()
        .iter()
        .map(|t| TopicStatus {
            name: t.name().to_owned(),
            published: t.stats.published.load(Ordering::Relaxed),
            subscriptions: t
                .subscriptions()
                .iter()
                .map(|s| {
                    let (r, u) = s.queue.depth();
                    SubscriptionStatus {
                        id: s.id.clone(),
                        durable: s.durable,
                        backlog: r + u,
                        consumers: s.queue.consumer_count(),
                    }
                })
                .collect(),
        })
        .collect();
    topics.sort_by(|a, b| a.name.cmp(&b.name));
    let stats = &broker.stats.declarations;
    let status = Status {
        connections: broker.stats.connections.load(Ordering::Relaxed),
        links: broker.stats.links.load(Ordering::Relaxed),
        queues,
        topics,
        manifests: ManifestStatus {
            applied: stats.applied.load(Ordering::Relaxed),
            rejected: stats.rejected.load(Ordering::Relaxed),
            deletions_refused: stats.deletions_refused.load(Ordering::Relaxed),
            kept: stats.kept.lock().map(|k| k.clone()).unwrap_or_default(),
        },
    };
    serde_yaml::to_string(&status).unwrap_or_else(|e| format!("error: {e}\n"))
}
