//! Fan-out of a queue to several consumers, each with a subscription filter.
//!
//! A queue's messages are stored once per consumer that subscribes to them, in that
//! consumer's [`Lane`]. Each copy has
//! its own attempts, retries and dead-letter entry, so one consumer's failures never hold
//! up another; a message has left the queue when every copy is settled.

use std::borrow::{Borrow, Cow};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use clawq_protocol::body;
use serde::Deserialize;
use serde::de::{Deserializer, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use super::ContentType;
use super::lane::Lane;

/// Which messages a consumer takes: for each field (a dotted path into a JSON body, such
/// as `type` or `data.reason`), the values it accepts. An empty filter takes every
/// message; a non-empty one takes only bodies that are JSON objects (in any encoding the
/// protocol accepts: the object, a JSON string holding it, or text holding it) whose
/// every listed field holds one of its values (a string value is compared trimmed, as the
/// bundled handlers read it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "BTreeMap<String, OneOrMany>")]
pub struct Filter {
    fields: BTreeMap<String, Vec<String>>,
}

/// A filter value as written in the config: one value or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a filter value: a string, or a list of strings")]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl TryFrom<BTreeMap<String, OneOrMany>> for Filter {
    type Error = String;

    fn try_from(written: BTreeMap<String, OneOrMany>) -> Result<Self, String> {
        let mut fields = BTreeMap::new();
        for (path, values) in written {
            let values = match values {
                OneOrMany::One(v) => vec![v],
                OneOrMany::Many(vs) => vs,
            };
            if path.split('.').any(str::is_empty) {
                return Err(format!("filter field `{path}` is not a dotted path"));
            }
            if values.is_empty() {
                return Err(format!("filter field `{path}` lists no value"));
            }
            fields.insert(path, values);
        }
        Ok(Filter { fields })
    }
}

impl Filter {
    /// The filter that takes the messages whose field `path` (dotted) holds one of
    /// `values`.
    pub fn field(path: &str, values: &[&str]) -> Filter {
        let values = values.iter().map(|v| (*v).to_owned()).collect();
        Filter {
            fields: BTreeMap::from([(path.to_owned(), values)]),
        }
    }

    /// Whether this filter takes every message.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The filter as JSON: each field with the values it accepts.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(&self.fields).expect("strings serialize")
    }

    /// Whether a message whose body has the members `body` (`None`: not a JSON object)
    /// passes.
    fn accepts(&self, body: Option<&Members<'_>>) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(body) = body else {
            return false;
        };
        self.fields.iter().all(|(path, accepted)| {
            match field(body, path) {
                // Trimmed, as the protocol's lenient rules read fields (spec section 5).
                Some(Value::String(s)) => accepted.iter().any(|a| a == s.trim()),
                Some(other @ (Value::Number(_) | Value::Bool(_))) => {
                    accepted.contains(&other.to_string())
                }
                _ => false,
            }
        })
    }
}

/// One consumer's subscription to a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Where its copies go.
    pub lane: Lane,
    /// What it takes.
    pub filter: Filter,
}

/// The subscriptions of every consumed queue. A queue without subscriptions (a
/// dead-letter queue, a queue only produced to) keeps each message once, in its own lane.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    by_queue: HashMap<String, Vec<Route>>,
}

impl Routes {
    /// Subscribes `consumer` to `queue` with `filter`.
    pub fn add(&mut self, queue: &str, consumer: &str, filter: Filter) {
        self.by_queue
            .entry(queue.to_owned())
            .or_default()
            .push(Route {
                lane: Lane::new(queue, consumer),
                filter,
            });
    }

    /// The lanes a message published to `queue` is stored in: the queue itself when it
    /// has no subscription, else the lanes of the subscriptions that accept it (none when
    /// no consumer wants it).
    pub fn lanes(&self, queue: &str, content_type: ContentType, body: &[u8]) -> Vec<Lane> {
        let Some(routes) = self.by_queue.get(queue) else {
            return vec![Lane::of(queue)];
        };
        let text;
        let members =
            if routes.iter().all(|r| r.filter.is_empty()) || content_type == ContentType::Bytes {
                None
            } else if let Ok(object) = serde_json::from_slice::<Members>(body) {
                // The common case, a body that is the object itself, in one pass; any
                // other body is read by the rules every reader shares.
                Some(object)
            } else {
                text = body::object_text(protocol_type(content_type), body).ok();
                text.as_deref().and_then(members)
            };
        routes
            .iter()
            .filter(|r| r.filter.accepts(members.as_ref()))
            .map(|r| r.lane.clone())
            .collect()
    }
}

/// A JSON object's members, each value left as its JSON text: a filter parses only the
/// fields it names, never the body's whole tree.
type Members<'a> = BTreeMap<Key<'a>, &'a RawValue>;

/// The name of an object's member, borrowed from the JSON text unless it has escapes.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key<'a>(Cow<'a, str>);

impl Borrow<str> for Key<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl<'de> Visitor<'de> for Name {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }

            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(name)))
            }

            fn visit_str<E>(self, name: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(name.to_owned())))
            }
        }
        deserializer.deserialize_str(Name)
    }
}

/// The members of the JSON object whose text is `text`, if it is one.
fn members(text: &str) -> Option<Members<'_>> {
    serde_json::from_str(text).ok()
}

/// The protocol's name of `content_type`, to read a body as the bundled handlers do.
fn protocol_type(content_type: ContentType) -> body::ContentType {
    match content_type {
        ContentType::Json => body::ContentType::Json,
        ContentType::Text => body::ContentType::Text,
        ContentType::Bytes => body::ContentType::Bytes,
    }
}

