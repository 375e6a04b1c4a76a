//! End to end: delivery receipts through the real receipt-router component, relay
//! sessions and the connector WebSocket (spec sections 3 and 4).

use crate::support::*;
use serde_json::json;

const RECEIPTS: &str = "clawdentity-receipts";
const C: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PD";
/// Sessions that push an unacked frame again only after a minute, so that the frames a
/// test reads are the first pushes, however slow the machine (`tests/deliveries.rs`
/// tests the retries).
const UNHURRIED_RETRIES: &str = "[relay]\nretry_initial = 60\nretry_max = 60\n";

#[test]
fn connectors_must_authenticate_before_the_upgrade() {
    let host = Host::start(&fast_config(""));
    let token = host.add_agent(DID_A);
    let other = host.add_agent(DID_B);
    assert_eq!(host.refused_status(DID_A, None), 401);
    assert_eq!(host.refused_status(DID_A, Some("cqa_wrong")), 401);
    assert_eq!(
        host.refused_status(DID_A, Some(&other)),
        401,
        "B's token does not open A's session"
    );
    assert_eq!(
        host.refused_status(C, Some(&token)),
        401,
        "unregistered agent"
    );
    host.connect(DID_A, Some(&token))
        .expect("a valid token connects");

    host.publish(
        "clawdentity-events",
        revocation_event("agent_revoked", json!({"agentDid": DID_A})),
    );
    wait_for("the revocation", || host.is_revoked(DID_A).then_some(()));
    assert_eq!(
        host.refused_status(DID_A, Some(&token)),
        401,
        "a revoked agent is refused"
    );
}

#[test]
fn receipts_reach_only_their_sender_and_are_pushed_once() {
    let host = Host::start(&fast_config(UNHURRIED_RETRIES));
    let (token_a, token_b) = (host.add_agent(DID_A), host.add_agent(DID_B));
    let mut a = host.connect(DID_A, Some(&token_a)).unwrap();
    let mut b = host.connect(DID_B, Some(&token_b)).unwrap();

    let delivered = receipt("req-1", DID_A, DID_B, "delivered_to_webhook", None);
    host.publish(RECEIPTS, delivered.clone());
    host.publish(RECEIPTS, delivered); // a duplicate: recorded once, pushed once
    host.publish(
        RECEIPTS,
        receipt(
            "pair.accepted:x:y:1",
            DID_A,
            C,
            "dead_lettered",
            Some("hook gone"),
        ),
    );
    host.publish(
        RECEIPTS,
        receipt("req-b", DID_B, DID_A, "delivered_to_webhook", None),
    );

    let first = next_frame(&mut a);
    assert_eq!(first["type"], "receipt");
    assert_eq!(first["v"], 1);
    assert_eq!(first["originalFrameId"], "req-1");
    assert_eq!(first["toAgentDid"], DID_B);
    assert_eq!(first["status"], "delivered_to_webhook");
    assert!(first.get("reason").is_none(), "{first}");
    assert_eq!(first["id"].as_str().unwrap().len(), 26);
    let second = next_frame(&mut a);
    assert_eq!(
        second["originalFrameId"], "pair.accepted:x:y:1",
        "the duplicate was not pushed: {second}"
    );
    assert_eq!(
        (&second["status"], &second["reason"]),
        (&json!("dead_lettered"), &json!("hook gone"))
    );

    let for_b = next_frame(&mut b);
    assert_eq!(
        for_b["originalFrameId"], "req-b",
        "B sees only its own receipts"
    );
    let status = host.wait_drained(RECEIPTS);
    assert_eq!(status["dead_lettered"], 0, "{status}");
}

#[test]
fn unacked_receipts_are_pushed_again_on_connect_until_acked() {
    let mut host = Host::start(&fast_config(UNHURRIED_RETRIES));
    let token = host.add_agent(DID_A);
    host.publish(
        RECEIPTS,
        receipt("offline-1", DID_A, DID_B, "dead_lettered", Some("timeout")),
    );
    host.wait_drained(RECEIPTS);
    // The host restarts between the publish and the connect: nothing is lost.
    host.kill_and_restart();

    let mut a = host.connect(DID_A, Some(&token)).unwrap();
    let pushed = next_frame(&mut a);
    assert_eq!(pushed["originalFrameId"], "offline-1");
    drop(a);

    let mut again = host.connect(DID_A, Some(&token)).unwrap();
    let repushed = next_frame(&mut again);
    assert_eq!(
        repushed["id"], pushed["id"],
        "an unacked receipt is pushed again, same frame"
    );
    send_frame(
        &mut again,
        &frame("receipt_ack", json!({"ackId": repushed["id"]})),
    );
    // The ack is processed before the heartbeat that follows it on the same connection.
    send_frame(&mut again, &frame("heartbeat", json!({})));
    assert_eq!(next_frame(&mut again)["type"], "heartbeat_ack");
    drop(again);

    let mut third = host.connect(DID_A, Some(&token)).unwrap();
    host.publish(
        RECEIPTS,
        receipt("after-ack", DID_A, DID_B, "delivered_to_webhook", None),
    );
    assert_eq!(
        next_frame(&mut third)["originalFrameId"],
        "after-ack",
        "the acked receipt is not pushed again"
    );
}

