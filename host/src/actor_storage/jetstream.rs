//! The actor storage of a cluster, in the `clawq_actors` key-value bucket: a value under
//! `v.h<consumer>.a<actor>.k<key>` (each in hex, so that the hex of a key prefix is a
//! prefix of the hex of the keys it starts, in the same order), and each consumer's usage
//! under `u.h<consumer>`, changed by compare-and-set.
//!
//! Approximate under concurrency: a put reads the value it replaces, then changes the
//! usage, then writes the value. Two hosts putting the same new key at once count it
//! twice, and a host that dies between the usage change and the write counts a value
//! that is not stored: the usage can drift up (never down), so the quota errs on the
//! side of refusing. A listing reads every key of the bucket and then the values of the
//! page: fine for the small actors handlers keep, slow for a bucket of millions of keys.

use std::time::Duration;

use async_nats::jetstream::kv::{CreateErrorKind, Operation, Store, UpdateErrorKind};
use bytes::Bytes;

use super::claims::BatchClaims;
use super::{MAX_LIST_PAGE_BYTES, Quota, StorageError, Usage};
use crate::cluster::Cluster;
use crate::kv;

/// The bucket of the actors.
pub const BUCKET: &str = "clawq_actors";
/// How many times a usage change is tried against concurrent changes.
const CHANGE_ATTEMPTS: usize = 50;

/// The actors of a cluster.
pub(super) struct ClusterActors {
    bucket: Store,
    /// Which batch uses which actor ([`super::claims`]).
    claims: Store,
}

pub(super) fn unavailable(err: impl std::fmt::Display) -> StorageError {
    StorageError::Unavailable(err.to_string())
}

pub(super) fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(hex: &str) -> Option<String> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// The start of the keys of the values of `actor` of `consumer`.
fn actor_prefix(consumer: &str, actor: &str) -> String {
    format!("v.h{}.a{}.k", hex(consumer), hex(actor))
}

/// The key of the usage of `consumer`.
fn usage_key(consumer: &str) -> String {
    format!("u.h{}", hex(consumer))
}

impl ClusterActors {
    /// Opens the bucket, and the bucket of the claims.
    pub(super) async fn open(cluster: &Cluster) -> anyhow::Result<Self> {
        let bucket =
            kv::bucket(cluster, BUCKET, "clawq: the handlers' actor storage", false).await?;
        let claims = super::claims::open(cluster).await?;
        Ok(ClusterActors { bucket, claims })
    }

    /// The claims of a new batch whose lease is `lease`.
    pub(super) fn batch_claims(&self, lease: Duration) -> BatchClaims {
        BatchClaims::new(self.claims.clone(), lease)
    }

    /// The value of `key` in `actor` of `consumer`.
    pub(super) async fn get(
        &self,
        consumer: &str,
        actor: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let address = format!("{}{}", actor_prefix(consumer, actor), hex(key));
        self.value(&address).await
    }

    async fn value(&self, address: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let value = kv::leader_get(&self.bucket, address)
            .await
            .map_err(|e| unavailable(format!("{e:#}")))?;
        // The value is kept after one byte, so that an empty value is not taken for the
        // empty payload of a deletion.
        Ok(value.map(|v| v.get(1..).unwrap_or_default().to_vec()))
    }

