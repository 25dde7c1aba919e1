//! A Qpid Dispatch Router in front of the broker: one connection, many sessions and links.
//!
//! Goal: the patterns qdrouterd uses against a broker work. It opens one connection as a
//! router container and multiplexes its clients over it: link-routed links keep the
//! client's link name, so several sessions carry links of the *same* name (on different
//! handles), and each must work on its own; auto-links attach one sender and one receiver
//! whose address is the queue, and the router drives the receiver with `drain=true`
//! flows, expecting deliveries or a flow with `drain=true` and the advanced
//! delivery-count — and no `link-credit` field, since qdrouterd 1.19 built with
//! assertions aborts when the sending side of a link sends one. Detaching one link leaves
//! the others working.
//!
//! Method: the raw client from [`crate::raw_client`] speaks for the router, so the test
//! sees every frame the broker sends. Frames are compared as one-line descriptions: in
//! order where the protocol orders them (one link), sorted where two sessions race.

use std::future::Future;
use std::time::Duration;

use fe2o3_amqp::types::definitions::{Fields, Role};
use fe2o3_amqp::types::messaging::{Accepted, DeliveryState};
use fe2o3_amqp::types::performatives::{Disposition, Performative};
use fe2o3_amqp::types::primitives::{Symbol, Value};
use tokio::time::timeout;

use crate::harness::BrokerProcess;
use crate::raw_client::{data_message, Client, Frame};

/// Longest any single exchange may take.
const WAIT: Duration = Duration::from_secs(5);
/// Silence that shows the broker has nothing more to say.
const QUIET: Duration = Duration::from_millis(300);
/// The link name the router's clients all use (link routing keeps it).
const LINK: &str = "client-link";

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

/// Opens a connection the way qdrouterd does: its own container id and product
/// properties, no session yet.
async fn router(broker: &BrokerProcess) -> Client {
    let mut props = Fields::new();
    props.insert(
        Symbol::from("product"),
        Value::String("qpid-dispatch-router".into()),
    );
    props.insert(Symbol::from("version"), Value::String("1.19.0".into()));
    within(
        "router open",
        Client::connect(broker.amqp, "Router.A", Some(props)),
    )
    .await
    .expect("connect")
}

/// The next `n` frames, described.
async fn take(r: &mut Client, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(describe(&within("frame", r.next_frame()).await));
    }
    out
}

/// The next `n` frames, described and sorted (for frames of several sessions).
async fn take_sorted(r: &mut Client, n: usize) -> Vec<String> {
    let mut out = take(r, n).await;
    out.sort();
    out
}

async fn assert_quiet(r: &mut Client, after: &str) {
    let extra: Vec<String> = r
        .frames_until_quiet(QUIET)
        .await
        .iter()
        .map(describe)
        .collect();
    assert!(
        extra.is_empty(),
        "unexpected frames after {after}: {extra:#?}"
    );
}

/// Sends one message and checks that the very next frame accepts it.
async fn send(r: &mut Client, channel: u16, handle: u32, id: u32, body: &str) {
    within(
        "transfer",
        r.transfer_on(channel, handle, id, &data_message(body.as_bytes())),
    )
    .await;
    assert_eq!(take(r, 1).await, [accepted(channel, id, id)]);
}

/// Accepts and settles our deliveries `first..=last` on a session; the broker answers
/// nothing to a settled disposition.
async fn settle(r: &mut Client, channel: u16, first: u32, last: u32) {
    let d = Disposition {
        role: Role::Receiver,
        first,
        last: Some(last),
        settled: true,
        state: Some(DeliveryState::Accepted(Accepted {})),
        batchable: false,
    };
    within(
        "disposition",
        r.send_on(channel, &Performative::Disposition(d), &[]),
    )
    .await;
}

fn accepted(channel: u16, first: u32, last: u32) -> String {
    format!("ch{channel} disposition receiver {first}..={last} settled accepted")
}

fn transfer(channel: u16, handle: u32, id: u32, body: &str) -> String {
    format!("ch{channel} transfer h{handle} id{id} unsettled {body:?}")
}

/// The flow a sender answers a drain with: no `link-credit` field at all.
fn drained(channel: u16, handle: u32, delivery_count: u32) -> String {
    format!(
        "ch{channel} flow h{handle} delivery-count={delivery_count} link-credit=absent drain=true"
    )
}

fn detached(channel: u16, handle: u32) -> String {
    format!("ch{channel} detach h{handle} closed error=None")
}

