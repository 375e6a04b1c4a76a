//! Builds guest components for `wasm32-wasip2` from a build script, so that `cargo run`
//! and `cargo test` need no manual step (the way wasmtime's `test-programs` artifacts are
//! built).
//!
//! The host's build script builds the bundled handlers (embedded in the binary); the
//! `clawq-test-guests` crate, a dev-dependency, builds the test and example components,
//! so a release build of `clawq` never builds them. Each guest's `.wasm` path is exported
//! to the calling crate as `CLAWQ_GUEST_<NAME>` (e.g. `CLAWQ_GUEST_CRL_INVALIDATION`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Variables of the outer build that are not meant for the guests' build (clippy and
/// coverage wrappers, the host's flags and target).
const OUTER_BUILD_VARS: [&str; 7] = [
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_PRIMARY_PACKAGE",
];

/// Builds the workspace packages `guests` as components with the `guest` profile, and
/// exports each `.wasm` path as `CLAWQ_GUEST_<NAME>` to the crate whose build script calls
/// this; builds again when a file under `sources` (folders of the workspace: the guests'
/// crates, the WIT and what they share) changes. Panics (failing that build) when a guest
/// does not build.
pub fn build(guests: &[&str], sources: &[&str]) {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = workspace_root(&manifest_dir);
    // Guests have a target directory of their own: building them under the outer build's
    // lock on its own directory would deadlock.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("guests");

    for dir in sources {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for name in guests {
        // Each guest crate is a plain library (so that its unit tests and clippy run
        // natively); `cargo rustc` makes it a `cdylib`, which for `wasm32-wasip2` is a
        // component. (A `cdylib` crate type in the manifest would not link natively.)
        let mut command = Command::new(&cargo);
        command
            .current_dir(&root)
            .args(["rustc", "--lib", "--crate-type", "cdylib", "-p", name])
            .args(["--target", "wasm32-wasip2", "--profile", "guest"])
            .arg("--target-dir")
            .arg(&target_dir);
        for var in OUTER_BUILD_VARS {
            command.env_remove(var);
        }
        let status = command
            .status()
            .expect("running cargo to build the guest components");
        assert!(
            status.success(),
            "building the guest component {name} failed"
        );
    }

    for name in guests {
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

/// The workspace root: the nearest ancestor of `dir` whose `Cargo.toml` has a
/// `[workspace]` table.
fn workspace_root(dir: &Path) -> PathBuf {
    dir.ancestors()
        .find(|dir| {
            std::fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|manifest| manifest.lines().any(|line| line.trim() == "[workspace]"))
        })
        .expect("the guest components are built from inside the clawq workspace")
        .to_path_buf()
}
