//! An example third-party handler of the `clawdentity-events` queue: an event notifier.
//!
//! It turns two events of spec section 5 into a `notification` frame pushed to the agent
//! they concern:
//!
//! - `pair.accepted` (a flat object) → the pairing's **initiator**;
//! - `group.member.joined` (an envelope, spec section 2) → `data.recipientAgentDid`.
//!
//! Each notification has a deterministic `requestId`. After a successful push the handler
//! records `sent/<requestId>` in its actor storage, in the actor of the target DID, and
//! skips an event whose notification it already sent (delivery is at least once).
//!
//! A push reaches only the connections open right now: when the agent has none, the event
//! is retried after [`OFFLINE_RETRY_SECONDS`]; after the consumer's `max_retries` it goes
//! to the dead-letter queue, from which an operator can redrive it. Other event types are
//! acked; malformed events are acked with a warning; a transient capability error asks for
//! a retry; a permanent one is acked with an error log.

wit_bindgen::generate!({
    world: "receipt-handler",
    path: "../../../wit",
});

use clawdentity::queues::log::{self, Level};
use clawdentity::queues::types::{HostError, Message, Outcome};
use clawdentity::queues::{actor_storage, websocket};
use serde_json::{Map, Value, json};

/// How long to wait before trying again to reach an agent with no open connection.
const OFFLINE_RETRY_SECONDS: u32 = 60;

/// The component: its `handle` runs [`notify`] on each message against the real imports.
struct EventNotifier;

impl exports::clawdentity::queues::handler::Guest for EventNotifier {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        Ok(messages.iter().map(|m| notify(&mut Imports, m)).collect())
    }
}

export!(EventNotifier);

/// The capability calls the notifier makes, so that tests can run it natively against
/// fakes.
trait Host {
    /// Reads `key` of actor `actor` (`actor-storage.get`).
    fn get(&mut self, actor: &str, key: &str) -> Result<Option<Vec<u8>>, HostError>;
    /// Writes `key` of actor `actor` (`actor-storage.put`).
    fn put(&mut self, actor: &str, key: &str, value: &[u8]) -> Result<(), HostError>;
    /// Pushes `frame` to the open connections of `agent_did` (`websocket.send-frame`).
    fn send_frame(&mut self, agent_did: &str, frame: &str) -> Result<u32, HostError>;
    /// Writes a log line (`log.write`).
    fn log(&mut self, level: Level, message: &str);
}

/// The real imports of the `receipt-handler` world.
struct Imports;

impl Host for Imports {
    fn get(&mut self, actor: &str, key: &str) -> Result<Option<Vec<u8>>, HostError> {
        actor_storage::get(actor, key)
    }

    fn put(&mut self, actor: &str, key: &str, value: &[u8]) -> Result<(), HostError> {
        actor_storage::put(actor, key, value)
    }

    fn send_frame(&mut self, agent_did: &str, frame: &str) -> Result<u32, HostError> {
        websocket::send_frame(agent_did, frame)
    }

    fn log(&mut self, level: Level, message: &str) {
        log::write(level, message);
    }
}

/// A notification to push.
#[derive(Debug, PartialEq)]
struct Notification {
    /// The agent it is for: the actor that records it as sent.
    target: String,
    /// Its deterministic id, the same each time the event is delivered.
    request_id: String,
    /// The text shown to the agent.
    message: String,
}

impl Notification {
    /// The frame's JSON text; the host fills in `v`, `id` and `ts`.
    fn frame(&self) -> String {
        json!({
            "type": "notification",
            "requestId": self.request_id,
            "message": self.message,
        })
        .to_string()
    }
}

/// The non-blank string field `name` of `object`.
fn text<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    object
        .get(name)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// The non-blank string field `name` of `object`, or why it is missing.
fn required<'a>(object: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    text(object, name).ok_or_else(|| format!("{name} is missing or blank"))
}

