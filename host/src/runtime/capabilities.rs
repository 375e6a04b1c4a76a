//! The capability imports of `wit/`, one file per interface, each implementing its
//! generated `Host` trait on a narrow view of the batch's state (what that import
//! reaches, borrowed for one call: wasmtime's `HasData`, as `wasmtime-wasi` views its
//! context); and the host services behind them.

use std::sync::Arc;

use super::HostError;
use super::batch::BatchState;
use super::bindings::clawdentity::queues::types;
use crate::actor_storage::{ActorStorage, StorageError};
use crate::bounds::GuestLogs;
use crate::relay::hub::ConnectionHub;
use crate::relay::store::SessionStore;
use crate::trust::{TrustError, TrustStore};

mod actor_storage;
mod log;
mod relay_sessions;
mod trust_store;

pub(super) use actor_storage::{ActorStorageView, HasActorStorage};
pub(super) use log::{HasLog, LogView};
pub(super) use relay_sessions::{HasRelaySessions, RelaySessionsView};
pub(super) use trust_store::{HasTrustStore, TrustStoreView};

/// The host services a handler's imports reach. The server's wiring opens them
/// ([`crate::server::open_capabilities`]).
pub struct Capabilities {
    /// Backs the `trust-store` import.
    pub trust: Arc<TrustStore>,
    /// Backs the `relay-sessions` import.
    pub sessions: Arc<SessionStore>,
    /// The agents' connector connections: revocations close them through it.
    pub hub: Arc<ConnectionHub>,
    /// Backs the `actor-storage` import.
    pub storage: Arc<ActorStorage>,
    /// The log rate limits of the `log` import.
    pub logs: Arc<GuestLogs>,
}

impl types::Host for BatchState {}

/// An error of a storage-backed capability call.
pub(super) trait GuestError: std::fmt::Display {
    /// Whether a later attempt may succeed.
    fn is_transient(&self) -> bool;
}

impl GuestError for TrustError {
    fn is_transient(&self) -> bool {
        TrustError::is_transient(self)
    }
}

impl GuestError for StorageError {
    fn is_transient(&self) -> bool {
        matches!(self, StorageError::Unavailable(_))
    }
}

/// A capability's error as the guest sees it. The storage calls behind the capabilities
/// are short SQLite statements (tens of µs) and run in place: handing each to the blocking
/// pool cost more in thread switches than the statement itself.
pub(super) fn guest_error<E: GuestError>(err: E) -> HostError {
    HostError {
        transient: err.is_transient(),
        message: err.to_string(),
    }
}
