//! A counting `#[global_allocator]` for the benches that report heap allocations per
//! message (`fanout`, `allocations`): wraps `System`, counts every `alloc`,
//! `alloc_zeroed` and `realloc` call and its size (frees are not counted), and attributes
//! each to the role of the calling thread. A bench declares it itself —
//! `#[global_allocator] static ALLOC: Counting = Counting;` — so the other benches keep
//! the plain system allocator.
//!
//! Roles: a thread marks itself with [`mark`] (from a runtime's `on_thread_start`, or at
//! the top of a client thread); a thread that never marked itself is one the broker
//! started on its own (the store's group-commit thread) and counts as broker.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// Never marked: a thread the broker started itself.
    Unmarked,
    Broker,
    Client,
}

thread_local! {
    // `const` and `Copy`: no lazy initialisation and no destructor, so the allocator
    // may read it at any time without allocating.
    static ROLE: Cell<Role> = const { Cell::new(Role::Unmarked) };
}

static BROKER_ALLOCS: AtomicU64 = AtomicU64::new(0);
static BROKER_BYTES: AtomicU64 = AtomicU64::new(0);
static CLIENT_ALLOCS: AtomicU64 = AtomicU64::new(0);
static CLIENT_BYTES: AtomicU64 = AtomicU64::new(0);

/// The counting allocator.
pub struct Counting;

impl Counting {
    fn count(&self, size: usize) {
        let role = ROLE.try_with(Cell::get).unwrap_or(Role::Unmarked);
        let (n, b) = match role {
            Role::Client => (&CLIENT_ALLOCS, &CLIENT_BYTES),
            Role::Broker | Role::Unmarked => (&BROKER_ALLOCS, &BROKER_BYTES),
        };
        n.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`; counting touches only atomics
// and a const thread-local, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Marks the calling thread's role.
pub fn mark(role: Role) {
    ROLE.with(|r| r.set(role));
}

/// Allocation counts (and bytes) so far, per side.
#[derive(Clone, Copy, Default, Debug)]
pub struct Allocs {
    pub broker: u64,
    pub broker_bytes: u64,
    pub client: u64,
    pub client_bytes: u64,
}

impl Allocs {
    pub fn now() -> Allocs {
        Allocs {
            broker: BROKER_ALLOCS.load(Ordering::Relaxed),
            broker_bytes: BROKER_BYTES.load(Ordering::Relaxed),
            client: CLIENT_ALLOCS.load(Ordering::Relaxed),
            client_bytes: CLIENT_BYTES.load(Ordering::Relaxed),
        }
    }

    /// What was counted between `earlier` and `self`.
    pub fn since(&self, earlier: &Allocs) -> Allocs {
        Allocs {
            broker: self.broker - earlier.broker,
            broker_bytes: self.broker_bytes - earlier.broker_bytes,
            client: self.client - earlier.client,
            client_bytes: self.client_bytes - earlier.client_bytes,
        }
    }
}
