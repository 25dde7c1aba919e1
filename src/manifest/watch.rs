//! Applying a manifest directory: at start-up, and again whenever it changes (an inotify
//! watch through `notify`, debounced), without a restart.
//!
//! An apply is all or nothing: a directory with any error leaves the catalog in force
//! untouched and logs every error as `file:line: reason`. Removing an Address whose queue
//! still holds messages is refused unless its last applied spec said
//! `deleteWithMessages: true`: the address is kept (logged, counted in
//! `entrepot_manifest_deletions_refused_total`) and the rest of the set applies.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use super::{load, AddressSpace, Catalog, Live, ManifestError};
use crate::broker::Broker;

/// Quiet time after a change before re-applying, so an editor's save or a `git pull`
/// that writes several files is applied once.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Loads `dir` and makes it the catalog in force, or changes nothing.
pub fn apply(dir: &Path, broker: &Broker, live: &Live) -> Result<(), Vec<ManifestError>> {
    let mut catalog = match load::load_dir(dir) {
        Ok(c) => c,
        Err(errors) => {
            broker
                .stats
                .declarations
                .rejected
                .fetch_add(1, Ordering::Relaxed);
            for e in &errors {
                tracing::error!(error = %e, "manifest rejected; nothing applied");
            }
            return Err(errors);
        }
    };
    if let Some(old) = live.current() {
        keep_non_empty_addresses(&old, &mut catalog, broker);
    }
    if let Some(old) = live.current() {
        undeclare_removed(&old, &catalog, broker);
    }
    declare_all(&catalog, broker);
    let (spaces, addresses, users) = catalog.spaces.values().fold((0, 0, 0), |(s, a, u), sp| {
        (s + 1, a + sp.addresses.len(), u + sp.users.len())
    });
    live.replace(catalog);
    broker
        .stats
        .declarations
        .applied
        .fetch_add(1, Ordering::Relaxed);
    tracing::info!(dir = %dir.display(), spaces, addresses, users, "manifests applied");
    Ok(())
}

/// Creates every address of `catalog` in the broker and applies the plans' limits.
fn declare_all(catalog: &Catalog, broker: &Broker) {
    for space in catalog.spaces.values() {
        let plan = catalog.space_plans.get(&space.plan);
        let usage = broker.space_usage(&space.name, plan.and_then(|p| p.max_stored_bytes));
        usage.set_connections_max(plan.and_then(|p| p.max_connections));
        for d in catalog.declarations(space, &usage) {
            if let Err(e) = broker.declare_address(&d) {
                tracing::error!(address = %d.name, error = %e, "could not declare address");
            }
        }
    }
}

/// Removes the named subscriptions and in-memory addresses that `new` no longer has
/// (or has with another type, to be declared afresh).
fn undeclare_removed(old: &Catalog, new: &Catalog, broker: &Broker) {
    for old_space in old.spaces.values() {
        for a in old_space.addresses.values() {
            let kept = new
                .spaces
                .get(&old_space.name)
                .and_then(|s| s.addresses.get(&a.address));
            if kept.is_some_and(|k| k.address_type == a.address_type) {
                continue;
            }
            broker.undeclare_address(&old_space.internal_name(&a.address));
        }
    }
}

/// Puts back every address that `new` drops while its queue holds messages.
fn keep_non_empty_addresses(old: &Catalog, new: &mut Catalog, broker: &Broker) {
    let mut kept = Vec::new();
    for old_space in old.spaces.values() {
        for a in old_space.addresses.values() {
            let still_there = new
                .spaces
                .get(&old_space.name)
                .is_some_and(|s| s.addresses.contains_key(&a.address));
            let held = broker.held_messages(&old_space.internal_name(&a.address));
            if still_there || held == 0 || a.delete_with_messages {
                continue;
            }
            broker
                .stats
                .declarations
                .deletions_refused
                .fetch_add(1, Ordering::Relaxed);
            kept.push(format!(
                "{}/{} ({held} messages)",
                old_space.name, a.address
            ));
            tracing::warn!(space = %old_space.name, address = %a.address, messages = held,
                "refusing to delete an address that still holds messages (set deleteWithMessages: true to allow); keeping it");
            let space = new
                .spaces
                .entry(old_space.name.clone())
                .or_insert_with(|| AddressSpace {
                    users: Default::default(),
                    addresses: Default::default(),
                    ..old_space.clone()
                });
            space.addresses.insert(a.address.clone(), a.clone());
        }
    }
    if let Ok(mut slot) = broker.stats.declarations.kept.lock() {
        *slot = kept;
    }
}

/// Re-applies `dir` whenever it changes, until `shutdown`.
///
/// `gate` is whatever holds the [`Live`] catalog clients are checked against (the
/// `auth::Gatekeeper`): manifest never names the layer that authenticates.
pub async fn watch_dir<G>(
    dir: PathBuf,
    broker: Arc<Broker>,
    gate: Arc<G>,
    mut shutdown: watch::Receiver<bool>,
) where
    G: AsRef<Live> + Send + Sync + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            return tracing::error!(error = %e, "cannot watch manifests; changes need a restart")
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        return tracing::error!(dir = %dir.display(), error = %e, "cannot watch manifests; changes need a restart");
    }
    loop {
        tokio::select! {
            got = rx.recv() => if got.is_none() { return },
            _ = shutdown.changed() => return,
        }
        // Debounce: wait until the directory has been quiet for DEBOUNCE.
        while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
        let (dir, broker, gate) = (dir.clone(), Arc::clone(&broker), Arc::clone(&gate));
        let _ = tokio::task::spawn_blocking(move || {
            apply(&dir, &broker, AsRef::<Live>::as_ref(&*gate))
        })
        .await;
    }
}
