//! End to end: the HTTP API refuses bad requests with clear JSON errors and stores
//! nothing for them.

use crate::support::*;
use serde_json::json;

/// The receipts queue has no consumer yet, so whatever is stored stays countable.
const QUEUE: &str = "clawdentity-receipts";

fn error_code(reply: &serde_json::Value) -> &str {
    reply["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {reply}"))
}

#[test]
fn bad_requests_get_clear_errors_and_store_nothing() {
    let host = Host::start("");
    let one = format!("/v1/queues/{QUEUE}/messages");
    let batch = format!("/v1/queues/{QUEUE}/messages/batch");
    let big = "x".repeat(128 * 1024 + 1);
    let hundred_k = "y".repeat(100 * 1024);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (&one, "{not json".into(), 400, "invalid_request"),
        (&one, json!({"bdy": 1}).to_string(), 400, "invalid_request"),
        (
            &one,
            json!({"body": 1, "extra": true}).to_string(),
            400,
            "invalid_request",
        ),
        (
            &one,
            json!({"body": 1, "content_type": "xml"}).to_string(),
            400,
            "invalid_request",
        ),
        (
            &one,
            json!({"body": 1, "content_type": "text"}).to_string(),
            400,
            "invalid_request",
        ),
        (
            &one,
            json!({"body": "%%%", "content_type": "bytes"}).to_string(),
            400,
            "invalid_request",
        ),
        (
            &one,
            json!({"body": 1, "delay_seconds": -1}).to_string(),
            400,
            "invalid_request",
        ),
        (
            &one,
            json!({"body": 1, "delay_seconds": 43201}).to_string(),
            400,
            "delay_too_long",
        ),
        (
            &one,
            json!({"body": big, "content_type": "text"}).to_string(),
            413,
            "body_too_large",
        ),
        (
            &batch,
            json!({"messages": []}).to_string(),
            400,
            "empty_batch",
        ),
        (
            &batch,
            json!({"messages": vec![json!({"body": 1}); 101]}).to_string(),
            400,
            "too_many_messages",
        ),
        (
            &batch,
            json!({"messages": vec![json!({"body": hundred_k, "content_type": "text"}); 3]})
                .to_string(),
            413,
            "batch_too_large",
        ),
        (
            &batch,
            json!({"messages": [{"body": 1}, {"body": 2, "delay_seconds": 99999}]}).to_string(),
            400,
            "delay_too_long",
        ),
        (
            &one,
            format!("{{\"body\": \"{}\"}}", "z".repeat(5 << 20)),
            413,
            "request_too_large",
        ),
        (
            "/v1/queues/no-such-queue/messages",
            json!({"body": 1}).to_string(),
            404,
            "queue_not_found",
        ),
    ];
    for (path, body, want_status, want_code) in cases {
        let shown: String = body.chars().take(80).collect();
        let (status, reply) = host.post_raw(path, body);
        assert_eq!(
            (status, error_code(&reply)),
            (want_status, want_code),
            "{path} {shown}: {reply}"
        );
        assert!(
            reply["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{reply}"
        );
    }
    let status = host.queue(QUEUE);
    assert_eq!(
        [&status["backlog"], &status["delayed"]],
        [0, 0],
        "nothing was stored: {status}"
    );

    // The same endpoints accept good requests of every content type.
    let good = [
        json!({"body": {"type": "delivery_receipt"}}),
        json!({"body": "plain", "content_type": "text"}),
        json!({"body": "aGVsbG8=", "content_type": "bytes", "delay_seconds": 60}),
    ];
    for body in &good {
        let (status, reply) = host.post(&format!("/v1/queues/{QUEUE}/messages"), body);
        assert_eq!(status, 200, "{reply}");
        assert!(
            reply["id"].as_str().is_some_and(|id| id.len() == 26),
            "{reply}"
        );
    }
    let status = host.queue(QUEUE);
    assert_eq!([&status["backlog"], &status["delayed"]], [2, 1], "{status}");
}

