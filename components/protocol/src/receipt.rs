//! Delivery receipts (spec section 3): what the relay publishes on the receipts queue.

use serde_json::{Map, Value};

use crate::did::validate_agent_did;

/// The `type` of a delivery receipt.
pub const RECEIPT_TYPE: &str = "delivery_receipt";
/// The statuses a receipt may have.
pub const STATUSES: [&str; 2] = ["delivered_to_webhook", "dead_lettered"];

/// A receipt whose every field was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The relayed message's id (trimmed, non-blank).
    pub request_id: String,
    /// The sender agent, whose session receives the receipt.
    pub sender_agent_did: String,
    /// The recipient agent.
    pub recipient_agent_did: String,
    /// One of [`STATUSES`].
    pub status: String,
    /// Why, when given.
    pub reason: Option<String>,
    /// When the outcome was final, ISO-8601, when given.
    pub processed_at: Option<String>,
}

/// Reads and checks a receipt message body; the error says what is wrong.
pub fn parse_receipt(body: &[u8]) -> Result<Receipt, String> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return Err("body is not a JSON object".into());
    };
    if fields.get("type").and_then(Value::as_str) != Some(RECEIPT_TYPE) {
        return Err(format!("type is not `{RECEIPT_TYPE}`"));
    }
    let status = required(&fields, "status")?;
    if !STATUSES.contains(&status.as_str()) {
        return Err(format!("unknown status `{status}`"));
    }
    let processed_at = optional(&fields, "processedAt")?;
    if let Some(at) = &processed_at {
        humantime::parse_rfc3339_weak(at)
            .map_err(|_| format!("processedAt `{at}` is not an ISO-8601 time"))?;
    }
    let receipt = Receipt {
        request_id: required(&fields, "requestId")?.trim().to_owned(),
        sender_agent_did: required(&fields, "senderAgentDid")?,
        recipient_agent_did: required(&fields, "recipientAgentDid")?,
        status,
        reason: optional(&fields, "reason")?,
        processed_at,
    };
    check_receipt(
        &receipt.request_id,
        &receipt.sender_agent_did,
        &receipt.recipient_agent_did,
        receipt.reason.as_deref(),
    )?;
    Ok(receipt)
}

/// Checks the fields every receipt needs, however it arrived: a non-blank request id,
/// two valid agent DIDs and a reason that is non-blank when present.
pub fn check_receipt(
    request_id: &str,
    sender: &str,
    recipient: &str,
    reason: Option<&str>,
) -> Result<(), String> {
    if request_id.trim().is_empty() {
        return Err("requestId is blank".into());
    }
    validate_agent_did(sender).map_err(|e| format!("senderAgentDid `{sender}`: {e}"))?;
    validate_agent_did(recipient).map_err(|e| format!("recipientAgentDid `{recipient}`: {e}"))?;
    if reason.is_some_and(|r| r.trim().is_empty()) {
        return Err("reason is blank".into());
    }
    Ok(())
}

fn required(fields: &Map<String, Value>, name: &str) -> Result<String, String> {
    match fields.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("{name} is blank")),
        _ => Err(format!("{name} is missing or not a string")),
    }
}

fn optional(fields: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => required(fields, name).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const B: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";

    fn receipt() -> Value {
        json!({"type": "delivery_receipt", "requestId": " req-1 ", "senderAgentDid": A,
               "recipientAgentDid": B, "status": "dead_lettered", "reason": "hook gone",
               "processedAt": "2026-11-24T10:00:00.000Z"})
    }

    fn parse(v: &Value) -> Result<Receipt, String> {
        parse_receipt(v.to_string().as_bytes())
    }

    #[test]
    fn a_valid_receipt_is_read_and_trimmed() {
        let r = parse(&receipt()).unwrap();
        assert_eq!(
            (r.request_id.as_str(), r.status.as_str()),
            ("req-1", "dead_lettered")
        );
        assert_eq!(r.reason.as_deref(), Some("hook gone"));
        let mut minimal = receipt();
        minimal.as_object_mut().unwrap().remove("reason");
        minimal.as_object_mut().unwrap().remove("processedAt");
        assert_eq!(parse(&minimal).unwrap().reason, None);
    }

    #[test]
    fn each_broken_field_is_named() {
        let cases = [
            ("type", json!("receipt"), "type"),
            ("requestId", json!("   "), "requestId"),
            ("requestId", json!(7), "requestId"),
            ("senderAgentDid", json!("did:cdi:x"), "senderAgentDid"),
            ("recipientAgentDid", json!(null), "recipientAgentDid"),
            ("status", json!("processed_by_openclaw"), "status"),
            ("reason", json!(" "), "reason"),
            ("processedAt", json!("noon"), "processedAt"),
        ];
        for (field, value, needle) in cases {
            let mut r = receipt();
            r[field] = value;
            let err = parse(&r).unwrap_err();
            assert!(err.contains(needle), "{field}: {err}");
        }
        assert!(parse_receipt(b"nope").unwrap_err().contains("JSON object"));
    }
}
