//! The `trust-store` import: revoking agents (which also closes their connections) and
//! asking whether one is revoked.

use super::{BatchState, guest_error};
use crate::runtime::HostError;
use crate::runtime::bindings::clawdentity::queues::trust_store;

impl trust_store::Host for BatchState {
    async fn revoke_agent(&mut self, did: String) -> Result<(), HostError> {
        let result = self.caps.trust.revoke(&did).map_err(guest_error);
        if result.is_ok() && self.caps.hub.close(&did, 1008, "agent_revoked") {
            tracing::info!(agent = %did, "revoked agent's connection closed");
        }
        self.record("trust-store.revoke-agent", || did, &result, |_| "ok".into());
        result
    }

    async fn is_revoked(&mut self, did: String) -> Result<bool, HostError> {
        let result = self.caps.trust.is_revoked(&did).map_err(guest_error);
        self.record("trust-store.is-revoked", || did, &result, bool::to_string);
        result
    }
}
