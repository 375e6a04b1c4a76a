//! The bundled CRL-invalidation handler of the `clawdentity-events` queue.
//!
//! It marks an agent revoked in the trust store as soon as the registry publishes its
//! `agent.auth.revoked` event with reason `agent_revoked` (spec section 2), so that the
//! agent is refused at once instead of at the next CRL refresh. Bodies are read in every
//! encoding the protocol accepts (spec section 5). Every other known event is acked; a
//! body that cannot be handled is acked `unhandled` with the reason (the host logs and
//! counts it); only a transient trust-store failure asks for a retry.
//!
//! Built for `wasm32-wasip2` it is the component (its `component` module: the WIT bindings and
//! the export); natively it is the handler's logic as a library ([`decide`], [`handling`]),
//! which the unit tests and the host's WASM-vs-native benchmark run.

#[cfg(target_arch = "wasm32")]
mod component;
pub mod decide;
pub mod handling;
