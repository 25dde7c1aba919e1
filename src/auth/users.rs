//! SASL credential checks against the MessagingUsers of one address space.

use crate::amqp::sasl::Authenticator;
use crate::amqp::scram::ScramCredential;
use crate::manifest::{AddressSpace, UserAuth};

use super::tokens::TokenAuthenticator;

/// The users of `space`, as a SASL [`Authenticator`].
pub struct SpaceUsers<'a> {
    pub space: &'a AddressSpace,
    pub tokens: Option<&'a dyn TokenAuthenticator>,
}

impl Authenticator for SpaceUsers<'_> {
    fn check_plain(&self, authzid: Option<&str>, authcid: &str, passwd: &str) -> bool {
        if authzid.is_some_and(|z| z != authcid) {
            return false;
        }
        match self.space.users.get(authcid).map(|u| &u.auth) {
            Some(UserAuth::Password(c)) => c.verify_password(passwd),
            Some(UserAuth::ServiceAccount) => self
                .tokens
                .and_then(|t| t.review(passwd))
                .is_some_and(|user| user == authcid),
            None => false,
        }
    }

    fn scram_credential(&self, username: &str) -> Option<ScramCredential> {
        match self.space.users.get(username).map(|u| &u.auth) {
            Some(UserAuth::Password(c)) => Some(c.clone()),
            _ => None,
        }
    }
}
