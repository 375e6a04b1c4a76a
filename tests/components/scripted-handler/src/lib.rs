//! A test handler whose behaviour each message scripts, so that end-to-end tests can
//! drive the host's queue semantics through a real component.
//!
//! Body: `{"do": ACTION, "tag": "...", "delay": n, "reason": "...", "ack_at": n, "did": "..."}`
//! with ACTION one of `ack`, `retry` (acks once `attempts >= ack_at`), `dead-letter`,
//! `revoke` (revokes `did` in the trust store, then acks), `trap` (panics: the whole
//! batch traps), `fail` (`handle` returns an error), `skip` (no outcome from this
//! message on), `loop` (spins forever) and `hog` (allocates without bound). Every message is logged as `seen tag=<tag> attempts=<n> batch=<size>`.

wit_bindgen::generate!({
    world: "crl-invalidation",
    path: "../../../wit",
});

use clawdentity::queues::log::{self, Level};
use clawdentity::queues::trust_store;
use clawdentity::queues::types::{Message, Outcome};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Script {
    #[serde(rename = "do")]
    action: String,
    tag: String,
    delay: Option<u32>,
    reason: String,
    ack_at: Option<u32>,
    did: String,
}

struct Scripted;

impl exports::clawdentity::queues::handler::Guest for Scripted {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        let mut outcomes = Vec::new();
        for message in &messages {
            let script: Script = serde_json::from_slice(&message.body).unwrap_or_default();
            log::write(
                Level::Info,
                &format!(
                    "seen tag={} attempts={} batch={}",
                    script.tag,
                    message.attempts,
                    messages.len()
                ),
            );
            let outcome = match script.action.as_str() {
                "trap" => panic!("scripted trap in message {}", message.id),
                "fail" => return Err(format!("scripted failure in message {}", message.id)),
                "skip" => break,
                "loop" => loop {
                    std::hint::spin_loop();
                },
                "hog" => {
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        hoard.push(vec![1; 1 << 20]);
                        std::hint::black_box(&hoard);
                    }
                }
                "retry" if script.ack_at.is_some_and(|n| message.attempts >= n) => Outcome::Ack,
                "retry" => Outcome::Retry(script.delay),
                "dead-letter" => Outcome::DeadLetter(script.reason),
                "revoke" => match trust_store::revoke_agent(&script.did) {
                    Ok(()) => Outcome::Ack,
                    Err(err) => Outcome::DeadLetter(err.message),
                },
                _ => Outcome::Ack,
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }
}

export!(Scripted);