    /// Stores `value` under `key` in `actor` of `consumer`, within `quota`.
    pub(super) async fn put(
        &self,
        consumer: &str,
        actor: &str,
        key: &str,
        value: &[u8],
        quota: Quota,
    ) -> Result<(), StorageError> {
        let address = format!("{}{}", actor_prefix(consumer, actor), hex(key));
        let row = |value_len: usize| (actor.len() + key.len() + value_len) as u64;
        let replaced = self.value(&address).await?.map(|old| row(old.len()));
        self.change_usage(consumer, |usage| {
            usage.after_put(consumer, quota, replaced, row(value.len()))
        })
        .await?;
        let mut stored = Vec::with_capacity(value.len() + 1);
        stored.push(b'v');
        stored.extend_from_slice(value);
        self.bucket
            .put(&address, Bytes::from(stored))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Deletes `key` from `actor` of `consumer`.
    pub(super) async fn delete(
        &self,
        consumer: &str,
        actor: &str,
        key: &str,
    ) -> Result<(), StorageError> {
        let address = format!("{}{}", actor_prefix(consumer, actor), hex(key));
        let Some(old) = self.value(&address).await? else {
            return Ok(());
        };
        self.bucket.delete(&address).await.map_err(unavailable)?;
        let bytes = (actor.len() + key.len() + old.len()) as u64;
        self.change_usage(consumer, |usage| {
            Ok(Usage {
                keys: usage.keys.saturating_sub(1),
                bytes: usage.bytes.saturating_sub(bytes),
            })
        })
        .await
    }

    /// Changes the usage of `consumer` with `change`, by compare-and-set.
    async fn change_usage(
        &self,
        consumer: &str,
        change: impl Fn(Usage) -> Result<Usage, StorageError>,
    ) -> Result<(), StorageError> {
        let key = usage_key(consumer);
        for _ in 0..CHANGE_ATTEMPTS {
            let entry = self.bucket.entry(&key).await.map_err(unavailable)?;
            let (usage, revision) = match entry {
                Some(e) if e.operation == Operation::Put => {
                    (decode_usage(&e.value)?, Some(e.revision))
                }
                Some(e) => (Usage::default(), Some(e.revision)),
                None => (Usage::default(), None),
            };
            let after = change(usage)?;
            let value =
                Bytes::from(serde_json::to_vec(&[after.keys, after.bytes]).map_err(unavailable)?);
            let landed = match revision {
                Some(revision) => match self.bucket.update(&key, value, revision).await {
                    Ok(_) => true,
                    Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => false,
                    Err(err) => return Err(unavailable(err)),
                },
                None => match self.bucket.create(&key, value).await {
                    Ok(_) => true,
                    Err(err) if err.kind() == CreateErrorKind::AlreadyExists => false,
                    Err(err) => return Err(unavailable(err)),
                },
            };
            if landed {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(fastrand::u64(1..10))).await;
        }
        Err(unavailable(format!(
            "the usage of `{consumer}` kept changing under this host"
        )))
    }

    /// What every consumer with stored keys keeps, by consumer.
    pub(super) async fn usage(&self) -> Result<Vec<(String, Usage)>, StorageError> {
        let mut all = Vec::new();
        for key in kv::keys(&self.bucket)
            .await
            .map_err(|e| unavailable(format!("{e:#}")))?
        {
            let Some(consumer) = key.strip_prefix("u.h").and_then(unhex) else {
                continue;
            };
            if let Some(value) = self.bucket.get(&key).await.map_err(unavailable)? {
                let usage = decode_usage(&value)?;
                if usage.keys > 0 {
                    all.push((consumer, usage));
                }
            }
        }
        Ok(all)
    }

    /// One page of the keys of `actor` of `consumer` starting with `prefix`, after
    /// `start_after`, at most `limit` of them and [`MAX_LIST_PAGE_BYTES`] of keys and
    /// values (after at least one entry), in key order.
    pub(super) async fn list_prefix(
        &self,
        consumer: &str,
        actor: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let actor_start = actor_prefix(consumer, actor);
        let start = format!("{actor_start}{}", hex(prefix));
        let after = start_after.map(|a| format!("{actor_start}{}", hex(a)));
        let mut addresses: Vec<String> = kv::keys(&self.bucket)
            .await
            .map_err(|e| unavailable(format!("{e:#}")))?
            .into_iter()
            .filter(|k| k.starts_with(&start) && after.as_ref().is_none_or(|a| k > a))
            .collect();
        addresses.sort();
        let (mut page, mut bytes) = (Vec::new(), 0);
        for address in addresses {
            if page.len() >= limit as usize || bytes >= MAX_LIST_PAGE_BYTES {
                break;
            }
            let Some(key) = unhex(&address[actor_start.len()..]) else {
                continue;
            };
            let Some(value) = self.value(&address).await? else {
                continue; // deleted meanwhile
            };
            bytes += key.len() + value.len();
            page.push((key, value));
        }
        Ok(page)
    }
}

fn decode_usage(value: &[u8]) -> Result<Usage, StorageError> {
    let [keys, bytes]: [u64; 2] = serde_json::from_slice(value)
        .map_err(|e| unavailable(format!("a corrupt usage record: {e}")))?;
    Ok(Usage { keys, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keys_keep_prefixes_and_byte_order() {
        let keys = ["", "a", "a\u{0}", "ab", "b", "é", "\u{7f}"];
        let mut sorted = keys.map(str::to_owned);
        sorted.sort();
        let mut hexed: Vec<String> = keys.iter().map(|k| hex(k)).collect();
        hexed.sort();
        let back: Vec<String> = hexed.iter().map(|h| unhex(h).unwrap()).collect();
        assert_eq!(back, sorted, "the same order");
        assert!(hex("ab").starts_with(&hex("a")));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("6"), None);
    }
}
