//! Tenancy and authorization at the connection edge: choosing the address space at
//! `open`, and checking each attach against the user's rules.
//!
//! Without manifests both are no-ops: every address is its own queue name and every
//! client may use it (today's behaviour). With manifests the space is chosen by the open
//! hostname, else the TLS SNI, else the default; a client that logged in to one space
//! cannot open another. Addresses are looked up in the catalog in force at attach time,
//! so a re-apply takes effect on the next attach; links already attached stay attached.

use super::errors::{AccessError, ClientError, Refusal};
use super::{ConnError, Connection};
use crate::amqp::sasl::Identity;
use crate::auth::authz::Operation;
use crate::manifest::AddressType;

/// An address the client may use, by its name in the store.
pub(super) struct Resolved {
    pub name: String,
    /// Its declared type (with manifests).
    pub address_type: Option<AddressType>,
}

impl Connection {
    fn user(&self) -> Option<&str> {
        match &self.identity {
            Identity::Anonymous => None,
            Identity::User { authzid, authcid } => Some(authzid.as_deref().unwrap_or(authcid)),
        }
    }

    /// Picks the connection's address space after `open` (see the module docs).
    pub(super) fn choose_space(&mut self) -> Result<(), ConnError> {
        let Some(catalog) = self.gate.manifests.current() else {
            return Ok(());
        };
        let host = self.hostname.as_deref().or(self.sni.as_deref());
        let default = self.gate.manifests.default_space.as_deref();
        let Some(space) = catalog.space_for_host(host, default) else {
            let host = host.map(str::to_owned);
            return Err(ConnError::refused(&AccessError::NoSpaceForHost { host }));
        };
        let allowed = match (&self.identity, &self.login_space) {
            (Identity::Anonymous, _) => space.allow_anonymous,
            (Identity::User { .. }, Some(login)) => *login == space.name,
            (Identity::User { .. }, None) => false,
        };
        if !allowed {
            let space = space.name.clone();
            return Err(ConnError::refused(&AccessError::NotAuthenticated { space }));
        }
        // The space plan's maxConnections: the slot is freed when the connection ends.
        if let Some(usage) = self.broker.space(&space.name) {
            let slot = usage.connect().map_err(|e| ConnError::refused(&e))?;
            self.space_slot = Some(slot);
        }
        self.space = Some(space.name.clone());
        Ok(())
    }

    /// Checks that the client may do `op` on `address` and returns the name to use
    /// inside the broker; the error is the refusal to send back on the link.
    pub(super) fn authorize(&self, op: Operation, address: &str) -> Result<Resolved, Refusal> {
        let Some(catalog) = self.gate.manifests.current() else {
            return Ok(Resolved {
                name: address.to_owned(),
                address_type: None,
            });
        };
        let space = self
            .space
            .as_deref()
            .and_then(|s| catalog.spaces.get(s))
            .ok_or_else(|| {
                let space = self.space.clone();
                AccessError::SpaceGone { space }.refusal()
            })?;
        if !space.allows(self.user(), op, address) {
            let who = self.user().unwrap_or("anonymous").to_owned();
            let address = address.to_owned();
            return Err(AccessError::NotPermitted { who, op, address }.refusal());
        }
        let Some(declared) = space.addresses.get(address) else {
            let (address, space) = (address.to_owned(), space.name.clone());
            return Err(AccessError::NotDeclared { address, space }.refusal());
        };
        // The kind was fixed when the address was declared at apply time.
        Ok(Resolved {
            name: space.internal_name(address),
            address_type: Some(declared.address_type),
        })
    }
}
