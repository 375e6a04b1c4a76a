//! End to end: observability. `/metrics` parses as Prometheus text and its counters match
//! what the test did; JSON logs carry the batch span and attribute guest lines.

mod support;

use serde_json::json;
use support::*;

const JOBS: &str = "jobs";

/// The value of the sample `name` whose labels include every one of `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
    match found.map(|s| &s.value) {
        Some(
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v),
        ) => *v,
        other => panic!("no sample {name} {labels:?}: {other:?}"),
    }
}

fn scrape(host: &Host) -> prometheus_parse::Scrape {
    let text = reqwest::blocking::get(format!("{}/metrics", host.base))
        .unwrap()
        .text()
        .unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("valid Prometheus text")
}

#[test]
fn counters_match_what_happened() {
    let host = Host::start(&scripted_consumer(
        JOBS,
        "max_batch_timeout = 0\nmax_retries = 1",
    ));
    let bodies = [
        json!({"do": "ack", "tag": "a"}),
        json!({"do": "ack", "tag": "b"}),
        json!({"do": "dead-letter", "reason": "no", "tag": "c"}),
        json!({"do": "retry", "ack_at": 2, "tag": "d"}),
        json!({"do": "trap", "tag": "e"}),
    ];
    // One at a time, so that no batch mixes a trap with another message.
    for body in &bodies {
        host.publish(JOBS, body.clone());
        host.wait_drained(JOBS);
    }

    let m = scrape(&host);
    let q = [("queue", JOBS)];
    assert_eq!(sample(&m, "clawq_messages_published_total", &q), 5.0);
    assert_eq!(
        sample(&m, "clawq_messages_acked_total", &q),
        3.0,
        "a, b, and d on its 2nd attempt"
    );
    assert_eq!(
        sample(&m, "clawq_messages_dead_lettered_total", &q),
        2.0,
        "c, and e after max_retries"
    );
    assert_eq!(
        sample(&m, "clawq_messages_retried_total", &q),
        2.0,
        "d and e once each"
    );
    assert_eq!(sample(&m, "clawq_queue_backlog", &q), 0.0);
    assert_eq!(
        sample(&m, "clawq_queue_backlog", &[("queue", "jobs-dlq")]),
        2.0
    );
    assert_eq!(
        sample(&m, "clawq_handler_traps_total", &[("consumer", JOBS)]),
        2.0,
        "e trapped on both attempts"
    );
    assert!(sample(&m, "clawq_handler_batches_total", &[("consumer", JOBS)]) >= 5.0);
    assert_eq!(
        sample(&m, "clawq_handler_current_version", &[("consumer", JOBS)]),
        1.0
    );
    assert_eq!(sample(&m, "clawq_websocket_connections", &[]), 0.0);
    let durations = m
        .samples
        .iter()
        .find(|s| s.metric == "clawq_handler_batch_duration_seconds");
    assert!(
        durations.is_some(),
        "the batch duration histogram is exported"
    );
}

#[test]
fn json_logs_attribute_guest_lines_to_their_handler_and_version() {
    let host = Host::start_with(
        &scripted_consumer(JOBS, "max_batch_timeout = 0"),
        &["--log-format", "json"],
    );
    host.publish(JOBS, json!({"do": "ack", "tag": "j"}));
    let line = host.wait_log("seen tag=j ");
    let entry: serde_json::Value =
        serde_json::from_str(&line.text).expect("one JSON object per line");
    assert_eq!(entry["level"], "INFO");
    assert_eq!(entry["target"], "clawq::guest");
    assert_eq!(entry["fields"]["handler"], "scripted_handler");
    assert_eq!(entry["fields"]["version"].as_str().unwrap().len(), 12);
    assert_eq!(entry["span"]["name"], "batch");
    assert_eq!(entry["span"]["queue"], JOBS);
    assert_eq!(entry["span"]["size"], 1);
}
