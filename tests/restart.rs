//! End to end: a host killed with SIGKILL and started again keeps its queued messages
//! and its revocations.

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
