//! Goal: an application request (`KIND_APP`, `cluster/src/app_request.rs`) reaches the
//! handler the receiving node registered and its answer comes back, over the node's
//! shared peer connection — many in flight at once, answered in any order; a node
//! without a handler answers `NoHandler`, a refusal is typed, a payload over the limit is
//! refused before anything is sent, and past `MAX_APP_REQUESTS_IN_FLIGHT` requests held
//! by the handler one more is answered `Busy` at once while the Raft traffic on the
//! same connection goes on (the group still commits).
//! Method: three `Host`s in this process over real TCP and real node logs, one group;
//! the handler echoes its payload reversed, or waits on a gate. Every wait is bounded.
//! Mutation-checked: the busy check in `AppServer::serve` removed (the flood test hangs
//! on the gate and the `Busy` assertion fails by its deadline).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use entrepot_cluster::{
    AppCallError, AppFuture, AppHandler, MAX_APP_PAYLOAD_BYTES, MAX_APP_REQUESTS_IN_FLIGHT,
};
use support::host::*;

/// Echoes a payload reversed; `refuse` is refused; `hold` waits until the gate opens.
#[derive(Clone)]
struct Echo {
    gate: Arc<tokio::sync::Semaphore>,
    held: Arc<AtomicUsize>,
}

impl AppHandler for Echo {
    fn handle(&self, payload: Bytes) -> AppFuture {
        let (gate, held) = (Arc::clone(&self.gate), Arc::clone(&self.held));
        Box::pin(async move {
            match &payload[..] {
                b"refuse" => Err("refused on purpose".to_owned()),
                b"hold" => {
                    held.fetch_add(1, Ordering::SeqCst);
                    let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
                    Ok(Bytes::from_static(b"released"))
                }
                p => Ok(p.iter().rev().copied().collect::<Vec<u8>>().into()),
            }
        })
    }
}

const CALL: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_requests_reach_the_handler_and_are_bounded() {
    bounded(async {
        let g = 1;
        let c = Cluster::start(&[g], u64::MAX).await;
        let leader = c.leader(g).await;
        let (a, b) = (0, 1);
        let host_a = &c.nodes[&a].host;
        let addr_b = c.addrs[&b].clone();

        // No handler on b yet.
        let none = host_a.app_request(b, &addr_b, b"x", CALL).await;
        assert!(matches!(none, Err(AppCallError::NoHandler)), "{none:?}");

        let echo = Echo {
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            held: Arc::default(),
        };
        c.nodes[&b].host.set_app_handler(echo.clone());

        // Many in flight on the one connection, each answered with its own reply.
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let payload = format!("request {i}");
            let (host, addr) = (host_a.clone(), addr_b.clone());
            calls.spawn(async move {
                let reply = host.app_request(b, &addr, payload.as_bytes(), CALL).await;
                let want: Vec<u8> = payload.bytes().rev().collect();
                assert_eq!(reply.unwrap(), want);
            });
        }
        while let Some(done) = calls.join_next().await {
            done.unwrap();
        }

        let refused = host_a.app_request(b, &addr_b, b"refuse", CALL).await;
        assert!(
            matches!(&refused, Err(AppCallError::Refused { reason }) if reason == "refused on purpose"),
            "{refused:?}"
        );
        let big = vec![0u8; MAX_APP_PAYLOAD_BYTES + 1];
        let too_large = host_a.app_request(b, &addr_b, &big, CALL).await;
        assert!(matches!(too_large, Err(AppCallError::TooLarge { .. })), "{too_large:?}");

        // The handler holds MAX_APP_REQUESTS_IN_FLIGHT requests: one more is busy at once.
        let held: Vec<_> = (0..MAX_APP_REQUESTS_IN_FLIGHT)
            .map(|_| {
                let host = c.nodes[&a].host.clone();
                let addr = addr_b.clone();
                tokio::spawn(async move { host.app_request(b, &addr, b"hold", CALL).await })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + WAIT;
        while echo.held.load(Ordering::SeqCst) < MAX_APP_REQUESTS_IN_FLIGHT {
            assert!(tokio::time::Instant::now() < deadline, "requests not held");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let busy = host_a.app_request(b, &addr_b, b"hold", CALL).await;
        assert!(
            matches!(busy, Err(AppCallError::Busy { limit }) if limit == MAX_APP_REQUESTS_IN_FLIGHT),
            "{busy:?}"
        );
        // Raft goes on meanwhile over the same connections.
        let at = c
            .handle(leader, g)
            .propose(message(b"while held"))
            .await
            .unwrap();
        for n in 0..NODES {
            applied_at_least(&c.handle(n, g), at).await;
        }
        echo.gate.add_permits(MAX_APP_REQUESTS_IN_FLIGHT);
        for h in held {
            assert_eq!(h.await.unwrap().unwrap(), &b"released"[..]);
        }
    })
    .await;
}
