//! The component: the bindings of the `crl-invalidation` world, and its `handler` export
//! running [`crate::handling::handle`] on each message against the world's imports.

wit_bindgen::generate!({
    world: "crl-invalidation",
    path: "../../wit",
});

use clawdentity::queues::log::{self, Level};
use clawdentity::queues::trust_store;
use clawdentity::queues::types::{Message, Outcome};

use crate::handling::{self, Host, StoreError, at_once, handle};

struct CrlInvalidation;

impl exports::clawdentity::queues::handler::Guest for CrlInvalidation {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        Ok(messages.iter().map(handle_one).collect())
    }
}

/// The outcome of one message, handled against the imports.
fn handle_one(message: &Message) -> Outcome {
    let content_type = content_type(message.content_type);
    let handled = at_once(handle(
        &mut Imports,
        &message.id,
        content_type,
        &message.body,
    ));
    match handled {
        handling::Outcome::Ack => Outcome::Ack,
        handling::Outcome::Retry => Outcome::Retry(None),
        handling::Outcome::Unhandled(problem) => unhandled(problem),
        handling::Outcome::Refused(detail) => refused(detail),
    }
}

/// The world's imports, which answer at once.
struct Imports;

impl Host for Imports {
    async fn revoke_agent(&mut self, did: &str) -> Result<(), StoreError> {
        trust_store::revoke_agent(did).map_err(|err| StoreError {
            transient: err.transient,
            message: err.message,
        })
    }

    async fn log(&mut self, level: handling::Level, line: &str) {
        let level = match level {
            handling::Level::Info => Level::Info,
            handling::Level::Warn => Level::Warn,
            handling::Level::Error => Level::Error,
        };
        log::write(level, line);
    }
}

clawq_protocol::wit_glue!();

export!(CrlInvalidation);
