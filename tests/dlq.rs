//! End to end: dead-letter queues you can work with, by API (`GET .../messages`,
//! `POST .../redrive`, `DELETE .../messages`) and by command line (`clawq dlq`), and
//! `clawq status`; dead letters reach the consumers of their dead-letter queue.

use crate::support::*;
use serde_json::{Value, json};

const JOBS: &str = "jobs";
const DLQ: &str = "jobs-dlq";
const PARKED: &str = "parked";

/// A host whose `jobs` queue gives up after 2 deliveries, and a `parked` queue that no
/// one consumes.
fn start() -> Host {
    start_on("")
}

/// [`start`] on the queue backend that `backend` configures (a `[backend]` section;
/// empty: the embedded SQLite).
pub(crate) fn start_on(backend: &str) -> Host {
    let config = scripted_consumer(JOBS, "max_batch_timeout = 0\nmax_retries = 1")
        + &format!("[[queues.producers]]\nqueue = \"{PARKED}\"\n");
    Host::start(&(backend.to_owned() + &config))
}

/// Publishes a trap, a dead-letter outcome and a retry-for-ever, one after the other
/// (a trap fails its whole batch), and waits until each is dead-lettered; returns their
/// ids in that order.
fn dead_letter_three(host: &Host) -> Vec<String> {
    ["trap", "dead-letter", "retry"]
        .iter()
        .enumerate()
        .map(|(i, action)| {
            let id = host.publish(
                JOBS,
                json!({"do": action, "tag": action, "reason": "poison pill"}),
            );
            wait_until_dead_lettered(host, i as u64 + 1);
            id
        })
        .collect()
}

/// Waits until `jobs` holds nothing and `jobs-dlq` holds `n` messages.
fn wait_until_dead_lettered(host: &Host, n: u64) {
    wait_for(&format!("{n} dead letters"), || {
        let status = host.queue(JOBS);
        let held: u64 = ["backlog", "in_flight", "delayed"]
            .iter()
            .map(|k| status[k].as_u64().unwrap())
            .sum();
        (held == 0 && status["dead_lettered"] == n).then_some(())
    });
}

fn page(host: &Host, queue: &str, query: &str) -> Value {
    let (status, page) = host.get(&format!("/v1/queues/{queue}/messages{query}"));
    assert_eq!(status, 200, "{page}");
    page
}

fn ids_of(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

fn error_code(reply: &Value) -> &str {
    reply["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {reply}"))
}

#[test]
fn dead_letters_are_listed_with_why_they_died_then_redriven_and_purged() {
    dead_letters_listed_redriven_and_purged(&start());
}

