//! What an event asks of the CRL-invalidation handler: the pure part of spec section 2,
//! kept apart from the capability calls so that it can be tested natively.

use clawq_protocol::did::validate_agent_did;
use serde_json::Value;

/// Event types the registry and the proxy publish on the events queue.
const KNOWN_TYPES: [&str; 6] = [
    "agent.auth.issued",
    "agent.auth.refreshed",
    "agent.auth.revoked",
    "agent.auth.refresh_rejected",
    "group.member.joined",
    "pair.accepted",
];

/// The revocation reason that means the agent itself (not one session) is revoked.
const AGENT_REVOKED: &str = "agent_revoked";

/// What to do with one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Mark this agent DID revoked.
    Revoke(String),
    /// Nothing to do for this handler; acknowledge quietly.
    Ignore,
    /// Malformed or unknown; acknowledge with a warning saying why.
    Skip(String),
}

/// Reads an event body and decides what it asks for.
pub fn decide(body: &[u8]) -> Decision {
    let Ok(Value::Object(event)) = serde_json::from_slice::<Value>(body) else {
        return Decision::Skip("body is not a JSON object".into());
    };
    let kind = match event.get("type").and_then(Value::as_str).map(str::trim) {
        Some(kind) if !kind.is_empty() => kind,
        _ => return Decision::Skip("event has no type".into()),
    };
    if !KNOWN_TYPES.contains(&kind) {
        return Decision::Skip(format!("unknown event type `{kind}`"));
    }
    if kind != "agent.auth.revoked" {
        return Decision::Ignore;
    }
    let data = event.get("data");
    if data.and_then(|d| d.get("reason")).and_then(Value::as_str) != Some(AGENT_REVOKED) {
        return Decision::Ignore;
    }
    let did = data
        .and_then(|d| d.get("metadata"))
        .and_then(|m| m.get("agentDid"))
        .and_then(Value::as_str);
    match did {
        None => Decision::Skip("agent.auth.revoked without data.metadata.agentDid".into()),
        Some(did) => match validate_agent_did(did) {
            Ok(()) => Decision::Revoke(did.to_owned()),
            Err(err) => Decision::Skip(format!("invalid agentDid `{did}`: {err}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

    fn is_skip(d: Decision) -> bool {
        matches!(d, Decision::Skip(_))
    }

    #[test]
    fn revokes_an_agent_revocation() {
        let body = revoked("agent_revoked", json!({"agentDid": DID}));
        assert_eq!(decide(&body), Decision::Revoke(DID.into()));
    }

    #[test]
    fn malformed_bodies_are_skipped() {
        for body in [
            &b"not json"[..],
            b"[1,2]",
            b"\"text\"",
            b"{}",
            br#"{"type":"  "}"#,
        ] {
            assert!(is_skip(decide(body)), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn other_known_types_are_ignored() {
        for kind in KNOWN_TYPES.iter().filter(|k| **k != "agent.auth.revoked") {
            let body = json!({"type": kind, "data": {}}).to_string();
            assert_eq!(decide(body.as_bytes()), Decision::Ignore, "{kind}");
        }
    }

    #[test]
    fn unknown_types_are_skipped() {
        assert!(is_skip(decide(br#"{"type":"agent.auth.exploded"}"#)));
    }

    #[test]
    fn session_revocations_are_ignored() {
        let body = revoked("session_revoked", json!({"agentDid": DID}));
        assert_eq!(decide(&body), Decision::Ignore);
    }

    #[test]
    fn missing_or_invalid_dids_are_skipped() {
        for metadata in [
            json!({}),
            json!({"agentDid": 42}),
            json!({"agentDid": "did:cdi:registry.clawdentity.com:human:01HZX4M3Q8V2J7K9T6R5W1N0PB"}),
        ] {
            assert!(is_skip(decide(&revoked("agent_revoked", metadata))));
        }
    }
}
