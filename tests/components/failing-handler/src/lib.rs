//! A test handler that traps on every batch: a bad version for the hot-swap, limit and
//! crash-loop tests.

wit_bindgen::generate!({
    world: "crl-invalidation",
    path: "../../../wit",
});

use clawdentity::queues::types::{Message, Outcome};

struct Failing;

impl exports::clawdentity::queues::handler::Guest for Failing {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        panic!(
            "failing-handler traps on every batch ({} messages)",
            messages.len()
        )
    }
}

export!(Failing);
