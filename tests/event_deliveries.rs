//! End to end: `pair.accepted` and `group.member.joined` events published to the real
//! host become `deliver` frames to the agent concerned (the bundled event-router and the
//! relay session), which `clawq connect` stores, acknowledges and POSTs to the agent's
//! hook (docs/protocol.md sections 5 to 8).

use std::collections::BTreeSet;

use crate::support::*;
use serde_json::{Value, json};

const EVENTS: &str = "clawdentity-events";
const RECEIPTS: &str = "clawdentity-receipts";
const GROUP: &str = "grp_01HZX4M3Q8V2J7K9T6R5W1N0PG";

/// Both events consumers and the receipts queue batch at once.
fn config() -> String {
    fast_config(
        "[[queues.consumers]]\nqueue = \"clawdentity-events\"\nname = \"event-router\"\nmax_batch_timeout = 0.05\n",
    )
}

/// A `pair.accepted` event of `initiator` and `responder` at `at`.
fn pair_accepted(initiator: &str, responder: &str, at: &str) -> Value {
    json!({
        "type": "pair.accepted",
        "initiatorAgentDid": initiator,
        "responderAgentDid": responder,
        "responderProfile": {"agentName": "beta", "humanName": "Ida", "proxyOrigin": "https://proxy.b.example"},
        "issuerProxyOrigin": "https://proxy.a.example",
        "eventTimestampUtc": at,
    })
}

/// A `group.member.joined` envelope telling `recipient` that `joined` joined.
fn member_joined(recipient: &str, joined: &str, message: Option<&str>) -> Value {
    let mut data = json!({
        "recipientAgentDid": recipient, "joinedAgentDid": joined, "joinedAgentName": "beta",
        "groupId": GROUP, "groupName": "Research", "role": "member",
        "joinedAt": "2026-11-24T10:00:00.000Z",
    });
    if let Some(message) = message {
        data["message"] = message.into();
    }
    json!({
        "id": "evt-joined-1", "type": "group.member.joined", "version": "v1",
        "timestampUtc": "2026-11-24T10:00:00.000Z", "initiatedByAccountId": null, "data": data,
    })
}

/// Publishes `body` on `queue` in one of the three shapes producers use: the object,
/// the JSON string of it, or a `text` body holding it.
fn publish_as(host: &Host, queue: &str, body: &Value, shape: &str) {
    let message = match shape {
        "object" => json!({"body": body}),
        "string" => json!({"body": body.to_string()}),
        "text" => json!({"body": body.to_string(), "content_type": "text"}),
        other => panic!("no shape {other}"),
    };
    let (status, reply) = host.post(&format!("/v1/queues/{queue}/messages"), &message);
    assert_eq!(status, 200, "{reply}");
}

/// The next `deliver` frame on `socket`, checked to be one: its envelope and its exact
/// key set are the spec's.
fn next_deliver(socket: &mut Socket) -> Value {
    let frame = next_frame(socket);
    assert_eq!(frame["type"], "deliver", "{frame}");
    assert_eq!(frame["v"], 1);
    let id = frame["id"].as_str().unwrap();
    assert!(id.len() == 26 && id.parse::<ulid::Ulid>().is_ok(), "{id}");
    assert!(frame["ts"].as_str().unwrap().ends_with('Z'), "{frame}");
    frame
}

/// Acknowledges the deliver frame `frame` as stored.
fn ack(socket: &mut Socket, frame: &Value) {
    send_frame(
        socket,
        &crate::support::frame(
            "deliver_ack",
            json!({"ackId": frame["id"], "accepted": true}),
        ),
    );
}

/// Proves that `socket` gets nothing but heartbeats before a fresh receipt for `did`:
/// publishes the receipt, expects its frame to be the next one and acknowledges it.
fn expect_nothing_before_a_probe(host: &Host, socket: &mut Socket, did: &str, probe: &str) {
    host.publish(
        RECEIPTS,
        receipt(probe, did, DID_B, "delivered_to_webhook", None),
    );
    let frame = next_frame(socket);
    assert_eq!(
        (&frame["type"], &frame["originalFrameId"]),
        (&json!("receipt"), &json!(probe)),
        "a frame came before the probe receipt: {frame}"
    );
    send_frame(
        socket,
        &crate::support::frame("receipt_ack", json!({"ackId": frame["id"]})),
    );
    wait_for("the host to record the receipt_ack", || {
        (host.get("/v1/relay").1["receipts_pending"] == 0).then_some(())
    });
}

