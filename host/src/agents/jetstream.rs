//! The agent registry of a cluster: one key per agent (its encoded DID) in the
//! `clawq_agents` key-value bucket, holding the SHA-256 hash of its token and when it was
//! added. Every host reads the bucket, so an agent added on one host connects on any;
//! every host watches it and closes the connection of an agent removed on any host.

use std::sync::Arc;

use anyhow::{Context, Result};
use async_nats::jetstream::kv::{CreateErrorKind, Operation, Store};
use bytes::Bytes;

use super::{Agent, AgentError};
use crate::cluster::Cluster;
use crate::kv;
use crate::relay::hub::ConnectionHub;

/// The bucket of the registered agents.
pub const BUCKET: &str = "clawq_agents";

/// A registered agent, as the bucket keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    token_hash: String,
    added_ms: u64,
}

/// The agents of a cluster.
pub struct ClusterAgents {
    bucket: Store,
}

impl ClusterAgents {
    /// Opens the bucket and starts closing, through `hub`, the connection of every agent
    /// removed from now on.
    pub(super) async fn open(cluster: &Cluster, hub: Arc<ConnectionHub>) -> Result<Self> {
        let bucket = kv::bucket(cluster, BUCKET, "clawq: the registered agents", false).await?;
        kv::watch(bucket.clone(), move |entry| {
            if entry.operation == Operation::Put {
                return;
            }
            let Some(did) = kv::decode_key(&entry.key) else {
                return;
            };
            if hub.close(&did, 1008, "agent_removed") {
                tracing::info!(agent = %did, "removed agent's connection closed");
            }
        });
        Ok(ClusterAgents { bucket })
    }

    /// Registers `did` with the token whose hash is `token_hash`, unless it is already.
    pub(super) async fn add(
        &self,
        did: &str,
        token_hash: String,
        added_ms: u64,
    ) -> Result<(), AgentError> {
        let record = serde_json::to_vec(&Record {
            token_hash,
            added_ms,
        })
        .map_err(|err| AgentError::Storage(err.to_string()))?;
        match self
            .bucket
            .create(kv::encode_key(did), Bytes::from(record))
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if err.kind() == CreateErrorKind::AlreadyExists => {
                Err(AgentError::AlreadyRegistered(did.to_owned()))
            }
            Err(err) => Err(AgentError::Storage(err.to_string())),
        }
    }

    /// Removes `did`, which must be registered.
    pub(super) async fn remove(&self, did: &str) -> Result<(), AgentError> {
        let key = kv::encode_key(did);
        let storage = |err: &dyn std::fmt::Display| AgentError::Storage(err.to_string());
        let entry = self
            .bucket
            .entry(key.clone())
            .await
            .map_err(|e| storage(&e))?;
        let Some(entry) = entry.filter(|e| e.operation == Operation::Put) else {
            return Err(AgentError::NotRegistered(did.to_owned()));
        };
        // Only the removal of the record read: of two removals at once, one finds none.
        match self
            .bucket
            .delete_expect_revision(&key, Some(entry.revision))
            .await
        {
            Ok(()) => Ok(()),
            Err(err) => match self.bucket.get(key).await.map_err(|e| storage(&e))? {
                None => Err(AgentError::NotRegistered(did.to_owned())),
                Some(_) => Err(storage(&err)),
            },
        }
    }

    /// Every registered agent, by DID.
    pub(super) async fn list(&self) -> Result<Vec<Agent>> {
        let mut agents = Vec::new();
        for key in kv::keys(&self.bucket).await? {
            let (Some(did), Some(record)) = (kv::decode_key(&key), self.record(&key).await?) else {
                continue; // removed meanwhile
            };
            agents.push(Agent {
                did,
                added_ms: record.added_ms,
            });
        }
        agents.sort_by(|a, b| a.did.cmp(&b.did));
        Ok(agents)
    }

    /// Whether `token_hash` is the hash of the token of `did`.
    pub(super) async fn authenticate(&self, did: &str, token_hash: &str) -> Result<bool> {
        let record = self.record(&kv::encode_key(did)).await?;
        Ok(record.is_some_and(|r| r.token_hash == token_hash))
    }

    async fn record(&self, key: &str) -> Result<Option<Record>> {
        let value = kv::leader_get(&self.bucket, key)
            .await
            .context("reading the agent registry")?;
        value
            .map(|v| serde_json::from_slice(&v).context("a corrupt agent record"))
            .transpose()
    }
}
