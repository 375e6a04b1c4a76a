//! The JetStream queue backend (`[backend] kind = "nats"`) end to end, against a real
//! `nats-server -js`: the queue semantics of the SQLite tests on one host, then several
//! hosts sharing the queues while hosts and the NATS server are killed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::nats::NatsServer;
use crate::support::*;

const JOBS: &str = "jobs";
const PARKED: &str = "parked";

#[test]
fn batches_are_full_or_timed_out() {
    let nats = NatsServer::start();
    crate::queue::full_and_partial_batches(&nats.backend_config());
}

#[test]
fn a_retry_with_delay_comes_back_after_it() {
    let nats = NatsServer::start();
    crate::queue::retry_with_delay(&nats.backend_config());
}

#[test]
fn max_retries_then_the_dead_letter_queue() {
    let nats = NatsServer::start();
    crate::queue::max_retries_then_dlq(&nats.backend_config());
}

#[test]
fn a_dead_letter_outcome_skips_the_retries() {
    let nats = NatsServer::start();
    crate::queue::dead_letter_outcome(&nats.backend_config());
}

#[test]
fn failed_batches_are_retried() {
    let nats = NatsServer::start();
    crate::queue::failed_batches_retried(&nats.backend_config());
}

#[test]
fn dead_letters_are_listed_redriven_and_purged() {
    let nats = NatsServer::start();
    let host = crate::dlq::start_on(&nats.backend_config());
    crate::dlq::dead_letters_listed_redriven_and_purged(&host);
}

#[test]
fn each_consumer_gets_the_messages_it_subscribes_to() {
    let nats = NatsServer::start();
    crate::subscriptions::each_consumer_receives_its_messages(&nats.backend_config());
}

#[test]
fn delayed_messages_are_counted_then_delivered_when_due() {
    let nats = NatsServer::start();
    let host = Host::start(
        &(nats.backend_config()
            + &scripted_consumer(JOBS, "max_batch_timeout = 0")
            + &format!("[[queues.producers]]\nqueue = \"{PARKED}\"\n")),
    );
    let parked = format!("/v1/queues/{PARKED}/messages");
    for message in [json!({"body": 1, "delay_seconds": 2}), json!({"body": 2})] {
        let (status, reply) = host.post(&parked, &message);
        assert_eq!(status, 200, "{reply}");
    }
    let counts =
        |status: Value| ["backlog", "in_flight", "delayed"].map(|k| status[k].as_u64().unwrap());
    assert_eq!(counts(host.queue(PARKED)), [1, 0, 1]);
    let (_, page) = host.get(&parked);
    let states: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["delayed", "ready"], "{page}");
    wait_for("the delayed message to be due", || {
        (counts(host.queue(PARKED)) == [2, 0, 0]).then_some(())
    });

    let published = Instant::now();
    let late = json!({"body": {"do": "ack", "tag": "late"}, "delay_seconds": 1});
    let (status, reply) = host.post(&format!("/v1/queues/{JOBS}/messages"), &late);
    assert_eq!(status, 200, "{reply}");
    let seen = host.wait_log("seen tag=late attempts=1 ");
    assert!(
        seen.at - published >= Duration::from_millis(900),
        "delivered before its delay: {:?}",
        seen.at - published
    );
    host.wait_drained(JOBS);
}

/// The config of hosts that share `jobs`, handled by the scripted handler in batches.
fn shared(nats: &NatsServer) -> String {
    nats.backend_config()
        + &scripted_consumer(
            JOBS,
            "max_batch_size = 100\nmax_batch_timeout = 0.02\nmax_concurrency = 2",
        )
}

/// The tags of `count` messages, `first` on.
fn tags(first: usize, count: usize) -> Vec<String> {
    (first..first + count).map(|i| format!("m{i}")).collect()
}

/// Publishes `tags` to `jobs` through `host` in one batch of scripted acks; whether the
/// host answered 200 (a 503 in an outage stores nothing for sure, or some: duplicates).
fn publish_tags(host: &Host, tags: &[String]) -> bool {
    let messages: Vec<Value> = tags
        .iter()
        .map(|tag| json!({"body": {"do": "ack", "tag": tag}}))
        .collect();
    let (status, reply) = host.post(
        &format!("/v1/queues/{JOBS}/messages/batch"),
        &json!({ "messages": messages }),
    );
    assert!(status == 200 || status == 503, "{status}: {reply}");
    status == 200
}

/// Every tag the scripted handler saw on `hosts` (every run of each), with how many
/// times each was seen.
fn seen_tags(hosts: &[Host]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for host in hosts {
        for line in host.all_log_lines(&["scripted_handler", "seen tag="]) {
            let tag = line.text.split("seen tag=").nth(1).unwrap();
            let tag = tag.split_whitespace().next().unwrap().to_owned();
            *seen.entry(tag).or_insert(0) += 1;
        }
    }
    seen
}

/// Asserts that every one of `published` was handled on `hosts`; prints the duplicates.
fn assert_all_handled(hosts: &[Host], published: &[String], what: &str) {
    let seen = seen_tags(hosts);
    let missing: Vec<&String> = published
        .iter()
        .filter(|t| !seen.contains_key(*t))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {} messages never handled, such as {:?}",
        missing.len(),
        published.len(),
        &missing[..missing.len().min(5)]
    );
    let per_host: Vec<usize> = hosts
        .iter()
        .map(|host| host.all_log_lines(&["scripted_handler", "seen tag="]).len())
        .collect();
    println!(
        "{what}: {} messages published, all handled; {} handled more than once; \
         deliveries per host: {per_host:?}",
        published.len(),
        seen.values().filter(|&&n| n > 1).count(),
    );
}

