//! The `trust-store` import: revoking agents (which also closes their connections) and
//! asking whether one is revoked.

use super::{BatchState, guest_error};
use crate::runtime::HostError;
use crate::runtime::bindings::clawdentity::queues::trust_store;

impl trust_store::Host for BatchState {
    async fn revoke_agent(&mut self, did: String) -> Result<(), HostError> {
        let args = || did.clone();
        self.recorded(
            "trust-store.revoke-agent",
            args,
            |_| "ok".into(),
            async |state| {
                state.caps.trust.revoke(&did).map_err(guest_error)?;
                if state.caps.hub.close(&did, 1008, "agent_revoked") {
                    tracing::info!(agent = %did, "revoked agent's connection closed");
                }
                Ok(())
            },
        )
        .await
    }

    async fn is_revoked(&mut self, did: String) -> Result<bool, HostError> {
        let args = || did.clone();
        self.recorded(
            "trust-store.is-revoked",
            args,
            bool::to_string,
            async |state| state.caps.trust.is_revoked(&did).map_err(guest_error),
        )
        .await
    }
}
