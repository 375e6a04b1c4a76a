//! The JetStream key-value buckets that hold the cluster-wide state of several hosts
//! sharing a cluster (`[backend] kind = "nats"`): opening a bucket, naming keys after
//! text that is not a valid key (a DID), a put with a per-key TTL, and watching a bucket
//! for as long as the host runs.

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::HeaderMap;
use async_nats::jetstream::kv::{self, Entry, Store};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::cluster::Cluster;

/// How long a watch that failed waits before it is made again.
const REWATCH_DELAY: Duration = Duration::from_millis(500);

/// Opens the bucket `name` (creating it if need be), keeping one value per key, with
/// `replicas` copies. With `ttl_keys`, its keys may carry their own TTL
/// ([`put_with_ttl`]), whose expiry the watchers see as a purge.
pub async fn bucket(
    cluster: &Cluster,
    name: &str,
    description: &str,
    ttl_keys: bool,
) -> Result<Store> {
    let config = kv::Config {
        bucket: name.to_owned(),
        description: description.to_owned(),
        history: 1,
        num_replicas: cluster.replicas(),
        // Per-key TTL is refused (a misleading error 10166) without delete markers.
        limit_markers: ttl_keys.then_some(Duration::from_secs(1)),
        ..Default::default()
    };
    cluster
        .jetstream()
        .create_or_update_key_value(config)
        .await
        .with_context(|| format!("opening the JetStream key-value bucket `{name}`"))
}

/// `text` as a key of a bucket: its UTF-8 bytes in unpadded base64url, which only uses
/// characters valid in a key.
pub fn encode_key(text: &str) -> String {
    URL_SAFE_NO_PAD.encode(text)
}

/// The text `key` encodes ([`encode_key`]), if it is one.
pub fn decode_key(key: &str) -> Option<String> {
    String::from_utf8(URL_SAFE_NO_PAD.decode(key).ok()?).ok()
}

/// Puts `value` under `key` of `store`, to be removed after `ttl` (whole seconds, at
/// least one), and returns once JetStream acknowledged it. The bucket must allow
/// per-key TTLs ([`bucket`] with `ttl_keys`); async-nats has no put with a TTL, so this
/// publishes to the key's subject with the `Nats-TTL` header.
pub async fn put_with_ttl(
    cluster: &Cluster,
    store: &Store,
    key: &str,
    value: Bytes,
    ttl: Duration,
) -> Result<()> {
    let mut headers = HeaderMap::new();
    let seconds = ttl.as_secs().max(u64::from(ttl.subsec_nanos() > 0)).max(1);
    headers.insert("Nats-TTL", seconds.to_string().as_str());
    let subject = format!("{}{key}", store.prefix);
    cluster
        .jetstream()
        .publish_with_headers(subject, headers, value)
        .await
        .context("publishing to the key-value bucket")?
        .await
        .context("the key-value bucket did not acknowledge the put")?;
    Ok(())
}

/// Calls `on_change` with every change of `store` (puts, deletes, purges, expiries)
/// made from now on, by any host, for as long as the process runs; a watch that fails
/// (the connection lost) is made again from the change after the last one seen.
pub fn watch(store: Store, on_change: impl Fn(Entry) + Send + 'static) {
    tokio::spawn(async move {
        let mut seen = None;
        loop {
            let watch = match seen {
                Some(revision) => store.watch_all_from_revision(revision + 1).await,
                None => store.watch_all().await,
            };
            match watch {
                Ok(mut changes) => {
                    while let Some(change) = changes.next().await {
                        match change {
                            Ok(entry) => {
                                seen = Some(entry.revision);
                                on_change(entry)
                            }
                            Err(err) => {
                                tracing::warn!(bucket = %store.name, error = %err, "watch failed");
                                break;
                            }
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(bucket = %store.name, error = %err, "cannot watch the bucket")
                }
            }
            tokio::time::sleep(REWATCH_DELAY).await;
        }
    });
}

/// Every live entry's key of `store`.
pub async fn keys(store: &Store) -> Result<Vec<String>> {
    let mut keys = store.keys().await.context("listing the bucket's keys")?;
    let mut all = Vec::new();
    while let Some(key) = keys.next().await {
        all.push(key.context("listing the bucket's keys")?);
    }
    Ok(all)
}

/// The value of `key` in `store`, as the bucket's stream leader has it: `None` when the
/// key was never put, or was deleted, purged or expired since. Slower than a direct get
/// (which any replica may answer, and one behind the leader answers with an older value),
/// but never stale: for what decides who is let in.
pub async fn leader_get(store: &Store, key: &str) -> Result<Option<Bytes>> {
    let subject = format!("{}{key}", store.prefix);
    match store.stream.get_last_raw_message_by_subject(&subject).await {
        // Delete, purge and expiry markers carry no value.
        Ok(message) if message.payload.is_empty() => Ok(None),
        Ok(message) => Ok(Some(message.payload)),
        Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("reading `{key}` of `{}`", store.name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_text_encodes_to_a_valid_key_and_back() {
        for text in [
            "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB",
            "jobs",
            "ünïcode / with spaces.and.dots",
        ] {
            let key = encode_key(text);
            assert!(
                key.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')),
                "{key}"
            );
            assert_eq!(decode_key(&key).as_deref(), Some(text));
        }
        assert_eq!(decode_key("not base64!"), None);
    }
}
