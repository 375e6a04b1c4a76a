//! End to end: clawdentity's real traffic (spec section 5). Its producers enqueue the
//! JSON *text* of each message, so every event and receipt is published here as the
//! object, as a JSON string holding it and as a `text` body, and must be handled the same;
//! the lenient rules hold end to end; what cannot be handled is acked and counted; and
//! the bundled event router is on by default, taking exactly the events it delivers.

use std::collections::BTreeSet;

use crate::support::*;
use serde_json::{Value, json};

const EVENTS: &str = "clawdentity-events";
const RECEIPTS: &str = "clawdentity-receipts";
const GROUP: &str = "grp_01HZX4M3Q8V2J7K9T6R5W1N0PE";
const TS: &str = "2026-11-25T10:00:00.000Z";

/// How a body is put on the wire.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    /// `{"body": {...}}`.
    Object,
    /// `{"body": "{...}"}`: what `queue.send(JSON.stringify(event))` publishes.
    JsonString,
    /// `{"body": "{...}", "content_type": "text"}`.
    Text,
}

const ENCODINGS: [Encoding; 3] = [Encoding::Object, Encoding::JsonString, Encoding::Text];

/// Publishes `body` to `queue` in `encoding`; returns the message id.
fn publish_as(host: &Host, queue: &str, body: &Value, encoding: Encoding) -> String {
    let request = match encoding {
        Encoding::Object => json!({"body": body}),
        Encoding::JsonString => json!({"body": body.to_string()}),
        Encoding::Text => json!({"body": body.to_string(), "content_type": "text"}),
    };
    let (status, reply) = host.post(&format!("/v1/queues/{queue}/messages"), &request);
    assert_eq!(status, 200, "{reply}");
    reply["id"].as_str().unwrap().to_owned()
}

/// A valid agent DID numbered `n` (0..=9).
fn agent(n: usize) -> String {
    format!("did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0{n}Z")
}

/// A config whose queues and event router batch quickly, with `extra` appended.
fn interop_config(extra: &str) -> String {
    fast_config(&format!(
        "[[queues.consumers]]\nqueue = \"{EVENTS}\"\nname = \"event-router\"\nmax_batch_timeout = 0.05\n\n{extra}"
    ))
}

fn pair_accepted(initiator: &str, responder: &str) -> Value {
    json!({
        "type": "pair.accepted", "initiatorAgentDid": initiator, "responderAgentDid": responder,
        "responderProfile": {"agentName": "beta", "humanName": "Bea", "proxyOrigin": "https://b.example"},
        "issuerProxyOrigin": "https://a.example", "eventTimestampUtc": TS
    })
}

fn member_joined(recipient: &str, joined: &str) -> Value {
    json!({
        "id": "evt-join", "type": "group.member.joined", "version": "v1",
        "timestampUtc": TS, "initiatedByAccountId": null,
        "data": {
            "recipientAgentDid": recipient, "joinedAgentDid": joined, "joinedAgentName": "alpha",
            "groupId": GROUP, "groupName": "builders", "role": "member", "joinedAt": TS
        }
    })
}

/// The next receipt frame on `socket`, skipping heartbeats.
fn next_receipt(socket: &mut Socket) -> Value {
    let frame = next_frame(socket);
    assert_eq!(frame["type"], "receipt", "{frame}");
    frame
}

/// Checks a receipt frame field by field, with its exact key set.
fn assert_receipt_frame(frame: &Value, request_id: &str, reason: Option<&str>) {
    let mut want: BTreeSet<&str> = BTreeSet::from([
        "v",
        "type",
        "id",
        "ts",
        "originalFrameId",
        "toAgentDid",
        "status",
    ]);
    if reason.is_some() {
        want.insert("reason");
    }
    assert_eq!(json_keys(frame), want, "{frame}");
    assert_eq!(frame["v"], 1, "{frame}");
    assert_eq!(frame["type"], "receipt", "{frame}");
    assert_eq!(frame["id"].as_str().unwrap().len(), 26, "a ULID: {frame}");
    assert!(frame["ts"].as_str().unwrap().ends_with('Z'), "{frame}");
    assert_eq!(frame["originalFrameId"], request_id, "{frame}");
    assert_eq!(frame["toAgentDid"], DID_B, "{frame}");
    assert_eq!(frame["status"], "dead_lettered", "{frame}");
    if let Some(reason) = reason {
        assert_eq!(frame["reason"], reason, "{frame}");
    }
}

#[test]
fn a_revocation_revokes_in_every_encoding_and_a_padded_agent_did_is_trimmed() {
    let host = Host::start(&interop_config(""));
    let mut dids = Vec::new();
    for (i, encoding) in ENCODINGS.into_iter().enumerate() {
        for (j, pad) in [false, true].into_iter().enumerate() {
            let did = agent(2 * i + j);
            let written = if pad {
                format!("  {did}\t")
            } else {
                did.clone()
            };
            let event = revocation_event("agent_revoked", json!({"agentDid": written}));
            publish_as(&host, EVENTS, &event, encoding);
            dids.push(did);
        }
    }
    for did in &dids {
        wait_for(&format!("{did} to be revoked"), || {
            let (status, trust) = host.get(&format!("/v1/trust/agents/{did}"));
            assert_eq!(status, 200, "{trust}");
            (trust["revoked"] == true).then_some(())
        });
    }
    let status = host.wait_drained(EVENTS);
    assert_eq!(status["dead_lettered"], 0, "{status}");
    assert!(host.log_lines(&["acknowledged unhandled"]).is_empty());
}

