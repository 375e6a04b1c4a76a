//! An example third-party handler of the `clawdentity-receipts` queue: a dead-letter
//! digest.
//!
//! It counts, per sender, the delivery receipts whose status is `dead_lettered` (spec
//! section 3), and every [`THRESHOLD`] of them hands the sender's relay session a
//! delivery (`relay-sessions.deliver`, a system message from the agent to itself) saying
//! how many of its messages failed and which one failed last; the session keeps it until
//! the agent's connector acknowledges the `deliver` frame. The count lives in the
//! handler's actor storage, in the actor of the sender's DID:
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

use clawdentity::queues::actor_storage;
use clawdentity::queues::log::{self, Level};
use clawdentity::queues::relay_sessions::{self, AgentDelivery, Delivery};
use clawdentity::queues::types::{HostError, Message, Outcome};
use serde_json::{Value, json};

/// A digest is delivered each time a sender's count of dead-lettered receipts reaches a
/// multiple of this number.
const THRESHOLD: u32 = 3;

/// The `deliverySource` of a digest.
const DELIVERY_SOURCE: &str = "clawq.examples.dead-letter-digest";

/// The `type` of a digest's system payload.
const DIGEST_TYPE: &str = "clawq.dead-letter-digest";

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
    /// Hands `delivery` to its agent's relay session (`relay-sessions.deliver`).
    fn deliver(&mut self, delivery: &AgentDelivery) -> Result<Delivery, HostError>;
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

    fn deliver(&mut self, delivery: &AgentDelivery) -> Result<Delivery, HostError> {
        relay_sessions::deliver(delivery)
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
    /// Who sent it: the actor whose count grows, and the agent the digest is for.
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

/// The digest for a sender that has reached `count`, `latest` being the receipt that
/// made it so: a system message from the sender to itself, whose dedup key is the same
/// each time the same count is reached (so a digest handed over again is `unchanged`).
fn digest_delivery(latest: &DeadLetter, count: u32) -> AgentDelivery {
    let reason = latest.reason.as_deref().unwrap_or("no reason given");
    let message = format!(
        "{count} of your messages could not be delivered; the latest, {} to {}, failed: {reason}",
        latest.request_id, latest.recipient
    );
    AgentDelivery {
        dedup_key: format!("dead-letter-digest:{}:{count}", latest.sender),
        from_agent_did: latest.sender.clone(),
        to_agent_did: latest.sender.clone(),
        payload: json!({"system": {"type": DIGEST_TYPE, "message": message, "count": count}})
            .to_string(),
        delivery_source: Some(DELIVERY_SOURCE.into()),
        content_type: None,
        group_id: None,
        conversation_id: None,
        reply_to: None,
    }
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

/// Counts a dead-lettered receipt once, and delivers the digest when the count reaches a
/// multiple of [`THRESHOLD`].
///
/// Order matters under at-least-once delivery: the digest goes first (a transient failure
/// retries with nothing stored), then `seen/<requestId>`, then `count`. A crash between
/// the two writes is repaired when the receipt comes again; a crash after the delivery
/// but before the writes hands the same digest over again, with the same dedup key, which
/// the session answers `unchanged`.
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
        match host.deliver(&digest_delivery(receipt, count)) {
            Ok(delivery) => {
                let what = match delivery {
                    Delivery::Pushed(n) => format!("pushed to {n} connector(s)"),
                    Delivery::Stored => "kept by the session until a connector takes it".into(),
                    Delivery::Unchanged => "already handed over".into(),
                    Delivery::Ignored => "ignored by the session".into(),
                };
                host.log(
                    Level::Info,
                    &format!("digest of {count} for {actor}: {what}"),
                );
            }
            Err(error) if error.transient => {
                return Err(doing(format!("delivering the digest to {actor}"))(error));
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
        /// Deliveries the sessions took (a repeated dedup key is not taken again).
        deliveries: Vec<AgentDelivery>,
        /// Log lines written.
        logs: Vec<(Level, String)>,
        /// Connectors each delivery is pushed to (0: the session keeps it).
        connections: u32,
        /// The error of every storage call, when set.
        storage_error: Option<HostError>,
        /// The error of every delivery, when set.
        deliver_error: Option<HostError>,
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

        fn deliver(&mut self, delivery: &AgentDelivery) -> Result<Delivery, HostError> {
            if let Some(e) = &self.deliver_error {
                return Err(e.clone());
            }
            if self.deliveries.iter().any(|d| {
                (&d.dedup_key, &d.to_agent_did) == (&delivery.dedup_key, &delivery.to_agent_did)
            }) {
                return Ok(Delivery::Unchanged);
            }
            self.deliveries.push(delivery.clone());
            Ok(match self.connections {
                0 => Delivery::Stored,
                n => Delivery::Pushed(n),
            })
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

        /// The payload of delivery `n`, parsed.
        fn payload(&self, n: usize) -> Value {
            serde_json::from_str(&self.deliveries[n].payload).expect("payloads are JSON")
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
            assert!(
                host.storage.is_empty() && host.deliveries.is_empty(),
                "{body}"
            );
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
    fn counts_each_receipt_and_delivers_a_digest_at_every_multiple_of_the_threshold() {
        let mut host = Fake {
            connections: 2,
            ..Fake::default()
        };
        for n in 1..=7 {
            let body = receipt(&format!("r{n}"), Some("recipient hook unreachable"));
            assert!(matches!(run(&mut host, &body), Outcome::Ack));
            assert_eq!(host.count(A), Some(n));
        }
        assert_eq!(host.deliveries.len(), 2);
        let AgentDelivery {
            dedup_key,
            from_agent_did,
            to_agent_did,
            payload: _,
            delivery_source,
            content_type,
            group_id,
            conversation_id,
            reply_to,
        } = host.deliveries[0].clone();
        assert_eq!(dedup_key, format!("dead-letter-digest:{A}:3"));
        assert_eq!(
            (from_agent_did.as_str(), to_agent_did.as_str()),
            (A, A),
            "a system message to itself"
        );
        assert_eq!(
            delivery_source.as_deref(),
            Some("clawq.examples.dead-letter-digest")
        );
        assert!(
            content_type.is_none()
                && group_id.is_none()
                && conversation_id.is_none()
                && reply_to.is_none()
        );
        assert_eq!(
            host.payload(0),
            json!({"system": {
                "type": "clawq.dead-letter-digest",
                "message": format!("3 of your messages could not be delivered; the latest, r3 to {B}, failed: recipient hook unreachable"),
                "count": 3,
            }})
        );
        assert_eq!(
            host.deliveries[1].dedup_key,
            format!("dead-letter-digest:{A}:6")
        );
        assert_eq!(host.payload(1)["system"]["count"], 6);
        assert_eq!(host.levels(), [Level::Info, Level::Info]);
        assert!(
            host.logs[0].1.ends_with("pushed to 2 connector(s)"),
            "{:?}",
            host.logs
        );
        assert!(host.count(B).is_none(), "only the sender is counted");
    }

    #[test]
    fn a_digest_without_a_reason_says_so() {
        let mut host = Fake::default();
        for n in 1..=THRESHOLD {
            run(&mut host, &receipt(&format!("r{n}"), None));
        }
        let payload = host.payload(0);
        let message = payload["system"]["message"].as_str().unwrap();
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
        assert!(host.deliveries.is_empty());
        run(&mut host, &receipt("r3", None));
        run(&mut host, &receipt("r3", None));
        assert_eq!(host.count(A), Some(3));
        assert_eq!(host.deliveries.len(), 1, "the digest is delivered once");
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
    fn a_digest_kept_for_a_connector_that_is_not_connected_counts_as_delivered() {
        let mut host = Fake::default();
        for n in 1..=THRESHOLD {
            assert!(matches!(
                run(&mut host, &receipt(&format!("r{n}"), None)),
                Outcome::Ack
            ));
        }
        assert_eq!(host.deliveries.len(), 1);
        assert!(
            host.logs[0]
                .1
                .ends_with("kept by the session until a connector takes it"),
            "{:?}",
            host.logs
        );
        assert_eq!(host.count(A), Some(THRESHOLD));
    }

    #[test]
    fn a_crash_after_the_digest_hands_over_the_same_digest_again() {
        let mut host = Fake::default();
        run(&mut host, &receipt("r1", None));
        run(&mut host, &receipt("r2", None));
        // The digest is handed over, then the writes fail: the receipt comes again.
        host.fail_put_of = Some("seen/");
        assert!(matches!(
            run(&mut host, &receipt("r3", None)),
            Outcome::Retry(None)
        ));
        host.fail_put_of = None;
        assert!(matches!(run(&mut host, &receipt("r3", None)), Outcome::Ack));
        assert_eq!(host.count(A), Some(3));
        assert_eq!(host.deliveries.len(), 1, "the session kept one digest");
        assert!(
            host.logs.last().unwrap().1.ends_with("already handed over"),
            "{:?}",
            host.logs
        );
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
    fn a_transient_delivery_error_retries_and_stores_nothing() {
        let mut host = Fake::default();
        run(&mut host, &receipt("r1", None));
        run(&mut host, &receipt("r2", None));
        host.deliver_error = Some(error(true));
        assert!(matches!(
            run(&mut host, &receipt("r3", None)),
            Outcome::Retry(None)
        ));
        assert_eq!(host.levels(), [Level::Warn]);
        assert_eq!(host.count(A), Some(2));

        host.deliver_error = None;
        assert!(matches!(run(&mut host, &receipt("r3", None)), Outcome::Ack));
        assert_eq!(host.count(A), Some(3));
        assert_eq!(host.deliveries.len(), 1);
    }

    #[test]
    fn a_permanent_delivery_error_acks_with_an_error_and_keeps_the_count() {
        let mut host = Fake {
            deliver_error: Some(error(false)),
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
