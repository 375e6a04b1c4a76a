//! A test handler built against `clawdentity:queues@0.1.0` (work in progress).

wit_bindgen::generate!({
    world: "receipt-handler",
    path: "../../../host/wit-compat/0.1.0",
});

use clawdentity::queues::types::{Message, Outcome};

struct Legacy;

impl exports::clawdentity::queues::handler::Guest for Legacy {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        Ok(messages.iter().map(|_| Outcome::Ack).collect())
    }
}

export!(Legacy);