/// Messages of the many-hosts test, in batches of [`BATCH`] by [`PRODUCERS`] producers.
const MESSAGES: usize = 20_000;
const BATCH: usize = 100;
const PRODUCERS: usize = 4;

#[test]
fn three_hosts_share_a_queue_while_one_is_killed_twice() {
    let nats = NatsServer::start();
    let config = shared(&nats);
    let hosts = RwLock::new((0..3).map(|_| Host::start(&config)).collect::<Vec<_>>());
    let batches = AtomicUsize::new(0);
    let total = MESSAGES / BATCH;
    std::thread::scope(|scope| {
        for producer in 0..PRODUCERS {
            let (hosts, batches) = (&hosts, &batches);
            scope.spawn(move || {
                for (n, batch) in (producer..total).step_by(PRODUCERS).enumerate() {
                    let hosts = hosts.read().unwrap();
                    let host = &hosts[(producer + n) % hosts.len()];
                    assert!(publish_tags(host, &tags(batch * BATCH, BATCH)));
                    batches.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        for kill in 1..=2 {
            // Killed while it handles messages: a third of them published, and some of
            // them handled by this run of the host.
            wait_for("the producers to get on", || {
                (batches.load(Ordering::SeqCst) >= total * kill / 3).then_some(())
            });
            wait_for("the host to handle messages", || {
                let hosts = hosts.read().unwrap();
                (!hosts[2].log_lines(&["seen tag="]).is_empty()).then_some(())
            });
            let mut hosts = hosts.write().unwrap();
            hosts[2].kill();
            hosts[2].restart();
        }
    });
    let hosts = hosts.into_inner().unwrap();
    hosts[0].wait_drained(JOBS);
    assert_all_handled(&hosts, &tags(0, MESSAGES), "3 hosts, one killed twice");
}

#[test]
fn nothing_acknowledged_is_lost_when_the_nats_server_dies() {
    let mut nats = NatsServer::start();
    let config = shared(&nats);
    let hosts = [Host::start(&config), Host::start(&config)];
    let producers = hosts.len();
    let total = 5_000 / BATCH;
    let (acknowledged, batches) = (Mutex::new(Vec::new()), AtomicUsize::new(0));
    std::thread::scope(|scope| {
        for (i, host) in hosts.iter().enumerate() {
            let (acknowledged, batches) = (&acknowledged, &batches);
            scope.spawn(move || {
                for batch in (i..total).step_by(producers) {
                    let tags = tags(batch * BATCH, BATCH);
                    // A 503 (NATS away) is published again: a retry, as a producer does.
                    while !publish_tags(host, &tags) {}
                    acknowledged.lock().unwrap().extend(tags);
                    batches.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        wait_for("the producers to get on", || {
            (batches.load(Ordering::SeqCst) >= total / 3).then_some(())
        });
        nats.kill();
        wait_for("the hosts to report the outage", || {
            hosts
                .iter()
                .all(|host| host.get("/healthz").0 == 503)
                .then_some(())
        });
        nats.restart();
    });
    for host in &hosts {
        wait_for("the host to reconnect", || {
            (host.get("/healthz").0 == 200).then_some(())
        });
    }
    hosts[0].wait_drained(JOBS);
    let acknowledged = acknowledged.into_inner().unwrap();
    assert_eq!(acknowledged.len(), total * BATCH);
    assert_all_handled(&hosts, &acknowledged, "NATS killed mid-load");
}

#[test]
fn a_message_in_flight_is_counted_shown_and_passed_over() {
    let nats = NatsServer::start();
    let host = Host::start(
        &(nats.backend_config()
            + &scripted_consumer(
                JOBS,
                "max_batch_timeout = 0\nmax_retries = 0\ncpu_timeout = 3\nwall_timeout = 4",
            )),
    );
    let id = host.publish(JOBS, json!({"do": "loop", "tag": "busy"}));
    wait_for("the message to be in flight", || {
        (host.queue(JOBS)["in_flight"] == 1).then_some(())
    });
    let (status, page) = host.get(&format!("/v1/queues/{JOBS}/messages"));
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"][0]["id"], id.as_str(), "{page}");
    assert_eq!(page["messages"][0]["state"], "in_flight", "{page}");
    let everything = json!({"all": true});
    let (status, reply) = host.delete(&format!("/v1/queues/{JOBS}/messages"), Some(&everything));
    assert_eq!((status, reply), (200, json!({"purged": 0})));
    // Its batch runs out of CPU time: with no retry left, it is dead-lettered.
    wait_for("the message to be dead-lettered", || {
        (host.queue(JOBS)["dead_lettered"] == 1).then_some(())
    });
    let (status, dead) = host.get(&format!("/v1/queues/{JOBS}-dlq/messages/{id}"));
    assert_eq!(status, 200, "{dead}");
    assert_eq!(dead["source_attempts"], 1, "{dead}");
    host.wait_drained(JOBS);
}
