//! The bundled receipt router of the `clawdentity-receipts` queue.
//!
//! Each delivery receipt goes to the relay session of its *sender* (spec section 3), which
//! records it and pushes it to the sender's connector. Bodies are read in every encoding
//! and with the lenient rules of spec section 5. A receipt that cannot be handled, or that
//! the session refuses for good (a permanent error, or a conflict with the stored one), is
//! acked `unhandled` with the reason (the host logs and counts it); only a transient
//! session failure asks for a retry.

wit_bindgen::generate!({
    world: "receipt-router",
    path: "../../wit",
});

use clawdentity::queues::log::{self, Level};
use clawdentity::queues::relay_sessions::{self, Delivery, Receipt, ReceiptStatus};
use clawdentity::queues::types::{HostError, Message, Outcome};
use clawq_protocol::problem::Problem;
use clawq_protocol::receipt::{Status, parse_receipt};

struct ReceiptRouter;

impl exports::clawdentity::queues::handler::Guest for ReceiptRouter {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        let host = Imports {
            deliver: relay_sessions::deliver_receipts,
            log: log::write,
        };
        Ok(host.route(&messages))
    }
}

/// The capability calls the router makes, as plain functions so that tests can run it
/// natively against fakes.
struct Imports<D, L> {
    deliver: D,
    log: L,
}

impl<D: Fn(&[Receipt]) -> Vec<Result<Delivery, HostError>>, L: Fn(Level, &str)> Imports<D, L> {
    /// Routes the receipts of `messages` to their senders' sessions, all in one call,
    /// and decides each message's outcome, in order.
    fn route(&self, messages: &[Message]) -> Vec<Outcome> {
        // Each message's receipt (its place in `receipts`), or its outcome.
        let mut receipts = Vec::with_capacity(messages.len());
        let read: Vec<Result<usize, Outcome>> = messages
            .iter()
            .map(|m| {
                read_receipt(m).map(|receipt| {
                    receipts.push(receipt);
                    receipts.len() - 1
                })
            })
            .collect();
        let mut answers = match receipts.is_empty() {
            true => Vec::new(),
            false => (self.deliver)(&receipts),
        }
        .into_iter();
        let unanswered = || HostError {
            transient: true,
            message: "the host answered fewer receipts than it was given".into(),
        };
        messages
            .iter()
            .zip(read)
            .map(|(message, read)| match read {
                Ok(at) => self.decide(
                    message,
                    &receipts[at],
                    answers.next().unwrap_or_else(|| Err(unanswered())),
                ),
                Err(outcome) => outcome,
            })
            .collect()
    }

    /// The outcome of `message`, whose receipt `wit` its sender's session answered
    /// with `answer`.
    fn decide(
        &self,
        message: &Message,
        wit: &Receipt,
        answer: Result<Delivery, HostError>,
    ) -> Outcome {
        match answer {
            Ok(Delivery::Ignored) => refused(format!(
                "receipt {} conflicts with the one the session of {} holds (another sender or recipient); ignored",
                wit.request_id, wit.sender_agent_did
            )),
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
                let detail = format!(
                    "session of {} refused receipt {}: {}",
                    wit.sender_agent_did, wit.request_id, err.message
                );
                (self.log)(Level::Error, &format!("message {}: {detail}", message.id));
                refused(detail)
            }
        }
    }
}

/// The receipt `message` holds, or its outcome when it holds none that can be routed.
fn read_receipt(message: &Message) -> Result<Receipt, Outcome> {
    let receipt = match parse_receipt(content_type(message.content_type), &message.body) {
        Ok(r) => r,
        Err(problem) => {
            let detail = format!("not a valid receipt: {problem}");
            return Err(unhandled(Problem { detail, ..problem }));
        }
    };
    Ok(Receipt {
        request_id: receipt.request_id,
        sender_agent_did: receipt.sender_agent_did,
        recipient_agent_did: receipt.recipient_agent_did,
        status: match receipt.status {
            Status::DeadLettered => ReceiptStatus::DeadLettered,
            Status::DeliveredToWebhook => ReceiptStatus::DeliveredToWebhook,
        },
        reason: receipt.reason,
        processed_at: receipt.processed_at,
    })
}

