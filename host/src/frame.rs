//! Connector WebSocket frames (spec section 4): JSON text, at most 1 MiB, every frame
//! `{"v": 1, "type", "id": <ULID>, "ts": <ISO-8601>}` plus the fields of its type and
//! nothing else. Shared by the host's endpoint and the connector.

use std::time::SystemTime;

use serde_json::{Map, Value, json};

/// Where a connector opens its WebSocket.
pub const CONNECT_PATH: &str = "/v1/relay/connect";
/// Largest frame accepted, in bytes.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// The protocol version every frame carries.
pub const VERSION: u64 = 1;

/// A receipt's final status (spec section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptStatus {
    /// The recipient's connector handed the message to the recipient's agent.
    DeliveredToWebhook,
    /// The message failed for good.
    DeadLettered,
}

impl ReceiptStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptStatus::DeliveredToWebhook => "delivered_to_webhook",
            ReceiptStatus::DeadLettered => "dead_lettered",
        }
    }

    /// Reads a wire name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "delivered_to_webhook" => Some(ReceiptStatus::DeliveredToWebhook),
            "dead_lettered" => Some(ReceiptStatus::DeadLettered),
            _ => None,
        }
    }
}

/// What a frame says, by type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameBody {
    /// Are you there? (both directions)
    Heartbeat,
    /// Yes: answers the heartbeat `ack_id`.
    HeartbeatAck {
        /// The heartbeat's frame id.
        ack_id: String,
    },
    /// A delivery receipt for the connected agent (host → connector).
    Receipt {
        /// The receipt's `requestId`.
        original_frame_id: String,
        /// The recipient of the original message.
        to_agent_did: String,
        /// Its final status.
        status: ReceiptStatus,
        /// Why, when the status says it failed.
        reason: Option<String>,
    },
    /// The connector stored the receipt frame `ack_id` (connector → host).
    ReceiptAck {
        /// The receipt frame's id.
        ack_id: String,
    },
    /// A delivery for the connected agent (host → connector, spec section 5), kept by
    /// its session until a `deliver_ack`.
    Deliver(Box<Deliver>),
    /// The connector stored (or refused) the deliver frame `ack_id` (connector → host).
    DeliverAck {
        /// The deliver frame's id.
        ack_id: String,
        /// Whether the connector took the delivery.
        accepted: bool,
        /// Why it refused it, when it did.
        reason: Option<String>,
    },
}

/// The fields of a `deliver` frame (spec section 5); absent optional fields are omitted
/// from the JSON, never `null`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    /// The agent the delivery is from.
    pub from_agent_did: String,
    /// The agent it is for.
    pub to_agent_did: String,
    /// Any JSON value.
    pub payload: Value,
    /// Where the delivery comes from, e.g. `proxy.events.queue.pair_accepted`.
    pub delivery_source: Option<String>,
    /// The payload's content type.
    pub content_type: Option<String>,
    /// The group it concerns.
    pub group_id: Option<String>,
    /// The conversation it belongs to.
    pub conversation_id: Option<String>,
    /// What it answers.
    pub reply_to: Option<String>,
}

