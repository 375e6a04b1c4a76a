//! One batch at a time per actor across a cluster: before a batch's first storage call
//! on an actor, it claims the actor in the `clawq_actor_claims` bucket, and it releases
//! its claims when it ends. On one host a consumer's batches run one at a time
//! (`max_concurrency = 1`), so a handler's read-modify-write of an actor (read a count,
//! write it plus one) is never interleaved with another's; in a cluster every host pulls
//! from the consumer's lane, so without the claim two hosts' batches interleave on the
//! same actor and one write is lost.
//!
//! A claim is the key `c.h<consumer>.a<actor>` (each in hex) holding the time its lease
//! ends (ms since the Unix epoch, the batch's wall-clock deadline from the claim),
//! created or taken over by compare-and-set. A batch finding the actor claimed by
//! another batch waits for the release, for at most [`CLAIM_WAIT`], then fails the call
//! with a transient error (the handler retries its message). A claim whose lease ended
//! (its host died, or could not release it) is taken over.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{CreateErrorKind, Operation, Store, UpdateErrorKind};
use bytes::Bytes;

use super::StorageError;
use super::jetstream::{hex, unavailable};
use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::kv;

/// The bucket of the claims.
pub const BUCKET: &str = "clawq_actor_claims";
/// How long a batch waits for another batch's claim on an actor before its call fails.
pub const CLAIM_WAIT: Duration = Duration::from_secs(5);

/// Opens the claims bucket of `cluster`.
pub(super) async fn open(cluster: &Cluster) -> anyhow::Result<Store> {
    kv::bucket(
        cluster,
        BUCKET,
        "clawq: which batch uses an actor of the handlers' actor storage",
        false,
    )
    .await
}

/// The claims of one batch, released when it is dropped (the batch ended).
pub(super) struct BatchClaims {
    bucket: Store,
    lease: Duration,
    /// The revision of each claim held, by key.
    held: Mutex<HashMap<String, u64>>,
}

impl BatchClaims {
    /// No claims yet, in `bucket`, each held for at most `lease`.
    pub(super) fn new(bucket: Store, lease: Duration) -> Self {
        BatchClaims {
            bucket,
            lease,
            held: Mutex::default(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `actor` of `consumer` for the batch, unless it holds it already; waits for
    /// another batch's claim for at most [`CLAIM_WAIT`].
    pub(super) async fn hold(&self, consumer: &str, actor: &str) -> Result<(), StorageError> {
        let key = format!("c.h{}.a{}", hex(consumer), hex(actor));
        if self.held().contains_key(&key) {
            return Ok(());
        }
        let give_up = Instant::now() + CLAIM_WAIT;
        loop {
            if let Some(revision) = self.try_claim(&key).await? {
                self.held().insert(key, revision);
                return Ok(());
            }
            if Instant::now() >= give_up {
                return Err(StorageError::Unavailable(format!(
                    "actor `{actor}` stayed in use by another batch for {CLAIM_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(fastrand::u64(2..10))).await;
        }
    }

    /// Claims `key` if no live claim holds it: its revision, or `None` when another
    /// batch holds it (or took it first).
    async fn try_claim(&self, key: &str) -> Result<Option<u64>, StorageError> {
        let lease_end = now_ms() + self.lease.as_millis() as u64;
        let value = Bytes::from(lease_end.to_string());
        let entry = self.bucket.entry(key).await.map_err(unavailable)?;
        let claimed =
            match entry {
                None => self.bucket.create(key, value).await.map_err(|e| {
                    (e.kind() != CreateErrorKind::AlreadyExists).then(|| unavailable(e))
                }),
                Some(e) if e.operation == Operation::Put && lease_end_of(&e.value) > now_ms() => {
                    return Ok(None);
                }
                Some(e) => self
                    .bucket
                    .update(key, value, e.revision)
                    .await
                    .map_err(|e| {
                        (e.kind() != UpdateErrorKind::WrongLastRevision).then(|| unavailable(e))
                    }),
            };
        match claimed {
            Ok(revision) => Ok(Some(revision)),
            Err(None) => Ok(None),
            Err(Some(err)) => Err(err),
        }
    }
}

/// When the lease of a claim ends; an unreadable claim has ended.
fn lease_end_of(value: &[u8]) -> u64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl Drop for BatchClaims {
    fn drop(&mut self) {
        let held = std::mem::take(&mut *self.held());
        if held.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // the leases end by themselves
        };
        let bucket = self.bucket.clone();
        runtime.spawn(async move {
            for (key, revision) in held {
                // A claim taken over after its lease ended is not this batch's to delete.
                if let Err(err) = bucket.delete_expect_revision(&key, Some(revision)).await {
                    tracing::debug!(key, error = %err, "releasing an actor claim failed; its lease will end");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_lease_has_ended() {
        assert_eq!(lease_end_of(b"1764000000000"), 1_764_000_000_000);
        assert_eq!(lease_end_of(b"soon"), 0);
    }
}
