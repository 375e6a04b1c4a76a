//! End to end: queue semantics (spec section 1) through the real host and a real
//! component whose outcomes the message bodies script.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

const JOBS: &str = "jobs";

fn seen(host: &Host, tag: &str) -> Vec<LogLine> {
    host.log_lines(&["scripted_handler", &format!("seen tag={tag} ")])
}

#[test]
fn a_full_batch_goes_out_at_once_and_a_partial_one_after_the_timeout() {
    full_and_partial_batches("");
}

/// The test above, on the queue backend `backend` configures (a `[backend]` section;
/// empty: the embedded SQLite).
pub(crate) fn full_and_partial_batches(backend: &str) {
    let config = scripted_consumer("sized", "max_batch_size = 4\nmax_batch_timeout = 30")
        + &scripted_consumer("timed", "max_batch_size = 50\nmax_batch_timeout = 0.5");
    let host = Host::start(&(backend.to_owned() + &config));

    let full: Vec<_> = (0..4)
        .map(|i| json!({"do": "ack", "tag": format!("size{i}")}))
        .collect();
    host.publish_batch("sized", &full);
    for i in 0..4 {
        host.wait_log(&format!("seen tag=size{i} attempts=1 batch=4"));
    }

    let published = std::time::Instant::now();
    let partial: Vec<_> = (0..3)
        .map(|i| json!({"do": "ack", "tag": format!("time{i}")}))
        .collect();
    host.publish_batch("timed", &partial);
    let line = host.wait_log("seen tag=time0 attempts=1 batch=3");
    let waited = line.at - published;
    assert!(
        waited >= Duration::from_millis(400),
        "a partial batch waits for max_batch_timeout: {waited:?}"
    );
    host.wait_drained("sized");
    host.wait_drained("timed");
}

/// A consumer of `jobs` taking one message a batch, one at a time, whose batches end
/// at `cpu_timeout` seconds of CPU when the handler spins; a failed message waits a
/// minute before it is retried.
fn one_at_a_time(cpu_timeout: u32) -> String {
    scripted_consumer(
        JOBS,
        &format!(
            "max_batch_size = 1\nmax_batch_timeout = 0\nmax_concurrency = 1\nretry_delay = 60\n\
             cpu_timeout = {cpu_timeout}\nwall_timeout = {}",
            cpu_timeout * 2
        ),
    )
}

/// Publishes a message that spins until its CPU deadline, waits until it runs, then
/// publishes one to ack and waits until it is leased ahead; returns the second's id.
fn one_running_one_leased_ahead(host: &Host) -> String {
    host.publish(JOBS, json!({"do": "loop", "tag": "busy"}));
    host.wait_log("seen tag=busy attempts=1");
    let ahead = host.publish(JOBS, json!({"do": "ack", "tag": "ahead"}));
    wait_for("the next batch to be leased while the first runs", || {
        let status = host.queue(JOBS);
        (status["in_flight"] == 2 && status["backlog"] == 0).then_some(())
    });
    ahead
}

#[test]
fn batches_leased_together_reach_the_handler_one_at_a_time_in_order_and_never_early() {
    let host = Host::start(&scripted_consumer(
        JOBS,
        "max_batch_size = 10\nmax_batch_timeout = 1",
    ));
    // A first batch, so that the consumer knows its handler is quick and leases several
    // batches at once.
    let first: Vec<_> = (0..10)
        .map(|i| json!({"tag": format!("warm{i}")}))
        .collect();
    host.publish_batch(JOBS, &first);
    host.wait_log("seen tag=warm9 ");

    let bodies: Vec<_> = (0..45).map(|i| json!({"tag": format!("m{i}")})).collect();
    let published = std::time::Instant::now();
    host.publish_batch(JOBS, &bodies);
    host.wait_log("seen tag=m44 ");
    let lines = host.log_lines(&["scripted_handler", "seen tag=m"]);
    let seen: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            let tag = l.text.split("seen tag=").nth(1).unwrap();
            let batch = l.text.split("batch=").nth(1).unwrap();
            (
                tag.split(' ').next().unwrap(),
                batch.split(|c: char| !c.is_ascii_digit()).next().unwrap(),
            )
        })
        .collect();
    let tags: Vec<String> = (0..45).map(|i| format!("m{i}")).collect();
    assert_eq!(
        seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        tags,
        "each once, in publish order"
    );
    assert!(seen[..40].iter().all(|s| s.1 == "10"), "{seen:?}");
    assert!(seen[40..].iter().all(|s| s.1 == "5"), "{seen:?}");
    let partial = lines[40].at.duration_since(published);
    assert!(
        partial >= Duration::from_millis(900),
        "the partial batch waited for max_batch_timeout, not {partial:?}"
    );
}

#[test]
fn a_batch_leased_ahead_that_waits_too_long_for_its_turn_is_given_back_and_taken_again() {
    // The spinning batch ends after 11 s, past the 10 s a batch leased ahead may wait.
    let host = Host::start(&one_at_a_time(11));
    one_running_one_leased_ahead(&host);

    let given_back = host.wait_log("waited too long for its turn; given back to the queue");
    let handled = host.wait_log("seen tag=ahead attempts=1 ");
    assert!(handled.at >= given_back.at);
    assert_eq!(
        seen(&host, "ahead").len(),
        1,
        "handled once, its attempt not counted twice"
    );
    assert_eq!(
        seen(&host, "busy").len(),
        1,
        "the failed batch waits for its retry delay"
    );
}