impl Deliver {
    /// The optional string fields, by wire name.
    fn optional_fields(&self) -> [(&'static str, &Option<String>); 5] {
        [
            ("deliverySource", &self.delivery_source),
            ("contentType", &self.content_type),
            ("groupId", &self.group_id),
            ("conversationId", &self.conversation_id),
            ("replyTo", &self.reply_to),
        ]
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// A ULID unique to this frame.
    pub id: String,
    /// When the frame was made, ISO-8601.
    pub ts: String,
    /// What it says.
    pub body: FrameBody,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Larger than [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the 1 MiB limit")]
    TooLarge(usize),
    /// Not a JSON object.
    #[error("frame is not a JSON object")]
    NotAnObject,
    /// A field is missing or malformed.
    #[error("field `{0}` is missing or invalid")]
    BadField(&'static str),
    /// A field this type does not have.
    #[error("unknown field `{0}`")]
    UnknownField(String),
    /// The `type` is not a known one.
    #[error("unknown frame type `{0}`")]
    UnknownType(String),
}

impl Frame {
    /// A new frame with a fresh id and the current time.
    pub fn new(body: FrameBody) -> Frame {
        Frame {
            id: ulid::Ulid::new().to_string(),
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            body,
        }
    }

    /// The frame's type name.
    pub fn type_name(&self) -> &'static str {
        match self.body {
            FrameBody::Heartbeat => "heartbeat",
            FrameBody::HeartbeatAck { .. } => "heartbeat_ack",
            FrameBody::Receipt { .. } => "receipt",
            FrameBody::ReceiptAck { .. } => "receipt_ack",
            FrameBody::Deliver(_) => "deliver",
            FrameBody::DeliverAck { .. } => "deliver_ack",
        }
    }

    /// The frame as JSON text.
    pub fn to_json(&self) -> String {
        let mut object =
            json!({"v": VERSION, "type": self.type_name(), "id": self.id, "ts": self.ts});
        let fields = object.as_object_mut().expect("an object");
        match &self.body {
            FrameBody::Heartbeat => {}
            FrameBody::HeartbeatAck { ack_id } | FrameBody::ReceiptAck { ack_id } => {
                fields.insert("ackId".into(), ack_id.clone().into());
            }
            FrameBody::Receipt {
                original_frame_id,
                to_agent_did,
                status,
                reason,
            } => {
                fields.insert("originalFrameId".into(), original_frame_id.clone().into());
                fields.insert("toAgentDid".into(), to_agent_did.clone().into());
                fields.insert("status".into(), status.as_str().into());
                if let Some(reason) = reason {
                    fields.insert("reason".into(), reason.clone().into());
                }
            }
            FrameBody::Deliver(deliver) => {
                fields.insert("fromAgentDid".into(), deliver.from_agent_did.clone().into());
                fields.insert("toAgentDid".into(), deliver.to_agent_did.clone().into());
                fields.insert("payload".into(), deliver.payload.clone());
                for (name, value) in deliver.optional_fields() {
                    if let Some(value) = value {
                        fields.insert(name.into(), value.clone().into());
                    }
                }
            }
            FrameBody::DeliverAck {
                ack_id,
                accepted,
                reason,
            } => {
                fields.insert("ackId".into(), ack_id.clone().into());
                fields.insert("accepted".into(), (*accepted).into());
                if let Some(reason) = reason {
                    fields.insert("reason".into(), reason.clone().into());
                }
            }
        }
        object.to_string()
    }

    /// Parses and checks a frame: size, version, id, timestamp and exactly the fields of
    /// its type.
    pub fn parse(text: &str) -> Result<Frame, FrameError> {
        if text.len() > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(text.len()));
        }
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(text) else {
            return Err(FrameError::NotAnObject);
        };
        if fields.get("v").and_then(Value::as_u64) != Some(VERSION) {
            return Err(FrameError::BadField("v"));
        }
        let id = string(&fields, "id")?;
        if id.parse::<ulid::Ulid>().is_err() || id.len() != 26 {
            return Err(FrameError::BadField("id"));
        }
        let ts = string(&fields, "ts")?;
        humantime::parse_rfc3339_weak(&ts).map_err(|_| FrameError::BadField("ts"))?;
        let kind = string(&fields, "type")?;
        let (body, allowed): (FrameBody, &[&str]) = match kind.as_str() {
            "heartbeat" => (FrameBody::Heartbeat, &[]),
            "heartbeat_ack" => (
                FrameBody::HeartbeatAck {
                    ack_id: string(&fields, "ackId")?,
                },
                &["ackId"],
            ),
            "receipt_ack" => (
                FrameBody::ReceiptAck {
                    ack_id: string(&fields, "ackId")?,
                },
                &["ackId"],
            ),
            "deliver" => {
                let deliver = Deliver {
                    from_agent_did: string(&fields, "fromAgentDid")?,
                    to_agent_did: string(&fields, "toAgentDid")?,
                    payload: fields
                        .get("payload")
                        .cloned()
                        .ok_or(FrameError::BadField("payload"))?,
                    delivery_source: optional_string(&fields, "deliverySource")?,
                    content_type: optional_string(&fields, "contentType")?,
                    group_id: optional_string(&fields, "groupId")?,
                    conversation_id: optional_string(&fields, "conversationId")?,
                    reply_to: optional_string(&fields, "replyTo")?,
                };
                let allowed: &[&str] = &[
                    "fromAgentDid",
                    "toAgentDid",
                    "payload",
                    "deliverySource",
                    "contentType",
                    "groupId",
                    "conversationId",
                    "replyTo",
                ];
                (FrameBody::Deliver(Box::new(deliver)), allowed)
            }
            "deliver_ack" => {
                let body = FrameBody::DeliverAck {
                    ack_id: string(&fields, "ackId")?,
                    accepted: fields
                        .get("accepted")
                        .and_then(Value::as_bool)
                        .ok_or(FrameError::BadField("accepted"))?,
                    reason: optional_string(&fields, "reason")?,
                };
                (body, &["ackId", "accepted", "reason"])
            }
            "receipt" => {
                let status = ReceiptStatus::parse(&string(&fields, "status")?)
                    .ok_or(FrameError::BadField("status"))?;
                let reason = optional_string(&fields, "reason")?;
                let body = FrameBody::Receipt {
                    original_frame_id: string(&fields, "originalFrameId")?,
                    to_agent_did: string(&fields, "toAgentDid")?,
                    status,
                    reason,
                };
                (body, &["originalFrameId", "toAgentDid", "status", "reason"])
            }
            _ => return Err(FrameError::UnknownType(kind)),
        };
        let common = ["v", "type", "id", "ts"];
        if let Some(unknown) = fields
            .keys()
            .find(|k| !common.contains(&k.as_str()) && !allowed.contains(&k.as_str()))
        {
            return Err(FrameError::UnknownField(unknown.clone()));
        }
        Ok(Frame { id, ts, body })
    }
}

/// A required non-empty string field.
fn string(fields: &Map<String, Value>, name: &'static str) -> Result<String, FrameError> {
    match fields.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        _ => Err(FrameError::BadField(name)),
    }
}

