//! End to end: a receipt published to the host reaches the sender agent's local webhook
//! (a fake OpenClaw) through the real `clawq connect` (spec section 4), and so does a
//! `deliver` frame (spec section 5); hook requests are pipelined up to
//! `--hook-concurrency`, the frames of one request in order.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

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

/// What a [`HeldHook`] saw.
#[derive(Debug, Default, Clone)]
struct Held {
    /// (`x-request-id`, the body's `reason`) of every request, in arrival order.
    arrived: Vec<(String, String)>,
    /// (`x-request-id`, `reason`, status) of every request answered, in answer order.
    answered: Vec<(String, String, u16)>,
    /// Requests being handled now.
    in_flight: usize,
    /// The most requests handled at once.
    max_in_flight: usize,
    /// Requests being handled now, per `x-request-id`.
    per_request: HashMap<String, usize>,
    /// The `x-request-id`s that had two requests handled at once.
    overlaps: Vec<String>,
    /// The (`x-request-id`, `reason`) answered 500 while listed here.
    failing: HashSet<(String, String)>,
}

impl Held {
    /// The (`x-request-id`, `reason`) answered 200, in answer order.
    fn taken(&self) -> Vec<(String, String)> {
        self.answered
            .iter()
            .filter(|(_, _, status)| *status == 200)
            .map(|(id, reason, _)| (id.clone(), reason.clone()))
            .collect()
    }
}

impl Held {
    /// Counts a request of `id` out of the ones being handled.
    fn end(&mut self, id: &str) {
        self.in_flight -= 1;
        *self.per_request.get_mut(id).unwrap() -= 1;
    }
}

/// Counts a request out of [`Held::in_flight`] if its handling ends unanswered (the
/// client went away).
struct Unanswered(Option<(Arc<Mutex<Held>>, String)>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some((held, id)) = self.0.take() {
            held.lock().unwrap().end(&id);
        }
    }
}

