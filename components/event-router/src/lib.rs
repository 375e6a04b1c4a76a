//! The bundled event router of the `clawdentity-events` queue (work in progress).

wit_bindgen::generate!({
    world: "event-router",
    path: "../../wit",
});

use clawdentity::queues::types::{Message, Outcome};

struct EventRouter;

impl exports::clawdentity::queues::handler::Guest for EventRouter {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        Ok(messages.iter().map(|_| Outcome::Ack).collect())
    }
}

export!(EventRouter);
