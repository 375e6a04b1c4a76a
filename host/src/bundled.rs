//! The handler components bundled into the `clawq` binary, built by `build.rs`.

/// The CRL-invalidation handler (spec section 2).
pub const CRL_INVALIDATION: &[u8] = include_bytes!(env!("CLAWQ_GUEST_CRL_INVALIDATION"));

/// The names of the bundled handlers, as a config's `handler` key gives them.
pub const NAMES: [&str; 1] = ["crl-invalidation"];

/// The bytes of the bundled handler called `name`.
pub fn find(name: &str) -> Option<&'static [u8]> {
    match name {
        "crl-invalidation" => Some(CRL_INVALIDATION),
        _ => None,
    }
}
