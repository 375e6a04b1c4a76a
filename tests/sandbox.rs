//! The sandbox against a hostile handler (`tests/components/hostile-handler`), on a
//! queue of its own next to the bundled queues: a spinning handler leaves the host and
//! the other queues answering, a sleeping one is stopped by the wall-clock deadline,
//! huge errors and dead-letter reasons are stored bounded, a stderr flood is reported
//! by its head and tail, and a deployed component keeps its own name. The floods run
//! in rounds while `/healthz` answers within 100 ms, the events queue revokes, the
//! host's memory stays bounded and `clawq.db` grows by a bounded amount per message.

use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::{Value, json};

const HOSTILE: &str = "hostile";
const HOSTILE_DLQ: &str = "hostile-dlq";
/// The bound the README documents on a guest's text: 1 KiB, plus the marker giving the
/// original length, plus the failure's own words.
const MAX_STORED_TEXT: usize = 1024 + 100;
/// A host with fast bundled queues and the hostile handler on [`HOSTILE`], with
/// `settings` for its consumer.
fn hostile_host(settings: &str) -> Host {
    Host::start(&fast_config(&format!(
        "[[queues.consumers]]\nqueue = \"{HOSTILE}\"\nhandler = \"{HOSTILE_HANDLER}\"\n\
         dead_letter_queue = \"{HOSTILE_DLQ}\"\nmax_batch_timeout = 0.05\n{settings}\n"
    )))
}

/// The messages of `queue` (first page).
fn messages(host: &Host, queue: &str) -> Vec<Value> {
    let (status, body) = host.get(&format!("/v1/queues/{queue}/messages"));
    assert_eq!(status, 200, "{body}");
    body["messages"].as_array().unwrap().clone()
}

/// Waits until `queue` holds `n` messages and returns them.
fn wait_messages(host: &Host, queue: &str, n: usize) -> Vec<Value> {
    wait_for(&format!("{n} messages in {queue}"), || {
        let held = messages(host, queue);
        (held.len() >= n).then_some(held)
    })
}

/// A heartbeat round trip on a connector socket (see [`probe`]).
fn heartbeat_probe(socket: &mut Socket) -> Duration {
    probe("a heartbeat", || {
        let started = Instant::now();
        let beat = frame("heartbeat", json!({}));
        send_frame(socket, &beat);
        let ack = next_frame(socket);
        assert_eq!(
            (&ack["type"], &ack["ackId"]),
            (&json!("heartbeat_ack"), &beat["id"])
        );
        started.elapsed()
    })
}

#[test]
fn two_spinning_batches_leave_the_host_and_the_other_queues_answering() {
    // Two batches of one spinning message each, at once: both runtime threads of a
    // 2-core machine would be held without yields.
    let host = hostile_host(
        "max_batch_size = 1\nmax_concurrency = 2\nmax_instances = 2\nmax_retries = 1\n\
         cpu_timeout = 2\nwall_timeout = 30",
    );
    let token = host.add_agent(DID_B);
    let mut socket = host.connect(DID_B, Some(&token)).unwrap();
    host.publish_batch(HOSTILE, &[json!({"do": "spin"}), json!({"do": "spin"})]);
    wait_for("both batches spinning", || {
        (host.log_lines(&["hostile spin attempts=1"]).len() == 2).then_some(())
    });

    // The events queue keeps revoking while both spin.
    let agent = DID_A;
    host.publish(
        "clawdentity-events",
        revocation_event("agent_revoked", json!({"agentDid": agent})),
    );
    let mut latencies = Vec::new();
    while !host.is_revoked(agent) {
        latencies.push(host.healthz_probe());
    }
    assert!(
        host.queue(HOSTILE_DLQ)["backlog"].as_u64() == Some(0),
        "the revocation went through while the hostile batches still ran"
    );

    // /healthz and a connector's heartbeats answer within the bound for as long as the
    // spins last (two attempts).
    let mut spinning = 0;
    let mut heartbeats = Vec::new();
    while messages(&host, HOSTILE_DLQ).len() < 2 {
        latencies.push(host.healthz_probe());
        heartbeats.push(heartbeat_probe(&mut socket));
        spinning += 1;
    }
    let heartbeat_max = heartbeats.iter().max().copied().unwrap_or_default();
    eprintln!(
        "heartbeat round trips: {} probes, max {heartbeat_max:?}",
        heartbeats.len()
    );
    latencies.sort();
    let max = latencies.last().copied().unwrap_or_default();
    let probes = latencies.len() + heartbeats.len();
    let outliers = (latencies.iter().chain(&heartbeats))
        .filter(|l| **l >= HEALTHZ_BOUND)
        .count();
    eprintln!(
        "healthz during two spinning batches: {} probes, p50 {:?}, p99 {:?}, max {max:?}, \
         {outliers} single outliers retried",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100],
    );
    assert!(spinning >= 10, "the spins were probed ({spinning} probes)");
    assert!(
        outliers * 50 <= probes,
        "{outliers} of {probes} probes over {HEALTHZ_BOUND:?}"
    );

    // Each spin was stopped by its CPU budget, retried once, then dead-lettered.
    for dead in wait_messages(&host, HOSTILE_DLQ, 2) {
        assert_eq!(dead["source_attempts"], 2, "{dead}");
        let reason = dead["dead_reason"].as_str().unwrap();
        assert!(reason.contains("CPU budget of 2s used up"), "{reason}");
    }
    assert_eq!(host.log_lines(&["hostile spin attempts=2"]).len(), 2);
    let (_, handlers) = host.admin("GET", &format!("/v1/handlers/{HOSTILE}"), vec![], None);
    assert_eq!(handlers["counters"]["limit_hits"], 4, "{handlers}");
}

