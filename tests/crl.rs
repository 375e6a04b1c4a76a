//! End to end: revocations published over HTTP reach the trust store through the real
//! CRL-invalidation component, with every row of spec section 2's outcome table.

use crate::support::*;
use serde_json::{Value, json};

#[test]
fn a_published_revocation_makes_the_agent_revoked() {
    let host = Host::start(&fast_events_config(""));
    assert!(!host.is_revoked(DID_A));
    host.publish(
        "clawdentity-events",
        revocation_event("agent_revoked", json!({"agentDid": DID_A})),
    );
    wait_for("the agent to be revoked", || {
        host.is_revoked(DID_A).then_some(())
    });
    let (_, trust) = host.get(&format!("/v1/trust/agents/{DID_A}"));
    assert!(
        trust["revokedAt"].as_str().unwrap().ends_with('Z'),
        "{trust}"
    );
    assert!(!host.is_revoked(DID_B));
}

#[test]
fn every_row_of_the_outcome_table() {
    let host = Host::start(&fast_events_config(""));
    let human = "did:cdi:registry.clawdentity.com:human:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    // (body, the reason it is acknowledged unhandled with, if it is)
    let rows: Vec<(Value, Option<&str>)> = vec![
        (json!("not an object"), Some("malformed")),
        (json!([1, 2, 3]), Some("malformed")),
        (json!({"id": "x", "data": {}}), Some("invalid_field")),
        (json!({"type": "   "}), Some("invalid_field")),
        (json!({"type": "agent.auth.issued", "data": {}}), None),
        (
            json!({"type": "agent.auth.exploded", "data": {}}),
            Some("unknown_type"),
        ),
        (
            revocation_event("session_revoked", json!({"agentDid": DID_B})),
            None,
        ),
        (
            revocation_event("agent_revoked", json!({})),
            Some("invalid_field"),
        ),
        (
            revocation_event("agent_revoked", json!({"agentDid": human})),
            Some("invalid_field"),
        ),
        (
            revocation_event("agent_revoked", json!({"agentDid": DID_A})),
            None,
        ),
    ];
    let bodies: Vec<Value> = rows.iter().map(|(body, _)| body.clone()).collect();
    let ids = host.publish_batch("clawdentity-events", &bodies);
    // A body that is not JSON at all, as text.
    let (status, reply) = host.post(
        "/v1/queues/clawdentity-events/messages",
        &json!({"body": "{not json", "content_type": "text"}),
    );
    assert_eq!(status, 200, "{reply}");
    let text_id = reply["id"].as_str().unwrap().to_owned();

    let status = host.wait_drained("clawdentity-events");
    assert_eq!(status["dead_lettered"], 0, "every row is acked: {status}");
    assert!(host.is_revoked(DID_A));
    assert!(
        !host.is_revoked(DID_B),
        "a session revocation does not revoke the agent"
    );
    for ((body, reason), id) in rows.iter().zip(&ids) {
        let warned = host.log_lines(&["WARN", "crl-invalidation", id]);
        assert_eq!(
            warned.len(),
            usize::from(reason.is_some()),
            "{body}: {warned:?}"
        );
        if let Some(reason) = reason {
            let line = &warned[0].text;
            assert!(line.contains("acknowledged unhandled"), "{line}");
            assert!(line.contains(&format!("reason=\"{reason}\"")), "{line}");
        }
    }
    host.wait_log_all(&[
        "WARN",
        "crl-invalidation",
        &text_id,
        "text body is not JSON",
    ]);
}

#[test]
fn a_transient_trust_store_failure_is_retried() {
    let host = Host::start(&fast_events_config("retry_delay = 1\nmax_retries = 50\n"));
    // Take the trust store's table away so that the handler's revocation cannot commit:
    // the batch is released (not acked) and tried again.
    let db = rusqlite::Connection::open(host.data_dir().join("clawq.db")).unwrap();
    db.execute_batch("ALTER TABLE revoked_agents RENAME TO revoked_agents_away")
        .unwrap();
    host.publish(
        "clawdentity-events",
        revocation_event("agent_revoked", json!({"agentDid": DID_A})),
    );
    host.wait_log_all(&[
        "side effects were not committed",
        "no such table: revoked_agents",
        "released without counting an attempt",
    ]);
    let (status, body) = host.get(&format!("/v1/trust/agents/{DID_A}"));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("storage_unavailable")),
        "{body}"
    );
    db.execute_batch("ALTER TABLE revoked_agents_away RENAME TO revoked_agents")
        .unwrap();

    wait_for("the retried revocation", || {
        host.is_revoked(DID_A).then_some(())
    });
    let status = host.wait_drained("clawdentity-events");
    assert_eq!(status["dead_lettered"], 0, "{status}");
}
