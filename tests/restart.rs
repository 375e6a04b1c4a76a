//! End to end: a host killed with SIGKILL and started again keeps its queued messages
//! and its revocations; a message whose deliveries keep killing the host is
//! dead-lettered after `1 + max_retries` of them; a second host on the same data
//! directory is refused before it touches the first one's messages in flight.

use crate::support::*;
use serde_json::json;

#[test]
fn queued_messages_and_revocations_survive_a_kill() {
    let mut host = Host::start(&fast_events_config(""));
    host.publish(
        "clawdentity-events",
        revocation_event("agent_revoked", json!({"agentDid": DID_A})),
    );
    wait_for("the agent to be revoked", || {
        host.is_revoked(DID_A).then_some(())
    });

    let receipts: Vec<_> = (0..3)
        .map(|i| json!({"type": "delivery_receipt", "n": i}))
        .collect();
    host.publish_batch("clawdentity-receipts", &receipts);
    let (status, reply) = host.post(
        "/v1/queues/clawdentity-events/messages",
        &json!({"body": revocation_event("agent_revoked", json!({"agentDid": DID_B})), "delay_seconds": 3600}),
    );
    assert_eq!(status, 200, "{reply}");

    host.kill_and_restart();

    assert!(host.is_revoked(DID_A), "the revocation survived");
    assert!(
        !host.is_revoked(DID_B),
        "the delayed revocation is still waiting"
    );
    assert_eq!(host.queue("clawdentity-receipts")["backlog"], 3);
    assert_eq!(host.queue("clawdentity-events")["delayed"], 1);
}

#[test]
fn a_batch_in_flight_at_the_kill_is_delivered_again() {
    // The first delivery retries with a long delay, so the message is held; the kill
    // happens while the message is in the queue; after the restart it is delivered
    // again when due and acked.
    let config = scripted_consumer("jobs", "max_batch_timeout = 0");
    let mut host = Host::start(&config);
    host.publish(
        "jobs",
        json!({"do": "retry", "delay": 2, "ack_at": 2, "tag": "k"}),
    );
    host.wait_log("seen tag=k attempts=1 ");
    wait_for("the retry to be committed", || {
        (host.queue("jobs")["delayed"] == 1).then_some(())
    });

    host.kill_and_restart();

    host.wait_log("seen tag=k attempts=2 ");
    let status = host.wait_drained("jobs");
    assert_eq!(status["dead_lettered"], 0, "{status}");
}

const HELD: &str = "held";

/// A host whose queue [`HELD`] runs the hostile handler, which holds a batch as long as
/// a message says (`{"do": "sleep", "seconds": n}`), two batches at a time, with
/// `settings` for its consumer.
fn holding_host(settings: &str) -> Host {
    Host::start(&format!(
        "[[queues.consumers]]\nqueue = \"{HELD}\"\nhandler = \"{HOSTILE_HANDLER}\"\n\
         dead_letter_queue = \"{HELD}-dlq\"\nmax_batch_timeout = 0\nmax_concurrency = 2\n\
         wall_timeout = 600\n{settings}\n"
    ))
}

/// Publishes a message that holds its batch for ten minutes and waits until it is in
/// flight; returns its id.
fn publish_held(host: &Host) -> String {
    let id = host.publish(HELD, json!({"do": "sleep", "seconds": 600}));
    wait_in_flight(host);
    id
}

/// Waits until [`HELD`] has exactly one message in flight.
fn wait_in_flight(host: &Host) {
    wait_for("the held message to be in flight", || {
        (host.queue(HELD)["in_flight"] == 1).then_some(())
    });
}

#[test]
fn a_second_host_on_the_same_data_is_refused_before_it_touches_the_messages_in_flight() {
    let host = holding_host("");
    publish_held(&host);
    host.wait_log("hostile sleep attempts=1");

    let second = host.serve_again();
    assert!(!second.status.success(), "the second host exited at once");
    let stderr = String::from_utf8_lossy(&second.stderr);
    let expected = format!(
        "another `clawq serve` is already running with the data directory {} (pid {})",
        host.data_dir().display(),
        host.pid()
    );
    assert!(stderr.contains(&expected), "{stderr}");

    // A publish wakes the free consumer slot: a message the second host had released
    // (and not delivered itself before it failed) would be delivered again with it.
    host.publish(HELD, json!({"do": "ack"}));
    wait_for("the new message, or the held one again", || {
        let again = host.log_lines(&["hostile sleep"]).len() > 1;
        (again || !host.log_lines(&["hostile ack attempts=1"]).is_empty()).then_some(())
    });
    let deliveries =
        host.log_lines(&["hostile sleep"]).len() + stderr.matches("hostile sleep").count();
    assert_eq!(deliveries, 1, "the message in flight is delivered once");
    wait_for("the new message to be acked", || {
        let status = host.queue(HELD);
        (status["backlog"] == 0 && status["in_flight"] == 1).then_some(())
    });
}

#[test]
fn a_message_that_kills_the_host_is_dead_lettered_after_one_plus_max_retries_deliveries() {
    let mut host = holding_host("max_retries = 1");
    let id = publish_held(&host);
    // Each run dies while it holds the message, so no delivery gets an outcome.
    for attempt in 1..=2 {
        host.wait_log(&format!("hostile sleep attempts={attempt}"));
        wait_in_flight(&host);
        host.kill_and_restart();
    }

    let dead = wait_for("the message to be dead-lettered", || {
        let (status, message) = host.get(&format!("/v1/queues/{HELD}-dlq/messages/{id}"));
        (status == 200).then_some(message)
    });
    assert_eq!(
        dead["dead_reason"], "delivered 2 times without an outcome",
        "{dead}"
    );
    assert_eq!(
        (
            dead["source_queue"].as_str(),
            dead["source_attempts"].as_u64()
        ),
        (Some(HELD), Some(2))
    );
    host.wait_drained(HELD);
    host.publish(HELD, json!({"do": "ack"}));
    host.wait_log("hostile ack attempts=1");
    assert_eq!(
        host.all_log_lines(&["hostile sleep"]).len(),
        2,
        "never delivered a third time"
    );
    host.wait_log_all(&[
        "message dead-lettered",
        "delivered 2 times without an outcome",
    ]);
}
