//! The bundled CRL-invalidation handler of the `clawdentity-events` queue.
//!
//! It marks an agent revoked in the trust store as soon as the registry publishes its
//! `agent.auth.revoked` event with reason `agent_revoked` (spec section 2), so that the
//! agent is refused at once instead of at the next CRL refresh. Every other event is
//! acknowledged: only a transient trust-store failure asks for a retry.

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
        match decide(&message.body) {
            Decision::Ignore => Outcome::Ack,
            Decision::Skip(why) => {
                (self.log)(
                    Level::Warn,
                    &format!("message {}: {why}; acked", message.id),
                );
                Outcome::Ack
            }
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
                    let text = format!("trust store refused {did}: {}; acked", err.message);
                    (self.log)(Level::Error, &text);
                    Outcome::Ack
                }
            },
        }
    }
}

export!(CrlInvalidation);

#[cfg(test)]
mod tests {
    use super::*;
    use clawdentity::queues::types::ContentType;
    use std::cell::RefCell;

    const DID: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";

    fn revocation() -> Message {
        let body = format!(
            r#"{{"id":"e1","type":"agent.auth.revoked","version":"v1","timestampUtc":"2026-11-24T10:00:00.000Z","initiatedByAccountId":null,"data":{{"reason":"agent_revoked","metadata":{{"agentDid":"{DID}"}}}}}}"#
        );
        Message {
            id: "m1".into(),
            attempts: 1,
            timestamp_ms: 0,
            content_type: ContentType::Json,
            body: body.into_bytes(),
        }
    }

    /// Runs the handler on one revocation against a trust store answering `answer`.
    fn run(answer: Result<(), HostError>) -> (Outcome, Vec<Level>) {
        let logged = RefCell::new(Vec::new());
        let host = Imports {
            revoke: |did: &str| {
                assert_eq!(did, DID);
                answer.clone()
            },
            log: |level, _: &str| logged.borrow_mut().push(level),
        };
        let outcome = host.handle_one(&revocation());
        (outcome, logged.into_inner())
    }

    #[test]
    fn a_recorded_revocation_is_acked() {
        assert!(matches!(run(Ok(())), (Outcome::Ack, levels) if levels == [Level::Info]));
    }

    #[test]
    fn a_transient_trust_store_error_is_retried() {
        let err = HostError {
            transient: true,
            message: "busy".into(),
        };
        assert!(matches!(run(Err(err)), (Outcome::Retry(None), levels) if levels == [Level::Warn]));
    }

    #[test]
    fn a_permanent_refusal_is_acked_with_an_error_log() {
        let err = HostError {
            transient: false,
            message: "refused".into(),
        };
        assert!(matches!(run(Err(err)), (Outcome::Ack, levels) if levels == [Level::Error]));
    }
}