#[test]
fn read_endpoints_answer_in_json() {
    let host = Host::start("");
    assert_eq!(host.get("/healthz"), (200, json!({"status": "ok"})));

    let (status, reply) = host.get("/v1/queues/nope");
    assert_eq!((status, error_code(&reply)), (404, "queue_not_found"));
    let (status, reply) = host.get("/v1/nothing/here");
    assert_eq!((status, error_code(&reply)), (404, "not_found"));

    let (status, reply) = host.get("/v1/trust/agents/did:cdi:nope");
    assert_eq!((status, error_code(&reply)), (400, "invalid_did"));
    let (status, reply) = host.get(&format!("/v1/trust/agents/{DID_A}"));
    assert_eq!(status, 200);
    assert_eq!(
        reply,
        json!({"did": DID_A, "revoked": false, "revokedAt": null, "expiresAt": null})
    );

    let (status, reply) = host.get("/v1/queues");
    assert_eq!(status, 200);
    let names: Vec<&str> = reply["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "clawdentity-events",
            "clawdentity-events-dlq",
            "clawdentity-receipts",
            "clawdentity-receipts-dlq"
        ]
    );
    let events = host.queue("clawdentity-events");
    assert_eq!(events["handler"], "crl-invalidation");
    assert_eq!(events["dead_letter_queue"], "clawdentity-events-dlq");
}

/// Every error code the host's source answers with: each string literal that follows a
/// `StatusCode::...,` (as in `ApiError::new(StatusCode::NOT_FOUND, "queue_not_found", ..)`
/// or `(StatusCode::BAD_REQUEST, "empty_batch")`).
fn error_codes_in_source() -> std::collections::BTreeSet<String> {
    let mut codes = std::collections::BTreeSet::new();
    for (_, source) in host_sources() {
        for (at, _) in source.match_indices("StatusCode::") {
            let rest = source[at + "StatusCode::".len()..]
                .trim_start_matches(|c: char| c.is_ascii_uppercase() || c == '_');
            let Some(rest) = rest.trim_start().strip_prefix(',') else {
                continue;
            };
            codes.extend(leading_literal(rest.trim_start()).map(str::to_owned));
        }
    }
    codes
}

#[test]
fn the_readme_lists_every_error_code_the_api_answers_with() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let codes = error_codes_in_source();
    for code in ["queue_not_found", "invalid_request", "consumer_not_found"] {
        assert!(codes.contains(code), "{code} not found in {codes:?}");
    }
    let readme = std::fs::read_to_string(root.join("../README.md")).unwrap();
    let table: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| refusal | status | code |"))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(!table.is_empty(), "the README has no error-code table");
    let missing: Vec<&String> = codes
        .iter()
        .filter(|code| !table.iter().any(|row| row.contains(&format!("`{code}`"))))
        .collect();
    assert!(
        missing.is_empty(),
        "error codes missing from the README's table: {missing:?}"
    );
}

#[test]
fn a_publish_delayed_past_the_queues_retention_is_refused_and_stores_nothing() {
    let host = Host::start("[[queues.producers]]\nqueue = \"short\"\nretention = 60\n");
    let path = "/v1/queues/short/messages";
    for delay in [60, 3600] {
        let (status, reply) = host.post(path, &json!({"body": 1, "delay_seconds": delay}));
        assert_eq!(
            (status, error_code(&reply)),
            (400, "delay_too_long"),
            "{reply}"
        );
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("retention of queue `short` (60 s)"),
            "{message}"
        );
    }
    let batch = json!({"messages": [{"body": 1}, {"body": 2, "delay_seconds": 61}]});
    let (status, reply) = host.post("/v1/queues/short/messages/batch", &batch);
    assert_eq!(
        (status, error_code(&reply)),
        (400, "delay_too_long"),
        "{reply}"
    );
    assert_eq!(host.queue("short")["delayed"], 0);
    assert_eq!(host.queue("short")["backlog"], 0);

    let (status, reply) = host.post(path, &json!({"body": 1, "delay_seconds": 59}));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(host.queue("short")["delayed"], 1);
}
