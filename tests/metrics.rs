//! End to end: observability. `/metrics` lists every series the README documents from the
//! start, at 0, and nothing it does not; it parses as Prometheus text and its counters
//! match what the test did; JSON logs carry the batch span and attribute guest lines.

use crate::support::*;
use serde_json::json;

const JOBS: &str = "jobs";

/// The value of the sample `name` whose labels include every one of `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    find_sample(scrape, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

/// A series of the README's metrics table: its name and its labels, each with the values
/// the README lists for it (none: one per queue, consumer or version).
struct Documented {
    name: String,
    labels: Vec<(String, Vec<String>)>,
}

/// The rows of the README's metrics table.
fn documented_series() -> Vec<Documented> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let series: Vec<Documented> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| series | labels | what |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.split(" | ").collect();
            let name = cells[0]
                .trim_start_matches("| ")
                .trim_matches('`')
                .to_owned();
            // `label` names at the top level, `(`value`, ...)` after the label they take.
            let mut labels: Vec<(String, Vec<String>)> = Vec::new();
            let mut depth = 0;
            for (i, part) in cells[1].split('`').enumerate() {
                if i % 2 == 0 {
                    depth += part.matches('(').count();
                    depth -= part.matches(')').count();
                } else if depth == 0 {
                    labels.push((part.to_owned(), Vec::new()));
                } else {
                    labels.last_mut().unwrap().1.push(part.to_owned());
                }
            }
            Documented { name, labels }
        })
        .collect();
    assert!(
        series.len() > 20,
        "the README's metrics table: {} rows",
        series.len()
    );
    series
}

/// The name a sample's series has in the README (a histogram's without its suffix).
fn series_of(metric: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| metric.strip_suffix(suffix))
        .filter(|base| base.ends_with("_seconds"))
        .unwrap_or(metric)
}

#[test]
fn every_documented_series_is_there_from_the_start_at_zero() {
    let host = Host::start("");
    let (_, queues) = host.get("/v1/queues");
    let queues = queues["queues"].as_array().unwrap();
    let queue_names: Vec<String> = queues
        .iter()
        .map(|q| q["queue"].as_str().unwrap().to_owned())
        .collect();
    let consumers: Vec<String> = queues
        .iter()
        .flat_map(|q| q["consumers"].as_array().unwrap())
        .filter(|c| !c["handler"].is_null())
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(queue_names.len(), 4, "{queue_names:?}");
    assert_eq!(consumers.len(), 3, "{consumers:?}");

    let m = host.scrape();
    let documented = documented_series();
    for series in &documented {
        // Every combination of the label values the series must have.
        let mut combinations: Vec<Vec<(&str, &str)>> = vec![Vec::new()];
        for (label, values) in &series.labels {
            let values: Vec<&str> = match label.as_str() {
                "queue" => queue_names.iter().map(String::as_str).collect(),
                "consumer" => consumers.iter().map(String::as_str).collect(),
                "version" => continue, // whatever the current one is
                _ => values.iter().map(String::as_str).collect(),
            };
            assert!(
                !values.is_empty(),
                "{}: no values for `{label}`",
                series.name
            );
            combinations = combinations
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((label.as_str(), *v));
                        c
                    })
                })
                .collect();
        }
        let documented_labels: Vec<&str> = series.labels.iter().map(|(l, _)| l.as_str()).collect();
        for combination in combinations {
            let found = m.samples.iter().find(|s| {
                series_of(&s.metric) == series.name
                    && combination.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            });
            let Some(found) = found else {
                panic!(
                    "{} {combination:?} is not exported right after start",
                    series.name
                );
            };
            let mut labels: Vec<&str> = found
                .labels
                .keys()
                .map(String::as_str)
                .filter(|l| *l != "le")
                .collect();
            labels.sort_unstable();
            let mut expected = documented_labels.clone();
            expected.sort_unstable();
            assert_eq!(labels, expected, "the labels of {}", series.name);
            if series.name.ends_with("_total") {
                assert_eq!(
                    sample(&m, &found.metric, &combination),
                    0.0,
                    "{} {combination:?} right after start",
                    series.name
                );
            }
        }
    }
    for s in &m.samples {
        assert!(
            documented.iter().any(|d| d.name == series_of(&s.metric)),
            "{} is exported but not in the README's metrics table",
            s.metric
        );
    }
}

/// Every reason the host's code closes a connector connection for: the literal after a
/// close code (`(1008, "agent_revoked")`, `End::Close(1011, "heartbeat_ack_timeout")`)
/// and those of `End::Quiet("...")`, a connection ending without a close frame.
fn close_reasons_in_source() -> std::collections::BTreeSet<String> {
    let mut reasons = std::collections::BTreeSet::new();
    for (_, source) in host_sources() {
        for (at, _) in source.match_indices("End::Quiet(") {
            reasons.extend(leading_literal(&source[at + "End::Quiet(".len()..]).map(str::to_owned));
        }
        let bytes = source.as_bytes();
        for (at, _) in source.match_indices(", \"") {
            let code = at
                .checked_sub(4)
                .map(|start| &bytes[start..at])
                .filter(|code| {
                    matches!(code[0], b'1' | b'4') && code.iter().all(u8::is_ascii_digit)
                })
                .filter(|_| at < 5 || !bytes[at - 5].is_ascii_digit());
            if code.is_some() {
                reasons.extend(leading_literal(&source[at + 2..]).map(str::to_owned));
            }
        }
    }
    reasons
}

#[test]
fn the_readme_lists_every_reason_a_connection_closes_for() {
    let in_source = close_reasons_in_source();
    assert!(
        in_source.contains("agent_revoked") && in_source.contains("send_timeout"),
        "{in_source:?}"
    );
    let name = "clawq_websocket_connections_closed_total";
    let series = documented_series();
    let documented: std::collections::BTreeSet<String> = series
        .iter()
        .find(|s| s.name == name)
        .and_then(|s| s.labels.iter().find(|(label, _)| label == "reason"))
        .map(|(_, values)| values.iter().cloned().collect())
        .unwrap_or_else(|| panic!("{name} has no `reason` in the README"));
    assert_eq!(
        documented, in_source,
        "{name}: the README's reasons, the code's"
    );
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

    // The counters follow each settlement's commit: wait for the last one's.
    let q = [("queue", JOBS)];
    let m = wait_for("the last settlement's counters", || {
        let m = host.scrape();
        (sample(&m, "clawq_messages_dead_lettered_total", &q) == 2.0).then_some(m)
    });
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
