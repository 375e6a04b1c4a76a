//! End to end: a receipt published to the host reaches the sender agent's local webhook
//! (a fake OpenClaw) through the real `clawq connect` (spec section 4), and so does a
//! `deliver` frame (spec section 5).

use std::collections::{BTreeMap, BTreeSet};

use crate::support::*;
use serde_json::{Value, json};

const RECEIPTS: &str = "clawdentity-receipts";
const RECEIPT_CONTENT_TYPE: &str = "application/vnd.clawdentity.receipt+json";
const DELIVERY_CONTENT_TYPE: &str = "application/vnd.clawdentity.delivery+json";
const GROUP: &str = "grp_01HZX4M3Q8V2J7K9T6R5W1N0PB";

#[test]
fn receipts_reach_the_hook_and_dead_letters_as_system_notifications() {
    let host = Host::start(&fast_config(""));
    let token = host.add_agent(DID_A);
    let hook = FakeHook::start();
    let dir = tempfile::tempdir().unwrap();
    let _connector = Connector::start(&host, DID_A, &token, &hook.url, dir.path());

    let delivered = receipt("req-1", DID_A, DID_B, "delivered_to_webhook", None);
    host.publish(RECEIPTS, delivered.clone());
    host.publish(RECEIPTS, delivered); // duplicate: one notification
    host.publish(
        RECEIPTS,
        receipt(
            "req-2",
            DID_A,
            DID_B,
            "dead_lettered",
            Some("recipient hook unreachable"),
        ),
    );

    let requests = hook.wait_requests(2);
    let (first, second) = (&requests[0], &requests[1]);
    for (request, id) in [(first, "req-1"), (second, "req-2")] {
        assert_eq!(request.headers["content-type"], RECEIPT_CONTENT_TYPE);
        assert_eq!(request.headers["x-clawdentity-to-agent-did"], DID_B);
        assert_eq!(request.headers["x-clawdentity-verified"], "true");
        assert_eq!(request.headers["x-request-id"], id);
        assert_eq!(request.headers["x-hook-token"], "hook-secret");
        assert_eq!(request.body["type"], "clawdentity.receipt.v1");
        assert_eq!(request.body["requestId"], id);
        assert_eq!(request.body["toAgentDid"], DID_B);
        assert!(
            request.body["relayMetadata"]["timestamp"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
    }
    assert_eq!(first.body["status"], "delivered_to_webhook");
    assert!(
        first.body.get("reason").is_none() && first.body.get("message").is_none(),
        "{}",
        first.body
    );
    assert_eq!(second.body["status"], "dead_lettered");
    assert_eq!(second.body["reason"], "recipient hook unreachable");
    assert_eq!(
        second.body["message"],
        format!("Your message req-2 to {DID_B} could not be delivered: recipient hook unreachable")
    );
    assert_eq!(
        hook.requests().len(),
        2,
        "the duplicate receipt made no second notification"
    );
}

#[test]
fn receipts_published_while_offline_arrive_after_a_host_restart_and_connect() {
    let mut host = Host::start(&fast_config(""));
    let token = host.add_agent(DID_A);
    let token_b = host.add_agent(DID_B);
    host.publish(
        RECEIPTS,
        receipt("offline", DID_A, DID_B, "dead_lettered", Some("expired")),
    );
    host.publish(
        RECEIPTS,
        receipt("for-b", DID_B, DID_A, "delivered_to_webhook", None),
    );
    host.wait_drained(RECEIPTS);
    host.kill_and_restart();

    let (hook_a, hook_b) = (FakeHook::start(), FakeHook::start());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _a = Connector::start(&host, DID_A, &token, &hook_a.url, dir_a.path());
    let _b = Connector::start(&host, DID_B, &token_b, &hook_b.url, dir_b.path());
    assert_eq!(hook_a.wait_requests(1)[0].body["requestId"], "offline");
    assert_eq!(hook_b.wait_requests(1)[0].body["requestId"], "for-b");
    host.publish(
        RECEIPTS,
        receipt("later", DID_A, DID_B, "delivered_to_webhook", None),
    );
    let a = hook_a.wait_requests(2);
    assert_eq!(a[1].body["requestId"], "later");
    assert_eq!(hook_b.requests().len(), 1, "B never sees A's receipts");
}

#[test]
fn a_receipt_waits_in_the_outbox_while_the_hook_is_down_even_across_a_connector_restart() {
    let host = Host::start(&fast_config(""));
    let token = host.add_agent(DID_A);
    let hook = FakeHook::start();
    hook.set_down(true);
    let dir = tempfile::tempdir().unwrap();
    let mut connector = Connector::start(&host, DID_A, &token, &hook.url, dir.path());

    host.publish(
        RECEIPTS,
        receipt("kept", DID_A, DID_B, "dead_lettered", Some("gone")),
    );
    connector
        .log
        .wait_for(&["did not take receipt", "retrying in"]);
    connector.kill();

    // The connector is gone; the host has the receipt acked; only the outbox has it.
    hook.set_down(false);
    let _restarted = Connector::start(&host, DID_A, &token, &hook.url, dir.path());
    let requests = hook.wait_requests(1);
    assert_eq!(requests[0].body["requestId"], "kept");
    assert_eq!(requests[0].body["status"], "dead_lettered");
}

#[test]
fn a_hook_that_is_not_listening_gets_the_receipt_once_it_comes_up() {
    let host = Host::start(&fast_config(""));
    let token = host.add_agent(DID_A);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/hooks/message");
    let connector = Connector::start(&host, DID_A, &token, &url, dir.path());

    host.publish(
        RECEIPTS,
        receipt("refused", DID_A, DID_B, "delivered_to_webhook", None),
    );
    connector
        .log
        .wait_for(&["did not take receipt", "retrying in"]);
    let hook = FakeHook::start_on_port(port);
    assert_eq!(hook.wait_requests(1)[0].body["requestId"], "refused");
}

#[test]
fn a_wrong_token_stops_the_connector_with_a_clear_error() {
    let host = Host::start(&fast_config(""));
    host.add_agent(DID_A);
    let dir = tempfile::tempdir().unwrap();
    let connector = Connector::start(
        &host,
        DID_A,
        "cqa_wrong",
        "http://127.0.0.1:9/hooks/message",
        dir.path(),
    );
    connector.log.wait_for(&["refused agent", DID_A]);
}

/// Checks that `ack` is the `deliver_ack` of `deliver`, field by field.
fn assert_deliver_ack(ack: &Value, deliver: &Value, refusal: Option<&str>) {
    let mut want = BTreeSet::from(["accepted", "ackId", "id", "ts", "type", "v"]);
    if refusal.is_some() {
        want.insert("reason");
    }
    assert_eq!(json_keys(ack), want, "{ack}");
    assert_eq!(ack["v"], 1, "{ack}");
    assert_eq!(ack["type"], "deliver_ack", "{ack}");
    let id = ack["id"].as_str().unwrap();
    assert!(
        id.len() == 26 && id.parse::<ulid::Ulid>().is_ok() && id != deliver["id"],
        "a fresh ULID: {ack}"
    );
    assert!(
        ack["ts"]
            .as_str()
            .is_some_and(|ts| humantime::parse_rfc3339(ts).is_ok()),
        "{ack}"
    );
    assert_eq!(ack["ackId"], deliver["id"], "{ack}");
    assert_eq!(ack["accepted"], refusal.is_none(), "{ack}");
    if let Some(refusal) = refusal {
        assert!(ack["reason"].as_str().unwrap().contains(refusal), "{ack}");
    }
}

#[test]
fn deliver_frames_are_acked_once_stored_and_posted_to_the_hook() {
    let relay = FakeRelay::start(DID_A, "cqa_test");
    let hook = FakeHook::start();
    let dir = tempfile::tempdir().unwrap();
    let connector = Connector::start_at(&relay.base, DID_A, "cqa_test", &hook.url, dir.path());
    let mut socket = relay.accept();

    let deliver = frame(
        "deliver",
        json!({
            "fromAgentDid": DID_B, "toAgentDid": DID_A,
            "payload": {"type": "clawdentity:group-member-joined", "groupName": "builders",
                        "message": "beta joined builders."},
            "deliverySource": "proxy.events.queue.group_member_joined",
            "contentType": "application/json", "groupId": GROUP,
            "conversationId": "conv-1", "replyTo": "req-0"
        }),
    );
    send_frame(&mut socket, &deliver);
    assert_deliver_ack(&next_frame(&mut socket), &deliver, None);
    // Pushed again (as the host does until it sees the ack): acked again, posted once.
    send_frame(&mut socket, &deliver);
    assert_deliver_ack(&next_frame(&mut socket), &deliver, None);
    // A delivery for another agent is refused and never posted.
    let stray = frame(
        "deliver",
        json!({"fromAgentDid": DID_A, "toAgentDid": DID_B, "payload": null}),
    );
    send_frame(&mut socket, &stray);
    assert_deliver_ack(
        &next_frame(&mut socket),
        &stray,
        Some(&format!("speaks for {DID_A}, not for {DID_B}")),
    );
    connector.log.wait_for(&[
        "refusing delivery",
        DID_B,
        "(1 refused since the connector started)",
    ]);

    let request = hook.wait_requests(1).remove(0);
    let headers: BTreeMap<&str, &str> = request
        .headers
        .iter()
        .filter(|(name, _)| name.starts_with("x-") || name.as_str() == "content-type")
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let id = deliver["id"].as_str().unwrap();
    assert_eq!(
        headers,
        BTreeMap::from([
            ("content-type", DELIVERY_CONTENT_TYPE),
            ("x-clawdentity-agent-did", DID_B),
            ("x-clawdentity-group-id", GROUP),
            ("x-clawdentity-to-agent-did", DID_A),
            ("x-clawdentity-verified", "true"),
            ("x-hook-token", "hook-secret"),
            ("x-request-id", id),
        ])
    );
    assert_eq!(
        request.body,
        json!({
            "type": "clawdentity.delivery.v1", "requestId": id,
            "fromAgentDid": DID_B, "toAgentDid": DID_A,
            "payload": deliver["payload"],
            "conversationId": "conv-1", "groupId": GROUP,
            "relayMetadata": {
                "timestamp": deliver["ts"],
                "deliverySource": "proxy.events.queue.group_member_joined",
                "contentType": "application/json", "replyTo": "req-0", "groupName": "builders"
            }
        })
    );

    // A receipt after them is the hook's second request: nothing else was posted.
    let receipt = frame(
        "receipt",
        json!({"originalFrameId": "req-9", "toAgentDid": DID_B, "status": "delivered_to_webhook"}),
    );
    send_frame(&mut socket, &receipt);
    let ack = next_frame(&mut socket);
    assert_eq!(
        (&ack["type"], &ack["ackId"]),
        (&json!("receipt_ack"), &receipt["id"])
    );
    let requests = hook.wait_requests(2);
    assert_eq!(requests[1].body["requestId"], "req-9");
    assert_eq!(hook.requests().len(), 2, "the delivery was posted once");
}

#[test]
fn an_acked_delivery_survives_a_killed_connector_and_a_bare_one_has_only_the_required_fields() {
    let relay = FakeRelay::start(DID_A, "cqa_test");
    let hook = FakeHook::start();
    hook.set_down(true);
    let dir = tempfile::tempdir().unwrap();
    let mut connector = Connector::start_at(&relay.base, DID_A, "cqa_test", &hook.url, dir.path());
    let mut socket = relay.accept();
    let deliver = frame(
        "deliver",
        json!({"fromAgentDid": DID_A, "toAgentDid": DID_A, "payload": {"system": {"type": "x"}}}),
    );
    send_frame(&mut socket, &deliver);
    assert_deliver_ack(&next_frame(&mut socket), &deliver, None);
    connector
        .log
        .wait_for(&["did not take delivery", "retrying in"]);
    // Acked, so only the outbox has it: it survives a SIGKILL of the connector.
    connector.kill();
    drop(socket);
    hook.set_down(false);
    let _restarted = Connector::start_at(&relay.base, DID_A, "cqa_test", &hook.url, dir.path());
    let request = hook.wait_requests(1).remove(0);
    assert_eq!(request.headers["content-type"], DELIVERY_CONTENT_TYPE);
    assert!(!request.headers.contains_key("x-clawdentity-group-id"));
    assert_eq!(
        request.body,
        json!({"type": "clawdentity.delivery.v1", "requestId": deliver["id"],
               "fromAgentDid": DID_A, "toAgentDid": DID_A, "payload": {"system": {"type": "x"}},
               "relayMetadata": {"timestamp": deliver["ts"]}})
    );
}

#[test]
fn notifications_left_by_an_older_connector_reach_the_hook_as_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    {
        // The outbox as a connector that still took `notification` frames left it.
        let db = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
        db.execute_batch(
            "CREATE TABLE outbox (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, frame_id TEXT NOT NULL UNIQUE,
                original_frame_id TEXT NOT NULL, to_agent_did TEXT NOT NULL, status TEXT NOT NULL,
                reason TEXT, frame_ts TEXT NOT NULL, stored_ms INTEGER NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0, next_attempt_ms INTEGER NOT NULL);
             CREATE TABLE seen (frame_id TEXT PRIMARY KEY, received_ms INTEGER NOT NULL);
             INSERT INTO outbox (frame_id, original_frame_id, to_agent_did, status, reason, frame_ts,
                                 stored_ms, next_attempt_ms)
             VALUES ('01HZX4M3Q8V2J7K9T6R5W1N0PD', 'dead-letter-digest:x:3', '', 'notification',
                     '3 of your messages could not be delivered', '2026-11-24T10:00:00.000Z',
                     unixepoch() * 1000, 0);",
        )
        .unwrap();
    }
    let relay = FakeRelay::start(DID_A, "cqa_test");
    let hook = FakeHook::start();
    let connector = Connector::start_at(&relay.base, DID_A, "cqa_test", &hook.url, dir.path());
    connector
        .log
        .wait_for(&["notification 01HZX4M3Q8V2J7K9T6R5W1N0PD", "older connector"]);
    let request = hook.wait_requests(1).remove(0);
    assert_eq!(request.headers["content-type"], DELIVERY_CONTENT_TYPE);
    assert_eq!(
        request.body,
        json!({"type": "clawdentity.delivery.v1", "requestId": "01HZX4M3Q8V2J7K9T6R5W1N0PD",
               "fromAgentDid": DID_A, "toAgentDid": DID_A,
               "payload": {"system": {"type": "clawq.notification",
                                      "requestId": "dead-letter-digest:x:3",
                                      "message": "3 of your messages could not be delivered"}},
               "relayMetadata": {"timestamp": "2026-11-24T10:00:00.000Z",
                                 "deliverySource": "clawq.notification"}})
    );
}

