//! Address spaces, addresses, plans and messaging users declared as YAML manifests
//! (EnMasse's shapes), and the live, atomically replaced [`Catalog`] built from them.
//!
//! * [`model`] — the documents as written.
//! * [`load`] — reading a directory, with every error given as `file:line: reason`; a
//!   directory with any error yields no catalog at all, so an apply is all or nothing.
//! * [`watch`] — re-applying when the directory changes.
//!
//! Tenancy: each address space is a namespace. A queue of space `app` at address
//! `orders` is stored as `app/orders`; clients only ever see `orders`, and only in the
//! space their connection chose (by AMQP open hostname or TLS SNI, else the default).
//!
//! Does not: authenticate (see [`crate::auth`]) or touch queues; it only answers "what
//! exists and who may do what".

pub mod authz;
pub mod export;
pub mod load;
pub mod model;
pub mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::amqp::scram::ScramCredential;
use authz::{Operation, Rule};
pub use model::AddressType;

/// Where a document came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One problem in a manifest set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {reason}")]
pub struct ManifestError {
    pub origin: Origin,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPlan {
    pub name: String,
    pub max_depth: Option<u64>,
    pub max_bytes: Option<u64>,
    pub max_message_bytes: Option<u64>,
    pub retention_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressSpacePlan {
    pub name: String,
    pub max_addresses: Option<u64>,
    pub max_connections: Option<u64>,
    pub max_stored_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub address: String,
    pub address_type: AddressType,
    pub plan: String,
    pub topic: Option<String>,
    pub delete_with_messages: bool,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserAuth {
    Password(ScramCredential),
    /// Authenticates with a bearer token checked by a token authenticator.
    ServiceAccount,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub username: String,
    pub auth: UserAuth,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressSpace {
    pub name: String,
    pub plan: String,
    pub allow_anonymous: bool,
    pub hostnames: Vec<String>,
    pub addresses: BTreeMap<String, Address>,
    pub users: BTreeMap<String, User>,
}

impl AddressSpace {
    /// The queue name an address of this space is stored under.
    pub fn internal_name(&self, address: &str) -> String {
        internal_name(&self.name, address)
    }

    /// Whether `user` (`None`: anonymous) may do `op` on `address`.
    pub fn allows(&self, user: Option<&str>, op: Operation, address: &str) -> bool {
        match user {
            None => self.allow_anonymous,
            Some(u) => self
                .users
                .get(u)
                .is_some_and(|u| authz::allows(&u.rules, op, address)),
        }
    }
}

impl AddressType {
    /// The broker's nearest stored kind for a declared type (anycast: a queue, multicast:
    /// a topic, subscription: a queue). The broker itself declares the exact type, see
    /// [`Catalog::declarations`].
    pub fn broker_kind(self) -> crate::broker::AddressKind {
        use crate::broker::AddressKind;
        match self {
            AddressType::Queue | AddressType::Anycast | AddressType::Subscription => {
                AddressKind::Queue
            }
            AddressType::Topic | AddressType::Multicast => AddressKind::Topic,
        }
    }
}

impl AddressPlan {
    /// The broker's limits for an address on this plan.
    pub fn limits(&self) -> crate::broker::limits::AddressLimits {
        crate::broker::limits::AddressLimits {
            depth_max: self.max_depth,
            bytes_max: self.max_bytes,
            message_bytes_max: self.max_message_bytes,
            retention_secs: self.retention_secs,
        }
    }
}

impl Catalog {
    /// Everything the broker must create for the addresses of `space`, with their
    /// plans' limits, counting against `usage` (the space's stored bytes).
    pub fn declarations(
        &self,
        space: &AddressSpace,
        usage: &Arc<crate::broker::limits::SpaceUsage>,
    ) -> Vec<crate::broker::Declaration> {
        use crate::broker::DeclaredType;
        space
            .addresses
            .values()
            .map(|a| crate::broker::Declaration {
                name: space.internal_name(&a.address),
                declared: match a.address_type {
                    AddressType::Queue => DeclaredType::Queue,
                    AddressType::Topic => DeclaredType::Topic,
                    AddressType::Anycast => DeclaredType::Anycast,
                    AddressType::Multicast => DeclaredType::Multicast,
                    AddressType::Subscription => DeclaredType::Subscription {
                        topic: space.internal_name(a.topic.as_deref().unwrap_or_default()),
                    },
                },
                limits: self
                    .address_plans
                    .get(&a.plan)
                    .map(AddressPlan::limits)
                    .unwrap_or_default(),
                space: Some(Arc::clone(usage)),
            })
            .collect()
    }
}

/// `<space>/<address>`: the store's name for an address of a space.
pub use crate::broker::internal_name;

/// A validated manifest set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    pub spaces: BTreeMap<String, AddressSpace>,
    pub address_plans: BTreeMap<String, AddressPlan>,
    pub space_plans: BTreeMap<String, AddressSpacePlan>,
}

impl Catalog {
    /// The space a client chose by `hostname` (open hostname, SASL hostname or SNI): a
    /// space's name, one of its `hostnames`, or a host whose first label is a space's name
    /// (`app.example.com`); else `default`.
    pub fn space_for_host(
        &self,
        hostname: Option<&str>,
        default: Option<&str>,
    ) -> Option<&AddressSpace> {
        let by_host = hostname.and_then(|h| {
            let h = h.to_ascii_lowercase();
            self.spaces
                .get(&h)
                .or_else(|| {
                    self.spaces
                        .values()
                        .find(|s| s.hostnames.iter().any(|n| n.eq_ignore_ascii_case(&h)))
                })
                .or_else(|| {
                    h.split_once('.')
                        .and_then(|(first, _)| self.spaces.get(first))
                })
        });
        by_host.or_else(|| match default {
            Some(d) => self.spaces.get(d),
            None if self.spaces.len() == 1 => self.spaces.values().next(),
            None => None,
        })
    }
}

/// The catalog in force, replaced whole by each successful apply.
#[derive(Debug, Default)]
pub struct Live {
    current: RwLock<Option<Arc<Catalog>>>,
    /// The space of clients whose hostname selects none.
    pub default_space: Option<String>,
}

impl Live {
    pub fn new(default_space: Option<String>) -> Live {
        Live {
            current: RwLock::new(None),
            default_space,
        }
    }

    /// The catalog in force; `None` when the broker runs without manifests.
    pub fn current(&self) -> Option<Arc<Catalog>> {
        self.current
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn replace(&self, catalog: Catalog) {
        let mut slot = self.current.write().unwrap_or_else(|p| p.into_inner());
        *slot = Some(Arc::new(catalog));
    }
}
