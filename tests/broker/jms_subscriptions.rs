//! qpid-jms's shared, global and volatile topic subscriptions, and its unsubscribe.
//!
//! Goal: a real JMS client's subscriptions behave as JMS says — the consumers of one
//! shared subscription together receive each message exactly once, a shared non-durable
//! subscription ends with its last consumer, a durable and a non-durable subscription of
//! one name are two, and `Session.unsubscribe` deletes a durable subscription but is
//! refused while it has consumers.
//!
//! Method: the broker is driven with the link attaches qpid-jms sends, written from
//! qpid-jms's own code rather than from our parser. `AmqpSubscriptionTracker` names the
//! n-th consumer (counted per connection) of subscription `s`: durable `s`, `s|n`; durable
//! without a client id `s|global`, `s|globaln`; volatile `s|volatilen`; volatile without a
//! client id `s|global-volatilen` ([`jms_link_name`]). `AmqpConsumerBuilder` gives the
//! source capabilities `topic`, `shared` and, without a client id, `global`; a durable
//! source is unsettled-state with expiry `never` and distribution mode `copy`, a volatile
//! one is not durable and expires on link detach ([`jms_source`]). A connection with a
//! client id opens with it as container id; one without opens with a generated id, so the
//! global cases use two connections with different container ids. A durable consumer is
//! closed by detaching (closed=false), a volatile one by closing. `AmqpConnectionSession`
//! unsubscribes by attaching a link named `s` (`s|global`, desiring `shared` and
//! `global`) with no source and an empty target, and closes it if the answer carries a
//! source; an answer without a source, or an error on the detach, fails the unsubscribe.
//! fe2o3-amqp plays the consumers and the raw client the unsubscribe, whose exact reply
//! is checked. Subscriptions and their consumers are counted on `/metrics`
//! (`entrepot_subscription_consumers`). Every wait is bounded.

use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::definitions::{
    AmqpError, ErrorCondition, Handle, ReceiverSettleMode, Role, SenderSettleMode,
};
use fe2o3_amqp::types::messaging::{
    DistributionMode, Message, Modified, Outcome, Source, Target, TargetArchetype,
    TerminusDurability, TerminusExpiryPolicy,
};
use fe2o3_amqp::types::performatives::{Attach, Detach};
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::{Receiver, Sender};

use crate::client::{connect, within, QUIET};
use crate::harness::BrokerProcess;
use crate::raw_client::{detach_of, Client};

type Sess = fe2o3_amqp::session::SessionHandle<()>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifetime {
    Durable,
    Volatile,
}

/// The link name qpid-jms's `AmqpSubscriptionTracker` gives the `n`-th consumer (from 1,
/// counted per connection) of shared subscription `name`.
fn jms_link_name(name: &str, lifetime: Lifetime, client_id: bool, n: u32) -> String {
    match (lifetime, client_id) {
        (Lifetime::Durable, true) if n == 1 => name.to_owned(),
        (Lifetime::Durable, true) => format!("{name}|{n}"),
        (Lifetime::Durable, false) if n == 1 => format!("{name}|global"),
        (Lifetime::Durable, false) => format!("{name}|global{n}"),
        (Lifetime::Volatile, true) => format!("{name}|volatile{n}"),
        (Lifetime::Volatile, false) => format!("{name}|global-volatile{n}"),
    }
}

/// The source qpid-jms's `AmqpConsumerBuilder` sets for a shared subscriber on `topic`.
fn jms_source(topic: &str, lifetime: Lifetime, client_id: bool) -> Source {
    let mut caps = vec![Symbol::from("topic"), Symbol::from("shared")];
    if !client_id {
        caps.push(Symbol::from("global"));
    }
    let outcomes = ["accepted", "rejected", "released", "modified"]
        .map(|o| Symbol::from(format!("amqp:{o}:list")))
        .to_vec();
    let source = Source::builder()
        .address(topic)
        .capabilities(caps)
        .outcomes(outcomes)
        .default_outcome(Outcome::Modified(Modified {
            delivery_failed: Some(true),
            undeliverable_here: None,
            message_annotations: None,
        }));
    match lifetime {
        Lifetime::Durable => source
            .durable(TerminusDurability::UnsettledState)
            .expiry_policy(TerminusExpiryPolicy::Never)
            .distribution_mode(DistributionMode::Copy),
        Lifetime::Volatile => source
            .durable(TerminusDurability::None)
            .expiry_policy(TerminusExpiryPolicy::LinkDetach),
    }
    .build()
}

