//! The authoring commands against the real binary and real components: `clawq run` (one
//! batch on this machine, every capability call and outcome shown) and `clawq new
//! handler` (a crate that tests, builds, checks and runs outside this workspace).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::support::{DID_A, DID_B, SCRIPTED_HANDLER, run_bounded};
use serde_json::{Value, json};

const RECEIPT_ROUTER: &str = env!("CLAWQ_GUEST_RECEIPT_ROUTER");
/// Longest a `clawq` command may take (it compiles the component).
const CLAWQ_DEADLINE: Duration = Duration::from_secs(120);
/// Longest a `cargo` command on a new crate may take (the first one builds wit-bindgen).
const CARGO_DEADLINE: Duration = Duration::from_secs(20 * 60);

/// The result of one `clawq` command.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `clawq <args>`.
fn clawq(args: &[&str]) -> Ran {
    let mut command = Command::new(env!("CARGO_BIN_EXE_clawq"));
    command.args(args).env_remove("RUST_BACKTRACE");
    let output = run_bounded(command, CLAWQ_DEADLINE);
    let ran = Ran {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert!(
        output.status.code().is_some_and(|c| c == 0 || c == 1),
        "clawq {args:?} exited with {}: {}",
        output.status,
        ran.stderr
    );
    ran
}

/// The lines of `section` (`calls:` or `outcomes:`) of a `clawq run` report.
fn section<'a>(report: &'a str, section: &str) -> Vec<&'a str> {
    report
        .lines()
        .skip_while(|l| *l != section)
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(str::trim)
        .collect()
}

/// `clawq check <receipt-router> --consumer <consumer> [--config <config>]`.
fn check_router_for(consumer: &str, config: Option<&str>) -> Ran {
    let mut args = vec!["check", RECEIPT_ROUTER, "--consumer", consumer];
    args.extend(config.into_iter().flat_map(|c| ["--config", c]));
    clawq(&args)
}

/// The outcomes `clawq run` printed, after checking that they are two acks.
fn two_acks(ran: &Ran) -> Vec<&str> {
    let outcomes = section(&ran.stdout, "outcomes:");
    assert_eq!(outcomes.len(), 2, "{}", ran.stdout);
    assert!(
        outcomes.iter().all(|o| o.ends_with(": ack")),
        "{}",
        ran.stdout
    );
    outcomes
}

fn receipt(request_id: &str) -> Value {
    json!({
        "type": "delivery_receipt", "requestId": request_id,
        "senderAgentDid": DID_A, "recipientAgentDid": DID_B,
        "status": "dead_lettered", "reason": "recipient hook unreachable"
    })
}

