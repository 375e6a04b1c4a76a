//! The `trust-store` import: revoking agents (which also closes their connections) and
//! asking whether one is revoked. A revocation is checked at once and kept with the
//! batch, whose revocations are all written together once its call returns, in the
//! transaction that commits the batch's outcomes (in a cluster, before they are
//! committed): never an ack without its revocation (revocations that cannot be committed
//! release the batch, to be tried again), and `is-revoked` answers from what is committed
//! (not from the batch's own revocations).

use wasmtime::component::HasData;

use super::{BatchState, guest_error};
use crate::relay::hub::ConnectionHub;
use crate::runtime::HostError;
use crate::runtime::bindings::clawdentity::queues::trust_store;
use crate::runtime::record::{CallLog, recorded};
use crate::trust::{TrustStore, check_did};

/// What the `trust-store` import reaches of a batch: the trust store, the connections a
/// revocation closes, and the batch's call log.
pub(in crate::runtime) struct TrustStoreView<'a> {
    trust: &'a TrustStore,
    hub: &'a ConnectionHub,
    calls: Option<&'a CallLog>,
    /// The agents the batch revoked so far.
    revoked: &'a mut Vec<String>,
}

/// The `trust-store` import's view of a batch's state, for the linker.
pub(in crate::runtime) struct HasTrustStore;

impl HasData for HasTrustStore {
    type Data<'a> = TrustStoreView<'a>;
}

impl HasTrustStore {
    /// The view of `state`.
    pub(in crate::runtime) fn view(state: &mut BatchState) -> TrustStoreView<'_> {
        TrustStoreView {
            trust: &state.caps.trust,
            hub: &state.caps.hub,
            calls: state.calls.as_ref(),
            revoked: &mut state.revoked,
        }
    }
}

impl trust_store::Host for TrustStoreView<'_> {
    async fn revoke_agent(&mut self, did: String) -> Result<(), HostError> {
        let args = || did.clone();
        recorded(
            self.calls,
            "trust-store.revoke-agent",
            args,
            |_| "ok".into(),
            async {
                // Written with the batch's other revocations and its outcomes, not one
                // by one.
                check_did(&did).map_err(guest_error)?;
                if self.hub.close(&did, 1008, "agent_revoked") {
                    tracing::info!(agent = %did, "revoked agent's connection closed");
                }
                self.revoked.push(did.clone());
                Ok(())
            },
        )
        .await
    }

    async fn is_revoked(&mut self, did: String) -> Result<bool, HostError> {
        let args = || did.clone();
        recorded(
            self.calls,
            "trust-store.is-revoked",
            args,
            bool::to_string,
            async { self.trust.is_revoked(&did).await.map_err(guest_error) },
        )
        .await
    }
}
