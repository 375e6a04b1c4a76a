//! Delivery receipts (spec section 3): what the relay publishes on the receipts queue,
//! read with the lenient rules of spec section 5.

use serde_json::Value;

use crate::body::{ContentType, read_object};
use crate::did::validate_agent_did;
use crate::fields::Fields;
use crate::problem::Problem;

/// The `type` of a delivery receipt.
pub const RECEIPT_TYPE: &str = "delivery_receipt";

/// A receipt's final status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `delivered_to_webhook`: the recipient's connector handed the message over.
    DeliveredToWebhook,
    /// `dead_lettered`: the message failed for good.
    DeadLettered,
}

impl Status {
    /// Every status.
    pub const ALL: [Status; 2] = [Status::DeliveredToWebhook, Status::DeadLettered];

    /// The status as the protocol writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::DeliveredToWebhook => "delivered_to_webhook",
            Status::DeadLettered => "dead_lettered",
        }
    }

    /// The status written `text`, if it is one.
    pub fn parse(text: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// A receipt whose every field was checked and trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The relayed message's id (trimmed, non-blank).
    pub request_id: String,
    /// The sender agent (trimmed, valid), whose session receives the receipt.
    pub sender_agent_did: String,
    /// The recipient agent (trimmed, valid).
    pub recipient_agent_did: String,
    /// The final status.
    pub status: Status,
    /// Why (trimmed), when given as a non-blank string; anything else is dropped.
    pub reason: Option<String>,
    /// When the outcome was final (ISO-8601, trimmed), when given as a parseable time;
    /// anything else is dropped: it is informational.
    pub processed_at: Option<String>,
}

/// Reads and checks a receipt message body, in any encoding [`read_object`] accepts.
pub fn parse_receipt(content_type: ContentType, body: &[u8]) -> Result<Receipt, Problem> {
    let object = read_object(content_type, body).map_err(|e| Problem::malformed(e.to_string()))?;
    let fields = Fields::new(&object);
    let kind = fields.string("type")?;
    if kind != RECEIPT_TYPE {
        return Err(Problem::unknown_type(format!(
            "type `{kind}` is not `{RECEIPT_TYPE}`"
        )));
    }
    let status = match fields.get("status") {
        Some(Value::String(s)) => Status::parse(s).ok_or_else(|| {
            Problem::invalid_field(
                "status",
                format!("`{s}` is not delivered_to_webhook or dead_lettered"),
            )
        })?,
        Some(_) => return Err(Problem::invalid_field("status", "is not a string")),
        None => return Err(Problem::invalid_field("status", "is missing")),
    };
    let processed_at = fields
        .lenient_string("processedAt")
        .filter(|at| humantime::parse_rfc3339_weak(at).is_ok());
    Ok(Receipt {
        request_id: fields.string("requestId")?.to_owned(),
        sender_agent_did: fields.agent_did("senderAgentDid")?.to_owned(),
        recipient_agent_did: fields.agent_did("recipientAgentDid")?.to_owned(),
        status,
        reason: reason(fields.get("reason").and_then(Value::as_str)),
        processed_at: processed_at.map(str::to_owned),
    })
}

/// A receipt's reason as the session keeps it: trimmed, and `None` when blank.
pub fn reason(reason: Option<&str>) -> Option<String> {
    reason
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
}

