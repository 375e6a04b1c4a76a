//! Relay sessions across hosts (`[backend] kind = "nats"`), against a real
//! `nats-server -js`: a receipt or a delivery handled on one host reaches the agent's
//! connector on another, unacked receipts follow the connector to whichever host it
//! reconnects to, one connection per agent holds across the cluster, and a connection
//! outlives an outage of NATS.

use std::collections::HashSet;

use crate::support::nats::NatsServer;
use crate::support::*;
use serde_json::{Value, json};

const RECEIPTS: &str = "clawdentity-receipts";
const EVENTS: &str = "clawdentity-events";
/// The bundled event-router (`pair.accepted` → a delivery), batching at once.
const FAST_EVENT_ROUTER: &str = "[[queues.consumers]]\nqueue = \"clawdentity-events\"\n\
    name = \"event-router\"\nmax_batch_timeout = 0.05\n";
/// Sessions that push an unacked frame again only after a minute, so that every frame a
/// test reads is a first push on its connection.
const UNHURRIED_RETRIES: &str = "[relay]\nretry_initial = 60\nretry_max = 60\n";

/// `count` hosts on one NATS server, with agent `DID_A` registered once (the agent
/// registry is the cluster's), each paired with the agent's token.
fn cluster(count: usize) -> (NatsServer, Vec<(Host, String)>) {
    cluster_with(count, UNHURRIED_RETRIES)
}

/// [`cluster`], with `relay` as the hosts' `[relay]` section.
fn cluster_with(count: usize, relay: &str) -> (NatsServer, Vec<(Host, String)>) {
    let nats = NatsServer::start();
    let config = format!("{}{}", nats.backend_config(), fast_config(relay));
    let hosts: Vec<Host> = (0..count).map(|_| Host::start(&config)).collect();
    let token = hosts[0].add_agent(DID_A);
    let hosts = hosts
        .into_iter()
        .map(|host| (host, token.clone()))
        .collect();
    (nats, hosts)
}

/// A receipt from `DID_A` with request id `id`.
fn receipt_of_a(id: &str) -> Value {
    receipt(id, DID_A, DID_B, "delivered_to_webhook", None)
}

/// Acks every frame of `frames` on `socket`.
fn ack_all(socket: &mut Socket, frames: &[Value]) {
    for f in frames {
        send_frame(socket, &frame("receipt_ack", json!({"ackId": f["id"]})));
    }
}

/// Waits until the cluster holds no unacked receipt (as `host` reads it).
fn wait_all_acked(host: &Host) {
    wait_for("every receipt acked", || {
        let (status, body) = host.get("/v1/relay");
        (status == 200 && body["receipts_pending"] == 0).then_some(())
    });
}

/// Once `host` drained `queue`, publishes the receipt `probe` through it and expects
/// that receipt to be the next frame on `socket`: nothing else came (`why`).
fn expect_probe_next(host: &Host, queue: &str, socket: &mut Socket, probe: &str, why: &str) {
    host.wait_drained(queue);
    host.publish(RECEIPTS, receipt_of_a(probe));
    assert_eq!(next_frame(socket)["originalFrameId"], probe, "{why}");
}

fn request_ids(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f["originalFrameId"].as_str().unwrap())
        .collect()
}

#[test]
fn a_receipt_handled_on_one_host_reaches_the_connector_on_another_once() {
    let (_nats, hosts) = cluster(2);
    let ((a, _), (c, token_c)) = (&hosts[0], &hosts[1]);
    let mut socket = c.connect(DID_A, Some(token_c)).unwrap();
    a.publish(RECEIPTS, receipt_of_a("req-1"));
    a.publish(RECEIPTS, receipt_of_a("req-1")); // the same receipt again: recorded once
    let first = next_frame(&mut socket);
    assert_eq!(
        (
            &first["type"],
            &first["originalFrameId"],
            &first["toAgentDid"]
        ),
        (&json!("receipt"), &json!("req-1"), &json!(DID_B))
    );
    expect_probe_next(a, RECEIPTS, &mut socket, "req-2", "req-1 arrived once");
}

