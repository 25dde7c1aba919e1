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
use fe2o3_amqp::types::messaging::{
    Accepted, AmqpValue, DeliveryState, DistributionMode, Outcome, Source, Target, TargetArchetype,
};
use fe2o3_amqp::types::performatives::{Attach, Detach, Disposition, Performative};
use fe2o3_amqp::types::primitives::{Binary, Symbol, Value};
use fe2o3_amqp::types::transaction::{
    Coordinator, Declare, Discharge, TransactionalState, TxnCapability,
};
use tokio::time::timeout;

use crate::harness::BrokerProcess;
use crate::raw_client::{data_message, sender_attach, Client, Frame};

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

// ---------------------------------------------------------------------------------------
// Issue 17 through link routes. What qdrouterd 1.19 does (read in qpid-dispatch's
// router_core: address_lookup_client.c, terminus.c, container.c), so what the broker sees:
// * every link-routed link of every client goes on ONE session of the router's
//   connection (`QD_SSN_LINK_ROUTE`), named `<client link name>@<client container>`;
// * a dynamic source or target is link-routed only when its dynamic-node-properties name
//   an address (`x-opt-qd.address`) that matches a link route; the attach reaches the
//   broker with `dynamic=true`, no address and those properties, and the address the
//   broker names comes back to the client. Without that property the router makes a
//   temporary address of its own and the broker never sees the link;
// * an anonymous sender (no target address) never matches a link route: the router is
//   the relay (it offers ANONYMOUS-RELAY itself) and routes each message by `to` over its
//   own address table (auto-links, waypoints), so the broker's relay is not used;
// * a coordinator target is looked up as the address `$coordinator`: with a link route
//   for it the attach, the declare/discharge transfers and the transactional states of
//   transfers and dispositions are forwarded to the broker; without one the router
//   itself refuses the coordinator (attach without target, then detach with
//   `amqp:precondition-failed`, "linkRoute to a coordinator must be configured to use
//   transactions") — the broker is not involved, so no test here can show it.
// ---------------------------------------------------------------------------------------

/// The dynamic-node-properties qdrouterd link-routes a dynamic terminus by.
fn routed_by(prefix: &str) -> Fields {
    let mut props = Fields::new();
    props.insert(
        Symbol::from("x-opt-qd.address"),
        Value::String(prefix.into()),
    );
    props
}

/// A receiver's attach on `handle` with `source` as given.
fn receiver_attach(handle: u32, name: &str, source: Source) -> Attach {
    Attach {
        role: Role::Receiver,
        source: Some(Box::new(source)),
        target: Some(Box::new(TargetArchetype::Target(Target::builder().build()))),
        initial_delivery_count: None,
        ..sender_attach(handle, name, TargetArchetype::Target(Target::default()))
    }
}

fn detach_error(d: &Detach) -> String {
    d.error.as_ref().map_or("none".into(), |e| {
        entrepot::connection::condition_name(&e.condition)
    })
}