/// The object field `name` of `object`, or why it is missing.
fn object<'a>(
    object: &'a Map<String, Value>,
    name: &str,
) -> Result<&'a Map<String, Value>, String> {
    object
        .get(name)
        .and_then(Value::as_object)
        .ok_or_else(|| format!("{name} is missing or not an object"))
}

/// Reads an event: `Ok(None)` for an event type this handler does not notify, `Err` with
/// the reason for a malformed event.
fn parse(body: &[u8]) -> Result<Option<Notification>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|_| "body is not JSON".to_string())?;
    let Value::Object(event) = value else {
        return Err("body is not a JSON object".into());
    };
    match required(&event, "type")? {
        "pair.accepted" => pair_accepted(&event).map(Some),
        "group.member.joined" => member_joined(object(&event, "data")?).map(Some),
        _ => Ok(None),
    }
}

/// The notification of a `pair.accepted` event (flat): to the initiator.
fn pair_accepted(event: &Map<String, Value>) -> Result<Notification, String> {
    let initiator = required(event, "initiatorAgentDid")?;
    let responder = required(event, "responderAgentDid")?;
    let timestamp = required(event, "eventTimestampUtc")?;
    let profile = object(event, "responderProfile")?;
    let agent_name = required(profile, "agentName")?;
    let human_name = required(profile, "humanName")?;
    let message = match text(event, "message") {
        Some(message) => message.to_string(),
        None => {
            format!("Pairing complete: {agent_name} ({human_name}) accepted your pairing request.")
        }
    };
    Ok(Notification {
        target: initiator.into(),
        request_id: format!("pair.accepted:{initiator}:{responder}:{timestamp}"),
        message,
    })
}

/// The notification of a `group.member.joined` event, from its envelope's `data`: to
/// `recipientAgentDid`.
fn member_joined(data: &Map<String, Value>) -> Result<Notification, String> {
    let recipient = required(data, "recipientAgentDid")?;
    let joined = required(data, "joinedAgentDid")?;
    let joined_name = required(data, "joinedAgentName")?;
    let group_id = required(data, "groupId")?;
    let group_name = required(data, "groupName")?;
    let joined_at = required(data, "joinedAt")?;
    let message = match text(data, "message") {
        Some(message) => message.to_string(),
        None => format!("{joined_name} joined {group_name}."),
    };
    Ok(Notification {
        target: recipient.into(),
        request_id: format!("group.member.joined:{group_id}:{joined}:{recipient}:{joined_at}"),
        message,
    })
}

/// What became of a notification that no capability call failed.
enum Sent {
    /// Pushed now to this many connections (at least one).
    Now(u32),
    /// Sent by an earlier delivery of the same event.
    Already,
    /// The agent has no open connection.
    Offline,
}

/// A capability call that failed, with what the notifier was doing.
struct Failure {
    /// What the call was for, for the log line.
    doing: String,
    /// The host's error.
    error: HostError,
}

/// Adds context to a capability error, for `map_err`.
fn doing(what: impl Into<String>) -> impl FnOnce(HostError) -> Failure {
    let doing = what.into();
    move |error| Failure { doing, error }
}

/// Handles one message and decides its outcome.
fn notify(host: &mut impl Host, message: &Message) -> Outcome {
    let notification = match parse(&message.body) {
        Ok(Some(notification)) => notification,
        Ok(None) => return Outcome::Ack,
        Err(why) => {
            let text = format!("message {}: malformed event: {why}; acked", message.id);
            host.log(Level::Warn, &text);
            return Outcome::Ack;
        }
    };
    match send_once(host, &notification) {
        Ok(Sent::Now(reached)) => {
            let text = format!(
                "{} pushed to {reached} connection(s) of {}",
                notification.request_id, notification.target
            );
            host.log(Level::Info, &text);
            Outcome::Ack
        }
        Ok(Sent::Already) => Outcome::Ack,
        Ok(Sent::Offline) => {
            let text = format!(
                "message {}: {} has no open connection; retrying {} in {OFFLINE_RETRY_SECONDS} s",
                message.id, notification.target, notification.request_id
            );
            host.log(Level::Info, &text);
            Outcome::Retry(Some(OFFLINE_RETRY_SECONDS))
        }
        Err(Failure { doing, error }) if error.transient => {
            let text = format!(
                "message {}: {doing} failed, will retry: {}",
                message.id, error.message
            );
            host.log(Level::Warn, &text);
            Outcome::Retry(None)
        }
        Err(Failure { doing, error }) => {
            let text = format!(
                "message {}: {doing} failed: {}; acked",
                message.id, error.message
            );
            host.log(Level::Error, &text);
            Outcome::Ack
        }
    }
}

