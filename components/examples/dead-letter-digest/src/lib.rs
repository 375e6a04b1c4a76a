//! An example third-party handler of the `clawdentity-receipts` queue: a dead-letter
//! digest.
//!
//! It counts, per sender, the delivery receipts whose status is `dead_lettered` (spec
//! section 3), and every [`THRESHOLD`] of them pushes the sender a `notification` frame
//! saying how many of its messages failed and which one failed last. The count lives in
//! the handler's actor storage, in the actor of the sender's DID:
//!
//! - `count`: how many distinct dead-lettered receipts were counted (decimal text);
//! - `seen/<requestId>`: the count a receipt was given, so that a receipt delivered
//!   again (delivery is at least once) is not counted twice.
//!
//! Malformed receipts are acked with a warning (retrying cannot fix them); a transient
//! capability error asks for a retry; a permanent one is acked with an error log.

wit_bindgen::generate!({
    world: "receipt-handler",
    path: "../../../wit",
});

use clawdentity::queues::log::{self, Level};
use clawdentity::queues::types::{HostError, Message, Outcome};
use clawdentity::queues::{actor_storage, websocket};
use serde_json::{Value, json};

/// A digest is pushed each time a sender's count of dead-lettered receipts reaches a
/// multiple of this number.
const THRESHOLD: u32 = 3;

/// The actor-storage key of a sender's count.
const COUNT_KEY: &str = "count";

/// The component: its `handle` runs [`digest`] on each message against the real imports.
struct DeadLetterDigest;

impl exports::clawdentity::queues::handler::Guest for DeadLetterDigest {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        Ok(messages.iter().map(|m| digest(&mut Imports, m)).collect())
    }
}

export!(DeadLetterDigest);

/// The capability calls the digest makes, so that tests can run it natively against
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

/// The fields of a dead-lettered receipt that the digest uses.
#[derive(Debug, PartialEq)]
struct DeadLetter {
    /// The failed message's id.
    request_id: String,
    /// Who sent it: the actor whose count grows, and who gets the digest.
    sender: String,
    /// Who it was for.
    recipient: String,
    /// Why it failed, when the receipt says (non-blank).
    reason: Option<String>,
}

/// Reads a receipt: `Ok(None)` for a valid receipt that is not dead-lettered, `Err` with
/// the reason for a body that is not a delivery receipt.
fn parse(body: &[u8]) -> Result<Option<DeadLetter>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|_| "body is not JSON".to_string())?;
    let Value::Object(fields) = value else {
        return Err("body is not a JSON object".into());
    };
    if fields.get("type").and_then(Value::as_str) != Some("delivery_receipt") {
        return Err("type is not delivery_receipt".into());
    }
    let text = |name: &str| {
        fields
            .get(name)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let required = |name: &str| {
        text(name)
            .map(str::to_string)
            .ok_or_else(|| format!("{name} is missing or blank"))
    };
    let receipt = DeadLetter {
        request_id: required("requestId")?,
        sender: required("senderAgentDid")?,
        recipient: required("recipientAgentDid")?,
        reason: text("reason").map(str::to_string),
    };
    Ok((text("status") == Some("dead_lettered")).then_some(receipt))
}

/// The JSON text of the digest frame for a sender that has reached `count`, `latest`
/// being the receipt that made it so. The host fills in `v`, `id` and `ts`.
fn digest_frame(latest: &DeadLetter, count: u32) -> String {
    let reason = latest.reason.as_deref().unwrap_or("no reason given");
    json!({
        "type": "notification",
        "requestId": format!("dead-letter-digest:{}:{count}", latest.sender),
        "message": format!(
            "{count} of your messages could not be delivered; the latest, {} to {}, failed: {reason}",
            latest.request_id, latest.recipient
        ),
    })
    .to_string()
}