/// One line per frame, with the fields these tests care about.
fn describe(f: &Frame) -> String {
    let ch = f.channel;
    match &f.performative {
        Performative::Transfer(t) => {
            let settled = if t.settled == Some(true) {
                "settled"
            } else {
                "unsettled"
            };
            let id = t.delivery_id.map_or("?".into(), |i| i.to_string());
            let more = if t.more { " more" } else { "" };
            format!(
                "ch{ch} transfer h{} id{id} {settled}{more} {:?}",
                t.handle.0,
                body_text(&f.payload)
            )
        }
        Performative::Disposition(d) => {
            let role = if d.role == Role::Receiver {
                "receiver"
            } else {
                "sender"
            };
            let settled = if d.settled { "settled" } else { "unsettled" };
            let state = match &d.state {
                Some(DeliveryState::Accepted(_)) => "accepted".to_owned(),
                other => format!("{other:?}"),
            };
            let last = d.last.unwrap_or(d.first);
            format!(
                "ch{ch} disposition {role} {}..={last} {settled} {state}",
                d.first
            )
        }
        Performative::Flow(fl) => match fl.handle.as_ref() {
            Some(h) => format!(
                "ch{ch} flow h{} delivery-count={} link-credit={} drain={}",
                h.0,
                fl.delivery_count.map_or("absent".into(), |c| c.to_string()),
                fl.link_credit.map_or("absent".into(), |c| c.to_string()),
                fl.drain
            ),
            None => format!("ch{ch} session flow"),
        },
        Performative::Detach(d) => format!(
            "ch{ch} detach h{} {} error={:?}",
            d.handle.0,
            if d.closed { "closed" } else { "open" },
            d.error
        ),
        other => format!("ch{ch} {other:?}"),
    }
}

