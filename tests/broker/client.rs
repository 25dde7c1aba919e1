//! fe2o3-amqp client helpers shared by the end-to-end modules: bounded waits and a
//! connection with one session.

use std::future::Future;
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection, Session};

use crate::harness::BrokerProcess;

/// Longest a single client operation may take (also covers the broker's housekeeping).
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a receiver listens to show that nothing arrives.
pub const QUIET: Duration = Duration::from_millis(500);

/// Awaits `f`, failing the test (naming `what`) if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    within_for(WAIT, what, f).await
}

/// Awaits `f`, failing the test (naming `what`) if it takes longer than `limit`.
pub async fn within_for<F: Future>(limit: Duration, what: &str, f: F) -> F::Output {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

/// Opens a connection with container-id `container` and begins one session.
pub async fn connect(
    broker: &BrokerProcess,
    container: &str,
) -> (ConnectionHandle<()>, SessionHandle<()>) {
    let mut conn = within("open", Connection::open(container, broker.url().as_str()))
        .await
        .expect("open");
    let session = within("begin", Session::begin(&mut conn))
        .await
        .expect("begin");
    (conn, session)
}