#[test]
fn a_sleeping_handler_is_stopped_by_the_wall_clock_deadline_and_retried() {
    let host = hostile_host("max_retries = 1\ncpu_timeout = 1\nwall_timeout = 1.5");
    let started = Instant::now();
    host.publish(HOSTILE, json!({"do": "sleep", "seconds": 3600}));
    let dead = wait_messages(&host, HOSTILE_DLQ, 1).remove(0);
    let reason = dead["dead_reason"].as_str().unwrap();
    assert!(
        reason.contains("wall-clock deadline of 1.5s exceeded"),
        "{reason}"
    );
    assert_eq!(dead["source_attempts"], 2, "retried once: {dead}");
    assert!(host.log_lines(&["hostile sleep attempts=2"]).len() == 1);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "stopped, not slept through"
    );
    // The CPU budget did not stop it: sleeping is not running.
    assert!(!reason.contains("CPU budget"), "{reason}");
}

/// The most `clawq.db` (with its write-ahead log) may grow per dead-lettered message
/// of an attack: the message with its bounded error and reason, rows and index entries.
const DATABASE_PER_MESSAGE: u64 = 16 * 1024;
/// What `clawq.db` may grow by besides the messages: one write-ahead log between
/// SQLite's checkpoints (1000 pages of 4 KiB), and the revocation event.
const DATABASE_SLACK: u64 = 5 << 20;

/// Publishes `batch` in rounds on [`HOSTILE`] while proving the host holds
/// ([`Host::under_attack`]); a round is over once [`HOSTILE_DLQ`] holds all its
/// messages. Checks that `clawq.db` grew within its bound and returns the dead
/// messages (first page).
fn dead_letter_rounds(host: &Host, what: &str, batch: &[Value]) -> Vec<Value> {
    let before = host.db_bytes("clawq.db");
    let n = batch.len() as u64;
    let figures = host.under_attack(
        what,
        |_| {
            host.publish_batch(HOSTILE, batch);
        },
        |round| host.queue(HOSTILE_DLQ)["backlog"].as_u64() >= Some(n * u64::from(round)),
    );
    let dead = n * u64::from(figures.rounds);
    let grown = host.db_bytes("clawq.db").saturating_sub(before);
    eprintln!("{what}: clawq.db grew by {grown} bytes for {dead} dead messages");
    assert!(
        grown <= DATABASE_SLACK + dead * DATABASE_PER_MESSAGE,
        "{what}: clawq.db grew by {grown} bytes for {dead} messages"
    );
    messages(host, HOSTILE_DLQ)
}

#[test]
fn a_twenty_megabyte_error_for_25_messages_is_stored_and_logged_bounded() {
    let host = hostile_host("max_retries = 1\nmax_batch_size = 25");
    let attack = json!({"do": "error", "size": 20_000_000});
    let dead = dead_letter_rounds(&host, "a 20 MB error for 25 messages", &vec![attack; 25]);
    for dead in dead {
        assert_eq!(dead["source_attempts"], 2, "retried once: {dead}");
        let last_error = dead["last_error"].as_str().unwrap();
        assert!(
            last_error.len() <= MAX_STORED_TEXT,
            "{} bytes",
            last_error.len()
        );
        assert!(
            last_error.ends_with("… (20000000 bytes)"),
            "{}",
            &last_error[last_error.len() - 40..]
        );
        let reason = dead["dead_reason"].as_str().unwrap();
        assert!(
            reason.len() <= MAX_STORED_TEXT + 80,
            "{} bytes",
            reason.len()
        );
    }
    let logged = host.log_lines(&["handler returned an error"]);
    assert!(!logged.is_empty());
    assert!(logged.iter().all(|l| l.text.len() < 4 * 1024));
}