/// A capability call that failed, with what the digest was doing.
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
fn digest(host: &mut impl Host, message: &Message) -> Outcome {
    let receipt = match parse(&message.body) {
        Ok(Some(receipt)) => receipt,
        Ok(None) => return Outcome::Ack,
        Err(why) => {
            let text = format!(
                "message {}: not a delivery receipt: {why}; acked",
                message.id
            );
            host.log(Level::Warn, &text);
            return Outcome::Ack;
        }
    };
    match count(host, &receipt) {
        Ok(()) => Outcome::Ack,
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

/// Counts a dead-lettered receipt once, and pushes the digest when the count reaches a
/// multiple of [`THRESHOLD`].
///
/// Order matters under at-least-once delivery: the frame goes first (a transient failure
/// retries with nothing stored), then `seen/<requestId>`, then `count`. A crash between
/// the two writes is repaired when the receipt comes again; a crash after the push but
/// before the writes pushes the same digest again, with the same `requestId`.
fn count(host: &mut impl Host, receipt: &DeadLetter) -> Result<(), Failure> {
    let actor = receipt.sender.as_str();
    let seen_key = format!("seen/{}", receipt.request_id);
    let stored = read_count(host, actor)?;
    let seen = host
        .get(actor, &seen_key)
        .map_err(doing(format!("reading {seen_key} of {actor}")))?;
    if let Some(seen) = seen {
        let given = decode(&seen);
        if stored < given {
            host.put(actor, COUNT_KEY, given.to_string().as_bytes())
                .map_err(doing(format!("writing the count of {actor}")))?;
        }
        return Ok(());
    }

    let count = stored + 1;
    if count.is_multiple_of(THRESHOLD) {
        let frame = digest_frame(receipt, count);
        match host.send_frame(actor, &frame) {
            Ok(reached) => {
                let text = format!("digest of {count} sent to {reached} connection(s) of {actor}");
                host.log(Level::Info, &text);
            }
            Err(error) if error.transient => {
                return Err(doing(format!("pushing the digest to {actor}"))(error));
            }
            Err(error) => {
                // The count is still kept: the next digest tells the sender.
                let text = format!("digest to {actor} refused: {}", error.message);
                host.log(Level::Error, &text);
            }
        }
    }
    let value = count.to_string();
    host.put(actor, &seen_key, value.as_bytes())
        .map_err(doing(format!("writing {seen_key} of {actor}")))?;
    host.put(actor, COUNT_KEY, value.as_bytes())
        .map_err(doing(format!("writing the count of {actor}")))
}

/// The stored count of `actor` (0 when none).
fn read_count(host: &mut impl Host, actor: &str) -> Result<u32, Failure> {
    let stored = host
        .get(actor, COUNT_KEY)
        .map_err(doing(format!("reading the count of {actor}")))?;
    Ok(stored.as_deref().map_or(0, decode))
}

/// A count stored as decimal text; 0 if unreadable (only this handler writes it).
fn decode(bytes: &[u8]) -> u32 {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawdentity::queues::types::ContentType;
    use std::collections::HashMap;

    const A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const B: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";

    /// In-memory capabilities, with optional failures.
    #[derive(Default)]
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
        /// Fail `put` of keys starting with this prefix (transiently), when set.
        fail_put_of: Option<&'static str>,
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
            if self.fail_put_of.is_some_and(|p| key.starts_with(p)) {
                return Err(error(true));
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
        /// The stored count of `actor`.
        fn count(&self, actor: &str) -> Option<u32> {
            let value = self.storage.get(&(actor.into(), COUNT_KEY.into()))?;
            Some(decode(value))
        }

        /// The levels of the log lines written so far.
        fn levels(&self) -> Vec<Level> {
            self.logs.iter().map(|(level, _)| *level).collect()
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

    /// A dead-lettered receipt from A to B.
    fn receipt(request_id: &str, reason: Option<&str>) -> Value {
        let mut receipt = json!({
            "type": "delivery_receipt",
            "requestId": request_id,
            "senderAgentDid": A,
            "recipientAgentDid": B,
            "status": "dead_lettered",
            "processedAt": "2026-11-24T10:00:00.000Z",
        });
        if let Some(reason) = reason {
            receipt["reason"] = reason.into();
        }
        receipt
    }

    /// Runs the digest on `body`.
    fn run(host: &mut Fake, body: &Value) -> Outcome {
        digest(host, &message(&body.to_string()))
    }

    #[test]
    fn malformed_receipts_are_acked_with_a_warning() {
        let mut bodies: Vec<String> = ["nope", "[]", "\"text\"", r#"{"type":"other"}"#]
            .map(String::from)
            .into();
        for (field, value) in [
            ("type", json!("delivery_receipt_v2")),
            ("requestId", json!("  ")),
            ("requestId", Value::Null),
            ("senderAgentDid", json!("")),
            ("recipientAgentDid", json!(42)),
        ] {
            let mut body = receipt("r1", None);
            body[field] = value;
            bodies.push(body.to_string());
        }
        let mut body = receipt("r1", None);
        body.as_object_mut().unwrap().remove("senderAgentDid");
        bodies.push(body.to_string());

        for body in bodies {
            let mut host = Fake::default();
            let outcome = digest(&mut host, &message(&body));
            assert!(matches!(outcome, Outcome::Ack), "{body}");
            assert_eq!(host.levels(), [Level::Warn], "{body}");
            assert!(host.storage.is_empty() && host.frames.is_empty(), "{body}");
        }
    }

    #[test]
    fn other_statuses_are_acked_without_counting() {
        for status in [json!("delivered_to_webhook"), json!("lost"), Value::Null] {
            let mut host = Fake::default();
            let mut body = receipt("r1", None);
            body["status"] = status;
            assert!(matches!(run(&mut host, &body), Outcome::Ack));
            assert!(host.logs.is_empty() && host.storage.is_empty());
        }
    }

    #[test]
    fn counts_each_receipt_and_pushes_a_digest_at_every_multiple_of_the_threshold() {
        let mut host = Fake {
            connections: 2,
            ..Fake::default()
        };
        for n in 1..=7 {
            let body = receipt(&format!("r{n}"), Some("recipient hook unreachable"));
            assert!(matches!(run(&mut host, &body), Outcome::Ack));
            assert_eq!(host.count(A), Some(n));
        }
        assert_eq!(host.frames.len(), 2);
        let (to, frame) = &host.frames[0];
        assert_eq!(to, A);
        assert_eq!(
            frame,
            &json!({
                "type": "notification",
                "requestId": format!("dead-letter-digest:{A}:3"),
                "message": format!("3 of your messages could not be delivered; the latest, r3 to {B}, failed: recipient hook unreachable"),
            })
        );
        assert_eq!(
            host.frames[1].1["requestId"],
            format!("dead-letter-digest:{A}:6")
        );
        assert_eq!(host.levels(), [Level::Info, Level::Info]);
        assert!(host.count(B).is_none(), "only the sender is counted");
    }

    #[test]
    fn a_digest_without_a_reason_says_so() {
        let mut host = Fake::default();
        for n in 1..=THRESHOLD {
            run(&mut host, &receipt(&format!("r{n}"), None));
        }
        let message = host.frames[0].1["message"].as_str().unwrap();
        assert!(message.ends_with("failed: no reason given"), "{message}");
    }

    #[test]
    fn a_receipt_delivered_again_is_counted_once() {
        let mut host = Fake::default();
        for _ in 0..5 {
            assert!(matches!(run(&mut host, &receipt("r1", None)), Outcome::Ack));
        }
        run(&mut host, &receipt("r2", None));
        run(&mut host, &receipt("r2", None));
        assert_eq!(host.count(A), Some(2));
        assert!(host.frames.is_empty());
        run(&mut host, &receipt("r3", None));
        run(&mut host, &receipt("r3", None));
        assert_eq!(host.count(A), Some(3));
        assert_eq!(host.frames.len(), 1, "the digest is pushed once");
    }

    #[test]
    fn a_crash_between_the_two_writes_is_repaired_without_counting_twice() {
        let mut host = Fake {
            fail_put_of: Some(COUNT_KEY),
            ..Fake::default()
        };
        assert!(matches!(
            run(&mut host, &receipt("r1", None)),
            Outcome::Retry(None)
        ));
        assert_eq!(host.count(A), None);
        host.fail_put_of = None;
        assert!(matches!(run(&mut host, &receipt("r1", None)), Outcome::Ack));
        assert_eq!(host.count(A), Some(1));
    }

    #[test]
    fn no_connection_open_still_acks_and_keeps_the_count() {
        let mut host = Fake::default();
        for n in 1..=THRESHOLD {
            assert!(matches!(
                run(&mut host, &receipt(&format!("r{n}"), None)),
                Outcome::Ack
            ));
        }
        assert_eq!(host.frames.len(), 1);
        assert_eq!(host.count(A), Some(THRESHOLD));
    }

    #[test]
    fn transient_storage_errors_retry_with_a_warning() {
        let mut host = Fake {
            storage_error: Some(error(true)),
            ..Fake::default()
        };
        assert!(matches!(
            run(&mut host, &receipt("r1", None)),
            Outcome::Retry(None)
        ));
        assert_eq!(host.levels(), [Level::Warn]);
    }

    #[test]
    fn permanent_storage_errors_ack_with_an_error() {
        let mut host = Fake {
            storage_error: Some(error(false)),
            ..Fake::default()
        };
        assert!(matches!(run(&mut host, &receipt("r1", None)), Outcome::Ack));
        assert_eq!(host.levels(), [Level::Error]);
    }

    #[test]
    fn a_transient_push_error_retries_and_stores_nothing() {
        let mut host = Fake::default();
        run(&mut host, &receipt("r1", None));
        run(&mut host, &receipt("r2", None));
        host.send_error = Some(error(true));
        assert!(matches!(
            run(&mut host, &receipt("r3", None)),
            Outcome::Retry(None)
        ));
        assert_eq!(host.levels(), [Level::Warn]);
        assert_eq!(host.count(A), Some(2));

        host.send_error = None;
        assert!(matches!(run(&mut host, &receipt("r3", None)), Outcome::Ack));
        assert_eq!(host.count(A), Some(3));
        assert_eq!(host.frames.len(), 1);
    }

    #[test]
    fn a_permanent_push_error_acks_with_an_error_and_keeps_the_count() {
        let mut host = Fake {
            send_error: Some(error(false)),
            ..Fake::default()
        };
        for n in 1..=THRESHOLD {
            assert!(matches!(
                run(&mut host, &receipt(&format!("r{n}"), None)),
                Outcome::Ack
            ));
        }
        assert_eq!(host.levels(), [Level::Error]);
        assert_eq!(host.count(A), Some(THRESHOLD));
    }
}
