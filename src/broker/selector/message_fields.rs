//! [`MessageFields`]: selector identifiers resolved against decoded AMQP sections.

use fe2o3_amqp_types::messaging::{ApplicationProperties, Header, MessageId, Properties};
use fe2o3_amqp_types::primitives::{SimpleValue, Timestamp};

use super::{Fields, SelectorValue};

use SelectorValue as V;

/// The decoded sections of an AMQP message, seen through JMS names the way qpid-jms
/// maps them, so a selector written against the JMS API means the same here.
///
/// | name | source |
/// |---|---|
/// | `JMSMessageID`, `JMSCorrelationID` | properties, as qpid-jms strings (`ID:AMQP_ULONG:7`) |
/// | `JMSPriority` | header.priority (default 4) |
/// | `JMSDeliveryMode` | `'PERSISTENT'` / `'NON_PERSISTENT'` from header.durable |
/// | `JMSTimestamp`, `JMSExpiration` | creation-time, absolute-expiry-time in ms (0 if absent) |
/// | `JMSReplyTo`, `JMSXGroupID`, `JMSXGroupSeq` | reply-to, group-id, group-sequence |
/// | `JMSXDeliveryCount` | header.delivery-count + 1 |
/// | `header.<field>`, `properties.<field>` | the AMQP field by its spec name, raw |
/// | anything else | application-properties by key |
///
/// `JMSType` (a message annotation) is not mapped and is NULL.
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageFields<'a> {
    pub header: Option<&'a Header>,
    pub properties: Option<&'a Properties>,
    pub app: Option<&'a ApplicationProperties>,
}

impl Fields for MessageFields<'_> {
    fn get(&self, name: &str) -> SelectorValue {
        let p = self.properties;
        let ms = |t: Option<&Timestamp>| V::Long(t.map_or(0, |t| t.milliseconds()));
        match name {
            "JMSMessageID" => p
                .and_then(|p| p.message_id.as_ref())
                .map_or(V::Null, |id| V::String(jms_id(id, false))),
            "JMSCorrelationID" => p
                .and_then(|p| p.correlation_id.as_ref())
                .map_or(V::Null, |id| V::String(jms_id(id, true))),
            "JMSPriority" => self.header_field("priority"),
            "JMSDeliveryMode" => {
                let durable = self.header.is_some_and(|h| h.durable);
                V::String(
                    if durable {
                        "PERSISTENT"
                    } else {
                        "NON_PERSISTENT"
                    }
                    .into(),
                )
            }
            "JMSTimestamp" => ms(p.and_then(|p| p.creation_time.as_ref())),
            "JMSExpiration" => ms(p.and_then(|p| p.absolute_expiry_time.as_ref())),
            "JMSReplyTo" => self.properties_field("reply_to"),
            "JMSType" => V::Null,
            "JMSXGroupID" => self.properties_field("group_id"),
            "JMSXGroupSeq" => self.properties_field("group_sequence"),
            "JMSXDeliveryCount" => {
                V::Long(self.header.map_or(0, |h| i64::from(h.delivery_count)) + 1)
            }
            _ => {
                if let Some(field) = name.strip_prefix("header.") {
                    self.header_field(field)
                } else if let Some(field) = name.strip_prefix("properties.") {
                    self.properties_field(field)
                } else {
                    self.app
                        .and_then(|a| a.0.get(name))
                        .map_or(V::Null, simple_value)
                }
            }
        }
    }
}

impl MessageFields<'_> {
    /// A header field; an absent header has the AMQP defaults.
    fn header_field(&self, field: &str) -> SelectorValue {
        let default = Header::default();
        let h = self.header.unwrap_or(&default);
        match field {
            "durable" => V::Bool(h.durable),
            "priority" => V::Long(i64::from(h.priority.0)),
            "ttl" => h.ttl.map_or(V::Null, |t| V::Long(i64::from(t))),
            "first_acquirer" | "first-acquirer" => V::Bool(h.first_acquirer),
            "delivery_count" | "delivery-count" => V::Long(i64::from(h.delivery_count)),
            _ => V::Null,
        }
    }

    fn properties_field(&self, field: &str) -> SelectorValue {
        let Some(p) = self.properties else {
            return V::Null;
        };
        let string = |s: Option<&String>| s.map_or(V::Null, |s| V::String(s.clone()));
        let time = |t: Option<&Timestamp>| t.map_or(V::Null, |t| V::Long(t.milliseconds()));
        match field.replace('-', "_").as_str() {
            "message_id" => p.message_id.as_ref().map_or(V::Null, raw_id),
            "correlation_id" => p.correlation_id.as_ref().map_or(V::Null, raw_id),
            "user_id" => p.user_id.as_ref().map_or(V::Null, |u| {
                std::str::from_utf8(u).map_or(V::Null, |s| V::String(s.to_owned()))
            }),
            "to" => string(p.to.as_ref()),
            "subject" => string(p.subject.as_ref()),
            "reply_to" => string(p.reply_to.as_ref()),
            "content_type" => string(p.content_type.as_ref().map(|s| &s.0)),
            "content_encoding" => string(p.content_encoding.as_ref().map(|s| &s.0)),
            "absolute_expiry_time" => time(p.absolute_expiry_time.as_ref()),
            "creation_time" => time(p.creation_time.as_ref()),
            "group_id" => string(p.group_id.as_ref()),
            "group_sequence" => p.group_sequence.map_or(V::Null, |s| V::Long(i64::from(s))),
            "reply_to_group_id" => string(p.reply_to_group_id.as_ref()),
            _ => V::Null,
        }
    }
}

