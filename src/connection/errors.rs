//! The one place where an error the broker reports to a client becomes an AMQP error
//! condition.
//!
//! Every error type a client can be told about implements [`ClientError`]: its condition
//! is chosen here, once, and its description is its own `Display` (the text clients and
//! tests read). The engine (link.rs, session.rs, subscribe.rs, txn.rs, tenant.rs) sends
//! `e.refusal()`, or `e.condition()` with a description that adds what the client should
//! do next; it never picks a condition for one of these errors itself.
//!
//! What this does not cover: the peer's own protocol violations (a framing error, a frame
//! in the wrong state, a window violation, a message that does not decode) and this
//! engine's limits on a connection (transactions, deliveries); the engine detects those
//! itself, and the condition is part of the check, where it is made.

use fe2o3_amqp_types::definitions::{AmqpError, ErrorCondition, LinkError};

use crate::auth::authz::Operation;
use crate::broker::intake::IntakeRefused;
use crate::broker::limits::LimitExceeded;
use crate::broker::queue::AckRefused;
use crate::broker::store::{AddressStoreError, RecordError, StoreError};
use crate::broker::subscriptions::SubscriptionError;
use crate::broker::AddressError;

/// What a client is told when something it asked for is refused: the condition and the
/// description of an AMQP `error`.
pub type Refusal = (ErrorCondition, String);

/// An error a client hears about, and the AMQP condition it maps to.
pub trait ClientError: std::fmt::Display {
    /// The one condition of this error.
    fn condition(&self) -> ErrorCondition;

    /// The condition, with the error's own text as description.
    fn refusal(&self) -> Refusal {
        (self.condition(), self.to_string())
    }
}

/// Why a client may not use an address space or an address (manifests; see tenant.rs).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    #[error("no address space for hostname {host:?}")]
    NoSpaceForHost { host: Option<String> },
    #[error("not authenticated for address space {space:?}")]
    NotAuthenticated { space: String },
    #[error("address space {space:?} no longer exists")]
    SpaceGone { space: Option<String> },
    #[error("{who} may not {op} on address {address:?}")]
    NotPermitted {
        who: String,
        op: Operation,
        address: String,
    },
    #[error("address {address:?} does not exist in address space {space:?}")]
    NotDeclared { address: String, space: String },
}

impl ClientError for AccessError {
    fn condition(&self) -> ErrorCondition {
        match self {
            AccessError::NoSpaceForHost { .. }
            | AccessError::SpaceGone { .. }
            | AccessError::NotDeclared { .. } => AmqpError::NotFound.into(),
            AccessError::NotAuthenticated { .. } | AccessError::NotPermitted { .. } => {
                AmqpError::UnauthorizedAccess.into()
            }
        }
    }
}

impl ClientError for AddressError {
    fn condition(&self) -> ErrorCondition {
        match self {
            AddressError::NotFound(_) => AmqpError::NotFound.into(),
            AddressError::Empty | AddressError::TooLong(_) => AmqpError::InvalidField.into(),
            AddressError::TooMany { .. } => AmqpError::ResourceLimitExceeded.into(),
        }
    }
}

impl ClientError for SubscriptionError {
    fn condition(&self) -> ErrorCondition {
        match self {
            SubscriptionError::Selector(_) => AmqpError::InvalidField.into(),
            SubscriptionError::TooMany => AmqpError::ResourceLimitExceeded.into(),
            SubscriptionError::OtherTopic { .. } => AmqpError::PreconditionFailed.into(),
            SubscriptionError::Persist(_) => AmqpError::InternalError.into(),
        }
    }
}

/// A plan's limit (address depth or bytes, message size, space bytes or connections).
impl ClientError for LimitExceeded {
    fn condition(&self) -> ErrorCondition {
        AmqpError::ResourceLimitExceeded.into()
    }
}

/// The budget of incomplete (multi-frame) deliveries.
impl ClientError for IntakeRefused {
    fn condition(&self) -> ErrorCondition {
        AmqpError::ResourceLimitExceeded.into()
    }
}

/// The store refused a message: a full disk is the client's to wait out, anything else is
/// ours.
impl ClientError for StoreError {
    fn condition(&self) -> ErrorCondition {
        out_of_space_or_internal(self.is_out_of_space())
    }
}

/// The store refused a consumer's acknowledgement; as for [`StoreError`].
impl ClientError for AckRefused {
    fn condition(&self) -> ErrorCondition {
        match &self.source {
            // The queue's leadership here ended: the consumer attaches again where the
            // address is served now (as for the retirement's own detach).
            RecordError::Address(AddressStoreError::Retired { .. }) => {
                LinkError::DetachForced.into()
            }
            _ => out_of_space_or_internal(self.is_out_of_space()),
        }
    }
}

fn out_of_space_or_internal(out_of_space: bool) -> ErrorCondition {
    match out_of_space {
        true => AmqpError::ResourceLimitExceeded.into(),
        false => AmqpError::InternalError.into(),
    }
}

/// An attach refused because its address is not served here (`cluster-mode: groups`):
/// the condition, the description and the error's `info`. `Elsewhere` is
/// `amqp:link:redirect` whose `info` carries `network-host`, `port` (ushort) and
/// `address` (the AMQP 1.0 link-redirect fields, as Qpid Dispatch sends them), so a
/// client attaches there instead — at the leader's amqps port when the client came in
/// over TLS (`tls`), never sending it from TLS to plain text; `Unavailable` is
/// `amqp:link:detach-forced` with the reason. `None` for `Here`.
pub fn route_refusal(
    route: &crate::broker::routing::Route,
    address: &str,
    tls: bool,
) -> Option<(
    ErrorCondition,
    String,
    Option<fe2o3_amqp_types::definitions::Fields>,
)> {
    use crate::broker::routing::Route;
    use fe2o3_amqp_types::definitions::LinkError;
    use fe2o3_amqp_types::primitives::{Symbol, Value};
    match route {
        // Served here, or carried to its leader from here: not a refusal.
        Route::Here | Route::Forward(_) => None,
        Route::Elsewhere {
            host,
            port,
            amqps_port,
        } => {
            let port = match tls {
                true => amqps_port,
                false => port,
            };
            let mut info = fe2o3_amqp_types::definitions::Fields::new();
            info.insert(Symbol::from("network-host"), Value::String(host.clone()));
            info.insert(Symbol::from("port"), Value::Ushort(*port));
            info.insert(Symbol::from("address"), Value::String(address.to_owned()));
            let description =
                format!("address {address:?} is led by another node: attach at {host}:{port}");
            Some((LinkError::Redirect.into(), description, Some(info)))
        }
        Route::Unavailable(why) => Some((
            LinkError::DetachForced.into(),
            format!("address {address:?} is not served now: {why}; attach again"),
            None,
        )),
    }
}
