//! A consumer link whose address another node leads, served here
//! ([`Route::Forward`](crate::broker::routing::Route), `link-routing: forward`): the link
//! consumes the *shadow* its [`RemoteAddress`] opens — a local queue the carrier fills
//! with the leader's deliveries — through the same dispatch, credit, settlement and
//! detach code as a local consumer (`finish_consumer_attach`). The shadow's owner carries
//! every outcome to the leader, and a settle-second receiver is settled back only once
//! the leader recorded it (its `Recorded` completes from the leader's answer).
//!
//! Invariants: a selector is validated here and applied by the leader's queue (echoed in
//! our attach like a local one); browsing (`distribution-mode: copy`) is refused with
//! `amqp:not-implemented` naming why, never silently turned into consuming; when the
//! carrier gives up, the shadow is retired, so the link is detached
//! `amqp:link:detach-forced` with the carrier's reason and its unsettled deliveries come
//! again (from the leader) after the client attaches again.
//!
//! Does not: store or acknowledge anything on this node, or take outcomes in a
//! transaction (a clustered node refuses transaction coordinators).

use fe2o3_amqp_types::definitions::{AmqpError, LinkError};
use fe2o3_amqp_types::messaging::DistributionMode;
use fe2o3_amqp_types::performatives::Attach;
use std::sync::Arc;

use super::{subscribe, Applied, Session};
use crate::broker::forwarding::{ConsumerRequest, RemoteAddress, MAX_FORWARDED_SELECTOR_BYTES};
use crate::connection::{ConnError, Connection};

impl Session {
    /// Attaches a consumer link to an address `remote` leads: answered like a local one,
    /// its deliveries fetched from there.
    pub(in crate::connection) fn attach_forwarded_consumer(
        &mut self,
        conn: &mut Connection,
        attach: Attach,
        remote: Arc<dyn RemoteAddress>,
    ) -> Result<(), ConnError> {
        let source = attach.source.as_deref().cloned().unwrap_or_default();
        if source.distribution_mode == Some(DistributionMode::Copy) {
            let d = format!(
                "browsing (distribution-mode copy) is not carried to the address's leader \
                 ({}) yet: browse on the leader's node, or consume",
                remote.leader()
            );
            return self.refuse(conn, attach, (AmqpError::NotImplemented.into(), d));
        }
        let filters = match subscribe::filters(&source) {
            Ok(f) => f,
            Err(refusal) => return self.refuse(conn, attach, refusal),
        };
        let selector = match &filters.selector {
            Some((text, _)) if text.len() > MAX_FORWARDED_SELECTOR_BYTES => {
                let d = format!(
                    "a selector of {} bytes is longer than a forwarded link carries \
                     ({MAX_FORWARDED_SELECTOR_BYTES}, MAX_FORWARDED_SELECTOR_BYTES)",
                    text.len()
                );
                return self.refuse(conn, attach, (AmqpError::ResourceLimitExceeded.into(), d));
            }
            Some((text, _)) => match subscribe::parse_selector(text) {
                Ok(_) => Some(text.clone()),
                Err(refusal) => return self.refuse(conn, attach, refusal),
            },
            None => None,
        };
        let request = ConsumerRequest {
            link: attach.name.clone(),
            selector,
        };
        let shadow = match remote.open_consumer(&conn.broker, request) {
            Ok(q) => q,
            Err(why) => {
                let d = format!(
                    "cannot forward to its leader ({}): {why}; attach again",
                    remote.leader()
                );
                return self.refuse(conn, attach, (LinkError::DetachForced.into(), d));
            }
        };
        tracing::debug!(link = %attach.name, leader = %remote.leader(), "consumer link forwarded");
        // The leader's queue applies the selector; the shadow holds only what matched.
        let applied = Applied {
            selector: None,
            echo: filters.applied(false),
        };
        self.finish_consumer_attach(conn, attach, shadow, None, applied)
    }
}
