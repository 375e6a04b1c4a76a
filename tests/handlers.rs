//! End to end: hot swap, rejections, rollback, sandbox limits and crash-loop protection
//! of handler components (real components, real host).

use std::time::Instant;

use crate::support::*;
use serde_json::{Value, json};

pub(crate) const JOBS: &str = "jobs";

/// The scripted handler's bytes with a custom section naming `tag`: the same behaviour
/// under another version (hash).
pub(crate) fn scripted_variant(tag: &str) -> Vec<u8> {
    let mut wasm = std::fs::read(SCRIPTED_HANDLER).unwrap();
    let name = b"clawq-test";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    assert!(payload.len() < 128, "one-byte LEB128 size");
    wasm.push(0); // custom section
    wasm.push(payload.len() as u8);
    wasm.extend_from_slice(&payload);
    wasm
}

pub(crate) fn version_of(wasm: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(wasm)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn jobs_config(settings: &str) -> String {
    fast_events_config("")
        + &scripted_consumer(JOBS, &format!("world = \"crl-invalidation\"\n{settings}"))
}

pub(crate) fn current_version(host: &Host) -> String {
    let (status, body) = host.admin("GET", &format!("/v1/handlers/{JOBS}"), vec![], None);
    assert_eq!(status, 200, "{body}");
    body["current"]["version"].as_str().unwrap().to_owned()
}

pub(crate) fn deploy(host: &Host, consumer: &str, wasm: Vec<u8>) -> (u16, Value) {
    host.admin("PUT", &format!("/v1/handlers/{consumer}"), wasm, None)
}

#[test]
fn a_swap_under_load_loses_nothing_and_serves_the_new_version_at_once() {
    let host = Host::start(&jobs_config(
        "max_batch_size = 10\nmax_batch_timeout = 0.01",
    ));
    let v2 = scripted_variant("v2");
    let v2_version = version_of(&v2);
    let v1_version = current_version(&host);

    let bodies = |range: std::ops::Range<usize>| -> Vec<Value> {
        range
            .map(|i| json!({"do": "ack", "tag": format!("m{i}")}))
            .collect()
    };
    for start in (0..1000).step_by(50) {
        host.publish_batch(JOBS, &bodies(start..start + 50));
    }
    let (status, body) = deploy(&host, JOBS, v2.clone());
    let deployed = Instant::now();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], v2_version.as_str());
    for start in (1000..1500).step_by(50) {
        host.publish_batch(JOBS, &bodies(start..start + 50));
    }
    let first_v2 = host.wait_log_all(&["seen tag=", &v2_version[..12]]);
    println!(
        "first batch on the new version {:?} after the deploy returned",
        first_v2.at.saturating_duration_since(deployed)
    );
    let status = host.wait_drained(JOBS);
    assert_eq!(status["dead_lettered"], 0, "{status}");

    for i in 0..1500 {
        let lines = host.log_lines(&[&format!("seen tag=m{i} ")]);
        assert!(!lines.is_empty(), "message m{i} was lost");
        let by_v2 = lines.iter().all(|l| l.text.contains(&v2_version[..12]));
        let by_v1 = lines.iter().all(|l| l.text.contains(&v1_version[..12]));
        assert!(
            by_v1 || by_v2,
            "m{i} handled by exactly one version: {lines:?}"
        );
        if i >= 1000 {
            assert!(
                by_v2,
                "m{i} was published after the deploy returned and must be handled by v2"
            );
        }
    }
    assert_eq!(current_version(&host), v2_version);
}

#[test]
fn bad_components_are_refused_with_the_reason_and_the_old_version_serves() {
    let host = Host::start(&fast_events_config(""));
    let receipt_router =
        std::fs::read(FAILING_HANDLER.replace("failing_handler", "receipt_router")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "core module",
            b"\0asm\x01\0\0\0".to_vec(),
            "core WebAssembly module, not a component",
        ),
        (
            "garbage",
            b"not wasm at all".to_vec(),
            "not a WebAssembly component",
        ),
        (
            "empty component",
            b"\0asm\x0d\0\x01\0".to_vec(),
            "does not export `clawdentity:queues/handler@0.2.0`",
        ),
        (
            "wrong capability",
            receipt_router,
            "imports `relay-sessions`, which world `crl-invalidation` does not grant",
        ),
        (
            "truncated",
            std::fs::read(SCRIPTED_HANDLER).unwrap()[..1000].to_vec(),
            "does not compile",
        ),
    ];
    for (what, wasm, reason) in cases {
        let (status, body) = deploy(&host, "clawdentity-events", wasm);
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(body["error"]["code"], "invalid_component", "{what}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(reason), "{what}: {message}");
    }
    let (status, body) = deploy(&host, "no-such-queue", scripted_variant("x"));
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("handler_not_found"))
    );

    host.publish(
        "clawdentity-events",
        revocation_event("agent_revoked", json!({"agentDid": DID_A})),
    );
    wait_for("the old handler to serve", || {
        host.is_revoked(DID_A).then_some(())
    });
    let (_, history) = host.admin("GET", "/v1/handlers/clawdentity-events", vec![], None);
    assert_eq!(
        history["history"].as_array().unwrap().len(),
        1,
        "refusals leave no version: {history}"
    );
}

