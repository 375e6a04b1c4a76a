//! The trust store of a cluster: one key per revoked agent in the `clawq_trust`
//! key-value bucket, which JetStream removes when the revocation lapses (a per-key TTL).
//! Reads ask the bucket's leader (never a local copy, nor a replica that may be behind),
//! so a host answers "revoked" as soon as the put that revoked the agent is acknowledged,
//! wherever it was made. Every host watches
//! the bucket and closes the connection of an agent revoked by any host.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Store};
use bytes::Bytes;

use super::{AgentTrust, TrustError};
use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::kv;
use crate::relay::hub::ConnectionHub;
use crate::store::Pending;

/// The bucket of the revoked agents.
pub const BUCKET: &str = "clawq_trust";

/// A revocation, as the bucket keeps it under the agent's encoded DID.
#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    revoked_ms: u64,
    expires_ms: u64,
}

/// The revocations of a cluster.
pub(super) struct ClusterTrust {
    cluster: Cluster,
    bucket: Store,
}

impl ClusterTrust {
    /// Opens the bucket and starts closing, through `hub`, the connection of every agent
    /// revoked from now on.
    pub(super) async fn open(cluster: &Cluster, hub: Arc<ConnectionHub>) -> anyhow::Result<Self> {
        let bucket = kv::bucket(cluster, BUCKET, "clawq: the revoked agents", true).await?;
        kv::watch(bucket.clone(), move |entry| {
            if entry.operation != Operation::Put {
                return; // a lapsed revocation
            }
            let Some(did) = kv::decode_key(&entry.key) else {
                return;
            };
            if hub.close(&did, 1008, "agent_revoked") {
                tracing::info!(agent = %did, "revoked agent's connection closed");
            }
        });
        Ok(ClusterTrust {
            cluster: cluster.clone(),
            bucket,
        })
    }

    /// Starts putting the revocation of `did` (made at `now`, lapsing at `expires`, `ttl`
    /// from now) at once; the returned future resolves once JetStream acknowledged it.
    pub(super) fn revoke_later(
        &self,
        did: String,
        now: u64,
        expires: u64,
        ttl: Duration,
    ) -> Pending<TrustError> {
        let (cluster, bucket) = (self.cluster.clone(), self.bucket.clone());
        let marker = Marker {
            revoked_ms: now,
            expires_ms: expires,
        };
        let put = tokio::spawn(async move {
            let value = Bytes::from(serde_json::to_vec(&marker)?);
            kv::put_with_ttl(&cluster, &bucket, &kv::encode_key(&did), value, ttl).await
        });
        Box::pin(async move {
            put.await
                .map_err(|err| TrustError::Unavailable(err.to_string()))?
                .map_err(|err| TrustError::Unavailable(format!("{err:#}")))
        })
    }

    /// The revocation state of `did` now, as the bucket has it.
    pub(super) async fn lookup(&self, did: &str) -> Result<AgentTrust, TrustError> {
        let value = kv::leader_get(&self.bucket, &kv::encode_key(did))
            .await
            .map_err(|err| TrustError::Unavailable(format!("{err:#}")))?;
        let marker = match value {
            Some(value) => Some(
                serde_json::from_slice::<Marker>(&value)
                    .map_err(|err| TrustError::Unavailable(format!("a corrupt marker: {err}")))?,
            ),
            None => None,
        }
        // The bucket removes a lapsed marker within a second or so: it no longer counts.
        .filter(|marker| marker.expires_ms > now_ms());
        Ok(AgentTrust {
            revoked_at_ms: marker.as_ref().map(|m| m.revoked_ms),
            expires_at_ms: marker.as_ref().map(|m| m.expires_ms),
        })
    }
}
