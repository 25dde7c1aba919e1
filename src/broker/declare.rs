//! Declaring addresses ahead of use, for manifests: creates a queue or topic by its
//! store name regardless of `auto-create`, and reports what a queue still holds.

use std::sync::Arc;

use super::{AddressKind, Broker};

impl Broker {
    /// Creates the queue or topic `name` if it does not exist yet.
    pub fn declare(&self, name: &str, kind: AddressKind) {
        match kind {
            AddressKind::Queue => drop(self.queue_or_create(name)),
            AddressKind::Topic => drop(self.topic_or_create(name)),
        }
    }

    /// Messages held by queue `name` (ready plus unsettled); 0 if there is no such queue.
    pub fn held_messages(&self, name: &str) -> usize {
        let queue = self
            .queues
            .read()
            .ok()
            .and_then(|q| q.get(name).map(Arc::clone));
        queue.map_or(0, |q| {
            let (ready, unsettled) = q.depth();
            ready + unsettled
        })
    }
}