async fn jms_consumer(session: &mut Sess, name: &str, source: Source) -> Receiver {
    let attach = Receiver::builder()
        .name(name)
        .source(source)
        .credit_mode(CreditMode::Auto(100))
        .attach(session);
    within("consumer attach", attach).await.expect("attach")
}

/// Closes a consumer the way qpid-jms does: a durable one is detached, so that its
/// subscription stays; a volatile one is closed.
async fn jms_close(receiver: Receiver, lifetime: Lifetime) {
    match lifetime {
        Lifetime::Durable => {
            within("detach", receiver.detach())
                .await
                .map_err(|(_, e)| e)
                .expect("detach");
        }
        Lifetime::Volatile => within("close", receiver.close()).await.expect("close"),
    }
}

async fn publish(session: &mut Sess, topic: &str, bodies: &[String]) {
    let attach = Sender::attach(session, format!("pub-{topic}"), topic);
    let mut sender = within("sender attach", attach).await.expect("sender");
    for body in bodies {
        let outcome = within("send", sender.send(Message::from(body.clone())))
            .await
            .expect("send");
        assert!(
            matches!(outcome, Outcome::Accepted(_)),
            "{body} not accepted: {outcome:?}"
        );
    }
    within("sender close", sender.close())
        .await
        .expect("close sender");
}

fn bodies(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:03}")).collect()
}

/// Receives and accepts on each receiver until it has been quiet for [`QUIET`]; returns
/// the receivers and every body received, in order of receiver.
async fn drain_all(receivers: Vec<Receiver>) -> (Vec<Receiver>, Vec<Vec<String>>) {
    let tasks: Vec<_> = receivers
        .into_iter()
        .map(|mut r| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Ok(d) = tokio::time::timeout(QUIET, r.recv::<String>()).await {
                    let d = d.expect("recv");
                    got.push(d.body().clone());
                    within("accept", r.accept(&d)).await.expect("accept");
                }
                (r, got)
            })
        })
        .collect();
    let mut receivers = Vec::new();
    let mut received = Vec::new();
    for t in tasks {
        let (r, got) = t.await.expect("drain task");
        receivers.push(r);
        received.push(got);
    }
    (receivers, received)
}

/// `(subscription id, durable, consumers)` of every subscription of `topic`, from the
/// `entrepot_subscription_consumers` series of `/metrics`.
fn subscriptions(broker: &BrokerProcess, topic: &str) -> Vec<(String, bool, u64)> {
    let (_, body) = broker.http_get("/metrics");
    let prefix = format!("entrepot_subscription_consumers{{topic=\"{topic}\",subscription=\"");
    body.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|rest| {
            let (id, rest) = rest.split_once("\",durable=\"").expect("durable label");
            let (durable, value) = rest.split_once("\"} ").expect("value");
            (
                id.to_owned(),
                durable == "true",
                value.trim().parse().expect("consumer count"),
            )
        })
        .collect()
}

/// The consumers a scenario opens: `(container id, links)` per connection. With a client
/// id, one connection whose container id is the client id, with three consumers; without,
/// two connections with generated container ids (two consumers and one), whose link names
/// each count from 1 — so both connections attach `s|global` (or `s|global-volatile1`).
fn consumer_plan(scenario: &str, client_id: bool) -> Vec<(String, u32)> {
    match client_id {
        true => vec![(format!("client-{scenario}"), 3)],
        false => vec![
            (format!("ID:{scenario}-generated-1"), 2),
            (format!("ID:{scenario}-generated-2"), 1),
        ],
    }
}

