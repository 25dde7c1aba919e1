//! How a receiving link's source becomes a subscription of a topic, following the
//! conventions qpid-jms and Artemis use.
//!
//! * Durable: the source is durable (configuration or unsettled-state) with expiry-policy
//!   `never`. Identity: `container-id:link-name`; detach with `closed=false` keeps the
//!   subscription and its backlog, `closed=true` deletes it.
//! * Shared (`shared` capability): links share one subscription as competing consumers;
//!   qpid-jms names them `name`, `name|1`, `name|2`…, so the `|n` suffix is dropped.
//!   `global` makes the identity independent of the container.
//! * Selector: the source filter described `apache.org:selector-filter:string` (or its
//!   code), under whatever key the client chose.
//! * Replay: our `entrepot:offset-spec` source filter — `first`, `last`, `next`, a log
//!   offset (ulong) or a timestamp (ms) — or RabbitMQ streams' `rabbitmq:stream-offset-spec`.
//! * The attach reply echoes exactly the filters applied, so a client can tell.

use std::sync::Arc;

use fe2o3_amqp_types::definitions::{AmqpError, ErrorCondition};
use fe2o3_amqp_types::messaging::{FilterSet, Source, TerminusDurability, TerminusExpiryPolicy};
use fe2o3_amqp_types::primitives::{Symbol, Value};

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

type Refusal = (ErrorCondition, String);

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

/// Resolves a receiving link on `topic` to its subscription, creating or resuming it.
pub(super) fn subscribe(
    broker: &Broker,
    topic: &Arc<Topic>,
    source: &Source,
    container_id: &str,
    link_name: &str,
) -> Result<(Arc<Subscription>, SubscriptionRef), Refusal> {
    let durable = source.durable != TerminusDurability::None
        && source.expiry_policy == TerminusExpiryPolicy::Never;
    let shared = has_cap(source, "shared");
    let global = has_cap(source, "global");
    let base = match (shared, link_name.rsplit_once('|')) {
        (true, Some((name, n)))
            if n.chars().all(|c| c.is_ascii_digit()) || n == "global" || n == "volatile" =>
        {
            name
        }
        _ => link_name,
    };
    let id = match (global, shared || durable) {
        (true, _) => base.to_owned(),
        (false, true) => format!("{container_id}:{base}"),
        (false, false) => format!(
            "{container_id}:{link_name}:{}",
            crate::broker::queue::ConsumerId::next().0
        ),
    };
    let parsed = filters(source)?;
    let selector = parsed.selector.as_ref().map(|(text, _)| text.clone());
    let start = parsed.start.as_ref().map_or(StartAt::Next, |(s, _)| *s);
    let created = match durable {
        true => broker.durable_subscription(topic, &id, selector.as_deref(), start),
        false => broker.volatile_subscription(topic, &id, selector.as_deref(), start),
    };
    let sub = created.map_err(|e| {
        let condition: ErrorCondition = match e {
            crate::broker::subscriptions::SubscriptionError::Selector(_) => {
                AmqpError::InvalidField.into()
            }
            crate::broker::subscriptions::SubscriptionError::TooMany => {
                AmqpError::ResourceLimitExceeded.into()
            }
            crate::broker::subscriptions::SubscriptionError::OtherTopic { .. } => {
                AmqpError::PreconditionFailed.into()
            }
            crate::broker::subscriptions::SubscriptionError::Persist(_) => {
                AmqpError::InternalError.into()
            }
        };
        (condition, e.to_string())
    })?;
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
