//! Events of the `clawdentity-events` queue (spec sections 2 and 5): their types, and the
//! deliveries to an agent that `pair.accepted` and `group.member.joined` turn into.

use serde_json::{Map, Value, json};

use crate::did::is_ulid;
use crate::fields::Fields;
use crate::problem::Problem;

/// An agent's credentials were revoked (spec section 2).
pub const AGENT_AUTH_REVOKED: &str = "agent.auth.revoked";
/// Two agents paired (a flat object, published by the proxy).
pub const PAIR_ACCEPTED: &str = "pair.accepted";
/// An agent joined a group (an envelope, published by the registry).
pub const GROUP_MEMBER_JOINED: &str = "group.member.joined";

/// Every event type the registry and the proxy publish on the events queue.
pub const KNOWN_TYPES: [&str; 6] = [
    "agent.auth.issued",
    "agent.auth.refreshed",
    AGENT_AUTH_REVOKED,
    "agent.auth.refresh_rejected",
    GROUP_MEMBER_JOINED,
    PAIR_ACCEPTED,
];

/// The event types that become a delivery to an agent ([`agent_delivery`]).
pub const DELIVERED_TYPES: [&str; 2] = [PAIR_ACCEPTED, GROUP_MEMBER_JOINED];

/// The `deliverySource` of a `pair.accepted` delivery.
pub const PAIR_ACCEPTED_SOURCE: &str = "proxy.events.queue.pair_accepted";
/// The `deliverySource` of a `group.member.joined` delivery.
pub const GROUP_MEMBER_JOINED_SOURCE: &str = "proxy.events.queue.group_member_joined";
/// The payload `type` of a `group.member.joined` delivery.
pub const GROUP_MEMBER_JOINED_PAYLOAD_TYPE: &str = "clawdentity:group-member-joined";

/// The roles a group member may have.
const ROLES: [&str; 2] = ["member", "admin"];

/// The event's `type`, trimmed; an error unless it is one of [`KNOWN_TYPES`].
pub fn event_type<'a>(event: &Fields<'a>) -> Result<&'a str, Problem> {
    let kind = event.string("type")?;
    if KNOWN_TYPES.contains(&kind) {
        Ok(kind)
    } else {
        Err(Problem::unknown_type(format!(
            "unknown event type `{kind}`"
        )))
    }
}

/// What an event hands to one agent's relay session (spec section 5).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentDelivery {
    /// The same event always gives the same key.
    pub dedup_key: String,
    /// The agent the delivery is from.
    pub from_agent_did: String,
    /// The agent whose session receives it.
    pub to_agent_did: String,
    /// The payload handed to the agent's hook.
    pub payload: Value,
    /// Where it comes from ([`PAIR_ACCEPTED_SOURCE`] or [`GROUP_MEMBER_JOINED_SOURCE`]).
    pub delivery_source: &'static str,
    /// The group it concerns, for a group event.
    pub group_id: Option<String>,
}

/// The delivery an event asks for: `None` for a known event type that is not delivered
/// to an agent. The error says which field is wrong, or that the type is unknown.
pub fn agent_delivery(event: &Map<String, Value>) -> Result<Option<AgentDelivery>, Problem> {
    let event = Fields::new(event);
    match event_type(&event)? {
        PAIR_ACCEPTED => pair_accepted(&event).map(Some),
        GROUP_MEMBER_JOINED => group_member_joined(&event.object("data", "data.")?).map(Some),
        _ => Ok(None),
    }
}

/// `pair.accepted` (a flat object) → a delivery to the initiator, from the responder.
fn pair_accepted(event: &Fields) -> Result<AgentDelivery, Problem> {
    let initiator = event.agent_did("initiatorAgentDid")?;
    let responder = event.agent_did("responderAgentDid")?;
    let profile = event.object("responderProfile", "responderProfile.")?;
    let responder_profile = json!({
        "agentName": profile.string("agentName")?,
        "humanName": profile.string("humanName")?,
        "proxyOrigin": profile.string("proxyOrigin")?,
    });
    let issuer_proxy_origin = event.string("issuerProxyOrigin")?;
    let timestamp = event.string("eventTimestampUtc")?;
    let mut system = json!({
        "type": PAIR_ACCEPTED,
        "initiatorAgentDid": initiator,
        "responderAgentDid": responder,
        "responderProfile": responder_profile,
        "issuerProxyOrigin": issuer_proxy_origin,
        "eventTimestampUtc": timestamp,
    });
    if let Some(message) = event.optional_string("message")? {
        system["message"] = message.into();
    }
    Ok(AgentDelivery {
        dedup_key: format!("{PAIR_ACCEPTED}:{initiator}:{responder}:{timestamp}"),
        from_agent_did: responder.to_owned(),
        to_agent_did: initiator.to_owned(),
        payload: json!({ "system": system }),
        delivery_source: PAIR_ACCEPTED_SOURCE,
        group_id: None,
    })
}

