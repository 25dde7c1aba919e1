//! How a receiving link's source becomes a subscription of a topic, following the
//! conventions qpid-jms and Artemis use.
//!
//! * Durable: the source is durable (configuration or unsettled-state) with expiry-policy
//!   `never`. Identity: `container-id:link-name`; detach with `closed=false` keeps the
//!   subscription and its backlog, `closed=true` deletes it.
//! * Shared (`shared` capability): links share one subscription as competing consumers;
//!   qpid-jms names them `name`, `name|1`, `name|2`…, so the `|n` suffix is dropped.
//!   `global` makes the identity independent of the container.
//! * Selector: the `apache.org:selector-filter:string` source filter.
//! * Replay: our `entrepot:offset-spec` source filter — `first`, `last`, `next`, a log
//!   offset (ulong) or a timestamp (ms), like RabbitMQ streams' `rabbitmq:stream-offset-spec`.

use std::sync::Arc;

use fe2o3_amqp_types::definitions::{AmqpError, ErrorCondition};
use fe2o3_amqp_types::messaging::{Source, TerminusDurability, TerminusExpiryPolicy};
use fe2o3_amqp_types::primitives::{Symbol, Value};

use crate::broker::topic::{StartAt, Subscription, Topic};
use crate::broker::{AddressKind, Broker};

/// Source filter key of JMS selectors.
pub const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
/// Source filter key of our replay start.
pub const OFFSET_SPEC_FILTER: &str = "entrepot:offset-spec";

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

/// The filter value under `key`, unwrapped from its described type.
fn filter_value<'a>(source: &'a Source, key: &str) -> Option<&'a Value> {
    let (_, value) = source
        .filter
        .as_ref()?
        .iter()
        .find(|(k, _)| k.as_str() == key)?;
    match value {
        Value::Described(d) => Some(&d.value),
        other => Some(other),
    }
}

fn start_at(source: &Source) -> Result<StartAt, Refusal> {
    let invalid = |what: String| {
        (
            AmqpError::InvalidField.into(),
            format!("{OFFSET_SPEC_FILTER}: {what}"),
        )
    };
    match filter_value(source, OFFSET_SPEC_FILTER) {
        None => Ok(StartAt::Next),
        Some(Value::String(s)) | Some(Value::Symbol(Symbol(s))) => match s.as_str() {
            "first" => Ok(StartAt::First),
            "last" => Ok(StartAt::Last),
            "next" => Ok(StartAt::Next),
            other => Err(invalid(format!(
                "unknown start {other:?} (first, last, next, an offset or a timestamp)"
            ))),
        },
        Some(Value::Ulong(o)) => Ok(StartAt::Offset(*o)),
        Some(Value::Long(o)) if *o >= 0 => Ok(StartAt::Offset(*o as u64)),
        Some(Value::Timestamp(t)) => Ok(StartAt::Timestamp(t.milliseconds())),
        Some(other) => Err(invalid(format!("unsupported value {other:?}"))),
    }
}

fn selector_text(source: &Source) -> Result<Option<String>, Refusal> {
    match filter_value(source, SELECTOR_FILTER) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err((
            AmqpError::InvalidField.into(),
            format!("{SELECTOR_FILTER} must be a string, not {other:?}"),
        )),
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
    let selector = selector_text(source)?;
    let start = start_at(source)?;
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