/// Dead letters of `host` ([`start_on`]) are listed with why they died, then redriven
/// and purged.
pub(crate) fn dead_letters_listed_redriven_and_purged(host: &Host) {
    let ids = dead_letter_three(host);

    let all = page(host, DLQ, "");
    assert_eq!(ids_of(&all), ids, "publish order");
    assert_eq!(all["cursor"], Value::Null);
    let [trap, dead, retry] = [0, 1, 2].map(|i| all["messages"][i].clone());
    let reason = |m: &Value| m["dead_reason"].as_str().unwrap().to_owned();
    assert!(
        reason(&trap)
            .starts_with("max_retries (1) exceeded after 2 attempts; last error: handler trapped"),
        "{trap}"
    );
    assert!(reason(&trap).contains("scripted trap"), "{trap}");
    assert!(
        trap["last_error"]
            .as_str()
            .unwrap()
            .starts_with("handler trapped"),
        "{trap}"
    );
    assert_eq!(reason(&dead), "poison pill");
    assert_eq!(dead["source_attempts"], 1);
    assert!(
        reason(&retry).ends_with("last error: handler asked for a retry"),
        "{retry}"
    );
    for m in [&trap, &dead, &retry] {
        assert_eq!(m["source_queue"], JOBS, "{m}");
        assert_eq!(
            (m["state"].as_str(), m["attempts"].as_u64()),
            (Some("ready"), Some(0))
        );
        assert_eq!(m["content_type"], "json");
        assert_eq!(
            m["body"]["tag"], m["body"]["do"],
            "the body is shown as JSON: {m}"
        );
        let (first, last) = (m["first_failed_ms"].as_u64(), m["last_failed_ms"].as_u64());
        assert!(first.is_some() && first <= last, "{m}");
        assert!(m["published_ms"].as_u64() <= first, "{m}");
        assert_eq!(m["dead_lettered_ms"].as_u64(), last, "{m}");
    }
    assert_eq!(retry["source_attempts"], 2);

    let first = page(host, DLQ, "?limit=2");
    assert_eq!(ids_of(&first), ids[..2]);
    let cursor = first["cursor"].as_str().unwrap();
    let second = page(host, DLQ, &format!("?limit=2&cursor={cursor}"));
    assert_eq!(ids_of(&second), ids[2..]);
    assert_eq!(second["cursor"], Value::Null);
    let (status, one) = host.get(&format!("/v1/queues/{DLQ}/messages/{}", ids[1]));
    assert_eq!((status, &one), (200, &dead));

    // Back to its source queue: delivered again from attempt 1, and dead-lettered again.
    let (status, reply) = host.post(
        &format!("/v1/queues/{DLQ}/redrive"),
        &json!({"ids": [ids[2]]}),
    );
    assert_eq!((status, reply), (200, json!({"redriven": 1, "skipped": 0})));
    wait_for("the redriven message to be delivered again", || {
        (host.log_lines(&["seen tag=retry attempts=1 "]).len() == 2).then_some(())
    });
    wait_until_dead_lettered(host, 3);

    // All of them (no body) back to their source queue, where they die again; then all
    // to a named queue, where they start over; then purged by id and all.
    let (status, reply) = host.post_raw(&format!("/v1/queues/{DLQ}/redrive"), "");
    assert_eq!((status, reply), (200, json!({"redriven": 3, "skipped": 0})));
    wait_until_dead_lettered(host, 3);
    let (status, reply) = host.post(&format!("/v1/queues/{DLQ}/redrive"), &json!({"to": PARKED}));
    assert_eq!((status, reply), (200, json!({"redriven": 3, "skipped": 0})));
    let parked = page(host, PARKED, "");
    let mut parked_ids = ids_of(&parked);
    parked_ids.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(parked_ids, expected);
    assert!(
        parked["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["dead_reason"].is_null() && m["source_queue"].is_null()),
        "a redrive starts the message over: {parked}"
    );

    let path = format!("/v1/queues/{PARKED}/messages");
    let (status, reply) = host.delete(&path, Some(&json!({"ids": [ids[0], "nope"]})));
    assert_eq!((status, reply), (200, json!({"purged": 1})));
    for refused in [None, Some(json!({})), Some(json!({"all": false}))] {
        let (status, reply) = host.delete(&path, refused.as_ref());
        assert_eq!(status, 400, "{refused:?}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(r#""all": true"#), "{message}");
    }
    assert_eq!(
        host.queue(PARKED)["backlog"],
        2,
        "a refused purge deletes nothing"
    );
    let (status, reply) = host.delete(&path, Some(&json!({"all": true})));
    assert_eq!((status, reply), (200, json!({"purged": 2})));
    assert_eq!(host.queue(PARKED)["backlog"], 0);
}

#[test]
fn bodies_are_shown_as_their_content_type_says() {
    let host = start();
    let path = format!("/v1/queues/{PARKED}/messages");
    for message in [
        json!({"body": {"a": [1, 2]}}),
        json!({"body": "plain words", "content_type": "text"}),
        json!({"body": "AAEC/w==", "content_type": "bytes"}),
    ] {
        let (status, reply) = host.post(&path, &message);
        assert_eq!(status, 200, "{reply}");
    }
    let bodies: Vec<(Value, Value)> = page(&host, PARKED, "")["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["content_type"].clone(), m["body"].clone()))
        .collect();
    assert_eq!(
        bodies,
        [
            (json!("json"), json!({"a": [1, 2]})),
            (json!("text"), json!("plain words")),
            (json!("bytes"), json!("AAEC/w==")),
        ]
    );
}

#[test]
fn bad_requests_get_clear_errors() {
    let host = start();
    let messages = format!("/v1/queues/{DLQ}/messages");
    let redrive = format!("/v1/queues/{DLQ}/redrive");
    for (query, needle) in [
        ("?limit=0", "limit must be between 1 and 1000"),
        ("?limit=1001", "limit must be between 1 and 1000"),
        ("?limit=many", "limit"),
        ("?cursor=abc", "cursor `abc`"),
        ("?size=3", "size"),
    ] {
        let (status, reply) = host.get(&format!("{messages}{query}"));
        assert_eq!(
            (status, error_code(&reply)),
            (400, "invalid_request"),
            "{query}"
        );
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{query}: {message}");
    }
    for (body, status_code, code) in [
        (json!({"ids": []}).to_string(), 400, "invalid_request"),
        (json!({"ids": "one"}).to_string(), 400, "invalid_request"),
        (json!({"to": DLQ}).to_string(), 400, "invalid_request"),
        (json!({"to": "nowhere"}).to_string(), 404, "queue_not_found"),
        (json!({"id": ["x"]}).to_string(), 400, "invalid_request"),
        ("{not json".to_owned(), 400, "invalid_request"),
    ] {
        let (status, reply) = host.post_raw(&redrive, body.clone());
        assert_eq!(
            (status, error_code(&reply)),
            (status_code, code),
            "{body}: {reply}"
        );
    }
    let (status, reply) = host.delete(&messages, Some(&json!({"ids": []})));
    assert_eq!((status, error_code(&reply)), (400, "invalid_request"));
    let (status, reply) = host.delete(&messages, Some(&json!({"to": JOBS})));
    assert_eq!((status, error_code(&reply)), (400, "invalid_request"));
    let (status, reply) = host.delete(&messages, Some(&json!({"all": true, "ids": ["x"]})));
    assert_eq!((status, error_code(&reply)), (400, "invalid_request"));
    // A consumer name the queue neither has nor holds copies for is a mistake, not a
    // purge or redrive of nothing.
    let typo = json!({"consumer": "jbos"});
    let (status, reply) = host.delete(&format!("/v1/queues/{JOBS}/messages"), Some(&typo));
    assert_eq!((status, error_code(&reply)), (404, "consumer_not_found"));
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`jbos`") && message.contains("its consumers: jobs"),
        "{message}"
    );
    let (status, reply) = host.post(&redrive, &typo);
    assert_eq!((status, error_code(&reply)), (404, "consumer_not_found"));
    let (status, reply) = host.delete(
        &format!("/v1/queues/{JOBS}/messages"),
        Some(&json!({"consumer": JOBS})),
    );
    assert_eq!(
        (status, reply),
        (200, json!({"purged": 0})),
        "a configured consumer"
    );

    let (status, reply) = host.get(&format!("{messages}/01NOSUCHMESSAGE"));
    assert_eq!((status, error_code(&reply)), (404, "message_not_found"));
    let (status, reply) = host.get("/v1/queues/nope/messages");
    assert_eq!((status, error_code(&reply)), (404, "queue_not_found"));
    let (status, reply) = host.get("/v1/queues/nope/messages/x");
    assert_eq!((status, error_code(&reply)), (404, "queue_not_found"));
    let (status, reply) = host.post("/v1/queues/nope/redrive", &json!({}));
    assert_eq!((status, error_code(&reply)), (404, "queue_not_found"));
    let (status, reply) = host.delete("/v1/queues/nope/messages", None);
    assert_eq!((status, error_code(&reply)), (404, "queue_not_found"));
}

/// What `clawq <args>` printed on stderr, expecting it to fail.
fn failure(host: &Host, args: &[&str]) -> String {
    let output = host.cli_output(args);
    assert!(!output.status.success(), "expected clawq {args:?} to fail");
    String::from_utf8(output.stderr).unwrap()
}

#[test]
fn the_command_line_lists_shows_redrives_and_purges_and_sums_up() {
    let host = start();
    let ids = dead_letter_three(&host);

    let list = host.cli(&["dlq", "list", DLQ]);
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines[0].starts_with("ID "), "{list}");
    assert_eq!(lines.len(), 4, "{list}");
    assert!(
        lines[1].starts_with(&ids[0]) && lines[1].contains("handler trapped"),
        "{list}"
    );
    assert!(
        lines[2].contains("2 in jobs") || lines[2].contains("1 in jobs"),
        "{list}"
    );
    assert!(lines[2].ends_with("poison pill"), "{list}");
    let paged = host.cli(&["dlq", "list", DLQ, "--limit", "1"]);
    assert!(
        paged.contains("more: clawq dlq list jobs-dlq --limit 1 --cursor "),
        "{paged}"
    );

    let show = host.cli(&["dlq", "show", DLQ, &ids[1]]);
    for needle in [
        format!("id:            {}", ids[1]),
        "queue:         jobs-dlq (ready)".into(),
        "source queue:  jobs".into(),
        "reason:        poison pill".into(),
        "\"tag\": \"dead-letter\"".into(),
    ] {
        assert!(show.contains(&needle), "{needle} in {show}");
    }

    let redriven = host.cli(&["dlq", "redrive", DLQ, "--id", &ids[1], "--to", PARKED]);
    assert_eq!(redriven, "redriven 1 message from jobs-dlq to `parked`\n");
    assert_eq!(host.queue(PARKED)["backlog"], 1);

    let refused = failure(&host, &["dlq", "purge", DLQ]);
    assert!(refused.contains("--all"), "{refused}");
    let unknown = failure(&host, &["dlq", "purge", DLQ, "--consumer", "nobody"]);
    assert!(
        unknown.contains("has no consumer `nobody`"),
        "the API's message: {unknown}"
    );
    assert_eq!(host.queue(DLQ)["backlog"], 2, "nothing purged");
    let purged = host.cli(&["dlq", "purge", DLQ, "--id", &ids[0]]);
    assert_eq!(purged, "purged 1 message from jobs-dlq\n");
    let purged = host.cli(&["dlq", "purge", DLQ, "--all"]);
    assert_eq!(purged, "purged 1 message from jobs-dlq\n");
    let empty = host.cli(&["dlq", "list", DLQ]);
    assert_eq!(empty, "jobs-dlq holds no messages\n");

    let status = host.cli(&["status"]);
    assert!(
        status.starts_with(&format!("clawq at {}/: ", host.base)),
        "{status}"
    );
    let row = |queue: &str| -> Vec<String> {
        status
            .lines()
            .find(|l| l.starts_with(&format!("{queue} ")))
            .unwrap_or_else(|| panic!("no {queue} row in {status}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert_eq!(
        row(JOBS)[1..],
        ["scripted_handler", "0", "0", "0", "0", "in", DLQ],
        "{status}"
    );
    assert_eq!(row(PARKED)[1..], ["-", "1", "0", "0", "-"], "{status}");
    assert_eq!(
        row("clawdentity-events")[1..3],
        ["crl-invalidation,", "event-router"],
        "{status}"
    );
    assert!(
        status.contains("connectors: 0 connected, 0 relay actors in memory, 0 receipts dropped"),
        "{status}"
    );
    let handlers = status
        .split("CONSUMER")
        .nth(1)
        .unwrap_or_else(|| panic!("no handler table in {status}"));
    assert!(
        handlers
            .lines()
            .any(|l| l.split_whitespace().take(3).eq(["jobs", "jobs", "all"])
                && l.contains("scripted_handler")),
        "{status}"
    );

    let unknown = failure(&host, &["dlq", "list", "nope"]);
    assert!(
        unknown.contains("no queue named `nope` (queue_not_found, HTTP 404)"),
        "{unknown}"
    );
    let unreachable = failure(&host, &["status", "--server", "http://127.0.0.1:9"]);
    assert!(
        unreachable.contains("cannot reach clawq at http://127.0.0.1:9/"),
        "{unreachable}"
    );
}

#[test]
fn clawq_status_ends_quietly_when_its_reader_goes_away() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let host = Host::start(&fast_config(""));
    // As `clawq status | head -0`: the reader is gone before anything is written.
    let mut child = Command::new(env!("CARGO_BIN_EXE_clawq"))
        .arg("status")
        .env("CLAWQ_SERVER", &host.base)
        .env("CLAWQ_DATA_DIR", host.data_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    const SIGPIPE: i32 = 13;
    assert_eq!(
        output.status.signal(),
        Some(SIGPIPE),
        "ended by the broken pipe like any tool: {:?} {stderr}",
        output.status
    );
}

/// What `clawq <args>` printed on stdout, expecting it to succeed (no host needed).
fn help(args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_clawq"))
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "clawq {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_log_format_is_told_in_one_line_per_subcommand_and_in_full_once() {
    for args in [
        &["dlq", "purge", "--help"][..],
        &["status", "--help"],
        &["serve", "--help"],
    ] {
        let text = help(args);
        assert_eq!(
            text.matches("Log format on stderr: `text` (the default) or `json`")
                .count(),
            1,
            "{args:?}:\n{text}"
        );
        for long in [
            "Possible values",
            "CLAWQ_LOG_FORMAT",
            "one JSON object per line",
        ] {
            assert!(!text.contains(long), "{args:?} repeats {long}:\n{text}");
        }
    }
    let top = help(&["--help"]);
    assert!(
        top.contains("one JSON object per line") && top.contains("CLAWQ_LOG_FORMAT"),
        "{top}"
    );
}

#[test]
fn dead_letters_reach_the_named_and_filtered_consumers_of_the_dead_letter_queue() {
    // The dead-letter queue has no consumer of its own name: a reader of every dead
    // letter and an auditor of those tagged `audited`.
    let reader = |name: &str, filter: &str| {
        format!(
            "[[queues.consumers]]\nqueue = \"{DLQ}\"\nname = \"{name}\"\n\
             handler = \"{SCRIPTED_HANDLER}\"\nmax_batch_timeout = 0\n{UNLIMITED_LOGS}\n{filter}\n"
        )
    };
    let config = scripted_consumer(JOBS, "max_batch_timeout = 0\nmax_retries = 0")
        + &reader("dlq-reader", "")
        + &reader("dlq-audit", "filter = { tag = \"audited\" }");
    let host = Host::start(&config);
    // Dead-lettered by the handler, and by the retries exceeded.
    host.publish(JOBS, json!({"do": "dead-letter", "tag": "audited"}));
    host.publish(JOBS, json!({"do": "retry", "tag": "plain"}));

    let seen_by = |consumer: &str, tag: &str| {
        let consumer = format!("consumer=\"{consumer}\"");
        let tag = format!("seen tag={tag} attempts=1 ");
        !host.log_lines(&[&consumer, &tag]).is_empty()
    };
    wait_for(
        "every dead letter to reach the consumers that take it",
        || {
            (seen_by("dlq-reader", "audited") && seen_by("dlq-reader", "plain"))
                .then_some(())
                .filter(|()| seen_by("dlq-audit", "audited"))
        },
    );
    // Once the dead-letter queue is drained, the auditor has had every copy for it.
    host.wait_drained(JOBS);
    wait_for(
        "the dead-letter queue to be drained by its consumers",
        || {
            let status = host.queue(DLQ);
            (status["backlog"] == 0 && status["in_flight"] == 0).then_some(())
        },
    );
    assert!(
        !seen_by("dlq-audit", "plain"),
        "the auditor's filter applies"
    );
}
