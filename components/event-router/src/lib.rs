//! The bundled event router of the `clawdentity-events` queue (spec section 5).
//!
//! It turns each `pair.accepted` and `group.member.joined` event, in every body encoding
//! the protocol accepts, into a delivery to the relay session of the agent it concerns
//! (`relay-sessions.deliver`), which keeps it and pushes it as a `deliver` frame to the
//! agent's connector until acked. Outcomes: recorded (pushed, stored or unchanged) → ack;
//! a transient session error → retry; a permanent one → `unhandled(refused)` and an error
//! log; another known event type → ack; an unknown type, a malformed body or an invalid
//! field → `unhandled` with that reason (the host logs and counts it).

wit_bindgen::generate!({
    world: "event-router",
    path: "../../wit",
});

use clawdentity::queues::log::{self, Level};
use clawdentity::queues::relay_sessions::{self, AgentDelivery, Delivery};
use clawdentity::queues::types::{HostError, Message, Outcome};
use clawq_protocol::body::read_object;
use clawq_protocol::event::agent_delivery;
use clawq_protocol::problem::Problem;

struct EventRouter;

impl exports::clawdentity::queues::handler::Guest for EventRouter {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        let host = Imports {
            deliver: relay_sessions::deliver,
            log: log::write,
        };
        Ok(messages.iter().map(|m| host.route(m)).collect())
    }
}

/// The capability calls the router makes, as plain functions so that tests can run it
/// natively against fakes.
struct Imports<D, L> {
    deliver: D,
    log: L,
}

impl<D: Fn(&AgentDelivery) -> Result<Delivery, HostError>, L: Fn(Level, &str)> Imports<D, L> {
    /// Routes one event and decides its outcome.
    fn route(&self, message: &Message) -> Outcome {
        let delivery = match delivery_of(message) {
            Ok(Some(delivery)) => delivery,
            Ok(None) => return Outcome::Ack,
            Err(problem) => return unhandled(problem),
        };
        let (id, key, to) = (&message.id, &delivery.dedup_key, &delivery.to_agent_did);
        match (self.deliver)(&delivery) {
            Ok(Delivery::Ignored) => {
                let detail = format!("the session of {to} ignored delivery {key}");
                (self.log)(Level::Error, &format!("message {id}: {detail}"));
                refused(detail)
            }
            Ok(recorded) => {
                let how = match recorded {
                    Delivery::Pushed(n) => format!("pushed to {n} connection(s)"),
                    Delivery::Stored => "stored until the agent connects".to_owned(),
                    _ => "already held".to_owned(),
                };
                (self.log)(
                    Level::Info,
                    &format!("message {id}: delivery {key} to {to}: {how}"),
                );
                Outcome::Ack
            }
            Err(err) if err.transient => {
                let text = format!(
                    "message {id}: session of {to} unavailable for delivery {key}, will retry: {}",
                    err.message
                );
                (self.log)(Level::Warn, &text);
                Outcome::Retry(None)
            }
            Err(err) => {
                let detail = format!(
                    "the session of {to} refused delivery {key}: {}",
                    err.message
                );
                (self.log)(Level::Error, &format!("message {id}: {detail}"));
                refused(detail)
            }
        }
    }
}

/// The delivery a message asks for, in the WIT's terms (`None`: an event type that is
/// not delivered).
fn delivery_of(message: &Message) -> Result<Option<AgentDelivery>, Problem> {
    let event = read_object(content_type(message.content_type), &message.body)
        .map_err(|e| Problem::malformed(e.to_string()))?;
    Ok(agent_delivery(&event)?.map(|d| AgentDelivery {
        dedup_key: d.dedup_key,
        from_agent_did: d.from_agent_did,
        to_agent_did: d.to_agent_did,
        payload: d.payload.to_string(),
        delivery_source: Some(d.delivery_source.to_owned()),
        content_type: None,
        group_id: d.group_id,
        conversation_id: None,
        reply_to: None,
    }))
}

clawq_protocol::wit_glue!();