#[test]
fn a_delivery_handled_on_one_host_reaches_the_connector_on_another_once() {
    let relay = format!("{UNHURRIED_RETRIES}{FAST_EVENT_ROUTER}");
    let (_nats, hosts) = cluster_with(3, &relay);
    let ((a, _), (c, token_c)) = (&hosts[0], &hosts[2]);
    let mut on_c = c.connect(DID_A, Some(token_c)).unwrap();
    let accepted = json!({
        "type": "pair.accepted",
        "initiatorAgentDid": DID_A,
        "responderAgentDid": DID_B,
        "responderProfile": {"agentName": "beta", "humanName": "Ida", "proxyOrigin": "https://proxy.example.com"},
        "issuerProxyOrigin": "https://proxy.example.com",
        "eventTimestampUtc": "2026-11-24T10:00:00.000Z",
    });
    a.publish(EVENTS, accepted.clone());
    a.publish(EVENTS, accepted); // the same event again: recorded once
    let deliver = next_frame(&mut on_c);
    assert_eq!(
        (
            &deliver["type"],
            &deliver["fromAgentDid"],
            &deliver["toAgentDid"],
            &deliver["deliverySource"],
        ),
        (
            &json!("deliver"),
            &json!(DID_B),
            &json!(DID_A),
            &json!("proxy.events.queue.pair_accepted")
        ),
        "{deliver}"
    );
    assert_eq!(deliver["payload"]["system"]["type"], "pair.accepted");
    let (_, relay) = hosts[1].0.get("/v1/relay");
    assert_eq!(
        (&relay["deliveries_pending"], &relay["receipts_pending"]),
        (&json!(1), &json!(0)),
        "any host counts the cluster's rows: {relay}"
    );
    let accepted = json!({"ackId": deliver["id"], "accepted": true});
    send_frame(&mut on_c, &frame("deliver_ack", accepted));
    wait_for("the deliver_ack to delete the row", || {
        (a.get("/v1/relay").1["deliveries_pending"] == 0).then_some(())
    });
    expect_probe_next(a, EVENTS, &mut on_c, "probe", "the delivery arrived once");
}

#[test]
fn unacked_receipts_follow_the_connector_to_another_host_in_order() {
    let (_nats, hosts) = cluster(3);
    let ((a, token_a), (b, token_b), (c, token_c)) = (&hosts[0], &hosts[1], &hosts[2]);
    let mut on_c = c.connect(DID_A, Some(token_c)).unwrap();
    let ids = ["r1", "r2", "r3"];
    for id in ids {
        a.publish(RECEIPTS, receipt_of_a(id));
        a.wait_drained(RECEIPTS);
    }
    let pushed: Vec<Value> = ids.iter().map(|_| next_frame(&mut on_c)).collect();
    assert_eq!(request_ids(&pushed), ids);
    assert_eq!(b.get("/v1/relay").1["receipts_pending"], 3);
    drop(on_c); // gone without acking

    let mut on_b = b.connect(DID_A, Some(token_b)).unwrap();
    let again: Vec<Value> = ids.iter().map(|_| next_frame(&mut on_b)).collect();
    let frame_ids = |frames: &[Value]| frames.iter().map(|f| f["id"].clone()).collect::<Vec<_>>();
    assert_eq!(
        frame_ids(&again),
        frame_ids(&pushed),
        "the same frames, in the same order"
    );
    ack_all(&mut on_b, &again);
    wait_all_acked(b);
    drop(on_b);

    let mut on_a = a.connect(DID_A, Some(token_a)).unwrap();
    a.publish(RECEIPTS, receipt_of_a("after-ack"));
    assert_eq!(
        next_frame(&mut on_a)["originalFrameId"],
        "after-ack",
        "acked receipts are not pushed again"
    );
}

#[test]
fn receipts_recorded_on_two_hosts_reach_the_connector_in_one_order() {
    let (_nats, hosts) = cluster(3);
    let ((a, _), (b, token_b), (c, token_c)) = (&hosts[0], &hosts[1], &hosts[2]);
    let mut on_c = c.connect(DID_A, Some(token_c)).unwrap();
    let ids: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let host = if i % 2 == 0 { a } else { b };
        host.publish(RECEIPTS, receipt_of_a(id));
    }
    let pushed: Vec<Value> = ids.iter().map(|_| next_frame(&mut on_c)).collect();
    let seen = request_ids(&pushed);
    let unique: HashSet<&str> = seen.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "each once: {seen:?}");
    drop(on_c);

    // The order is the cluster's: a connection on any host replays the same one.
    let mut on_b = b.connect(DID_A, Some(token_b)).unwrap();
    let replayed: Vec<Value> = ids.iter().map(|_| next_frame(&mut on_b)).collect();
    assert_eq!(request_ids(&replayed), seen);
}

