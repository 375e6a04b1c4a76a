//! End to end: several consumers per queue, each with its subscription filter, next to
//! the bundled handlers (real host, real components, real sockets).

use crate::support::*;
use serde_json::{Value, json};

const EVENTS: &str = "clawdentity-events";
const RECEIPTS: &str = "clawdentity-receipts";
const RECEIPTS_DLQ: &str = "clawdentity-receipts-dlq";

/// A consumer named `name` of `queue` running `handler` in `world`, with `settings`.
fn consumer(queue: &str, name: &str, handler: &str, world: &str, settings: &str) -> String {
    format!(
        "[[queues.consumers]]\nqueue = \"{queue}\"\nname = \"{name}\"\nhandler = \"{handler}\"\n\
         world = \"{world}\"\nmax_batch_timeout = 0.05\n{settings}\n"
    )
}

/// The admin view of the handler slot `consumer`.
fn slot(host: &Host, consumer: &str) -> Value {
    let (status, body) = host.admin("GET", &format!("/v1/handlers/{consumer}"), vec![], None);
    assert_eq!(status, 200, "{body}");
    body
}

/// The messages of `queue` (`GET /v1/queues/{queue}/messages`).
fn messages(host: &Host, queue: &str) -> Vec<Value> {
    let (status, body) = host.get(&format!("/v1/queues/{queue}/messages"));
    assert_eq!(status, 200, "{body}");
    body["messages"].as_array().unwrap().clone()
}

/// Receipts of four messages of agent A to B: `req-0` to `req-2` dead-lettered, then
/// `req-ok` delivered.
fn receipts_of_a() -> Vec<Value> {
    let dead = |i| {
        receipt(
            &format!("req-{i}"),
            DID_A,
            DID_B,
            "dead_lettered",
            Some("hook down"),
        )
    };
    (0..3)
        .map(dead)
        .chain([receipt(
            "req-ok",
            DID_A,
            DID_B,
            "delivered_to_webhook",
            None,
        )])
        .collect()
}

#[test]
fn each_consumer_receives_exactly_the_messages_it_subscribes_to() {
    each_consumer_receives_its_messages("");
}

