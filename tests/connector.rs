//! End to end: a receipt published to the host reaches the sender agent's local webhook
//! (a fake OpenClaw) through the real `clawq connect` (spec section 4).

mod support;

use support::*;

const RECEIPTS: &str = "clawdentity-receipts";
const RECEIPT_CONTENT_TYPE: &str = "application/vnd.clawdentity.receipt+json";

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