#[test]
fn a_receipt_reaches_the_sender_in_every_encoding_field_by_field() {
    let host = Host::start(&interop_config(""));
    let token = host.add_agent(DID_A);
    let mut socket = host.connect(DID_A, Some(&token)).unwrap();
    for (i, encoding) in ENCODINGS.into_iter().enumerate() {
        let receipt = receipt(
            &format!("req-{i}"),
            DID_A,
            DID_B,
            "dead_lettered",
            Some("hook down"),
        );
        publish_as(&host, RECEIPTS, &receipt, encoding);
        let frame = next_receipt(&mut socket);
        assert_receipt_frame(&frame, &format!("req-{i}"), Some("hook down"));
    }
}

#[test]
fn lenient_receipts_are_routed() {
    let host = Host::start(&interop_config(""));
    let token = host.add_agent(DID_A);
    let mut socket = host.connect(DID_A, Some(&token)).unwrap();
    let base = |id: &str| receipt(id, DID_A, DID_B, "dead_lettered", None);
    // (receipt, the request id and reason its frame must carry)
    let mut cases: Vec<(Value, &str, Option<&str>)> = Vec::new();
    let mut padded_reason = base("req-padded-reason");
    padded_reason["reason"] = "  hook down \n".into();
    cases.push((padded_reason, "req-padded-reason", Some("hook down")));
    let mut blank_reason = base("req-blank-reason");
    blank_reason["reason"] = "   ".into();
    cases.push((blank_reason, "req-blank-reason", None));
    let mut number_reason = base("req-number-reason");
    number_reason["reason"] = 42.into();
    cases.push((number_reason, "req-number-reason", None));
    let mut bad_time = base("req-bad-time");
    bad_time["processedAt"] = "yesterday-ish".into();
    cases.push((bad_time, "req-bad-time", None));
    // Padded DIDs, type and request id are trimmed.
    let mut padded = base(" req-padded \t");
    padded["type"] = " delivery_receipt ".into();
    padded["senderAgentDid"] = format!("  {DID_A} ").into();
    padded["recipientAgentDid"] = format!("{DID_B}\n").into();
    cases.push((padded, "req-padded", None));

    for (receipt, request_id, reason) in &cases {
        for encoding in ENCODINGS {
            publish_as(&host, RECEIPTS, receipt, encoding);
        }
        // The same receipt three times: recorded once, pushed once.
        let frame = next_receipt(&mut socket);
        assert_receipt_frame(&frame, request_id, *reason);
    }
    host.wait_drained(RECEIPTS);
    assert!(
        host.log_lines(&["acknowledged unhandled"]).is_empty(),
        "every lenient receipt is routed"
    );
}

/// The value of the sample `name` whose labels include every one of `labels` (0 when
/// there is none).
fn sample(host: &Host, name: &str, labels: &[(&str, &str)]) -> f64 {
    find_sample(&host.scrape(), name, labels).unwrap_or(0.0)
}

#[test]
fn what_cannot_be_handled_is_acked_and_counted_by_reason() {
    let host = Host::start(&interop_config(""));
    // Events queue: two malformed bodies, one unknown type, and two invalid fields (a
    // revocation without agentDid for the CRL handler, a pairing without its initiator
    // for the event router, which alone takes it).
    publish_as(&host, EVENTS, &json!("not an object"), Encoding::Object);
    let (status, _) = host.post(
        &format!("/v1/queues/{EVENTS}/messages"),
        &json!({"body": "{not json", "content_type": "text"}),
    );
    assert_eq!(status, 200);
    publish_as(
        &host,
        EVENTS,
        &json!({"type": "agent.auth.exploded"}),
        Encoding::JsonString,
    );
    publish_as(
        &host,
        EVENTS,
        &revocation_event("agent_revoked", json!({})),
        Encoding::Text,
    );
    let mut no_initiator = pair_accepted(DID_A, DID_B);
    no_initiator
        .as_object_mut()
        .unwrap()
        .remove("initiatorAgentDid");
    publish_as(&host, EVENTS, &no_initiator, Encoding::JsonString);
    // Receipts queue: one malformed, one of another type, one with an invalid DID.
    publish_as(&host, RECEIPTS, &json!([1, 2]), Encoding::Object);
    publish_as(&host, RECEIPTS, &json!({"type": "receipt"}), Encoding::Text);
    publish_as(
        &host,
        RECEIPTS,
        &receipt("r", "did:cdi:x", DID_B, "dead_lettered", None),
        Encoding::JsonString,
    );

    for queue in [EVENTS, RECEIPTS] {
        let status = host.wait_drained(queue);
        assert_eq!(
            status["dead_lettered"], 0,
            "acked, not dead-lettered: {status}"
        );
    }
    let counted = |queue: &str, reason: &str| {
        sample(
            &host,
            "clawq_messages_unhandled_total",
            &[("queue", queue), ("reason", reason)],
        )
    };
    assert_eq!(counted(EVENTS, "malformed"), 2.0);
    assert_eq!(counted(EVENTS, "unknown_type"), 1.0);
    assert_eq!(counted(EVENTS, "invalid_field"), 2.0);
    assert_eq!(counted(RECEIPTS, "malformed"), 1.0);
    assert_eq!(counted(RECEIPTS, "unknown_type"), 1.0);
    assert_eq!(counted(RECEIPTS, "invalid_field"), 1.0);
    let line = host.wait_log_all(&[
        "event-router",
        "acknowledged unhandled",
        "initiatorAgentDid is missing",
    ]);
    assert!(
        line.text.contains("reason=\"invalid_field\""),
        "{}",
        line.text
    );
}