/// Checks the fields every receipt needs, however it arrived: a non-blank request id and
/// two valid agent DIDs, each after trimming. (A blank `reason` is not an error: it is
/// dropped, see [`reason`].)
pub fn check_receipt(request_id: &str, sender: &str, recipient: &str) -> Result<(), String> {
    if request_id.trim().is_empty() {
        return Err("requestId is blank".into());
    }
    let (sender, recipient) = (sender.trim(), recipient.trim());
    validate_agent_did(sender).map_err(|e| format!("senderAgentDid `{sender}`: {e}"))?;
    validate_agent_did(recipient).map_err(|e| format!("recipientAgentDid `{recipient}`: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ProblemKind;
    use serde_json::json;

    const A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const B: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";

    fn receipt() -> Value {
        json!({"type": "delivery_receipt", "requestId": "req-1", "senderAgentDid": A,
               "recipientAgentDid": B, "status": "dead_lettered", "reason": "hook gone",
               "processedAt": "2026-11-24T10:00:00.000Z"})
    }

    fn parse(v: &Value) -> Result<Receipt, Problem> {
        parse_receipt(ContentType::Json, v.to_string().as_bytes())
    }

    fn expected() -> Receipt {
        Receipt {
            request_id: "req-1".into(),
            sender_agent_did: A.into(),
            recipient_agent_did: B.into(),
            status: Status::DeadLettered,
            reason: Some("hook gone".into()),
            processed_at: Some("2026-11-24T10:00:00.000Z".into()),
        }
    }

    #[test]
    fn a_valid_receipt_is_read_in_every_encoding() {
        let text = receipt().to_string();
        let string = Value::String(text.clone()).to_string();
        for (content_type, body) in [
            (ContentType::Json, &text),
            (ContentType::Json, &string),
            (ContentType::Text, &text),
        ] {
            assert_eq!(
                parse_receipt(content_type, body.as_bytes()),
                Ok(expected()),
                "{body}"
            );
        }
        let mut minimal = receipt();
        minimal.as_object_mut().unwrap().remove("reason");
        minimal.as_object_mut().unwrap().remove("processedAt");
        let read = parse(&minimal).unwrap();
        assert_eq!((read.reason, read.processed_at), (None, None));
    }

    #[test]
    fn dids_type_request_id_and_reason_are_trimmed() {
        let padded = json!({"type": " delivery_receipt\n", "requestId": "  req-1 ",
            "senderAgentDid": format!(" {A} "), "recipientAgentDid": format!("\t{B}"),
            "status": "dead_lettered", "reason": "  hook gone  ",
            "processedAt": "2026-11-24T10:00:00.000Z"});
        assert_eq!(parse(&padded), Ok(expected()));
    }

    #[test]
    fn a_blank_or_non_string_reason_is_dropped() {
        for reason in [
            json!("   "),
            json!(""),
            json!(42),
            json!({"why": 1}),
            json!(null),
        ] {
            let mut r = receipt();
            r["reason"] = reason.clone();
            let read = parse(&r).unwrap_or_else(|e| panic!("{reason}: {e}"));
            assert_eq!(
                read,
                Receipt {
                    reason: None,
                    ..expected()
                },
                "{reason}"
            );
        }
    }

    #[test]
    fn an_unparseable_processed_at_is_left_out() {
        for at in [
            json!("noon"),
            json!(""),
            json!(1732442400),
            json!("2026-13-45T99:00:00Z"),
        ] {
            let mut r = receipt();
            r["processedAt"] = at.clone();
            let read = parse(&r).unwrap_or_else(|e| panic!("{at}: {e}"));
            assert_eq!(
                read,
                Receipt {
                    processed_at: None,
                    ..expected()
                },
                "{at}"
            );
        }
    }

    #[test]
    fn each_broken_field_is_named_with_its_kind() {
        let cases = [
            (
                "type",
                json!("receipt"),
                ProblemKind::UnknownType,
                "type `receipt` is not",
            ),
            (
                "type",
                json!(" "),
                ProblemKind::InvalidField,
                "type is blank",
            ),
            (
                "requestId",
                json!("   "),
                ProblemKind::InvalidField,
                "requestId is blank",
            ),
            (
                "requestId",
                json!(7),
                ProblemKind::InvalidField,
                "requestId is not a string",
            ),
            (
                "senderAgentDid",
                json!("did:cdi:x"),
                ProblemKind::InvalidField,
                "senderAgentDid `did:cdi:x`",
            ),
            (
                "recipientAgentDid",
                json!(null),
                ProblemKind::InvalidField,
                "recipientAgentDid is not a string",
            ),
            (
                "status",
                json!("processed_by_openclaw"),
                ProblemKind::InvalidField,
                "status `processed_by_openclaw`",
            ),
            (
                "status",
                json!(1),
                ProblemKind::InvalidField,
                "status is not a string",
            ),
        ];
        for (field, value, kind, needle) in cases {
            let mut r = receipt();
            r[field] = value;
            let err = parse(&r).unwrap_err();
            assert_eq!(err.kind, kind, "{field}: {err}");
            assert!(err.detail.starts_with(needle), "{field}: {err}");
        }
        let mut r = receipt();
        r.as_object_mut().unwrap().remove("status");
        assert_eq!(parse(&r).unwrap_err().detail, "status is missing");
        let err = parse_receipt(ContentType::Json, b"nope").unwrap_err();
        assert_eq!(err.kind, ProblemKind::Malformed);
        assert!(err.detail.starts_with("body is not JSON"), "{err}");
    }

    #[test]
    fn check_receipt_trims_and_accepts_a_blank_reason() {
        assert_eq!(check_receipt(" r ", &format!(" {A} "), B), Ok(()));
        assert!(check_receipt("  ", A, B).unwrap_err().contains("requestId"));
        assert!(
            check_receipt("r", "x", B)
                .unwrap_err()
                .contains("senderAgentDid")
        );
        assert!(
            check_receipt("r", A, "x")
                .unwrap_err()
                .contains("recipientAgentDid")
        );
        assert_eq!(reason(Some("  why ")), Some("why".into()));
        assert_eq!(reason(Some(" ")), None);
    }
}
