//! How a receiving link's source becomes a subscription of a topic, following the
//! conventions qpid-jms and Artemis use.
//!
//! * Durable: the source is durable (configuration or unsettled-state) with expiry-policy
//!   `never`. Identity: `container-id:link-name`; detach with `closed=false` keeps the
//!   subscription and its backlog, `closed=true` deletes it.
//! * Shared (`shared` capability): links share one subscription as competing consumers.
//!   qpid-jms (`AmqpSubscriptionTracker`) names the links of subscription `name` (which may
//!   not contain `|`): durable `name`, `name|2`, `name|3`…; durable without a client id
//!   `name|global`, `name|global2`…; volatile `name|volatile1`, `name|volatile2`…; volatile
//!   without a client id `name|global-volatile1`…. The suffix is dropped (see
//!   [`shared_subscription_name`]); a suffix of the other lifetime's form is not, so it
//!   stays part of the name.
//! * `global` (a source capability) makes the identity independent of the container: qpid-jms
//!   sends it with `shared` when the connection has no client id. A durable and a volatile
//!   subscription of the same name are different subscriptions; a volatile one is deleted
//!   when its last consumer leaves.
//! * Unsubscribe: qpid-jms attaches a link named `name` (`name|global`, with desired
//!   capabilities `shared` and `global`) with no source, and closes it once the attach is
//!   answered with a source ([`reattach`]). An unknown name is `amqp:not-found`; a
//!   subscription that still has consumers is refused (`amqp:resource-locked`), never
//!   deleted under them.
//! * Selector: the source filter described `apache.org:selector-filter:string` (or its
//!   code), under whatever key the client chose.
//! * Replay: our `entrepot:offset-spec` source filter — `first`, `last`, `next`, a log
//!   offset (ulong) or a timestamp (ms) — or RabbitMQ streams' `rabbitmq:stream-offset-spec`.
//! * The attach reply echoes exactly the filters applied, so a client can tell.

use std::sync::Arc;

use fe2o3_amqp_types::definitions::AmqpError;
use fe2o3_amqp_types::messaging::{
    DistributionMode, FilterSet, Source, TerminusDurability, TerminusExpiryPolicy,
};
use fe2o3_amqp_types::performatives::Attach;
use fe2o3_amqp_types::primitives::{Array, Symbol, Value};

use super::errors::{ClientError, Refusal};
use crate::broker::selector::Selector;
use crate::broker::topic::{StartAt, Subscription, Topic};
use crate::broker::{AddressKind, Broker};

/// Descriptor of the JMS selector filter (its symbolic name). Clients put it under keys
/// of their own choosing — python-qpid-proton `selector`, qpid-jms `jms-selector` — so
/// filters are recognized by descriptor, whatever the key, as Artemis and RabbitMQ do.
pub const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
/// The same descriptor as a code: Apache's domain 0x0000468C, type 4.
pub const SELECTOR_FILTER_CODE: u64 = 0x0000_468C_0000_0004;
/// Descriptor (and, undescribed, the key) of our replay-start filter.
pub const OFFSET_SPEC_FILTER: &str = "entrepot:offset-spec";
/// RabbitMQ streams' replay-start filter, understood the same way.
pub const RABBITMQ_OFFSET_FILTER: &str = "rabbitmq:stream-offset-spec";

/// What a source filter entry is, by its descriptor (or, for an undescribed value, by
/// its key, our convention before descriptors were looked at).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FilterKind {
    Selector,
    OffsetSpec,
}

fn filter_kind(key: &Symbol, value: &Value) -> Option<FilterKind> {
    use serde_amqp::descriptor::Descriptor;
    match value {
        Value::Described(d) => match &d.descriptor {
            Descriptor::Name(n) if n.as_str() == SELECTOR_FILTER => Some(FilterKind::Selector),
            Descriptor::Code(SELECTOR_FILTER_CODE) => Some(FilterKind::Selector),
            Descriptor::Name(n)
                if n.as_str() == OFFSET_SPEC_FILTER || n.as_str() == RABBITMQ_OFFSET_FILTER =>
            {
                Some(FilterKind::OffsetSpec)
            }
            _ => None,
        },
        _ => match key.as_str() {
            SELECTOR_FILTER => Some(FilterKind::Selector),
            OFFSET_SPEC_FILTER => Some(FilterKind::OffsetSpec),
            _ => None,
        },
    }
}

