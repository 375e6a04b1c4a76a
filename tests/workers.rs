//! The Workers side (`workers/`): the bundled handler components, exactly as cargo built
//! them, transpiled by jco and run in workerd through Miniflare by `npm test` (its
//! `node --test` files drive the real Worker over loopback HTTP and WebSockets, and run
//! this build's `clawq connect` against it). Needs npm reaching the npm registry.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::{FAILING_HANDLER, SCRIPTED_HANDLER, run_bounded};

/// Longest `npm ci` or `npm test` may take (the first `npm ci` downloads workerd).
const NPM_DEADLINE: Duration = Duration::from_secs(10 * 60);

/// The bundled components and the test ones (a trapping handler, a scripted one), by the
/// env var the build script of `workers/` reads.
const GUESTS: [(&str, &str); 5] = [
    (
        "CLAWQ_GUEST_CRL_INVALIDATION",
        env!("CLAWQ_GUEST_CRL_INVALIDATION"),
    ),
    ("CLAWQ_GUEST_EVENT_ROUTER", env!("CLAWQ_GUEST_EVENT_ROUTER")),
    (
        "CLAWQ_GUEST_RECEIPT_ROUTER",
        env!("CLAWQ_GUEST_RECEIPT_ROUTER"),
    ),
    ("CLAWQ_GUEST_FAILING_HANDLER", FAILING_HANDLER),
    ("CLAWQ_GUEST_SCRIPTED_HANDLER", SCRIPTED_HANDLER),
];

/// Runs `npm <args>` in `dir` with the guests' paths and this build's `clawq`.
fn npm(dir: &Path, args: &[&str]) -> (bool, String) {
    let mut command = Command::new("npm");
    command
        .args(args)
        .current_dir(dir)
        .env("CLAWQ_BIN", env!("CARGO_BIN_EXE_clawq"));
    for (name, path) in GUESTS {
        command.env(name, path);
    }
    let output = run_bounded(command, NPM_DEADLINE);
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn the_handler_components_run_under_workers_in_workerd() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../workers");
    let (installed, log) = npm(&dir, &["ci", "--no-audit", "--no-fund"]);
    assert!(installed, "npm ci in workers/ failed:\n{log}");
    let (passed, log) = npm(&dir, &["test"]);
    assert!(passed, "npm test in workers/ failed:\n{log}");
    assert!(log.contains("\n# fail 0"), "{log}");
    assert!(
        log.contains("\n# skipped 0"),
        "no test may be skipped (clawq connect runs): {log}"
    );
    let passes = log.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(passes >= 16, "expected every Workers test to run: {log}");

    // The Worker ran exactly the files cargo built.
    let built: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("gen/build.json")).expect("workers/gen/build.json"),
    )
    .unwrap();
    let paths: Vec<&str> = built["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    for (_, path) in GUESTS {
        assert!(paths.contains(&path), "{path} not transpiled: {built}");
    }
}
