//! What an event asks of the CRL-invalidation handler: the pure part of spec section 2,
//! kept apart from the capability calls so that it can be tested natively.

use clawq_protocol::body::{ContentType, read_object};
use clawq_protocol::event::{AGENT_AUTH_REVOKED, event_type};
use clawq_protocol::fields::Fields;
use clawq_protocol::problem::Problem;

/// The revocation reason that means the agent itself (not one session) is revoked.
const AGENT_REVOKED: &str = "agent_revoked";

/// What to do with one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Mark this agent DID (trimmed, valid) revoked.
    Revoke(String),
    /// Nothing to do for this handler; acknowledge quietly.
    Ignore,
    /// Cannot be handled: acknowledge it unhandled, saying why.
    Unhandled(Problem),
}

/// Reads an event body, in any encoding the protocol accepts, and decides what it asks
/// for.
pub fn decide(content_type: ContentType, body: &[u8]) -> Decision {
    match revoked_agent(content_type, body) {
        Ok(Some(did)) => Decision::Revoke(did),
        Ok(None) => Decision::Ignore,
        Err(problem) => Decision::Unhandled(problem),
    }
}

/// The agent an event revokes, if it is an agent revocation.
fn revoked_agent(content_type: ContentType, body: &[u8]) -> Result<Option<String>, Problem> {
    let event = read_object(content_type, body).map_err(|e| Problem::malformed(e.to_string()))?;
    let event = Fields::new(&event);
    if event_type(&event)? != AGENT_AUTH_REVOKED {
        return Ok(None);
    }
    let data = event.object("data", "data.")?;
    if data.lenient_string("reason") != Some(AGENT_REVOKED) {
        return Ok(None);
    }
    let metadata = data.object("metadata", "data.metadata.")?;
    Ok(Some(metadata.agent_did("agentDid")?.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawq_protocol::event::KNOWN_TYPES;
    use clawq_protocol::problem::ProblemKind;
    use serde_json::{Value, json};

    const DID: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";

    fn revoked(reason: &str, metadata: Value) -> Vec<u8> {
        json!({
            "id": "evt-1", "type": "agent.auth.revoked", "version": "v1",
            "timestampUtc": "2026-11-24T10:00:00.000Z", "initiatedByAccountId": null,
            "data": {"reason": reason, "metadata": metadata}
        })
        .to_string()
        .into_bytes()
    }

    fn json(body: &[u8]) -> Decision {
        decide(ContentType::Json, body)
    }

    /// The kind of problem of an unhandled decision.
    fn unhandled(d: Decision) -> Option<ProblemKind> {
        match d {
            Decision::Unhandled(problem) => Some(problem.kind),
            _ => None,
        }
    }

    #[test]
    fn revokes_an_agent_revocation_in_every_encoding() {
        let body = revoked("agent_revoked", json!({"agentDid": DID}));
        let text = String::from_utf8(body.clone()).unwrap();
        let string = Value::String(text.clone()).to_string();
        assert_eq!(json(&body), Decision::Revoke(DID.into()));
        assert_eq!(json(string.as_bytes()), Decision::Revoke(DID.into()));
        assert_eq!(
            decide(ContentType::Text, text.as_bytes()),
            Decision::Revoke(DID.into())
        );
    }

    #[test]
    fn a_padded_agent_did_is_trimmed_and_revoked() {
        let body = revoked("agent_revoked", json!({"agentDid": format!("  {DID} \n")}));
        assert_eq!(json(&body), Decision::Revoke(DID.into()));
    }

    #[test]
    fn malformed_bodies_are_unhandled() {
        for body in [&b"not json"[..], b"[1,2]", b"\"text\""] {
            assert_eq!(
                unhandled(json(body)),
                Some(ProblemKind::Malformed),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            unhandled(decide(
                ContentType::Bytes,
                &revoked("agent_revoked", json!({"agentDid": DID}))
            )),
            Some(ProblemKind::Malformed)
        );
        for body in [&b"{}"[..], br#"{"type":"  "}"#] {
            assert_eq!(unhandled(json(body)), Some(ProblemKind::InvalidField));
        }
    }

    #[test]
    fn other_known_types_are_ignored() {
        for kind in KNOWN_TYPES.iter().filter(|k| **k != "agent.auth.revoked") {
            let body = json!({"type": kind, "data": {}}).to_string();
            assert_eq!(json(body.as_bytes()), Decision::Ignore, "{kind}");
        }
    }

    #[test]
    fn unknown_types_are_unhandled() {
        let d = json(br#"{"type":"agent.auth.exploded"}"#);
        assert_eq!(unhandled(d), Some(ProblemKind::UnknownType));
    }

    #[test]
    fn session_revocations_are_ignored() {
        let body = revoked("session_revoked", json!({"agentDid": DID}));
        assert_eq!(json(&body), Decision::Ignore);
    }

    #[test]
    fn missing_or_invalid_dids_are_unhandled_naming_the_field() {
        for metadata in [
            json!({}),
            json!({"agentDid": 42}),
            json!({"agentDid": "did:cdi:registry.clawdentity.com:human:01HZX4M3Q8V2J7K9T6R5W1N0PB"}),
        ] {
            match json(&revoked("agent_revoked", metadata.clone())) {
                Decision::Unhandled(p) => {
                    assert_eq!(p.kind, ProblemKind::InvalidField, "{metadata}");
                    assert!(p.detail.starts_with("data.metadata.agentDid"), "{p}");
                }
                other => panic!("{metadata}: {other:?}"),
            }
        }
    }
}
