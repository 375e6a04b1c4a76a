//! A hostile test handler (world `handler-host`): each message scripts one attack on the
//! host's sandbox, so that end-to-end tests can prove every bound holds.
//!
//! Body: `{"do": ATTACK, "n": count, "size": bytes, "seconds": s, "agent": did}`, with
//! ATTACK one of:
//!
//! - `spin`: loops forever without a host call (CPU);
//! - `sleep`: sleeps `seconds` through WASI's clock (wall clock);
//! - `error`: `handle` returns an error of `size` bytes;
//! - `dead-letter`: dead-letters the message with a reason of `size` bytes;
//! - `log`: writes `n` log lines of `size` bytes;
//! - `stderr`: writes `size` bytes to stderr, then traps;
//! - `put`: puts `n` values of `size` bytes under new keys of actor `hostile`;
//! - `big-key`: puts one value under a key of `size` bytes;
//! - `list`: lists every key of actor `hostile` in pages of `n` (the host caps them) and
//!   logs `hostile listed <keys> keys in <pages> pages of at most <largest>`;
//! - `frames`: hands `n` deliveries with a payload of `size` bytes to `agent` through
//!   `relay-sessions.deliver` (dedup keys `flood-<message id>-<i>`), which pushes each as
//!   a `deliver` frame;
//! - `ack` (or anything else): acks.
//!
//! Every message is first logged as `hostile <attack> attempts=<n>`. A capability error
//! stops the attack and is logged as `hostile refused: <message>`; the message is acked.

wit_bindgen::generate!({
    world: "handler-host",
    path: "../../../wit",
});

use clawdentity::queues::actor_storage;
use clawdentity::queues::log::{self, Level};
use clawdentity::queues::relay_sessions::{self, AgentDelivery};
use clawdentity::queues::types::{HostError, Message, Outcome};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Attack {
    #[serde(rename = "do")]
    action: String,
    n: u32,
    size: usize,
    seconds: u64,
    agent: String,
}

struct Hostile;

impl exports::clawdentity::queues::handler::Guest for Hostile {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        let mut outcomes = Vec::new();
        for message in &messages {
            let attack: Attack = serde_json::from_slice(&message.body).unwrap_or_default();
            log::write(
                Level::Info,
                &format!("hostile {} attempts={}", attack.action, message.attempts),
            );
            let outcome = match attack.action.as_str() {
                "spin" => loop {
                    std::hint::spin_loop();
                },
                "sleep" => {
                    std::thread::sleep(std::time::Duration::from_secs(attack.seconds));
                    Outcome::Ack
                }
                "error" => return Err("e".repeat(attack.size)),
                "dead-letter" => Outcome::DeadLetter("r".repeat(attack.size)),
                "stderr" => {
                    eprint!("{}", "x".repeat(attack.size));
                    panic!("hostile stderr flood of {} bytes", attack.size);
                }
                action => {
                    if let Err(err) = capability_attack(action, &attack, &message.id) {
                        log::write(Level::Warn, &format!("hostile refused: {}", err.message));
                    }
                    Outcome::Ack
                }
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }
}

/// The attacks made through capability calls, by the message `id`.
fn capability_attack(action: &str, attack: &Attack, id: &str) -> Result<(), HostError> {
    let value = vec![b'v'; attack.size];
    match action {
        "log" => {
            let line = "l".repeat(attack.size);
            for _ in 0..attack.n {
                log::write(Level::Info, &line);
            }
        }
        "put" => {
            for i in 0..attack.n {
                actor_storage::put("hostile", &format!("key-{i:08}"), &value)?;
            }
        }
        "big-key" => actor_storage::put("hostile", &"k".repeat(attack.size), b"v")?,
        "list" => {
            let (mut keys, mut pages, mut largest) = (0, 0, 0);
            let mut after: Option<String> = None;
            loop {
                let page = actor_storage::list_prefix("hostile", "", after.as_deref(), attack.n)?;
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                (keys, pages, largest) = (keys + page.len(), pages + 1, largest.max(page.len()));
            }
            let pages = format!("{pages} pages of at most {largest}");
            log::write(
                Level::Info,
                &format!("hostile listed {keys} keys in {pages}"),
            );
        }
        "frames" => {
            let payload = format!(r#""{}""#, "f".repeat(attack.size.saturating_sub(2)));
            for i in 0..attack.n {
                relay_sessions::deliver(&AgentDelivery {
                    dedup_key: format!("flood-{id}-{i}"),
                    from_agent_did: attack.agent.clone(),
                    to_agent_did: attack.agent.clone(),
                    payload: payload.clone(),
                    delivery_source: None,
                    content_type: None,
                    group_id: None,
                    conversation_id: None,
                    reply_to: None,
                })?;
            }
        }
        _ => {}
    }
    Ok(())
}

export!(Hostile);