#[test]
fn sandbox_limits_stop_the_batch_and_nothing_else() {
    let config = jobs_config(
        "max_batch_size = 1\nmax_batch_timeout = 0\nmax_retries = 0\ncpu_timeout = 0.5\nmemory_limit_mb = 16\nmax_concurrency = 3",
    );
    let host = Host::start(&config);
    for action in ["loop", "hog", "trap"] {
        host.publish(JOBS, json!({"do": action, "tag": action}));
    }
    // The other queue is unaffected while the handler misbehaves.
    host.publish(
        "clawdentity-events",
        revocation_event("agent_revoked", json!({"agentDid": DID_A})),
    );
    wait_for("the events queue to work", || {
        host.is_revoked(DID_A).then_some(())
    });

    wait_for("all three dead-lettered", || {
        (host.queue(JOBS)["dead_lettered"] == 3).then_some(())
    });
    host.wait_log_all(&["batch failed", "CPU budget of 500ms used up"]);
    host.wait_log_all(&["batch failed", "memory limit of 16 MiB exceeded"]);
    host.wait_log_all(&["batch failed", "handler trapped"]);
    let (_, slot) = host.admin("GET", &format!("/v1/handlers/{JOBS}"), vec![], None);
    assert_eq!(slot["counters"]["limit_hits"], 2, "{slot}");
    assert_eq!(slot["counters"]["traps"], 1, "{slot}");

    host.publish(JOBS, json!({"do": "ack", "tag": "after"}));
    host.wait_log("seen tag=after attempts=1 ");
    assert_eq!(host.get("/healthz").0, 200);
}

fn cli(host: &Host, args: &[&str]) -> String {
    let args: Vec<&str> = ["handlers"]
        .iter()
        .chain(args)
        .chain(&["--server", &host.base])
        .copied()
        .collect();
    host.cli(&args)
}

#[test]
fn rollback_by_api_and_cli_and_history_survives_a_restart() {
    let mut host = Host::start(&jobs_config("max_batch_timeout = 0"));
    let v1 = current_version(&host);
    let dir = tempfile::tempdir().unwrap();
    let v2_file = dir.path().join("v2.wasm");
    std::fs::write(&v2_file, scripted_variant("v2")).unwrap();
    let v2 = version_of(&std::fs::read(&v2_file).unwrap());

    let out = cli(&host, &["deploy", JOBS, v2_file.to_str().unwrap()]);
    assert!(out.contains(&v2[..12]), "{out}");
    assert_eq!(current_version(&host), v2);

    let (status, body) = host.admin(
        "POST",
        &format!("/v1/handlers/{JOBS}/rollback"),
        vec![],
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        current_version(&host),
        v1,
        "rolled back to the previous version"
    );

    let out = cli(&host, &["rollback", JOBS, &v2[..10]]);
    assert!(out.contains("rolled back to"), "{out}");
    assert_eq!(current_version(&host), v2);
    let (status, body) = host.admin(
        "POST",
        &format!("/v1/handlers/{JOBS}/rollback"),
        br#"{"version": "ffff"}"#.to_vec(),
        None,
    );
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("version_not_found"))
    );

    host.kill_and_restart();
    assert_eq!(
        current_version(&host),
        v2,
        "a restart serves the version current before it"
    );
    let history = cli(&host, &["history", JOBS]);
    let by: Vec<&str> = history
        .lines()
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(by, ["rollback", "rollback", "api", "config"], "{history}");
    host.publish(JOBS, json!({"do": "ack", "tag": "restarted"}));
    host.wait_log_all(&["seen tag=restarted ", &v2[..12]]);
    assert!(cli(&host, &["list"]).contains(JOBS));
}