#[test]
fn pair_accepted_reaches_the_initiator_as_a_deliver_frame_in_every_body_shape() {
    let host = Host::start(&config());
    let token = host.add_agent(DID_A);
    let mut socket = host.connect(DID_A, Some(&token)).unwrap();

    for (i, shape) in ["object", "string", "text"].into_iter().enumerate() {
        let at = format!("2026-11-24T10:00:0{i}.000Z");
        let event = pair_accepted(DID_A, DID_B, &at);
        publish_as(&host, EVENTS, &event, shape);
        let frame = next_deliver(&mut socket);
        assert_eq!(
            json_keys(&frame),
            BTreeSet::from([
                "v",
                "type",
                "id",
                "ts",
                "fromAgentDid",
                "toAgentDid",
                "payload",
                "deliverySource"
            ]),
            "{shape}: {frame}"
        );
        assert_eq!(frame["fromAgentDid"], DID_B, "{shape}");
        assert_eq!(frame["toAgentDid"], DID_A, "{shape}");
        assert_eq!(frame["deliverySource"], "proxy.events.queue.pair_accepted");
        let mut system = event.clone();
        system["type"] = "pair.accepted".into();
        assert_eq!(
            frame["payload"],
            json!({"system": system}),
            "{shape}: the payload is the event's fields, without a message it did not have"
        );
        ack(&mut socket, &frame);
    }

    // The same event again (a redelivery of the producer): the session holds its key.
    let event = pair_accepted(DID_A, DID_B, "2026-11-24T10:00:00.000Z");
    publish_as(&host, EVENTS, &event, "string");
    host.wait_drained(EVENTS);
    expect_nothing_before_a_probe(&host, &mut socket, DID_A, "probe-1");
}

#[test]
fn a_delivery_made_while_offline_arrives_on_connect_and_not_again_after_its_ack() {
    let host = Host::start(&config());
    let token = host.add_agent(DID_A);
    let mut event = pair_accepted(DID_A, DID_B, "2026-11-24T11:00:00.000Z");
    event["message"] = "Pairing complete.".into();
    host.publish(EVENTS, event.clone());
    host.wait_drained(EVENTS);

    let mut socket = host.connect(DID_A, Some(&token)).unwrap();
    let frame = next_deliver(&mut socket);
    assert_eq!(frame["payload"]["system"]["message"], "Pairing complete.");
    assert_eq!(frame["payload"]["system"]["initiatorAgentDid"], DID_A);

    // Unacknowledged, it is pushed again while the connector stays connected.
    let again = next_deliver(&mut socket);
    assert_eq!(
        again["id"], frame["id"],
        "the same delivery, the same frame"
    );
    ack(&mut socket, &again);
    expect_nothing_before_a_probe(&host, &mut socket, DID_A, "probe-1");
    drop(socket);

    let mut socket = host.connect(DID_A, Some(&token)).unwrap();
    expect_nothing_before_a_probe(&host, &mut socket, DID_A, "probe-2");
}