/// An optional string field: absent, or a string (possibly empty).
fn optional_string(
    fields: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<String>, FrameError> {
    match fields.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(FrameError::BadField(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips() {
        let bodies = [
            FrameBody::Heartbeat,
            FrameBody::HeartbeatAck {
                ack_id: "01HZX4M3Q8V2J7K9T6R5W1N0PB".into(),
            },
            FrameBody::ReceiptAck {
                ack_id: "01HZX4M3Q8V2J7K9T6R5W1N0PB".into(),
            },
            FrameBody::Receipt {
                original_frame_id: "pair.accepted:a:b:1".into(),
                to_agent_did: "did:cdi:a.b:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB".into(),
                status: ReceiptStatus::DeadLettered,
                reason: Some("hook gone".into()),
            },
            FrameBody::Receipt {
                original_frame_id: "r1".into(),
                to_agent_did: "did:cdi:a.b:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB".into(),
                status: ReceiptStatus::DeliveredToWebhook,
                reason: None,
            },
            FrameBody::Deliver(Box::new(Deliver {
                from_agent_did: "did:cdi:a.b:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB".into(),
                to_agent_did: "did:cdi:a.b:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC".into(),
                payload: json!({"system": {"type": "pair.accepted"}}),
                delivery_source: Some("proxy.events.queue.pair_accepted".into()),
                content_type: None,
                group_id: Some("grp_01HZX4M3Q8V2J7K9T6R5W1N0PB".into()),
                conversation_id: None,
                reply_to: None,
            })),
            FrameBody::DeliverAck {
                ack_id: "01HZX4M3Q8V2J7K9T6R5W1N0PB".into(),
                accepted: false,
                reason: Some("full".into()),
            },
        ];
        for body in bodies {
            let frame = Frame::new(body);
            assert_eq!(Frame::parse(&frame.to_json()), Ok(frame));
        }
    }

    #[test]
    fn malformed_frames_are_refused() {
        let id = "01HZX4M3Q8V2J7K9T6R5W1N0PB";
        let ts = "2026-11-24T10:00:00.000Z";
        let cases = [
            ("[]".to_owned(), FrameError::NotAnObject),
            (
                format!(r#"{{"v":2,"type":"heartbeat","id":"{id}","ts":"{ts}"}}"#),
                FrameError::BadField("v"),
            ),
            (
                format!(r#"{{"v":1,"type":"heartbeat","id":"x","ts":"{ts}"}}"#),
                FrameError::BadField("id"),
            ),
            (
                format!(r#"{{"v":1,"type":"heartbeat","id":"{id}","ts":"yesterday"}}"#),
                FrameError::BadField("ts"),
            ),
            (
                format!(r#"{{"v":1,"type":"nudge","id":"{id}","ts":"{ts}"}}"#),
                FrameError::UnknownType("nudge".into()),
            ),
            (
                format!(
                    r#"{{"v":1,"type":"notification","id":"{id}","ts":"{ts}","requestId":"r","message":"m"}}"#
                ),
                FrameError::UnknownType("notification".into()),
            ),
            (
                format!(r#"{{"v":1,"type":"heartbeat","id":"{id}","ts":"{ts}","extra":1}}"#),
                FrameError::UnknownField("extra".into()),
            ),
            (
                format!(r#"{{"v":1,"type":"receipt_ack","id":"{id}","ts":"{ts}"}}"#),
                FrameError::BadField("ackId"),
            ),
            (
                format!(r#"{{"v":1,"type":"deliver_ack","id":"{id}","ts":"{ts}","ackId":"{id}"}}"#),
                FrameError::BadField("accepted"),
            ),
            (
                format!(
                    r#"{{"v":1,"type":"deliver","id":"{id}","ts":"{ts}","fromAgentDid":"a","toAgentDid":"b"}}"#
                ),
                FrameError::BadField("payload"),
            ),
            (
                format!(
                    r#"{{"v":1,"type":"deliver","id":"{id}","ts":"{ts}","fromAgentDid":"a","toAgentDid":"b","payload":1,"groupId":null}}"#
                ),
                FrameError::BadField("groupId"),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Frame::parse(&text), Err(want), "{text}");
        }
        let huge = format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_FRAME_BYTES));
        assert!(matches!(Frame::parse(&huge), Err(FrameError::TooLarge(_))));
    }
}