/// The filters of a receiving link's source that the broker understands, parsed.
#[derive(Debug, Default)]
pub(super) struct Filters {
    /// The selector text and the entry it came in.
    pub selector: Option<(String, (Symbol, Value))>,
    pub start: Option<(StartAt, (Symbol, Value))>,
}

impl Filters {
    /// The filter set to echo in our attach: the entries, as the client wrote them, of
    /// the filters actually applied (`with_start`: the link replays from a start).
    pub fn applied(&self, with_start: bool) -> Option<FilterSet> {
        let mut set = FilterSet::new();
        if let Some((_, (k, v))) = &self.selector {
            set.insert(k.clone(), v.clone());
        }
        if let Some((_, (k, v))) = self.start.as_ref().filter(|_| with_start) {
            set.insert(k.clone(), v.clone());
        }
        (!set.is_empty()).then_some(set)
    }
}

/// Reads the selector and replay-start filters of `source`, by descriptor; refuses one
/// whose value is malformed (`amqp:invalid-field`, naming the filter).
pub(super) fn filters(source: &Source) -> Result<Filters, Refusal> {
    let mut found = Filters::default();
    let Some(set) = source.filter.as_ref() else {
        return Ok(found);
    };
    for (key, value) in set.iter() {
        let inner = match value {
            Value::Described(d) => &d.value,
            other => other,
        };
        match filter_kind(key, value) {
            Some(FilterKind::Selector) => {
                let text = selector_text(inner)?;
                found.selector = Some((text, (key.clone(), value.clone())));
            }
            Some(FilterKind::OffsetSpec) => {
                let start = start_at(inner)?;
                found.start = Some((start, (key.clone(), value.clone())));
            }
            None => {}
        }
    }
    Ok(found)
}

/// A consumer link's hold on a subscription.
pub(super) struct SubscriptionRef {
    pub topic: Arc<Topic>,
    pub id: String,
    pub durable: bool,
}

/// The address kind a link's capabilities ask for (`topic` or `queue`).
pub(super) fn kind_from_capabilities(caps: Option<&[Symbol]>) -> Option<AddressKind> {
    let caps = caps?;
    if caps.iter().any(|c| c.as_str() == "topic") {
        Some(AddressKind::Topic)
    } else if caps.iter().any(|c| c.as_str() == "queue") {
        Some(AddressKind::Queue)
    } else {
        None
    }
}

fn has_cap(source: &Source, cap: &str) -> bool {
    source
        .capabilities
        .as_ref()
        .is_some_and(|c| c.0.iter().any(|s| s.as_str() == cap))
}

fn start_at(value: &Value) -> Result<StartAt, Refusal> {
    let invalid = |what: String| {
        (
            AmqpError::InvalidField.into(),
            format!("{OFFSET_SPEC_FILTER}: {what}"),
        )
    };
    match value {
        Value::String(s) | Value::Symbol(Symbol(s)) => match s.as_str() {
            "first" => Ok(StartAt::First),
            "last" => Ok(StartAt::Last),
            "next" => Ok(StartAt::Next),
            other => Err(invalid(format!(
                "unknown start {other:?} (first, last, next, an offset or a timestamp)"
            ))),
        },
        Value::Ulong(o) => Ok(StartAt::Offset(*o)),
        Value::Long(o) if *o >= 0 => Ok(StartAt::Offset(*o as u64)),
        Value::Timestamp(t) => Ok(StartAt::Timestamp(t.milliseconds())),
        other => Err(invalid(format!("unsupported value {other:?}"))),
    }
}

fn selector_text(value: &Value) -> Result<String, Refusal> {
    match value {
        Value::String(s) => Ok(s.clone()),
        other => Err((
            AmqpError::InvalidField.into(),
            format!("{SELECTOR_FILTER} must be a string, not {other:?}"),
        )),
    }
}

/// Parses a queue consumer's selector (`amqp:invalid-field` naming the error).
pub(super) fn parse_selector(text: &str) -> Result<Arc<Selector>, Refusal> {
    crate::broker::selector::parse(text)
        .map(Arc::new)
        .map_err(|e| {
            (
                AmqpError::InvalidField.into(),
                format!("{SELECTOR_FILTER}: {e}"),
            )
        })
}