/// Application property values: booleans, integers of every width (a ulong beyond
/// i64 becomes a double), float/double, string and symbol; the rest is NULL.
fn simple_value(v: &SimpleValue) -> SelectorValue {
    match v {
        SimpleValue::Bool(b) => V::Bool(*b),
        SimpleValue::Ubyte(x) => V::Long(i64::from(*x)),
        SimpleValue::Ushort(x) => V::Long(i64::from(*x)),
        SimpleValue::Uint(x) => V::Long(i64::from(*x)),
        SimpleValue::Ulong(x) => i64::try_from(*x).map_or(V::Double(*x as f64), V::Long),
        SimpleValue::Byte(x) => V::Long(i64::from(*x)),
        SimpleValue::Short(x) => V::Long(i64::from(*x)),
        SimpleValue::Int(x) => V::Long(i64::from(*x)),
        SimpleValue::Long(x) => V::Long(*x),
        SimpleValue::Float(x) => V::Double(f64::from(x.into_inner())),
        SimpleValue::Double(x) => V::Double(x.into_inner()),
        SimpleValue::String(s) => V::String(s.clone()),
        SimpleValue::Symbol(s) => V::String(s.0.clone()),
        _ => V::Null,
    }
}

fn raw_id(id: &MessageId) -> SelectorValue {
    match id {
        MessageId::String(s) => V::String(s.clone()),
        MessageId::Ulong(x) => i64::try_from(*x).map_or(V::Double(*x as f64), V::Long),
        MessageId::Uuid(u) => V::String(uuid_string(u.as_inner())),
        MessageId::Binary(_) => V::Null,
    }
}

/// The string qpid-jms's `AmqpMessageIdHelper` shows as JMSMessageID / JMSCorrelationID.
/// A correlation id that is a plain string (no `ID:` prefix) is shown as-is.
fn jms_id(id: &MessageId, correlation: bool) -> String {
    const ENCODINGS: [&str; 5] = [
        "AMQP_NO_PREFIX:",
        "AMQP_UUID:",
        "AMQP_ULONG:",
        "AMQP_BINARY:",
        "AMQP_STRING:",
    ];
    match id {
        MessageId::String(s) => match s.strip_prefix("ID:") {
            None if correlation => s.clone(),
            None => format!("ID:AMQP_NO_PREFIX:{s}"),
            Some(rest) if ENCODINGS.iter().any(|e| rest.starts_with(e)) => {
                format!("ID:AMQP_STRING:{s}")
            }
            Some(_) => s.clone(),
        },
        MessageId::Ulong(x) => format!("ID:AMQP_ULONG:{x}"),
        MessageId::Uuid(u) => format!("ID:AMQP_UUID:{}", uuid_string(u.as_inner())),
        MessageId::Binary(b) => {
            let hex: String = b.iter().map(|x| format!("{x:02X}")).collect();
            format!("ID:AMQP_BINARY:{hex}")
        }
    }
}