#[test]
fn every_row_of_the_receipt_outcome_table() {
    let host = Host::start(&fast_config(
        "[[queues.consumers]]\nqueue = \"clawdentity-receipts\"\nretry_delay = 1\nmax_retries = 50\n",
    ));
    let malformed = vec![
        json!("text"),
        json!({"type": "other"}),
        receipt(" ", DID_A, DID_B, "delivered_to_webhook", None),
        receipt("r", "did:cdi:bad", DID_B, "delivered_to_webhook", None),
        receipt("r", DID_A, DID_B, "processed_by_openclaw", None),
    ];
    let ids = host.publish_batch(RECEIPTS, &malformed);
    let status = host.wait_drained(RECEIPTS);
    assert_eq!(
        status["dead_lettered"], 0,
        "malformed receipts are acked: {status}"
    );
    for id in &ids {
        host.wait_log_all(&["WARN", "receipt-router", id, "not a valid receipt"]);
    }

    // The sessions' table is gone: the session is unavailable, the receipt retried.
    let db = rusqlite::Connection::open(host.data_dir().join("clawq.db")).unwrap();
    db.execute_batch("ALTER TABLE outbound RENAME TO outbound_away")
        .unwrap();
    host.publish(
        RECEIPTS,
        receipt("locked", DID_A, DID_B, "delivered_to_webhook", None),
    );
    host.wait_log_all(&["receipt-router", "will retry"]);
    db.execute_batch("ALTER TABLE outbound_away RENAME TO outbound")
        .unwrap();
    let token = host.add_agent(DID_A);
    let status = host.wait_drained(RECEIPTS);
    assert_eq!(status["dead_lettered"], 0, "{status}");
    let mut a = host.connect(DID_A, Some(&token)).unwrap();
    assert_eq!(
        next_frame(&mut a)["originalFrameId"],
        "locked",
        "recorded after the retry"
    );
}

#[test]
fn connection_rules_supersede_revoke_heartbeat_and_limits() {
    let host = Host::start(&fast_config(
        // The timeout leaves a loaded machine (the Workers test runs workerd meanwhile)
        // time to open the superseding connection before the first one's heartbeats lapse.
        "[relay]\nheartbeat_interval = 0.2\nheartbeat_timeout = 10.0\n",
    ));
    let token = host.add_agent(DID_A);

    // Each connection supersedes the one opened just before it, however close together:
    // the newer is the one whose upgrade was answered later.
    let mut second = host.connect(DID_A, Some(&token)).unwrap();
    for _ in 0..5 {
        let mut first = std::mem::replace(&mut second, host.connect(DID_A, Some(&token)).unwrap());
        match next_event(&mut first, &["heartbeat"]) {
            Seen::Closed(code, reason) => assert_eq!(
                (code, reason.as_str()),
                (1000, "superseded_by_new_connection")
            ),
            Seen::Frame(f) => panic!("expected a close, got {f}"),
        }
    }

    // The host heartbeats; unknown fields and garbage are ignored; answered heartbeats
    // keep the connection open.
    match next_event(&mut second, &[]) {
        Seen::Frame(f) => assert_eq!(f["type"], "heartbeat"),
        other => panic!("{other:?}"),
    }
    send_frame(&mut second, &frame("heartbeat", json!({"unknown": 1})));
    second
        .send(tungstenite::Message::Text("garbage".into()))
        .unwrap();
    let beat = frame("heartbeat", json!({}));
    send_frame(&mut second, &beat);
    let ack = next_frame(&mut second);
    assert_eq!(
        (&ack["type"], &ack["ackId"]),
        (&json!("heartbeat_ack"), &beat["id"]),
        "only the valid heartbeat is answered"
    );

    // Oversized frame: closed with 1009.
    let big = frame("heartbeat", json!({"pad": "x".repeat(1 << 20)}));
    send_frame(&mut second, &big);
    match next_event(&mut second, &["heartbeat", "heartbeat_ack"]) {
        Seen::Closed(code, reason) => {
            assert_eq!((code, reason.as_str()), (1009, "frame_too_large"))
        }
        Seen::Frame(f) => panic!("expected a close, got {f}"),
    }

    // Silence: closed with 1011 after the timeout.
    let mut silent = host.connect(DID_A, Some(&token)).unwrap();
    match next_event(&mut silent, &["heartbeat"]) {
        Seen::Closed(code, reason) => {
            assert_eq!((code, reason.as_str()), (1011, "heartbeat_ack_timeout"))
        }
        Seen::Frame(f) => panic!("expected a close, got {f}"),
    }

    // A revocation closes the agent's open connection.
    let mut open = host.connect(DID_A, Some(&token)).unwrap();
    host.publish(
        "clawdentity-events",
        revocation_event("agent_revoked", json!({"agentDid": DID_A})),
    );
    // Answer the host's heartbeats meanwhile, so that only the revocation can close it.
    loop {
        match next_event(&mut open, &[]) {
            Seen::Closed(code, reason) => {
                assert_eq!((code, reason.as_str()), (1008, "agent_revoked"));
                break;
            }
            Seen::Frame(beat) => send_frame(
                &mut open,
                &frame("heartbeat_ack", json!({"ackId": beat["id"]})),
            ),
        }
    }
}