/// What a receiving link's source asks of its subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    /// Durable source (configuration or unsettled-state) with expiry-policy `never`.
    durable: bool,
    /// `shared` capability: the link is one of the subscription's competing consumers.
    shared: bool,
    /// `global` capability: the identity does not include the container id.
    global: bool,
}

impl Shape {
    fn of(source: &Source) -> Shape {
        Shape {
            durable: source.durable != TerminusDurability::None
                && source.expiry_policy == TerminusExpiryPolicy::Never,
            shared: has_cap(source, "shared"),
            global: has_cap(source, "global"),
        }
    }
}

/// The subscription name a shared link's name carries, by qpid-jms's convention (see the
/// module doc): `link_name` without its `|…` suffix when the suffix is one qpid-jms gives a
/// link of that lifetime — durable `|<n>` or `|global[<n>]`, volatile `|volatile[<n>]` or
/// `|global-volatile[<n>]` — else `link_name` whole.
pub(super) fn shared_subscription_name(link_name: &str, durable: bool) -> &str {
    let Some((name, suffix)) = link_name.rsplit_once('|') else {
        return link_name;
    };
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let counted = |prefix: &str| suffix.strip_prefix(prefix).is_some_and(digits);
    let jms_suffix = match durable {
        true => (!suffix.is_empty() && digits(suffix)) || counted("global"),
        false => counted("volatile") || counted("global-volatile"),
    };
    if jms_suffix {
        name
    } else {
        link_name
    }
}

/// The identity of the subscription a link on a topic designates. Durable identities are
/// persisted, so their form never changes: `container-id:name`, or `name` when global.
/// Volatile shared ones carry a `|volatile` / `|global-volatile` mark so that they never
/// meet the durable subscription of the same name. A non-shared volatile link gets a
/// subscription of its own (unless global: then `link-name`, as before shared naming).
fn subscription_id(container_id: &str, link_name: &str, shape: Shape) -> String {
    let name = match shape.shared {
        true => shared_subscription_name(link_name, shape.durable),
        false => link_name,
    };
    match (shape.durable, shape.shared, shape.global) {
        (true, _, true) | (false, false, true) => name.to_owned(),
        (true, _, false) => format!("{container_id}:{name}"),
        (false, true, true) => format!("{name}|global-volatile"),
        (false, true, false) => format!("{container_id}:{name}|volatile"),
        (false, false, false) => format!(
            "{container_id}:{link_name}:{}",
            crate::broker::queue::ConsumerId::next().0
        ),
    }
}

/// Resolves a receiving link on `topic` to its subscription, creating or resuming it.
pub(super) fn subscribe(
    broker: &Broker,
    topic: &Arc<Topic>,
    source: &Source,
    container_id: &str,
    link_name: &str,
) -> Result<(Arc<Subscription>, SubscriptionRef), Refusal> {
    let shape = Shape::of(source);
    let durable = shape.durable;
    let id = subscription_id(container_id, link_name, shape);
    let parsed = filters(source)?;
    let selector = parsed.selector.as_ref().map(|(text, _)| text.clone());
    let start = parsed.start.as_ref().map_or(StartAt::Next, |(s, _)| *s);
    let created = match durable {
        true => broker.durable_subscription(topic, &id, selector.as_deref(), start),
        false => broker.volatile_subscription(topic, &id, selector.as_deref(), start),
    };
    let sub = created.map_err(|e| e.refusal())?;
    let holder = SubscriptionRef {
        topic: Arc::clone(topic),
        id,
        durable,
    };
    Ok((sub, holder))
}

/// A consumer left `sub`: delete a non-durable subscription nobody consumes any more, and
/// a durable one whose link was closed (not just detached).
pub(super) fn unsubscribe(
    broker: &Broker,
    sub: &SubscriptionRef,
    closed: bool,
    consumers_left: usize,
) {
    let delete = consumers_left == 0 && (!sub.durable || closed);
    if delete {
        if let Err(e) = broker.delete_subscription(&sub.topic, &sub.id) {
            tracing::warn!(subscription = %sub.id, error = %e, "could not delete subscription");
        }
    }
}