#[test]
fn group_member_joined_reaches_the_recipients_hook_through_clawq_connect() {
    let host = Host::start(&config());
    let token = host.add_agent(DID_A);
    let hook = FakeHook::start();
    let dir = tempfile::tempdir().unwrap();
    let connector = Connector::start(&host, DID_A, &token, &hook.url, dir.path());

    publish_as(&host, EVENTS, &member_joined(DID_A, DID_B, None), "text");
    let request = hook.wait_requests(1).remove(0);
    let headers = &request.headers;
    assert_eq!(
        headers["content-type"],
        "application/vnd.clawdentity.delivery+json"
    );
    assert_eq!(headers["x-clawdentity-agent-did"], DID_B);
    assert_eq!(headers["x-clawdentity-to-agent-did"], DID_A);
    assert_eq!(headers["x-clawdentity-verified"], "true");
    assert_eq!(headers["x-clawdentity-group-id"], GROUP);
    assert_eq!(headers["x-hook-token"], "hook-secret");
    let request_id = headers["x-request-id"].clone();
    assert!(request_id.parse::<ulid::Ulid>().is_ok(), "{request_id}");

    let body = &request.body;
    assert_eq!(
        json_keys(body),
        BTreeSet::from([
            "type",
            "requestId",
            "fromAgentDid",
            "toAgentDid",
            "payload",
            "groupId",
            "relayMetadata"
        ]),
        "{body}"
    );
    assert_eq!(body["type"], "clawdentity.delivery.v1");
    assert_eq!(body["requestId"], request_id.as_str());
    assert_eq!(
        (&body["fromAgentDid"], &body["toAgentDid"], &body["groupId"]),
        (&json!(DID_B), &json!(DID_A), &json!(GROUP))
    );
    assert_eq!(
        body["payload"],
        json!({
            "type": "clawdentity:group-member-joined", "event": "group.member.joined",
            "message": "beta joined Research.", "groupId": GROUP, "groupName": "Research",
            "joinedAgentDid": DID_B, "joinedAgentName": "beta", "role": "member",
            "joinedAt": "2026-11-24T10:00:00.000Z",
        })
    );
    let metadata = &body["relayMetadata"];
    assert_eq!(
        json_keys(metadata),
        BTreeSet::from(["timestamp", "deliverySource", "groupName"]),
        "{metadata}"
    );
    assert_eq!(
        metadata["deliverySource"],
        "proxy.events.queue.group_member_joined"
    );
    assert_eq!(metadata["groupName"], "Research");
    assert!(metadata["timestamp"].as_str().unwrap().ends_with('Z'));

    // The connector acknowledged it (once the host has that ack, the session holds
    // nothing pending): after a restart of the connector nothing comes again but the
    // probe receipt.
    wait_for("the host to record the deliver_ack", || {
        (host.get("/v1/relay").1["deliveries_pending"] == 0).then_some(())
    });
    connector.log.wait_for(&["posted", "to the hook"]);
    drop(connector);
    let _connector = Connector::start(&host, DID_A, &token, &hook.url, dir.path());
    host.publish(
        RECEIPTS,
        receipt("probe", DID_A, DID_B, "delivered_to_webhook", None),
    );
    let requests = hook.wait_requests(2);
    assert_eq!(requests[1].body["requestId"], "probe", "{:?}", requests[1]);
    assert_eq!(hook.requests().len(), 2);
}

#[test]
fn events_the_event_router_cannot_deliver_are_acked_and_counted_unhandled() {
    let host = Host::start(&config());
    let mut bad_group = member_joined(DID_A, DID_B, None);
    bad_group["data"]["groupId"] = "group-7".into();
    let mut bad_pair = pair_accepted(
        DID_A,
        "did:cdi:registry.clawdentity.com:human:01HZX4M3Q8V2J7K9T6R5W1N0PB",
        "t",
    );
    bad_pair["eventTimestampUtc"] = "2026-11-24T10:00:00.000Z".into();
    host.publish(EVENTS, bad_group);
    host.publish(EVENTS, bad_pair);
    host.wait_drained(EVENTS);
    host.wait_log_all(&["message acknowledged unhandled", "invalid_field", "groupId"]);
    host.wait_log_all(&[
        "message acknowledged unhandled",
        "invalid_field",
        "responderAgentDid",
    ]);
    let metrics = wait_for("the unhandled counter", || {
        let text = host.metrics_text();
        text.lines()
            .any(|l| {
                l.starts_with("clawq_messages_unhandled_total{")
                    && l.contains("queue=\"clawdentity-events\"")
                    && l.contains("reason=\"invalid_field\"")
                    && l.ends_with(" 2")
            })
            .then_some(text)
    });
    assert!(!metrics.is_empty());
}
