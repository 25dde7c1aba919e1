//! `amqp:link:redirect` as a client reads it: the refused attach's error carries the
//! node that serves the address in its `info` (`network-host`, `port`, `address`, the
//! AMQP 1.0 link-redirect fields, as `cluster-mode: groups` sends them). Shared by the
//! groups tests' clients (`cluster_groups`, the groups campaign's load), which follow a
//! redirect by connecting there and attaching again.

use fe2o3_amqp::types::definitions::{self, ErrorCondition, LinkError};
use fe2o3_amqp::types::primitives::{Symbol, Value};

/// Where a redirect sends a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// `network-host:port`.
    pub to: String,
    /// The address to attach to there.
    pub address: String,
}

/// The redirect `e` names, or why `e` is not a well-formed redirect.
pub fn redirect_of(e: &definitions::Error) -> Result<Redirect, String> {
    if e.condition != ErrorCondition::LinkError(LinkError::Redirect) {
        return Err(format!("not a redirect: {e:?}"));
    }
    let info = e
        .info
        .as_ref()
        .ok_or_else(|| format!("redirect without info: {e:?}"))?;
    let field = |k: &str| info.get(&Symbol::from(k)).cloned();
    let host = match field("network-host") {
        Some(Value::String(h)) => h,
        other => return Err(format!("network-host: {other:?}")),
    };
    let port = match field("port") {
        Some(Value::Ushort(p)) => p,
        other => return Err(format!("port: {other:?}")),
    };
    let address = match field("address") {
        Some(Value::String(a)) => a,
        other => return Err(format!("address: {other:?}")),
    };
    Ok(Redirect {
        to: format!("{host}:{port}"),
        address,
    })
}
