//! The bundled receipt router of the `clawdentity-receipts` queue.
//!
//! Each delivery receipt goes to the relay session of its *sender* (spec section 3), which
//! records it and pushes it to the sender's connector. Malformed receipts are acked with a
//! warning (retrying cannot fix them); only a transient session failure asks for a retry.

wit_bindgen::generate!({
    world: "receipt-router",
    path: "../../wit",
});

use clawdentity::queues::log::{self, Level};
use clawdentity::queues::relay_sessions::{self, Delivery, Receipt, ReceiptStatus};
use clawdentity::queues::types::{HostError, Message, Outcome};
use clawq_protocol::receipt::parse_receipt;

struct ReceiptRouter;

impl exports::clawdentity::queues::handler::Guest for ReceiptRouter {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        let host = Imports {
            deliver: relay_sessions::deliver_receipt,
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

impl<D: Fn(&Receipt) -> Result<Delivery, HostError>, L: Fn(Level, &str)> Imports<D, L> {
    /// Routes one receipt and decides its outcome.
    fn route(&self, message: &Message) -> Outcome {
        let receipt = match parse_receipt(&message.body) {
            Ok(r) => r,
            Err(why) => {
                (self.log)(
                    Level::Warn,
                    &format!("message {}: not a valid receipt: {why}; acked", message.id),
                );
                return Outcome::Ack;
            }
        };
        let status = match receipt.status.as_str() {
            "dead_lettered" => ReceiptStatus::DeadLettered,
            _ => ReceiptStatus::DeliveredToWebhook,
        };
        let wit = Receipt {
            request_id: receipt.request_id,
            sender_agent_did: receipt.sender_agent_did,
            recipient_agent_did: receipt.recipient_agent_did,
            status,
            reason: receipt.reason,
            processed_at: receipt.processed_at,
        };
        match (self.deliver)(&wit) {
            Ok(Delivery::Ignored) => {
                let text = format!(
                    "receipt {} conflicts with the stored one; ignored",
                    wit.request_id
                );
                (self.log)(Level::Warn, &text);
                Outcome::Ack
            }
            Ok(_) => Outcome::Ack,
            Err(err) if err.transient => {
                let text = format!(
                    "session of {} unavailable, will retry: {}",
                    wit.sender_agent_did, err.message
                );
                (self.log)(Level::Warn, &text);
                Outcome::Retry(None)
            }
            Err(err) => {
                let text = format!(
                    "session of {} refused receipt {}: {}; acked",
                    wit.sender_agent_did, wit.request_id, err.message
                );
                (self.log)(Level::Error, &text);
                Outcome::Ack
            }
        }
    }
}

export!(ReceiptRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use clawdentity::queues::types::ContentType;
    use std::cell::RefCell;

    const A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const B: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";

    fn message(body: &str) -> Message {
        Message {
            id: "m1".into(),
            attempts: 1,
            timestamp_ms: 0,
            content_type: ContentType::Json,
            body: body.into(),
        }
    }

    fn receipt_body() -> String {
        format!(
            r#"{{"type":"delivery_receipt","requestId":"r1","senderAgentDid":"{A}","recipientAgentDid":"{B}","status":"dead_lettered","reason":"gone"}}"#
        )
    }

    /// Routes `body` against a session answering `answer`; returns the outcome, the log
    /// levels and how many receipts reached the session.
    fn run(body: &str, answer: Result<Delivery, HostError>) -> (Outcome, Vec<Level>, usize) {
        let logged = RefCell::new(Vec::new());
        let calls = RefCell::new(0);
        let host = Imports {
            deliver: |r: &Receipt| {
                assert_eq!(
                    (r.sender_agent_did.as_str(), r.status),
                    (A, ReceiptStatus::DeadLettered)
                );
                *calls.borrow_mut() += 1;
                answer.clone()
            },
            log: |level, _: &str| logged.borrow_mut().push(level),
        };
        let outcome = host.route(&message(body));
        (outcome, logged.into_inner(), calls.into_inner())
    }

    #[test]
    fn malformed_receipts_are_acked_with_a_warning_and_never_routed() {
        for body in [
            "nope",
            "[]",
            r#"{"type":"other"}"#,
            &receipt_body().replace("dead_lettered", "lost"),
        ] {
            let (outcome, levels, calls) = run(body, Ok(Delivery::Stored));
            assert!(
                matches!(outcome, Outcome::Ack) && levels == [Level::Warn] && calls == 0,
                "{body}"
            );
        }
    }

    #[test]
    fn recorded_receipts_are_acked() {
        for delivery in [Delivery::Pushed(1), Delivery::Stored, Delivery::Unchanged] {
            let (outcome, levels, calls) = run(&receipt_body(), Ok(delivery));
            assert!(matches!(outcome, Outcome::Ack) && levels.is_empty() && calls == 1);
        }
    }

    #[test]
    fn transient_failures_retry_and_permanent_ones_ack_with_an_error() {
        let busy = HostError {
            transient: true,
            message: "overloaded".into(),
        };
        assert!(
            matches!(run(&receipt_body(), Err(busy)), (Outcome::Retry(None), l, 1) if l == [Level::Warn])
        );
        let refused = HostError {
            transient: false,
            message: "refused".into(),
        };
        assert!(
            matches!(run(&receipt_body(), Err(refused)), (Outcome::Ack, l, 1) if l == [Level::Error])
        );
    }
}
