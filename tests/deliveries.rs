//! End to end: what a relay session keeps is pushed until its connector acks it (spec
//! sections 3 to 5). An unacked frame is pushed again while the connector stays
//! connected, dropped after its last attempt, and every drop is logged and counted in
//! `GET /v1/relay` and `/metrics`.

use crate::support::*;
use serde_json::json;

const RECEIPTS: &str = "clawdentity-receipts";

/// A host whose sessions retry fast and give up after `attempts` pushes.
fn retrying_host(attempts: u32) -> Host {
    Host::start(&fast_config(&format!(
        "[relay]\nretry_initial = 0.1\nretry_max = 0.2\nretry_max_attempts = {attempts}\n"
    )))
}

/// Connects `did` again and proves its session holds nothing unacked: the first frame
/// after a new receipt is that receipt, not one pushed on connect.
fn assert_nothing_pushed_on_connect(host: &Host, token: &str, request_id: &str) {
    let mut socket = host.connect(DID_A, Some(token)).unwrap();
    host.publish(
        RECEIPTS,
        receipt(request_id, DID_A, DID_B, "delivered_to_webhook", None),
    );
    assert_eq!(next_frame(&mut socket)["originalFrameId"], request_id);
}

#[test]
fn an_unacked_receipt_is_pushed_again_while_connected_until_receipt_ack() {
    let host = retrying_host(25);
    let token = host.add_agent(DID_A);
    let mut a = host.connect(DID_A, Some(&token)).unwrap();
    host.publish(
        RECEIPTS,
        receipt("r-1", DID_A, DID_B, "dead_lettered", Some("gone")),
    );
    let first = next_frame(&mut a);
    assert_eq!(first["originalFrameId"], "r-1");
    let again = next_frame(&mut a);
    assert_eq!(again, first, "the same frame is pushed again while unacked");

    send_frame(&mut a, &frame("receipt_ack", json!({"ackId": first["id"]})));
    let beat = frame("heartbeat", json!({}));
    send_frame(&mut a, &beat);
    // Retries sent before the ack was processed may come first.
    match next_event(&mut a, &["heartbeat", "receipt"]) {
        Seen::Frame(ack) => assert_eq!(ack["ackId"], beat["id"], "{ack}"),
        other => panic!("{other:?}"),
    }
    drop(a);
    assert_nothing_pushed_on_connect(&host, &token, "r-2");
}

#[test]
fn a_receipt_never_acked_is_dropped_after_its_last_attempt_logged_and_counted() {
    let host = retrying_host(2);
    let token = host.add_agent(DID_A);
    let mut a = host.connect(DID_A, Some(&token)).unwrap();
    host.publish(
        RECEIPTS,
        receipt("r-1", DID_A, DID_B, "delivered_to_webhook", None),
    );
    let first = next_frame(&mut a);
    assert_eq!(next_frame(&mut a)["id"], first["id"], "attempt 2");

    let relay = wait_for("the receipt to be dropped", || {
        let (status, relay) = host.get("/v1/relay");
        assert_eq!(status, 200, "{relay}");
        (relay["receipts_dropped"] == 1).then_some(relay)
    });
    assert_eq!(
        (&relay["deliveries_dropped"], &relay["deliveries_pending"]),
        (&json!(0), &json!(0)),
        "{relay}"
    );
    host.wait_log_all(&[
        "WARN",
        "relay session dropped an unacked frame",
        DID_A,
        "r-1",
        "attempts",
    ]);
    assert_eq!(dropped_metric(&host, "receipt", "attempts"), 1.0);
    drop(a);
    assert_nothing_pushed_on_connect(&host, &token, "r-2");
}

/// The value of `clawq_relay_frames_dropped_total{kind, reason}`.
fn dropped_metric(host: &Host, kind: &str, reason: &str) -> f64 {
    let labels = [("kind", kind), ("reason", reason)];
    find_sample(&host.scrape(), "clawq_relay_frames_dropped_total", &labels)
        .unwrap_or_else(|| panic!("no dropped-frames sample for {kind} {reason}"))
}
