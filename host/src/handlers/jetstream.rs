//! The handler versions of a cluster: each component in the `clawq_handlers` object store
//! under its version (the SHA-256 of its bytes), and per consumer one record in the
//! `clawq_handler_slots` key-value bucket (key: the encoded consumer name) with its
//! current version, the config's version at the last start and its history. A record
//! is changed by compare-and-set, so that deploys on two hosts at once both land in the
//! history; every host watches the records and swaps its slot when the current version
//! changes.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_nats::jetstream::kv::{CreateErrorKind, Operation, Store, UpdateErrorKind};
use async_nats::jetstream::object_store::{self, ObjectStore};
use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::HistoryEntry;
use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::kv;
use crate::runtime::LoadedHandler;

/// The object store of the components.
pub const OBJECTS: &str = "clawq_handlers";
/// The bucket of the slots' records.
pub const BUCKET: &str = "clawq_handler_slots";
/// How many times a record change is tried against concurrent changes.
const CHANGE_ATTEMPTS: usize = 20;

/// One consumer's record.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct SlotRecord {
    current: String,
    config_version: String,
    /// Oldest first.
    history: Vec<Loaded>,
}

/// One entry of a history: a version made current.
#[derive(serde::Serialize, serde::Deserialize)]
struct Loaded {
    version: String,
    name: String,
    size: u64,
    loaded_ms: u64,
    loaded_by: String,
}

/// The handler versions of a cluster.
pub(super) struct ClusterVersions {
    records: Store,
    objects: ObjectStore,
}

/// A change of a consumer's current version: the consumer and the version.
pub(super) type Change = (String, String);

impl ClusterVersions {
    /// Opens the object store and the bucket; the receiver gets every change of a
    /// consumer's current version made from now on, by any host, in order.
    pub(super) async fn open(cluster: &Cluster) -> Result<(Self, mpsc::UnboundedReceiver<Change>)> {
        let records = kv::bucket(cluster, BUCKET, "clawq: the handler versions", false).await?;
        let config = object_store::Config {
            bucket: OBJECTS.to_owned(),
            description: Some("clawq: the handler components, by version".to_owned()),
            num_replicas: cluster.replicas(),
            ..Default::default()
        };
        let objects = cluster
            .jetstream()
            .create_object_store(config)
            .await
            .with_context(|| format!("opening the JetStream object store `{OBJECTS}`"))?;
        let (changes, received) = mpsc::unbounded_channel();
        kv::watch(records.clone(), move |entry| {
            if entry.operation != Operation::Put {
                return;
            }
            let (Some(consumer), Ok(record)) = (
                kv::decode_key(&entry.key),
                serde_json::from_slice::<SlotRecord>(&entry.value),
            ) else {
                return;
            };
            let _ = changes.send((consumer, record.current));
        });
        Ok((ClusterVersions { records, objects }, received))
    }

    /// The record of `consumer` and its revision, if it has one.
    async fn record(&self, consumer: &str) -> Result<Option<(SlotRecord, u64)>> {
        let entry = self
            .records
            .entry(kv::encode_key(consumer))
            .await
            .context("reading the handler versions")?;
        match entry {
            Some(entry) if entry.operation == Operation::Put => {
                let record = serde_json::from_slice(&entry.value)
                    .context("a corrupt handler version record")?;
                Ok(Some((record, entry.revision)))
            }
            _ => Ok(None),
        }
    }

    /// The current version of `consumer` and the config's version at its last start.
    pub(super) async fn stored(&self, consumer: &str) -> Result<Option<(String, String)>> {
        Ok(self
            .record(consumer)
            .await?
            .map(|(r, _)| (r.current, r.config_version)))
    }

    /// The bytes of the kept `version`.
    pub(super) async fn read(&self, version: &str) -> Result<Vec<u8>> {
        let mut object = self
            .objects
            .get(version)
            .await
            .with_context(|| format!("reading kept version {version}"))?;
        let mut wasm = Vec::new();
        object
            .read_to_end(&mut wasm)
            .await
            .with_context(|| format!("reading kept version {version}"))?;
        Ok(wasm)
    }

    /// Stores `wasm`, the bytes of `handler`, and records it as the current version of
    /// `consumer`, made current by `by` (and as the config's version, if given). The
    /// bytes are in the object store before the record changes.
    pub(super) async fn persist(
        &self,
        consumer: &str,
        handler: &LoadedHandler,
        wasm: &[u8],
        by: &str,
        config_version: Option<&str>,
    ) -> Result<()> {
        let version = handler.version();
        if self.objects.info(version).await.is_err() {
            self.objects
                .put(version, &mut &wasm[..])
                .await
                .with_context(|| format!("storing version {version}"))?;
        }
        let key = kv::encode_key(consumer);
        for _ in 0..CHANGE_ATTEMPTS {
            let (mut record, revision) = self.record(consumer).await?.unzip();
            let record = record.get_or_insert_with(SlotRecord::default);
            if config_version
                .is_some_and(|c| c == record.config_version && version == record.current)
            {
                // Another host starting with the same config recorded it meanwhile.
                return Ok(());
            }
            record.current = version.to_owned();
            if let Some(config_version) = config_version {
                record.config_version = config_version.to_owned();
            }
            record.history.push(Loaded {
                version: version.to_owned(),
                name: handler.name().to_owned(),
                size: handler.size() as u64,
                loaded_ms: now_ms(),
                loaded_by: by.to_owned(),
            });
            let value = Bytes::from(serde_json::to_vec(&record)?);
            let landed = match revision {
                Some(revision) => match self.records.update(&key, value, revision).await {
                    Ok(_) => true,
                    Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => false,
                    Err(err) => return Err(err).context("recording the handler version"),
                },
                None => match self.records.create(&key, value).await {
                    Ok(_) => true,
                    Err(err) if err.kind() == CreateErrorKind::AlreadyExists => false,
                    Err(err) => return Err(err).context("recording the handler version"),
                },
            };
            if landed {
                return Ok(());
            }
            // Another host changed the record meanwhile: read it again.
            tokio::time::sleep(Duration::from_millis(fastrand::u64(1..20))).await;
        }
        bail!("recording the handler version: the record kept changing under this host")
    }

    /// The history of `consumer`, newest first, every entry `current`.
    pub(super) async fn history(&self, consumer: &str) -> Result<Vec<HistoryEntry>> {
        let Some((record, _)) = self.record(consumer).await? else {
            return Ok(Vec::new());
        };
        Ok(record
            .history
            .into_iter()
            .rev()
            .map(|e| HistoryEntry {
                version: e.version,
                name: Some(e.name),
                size: e.size,
                loaded_at: crate::clock::iso8601(e.loaded_ms),
                loaded_by: e.loaded_by,
                status: "current",
            })
            .collect())
    }
}