#[test]
fn two_megabyte_dead_letter_reasons_are_stored_truncated() {
    let host = hostile_host("max_batch_size = 25");
    let attack = json!({"do": "dead-letter", "size": 2_000_000});
    let dead = dead_letter_rounds(&host, "2 MB dead-letter reasons", &vec![attack; 25]);
    for dead in dead {
        let reason = dead["dead_reason"].as_str().unwrap();
        assert!(reason.len() <= MAX_STORED_TEXT, "{} bytes", reason.len());
        assert!(reason.starts_with("rrrr") && reason.ends_with("… (2000000 bytes)"));
        assert_eq!(dead["source_attempts"], 1, "dead-lettered at once: {dead}");
    }
}

#[test]
fn a_stderr_flood_never_traps_the_guest_and_is_reported_by_head_and_tail() {
    let host = hostile_host("max_retries = 0");
    let attack = json!({"do": "stderr", "size": 1_000_000});
    let dead = dead_letter_rounds(&host, "a 1 MB stderr flood", &[attack]);
    for dead in dead {
        let error = dead["last_error"].as_str().unwrap();
        assert!(error.starts_with("handler trapped: "), "{error:.200}");
        assert!(
            !error.contains("capacity"),
            "the pipe refused nothing: {error:.200}"
        );
        assert!(
            error.contains("stderr: xxxx"),
            "the head is kept: {error:.300}"
        );
        assert!(
            error.contains("hostile stderr flood of 1000000 bytes"),
            "the tail (the panic message) is kept: {}",
            &error[error.len().saturating_sub(300)..]
        );
        assert!(error.contains(" bytes) … "), "the cut is marked");
        assert!(error.len() < 5 * 1024, "{} bytes", error.len());
    }
}

#[test]
fn configs_that_cannot_work_are_refused_naming_their_keys() {
    let refused = |settings: &str| refused_serve(&scripted_consumer("jobs", settings));
    let error = refused("max_concurrency = 2\nmax_instances = 1");
    assert!(
        error.contains("max_concurrency (2) cannot exceed max_instances (1)"),
        "{error}"
    );
    let error = refused("max_batch_size = 100\nmemory_limit_mb = 16");
    assert!(
        error.contains("memory_limit_mb (16) is too small for a full batch")
            && error.contains("max_batch_size 100"),
        "{error}"
    );
    let error = refused("cpu_timeout = 301");
    assert!(
        error.contains("cpu_timeout must be at most 300 s"),
        "{error}"
    );
    let error = refused("cpu_timeout = 40");
    assert!(
        error.contains("wall_timeout (30 s) must be at least cpu_timeout (40 s)"),
        "{error}"
    );
}

#[test]
fn a_deployed_component_is_listed_and_logged_under_its_own_name() {
    let host = Host::start(&scripted_consumer("jobs", ""));
    let wasm = std::fs::read(HOSTILE_HANDLER).unwrap();
    let (status, body) = host.admin(
        "PUT",
        "/v1/handlers/jobs?name=hostile-v2",
        wasm.clone(),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "hostile-v2");
    host.wait_log_all(&["handler swapped", "hostile-v2"]);
    let (_, slot) = host.admin("GET", "/v1/handlers/jobs", vec![], None);
    assert_eq!(slot["current"]["name"], "hostile-v2", "{slot}");
    assert_eq!(slot["history"][0]["name"], "hostile-v2", "{slot}");
    host.publish("jobs", json!({"do": "ack"}));
    host.wait_log_all(&["hostile ack attempts=1", "handler=\"hostile-v2\""]);

    let (status, body) = host.admin("PUT", "/v1/handlers/jobs?name=no/slash", wasm, None);
    assert_eq!(status, 400, "{body}");

    // A rollback brings the scripted handler back under its own name.
    let (status, body) = host.admin("POST", "/v1/handlers/jobs/rollback", vec![], None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "scripted_handler", "{body}");
}
