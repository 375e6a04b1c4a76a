//! One message handled: the decision ([`crate::decide`]) carried out through the
//! capabilities the handler calls, and the outcome and log line of each answer.
//!
//! The capabilities are a [`Host`] trait, so that the same code runs in the component
//! (against its WIT imports, which answer at once: [`at_once`]), in the unit tests
//! (against fakes) and natively in the host's WASM-vs-native benchmark (against the
//! capability implementations the component's imports reach).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use clawq_protocol::body::ContentType;
use clawq_protocol::problem::Problem;

use crate::decide::{Decision, decide};

/// The levels of the log lines this handler writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// An agent revoked.
    Info,
    /// A revocation the trust store could not record yet.
    Warn,
    /// A revocation the trust store refused for good.
    Error,
}

/// Why the trust store did not record a revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    /// Whether a later attempt may succeed.
    pub transient: bool,
    /// What went wrong.
    pub message: String,
}

/// What became of one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: handled, or nothing to do for this handler.
    Ack,
    /// Deliver it again after the consumer's retry delay.
    Retry,
    /// Acknowledged unhandled: the body cannot be handled, for this reason.
    Unhandled(Problem),
    /// Acknowledged unhandled: the trust store refused the revocation for good (the
    /// detail).
    Refused(String),
}

/// The capabilities the handler calls: its world's imports.
pub trait Host {
    /// Marks the agent `did` revoked (`trust-store.revoke-agent`).
    fn revoke_agent(&mut self, did: &str) -> impl Future<Output = Result<(), StoreError>>;

    /// Writes a log line (`log.write`).
    fn log(&mut self, level: Level, line: &str) -> impl Future<Output = ()>;
}

/// Decides and carries out the message `id` (its body `body`, encoded as `content_type`)
/// against `host`, logging whatever is not plain success.
pub async fn handle(
    host: &mut impl Host,
    id: &str,
    content_type: ContentType,
    body: &[u8],
) -> Outcome {
    let did = match decide(content_type, body) {
        Decision::Ignore => return Outcome::Ack,
        Decision::Unhandled(problem) => return Outcome::Unhandled(problem),
        Decision::Revoke(did) => did,
    };
    match host.revoke_agent(&did).await {
        Ok(()) => {
            let line = format!("agent {did} revoked (event {id})");
            host.log(Level::Info, &line).await;
            Outcome::Ack
        }
        Err(err) if err.transient => {
            let line = format!("revoking {did} failed, will retry: {}", err.message);
            host.log(Level::Warn, &line).await;
            Outcome::Retry
        }
        Err(err) => {
            let detail = format!("trust store refused {did}: {}", err.message);
            host.log(Level::Error, &format!("message {id}: {detail}"))
                .await;
            Outcome::Refused(detail)
        }
    }
}

/// The value of `future`, polled once: for [`handle`] against a host whose calls answer
/// at once (the component's imports are synchronous), which never waits.
///
/// # Panics
///
/// If `future` waits: then its host's calls do not answer at once.
pub fn at_once<T>(future: impl Future<Output = T>) -> T {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(value) => value,
        Poll::Pending => panic!("a handler run against synchronous capabilities waited"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawq_protocol::problem::ProblemKind;

    const DID: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";

    fn revocation() -> String {
        format!(
            r#"{{"id":"e1","type":"agent.auth.revoked","version":"v1","timestampUtc":"2026-11-24T10:00:00.000Z","initiatedByAccountId":null,"data":{{"reason":"agent_revoked","metadata":{{"agentDid":"{DID}"}}}}}}"#
        )
    }

    /// A fake host: a trust store answering `answer`, recording the log levels and how
    /// many revocations reached it.
    struct Fake {
        answer: Result<(), StoreError>,
        logged: Vec<Level>,
        revocations: usize,
    }

    impl Host for Fake {
        async fn revoke_agent(&mut self, did: &str) -> Result<(), StoreError> {
            assert_eq!(did, DID);
            self.revocations += 1;
            self.answer.clone()
        }

        async fn log(&mut self, level: Level, _: &str) {
            self.logged.push(level);
        }
    }

    /// Runs the handler on `body` (as `content_type`) against a trust store answering
    /// `answer`; returns the outcome, the log levels and how many revocations reached the
    /// store.
    fn run(
        content_type: ContentType,
        body: &str,
        answer: Result<(), StoreError>,
    ) -> (Outcome, Vec<Level>, usize) {
        let mut host = Fake {
            answer,
            logged: Vec::new(),
            revocations: 0,
        };
        let outcome = at_once(handle(&mut host, "m1", content_type, body.as_bytes()));
        (outcome, host.logged, host.revocations)
    }

    #[test]
    fn a_recorded_revocation_is_acked() {
        assert_eq!(
            run(ContentType::Json, &revocation(), Ok(())),
            (Outcome::Ack, vec![Level::Info], 1)
        );
    }

    #[test]
    fn a_revocation_sent_as_a_json_string_or_text_is_recorded_too() {
        let as_string = serde_json::Value::String(revocation()).to_string();
        for (content_type, body) in [
            (ContentType::Json, as_string),
            (ContentType::Text, revocation()),
        ] {
            assert!(matches!(
                run(content_type, &body, Ok(())),
                (Outcome::Ack, _, 1)
            ));
        }
    }

    #[test]
    fn a_transient_trust_store_error_is_retried() {
        let err = StoreError {
            transient: true,
            message: "busy".into(),
        };
        assert_eq!(
            run(ContentType::Json, &revocation(), Err(err)),
            (Outcome::Retry, vec![Level::Warn], 1)
        );
    }

    #[test]
    fn a_permanent_refusal_is_refused_with_an_error_log() {
        let err = StoreError {
            transient: false,
            message: "refused".into(),
        };
        let refused = Outcome::Refused(format!("trust store refused {DID}: refused"));
        assert_eq!(
            run(ContentType::Json, &revocation(), Err(err)),
            (refused, vec![Level::Error], 1)
        );
    }

    #[test]
    fn what_cannot_be_handled_is_unhandled_with_its_reason_and_never_revoked() {
        let cases = [
            ("nope", ProblemKind::Malformed),
            (
                r#"{"type":"agent.auth.exploded"}"#,
                ProblemKind::UnknownType,
            ),
            (
                r#"{"type":"agent.auth.revoked","data":{"reason":"agent_revoked"}}"#,
                ProblemKind::InvalidField,
            ),
        ];
        for (body, want) in cases {
            let (outcome, levels, revocations) = run(ContentType::Json, body, Ok(()));
            assert!(levels.is_empty() && revocations == 0, "{body}");
            assert!(
                matches!(outcome, Outcome::Unhandled(p) if p.kind == want),
                "{body}"
            );
        }
    }
}