clawq_protocol::wit_glue!();

export!(ReceiptRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use clawdentity::queues::types::{ContentType, UnhandledReason};
    use std::cell::RefCell;

    const A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const B: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";

    fn message(content_type: ContentType, body: &str) -> Message {
        Message {
            id: "m1".into(),
            attempts: 1,
            timestamp_ms: 0,
            content_type,
            body: body.into(),
        }
    }

    fn receipt_body() -> String {
        format!(
            r#"{{"type":"delivery_receipt","requestId":"r1","senderAgentDid":"{A}","recipientAgentDid":"{B}","status":"dead_lettered","reason":"gone"}}"#
        )
    }

    /// Routes `message` against a session answering `answer`; returns the outcome, the
    /// log levels and the receipts that reached the session.
    fn run_message(
        message: &Message,
        answer: Result<Delivery, HostError>,
    ) -> (Outcome, Vec<Level>, Vec<Receipt>) {
        let logged = RefCell::new(Vec::new());
        let calls = RefCell::new(Vec::new());
        let host = Imports {
            deliver: |receipts: &[Receipt]| {
                calls.borrow_mut().extend_from_slice(receipts);
                vec![answer.clone(); receipts.len()]
            },
            log: |level, _: &str| logged.borrow_mut().push(level),
        };
        let outcome = host.route(std::slice::from_ref(message)).remove(0);
        (outcome, logged.into_inner(), calls.into_inner())
    }

    fn run(body: &str, answer: Result<Delivery, HostError>) -> (Outcome, Vec<Level>, usize) {
        let (outcome, levels, calls) = run_message(&message(ContentType::Json, body), answer);
        (outcome, levels, calls.len())
    }

    fn reason_of(outcome: &Outcome) -> Option<UnhandledReason> {
        match outcome {
            Outcome::Unhandled(u) => Some(u.reason),
            _ => None,
        }
    }

    #[test]
    fn what_cannot_be_handled_is_unhandled_with_its_reason_and_never_routed() {
        for (body, want) in [
            ("nope".to_owned(), UnhandledReason::Malformed),
            ("[]".to_owned(), UnhandledReason::Malformed),
            (
                r#"{"type":"other"}"#.to_owned(),
                UnhandledReason::UnknownType,
            ),
            (
                receipt_body().replace("dead_lettered", "lost"),
                UnhandledReason::InvalidField,
            ),
            (
                receipt_body().replace(A, "did:cdi:x"),
                UnhandledReason::InvalidField,
            ),
        ] {
            let (outcome, levels, calls) = run(&body, Ok(Delivery::Stored));
            assert_eq!(reason_of(&outcome), Some(want), "{body}");
            assert!(levels.is_empty() && calls == 0, "{body}");
        }
    }

    #[test]
    fn a_receipt_is_routed_the_same_in_every_encoding() {
        let text = receipt_body();
        let string = serde_json::Value::String(text.clone()).to_string();
        for m in [
            message(ContentType::Json, &text),
            message(ContentType::Json, &string),
            message(ContentType::Text, &text),
        ] {
            let (outcome, _, calls) = run_message(&m, Ok(Delivery::Pushed(1)));
            assert!(matches!(outcome, Outcome::Ack));
            assert_eq!(calls.len(), 1);
            let r = &calls[0];
            assert_eq!(
                (
                    r.request_id.as_str(),
                    r.sender_agent_did.as_str(),
                    r.recipient_agent_did.as_str()
                ),
                ("r1", A, B)
            );
            assert_eq!(
                (r.status, r.reason.as_deref()),
                (ReceiptStatus::DeadLettered, Some("gone"))
            );
        }
    }

    #[test]
    fn lenient_fields_are_trimmed_or_dropped_and_the_receipt_still_routed() {
        let padded = format!(
            r#"{{"type":" delivery_receipt ","requestId":" r1 ","senderAgentDid":" {A} ","recipientAgentDid":"{B} ","status":"dead_lettered","reason":42,"processedAt":"whenever"}}"#
        );
        let (outcome, _, calls) =
            run_message(&message(ContentType::Json, &padded), Ok(Delivery::Stored));
        assert!(matches!(outcome, Outcome::Ack));
        let r = &calls[0];
        assert_eq!(
            (r.request_id.as_str(), r.sender_agent_did.as_str()),
            ("r1", A)
        );
        assert_eq!(
            (r.reason.as_deref(), r.processed_at.as_deref()),
            (None, None)
        );
    }

    #[test]
    fn a_batch_routes_its_receipts_in_one_call_and_keeps_each_outcome_in_place() {
        let calls = RefCell::new(Vec::new());
        let host = Imports {
            deliver: |receipts: &[Receipt]| {
                calls.borrow_mut().push(receipts.to_vec());
                let answer = |r: &Receipt| match r.request_id.as_str() {
                    "busy" => Err(HostError {
                        transient: true,
                        message: "overloaded".into(),
                    }),
                    "other" => Ok(Delivery::Ignored),
                    _ => Ok(Delivery::Stored),
                };
                receipts.iter().map(answer).collect()
            },
            log: |_, _: &str| {},
        };
        let with_id = |id: &str| message(ContentType::Json, &receipt_body().replace("r1", id));
        let batch = [
            with_id("first"),
            message(ContentType::Json, "nope"),
            with_id("busy"),
            with_id("other"),
            with_id("last"),
        ];
        let outcomes = host.route(&batch);
        let calls = calls.into_inner();
        let routed: Vec<&str> = calls[0].iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(
            (calls.len(), routed),
            (1, vec!["first", "busy", "other", "last"]),
            "one call, the routable receipts in order"
        );
        assert!(matches!(outcomes[0], Outcome::Ack));
        assert_eq!(reason_of(&outcomes[1]), Some(UnhandledReason::Malformed));
        assert!(matches!(outcomes[2], Outcome::Retry(None)));
        assert_eq!(reason_of(&outcomes[3]), Some(UnhandledReason::Refused));
        assert!(matches!(outcomes[4], Outcome::Ack));
        let unanswering = Imports {
            deliver: |_: &[Receipt]| Vec::new(),
            log: |_, _: &str| {},
        };
        let unrouted = unanswering.route(&[with_id("lost")]);
        assert!(
            matches!(unrouted[0], Outcome::Retry(None)),
            "a receipt the host did not answer is retried"
        );
        let none = Imports {
            deliver: |_: &[Receipt]| -> Vec<Result<Delivery, HostError>> {
                panic!("no receipt to route")
            },
            log: |_, _: &str| {},
        };
        assert_eq!(none.route(&[message(ContentType::Json, "nope")]).len(), 1);
    }

    #[test]
    fn recorded_receipts_are_acked() {
        for delivery in [Delivery::Pushed(1), Delivery::Stored, Delivery::Unchanged] {
            let (outcome, levels, calls) = run(&receipt_body(), Ok(delivery));
            assert!(matches!(outcome, Outcome::Ack) && levels.is_empty() && calls == 1);
        }
    }

    #[test]
    fn a_conflicting_receipt_is_unhandled_refused() {
        let (outcome, levels, calls) = run(&receipt_body(), Ok(Delivery::Ignored));
        assert_eq!(
            (reason_of(&outcome), levels.len(), calls),
            (Some(UnhandledReason::Refused), 0, 1)
        );
    }

    #[test]
    fn transient_failures_retry_and_permanent_ones_are_refused_with_an_error() {
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
        let (outcome, levels, calls) = run(&receipt_body(), Err(refused));
        assert_eq!(
            (reason_of(&outcome), levels, calls),
            (Some(UnhandledReason::Refused), vec![Level::Error], 1)
        );
    }
}