/// A webhook on loopback that holds every request until the test releases one (or opens
/// the gate for good), then answers 200, or 500 for the requests listed as failing.
struct HeldHook {
    url: String,
    held: Arc<Mutex<Held>>,
    gate: Arc<tokio::sync::Semaphore>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl HeldHook {
    fn start() -> HeldHook {
        use axum::http::{HeaderMap, StatusCode};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hooks/message", listener.local_addr().unwrap());
        let held: Arc<Mutex<Held>> = Arc::default();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (state, wait) = (held.clone(), gate.clone());
        let app = axum::Router::new().route(
            "/hooks/message",
            axum::routing::post(
                move |headers: HeaderMap, body: axum::body::Bytes| async move {
                    let id = headers["x-request-id"].to_str().unwrap().to_owned();
                    let body: Value = serde_json::from_slice(&body).unwrap();
                    let reason = body["reason"].as_str().unwrap_or_default().to_owned();
                    let mut unanswered = {
                        let mut held = state.lock().unwrap();
                        held.arrived.push((id.clone(), reason.clone()));
                        held.in_flight += 1;
                        held.max_in_flight = held.max_in_flight.max(held.in_flight);
                        let same = held.per_request.entry(id.clone()).or_default();
                        *same += 1;
                        if *same > 1 {
                            held.overlaps.push(id.clone());
                        }
                        Unanswered(Some((state.clone(), id.clone())))
                    };
                    wait.acquire().await.unwrap().forget();
                    unanswered.0 = None;
                    // Answered and counted out at once: the client cannot send
                    // its next request before both.
                    let mut held = state.lock().unwrap();
                    held.end(&id);
                    let failing = held.failing.contains(&(id.clone(), reason.clone()));
                    let status = if failing { 500 } else { 200 };
                    held.answered.push((id, reason, status));
                    StatusCode::from_u16(status).unwrap()
                },
            ),
        );
        let stop = serve_in_background(listener, None, app);
        HeldHook {
            url,
            held,
            gate,
            _stop: stop,
        }
    }

    /// Lets `n` held (or future) requests be answered.
    fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    /// Answers every request from now on at once.
    fn open(&self) {
        self.release(1 << 20);
    }

    /// Answers 500 to the requests of `id` with `reason` (`failing`) or no longer.
    fn fail(&self, id: &str, reason: &str, failing: bool) {
        let key = (id.to_owned(), reason.to_owned());
        let mut held = self.held.lock().unwrap();
        if failing {
            held.failing.insert(key);
        } else {
            held.failing.remove(&key);
        }
    }

    /// What the hook saw so far.
    fn seen(&self) -> Held {
        self.held.lock().unwrap().clone()
    }

    /// Waits until what the hook saw passes `check`.
    fn wait(&self, what: &str, check: impl Fn(&Held) -> bool) -> Held {
        wait_for(what, || {
            let held = self.seen();
            check(&held).then_some(held)
        })
    }
}

/// A `dead_lettered` receipt frame for request `id`, with `reason`.
fn receipt_frame(id: &str, reason: &str) -> Value {
    frame(
        "receipt",
        json!({"originalFrameId": id, "toAgentDid": DID_B, "status": "dead_lettered",
               "reason": reason}),
    )
}

/// Sends `frames` at once and checks that each is acknowledged.
fn push_and_expect_acks(socket: &mut HostSocket, frames: &[Value]) {
    for frame in frames {
        send_frame(socket, frame);
    }
    let acked: BTreeSet<String> = frames
        .iter()
        .map(|_| {
            let ack = next_frame(socket);
            assert_eq!(ack["type"], "receipt_ack", "{ack}");
            ack["ackId"].as_str().unwrap().to_owned()
        })
        .collect();
    let sent: BTreeSet<String> = frames
        .iter()
        .map(|frame| frame["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(acked, sent);
}

/// How many rows the connector's outbox in `dir` holds.
fn outbox_rows(dir: &Path) -> i64 {
    let db = rusqlite::Connection::open(dir.join("outbox.db")).unwrap();
    db.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
        .unwrap()
}

/// A connector against `relay` posting to `hook`, with `--hook-concurrency` if given.
fn pipelined_connector(
    relay: &FakeRelay,
    hook: &str,
    dir: &Path,
    concurrency: Option<usize>,
) -> Connector {
    let mut command = Connector::command(&relay.base, DID_A, "cqa_test", hook, dir);
    if let Some(n) = concurrency {
        command.args(["--hook-concurrency", &n.to_string()]);
    }
    Connector::spawn(command)
}

#[test]
fn the_hook_gets_up_to_the_concurrency_in_flight_never_more_started_in_order() {
    let relay = FakeRelay::start(DID_A, "cqa_test");
    let hook = HeldHook::start();
    let dir = tempfile::tempdir().unwrap();
    let _connector = pipelined_connector(&relay, &hook.url, dir.path(), Some(4));
    let mut socket = relay.accept();
    let ids: Vec<String> = (0..12).map(|n| format!("req-{n}")).collect();
    let frames: Vec<Value> = ids.iter().map(|id| receipt_frame(id, "gone")).collect();
    push_and_expect_acks(&mut socket, &frames);

    hook.wait("4 requests held at once", |held| held.in_flight == 4);
    // One answer at a time: each frees one place, which the next row takes.
    for answered in 1..=ids.len() {
        hook.release(1);
        let in_flight = 4.min(ids.len() - answered);
        hook.wait(
            &format!("{answered} answered and {in_flight} in flight"),
            |held| held.answered.len() == answered && held.in_flight == in_flight,
        );
    }
    let held = hook.seen();
    assert_eq!(held.max_in_flight, 4, "never more than --hook-concurrency");
    let arrived: Vec<&str> = held.arrived.iter().map(|(id, _)| id.as_str()).collect();
    let first: BTreeSet<&str> = arrived[..4].iter().copied().collect();
    assert_eq!(
        first,
        ids[..4].iter().map(String::as_str).collect(),
        "the first four started together"
    );
    assert_eq!(
        arrived[4..],
        ids[4..].iter().map(String::as_str).collect::<Vec<_>>(),
        "then each in storage order"
    );
    assert_eq!(held.taken().len(), ids.len(), "each posted once");
    wait_for("an empty outbox", || {
        (outbox_rows(dir.path()) == 0).then_some(())
    });
}

#[test]
fn the_frames_of_one_request_arrive_in_order_and_a_failing_one_holds_back_only_its_own() {
    let relay = FakeRelay::start(DID_A, "cqa_test");
    let hook = HeldHook::start();
    hook.open();
    hook.fail("req-1", "v1", true);
    let dir = tempfile::tempdir().unwrap();
    let _connector = pipelined_connector(&relay, &hook.url, dir.path(), Some(8));
    let mut socket = relay.accept();
    // Three versions of four requests, interleaved, then six requests of one frame each.
    let mut frames = Vec::new();
    for version in ["v1", "v2", "v3"] {
        for n in 0..4 {
            frames.push(receipt_frame(&format!("req-{n}"), version));
        }
    }
    for n in 0..6 {
        frames.push(receipt_frame(&format!("solo-{n}"), "once"));
    }
    push_and_expect_acks(&mut socket, &frames);

    // Everything but req-1 is taken while req-1's first frame keeps failing ...
    let held = hook.wait("all but req-1 taken", |held| held.taken().len() == 15);
    assert!(
        held.taken().iter().all(|(id, _)| id != "req-1"),
        "{:?}",
        held.taken()
    );
    let req1: Vec<&str> = held
        .arrived
        .iter()
        .filter(|(id, _)| id == "req-1")
        .map(|(_, reason)| reason.as_str())
        .collect();
    assert!(
        !req1.is_empty() && req1.iter().all(|reason| *reason == "v1"),
        "req-1's later frames wait behind its failing first one: {req1:?}"
    );
    assert!(
        hook.seen()
            .answered
            .iter()
            .any(|(id, _, status)| id == "req-1" && *status == 500)
    );

    // ... and once the hook takes it, the rest of req-1 follows in order.
    hook.fail("req-1", "v1", false);
    hook.wait("everything taken", |held| held.taken().len() == 18);
    wait_for("an empty outbox", || {
        (outbox_rows(dir.path()) == 0).then_some(())
    });
    let held = hook.seen();
    assert!(
        held.overlaps.is_empty(),
        "one request at a time: {:?}",
        held.overlaps
    );
    assert!(held.max_in_flight <= 8, "{}", held.max_in_flight);
    let taken = held.taken();
    let unique: BTreeSet<&(String, String)> = taken.iter().collect();
    assert_eq!(unique.len(), taken.len(), "nothing posted twice: {taken:?}");
    for n in 0..4 {
        let id = format!("req-{n}");
        let versions = |list: &[(String, String)]| -> Vec<String> {
            list.iter()
                .filter(|(of, _)| *of == id)
                .map(|(_, reason)| reason.clone())
                .collect()
        };
        assert_eq!(versions(&taken), ["v1", "v2", "v3"], "{id} taken in order");
        let mut arrived = versions(&held.arrived);
        arrived.dedup();
        assert_eq!(arrived, ["v1", "v2", "v3"], "{id} posted in order");
    }
}

#[test]
fn a_connector_killed_mid_pipeline_loses_nothing() {
    let relay = FakeRelay::start(DID_A, "cqa_test");
    let hook = HeldHook::start();
    let dir = tempfile::tempdir().unwrap();
    // The default concurrency: 16.
    let mut connector = pipelined_connector(&relay, &hook.url, dir.path(), None);
    let mut socket = relay.accept();
    let ids: BTreeSet<String> = (0..40).map(|n| format!("req-{n}")).collect();
    let frames: Vec<Value> = ids.iter().map(|id| receipt_frame(id, "gone")).collect();
    push_and_expect_acks(&mut socket, &frames);
    hook.wait("16 requests held at once", |held| held.in_flight == 16);

    // Killed with 16 requests under way and 24 rows waiting: all 40 are only in the
    // outbox (acknowledged to the host, never answered by the hook).
    connector.kill();
    drop(socket);
    assert_eq!(outbox_rows(dir.path()), 40);
    let before = hook.seen().arrived.len();
    assert_eq!(before, 16);
    hook.open();
    let _restarted = pipelined_connector(&relay, &hook.url, dir.path(), None);
    wait_for("an empty outbox", || {
        (outbox_rows(dir.path()) == 0).then_some(())
    });
    let held = hook.seen();
    let again: Vec<&str> = held.arrived[before..]
        .iter()
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(
        again.iter().copied().collect::<BTreeSet<&str>>(),
        ids.iter().map(String::as_str).collect(),
        "every frame reached the hook after the restart"
    );
    assert_eq!(again.len(), ids.len(), "once each: {again:?}");
}

#[test]
fn the_hook_concurrency_is_documented_and_checked() {
    let clawq = env!("CARGO_BIN_EXE_clawq");
    let help = std::process::Command::new(clawq)
        .args(["connect", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--hook-concurrency <N>") && help.contains("[default: 16]"),
        "{help}"
    );
    let refused = std::process::Command::new(clawq)
        .args(["connect", "--agent", DID_A, "--hook-concurrency", "0"])
        .env("CLAWQ_AGENT_TOKEN", "cqa_test")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("from 1 to 1024"),
        "{refused:?}"
    );
}
