//! Builds the bundled handler components, embedded in the binary with `include_bytes!`
//! (see `src/bundled.rs`); the test components are built by `clawq-test-guests`, a
//! dev-dependency, for test builds only.

fn main() {
    clawq_guest_build::build(
        &["crl-invalidation", "receipt-router", "event-router"],
        &["wit", "components"],
    );
}