/// The test above, on the queue backend `backend` configures (a `[backend]` section;
/// empty: the embedded SQLite).
pub(crate) fn each_consumer_receives_its_messages(backend: &str) {
    let host = Host::start(
        &(backend.to_owned()
            + &fast_config(&consumer(
                EVENTS,
                "audit",
                SCRIPTED_HANDLER,
                "crl-invalidation",
                r#"filter = { type = ["agent.auth.issued", "agent.auth.refreshed"] }"#,
            ))),
    );
    let event = |kind: &str, tag: &str| json!({"type": kind, "do": "ack", "tag": tag});
    host.publish_batch(
        EVENTS,
        &[
            event("agent.auth.issued", "issued"),
            revocation_event("agent_revoked", json!({"agentDid": DID_A})),
            event("agent.auth.refreshed", "refreshed"),
            event("group.member.joined", "joined"),
        ],
    );
    host.publish(EVENTS, json!("not an object"));

    // The bundled CRL handler still gets every event and revokes the agent...
    wait_for("the agent to be revoked", || {
        host.is_revoked(DID_A).then_some(())
    });
    // ...and the subscriber exactly the two event types it asked for, once each.
    host.wait_log("seen tag=issued attempts=1");
    host.wait_log("seen tag=refreshed attempts=1");
    host.wait_drained(EVENTS);
    let seen = host.log_lines(&["seen tag="]);
    assert_eq!(seen.len(), 2, "{seen:?}");
    let crl = slot(&host, EVENTS);
    assert_eq!(
        crl["filter"],
        json!({}),
        "the bundled default takes everything"
    );
    let audit = slot(&host, "audit");
    assert_eq!(audit["queue"], EVENTS);
    assert_eq!(
        audit["filter"],
        json!({"type": ["agent.auth.issued", "agent.auth.refreshed"]})
    );

    let status = host.queue(EVENTS);
    let names: Vec<&str> = status["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [EVENTS, "audit", "event-router"], "{status}");
}

#[test]
fn a_failing_third_party_handler_holds_up_nothing_and_its_dead_letters_name_it() {
    let host = Host::start(&fast_config(&consumer(
        RECEIPTS,
        "flaky",
        FAILING_HANDLER,
        "crl-invalidation",
        "filter = { status = \"dead_lettered\" }\nmax_retries = 1",
    )));
    let token = host.add_agent(DID_A);
    let mut socket = host.connect(DID_A, Some(&token)).unwrap();
    let ids = host.publish_batch(RECEIPTS, &receipts_of_a());

    // The router pushes every receipt at once, however often the other handler traps.
    let mut pushed: Vec<String> = (0..4)
        .map(|_| {
            next_frame(&mut socket)["originalFrameId"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    pushed.sort();
    assert_eq!(pushed, ["req-0", "req-1", "req-2", "req-ok"]);

    // The failing handler's copies of the three receipts it subscribes to land in the
    // dead-letter queue, naming it; the router ran each message once.
    let dead = wait_for("the failing handler's dead letters", || {
        let dead = messages(&host, RECEIPTS_DLQ);
        (dead.len() == 3).then_some(dead)
    });
    for m in &dead {
        assert_eq!(m["source_queue"], RECEIPTS, "{m}");
        assert_eq!(m["source_consumer"], "flaky", "{m}");
        assert_eq!(m["source_attempts"], 2, "{m}");
        assert!(
            ids[..3].contains(&m["id"].as_str().unwrap().to_owned()),
            "{m}"
        );
    }
    host.wait_drained(RECEIPTS);
    let router = slot(&host, RECEIPTS);
    assert_eq!(router["counters"]["failed"], 0, "{router}");
    let router_batches = router["counters"]["batches"].as_u64().unwrap();
    let flaky_failed = slot(&host, "flaky")["counters"]["failed"].as_u64().unwrap();
    assert!(
        flaky_failed >= 2,
        "every attempt of the failing handler failed"
    );

    // Redriven, they go back to the handler that gave up on them, not to the router.
    let (status, body) = host.post(&format!("/v1/queues/{RECEIPTS_DLQ}/redrive"), &json!({}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["redriven"], 3, "{body}");
    wait_for("the redriven copies to fail again", || {
        (messages(&host, RECEIPTS_DLQ).len() == 3
            && slot(&host, "flaky")["counters"]["failed"].as_u64() > Some(flaky_failed))
        .then_some(())
    });
    host.wait_drained(RECEIPTS);
    let router = slot(&host, RECEIPTS);
    assert_eq!(router["counters"]["batches"], router_batches, "{router}");
}

const DIGEST: &str = clawq_test_guests::DEAD_LETTER_DIGEST;
/// An agent that gets revoked, and has no connection.
const DID_REVOKED: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PD";

/// The `deliverySource` of the dead-letter digest's deliveries.
const DIGEST_SOURCE: &str = "clawq.examples.dead-letter-digest";

/// The next `deliver` frame on `socket` (skipping receipts and heartbeats), checked to be
/// a dead-letter digest from `did` to itself, and acknowledged (else the session pushes
/// it again).
fn next_digest(socket: &mut Socket, did: &str) -> Value {
    let digest = match next_event(socket, &["heartbeat", "receipt"]) {
        Seen::Frame(frame) => frame,
        Seen::Closed(code, reason) => panic!("closed with {code} {reason}"),
    };
    assert_eq!(digest["type"], "deliver", "{digest}");
    assert_eq!(digest["deliverySource"], DIGEST_SOURCE, "{digest}");
    assert_eq!(
        (&digest["fromAgentDid"], &digest["toAgentDid"]),
        (&json!(did), &json!(did)),
        "a system message to itself: {digest}"
    );
    send_frame(
        socket,
        &frame(
            "deliver_ack",
            json!({"ackId": digest["id"], "accepted": true}),
        ),
    );
    digest
}

/// The dead-letter digest as a consumer of the receipts queue named `name`.
fn digest(name: &str) -> String {
    consumer(
        RECEIPTS,
        name,
        DIGEST,
        "receipt-handler",
        r#"filter = { type = "delivery_receipt", status = "dead_lettered" }"#,
    )
}

#[test]
fn the_example_handler_runs_next_to_the_bundled_ones() {
    let host = Host::start(&fast_config(&digest("dead-letter-digest")));
    let token_a = host.add_agent(DID_A);
    let mut a = host.connect(DID_A, Some(&token_a)).unwrap();

    // Three dead-lettered receipts of A's messages cross the digest's threshold; the
    // router still pushes each receipt, and the delivered one does not count.
    host.publish_batch(RECEIPTS, &receipts_of_a());
    let digest = next_digest(&mut a, DID_A);
    assert_eq!(digest["payload"]["system"]["count"], 3, "{digest}");
    assert!(
        digest["payload"]["system"]["message"]
            .as_str()
            .unwrap()
            .starts_with("3 of your messages"),
        "{digest}"
    );
    assert_eq!(digest["v"], 1, "the host builds the frame: {digest}");
    assert!(
        digest["id"].as_str().is_some_and(|id| id.len() == 26),
        "{digest}"
    );

    // The CRL handler of the events queue revokes meanwhile.
    host.publish(
        EVENTS,
        revocation_event("agent_revoked", json!({"agentDid": DID_REVOKED})),
    );
    wait_for("the revocation", || {
        host.is_revoked(DID_REVOKED).then_some(())
    });
    host.wait_drained(RECEIPTS);
    let counters = &slot(&host, "dead-letter-digest")["counters"];
    assert_eq!(counters["failed"], 0, "{counters}");
}

#[test]
fn two_consumers_of_one_component_keep_their_actors_apart() {
    let host = Host::start(&fast_config(&(digest("digest-a") + &digest("digest-b"))));
    let token = host.add_agent(DID_A);
    let _socket = host.connect(DID_A, Some(&token)).unwrap();
    host.publish_batch(RECEIPTS, &receipts_of_a());
    // Each counts the three dead-lettered receipts in its own actors, so each hands over
    // a digest of 3; both have the same dedup key, so the session keeps one (the agent is
    // told once) and answers the other `unchanged`.
    let needles = ["digest of 3 for", DID_A];
    for name in ["digest-a", "digest-b"] {
        host.wait_log_all(&[needles[0], needles[1], &format!("consumer=\"{name}\"")]);
    }
    let lines = host.log_lines(&needles);
    let handed_over_again = lines
        .iter()
        .filter(|line| line.text.contains("already handed over"))
        .count();
    assert_eq!((lines.len(), handed_over_again), (2, 1), "{lines:?}");
}

#[test]
fn copies_left_for_a_removed_consumer_are_reported_at_start() {
    // `parked` has no handler: its copy of each message waits for one.
    let parked = format!("[[queues.consumers]]\nqueue = \"{EVENTS}\"\nname = \"parked\"\n");
    let mut host = Host::start(&fast_config(&parked));
    host.publish(EVENTS, json!({"type": "agent.auth.issued"}));
    // Each consumer's counts are its own: the CRL handler's copy is done, the parked
    // one waits.
    wait_for("the parked copy alone", || {
        let status = host.queue(EVENTS);
        let consumer = |name: &str| {
            status["consumers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .unwrap_or_else(|| panic!("no consumer {name}: {status}"))
                .clone()
        };
        let (crl, parked) = (consumer(EVENTS), consumer("parked"));
        let crl_done = crl["backlog"] == 0 && crl["in_flight"] == 0;
        (parked["backlog"] == 1 && crl_done).then_some(())
    });

    host.set_config(&fast_config(""));
    host.terminate();
    host.restart();
    let warning = host.wait_log("messages wait for a consumer the config no longer has");
    assert!(
        warning.text.contains("parked") && warning.text.contains("messages=1"),
        "{}",
        warning.text
    );
    assert_eq!(host.queue(EVENTS)["backlog"], 1, "the copy is still there");

    // An operator drops them by naming the consumer.
    let purged = host.cli(&["dlq", "purge", EVENTS, "--consumer", "parked"]);
    assert_eq!(purged, format!("purged 1 message from {EVENTS}\n"));
    assert_eq!(host.queue(EVENTS)["backlog"], 0);
    let (status, body) = host.delete(
        &format!("/v1/queues/{EVENTS}/messages"),
        Some(&json!({"ids": ["x"], "consumer": "parked"})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not both"),
        "{body}"
    );
}