/// The value at the dotted `path` of `body`, if every step of it is an object's member.
fn field(body: &Members<'_>, path: &str) -> Option<Value> {
    let mut steps = path.split('.');
    let mut raw: &RawValue = body.get(steps.next()?)?;
    for step in steps {
        raw = members(raw.get())?.get(step)?;
    }
    serde_json::from_str(raw.get()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Filter, toml::de::Error> {
        #[derive(Deserialize)]
        struct Wrapper {
            filter: Filter,
        }
        toml::from_str::<Wrapper>(toml_text).map(|w| w.filter)
    }

    fn filter(toml_text: &str) -> Filter {
        parse(toml_text).unwrap()
    }

    /// The written form of `lanes`, to compare them with.
    fn written(lanes: Vec<Lane>) -> Vec<String> {
        lanes.iter().map(Lane::to_string).collect()
    }

    /// Whether `filter` accepts the JSON object `body`.
    fn accepts(filter: &Filter, body: &str) -> bool {
        filter.accepts(members(body).as_ref())
    }

    #[test]
    fn filters_match_fields_by_dotted_path() {
        let f = filter(r#"filter = { type = "delivery_receipt", status = ["dead_lettered"] }"#);
        let yes = r#"{"type": "delivery_receipt", "status": "dead_lettered"}"#;
        let no = r#"{"type": "delivery_receipt", "status": "delivered_to_webhook"}"#;
        assert!(accepts(&f, yes));
        assert!(!accepts(&f, no));
        assert!(!f.accepts(None));
        let nested = filter(r#"filter = { "data.reason" = "agent_revoked", v = "1" }"#);
        let body = r#"{"data": {"reason": "agent_revoked", "x": [1, {}]}, "v": 1}"#;
        assert!(accepts(&nested, body));
        assert!(!accepts(&nested, r#"{"data": "agent_revoked", "v": 1}"#));
        assert!(!accepts(
            &nested,
            r#"{"data": {"reason": ["agent_revoked"]}, "v": 1}"#
        ));
        assert!(Filter::default().accepts(None));
        let escaped = filter(r#"filter = { "tÿpe" = "a\"b" }"#);
        assert!(
            accepts(&escaped, r#"{"t\u00ffpe": "a\"b"}"#),
            "escaped names and values"
        );
        let later = filter(r#"filter = { type = "b" }"#);
        assert!(
            accepts(&later, r#"{"type": "a", "type": "b"}"#),
            "the last of twin members"
        );
    }

    #[test]
    fn filters_refuse_empty_paths_and_value_lists() {
        let err = parse(r#"filter = { "data." = "x" }"#).unwrap_err();
        assert!(err.to_string().contains("not a dotted path"), "{err}");
        let err = parse(r#"filter = { type = [] }"#).unwrap_err();
        assert!(err.to_string().contains("lists no value"), "{err}");
        let err = parse(r#"filter = { type = 1 }"#).unwrap_err();
        assert!(
            err.to_string().contains("a string, or a list of strings"),
            "{err}"
        );
    }

    #[test]
    fn messages_fan_out_to_the_subscriptions_that_accept_them() {
        let mut routes = Routes::default();
        routes.add("events", "events", Filter::default());
        routes.add(
            "events",
            "notifier",
            filter(r#"filter = { type = "pair.accepted" }"#),
        );
        let pair = br#"{"type":"pair.accepted"}"#;
        let other = br#"{"type":"agent.auth.issued"}"#;
        assert_eq!(
            written(routes.lanes("events", ContentType::Json, pair)),
            ["events", "events#notifier"]
        );
        assert_eq!(
            written(routes.lanes("events", ContentType::Json, other)),
            ["events"]
        );
        assert_eq!(
            written(routes.lanes("events", ContentType::Bytes, pair)),
            ["events"]
        );
        assert_eq!(
            written(routes.lanes("plain", ContentType::Json, pair)),
            ["plain"]
        );
    }

    #[test]
    fn filters_read_json_strings_and_text_like_the_object() {
        let mut routes = Routes::default();
        routes.add("events", "events", Filter::default());
        routes.add(
            "events",
            "router",
            Filter::field("type", &["pair.accepted"]),
        );
        let object = r#"{"type":"pair.accepted"}"#;
        let string = serde_json::to_string(object).unwrap();
        for (content_type, body) in [
            (ContentType::Json, object),
            (ContentType::Json, string.as_str()),
            (ContentType::Text, object),
            (ContentType::Text, string.as_str()),
        ] {
            assert_eq!(
                written(routes.lanes("events", content_type, body.as_bytes())),
                ["events", "events#router"],
                "{content_type:?} {body}"
            );
        }
        let padded = br#"{"type":"  pair.accepted\n"}"#;
        assert_eq!(
            written(routes.lanes("events", ContentType::Json, padded)),
            ["events", "events#router"],
            "string values are compared trimmed"
        );
        let other = serde_json::to_string(r#"{"type":"agent.auth.issued"}"#).unwrap();
        assert_eq!(
            written(routes.lanes("events", ContentType::Json, other.as_bytes())),
            ["events"]
        );
        for not_an_object in [&b"\"[1]\""[..], b"\"{nope\"", b"hello"] {
            assert_eq!(
                written(routes.lanes("events", ContentType::Text, not_an_object)),
                ["events"]
            );
        }
        assert_eq!(
            written(routes.lanes("events", ContentType::Bytes, object.as_bytes())),
            ["events"],
            "bytes are never read as JSON"
        );
    }
}