/// The text of a one-data-section message as [`data_message`] builds it.
fn body_text(payload: &[u8]) -> String {
    match payload {
        [0x00, 0x53, 0x75, 0xb0, len @ ..] if len.len() >= 4 => {
            String::from_utf8_lossy(&len[4..]).into_owned()
        }
        other => format!("{other:02x?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_routed_links_of_one_name_on_many_sessions_work_independently() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut r = router(&broker).await;
    for ch in 0..4 {
        within("begin", r.begin(ch)).await;
    }
    // Two clients' senders and two clients' receivers, all named LINK, on different
    // sessions and handles.
    for (ch, handle, queue) in [(0, 0, "lr.a"), (1, 5, "lr.b")] {
        let credit = within("attach", r.attach_sender_on(ch, handle, LINK, queue)).await;
        assert!(
            credit.link_credit.is_some_and(|c| c > 0),
            "each sender gets its own credit: {credit:?}"
        );
    }
    for (ch, handle, queue) in [(2, 0, "lr.a"), (3, 9, "lr.b")] {
        let attach = within("attach", r.attach_receiver_on(ch, handle, LINK, queue)).await;
        assert_eq!(attach.name, LINK);
        assert_eq!(attach.handle.0, handle, "our handle echoed");
        assert_eq!(
            attach.source.and_then(|s| s.address).as_deref(),
            Some(queue)
        );
        within("credit", r.flow_on(ch, handle, 0, 10, false)).await;
    }
    assert_quiet(&mut r, "attaching").await;

    // Each session numbers its deliveries from 0; each message reaches only its queue's
    // receiver.
    within("transfer", r.transfer_on(0, 0, 0, &data_message(b"a-1"))).await;
    within("transfer", r.transfer_on(1, 5, 0, &data_message(b"b-1"))).await;
    let mut expected = vec![
        accepted(0, 0, 0),
        accepted(1, 0, 0),
        transfer(2, 0, 0, "a-1"),
        transfer(3, 9, 0, "b-1"),
    ];
    expected.sort();
    assert_eq!(take_sorted(&mut r, 4).await, expected);
    settle(&mut r, 2, 0, 0).await;
    settle(&mut r, 3, 0, 0).await;
    assert_quiet(&mut r, "the first messages").await;

    // One client's sender goes away; only its link is detached.
    within("detach", r.detach_on(0, 0)).await;
    assert_eq!(take(&mut r, 1).await, [detached(0, 0)]);
    assert_quiet(&mut r, "the detach").await;
    send(&mut r, 1, 5, 1, "b-2").await;
    assert_eq!(take(&mut r, 1).await, [transfer(3, 9, 1, "b-2")]);

    // The name and handle come back on the same session, as for a reconnecting client.
    within("re-attach", r.attach_sender_on(0, 0, LINK, "lr.a")).await;
    send(&mut r, 0, 0, 1, "a-2").await;
    assert_eq!(take(&mut r, 1).await, [transfer(2, 0, 1, "a-2")]);

    // One receiver goes away; the other keeps receiving.
    within("detach", r.detach_on(2, 0)).await;
    assert_eq!(take(&mut r, 1).await, [detached(2, 0)]);
    send(&mut r, 1, 5, 2, "b-3").await;
    assert_eq!(take(&mut r, 1).await, [transfer(3, 9, 2, "b-3")]);
    settle(&mut r, 3, 1, 2).await;
    assert_quiet(&mut r, "the last message").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_links_drained_like_a_router_get_deliveries_or_a_flow_without_link_credit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut r = router(&broker).await;
    within("begin", r.begin(0)).await;
    within("begin", r.begin(1)).await;
    const QUEUE: &str = "orders";
    // Auto-links on session 0: into the queue on handle 0, out of it on handle 1.
    within("attach", r.attach_sender_on(0, 0, "autolink.in", QUEUE)).await;
    within("attach", r.attach_receiver_on(0, 1, "autolink.out", QUEUE)).await;
    // A link-routed client producer on session 1.
    within("attach", r.attach_sender_on(1, 0, LINK, QUEUE)).await;
    assert_quiet(&mut r, "attaching").await;

    // The router drains the empty queue: the credit is spent on nothing.
    within("drain", r.flow_on(0, 1, 0, 250, true)).await;
    assert_eq!(take(&mut r, 1).await, [drained(0, 1, 250)]);
    assert_quiet(&mut r, "the first drain").await;

    // The client sends three; the router drains again and gets them, then the rest of
    // its credit back as a drained flow.
    for (id, body) in ["m-1", "m-2", "m-3"].iter().enumerate() {
        send(&mut r, 1, 0, id as u32, body).await;
    }
    within("drain", r.flow_on(0, 1, 250, 250, true)).await;
    assert_eq!(
        take(&mut r, 4).await,
        [
            transfer(0, 1, 0, "m-1"),
            transfer(0, 1, 1, "m-2"),
            transfer(0, 1, 2, "m-3"),
            drained(0, 1, 500),
        ]
    );
    settle(&mut r, 0, 0, 2).await;
    assert_quiet(&mut r, "the second drain").await;

    // A message through the auto-link sender (session 0 numbers what it receives apart
    // from what it sends), drained with exactly one credit: the delivery uses it up, and
    // any flow that follows must not carry link-credit either.
    send(&mut r, 0, 0, 0, "m-4").await;
    within("drain", r.flow_on(0, 1, 500, 1, true)).await;
    assert_eq!(take(&mut r, 1).await, [transfer(0, 1, 3, "m-4")]);
    for f in r.frames_until_quiet(QUIET).await.iter().map(describe) {
        assert_eq!(f, drained(0, 1, 501), "only a drained flow may follow");
    }
    settle(&mut r, 0, 3, 3).await;
    within("drain", r.flow_on(0, 1, 501, 5, true)).await;
    assert_eq!(take(&mut r, 1).await, [drained(0, 1, 506)]);

    // The outgoing auto-link goes away; both producers keep working, and a new auto-link
    // receiver gets what they sent meanwhile.
    within("detach", r.detach_on(0, 1)).await;
    assert_eq!(take(&mut r, 1).await, [detached(0, 1)]);
    send(&mut r, 0, 0, 1, "m-5").await;
    send(&mut r, 1, 0, 3, "m-6").await;
    within("attach", r.attach_receiver_on(0, 2, "autolink.out", QUEUE)).await;
    within("drain", r.flow_on(0, 2, 0, 10, true)).await;
    assert_eq!(
        take(&mut r, 3).await,
        [
            transfer(0, 2, 4, "m-5"),
            transfer(0, 2, 5, "m-6"),
            drained(0, 2, 10),
        ]
    );
    settle(&mut r, 0, 4, 5).await;
    assert_quiet(&mut r, "the new auto-link").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_flow_never_overtakes_deliveries_waiting_for_the_session_window() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut r = router(&broker).await;
    // The router's session takes two transfer frames at a time.
    within("begin", r.begin_with_window(0, 2)).await;
    within("attach", r.attach_sender_on(0, 0, "autolink.in", "q")).await;
    for (id, body) in ["w-1", "w-2", "w-3", "w-4"].iter().enumerate() {
        send(&mut r, 0, 0, id as u32, body).await;
    }
    within("attach", r.attach_receiver_on(0, 1, "autolink.out", "q")).await;
    within("drain", r.flow_on(0, 1, 0, 10, true)).await;
    assert_eq!(
        take(&mut r, 2).await,
        [transfer(0, 1, 0, "w-1"), transfer(0, 1, 1, "w-2")]
    );
    // Two deliveries still wait for the window: the drain is not over, so no flow yet.
    assert_quiet(&mut r, "the window filled").await;
    // A flow takes no window: once the last delivery is out, the drained flow follows.
    within("window", r.window_on(0)).await;
    assert_eq!(
        take(&mut r, 3).await,
        [
            transfer(0, 1, 2, "w-3"),
            transfer(0, 1, 3, "w-4"),
            drained(0, 1, 10),
        ]
    );
    assert_quiet(&mut r, "the drain").await;
}
