//! The `actor-storage` import: each consumer's durable key-value actors.

use wasmtime::component::HasData;

use super::{BatchState, guest_error};
use crate::actor_storage::{ActorClaims, ActorStorage};
use crate::runtime::HostError;
use crate::runtime::bindings::clawdentity::queues::actor_storage;
use crate::runtime::record::{CallLog, recorded};

/// What the `actor-storage` import reaches of a batch: the store, the actors of the
/// batch's consumer, the actors the batch holds, and the batch's call log.
pub(in crate::runtime) struct ActorStorageView<'a> {
    storage: &'a ActorStorage,
    actors: &'a str,
    claims: &'a ActorClaims,
    calls: Option<&'a CallLog>,
}

/// The `actor-storage` import's view of a batch's state, for the linker.
pub(in crate::runtime) struct HasActorStorage;

impl HasData for HasActorStorage {
    type Data<'a> = ActorStorageView<'a>;
}

impl HasActorStorage {
    /// The view of `state`.
    pub(in crate::runtime) fn view(state: &mut BatchState) -> ActorStorageView<'_> {
        ActorStorageView {
            storage: &state.caps.storage,
            actors: &state.actors,
            claims: &state.claims,
            calls: state.calls.as_ref(),
        }
    }
}

impl ActorStorageView<'_> {
    /// Holds `actor` for the batch before a call on it.
    async fn hold(&self, actor: &str) -> Result<(), HostError> {
        (self.claims.hold(self.actors, actor).await).map_err(guest_error)
    }
}

impl actor_storage::Host for ActorStorageView<'_> {
    async fn get(&mut self, actor: String, key: String) -> Result<Option<Vec<u8>>, HostError> {
        let args = || format!("{actor} {key:?}");
        let show = |value: &Option<Vec<u8>>| match value {
            Some(bytes) => format!("{} bytes", bytes.len()),
            None => "none".into(),
        };
        recorded(self.calls, "actor-storage.get", args, show, async {
            self.hold(&actor).await?;
            (self.storage.get(self.actors, &actor, &key).await).map_err(guest_error)
        })
        .await
    }

    async fn put(&mut self, actor: String, key: String, value: Vec<u8>) -> Result<(), HostError> {
        let args = || format!("{actor} {key:?} ({} bytes)", value.len());
        recorded(
            self.calls,
            "actor-storage.put",
            args,
            |_| "ok".into(),
            async {
                self.hold(&actor).await?;
                (self.storage.put(self.actors, &actor, &key, &value).await).map_err(guest_error)
            },
        )
        .await
    }

    async fn delete(&mut self, actor: String, key: String) -> Result<(), HostError> {
        let args = || format!("{actor} {key:?}");
        recorded(
            self.calls,
            "actor-storage.delete",
            args,
            |_| "ok".into(),
            async {
                self.hold(&actor).await?;
                (self.storage.delete(self.actors, &actor, &key).await).map_err(guest_error)
            },
        )
        .await
    }

    async fn list_prefix(
        &mut self,
        actor: String,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, HostError> {
        let after = start_after.as_deref();
        let args = || format!("{actor} {prefix:?} after {after:?} limit {limit}");
        let show = |entries: &Vec<(String, Vec<u8>)>| format!("{} entries", entries.len());
        recorded(self.calls, "actor-storage.list-prefix", args, show, async {
            self.hold(&actor).await?;
            let page = self
                .storage
                .list_prefix(self.actors, &actor, &prefix, after, limit)
                .await;
            page.map_err(guest_error)
        })
        .await
    }
}
