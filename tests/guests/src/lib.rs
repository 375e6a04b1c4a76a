//! Paths of the guest components that tests load, built for `wasm32-wasip2` by this
//! crate's build script (release builds of `clawq` never build them).

/// Handler whose outcomes are scripted by the message bodies
/// (`tests/components/scripted-handler`).
pub const SCRIPTED_HANDLER: &str = env!("CLAWQ_GUEST_SCRIPTED_HANDLER");

/// Handler that traps on every batch, a crash-looping version
/// (`tests/components/failing-handler`).
pub const FAILING_HANDLER: &str = env!("CLAWQ_GUEST_FAILING_HANDLER");

/// A receipt handler built against WIT 0.1.0 (`tests/components/legacy-handler`).
pub const LEGACY_HANDLER: &str = env!("CLAWQ_GUEST_LEGACY_HANDLER");

/// Handler that attacks the sandbox as each message scripts
/// (`tests/components/hostile-handler`).
pub const HOSTILE_HANDLER: &str = env!("CLAWQ_GUEST_HOSTILE_HANDLER");

/// The example third-party handler `components/examples/dead-letter-digest`.
pub const DEAD_LETTER_DIGEST: &str = env!("CLAWQ_GUEST_DEAD_LETTER_DIGEST");