/// The dead-letter digest example (`components/examples/dead-letter-digest`).
const DIGEST: &str = clawq_test_guests::DEAD_LETTER_DIGEST;

#[test]
fn a_dead_letter_digest_reaches_the_hook_as_a_delivery_through_the_host() {
    let digest = format!(
        "[[queues.consumers]]\nqueue = \"{RECEIPTS}\"\nname = \"dead-letter-digest\"\n\
         handler = \"{DIGEST}\"\nworld = \"receipt-handler\"\nmax_batch_timeout = 0.05\n\
         filter = {{ type = \"delivery_receipt\", status = \"dead_lettered\" }}\n"
    );
    let host = Host::start(&fast_config(&digest));
    let token = host.add_agent(DID_A);
    let hook = FakeHook::start();
    let dir = tempfile::tempdir().unwrap();
    let connector = Connector::start(&host, DID_A, &token, &hook.url, dir.path());
    for n in 1..=3 {
        host.publish(
            RECEIPTS,
            receipt(
                &format!("req-{n}"),
                DID_A,
                DID_B,
                "dead_lettered",
                Some("gone"),
            ),
        );
    }

    // The router's three receipts and the digest's one delivery.
    let requests = hook.wait_requests(4);
    let deliveries: Vec<&HookRequest> = requests
        .iter()
        .filter(|r| r.headers["content-type"] == DELIVERY_CONTENT_TYPE)
        .collect();
    assert_eq!(deliveries.len(), 1, "{requests:?}");
    let request = deliveries[0];
    let id = request.body["requestId"].as_str().unwrap();
    assert!(
        id.parse::<ulid::Ulid>().is_ok(),
        "the deliver frame's id: {id}"
    );
    assert_eq!(request.headers["x-request-id"], id);
    assert_eq!(request.headers["x-clawdentity-agent-did"], DID_A);
    assert_eq!(request.headers["x-clawdentity-to-agent-did"], DID_A);
    assert_eq!(request.headers["x-clawdentity-verified"], "true");
    assert!(!request.headers.contains_key("x-clawdentity-group-id"));
    let body = &request.body;
    assert_eq!(
        json_keys(body),
        BTreeSet::from([
            "fromAgentDid",
            "payload",
            "relayMetadata",
            "requestId",
            "toAgentDid",
            "type"
        ])
    );
    assert_eq!(body["type"], "clawdentity.delivery.v1");
    assert_eq!(
        (&body["fromAgentDid"], &body["toAgentDid"]),
        (&json!(DID_A), &json!(DID_A))
    );
    assert_eq!(
        json_keys(&body["relayMetadata"]),
        BTreeSet::from(["deliverySource", "timestamp"])
    );
    assert_eq!(
        body["relayMetadata"]["deliverySource"],
        "clawq.examples.dead-letter-digest"
    );
    let system = &body["payload"]["system"];
    assert_eq!(system["type"], "clawq.dead-letter-digest", "{body}");
    assert_eq!(system["count"], 3, "{body}");
    assert!(
        system["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("3 of your messages could not be delivered")),
        "{body}"
    );
    connector.log.wait_for(&["stored delivery", id]);
}

#[test]
fn a_connector_without_a_token_says_where_to_put_it() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_clawq"))
        .args(["connect", "--agent", DID_A])
        .env_remove("CLAWQ_AGENT_TOKEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no agent token: set CLAWQ_AGENT_TOKEN"),
        "{stderr}"
    );
}
