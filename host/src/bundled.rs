//! The handler components bundled into the `clawq` binary, built by `build.rs`.

/// The CRL-invalidation handler (spec section 2).
pub const CRL_INVALIDATION: &[u8] = include_bytes!(env!("CLAWQ_GUEST_CRL_INVALIDATION"));

/// The receipt router (spec section 3).
pub const RECEIPT_ROUTER: &[u8] = include_bytes!(env!("CLAWQ_GUEST_RECEIPT_ROUTER"));

/// The event router: pairing and group events become deliveries (spec section 5).
pub const EVENT_ROUTER: &[u8] = include_bytes!(env!("CLAWQ_GUEST_EVENT_ROUTER"));

/// The names of the bundled handlers, as a config's `handler` key gives them.
pub const NAMES: [&str; 3] = ["crl-invalidation", "receipt-router", "event-router"];

/// The bytes of the bundled handler called `name`.
pub fn find(name: &str) -> Option<&'static [u8]> {
    match name {
        "crl-invalidation" => Some(CRL_INVALIDATION),
        "receipt-router" => Some(RECEIPT_ROUTER),
        "event-router" => Some(EVENT_ROUTER),
        _ => None,
    }
}
