//! Sample messages in clawdentity's exact shapes, for the tests of this crate and of the
//! handler components.

use serde_json::{Value, json};

/// A valid agent DID.
pub const A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
/// Another valid agent DID.
pub const B: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";
/// A valid group id.
pub const GROUP: &str = "grp_01HZX4M3Q8V2J7K9T6R5W1N0PE";
/// The time every sample happened.
pub const TS: &str = "2026-11-24T10:00:00.000Z";

/// A `pair.accepted` event: `A` initiated, `B` accepted.
pub fn pair_accepted() -> Value {
    json!({"type": "pair.accepted", "initiatorAgentDid": A, "responderAgentDid": B,
        "responderProfile": {"agentName": "beta", "humanName": "Bea", "proxyOrigin": "https://b.example"},
        "issuerProxyOrigin": "https://a.example", "eventTimestampUtc": TS})
}

/// A `group.member.joined` envelope: `A` joined `GROUP`, `B` is told.
pub fn member_joined() -> Value {
    json!({"id": "evt-1", "type": "group.member.joined", "version": "v1",
        "timestampUtc": TS, "initiatedByAccountId": null,
        "data": {"recipientAgentDid": B, "joinedAgentDid": A, "joinedAgentName": "alpha",
            "groupId": GROUP, "groupName": "builders", "role": "member", "joinedAt": TS}})
}