/// Request/reply through a link route for `$tmp`: client 1's dynamic receiver (its reply
/// address) and client 3's dynamic sender reach the broker as qdrouterd forwards them;
/// each gets a `$tmp.` queue, which other clients' link-routed links reach by that name;
/// when client 1 leaves, its queue is gone and a new link to it is refused `not-found`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_routed_dynamic_sources_and_targets_get_temporary_queues_other_clients_reach() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut r = router(&broker).await;
    within("begin", r.begin(0)).await;

    let source = Source::builder()
        .dynamic(true)
        .dynamic_node_properties(routed_by("$tmp"))
        .build();
    let reply = within(
        "dynamic receiver",
        r.attach_as_given_on(0, receiver_attach(0, "reply@client-1", source)),
    )
    .await;
    let reply_to = reply.source.and_then(|s| s.address).expect("an address");
    assert!(reply_to.starts_with("$tmp."), "{reply_to}");
    within("credit", r.flow_on(0, 0, 0, 10, false)).await;
    r.attach_sender_on(0, 1, "requests@client-2", &reply_to)
        .await;
    assert_quiet(&mut r, "attaching").await;
    send(&mut r, 0, 1, 0, "reply-1").await;
    assert_eq!(take(&mut r, 1).await, [transfer(0, 0, 0, "reply-1")]);
    settle(&mut r, 0, 0, 0).await;

    // A dynamic target: the sender's messages wait in its temporary queue for whoever
    // attaches to the name the broker gave.
    let target = Target::builder()
        .dynamic(true)
        .dynamic_node_properties(routed_by("$tmp"))
        .build();
    let attach = sender_attach(2, "out@client-3", TargetArchetype::Target(target));
    let reply = within("dynamic sender", r.attach_as_given_on(0, attach)).await;
    let out_to = match reply.target.as_deref() {
        Some(TargetArchetype::Target(t)) => t.address.clone().expect("an address"),
        other => panic!("no target in the reply: {other:?}"),
    };
    assert!(
        out_to.starts_with("$tmp.") && out_to != reply_to,
        "{out_to}"
    );
    let credit = within(
        "credit",
        r.expect(|p| match p {
            Performative::Flow(f) if f.handle.as_ref().map(|h| h.0) == Some(2) => f.link_credit,
            _ => None,
        }),
    )
    .await;
    assert!(credit > 0, "the dynamic sender gets credit");
    send(&mut r, 0, 2, 1, "to-out").await;
    let attach = within(
        "receiver",
        r.attach_receiver_on(0, 3, "in@client-4", &out_to),
    )
    .await;
    assert!(
        attach.source.is_some(),
        "the temporary queue is there: {attach:?}"
    );
    within("credit", r.flow_on(0, 3, 0, 10, false)).await;
    assert_eq!(take(&mut r, 1).await, [transfer(0, 3, 1, "to-out")]);
    settle(&mut r, 0, 1, 1).await;

    // Client 1 goes away: the router detaches its link, the reply queue goes with it.
    within("detach", r.detach_on(0, 0)).await;
    assert_eq!(take(&mut r, 1).await, [detached(0, 0)]);
    within("detach", r.detach_on(0, 1)).await;
    assert_eq!(take(&mut r, 1).await, [detached(0, 1)]);
    let target = TargetArchetype::Target(Target::builder().address(reply_to.clone()).build());
    within(
        "attach",
        r.send_on(
            0,
            &Performative::Attach(sender_attach(4, "late@client-2", target)),
            &[],
        ),
    )
    .await;
    let refused = within("refusal", r.expect(crate::raw_client::detach_of(4))).await;
    assert_eq!(detach_error(&refused), "amqp:not-found", "{refused:?}");
    // The other temporary queue is untouched, until its sender (the link that made it)
    // goes away too.
    send(&mut r, 0, 2, 2, "still-out").await;
    assert_eq!(take(&mut r, 1).await, [transfer(0, 3, 2, "still-out")]);
    settle(&mut r, 0, 2, 2).await;
    within("detach", r.detach_on(0, 3)).await;
    within("detach", r.detach_on(0, 2)).await;
    let mut detaches = take(&mut r, 2).await;
    detaches.sort();
    assert_eq!(detaches, [detached(0, 2), detached(0, 3)]);
    let target = TargetArchetype::Target(Target::builder().address(out_to.clone()).build());
    within(
        "attach",
        r.send_on(
            0,
            &Performative::Attach(sender_attach(5, "late@client-4", target)),
            &[],
        ),
    )
    .await;
    let refused = within("refusal", r.expect(crate::raw_client::detach_of(5))).await;
    assert_eq!(detach_error(&refused), "amqp:not-found", "{refused:?}");
    // Every link is gone, producers included.
    assert_eq!(broker.metric("entrepot_links"), Some(0.0));
}

/// A browser (distribution-mode `copy`) through a link route, driven like qdrouterd
/// drives a link-routed receiver whose client drains: the snapshot comes pre-settled,
/// then the drained flow without link-credit; the messages stay for a consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_routed_browser_drained_like_a_router_leaves_the_queue_whole() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut r = router(&broker).await;
    within("begin", r.begin(0)).await;
    within(
        "attach",
        r.attach_sender_on(0, 0, "out@client-1", "browsed"),
    )
    .await;
    for (id, body) in ["b-1", "b-2", "b-3"].iter().enumerate() {
        send(&mut r, 0, 0, id as u32, body).await;
    }
    let source = Source::builder()
        .address("browsed")
        .distribution_mode(DistributionMode::Copy)
        .build();
    within(
        "browser",
        r.attach_as_given_on(0, receiver_attach(1, "browser@client-2", source)),
    )
    .await;
    within("drain", r.flow_on(0, 1, 0, 10, true)).await;
    let settled = |id: u32, body: &str| format!("ch0 transfer h1 id{id} settled {body:?}");
    assert_eq!(
        take(&mut r, 4).await,
        [
            settled(0, "b-1"),
            settled(1, "b-2"),
            settled(2, "b-3"),
            drained(0, 1, 10),
        ]
    );
    assert_quiet(&mut r, "the browse").await;
    within("detach", r.detach_on(0, 1)).await;
    assert_eq!(take(&mut r, 1).await, [detached(0, 1)]);

    within(
        "consumer",
        r.attach_receiver_on(0, 2, "in@client-3", "browsed"),
    )
    .await;
    within("credit", r.flow_on(0, 2, 0, 10, false)).await;
    assert_eq!(
        take(&mut r, 3).await,
        [
            transfer(0, 2, 3, "b-1"),
            transfer(0, 2, 4, "b-2"),
            transfer(0, 2, 5, "b-3"),
        ]
    );
}

