//! The `actor-storage` import: each consumer's durable key-value actors.

use super::{BatchState, guest_error};
use crate::runtime::HostError;
use crate::runtime::bindings::clawdentity::queues::actor_storage;

impl actor_storage::Host for BatchState {
    async fn get(&mut self, actor: String, key: String) -> Result<Option<Vec<u8>>, HostError> {
        let args = || format!("{actor} {key:?}");
        let show = |value: &Option<Vec<u8>>| match value {
            Some(bytes) => format!("{} bytes", bytes.len()),
            None => "none".into(),
        };
        self.recorded("actor-storage.get", args, show, async |state| {
            let storage = &state.caps.storage;
            storage
                .get(&state.actors, &actor, &key)
                .map_err(guest_error)
        })
        .await
    }

    async fn put(&mut self, actor: String, key: String, value: Vec<u8>) -> Result<(), HostError> {
        let args = || format!("{actor} {key:?} ({} bytes)", value.len());
        self.recorded(
            "actor-storage.put",
            args,
            |_| "ok".into(),
            async |state| {
                let storage = &state.caps.storage;
                storage
                    .put(&state.actors, &actor, &key, &value)
                    .map_err(guest_error)
            },
        )
        .await
    }

    async fn delete(&mut self, actor: String, key: String) -> Result<(), HostError> {
        let args = || format!("{actor} {key:?}");
        self.recorded(
            "actor-storage.delete",
            args,
            |_| "ok".into(),
            async |state| {
                let storage = &state.caps.storage;
                storage
                    .delete(&state.actors, &actor, &key)
                    .map_err(guest_error)
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
        self.recorded("actor-storage.list-prefix", args, show, async |state| {
            let storage = &state.caps.storage;
            (storage.list_prefix(&state.actors, &actor, &prefix, after, limit)).map_err(guest_error)
        })
        .await
    }
}
