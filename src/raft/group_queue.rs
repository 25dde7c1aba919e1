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
//! Does not: watch leadership (`group_driver.rs` activates on a `Leadership` change and
//! retires the queue when the leadership ends — one store per leadership), or replace a
//! queue of the same name that the broker already serves and that is not retired
//! (`Broker::adopt_queue` keeps it; activation then fails `NameTaken`). A recovered message's `ttl` counts from when it was
//! stored (its record's time, the proposer's clock), as after a single node's restart.

use std::sync::Arc;

use entrepot_cluster::GroupHandle;
use entrepot_storage::DEFAULT_GROUP;

use super::address_machine::AddressMachine;
use super::group_store::{GroupStore, GroupStoreError};
use crate::broker::lease::DeliveryLease;
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
/// applies it to); this node must lead the group ([`GroupStoreError::NotLeader`]). The
/// queue delivers without a lease: only where no deposed leader can resume (tests); the
/// leadership driver (`group_driver.rs`) uses [`activate_leased`].
pub async fn activate(
    broker: &Broker,
    address: &str,
    handle: GroupHandle,
    machine: AddressMachine,
) -> Result<Activated, GroupStoreError> {
    activate_with(broker, address, handle, machine, None).await
}

/// [`activate`] with a queue that delivers only while `lease` holds.
pub async fn activate_leased(
    broker: &Broker,
    address: &str,
    handle: GroupHandle,
    machine: AddressMachine,
    lease: Arc<DeliveryLease>,
) -> Result<Activated, GroupStoreError> {
    activate_with(broker, address, handle, machine, Some(lease)).await
}

async fn activate_with(
    broker: &Broker,
    address: &str,
    handle: GroupHandle,
    machine: AddressMachine,
    lease: Option<Arc<DeliveryLease>>,
) -> Result<Activated, GroupStoreError> {
    let store = Arc::new(GroupStore::new(address, handle, machine));
    let live = store.recover().await?;
    let recovered = live.len();
    let owner = QueueOwner::Group(store.clone());
    let queue = match lease {
        Some(lease) => Queue::leased(address.to_owned(), owner, lease),
        None => Queue::owned(address.to_owned(), owner),
    };
    let queue = broker.adopt_queue(queue);
    let ours = queue
        .address_store()
        .is_some_and(|s| std::ptr::addr_eq(Arc::as_ptr(s), Arc::as_ptr(&store)));
    if !ours {
        // Another queue serves the name (a local one): filling it would mix stores.
        return Err(GroupStoreError::NameTaken {
            address: address.to_owned(),
        });
    }
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
