//! Builds the guest components for `wasm32-wasip2` so that `cargo run` and `cargo test`
//! need no manual step (the way wasmtime's `test-programs` artifacts are built).
//!
//! Each guest's `.wasm` path is exported to the host's code as `CLAWQ_GUEST_<NAME>`
//! (e.g. `CLAWQ_GUEST_CRL_INVALIDATION`): bundled components are embedded with
//! `include_bytes!`, test components are loaded by the tests from that path.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Guest crates, by package name.
const GUESTS: [&str; 8] = [
    "crl-invalidation",
    "receipt-router",
    "event-router",
    "scripted-handler",
    "failing-handler",
    "legacy-handler",
    "hostile-handler",
    "dead-letter-digest",
];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("guests");

    for dir in ["wit", "host/wit-compat", "components", "tests/components"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );

    build_guests(root, &target_dir);
    for name in GUESTS {
        let file = target_dir
            .join("wasm32-wasip2/guest")
            .join(format!("{}.wasm", name.replace('-', "_")));
        assert!(
            file.exists(),
            "guest {name} was not built: {}",
            file.display()
        );
        let var = format!("CLAWQ_GUEST_{}", name.replace('-', "_").to_uppercase());
        println!("cargo:rustc-env={var}={}", file.display());
    }
}

/// Builds each guest as a `cdylib` (its crate is a plain library, so that its unit tests
/// and clippy run natively), which for `wasm32-wasip2` is a component.
fn build_guests(root: &Path, target_dir: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for name in GUESTS {
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(root)
            .args(["rustc", "--lib", "--crate-type", "cdylib", "-p", name])
            .args(["--target", "wasm32-wasip2", "--profile", "guest"])
            .arg("--target-dir")
            .arg(target_dir);
        // The outer build's flags and wrappers (clippy, coverage) are not meant for guests.
        for var in [
            "CARGO_ENCODED_RUSTFLAGS",
            "RUSTFLAGS",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "CARGO_BUILD_TARGET",
            "CARGO_TARGET_DIR",
            "CARGO_PRIMARY_PACKAGE",
        ] {
            cmd.env_remove(var);
        }
        let status = cmd
            .status()
            .expect("running cargo to build the guest components");
        assert!(
            status.success(),
            "building the guest component {name} failed"
        );
    }
}
