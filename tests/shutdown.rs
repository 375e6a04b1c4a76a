//! End to end: graceful shutdown. On SIGTERM the host stops taking batches, lets the
//! batches in flight commit, closes connector WebSockets with a close frame and exits 0;
//! after a restart nothing is lost.

use std::collections::BTreeMap;

use crate::support::*;
use serde_json::{Value, json};

const JOBS: &str = "jobs";
/// Enough messages that batches are still being handled when SIGTERM arrives.
const MESSAGES: usize = 5_000;

/// The tags the scripted handler logged in `lines`, each with how many times.
fn tags(lines: &[LogLine]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for line in lines {
        let tag = line.text.split("seen tag=").nth(1).unwrap();
        *seen
            .entry(tag.split(' ').next().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    seen
}

#[test]
fn sigterm_commits_the_batches_in_flight_closes_websockets_and_exits_0() {
    // A first run only stores the messages (the queue has no consumer yet), so that the
    // second run starts with all of them ready and is stopped with a batch in flight.
    let mut host = Host::start(&format!("[[queues.producers]]\nqueue = \"{JOBS}\"\n"));
    let token = host.add_agent(DID_A);
    let bodies: Vec<Value> = (0..MESSAGES)
        .map(|i| json!({"do": "ack", "tag": format!("m{i}")}))
        .collect();
    for chunk in bodies.chunks(100) {
        host.publish_batch(JOBS, chunk);
    }
    let idle = host.terminate();
    assert!(idle.success(), "an idle host exits 0 too: {idle}");

    host.set_config(&scripted_consumer(
        JOBS,
        "max_batch_size = 100\nmax_batch_timeout = 0.01",
    ));
    host.restart();
    let mut socket = host.connect(DID_A, Some(&token)).unwrap();
    // The connector reads (and answers the close handshake) while the host shuts down.
    let connector = std::thread::spawn(move || {
        loop {
            if let Seen::Closed(code, reason) = next_event(&mut socket, &[]) {
                return (code, reason);
            }
        }
    });
    host.wait_log("seen tag=m");
    let status = host.terminate();

    assert!(status.success(), "exit status {status}");
    host.wait_log("shutdown requested");
    host.wait_log("stopped");
    assert!(
        host.log_lines(&["still running"]).is_empty(),
        "every batch in flight finished within the deadline"
    );
    assert_eq!(
        connector.join().unwrap(),
        (1001, "host_shutting_down".to_owned()),
        "the connector got a close frame"
    );
    let before = tags(&host.log_lines(&["seen tag=m"]));
    assert!(
        before.len() < MESSAGES,
        "the host stopped before handling everything ({} of {MESSAGES} handled)",
        before.len()
    );

    host.restart();
    let status = host.wait_drained(JOBS);
    assert_eq!(status["dead_lettered"], 0, "{status}");
    let after = tags(&host.log_lines(&["seen tag=m"]));
    let all = tags(&host.all_log_lines(&["seen tag=m"]));
    assert_eq!(all.len(), MESSAGES, "every message was handled");
    let again: Vec<_> = before.keys().filter(|t| after.contains_key(*t)).collect();
    assert!(
        again.is_empty(),
        "the outcomes of the batches in flight were committed before the exit, yet {} \
         messages were delivered again, e.g. {:?}",
        again.len(),
        &again[..again.len().min(5)]
    );
    eprintln!(
        "{} messages handled before SIGTERM, {} after the restart",
        before.len(),
        after.len()
    );
}