#[test]
fn the_event_router_is_a_default_consumer_of_the_events_queue() {
    let host = Host::start("");
    let status = host.queue(EVENTS);
    assert_eq!(status["handler"], "crl-invalidation", "{status}");
    let consumers = status["consumers"].as_array().unwrap();
    let names: Vec<&str> = consumers
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [EVENTS, "event-router"], "{status}");
    assert_eq!(consumers[0]["filter"], json!({}), "{status}");
    assert_eq!(consumers[1]["handler"], "event-router", "{status}");
    assert_eq!(
        consumers[1]["filter"],
        json!({"type": ["pair.accepted", "group.member.joined"]}),
        "{status}"
    );
    let (status, slot) = host.admin("GET", "/v1/handlers/event-router", vec![], None);
    assert_eq!(status, 200, "{slot}");
    assert_eq!(slot["world"], "event-router", "{slot}");
    assert_eq!(slot["queue"], EVENTS, "{slot}");
}

#[test]
fn the_event_router_takes_exactly_the_pair_and_group_events_in_every_encoding() {
    // The router's batch waits long enough (60 s, fewer than 10 messages) for its lane
    // to be read; its handler and filter are the defaults.
    let host = Host::start(&fast_config(&format!(
        "[[queues.consumers]]\nqueue = \"{EVENTS}\"\nname = \"event-router\"\nmax_batch_timeout = 60\n"
    )));
    let mut routed = BTreeSet::new();
    // A padded type is read trimmed, by the filter as by the router.
    let mut padded = pair_accepted(DID_A, DID_B);
    padded["type"] = " pair.accepted\t".into();
    routed.insert(publish_as(&host, EVENTS, &padded, Encoding::JsonString));
    for encoding in ENCODINGS {
        routed.insert(publish_as(
            &host,
            EVENTS,
            &pair_accepted(DID_A, DID_B),
            encoding,
        ));
        routed.insert(publish_as(
            &host,
            EVENTS,
            &member_joined(DID_B, DID_A),
            encoding,
        ));
    }
    for encoding in ENCODINGS {
        let event = revocation_event(
            "agent_revoked",
            json!({"agentDid": agent(encoding as usize)}),
        );
        publish_as(&host, EVENTS, &event, encoding);
        publish_as(
            &host,
            EVENTS,
            &json!({"type": "agent.auth.issued"}),
            encoding,
        );
    }
    publish_as(&host, EVENTS, &json!("pair.accepted"), Encoding::Text);

    // The CRL handler handles every event; the router's copies wait for its batch.
    wait_for("the CRL handler's lane to drain", || {
        let status = host.queue(EVENTS);
        let crl = &status["consumers"][0];
        (crl["name"] == EVENTS && crl["backlog"] == 0 && crl["in_flight"] == 0).then_some(())
    });
    let (status, page) = host.get(&format!("/v1/queues/{EVENTS}/messages?limit=1000"));
    assert_eq!(status, 200, "{page}");
    let held: BTreeSet<String> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["consumer"], "event-router", "{m}");
            m["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(held, routed);
}

#[test]
fn the_event_router_handles_each_pair_and_group_event() {
    let host = Host::start(&interop_config(""));
    let pair_key = format!("pair.accepted:{DID_A}:{DID_B}:{TS}");
    let join_key = format!("group.member.joined:{GROUP}:{DID_A}:{DID_B}:{TS}");
    let mut expected = Vec::new();
    for encoding in ENCODINGS {
        let id = publish_as(&host, EVENTS, &pair_accepted(DID_A, DID_B), encoding);
        expected.push((id, pair_key.clone(), DID_A));
        let id = publish_as(&host, EVENTS, &member_joined(DID_B, DID_A), encoding);
        expected.push((id, join_key.clone(), DID_B));
    }
    // Each event reaches the session of the agent it is for: the router's log line names
    // the message, the dedup key and the agent, whatever the session answers.
    for (id, key, to) in &expected {
        host.wait_log_all(&["event-router", &format!("message {id}: "), key, to]);
    }
    let status = host.wait_drained(EVENTS);
    assert_eq!(status["dead_lettered"], 0, "{status}");
}
