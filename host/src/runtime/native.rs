//! Bench-only (the `native` section of `benches/throughput.rs`, WASM vs native): a
//! batch whose handler logic runs natively in the host instead of in a component, against
//! the very capability implementations a component's imports reach: the same per-batch
//! state, the same `trust-store` and `log` imports, and the same side effects (the
//! batch's revocations) to commit with its outcomes. Nothing in the product runs it.

use std::sync::Arc;

use wasmtime_wasi::WasiCtx;

use super::HostError;
use super::batch::{BatchState, LoadedHandler, side_effects};
use super::bindings::clawdentity::queues::{log, trust_store};
use super::capabilities::{Capabilities, HasLog, HasTrustStore};
use super::failure::BatchFailure;
use crate::side_effects::SideEffects;

pub use log::Level;

/// One batch of a handler, its logic run natively: what its capability calls reach.
pub struct NativeBatch {
    state: BatchState,
}

impl LoadedHandler {
    /// A batch of this handler over `caps`, its logic to be run natively: its log lines
    /// are attributed to the handler and count against its consumer's log rate, as its
    /// component's would.
    pub fn native_batch(&self, caps: Arc<Capabilities>) -> NativeBatch {
        NativeBatch {
            state: self.state(caps, None, WasiCtx::builder().build()),
        }
    }
}

impl NativeBatch {
    /// `trust-store.revoke-agent`.
    pub async fn revoke_agent(&mut self, did: String) -> Result<(), HostError> {
        let mut view = HasTrustStore::view(&mut self.state);
        trust_store::Host::revoke_agent(&mut view, did).await
    }

    /// `log.write`.
    pub async fn log(&mut self, level: Level, message: String) {
        log::Host::write(&mut HasLog::view(&mut self.state), level, message).await
    }

    /// The batch's side effects (its revocations), to commit with its outcomes, as
    /// [`LoadedHandler::call`] returns a component's.
    pub fn side_effects(mut self) -> Result<SideEffects, BatchFailure> {
        side_effects(&mut self.state)
    }
}
