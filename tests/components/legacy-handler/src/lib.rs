//! A test handler built against the frozen `clawdentity:queues@0.1.0` contract (world
//! `receipt-handler`), proving that the host still loads and runs such components: it
//! hands each receipt to its sender's session with `relay-sessions.deliver-receipt`, as
//! it is (the host checks it), and logs `legacy routed <requestId>: <result>`.
//!
//! A body `{"forge": {"agent": did, "frame": {...}}}` instead pushes `frame` to `agent`
//! with 0.1.0's raw `websocket.send-frame` (which 0.2.0 retired), logs `legacy forged:
//! <result>` and acks.

wit_bindgen::generate!({
    world: "receipt-handler",
    path: "../../../host/wit-compat/0.1.0",
});

use clawdentity::queues::log::{self, Level};
use clawdentity::queues::relay_sessions::{self, Receipt, ReceiptStatus};
use clawdentity::queues::types::{Message, Outcome};
use clawdentity::queues::websocket;
use serde_json::Value;

struct Legacy;

impl exports::clawdentity::queues::handler::Guest for Legacy {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
        Ok(messages.iter().map(route).collect())
    }
}

/// Routes one receipt: acked once the session answered, retried when it is unavailable.
fn route(message: &Message) -> Outcome {
    let body: Value = serde_json::from_slice(&message.body).unwrap_or_default();
    if let Some(forge) = body.get("forge") {
        let agent = forge["agent"].as_str().unwrap_or_default();
        let result = match websocket::send_frame(agent, &forge["frame"].to_string()) {
            Ok(n) => format!("sent to {n}"),
            Err(err) if err.transient => format!("will retry: {}", err.message),
            Err(err) => format!("refused: {}", err.message),
        };
        log::write(Level::Info, &format!("legacy forged: {result}"));
        return Outcome::Ack;
    }
    let field = |name: &str| body[name].as_str().unwrap_or_default().to_owned();
    let receipt = Receipt {
        request_id: field("requestId"),
        sender_agent_did: field("senderAgentDid"),
        recipient_agent_did: field("recipientAgentDid"),
        status: match body["status"].as_str() {
            Some("dead_lettered") => ReceiptStatus::DeadLettered,
            _ => ReceiptStatus::DeliveredToWebhook,
        },
        reason: body["reason"].as_str().map(str::to_owned),
        processed_at: body["processedAt"].as_str().map(str::to_owned),
    };
    let (outcome, result) = match relay_sessions::deliver_receipt(&receipt) {
        Ok(delivery) => (Outcome::Ack, format!("{delivery:?}")),
        Err(err) if err.transient => (Outcome::Retry(None), format!("will retry: {}", err.message)),
        Err(err) => (Outcome::Ack, format!("refused: {}", err.message)),
    };
    log::write(
        Level::Info,
        &format!("legacy routed {}: {result}", receipt.request_id),
    );
    outcome
}

export!(Legacy);
