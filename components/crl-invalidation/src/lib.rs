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
use clawdentity::queues::types::{Message, Outcome};
use decide::{Decision, decide};

struct CrlInvalidation;

impl exports::clawdentity::queues::handler::Guest for CrlInvalidation {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        Ok(messages.iter().map(handle_one).collect())
    }
}

/// Decides and carries out one message, logging whatever is not plain success.
fn handle_one(message: &Message) -> Outcome {
    match decide(&message.body) {
        Decision::Ignore => Outcome::Ack,
        Decision::Skip(why) => {
            log::write(
                Level::Warn,
                &format!("message {}: {why}; acked", message.id),
            );
            Outcome::Ack
        }
        Decision::Revoke(did) => match trust_store::revoke_agent(&did) {
            Ok(()) => {
                log::write(
                    Level::Info,
                    &format!("agent {did} revoked (event {})", message.id),
                );
                Outcome::Ack
            }
            Err(err) if err.transient => {
                log::write(
                    Level::Warn,
                    &format!("revoking {did} failed, will retry: {}", err.message),
                );
                Outcome::Retry(None)
            }
            Err(err) => {
                log::write(
                    Level::Error,
                    &format!("trust store refused {did}: {}; acked", err.message),
                );
                Outcome::Ack
            }
        },
    }
}

export!(CrlInvalidation);