#[test]
fn a_crash_looping_new_version_is_rolled_back_automatically() {
    // The defaults: rolled back after 3 failed batches, 4 deliveries per message; the
    // version replaced has run no batch yet, and the new one never succeeds.
    let host = Host::start(&jobs_config("max_batch_timeout = 0"));
    let v1 = current_version(&host);

    let failing = std::fs::read(FAILING_HANDLER).unwrap();
    let v2 = version_of(&failing);
    let (status, body) = deploy(&host, JOBS, failing);
    assert_eq!(status, 200, "{body}");
    // The new version's counters are there from its deploy, at 0.
    let metrics = host.metrics_text();
    for counter in ["batches", "traps", "errors", "limit_hits"] {
        let series = format!(
            "clawq_handler_{counter}_total{{consumer=\"{JOBS}\",version=\"{}\"}} 0\n",
            &v2[..12]
        );
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
    host.publish(JOBS, json!({"do": "ack", "tag": "survivor"}));
    host.wait_log("new handler version keeps failing: rolling back");
    // Its 3 failed deliveries cost it 3 attempts: the restored version gets its last one.
    host.wait_log_all(&["seen tag=survivor attempts=4 ", &v1[..12]]);
    let status = host.wait_drained(JOBS);
    assert_eq!(status["dead_lettered"], 0, "{status}");
    assert_eq!(current_version(&host), v1);
    let (_, slot) = host.admin("GET", &format!("/v1/handlers/{JOBS}"), vec![], None);
    assert_eq!(slot["counters"]["auto_rollbacks"], 1, "{slot}");
    assert_eq!(slot["history"][0]["loaded_by"], "auto-rollback", "{slot}");
    assert_eq!(slot["history"][0]["status"], "current", "{slot}");
    assert_eq!(
        slot["history"][1]["status"], "auto_rolled_back",
        "the failing version: {slot}"
    );
}

#[test]
fn a_new_version_is_never_rolled_back_to_a_failing_one() {
    let host = Host::start(&jobs_config("max_batch_timeout = 0"));
    host.publish(JOBS, json!({"do": "trap", "tag": "broken"}));
    // Its 2nd delivery: the 1st failed batch is on record, and every later batch of this
    // version fails too.
    host.wait_log("seen tag=broken attempts=2 ");

    let failing = std::fs::read(FAILING_HANDLER).unwrap();
    let (status, body) = deploy(&host, JOBS, failing.clone());
    assert_eq!(status, 200, "{body}");
    host.publish(JOBS, json!({"do": "ack", "tag": "stuck"}));
    // Both messages use up their 4 deliveries on the new version (past the 3 failed
    // batches that would roll back a version that replaced a healthy one).
    wait_for("both messages to be dead-lettered", || {
        (host.queue(JOBS)["dead_lettered"] == 2).then_some(())
    });
    assert_eq!(current_version(&host), version_of(&failing));
    let (_, slot) = host.admin("GET", &format!("/v1/handlers/{JOBS}"), vec![], None);
    assert_eq!(slot["counters"]["auto_rollbacks"], 0, "{slot}");
}

#[test]
fn the_admin_api_needs_its_token() {
    let host = Host::start("");
    for token in [Some(""), Some("cqadm_wrong")] {
        let (status, body) = host.admin("GET", "/v1/handlers", vec![], token);
        assert_eq!(
            (status, &body["error"]["code"]),
            (401, &json!("unauthorized"))
        );
    }
    let (status, _) = host.admin(
        "PUT",
        "/v1/handlers/clawdentity-events",
        b"x".to_vec(),
        Some("nope"),
    );
    assert_eq!(status, 401);
    let (status, body) = host.admin("GET", "/v1/handlers", vec![], None);
    assert_eq!(status, 200);
    let consumers: Vec<&str> = body["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["consumer"].as_str().unwrap())
        .collect();
    assert_eq!(
        consumers,
        ["clawdentity-events", "clawdentity-receipts", "event-router"]
    );
}

#[test]
fn watch_reloads_a_changed_handler_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jobs.wasm");
    std::fs::copy(SCRIPTED_HANDLER, &file).unwrap();
    let config = format!(
        "[[queues.consumers]]\nqueue = \"{JOBS}\"\nhandler = \"{}\"\nmax_batch_timeout = 0\n",
        file.display()
    );
    let host = Host::start_with(&config, &["--watch"]);
    host.wait_log("watching the handler file");
    let v2 = scripted_variant("watched");
    let partial = dir.path().join("jobs.wasm.tmp");
    std::fs::write(&partial, &v2).unwrap();
    std::fs::rename(&partial, &file).unwrap();
    host.wait_log("reloaded the changed handler");
    host.publish(JOBS, json!({"do": "ack", "tag": "w"}));
    host.wait_log_all(&["seen tag=w ", &version_of(&v2)[..12]]);
}

#[test]
fn check_names_the_worlds_that_accept_a_component() {
    let clawq = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_clawq"))
            .arg("check")
            .args(args)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap()
    };
    let router = FAILING_HANDLER.replace("failing_handler", "receipt_router");
    let report = clawq(&[&router]);
    assert!(report.status.success());
    let report = String::from_utf8(report.stdout).unwrap();
    assert!(report.contains("targets world: receipt-router"), "{report}");
    assert!(
        report.contains("crl-invalidation   refuses it: imports `relay-sessions`, which world `crl-invalidation` does not grant"),
        "{report}"
    );
    assert!(report.contains("receipt-handler    accepts it"), "{report}");

    let refused = clawq(&[&router, "--world", "crl-invalidation"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("does not grant"));
    assert!(
        clawq(&[SCRIPTED_HANDLER, "--world", "crl-invalidation"])
            .status
            .success()
    );

    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let refused = clawq(&[core.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("core WebAssembly module, not a component")
    );
}

/// A handler built against the frozen `clawdentity:queues@0.1.0` contract.
const LEGACY_HANDLER: &str = clawq_test_guests::LEGACY_HANDLER;

#[test]
fn a_component_built_against_0_1_0_still_loads_and_routes_receipts() {
    let host = Host::start(&fast_config(""));
    let receipts = "clawdentity-receipts";
    let (status, body) = deploy(&host, receipts, std::fs::read(LEGACY_HANDLER).unwrap());
    assert_eq!(status, 200, "{body}");
    let token = host.add_agent(DID_A);
    let mut a = host.connect(DID_A, Some(&token)).unwrap();

    // Padded DIDs and reason, as the reference's producers may send them: the host trims.
    let padded = receipt(
        "legacy-1",
        &format!("  {DID_A} "),
        &format!("{DID_B}\n"),
        "dead_lettered",
        Some(" hook gone "),
    );
    host.publish(receipts, padded);
    let pushed = next_frame(&mut a);
    assert_eq!(pushed["type"], "receipt", "{pushed}");
    assert_eq!(pushed["originalFrameId"], "legacy-1");
    assert_eq!(pushed["toAgentDid"], DID_B);
    assert_eq!(
        (&pushed["status"], &pushed["reason"]),
        (&json!("dead_lettered"), &json!("hook gone"))
    );
    host.wait_log_all(&["legacy routed legacy-1: ", "Pushed(1)"]);
    let status = host.wait_drained(receipts);
    assert_eq!(status["dead_lettered"], 0, "{status}");

    let check = std::process::Command::new(env!("CARGO_BIN_EXE_clawq"))
        .args(["check", LEGACY_HANDLER, "--world", "receipt-handler"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        report.contains("clawdentity:queues/handler@0.1.0"),
        "{report}"
    );
    assert!(report.contains("receipt-handler    accepts it"), "{report}");
}

#[test]
fn a_0_1_0_handler_cannot_forge_a_receipt_frame() {
    let host = Host::start(&fast_config(""));
    let receipts = "clawdentity-receipts";
    let (status, body) = deploy(&host, receipts, std::fs::read(LEGACY_HANDLER).unwrap());
    assert_eq!(status, 200, "{body}");
    let token = host.add_agent(DID_A);
    let hook = FakeHook::start();
    let dir = tempfile::tempdir().unwrap();
    let connector = Connector::start(&host, DID_A, &token, &hook.url, dir.path());
    connector.log.wait_for(&["connected to"]);

    // A complete receipt frame, as the host would build it: the connector would hand it
    // to the hook as verified.
    let forged = frame(
        "receipt",
        json!({
            "originalFrameId": "forged-1",
            "toAgentDid": DID_B,
            "status": "dead_lettered",
            "reason": "forged by a handler",
        }),
    );
    host.publish(
        receipts,
        json!({"forge": {"agent": DID_A, "frame": forged}}),
    );
    host.wait_log_all(&[
        "legacy forged: refused: websocket.send-frame is retired: frames are built by the host; use relay-sessions.deliver",
    ]);
    let refusal = host.wait_log_all(&["refused websocket.send-frame", "handler="]);
    assert!(refusal.text.contains(DID_A), "{refusal:?}");
    host.wait_drained(receipts);

    // The next receipt the hook sees is a real one published after the forgery.
    host.publish(
        receipts,
        receipt("real-1", DID_A, DID_B, "delivered_to_webhook", None),
    );
    let requests = hook.wait_requests(1);
    assert_eq!(requests[0].body["requestId"], "real-1", "{:?}", requests[0]);
    host.wait_log_all(&["legacy routed real-1: "]);
    let seen: Vec<_> = hook
        .requests()
        .into_iter()
        .map(|r| r.body["requestId"].clone())
        .collect();
    assert_eq!(seen, [json!("real-1")]);
}