#[test]
fn a_batch_leased_ahead_is_given_back_untouched_when_the_host_stops() {
    let mut host = Host::start(&one_at_a_time(2));
    let ahead = one_running_one_leased_ahead(&host);

    assert!(host.terminate().success());
    // Back without a consumer: the message is stored, ready, its lease not counted.
    host.set_config(&format!("[[queues.producers]]\nqueue = \"{JOBS}\"\n"));
    host.restart();
    let (status, message) = host.get(&format!("/v1/queues/{JOBS}/messages/{ahead}"));
    assert_eq!(status, 200, "{message}");
    assert_eq!(
        (message["state"].as_str(), message["attempts"].as_u64()),
        (Some("ready"), Some(0)),
        "{message}"
    );
    assert!(
        host.all_log_lines(&["seen tag=ahead"]).is_empty(),
        "never handled"
    );
}

#[test]
fn a_retry_with_delay_is_delivered_again_after_the_delay() {
    retry_with_delay("");
}

/// The test above, on the queue backend `backend` configures (a `[backend]` section;
/// empty: the embedded SQLite).
pub(crate) fn retry_with_delay(backend: &str) {
    let host =
        Host::start(&(backend.to_owned() + &scripted_consumer(JOBS, "max_batch_timeout = 0")));
    host.publish(
        JOBS,
        json!({"do": "retry", "delay": 1, "ack_at": 2, "tag": "r"}),
    );
    let first = host.wait_log("seen tag=r attempts=1 ");
    let second = host.wait_log("seen tag=r attempts=2 ");
    assert!(
        second.at - first.at >= Duration::from_millis(900),
        "{:?}",
        second.at - first.at
    );
    let status = host.wait_drained(JOBS);
    assert_eq!(status["dead_lettered"], 0, "{status}");
    assert_eq!(seen(&host, "r").len(), 2);
}

#[test]
fn max_retries_then_the_dead_letter_queue() {
    max_retries_then_dlq("");
}

/// The test above, on the queue backend `backend` configures (a `[backend]` section;
/// empty: the embedded SQLite).
pub(crate) fn max_retries_then_dlq(backend: &str) {
    let host = Host::start(
        &(backend.to_owned() + &scripted_consumer(JOBS, "max_batch_timeout = 0\nmax_retries = 2")),
    );
    host.publish(JOBS, json!({"do": "retry", "tag": "m"}));
    wait_for("the message to be dead-lettered", || {
        (host.queue(JOBS)["dead_lettered"] == 1).then_some(())
    });
    let attempts: Vec<String> = seen(&host, "m").iter().map(|l| l.text.clone()).collect();
    assert_eq!(attempts.len(), 3, "1 delivery + 2 retries: {attempts:#?}");
    assert_eq!(host.queue("jobs-dlq")["backlog"], 1);
    host.wait_log_all(&[
        "message dead-lettered",
        "max_retries (2) exceeded after 3 attempts",
    ]);
}

#[test]
fn a_dead_letter_outcome_skips_the_remaining_attempts() {
    dead_letter_outcome("");
}

/// The test above, on the queue backend `backend` configures (a `[backend]` section;
/// empty: the embedded SQLite).
pub(crate) fn dead_letter_outcome(backend: &str) {
    let host =
        Host::start(&(backend.to_owned() + &scripted_consumer(JOBS, "max_batch_timeout = 0")));
    host.publish(
        JOBS,
        json!({"do": "dead-letter", "reason": "poison pill", "tag": "d"}),
    );
    wait_for("the message to be dead-lettered", || {
        (host.queue(JOBS)["dead_lettered"] == 1).then_some(())
    });
    host.wait_log_all(&["message dead-lettered", "poison pill"]);
    assert_eq!(seen(&host, "d").len(), 1);
}

/// A trap, an error from `handle` and a missing outcome each retry the message; the
/// host keeps serving, and a good message afterwards is handled.
#[test]
fn failed_batches_are_retried_and_the_host_serves_on() {
    failed_batches_retried("");
}

/// The test above, on the queue backend `backend` configures (a `[backend]` section;
/// empty: the embedded SQLite).
pub(crate) fn failed_batches_retried(backend: &str) {
    let host = Host::start(
        &(backend.to_owned() + &scripted_consumer(JOBS, "max_batch_timeout = 0\nmax_retries = 1")),
    );
    for (action, tag) in [("trap", "t"), ("fail", "f"), ("skip", "s")] {
        host.publish(JOBS, json!({"do": action, "tag": tag}));
        host.wait_log(&format!("seen tag={tag} attempts=2 "));
    }
    host.wait_log_all(&["batch failed", "handler trapped", "scripted trap"]);
    host.wait_log_all(&[
        "batch failed",
        "handler returned an error",
        "scripted failure",
    ]);
    wait_for("all three dead-lettered", || {
        (host.queue(JOBS)["dead_lettered"] == 3).then_some(())
    });

    let (status, _) = host.get("/healthz");
    assert_eq!(status, 200);
    host.publish(JOBS, json!({"do": "ack", "tag": "ok"}));
    host.wait_log("seen tag=ok attempts=1 ");
    let status = host.wait_drained(JOBS);
    assert_eq!(status["dead_lettered"], 3, "{status}");
}

#[test]
fn handlers_reach_their_capabilities() {
    let host = Host::start(&scripted_consumer(JOBS, "max_batch_timeout = 0"));
    host.publish(JOBS, json!({"do": "revoke", "did": DID_B, "tag": "cap"}));
    wait_for("the scripted revocation", || {
        host.is_revoked(DID_B).then_some(())
    });
}
