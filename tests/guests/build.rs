//! Builds the test and example guest components; only test builds depend on this crate.

fn main() {
    clawq_guest_build::build(
        &[
            "scripted-handler",
            "failing-handler",
            "legacy-handler",
            "hostile-handler",
            "dead-letter-digest",
        ],
        &["wit", "host/wit-compat", "components", "tests/components"],
    );
}