/// Pushes `notification` unless `sent/<requestId>` says it was, and records it after a
/// push that reached a connection. A crash between the push and the record pushes it
/// again, with the same `requestId`.
fn send_once(host: &mut impl Host, notification: &Notification) -> Result<Sent, Failure> {
    let actor = notification.target.as_str();
    let key = format!("sent/{}", notification.request_id);
    let sent = host
        .get(actor, &key)
        .map_err(doing(format!("reading {key} of {actor}")))?;
    if sent.is_some() {
        return Ok(Sent::Already);
    }
    let reached = host
        .send_frame(actor, &notification.frame())
        .map_err(doing(format!(
            "pushing {} to {actor}",
            notification.request_id
        )))?;
    if reached == 0 {
        return Ok(Sent::Offline);
    }
    host.put(actor, &key, reached.to_string().as_bytes())
        .map_err(doing(format!("writing {key} of {actor}")))?;
    Ok(Sent::Now(reached))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawdentity::queues::types::ContentType;
    use std::collections::HashMap;

    const A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const B: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";
    const C: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PD";
    const TS: &str = "2026-11-24T10:00:00.000Z";
    const GROUP: &str = "grp_01HZX4M3Q8V2J7K9T6R5W1N0PE";

    /// In-memory capabilities, with optional failures.
    struct Fake {
        /// Actor storage: (actor, key) → value.
        storage: HashMap<(String, String), Vec<u8>>,
        /// Frames pushed: (agent, frame JSON).
        frames: Vec<(String, Value)>,
        /// Log lines written.
        logs: Vec<(Level, String)>,
        /// Connections each push reaches.
        connections: u32,
        /// The error of every storage call, when set.
        storage_error: Option<HostError>,
        /// The error of every push, when set.
        send_error: Option<HostError>,
    }

    impl Default for Fake {
        /// An agent with one open connection.
        fn default() -> Self {
            Fake {
                storage: HashMap::new(),
                frames: Vec::new(),
                logs: Vec::new(),
                connections: 1,
                storage_error: None,
                send_error: None,
            }
        }
    }

    impl Host for Fake {
        fn get(&mut self, actor: &str, key: &str) -> Result<Option<Vec<u8>>, HostError> {
            if let Some(e) = &self.storage_error {
                return Err(e.clone());
            }
            Ok(self.storage.get(&(actor.into(), key.into())).cloned())
        }

        fn put(&mut self, actor: &str, key: &str, value: &[u8]) -> Result<(), HostError> {
            if let Some(e) = &self.storage_error {
                return Err(e.clone());
            }
            self.storage
                .insert((actor.into(), key.into()), value.into());
            Ok(())
        }

        fn send_frame(&mut self, agent_did: &str, frame: &str) -> Result<u32, HostError> {
            if let Some(e) = &self.send_error {
                return Err(e.clone());
            }
            let frame = serde_json::from_str(frame).expect("frames are JSON");
            self.frames.push((agent_did.into(), frame));
            Ok(self.connections)
        }

        fn log(&mut self, level: Level, message: &str) {
            self.logs.push((level, message.into()));
        }
    }

    impl Fake {
        /// The levels of the log lines written so far.
        fn levels(&self) -> Vec<Level> {
            self.logs.iter().map(|(level, _)| *level).collect()
        }

        /// Whether `actor` records `request_id` as sent.
        fn sent(&self, actor: &str, request_id: &str) -> bool {
            let key = (actor.to_string(), format!("sent/{request_id}"));
            self.storage.contains_key(&key)
        }
    }

    /// A host error.
    fn error(transient: bool) -> HostError {
        HostError {
            transient,
            message: if transient { "busy" } else { "refused" }.into(),
        }
    }

    /// A JSON message.
    fn message(body: &str) -> Message {
        Message {
            id: "m1".into(),
            attempts: 1,
            timestamp_ms: 0,
            content_type: ContentType::Json,
            body: body.into(),
        }
    }

    /// Runs the notifier on `body`.
    fn run(host: &mut Fake, body: &Value) -> Outcome {
        notify(host, &message(&body.to_string()))
    }

    /// A `pair.accepted` event: B accepted A's pairing request.
    fn pair_accepted() -> Value {
        json!({
            "type": "pair.accepted",
            "initiatorAgentDid": A,
            "responderAgentDid": B,
            "responderProfile": {
                "agentName": "beta",
                "humanName": "Bea",
                "proxyOrigin": "https://proxy.b.example",
            },
            "issuerProxyOrigin": "https://proxy.a.example",
            "eventTimestampUtc": TS,
        })
    }

    /// A `group.member.joined` envelope: C joined the group, told to B.
    fn member_joined() -> Value {
        json!({
            "id": "evt-1",
            "type": "group.member.joined",
            "version": "v1",
            "timestampUtc": TS,
            "initiatedByAccountId": null,
            "data": {
                "recipientAgentDid": B,
                "joinedAgentDid": C,
                "joinedAgentName": "gamma",
                "groupId": GROUP,
                "groupName": "Research",
                "role": "member",
                "joinedAt": TS,
            },
        })
    }

    /// The `requestId` of [`pair_accepted`]'s notification.
    fn pair_request_id() -> String {
        format!("pair.accepted:{A}:{B}:{TS}")
    }

    #[test]
    fn pair_accepted_notifies_the_initiator() {
        let mut host = Fake::default();
        assert!(matches!(run(&mut host, &pair_accepted()), Outcome::Ack));
        assert_eq!(
            host.frames,
            [(
                A.to_string(),
                json!({
                    "type": "notification",
                    "requestId": pair_request_id(),
                    "message": "Pairing complete: beta (Bea) accepted your pairing request.",
                })
            )]
        );
        assert!(host.sent(A, &pair_request_id()));
        assert_eq!(host.levels(), [Level::Info]);
    }

    #[test]
    fn member_joined_notifies_the_recipient() {
        let mut host = Fake::default();
        assert!(matches!(run(&mut host, &member_joined()), Outcome::Ack));
        let request_id = format!("group.member.joined:{GROUP}:{C}:{B}:{TS}");
        assert_eq!(
            host.frames,
            [(
                B.to_string(),
                json!({
                    "type": "notification",
                    "requestId": request_id,
                    "message": "gamma joined Research.",
                })
            )]
        );
        assert!(host.sent(B, &request_id));
    }

    #[test]
    fn a_given_message_replaces_the_default_unless_blank() {
        let mut pair = pair_accepted();
        pair["message"] = "Welcome aboard!".into();
        let mut joined = member_joined();
        joined["data"]["message"] = "Say hi to gamma".into();
        let mut host = Fake::default();
        run(&mut host, &pair);
        run(&mut host, &joined);
        assert_eq!(host.frames[0].1["message"], "Welcome aboard!");
        assert_eq!(host.frames[1].1["message"], "Say hi to gamma");

        pair["message"] = "   ".into();
        joined["data"]["message"] = "".into();
        let mut host = Fake::default();
        run(&mut host, &pair);
        run(&mut host, &joined);
        assert_eq!(
            host.frames[0].1["message"],
            "Pairing complete: beta (Bea) accepted your pairing request."
        );
        assert_eq!(host.frames[1].1["message"], "gamma joined Research.");
    }

    #[test]
    fn an_event_delivered_again_is_pushed_once() {
        let mut host = Fake::default();
        for _ in 0..3 {
            assert!(matches!(run(&mut host, &pair_accepted()), Outcome::Ack));
            assert!(matches!(run(&mut host, &member_joined()), Outcome::Ack));
        }
        assert_eq!(host.frames.len(), 2);
    }

    #[test]
    fn an_offline_agent_is_retried_in_a_minute_and_nothing_is_recorded() {
        let mut host = Fake {
            connections: 0,
            ..Fake::default()
        };
        assert!(matches!(
            run(&mut host, &pair_accepted()),
            Outcome::Retry(Some(OFFLINE_RETRY_SECONDS))
        ));
        assert!(!host.sent(A, &pair_request_id()));
        assert_eq!(host.levels(), [Level::Info]);

        host.connections = 1;
        assert!(matches!(run(&mut host, &pair_accepted()), Outcome::Ack));
        assert!(host.sent(A, &pair_request_id()));
        assert_eq!(
            host.frames.len(),
            2,
            "pushed again once the agent is online"
        );
    }

    #[test]
    fn other_event_types_are_acked_quietly() {
        let mut revoked = member_joined();
        revoked["type"] = "agent.auth.revoked".into();
        for body in [revoked, json!({"type": "something.new"})] {
            let mut host = Fake::default();
            assert!(matches!(run(&mut host, &body), Outcome::Ack));
            assert!(host.logs.is_empty() && host.frames.is_empty());
        }
    }

    #[test]
    fn malformed_events_are_acked_with_a_warning() {
        let mut bodies: Vec<String> = ["nope", "[]", "7", "{}", r#"{"type":"  "}"#]
            .map(String::from)
            .into();
        let mut broken = |base: fn() -> Value, edit: fn(&mut Value)| {
            let mut body = base();
            edit(&mut body);
            bodies.push(body.to_string());
        };
        broken(pair_accepted, |b| b["initiatorAgentDid"] = "".into());
        broken(pair_accepted, |b| b["responderAgentDid"] = Value::Null);
        broken(pair_accepted, |b| b["eventTimestampUtc"] = 5.into());
        broken(pair_accepted, |b| b["responderProfile"] = "beta".into());
        broken(pair_accepted, |b| {
            b["responderProfile"]
                .as_object_mut()
                .unwrap()
                .remove("humanName");
        });
        broken(member_joined, |b| b["data"] = Value::Null);
        broken(member_joined, |b| {
            b["data"]["recipientAgentDid"] = " ".into()
        });
        broken(member_joined, |b| {
            b["data"].as_object_mut().unwrap().remove("groupId");
        });
        broken(member_joined, |b| b["data"]["joinedAt"] = json!([]));

        for body in bodies {
            let mut host = Fake::default();
            assert!(
                matches!(notify(&mut host, &message(&body)), Outcome::Ack),
                "{body}"
            );
            assert_eq!(host.levels(), [Level::Warn], "{body}");
            assert!(host.frames.is_empty() && host.storage.is_empty(), "{body}");
        }
    }

    #[test]
    fn transient_errors_retry_with_a_warning() {
        let storage = Fake {
            storage_error: Some(error(true)),
            ..Fake::default()
        };
        let push = Fake {
            send_error: Some(error(true)),
            ..Fake::default()
        };
        for mut host in [storage, push] {
            assert!(matches!(
                run(&mut host, &member_joined()),
                Outcome::Retry(None)
            ));
            assert_eq!(host.levels(), [Level::Warn]);
            assert!(host.storage.is_empty());
        }
    }

    #[test]
    fn permanent_errors_ack_with_an_error() {
        let storage = Fake {
            storage_error: Some(error(false)),
            ..Fake::default()
        };
        let push = Fake {
            send_error: Some(error(false)),
            ..Fake::default()
        };
        for mut host in [storage, push] {
            assert!(matches!(run(&mut host, &member_joined()), Outcome::Ack));
            assert_eq!(host.levels(), [Level::Error]);
            assert!(host.storage.is_empty());
        }
    }
}
