//! Activation of one clustered address on the node that now leads its group (issue 12
//! step 4.2, item (d)): a new [`GroupStore`] for this leadership, the live messages it
//! recovers from the group, and a broker `Queue` over it that serves them.
//!
//! What it owns: the order of activation — the store's barrier first (every entry
//! committed before this leadership is applied here), then the live list, then the
//! queue, filled in offset order with each message's recorded delivery count.
//!
//! Invariants: a message enters the queue only once committed (recovered messages are
//! committed by definition); the queue records its consumers' outcomes in the same store
//! (`QueueOwner::Group`).
//!
//! Does not: watch leadership (the caller activates on a `Leadership` change and drops
//! the broker, or its queue, when the leadership ends — one store per leadership),
//! replace a queue of the same name that the broker already serves
//! (`Broker::adopt_queue` keeps it). A recovered message's `ttl` counts from when it was
//! stored (its record's time, the proposer's clock), as after a single node's restart.

use std::sync::Arc;

use entrepot_cluster::GroupHandle;
use entrepot_storage::DEFAULT_GROUP;

use super::address_machine::AddressMachine;
use super::group_store::{GroupStore, GroupStoreError};
use crate::broker::queue::{Queue, QueueOwner};
use crate::broker::{queued, Broker};

/// What activation built: the leadership's store, the queue over it, and how many live
/// messages it recovered into the queue.
pub struct Activated {
    pub store: Arc<GroupStore>,
    pub queue: Arc<Queue>,
    pub recovered: usize,
}

/// Activates `address` on `broker` from its group (`handle`, and the `machine` the host
/// applies it to); this node must lead the group ([`GroupStoreError::NotLeader`]).
pub async fn activate(
    broker: &Broker,
    address: &str,
    handle: GroupHandle,
    machine: AddressMachine,
) -> Result<Activated, GroupStoreError> {
    let store = Arc::new(GroupStore::new(address, handle, machine));
    let live = store.recover().await?;
    let recovered = live.len();
    let queue = broker.adopt_queue(Queue::owned(
        address.to_owned(),
        QueueOwner::Group(store.clone()),
    ));
    let messages = live.into_iter().map(|m| {
        let mut q = queued(m.offset, m.message, m.stored_at_ms);
        let failed = store.delivery_count(DEFAULT_GROUP, m.offset);
        q.delivery_count = q.delivery_count.max(failed);
        q
    });
    queue.enqueue_all(broker, messages);
    Ok(Activated {
        store,
        queue,
        recovered,
    })
}