/// Opens the consumers of shared subscription `name` on `topic` as qpid-jms would, checks
/// that together they receive 30 messages exactly once and that they share one
/// subscription, then closes them; returns what `/metrics` shows after each close.
async fn shared_consumers_share_one_subscription(
    lifetime: Lifetime,
    client_id: bool,
) -> Vec<Vec<(String, bool, u64)>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let topic = "topic.orders";
    let mut connections = Vec::new();
    let mut consumers = Vec::new();
    for (container, n) in consumer_plan(&format!("{lifetime:?}"), client_id) {
        let (conn, mut session) = connect(&broker, &container).await;
        for i in 1..=n {
            let name = jms_link_name("orders", lifetime, client_id, i);
            let source = jms_source(topic, lifetime, client_id);
            consumers.push(jms_consumer(&mut session, &name, source).await);
        }
        connections.push((conn, session));
    }
    let (subs, consumers_attached) = (subscriptions(&broker, topic), consumers.len());

    let sent = bodies("m", 30);
    let (_pc, mut ps) = connect(&broker, "publisher").await;
    publish(&mut ps, topic, &sent).await;
    let (consumers, received) = drain_all(consumers).await;
    let mut all: Vec<String> = received.concat();
    all.sort();
    assert_eq!(
        all, sent,
        "each message exactly once across the shared subscription ({received:?})"
    );

    assert_eq!(
        subs.len(),
        1,
        "one subscription for every consumer: {subs:?}"
    );
    assert_eq!(
        (subs[0].1, subs[0].2),
        (lifetime == Lifetime::Durable, consumers_attached as u64),
        "{subs:?}"
    );

    let mut after_each_close = Vec::new();
    for c in consumers {
        jms_close(c, lifetime).await;
        after_each_close.push(subscriptions(&broker, topic));
    }
    after_each_close
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_a_shared_durable_subscription_share_its_messages_and_it_outlives_them() {
    let after = shared_consumers_share_one_subscription(Lifetime::Durable, true).await;
    let last = after.last().expect("closes");
    assert!(
        matches!(last.as_slice(), [(id, true, 0)] if id == "client-Durable:orders"),
        "the durable subscription stays, without consumers: {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_shared_durable_consumers_on_two_containers_share_one_subscription() {
    let after = shared_consumers_share_one_subscription(Lifetime::Durable, false).await;
    let last = after.last().expect("closes");
    assert!(
        matches!(last.as_slice(), [(id, true, 0)] if id == "orders"),
        "the global durable subscription stays, without consumers: {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_shared_consumers_share_one_subscription_deleted_with_the_last() {
    let after = shared_consumers_share_one_subscription(Lifetime::Volatile, true).await;
    assert!(
        matches!(after.as_slice(), [a, b, c]
            if matches!(a.as_slice(), [(_, false, 2)])
            && matches!(b.as_slice(), [(_, false, 1)])
            && c.is_empty()),
        "the volatile subscription lives until its last consumer closes: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_volatile_shared_consumers_on_two_containers_share_one_subscription() {
    let after = shared_consumers_share_one_subscription(Lifetime::Volatile, false).await;
    assert!(
        matches!(after.as_slice(), [a, b, c]
            if matches!(a.as_slice(), [(_, false, 2)])
            && matches!(b.as_slice(), [(_, false, 1)])
            && c.is_empty()),
        "the global volatile subscription lives until its last consumer closes: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volatile_subscription_recreated_after_its_last_consumer_left_starts_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let topic = "topic.feed";
    let (_c, mut s) = connect(&broker, "client-recreate").await;
    let name = jms_link_name("feed", Lifetime::Volatile, true, 1);
    let source = || jms_source(topic, Lifetime::Volatile, true);
    let first = jms_consumer(&mut s, &name, source()).await;
    jms_close(first, Lifetime::Volatile).await;
    assert!(subscriptions(&broker, topic).is_empty());
    publish(&mut s, topic, &bodies("gone", 5)).await;
    // qpid-jms forgets a subscription with no active consumer, so it counts from 1 again.
    let again = jms_consumer(&mut s, &name, source()).await;
    let (_, received) = drain_all(vec![again]).await;
    assert_eq!(
        received,
        [Vec::<String>::new()],
        "nothing kept for the deleted subscription"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_and_a_volatile_shared_subscription_of_one_name_are_two_subscriptions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let topic = "topic.both";
    let (_c, mut s) = connect(&broker, "client-both").await;
    let durable_name = jms_link_name("sub", Lifetime::Durable, true, 1);
    let volatile_name = jms_link_name("sub", Lifetime::Volatile, true, 1);
    let durable_source = jms_source(topic, Lifetime::Durable, true);
    let volatile_source = jms_source(topic, Lifetime::Volatile, true);
    let durable = jms_consumer(&mut s, &durable_name, durable_source).await;
    let volatile = jms_consumer(&mut s, &volatile_name, volatile_source).await;
    let mut subs = subscriptions(&broker, topic);
    subs.sort_by_key(|(_, durable, _)| *durable);
    assert!(
        matches!(subs.as_slice(), [(_, false, 1), (_, true, 1)]),
        "{subs:?}"
    );
    let sent = bodies("b", 5);
    publish(&mut s, topic, &sent).await;
    let (_, received) = drain_all(vec![durable, volatile]).await;
    assert_eq!(received, [sent.clone(), sent], "each subscription gets all");
}

/// qpid-jms's unsubscribe attach (`AmqpConnectionSession`'s reattach builder): the
/// subscription's first link name, no source, an empty target, and desired capabilities
/// `shared` and `global` when the connection has no client id.
fn jms_unsubscribe_attach(handle: u32, name: &str, client_id: bool) -> Attach {
    let link_name = match client_id {
        true => name.to_owned(),
        false => format!("{name}|global"),
    };
    let desired = (!client_id).then(|| Array(vec![Symbol::from("shared"), Symbol::from("global")]));
    Attach {
        name: link_name,
        handle: Handle(handle),
        role: Role::Receiver,
        snd_settle_mode: SenderSettleMode::Unsettled,
        rcv_settle_mode: ReceiverSettleMode::First,
        source: None,
        target: Some(Box::new(TargetArchetype::Target(Target::builder().build()))),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: None,
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: desired,
        properties: None,
    }
}

/// Sends qpid-jms's unsubscribe on `raw`: the attach, and the closing detach if the
/// broker's attach has a source. Returns the broker's attach and its detach.
async fn jms_unsubscribe(
    raw: &mut Client,
    handle: u32,
    name: &str,
    client_id: bool,
) -> (Attach, Detach) {
    let attach = jms_unsubscribe_attach(handle, name, client_id);
    let reply = within("unsubscribe attach", raw.attach_as_given_on(0, attach)).await;
    let found = reply.source.is_some();
    if found {
        raw.detach(handle).await;
    }
    let detach = within("unsubscribe detach", raw.expect(detach_of(handle))).await;
    if !found {
        raw.detach(handle).await;
    }
    (reply, detach)
}

fn condition(detach: &Detach) -> Option<ErrorCondition> {
    detach.error.as_ref().map(|e| e.condition.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_is_refused_while_consumers_are_attached_and_deletes_the_subscription_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let topic = "topic.news";
    let (_c, mut s) = connect(&broker, "client-u").await;
    let source = || jms_source(topic, Lifetime::Durable, true);
    let mut consumers = Vec::new();
    for i in 1..=2 {
        let name = jms_link_name("news", Lifetime::Durable, true, i);
        consumers.push(jms_consumer(&mut s, &name, source()).await);
    }
    let mut raw = within(
        "raw connect",
        Client::connect(broker.amqp, "client-u", None),
    )
    .await
    .expect("raw connect");
    raw.begin(0).await;

    let (reply, detach) = jms_unsubscribe(&mut raw, 1, "news", true).await;
    assert!(
        reply.source.is_none(),
        "refused: no source in the answer, so qpid-jms will not close"
    );
    assert_eq!(
        condition(&detach),
        Some(AmqpError::ResourceLocked.into()),
        "{detach:?}"
    );
    let subs = subscriptions(&broker, topic);
    assert!(matches!(subs.as_slice(), [(_, true, 2)]), "kept: {subs:?}");

    for c in consumers {
        jms_close(c, Lifetime::Durable).await;
    }
    publish(&mut s, topic, &bodies("backlog", 2)).await;
    let (reply, detach) = jms_unsubscribe(&mut raw, 2, "news", true).await;
    let answered = reply.source.as_ref().expect("the subscription's source");
    assert_eq!(answered.address.as_deref(), Some(topic));
    assert_eq!(answered.durable, TerminusDurability::UnsettledState);
    assert_eq!(answered.expiry_policy, TerminusExpiryPolicy::Never);
    assert_eq!(condition(&detach), None, "unsubscribed: {detach:?}");
    assert!(detach.closed);
    assert!(
        subscriptions(&broker, topic).is_empty(),
        "deleted: {:?}",
        subscriptions(&broker, topic)
    );

    publish(&mut s, topic, &bodies("after", 3)).await;
    let name = jms_link_name("news", Lifetime::Durable, true, 1);
    let again = jms_consumer(&mut s, &name, source()).await;
    let (_, received) = drain_all(vec![again]).await;
    assert_eq!(
        received,
        [Vec::<String>::new()],
        "neither the backlog nor later messages were kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_subscription_is_unsubscribed_from_another_container_and_then_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let topic = "topic.global";
    let (_c, mut s) = connect(&broker, "ID:generated-a").await;
    let name = jms_link_name("audit", Lifetime::Durable, false, 1);
    let consumer = jms_consumer(&mut s, &name, jms_source(topic, Lifetime::Durable, false)).await;
    jms_close(consumer, Lifetime::Durable).await;
    assert!(matches!(
        subscriptions(&broker, topic).as_slice(),
        [(_, true, 0)]
    ));

    let mut raw = within(
        "raw connect",
        Client::connect(broker.amqp, "ID:generated-b", None),
    )
    .await
    .expect("raw connect");
    raw.begin(0).await;
    let (reply, detach) = jms_unsubscribe(&mut raw, 1, "audit", false).await;
    assert!(reply.source.is_some(), "found from another container");
    assert_eq!(condition(&detach), None, "{detach:?}");
    assert!(subscriptions(&broker, topic).is_empty());

    let (reply, detach) = jms_unsubscribe(&mut raw, 2, "audit", false).await;
    assert!(reply.source.is_none());
    assert_eq!(
        condition(&detach),
        Some(AmqpError::NotFound.into()),
        "qpid-jms reports InvalidDestinationException: {detach:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscriber_that_desires_shared_subs_is_offered_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut raw = within(
        "raw connect",
        Client::connect(broker.amqp, "client-caps", None),
    )
    .await
    .expect("raw connect");
    raw.begin(0).await;
    // qpid-jms asks on the link when the connection's open did not offer SHARED-SUBS, and
    // gives up on the subscriber ("Remote peer does not support shared subscriptions")
    // unless the answer offers it.
    let source = jms_source("topic.caps", Lifetime::Durable, true);
    let attach = Attach {
        desired_capabilities: Some(Array(vec![Symbol::from("SHARED-SUBS")])),
        source: Some(Box::new(source)),
        ..jms_unsubscribe_attach(1, "caps", true)
    };
    let reply = within("attach", raw.attach_as_given_on(0, attach)).await;
    let offered = reply.offered_capabilities.map(|a| a.0).unwrap_or_default();
    assert!(
        offered.iter().any(|c| c.as_str() == "SHARED-SUBS"),
        "offered {offered:?}"
    );
}
