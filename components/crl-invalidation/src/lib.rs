//! The bundled CRL-invalidation handler of the `clawdentity-events` queue.
//!
//! It marks an agent revoked in the trust store as soon as the registry publishes its
//! `agent.auth.revoked` event with reason `agent_revoked` (spec section 2), so that the
//! agent is refused at once instead of at the next CRL refresh. Bodies are read in every
//! encoding the protocol accepts (spec section 5). Every other known event is acked; a
//! body that cannot be handled is acked `unhandled` with the reason (the host logs and
//! counts it); only a transient trust-store failure asks for a retry.

mod decide;

wit_bindgen::generate!({
    world: "crl-invalidation",
    path: "../../wit",
});

use clawdentity::queues::log::{self, Level};
use clawdentity::queues::trust_store;
use clawdentity::queues::types::{HostError, Message, Outcome};
use decide::{Decision, decide};

struct CrlInvalidation;

impl exports::clawdentity::queues::handler::Guest for CrlInvalidation {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        let host = Imports {
            revoke: trust_store::revoke_agent,
            log: log::write,
        };
        Ok(messages.iter().map(|m| host.handle_one(m)).collect())
    }
}

/// The capability calls the handler makes, as plain functions so that tests can run the
/// handler natively against fakes.
struct Imports<R, L> {
    revoke: R,
    log: L,
}

impl<R: Fn(&str) -> Result<(), HostError>, L: Fn(Level, &str)> Imports<R, L> {
    /// Decides and carries out one message, logging whatever is not plain success.
    fn handle_one(&self, message: &Message) -> Outcome {
        match decide(content_type(message.content_type), &message.body) {
            Decision::Ignore => Outcome::Ack,
            Decision::Unhandled(problem) => unhandled(problem),
            Decision::Revoke(did) => match (self.revoke)(&did) {
                Ok(()) => {
                    let text = format!("agent {did} revoked (event {})", message.id);
                    (self.log)(Level::Info, &text);
                    Outcome::Ack
                }
                Err(err) if err.transient => {
                    let text = format!("revoking {did} failed, will retry: {}", err.message);
                    (self.log)(Level::Warn, &text);
                    Outcome::Retry(None)
                }
                Err(err) => {
                    let detail = format!("trust store refused {did}: {}", err.message);
                    (self.log)(Level::Error, &format!("message {}: {detail}", message.id));
                    refused(detail)
                }
            },
        }
    }
}

clawq_protocol::wit_glue!();

export!(CrlInvalidation);

#[cfg(test)]
mod tests {
    use super::*;
    use clawdentity::queues::types::{ContentType, UnhandledReason};
    use std::cell::RefCell;

    const DID: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";

    fn message(body: String) -> Message {
        Message {
            id: "m1".into(),
            attempts: 1,
            timestamp_ms: 0,
            content_type: ContentType::Json,
            body: body.into_bytes(),
        }
    }

    fn revocation() -> Message {
        message(format!(
            r#"{{"id":"e1","type":"agent.auth.revoked","version":"v1","timestampUtc":"2026-11-24T10:00:00.000Z","initiatedByAccountId":null,"data":{{"reason":"agent_revoked","metadata":{{"agentDid":"{DID}"}}}}}}"#
        ))
    }

    /// Runs the handler on `message` against a trust store answering `answer`; returns
    /// the outcome, the log levels and how many revocations reached the store.
    fn run(message: &Message, answer: Result<(), HostError>) -> (Outcome, Vec<Level>, usize) {
        let logged = RefCell::new(Vec::new());
        let calls = RefCell::new(0);
        let host = Imports {
            revoke: |did: &str| {
                assert_eq!(did, DID);
                *calls.borrow_mut() += 1;
                answer.clone()
            },
            log: |level, _: &str| logged.borrow_mut().push(level),
        };
        let outcome = host.handle_one(message);
        (outcome, logged.into_inner(), calls.into_inner())
    }

    #[test]
    fn a_recorded_revocation_is_acked() {
        assert!(
            matches!(run(&revocation(), Ok(())), (Outcome::Ack, levels, 1) if levels == [Level::Info])
        );
    }

    #[test]
    fn a_revocation_sent_as_a_json_string_or_text_is_recorded_too() {
        let text = String::from_utf8(revocation().body).unwrap();
        let as_string = message(serde_json::Value::String(text.clone()).to_string());
        let as_text = Message {
            content_type: ContentType::Text,
            ..message(text)
        };
        for m in [as_string, as_text] {
            assert!(matches!(run(&m, Ok(())), (Outcome::Ack, _, 1)));
        }
    }

    #[test]
    fn a_transient_trust_store_error_is_retried() {
        let err = HostError {
            transient: true,
            message: "busy".into(),
        };
        assert!(
            matches!(run(&revocation(), Err(err)), (Outcome::Retry(None), levels, 1) if levels == [Level::Warn])
        );
    }

    #[test]
    fn a_permanent_refusal_is_unhandled_refused_with_an_error_log() {
        let err = HostError {
            transient: false,
            message: "refused".into(),
        };
        let (outcome, levels, _) = run(&revocation(), Err(err));
        assert_eq!(levels, [Level::Error]);
        match outcome {
            Outcome::Unhandled(u) => {
                assert_eq!(u.reason, UnhandledReason::Refused);
                assert_eq!(u.detail, format!("trust store refused {DID}: refused"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_cannot_be_handled_is_unhandled_with_its_reason_and_never_revoked() {
        let cases = [
            ("nope", UnhandledReason::Malformed),
            (
                r#"{"type":"agent.auth.exploded"}"#,
                UnhandledReason::UnknownType,
            ),
            (
                r#"{"type":"agent.auth.revoked","data":{"reason":"agent_revoked"}}"#,
                UnhandledReason::InvalidField,
            ),
        ];
        for (body, want) in cases {
            let (outcome, levels, calls) = run(&message(body.into()), Ok(()));
            assert!(levels.is_empty() && calls == 0, "{body}");
            assert!(
                matches!(outcome, Outcome::Unhandled(u) if u.reason == want),
                "{body}"
            );
        }
    }
}