/// `group.member.joined` (an envelope; `data` given) → a delivery to the recipient, from
/// the agent that joined.
fn group_member_joined(data: &Fields) -> Result<AgentDelivery, Problem> {
    let recipient = data.agent_did("recipientAgentDid")?;
    let joined = data.agent_did("joinedAgentDid")?;
    let joined_name = data.string("joinedAgentName")?;
    let group_id = data.string("groupId")?;
    if !group_id.strip_prefix("grp_").is_some_and(is_ulid) {
        return Err(Problem::invalid_field(
            &data.path("groupId"),
            format!("`{group_id}` is not grp_ followed by a ULID"),
        ));
    }
    let group_name = data.string("groupName")?;
    let role = data.string("role")?;
    if !ROLES.contains(&role) {
        return Err(Problem::invalid_field(
            &data.path("role"),
            format!("`{role}` is not member or admin"),
        ));
    }
    let joined_at = data.string("joinedAt")?;
    let message = match data.optional_string("message")? {
        Some(message) => message.to_owned(),
        None => format!("{joined_name} joined {group_name}."),
    };
    Ok(AgentDelivery {
        dedup_key: format!("{GROUP_MEMBER_JOINED}:{group_id}:{joined}:{recipient}:{joined_at}"),
        from_agent_did: joined.to_owned(),
        to_agent_did: recipient.to_owned(),
        payload: json!({
            "type": GROUP_MEMBER_JOINED_PAYLOAD_TYPE,
            "event": GROUP_MEMBER_JOINED,
            "message": message,
            "groupId": group_id,
            "groupName": group_name,
            "joinedAgentDid": joined,
            "joinedAgentName": joined_name,
            "role": role,
            "joinedAt": joined_at,
        }),
        delivery_source: GROUP_MEMBER_JOINED_SOURCE,
        group_id: Some(group_id.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ProblemKind;
    use std::collections::BTreeSet;

    use crate::samples::{A, B, GROUP, TS, member_joined as joined, pair_accepted as pair};

    fn delivery(event: &Value) -> Result<Option<AgentDelivery>, Problem> {
        agent_delivery(event.as_object().unwrap())
    }

    fn keys(value: &Value) -> BTreeSet<&str> {
        value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn pair_accepted_is_delivered_to_the_initiator() {
        let d = delivery(&pair()).unwrap().unwrap();
        assert_eq!(d.dedup_key, format!("pair.accepted:{A}:{B}:{TS}"));
        assert_eq!((d.from_agent_did.as_str(), d.to_agent_did.as_str()), (B, A));
        assert_eq!(d.delivery_source, "proxy.events.queue.pair_accepted");
        assert_eq!(d.group_id, None);
        assert_eq!(keys(&d.payload), BTreeSet::from(["system"]));
        let system = &d.payload["system"];
        assert_eq!(
            keys(system),
            BTreeSet::from([
                "type",
                "initiatorAgentDid",
                "responderAgentDid",
                "responderProfile",
                "issuerProxyOrigin",
                "eventTimestampUtc"
            ])
        );
        assert_eq!(system["type"], "pair.accepted");
        assert_eq!(system["initiatorAgentDid"], A);
        assert_eq!(system["responderAgentDid"], B);
        assert_eq!(
            system["responderProfile"],
            json!({"agentName": "beta", "humanName": "Bea", "proxyOrigin": "https://b.example"})
        );
        assert_eq!(system["issuerProxyOrigin"], "https://a.example");
        assert_eq!(system["eventTimestampUtc"], TS);

        let mut with_message = pair();
        with_message["message"] = "beta accepted".into();
        let d = delivery(&with_message).unwrap().unwrap();
        assert_eq!(keys(&d.payload["system"]).len(), 7);
        assert_eq!(d.payload["system"]["message"], "beta accepted");
    }

    #[test]
    fn group_member_joined_is_delivered_to_the_recipient() {
        let d = delivery(&joined()).unwrap().unwrap();
        assert_eq!(
            d.dedup_key,
            format!("group.member.joined:{GROUP}:{A}:{B}:{TS}")
        );
        assert_eq!((d.from_agent_did.as_str(), d.to_agent_did.as_str()), (A, B));
        assert_eq!(d.delivery_source, "proxy.events.queue.group_member_joined");
        assert_eq!(d.group_id.as_deref(), Some(GROUP));
        assert_eq!(
            d.payload,
            json!({"type": "clawdentity:group-member-joined", "event": "group.member.joined",
                "message": "alpha joined builders.", "groupId": GROUP, "groupName": "builders",
                "joinedAgentDid": A, "joinedAgentName": "alpha", "role": "member", "joinedAt": TS})
        );
        let mut given = joined();
        given["data"]["message"] = "welcome alpha".into();
        given["data"]["role"] = "admin".into();
        let d = delivery(&given).unwrap().unwrap();
        assert_eq!(
            (&d.payload["message"], &d.payload["role"]),
            (&json!("welcome alpha"), &json!("admin"))
        );
        assert_eq!(keys(&d.payload).len(), 9);
    }

    #[test]
    fn padded_dids_and_type_are_trimmed() {
        let mut padded = pair();
        padded["type"] = " pair.accepted ".into();
        padded["initiatorAgentDid"] = format!("  {A}\n").into();
        let d = delivery(&padded).unwrap().unwrap();
        assert_eq!(d.to_agent_did, A);
        assert_eq!(d.dedup_key, format!("pair.accepted:{A}:{B}:{TS}"));
        assert_eq!(d.payload["system"]["initiatorAgentDid"], A);
    }

    #[test]
    fn each_invalid_field_is_named() {
        let human = "did:cdi:registry.clawdentity.com:human:01HZX4M3Q8V2J7K9T6R5W1N0PB";
        let pair_cases = [
            ("initiatorAgentDid", json!(human), "initiatorAgentDid `"),
            (
                "responderAgentDid",
                json!(null),
                "responderAgentDid is not a string",
            ),
            (
                "responderProfile",
                json!("beta"),
                "responderProfile is not an object",
            ),
            (
                "responderProfile",
                json!({"agentName": "b", "humanName": "B"}),
                "responderProfile.proxyOrigin is missing",
            ),
            (
                "responderProfile",
                json!({"agentName": 1, "humanName": "B", "proxyOrigin": "o"}),
                "responderProfile.agentName is not a string",
            ),
            (
                "issuerProxyOrigin",
                json!("  "),
                "issuerProxyOrigin is blank",
            ),
            (
                "eventTimestampUtc",
                json!(5),
                "eventTimestampUtc is not a string",
            ),
            ("message", json!(5), "message is not a string"),
        ];
        for (field, value, want) in pair_cases {
            let mut event = pair();
            event[field] = value;
            let err = delivery(&event).unwrap_err();
            assert_eq!(err.kind, ProblemKind::InvalidField, "{field}: {err}");
            assert!(err.detail.starts_with(want), "{field}: {err}");
        }
        let group_cases = [
            (
                "recipientAgentDid",
                json!("did:cdi:x"),
                "data.recipientAgentDid `did:cdi:x`",
            ),
            ("joinedAgentDid", json!(""), "data.joinedAgentDid is blank"),
            (
                "joinedAgentName",
                json!(null),
                "data.joinedAgentName is not a string",
            ),
            (
                "groupId",
                json!("01HZX4M3Q8V2J7K9T6R5W1N0PE"),
                "data.groupId `01HZX4M3Q8V2J7K9T6R5W1N0PE` is not grp_",
            ),
            (
                "groupId",
                json!("grp_nope"),
                "data.groupId `grp_nope` is not grp_",
            ),
            ("groupName", json!(" "), "data.groupName is blank"),
            (
                "role",
                json!("owner"),
                "data.role `owner` is not member or admin",
            ),
            ("joinedAt", json!([]), "data.joinedAt is not a string"),
        ];
        for (field, value, want) in group_cases {
            let mut event = joined();
            event["data"][field] = value;
            let err = delivery(&event).unwrap_err();
            assert_eq!(err.kind, ProblemKind::InvalidField, "{field}: {err}");
            assert!(err.detail.starts_with(want), "{field}: {err}");
        }
        let mut no_data = joined();
        no_data.as_object_mut().unwrap().remove("data");
        assert_eq!(delivery(&no_data).unwrap_err().detail, "data is missing");
    }

    #[test]
    fn types_are_classified() {
        for kind in [
            "agent.auth.issued",
            "agent.auth.revoked",
            " agent.auth.refreshed ",
        ] {
            assert_eq!(delivery(&json!({"type": kind})), Ok(None), "{kind}");
        }
        let err = delivery(&json!({"type": "agent.auth.exploded"})).unwrap_err();
        assert_eq!(err.kind, ProblemKind::UnknownType);
        assert_eq!(err.detail, "unknown event type `agent.auth.exploded`");
        let err = delivery(&json!({"id": "x"})).unwrap_err();
        assert_eq!(
            (err.kind, err.detail.as_str()),
            (ProblemKind::InvalidField, "type is missing")
        );
    }
}