export!(EventRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use clawdentity::queues::types::{ContentType, UnhandledReason};
    use serde_json::{Value, json};
    use std::cell::RefCell;

    use clawq_protocol::samples::{
        A, B, GROUP, TS, member_joined as joined, pair_accepted as pair,
    };

    fn message(content_type: ContentType, body: String) -> Message {
        Message {
            id: "m1".into(),
            attempts: 1,
            timestamp_ms: 0,
            content_type,
            body: body.into_bytes(),
        }
    }

    fn json_message(event: &Value) -> Message {
        message(ContentType::Json, event.to_string())
    }

    /// Routes `message` against a session answering `answer`; returns the outcome, the
    /// log lines and the deliveries that reached the session.
    fn run(
        message: &Message,
        answer: Result<Delivery, HostError>,
    ) -> (Outcome, Vec<(Level, String)>, Vec<AgentDelivery>) {
        let logged = RefCell::new(Vec::new());
        let calls = RefCell::new(Vec::new());
        let host = Imports {
            deliver: |d: &AgentDelivery| {
                calls.borrow_mut().push(d.clone());
                answer.clone()
            },
            log: |level, text: &str| logged.borrow_mut().push((level, text.to_owned())),
        };
        let outcome = host.route(message);
        (outcome, logged.into_inner(), calls.into_inner())
    }

    fn reason_of(outcome: &Outcome) -> Option<UnhandledReason> {
        match outcome {
            Outcome::Unhandled(u) => Some(u.reason),
            _ => None,
        }
    }

    #[test]
    fn a_pairing_is_delivered_to_its_initiator_in_every_encoding() {
        let text = pair().to_string();
        for m in [
            message(ContentType::Json, text.clone()),
            message(ContentType::Json, Value::String(text.clone()).to_string()),
            message(ContentType::Text, text.clone()),
        ] {
            let (outcome, logs, calls) = run(&m, Ok(Delivery::Stored));
            assert!(matches!(outcome, Outcome::Ack));
            assert_eq!(logs.len(), 1);
            assert_eq!(logs[0].0, Level::Info);
            assert_eq!(calls.len(), 1);
            let d = &calls[0];
            assert_eq!(d.dedup_key, format!("pair.accepted:{A}:{B}:{TS}"));
            assert_eq!((d.from_agent_did.as_str(), d.to_agent_did.as_str()), (B, A));
            assert_eq!(
                d.delivery_source.as_deref(),
                Some("proxy.events.queue.pair_accepted")
            );
            assert_eq!(
                (
                    &d.content_type,
                    &d.group_id,
                    &d.conversation_id,
                    &d.reply_to
                ),
                (&None, &None, &None, &None)
            );
            let payload: Value = serde_json::from_str(&d.payload).unwrap();
            assert_eq!(payload["system"]["type"], "pair.accepted");
            assert_eq!(payload["system"]["responderProfile"]["agentName"], "beta");
        }
    }

    #[test]
    fn a_group_join_is_delivered_to_its_recipient_with_the_group() {
        let (outcome, _, calls) = run(&json_message(&joined()), Ok(Delivery::Pushed(2)));
        assert!(matches!(outcome, Outcome::Ack));
        let d = &calls[0];
        assert_eq!(
            d.dedup_key,
            format!("group.member.joined:{GROUP}:{A}:{B}:{TS}")
        );
        assert_eq!((d.from_agent_did.as_str(), d.to_agent_did.as_str()), (A, B));
        assert_eq!(
            d.delivery_source.as_deref(),
            Some("proxy.events.queue.group_member_joined")
        );
        assert_eq!(d.group_id.as_deref(), Some(GROUP));
        let payload: Value = serde_json::from_str(&d.payload).unwrap();
        assert_eq!(payload["message"], "alpha joined builders.");
        assert_eq!(payload["type"], "clawdentity:group-member-joined");
    }

    #[test]
    fn recorded_deliveries_are_acked() {
        for answer in [Delivery::Pushed(1), Delivery::Stored, Delivery::Unchanged] {
            let (outcome, logs, calls) = run(&json_message(&pair()), Ok(answer));
            assert!(matches!(outcome, Outcome::Ack));
            assert_eq!((logs.len(), calls.len()), (1, 1));
        }
    }

    #[test]
    fn a_transient_error_retries_and_a_permanent_one_is_refused_with_an_error_log() {
        let busy = HostError {
            transient: true,
            message: "busy".into(),
        };
        let (outcome, logs, _) = run(&json_message(&pair()), Err(busy));
        assert!(matches!(outcome, Outcome::Retry(None)));
        assert_eq!(logs[0].0, Level::Warn);
        let refusal = HostError {
            transient: false,
            message: "payload too large".into(),
        };
        for answer in [Err(refusal), Ok(Delivery::Ignored)] {
            let (outcome, logs, _) = run(&json_message(&pair()), answer);
            assert_eq!(reason_of(&outcome), Some(UnhandledReason::Refused));
            assert_eq!(logs.len(), 1);
            assert_eq!(logs[0].0, Level::Error);
            assert!(
                logs[0].1.contains(&format!("pair.accepted:{A}:{B}:{TS}")),
                "{logs:?}"
            );
        }
    }

    #[test]
    fn other_known_types_are_acked_without_a_delivery() {
        for kind in [
            "agent.auth.issued",
            "agent.auth.revoked",
            "agent.auth.refresh_rejected",
        ] {
            let (outcome, logs, calls) =
                run(&json_message(&json!({"type": kind})), Ok(Delivery::Stored));
            assert!(matches!(outcome, Outcome::Ack), "{kind}");
            assert!(logs.is_empty() && calls.is_empty(), "{kind}");
        }
    }

    #[test]
    fn what_cannot_be_handled_is_unhandled_with_its_reason_and_never_delivered() {
        let mut bad_group = joined();
        bad_group["data"]["groupId"] = "group-1".into();
        let cases = [
            (
                message(ContentType::Json, "nope".into()),
                UnhandledReason::Malformed,
            ),
            (
                message(ContentType::Bytes, pair().to_string()),
                UnhandledReason::Malformed,
            ),
            (json_message(&json!("[]")), UnhandledReason::Malformed),
            (
                json_message(&json!({"type": "pair.rejected"})),
                UnhandledReason::UnknownType,
            ),
            (
                json_message(&json!({"type": 7})),
                UnhandledReason::InvalidField,
            ),
            (json_message(&bad_group), UnhandledReason::InvalidField),
        ];
        for (m, want) in cases {
            let (outcome, logs, calls) = run(&m, Ok(Delivery::Stored));
            let body = String::from_utf8_lossy(&m.body).into_owned();
            assert_eq!(reason_of(&outcome), Some(want), "{body}");
            assert!(logs.is_empty() && calls.is_empty(), "{body}");
        }
        let (outcome, _, _) = run(&json_message(&bad_group), Ok(Delivery::Stored));
        assert!(
            matches!(&outcome, Outcome::Unhandled(u)
                if u.detail == "data.groupId `group-1` is not grp_ followed by a ULID"),
            "{outcome:?}"
        );
    }
}