fn uuid_string(b: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{x:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp_types::messaging::{ApplicationProperties, Header, MessageId, Properties};
    use fe2o3_amqp_types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Uuid};

    use super::super::{parse, Fields, SelectorValue as V};
    use super::MessageFields;

    fn header() -> Header {
        Header::builder()
            .durable(true)
            .priority(7)
            .ttl(30_000)
            .delivery_count(2)
            .build()
    }

    fn properties() -> Properties {
        Properties::builder()
            .message_id(MessageId::String("ID:abc-1".into()))
            .correlation_id(MessageId::Ulong(42))
            .subject("orders")
            .reply_to("replies")
            .content_type(Symbol::from("text/plain"))
            .creation_time(Timestamp::from_milliseconds(1_700_000_000_000))
            .group_id("g1".to_string())
            .group_sequence(5)
            .build()
    }

    fn app() -> ApplicationProperties {
        ApplicationProperties::builder()
            .insert("s", "text")
            .insert("b", true)
            .insert("i8", SimpleValue::Byte(-8))
            .insert("u32", SimpleValue::Uint(32))
            .insert("u64", SimpleValue::Ulong(u64::MAX))
            .insert("l", SimpleValue::Long(-5))
            .insert("f", 1.5f32)
            .insert("d", 2.25f64)
            .insert("sym", SimpleValue::Symbol(Symbol::from("sy")))
            .insert("bin", SimpleValue::Binary(Binary::from(vec![1, 2])))
            .build()
    }

    #[test]
    fn jms_headers_and_application_properties_resolve() {
        let (h, p, a) = (header(), properties(), app());
        let f = MessageFields {
            header: Some(&h),
            properties: Some(&p),
            app: Some(&a),
        };
        let cases: &[(&str, V)] = &[
            ("JMSMessageID", V::String("ID:abc-1".into())),
            ("JMSCorrelationID", V::String("ID:AMQP_ULONG:42".into())),
            ("JMSPriority", V::Long(7)),
            ("JMSDeliveryMode", V::String("PERSISTENT".into())),
            ("JMSTimestamp", V::Long(1_700_000_000_000)),
            ("JMSExpiration", V::Long(0)),
            ("JMSReplyTo", V::String("replies".into())),
            ("JMSType", V::Null),
            ("JMSXGroupID", V::String("g1".into())),
            ("JMSXGroupSeq", V::Long(5)),
            ("JMSXDeliveryCount", V::Long(3)),
            ("header.ttl", V::Long(30_000)),
            ("header.durable", V::Bool(true)),
            ("properties.subject", V::String("orders".into())),
            ("properties.content-type", V::String("text/plain".into())),
            ("properties.correlation_id", V::Long(42)),
            ("properties.to", V::Null),
            ("s", V::String("text".into())),
            ("b", V::Bool(true)),
            ("i8", V::Long(-8)),
            ("u32", V::Long(32)),
            ("u64", V::Double(u64::MAX as f64)),
            ("l", V::Long(-5)),
            ("f", V::Double(1.5)),
            ("d", V::Double(2.25)),
            ("sym", V::String("sy".into())),
            ("bin", V::Null),
            ("S", V::Null),
            ("absent", V::Null),
        ];
        for (name, want) in cases {
            assert_eq!(f.get(name), *want, "{name}");
        }
    }

    #[test]
    fn absent_sections_have_amqp_defaults() {
        let f = MessageFields::default();
        assert_eq!(f.get("JMSPriority"), V::Long(4));
        assert_eq!(f.get("JMSDeliveryMode"), V::String("NON_PERSISTENT".into()));
        assert_eq!(f.get("JMSMessageID"), V::Null);
        assert_eq!(f.get("JMSXDeliveryCount"), V::Long(1));
        assert_eq!(f.get("x"), V::Null);
    }

    #[test]
    fn message_ids_render_as_qpid_jms_does() {
        let render = |id: MessageId| {
            let p = Properties::builder()
                .message_id(id.clone())
                .correlation_id(id)
                .build();
            let f = MessageFields {
                properties: Some(&p),
                ..MessageFields::default()
            };
            (f.get("JMSMessageID"), f.get("JMSCorrelationID"))
        };
        let s = |s: &str| V::String(s.into());
        assert_eq!(
            render(MessageId::String("plain".into())),
            (s("ID:AMQP_NO_PREFIX:plain"), s("plain"))
        );
        assert_eq!(
            render(MessageId::String("ID:AMQP_ULONG:1".into())),
            (
                s("ID:AMQP_STRING:ID:AMQP_ULONG:1"),
                s("ID:AMQP_STRING:ID:AMQP_ULONG:1")
            )
        );
        let uuid = Uuid::from([
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ]);
        let u = "ID:AMQP_UUID:12345678-9abc-def0-0123-456789abcdef";
        assert_eq!(render(MessageId::Uuid(uuid)), (s(u), s(u)));
        let b = "ID:AMQP_BINARY:0AFF";
        assert_eq!(
            render(MessageId::Binary(Binary::from(vec![0x0a, 0xff]))),
            (s(b), s(b))
        );
    }

    #[test]
    fn selectors_run_against_message_fields() {
        let (h, p, a) = (header(), properties(), app());
        let f = MessageFields {
            header: Some(&h),
            properties: Some(&p),
            app: Some(&a),
        };
        let cases = [
            ("JMSPriority > 4 AND JMSDeliveryMode = 'PERSISTENT'", true),
            ("JMSMessageID = 'ID:abc-1'", true),
            ("JMSCorrelationID LIKE 'ID:AMQP_ULONG:%'", true),
            ("s = 'text' AND b AND l < 0 AND d BETWEEN 2 AND 3", true),
            ("properties.subject IN ('orders', 'returns')", true),
            ("JMSType IS NULL AND bin IS NULL", true),
            ("u32 + i8 = 24", true),
            ("JMSPriority < 5", false),
        ];
        for (text, want) in cases {
            let sel = parse(text);
            assert!(sel.is_ok_and(|s| s.matches(&f) == want), "{text}");
        }
    }
}
