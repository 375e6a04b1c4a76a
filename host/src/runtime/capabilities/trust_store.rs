//! The `trust-store` import: revoking agents (which also closes their connections) and
//! asking whether one is revoked. A revocation is queued at once and committed with the
//! batch's other writes, not one by one: the batch's outcomes are settled only once it is
//! committed (a revocation that cannot be committed releases the batch, to be tried
//! again), and `is-revoked` answers from what is committed.

use wasmtime::component::HasData;

use super::{BatchState, guest_error};
use crate::relay::hub::ConnectionHub;
use crate::runtime::HostError;
use crate::runtime::bindings::clawdentity::queues::trust_store;
use crate::runtime::record::{CallLog, recorded};
use crate::store::Pending;
use crate::trust::{TrustError, TrustStore};

/// What the `trust-store` import reaches of a batch: the trust store, the connections a
/// revocation closes, and the batch's call log.
pub(in crate::runtime) struct TrustStoreView<'a> {
    trust: &'a TrustStore,
    hub: &'a ConnectionHub,
    calls: Option<&'a CallLog>,
    /// The batch's revocations not yet known to be committed.
    pending: &'a mut Vec<Pending<TrustError>>,
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
            pending: &mut state.pending,
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
                // Committed with the batch (before its outcomes are), not one by one.
                let committed = self.trust.revoke_later(&did).map_err(guest_error)?;
                self.pending.push(committed);
                if self.hub.close(&did, 1008, "agent_revoked") {
                    tracing::info!(agent = %did, "revoked agent's connection closed");
                }
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