/// Capability a client desires on a shared subscriber's link when the connection did not
/// offer it; qpid-jms gives up on the subscriber unless our attach offers it back.
pub const SHARED_SUBS: &str = "SHARED-SUBS";

/// The capabilities our attach offers for a consumer link: `SHARED-SUBS` when desired.
pub(super) fn offered_capabilities(attach: &Attach) -> Option<Array<Symbol>> {
    let desired = attach.desired_capabilities.as_ref()?;
    desired
        .0
        .iter()
        .any(|c| c.as_str() == SHARED_SUBS)
        .then(|| Array(vec![Symbol::from(SHARED_SUBS)]))
}

/// A link attached with no source address to a durable subscription: qpid-jms's
/// unsubscribe. Finds the subscription the link name designates — global when the link
/// desires the `global` capability or is named `name|global`, else this container's — and
/// returns its queue, the hold that deletes it when the link is closed, and the source to
/// answer with (qpid-jms takes an attach without one as "no such subscription").
pub(super) fn reattach(
    broker: &Broker,
    container_id: &str,
    attach: &Attach,
) -> Result<(Arc<Subscription>, SubscriptionRef, Source), Refusal> {
    let name = shared_subscription_name(&attach.name, true);
    let global = attach
        .desired_capabilities
        .as_ref()
        .is_some_and(|c| c.0.iter().any(|s| s.as_str() == "global"))
        || attach.name[name.len()..].starts_with("|global");
    let id = match global {
        true => name.to_owned(),
        false => format!("{container_id}:{name}"),
    };
    let Some((topic, sub)) = broker.find_durable(&id) else {
        return Err((
            AmqpError::NotFound.into(),
            format!("no durable subscription {id:?} (a source address is required otherwise)"),
        ));
    };
    let consumers = sub.queue.consumer_count();
    if consumers > 0 {
        return Err((
            AmqpError::ResourceLocked.into(),
            format!(
                "subscription {id:?} has {consumers} consumer(s) attached: \
                 close them before unsubscribing"
            ),
        ));
    }
    let mut caps = vec![Symbol::from("topic")];
    if global {
        caps.extend([Symbol::from("shared"), Symbol::from("global")]);
    }
    let source = Source::builder()
        .address(topic.name())
        .durable(TerminusDurability::UnsettledState)
        .expiry_policy(TerminusExpiryPolicy::Never)
        .distribution_mode(DistributionMode::Copy)
        .capabilities(caps)
        .build();
    let holder = SubscriptionRef {
        topic,
        id,
        durable: true,
    };
    Ok((sub, holder, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(durable: bool, shared: bool, global: bool) -> Shape {
        Shape {
            durable,
            shared,
            global,
        }
    }

    #[test]
    fn qpid_jms_link_names_designate_their_subscription() {
        // The names AmqpSubscriptionTracker gives the consumers of subscription "s".
        for link in ["s", "s|2", "s|12", "s|global", "s|global2"] {
            assert_eq!(shared_subscription_name(link, true), "s", "{link}");
        }
        for link in ["s|volatile1", "s|volatile7", "s|global-volatile1"] {
            assert_eq!(shared_subscription_name(link, false), "s", "{link}");
        }
        // Another lifetime's suffix, or none of qpid-jms's, stays part of the name.
        for (link, durable) in [("s|volatile1", true), ("s|2", false), ("s|x", true)] {
            assert_eq!(shared_subscription_name(link, durable), link);
        }
    }

    #[test]
    fn durable_and_volatile_shared_subscriptions_of_one_name_differ() {
        let id = |link, s| subscription_id("c", link, s);
        assert_eq!(id("s|2", shape(true, true, false)), "c:s");
        assert_eq!(id("s|global2", shape(true, true, true)), "s");
        assert_eq!(id("s|volatile2", shape(false, true, false)), "c:s|volatile");
        let global_volatile = id("s|global-volatile3", shape(false, true, true));
        assert_eq!(global_volatile, "s|global-volatile");
        // Non-shared links keep their whole name.
        assert_eq!(id("s|2", shape(true, false, false)), "c:s|2");
        assert_ne!(
            id("s", shape(false, false, false)),
            id("s", shape(false, false, false))
        );
    }
}