/// The broker's answer to our delivery `id`: its state.
fn outcome_of(id: u32) -> impl Fn(Performative) -> Option<Option<DeliveryState>> {
    move |p| match p {
        Performative::Disposition(d)
            if d.role == Role::Receiver && d.first <= id && d.last.unwrap_or(d.first) >= id =>
        {
            Some(d.state)
        }
        _ => None,
    }
}

fn amqp_value<T: serde::Serialize>(value: T) -> Vec<u8> {
    serde_amqp::to_vec(&AmqpValue(value)).expect("control message encodes")
}

/// Sends a coordinator control message as delivery `id` on `handle`; returns the answer.
async fn control<T: serde::Serialize>(
    r: &mut Client,
    handle: u32,
    id: u32,
    body: T,
) -> Option<DeliveryState> {
    within("control", r.transfer_on(0, handle, id, &amqp_value(body))).await;
    within("control's answer", r.expect(outcome_of(id))).await
}

async fn declare(r: &mut Client, handle: u32, id: u32) -> Binary {
    match control(r, handle, id, Declare::new(None)).await {
        Some(DeliveryState::Declared(d)) => d.txn_id,
        other => panic!("expected declared, got {other:?}"),
    }
}

fn discharge(txn_id: &Binary, fail: bool) -> Discharge {
    Discharge {
        txn_id: txn_id.clone(),
        fail: Some(fail),
    }
}

/// Transactions through a link route for `$coordinator`: two clients' coordinators and
/// senders share the router's one session. Each client's transaction is its own: one
/// commits, the other client leaves (the router detaches its coordinator while the
/// router's connection stays) and its transaction is rolled back then — its message
/// never appears and its id is unknown afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_routed_coordinators_of_two_clients_commit_and_roll_back_apart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut r = router(&broker).await;
    within("begin", r.begin(0)).await;
    for (handle, name) in [(0, "txn-ctrl@client-1"), (1, "txn-ctrl@client-2")] {
        let caps = vec![TxnCapability::LocalTransactions];
        let coordinator = TargetArchetype::Coordinator(Coordinator::new(Some(caps.into())));
        let reply = within(
            "coordinator",
            r.attach_as_given_on(0, sender_attach(handle, name, coordinator)),
        )
        .await;
        assert!(
            matches!(
                reply.target.as_deref(),
                Some(TargetArchetype::Coordinator(_))
            ),
            "the coordinator is accepted: {reply:?}"
        );
    }
    within("attach", r.attach_sender_on(0, 2, "out@client-1", "txq")).await;
    within("attach", r.attach_sender_on(0, 3, "out@client-2", "txq")).await;

    let txn1 = declare(&mut r, 0, 0).await;
    let txn2 = declare(&mut r, 1, 1).await;
    assert_ne!(txn1, txn2);
    for (handle, id, txn, body) in [(2, 2, &txn1, "c1"), (3, 3, &txn2, "c2")] {
        let state = Some(DeliveryState::TransactionalState(TransactionalState {
            txn_id: txn.clone(),
            outcome: None,
        }));
        within(
            "transactional transfer",
            r.transfer_with_state_on(0, handle, id, &data_message(body.as_bytes()), state),
        )
        .await;
        let answer = within("its answer", r.expect(outcome_of(id))).await;
        assert!(
            matches!(
                &answer,
                Some(DeliveryState::TransactionalState(TransactionalState {
                    outcome: Some(Outcome::Accepted(_)),
                    ..
                }))
            ),
            "{answer:?}"
        );
    }
    let committed = control(&mut r, 1, 4, discharge(&txn2, false)).await;
    assert!(
        matches!(committed, Some(DeliveryState::Accepted(_))),
        "{committed:?}"
    );

    // Client 1 goes away with its transaction open: the router detaches its links.
    within("detach", r.detach_on(0, 0)).await;
    within("detach", r.detach_on(0, 2)).await;
    let mut detaches = take(&mut r, 2).await;
    detaches.sort();
    assert_eq!(detaches, [detached(0, 0), detached(0, 2)]);
    assert_quiet(&mut r, "client 1 leaving").await;

    within("consumer", r.attach_receiver_on(0, 4, "in@client-3", "txq")).await;
    within("credit", r.flow_on(0, 4, 0, 10, false)).await;
    assert_eq!(take(&mut r, 1).await, [transfer(0, 4, 0, "c2")]);
    assert_quiet(&mut r, "the committed message").await;
    let unknown = control(&mut r, 1, 5, discharge(&txn1, false)).await;
    let condition = match unknown {
        Some(DeliveryState::Rejected(rj)) => rj
            .error
            .map(|e| entrepot::connection::condition_name(&e.condition)),
        other => panic!("expected a rejection, got {other:?}"),
    };
    assert_eq!(condition.as_deref(), Some("amqp:transaction:unknown-id"));
    assert_quiet(&mut r, "the rolled-back transaction").await;
    // Client 2's coordinator and sender and client 3's consumer; client 1's are gone.
    assert_eq!(broker.metric("entrepot_links"), Some(3.0));
}
