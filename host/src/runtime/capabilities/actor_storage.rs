//! The `actor-storage` import: each consumer's durable key-value actors.

use super::{BatchState, guest_error};
use crate::runtime::HostError;
use crate::runtime::bindings::clawdentity::queues::actor_storage;

impl actor_storage::Host for BatchState {
    async fn get(&mut self, actor: String, key: String) -> Result<Option<Vec<u8>>, HostError> {
        let result = self
            .caps
            .storage
            .get(&self.actors, &actor, &key)
            .map_err(guest_error);
        let show = |value: &Option<Vec<u8>>| match value {
            Some(bytes) => format!("{} bytes", bytes.len()),
            None => "none".into(),
        };
        self.record(
            "actor-storage.get",
            || format!("{actor} {key:?}"),
            &result,
            show,
        );
        result
    }

    async fn put(&mut self, actor: String, key: String, value: Vec<u8>) -> Result<(), HostError> {
        let result = self
            .caps
            .storage
            .put(&self.actors, &actor, &key, &value)
            .map_err(guest_error);
        let args = || format!("{actor} {key:?} ({} bytes)", value.len());
        self.record("actor-storage.put", args, &result, |_| "ok".into());
        result
    }

    async fn delete(&mut self, actor: String, key: String) -> Result<(), HostError> {
        let result = self
            .caps
            .storage
            .delete(&self.actors, &actor, &key)
            .map_err(guest_error);
        let args = || format!("{actor} {key:?}");
        self.record("actor-storage.delete", args, &result, |_| "ok".into());
        result
    }

    async fn list_prefix(
        &mut self,
        actor: String,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, HostError> {
        let after = start_after.as_deref();
        let result = self
            .caps
            .storage
            .list_prefix(&self.actors, &actor, &prefix, after, limit)
            .map_err(guest_error);
        let args = || format!("{actor} {prefix:?} after {after:?} limit {limit}");
        let show = |entries: &Vec<(String, Vec<u8>)>| format!("{} entries", entries.len());
        self.record("actor-storage.list-prefix", args, &result, show);
        result
    }
}