#[test]
fn a_connection_on_another_host_supersedes_the_first() {
    let (_nats, hosts) = cluster(3);
    let ((a, _), (b, token_b), (c, token_c)) = (&hosts[0], &hosts[1], &hosts[2]);
    let mut first = b.connect(DID_A, Some(token_b)).unwrap();
    a.publish(RECEIPTS, receipt_of_a("before"));
    let pushed = next_frame(&mut first);
    assert_eq!(pushed["originalFrameId"], "before");

    let mut second = c.connect(DID_A, Some(token_c)).unwrap();
    match next_event(&mut first, &["heartbeat"]) {
        Seen::Closed(code, reason) => assert_eq!(
            (code, reason.as_str()),
            (1000, "superseded_by_new_connection")
        ),
        Seen::Frame(f) => panic!("expected a close, got {f}"),
    }
    assert_eq!(
        next_frame(&mut second)["id"],
        pushed["id"],
        "the new connection gets the unacked receipt"
    );
    a.publish(RECEIPTS, receipt_of_a("after"));
    assert_eq!(next_frame(&mut second)["originalFrameId"], "after");
}

#[test]
fn an_unacked_receipt_is_pushed_again_while_connected_then_dropped_after_its_last_attempt() {
    let relay = "[relay]\nretry_initial = 0.1\nretry_max = 0.1\nretry_max_attempts = 3\n";
    let (_nats, hosts) = cluster_with(2, relay);
    let ((a, _), (c, token_c)) = (&hosts[0], &hosts[1]);
    let mut on_c = c.connect(DID_A, Some(token_c)).unwrap();
    a.publish(RECEIPTS, receipt_of_a("never-acked"));
    let pushes: Vec<Value> = (0..3).map(|_| next_frame(&mut on_c)).collect();
    assert!(
        pushes.iter().all(|f| f["id"] == pushes[0]["id"]),
        "the same frame three times: {pushes:?}"
    );
    wait_for("the row dropped after its last attempt", || {
        let (_, relay) = c.get("/v1/relay");
        (relay["receipts_dropped"] == 1 && relay["receipts_pending"] == 0).then_some(())
    });
    drop(on_c);
    let mut again = c.connect(DID_A, Some(token_c)).unwrap();
    a.publish(RECEIPTS, receipt_of_a("next"));
    assert_eq!(
        next_frame(&mut again)["originalFrameId"],
        "next",
        "the dropped receipt is gone from the cluster"
    );
}

#[test]
fn a_connection_outlives_a_nats_outage_and_loses_nothing_recorded() {
    let (mut nats, hosts) = cluster(2);
    let ((a, token_a), (c, token_c)) = (&hosts[0], &hosts[1]);
    let mut on_c = c.connect(DID_A, Some(token_c)).unwrap();
    a.publish(RECEIPTS, receipt_of_a("acked"));
    let acked = next_frame(&mut on_c);
    ack_all(&mut on_c, &[acked]);
    wait_all_acked(a);
    a.publish(RECEIPTS, receipt_of_a("unacked"));
    assert_eq!(next_frame(&mut on_c)["originalFrameId"], "unacked");
    a.wait_drained(RECEIPTS);

    nats.kill();
    for (host, _) in &hosts {
        wait_for("the host to report the outage", || {
            (host.get("/healthz").0 == 503).then_some(())
        });
    }
    nats.restart();
    wait_for("the publish to be taken after the restart", || {
        let (status, _) = a.post(
            &format!("/v1/queues/{RECEIPTS}/messages"),
            &json!({"body": receipt_of_a("after-restart")}),
        );
        (status == 200).then_some(())
    });
    assert_eq!(
        next_frame(&mut on_c)["originalFrameId"],
        "after-restart",
        "the connection on C is fed again"
    );
    drop(on_c);

    let mut on_a = a.connect(DID_A, Some(token_a)).unwrap();
    let replayed: Vec<Value> = (0..2).map(|_| next_frame(&mut on_a)).collect();
    assert_eq!(
        request_ids(&replayed),
        ["unacked", "after-restart"],
        "every unacked receipt is kept, the acked one stays deleted"
    );
}