#[test]
fn run_shows_every_capability_call_and_outcome_of_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("receipt.json");
    std::fs::write(&file, receipt("req-1").to_string()).unwrap();
    let from_file = format!("@{}", file.display());
    let malformed = json!({"type": "other"}).to_string();
    let args = ["run", RECEIPT_ROUTER, "--message", &from_file];
    let args = [&args[..], &["--message", &malformed, "--queue", "receipts"]].concat();

    let ran = clawq(&args);
    assert!(ran.ok, "{}", ran.stderr);
    let calls = section(&ran.stdout, "calls:");
    assert_eq!(calls.len(), 1, "{}", ran.stdout);
    assert_eq!(
        calls[0],
        format!(
            "relay-sessions.deliver-receipts {{request-id: \"req-1\", sender: {DID_A}, \
             recipient: {DID_B}, status: dead-lettered, reason: \"recipient hook unreachable\"}} \
             -> stored"
        )
    );
    let outcomes = section(&ran.stdout, "outcomes:");
    assert_eq!(outcomes.len(), 2, "{}", ran.stdout);
    assert!(outcomes[0].ends_with(": ack"), "{}", ran.stdout);
    assert!(
        outcomes[1].ends_with(
            ": unhandled (unknown_type): not a valid receipt: type `other` is not `delivery_receipt`"
        ),
        "the malformed receipt is acknowledged unhandled, saying why: {}",
        ran.stdout
    );

    let ran = clawq(&[&args[..], &["--json"]].concat());
    assert!(ran.ok, "{}", ran.stderr);
    let report: Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(report["calls"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(
        report["calls"][0]["call"],
        "relay-sessions.deliver-receipts"
    );
    assert_eq!(report["calls"][0]["result"], "stored");
    let outcomes = report["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes[0]["outcome"], "ack", "{report}");
    assert_eq!(
        (&outcomes[1]["outcome"], &outcomes[1]["reason"]),
        (&json!("unhandled"), &json!("unknown_type")),
        "{report}"
    );
    assert_eq!(report["failure"], Value::Null);
}

#[test]
fn run_shows_retries_dead_letters_and_missing_outcomes() {
    let scripts = [
        json!({"do": "retry", "delay": 60, "tag": "r"}),
        json!({"do": "dead-letter", "reason": "unfixable"}),
        json!({"do": "revoke", "did": DID_A}),
        json!({"do": "skip"}),
    ];
    let mut args = vec!["run".to_owned(), SCRIPTED_HANDLER.to_owned()];
    for script in &scripts {
        args.extend(["--message".to_owned(), script.to_string()]);
    }
    args.extend(["--attempts".into(), "3".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ran = clawq(&args);
    assert!(ran.ok, "{}", ran.stderr);
    let calls = section(&ran.stdout, "calls:");
    assert_eq!(calls[0], "log.info \"seen tag=r attempts=3 batch=4\"");
    assert!(
        calls.contains(&format!("trust-store.revoke-agent {DID_A} -> ok").as_str()),
        "{}",
        ran.stdout
    );
    let outcomes: Vec<&str> = section(&ran.stdout, "outcomes:")
        .into_iter()
        .map(|o| o.split_once(": ").unwrap().1)
        .collect();
    assert_eq!(
        outcomes,
        [
            "retry (delay 60 s)",
            "dead-letter: unfixable",
            "ack",
            "no outcome (retried)"
        ]
    );
}

#[test]
fn run_fails_on_a_trapping_batch_with_the_guests_panic() {
    let trap = json!({"do": "trap", "tag": "boom"}).to_string();
    let ran = clawq(&["run", SCRIPTED_HANDLER, "--message", &trap]);
    assert!(!ran.ok, "a trapping batch exits 1");
    assert_eq!(
        section(&ran.stdout, "calls:"),
        ["log.info \"seen tag=boom attempts=1 batch=1\""],
        "the calls made before the trap are shown"
    );
    assert!(
        ran.stderr.contains("batch failed: handler trapped")
            && ran.stderr.contains("scripted trap in message"),
        "{}",
        ran.stderr
    );

    let ran = clawq(&["run", SCRIPTED_HANDLER, "--json", "--message", &trap]);
    assert!(!ran.ok);
    let report: Value = serde_json::from_str(&ran.stdout).unwrap();
    let failure = report["failure"].as_str().unwrap();
    assert!(failure.contains("scripted trap in message"), "{report}");
    assert_eq!(report["outcomes"], json!([]));
}

#[test]
fn run_refuses_a_component_outside_its_world_as_check_does() {
    let message = receipt("req-2").to_string();
    let ran = clawq(&[
        "run",
        RECEIPT_ROUTER,
        "--world",
        "crl-invalidation",
        "--message",
        &message,
    ]);
    assert!(!ran.ok);
    assert!(ran.stdout.is_empty(), "nothing ran: {}", ran.stdout);
    let refusal = ran.stderr.lines().next().unwrap();
    assert!(
        refusal.contains("imports `relay-sessions`, which world `crl-invalidation` does not grant"),
        "{}",
        ran.stderr
    );
    let checked = clawq(&["check", RECEIPT_ROUTER, "--world", "crl-invalidation"]);
    assert_eq!(checked.stderr.lines().next().unwrap(), refusal);

    // A consumer's slot, by name: the spec's defaults, or the consumers of a config.
    let by_slot = check_router_for("clawdentity-events", None);
    assert_eq!(by_slot.stderr.lines().next().unwrap(), refusal);
    let by_slot = check_router_for("clawdentity-receipts", None);
    assert!(by_slot.ok, "{}", by_slot.stderr);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("clawq.toml");
    std::fs::write(
        &config,
        "[[queues.consumers]]\nqueue = \"clawdentity-receipts\"\nname = \"audit\"\n\
         world = \"crl-invalidation\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let by_slot = check_router_for("audit", Some(config));
    assert_eq!(by_slot.stderr.lines().next().unwrap(), refusal);
    let unknown = check_router_for("nope", Some(config));
    assert!(
        !unknown.ok
            && unknown.stderr.contains(
                "no consumer named `nope` in the config (its consumers: audit, clawdentity-events, clawdentity-receipts, event-router)"
            ),
        "{}",
        unknown.stderr
    );

    let ran = clawq(&["run", RECEIPT_ROUTER, "--world", "nope", "--message", "{}"]);
    assert!(!ran.ok && ran.stderr.contains("world `nope` is not one of"));
    let ran = clawq(&["run", RECEIPT_ROUTER, "--message", "{not json"]);
    assert!(
        !ran.ok && ran.stderr.contains("--message #1"),
        "{}",
        ran.stderr
    );
}

/// Runs `cargo <args>` in the crate at `dir` as a third party would, outside this
/// workspace and without its build's flags, with a shared target directory.
fn cargo(dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .current_dir(dir)
        .args(args)
        .env("CARGO_TARGET_DIR", scaffold_target_dir());
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        command.env_remove(var);
    }
    run_bounded(command, CARGO_DEADLINE)
}

/// Where the new crates build: kept across runs so that only the first one builds their
/// dependencies.
fn scaffold_target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/scaffold")
}

/// Runs `cargo <args>` in `dir` and fails the test unless it succeeds.
fn cargo_ok(dir: &Path, args: &[&str]) {
    let output = cargo(dir, args);
    assert!(
        output.status.success(),
        "cargo {args:?} in {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Locks the dependencies of the crate at `dir`: from the local cache when it has them
/// (no network needed), else from the registry.
fn lock(dir: &Path) {
    if !cargo(dir, &["generate-lockfile", "--offline"])
        .status
        .success()
    {
        cargo_ok(dir, &["generate-lockfile"]);
    }
}

#[test]
fn a_new_handler_tests_builds_checks_and_runs_outside_the_workspace() {
    let parent = tempfile::tempdir().unwrap();
    let parent_arg = parent.path().to_str().unwrap();
    let ran = clawq(&[
        "new",
        "handler",
        "demo-handler",
        "--world",
        "receipt-handler",
        "--dir",
        parent_arg,
    ]);
    assert!(ran.ok, "{}", ran.stderr);
    assert!(
        ran.stdout.contains("next steps")
            && ran
                .stdout
                .contains("cargo build --target wasm32-wasip2 --release"),
        "{}",
        ran.stdout
    );
    let dir = parent.path().join("demo-handler");
    assert_eq!(
        std::fs::read_to_string(dir.join("wit/queues.wit")).unwrap(),
        include_str!("../wit/queues.wit")
    );
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("\n[workspace]\n"), "{manifest}");
    assert!(dir.join("README.md").exists() && dir.join(".gitignore").exists());

    lock(&dir);
    cargo_ok(&dir, &["test"]);
    cargo_ok(&dir, &["build", "--target", "wasm32-wasip2", "--release"]);
    let wasm = scaffold_target_dir().join("wasm32-wasip2/release/demo_handler.wasm");
    let wasm = wasm.to_str().unwrap();

    let checked = clawq(&["check", wasm, "--world", "receipt-handler"]);
    assert!(checked.ok, "{}", checked.stderr);
    assert!(checked.stdout.contains("receipt-handler    accepts it"));
    let refused = clawq(&["check", wasm, "--world", "crl-invalidation"]);
    assert!(!refused.ok);
    assert!(
        refused
            .stderr
            .contains("imports `actor-storage`, which world `crl-invalidation` does not grant"),
        "{}",
        refused.stderr
    );

    let hello = json!({"hello": "world"}).to_string();
    let ran = clawq(&[
        "run",
        wasm,
        "--world",
        "receipt-handler",
        "--message",
        &hello,
        "--message",
        "\"a string\"",
    ]);
    assert!(ran.ok, "{}", ran.stderr);
    let calls = section(&ran.stdout, "calls:");
    assert_eq!(calls.len(), 6, "{}", ran.stdout);
    assert!(
        calls[0].starts_with("log.info \"message ") && calls[0].contains("(attempt 1)"),
        "{}",
        ran.stdout
    );
    assert_eq!(
        calls[1],
        "actor-storage.get demo-handler \"handled\" -> none"
    );
    assert_eq!(
        calls[2],
        "actor-storage.put demo-handler \"handled\" (1 bytes) -> ok"
    );
    assert_eq!(
        calls[4],
        "actor-storage.get demo-handler \"handled\" -> 1 bytes"
    );
    two_acks(&ran);

    // A world without actor storage gets the log-only handler; its tests pass too.
    let ran = clawq(&[
        "new",
        "handler",
        "demo-events",
        "--world",
        "crl-invalidation",
        "--dir",
        parent_arg,
    ]);
    assert!(ran.ok, "{}", ran.stderr);
    let events = parent.path().join("demo-events");
    assert!(
        !std::fs::read_to_string(events.join("src/lib.rs"))
            .unwrap()
            .contains("actor_storage")
    );
    lock(&events);
    cargo_ok(&events, &["test"]);
}

#[test]
fn new_handler_refuses_bad_names_and_existing_directories() {
    let parent = tempfile::tempdir().unwrap();
    let parent_arg = parent.path().to_str().unwrap();
    for name in ["9lives", "has space", "fn", "dot.ted", "std"] {
        let ran = clawq(&["new", "handler", name, "--dir", parent_arg]);
        assert!(!ran.ok, "{name}");
        assert!(
            ran.stderr.contains("is not a valid crate name"),
            "{name}: {}",
            ran.stderr
        );
    }
    let ran = clawq(&[
        "new", "handler", "x", "--world", "nope", "--dir", parent_arg,
    ]);
    assert!(!ran.ok && ran.stderr.contains("world `nope` is not one of"));
    assert_eq!(
        std::fs::read_dir(parent.path()).unwrap().count(),
        0,
        "a refused name writes nothing"
    );

    std::fs::create_dir(parent.path().join("taken")).unwrap();
    std::fs::write(parent.path().join("taken/keep.txt"), "mine").unwrap();
    let ran = clawq(&["new", "handler", "taken", "--dir", parent_arg]);
    assert!(!ran.ok);
    assert!(ran.stderr.contains("already exists"), "{}", ran.stderr);
    assert_eq!(
        std::fs::read_dir(parent.path().join("taken"))
            .unwrap()
            .count(),
        1,
        "an existing directory is left alone"
    );
}

/// Longest the JavaScript toolchain may take to install and build (npm ci, componentize).
const NPM_DEADLINE: Duration = Duration::from_secs(10 * 60);

#[test]
fn a_handler_written_in_javascript_is_checked_and_run() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../components/examples/js-handler");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/js-handler/js_handler.wasm");
    let mut build = Command::new("bash");
    build
        .arg(example.join("build.sh"))
        .arg(&out)
        .env("BACKEND", "qjs");
    let built = run_bounded(build, NPM_DEADLINE);
    assert!(
        built.status.success(),
        "building the JavaScript handler (needs node and npm) failed: {}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let wasm = out.to_str().unwrap();

    let checked = clawq(&["check", wasm, "--world", "receipt-handler"]);
    assert!(checked.ok, "{}", checked.stderr);
    let refused = clawq(&["check", wasm, "--world", "receipt-router"]);
    assert!(
        refused.stderr.contains("imports `actor-storage`"),
        "{}",
        refused.stderr
    );

    let dead = receipt("req-js").to_string();
    let delivered = json!({"type": "delivery_receipt", "status": "delivered_to_webhook"});
    let ran = clawq(&[
        "run",
        wasm,
        "--world",
        "receipt-handler",
        "--message",
        &dead,
        "--message",
        &delivered.to_string(),
    ]);
    assert!(ran.ok, "{}", ran.stderr);
    // The dead-lettered receipt is handed to its sender's relay session as a delivery
    // from the sender to itself; the other message is only acked.
    let calls = section(&ran.stdout, "calls:");
    let deliveries: Vec<&&str> = calls
        .iter()
        .filter(|c| c.starts_with("relay-sessions.deliver "))
        .collect();
    assert_eq!(deliveries.len(), 1, "{}", ran.stdout);
    assert!(
        deliveries[0].contains(DID_A)
            && deliveries[0].contains("req-js")
            && deliveries[0].contains("clawq.examples.js-handler"),
        "{}",
        ran.stdout
    );
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("log.info") && c.contains(&format!("told {DID_A} about req-js"))),
        "{}",
        ran.stdout
    );
    two_acks(&ran);
}
